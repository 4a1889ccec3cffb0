//! The HTTP side of enrollment: `POST {url}/v1/device/enroll` with the
//! model and serial assertions, over `http://` or verified `https://`.

use super::wire::{EnrollResponse, Enrollment, STATUS_DISABLED, STATUS_ENROLLED, STATUS_WAITING};
use super::EnrollState;
use crate::config::Config;
use crate::snapd::ASSERTION_CONTENT_TYPE;
use futures::StreamExt;

/// The enrollment endpoint, relative to `url`.
pub const ENROLL_PATH: &str = "/v1/device/enroll";
/// An enrollment answer is a few kilobytes; anything much larger is wrong.
const MAX_ANSWER: usize = 1024 * 1024;

/// The identity service's HTTP client (TLS verified, answers bounded).
#[derive(Clone)]
pub struct IdentityService {
    http: reqwest::Client,
    url: String,
}

/// Why the identity service's client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `identity.ca` cannot be read or holds no certificate.
    #[error("cannot read identity.ca {path}: {detail}")]
    Ca {
        /// The configured path.
        path: String,
        /// Why.
        detail: String,
    },
    /// The HTTP client refused its configuration.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// A plain `http://` URL to a host that is not loopback, without `identity.insecure`.
    #[error("refusing the identity service at {url}: plain http:// to a host that is not loopback would carry the device's private key and trust root in clear; use https:// or set identity.insecure=true")]
    Insecure {
        /// The configured URL.
        url: String,
    },
}

/// Plain `http://` is allowed to loopback hosts only, unless opted in.
fn check_plain_http(url: &str, insecure: bool) -> Result<(), SetupError> {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return Ok(()); // the config layer validated it; reqwest reports the rest
    };
    if parsed.scheme() != "http" || insecure {
        return Ok(());
    }
    let host = parsed.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if loopback {
        Ok(())
    } else {
        Err(SetupError::Insecure {
            url: url.to_string(),
        })
    }
}

impl IdentityService {
    /// Builds the client from `url` and `identity.*`.
    pub fn new(config: &Config) -> Result<Self, SetupError> {
        check_plain_http(config.url.as_str(), config.identity.insecure)?;
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
        // Verified TLS from the project's one builder: the system roots
        // plus `identity.ca`.
        let mut roots = crate::tls::Roots::new().system();
        if let Some(path) = config.identity.ca.path() {
            roots = roots
                .file(path, "identity.ca")
                .map_err(|e| SetupError::Ca {
                    path: path.display().to_string(),
                    detail: e.detail(),
                })?;
        }
        if !roots.is_empty() {
            let tls = crate::tls::client_config(
                roots,
                None,
                crate::tls::Verify::Full,
                crate::tls::Advice {
                    peer: "the identity service",
                    ca_key: "identity.ca",
                    verify_key: None,
                },
            )
            .map_err(|e| SetupError::Client(e.to_string()))?;
            builder = builder.use_preconfigured_tls((*tls).clone());
        }
        let http = builder
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(IdentityService {
            http,
            url: config.url.join(ENROLL_PATH),
        })
    }

    /// The enrollment URL.
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

#[cfg(test)]
mod tests {
    use super::check_plain_http;

    #[test]
    fn plain_http_only_to_loopback_or_when_opted_in() {
        for ok in [
            "http://localhost:8030",
            "http://127.0.0.1:8030",
            "http://[::1]:8030",
            "https://identity.example.com",
        ] {
            assert!(check_plain_http(ok, false).is_ok(), "{ok}");
        }
        let e = check_plain_http("http://identity.example.com:8030", false).unwrap_err();
        assert!(e.to_string().contains("identity.insecure=true"), "{e}");
        assert!(check_plain_http("http://identity.example.com:8030", true).is_ok());
    }
}
