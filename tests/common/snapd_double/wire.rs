//! snapd's wire formats: the response envelope (sync, async, error with
//! its kind and value), assertion media types, and the snapshot export's
//! tar entries.

use super::*;

/// An answer before it becomes a hyper response.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) content_type: &'static str,
    pub(super) headers: Vec<(&'static str, String)>,
    pub(super) body: Vec<u8>,
}

pub(super) fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

pub(super) fn json_reply(status: u16, v: Value) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        headers: Vec::new(),
        body: serde_json::to_vec(&v).expect("JSON always serializes"),
    }
}

pub(super) fn sync(result: Value) -> Reply {
    json_reply(
        200,
        json!({"type": "sync", "status-code": 200, "status": "OK", "result": result}),
    )
}

pub(super) fn async_reply(change: &str, result: Value) -> Reply {
    json_reply(
        202,
        json!({"type": "async", "status-code": 202, "status": "Accepted", "result": result, "change": change}),
    )
}

/// snapd's error envelope; `kind` and `value` are omitted when `None`.
pub(super) fn error(
    status: u16,
    message: impl Into<String>,
    kind: Option<&str>,
    value: Option<Value>,
) -> Reply {
    let mut result = json!({"message": message.into()});
    if let Some(k) = kind {
        result["kind"] = json!(k);
    }
    if let Some(v) = value {
        result["value"] = v;
    }
    json_reply(
        status,
        json!({"type": "error", "status-code": status, "status": status_text(status), "result": result}),
    )
}

pub(super) fn bad_request(message: impl Into<String>) -> Reply {
    error(400, message, None, None)
}

pub(super) fn not_installed(name: &str) -> Reply {
    error(
        400,
        format!("snap \"{name}\" is not installed"),
        Some("snap-not-installed"),
        Some(json!(name)),
    )
}

pub(super) fn assertion_reply(texts: &[&str], bundle: bool) -> Reply {
    let mut body = String::new();
    for (i, t) in texts.iter().enumerate() {
        if i > 0 {
            body.push('\n');
        }
        body.push_str(t.trim_end_matches('\n'));
        body.push('\n');
    }
    Reply {
        status: 200,
        content_type: if bundle {
            "application/x.ubuntu.assertion; bundle=y"
        } else {
            "application/x.ubuntu.assertion"
        },
        headers: vec![("X-Ubuntu-Assertions-Count", texts.len().to_string())],
        body: body.into_bytes(),
    }
}

pub(super) fn into_response(r: Reply) -> Response<Body> {
    let mut b = Response::builder()
        .status(r.status)
        .header("Content-Type", r.content_type);
    for (k, v) in r.headers {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::from(r.body)).boxed())
        .expect("a valid response")
}

/// The reply's head and the first half of its body, then nothing, ever.
pub(super) fn into_stalled_response(r: Reply) -> Response<Body> {
    use futures::StreamExt;
    let half = Bytes::from(r.body[..r.body.len() / 2].to_vec());
    let frames = futures::stream::iter([Ok::<_, Infallible>(hyper::body::Frame::data(half))])
        .chain(futures::stream::pending());
    Response::builder()
        .status(r.status)
        .header("Content-Type", r.content_type)
        .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
        .expect("a valid response")
}

/// One ustar entry (header + data padded to 512 bytes).
pub(super) fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8], mtime: u64) {
    let mut h = [0u8; 512];
    let put =
        |h: &mut [u8; 512], at: usize, s: &str| h[at..at + s.len()].copy_from_slice(s.as_bytes());
    put(&mut h, 0, name);
    put(&mut h, 100, "0000644\0");
    put(&mut h, 108, "0000000\0");
    put(&mut h, 116, "0000000\0");
    put(&mut h, 124, &format!("{:011o}\0", data.len()));
    put(&mut h, 136, &format!("{mtime:011o}\0"));
    put(&mut h, 148, "        ");
    h[156] = b'0';
    put(&mut h, 257, "ustar\0");
    put(&mut h, 263, "00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, &format!("{sum:06o}\0 "));
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}
