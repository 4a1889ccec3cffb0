//! The heartbeat: `{"orgId","deviceId","refresh","snapListHash",
//! "installedSnapsHash"}` (the hashes only for dmscore). The DMS asks for
//! `list` when a hash differs from what it stored from the last versioned
//! list reply, so both hashes come from exactly what `list` answers (sorted
//! by name): SHA-256, hex.
//!
//! The heartbeat is how the DMS knows the device is alive, so it never
//! waits on snapd for long: the hashes are recomputed within a bound and
//! the last known ones are sent when snapd is slow or down.

use super::actions::{self, Ctx};
use super::snaps::Hashes;
use crate::config::DmsProtocol;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest wait for snapd's list when building a heartbeat.
const LIST_BOUND: Duration = Duration::from_secs(5);

/// The hashes of the last list built (by `list` or a heartbeat).
#[derive(Clone, Default)]
pub struct HashCache(Arc<Mutex<Option<Hashes>>>);

impl HashCache {
    pub fn store(&self, h: Hashes) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
    }
    pub fn get(&self) -> Option<Hashes> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub async fn heartbeat(ctx: &Ctx) -> Value {
    let mut doc = json!({
        "orgId": ctx.creds.org_id,
        "deviceId": ctx.creds.device_id,
        "refresh": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    });
    if ctx.protocol == DmsProtocol::Devicetwin {
        return doc;
    }
    let hashes = match tokio::time::timeout(LIST_BOUND, actions::list(ctx)).await {
        Ok(Ok(list)) => Some(Hashes::of(&list)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "snapd did not list the snaps; the heartbeat carries the last known hashes");
            ctx.hashes.get()
        }
        Err(_) => {
            tracing::warn!(
                "snapd is slow to list the snaps; the heartbeat carries the last known hashes"
            );
            ctx.hashes.get()
        }
    };
    if let Some(h) = hashes {
        doc["snapListHash"] = json!(h.snap_list);
        doc["installedSnapsHash"] = json!(h.installed_snaps);
    }
    doc
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_is_hex_of_the_digest() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
