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
    /// The answer is complete.
    Sync,
    /// A change was started: follow `change`.
    Async,
    /// An error envelope (`result` is an [`super::ApiError`]).
    Error,
}

/// The envelope around every JSON answer of snapd.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// `sync`, `async` or `error`.
    #[serde(rename = "type")]
    pub kind: ResponseType,
    /// The HTTP status, repeated.
    #[serde(rename = "status-code")]
    pub status_code: u16,
    /// The HTTP status text.
    #[serde(default)]
    pub status: String,
    /// The answer.
    #[serde(default)]
    pub result: Value,
    /// The change id of an async answer (top level, not inside `result`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// Anything else snapd sends, kept for the mirror.
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
    /// Not known yet.
    Default,
    /// To be done.
    Do,
    /// Being done.
    Doing,
    /// Done.
    Done,
    /// To be aborted.
    Abort,
    /// To be undone.
    Undo,
    /// Being undone.
    Undoing,
    /// Undone.
    Undone,
    /// Held (not to be run now).
    Hold,
    /// Failed.
    Error,
    /// Waiting (e.g. for a reboot).
    Wait,
    /// A status this agent does not know.
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
    /// What is being done.
    #[serde(default)]
    pub label: String,
    /// Units done.
    #[serde(default)]
    pub done: u64,
    /// Units in all.
    #[serde(default)]
    pub total: u64,
}

/// One task of a change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Task {
    /// The task's id.
    pub id: String,
    /// The task's kind (`download-snap`, ...).
    pub kind: String,
    /// What it does.
    #[serde(default)]
    pub summary: String,
    /// Where it stands.
    pub status: Status,
    /// Its log lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log: Vec<String>,
    /// Its progress.
    #[serde(default)]
    pub progress: Progress,
    /// When it was spawned (RFC 3339).
    #[serde(rename = "spawn-time", default)]
    pub spawn_time: String,
    #[serde(
        rename = "ready-time",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// When it became ready.
    pub ready_time: Option<String>,
    /// Anything else snapd sends.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A change: what one request to snapd set off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    /// The change's id.
    pub id: String,
    /// The change's kind (`install-snap`, ...).
    pub kind: String,
    /// What it does.
    #[serde(default)]
    pub summary: String,
    /// Where it stands.
    pub status: Status,
    /// Whether it is over (done, undone or failed).
    #[serde(default)]
    pub ready: bool,
    /// When it was spawned (RFC 3339).
    #[serde(rename = "spawn-time", default)]
    pub spawn_time: String,
    #[serde(
        rename = "ready-time",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    /// When it became ready.
    pub ready_time: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub err: Option<String>,
    /// Data some changes carry (e.g. `snap-names`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Its tasks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<Task>,
    /// Anything else snapd sends.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An installed (or store) snap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Snap {
    /// The store's snap id.
    #[serde(default)]
    pub id: String,
    /// The snap's name.
    pub name: String,
    /// The store title.
    #[serde(default)]
    pub title: String,
    /// A one-line summary.
    #[serde(default)]
    pub summary: String,
    /// The snap's version.
    #[serde(default)]
    pub version: String,
    /// A string in snapd's answers (`"x1"` for local installs); numbers are
    /// accepted too.
    #[serde(default, deserialize_with = "string_or_number")]
    pub revision: String,
    /// The channel installed from.
    #[serde(default)]
    pub channel: String,
    /// The channel followed on refresh.
    #[serde(rename = "tracking-channel", default)]
    pub tracking_channel: String,
    /// `strict`, `classic` or `devmode`.
    #[serde(default)]
    pub confinement: String,
    /// Installed in devmode.
    #[serde(default)]
    pub devmode: bool,
    /// Bytes on disk.
    #[serde(rename = "installed-size", default)]
    pub installed_size: u64,
    /// When it was installed (RFC 3339).
    #[serde(rename = "install-date", default)]
    pub install_date: String,
    /// `active`, `installed`, ...
    #[serde(default)]
    pub status: String,
    /// `app`, `gadget`, `kernel`, `base`, `os`, `snapd`.
    #[serde(rename = "type", default)]
    pub snap_type: String,
    /// Its apps.
    #[serde(default)]
    pub apps: Vec<App>,
    /// Anything else snapd sends.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An app of a snap; services have `daemon` set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct App {
    /// The snap it belongs to.
    #[serde(default)]
    pub snap: String,
    /// The app's name.
    pub name: String,
    /// The daemon type (`simple`, `forking`, ...), for services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<String>,
    /// Whether the service is enabled.
    #[serde(default)]
    pub enabled: bool,
    /// Whether the service runs.
    #[serde(default)]
    pub active: bool,
    /// Anything else snapd sends.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The host's `os-release`, as snapd reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct OsRelease {
    /// `ubuntu-core`, `ubuntu`, ...
    #[serde(default)]
    pub id: String,
    /// The release's version.
    #[serde(rename = "version-id", default)]
    pub version_id: String,
}

/// `GET /v2/system-info`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SystemInfo {
    /// The series (`16`).
    #[serde(default)]
    pub series: String,
    /// snapd's version.
    #[serde(default)]
    pub version: String,
    /// The host's release.
    #[serde(rename = "os-release", default)]
    pub os_release: OsRelease,
    /// Ubuntu classic (`false` on Ubuntu Core).
    #[serde(rename = "on-classic", default)]
    pub on_classic: bool,
    /// Whether the device has a managed user.
    #[serde(default)]
    pub managed: bool,
    /// The running kernel's version.
    #[serde(rename = "kernel-version", default)]
    pub kernel_version: String,
    /// The architecture (`amd64`, `arm64`, ...).
    #[serde(default)]
    pub architecture: String,
    /// The confinement the system supports.
    #[serde(default)]
    pub confinement: String,
    /// Anything else snapd sends.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One record of `GET /v2/logs` (json-seq).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogEntry {
    /// When (RFC 3339).
    #[serde(default)]
    pub timestamp: String,
    /// The log line.
    #[serde(default)]
    pub message: String,
    /// The syslog identifier.
    #[serde(default)]
    pub sid: String,
    /// The process id.
    #[serde(default)]
    pub pid: String,
}

/// A user created through `POST /v2/users`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    /// The user's uid.
    #[serde(default)]
    pub id: i64,
    /// The user name.
    pub username: String,
    /// The store account's e-mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The SSH keys imported for it.
    #[serde(rename = "ssh-keys", default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
}

/// The body of `POST /v2/snaps/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SnapAction {
    /// `install`, `refresh`, `remove`, `revert`, `enable`, `disable`, `switch`, `hold`, `unhold`.
    pub action: String,
    /// The channel, for install, refresh and switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The revision, for install, refresh and revert.
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
    /// Install with classic confinement.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub classic: bool,
    /// Install in devmode.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub devmode: bool,
}

impl SnapAction {
    /// An action with no options.
    pub fn new(action: &str) -> Self {
        SnapAction {
            action: action.into(),
            ..Default::default()
        }
    }
    /// Sets the channel.
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
