//! The change history subsystem (snaplogger): stores every snapshot of the
//! poller in SQLite and logs each change once when first seen and once
//! when it becomes ready.
//!
//! Logging follows `snaplogger.log.level`: `info` and more verbose log
//! every change; `warn` only the failed ones; `error` or `off` none. The
//! changes are stored whatever the level.
//!
//! A database fault (corrupt file, lock, read-only or full disk) ends the
//! run with an error that says what to do; the supervisor restarts the
//! history with back-off while the other subsystems go on. Because the
//! database is the memory of what was logged, the restart neither repeats
//! nor skips a change that snapd still has.
#![warn(missing_docs)]

use crate::clock;
use crate::config::Config;
use crate::snapd::{Change, Status};
use crate::subsystems::changes::poller::{Snapshot, SnapshotRx};
use crate::subsystems::changes::store::{status_name, Store};
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Changes younger than this are logged at start.
const STARTUP_WINDOW_NS: i64 = 24 * 3600 * 1_000_000_000;

/// Which changes the change logger writes to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// None.
    None,
    /// Only changes that failed.
    FailedOnly,
    /// Every change.
    All,
}

impl Verbosity {
    /// From `snaplogger.log.level`.
    pub fn from_level(level: &str) -> Verbosity {
        match level.trim().to_ascii_lowercase().as_str() {
            "off" | "error" => Verbosity::None,
            "warn" => Verbosity::FailedOnly,
            _ => Verbosity::All,
        }
    }
}

/// The change history: every change snapd reported, in SQLite.
pub struct History {
    path: PathBuf,
    keep: u32,
    verbosity: Verbosity,
    log_startup: bool,
    /// Set once the first snapshot of this process was handled: startup
    /// logging happens once per process, not once per restart.
    started: AtomicBool,
    store: Mutex<Option<Store>>,
    /// The poller's snapshots.
    snapshots: SnapshotRx,
}

impl History {
    /// The history of `snaplogger.*`, fed by `snapshots` (the poller's).
    pub fn from_config(config: &Config, snapshots: SnapshotRx) -> History {
        let s = &config.snaplogger;
        History {
            path: s.database.location.path().to_path_buf(),
            keep: s.maximum.changes.keep,
            verbosity: Verbosity::from_level(s.log.level.as_str()),
            log_startup: s.log.changes.startup,
            started: AtomicBool::new(false),
            store: Mutex::new(None),
            snapshots,
        }
    }
}

impl Subsystem for Arc<History> {
    const NAME: &'static str = "change-history";
    const SECTION: &'static str = "snaplogger";

    /// Stores every snapshot until `shutdown`.
    async fn run(self, shutdown: Shutdown) -> RunResult {
        let mut rx = self.snapshots.clone();
        let me = self.clone();
        let count = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let store =
                Store::open(&me.path).map_err(|e| anyhow::anyhow!("change history: {e}"))?;
            let n = store.count()?;
            *me.store.lock().unwrap_or_else(|e| e.into_inner()) = Some(store);
            Ok(n)
        })
        .await??;
        tracing::info!(database = %self.path.display(), stored = count, keep = self.keep, "change history open");
        loop {
            let snapshot = rx.borrow_and_update().clone();
            if let Some(snapshot) = snapshot {
                let me = self.clone();
                tokio::task::spawn_blocking(move || me.handle(&snapshot)).await??;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
            }
        }
    }
}

impl History {
    /// Stores one snapshot and logs what it brought.
    fn handle(&self, snapshot: &Snapshot) -> anyhow::Result<()> {
        let mut guard = self.store.lock().unwrap_or_else(|e| e.into_inner());
        let store = guard
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("history store not open"))?;
        let applied = match store.apply(&snapshot.changes, self.keep) {
            Ok(a) => a,
            Err(e) => {
                // Reopened on restart: a new connection after a fault.
                *guard = None;
                return Err(anyhow::anyhow!("change history: {e}"));
            }
        };
        let first = !self.started.swap(true, Ordering::SeqCst);
        let mut logged: HashSet<&str> = HashSet::new();
        if first && self.log_startup {
            let since = snapshot.taken_ns - STARTUP_WINDOW_NS;
            let recent: Vec<&Change> = snapshot
                .changes
                .iter()
                .filter(|c| {
                    let spawn = clock::parse_ns(&c.spawn_time).unwrap_or(0);
                    let ready = c
                        .ready_time
                        .as_deref()
                        .and_then(clock::parse_ns)
                        .unwrap_or(0);
                    spawn.max(ready) >= since
                })
                .collect();
            if self.verbosity == Verbosity::All {
                tracing::info!(count = recent.len(), "snap changes of the last 24 hours:");
            }
            for c in recent {
                self.log(c, "snap change");
                logged.insert(&c.id);
            }
        }
        for c in &applied.new {
            // At start, ready changes new to the history are history, not
            // news: the startup listing covers the recent ones.
            if logged.contains(c.id.as_str()) || (first && c.ready) {
                continue;
            }
            self.log(c, "snap change seen");
        }
        for c in &applied.became_ready {
            if logged.contains(c.id.as_str()) {
                continue;
            }
            self.log(c, "snap change ready");
        }
        if first {
            tracing::info!(
                snapd = snapshot.changes.len(),
                new = applied.new.len(),
                became_ready = applied.became_ready.len(),
                "change history in step with snapd"
            );
        }
        if applied.pruned > 0 {
            tracing::debug!(
                removed = applied.pruned,
                keep = self.keep,
                "oldest changes removed from the history"
            );
        }
        Ok(())
    }

    fn log(&self, c: &Change, what: &str) {
        let failed = c.status == Status::Error;
        let status = status_name(c);
        let ready = c.ready_time.as_deref().unwrap_or("");
        match self.verbosity {
            Verbosity::None => {}
            Verbosity::FailedOnly if !failed => {}
            _ if failed => tracing::warn!(
                id = %c.id, kind = %c.kind, status = %status, summary = %c.summary,
                spawn = %c.spawn_time, ready = %ready,
                error = %c.err.as_deref().unwrap_or("").replace('\n', " "),
                "{what}"
            ),
            _ => tracing::info!(
                id = %c.id, kind = %c.kind, status = %status, summary = %c.summary,
                spawn = %c.spawn_time, ready = %ready,
                "{what}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_below_info_log_less() {
        assert_eq!(Verbosity::from_level("info"), Verbosity::All);
        assert_eq!(Verbosity::from_level("debug"), Verbosity::All);
        assert_eq!(
            Verbosity::from_level("iot_agent=debug,info"),
            Verbosity::All
        );
        assert_eq!(Verbosity::from_level("warn"), Verbosity::FailedOnly);
        assert_eq!(Verbosity::from_level("error"), Verbosity::None);
        assert_eq!(Verbosity::from_level("off"), Verbosity::None);
    }
}
