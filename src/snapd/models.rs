//! Typed models of snapd's answers. Every struct keeps the fields it does
//! not name in `extra`, so passing an object on (to the DMS, over NATS) loses
//! nothing when snapd adds fields.

use super::error::ApiError;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// `type` of the response envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseType {
    Sync,
    Async,
    Error,
}

/// The envelope around every JSON answer of snapd.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: ResponseType,
    #[serde(rename = "status-code")]
    pub status_code: u16,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub result: Value,
    /// The change id of an async answer (top level, not inside `result`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Envelope {
    /// The error inside an error envelope; a result that is not snapd's
    /// error object still gives a message.
    pub fn api_error(&self) -> ApiError {
        serde_json::from_value(self.result.clone()).unwrap_or_else(|_| ApiError {
            message: format!("{} (HTTP {})", self.status, self.status_code),
            kind: None,
            value: None,
        })
    }
}

/// A change's or task's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Status {
    Default,
    Do,
    Doing,
    Done,
    Abort,
    Undo,
    Undoing,
    Undone,
    Hold,
    Error,
    Wait,
    #[serde(other)]
    Unknown,
}

impl Status {
    /// As snapd defines `ready`: nothing more will happen.
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            Status::Done | Status::Undone | Status::Hold | Status::Error
        )
    }
}

/// A task's progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub done: u64,
    #[serde(default)]
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub summary: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
    #[serde(default)]
    pub progress: Progress,
    #[serde(rename = "spawn-time", default)]
    pub spawn_time: String,
    #[serde(
        rename = "ready-time",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ready_time: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub summary: String,
    pub status: Status,
    #[serde(default)]
    pub ready: bool,
    #[serde(rename = "spawn-time", default)]
    pub spawn_time: String,
    #[serde(
        rename = "ready-time",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ready_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Task>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An installed (or store) snap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Snap {
    #[serde(default)]
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub version: String,
    /// A string in snapd's answers (`"x1"` for local installs); numbers are
    /// accepted too.
    #[serde(default, deserialize_with = "string_or_number")]
    pub revision: String,
    #[serde(default)]
    pub channel: String,
    #[serde(rename = "tracking-channel", default)]
    pub tracking_channel: String,
    #[serde(default)]
    pub confinement: String,
    #[serde(default)]
    pub devmode: bool,
    #[serde(rename = "installed-size", default)]
    pub installed_size: u64,
    #[serde(rename = "install-date", default)]
    pub install_date: String,
    #[serde(default)]
    pub status: String,
    #[serde(rename = "type", default)]
    pub snap_type: String,
    #[serde(default)]
    pub apps: Vec<App>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An app of a snap; services have `daemon` set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct App {
    #[serde(default)]
    pub snap: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub active: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct OsRelease {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "version-id", default)]
    pub version_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SystemInfo {
    #[serde(default)]
    pub series: String,
    #[serde(default)]
    pub version: String,
    #[serde(rename = "os-release", default)]
    pub os_release: OsRelease,
    #[serde(rename = "on-classic", default)]
    pub on_classic: bool,
    #[serde(default)]
    pub managed: bool,
    #[serde(rename = "kernel-version", default)]
    pub kernel_version: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub confinement: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One record of `GET /v2/logs` (json-seq).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    #[serde(default)]
    pub timestamp: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub sid: String,
    #[serde(default)]
    pub pid: String,
}

/// A user created through `POST /v2/users`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    #[serde(default)]
    pub id: i64,
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(rename = "ssh-keys", default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
}

/// The body of `POST /v2/snaps/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SnapAction {
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// `hold`: until when (RFC 3339, or `forever`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// `hold`: `general` or `auto-refresh`.
    #[serde(
        rename = "hold-level",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub hold_level: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub classic: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub devmode: bool,
}

impl SnapAction {
    pub fn new(action: &str) -> Self {
        SnapAction {
            action: action.into(),
            ..Default::default()
        }
    }
    pub fn channel(mut self, channel: Option<String>) -> Self {
        self.channel = channel;
        self
    }
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "revision must be a string or number, not {other}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_envelope_keeps_change_id_at_top_level() {
        let e: Envelope = serde_json::from_str(
            r#"{"type":"async","status-code":202,"status":"Accepted","result":null,"change":"7"}"#,
        )
        .unwrap();
        assert_eq!(e.kind, ResponseType::Async);
        assert_eq!(e.change.as_deref(), Some("7"));
    }

    #[test]
    fn revisions_may_be_numbers_and_unknown_fields_survive() {
        let s: Snap =
            serde_json::from_str(r#"{"name":"x","revision":29,"publisher":{"id":"p"}}"#).unwrap();
        assert_eq!(s.revision, "29");
        let back = serde_json::to_value(&s).unwrap();
        assert_eq!(back["publisher"]["id"], "p");
    }

    #[test]
    fn readiness_follows_snapd() {
        for s in [Status::Done, Status::Undone, Status::Hold, Status::Error] {
            assert!(s.is_ready());
        }
        for s in [
            Status::Do,
            Status::Doing,
            Status::Undoing,
            Status::Wait,
            Status::Abort,
        ] {
            assert!(!s.is_ready());
        }
        let s: Status = serde_json::from_str("\"Whatever\"").unwrap();
        assert_eq!(s, Status::Unknown);
    }
}
