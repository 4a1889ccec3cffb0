//! The DMS's action requests and the agent's responses, as on the wire.
//!
//! Parsing never fails silently: whatever arrives, the caller gets either a
//! [`Request`] or a [`Response`] saying what was wrong, carrying the request
//! id whenever it could be read.

use serde::Serialize;
use serde_json::Value;

/// Larger payloads are refused unread (assertions and configs are small).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Every action of the contract.
pub const ACTIONS: [&str; 21] = [
    "ack",
    "conf",
    "device",
    "disable",
    "enable",
    "info",
    "install",
    "list",
    "logs",
    "refresh",
    "remove",
    "restart",
    "revert",
    "server",
    "setconf",
    "snapshot",
    "start",
    "stop",
    "switch",
    "unregister",
    "user",
];

/// `{"id","action","snap","data"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The action's id, unique per action (the ledger's key).
    pub id: String,
    /// The action's name (`install`, `list`, ...).
    pub action: String,
    /// The snap it acts on, if any.
    pub snap: String,
    /// The action's argument, a string as the DMS sends it.
    pub data: String,
}

/// `{"id","action","success","message","result"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Response {
    /// The action's id.
    pub id: String,
    /// The action's name.
    pub action: String,
    /// Whether it was carried out.
    pub success: bool,
    /// Why it failed; on success empty or a note.
    pub message: String,
    /// The action's result.
    pub result: Value,
    /// `"2"` on dmscore's versioned `list` reply; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl Response {
    /// A successful reply to `req`.
    pub fn ok(req: &Request, result: Value) -> Self {
        Response {
            id: req.id.clone(),
            action: req.action.clone(),
            success: true,
            message: String::new(),
            result,
            version: None,
        }
    }

    /// A failed reply, with the reason.
    pub fn fail(id: &str, action: &str, message: impl Into<String>) -> Self {
        Response {
            id: id.to_string(),
            action: action.to_string(),
            success: false,
            message: message.into(),
            result: Value::Null,
            version: None,
        }
    }

    /// The JSON the DMS decodes.
    pub fn to_bytes(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Reads a request; a refusal comes back as the response to send.
pub fn parse(payload: &[u8]) -> Result<Request, Box<Response>> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Box::new(Response::fail(
            "",
            "",
            format!(
                "request refused: {} bytes is more than the {MAX_PAYLOAD} a request may have",
                payload.len()
            ),
        )));
    }
    let value: Value = serde_json::from_slice(payload).map_err(|e| {
        Box::new(Response::fail(
            "",
            "",
            format!("request is not valid JSON: {e}"),
        ))
    })?;
    let Value::Object(obj) = value else {
        return Err(Box::new(Response::fail(
            "",
            "",
            "request must be a JSON object with id, action, snap and data",
        )));
    };
    // The id first, so every later refusal can carry it.
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | None => {
            return Err(Box::new(Response::fail("", "", "request has no id")))
        }
        Some(other) => {
            return Err(Box::new(Response::fail(
                "",
                "",
                format!("request id must be a string, not {}", kind(other)),
            )))
        }
    };
    let field = |name: &str| -> Result<String, Box<Response>> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(Box::new(Response::fail(
                &id,
                obj.get("action").and_then(Value::as_str).unwrap_or(""),
                format!("field {name} must be a string, not {}", kind(other)),
            ))),
        }
    };
    let action = field("action")?;
    let snap = field("snap")?;
    let data = field("data")?;
    if !ACTIONS.contains(&action.as_str()) {
        let what = if action.is_empty() {
            "request has no action".to_string()
        } else {
            format!("unknown action {action:?}")
        };
        return Err(Box::new(Response::fail(
            &id,
            &action,
            format!("{what}; known actions: {}", ACTIONS.join(", ")),
        )));
    }
    Ok(Request {
        id,
        action,
        snap,
        data,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_requests_parse() {
        let r = parse(br#"{"id":"1","action":"install","snap":"hello","data":""}"#).unwrap();
        assert_eq!(
            (r.id.as_str(), r.action.as_str(), r.snap.as_str()),
            ("1", "install", "hello")
        );
        let r = parse(br#"{"id":"2","action":"list"}"#).unwrap();
        assert_eq!(r.snap, "");
    }

    #[test]
    fn every_refusal_says_why_and_keeps_the_id() {
        let cases: &[(&[u8], &str, &str)] = &[
            (b"{not json", "", "not valid JSON"),
            (b"[1,2]", "", "JSON object"),
            (br#"{"action":"list"}"#, "", "no id"),
            (br#"{"id":7,"action":"list"}"#, "", "id must be a string"),
            (
                br#"{"id":"a","action":"fly"}"#,
                "a",
                "unknown action \"fly\"",
            ),
            (br#"{"id":"a"}"#, "a", "no action"),
            (
                br#"{"id":"b","action":"install","snap":5}"#,
                "b",
                "snap must be a string",
            ),
            (
                br#"{"id":"c","action":"setconf","data":{"a":1}}"#,
                "c",
                "data must be a string",
            ),
        ];
        for (payload, id, msg) in cases {
            let r = parse(payload).unwrap_err();
            assert!(!r.success);
            assert_eq!(r.id, *id, "{}", String::from_utf8_lossy(payload));
            assert!(
                r.message.contains(msg),
                "{} -> {}",
                String::from_utf8_lossy(payload),
                r.message
            );
        }
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert!(parse(&big).unwrap_err().message.contains("more than"));
    }
}
