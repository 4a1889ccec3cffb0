//! The watchdog: a snapd change that is not ready and made no progress for
//! `watchdog.threshold` is stuck ([`guard`]: progress
//! on the monotonic clock, boot grace, reboot budget); the watchdog then
//! writes every change snapd knows (with tasks) to
//! `$SNAP_DATA/snap_changes_{X}.json`, fsync'd, and reboots the device.
//!
//! A reboot loop must be impossible: before asking for the reboot the
//! watchdog remembers change X twice over, in the history database and by
//! the report file itself, and a change remembered either way never causes
//! another reboot. If neither could be written, it does not reboot (and
//! says so): a reboot it could not remember could repeat forever. The same
//! memory counts the reboots of the budget; a reboot held back is logged at
//! ERROR and published on `iot.agent.watchdog.events`.
//!
//! Kinds listed in `watchdog.ignore` are never stuck: `become-operational`
//! retries the device registration for as long as there is no serial.
#![warn(missing_docs)]

use crate::bus::{topics, Nats, Topic};
use crate::clock;
use crate::config::Config;
use crate::snapd::{self, Change, ChangeSelect};
use crate::subsystems::changes::guard::{self, Budget, Clock, Hold, Progress};
use crate::subsystems::changes::poller::{Snapshot, SnapshotRx};
use crate::subsystems::changes::store::{status_name, RebootRecord, Store};
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use crate::{errors, fsutil};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The snap-change watchdog (see the module).
pub struct Watchdog {
    snapd: snapd::Client,
    threshold: Duration,
    ignore: Vec<String>,
    reboot: Reboot,
    db_path: PathBuf,
    data_dir: PathBuf,
    grace: Duration,
    budget: Budget,
    clock: Clock,
    events: Option<Nats>,
    state: Mutex<State>,
    /// The poller's snapshots.
    snapshots: SnapshotRx,
}

/// The NATS subjects the watchdog publishes on (the AsyncAPI test).
pub fn documented_addresses() -> Vec<String> {
    vec![Topic::fixed(topics::WATCHDOG_EVENTS).nats()]
}

#[derive(Default)]
struct State {
    store: Option<Store>,
    /// Changes already said to have caused a reboot (logged once each).
    told: HashSet<String>,
    /// This process asked for a reboot: the device is going down.
    rebooting: bool,
    /// The database fault was logged (once, not on every look).
    db_warned: bool,
    /// When each watched change last moved.
    progress: Progress,
    /// Holds already told, by change and reason (logged once each).
    held: HashSet<(String, &'static str)>,
    /// Look again then: a hold ends.
    recheck_at: Option<tokio::time::Instant>,
}

/// Why a change is stuck.
#[derive(Debug, Clone)]
pub struct Stuck {
    /// The change.
    pub change: Change,
    /// How long it has not moved.
    pub idle: Duration,
}

impl Watchdog {
    /// The watchdog of `watchdog.*`, watching `snapshots` (the poller's).
    pub fn from_config(config: &Config, snapd: snapd::Client, snapshots: SnapshotRx) -> Watchdog {
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
            grace: w.boot.grace.get(),
            budget: Budget {
                reboots: w.budget.reboots,
                window: w.budget.window.get(),
            },
            clock: Clock::new(guard::system_uptime()),
            events: None,
            state: Mutex::new(State::default()),
            snapshots,
        }
    }

    /// Publishes held-back reboots on this bus.
    pub fn with_events(mut self, bus: Nats) -> Watchdog {
        self.events = Some(bus);
        self
    }

    /// The report of a stuck change.
    pub fn report_path(&self, change_id: &str) -> PathBuf {
        report_path(&self.data_dir, change_id)
    }
}

impl Subsystem for Arc<Watchdog> {
    const NAME: &'static str = "watchdog";
    const SECTION: &'static str = "watchdog";

    /// Watches the poller's snapshots until `shutdown`.
    async fn run(self, shutdown: Shutdown) -> RunResult {
        let mut rx = self.snapshots.clone();
        tracing::info!(
            threshold = %humantime::format_duration(self.threshold),
            ignore = ?self.ignore,
            budget = %format!("{} per {}", self.budget.reboots, humantime::format_duration(self.budget.window)),
            boot_grace = %humantime::format_duration(self.grace),
            reboot = %match &self.reboot { Reboot::Snapd => "through snapd".to_string(), Reboot::Command(c) => format!("command {c:?}") },
            "change watchdog on"
        );
        // Each snapshot is observed once: looked at again later it would
        // be older than what `act` fetched since, and seem to move.
        let mut observed = None;
        loop {
            let snapshot = rx.borrow_and_update().clone();
            let mut wake = IDLE_RECHECK;
            if let Some(snapshot) = snapshot {
                let now = tokio::time::Instant::now();
                if observed != Some(snapshot.seq) {
                    self.observe(&snapshot, now);
                    observed = Some(snapshot.seq);
                }
                for stuck in self.stuck(&snapshot, now) {
                    self.clone().act(stuck).await;
                }
                let now = tokio::time::Instant::now();
                if let Some(next) = self.next_deadline(&snapshot, now) {
                    wake = wake.min(next);
                }
                let mut st = self.state();
                match st.recheck_at {
                    Some(at) if at > now => wake = wake.min(at - now),
                    _ => st.recheck_at = None,
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }
}

impl Watchdog {
    fn watched<'a>(&'a self, snapshot: &'a Snapshot) -> impl Iterator<Item = &'a Change> {
        snapshot
            .changes
            .iter()
            .filter(|c| !c.ready && !self.ignore.contains(&c.kind))
    }

    /// Takes note of which watched changes moved; forgets the others.
    pub fn observe(&self, snapshot: &Snapshot, now: tokio::time::Instant) {
        let mut st = self.state();
        let ids: Vec<&str> = self.watched(snapshot).map(|c| c.id.as_str()).collect();
        st.progress.retain(&ids);
        for c in self.watched(snapshot) {
            st.progress.observe(c, now);
        }
    }

    /// The stuck changes of a snapshot (observed before), longest idle
    /// first.
    pub fn stuck(&self, snapshot: &Snapshot, now: tokio::time::Instant) -> Vec<Stuck> {
        let st = self.state();
        let mut out: Vec<Stuck> = self
            .watched(snapshot)
            .filter_map(|c| {
                let idle = st.progress.idle(&c.id, now)?;
                (idle >= self.threshold).then(|| Stuck {
                    change: c.clone(),
                    idle,
                })
            })
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.idle));
        out
    }

    /// How long until the next watched change has been still for the
    /// threshold.
    fn next_deadline(&self, snapshot: &Snapshot, now: tokio::time::Instant) -> Option<Duration> {
        let st = self.state();
        self.watched(snapshot)
            .filter_map(|c| st.progress.idle(&c.id, now))
            .filter(|idle| *idle < self.threshold)
            .map(|idle| self.threshold - idle)
            .min()
            // A few milliseconds late rather than early.
            .map(|left| left + Duration::from_millis(5))
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
        if self
            .state()
            .progress
            .observe(&now, tokio::time::Instant::now())
        {
            tracing::info!(change = %id, kind = %now.kind, "watchdog: the change made progress since the last look; not stuck");
            return;
        }
        let threshold = humantime::format_duration(self.threshold).to_string();
        let idle =
            humantime::format_duration(Duration::from_secs(stuck.idle.as_secs())).to_string();
        let reason = format!(
            "change {id} ({}: {}) is {} and made no progress for {idle}, past the watchdog \
             threshold of {threshold}",
            now.kind,
            now.summary,
            status_name(&now)
        );
        let me = self.clone();
        let past = tokio::task::spawn_blocking(move || me.past_reboots())
            .await
            .unwrap_or_default();
        if let Some(hold) = guard::hold(&self.clock, self.grace, self.budget, &past) {
            self.held_back(&now, &hold, &reason).await;
            return;
        }
        let at_ns = self.clock.wall_ns();
        let me = self.clone();
        let (now_c, reason_c) = (now.clone(), reason.clone());
        let remembered =
            tokio::task::spawn_blocking(move || me.remember(&now_c, &fresh, &reason_c, at_ns))
                .await
                .unwrap_or(false);
        if !remembered {
            tracing::error!(change = %id, "watchdog: NOT rebooting: neither the report nor the database could record the reboot, and an unrecorded reboot could repeat forever; fix the data directory ({})", self.data_dir.display());
            return;
        }
        self.state().rebooting = true;
        tracing::error!(
            change = %id, kind = %now.kind, summary = %now.summary, status = %status_name(&now),
            spawn = %now.spawn_time, idle = %idle, threshold = %threshold,
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
            match Store::open_durable(&self.db_path) {
                Ok(s) => {
                    st.store = Some(s);
                    st.db_warned = false;
                }
                Err(e) if !st.db_warned => {
                    st.db_warned = true;
                    tracing::warn!(error = %e, "watchdog: cannot open the history database; relying on the report files to remember reboots");
                }
                Err(_) => {}
            }
        }
        let in_db = match st.store.as_ref().map(|s| s.rebooted_for(id)) {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watchdog: cannot read the history database; relying on the report files");
                st.store = None;
                st.db_warned = true;
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

    /// The wall times (Unix ns) of the reboots remembered: the database's
    /// and the report files' (by modification time), one per change.
    fn past_reboots(&self) -> Vec<i64> {
        let mut by_id: HashMap<String, i64> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir(&self.data_dir) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(id) = name
                    .strip_prefix("snap_changes_")
                    .and_then(|n| n.strip_suffix(".json"))
                else {
                    continue;
                };
                let at = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                    .unwrap_or_else(|| self.clock.wall_ns());
                by_id.insert(id.to_string(), at);
            }
        }
        let mut st = self.state();
        match st.store.as_ref().map(|s| s.reboot_times()) {
            Some(Ok(rows)) => by_id.extend(rows),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "watchdog: cannot read the reboots from the database; counting the report files");
                st.store = None;
            }
            None => {}
        }
        by_id.into_values().collect()
    }

    /// A reboot held back: said once per change and reason, at ERROR for
    /// the budget (a device that needed a reboot did not get one), and
    /// published as an event.
    async fn held_back(&self, change: &Change, hold: &Hold, reason: &str) {
        let (retry, message) = match hold {
            Hold::Grace { left } => (
                *left,
                format!(
                    "watchdog: reboot held back: the system booted less than {} ago \
                     (watchdog.boot.grace); {reason}",
                    humantime::format_duration(self.grace)
                ),
            ),
            Hold::Budget { used, frees_at_ns } => {
                let left = u64::try_from(frees_at_ns.saturating_sub(self.clock.wall_ns()))
                    .map(Duration::from_nanos)
                    .unwrap_or(Duration::ZERO);
                (
                    left,
                    format!(
                        "watchdog: reboot held back: {used} reboot(s) in the last {} already, \
                         the budget is {} (watchdog.budget.reboots, watchdog.budget.window); \
                         look at the device: {reason}",
                        humantime::format_duration(self.budget.window),
                        self.budget.reboots
                    ),
                )
            }
        };
        {
            let mut st = self.state();
            let at = tokio::time::Instant::now() + retry + Duration::from_millis(5);
            st.recheck_at = Some(st.recheck_at.map_or(at, |t| t.min(at)));
            if !st.held.insert((change.id.clone(), hold.name())) {
                return;
            }
        }
        match hold {
            Hold::Grace { .. } => {
                tracing::warn!(change = %change.id, hold = hold.name(), "{message}")
            }
            Hold::Budget { .. } => {
                tracing::error!(change = %change.id, hold = hold.name(), "{message}")
            }
        }
        if let Some(bus) = &self.events {
            let event = json!({
                "event": "reboot-held",
                "reason": hold.name(),
                "change": change.id,
                "kind": change.kind,
                "summary": change.summary,
                "message": message,
                "retry-after-s": retry.as_secs(),
            });
            let topic = Topic::fixed(topics::WATCHDOG_EVENTS);
            if let Err(e) = bus.publish(&topic, event.to_string().into()).await {
                tracing::warn!(error = %e, "watchdog: cannot publish the event");
            }
        }
    }

    /// Writes the report and records the reboot. True when at least one of
    /// the two is durable.
    fn remember(&self, stuck: &Change, all: &[Change], reason: &str, at_ns: i64) -> bool {
        let path = self.report_path(&stuck.id);
        let doc = json!({
            "stuck-change": stuck.id,
            "reason": reason,
            "threshold": humantime::format_duration(self.threshold).to_string(),
            "written-at": clock::now_rfc3339(),
            "changes": all,
        });
        let body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        let report_ok = match fsutil::write_atomic(&path, &body, 0o600) {
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
            at_ns,
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
            tokio::sync::watch::channel(None).1,
        )
    }

    /// Spawn times do not matter (one is from 1970, before an RTC-less
    /// board set its clock): a change is stuck once it has not moved for
    /// the threshold since the watchdog first saw it.
    #[tokio::test(start_paused = true)]
    async fn only_still_unready_watched_changes_are_stuck() {
        use tokio::time::{advance, Instant};
        let d = dog();
        let snap = |changes| Snapshot {
            seq: 1,
            taken_ns: 0,
            changes,
        };
        let first = snap(vec![
            change("1", "install-snap", "Doing", false, "1970-01-01T00:00:05Z"),
            change("2", "install-snap", "Done", true, "2026-11-21T01:00:00Z"),
            change(
                "3",
                "become-operational",
                "Doing",
                false,
                "2026-11-21T01:00:00Z",
            ),
            change("4", "refresh-snap", "Wait", false, "2026-11-21T02:00:00Z"),
        ]);
        d.observe(&first, Instant::now());
        assert!(d.stuck(&first, Instant::now()).is_empty(), "just seen");
        advance(Duration::from_secs(1800)).await;
        // Change 5 appears; change 4 moves (Wait -> Doing).
        let mut later = first.changes.clone();
        later[3] = change("4", "refresh-snap", "Doing", false, "2026-11-21T02:00:00Z");
        later.push(change(
            "5",
            "install-snap",
            "Do",
            false,
            "2026-11-21T04:30:00Z",
        ));
        let later = snap(later);
        d.observe(&later, Instant::now());
        advance(Duration::from_secs(1800)).await;
        let ids = |v: Vec<Stuck>| v.into_iter().map(|s| s.change.id).collect::<Vec<_>>();
        assert_eq!(ids(d.stuck(&later, Instant::now())), ["1"]);
        // Change 4 and 5 cross the threshold in 30 minutes.
        let next = d.next_deadline(&later, Instant::now()).unwrap();
        assert!(
            next >= Duration::from_secs(1800) && next < Duration::from_secs(1801),
            "{next:?}"
        );
        advance(Duration::from_secs(1800)).await;
        assert_eq!(
            ids(d.stuck(&later, Instant::now())),
            ["1", "4", "5"],
            "longest still first; ready and ignored kinds are never stuck"
        );
    }

    /// Property test over random ids (remote input: snapd's change ids):
    /// the report always lands directly inside the data directory.
    #[test]
    fn any_change_id_names_a_file_inside_the_directory() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet: Vec<char> = "0123456789abc./\\-_ \0\n%\u{e9}\u{202e}".chars().collect();
        let dir = Path::new("/data");
        for _ in 0..5000 {
            let len = rng.random_range(0..24);
            let id: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let p = report_path(dir, &id);
            assert_eq!(p.parent(), Some(dir), "{id:?} -> {p:?}");
            let name = p.file_name().unwrap().to_str().unwrap();
            assert!(
                name.starts_with("snap_changes_") && name.ends_with(".json"),
                "{name}"
            );
        }
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
