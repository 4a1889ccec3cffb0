//! The remote browser (`browser.*`, off by default): an HTTP request
//! carried in a message is executed against an allow-listed local origin
//! (`browser.allow`, `127.0.0.1:PORT` entries) and the response streamed
//! back in numbered frames ([`protocol`]), so the device can keep its web
//! UI on loopback and still show it to an operator.
//!
//! Nothing but the listed origins is reachable: the request names an
//! origin, never a URL, and redirects are passed back to the operator's
//! browser rather than followed here. Who may use it is the broker's
//! decision (as for the terminal, [`crate::services::terminal`]); every
//! request is logged without its headers or body (they carry cookies).

pub mod protocol;

use crate::bus::{topics, Nats, Topic};
use crate::config::Config;
pub use crate::services::outlet::{Outlet, Route};
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use bytes::Bytes;
use protocol::{ErrorKind, Frame, Head};
use std::sync::Arc;
use std::time::Duration;

/// Requests executed at once; more wait for the broker's next message.
const CONCURRENCY: usize = 32;

/// `browser.*`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `browser.allow`: `host:port` origins.
    pub allow: Vec<String>,
    /// `browser.max.body`.
    pub max_body: u64,
    /// `browser.timeout`.
    pub timeout: Duration,
}

impl Settings {
    /// From the configuration; an entry that is not a loopback
    /// `host:port` is left out (and logged).
    pub fn from_config(c: &Config) -> Settings {
        let mut allow = Vec::new();
        for o in c.browser.allow.items() {
            match check_origin(o) {
                Ok(o) => allow.push(o),
                Err(e) => tracing::warn!(entry = %o, error = %e, "browser.allow entry ignored"),
            }
        }
        Settings {
            allow,
            max_body: c.browser.max.body,
            timeout: c.browser.timeout.get(),
        }
    }
}

/// A `browser.allow` entry: `127.0.0.1:PORT`, `localhost:PORT` or
/// `[::1]:PORT` (the device's own web servers; anything else would make the
/// agent a proxy into the device's network).
pub fn check_origin(o: &str) -> Result<String, String> {
    let o = o.trim();
    let (host, port) = o
        .rsplit_once(':')
        .ok_or_else(|| format!("{o:?}: write an origin as 127.0.0.1:PORT"))?;
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
        return Err(format!(
            "{o:?}: only loopback origins (127.0.0.1:PORT) may be allowed"
        ));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{o:?}: {port:?} is not a port"))?;
    if port == 0 {
        return Err(format!("{o:?}: port 0"));
    }
    Ok(format!("{host}:{port}"))
}

/// The addresses on the device-local NATS (NATS form).
pub fn nats_addresses() -> Vec<String> {
    let root = Topic::fixed(topics::BROWSER).nats();
    vec![
        format!("{root}.{}", protocol::REQUEST),
        format!("{root}.{}.{{token}}", protocol::REPLY),
    ]
}

/// The addresses on the DMS broker (MQTT form).
pub fn dms_addresses() -> Vec<String> {
    let root = format!("{}/{{deviceId}}", topics::DMS_BROWSER);
    vec![
        format!("{root}/{}", protocol::REQUEST),
        format!("{root}/{}/{{token}}", protocol::REPLY),
    ]
}

/// Both.
pub fn documented_addresses() -> Vec<String> {
    nats_addresses()
        .into_iter()
        .chain(dms_addresses())
        .collect()
}

/// The browser's executor: settings and one HTTP client.
pub struct Browser {
    settings: Settings,
    http: reqwest::Client,
    slots: Arc<tokio::sync::Semaphore>,
}

/// Where one request's frames go.
pub struct Sink {
    route: Route,
    /// NATS reply subject, or `{root}/reply/{token}`.
    to: Option<Topic>,
    nats_reply: Option<String>,
    seq: u64,
}

impl Sink {
    /// Frames to a NATS reply subject.
    pub fn nats(route: Route, reply: Option<String>) -> Sink {
        Sink {
            route,
            to: None,
            nats_reply: reply,
            seq: 0,
        }
    }

    /// Frames to `{root}/reply/{token}`.
    pub fn topic(route: Route, token: Option<&str>) -> Sink {
        let to = token.and_then(|t| route.root.join(&[protocol::REPLY, t]).ok());
        Sink {
            route,
            to,
            nats_reply: None,
            seq: 0,
        }
    }

    fn has_address(&self) -> bool {
        self.to.is_some() || self.nats_reply.is_some()
    }

    async fn send(&mut self, f: Frame) -> Result<(), String> {
        self.seq += 1;
        let payload = f.encode(self.seq);
        match (&self.nats_reply, &self.to, &self.route.outlet) {
            (Some(subject), _, Outlet::Nats(n)) => n
                .client()
                .publish(subject.clone(), payload)
                .await
                .map_err(|e| e.to_string()),
            (_, Some(t), o) => o.publish(t, payload).await,
            _ => Ok(()),
        }
    }
}

impl Browser {
    /// An executor for `settings`.
    pub fn new(settings: Settings) -> Result<Arc<Browser>, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Arc::new(Browser {
            settings,
            http,
            slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENCY)),
        }))
    }

    /// Executes one request (a message's payload) and sends its frames.
    pub async fn serve(&self, payload: Bytes, mut sink: Sink) {
        let req: protocol::Request = match serde_json::from_slice(&payload) {
            Ok(r) => r,
            Err(e) => {
                let _ = sink
                    .send(Frame::error(
                        ErrorKind::BadRequest,
                        format!("a browser request is {{\"method\",\"path\",\"headers\",\"body\"}}: {e}"),
                    ))
                    .await;
                return;
            }
        };
        if !sink.has_address() {
            if let Some(t) = &req.reply_to {
                sink = Sink::topic(sink.route.clone(), Some(t));
            }
        }
        let started = tokio::time::Instant::now();
        let (method, path) = (req.method.clone(), req.path.clone());
        let outcome = self.execute(req, &mut sink).await;
        let (status, error) = match &outcome {
            Ok(s) => (Some(*s), None),
            Err(f) => (None, Some(f.clone())),
        };
        if let Err(f) = &outcome {
            let _ = sink.send(Frame::Error(f.clone())).await;
        }
        tracing::info!(
            transport = sink.route.transport,
            %method,
            path = %path.chars().take(200).collect::<String>(),
            status = ?status,
            error = ?error.map(|e| e.kind),
            ms = started.elapsed().as_millis() as u64,
            "remote browser request"
        );
        let _ = sink.route.outlet.flush().await;
    }

    async fn execute(
        &self,
        req: protocol::Request,
        sink: &mut Sink,
    ) -> Result<u16, protocol::Failure> {
        let fail = |k: ErrorKind, m: String| protocol::Failure {
            kind: k.as_str().into(),
            message: m,
        };
        let origin =
            if req.origin.is_empty() {
                self.settings.allow.first().cloned().ok_or_else(|| {
                    fail(ErrorKind::Forbidden, "browser.allow lists no origin".into())
                })?
            } else {
                req.origin.clone()
            };
        if !self.settings.allow.contains(&origin) {
            return Err(fail(
                ErrorKind::Forbidden,
                format!(
                    "{:?} is not in browser.allow",
                    origin.chars().take(100).collect::<String>()
                ),
            ));
        }
        if !req.path.starts_with('/') || req.path.contains(char::is_whitespace) {
            return Err(fail(
                ErrorKind::BadRequest,
                "path must start with / and hold no whitespace".into(),
            ));
        }
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| fail(ErrorKind::BadRequest, "method is not an HTTP method".into()))?;
        let body = req
            .body_bytes()
            .map_err(|e| fail(ErrorKind::BadRequest, e))?;
        if body.len() as u64 > self.settings.max_body {
            return Err(fail(
                ErrorKind::TooLarge,
                format!(
                    "the request body is larger than browser.max.body ({} bytes)",
                    self.settings.max_body
                ),
            ));
        }
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &req.headers {
            if protocol::hop_by_hop(k) {
                continue;
            }
            let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                reqwest::header::HeaderValue::from_str(v),
            ) else {
                return Err(fail(ErrorKind::BadRequest, format!("bad header {k:?}")));
            };
            headers.append(k, v);
        }
        let _slot = self.slots.acquire().await;
        let url = format!("http://{origin}{}", req.path);
        let mut resp = self
            .http
            .request(method, &url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| classify(&e, &self.settings))?;
        let status = resp.status().as_u16();
        if resp
            .content_length()
            .is_some_and(|n| n > self.settings.max_body)
        {
            return Err(fail(
                ErrorKind::TooLarge,
                format!(
                    "the response body is larger than browser.max.body ({} bytes)",
                    self.settings.max_body
                ),
            ));
        }
        let head = Head {
            status,
            headers: resp
                .headers()
                .iter()
                .filter(|(k, _)| !protocol::hop_by_hop(k.as_str()))
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        };
        let gone = |e: String| fail(ErrorKind::Unreachable, format!("cannot answer: {e}"));
        sink.send(Frame::Head(head)).await.map_err(gone)?;
        let mut total = 0u64;
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| classify(&e, &self.settings))?;
            let Some(chunk) = chunk else { break };
            total += chunk.len() as u64;
            if total > self.settings.max_body {
                return Err(fail(
                    ErrorKind::TooLarge,
                    format!(
                        "the response body grew beyond browser.max.body ({} bytes)",
                        self.settings.max_body
                    ),
                ));
            }
            for part in chunk.chunks(protocol::CHUNK) {
                sink.send(Frame::Body(Bytes::copy_from_slice(part)))
                    .await
                    .map_err(gone)?;
            }
        }
        sink.send(Frame::End).await.map_err(gone)?;
        Ok(status)
    }
}

fn classify(e: &reqwest::Error, s: &Settings) -> protocol::Failure {
    let (k, m) = if e.is_timeout() {
        (
            ErrorKind::Timeout,
            format!(
                "the origin did not answer within browser.timeout ({:?})",
                s.timeout
            ),
        )
    } else {
        (ErrorKind::Unreachable, format!("the origin failed: {e}"))
    };
    protocol::Failure {
        kind: k.as_str().into(),
        message: m,
    }
}

/// The browser served on the device-local NATS (`iot.agent.browser.request`).
#[derive(Clone)]
pub struct NatsBrowser {
    /// The executor.
    pub browser: Arc<Browser>,
    /// The device-local NATS.
    pub bus: Nats,
}

impl Subsystem for NatsBrowser {
    const NAME: &'static str = "browser-nats";
    const SECTION: &'static str = "browser";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        let root = Topic::fixed(topics::BROWSER);
        let topic = root
            .join(&[protocol::REQUEST])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut sub = self.bus.subscribe(&topic).await?;
        let route = Route {
            outlet: Outlet::Nats(self.bus.clone()),
            root,
            transport: "nats",
        };
        // In force once the server processed it: only then "served"
        // (core NATS keeps nothing for a request that came before).
        self.bus.sync().await?;
        tracing::info!(subject = %topic.nats(), origins = ?self.browser.settings.allow, "remote browser served on NATS");
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = sub.next() => match m {
                    Some(m) => m,
                    None => anyhow::bail!("the NATS subscription to {topic} ended"),
                },
            };
            let sink = Sink::nats(route.clone(), msg.reply_subject().map(str::to_string));
            if let Some(why) = self.bus.unprotected() {
                let mut sink = sink;
                let _ = sink
                    .send(Frame::error(
                        ErrorKind::Unprotected,
                        format!("the browser is not served: {why}"),
                    ))
                    .await;
                continue;
            }
            let b = self.browser.clone();
            let s = shutdown.clone();
            shutdown.spawn(async move {
                tokio::select! {
                    _ = b.serve(msg.payload, sink) => {}
                    _ = s.cancelled() => {}
                }
            });
        }
    }
}
