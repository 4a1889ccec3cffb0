//! What keeps the watchdog from bricking a device: "stuck" judged by
//! progress on the monotonic clock, a grace period after boot, and a reboot
//! budget that outlives restarts and new change ids.
//!
//! - **Progress, not age.** A large download over cellular can run for
//!   hours and is fine as long as it moves. A change is stuck when nothing
//!   in it (its status, each task's status, `done`/`total` and ready time)
//!   changed for the threshold, measured on the monotonic clock from when
//!   the agent first saw the change or saw it move last. The wall clock is
//!   not used: RTC-less boards set it after boot, and a change spawned
//!   before that step would look decades old.
//! - **Grace after boot.** Right after a reboot snapd resumes its changes;
//!   rebooting again before it could helps nobody.
//! - **Budget.** snapd's auto-refresh retries create new change ids, so
//!   "never twice for the same change" would still allow a reboot an hour
//!   forever. At most `reboots` reboots per `window` are allowed, counted
//!   from the watchdog's persistent memory (database and report files).
//!
//! Every function here takes its instants from the caller, so the rules
//! are tested with tokio's paused clock.

use crate::snapd::Change;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;
use tokio::time::Instant;

/// The watchdog's clocks: monotonic for everything measured in this
/// process, and a wall clock that never runs backwards within it (for the
/// budget, which must be compared with times written before a reboot).
#[derive(Debug, Clone)]
pub struct Clock {
    started: Instant,
    wall_at_start_ns: i64,
    /// How long the system had been up at `started`.
    uptime_at_start: Duration,
}

impl Clock {
    /// The clocks now; `uptime` is how long the system has been up
    /// ([`system_uptime`] on a device).
    pub fn new(uptime: Duration) -> Clock {
        let started = Instant::now();
        Clock {
            started,
            wall_at_start_ns: crate::clock::now_ns(),
            uptime_at_start: uptime,
        }
    }

    /// Wall-clock now (Unix ns): the system's, but never earlier than the
    /// start time plus the monotonic time since, so a step back within
    /// this process does not stop the window from moving.
    pub fn wall_ns(&self) -> i64 {
        let mono = self
            .wall_at_start_ns
            .saturating_add(i64::try_from(self.started.elapsed().as_nanos()).unwrap_or(i64::MAX));
        crate::clock::now_ns().max(mono)
    }

    /// Time since the system booted.
    pub fn since_boot(&self) -> Duration {
        self.uptime_at_start.saturating_add(self.started.elapsed())
    }
}

/// Time since boot from `/proc/uptime` (CLOCK_BOOTTIME); zero when it
/// cannot be read, which keeps the grace period (the safe side).
pub fn system_uptime() -> Duration {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::ZERO)
}

/// `watchdog.budget.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// `watchdog.budget.reboots`: most reboots in a window.
    pub reboots: u32,
    /// `watchdog.budget.window`.
    pub window: Duration,
}

/// Why a reboot for a stuck change is held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// Within `watchdog.boot.grace` of boot; `left` until it ends.
    Grace {
        /// Time left in the grace period.
        left: Duration,
    },
    /// `used` reboots already in the window; the oldest leaves it at
    /// `frees_at_ns` (Unix ns).
    Budget {
        /// Reboots in the window.
        used: usize,
        /// When the oldest leaves the window (Unix ns).
        frees_at_ns: i64,
    },
}

impl Hold {
    /// A short name for logs and events.
    pub fn name(&self) -> &'static str {
        match self {
            Hold::Grace { .. } => "boot-grace",
            Hold::Budget { .. } => "reboot-budget",
        }
    }
}

/// Whether a reboot may happen now: `past_ns` are the wall times of the
/// reboots the watchdog remembers. A time in the future (the clock was
/// stepped back since) counts as inside the window.
pub fn hold(clock: &Clock, grace: Duration, budget: Budget, past_ns: &[i64]) -> Option<Hold> {
    let up = clock.since_boot();
    if up < grace {
        return Some(Hold::Grace { left: grace - up });
    }
    let now = clock.wall_ns();
    let window = i64::try_from(budget.window.as_nanos()).unwrap_or(i64::MAX);
    let start = now.saturating_sub(window);
    let mut inside: Vec<i64> = past_ns.iter().copied().filter(|t| *t > start).collect();
    if inside.len() >= budget.reboots as usize {
        inside.sort_unstable();
        // The reboot that must leave the window before one more is allowed.
        let k = inside.len() + 1 - (budget.reboots as usize).max(1);
        let frees_at_ns = inside
            .get(k.saturating_sub(1))
            .copied()
            .unwrap_or(now)
            .max(start)
            .saturating_add(window);
        return Some(Hold::Budget {
            used: inside.len(),
            frees_at_ns,
        });
    }
    None
}

/// What the watchdog knows of one change: when it was first seen and when
/// it last moved, on the monotonic clock.
#[derive(Debug, Clone)]
struct Seen {
    moved_at: Instant,
    fingerprint: u64,
}

/// Progress of the unready changes, by id.
#[derive(Debug, Default)]
pub struct Progress {
    seen: HashMap<String, Seen>,
}

/// Everything in a change that moves while it makes progress.
fn fingerprint(c: &Change) -> u64 {
    let mut h = DefaultHasher::new();
    c.status.hash(&mut h);
    c.ready_time.hash(&mut h);
    for t in &c.tasks {
        t.id.hash(&mut h);
        t.status.hash(&mut h);
        t.progress.done.hash(&mut h);
        t.progress.total.hash(&mut h);
        t.progress.label.hash(&mut h);
        t.ready_time.hash(&mut h);
    }
    h.finish()
}

impl Progress {
    /// Takes a look at a change at `now`. True when it moved since the last
    /// look (or is new).
    pub fn observe(&mut self, c: &Change, now: Instant) -> bool {
        let f = fingerprint(c);
        match self.seen.get_mut(&c.id) {
            Some(s) if s.fingerprint == f => false,
            Some(s) => {
                s.fingerprint = f;
                s.moved_at = now;
                true
            }
            None => {
                self.seen.insert(
                    c.id.clone(),
                    Seen {
                        moved_at: now,
                        fingerprint: f,
                    },
                );
                true
            }
        }
    }

    /// How long the change has not moved; `None` if never observed.
    pub fn idle(&self, id: &str, now: Instant) -> Option<Duration> {
        self.seen
            .get(id)
            .map(|s| now.saturating_duration_since(s.moved_at))
    }

    /// Forgets every change not in `keep` (ready or gone).
    pub fn retain(&mut self, keep: &[&str]) {
        self.seen.retain(|id, _| keep.contains(&id.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(id: &str, done: u64) -> Change {
        serde_json::from_value(json!({
            "id": id, "kind": "install-snap", "status": "Doing", "ready": false,
            "spawn-time": "1970-01-01T00:00:10Z",
            "tasks": [{"id": "1", "kind": "download-snap", "status": "Doing",
                       "progress": {"label": "x", "done": done, "total": 1000}}]
        }))
        .unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    #[tokio::test(start_paused = true)]
    async fn a_moving_change_is_never_idle_however_old_and_a_still_one_is() {
        let mut p = Progress::default();
        // Spawned in 1970 (an RTC-less board before its clock was set):
        // judged from when it was first seen, not from its spawn time.
        let mut done = 0;
        assert!(p.observe(&change("7", done), Instant::now()));
        for _ in 0..48 {
            tokio::time::advance(HOUR / 2).await;
            done += 10;
            assert!(p.observe(&change("7", done), Instant::now()));
            assert_eq!(p.idle("7", Instant::now()), Some(Duration::ZERO));
        }
        // 24 hours old, and moving all along; now it stops.
        tokio::time::advance(HOUR - Duration::from_secs(1)).await;
        assert!(!p.observe(&change("7", done), Instant::now()));
        assert!(p.idle("7", Instant::now()).unwrap() < HOUR);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(p.idle("7", Instant::now()), Some(HOUR));
        p.retain(&[]);
        assert_eq!(p.idle("7", Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn no_reboot_within_the_grace_period_after_boot() {
        let grace = 15 * 60;
        let clock = Clock::new(Duration::from_secs(60));
        let budget = Budget {
            reboots: 1,
            window: DAY,
        };
        assert_eq!(
            hold(&clock, Duration::from_secs(grace), budget, &[]),
            Some(Hold::Grace {
                left: Duration::from_secs(grace - 60)
            })
        );
        tokio::time::advance(Duration::from_secs(grace - 61)).await;
        assert!(hold(&clock, Duration::from_secs(grace), budget, &[]).is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(hold(&clock, Duration::from_secs(grace), budget, &[]), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_counts_remembered_reboots_in_the_window() {
        let clock = Clock::new(DAY);
        let grace = Duration::from_secs(900);
        let one = Budget {
            reboots: 1,
            window: DAY,
        };
        let now = clock.wall_ns();
        let h = |d: Duration| i64::try_from(d.as_nanos()).unwrap();
        // A reboot 23 h ago (before this process: from the database).
        let past = [now - h(23 * HOUR)];
        let held = hold(&clock, grace, one, &past).unwrap();
        assert_eq!(
            held,
            Hold::Budget {
                used: 1,
                frees_at_ns: past[0] + h(DAY)
            }
        );
        // Still inside a minute before it leaves the window; then gone.
        tokio::time::advance(HOUR - Duration::from_secs(60)).await;
        assert!(hold(&clock, grace, one, &past).is_some());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(hold(&clock, grace, one, &past), None);
        // A reboot "in the future" (the clock was stepped back) counts.
        assert!(hold(&clock, grace, one, &[clock.wall_ns() + h(HOUR)]).is_some());
        // Two per window: the second is allowed, the third is not.
        let two = Budget {
            reboots: 2,
            window: DAY,
        };
        let t = clock.wall_ns();
        assert_eq!(hold(&clock, grace, two, &[t - h(HOUR)]), None);
        assert!(matches!(
            hold(&clock, grace, two, &[t - h(HOUR), t - h(2 * HOUR)]),
            Some(Hold::Budget { used: 2, .. })
        ));
        // Zero reboots allowed: always held.
        let none = Budget {
            reboots: 0,
            window: DAY,
        };
        assert!(hold(&clock, grace, none, &[]).is_some());
    }
}
