//! What one read of snapd's changes costs the history: `Store::apply` on a
//! full history (the work done every 1-30 s while a change runs), and the
//! CLI's listing. Run with `scripts/bench --bench changes`; results and
//! method are recorded in docs/benchmarks.md.

use iot_agent::snapd::Change;
use iot_agent::subsystems::changes::store::{Filter, Store};
use serde_json::json;
use std::time::{Duration, Instant};

fn change(id: u32, status: &str, tasks: usize) -> Change {
    let ready = matches!(status, "Done" | "Error");
    let tasks: Vec<_> = (0..tasks)
        .map(|t| {
            json!({"id": format!("{}", id * 100 + t as u32), "kind": "mount-snap",
                   "summary": format!("Mount snap \"s{id}\" (x{t})"), "status": status,
                   "progress": {"label": "", "done": 1, "total": 1},
                   "spawn-time": "2026-11-21T05:00:00Z", "ready-time": "2026-11-21T05:00:01Z"})
        })
        .collect();
    serde_json::from_value(json!({
        "id": id.to_string(), "kind": "install-snap",
        "summary": format!("Install \"s{id}\" snap"), "status": status, "ready": ready,
        "spawn-time": format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + id / 1440 % 28, id / 60 % 24, id % 60),
        "tasks": tasks
    }))
    .unwrap()
}

/// Median and spread of `runs` timings of `f`.
fn measure(name: &str, runs: usize, mut f: impl FnMut()) {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "{name:58} median {:>9.3?}  p10 {:>9.3?}  p90 {:>9.3?}  ({runs} runs)",
        times[runs / 2],
        times[runs / 10],
        times[runs * 9 / 10]
    );
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.db");
    let mut store = Store::open(&path).unwrap();
    // A full history: 1000 ready changes of 12 tasks.
    let old: Vec<Change> = (1..=1000).map(|i| change(i, "Done", 12)).collect();
    store.apply(&old, 1000).unwrap();
    // What snapd typically still lists: the last 50, one of them running.
    let mut snapshot: Vec<Change> = (951..=1000).map(|i| change(i, "Done", 12)).collect();
    snapshot[49] = change(1000, "Doing", 12);
    store.apply(&snapshot, 1000).unwrap();

    measure("apply: 50 changes, nothing new (steady poll)", 200, || {
        store.apply(&snapshot, 1000).unwrap();
    });
    let mut flip = false;
    measure("apply: 50 changes, one changes status", 200, || {
        flip = !flip;
        snapshot[49] = change(1000, if flip { "Done" } else { "Doing" }, 12);
        store.apply(&snapshot, 1000).unwrap();
    });
    let mut next = 1001;
    measure(
        "apply: one new change in a full history (prunes one)",
        200,
        || {
            snapshot.push(change(next, "Doing", 12));
            next += 1;
            store.apply(&snapshot, 1000).unwrap();
            snapshot.remove(0);
        },
    );
    let reader = Store::open_read_only(&path).unwrap();
    measure("list: all 1000 changes (the CLI)", 50, || {
        assert_eq!(reader.list(&Filter::default()).unwrap().len(), 1000);
    });
    let size = std::fs::metadata(&path).unwrap().len();
    println!(
        "database size with 1000 changes of 12 tasks: {} KiB",
        size / 1024
    );
}
