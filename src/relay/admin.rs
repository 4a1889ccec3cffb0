//! The connection-management half of the admin API (G-SDK's accept
//! filter, pending list, device list, asynchronous connections and status
//! stream), beside the mapping API on the same port and token. Bodies are
//! JSON; bad input is a 400 with a message.

use super::accept::check_device_id;
use super::agents::Agents;
use super::dialer::Dialer;
use super::pipes::Pipes;
use super::registry::{Filter, Registration};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Largest JSON body read.
const MAX_BODY: usize = 256 * 1024;
/// Most device ids in an accept filter.
pub const FILTER_MAX: usize = 10_000;
/// A comment line on an idle status stream this often, so proxies and
/// clients see it is alive.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The body of every admin answer.
pub type Body = BoxBody<Bytes, Infallible>;

/// What the admin endpoints work on.
pub struct Admin {
    /// The connected agents and the accept filter.
    pub agents: Arc<Agents>,
    /// The mappings.
    pub pipes: Arc<Pipes>,
    /// The relay-dials connections.
    pub dialer: Arc<Dialer>,
    /// The shared registry, with `nats.url` set.
    pub cluster: Option<Arc<super::cluster::Cluster>>,
}

fn full(r: Response<Full<Bytes>>) -> Response<Body> {
    r.map(|b| b.boxed())
}

fn answer(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    full(super::mapping_api::answer(status, body))
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    full(super::mapping_api::error(status, message))
}

/// Answers the admin endpoints; gives back any other request. The caller
/// has checked the token.
pub async fn handle(
    admin: &Admin,
    req: Request<Incoming>,
) -> Result<Response<Body>, Request<Incoming>> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let method = req.method().clone();
    let r = match (method, path.as_str()) {
        (Method::GET, "/api/v2/accept-filter") => filter_answer(&admin.agents.registry.filter()),
        (Method::PUT, "/api/v2/accept-filter") => put_filter(admin, req).await,
        (_, "/api/v2/accept-filter") => error(StatusCode::METHOD_NOT_ALLOWED, "GET or PUT"),
        (Method::GET, "/api/v2/pending") => answer(
            StatusCode::OK,
            json!({"status": "ok", "pending": admin.agents.pending.list()}),
        ),
        (_, "/api/v2/pending") => error(StatusCode::METHOD_NOT_ALLOWED, "GET"),
        (Method::GET, "/api/v2/agents") => list_agents(admin),
        (Method::POST, "/api/v2/agents") => add_agent(admin, req).await,
        (_, "/api/v2/agents") => error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
        (Method::DELETE, p) if p.starts_with("/api/v2/agents/") => {
            let device = percent_encoding::percent_decode_str(&p["/api/v2/agents/".len()..])
                .decode_utf8_lossy()
                .into_owned();
            let (d, id) = (admin.dialer.clone(), device.clone());
            match super::store::blocking(move || d.remove(&id))
                .await
                .and_then(|r| r)
            {
                Ok(true) => answer(StatusCode::OK, json!({"status": "ok", "deviceId": device})),
                Ok(false) => error(
                    StatusCode::NOT_FOUND,
                    format!("no registered agent {device:?}"),
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (_, p) if p.starts_with("/api/v2/agents/") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "DELETE")
        }
        (Method::GET, "/api/v2/status") => status_stream(admin, req.uri().query()),
        (_, "/api/v2/status") => error(StatusCode::METHOD_NOT_ALLOWED, "GET"),
        _ => return Err(req),
    };
    Ok(r)
}

fn filter_answer(f: &Filter) -> Response<Body> {
    answer(
        StatusCode::OK,
        json!({"status": "ok", "allowAll": f.allow_all, "deviceIds": f.device_ids}),
    )
}

/// The body as JSON of type `T` (400 with serde's message otherwise).
async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, String> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("cannot read the body: {e}"))?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err("empty body: send JSON".into());
    }
    serde_json::from_slice(&body).map_err(|e| format!("bad JSON: {e}"))
}

async fn put_filter(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    let f: Filter = match json_body(req).await {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if f.allow_all && !f.device_ids.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "either allowAll or deviceIds, not both",
        );
    }
    if f.device_ids.len() > FILTER_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            format!("at most {FILTER_MAX} device ids"),
        );
    }
    if let Some(e) = f.device_ids.iter().find_map(|d| check_device_id(d).err()) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let (agents, next) = (admin.agents.clone(), f.clone());
    match super::store::blocking(move || agents.registry.set_filter(next))
        .await
        .and_then(|r| r)
    {
        Ok(()) => {
            tracing::info!(
                allow_all = f.allow_all,
                devices = f.device_ids.len(),
                "accept filter set"
            );
            filter_answer(&f)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn list_agents(admin: &Admin) -> Response<Body> {
    // Per device: its public pipes and their visitors now.
    let mut pipes: HashMap<String, (u64, u64)> = HashMap::new();
    for m in admin.pipes.list() {
        if let Some(device) = m["device"].as_str() {
            let e = pipes.entry(device.to_string()).or_default();
            e.0 += 1;
            e.1 += m["connections"].as_u64().unwrap_or(0);
        }
    }
    let mut agents: Vec<serde_json::Value> = admin
        .agents
        .board
        .list()
        .into_iter()
        .map(|mut a| {
            let (n, visitors) = a["deviceId"]
                .as_str()
                .and_then(|d| pipes.get(d).copied())
                .unwrap_or_default();
            a["pipes"] = n.into();
            a["visitors"] = visitors.into();
            a
        })
        .collect();
    if let Some(cluster) = &admin.cluster {
        for a in &mut agents {
            a["relay"] = cluster.id.clone().into();
        }
        let remote = cluster.remote_agents(&agents);
        agents.retain(|a| !remote.iter().any(|r| r["deviceId"] == a["deviceId"]));
        agents.extend(remote);
        agents.sort_by(|a, b| a["deviceId"].as_str().cmp(&b["deviceId"].as_str()));
    }
    answer(StatusCode::OK, json!({"status": "ok", "agents": agents}))
}

async fn add_agent(admin: &Admin, req: Request<Incoming>) -> Response<Body> {
    let r: Registration = match json_body(req).await {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(e) = check_device_id(&r.device_id) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    if let Err(e) = check_address(&r.address) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let (d, next) = (admin.dialer.clone(), r.clone());
    match super::store::blocking(move || d.add(next))
        .await
        .and_then(|r| r)
    {
        Ok(()) => {
            tracing::info!(device = %r.device_id, address = %r.address, tls = r.tls, "agent registered (relay dials)");
            answer(
                StatusCode::OK,
                json!({"status": "ok", "deviceId": r.device_id, "address": r.address, "tls": r.tls}),
            )
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `host:port` with a port in 1..=65535 and a host without spaces.
pub fn check_address(a: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "address {:?} is not host:port",
            a.chars().take(64).collect::<String>()
        )
    };
    let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match port.parse::<u16>() {
        Ok(p)
            if p > 0
                && !host.is_empty()
                && host.len() <= 253
                && !host.contains(char::is_whitespace) =>
        {
            Ok(())
        }
        _ => Err(bad()),
    }
}

/// `GET /api/v2/status[?deviceId=x]`: server-sent events, one per
/// transition from now on, in order. A subscriber that falls more than
/// [`super::status::STREAM_BACKLOG`] events behind gets a `lagged` event
/// and its stream ends (reconnect and read `GET /api/v2/agents`).
fn status_stream(admin: &Admin, query: Option<&str>) -> Response<Body> {
    let only = query
        .map(super::mapping_api::parse_form)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == "deviceId")
        .map(|(_, v)| v);
    let rx = admin.agents.board.subscribe();
    let stream = futures::stream::unfold(Some((rx, true)), move |state| {
        let only = only.clone();
        async move {
            let (mut rx, first) = state?;
            if first {
                let hello = Bytes::from_static(b": relay status events\n\n");
                return Some((Ok::<_, Infallible>(Frame::data(hello)), Some((rx, false))));
            }
            loop {
                let text = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
                    Err(_) => ": keep-alive\n\n".to_string(),
                    Ok(Ok(e)) if only.as_ref().is_some_and(|d| *d != e.device_id) => continue,
                    Ok(Ok(e)) => format!(
                        "id: {}\nevent: {}\ndata: {}\n\n",
                        e.seq,
                        e.event,
                        serde_json::to_string(&*e).unwrap_or_default()
                    ),
                    Ok(Err(RecvError::Lagged(n))) => {
                        let text = format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n");
                        return Some((Ok(Frame::data(Bytes::from(text))), None));
                    }
                    Ok(Err(RecvError::Closed)) => return None,
                };
                return Some((Ok(Frame::data(Bytes::from(text))), Some((rx, false))));
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("static response parts")
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_checked() {
        for ok in ["10.0.0.2:7100", "device.local:1", "[::1]:7100"] {
            assert!(super::check_address(ok).is_ok(), "{ok}");
        }
        for bad in ["", "host", "host:0", "host:70000", ":7100", "a b:1"] {
            assert!(super::check_address(bad).is_err(), "{bad}");
        }
    }
}
