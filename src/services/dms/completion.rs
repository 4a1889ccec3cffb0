//! The completion report: the message sent when a snapd change that an
//! action started is ready.
//!
//! Both DMS generations route a message by its `action` and record the
//! action's outcome from the reply of that name (the original DMS marks
//! the record `complete` or `error`; a result of the wrong type turns it
//! into `error`). A report under the original action's name would be read
//! as a second reply, so it has its own action name, which both ignore.
//! The name and the shape live here only.

use super::request::{Request, Response};
use crate::snapd::{self, Status};
use serde_json::json;

/// The action name of completion reports.
pub const ACTION: &str = "completion";

/// `{"id": <request id>, "action": "completion", "success", "message",
/// "result": {"action", "snap", "change", "kind", "summary", "status",
/// "ready-time"}}`; `success` is true only for a `Done` change.
pub fn report(req: &Request, outcome: Result<&snapd::Change, String>) -> Response {
    match outcome {
        Ok(ch) => Response {
            id: req.id.clone(),
            action: ACTION.to_string(),
            success: ch.status == Status::Done,
            message: ch.err.clone().unwrap_or_default(),
            result: json!({
                "action": req.action,
                "snap": req.snap,
                "change": ch.id,
                "kind": ch.kind,
                "summary": ch.summary,
                "status": ch.status,
                "ready-time": ch.ready_time,
            }),
            version: None,
        },
        Err(message) => Response {
            id: req.id.clone(),
            action: ACTION.to_string(),
            success: false,
            message,
            result: json!({"action": req.action, "snap": req.snap}),
            version: None,
        },
    }
}
