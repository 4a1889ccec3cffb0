//! The mapping API, ioFog Connector's: `POST /api/v2/mapping/add` with the
//! form field `mapping=` (JSON), `POST /api/v2/mapping/remove` with
//! `mappingid=`, and `GET /api/v2/mapping` to list. Every request carries
//! `Authorization: Bearer <api.token>`. HTTPS unless `dev=true`. The same
//! API issues EST one-time passwords: `POST /api/v2/otp` ([`super::otp`]).

use super::pipes::{AddError, Pipes, Spec};
use crate::supervisor::Shutdown;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;

struct Api {
    pipes: Arc<Pipes>,
    token: String,
    otp: Arc<super::otp::OtpApi>,
    /// The connection-management endpoints ([`super::admin`]).
    admin: Arc<super::admin::Admin>,
}

/// Serves the API until shutdown.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    pipes: Arc<Pipes>,
    token: String,
    otp: Arc<super::otp::OtpApi>,
    admin: Arc<super::admin::Admin>,
    shutdown: Shutdown,
) {
    let api = Arc::new(Api {
        pipes,
        token,
        otp,
        admin,
    });
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (api, tls, sd) = (api.clone(), tls.clone(), shutdown.clone());
        shutdown.spawn(async move {
            match tls {
                None => connection(tcp, api, sd).await,
                Some(tls) => {
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => connection(s, api, sd).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "API TLS handshake failed"),
                        Err(_) => {}
                    }
                }
            }
        });
    }
}

async fn connection<IO>(io: IO, api: Arc<Api>, shutdown: Shutdown)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let api = api.clone();
        async move {
            if !authorized(&api, &req) {
                return Ok::<_, std::convert::Infallible>(
                    error(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong bearer token (Authorization: Bearer <api.token>)",
                    )
                    .map(BodyExt::boxed),
                );
            }
            Ok(match super::admin::handle(&api.admin, req).await {
                Ok(r) => r,
                Err(req) => handle(&api, req).await.map(BodyExt::boxed),
            })
        }
    });
    let conn =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = conn => {}
        _ = shutdown.cancelled() => {}
    }
}

pub(super) fn answer(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts")
}

pub(super) fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    answer(
        status,
        json!({"status": "error", "message": message.to_string()}),
    )
}

fn authorized(api: &Api, req: &Request<Incoming>) -> bool {
    use subtle::ConstantTimeEq;
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    !api.token.is_empty() && bool::from(given.as_bytes().ct_eq(api.token.as_bytes()))
}

/// The mapping endpoints (the caller checked the token).
async fn handle(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match (method, path.trim_end_matches('/')) {
        (Method::GET, "/api/v2/mapping") => {
            let mut mappings = api.pipes.list();
            if let Some(cluster) = &api.admin.cluster {
                for m in &mut mappings {
                    m["relay"] = cluster.id.clone().into();
                }
                mappings.extend(cluster.remote_mappings());
            }
            answer(
                StatusCode::OK,
                json!({"status": "ok", "mappings": mappings}),
            )
        }
        (Method::POST, "/api/v2/mapping/add") => {
            let form = match form(req).await {
                Ok(f) => f,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            let Some(text) = field(&form, "mapping").filter(|t| !t.trim().is_empty()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "empty mapping: send the form field mapping=<JSON>",
                );
            };
            let spec: Spec = match serde_json::from_str(text) {
                Ok(s) => s,
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad mapping: {e}")),
            };
            // A device another relay holds: that relay serves the pipe.
            if let (Some(cluster), Spec::Public { device, .. }) = (&api.admin.cluster, &spec) {
                if !api.admin.agents.is_connected(device) {
                    if let Some(holder) = cluster.holder(device) {
                        let (code, body) = cluster
                            .forward(&holder, "add", json!({ "mapping": spec }))
                            .await;
                        return answer(code, body);
                    }
                }
            }
            let (code, body) = add_local(&api.pipes, spec).await;
            if let Some(cluster) = &api.admin.cluster {
                cluster.mappings_changed();
            }
            answer(code, body)
        }
        (Method::POST, "/api/v2/mapping/remove") => {
            let form = match form(req).await {
                Ok(f) => f,
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            };
            let Some(id) = field(&form, "mappingid").filter(|t| !t.is_empty()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "send the form field mappingid=<id>",
                );
            };
            if let Some(cluster) = &api.admin.cluster {
                if let Some(server) = cluster.server_of(id) {
                    let (code, body) = cluster
                        .forward(&server, "remove", json!({ "mappingid": id }))
                        .await;
                    return answer(code, body);
                }
            }
            let (code, body) = remove_local(&api.pipes, id).await;
            if let Some(cluster) = &api.admin.cluster {
                cluster.mappings_changed();
            }
            answer(code, body)
        }
        (Method::POST, "/api/v2/otp") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("cannot read the body: {e}"),
                    )
                }
            };
            let o = &api.otp;
            let (status, v) = super::otp::issue_request(&o.otps, &body, o.expiry, o.max).await;
            answer(status, v)
        }
        (
            _,
            "/api/v2/mapping" | "/api/v2/mapping/add" | "/api/v2/mapping/remove" | "/api/v2/otp",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    }
}

/// Adds a mapping on this relay (its row committed off the async
/// threads): the answer's status and body.
pub(super) async fn add_local(pipes: &Arc<Pipes>, spec: Spec) -> (StatusCode, serde_json::Value) {
    let failed = |code: StatusCode, e: AddError| {
        (code, json!({"status": "error", "message": e.to_string()}))
    };
    let p = pipes.clone();
    let added = super::store::blocking(move || p.add(spec))
        .await
        .unwrap_or_else(|e| Err(AddError::Internal(e)));
    match added {
        Ok(m) => (
            StatusCode::OK,
            json!({
                "status": "ok", "id": m.id, "port1": m.port1, "port2": m.port2,
                "passcode1": m.passcode1, "passcode2": m.passcode2, "timestamp": m.timestamp,
            }),
        ),
        Err(e @ AddError::Bad(_)) => failed(StatusCode::BAD_REQUEST, e),
        Err(e @ AddError::NoPort) => failed(StatusCode::INSUFFICIENT_STORAGE, e),
        Err(e @ AddError::Duplicate(_)) => failed(StatusCode::CONFLICT, e),
        Err(e @ AddError::Internal(_)) => failed(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Removes a mapping of this relay (its row deleted off the async
/// threads): the answer's status and body.
pub(super) async fn remove_local(pipes: &Arc<Pipes>, id: &str) -> (StatusCode, serde_json::Value) {
    let (p, i) = (pipes.clone(), id.to_string());
    match super::store::blocking(move || p.remove(&i))
        .await
        .and_then(|r| r)
    {
        Ok(true) => (
            StatusCode::OK,
            json!({"status": "ok", "id": id, "timestamp": crate::clock::now_ms()}),
        ),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            json!({"status": "error", "message": format!("no mapping {id:?}")}),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"status": "error", "message": e}),
        ),
    }
}

/// The body as `application/x-www-form-urlencoded` pairs.
async fn form(req: Request<Incoming>) -> Result<Vec<(String, String)>, String> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("cannot read the body: {e}"))?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| "the body is not UTF-8".to_string())?;
    Ok(parse_form(text))
}

/// Parses `a=1&b=x+y%21` (form encoding: `+` is a space).
pub fn parse_form(text: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    #[test]
    fn form_fields_are_decoded() {
        let f = super::parse_form("mapping=%7B%22type%22%3A%22public%22%7D&x=a+b&flag");
        assert_eq!(f[0], ("mapping".into(), "{\"type\":\"public\"}".into()));
        assert_eq!(f[1], ("x".into(), "a b".into()));
        assert_eq!(f[2], ("flag".into(), String::new()));
    }
}
