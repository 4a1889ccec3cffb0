//! Shared test harness: real server processes (NATS, Mosquitto, snapd), a
//! throw-away PKI, and an in-process snapd test double.
//!
//! Every test binary compiles this module but uses only part of it, hence
//! the blanket `dead_code` allowance.
#![allow(dead_code)]

pub mod agent_proc;
pub mod dms_types;
pub mod est;
pub mod identity_double;
pub mod mqtt_client;
pub mod servers;
pub mod snapd_double;
pub mod tls;
pub mod tunnel;
pub mod upload_sink;

use std::io::{Read, Write};

/// The agent's NATS settings for a test server: user `snapd` with `password`.
pub fn agent_nats_config(url: &str, password: &str) -> iot_agent::config::NatsConfig {
    use iot_agent::config;
    config::NatsConfig {
        url: config::NatsUrl::new(url),
        snapd: config::NatsCredentials {
            password: password.into(),
            ..Default::default()
        },
        ..Default::default()
    }
}
use std::path::Path;
use std::time::{Duration, Instant};

/// An HTTP answer read off a unix socket by [`unix_http`] or
/// [`unix_http_blocking`].
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics with the raw body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Builds a one-shot HTTP/1.1 request with `Connection: close`, so the reply
/// can be read to EOF without parsing chunked encoding or keeping state.
fn build_request(method: &str, path: &str, body: Option<&[u8]>) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(body) = body {
        req.push_str("Content-Type: application/json\r\n");
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body);
    }
    bytes
}

/// Parses a complete `Connection: close` answer (headers + body up to EOF).
/// Handles `Transfer-Encoding: chunked` too, because real snapd (Go) uses it
/// for streamed answers such as logs.
pub fn parse_http_reply(raw: &[u8]) -> Result<HttpReply, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_str = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_str:?}: {e}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Sends one request over a unix socket with std I/O (no runtime needed) and
/// reads the whole answer. Used to probe real snapd from synchronous code.
/// Never call it against [`snapd_double::SnapdDouble`] from inside its own
/// current-thread runtime: the double could not run while this blocks.
pub fn unix_http_blocking(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpReply, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(&build_request(method, path, body))
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    parse_http_reply(&raw)
}

/// Async twin of [`unix_http_blocking`] over tokio's `UnixStream`, bounded
/// by `timeout` so a hung server fails the test instead of hanging it.
pub async fn unix_http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpReply, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        stream
            .write_all(&build_request(method, path, body))
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse_http_reply(&raw)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer from {} within {timeout:?}", socket.display()))?
}

/// Polls `probe` every 20 ms until it returns `Some`, or gives up at
/// `deadline`. The sleep is only the polling interval; readiness itself is
/// always decided by the probe.
pub fn poll_until<T>(deadline: Instant, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The payload of a reference fixture (`tests/fixtures/reference/NAME`):
/// what follows its `# ---` line.
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    match text.split_once("\n# ---\n") {
        Some((_, payload)) => payload.to_string(),
        None => panic!("{} has no `# ---` line", path.display()),
    }
}
