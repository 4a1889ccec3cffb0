//! The durable action ledger (SQLite, `migrations/dms/`).
//!
//! The order of writes is the guarantee:
//! 1. an action is recorded (`received`) in the transaction that accepts
//!    it, and the broker hears PUBACK only after that commit: an
//!    acknowledged action is never lost;
//! 2. an action with an effect is marked `started` (committed) before the
//!    agent asks snapd for it: after a crash the agent knows it may have
//!    happened, and does not run it again;
//! 3. the response is stored (`done`) before it is published, and marked
//!    acknowledged on the broker's PUBACK: a restart re-sends what the
//!    broker may not have;
//! 4. the same for the completion report of the change the action started.
//!
//! A redelivered or repeated id is answered from here. Finished rows are
//! pruned by age and by count (`dms.ledger.max.age`, `dms.ledger.max.count`).

use super::request::Request;
use crate::db::{self, DbError, Migration};
use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The ledger's schema, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "dms/0001_ledger.sql",
        sql: include_str!("../../../migrations/dms/0001_ledger.sql"),
    },
    Migration {
        version: 2,
        name: "dms/0002_signed_nonces.sql",
        sql: include_str!("../../../migrations/dms/0002_signed_nonces.sql"),
    },
];

/// How an action stands in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Recorded in the same transaction as its acknowledgement.
    Received,
    /// Handed to snapd: a restart never runs it again.
    Started,
    /// Answered; its replies are kept for redelivery.
    Done,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Received => "received",
            State::Started => "started",
            State::Done => "done",
        }
    }
    fn parse(s: &str) -> State {
        match s {
            "received" => State::Received,
            "started" => State::Started,
            _ => State::Done,
        }
    }
}

/// What accepting an action found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// First sighting: recorded as `received`; run it.
    New,
    /// Seen before: never run again. The stored replies, if any yet.
    Again {
        /// How far it got.
        state: State,
        /// The reply, once stored.
        response: Option<Bytes>,
        /// The completion report, once stored.
        completion: Option<Bytes>,
    },
    /// The id was used before for a different request.
    Conflict {
        /// The action first recorded under this id.
        action: String,
    },
    /// A signed action whose id (nonce) was accepted before, and whose row
    /// has since been pruned: never run.
    Replayed {
        /// When it was first accepted.
        received_ms: i64,
    },
}

/// One action to accept.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// The request as parsed.
    pub request: &'a Request,
    /// SHA-256 of the payload as it came (envelope included).
    pub digest: &'a str,
    /// A signed action's nonce: remembered until it expires.
    pub signed: Option<Nonce<'a>>,
}

/// What the ledger keeps of a signed action's nonce.
#[derive(Debug, Clone, Copy)]
pub struct Nonce<'a> {
    /// The key that signed it.
    pub kid: &'a str,
    /// Unix seconds after which the signature is refused as expired anyway
    /// (its `exp` plus the skew allowance).
    pub expires_s: i64,
}

/// A row that a restart must finish.
#[derive(Debug, Clone, PartialEq)]
pub struct Unfinished {
    /// The request as parsed.
    pub request: Request,
    /// How far it got.
    pub state: State,
    /// The stored reply when it was not acknowledged by the broker.
    pub unacked_response: Option<Bytes>,
    /// The change still to report on (no completion stored yet).
    pub change_to_follow: Option<String>,
    /// The stored completion report when it was not acknowledged.
    pub unacked_completion: Option<Bytes>,
    /// When it was received, ms since the epoch.
    pub received_ms: i64,
    /// The last change of state (for a `started` row: when it was marked
    /// started, just before snapd was asked).
    pub updated_ms: i64,
}

/// The link state as the daemon last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRow {
    /// Whether the broker connection was up.
    pub connected: bool,
    /// Why not, when it was down.
    pub detail: Option<String>,
    /// Since when, ms since the epoch.
    pub since_ms: i64,
    /// Sessions started since the daemon started.
    pub restarts: i64,
}

/// The durable action ledger (SQLite): what was acknowledged, started and answered.
pub struct Ledger {
    path: PathBuf,
    conn: Mutex<Connection>,
}

pub use crate::clock::now_ms;

/// SHA-256 of a request payload, hex.
pub fn digest(payload: &[u8]) -> String {
    super::heartbeat::sha256_hex(payload)
}

impl Ledger {
    /// Opens (creating) the ledger at `path`. Every commit is fsync'd: an
    /// accepted action has been acknowledged to the DMS.
    pub fn open(path: &Path) -> Result<Ledger, DbError> {
        let conn = db::open(path, MIGRATIONS)?;
        conn.pragma_update(None, "synchronous", "full")
            .map_err(|e| DbError::classify(path, e))?;
        Ok(Ledger {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The same ledger without persistence (benchmarks: the cost of the
    /// ledger is measured against this).
    pub fn in_memory() -> Result<Ledger, DbError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory().map_err(|e| DbError::classify(&path, e))?;
        db::migrate(&conn, &path, MIGRATIONS)?;
        Ok(Ledger {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, DbError> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn).map_err(|e| DbError::classify(&self.path, e))
    }

    /// Records a batch of unsigned requests in one transaction (one fsync
    /// for all: a burst costs one commit per batch, not per action).
    pub fn accept(&self, batch: &[(&Request, &str)]) -> Result<Vec<Admission>, DbError> {
        let entries: Vec<Entry> = batch
            .iter()
            .map(|(request, digest)| Entry {
                request,
                digest,
                signed: None,
            })
            .collect();
        self.accept_entries(&entries)
    }

    /// Records a batch in one transaction; a signed action's nonce is
    /// recorded in the same transaction, so a replay is known from the
    /// moment the action is acknowledged, across restarts.
    pub fn accept_entries(&self, batch: &[Entry]) -> Result<Vec<Admission>, DbError> {
        let now = now_ms();
        self.with(|c| {
            // IMMEDIATE: the write lock at BEGIN, under the busy timeout. A
            // deferred one reads first and, finding another writer when it
            // upgrades, fails at once with "database is locked".
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut out = Vec::with_capacity(batch.len());
            for e in batch {
                let (req, digest) = (e.request, e.digest);
                let existing = tx
                    .query_row(
                        "SELECT state, digest, action, response, completion FROM actions WHERE id = ?1",
                        [&req.id],
                        |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, String>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, Option<Vec<u8>>>(3)?,
                                r.get::<_, Option<Vec<u8>>>(4)?,
                            ))
                        },
                    )
                    .optional()?;
                let nonce_seen: Option<i64> = match e.signed {
                    Some(_) => tx
                        .query_row(
                            "SELECT received_ms FROM signed_nonces WHERE id = ?1",
                            [&req.id],
                            |r| r.get(0),
                        )
                        .optional()?,
                    None => None,
                };
                if let (Some(n), None) = (e.signed, nonce_seen) {
                    tx.execute(
                        "INSERT INTO signed_nonces (id, kid, expires_s, received_ms) VALUES (?1, ?2, ?3, ?4)",
                        params![req.id, n.kid, n.expires_s, now],
                    )?;
                }
                out.push(match existing {
                    None if nonce_seen.is_some() => Admission::Replayed {
                        received_ms: nonce_seen.unwrap_or_default(),
                    },
                    Some((_, d, action, _, _)) if d != digest => Admission::Conflict { action },
                    Some((state, _, _, response, completion)) => Admission::Again {
                        state: State::parse(&state),
                        response: response.map(Bytes::from),
                        completion: completion.map(Bytes::from),
                    },
                    None => {
                        tx.execute(
                            "INSERT INTO actions (id, action, snap, data, digest, state, received_ms, updated_ms) \
                             VALUES (?1, ?2, ?3, ?4, ?5, 'received', ?6, ?6)",
                            params![req.id, req.action, req.snap, req.data, digest, now],
                        )?;
                        Admission::New
                    }
                });
            }
            tx.commit()?;
            Ok(out)
        })
    }

    /// Marks an action as started: from here on it is never run again.
    pub fn start(&self, id: &str) -> Result<(), DbError> {
        self.set_state(id, State::Started)
    }

    fn set_state(&self, id: &str, state: State) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE actions SET state = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, state.as_str(), now_ms()],
            )
            .map(drop)
        })
    }

    /// Stores the reply (and the change it started) before it is sent.
    pub fn answer(&self, id: &str, response: &[u8], change: Option<&str>) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE actions SET state = 'done', response = ?2, change = ?3, updated_ms = ?4 WHERE id = ?1",
                params![id, response, change, now_ms()],
            )
            .map(drop)
        })
    }

    /// Stores the completion report before it is sent.
    pub fn complete(&self, id: &str, completion: &[u8]) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE actions SET completion = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, completion, now_ms()],
            )
            .map(drop)
        })
    }

    /// The broker acknowledged the reply (`completion` false) or the
    /// completion report (true).
    pub fn acked(&self, id: &str, completion: bool) -> Result<(), DbError> {
        let sql = if completion {
            "UPDATE actions SET completion_acked = 1 WHERE id = ?1"
        } else {
            "UPDATE actions SET response_acked = 1 WHERE id = ?1"
        };
        self.with(|c| c.execute(sql, [id]).map(drop))
    }

    /// Every row a restart must finish, oldest first.
    pub fn unfinished(&self) -> Result<Vec<Unfinished>, DbError> {
        self.with(|c| {
            let mut q = c.prepare(
                "SELECT id, action, snap, data, state, response, response_acked, change, completion, completion_acked, received_ms, updated_ms \
                 FROM actions WHERE state != 'done' OR response_acked = 0 \
                 OR (change IS NOT NULL AND (completion IS NULL OR completion_acked = 0)) \
                 ORDER BY received_ms, id",
            )?;
            let rows = q.query_map([], |r| {
                let response: Option<Vec<u8>> = r.get(5)?;
                let change: Option<String> = r.get(7)?;
                let completion: Option<Vec<u8>> = r.get(8)?;
                Ok(Unfinished {
                    request: Request {
                        id: r.get(0)?,
                        action: r.get(1)?,
                        snap: r.get(2)?,
                        data: r.get(3)?,
                    },
                    state: State::parse(&r.get::<_, String>(4)?),
                    unacked_response: response
                        .filter(|_| !r.get::<_, bool>(6).unwrap_or(false))
                        .map(Bytes::from),
                    change_to_follow: change.filter(|_| completion.is_none()),
                    unacked_completion: completion
                        .filter(|_| !r.get::<_, bool>(9).unwrap_or(false))
                        .map(Bytes::from),
                    received_ms: r.get(10)?,
                    updated_ms: r.get(11)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Deletes finished rows (replies acknowledged, change reported) older
    /// than `max_age`, then the oldest finished ones beyond `max_count`.
    /// Unfinished rows are never pruned. Returns how many went.
    pub fn prune(&self, max_age: Duration, max_count: u64) -> Result<usize, DbError> {
        let cutoff = now_ms() - max_age.as_millis() as i64;
        const FINISHED: &str = "state = 'done' AND response_acked = 1 \
             AND (change IS NULL OR completion_acked = 1)";
        self.with(|c| {
            let by_age = c.execute(
                &format!("DELETE FROM actions WHERE {FINISHED} AND updated_ms <= ?1"),
                [cutoff],
            )?;
            let by_count = c.execute(
                &format!(
                    "DELETE FROM actions WHERE {FINISHED} AND id IN \
                     (SELECT id FROM actions ORDER BY updated_ms DESC, id DESC LIMIT -1 OFFSET ?1)"
                ),
                [max_count as i64],
            )?;
            // A nonce whose signature has expired is refused as expired:
            // it need not be remembered any more.
            let nonces = c.execute(
                "DELETE FROM signed_nonces WHERE expires_s < ?1",
                [crate::clock::now_s()],
            )?;
            tracing::debug!(nonces, "forgot the nonces of expired signed actions");
            Ok(by_age + by_count)
        })
    }

    /// How many rows the ledger holds.
    pub fn rows(&self) -> Result<u64, DbError> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM actions", [], |r| r.get::<_, i64>(0)))
            .map(|n| n as u64)
    }

    /// Records the link state for `iot-agent status`.
    pub fn set_link(
        &self,
        connected: bool,
        detail: Option<&str>,
        restart: bool,
    ) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO link (one, connected, detail, since_ms, restarts) VALUES (1, ?1, ?2, ?3, ?4) \
                 ON CONFLICT (one) DO UPDATE SET connected = ?1, detail = ?2, since_ms = ?3, restarts = restarts + ?4",
                params![connected, detail, now_ms(), restart as i64],
            )
            .map(drop)
        })
    }

    /// Reads the link state (the CLI, read-only).
    pub fn read_link(path: &Path) -> Result<Option<LinkRow>, DbError> {
        let conn = db::open_read_only(path, MIGRATIONS)?;
        conn.query_row(
            "SELECT connected, detail, since_ms, restarts FROM link WHERE one = 1",
            [],
            |r| {
                Ok(LinkRow {
                    connected: r.get(0)?,
                    detail: r.get(1)?,
                    since_ms: r.get(2)?,
                    restarts: r.get(3)?,
                })
            },
        )
        .optional()
        .map_err(|e| DbError::classify(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: &str, action: &str) -> Request {
        Request {
            id: id.into(),
            action: action.into(),
            snap: "hello".into(),
            data: String::new(),
        }
    }

    #[test]
    fn an_id_is_admitted_once_and_answered_from_the_ledger_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dms.db");
        let l = Ledger::open(&path).unwrap();
        let (a, b) = (req("a", "install"), req("b", "list"));
        assert_eq!(
            l.accept(&[(&a, "d1"), (&b, "d2")]).unwrap(),
            vec![Admission::New, Admission::New]
        );
        l.start("a").unwrap();
        l.answer("a", b"resp-a", Some("7")).unwrap();
        drop(l);
        let l = Ledger::open(&path).unwrap();
        assert_eq!(
            l.accept(&[(&a, "d1")]).unwrap(),
            vec![Admission::Again {
                state: State::Done,
                response: Some(Bytes::from_static(b"resp-a")),
                completion: None
            }]
        );
        assert!(matches!(
            l.accept(&[(&a, "other")]).unwrap()[0],
            Admission::Conflict { .. }
        ));
        let u = l.unfinished().unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].request, a);
        assert_eq!(u[0].unacked_response.as_deref(), Some(&b"resp-a"[..]));
        assert_eq!(u[0].change_to_follow.as_deref(), Some("7"));
        assert_eq!(u[1].state, State::Received);
        l.acked("a", false).unwrap();
        l.complete("a", b"done-a").unwrap();
        l.acked("a", true).unwrap();
        let u = l.unfinished().unwrap();
        assert_eq!(u.len(), 1, "{u:?}");
    }

    #[test]
    fn a_signed_nonce_outlives_its_pruned_row_until_it_expires() {
        let l = Ledger::in_memory().unwrap();
        let r = req("s", "install");
        let nonce = |expires_s| Entry {
            request: &r,
            digest: "d",
            signed: Some(Nonce {
                kid: "ops",
                expires_s,
            }),
        };
        let later = crate::clock::now_s() + 3600;
        assert_eq!(
            l.accept_entries(&[nonce(later)]).unwrap(),
            vec![Admission::New]
        );
        assert!(matches!(
            l.accept_entries(&[nonce(later)]).unwrap()[0],
            Admission::Again { .. }
        ));
        l.answer("s", b"x", None).unwrap();
        l.acked("s", false).unwrap();
        // Pruned by count: the row goes, the nonce stays.
        l.prune(Duration::from_secs(3600), 0).unwrap();
        assert_eq!(l.rows().unwrap(), 0);
        assert!(matches!(
            l.accept_entries(&[nonce(later)]).unwrap()[0],
            Admission::Replayed { .. }
        ));
        // Unsigned, the same id is new again (as before signing existed).
        assert_eq!(l.accept(&[(&r, "d")]).unwrap(), vec![Admission::New]);

        // An expired nonce is forgotten by pruning.
        let l = Ledger::in_memory().unwrap();
        l.accept_entries(&[nonce(crate::clock::now_s() - 1)])
            .unwrap();
        l.answer("s", b"x", None).unwrap();
        l.acked("s", false).unwrap();
        l.prune(Duration::from_secs(3600), 0).unwrap();
        assert_eq!(
            l.accept_entries(&[nonce(later)]).unwrap(),
            vec![Admission::New]
        );
    }

    #[test]
    fn pruning_keeps_unfinished_rows_and_the_newest_finished_ones() {
        let l = Ledger::in_memory().unwrap();
        for i in 0..10 {
            let r = req(&format!("r{i}"), "list");
            l.accept(&[(&r, "d")]).unwrap();
            if i < 8 {
                l.answer(&r.id, b"x", None).unwrap();
                l.acked(&r.id, false).unwrap();
            }
        }
        assert_eq!(l.prune(Duration::from_secs(3600), 3).unwrap(), 7);
        assert_eq!(l.rows().unwrap(), 3, "2 unfinished + 1 finished kept");
        assert_eq!(l.prune(Duration::ZERO, 100).unwrap(), 1);
        assert_eq!(l.rows().unwrap(), 2);
    }
}
