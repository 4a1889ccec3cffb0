//! The reference agent's subjects, with its request and reply shapes, so
//! clients written for it keep working:
//!
//! | subject | request | reply |
//! |---|---|---|
//! | `v1.snapd.v2.snaps.get` | anything (ignored) | `{"snaps":[Snap..]}` |
//! | `v1.snapd.v2.snaps.{snap}.post` | `{"action":"switch","channel":".."}` | `{"changeId":"..","error":".."}` |
//! | `v1.snapd.v2.apps.post` | `{"action":"start"\|"stop","names":[..]}` | `{"changeId":"..","error":".."}` |
//! | `v1.snapd.v2.assertions.get` | `{"type":"model"}` | `{"stream":".."}` |
//! | `iot.agent.mqtt.connection.status` | anything (ignored) | `{"connected":bool,"errorInfo":{"message":".."}}` |
//!
//! Field names and Go's `omitempty` behaviour are kept (empty strings,
//! false and zero are left out). Two deliberate differences: every request
//! gets an answer (the reference stayed silent on many errors; here the
//! error is in `error`, also for `snaps.get` and `assertions.get`), and
//! `snaps.{snap}.post` accepts every snapd snap action, not only `switch`,
//! and `apps.post` also `restart`.

use crate::bus::StatusRx;
use crate::snapd::{self, SnapAction, SnapName};
use serde::{Deserialize, Serialize};

/// The compat shapes' `error` for a write refused for `why` (nats.readonly,
/// or a NATS server that does not protect the agent's subjects).
fn refused(why: &str) -> String {
    format!("refused: {why}; only reads are served")
}

/// The snap actions `v1.snapd.v2.snaps.{snap}.post` passes to snapd.
const SNAP_ACTIONS: &[&str] = &[
    "switch", "refresh", "install", "remove", "revert", "enable", "disable", "hold", "unhold",
];

/// The reference's `SnapsResponse`.
#[derive(Debug, Serialize, Default)]
pub struct SnapsResponse {
    /// The installed snaps.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snaps: Vec<RefSnap>,
    /// Empty on success.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The reference's `messages.Snap` (camelCase, omitempty).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RefSnap {
    /// The snap's apps.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<RefApp>,
    /// The channel installed from.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub channel: String,
    /// The store's snap id.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// Go's `time.Time` is never omitted: its zero value when unknown.
    pub install_date: String,
    /// Bytes on disk.
    #[serde(skip_serializing_if = "is_zero")]
    pub installed_size: u64,
    /// The snap's name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The installed revision.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub revision: String,
    /// snapd's status (`active`, ...).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// The store title.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub title: String,
    /// The channel followed on refresh.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tracking_channel: String,
    /// `app`, `gadget`, `kernel`, ... (`type` on the wire).
    #[serde(rename = "type", skip_serializing_if = "String::is_empty")]
    pub snap_type: String,
    /// The snap's version.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
}

/// The reference's `messages.App`.
#[derive(Debug, Serialize)]
pub struct RefApp {
    /// Whether the app's service runs.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub active: bool,
    /// The daemon type, empty for a command.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub daemon: String,
    /// Whether the service is enabled.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub enabled: bool,
    /// The app's name.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// The reference's `AsyncResponse` / `AppsResponse`.
#[derive(Debug, Serialize, Default, PartialEq)]
pub struct AsyncResponse {
    /// snapd's change id.
    #[serde(rename = "changeId", skip_serializing_if = "String::is_empty")]
    pub change_id: String,
    /// Empty on success.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl AsyncResponse {
    fn error(change_id: &str, e: impl ToString) -> Self {
        AsyncResponse {
            change_id: change_id.into(),
            error: e.to_string(),
        }
    }
}

/// The reference's `AssertionsResponse`.
#[derive(Debug, Serialize, Default)]
pub struct AssertionsResponse {
    /// The assertions, as snapd's stream.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stream: String,
    /// Empty on success.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// The DMS link's state, as the reference answers it.
#[derive(Debug, Serialize)]
pub struct MqttConnectionStatus {
    /// Whether the broker connection is up.
    pub connected: bool,
    /// Why not.
    #[serde(rename = "errorInfo", skip_serializing_if = "Option::is_none")]
    pub error_info: Option<ErrorInfo>,
}

/// The reference's error detail.
#[derive(Debug, Serialize)]
pub struct ErrorInfo {
    /// What went wrong.
    pub message: String,
}

#[derive(Debug, Deserialize)]
struct SnapsSnapRequest {
    #[serde(default)]
    action: String,
    #[serde(default)]
    channel: String,
}

#[derive(Debug, Deserialize)]
struct AppsRequest {
    #[serde(default)]
    action: String,
    #[serde(default)]
    names: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct AssertionsRequest {
    #[serde(default, rename = "type")]
    kind: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The payload as JSON, treating an empty payload as `{}` (Go's decoder
/// of the reference accepted that too).
fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, String> {
    let payload = if payload.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        payload
    };
    serde_json::from_slice(payload).map_err(|e| format!("invalid request: {e}"))
}

/// `v1.snapd.v2.snaps.get`: all revisions (`select=all`), disabled ones
/// included, as the reference agent listed them.
pub async fn snaps_get(snapd: &snapd::Client) -> SnapsResponse {
    match snapd.snaps_all_revisions().await {
        Ok(snaps) => SnapsResponse {
            snaps: snaps.into_iter().map(ref_snap).collect(),
            error: String::new(),
        },
        Err(e) => SnapsResponse {
            snaps: Vec::new(),
            error: e.to_string(),
        },
    }
}

fn ref_snap(s: snapd::Snap) -> RefSnap {
    RefSnap {
        apps: s
            .apps
            .into_iter()
            .map(|a| RefApp {
                active: a.active,
                daemon: a.daemon.unwrap_or_default(),
                enabled: a.enabled,
                name: a.name,
            })
            .collect(),
        channel: s.channel,
        id: s.id,
        install_date: if s.install_date.is_empty() {
            "0001-01-01T00:00:00Z".into()
        } else {
            s.install_date
        },
        installed_size: s.installed_size,
        name: s.name,
        revision: s.revision,
        status: s.status,
        title: s.title,
        tracking_channel: s.tracking_channel,
        snap_type: s.snap_type,
        version: s.version,
    }
}

/// `v1.snapd.v2.snaps.{snap}.post`.
pub async fn snap_post(
    snapd: &snapd::Client,
    snap: &str,
    payload: &[u8],
    refusal: Option<&str>,
) -> AsyncResponse {
    let req: SnapsSnapRequest = match decode(payload) {
        Ok(r) => r,
        Err(e) => return AsyncResponse::error("-1", e),
    };
    if !SNAP_ACTIONS.contains(&req.action.as_str()) {
        // The reference's answer to anything but `switch`.
        return AsyncResponse::error("-1", "Invalid action");
    }
    if let Some(why) = refusal {
        return AsyncResponse::error("-1", refused(why));
    }
    let name = match SnapName::parse(snap) {
        Ok(n) => n,
        Err(e) => return AsyncResponse::error("-1", e),
    };
    let channel = (!req.channel.is_empty()).then_some(req.channel);
    let action = SnapAction::new(&req.action).channel(channel);
    match snapd.snap_action(&name, &action).await {
        Ok(id) => AsyncResponse {
            change_id: id,
            error: String::new(),
        },
        Err(e) => AsyncResponse::error("", e),
    }
}

/// `v1.snapd.v2.apps.post`.
pub async fn apps_post(
    snapd: &snapd::Client,
    payload: &[u8],
    refusal: Option<&str>,
) -> AsyncResponse {
    let req: AppsRequest = match decode(payload) {
        Ok(r) => r,
        Err(e) => return AsyncResponse::error("", e),
    };
    if !matches!(req.action.as_str(), "start" | "stop" | "restart") {
        return AsyncResponse::error("", "Only start, stop and restart actions are supported");
    }
    if let Some(why) = refusal {
        return AsyncResponse::error("", refused(why));
    }
    match snapd.app_action(&req.action, &req.names).await {
        Ok(id) => AsyncResponse {
            change_id: id,
            error: String::new(),
        },
        Err(e) => AsyncResponse::error("", e),
    }
}

/// `v1.snapd.v2.assertions.get`.
pub async fn assertions_get(snapd: &snapd::Client, payload: &[u8]) -> AssertionsResponse {
    let result = match decode::<AssertionsRequest>(payload) {
        Ok(req) => snapd
            .assertions_text(&req.kind, &[])
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match result {
        Ok(stream) => AssertionsResponse {
            stream,
            error: String::new(),
        },
        Err(error) => AssertionsResponse {
            stream: String::new(),
            error,
        },
    }
}

/// `iot.agent.mqtt.connection.status`.
pub fn mqtt_status(status: &StatusRx) -> MqttConnectionStatus {
    let s = status.borrow().clone();
    MqttConnectionStatus {
        connected: s.connected,
        error_info: if s.connected {
            None
        } else {
            Some(ErrorInfo {
                message: s
                    .error
                    .unwrap_or_else(|| "the DMS MQTT connection is down".into()),
            })
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn shapes_follow_go_omitempty() {
        let r = AsyncResponse::error("", "boom");
        assert_eq!(serde_json::to_value(&r).unwrap(), json!({"error":"boom"}));
        let r = AsyncResponse {
            change_id: "7".into(),
            error: String::new(),
        };
        assert_eq!(serde_json::to_value(&r).unwrap(), json!({"changeId":"7"}));
        let s = ref_snap(snapd::Snap {
            name: "hello".into(),
            revision: "3".into(),
            apps: vec![snapd::App {
                name: "svc".into(),
                daemon: Some("simple".into()),
                enabled: true,
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"apps":[{"daemon":"simple","enabled":true,"name":"svc"}],
                   "installDate":"0001-01-01T00:00:00Z","name":"hello","revision":"3"})
        );
    }

    #[test]
    fn mqtt_status_reports_the_watch_value() {
        let (tx, rx) = crate::bus::status::mqtt_status_channel();
        let v = serde_json::to_value(mqtt_status(&rx)).unwrap();
        assert_eq!(v["connected"], false);
        assert!(v["errorInfo"]["message"]
            .as_str()
            .unwrap()
            .contains("not established"));
        tx.send(crate::bus::ConnectionStatus::connected()).unwrap();
        assert_eq!(
            serde_json::to_value(mqtt_status(&rx)).unwrap(),
            json!({"connected":true})
        );
    }
}
