//! Snaps in the DMS's `deviceSnap` type, and the hashes of the list.
//!
//! The DMS decodes with Go's `encoding/json` into typed structs and drops
//! the whole message on one wrong type, so the shape here follows its
//! types, not snapd's: `revision` an integer, `installedDate` always an
//! RFC 3339 time (Go's zero time when snapd has none, as for a disabled
//! snap), `config` a JSON string, services with `daemon`.

use super::heartbeat::sha256_hex;
use crate::snapd;
use serde_json::{json, Map, Value};

/// Go's zero `time.Time`, which the DMS reads as "no date".
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// snapd's revision text as the DMS's integer: `"33"` is 33, a local
/// revision `"x2"` is -2 (snapd's own encoding of local revisions), an
/// unset or unreadable one 0.
pub fn revision_number(rev: &str) -> i64 {
    let rev = rev.trim();
    if let Some(local) = rev.strip_prefix('x') {
        return local.parse::<i64>().map(|n| -n).unwrap_or(0);
    }
    rev.parse().unwrap_or(0)
}

/// One snap as a `deviceSnap`.
pub fn device_snap(device_id: &str, s: &snapd::Snap, config: &Map<String, Value>) -> Value {
    let services: Vec<Value> = s
        .apps
        .iter()
        .filter_map(|a| {
            a.daemon.as_ref().map(
                |d| json!({"name": a.name, "daemon": d, "enabled": a.enabled, "active": a.active}),
            )
        })
        .collect();
    let installed_date = if s.install_date.trim().is_empty() {
        ZERO_TIME
    } else {
        s.install_date.as_str()
    };
    json!({
        "deviceId": device_id,
        "name": s.name,
        "installedSize": s.installed_size,
        "installedDate": installed_date,
        "status": s.status,
        "channel": s.channel,
        "confinement": s.confinement,
        "version": s.version,
        "revision": revision_number(&s.revision),
        "devmode": s.devmode,
        "config": Value::Object(config.clone()).to_string(),
        "services": services,
    })
}

/// The two heartbeat hashes of a list sorted by name: `snapListHash` over
/// the list's JSON, `installedSnapsHash` over the array of names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashes {
    /// `snapListHash`.
    pub snap_list: String,
    /// `installedSnapsHash`.
    pub installed_snaps: String,
}

impl Hashes {
    /// The hashes of snapd's list (sorted by name here).
    pub fn of(list: &[Value]) -> Hashes {
        let names: Vec<&str> = list.iter().filter_map(|s| s["name"].as_str()).collect();
        Hashes {
            snap_list: sha256_hex(Value::Array(list.to_vec()).to_string().as_bytes()),
            installed_snaps: sha256_hex(json!(names).to_string().as_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_are_integers_and_local_ones_negative() {
        assert_eq!(revision_number("33"), 33);
        assert_eq!(revision_number("x2"), -2);
        assert_eq!(revision_number(""), 0);
        assert_eq!(revision_number("unset"), 0);
    }

    #[test]
    fn a_snap_without_install_date_gets_the_zero_time() {
        let s: snapd::Snap = serde_json::from_value(json!({
            "name": "off", "revision": "x1", "status": "installed",
            "apps": [{"name": "d", "daemon": "simple"}, {"name": "cmd"}]
        }))
        .unwrap();
        let v = device_snap("dev", &s, &Map::new());
        assert_eq!(v["installedDate"], ZERO_TIME);
        assert_eq!(v["revision"], -1);
        assert_eq!(v["config"], "{}");
        assert_eq!(v["services"].as_array().unwrap().len(), 1);
        assert_eq!(v["services"][0]["daemon"], "simple");
    }
}
