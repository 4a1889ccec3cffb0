//! The relay's EST server (RFC 7030): `GET cacerts`, `POST simpleenroll`
//! (HTTP Basic: device id and a one-time password from [`super::otp`]) and
//! `POST simplereenroll` (the TLS client certificate being renewed), under
//! `/.well-known/est/` with an optional label segment. HTTPS on `est.listen`;
//! the CA is [`super::ca`]. Every bad request is answered with a status and
//! a plain-text message, and nothing is signed for it.

use super::ca::{parse_csr, Ca};
use super::otp::{Otps, Refusal};
use crate::est::{self as wire, CERTS_ONLY, MAX_BODY, PKCS10, PREFIX};
use crate::supervisor::Shutdown;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// What the EST handlers share.
pub struct Est {
    /// The CA that signs.
    pub ca: Arc<Ca>,
    /// The OTPs that authorize a first enrollment.
    pub otps: Arc<Otps>,
    /// Lifetime of issued certificates (`est.lifetime`).
    pub lifetime: Duration,
    /// `est.defer`: zero is off.
    pub defer: Duration,
    /// `est.require_binding`: refuse CSRs without the TLS channel binding.
    pub require_binding: bool,
    /// When each deferred device may be served.
    deferred: Mutex<HashMap<String, Instant>>,
}

impl Est {
    /// The EST service with its CA, OTPs and settings.
    pub fn new(
        ca: Arc<Ca>,
        otps: Arc<Otps>,
        lifetime: Duration,
        defer: Duration,
        require_binding: bool,
    ) -> Est {
        Est {
            ca,
            otps,
            lifetime,
            defer,
            require_binding,
            deferred: Mutex::new(HashMap::new()),
        }
    }
}

/// Serves EST over TLS until shutdown.
pub async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    est: Arc<Est>,
    shutdown: Shutdown,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an EST connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (tls, est, sd) = (tls.clone(), est.clone(), shutdown.clone());
        shutdown.spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "EST TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // The certificate rustls verified against the CA, if any.
            let device = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(crate::tls::common_name);
            let session = Session {
                device,
                binding: crate::tls::channel_binding(stream.get_ref().1),
            };
            let session = Arc::new(session);
            let service = hyper::service::service_fn(move |req| {
                let (est, session) = (est.clone(), session.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(&est, req, &session).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = sd.cancelled() => {}
            }
        });
    }
}

type Answer = Response<Full<Bytes>>;

/// What one TLS connection established.
struct Session {
    /// The CN of the client certificate rustls verified against the CA.
    device: Option<String>,
    /// Its `tls-exporter` channel binding (TLS 1.3), base64.
    binding: Option<String>,
}

fn text(status: StatusCode, message: impl std::fmt::Display) -> Answer {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(format!("{message}\n"))))
        .expect("static response parts")
}

fn unauthorized(message: impl std::fmt::Display) -> Answer {
    let mut r = text(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Basic realm=\"est\""),
    );
    r
}

fn certs(ders: &[Vec<u8>]) -> Answer {
    match wire::certs_only(ders) {
        Ok(der) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", CERTS_ONLY)
            // RFC 7030 names it; RFC 8951 says readers ignore it.
            .header("content-transfer-encoding", "base64")
            .body(Full::new(Bytes::from(wire::encode_base64(&der))))
            .expect("static response parts"),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The operation of an EST path: `/.well-known/est/[label/]op`.
fn operation(path: &str) -> Option<&str> {
    let rest = path.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let mut parts = rest.trim_end_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(op), None, None) => Some(op),
        (Some(label), Some(op), None) if !label.is_empty() => Some(op),
        _ => None,
    }
}

async fn handle(est: &Est, req: Request<Incoming>, session: &Session) -> Answer {
    let path = req.uri().path().to_string();
    let Some(op) = operation(&path) else {
        return text(StatusCode::NOT_FOUND, format!("no EST endpoint {path}"));
    };
    match (req.method().clone(), op) {
        (Method::GET, "cacerts") => certs(std::slice::from_ref(&est.ca.cert_der)),
        (Method::POST, "simpleenroll") => enroll(est, req, session).await,
        (Method::POST, "simplereenroll") => reenroll(est, req, session).await,
        (_, "cacerts" | "simpleenroll" | "simplereenroll") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, op) => text(
            StatusCode::NOT_FOUND,
            format!(
                "EST operation {op:?} is not served here (cacerts, simpleenroll, simplereenroll)"
            ),
        ),
    }
}

/// A refusal: the status and the message.
type Bad = (StatusCode, String);

fn bad(status: StatusCode, message: impl std::fmt::Display) -> Bad {
    (status, message.to_string())
}

/// The CSR of a request: the content type, the size, base64, PKCS#10 and
/// its signature checked. `Err` is the answer to give.
async fn csr_of(req: Request<Incoming>) -> Result<super::ca::Csr, Bad> {
    let ctype = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !ctype.trim_start().starts_with(PKCS10) {
        return Err(bad(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("the body must be {PKCS10} (base64 of a DER CSR), not {ctype:?}"),
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(bad(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the CSR is larger than {MAX_BODY} bytes"),
            ))
        }
        Err(e) => {
            return Err(bad(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            ))
        }
    };
    let der = wire::decode_base64(&body).map_err(|e| bad(StatusCode::BAD_REQUEST, e))?;
    parse_csr(&der).map_err(|e| bad(StatusCode::BAD_REQUEST, e))
}

/// The CSR must name the authenticated device.
fn same_device(csr: &super::ca::Csr, device: &str) -> Result<(), Bad> {
    match csr.common_name.as_deref() {
        Some(cn) if cn == device => Ok(()),
        Some(cn) => Err(bad(
            StatusCode::FORBIDDEN,
            format!("the CSR is for {cn:?} but the request is authenticated as {device:?}"),
        )),
        None => Err(bad(
            StatusCode::BAD_REQUEST,
            format!("the CSR's subject has no CN; it must be CN={device}"),
        )),
    }
}

/// RFC 7030 §3.5 with RFC 9266: a CSR carrying a challengePassword must
/// carry this connection's channel binding (it was made for it, not
/// replayed from another); without one it is accepted unless
/// `est.require_binding` (third-party clients rarely bind).
fn bound(est: &Est, csr: &super::ca::Csr, session: &Session) -> Result<(), Bad> {
    use subtle::ConstantTimeEq;
    match (&csr.challenge_password, &session.binding) {
        (Some(given), Some(want)) if bool::from(given.as_bytes().ct_eq(want.as_bytes())) => Ok(()),
        (Some(_), Some(_)) => Err(bad(
            StatusCode::BAD_REQUEST,
            "the CSR's challengePassword is not this TLS connection's channel binding              (tls-exporter, RFC 9266): make the CSR on the connection that sends it",
        )),
        (Some(_), None) => Err(bad(
            StatusCode::BAD_REQUEST,
            "the CSR carries a challengePassword, but channel binding needs TLS 1.3 here",
        )),
        (None, _) if est.require_binding => Err(bad(
            StatusCode::BAD_REQUEST,
            "this server requires the TLS channel binding (tls-exporter, RFC 9266) as the              CSR's challengePassword (est.require_binding)",
        )),
        (None, _) => Ok(()),
    }
}

fn sign(est: &Est, csr: &super::ca::Csr, device: &str, how: &str) -> Answer {
    match est.ca.sign(csr, device, est.lifetime) {
        Ok(der) => {
            tracing::info!(%device, how, "EST issued a device certificate");
            certs(&[der])
        }
        Err(e) => text(StatusCode::BAD_REQUEST, e),
    }
}

async fn enroll(est: &Est, req: Request<Incoming>, session: &Session) -> Answer {
    let Some(auth) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or_default().to_string())
    else {
        return unauthorized(
            "enrollment needs HTTP Basic: the device id and its one-time password",
        );
    };
    let (device, otp) = match wire::parse_basic(&auth) {
        Ok(c) => c,
        Err(e) => return unauthorized(e),
    };
    let csr = match csr_of(req).await {
        Ok(c) => c,
        Err((status, m)) => return text(status, m),
    };
    if let Err((status, m)) = same_device(&csr, &device).and_then(|()| bound(est, &csr, session)) {
        return text(status, m);
    }
    if let Err(r) = est.otps.check(&device, &otp) {
        return refused(&device, r);
    }
    if !est.defer.is_zero() {
        let mut deferred = est.deferred.lock().expect("est lock");
        let now = Instant::now();
        let due = *deferred.entry(device.clone()).or_insert(now + est.defer);
        if now < due {
            let secs = (due - now).as_secs_f64().ceil().max(1.0) as u64;
            tracing::info!(%device, retry_after = secs, "EST enrollment deferred");
            let mut r = text(
                StatusCode::ACCEPTED,
                format!("enrollment of {device} is pending; retry in {secs} s"),
            );
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
            return r;
        }
        deferred.remove(&device);
    }
    let (otps, d) = (est.otps.clone(), device.clone());
    let consumed = super::store::blocking(move || otps.consume(&d, &otp))
        .await
        .unwrap_or_else(|e| Err(Err(e)));
    match consumed {
        Ok(()) => sign(est, &csr, &device, "simpleenroll"),
        Err(Ok(r)) => refused(&device, r),
        Err(Err(e)) => text(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

fn refused(device: &str, r: Refusal) -> Answer {
    tracing::info!(%device, reason = %r, "EST enrollment refused");
    unauthorized(r)
}

async fn reenroll(est: &Est, req: Request<Incoming>, session: &Session) -> Answer {
    let Some(device) = session.device.as_deref() else {
        return unauthorized(
            "re-enrollment needs the TLS client certificate being renewed (one this relay's CA \
             issued); a device without one enrolls with simpleenroll and a one-time password",
        );
    };
    let csr = match csr_of(req).await {
        Ok(c) => c,
        Err((status, m)) => return text(status, m),
    };
    if let Err((status, m)) = same_device(&csr, device).and_then(|()| bound(est, &csr, session)) {
        return text(status, m);
    }
    sign(est, &csr, device, "simplereenroll")
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_with_and_without_a_label() {
        use super::operation;
        assert_eq!(operation("/.well-known/est/cacerts"), Some("cacerts"));
        assert_eq!(
            operation("/.well-known/est/arbitrary/simpleenroll"),
            Some("simpleenroll")
        );
        assert_eq!(operation("/.well-known/est"), None);
        assert_eq!(operation("/.well-known/est/a/b/c"), None);
        assert_eq!(operation("/other/cacerts"), None);
    }
}
