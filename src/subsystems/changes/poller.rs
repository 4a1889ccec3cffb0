//! The change poller: the one place that reads snapd's changes, for every
//! subsystem that cares (the history, the watchdog), and the one way to
//! follow a change the agent started ([`Poller::follow`]: DMS completion
//! reports and snapshots, the per-serial required-install, the mirror's
//! change events).
//!
//! Each read of `GET /v2/changes?select=all` becomes a [`Snapshot`] on a
//! `watch` channel: a subscriber always sees the latest complete picture and
//! never falls behind (a slow one skips intermediate pictures, which is fine
//! for the history and the watchdog, which compare with their own state).
//! Changes that appeared or changed status between two reads are also sent
//! as [`ChangeEvent`]s on a `broadcast` channel, for subscribers that want
//! the moments (the NATS mirror).
//!
//! When to read again:
//! - snapd with `/v2/notices` (2.60+): a `change-update` notice wakes the
//!   poller at once (long poll), otherwise it reads every
//!   `snaplogger.duration.between.checks`;
//! - older snapd (404 on notices): every `between.checks` while nothing
//!   runs, and faster while a change is in progress, from every second for
//!   a change a few seconds old to every 30 s for one running for minutes
//!   (a `become-operational` that retries forever should not cost a request
//!   a second for the life of the device).
//!
//! A failed read ends the run with the error; the supervisor logs it and
//! restarts the poller with back-off. The snapshot survives the restart.
#![warn(missing_docs)]

use crate::clock;
use crate::snapd::{self, Change, ChangeSelect, Notices, Status};
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify};

/// The fastest re-read while a change is in progress.
pub const BUSY_MIN: Duration = Duration::from_secs(1);
/// The slowest re-read while a change is in progress (without notices).
pub const BUSY_MAX: Duration = Duration::from_secs(30);
/// The longest single notices long poll (the client's request timeout is
/// this plus a margin).
const LONG_POLL_MAX: Duration = Duration::from_secs(300);

/// Every change snapd knew at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// 1 for the first read of this agent process, then counting.
    pub seq: u64,
    /// When the read started, Unix nanoseconds.
    pub taken_ns: i64,
    /// Every change of the read.
    pub changes: Vec<Change>,
}

impl Snapshot {
    /// The change with this id, if snapd had it.
    pub fn get(&self, id: &str) -> Option<&Change> {
        self.changes.iter().find(|c| c.id == id)
    }
}

/// The latest snapshot (`None` until the first read succeeds).
pub type SnapshotRx = watch::Receiver<Option<Arc<Snapshot>>>;

/// A change that appeared, or whose status changed, between two reads.
#[derive(Debug, Clone)]
pub struct ChangeEvent {
    /// The change as read now.
    pub change: Change,
    /// Its status at the previous read; `None` when it is new.
    pub previous: Option<Status>,
}

/// The one reader of snapd's changes (see the module).
pub struct Poller {
    snapd: snapd::Client,
    every: Duration,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    events: broadcast::Sender<ChangeEvent>,
    kick: Notify,
}

impl Poller {
    /// `every`: `snaplogger.duration.between.checks`.
    pub fn new(snapd: snapd::Client, every: Duration) -> Self {
        Poller {
            snapd,
            every,
            snapshots: watch::channel(None).0,
            events: broadcast::channel(256).0,
            kick: Notify::new(),
        }
    }

    /// The latest snapshot, now and on every read.
    pub fn subscribe(&self) -> SnapshotRx {
        self.snapshots.subscribe()
    }

    /// Changes that appear or change status from now on. The first read of
    /// the process is the baseline and sends no events.
    pub fn events(&self) -> broadcast::Receiver<ChangeEvent> {
        self.events.subscribe()
    }

    /// Asks for a read now (e.g. right after starting a change).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// The first snapshot of this process, waiting for it (within
    /// `timeout`; `None` when snapd could not be read by then).
    pub async fn first_snapshot(&self, timeout: Duration) -> Option<Arc<Snapshot>> {
        let mut rx = self.subscribe();
        self.kick();
        let wait = async { rx.wait_for(|s| s.is_some()).await.ok()?.clone() };
        tokio::time::timeout(timeout, wait).await.ok().flatten()
    }

    /// Follows one change through the shared reads: the one way the agent
    /// watches a change (a DMS action's completion report, a
    /// required-install, a snapshot before its export, the mirror's change
    /// events). It asks for a read now and then rides on the shared reads:
    /// a thousand followed changes cost snapd no more requests than one.
    pub fn follow(&self, id: &str) -> Following<'_> {
        let rx = self.subscribe();
        let start_seq = rx.borrow().as_ref().map_or(0, |s| s.seq);
        self.kick();
        Following {
            poller: self,
            id: id.to_string(),
            rx,
            start_seq,
            last: None,
        }
    }

    /// Follows one change until it is ready, within `timeout`
    /// ([`Poller::follow`]).
    pub async fn wait_ready(&self, id: &str, timeout: Duration) -> Result<Change, String> {
        let mut following = self.follow(id);
        let wait = async {
            loop {
                let c = following.next().await?;
                if c.ready {
                    return Ok(c);
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => {
                let status = self
                    .subscribe()
                    .borrow()
                    .as_ref()
                    .and_then(|s| s.get(id).map(|c| format!("{:?}", c.status)))
                    .unwrap_or_else(|| "unknown".into());
                Err(format!(
                    "change {id} is still {status} after {}",
                    humantime::format_duration(timeout)
                ))
            }
        }
    }

    /// Reads until `shutdown`; returns the first failed read as an error.
    async fn read(&self, shutdown: Shutdown) -> RunResult {
        // Whether snapd has notices is found out again on every (re)start:
        // snapd may have been refreshed meanwhile.
        let mut notices = true;
        let mut after: Option<(i64, String)> = None;
        loop {
            let started = clock::now_ns();
            let changes = self.snapd.changes(ChangeSelect::All, None).await?;
            let wait = next_wait(&changes, self.every, started, notices);
            self.publish(started, changes);
            if after.is_none() {
                // Notices from before this read are already in it.
                after = Some((started, clock::format_ns(started)));
            }
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                if notices {
                    let poll = left.clamp(Duration::from_secs(1), LONG_POLL_MAX);
                    let since = after.as_ref().map(|(_, s)| s.as_str());
                    let answer = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = self.kick.notified() => break,
                        a = self.snapd.change_notices(since, poll) => a?,
                    };
                    match answer {
                        Notices::Unsupported => {
                            tracing::debug!("snapd has no notices API; polling changes");
                            notices = false;
                            // The wait was computed for notices: read again
                            // now and wait the polling way.
                            break;
                        }
                        Notices::Some(list) if list.is_empty() => {}
                        Notices::Some(list) => {
                            if let Some(latest) = latest_notice(&list) {
                                if after.as_ref().is_none_or(|(ns, _)| latest.0 > *ns) {
                                    after = Some(latest);
                                }
                            }
                            break;
                        }
                    }
                } else {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = self.kick.notified() => break,
                        _ = tokio::time::sleep(left) => break,
                    }
                }
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// Sends the new snapshot, and events for what differs from the last.
    fn publish(&self, taken_ns: i64, changes: Vec<Change>) {
        let previous = self.snapshots.borrow().clone();
        if let Some(prev) = &previous {
            let before: HashMap<&str, (Status, bool)> = prev
                .changes
                .iter()
                .map(|c| (c.id.as_str(), (c.status, c.ready)))
                .collect();
            for c in &changes {
                let event = match before.get(c.id.as_str()) {
                    None => Some(None),
                    Some(&(status, ready)) if status != c.status || ready != c.ready => {
                        Some(Some(status))
                    }
                    Some(_) => None,
                };
                if let Some(previous) = event {
                    // No subscriber is not an error.
                    let _ = self.events.send(ChangeEvent {
                        change: c.clone(),
                        previous,
                    });
                }
            }
        }
        let seq = previous.as_ref().map_or(1, |p| p.seq + 1);
        self.snapshots.send_replace(Some(Arc::new(Snapshot {
            seq,
            taken_ns,
            changes,
        })));
    }
}

/// One change followed through the poller's reads ([`Poller::follow`]).
pub struct Following<'a> {
    poller: &'a Poller,
    id: String,
    rx: SnapshotRx,
    /// The snapshot sequence when the following began.
    start_seq: u64,
    /// The status and readiness last returned.
    last: Option<(Status, bool)>,
}

impl Following<'_> {
    /// The change as soon as a read has it, then each time its status or
    /// readiness moves (a slow caller sees the latest, not every step).
    /// Once it returned a ready change, it waits for ever: stop there.
    /// An error when snapd does not know the change (still unknown two
    /// reads after the following began) or the poller stopped for good.
    pub async fn next(&mut self) -> Result<Change, String> {
        loop {
            if let Some(snap) = self.rx.borrow_and_update().clone() {
                match snap.get(&self.id) {
                    Some(c) if self.last != Some((c.status, c.ready)) => {
                        self.last = Some((c.status, c.ready));
                        return Ok(c.clone());
                    }
                    Some(_) => {}
                    None if self.last.is_some() => {
                        return Err(format!("snapd forgot change {}", self.id))
                    }
                    // Two reads after the request and still unknown: snapd
                    // does not have it (forgotten, or never made).
                    None if snap.seq > self.start_seq + 1 => {
                        return Err(format!("snapd does not know change {}", self.id))
                    }
                    None => self.poller.kick(),
                }
            }
            if self.rx.changed().await.is_err() {
                return Err("the change poller stopped".to_string());
            }
        }
    }
}

/// How long to wait before the next read (see the module doc).
pub fn next_wait(changes: &[Change], every: Duration, now_ns: i64, notices: bool) -> Duration {
    if notices {
        return every;
    }
    let youngest_busy = changes
        .iter()
        .filter(|c| !c.ready)
        .map(|c| {
            let age = clock::parse_ns(&c.spawn_time).map_or(0, |s| now_ns.saturating_sub(s));
            Duration::from_nanos(u64::try_from(age).unwrap_or(0))
        })
        .min();
    match youngest_busy {
        None => every,
        Some(age) => (age / 10).clamp(BUSY_MIN, BUSY_MAX).min(every),
    }
}

/// The newest `last-repeated` (else `last-occurred`) of a list of notices,
/// as nanoseconds and as snapd wrote it (passed back as `after`).
fn latest_notice(list: &[serde_json::Value]) -> Option<(i64, String)> {
    list.iter()
        .filter_map(|n| {
            let s = n
                .get("last-repeated")
                .or_else(|| n.get("last-occurred"))?
                .as_str()?;
            Some((clock::parse_ns(s)?, s.to_string()))
        })
        .max_by_key(|(ns, _)| *ns)
}

/// The poller is shared (the DMS and the per-serial worker follow changes
/// on it), so the subsystem is the shared handle.
impl Subsystem for Arc<Poller> {
    const NAME: &'static str = "change-poller";
    const SECTION: &'static str = "snaplogger";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        self.read(shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(id: &str, status: &str, ready: bool, spawn: &str) -> Change {
        serde_json::from_value(json!({
            "id": id, "kind": "k", "summary": "s", "status": status,
            "ready": ready, "spawn-time": spawn
        }))
        .unwrap()
    }

    const T0: &str = "2026-11-21T05:00:00Z";

    #[test]
    fn busy_changes_are_read_faster_the_younger_they_are() {
        let every = Duration::from_secs(3600);
        let t0 = clock::parse_ns(T0).unwrap();
        let sec = 1_000_000_000i64;
        let done = change("1", "Done", true, T0);
        assert_eq!(
            next_wait(std::slice::from_ref(&done), every, t0, false),
            every
        );
        let busy = change("2", "Doing", false, T0);
        let w = |age_s: i64| {
            next_wait(
                &[done.clone(), busy.clone()],
                every,
                t0 + age_s * sec,
                false,
            )
        };
        assert_eq!(w(2), BUSY_MIN);
        assert_eq!(w(100), Duration::from_secs(10));
        assert_eq!(w(86_400), BUSY_MAX);
        // Never slower than the configured interval.
        assert_eq!(
            next_wait(
                std::slice::from_ref(&busy),
                Duration::from_millis(500),
                t0 + 100 * sec,
                false
            ),
            Duration::from_millis(500)
        );
        // With notices, snapd wakes the poller: the interval stands.
        assert_eq!(next_wait(&[busy], every, t0, true), every);
    }

    #[test]
    fn the_newest_notice_is_found_by_its_time() {
        let list = vec![
            json!({"last-occurred": "2026-11-21T05:00:02Z", "last-repeated": "2026-11-21T05:00:03.5Z"}),
            json!({"last-occurred": "2026-11-21T05:00:04Z"}),
            json!({"last-occurred": "garbage"}),
            json!({}),
        ];
        assert_eq!(latest_notice(&list).unwrap().1, "2026-11-21T05:00:04Z");
        assert!(latest_notice(&[]).is_none());
    }

    #[tokio::test]
    async fn snapshots_count_up_and_events_say_what_changed() {
        let p = Poller::new(
            snapd::Client::new("/nonexistent", Duration::from_secs(1)),
            Duration::from_secs(60),
        );
        let rx = p.subscribe();
        let mut events = p.events();
        p.publish(1, vec![change("1", "Doing", false, T0)]);
        assert!(events.try_recv().is_err(), "the first read is the baseline");
        p.publish(
            2,
            vec![change("1", "Done", true, T0), change("2", "Do", false, T0)],
        );
        p.publish(
            3,
            vec![change("1", "Done", true, T0), change("2", "Do", false, T0)],
        );
        let a = events.try_recv().unwrap();
        assert_eq!(
            (a.change.id.as_str(), a.previous),
            ("1", Some(Status::Doing))
        );
        let b = events.try_recv().unwrap();
        assert_eq!((b.change.id.as_str(), b.previous), ("2", None));
        assert!(
            events.try_recv().is_err(),
            "an unchanged read sends nothing"
        );
        let snap = rx.borrow().clone().unwrap();
        assert_eq!((snap.seq, snap.taken_ns, snap.changes.len()), (3, 3, 2));
    }

    #[tokio::test]
    async fn a_followed_change_is_seen_at_each_move_and_an_unknown_one_ends() {
        let p = Poller::new(
            snapd::Client::new("/nonexistent", Duration::from_secs(1)),
            Duration::from_secs(60),
        );
        p.publish(1, vec![change("1", "Do", false, T0)]);
        let mut f = p.follow("1");
        assert_eq!(f.next().await.unwrap().status, Status::Do);
        // A read where nothing moved returns nothing: the next move does.
        p.publish(2, vec![change("1", "Do", false, T0)]);
        p.publish(3, vec![change("1", "Doing", false, T0)]);
        assert_eq!(f.next().await.unwrap().status, Status::Doing);
        p.publish(4, vec![change("1", "Done", true, T0)]);
        let done = f.next().await.unwrap();
        assert!(done.ready && done.status == Status::Done);
        assert_eq!(
            p.wait_ready("1", Duration::from_secs(5))
                .await
                .unwrap()
                .status,
            Status::Done
        );

        let mut unknown = p.follow("9");
        p.publish(5, vec![change("1", "Done", true, T0)]);
        p.publish(6, vec![change("1", "Done", true, T0)]);
        let e = unknown.next().await.unwrap_err();
        assert!(e.contains("does not know change 9"), "{e}");
    }
}
