//! The watchdog: a snapd change that is not ready `watchdog.threshold`
//! after its spawn time is stuck; the watchdog then writes every change
//! snapd knows (with tasks) to `$SNAP_DATA/snap_changes_{X}.json`, fsync'd,
//! and reboots the device.
//!
//! A reboot loop must be impossible: before asking for the reboot the
//! watchdog remembers change X twice over, in the history database and by
//! the report file itself, and a change remembered either way never causes
//! another reboot. If neither could be written, it does not reboot (and
//! says so): a reboot it could not remember could repeat forever.
//!
//! Kinds listed in `watchdog.ignore` are never stuck: `become-operational`
//! retries the device registration for as long as there is no serial.

use crate::changes::poller::{Snapshot, SnapshotRx};
use crate::changes::store::{status_name, RebootRecord, Store};
use crate::changes::times;
use crate::config::Config;
use crate::snapd::{self, Change, ChangeSelect};
use crate::supervisor::RunResult;
use crate::{errors, fsutil};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Bound on a configured reboot command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest sleep between two looks when nothing is about to be stuck.
const IDLE_RECHECK: Duration = Duration::from_secs(600);

/// How the device is rebooted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reboot {
    /// `POST /v2/systems {"action":"reboot"}`.
    Snapd,
    /// `sh -c COMMAND`, with `IOT_AGENT_STUCK_CHANGE` and `IOT_AGENT_REPORT`
    /// in its environment.
    Command(String),
}

pub struct Watchdog {
    snapd: snapd::Client,
    threshold: Duration,
    ignore: Vec<String>,
    reboot: Reboot,
    db_path: PathBuf,
    data_dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    store: Option<Store>,
    /// Changes already said to have caused a reboot (logged once each).
    told: HashSet<String>,
    /// This process asked for a reboot: the device is going down.
    rebooting: bool,
}

/// Why a change is stuck.
#[derive(Debug, Clone)]
pub struct Stuck {
    pub change: Change,
    pub age: Duration,
}

impl Watchdog {
    pub fn from_config(config: &Config, snapd: snapd::Client) -> Watchdog {
        let w = &config.watchdog;
        let command = w.reboot.command.trim();
        Watchdog {
            snapd,
            threshold: w.threshold.get(),
            ignore: w.ignore.items().to_vec(),
            reboot: if command.is_empty() {
                Reboot::Snapd
            } else {
                Reboot::Command(command.to_string())
            },
            db_path: config.snaplogger.database.location.path().to_path_buf(),
            data_dir: config.data_dir().to_path_buf(),
            state: Mutex::new(State::default()),
        }
    }

    /// The report of a stuck change.
    pub fn report_path(&self, change_id: &str) -> PathBuf {
        report_path(&self.data_dir, change_id)
    }

    /// Watches the poller's snapshots until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        mut rx: SnapshotRx,
        shutdown: CancellationToken,
    ) -> RunResult {
        tracing::info!(
            threshold = %humantime::format_duration(self.threshold),
            ignore = ?self.ignore,
            reboot = %match &self.reboot { Reboot::Snapd => "through snapd".to_string(), Reboot::Command(c) => format!("command {c:?}") },
            "snap change watchdog on"
        );
        loop {
            let snapshot = rx.borrow_and_update().clone();
            let mut wake = IDLE_RECHECK;
            if let Some(snapshot) = snapshot {
                let now = times::now_ns();
                for stuck in self.stuck(&snapshot, now) {
                    self.clone().act(stuck).await;
                }
                if let Some(next) = self.next_deadline(&snapshot, now) {
                    wake = wake.min(next);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    fn watched<'a>(&'a self, snapshot: &'a Snapshot) -> impl Iterator<Item = (&'a Change, i64)> {
        snapshot
            .changes
            .iter()
            .filter(|c| !c.ready && !self.ignore.iter().any(|k| *k == c.kind))
            .filter_map(|c| Some((c, times::parse_ns(&c.spawn_time)?)))
    }

    /// The stuck changes of a snapshot, oldest first.
    pub fn stuck(&self, snapshot: &Snapshot, now_ns: i64) -> Vec<Stuck> {
        let threshold = times::duration_ns(self.threshold);
        let mut out: Vec<(i64, Stuck)> = self
            .watched(snapshot)
            .filter(|(_, spawn)| now_ns.saturating_sub(*spawn) >= threshold)
            .map(|(c, spawn)| {
                let age = u64::try_from(now_ns.saturating_sub(spawn)).unwrap_or(0);
                (
                    spawn,
                    Stuck {
                        change: c.clone(),
                        age: Duration::from_nanos(age),
                    },
                )
            })
            .collect();
        out.sort_by_key(|(spawn, _)| *spawn);
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// How long until the next watched change crosses the threshold.
    fn next_deadline(&self, snapshot: &Snapshot, now_ns: i64) -> Option<Duration> {
        let threshold = times::duration_ns(self.threshold);
        self.watched(snapshot)
            .map(|(_, spawn)| spawn.saturating_add(threshold).saturating_sub(now_ns))
            .filter(|left| *left > 0)
            .min()
            // A few milliseconds late rather than early.
            .map(|left| {
                Duration::from_nanos(u64::try_from(left).unwrap_or(0)) + Duration::from_millis(5)
            })
    }

    /// Handles one stuck change: report, remember, reboot.
    async fn act(self: Arc<Self>, stuck: Stuck) {
        let id = stuck.change.id.clone();
        let me = self.clone();
        let check_id = id.clone();
        let remembered = tokio::task::spawn_blocking(move || me.remembered(&check_id))
            .await
            .unwrap_or(true);
        if remembered {
            return;
        }
        // Look again, fresh: the snapshot may be seconds old, and the report
        // needs every change with its tasks as snapd has them now.
        let fresh = match self.snapd.changes(ChangeSelect::All, None).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(change = %id, error = %e, "watchdog: change looks stuck but snapd cannot be asked again; checking later");
                return;
            }
        };
        let Some(now) = fresh.iter().find(|c| c.id == id).cloned() else {
            tracing::info!(change = %id, "watchdog: the stuck change is gone from snapd; not rebooting");
            return;
        };
        if now.ready {
            tracing::info!(change = %id, status = %status_name(&now), "watchdog: the change became ready; not rebooting");
            return;
        }
        let threshold = humantime::format_duration(self.threshold).to_string();
        let age = humantime::format_duration(Duration::from_secs(stuck.age.as_secs())).to_string();
        let reason = format!(
            "change {id} ({}: {}) is {} after {age}, past the watchdog threshold of {threshold}",
            now.kind,
            now.summary,
            status_name(&now)
        );
        let me = self.clone();
        let (now_c, reason_c) = (now.clone(), reason.clone());
        let remembered =
            tokio::task::spawn_blocking(move || me.remember(&now_c, &fresh, &reason_c))
                .await
                .unwrap_or(false);
        if !remembered {
            tracing::error!(change = %id, "watchdog: NOT rebooting: neither the report nor the database could record the reboot, and an unrecorded reboot could repeat forever; fix the data directory ({})", self.data_dir.display());
            return;
        }
        self.state().rebooting = true;
        tracing::error!(
            change = %id, kind = %now.kind, summary = %now.summary, status = %status_name(&now),
            spawn = %now.spawn_time, age = %age, threshold = %threshold,
            report = %self.report_path(&id).display(),
            "watchdog: snap change stuck; rebooting the device: {reason}"
        );
        match &self.reboot {
            Reboot::Snapd => match self.snapd.reboot().await {
                Ok(()) => tracing::info!(change = %id, "watchdog: reboot requested from snapd"),
                Err(e) => {
                    tracing::error!(change = %id, error = %e, "watchdog: snapd refused the reboot; reboot the device by hand")
                }
            },
            Reboot::Command(cmd) => self.run_command(cmd, &id).await,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when this change already caused a reboot (or this process is
    /// rebooting already); says so once per change.
    fn remembered(&self, id: &str) -> bool {
        let mut st = self.state();
        if st.rebooting {
            return true;
        }
        if st.store.is_none() {
            match Store::open(&self.db_path) {
                Ok(s) => st.store = Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "watchdog: cannot open the history database; relying on the report files to remember reboots")
                }
            }
        }
        let in_db = match st.store.as_ref().map(|s| s.rebooted_for(id)) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watchdog: cannot read the history database; relying on the report files");
                st.store = None;
                false
            }
            None => false,
        };
        let report = self.report_path(id);
        let known = in_db || report.exists();
        if known && st.told.insert(id.to_string()) {
            tracing::info!(
                change = %id, report = %report.display(),
                "watchdog: change is still not ready but already caused a reboot; not rebooting again"
            );
        }
        known
    }

    /// Writes the report and records the reboot. True when at least one of
    /// the two is durable.
    fn remember(&self, stuck: &Change, all: &[Change], reason: &str) -> bool {
        let path = self.report_path(&stuck.id);
        let doc = json!({
            "stuck-change": stuck.id,
            "reason": reason,
            "threshold": humantime::format_duration(self.threshold).to_string(),
            "written-at": times::now_rfc3339(),
            "changes": all,
        });
        let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        let report_ok = match fsutil::write_atomic(&path, &body, 0o644) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %errors::chain(&e), "watchdog: cannot write the report");
                false
            }
        };
        let record = RebootRecord {
            change_id: stuck.id.clone(),
            kind: stuck.kind.clone(),
            summary: stuck.summary.clone(),
            spawn_time: stuck.spawn_time.clone(),
            report: path.display().to_string(),
        };
        let mut st = self.state();
        let db_ok = match st.store.as_ref().map(|s| s.record_reboot(&record)) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::error!(error = %e, "watchdog: cannot record the reboot in the database");
                st.store = None;
                false
            }
            None => false,
        };
        report_ok || db_ok
    }

    async fn run_command(&self, cmd: &str, id: &str) {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c")
            .arg(cmd)
            .env("IOT_AGENT_STUCK_CHANGE", id)
            .env("IOT_AGENT_REPORT", self.report_path(id))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(COMMAND_TIMEOUT, c.output()).await {
            Ok(Ok(out)) if out.status.success() => {
                tracing::info!(change = %id, "watchdog: reboot command ran")
            }
            Ok(Ok(out)) => tracing::error!(
                change = %id, status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "watchdog: the reboot command failed; reboot the device by hand (watchdog.reboot.command)"
            ),
            Ok(Err(e)) => {
                tracing::error!(change = %id, error = %e, "watchdog: cannot run the reboot command (watchdog.reboot.command)")
            }
            Err(_) => {
                tracing::error!(change = %id, "watchdog: the reboot command did not finish within {}s", COMMAND_TIMEOUT.as_secs())
            }
        }
    }
}

/// `DIR/snap_changes_{X}.json`. snapd's ids are numbers; anything else in
/// an id is replaced, so an id can never name a path outside `dir`.
pub fn report_path(dir: &Path, change_id: &str) -> PathBuf {
    let safe: String = change_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("snap_changes_{safe}.json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(id: &str, kind: &str, status: &str, ready: bool, spawn: &str) -> Change {
        serde_json::from_value(json!({
            "id": id, "kind": kind, "summary": "s", "status": status,
            "ready": ready, "spawn-time": spawn
        }))
        .unwrap()
    }

    fn dog() -> Watchdog {
        let mut config = Config::default();
        config.watchdog.threshold = crate::config::Duration::from_secs(3600);
        Watchdog::from_config(
            &config,
            snapd::Client::new("/nonexistent", Duration::from_secs(1)),
        )
    }

    #[test]
    fn only_old_unready_watched_changes_are_stuck() {
        let d = dog();
        let t = |s: &str| times::parse_ns(s).unwrap();
        let snap = Snapshot {
            seq: 1,
            taken_ns: 0,
            changes: vec![
                change("1", "install-snap", "Doing", false, "2026-11-21T03:00:00Z"),
                change("2", "install-snap", "Done", true, "2026-11-21T01:00:00Z"),
                change(
                    "3",
                    "become-operational",
                    "Doing",
                    false,
                    "2026-11-21T01:00:00Z",
                ),
                change("4", "refresh-snap", "Wait", false, "2026-11-21T02:00:00Z"),
                change("5", "install-snap", "Do", false, "2026-11-21T04:30:00Z"),
                change("6", "install-snap", "Do", false, "not a time"),
            ],
        };
        let now = t("2026-11-21T05:00:00Z");
        let ids: Vec<String> = d
            .stuck(&snap, now)
            .into_iter()
            .map(|s| s.change.id)
            .collect();
        assert_eq!(
            ids,
            ["4", "1"],
            "oldest first; ready and ignored kinds are not stuck"
        );
        // Change 5 crosses the threshold in 30 minutes.
        let next = d.next_deadline(&snap, now).unwrap();
        assert!(
            next >= Duration::from_secs(1800) && next < Duration::from_secs(1801),
            "{next:?}"
        );
    }

    #[test]
    fn report_names_stay_inside_the_directory() {
        let dir = Path::new("/data");
        assert_eq!(
            report_path(dir, "42"),
            Path::new("/data/snap_changes_42.json")
        );
        assert_eq!(
            report_path(dir, "../../etc/x"),
            Path::new("/data/snap_changes_______etc_x.json")
        );
    }
}
