//! The DMS's own types for what the agent sends, as a strict decoder.
//!
//! Written from `shared/spec/dms-mqtt.md` and the JSON schemas both DMS
//! generations share with their agents
//! (`shared/fixtures/reference/28-dms-schemas.json`, everactive/dms-schemas),
//! and decoding the way Go's `encoding/json` does, because that is what the
//! DMS runs: unknown keys are ignored and `null` leaves the zero value, but
//! a value of the wrong JSON type fails the whole message (the DMS then
//! drops it or marks the action `error`), and a `time.Time` must be an
//! RFC 3339 string (`""` fails). On top of Go, the few facts the DMS relies
//! on are checked (`version.deviceId` of `device`, the fields the schemas
//! mark required).

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::Value;

/// Go's `time.Time` from JSON: an RFC 3339 string (null: the zero time).
#[derive(Debug, Clone, Default)]
pub struct GoTime(pub Option<time::OffsetDateTime>);

impl<'de> Deserialize<'de> for GoTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<Value>::deserialize(d)? {
            None | Some(Value::Null) => Ok(GoTime(None)),
            Some(Value::String(s)) => {
                time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                    .map(|t| GoTime(Some(t)))
                    .map_err(|e| de::Error::custom(format!("time {s:?} is not RFC 3339: {e}")))
            }
            Some(other) => Err(de::Error::custom(format!(
                "time must be an RFC 3339 string, not {other}"
            ))),
        }
    }
}

/// Go's `int64`/`int` from JSON: an integral number (null: 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GoInt(pub i64);

impl<'de> Deserialize<'de> for GoInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<Value>::deserialize(d)? {
            None | Some(Value::Null) => Ok(GoInt(0)),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(GoInt)
                .ok_or_else(|| de::Error::custom(format!("{n} is not an int64"))),
            Some(other) => Err(de::Error::custom(format!(
                "cannot unmarshal {other} into an int64"
            ))),
        }
    }
}

/// `string`, `bool` and nested types take `null` as their zero value in Go;
/// `Option` does the same here. Wrong types fail through serde.
type S = Option<String>;
type B = Option<bool>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub name: String,
    pub active: bool,
    pub enabled: bool,
    pub daemon: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSnap {
    pub device_id: S,
    pub name: S,
    #[serde(default)]
    pub installed_size: GoInt,
    #[serde(default)]
    pub installed_date: GoTime,
    pub status: S,
    pub channel: S,
    pub confinement: S,
    pub version: S,
    #[serde(default)]
    pub revision: GoInt,
    pub devmode: B,
    pub config: S,
    pub services: Option<Vec<ServiceStatus>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceVersion {
    pub device_id: S,
    pub version: S,
    pub series: S,
    pub os_id: S,
    pub os_version_id: S,
    pub on_classic: B,
    pub kernel_version: S,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub org_id: S,
    pub device_id: S,
    pub brand: S,
    pub model: S,
    pub serial: S,
    pub store: S,
    pub device_key: S,
    pub version: Option<DeviceVersion>,
    #[serde(default)]
    pub created: GoTime,
    #[serde(default)]
    pub last_refresh: GoTime,
}

/// The head every reply shares (`publishResponse`).
#[derive(Debug, Deserialize)]
pub struct Head {
    pub id: S,
    pub action: S,
    pub success: B,
    pub message: S,
    pub version: S,
}

#[derive(Debug, Deserialize)]
pub struct WithResult<T> {
    pub result: Option<T>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapsV2Result {
    pub snap_list_hash: String,
    pub installed_snaps_hash: String,
    pub snaps: Option<Vec<DeviceSnap>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub org_id: String,
    pub device_id: String,
    pub refresh: GoTime,
    pub snap_list_hash: S,
    pub installed_snaps_hash: S,
}

/// The completion report (the agent's own action; both DMS generations
/// ignore actions they do not know, so this is the agent's documented
/// shape, not the DMS's).
#[derive(Debug, Deserialize)]
pub struct CompletionResult {
    pub action: String,
    pub snap: String,
    pub change: Option<String>,
    pub status: Option<String>,
}

/// The actions whose `result` is the change id (`publishSnapTask`).
pub const SNAP_TASK_ACTIONS: [&str; 11] = [
    "install", "remove", "refresh", "revert", "enable", "disable", "setconf", "start", "stop",
    "restart", "switch",
];

/// A reply as the DMS reads it.
#[derive(Debug)]
pub enum Decoded {
    Device(Device),
    Snaps(Vec<DeviceSnap>),
    SnapsV2(SnapsV2Result),
    Snap(DeviceSnap),
    SnapTask(Option<String>),
    Version(DeviceVersion),
    Completion(CompletionResult),
    /// An action whose result the DMS does not read.
    Plain,
}

/// Decodes one message from `devices/pub/{id}` as the DMS would, routing
/// by `action`. `Err` = the DMS would drop it (or mark the action `error`).
pub fn decode_reply(payload: &[u8]) -> Result<(Head, Decoded), String> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    let head: Head = serde_json::from_value(v.clone()).map_err(|e| format!("head: {e}"))?;
    let action = head.action.clone().unwrap_or_default();
    fn res<T: for<'de> Deserialize<'de>>(v: &Value, what: &str) -> Result<Option<T>, String> {
        serde_json::from_value::<WithResult<T>>(v.clone())
            .map(|w| w.result)
            .map_err(|e| format!("{what}: {e}"))
    }
    let failed = head.success == Some(false);
    let decoded = match action.as_str() {
        "device" | "unregister" => {
            let d: Option<Device> = res(&v, "publishDevice")?;
            // The DMS stores the OS version only when it names the device.
            if let ("device", false, Some(d)) = (action.as_str(), failed, &d) {
                let id = d.version.as_ref().and_then(|v| v.device_id.as_deref());
                if id.unwrap_or("").is_empty() {
                    return Err("device reply without version.deviceId".into());
                }
            }
            d.map(Decoded::Device).unwrap_or(Decoded::Plain)
        }
        "list" if head.version.as_deref() == Some("2") => {
            for k in ["id", "version", "action", "success", "message"] {
                if v.get(k).is_none() {
                    return Err(format!("versioned message without {k}"));
                }
            }
            match res::<SnapsV2Result>(&v, "publishSnapsV2")? {
                Some(r) => Decoded::SnapsV2(r),
                None if failed => Decoded::Plain,
                None => return Err("publishSnapsV2 without result".into()),
            }
        }
        "list" => res::<Vec<DeviceSnap>>(&v, "publishSnaps")?
            .map(Decoded::Snaps)
            .unwrap_or(Decoded::Plain),
        a if SNAP_TASK_ACTIONS.contains(&a) => {
            Decoded::SnapTask(res::<String>(&v, "publishSnapTask")?)
        }
        "conf" | "info" => res::<DeviceSnap>(&v, "publishSnap")?
            .map(Decoded::Snap)
            .unwrap_or(Decoded::Plain),
        "server" => res::<DeviceVersion>(&v, "publishDeviceVersion")?
            .map(Decoded::Version)
            .unwrap_or(Decoded::Plain),
        "completion" => match res::<CompletionResult>(&v, "completion")? {
            Some(c) => Decoded::Completion(c),
            None => return Err("completion report without result".into()),
        },
        _ => Decoded::Plain,
    };
    Ok((head, decoded))
}

/// Decodes a heartbeat (`health`; `orgId`, `deviceId`, `refresh` required
/// by the schema: the DMS takes `refresh` as the device's last sign of
/// life, so a heartbeat without it makes the device look dead).
pub fn decode_health(payload: &[u8]) -> Result<Health, String> {
    let h: Health = serde_json::from_slice(payload).map_err(|e| format!("health: {e}"))?;
    if h.refresh.0.is_none() {
        return Err("health without refresh".into());
    }
    Ok(h)
}
