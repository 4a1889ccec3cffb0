//! Status: backlog, oldest age, drop counts and rates, the intake's size
//! cap and the dead letters, published on the health subject every
//! `export.status.interval` and kept in the spool for
//! `iot-agent export status`. The same loop expires messages older than
//! `export.spool.max.age`.

use super::capacity::{Capacity, SharedCapacity};
use super::forward::Shared;
use super::spool::{counter, now_ms, DeadLetter, Snapshot, Spool};
use crate::bus::{topics, Nats, Topic};
use crate::config::ExportConfig;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Most dead letters in the published status (the newest; all of them are
/// counted, and `iot-agent export status` lists them all): the document
/// must stay far below the local NATS' `max_payload`.
pub const PUBLISHED_DEAD_LETTERS: usize = 100;

/// The status document (also what `export status --json` prints).
pub fn document(
    cfg: &ExportConfig,
    snap: &Snapshot,
    rates: Option<(f64, f64)>,
    upstream: Value,
    capacity: &Capacity,
    dead: &[DeadLetter],
) -> Value {
    let oldest_age = snap
        .oldest_ms
        .map(|t| ((now_ms() - t).max(0) as f64) / 1000.0);
    json!({
        "spool": cfg.spool.path.path(),
        "at-ms": now_ms(),
        "backlog": {
            "messages": snap.messages,
            "bytes": snap.bytes,
            "oldest-age-s": oldest_age,
            "streams": snap.streams,
        },
        "limits": {
            "max-bytes": cfg.spool.max.bytes,
            "max-age": humantime::format_duration(cfg.spool.max.age.get()).to_string(),
            "full": cfg.spool.full.as_str(),
            "message": capacity.describe(),
        },
        "counters": snap.counters,
        "rates": rates.map(|(i, o)| json!({"in-per-s": round(i), "out-per-s": round(o)})),
        "upstream": upstream,
        "dead-letters": dead,
    })
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Publishes the status and expires old messages until cancelled.
pub async fn run(
    cfg: ExportConfig,
    spool_path: PathBuf,
    bus: Nats,
    shared: Arc<Shared>,
    capacity: SharedCapacity,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let spool = tokio::task::spawn_blocking(move || {
        Spool::open(&spool_path, super::spool::Durability::Relaxed)
    })
    .await??;
    let db = super::forward::Db::new(spool);
    let topic = Topic::fixed(topics::EXPORT_STATUS);
    let max_age = cfg.spool.max.age.get();
    let mut last: Option<(Instant, u64, u64)> = None;
    let mut tick = tokio::time::interval(
        cfg.status
            .interval
            .get()
            .max(std::time::Duration::from_millis(100)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let cutoff = now_ms() - max_age.as_millis() as i64;
        let expired = db.call(move |s| s.expire(cutoff)).await?;
        if expired > 0 {
            tracing::warn!(
                messages = expired,
                max_age = %humantime::format_duration(max_age),
                "export: messages expired unsent (export.spool.max.age)"
            );
        }
        let (snap, dead) = db
            .call(|s| Ok((s.snapshot()?, s.dead_letters(PUBLISHED_DEAD_LETTERS)?)))
            .await?;
        let now = Instant::now();
        let (inn, out) = (
            snap.counters[counter::RECEIVED],
            snap.counters[counter::FORWARDED],
        );
        let rates = last.map(|(t, i, o)| {
            let secs = now.duration_since(t).as_secs_f64().max(1e-3);
            (
                inn.saturating_sub(i) as f64 / secs,
                out.saturating_sub(o) as f64 / secs,
            )
        });
        last = Some((now, inn, out));
        let upstream = json!({
            "url": cfg.upstream.url.as_str(),
            "connected": shared.connected.load(Ordering::SeqCst),
            "error": shared.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        });
        let doc = document(&cfg, &snap, rates, upstream, &capacity.get(), &dead);
        let text = doc.to_string();
        let stored = text.clone();
        db.call(move |s| s.put_status(&stored)).await?;
        if let Err(e) = bus.publish(&topic, text.into()).await {
            tracing::debug!(error = %e, "export: cannot publish the status");
        }
    }
}
