//! The agent's EST client: `cacerts`, `simpleenroll` (HTTP Basic) and
//! `simplereenroll` (TLS client certificate), over HTTPS built by
//! `crate::tls` from `provisioning.ca` (a CA or a `sha256:` pin). Bodies are
//! sent unwrapped and read wrapped or not (`crate::est`).

use crate::config::{ProvisioningConfig, TrustAnchor};
use crate::est::{self as wire, CERTS_ONLY, MAX_BODY, PKCS10, PREFIX};
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
    http: reqwest::Client,
    base: String,
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
        let url = c.url.trim().trim_end_matches('/');
        if !url.starts_with("https://") {
            anyhow::bail!(
                "provisioning.url {url:?} must be https://host:port: EST runs over TLS only"
            );
        }
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
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(c.timeout.get())
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let label = c.label.trim().trim_matches('/');
        let base = if label.is_empty() {
            format!("{url}{PREFIX}")
        } else {
            format!("{url}{PREFIX}/{label}")
        };
        Ok(Est { http, base })
    }

    /// `GET cacerts`: the CA certificates (DER).
    pub async fn cacerts(&self) -> Result<Vec<Vec<u8>>, String> {
        let url = format!("{}/cacerts", self.base);
        let resp = self.http.get(&url).send().await.map_err(|e| describe(&e))?;
        let status = resp.status();
        let body = read(resp).await?;
        if !status.is_success() {
            return Err(format!("cacerts answered {status}: {}", excerpt(&body)));
        }
        wire::parse_certs_body(&body).map_err(|e| format!("cacerts: {e}"))
    }

    /// `POST simpleenroll` (with `basic` = device id and OTP) or
    /// `simplereenroll` (without: the TLS client certificate).
    pub async fn enroll(&self, csr_der: &[u8], basic: Option<(&str, &str)>) -> Outcome {
        let op = if basic.is_some() {
            "simpleenroll"
        } else {
            "simplereenroll"
        };
        let mut req = self
            .http
            .post(format!("{}/{op}", self.base))
            .header(http::header::CONTENT_TYPE, PKCS10)
            .header(http::header::ACCEPT, CERTS_ONLY)
            .body(wire::encode_base64(csr_der));
        if let Some((user, pass)) = basic {
            req = req.header(http::header::AUTHORIZATION, wire::basic(user, pass));
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(describe(&e)),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(wire::parse_retry_after);
        let body = match read(resp).await {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(e),
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

/// The body, at most [`MAX_BODY`] bytes.
async fn read(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(format!("the EST answer is larger than {MAX_BODY} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
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

/// An HTTP error with its causes (the TLS refusal says what to set).
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        src = s.source();
    }
    out
}

/// A new device key (ECDSA P-256, PEM) and a CSR (DER) for `device`.
pub fn key_and_csr(device: &str) -> Result<(String, Vec<u8>), String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device);
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("cannot make the CSR: {e}"))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}
