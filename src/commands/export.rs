//! `iot-agent export send|status`.
//!
//! `send` writes straight into the spool with SQLite (the same transaction,
//! bounds and full policy as the daemon's intake) and returns once the
//! message is fsync'd: it works whether or not the daemon or NATS run, and
//! the daemon's forwarder picks the message up within a second.
//! `status` reads the spool read-only, so it is safe while the daemon runs.

use super::write_stdout;
use crate::bus::topics;
use crate::config::Config;
use crate::subsystems::export::capacity::Capacity;
use crate::subsystems::export::intake::MAX_PAYLOAD;
use crate::subsystems::export::spool::{Durability, NewMessage, Outcome, Spool};
use crate::subsystems::export::{limits, status};
use anyhow::Context;
use serde_json::{json, Value};
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

/// Where the data of `export send` comes from.
pub enum Data<'a> {
    /// The command-line argument itself.
    Arg(&'a str),
    /// The contents of a file.
    File(&'a Path),
    /// Everything read from standard input.
    Stdin,
}

/// Spools one message on `stream` (`iot-agent export send`); it is forwarded by the running agent.
pub fn send(config: &Config, stream: &str, data: Data) -> anyhow::Result<ExitCode> {
    for seg in stream.split('.') {
        topics::segment(seg).map_err(|e| anyhow::anyhow!("bad stream name {stream:?}: {e}"))?;
    }
    // The size to report when refusing (a file's whole length, though only
    // what can be accepted is read).
    let mut size = None;
    let payload = match data {
        Data::Arg(s) => s.as_bytes().to_vec(),
        Data::File(p) => {
            // Read no more than can be accepted: a huge file is refused,
            // not loaded.
            let mut b = Vec::new();
            let f =
                std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
            size = f.metadata().ok().map(|m| m.len() as usize);
            f.take(MAX_PAYLOAD as u64 + 1)
                .read_to_end(&mut b)
                .with_context(|| format!("cannot read {}", p.display()))?;
            b
        }
        Data::Stdin => {
            let mut b = Vec::new();
            std::io::stdin()
                .take(MAX_PAYLOAD as u64 + 1)
                .read_to_end(&mut b)
                .context("cannot read standard input")?;
            b
        }
    };
    let mut spool = Spool::open(config.export.spool.path.path(), Durability::Full)?;
    // The daemon's intake cap, with what the upstream said last (kept in
    // the spool by the forwarder): nothing spooled here can be refused by
    // the upstream for its size later.
    let capacity = Capacity::new(&config.export.upstream, spool.learned_capacity()?.as_ref());
    let size = size.unwrap_or(0).max(payload.len());
    if let Err(why) = capacity.check(stream, size) {
        eprintln!("iot-agent: refused: {why}");
        return Ok(ExitCode::FAILURE);
    }
    if !config.export.enabled {
        eprintln!(
            "warning: export.enabled is false: the message waits in the spool until export is enabled"
        );
    }
    let out = spool.insert_batch(&[NewMessage::new(stream, payload)], limits(config))?;
    match out.into_iter().next() {
        Some(Outcome::Spooled(seq)) => {
            write_stdout(&format!("spooled {stream} #{seq}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Outcome::Refused(why)) => {
            eprintln!("iot-agent: refused: {why}");
            Ok(ExitCode::FAILURE)
        }
        None => anyhow::bail!("the spool gave no answer"),
    }
}

/// Prints the spool's depth and the upstream's state (`iot-agent export status`).
pub fn status(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let spool = Spool::open_read_only(config.export.spool.path.path())?;
    let snap = spool.snapshot()?;
    let daemon: Option<Value> = match spool.status()? {
        None => None,
        Some(s) => match serde_json::from_str(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!(
                    "warning: the daemon's last status in the spool cannot be read ({e}): \
                     upstream state and rates are not shown"
                );
                None
            }
        },
    };
    let running = crate::control::running_daemon(config.data_dir()).is_some();
    let dead = spool
        .dead_letters(usize::MAX)
        .context("cannot list the dead letters")?;
    let capacity = Capacity::new(&config.export.upstream, spool.learned_capacity()?.as_ref());
    let mut doc = status::document(
        &config.export,
        &snap,
        None,
        daemon
            .as_ref()
            .map(|d| d["upstream"].clone())
            .unwrap_or(json!({"url": config.export.upstream.url.as_str()})),
        &capacity,
        &dead,
    );
    // Rates are measured by the daemon between two of its status rounds.
    doc["rates"] = daemon
        .as_ref()
        .map(|d| d["rates"].clone())
        .unwrap_or(Value::Null);
    doc["daemon"] = json!({
        "running": running,
        "enabled": config.export.enabled,
        "status-at-ms": daemon.as_ref().map(|d| d["at-ms"].clone()),
    });
    if as_json {
        return write_stdout(&(serde_json::to_string_pretty(&doc)? + "\n"));
    }
    let b = &doc["backlog"];
    let c = &doc["counters"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let mut out = format!(
        "spool:        {}\nbacklog:      {} messages, {} bytes\noldest:       {}\n",
        config.export.spool.path.path().display(),
        n(&b["messages"]),
        n(&b["bytes"]),
        b["oldest-age-s"]
            .as_f64()
            .map(|s| format!(
                "{} ago",
                humantime::format_duration(std::time::Duration::from_secs(s as u64))
            ))
            .unwrap_or_else(|| "-".into()),
    );
    if let Some(streams) = b["streams"].as_object() {
        for (s, v) in streams {
            out.push_str(&format!("  {s}: {}\n", n(v)));
        }
    }
    out.push_str(&format!(
        "limits:       {} bytes, {}, when full: {}\n",
        config.export.spool.max.bytes,
        humantime::format_duration(config.export.spool.max.age.get()),
        config.export.spool.full.as_str()
    ));
    let m = &doc["limits"]["message"];
    out.push_str(&format!(
        "max message:  {} bytes{} ({})\n",
        n(&m["max-bytes"]),
        if m["headers-counted"] == true {
            ", export headers included"
        } else {
            ""
        },
        m["source"].as_str().unwrap_or("-")
    ));
    out.push_str(&format!(
        "received:     {}\nforwarded:    {}\ndropped:      {} oldest ({} bytes), {} refused, {} expired\nresent:       {} ({} suppressed by the upstream)\n",
        n(&c["received"]),
        n(&c["forwarded"]),
        n(&c["dropped-oldest"]),
        n(&c["dropped-oldest-bytes"]),
        n(&c["refused"]),
        n(&c["expired"]),
        n(&c["resent"]),
        n(&c["duplicates-suppressed"]),
    ));
    let u = &doc["upstream"];
    out.push_str(&format!(
        "upstream:     {} ({})\n",
        u["url"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("not set"),
        match (running, u["connected"].as_bool()) {
            (false, _) => "daemon not running".to_string(),
            (true, Some(true)) => "connected".to_string(),
            (true, _) => format!(
                "not connected{}",
                u["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        }
    ));
    if let Some(r) = doc["rates"].as_object() {
        out.push_str(&format!(
            "rates:        {} in/s, {} out/s\n",
            r.get("in-per-s").cloned().unwrap_or(Value::Null),
            r.get("out-per-s").cloned().unwrap_or(Value::Null)
        ));
    }
    out.push_str(&format!(
        "dead letters: {} (refused for good by the upstream, not resent)\n",
        n(&c["dead-lettered"])
    ));
    for d in &dead {
        out.push_str(&format!(
            "  #{} {} {} bytes: {}\n",
            d.seq, d.stream, d.size, d.error
        ));
    }
    write_stdout(&out)
}
