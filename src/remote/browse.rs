//! `iot-remote browse DEVICE --listen 127.0.0.1:PORT`: a local HTTP server
//! whose every request is carried to the device's remote browser and
//! answered with what the device's web origin answered. Relative links,
//! redirects (an absolute `Location` on the device's origin is made
//! relative) and cookies (passed through both ways) keep working, because
//! to the local browser the proxy is the site.

use super::link::{reply_token, Link, Messages};
use super::Device;
use crate::bus::Topic;
use crate::services::browser::protocol::{self, ErrorKind, Frame};
use crate::services::terminal::protocol::Reorder;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::time::Duration;

/// Largest request body taken from the local browser.
const MAX_REQUEST_BODY: usize = 8 * 1024 * 1024;
/// Bound on waiting for the device's next frame.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);

type Body = BoxBody<Bytes, std::io::Error>;

/// Serves until the process is stopped.
pub async fn run(
    link: Link,
    device: &Device,
    listen: SocketAddr,
    origin: &str,
) -> Result<(), String> {
    if !listen.ip().is_loopback() {
        return Err(format!(
            "--listen {listen}: serve on a loopback address only (the device's web UI would be open to the network)"
        ));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!("iot-remote: serving the device's web UI on http://{listen}/");
    serve(link, device.browser_root(), listener, origin.to_string()).await
}

/// Serves connections from `listener` through `link`.
pub async fn serve(
    link: Link,
    root: Topic,
    listener: tokio::net::TcpListener,
    origin: String,
) -> Result<(), String> {
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|e| format!("cannot accept: {e}"))?;
        let (link, root, origin) = (link.clone(), root.clone(), origin.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (link, root, origin) = (link.clone(), root.clone(), origin.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        handle(&link, &root, &origin, local, req).await,
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

fn text(status: u16, msg: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    link: &Link,
    root: &Topic,
    origin: &str,
    local: SocketAddr,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return text(413, format!("iot-remote: request body refused: {e}")),
    };
    let local_base = format!("http://{local}");
    let mut r = protocol::Request {
        origin: origin.to_string(),
        method: parts.method.as_str().to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
        headers: Vec::new(),
        body: String::new(),
        reply_to: None,
    };
    for (k, v) in &parts.headers {
        if protocol::hop_by_hop(k.as_str()) {
            continue;
        }
        let mut v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        // The device's site sees itself as the origin, not the proxy.
        if matches!(k.as_str(), "origin" | "referer") && !origin.is_empty() {
            v = v.replace(&local_base, &format!("http://{origin}"));
        }
        r.headers.push((k.as_str().to_string(), v));
    }
    r.set_body(&body);
    let frames = match send(link, root, r).await {
        Ok(f) => f,
        Err(e) => return text(502, format!("iot-remote: {e}")),
    };
    let mut reader = FrameReader {
        frames,
        order: Reorder::new(1024),
        pending: Default::default(),
    };
    let head = match reader.next().await {
        Ok(Frame::Head(h)) => h,
        Ok(Frame::Error(f)) => {
            return text(
                ErrorKind::status(&f.kind),
                format!("iot-remote: the device refused: {}: {}", f.kind, f.message),
            )
        }
        Ok(other) => return text(502, format!("iot-remote: unexpected frame {other:?}")),
        Err(e) => return text(504, format!("iot-remote: {e}")),
    };
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(16);
    tokio::spawn(async move {
        loop {
            let item = match reader.next().await {
                Ok(Frame::Body(b)) => Ok(hyper::body::Frame::data(b)),
                Ok(Frame::End) => return,
                Ok(Frame::Error(f)) => {
                    Err(std::io::Error::other(format!("{}: {}", f.kind, f.message)))
                }
                Ok(Frame::Head(_)) => Err(std::io::Error::other("a second head")),
                Err(e) => Err(std::io::Error::other(e)),
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = hyper::Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(head.status).unwrap_or(hyper::StatusCode::BAD_GATEWAY);
    for (k, v) in head.headers {
        let v = if k.eq_ignore_ascii_case("location") {
            relative_location(&v)
        } else {
            v
        };
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(&v),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

/// The device's origins are loopback by construction (`browser.allow`), so
/// an absolute redirect to a loopback URL is to the device's own site: it
/// is made relative, to stay on the proxy.
pub fn relative_location(v: &str) -> String {
    for host in ["http://127.0.0.1", "http://localhost", "http://[::1]"] {
        if let Some(rest) = v.strip_prefix(host) {
            let rest = rest
                .strip_prefix(':')
                .map(|r| r.trim_start_matches(|c: char| c.is_ascii_digit()))
                .unwrap_or(rest);
            if rest.is_empty() {
                return "/".into();
            }
            if rest.starts_with('/') || rest.starts_with('?') {
                return rest.to_string();
            }
        }
    }
    v.to_string()
}

/// Reads a response's frames in order.
struct FrameReader {
    frames: Messages,
    order: Reorder<Frame>,
    pending: std::collections::VecDeque<Frame>,
}

impl FrameReader {
    async fn next(&mut self) -> Result<Frame, String> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(f);
            }
            let (_, b) = tokio::time::timeout(FRAME_TIMEOUT, self.frames.next())
                .await
                .map_err(|_| "the device stopped answering".to_string())?
                .ok_or("the connection closed")?;
            let (seq, f) = Frame::decode(&b)?;
            self.pending.extend(self.order.push(seq, f)?);
        }
    }
}

/// Sends a request; returns the stream its frames come on.
async fn send(link: &Link, root: &Topic, mut r: protocol::Request) -> Result<Messages, String> {
    let topic = root.join(&[protocol::REQUEST]).map_err(|e| e.to_string())?;
    match link {
        Link::Nats(c) => {
            let inbox = c.new_inbox();
            let frames = link.subscribe(&Topic::from_nats(&inbox)).await?;
            c.publish_with_reply(
                topic.nats(),
                inbox,
                serde_json::to_vec(&r).expect("JSON").into(),
            )
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
            Ok(frames)
        }
        Link::Mqtt(_) => {
            let token = reply_token();
            let reply = root
                .join(&[protocol::REPLY, &token])
                .map_err(|e| e.to_string())?;
            let frames = link.subscribe(&reply).await?;
            r.reply_to = Some(token);
            link.publish(&topic, serde_json::to_vec(&r).expect("JSON").into())
                .await?;
            Ok(frames)
        }
    }
}
