//! HTTP/1.1 over snapd's unix socket (hyper + hyperlocal), with a bound on
//! time and on the size of an answer. Knows nothing of snapd's envelope.

use super::Error;
use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HttpClient;
use hyperlocal::{UnixClientExt, UnixConnector};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One request to snapd. `path` carries the query and is already escaped
/// (built with [`super::names`]).
#[derive(Debug, Clone)]
pub struct Request {
    /// The HTTP method.
    pub method: Method,
    /// Path and query, escaped.
    pub path: String,
    /// The body, if any.
    pub body: Option<Bytes>,
    /// The body's content type.
    pub content_type: Option<&'static str>,
    /// Overrides the client's timeout (long polls).
    pub timeout: Option<Duration>,
}

impl Request {
    /// A `GET` of `path`.
    pub fn get(path: impl Into<String>) -> Self {
        Request {
            method: Method::GET,
            path: path.into(),
            body: None,
            content_type: None,
            timeout: None,
        }
    }

    /// A request with a JSON body.
    pub fn with_json(
        method: Method,
        path: impl Into<String>,
        body: &impl serde::Serialize,
    ) -> Self {
        Request {
            method,
            path: path.into(),
            body: Some(Bytes::from(serde_json::to_vec(body).unwrap_or_default())),
            content_type: Some("application/json"),
            timeout: None,
        }
    }

    /// A short description for messages: `GET /v2/snaps`.
    pub fn what(&self) -> String {
        let path = self.path.split('?').next().unwrap_or("");
        format!("{} {}", self.method, path)
    }
}

/// A complete answer of snapd.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The HTTP status.
    pub status: u16,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, whole.
    pub body: Bytes,
}

impl RawResponse {
    /// The answer's content type (empty when absent).
    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

#[derive(Clone)]
pub(crate) struct Transport {
    socket: PathBuf,
    http: HttpClient<UnixConnector, Full<Bytes>>,
    timeout: Duration,
    max_body: usize,
}

impl Transport {
    pub fn new(socket: &Path, timeout: Duration, max_body: usize) -> Self {
        Transport {
            socket: socket.to_path_buf(),
            http: HttpClient::unix(),
            timeout,
            max_body,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends the request and reads the whole answer, within the timeout.
    pub async fn round_trip(&self, req: &Request) -> Result<RawResponse, Error> {
        let limit = req.timeout.unwrap_or(self.timeout);
        let work = async {
            let resp = self.open_inner(req).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, self.max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        Error::TooLarge {
                            what: req.what(),
                            limit: self.max_body,
                        }
                    } else {
                        self.broken(req, &*e)
                    }
                })?
                .to_bytes();
            Ok(RawResponse {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| Error::Timeout {
                what: req.what(),
                after: limit,
            })?
    }

    /// Sends the request and returns as soon as the status line and headers
    /// arrived; the body streams (snapshot exports).
    pub async fn open(&self, req: &Request) -> Result<http::Response<Incoming>, Error> {
        let limit = req.timeout.unwrap_or(self.timeout);
        tokio::time::timeout(limit, self.open_inner(req))
            .await
            .map_err(|_| Error::Timeout {
                what: req.what(),
                after: limit,
            })?
    }

    async fn open_inner(&self, req: &Request) -> Result<http::Response<Incoming>, Error> {
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, &req.path).into();
        let mut builder = http::Request::builder()
            .method(req.method.clone())
            .uri(uri)
            .header(http::header::HOST, "localhost");
        if let Some(ct) = req.content_type {
            builder = builder.header(http::header::CONTENT_TYPE, ct);
        }
        let body = Full::new(req.body.clone().unwrap_or_default());
        let request = builder.body(body).map_err(|e| Error::InvalidInput {
            what: "request",
            value: format!("{} ({e})", req.what()),
            why: "it cannot be expressed as an HTTP request",
        })?;
        self.http.request(request).await.map_err(|e| {
            if e.is_connect() {
                Error::Unreachable {
                    socket: self.socket.clone(),
                    detail: crate::errors::chain(&e),
                }
            } else {
                self.broken(req, &e)
            }
        })
    }

    fn broken(&self, req: &Request, e: &(dyn std::error::Error + 'static)) -> Error {
        Error::Broken {
            what: req.what(),
            detail: crate::errors::chain(e),
        }
    }
}
