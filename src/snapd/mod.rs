//! The snapd REST client. Nothing else in the agent speaks HTTP to snapd.
//!
//! Layers, bottom up: `transport` moves bytes over the unix socket within a
//! time and size bound; [`Client::send`] adds the retry policy (GETs on
//! transport failures, any method on `snap-change-conflict`); the typed
//! calls in `api/` (one file per area of the REST API) check the envelope
//! and decode [`models`]. [`Client::send`] is public so the NATS mirror can
//! pass snapd's answers on byte for byte.

mod api;
pub mod assertion;
mod error;
pub mod models;
pub mod names;
mod transport;

pub use api::{parse_json_seq, ChangeSelect, CreateUser, Notices, SnapshotStarted};
pub use assertion::{Assertion, AssertionError};
pub use error::{ApiError, Error, ErrorKind};
pub use models::*;
pub use names::SnapName;
pub use transport::{RawResponse, Request};

use http::Method;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;
use transport::Transport;

/// Content type of assertion answers and uploads.
pub const ASSERTION_CONTENT_TYPE: &str = "application/x.ubuntu.assertion";
/// Answers above this size are refused rather than buffered.
pub const DEFAULT_MAX_BODY: usize = 32 * 1024 * 1024;

/// When to ask snapd again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Extra attempts of a GET whose connection failed (snapd restarting).
    pub get_retries: u32,
    /// Extra attempts of any request refused with `snap-change-conflict`
    /// (snapd refused before doing anything, so asking again is safe).
    pub conflict_retries: u32,
    /// First delay; doubled on each retry.
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            get_retries: 3,
            conflict_retries: 5,
            base_delay: Duration::from_millis(250),
        }
    }
}

/// A cheap-to-clone handle on snapd (connections are pooled inside).
#[derive(Clone)]
pub struct Client {
    transport: Transport,
    retry: RetryPolicy,
}

impl Client {
    /// A client of the socket at `socket`, each request bounded by `timeout`.
    pub fn new(socket: impl AsRef<Path>, timeout: Duration) -> Self {
        Client {
            transport: Transport::new(socket.as_ref(), timeout, DEFAULT_MAX_BODY),
            retry: RetryPolicy::default(),
        }
    }

    /// The client of `snapd.socket` with `snapd.timeout`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self::new(config.snapd.socket.path(), config.snapd.timeout.get())
    }

    /// Retries requests that snapd refuses as busy by `retry`.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Bounds every answer's body to `max_body` bytes.
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        let t = &self.transport;
        self.transport = Transport::new(t.socket(), t.timeout(), max_body);
        self
    }

    /// Bound on one request (and on each wait for more of a streamed body).
    pub fn timeout(&self) -> Duration {
        self.transport.timeout()
    }

    /// snapd's socket.
    pub fn socket(&self) -> &Path {
        self.transport.socket()
    }

    /// Sends a request with the retry policy and returns snapd's answer as
    /// it came, error statuses included.
    pub async fn send(&self, req: &Request) -> Result<RawResponse, Error> {
        let mut attempt = 0u32;
        loop {
            let delay = self.retry.base_delay * 2u32.saturating_pow(attempt);
            match self.transport.round_trip(req).await {
                Err(e)
                    if req.method == Method::GET
                        && matches!(e, Error::Unreachable { .. } | Error::Broken { .. })
                        && attempt < self.retry.get_retries =>
                {
                    tracing::debug!(error = %e, attempt, "snapd request failed; retrying");
                }
                Ok(resp) if resp.status == 409 && attempt < self.retry.conflict_retries => {
                    if !is_conflict(&resp) {
                        return Ok(resp);
                    }
                    tracing::debug!(what = %req.what(), attempt, "snap change conflict; retrying");
                }
                other => return other,
            }
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Sends a request and returns the body as it streams (no size bound).
    pub async fn open(
        &self,
        req: &Request,
    ) -> Result<http::Response<hyper::body::Incoming>, Error> {
        self.transport.open(req).await
    }

    /// Sends a request and decodes the envelope; error envelopes become
    /// [`Error::Api`].
    pub async fn call(&self, req: &Request) -> Result<Envelope, Error> {
        let resp = self.send(req).await?;
        envelope(&req.what(), &resp)
    }

    /// A sync call whose `result` decodes into `T`.
    pub(crate) async fn get_result<T: DeserializeOwned>(&self, req: &Request) -> Result<T, Error> {
        let env = self.call(req).await?;
        decode(&req.what(), env.result)
    }

    /// An async call: returns the id of the change snapd started.
    pub(crate) async fn start_change(&self, req: &Request) -> Result<String, Error> {
        let env = self.call(req).await?;
        match (env.kind, env.change) {
            (ResponseType::Async, Some(id)) => Ok(id),
            _ => Err(Error::Malformed {
                what: req.what(),
                status: env.status_code,
                detail: "expected an async answer with a change id".into(),
            }),
        }
    }
}

/// Decodes snapd's envelope from a raw answer.
pub fn envelope(what: &str, resp: &RawResponse) -> Result<Envelope, Error> {
    let env: Envelope = serde_json::from_slice(&resp.body).map_err(|e| Error::Malformed {
        what: what.to_string(),
        status: resp.status,
        detail: format!("{e}; body starts with {:?}", snippet(&resp.body)),
    })?;
    if env.kind == ResponseType::Error || resp.status >= 400 {
        return Err(Error::Api {
            what: what.to_string(),
            status: resp.status,
            error: env.api_error(),
        });
    }
    Ok(env)
}

pub(crate) fn decode<T: DeserializeOwned>(what: &str, v: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|e| Error::Malformed {
        what: what.to_string(),
        status: 200,
        detail: format!("unexpected result: {e}"),
    })
}

fn is_conflict(resp: &RawResponse) -> bool {
    serde_json::from_slice::<Envelope>(&resp.body)
        .map(|e| e.api_error().kind == Some(ErrorKind::SnapChangeConflict))
        .unwrap_or(false)
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned()
}
