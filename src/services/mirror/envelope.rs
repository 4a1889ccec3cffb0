//! What a mirror requester gets back: snapd's own envelope, byte for byte,
//! when snapd answered with JSON; a documented wrapper in the same shape
//! when snapd answered with something else (assertion text, a json-seq log
//! stream, binary data); and an error envelope of the agent's own when the
//! request never got an answer from snapd.
//!
//! Keeping every answer in snapd's envelope shape means a requester needs
//! one decoder: `type` says sync/async/error, `status-code` the HTTP status,
//! and errors carry `result.kind`. The agent's own kinds start with
//! `agent-` so they never collide with snapd's.

use crate::snapd::{self, RawResponse, ASSERTION_CONTENT_TYPE};
use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Content type of snapd's log stream (RFC 7464 JSON text sequence).
pub const JSON_SEQ_CONTENT_TYPE: &str = "application/json-seq";

/// Why a request never got (or could not pass on) an answer from snapd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// The subject does not name a resource and method.
    #[error("{0}")]
    BadSubject(String),
    /// The payload is not the documented request form.
    #[error("{0}")]
    BadRequest(String),
    /// `nats.readonly` is set, or the NATS server does not protect the
    /// agent's subjects, and the method is not GET.
    #[error("{0}")]
    ReadOnly(String),
    /// The request would change what the agent itself executes as root
    /// (its own `watchdog.reboot.command`): never through the mirror.
    #[error("{0}")]
    Forbidden(String),
    /// snapd's socket is missing, refused, or the connection broke.
    #[error("{0}")]
    SnapdUnreachable(String),
    /// snapd did not answer within `nats.timeout`.
    #[error("{0}")]
    Timeout(String),
    /// snapd's answer was not what its content type says.
    #[error("{0}")]
    BadResponse(String),
    /// The answer does not fit in one message of the server (`max_payload`)
    /// or in the snapd client's bound.
    #[error("{0}")]
    TooLarge(String),
}

impl AgentError {
    /// The `kind` in the error envelope.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::BadSubject(_) => "agent-bad-subject",
            AgentError::BadRequest(_) => "agent-bad-request",
            AgentError::ReadOnly(_) => "agent-read-only",
            AgentError::Forbidden(_) => "agent-forbidden",
            AgentError::SnapdUnreachable(_) => "agent-snapd-unreachable",
            AgentError::Timeout(_) => "agent-timeout",
            AgentError::BadResponse(_) => "agent-bad-response",
            AgentError::TooLarge(_) => "agent-too-large",
        }
    }

    /// The HTTP status the envelope reports, as a proxy would.
    pub fn status_code(&self) -> u16 {
        match self {
            AgentError::BadSubject(_) => 404,
            AgentError::BadRequest(_) => 400,
            AgentError::ReadOnly(_) => 403,
            AgentError::Forbidden(_) => 403,
            AgentError::SnapdUnreachable(_) => 503,
            AgentError::Timeout(_) => 504,
            AgentError::BadResponse(_) => 502,
            AgentError::TooLarge(_) => 502,
        }
    }

    /// Every kind, for the documentation test.
    pub const KINDS: [&'static str; 8] = [
        "agent-bad-subject",
        "agent-bad-request",
        "agent-read-only",
        "agent-forbidden",
        "agent-snapd-unreachable",
        "agent-timeout",
        "agent-bad-response",
        "agent-too-large",
    ];

    /// The error envelope.
    pub fn to_envelope(&self) -> Bytes {
        let code = self.status_code();
        let body = json!({
            "type": "error",
            "status-code": code,
            "status": reason(code),
            "result": {"message": self.to_string(), "kind": self.kind()},
        });
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The snapd client's failures, as the requester should see them.
    pub fn from_snapd(e: snapd::Error) -> AgentError {
        use snapd::Error as E;
        match e {
            E::Unreachable { .. } | E::Broken { .. } => AgentError::SnapdUnreachable(e.to_string()),
            E::Timeout { .. } => AgentError::Timeout(e.to_string()),
            E::TooLarge { .. } => AgentError::TooLarge(e.to_string()),
            E::InvalidInput { .. } => AgentError::BadRequest(e.to_string()),
            E::Malformed { .. } | E::Api { .. } => AgentError::BadResponse(e.to_string()),
        }
    }
}

/// The reason phrase for a status code (`OK`, `Accepted`, ...).
fn reason(code: u16) -> &'static str {
    http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

/// The least a JSON answer of snapd must have to be passed on as is.
#[derive(Deserialize)]
struct EnvelopeCheck {
    #[serde(rename = "type")]
    _kind: snapd::ResponseType,
}

/// The wrapper around an answer that is not JSON.
#[derive(Serialize)]
struct Wrapped<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(rename = "status-code")]
    status_code: u16,
    status: &'a str,
    result: Value,
    #[serde(rename = "content-type")]
    content_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding: Option<&'a str>,
}

/// Turns snapd's answer into the reply payload.
///
/// - JSON (`application/json`): the body unchanged, after checking that it
///   is an envelope (a broken answer must not reach a requester as if it
///   were snapd's).
/// - Assertions (`application/x.ubuntu.assertion`): `result` is the text.
/// - Logs (`application/json-seq`): `result` is the array of records.
/// - Anything else: `result` is the body in base64, `"encoding":"base64"`.
///
/// Wrapped answers carry snapd's `content-type`; their `type` is `sync`.
pub fn from_snapd(resp: &RawResponse) -> Result<Bytes, AgentError> {
    let ct = resp.content_type();
    let media = ct.split(';').next().unwrap_or("").trim();
    let is_json = media == "application/json" || (media.is_empty() && resp.body.starts_with(b"{"));
    if is_json {
        return match serde_json::from_slice::<EnvelopeCheck>(&resp.body) {
            Ok(_) => Ok(resp.body.clone()),
            Err(e) => Err(AgentError::BadResponse(format!(
                "snapd's answer (HTTP {}) is not a JSON envelope: {e}; it starts with {:?}",
                resp.status,
                snippet(&resp.body)
            ))),
        };
    }
    if resp.status >= 300 {
        return Err(AgentError::BadResponse(format!(
            "snapd answered HTTP {} with {:?} content: {:?}",
            resp.status,
            media,
            snippet(&resp.body)
        )));
    }
    let (result, encoding) = match media {
        ASSERTION_CONTENT_TYPE => match std::str::from_utf8(&resp.body) {
            Ok(text) => (Value::String(text.to_owned()), None),
            Err(_) => {
                return Err(AgentError::BadResponse(
                    "snapd's assertion text is not UTF-8".into(),
                ))
            }
        },
        JSON_SEQ_CONTENT_TYPE => (json_seq(&resp.body)?, None),
        _ => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(&resp.body)),
            Some("base64"),
        ),
    };
    let wrapped = Wrapped {
        kind: "sync",
        status_code: resp.status,
        status: reason(resp.status),
        result,
        content_type: media,
        encoding,
    };
    serde_json::to_vec(&wrapped)
        .map(Bytes::from)
        .map_err(|e| AgentError::BadResponse(format!("cannot encode the answer: {e}")))
}

/// The records of an RFC 7464 JSON text sequence, as a JSON array.
fn json_seq(body: &[u8]) -> Result<Value, AgentError> {
    body.split(|b| *b == 0x1e)
        .filter(|rec| !rec.iter().all(u8::is_ascii_whitespace))
        .map(|rec| {
            serde_json::from_slice(rec).map_err(|e| {
                AgentError::BadResponse(format!(
                    "a record of snapd's json-seq answer is not JSON: {e}"
                ))
            })
        })
        .collect::<Result<Vec<Value>, _>>()
        .map(Value::Array)
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn raw(status: u16, ct: &str, body: &[u8]) -> RawResponse {
        let mut headers = HeaderMap::new();
        if !ct.is_empty() {
            headers.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
        }
        RawResponse {
            status,
            headers,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn json_envelopes_pass_unchanged() {
        let body = br#"{"type":"sync","status-code":200,"status":"OK","result":{"x":1}}"#;
        let out = from_snapd(&raw(200, "application/json", body)).unwrap();
        assert_eq!(&out[..], &body[..]);
        let err = br#"{"type":"error","status-code":404,"status":"Not Found","result":{"message":"m","kind":"snap-not-found"}}"#;
        assert_eq!(
            &from_snapd(&raw(404, "application/json", err)).unwrap()[..],
            &err[..]
        );
    }

    #[test]
    fn garbage_json_is_an_agent_error() {
        let e = from_snapd(&raw(200, "application/json", b"nonsense")).unwrap_err();
        assert_eq!(e.kind(), "agent-bad-response");
        let e = from_snapd(&raw(200, "application/json", br#"{"no":"type"}"#)).unwrap_err();
        assert_eq!(e.kind(), "agent-bad-response");
    }

    #[test]
    fn assertions_logs_and_binary_are_wrapped() {
        let v: Value = serde_json::from_slice(
            &from_snapd(&raw(200, ASSERTION_CONTENT_TYPE, b"type: model\n\nsig")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"type":"sync","status-code":200,"status":"OK","result":"type: model\n\nsig",
                   "content-type": ASSERTION_CONTENT_TYPE})
        );
        let v: Value = serde_json::from_slice(
            &from_snapd(&raw(
                200,
                JSON_SEQ_CONTENT_TYPE,
                b"\x1e{\"a\":1}\n\x1e{\"a\":2}\n",
            ))
            .unwrap(),
        )
        .unwrap();
        assert_eq!(v["result"], json!([{"a":1},{"a":2}]));
        assert_eq!(v["content-type"], JSON_SEQ_CONTENT_TYPE);
        let v: Value = serde_json::from_slice(
            &from_snapd(&raw(200, "application/x.snapd.snapshot", b"\x00\x01")).unwrap(),
        )
        .unwrap();
        assert_eq!(v["result"], "AAE=");
        assert_eq!(v["encoding"], "base64");
    }

    #[test]
    fn error_envelopes_have_snapds_shape() {
        let v: Value =
            serde_json::from_slice(&AgentError::Timeout("slow".into()).to_envelope()).unwrap();
        assert_eq!(
            v,
            json!({"type":"error","status-code":504,"status":"Gateway Timeout",
                   "result":{"message":"slow","kind":"agent-timeout"}})
        );
        // The kinds list is complete.
        for e in [
            AgentError::BadSubject(String::new()),
            AgentError::BadRequest(String::new()),
            AgentError::ReadOnly(String::new()),
            AgentError::SnapdUnreachable(String::new()),
            AgentError::Timeout(String::new()),
            AgentError::BadResponse(String::new()),
            AgentError::TooLarge(String::new()),
        ] {
            assert!(AgentError::KINDS.contains(&e.kind()));
        }
    }
}
