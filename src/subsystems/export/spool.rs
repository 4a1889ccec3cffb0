//! The spool: messages on disk between intake and upstream, in SQLite (WAL).
//!
//! Durability: the intake's connection commits with `synchronous=FULL`, so a
//! commit returns only after the WAL is fsync'd; many producers' messages go
//! into one transaction (group commit, see `intake`), which is what makes
//! that affordable. The forwarder's connection uses `synchronous=NORMAL`:
//! losing one of its deletes in a power cut only means a message is sent
//! again, which the upstream de-duplicates (JetStream) or tolerates (MQTT).
//!
//! Order: `seq` (AUTOINCREMENT) orders everything; the forwarder reads in
//! `seq` order, so each stream's messages leave in the order they came.
//!
//! Bounds: `totals` keeps the spooled bytes, updated in the same transaction
//! as each insert and delete, so the byte bound and the full policy are
//! exact and hold across processes (`iot-agent export send` writes here too).

use crate::config::FullPolicy;
use crate::db::{self, DbError, Migration};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Counter names (the `counters` table, the status document).
pub mod counter {
    /// Messages accepted into the spool.
    pub const RECEIVED: &str = "received";
    /// Messages acknowledged by the upstream and removed.
    pub const FORWARDED: &str = "forwarded";
    /// Oldest messages deleted to make room (policy drop-oldest).
    pub const DROPPED_OLDEST: &str = "dropped-oldest";
    /// Their bytes.
    pub const DROPPED_OLDEST_BYTES: &str = "dropped-oldest-bytes";
    /// New messages refused because the spool was full (policy refuse-new)
    /// or the message alone exceeds the bound.
    pub const REFUSED: &str = "refused";
    /// Messages older than `export.spool.max.age`, deleted unsent.
    pub const EXPIRED: &str = "expired";
    /// Messages sent again after a failure or restart: the upstream may hold
    /// them twice unless it de-duplicates (MQTT cannot).
    pub const RESENT: &str = "resent";
    /// Re-sends JetStream recognised (`Nats-Msg-Id`) and did not store again.
    pub const DUPLICATES: &str = "duplicates-suppressed";
    /// Messages the upstream refused for good, moved to the dead letters.
    pub const DEAD_LETTERED: &str = "dead-lettered";
    /// Every counter, in the order the status prints them.
    pub const ALL: &[&str] = &[
        RECEIVED,
        FORWARDED,
        DROPPED_OLDEST,
        DROPPED_OLDEST_BYTES,
        REFUSED,
        EXPIRED,
        RESENT,
        DUPLICATES,
        DEAD_LETTERED,
    ];
}

/// Bound on SQLite's wait for another writer's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The spool's schema, applied by the shared runner (`crate::db`).
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "export/0001_spool.sql",
        sql: include_str!("../../../migrations/export/0001_spool.sql"),
    },
    Migration {
        version: 2,
        name: "export/0002_dead_letters.sql",
        sql: include_str!("../../../migrations/export/0002_dead_letters.sql"),
    },
];

/// One message the upstream refused for good.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeadLetter {
    /// The message's sequence number.
    pub seq: i64,
    /// Its stream.
    pub stream: String,
    /// When it was spooled, ms since the epoch.
    pub received_ms: i64,
    /// Its payload's size.
    pub size: u64,
    /// When it was refused, ms since the epoch.
    pub failed_ms: i64,
    /// The upstream's refusal.
    pub error: String,
}

/// What can go wrong with the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The file cannot be opened.
    #[error("cannot open the export spool {path}: {detail}")]
    Open {
        /// The spool file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Schema trouble (migration, a newer agent's file), with advice.
    #[error("export spool: {0}")]
    Schema(#[from] DbError),
    /// Any other SQLite error.
    #[error("export spool: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// How hard commits are pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit (intake: a producer's acknowledgement promises it).
    Full,
    /// fsync at checkpoints only (forwarder deletes: a lost delete is a resend).
    Relaxed,
}

/// A message on its way in.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The stream (a subject or topic suffix).
    pub stream: String,
    /// The payload, as given.
    pub payload: bytes::Bytes,
    /// When it arrived, ms since the epoch.
    pub received_ms: i64,
}

impl NewMessage {
    /// A message arriving now.
    pub fn new(stream: impl Into<String>, payload: impl Into<bytes::Bytes>) -> NewMessage {
        NewMessage {
            stream: stream.into(),
            payload: payload.into(),
            received_ms: now_ms(),
        }
    }
    /// What the message counts against `export.spool.max.bytes`.
    pub fn size(&self) -> u64 {
        (self.payload.len() + self.stream.len()) as u64
    }
}

/// What became of one message of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Spooled under this sequence number.
    Spooled(i64),
    /// Refused, with why.
    Refused(String),
}

/// The byte bound and what to do when it is reached.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `export.spool.max.bytes`.
    pub max_bytes: u64,
    /// `export.spool.full`.
    pub policy: FullPolicy,
}

/// A spooled message, as the forwarder reads it.
#[derive(Debug, Clone)]
pub struct Row {
    /// The sequence number.
    pub seq: i64,
    /// The stream.
    pub stream: String,
    /// When it was spooled, ms since the epoch.
    pub received_ms: i64,
    /// The payload.
    pub payload: bytes::Bytes,
}

/// The spool's state at one moment.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Snapshot {
    /// Messages spooled.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// `received_ms` of the oldest spooled message.
    pub oldest_ms: Option<i64>,
    /// Backlog per stream.
    pub streams: BTreeMap<String, u64>,
    /// The counters ([`counter::ALL`]), by name.
    pub counters: BTreeMap<String, u64>,
}

/// The store-and-forward spool (SQLite): what producers were told is kept, until the upstream acknowledged it.
pub struct Spool {
    conn: Connection,
    id: String,
    path: PathBuf,
}

pub use crate::clock::now_ms;

impl Spool {
    /// Opens (creating it, 0600, with its directory) and migrates the spool.
    pub fn open(path: &Path, durability: Durability) -> Result<Spool, SpoolError> {
        let open_err = |detail: String| SpoolError::Open {
            path: path.to_path_buf(),
            detail,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_err(format!("creating {dir:?}: {e}")))?;
        }
        // Telemetry can be sensitive: 0600 before SQLite opens it (it gives
        // -wal/-shm the same mode), also when it existed with another mode.
        crate::fsutil::make_private_file(path)
            .map_err(|e| open_err(format!("making it private (0600): {e}")))?;
        let conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| open_err(e.to_string()))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(format!(
                "cannot switch to WAL (journal mode {mode})"
            )));
        }
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Relaxed => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        db::migrate(&conn, path, MIGRATIONS)?;
        Spool::finish(conn, path)
    }

    /// Opens an existing spool without writing to it (the status command,
    /// while the daemon runs).
    pub fn open_read_only(path: &Path) -> Result<Spool, SpoolError> {
        let open_err = |detail: String| SpoolError::Open {
            path: path.to_path_buf(),
            detail,
        };
        if !path.exists() {
            return Err(open_err(
                "it does not exist (the agent creates it when export.enabled is true)".into(),
            ));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let found = db::user_version(&conn)?;
        let known = db::latest(MIGRATIONS);
        if found != known {
            return Err(DbError::TooNew {
                path: path.to_path_buf(),
                found,
                known,
            }
            .into());
        }
        Spool::finish(conn, path)
    }

    fn finish(conn: Connection, path: &Path) -> Result<Spool, SpoolError> {
        let id: String =
            conn.query_row("SELECT value FROM meta WHERE key = 'spool-id'", [], |r| {
                r.get(0)
            })?;
        Ok(Spool {
            conn,
            id,
            path: path.to_path_buf(),
        })
    }

    /// The random id of this spool; upstream message ids are `{id}-{seq}`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The spool file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores a batch in ONE transaction (one fsync for all of them),
    /// applying the byte bound and the full policy message by message.
    pub fn insert_batch(
        &mut self,
        batch: &[NewMessage],
        limits: Limits,
    ) -> Result<Vec<Outcome>, SpoolError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (mut count, mut total): (i64, i64) =
            tx.query_row("SELECT messages, bytes FROM totals", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let max = limits.max_bytes as i64;
        let (mut received, mut refused, mut dropped, mut dropped_bytes) = (0u64, 0u64, 0u64, 0i64);
        let mut out = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO messages (stream, received_ms, size, payload) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut oldest = tx.prepare_cached(
                "SELECT seq, size FROM messages WHERE seq > ?1 ORDER BY seq LIMIT 256",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM messages WHERE seq <= ?1")?;
            for m in batch {
                let size = m.size() as i64;
                if size > max {
                    refused += 1;
                    out.push(Outcome::Refused(format!(
                        "message of {size} bytes exceeds the whole spool (export.spool.max.bytes = {max})"
                    )));
                    continue;
                }
                if total + size > max {
                    match limits.policy {
                        FullPolicy::RefuseNew => {
                            refused += 1;
                            out.push(Outcome::Refused(format!(
                                "export spool full ({total} of {max} bytes, {count} messages \
                                 waiting for the upstream); policy refuse-new"
                            )));
                            continue;
                        }
                        FullPolicy::DropOldest => {
                            // Free the oldest rows until the new one fits.
                            let mut through = 0i64;
                            while total + size > max {
                                let rows: Vec<(i64, i64)> = oldest
                                    .query_map([through], |r| Ok((r.get(0)?, r.get(1)?)))?
                                    .collect::<Result<_, _>>()?;
                                if rows.is_empty() {
                                    break;
                                }
                                for (seq, sz) in rows {
                                    if total + size <= max {
                                        break;
                                    }
                                    through = seq;
                                    total -= sz;
                                    count -= 1;
                                    dropped += 1;
                                    dropped_bytes += sz;
                                }
                            }
                            delete.execute([through])?;
                        }
                    }
                }
                insert.execute(params![m.stream, m.received_ms, size, &m.payload[..]])?;
                total += size;
                count += 1;
                received += 1;
                out.push(Outcome::Spooled(tx.last_insert_rowid()));
            }
        }
        tx.execute(
            "UPDATE totals SET messages = ?1, bytes = ?2",
            params![count, total],
        )?;
        add_counters(
            &tx,
            &[
                (counter::RECEIVED, received),
                (counter::REFUSED, refused),
                (counter::DROPPED_OLDEST, dropped),
                (counter::DROPPED_OLDEST_BYTES, dropped_bytes as u64),
            ],
        )?;
        tx.commit()?;
        Ok(out)
    }

    /// Up to `limit` messages after `after`, in order.
    pub fn read_after(&self, after: i64, limit: usize) -> Result<Vec<Row>, SpoolError> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, stream, received_ms, payload FROM messages WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = st
            .query_map(params![after, limit as i64], |r| {
                Ok(Row {
                    seq: r.get(0)?,
                    stream: r.get(1)?,
                    received_ms: r.get(2)?,
                    payload: bytes::Bytes::from(r.get::<_, Vec<u8>>(3)?),
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Records that messages up to `seq` may have reached the upstream
    /// (before they are sent): after a crash, sending them again is counted
    /// as a possible duplicate.
    /// `resent` of them were sent before (counted now, before they go out,
    /// so a crash cannot lose the count: it is an upper bound).
    pub fn mark_sent(&mut self, seq: i64, resent: u64) -> Result<(), SpoolError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "UPDATE meta SET value = CAST(max(CAST(value AS INTEGER), ?1) AS TEXT) WHERE key = 'sent-through'",
            [seq],
        )?;
        add_counters(&tx, &[(counter::RESENT, resent)])?;
        tx.commit()?;
        Ok(())
    }

    /// The highest sequence the upstream acknowledged.
    pub fn sent_through(&self) -> Result<i64, SpoolError> {
        let v: String = self.conn.query_row(
            "SELECT value FROM meta WHERE key = 'sent-through'",
            [],
            |r| r.get(0),
        )?;
        Ok(v.parse().unwrap_or(0))
    }

    /// Removes the acknowledged messages `first..=last` (all of that range
    /// still in the spool was sent: newer messages get higher numbers) and
    /// counts them.
    pub fn remove_acked(
        &mut self,
        first: i64,
        last: i64,
        acked: u64,
        duplicates: u64,
    ) -> Result<u64, SpoolError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (removed, largest) = delete_range_sized(&tx, first, last)?;
        if largest > 0 {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('largest-acked', ?1) \
                 ON CONFLICT(key) DO UPDATE SET value = \
                 CAST(max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER)) AS TEXT)",
                [largest.to_string()],
            )?;
        }
        add_counters(
            &tx,
            &[
                (counter::FORWARDED, acked),
                (counter::DUPLICATES, duplicates),
            ],
        )?;
        tx.commit()?;
        Ok(removed)
    }

    /// The size of the largest message the upstream ever acknowledged from
    /// this spool (0: none yet). A message that kills the connection again
    /// and again is taken for one over the broker's size limit only when it
    /// is larger than this (see `forward`).
    pub fn largest_acked(&self) -> Result<u64, SpoolError> {
        Ok(self
            .meta("largest-acked")?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// What the upstream last said about its size limit.
    pub fn learned_capacity(&self) -> Result<Option<super::capacity::Learned>, SpoolError> {
        Ok(self
            .meta("upstream-capacity")?
            .and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Records the capacity learned from the upstream's refusals.
    pub fn put_learned_capacity(
        &mut self,
        learned: &super::capacity::Learned,
    ) -> Result<(), SpoolError> {
        let doc = serde_json::to_string(learned).unwrap_or_default();
        self.set_meta("upstream-capacity", &doc)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, SpoolError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), SpoolError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    /// Moves message `seq` (refused for good by the upstream) out of the
    /// spool into the dead letters, in one transaction, and counts it: the
    /// next session starts after it and the rest flows in order.
    pub fn dead_letter(&mut self, seq: i64, error: &str) -> Result<u64, SpoolError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let copied = tx.execute(
            "INSERT OR REPLACE INTO dead_letters (seq, stream, received_ms, size, payload, failed_ms, error) \
             SELECT seq, stream, received_ms, size, payload, ?2, ?3 FROM messages WHERE seq = ?1",
            params![seq, now_ms(), error],
        )?;
        let n = delete_range(&tx, seq, seq)?;
        add_counters(&tx, &[(counter::DEAD_LETTERED, copied as u64)])?;
        tx.commit()?;
        Ok(n)
    }

    /// The newest `limit` dead letters, oldest first (without their
    /// payloads).
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        let mut st = self.conn.prepare_cached(
            "SELECT * FROM (SELECT seq, stream, received_ms, size, failed_ms, error \
             FROM dead_letters ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
        )?;
        let rows = st
            .query_map([limit.min(i64::MAX as usize) as i64], |r| {
                Ok(DeadLetter {
                    seq: r.get(0)?,
                    stream: r.get(1)?,
                    received_ms: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    failed_ms: r.get(4)?,
                    error: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Deletes messages received before `cutoff_ms`, oldest first, stopping
    /// at the first younger one. Returns how many were expired.
    pub fn expire(&mut self, cutoff_ms: i64) -> Result<u64, SpoolError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut through = 0i64;
        let mut first = None;
        {
            let mut st = tx.prepare_cached(
                "SELECT seq, received_ms FROM messages WHERE seq > ?1 ORDER BY seq LIMIT 512",
            )?;
            'scan: loop {
                let rows: Vec<(i64, i64)> = st
                    .query_map([through], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                if rows.is_empty() {
                    break;
                }
                for (seq, at) in rows {
                    if at >= cutoff_ms {
                        break 'scan;
                    }
                    first.get_or_insert(seq);
                    through = seq;
                }
            }
        }
        let Some(first) = first else {
            return Ok(0);
        };
        let n = delete_range(&tx, first, through)?;
        add_counters(&tx, &[(counter::EXPIRED, n)])?;
        tx.commit()?;
        Ok(n)
    }

    /// Spooled messages and bytes (cheap: the running totals).
    pub fn backlog(&self) -> Result<(u64, u64), SpoolError> {
        let (m, b): (i64, i64) =
            self.conn
                .query_row("SELECT messages, bytes FROM totals", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        Ok((m as u64, b as u64))
    }

    /// Totals, oldest message, per-stream backlog and counters.
    pub fn snapshot(&self) -> Result<Snapshot, SpoolError> {
        let (messages, bytes): (i64, i64) =
            self.conn
                .query_row("SELECT messages, bytes FROM totals", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        let oldest_ms = self
            .conn
            .query_row(
                "SELECT received_ms FROM messages ORDER BY seq LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let mut streams = BTreeMap::new();
        let mut st = self
            .conn
            .prepare_cached("SELECT stream, count(*) FROM messages GROUP BY stream")?;
        for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (s, n) = r?;
            streams.insert(s, n as u64);
        }
        let mut counters: BTreeMap<String, u64> =
            counter::ALL.iter().map(|c| (c.to_string(), 0)).collect();
        let mut st = self
            .conn
            .prepare_cached("SELECT name, value FROM counters")?;
        for r in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
            let (k, v) = r?;
            counters.insert(k, v as u64);
        }
        Ok(Snapshot {
            messages: messages as u64,
            bytes: bytes as u64,
            oldest_ms,
            streams,
            counters,
        })
    }

    /// Stores the daemon's last status document (rates, upstream state) for
    /// `iot-agent export status`.
    pub fn put_status(&mut self, doc: &str) -> Result<(), SpoolError> {
        self.set_meta("status", doc)
    }

    /// The forwarder's last status document, for `export status`.
    pub fn status(&self) -> Result<Option<String>, SpoolError> {
        self.meta("status")
    }
}

fn delete_range(tx: &rusqlite::Transaction, first: i64, last: i64) -> Result<u64, SpoolError> {
    delete_range_sized(tx, first, last).map(|(n, _)| n)
}

/// Deletes `first..=last`; returns how many and the largest size.
fn delete_range_sized(
    tx: &rusqlite::Transaction,
    first: i64,
    last: i64,
) -> Result<(u64, i64), SpoolError> {
    let (n, bytes, largest): (i64, i64, i64) = {
        let mut st =
            tx.prepare_cached("DELETE FROM messages WHERE seq BETWEEN ?1 AND ?2 RETURNING size")?;
        let sizes: Vec<i64> = st
            .query_map([first, last], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        (
            sizes.len() as i64,
            sizes.iter().sum(),
            sizes.iter().copied().max().unwrap_or(0),
        )
    };
    if n > 0 {
        tx.execute(
            "UPDATE totals SET messages = messages - ?1, bytes = bytes - ?2",
            [n, bytes],
        )?;
    }
    Ok((n as u64, largest))
}

fn add_counters(tx: &rusqlite::Transaction, adds: &[(&str, u64)]) -> Result<(), SpoolError> {
    let mut st = tx.prepare_cached(
        "INSERT INTO counters (name, value) VALUES (?1, ?2) \
         ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
    )?;
    for (name, v) in adds.iter().filter(|(_, v)| *v > 0) {
        st.execute(params![name, *v as i64])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> Spool {
        Spool::open(&dir.path().join("s/export.db"), Durability::Full).unwrap()
    }

    fn msg(stream: &str, n: usize) -> NewMessage {
        NewMessage::new(stream, vec![b'x'; n])
    }

    fn lim(max_bytes: u64, policy: FullPolicy) -> Limits {
        Limits { max_bytes, policy }
    }

    #[test]
    fn batches_keep_order_and_totals() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(&d);
        let out = s
            .insert_batch(
                &[msg("a", 10), msg("b", 10), msg("a", 10)],
                lim(1000, FullPolicy::RefuseNew),
            )
            .unwrap();
        assert_eq!(
            out,
            vec![
                Outcome::Spooled(1),
                Outcome::Spooled(2),
                Outcome::Spooled(3)
            ]
        );
        let rows = s.read_after(0, 10).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let snap = s.snapshot().unwrap();
        assert_eq!((snap.messages, snap.bytes), (3, 33));
        assert_eq!(snap.streams["a"], 2);
        assert_eq!(s.remove_acked(1, 2, 2, 0).unwrap(), 2);
        let snap = s.snapshot().unwrap();
        assert_eq!((snap.messages, snap.bytes), (1, 11));
        assert_eq!(snap.counters[counter::FORWARDED], 2);
        // Numbers are never reused, even after the newest row is deleted.
        s.remove_acked(3, 3, 1, 0).unwrap();
        let out = s
            .insert_batch(&[msg("a", 1)], lim(1000, FullPolicy::RefuseNew))
            .unwrap();
        assert_eq!(out, vec![Outcome::Spooled(4)]);
    }

    #[test]
    fn refuse_new_refuses_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(&d);
        let l = lim(25, FullPolicy::RefuseNew);
        let out = s
            .insert_batch(&[msg("a", 9), msg("a", 9), msg("a", 9)], l)
            .unwrap();
        assert!(matches!(out[2], Outcome::Refused(ref why) if why.contains("full")));
        let out = s.insert_batch(&[msg("a", 100)], l).unwrap();
        assert!(matches!(out[0], Outcome::Refused(ref why) if why.contains("exceeds")));
        let snap = s.snapshot().unwrap();
        assert_eq!(snap.messages, 2);
        assert_eq!(snap.counters[counter::REFUSED], 2);
    }

    #[test]
    fn drop_oldest_makes_room_and_counts() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(&d);
        let l = lim(30, FullPolicy::DropOldest);
        for _ in 0..5 {
            s.insert_batch(&[msg("a", 9)], l).unwrap();
        }
        let snap = s.snapshot().unwrap();
        assert_eq!((snap.messages, snap.bytes), (3, 30));
        assert_eq!(snap.counters[counter::DROPPED_OLDEST], 2);
        assert_eq!(snap.counters[counter::DROPPED_OLDEST_BYTES], 20);
        let seqs: Vec<i64> = s.read_after(0, 10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![3, 4, 5]);
    }

    #[test]
    fn expiry_removes_old_messages_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(&d);
        let mut old = msg("a", 1);
        old.received_ms = 1000;
        s.insert_batch(
            &[old.clone(), old, msg("a", 1)],
            lim(100, FullPolicy::DropOldest),
        )
        .unwrap();
        assert_eq!(s.expire(now_ms() - 60_000).unwrap(), 2);
        let snap = s.snapshot().unwrap();
        assert_eq!((snap.messages, snap.counters[counter::EXPIRED]), (1, 2));
        assert_eq!(s.expire(now_ms() - 60_000).unwrap(), 0);
    }

    #[test]
    fn the_largest_acknowledged_size_and_the_newest_dead_letters_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(&d);
        let l = lim(10_000, FullPolicy::RefuseNew);
        s.insert_batch(&[msg("a", 10), msg("a", 300), msg("a", 20)], l)
            .unwrap();
        assert_eq!(s.largest_acked().unwrap(), 0);
        s.remove_acked(1, 2, 2, 0).unwrap();
        assert_eq!(s.largest_acked().unwrap(), 301);
        // A smaller one later does not lower it.
        s.remove_acked(3, 3, 1, 0).unwrap();
        assert_eq!(s.largest_acked().unwrap(), 301);
        s.insert_batch(&[msg("a", 1), msg("b", 2), msg("c", 3)], l)
            .unwrap();
        for seq in 4..=6 {
            s.dead_letter(seq, "too large").unwrap();
        }
        let newest: Vec<i64> = s.dead_letters(2).unwrap().iter().map(|d| d.seq).collect();
        assert_eq!(newest, vec![5, 6]);
        assert_eq!(s.dead_letters(usize::MAX).unwrap().len(), 3);
        assert_eq!(s.snapshot().unwrap().counters[counter::DEAD_LETTERED], 3);
        assert_eq!(s.backlog().unwrap(), (0, 0));
    }

    #[test]
    fn reopening_keeps_id_and_data_and_read_only_reads() {
        let d = tempfile::tempdir().unwrap();
        let id = {
            let mut s = open(&d);
            s.insert_batch(&[msg("a", 3)], lim(100, FullPolicy::DropOldest))
                .unwrap();
            s.mark_sent(1, 0).unwrap();
            s.id().to_string()
        };
        assert_eq!(id.len(), 16);
        let s = open(&d);
        assert_eq!(s.id(), id);
        assert_eq!(s.sent_through().unwrap(), 1);
        let ro = Spool::open_read_only(&d.path().join("s/export.db")).unwrap();
        assert_eq!(ro.snapshot().unwrap().messages, 1);
        assert!(Spool::open_read_only(&d.path().join("none.db")).is_err());
    }
}
