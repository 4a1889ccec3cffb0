//! The remote browser's wire format, shared by the agent's service and
//! `iot-remote browse`.
//!
//! A request ([`Request`], JSON) goes to `{root}/request` (NATS
//! `iot.agent.browser.request`, MQTT `devices/browser/{device id}/request`).
//! The answer is a stream of binary [`Frame`]s to the request's address (its
//! NATS reply subject, or `{root}/reply/{reply-to}`), numbered from 1: the
//! head (status and headers), body chunks in order, then an end frame; or
//! an error frame instead, as the last frame, whenever the request is
//! refused or fails (also in the middle of a body that outgrew
//! `browser.max.body`).
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The request leaf.
pub const REQUEST: &str = "request";
/// See [`crate::services::terminal::protocol::REPLY`].
pub const REPLY: &str = "reply";
/// Largest body chunk of one frame.
pub const CHUNK: usize = 64 * 1024;

/// An HTTP request carried in a message.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Request {
    /// `127.0.0.1:PORT`, one of `browser.allow`; empty: the first allowed.
    #[serde(default)]
    pub origin: String,
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Header names and values, in order (cookies included).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The body, base64.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    /// MQTT: the token of the topic the frames go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

impl Request {
    /// The body's bytes.
    pub fn body_bytes(&self) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.body)
            .map_err(|e| format!("body is not base64: {e}"))
    }

    /// Sets the body.
    pub fn set_body(&mut self, b: &[u8]) {
        self.body = base64::engine::general_purpose::STANDARD.encode(b);
    }
}

/// The response head.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    /// HTTP status.
    pub status: u16,
    /// Header names and values, in order (`set-cookie` may repeat).
    pub headers: Vec<(String, String)>,
}

/// Why a request failed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// See [`ErrorKind`].
    pub kind: String,
    /// For people.
    pub message: String,
}

/// Why a request was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Unreadable request.
    BadRequest,
    /// The origin is not in `browser.allow`.
    Forbidden,
    /// The request or response body is larger than `browser.max.body`.
    TooLarge,
    /// The origin did not answer within `browser.timeout`.
    Timeout,
    /// The origin could not be reached or broke off.
    Unreachable,
    /// The NATS server protects nothing, so the browser is not served.
    Unprotected,
}

impl ErrorKind {
    /// The `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "browser-bad-request",
            ErrorKind::Forbidden => "browser-forbidden-origin",
            ErrorKind::TooLarge => "browser-too-large",
            ErrorKind::Timeout => "browser-timeout",
            ErrorKind::Unreachable => "browser-unreachable",
            ErrorKind::Unprotected => "browser-unprotected",
        }
    }

    /// Every kind, for the documentation check.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::BadRequest,
        ErrorKind::Forbidden,
        ErrorKind::TooLarge,
        ErrorKind::Timeout,
        ErrorKind::Unreachable,
        ErrorKind::Unprotected,
    ];

    /// The HTTP status a proxy answers with.
    pub fn status(kind: &str) -> u16 {
        match kind {
            "browser-bad-request" => 400,
            "browser-forbidden-origin" => 403,
            "browser-too-large" => 502,
            "browser-timeout" => 504,
            _ => 502,
        }
    }
}

/// One frame of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Status and headers (first).
    Head(Head),
    /// Body bytes.
    Body(bytes::Bytes),
    /// The body is complete (last).
    End,
    /// Refused or failed (last).
    Error(Failure),
}

impl Frame {
    /// A failure frame.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Frame {
        Frame::Error(Failure {
            kind: kind.as_str().into(),
            message: message.into(),
        })
    }

    /// Whether nothing follows it.
    pub fn is_last(&self) -> bool {
        matches!(self, Frame::End | Frame::Error(_))
    }

    /// Encodes: a kind byte (`h` head, `b` body, `e` end, `x` error), the
    /// sequence number (u64, big endian), the body (JSON for head and error).
    pub fn encode(&self, seq: u64) -> bytes::Bytes {
        let (k, body): (u8, Vec<u8>) = match self {
            Frame::Head(h) => (b'h', serde_json::to_vec(h).expect("JSON")),
            Frame::Body(b) => (b'b', b.to_vec()),
            Frame::End => (b'e', Vec::new()),
            Frame::Error(f) => (b'x', serde_json::to_vec(f).expect("JSON")),
        };
        let mut v = Vec::with_capacity(9 + body.len());
        v.push(k);
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&body);
        v.into()
    }

    /// Decodes a frame and its sequence number.
    pub fn decode(b: &bytes::Bytes) -> Result<(u64, Frame), String> {
        if b.len() < 9 {
            return Err(format!(
                "a browser frame has at least 9 bytes; got {}",
                b.len()
            ));
        }
        let seq = u64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
        let body = b.slice(9..);
        let json_err = |e: serde_json::Error| format!("bad browser frame: {e}");
        let f = match b[0] {
            b'h' => Frame::Head(serde_json::from_slice(&body).map_err(json_err)?),
            b'b' => Frame::Body(body),
            b'e' => Frame::End,
            b'x' => Frame::Error(serde_json::from_slice(&body).map_err(json_err)?),
            k => return Err(format!("unknown browser frame kind {k:#04x}")),
        };
        Ok((seq, f))
    }
}

/// Headers that belong to one connection (RFC 9110 7.6.1) and are not
/// passed on, in either direction, plus the ones each side sets itself.
pub fn hop_by_hop(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::Head(Head {
                status: 302,
                headers: vec![("set-cookie".into(), "a=b".into())],
            }),
            Frame::Body(bytes::Bytes::from_static(b"\x00\xff<html>")),
            Frame::End,
            Frame::error(ErrorKind::Forbidden, "no"),
        ] {
            assert_eq!(Frame::decode(&f.encode(9)).unwrap(), (9, f));
        }
        assert!(Frame::decode(&bytes::Bytes::from_static(b"q12345678")).is_err());
    }
}
