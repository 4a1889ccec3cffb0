//! The cost of the DMS action ledger (`cargo bench --bench dms_ledger`):
//! the ledger writes one action pays on its way through the link (accept in
//! a batch of the size the intake sees in a burst, then `started` for an
//! action with an effect, then the stored reply and its acknowledgement),
//! on a file with every commit fsync'd, against the same code on an
//! in-memory database in the same run. Results: docs/benchmarks.md.

use iot_agent::services::dms::ledger::Ledger;
use iot_agent::services::dms::request::Request;
use std::time::{Duration, Instant};

/// Per-action latency (p50, p99) and throughput of `n` actions in batches.
fn run(ledger: &Ledger, n: usize, batch: usize, effect: bool) -> (Duration, Duration, f64) {
    let reqs: Vec<Request> = (0..n)
        .map(|i| Request {
            id: format!("{:p}-{i}", ledger),
            action: if effect { "install" } else { "list" }.into(),
            snap: "hello".into(),
            data: String::new(),
        })
        .collect();
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for chunk in reqs.chunks(batch) {
        let t = Instant::now();
        let refs: Vec<(&Request, &str)> = chunk.iter().map(|r| (r, "digest")).collect();
        ledger.accept(&refs).unwrap();
        let accepted = t.elapsed();
        for r in chunk {
            let t = Instant::now();
            if effect {
                ledger.start(&r.id).unwrap();
            }
            ledger
                .answer(&r.id, b"{\"id\":\"x\",\"success\":true}", None)
                .unwrap();
            ledger.acked(&r.id, false).unwrap();
            // Each action waits for its batch's commit, then its own writes.
            lat.push(accepted + t.elapsed());
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    (lat[n / 2], lat[n * 99 / 100], rate)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 2000 } else { 50 };
    let dir = tempfile::tempdir().unwrap();
    let file = Ledger::open(&dir.path().join("dms.db")).unwrap();
    let memory = Ledger::in_memory().unwrap();
    for (effect, batch) in [(false, 1), (false, 20), (true, 20)] {
        let (p50m, p99m, rm) = run(&memory, n, batch, effect);
        let (p50f, p99f, rf) = run(&file, n, batch, effect);
        println!(
            "{} actions, batch {batch:>2}: file {rf:>8.0}/s p50 {p50f:>9.3?} p99 {p99f:>9.3?} | memory {rm:>8.0}/s p50 {p50m:>9.3?} p99 {p99m:>9.3?} | file/memory rate {:.3}",
            if effect { "install" } else { "list   " },
            rf / rm
        );
    }
}
