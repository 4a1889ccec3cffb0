//! The required-install queue in SQLite: a request is stored (in one
//! transaction with its snaps) before anything acknowledges it, and stays
//! until its result is final, so a restart or reboot resumes it.

use super::request::RequiredInstall;
use crate::db::{self, DbError, Migration};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The queue's schema, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "required/0001_required.sql",
    sql: include_str!("../../../migrations/required/0001_required.sql"),
}];

/// The durable queue of per-serial requests (SQLite).
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// What storing a request found.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Queued now.
    New,
    /// Already queued and not done: nothing to do.
    Pending,
    /// Already done: its result, to send again.
    Done(String),
}

/// A queued request with its snaps.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The request's id.
    pub id: String,
    /// The topic to answer on.
    pub topic: String,
    /// Tries so far.
    pub attempts: u32,
    /// Its snaps.
    pub snaps: Vec<SnapRow>,
}

/// One snap of a queued request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapRow {
    /// The snap.
    pub name: String,
    /// The channel.
    pub channel: String,
    /// Where its install stands (`pending` when queued).
    pub status: String,
    /// snapd's change, once started.
    pub change: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

impl Store {
    /// Opens (or creates) the queue and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, DbError> {
        let conn = db::open(path, MIGRATIONS)?;
        // A stored request is acknowledged to the DMS: it must survive a
        // power cut too, so every commit is fsync'd (WAL's NORMAL is not).
        conn.pragma_update(None, "synchronous", "full")
            .map_err(|e| DbError::classify(path, e))?;
        Ok(Store {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self, e: rusqlite::Error) -> DbError {
        DbError::classify(&self.path, e)
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).map_err(|e| self.err(e))
    }

    /// Queues a request, or says it is already known.
    pub fn add(&self, req: &RequiredInstall, topic: &str, now: &str) -> Result<Added, DbError> {
        self.with(|c| {
            // IMMEDIATE: the write lock at BEGIN, under the busy timeout. A
            // deferred one reads first and, finding another writer when it
            // upgrades, fails at once with "database is locked".
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing: Option<(String, Option<String>)> = tx
                .query_row(
                    "SELECT state, result FROM requirements WHERE id = ?1",
                    [&req.id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((state, result)) = existing {
                return Ok(match (state.as_str(), result) {
                    ("done", Some(r)) => Added::Done(r),
                    _ => Added::Pending,
                });
            }
            tx.execute(
                "INSERT INTO requirements (id, received, topic, state) VALUES (?1, ?2, ?3, 'pending')",
                params![req.id, now, topic],
            )?;
            for (i, s) in req.snaps.iter().enumerate() {
                tx.execute(
                    "INSERT INTO required_snaps (requirement, position, name, channel, status) VALUES (?1, ?2, ?3, ?4, 'pending')",
                    params![req.id, i as i64, s.name.as_str(), s.channel],
                )?;
            }
            tx.commit()?;
            Ok(Added::New)
        })
    }

    /// Pending requests whose next attempt is due at `now` (unix seconds).
    pub fn due(&self, now: i64) -> Result<Vec<Pending>, DbError> {
        self.with(|c| {
            let mut q = c.prepare(
                "SELECT id, topic, attempts FROM requirements WHERE state = 'pending' AND next_attempt <= ?1 ORDER BY received, id",
            )?;
            let reqs: Vec<(String, String, u32)> = q
                .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            let mut snaps_q = c.prepare(
                "SELECT name, channel, status, change, error FROM required_snaps WHERE requirement = ?1 ORDER BY position",
            )?;
            let mut out = Vec::new();
            for (id, topic, attempts) in reqs {
                let snaps = snaps_q
                    .query_map([&id], |r| {
                        Ok(SnapRow {
                            name: r.get(0)?,
                            channel: r.get(1)?,
                            status: r.get(2)?,
                            change: r.get(3)?,
                            error: r.get(4)?,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                out.push(Pending {
                    id,
                    topic,
                    attempts,
                    snaps,
                });
            }
            Ok(out)
        })
    }

    /// The earliest next attempt of any pending request.
    pub fn next_due(&self) -> Result<Option<i64>, DbError> {
        self.with(|c| {
            c.query_row(
                "SELECT MIN(next_attempt) FROM requirements WHERE state = 'pending'",
                [],
                |r| r.get(0),
            )
        })
    }

    /// Records a snap's progress.
    pub fn set_snap(&self, req: &str, s: &SnapRow) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE required_snaps SET status = ?3, change = ?4, error = ?5 WHERE requirement = ?1 AND name = ?2",
                params![req, s.name, s.status, s.change, s.error],
            )
            .map(drop)
        })
    }

    /// Puts a request back to try again at `at` (unix seconds).
    pub fn retry_later(&self, req: &str, attempts: u32, at: i64) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE requirements SET attempts = ?2, next_attempt = ?3 WHERE id = ?1",
                params![req, attempts, at],
            )
            .map(drop)
        })
    }

    /// Records a request's final result.
    pub fn finish(&self, req: &str, result: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE requirements SET state = 'done', result = ?2 WHERE id = ?1",
                params![req, result],
            )
            .map(drop)
        })
    }
}
