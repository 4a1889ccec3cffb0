//! The heartbeat: `{"orgId","deviceId","refresh","snapListHash",
//! "installedSnapsHash"}` (the hashes only for dmscore). The DMS asks for
//! `list` when a hash differs from what it stored from the last versioned
//! list reply, so both hashes come from exactly what `list` answers (sorted
//! by name): SHA-256, hex.
//!
//! The heartbeat is how the DMS knows the device is alive, so it never
//! depends on snapd: it carries the hashes of the last list built, and the
//! list is built again only when snaps may have changed (the change poller
//! saw a change become ready, an action's change ended, or there is no list
//! yet), within a bound; when snapd is slow or down the last known hashes
//! go out.

use super::actions::{self, Ctx};
use super::snaps::Hashes;
use crate::config::DmsProtocol;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Longest wait for snapd's list when building a heartbeat.
const LIST_BOUND: Duration = Duration::from_secs(5);

/// The hashes of the last list built, and whether snaps may have changed
/// since (generations: a change seen while a list is being built leaves
/// the result stale).
#[derive(Clone, Default)]
pub struct HashCache(Arc<CacheInner>);

#[derive(Default)]
struct CacheInner {
    state: Mutex<CacheState>,
    refreshing: AtomicBool,
}

#[derive(Default)]
struct CacheState {
    hashes: Option<Hashes>,
    /// Bumped on every possible change of the snaps.
    wanted: u64,
    /// The generation the stored hashes were built at (or after).
    have: u64,
}

impl HashCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation to pass to [`HashCache::store`] for a list started now.
    pub fn generation(&self) -> u64 {
        self.lock().wanted
    }

    /// Hashes of a list that was started at generation `gen`.
    pub fn store(&self, h: Hashes, gen: u64) {
        let mut s = self.lock();
        s.hashes = Some(h);
        s.have = s.have.max(gen);
    }

    /// Snaps may have changed: build the list again for the next heartbeat.
    pub fn mark_changed(&self) {
        self.lock().wanted += 1;
    }

    /// The hashes last built, if any yet.
    pub fn get(&self) -> Option<Hashes> {
        self.lock().hashes.clone()
    }

    fn stale(&self) -> bool {
        let s = self.lock();
        s.hashes.is_none() || s.have < s.wanted
    }
}

/// The heartbeat's body: the device's state as the DMS decodes it.
pub async fn heartbeat(ctx: &Ctx) -> Value {
    let mut doc = json!({
        "orgId": ctx.creds.org_id,
        "deviceId": ctx.creds.device_id,
        "refresh": crate::clock::now_rfc3339_seconds(),
    });
    if ctx.protocol == DmsProtocol::Devicetwin {
        return doc;
    }
    if let Some(h) = current_hashes(ctx).await {
        doc["snapListHash"] = json!(h.snap_list);
        doc["installedSnapsHash"] = json!(h.installed_snaps);
    }
    doc
}

/// The hashes for a heartbeat: the cached ones, built again first (within
/// [`LIST_BOUND`]) when stale. The build runs as its own task, so a slow
/// snapd still fills the cache for a later heartbeat; only one runs at a
/// time.
async fn current_hashes(ctx: &Ctx) -> Option<Hashes> {
    let cache = &ctx.hashes;
    if !cache.stale() || cache.0.refreshing.swap(true, Ordering::AcqRel) {
        return cache.get();
    }
    let c = ctx.clone();
    let build = tokio::spawn(async move {
        let out = actions::list(&c).await;
        c.hashes.0.refreshing.store(false, Ordering::Release);
        out
    });
    match tokio::time::timeout(LIST_BOUND, build).await {
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "snapd did not list the snaps; the heartbeat carries the last known hashes")
        }
        Ok(Err(_)) => cache.0.refreshing.store(false, Ordering::Release),
        Err(_) => tracing::warn!(
            "snapd is slow to list the snaps; the heartbeat carries the last known hashes"
        ),
    }
    cache.get()
}

/// Lower-case hex SHA-256 of `data`, as the DMS compares it.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: &str) -> Hashes {
        Hashes {
            snap_list: x.into(),
            installed_snaps: x.into(),
        }
    }

    #[test]
    fn a_change_during_a_build_leaves_the_hashes_stale() {
        let c = HashCache::default();
        assert!(c.stale(), "nothing built yet");
        let gen = c.generation();
        c.store(h("a"), gen);
        assert!(!c.stale());
        let gen = c.generation();
        c.mark_changed(); // while a list is being built
        c.store(h("b"), gen);
        assert!(c.stale(), "built before the change was seen");
        c.store(h("c"), c.generation());
        assert!(!c.stale());
        assert_eq!(c.get(), Some(h("c")));
    }

    #[test]
    fn sha256_is_hex_of_the_digest() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
