//! The HTTP side of enrollment: `POST {url}/v1/device/enroll` with the
//! model and serial assertions, over `http://` or verified `https://`.

use super::wire::{EnrollResponse, Enrollment, STATUS_DISABLED, STATUS_ENROLLED, STATUS_WAITING};
use super::EnrollState;
use crate::config::Config;
use crate::snapd::ASSERTION_CONTENT_TYPE;
use futures::StreamExt;

pub const ENROLL_PATH: &str = "/v1/device/enroll";
/// An enrollment answer is a few kilobytes; anything much larger is wrong.
const MAX_ANSWER: usize = 1024 * 1024;

#[derive(Clone)]
pub struct IdentityService {
    http: reqwest::Client,
    url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read identity.ca {path}: {detail}")]
    Ca { path: String, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl IdentityService {
    pub fn new(config: &Config) -> Result<Self, SetupError> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.identity.timeout.get())
            .connect_timeout(
                config
                    .identity
                    .timeout
                    .get()
                    .min(std::time::Duration::from_secs(10)),
            )
            .user_agent(concat!("iot-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = config.identity.ca.path() {
            let ca_err = |detail: String| SetupError::Ca {
                path: path.display().to_string(),
                detail,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no certificate in it".into()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(IdentityService {
            http,
            url: config.url.join(ENROLL_PATH),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.url
    }

    /// Sends the assertions and classifies the answer.
    pub async fn enroll(&self, assertions: String) -> Result<Enrollment, EnrollState> {
        let unreachable = |detail: String| EnrollState::ServiceUnreachable {
            url: self.url.clone(),
            detail,
        };
        let resp = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, ASSERTION_CONTENT_TYPE)
            .body(assertions)
            .send()
            .await
            .map_err(|e| unreachable(crate::errors::chain(&e)))?;
        let status = resp.status();
        let body = read_limited(resp).await.map_err(unreachable)?;
        let parsed: Result<EnrollResponse, _> = serde_json::from_slice(&body);
        if status.is_server_error() {
            let msg = parsed.map(|r| r.message).unwrap_or_default();
            return Err(unreachable(
                format!("HTTP {status} {msg}").trim().to_string(),
            ));
        }
        let answer = parsed.map_err(|e| EnrollState::BadAnswer {
            detail: format!("HTTP {status}, not the enrollment JSON ({e})"),
        })?;
        if !answer.code.is_empty() || !status.is_success() {
            let message = if answer.message.is_empty() {
                format!("HTTP {status}")
            } else {
                answer.message
            };
            return Err(EnrollState::Refused {
                code: answer.code,
                message,
            });
        }
        let enrollment = answer.enrollment.ok_or_else(|| EnrollState::BadAnswer {
            detail: "the answer has no enrollment".into(),
        })?;
        match enrollment.status {
            STATUS_ENROLLED => Ok(enrollment),
            STATUS_WAITING => Err(EnrollState::Waiting),
            STATUS_DISABLED => Err(EnrollState::Disabled),
            other => Err(EnrollState::BadAnswer {
                detail: format!("unknown enrollment status {other}"),
            }),
        }
    }
}

async fn read_limited(resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| format!("the answer broke off ({})", crate::errors::chain(&e)))?;
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(format!("the answer is larger than {MAX_ANSWER} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
