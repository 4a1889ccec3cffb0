//! The change history in SQLite: what was seen, what became ready, what is
//! kept, and the watchdog's memory of the reboots it caused.
//!
//! The database is the memory of the history: a change is "new" when the
//! file does not have it, so an agent restart (or a snapd restart) neither
//! logs a change twice nor skips one that snapd still has.

use crate::clock;
use crate::db::{self, DbError, Migration};
use crate::snapd::Change;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The schema of the history database, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "changes/0001_history.sql",
        sql: include_str!("../../../migrations/changes/0001_history.sql"),
    },
    Migration {
        version: 2,
        name: "changes/0002_watchdog.sql",
        sql: include_str!("../../../migrations/changes/0002_watchdog.sql"),
    },
];

/// Rows in the order "newest first": by spawn time, then by id as a number.
const NEWEST_FIRST: &str = "spawn_ns DESC, CAST(id AS INTEGER) DESC, id DESC";

/// The change history (SQLite): what snapd did, kept after snapd forgets it.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

/// What one snapshot did to the history.
#[derive(Debug, Default)]
pub struct Applied {
    /// Changes stored for the first time (and kept).
    pub new: Vec<Change>,
    /// Changes stored before while not ready, ready now.
    pub became_ready: Vec<Change>,
    /// Rows removed to stay within the keep limit.
    pub pruned: usize,
}

/// One stored change, as the CLI shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Stored {
    /// snapd's change id.
    pub id: String,
    /// The change's kind.
    pub kind: String,
    /// What it did.
    pub summary: String,
    /// Its status when last seen.
    pub status: String,
    /// Whether it was over.
    pub ready: bool,
    /// When it was spawned (RFC 3339).
    #[serde(rename = "spawn-time")]
    pub spawn_time: String,
    /// The same, Unix ns (for ordering).
    #[serde(skip)]
    pub spawn_ns: i64,
    /// When it became ready.
    #[serde(rename = "ready-time")]
    pub ready_time: Option<String>,
    /// Why it failed.
    pub err: Option<String>,
    /// When the agent first saw it (RFC 3339).
    #[serde(rename = "first-seen")]
    pub first_seen: String,
    /// The change as snapd rendered it, tasks included.
    #[serde(skip)]
    pub body: String,
}

impl Stored {
    /// The stored body as snapd's change (tasks included).
    pub fn change(&self) -> Option<Change> {
        serde_json::from_str(&self.body).ok()
    }
}

/// Filters of `iot-agent changes`.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Any of these statuses (case-insensitive); empty: all.
    pub statuses: Vec<String>,
    /// Any of these kinds; empty: all.
    pub kinds: Vec<String>,
    /// Spawned at or after (Unix nanoseconds).
    pub since_ns: Option<i64>,
}

/// A reboot the watchdog caused.
#[derive(Debug, Clone, PartialEq)]
pub struct RebootRecord {
    /// The stuck change.
    pub change_id: String,
    /// Its kind.
    pub kind: String,
    /// What it did.
    pub summary: String,
    /// When it was spawned.
    pub spawn_time: String,
    /// What the watchdog logged about it.
    pub report: String,
    /// When the reboot was decided (Unix ns, the watchdog's clock).
    pub at_ns: i64,
}

impl Store {
    /// Opens the history for writing, upgrading its schema.
    pub fn open(path: &Path) -> Result<Store, DbError> {
        Ok(Store {
            conn: db::open(path, MIGRATIONS)?,
            path: path.to_path_buf(),
        })
    }

    /// Opens the history for the watchdog: every commit with
    /// `synchronous=FULL`, so the memory of a reboot is on disk before the
    /// reboot is asked for (WAL's `normal` may lose the last commits in a
    /// power cut, and a hardware watchdog reset is one).
    pub fn open_durable(path: &Path) -> Result<Store, DbError> {
        let s = Store::open(path)?;
        s.conn
            .pragma_update(None, "synchronous", "full")
            .map_err(|e| s.err(e))?;
        Ok(s)
    }

    /// The connection's `synchronous` setting (0 off, 1 normal, 2 full).
    pub fn synchronous(&self) -> Result<i64, DbError> {
        self.conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Opens the history read-only (the CLI, while the daemon writes).
    pub fn open_read_only(path: &Path) -> Result<Store, DbError> {
        Ok(Store {
            conn: db::open_read_only(path, MIGRATIONS)?,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: rusqlite::Error) -> DbError {
        DbError::classify(&self.path, e)
    }

    /// Stores a snapshot of snapd's changes in one transaction and keeps at
    /// most `keep` changes, the oldest (by spawn time) removed first. A
    /// change older than everything kept in a full history is not stored.
    pub fn apply(&mut self, changes: &[Change], keep: u32) -> Result<Applied, DbError> {
        let path = self.path.clone();
        let err = |e| DbError::classify(&path, e);
        let now = clock::now_rfc3339();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let mut applied = Applied::default();
        let mut inserted = Vec::new();
        {
            let mut find = tx
                .prepare_cached("SELECT ready, body FROM changes WHERE id = ?1")
                .map_err(err)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO changes (id, kind, summary, status, ready, spawn_time, spawn_ns, \
                     ready_time, err, body, first_seen, updated) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)",
                )
                .map_err(err)?;
            let mut update = tx
                .prepare_cached(
                    "UPDATE changes SET kind = ?2, summary = ?3, status = ?4, ready = ?5, \
                     ready_time = ?6, err = ?7, body = ?8, updated = ?9 WHERE id = ?1",
                )
                .map_err(err)?;
            for c in changes {
                let body = serde_json::to_string(c).unwrap_or_default();
                let status = status_name(c);
                let stored: Option<(bool, String)> = find
                    .query_row([&c.id], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .map_err(err)?;
                match stored {
                    None => {
                        let spawn_ns = clock::parse_ns(&c.spawn_time).unwrap_or(0);
                        insert
                            .execute(params![
                                c.id,
                                c.kind,
                                c.summary,
                                status,
                                c.ready,
                                c.spawn_time,
                                spawn_ns,
                                c.ready_time,
                                c.err,
                                body,
                                now
                            ])
                            .map_err(err)?;
                        inserted.push(c);
                    }
                    Some((_, old_body)) if old_body == body => {}
                    Some((was_ready, _)) => {
                        update
                            .execute(params![
                                c.id,
                                c.kind,
                                c.summary,
                                status,
                                c.ready,
                                c.ready_time,
                                c.err,
                                body,
                                now
                            ])
                            .map_err(err)?;
                        if c.ready && !was_ready {
                            applied.became_ready.push(c.clone());
                        }
                    }
                }
            }
        }
        applied.pruned = tx
            .execute(
                &format!(
                    "DELETE FROM changes WHERE id IN \
                     (SELECT id FROM changes ORDER BY {NEWEST_FIRST} LIMIT -1 OFFSET ?1)"
                ),
                [keep],
            )
            .map_err(err)?;
        if applied.pruned > 0 {
            // Only what survived the limit counts as stored.
            let mut exists = tx
                .prepare_cached("SELECT 1 FROM changes WHERE id = ?1")
                .map_err(err)?;
            for c in inserted {
                if exists.exists([&c.id]).map_err(err)? {
                    applied.new.push(c.clone());
                }
            }
        } else {
            applied.new = inserted.into_iter().cloned().collect();
        }
        tx.commit().map_err(err)?;
        Ok(applied)
    }

    /// The stored changes matching `filter`, oldest first (like `snap changes`).
    pub fn list(&self, filter: &Filter) -> Result<Vec<Stored>, DbError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT id, kind, summary, status, ready, spawn_time, spawn_ns, ready_time, err, \
                 first_seen, body FROM changes WHERE spawn_ns >= ?1 ORDER BY {NEWEST_FIRST}"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([filter.since_ns.unwrap_or(i64::MIN)], row_to_stored)
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in rows {
            let s = r.map_err(|e| self.err(e))?;
            let status_ok = filter.statuses.is_empty()
                || filter
                    .statuses
                    .iter()
                    .any(|f| f.eq_ignore_ascii_case(&s.status));
            let kind_ok = filter.kinds.is_empty() || filter.kinds.contains(&s.kind);
            if status_ok && kind_ok {
                out.push(s);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// One stored change.
    pub fn get(&self, id: &str) -> Result<Option<Stored>, DbError> {
        self.conn
            .query_row(
                "SELECT id, kind, summary, status, ready, spawn_time, spawn_ns, ready_time, err, \
                 first_seen, body FROM changes WHERE id = ?1",
                [id],
                row_to_stored,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// How many changes are stored.
    pub fn count(&self) -> Result<u64, DbError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM changes", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(|e| self.err(e))
    }

    /// Whether this change already caused a reboot.
    pub fn rebooted_for(&self, change_id: &str) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("SELECT 1 FROM watchdog_reboots WHERE change_id = ?1")
            .and_then(|mut s| s.exists([change_id]))
            .map_err(|e| self.err(e))
    }

    /// Every remembered reboot: change id and when (Unix ns; a time that
    /// does not parse counts as now, inside any window).
    pub fn reboot_times(&self) -> Result<Vec<(String, i64)>, DbError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT change_id, triggered_at FROM watchdog_reboots")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at) = row.map_err(|e| self.err(e))?;
            out.push((id, clock::parse_ns(&at).unwrap_or_else(clock::now_ns)));
        }
        Ok(out)
    }

    /// Remembers that this change caused a reboot (durably: committed
    /// before the reboot is asked for).
    pub fn record_reboot(&self, r: &RebootRecord) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO watchdog_reboots \
                 (change_id, kind, summary, spawn_time, triggered_at, report) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    r.change_id,
                    r.kind,
                    r.summary,
                    r.spawn_time,
                    clock::format_ns(r.at_ns),
                    r.report
                ],
            )
            .map(drop)
            .map_err(|e| self.err(e))
    }
}

/// snapd's spelling of a status (`Doing`), kept as text in the database.
pub fn status_name(c: &Change) -> String {
    serde_json::to_value(c.status)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

fn row_to_stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<Stored> {
    Ok(Stored {
        id: r.get(0)?,
        kind: r.get(1)?,
        summary: r.get(2)?,
        status: r.get(3)?,
        ready: r.get(4)?,
        spawn_time: r.get(5)?,
        spawn_ns: r.get(6)?,
        ready_time: r.get(7)?,
        err: r.get(8)?,
        first_seen: r.get(9)?,
        body: r.get(10)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(id: &str, status: &str, ready: bool, spawn_s: u32) -> Change {
        serde_json::from_value(json!({
            "id": id, "kind": "install-snap", "summary": format!("change {id}"),
            "status": status, "ready": ready,
            "spawn-time": format!("2026-11-21T05:00:{:02}Z", spawn_s),
            "tasks": [{"id": "1", "kind": "k", "summary": "t", "status": status,
                       "progress": {"label": "", "done": 0, "total": 1},
                       "spawn-time": "2026-11-21T05:00:00Z", "future-field": 1}]
        }))
        .unwrap()
    }

    fn ids(v: &[Change]) -> Vec<&str> {
        v.iter().map(|c| c.id.as_str()).collect()
    }

    #[test]
    fn new_and_ready_changes_are_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("h.db")).unwrap();
        let a = s
            .apply(
                &[change("1", "Done", true, 1), change("2", "Doing", false, 2)],
                10,
            )
            .unwrap();
        assert_eq!(ids(&a.new), ["1", "2"]);
        assert!(a.became_ready.is_empty());
        // The same picture again: nothing new.
        let a = s
            .apply(
                &[change("1", "Done", true, 1), change("2", "Doing", false, 2)],
                10,
            )
            .unwrap();
        assert!(a.new.is_empty() && a.became_ready.is_empty());
        // A reopened store remembers (an agent restart).
        drop(s);
        let mut s = Store::open(&dir.path().join("h.db")).unwrap();
        let a = s.apply(&[change("2", "Error", true, 2)], 10).unwrap();
        assert!(a.new.is_empty());
        assert_eq!(ids(&a.became_ready), ["2"]);
        // snapd pruned change 1: the history keeps it.
        let all = s.list(&Filter::default()).unwrap();
        assert_eq!(
            all.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["1", "2"]
        );
        let two = s.get("2").unwrap().unwrap().change().unwrap();
        assert_eq!(two.tasks.len(), 1);
        assert_eq!(two.tasks[0].extra["future-field"], 1, "unknown fields kept");
    }

    #[test]
    fn the_keep_limit_removes_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("h.db")).unwrap();
        let first: Vec<Change> = (1..=3)
            .map(|i| change(&i.to_string(), "Done", true, i))
            .collect();
        let a = s.apply(&first, 3).unwrap();
        assert_eq!(a.pruned, 0);
        let a = s
            .apply(
                &[change("4", "Done", true, 4), change("5", "Done", true, 5)],
                3,
            )
            .unwrap();
        assert_eq!((ids(&a.new), a.pruned), (vec!["4", "5"], 2));
        let kept: Vec<String> = s
            .list(&Filter::default())
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(kept, ["3", "4", "5"]);
        // An old change arriving late in a full history is not kept.
        let a = s.apply(&[change("0", "Done", true, 0)], 3).unwrap();
        assert!(a.new.is_empty());
        assert_eq!(s.count().unwrap(), 3);
    }

    #[test]
    fn filters_by_status_kind_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("h.db")).unwrap();
        s.apply(
            &[
                change("1", "Done", true, 1),
                change("2", "Error", true, 2),
                change("3", "Doing", false, 3),
            ],
            10,
        )
        .unwrap();
        let f = Filter {
            statuses: vec!["error".into(), "DOING".into()],
            ..Default::default()
        };
        assert_eq!(s.list(&f).unwrap().len(), 2);
        let f = Filter {
            since_ns: clock::parse_ns("2026-11-21T05:00:02Z"),
            ..Default::default()
        };
        assert_eq!(s.list(&f).unwrap().len(), 2);
        let f = Filter {
            kinds: vec!["seed".into()],
            ..Default::default()
        };
        assert!(s.list(&f).unwrap().is_empty());
    }

    #[test]
    fn reboots_are_remembered_durably_with_their_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_durable(&dir.path().join("h.db")).unwrap();
        assert_eq!(s.synchronous().unwrap(), 2, "synchronous=FULL");
        assert_eq!(
            Store::open(&dir.path().join("x.db"))
                .unwrap()
                .synchronous()
                .unwrap(),
            1,
            "the history itself stays at normal"
        );
        assert!(!s.rebooted_for("7").unwrap());
        let r = RebootRecord {
            change_id: "7".into(),
            kind: "k".into(),
            summary: "s".into(),
            spawn_time: "t".into(),
            report: "/r".into(),
            at_ns: 1_700_000_000_123_456_789,
        };
        s.record_reboot(&r).unwrap();
        s.record_reboot(&r).unwrap();
        drop(s);
        let s = Store::open_read_only(&dir.path().join("h.db")).unwrap();
        assert!(s.rebooted_for("7").unwrap());
        assert_eq!(
            s.reboot_times().unwrap(),
            [("7".to_string(), 1_700_000_000_123_456_789)]
        );
    }
}
