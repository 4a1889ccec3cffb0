//! The agent's EST client: `cacerts`, `simpleenroll` (HTTP Basic) and
//! `simplereenroll` (TLS client certificate), over HTTPS built by
//! `crate::tls` from `provisioning.ca` (a CA or a `sha256:` pin). Bodies are
//! sent unwrapped and read wrapped or not (`crate::est`).
//!
//! Each request has a TLS connection of its own, made here rather than by
//! an HTTP client library, because the CSR is bound to it: on TLS 1.3 its
//! challengePassword carries the connection's `tls-exporter` value (RFC 9266,
//! the TLS 1.3 form of RFC 7030 §3.5's tls-unique), so a CSR and the
//! credentials sent with it cannot be replayed on another connection.

use crate::config::{ProvisioningConfig, TrustAnchor};
use crate::est::{self as wire, CERTS_ONLY, MAX_BODY, PKCS10, PREFIX};
use anyhow::{anyhow, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls::pki_types::ServerName;
use std::time::Duration;

/// What an enrollment request came to.
#[derive(Debug)]
pub enum Outcome {
    /// The certificate chain (DER), the device's certificate among them.
    Issued(Vec<Vec<u8>>),
    /// `202`: ask again after this long.
    Deferred(Duration),
    /// `401`/`403`: the credentials (OTP or certificate) were refused; the
    /// server's message.
    Refused(String),
    /// Anything else: worth retrying later.
    Failed(String),
}

/// Used when a `202` carries no readable `Retry-After`.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

/// One EST server, with or without a client certificate.
pub struct Est {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    /// `host:port` to dial.
    addr: String,
    /// The `Host` header.
    authority: String,
    /// `[/path]/.well-known/est[/label]`.
    base: String,
    timeout: Duration,
}

const ADVICE: crate::tls::Advice = crate::tls::Advice {
    peer: "the EST server (provisioning.url)",
    ca_key: "provisioning.ca",
    verify_key: None,
};

impl Est {
    /// A client of `provisioning.url`; `client` is the certificate and key
    /// (PEM) to present, for re-enrollment.
    pub fn new(c: &ProvisioningConfig, client: Option<(&str, &str)>) -> anyhow::Result<Est> {
        let raw = c.url.trim();
        let uri: http::Uri = raw
            .parse()
            .map_err(|e| anyhow!("provisioning.url {raw:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            anyhow::bail!(
                "provisioning.url {raw:?} must be https://host:port: EST runs over TLS only"
            );
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("provisioning.url {raw:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| anyhow!("provisioning.url host {host:?}: {e}"))?;
        let port = authority.port_u16().unwrap_or(443);
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let client = client.map(|(cert_pem, key_pem)| crate::tls::ClientCert { cert_pem, key_pem });
        let tls = match &c.ca {
            TrustAnchor::None => anyhow::bail!(
                "provisioning.ca is not set: the EST server's CA certificate (a file or the PEM \
                 text) or sha256:<its certificate's SHA-256>"
            ),
            TrustAnchor::Pin(pin) => crate::tls::pinned_client_config(*pin, client, ADVICE)?,
            TrustAnchor::Pem(src) => crate::tls::client_config(
                crate::tls::Roots::new().source(src, "provisioning.ca")?,
                client,
                crate::tls::Verify::Full,
                ADVICE,
            )?,
        };
        let path = uri.path().trim_end_matches('/');
        let label = c.label.trim().trim_matches('/');
        let base = if label.is_empty() {
            format!("{path}{PREFIX}")
        } else {
            format!("{path}{PREFIX}/{label}")
        };
        Ok(Est {
            connector: tokio_rustls::TlsConnector::from(tls),
            name,
            addr,
            authority: authority.to_string(),
            base,
            timeout: c.timeout.get(),
        })
    }

    /// One connection: TCP, TLS, and the channel-binding value (TLS 1.3).
    async fn connect(
        &self,
    ) -> anyhow::Result<(
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        Option<String>,
    )> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let tls = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .context("TLS")?;
        let binding = crate::tls::channel_binding(tls.get_ref().1);
        Ok((tls, binding))
    }

    /// Sends one request on `tls`: `(status, Retry-After, body)`.
    async fn exchange(
        &self,
        tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        req: http::Request<Full<Bytes>>,
    ) -> anyhow::Result<(http::StatusCode, Option<Duration>, Vec<u8>)> {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let result = async {
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(wire::parse_retry_after);
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| anyhow!("cannot read the answer (at most {MAX_BODY} bytes): {e}"))?
                .to_bytes()
                .to_vec();
            anyhow::Ok((status, retry_after, body))
        }
        .await;
        driver.abort();
        result
    }

    fn request(&self, method: http::Method, op: &str) -> http::request::Builder {
        http::Request::builder()
            .method(method)
            .uri(format!("{}/{op}", self.base))
            .header(http::header::HOST, &self.authority)
            .header(http::header::ACCEPT, CERTS_ONLY)
    }

    /// `GET cacerts`: the CA certificates (DER).
    pub async fn cacerts(&self) -> Result<Vec<Vec<u8>>, String> {
        let go = async {
            let (tls, _) = self.connect().await?;
            let req = self
                .request(http::Method::GET, "cacerts")
                .body(Full::new(Bytes::new()))?;
            self.exchange(tls, req).await
        };
        let (status, _, body) = tokio::time::timeout(self.timeout, go)
            .await
            .map_err(|_| format!("no answer within {}", secs(self.timeout)))?
            .map_err(|e| format!("{e:#}"))?;
        if !status.is_success() {
            return Err(format!("cacerts answered {status}: {}", excerpt(&body)));
        }
        wire::parse_certs_body(&body).map_err(|e| format!("cacerts: {e}"))
    }

    /// `POST simpleenroll` (with `basic` = device id and OTP) or
    /// `simplereenroll` (without: the TLS client certificate), with a CSR
    /// for `key_pem` naming `device`, made for (bound to) this connection.
    pub async fn enroll(
        &self,
        key_pem: &str,
        device: &str,
        basic: Option<(&str, &str)>,
    ) -> Outcome {
        let op = if basic.is_some() {
            "simpleenroll"
        } else {
            "simplereenroll"
        };
        let go = async {
            let (tls, binding) = self.connect().await?;
            let csr = csr(key_pem, device, binding.as_deref()).map_err(anyhow::Error::msg)?;
            let mut req = self
                .request(http::Method::POST, op)
                .header(http::header::CONTENT_TYPE, PKCS10);
            if let Some((user, pass)) = basic {
                req = req.header(http::header::AUTHORIZATION, wire::basic(user, pass));
            }
            let req = req.body(Full::new(Bytes::from(wire::encode_base64(&csr))))?;
            self.exchange(tls, req).await
        };
        let (status, retry_after, body) = match tokio::time::timeout(self.timeout, go).await {
            Err(_) => return Outcome::Failed(format!("no answer within {}", secs(self.timeout))),
            Ok(Err(e)) => return Outcome::Failed(format!("{e:#}")),
            Ok(Ok(r)) => r,
        };
        match status.as_u16() {
            200 => match wire::parse_certs_body(&body) {
                Ok(certs) => Outcome::Issued(certs),
                Err(e) => Outcome::Failed(format!("{op} answered 200 but {e}")),
            },
            202 => Outcome::Deferred(retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
            401 | 403 => Outcome::Refused(format!("{status}: {}", excerpt(&body))),
            _ => Outcome::Failed(format!("{op} answered {status}: {}", excerpt(&body))),
        }
    }
}

fn secs(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A server's message, short and printable.
fn excerpt(body: &[u8]) -> String {
    let t = String::from_utf8_lossy(body);
    let t: String = t.trim().chars().take(300).collect();
    if t.is_empty() {
        "(no message)".into()
    } else {
        t
    }
}

/// A new device key (ECDSA P-256), PEM. It stays on the device.
pub fn new_key() -> Result<String, String> {
    rcgen::KeyPair::generate()
        .map(|k| k.serialize_pem())
        .map_err(|e| format!("cannot make a key: {e}"))
}

/// OID of PKCS#9 challengePassword.
const CHALLENGE_PASSWORD: &[u64] = &[1, 2, 840, 113549, 1, 9, 7];

/// A CSR (DER) for `key_pem` naming `device`, with `binding` as its
/// challengePassword when given.
pub fn csr(key_pem: &str, device: &str, binding: Option<&str>) -> Result<Vec<u8>, String> {
    use der::Encode;
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("the device key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device);
    let mut attrs = Vec::new();
    if let Some(b) = binding {
        let value = der::asn1::Utf8StringRef::new(b).map_err(|e| e.to_string())?;
        let set = der::asn1::SetOfVec::try_from(vec![value]).map_err(|e| e.to_string())?;
        attrs.push(rcgen::Attribute {
            oid: CHALLENGE_PASSWORD,
            values: set.to_der().map_err(|e| e.to_string())?,
        });
    }
    let csr = params
        .serialize_request_with_attributes(&key, attrs)
        .map_err(|e| format!("cannot make the CSR: {e}"))?;
    Ok(csr.der().to_vec())
}
