//! The relay's database (`db`, SQLite through [`crate::db`], schema in
//! `migrations/relay/`): the pipes, the accept filter, the relay-dials
//! registrations and the OTP hashes, everything the relay must not forget
//! on a restart. One file, one mechanism: each write is one transaction,
//! and the callers ([`super::pipes`], [`super::registry`], [`super::otp`])
//! change their state in memory only after it committed, so a failed write
//! (read-only or full disk) leaves the relay as it was and is answered
//! with this module's message.
//!
//! Earlier relays kept the same facts in three JSON files (`state`,
//! `registry`, `otp.state`). On open, each of those files that exists is
//! imported in one transaction, recorded in `imports`, then renamed aside
//! to `<file>.imported`: nothing an operator set is lost, and a file whose
//! rename failed is not imported a second time over newer rows.

use super::otp::Entry;
use super::pipes::{Mapping, Spec};
use super::registry::{Filter, Registration, Saved};
use crate::db::{self, DbError, Migration};
use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The schema steps of the relay's database (`migrations/relay/`).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "relay/0001_relay.sql",
    sql: include_str!("../../migrations/relay/0001_relay.sql"),
}];

/// Where earlier relays kept their JSON files (the keys `state`,
/// `registry`, `otp.state`), read once to import them.
#[derive(Debug, Clone, Default)]
pub struct Legacy {
    /// `state`: the mappings.
    pub state: Option<PathBuf>,
    /// `registry`: the accept filter and the relay-dials agents.
    pub registry: Option<PathBuf>,
    /// `otp.state`: the OTP hashes.
    pub otp: Option<PathBuf>,
}

/// Why the database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    /// The database itself (its advice in [`DbError`]).
    Db(#[from] DbError),
    #[error("{key} {path} cannot be imported into the relay's database: {message}; fix the file, or move it aside to start without what it holds")]
    /// An earlier relay's file that cannot be read or parsed: nothing
    /// was imported.
    Import {
        /// Its config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The relay's database.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// A write that did not happen: logged, and the message a 500 answer
/// carries (the caller keeps its old state).
pub fn not_saved(e: DbError) -> String {
    tracing::warn!(error = %e, "a write to the relay's database failed; nothing changed");
    format!("not saved, nothing changed: {e}")
}

/// Runs `f` (a store write a request waits on) off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("the relay's database call failed: {e}"))
}

impl Store {
    /// Opens (creating, 0600) the database at `path`, brings its schema up
    /// to date and imports the JSON files of `legacy` that exist.
    pub fn open(path: &Path, legacy: &Legacy) -> Result<Store, OpenError> {
        let mut conn = db::open(path, MIGRATIONS)?;
        import(&mut conn, path, legacy)?;
        Ok(Store {
            path: path.to_path_buf(),
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

    /// Every pipe, oldest first.
    pub fn mappings(&self) -> Result<Vec<Mapping>, DbError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, type, device, target, max1, max2, threshold1, threshold2, \
                 port1, port2, passcode1, passcode2, created_ms FROM pipes ORDER BY created_ms, id",
            )?;
            let rows = st.query_map([], |r| {
                let spec = if r.get::<_, String>(1)? == "public" {
                    Spec::Public {
                        maxconnections: r.get(4)?,
                        heartbeatabsencethreshold: millis(r, 6)?,
                        device: r.get(2)?,
                        target: r.get(3)?,
                    }
                } else {
                    Spec::Private {
                        maxconnectionsport1: r.get(4)?,
                        maxconnectionsport2: r.get(5)?,
                        heartbeatabsencethresholdport1: millis(r, 6)?,
                        heartbeatabsencethresholdport2: millis(r, 7)?,
                    }
                };
                Ok(Mapping {
                    id: r.get(0)?,
                    spec,
                    port1: r.get(8)?,
                    port2: r.get(9)?,
                    passcode1: r.get(10)?,
                    passcode2: r.get(11)?,
                    timestamp: r.get(12)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Keeps a new pipe (its id and, for a public one, its device and
    /// target unused so far).
    pub fn insert_mapping(&self, m: &Mapping) -> Result<(), DbError> {
        self.with(|c| insert_mapping(c, m, "INSERT"))
    }

    /// Forgets a pipe.
    pub fn delete_mapping(&self, id: &str) -> Result<(), DbError> {
        self.with(|c| c.execute("DELETE FROM pipes WHERE id = ?1", [id]).map(drop))
    }

    /// The accept filter (none kept: the default, nothing accepted).
    pub fn filter(&self) -> Result<Filter, DbError> {
        self.with(|c| {
            let allow_all = c
                .query_row("SELECT allow_all FROM accept_filter", [], |r| r.get(0))
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(false),
                    e => Err(e),
                })?;
            let mut st = c.prepare("SELECT device_id FROM accept_devices ORDER BY device_id")?;
            let device_ids = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(Filter {
                allow_all,
                device_ids,
            })
        })
    }

    /// Replaces the accept filter.
    pub fn set_filter(&self, f: &Filter) -> Result<(), DbError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            set_filter(&tx, f)?;
            tx.commit()
        })
    }

    /// The relay-dials registrations, by device id.
    pub fn registrations(&self) -> Result<Vec<Registration>, DbError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT device_id, address, tls FROM registrations ORDER BY device_id")?;
            let rows = st.query_map([], |r| {
                Ok(Registration {
                    device_id: r.get(0)?,
                    address: r.get(1)?,
                    tls: r.get(2)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Adds or replaces the registration of its device.
    pub fn put_registration(&self, r: &Registration) -> Result<(), DbError> {
        self.with(|c| put_registration(c, r))
    }

    /// Forgets a device's registration.
    pub fn delete_registration(&self, device: &str) -> Result<(), DbError> {
        self.with(|c| {
            c.execute("DELETE FROM registrations WHERE device_id = ?1", [device])
                .map(drop)
        })
    }

    /// Every OTP kept (used ones until they expire).
    pub(super) fn otps(&self) -> Result<Vec<Entry>, DbError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT device, sha256, expires_ms, used_ms FROM otps ORDER BY expires_ms",
            )?;
            let rows = st.query_map([], |r| {
                Ok(Entry {
                    device: r.get(0)?,
                    sha256: r.get(1)?,
                    expires: r.get(2)?,
                    used: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Keeps a new OTP in the transaction that forgets the expired ones
    /// (at `now`) and the unused one of its device (the newest counts).
    pub(super) fn issue_otp(&self, e: &Entry, now: i64) -> Result<(), DbError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "DELETE FROM otps WHERE expires_ms <= ?1 OR (device = ?2 AND used_ms IS NULL)",
                params![now, e.device],
            )?;
            insert_otp(&tx, e, "INSERT")?;
            tx.commit()
        })
    }

    /// Records an OTP as used at `at` (unix ms).
    pub fn use_otp(&self, device: &str, sha256: &str, at: i64) -> Result<(), DbError> {
        self.with(|c| {
            c.execute(
                "UPDATE otps SET used_ms = ?3 WHERE device = ?1 AND sha256 = ?2",
                params![device, sha256, at],
            )
            .map(drop)
        })
    }
}

/// A threshold column (milliseconds, never negative: written from a u64).
fn millis(r: &rusqlite::Row, i: usize) -> rusqlite::Result<u64> {
    Ok(r.get::<_, i64>(i)?.max(0) as u64)
}

fn insert_mapping(c: &Connection, m: &Mapping, verb: &str) -> rusqlite::Result<()> {
    let (kind, device, target, max1, max2, t1, t2) = match &m.spec {
        Spec::Public {
            maxconnections,
            heartbeatabsencethreshold,
            device,
            target,
        } => (
            "public",
            Some(device.as_str()),
            Some(target.as_str()),
            *maxconnections,
            None,
            *heartbeatabsencethreshold,
            None,
        ),
        Spec::Private {
            maxconnectionsport1,
            maxconnectionsport2,
            heartbeatabsencethresholdport1,
            heartbeatabsencethresholdport2,
        } => (
            "private",
            None,
            None,
            *maxconnectionsport1,
            Some(*maxconnectionsport2),
            *heartbeatabsencethresholdport1,
            Some(*heartbeatabsencethresholdport2),
        ),
    };
    // `verb` is ours: INSERT, or INSERT OR REPLACE for an import.
    c.execute(
        &format!(
            "{verb} INTO pipes (id, type, device, target, max1, max2, threshold1, threshold2, \
             port1, port2, passcode1, passcode2, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ),
        params![
            m.id,
            kind,
            device,
            target,
            max1,
            max2,
            // SQLite integers are i64; a threshold past that is no threshold.
            i64::try_from(t1).unwrap_or(i64::MAX),
            t2.map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
            m.port1,
            m.port2,
            m.passcode1,
            m.passcode2,
            m.timestamp
        ],
    )
    .map(drop)
}

fn set_filter(tx: &Connection, f: &Filter) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO accept_filter (one, allow_all) VALUES (1, ?1)",
        [f.allow_all],
    )?;
    tx.execute("DELETE FROM accept_devices", [])?;
    let mut st = tx.prepare("INSERT INTO accept_devices (device_id) VALUES (?1)")?;
    for d in &f.device_ids {
        st.execute([d])?;
    }
    Ok(())
}

fn put_registration(c: &Connection, r: &Registration) -> rusqlite::Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO registrations (device_id, address, tls) VALUES (?1, ?2, ?3)",
        params![r.device_id, r.address, r.tls],
    )
    .map(drop)
}

fn insert_otp(c: &Connection, e: &Entry, verb: &str) -> rusqlite::Result<()> {
    c.execute(
        &format!("{verb} INTO otps (device, sha256, expires_ms, used_ms) VALUES (?1, ?2, ?3, ?4)"),
        params![e.device, e.sha256, e.expires, e.used],
    )
    .map(drop)
}

/// One earlier JSON file, read and parsed.
enum Found {
    State(Vec<Mapping>),
    Registry(Saved),
    Otp(Vec<Entry>),
}

/// Imports the earlier relay's JSON files that exist, in one transaction
/// (all or none), then renames each aside. A file whose import is recorded
/// already (an earlier rename failed) is only renamed.
fn import(conn: &mut Connection, path: &Path, legacy: &Legacy) -> Result<(), OpenError> {
    let sources = [
        ("state", legacy.state.as_deref()),
        ("registry", legacy.registry.as_deref()),
        ("otp.state", legacy.otp.as_deref()),
    ];
    let present: Vec<(&'static str, &Path)> = sources
        .into_iter()
        .filter_map(|(key, p)| p.filter(|p| p.exists()).map(|p| (key, p)))
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let db_err = |e| OpenError::Db(DbError::classify(path, e));
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let mut counts = Vec::new();
    for &(key, file) in &present {
        let done: bool = tx
            .query_row(
                "SELECT count(*) > 0 FROM imports WHERE source = ?1",
                [key],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        if done {
            tracing::warn!(key, file = %file.display(), "imported before; moving it aside again");
            continue;
        }
        let found = read(key, file)?;
        let rows = store_found(&tx, &found).map_err(db_err)?;
        tx.execute(
            "INSERT INTO imports (source, path, rows, imported_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                key,
                file.display().to_string(),
                rows as i64,
                crate::clock::now_ms()
            ],
        )
        .map_err(db_err)?;
        counts.push(format!("{key} {} ({rows})", file.display()));
    }
    tx.commit().map_err(db_err)?;
    for &(key, file) in &present {
        let aside = aside(file);
        if let Err(e) = std::fs::rename(file, &aside) {
            tracing::warn!(key, file = %file.display(), error = %e, "imported, but cannot be renamed aside; it is not imported again");
        }
    }
    if !counts.is_empty() {
        tracing::info!(database = %path.display(), imported = %counts.join(", "), "the JSON files of an earlier relay were imported into its database and renamed to <file>.imported");
    }
    Ok(())
}

/// Where an imported file is moved: `<file>.imported`.
pub fn aside(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".imported");
    PathBuf::from(name)
}

fn read(key: &'static str, file: &Path) -> Result<Found, OpenError> {
    let failed = |message: String| OpenError::Import {
        key,
        path: file.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(file).map_err(|e| failed(e.to_string()))?;
    let parsed = match key {
        "state" => serde_json::from_slice(&bytes).map(Found::State),
        "registry" => serde_json::from_slice(&bytes).map(Found::Registry),
        _ => serde_json::from_slice(&bytes).map(Found::Otp),
    };
    parsed.map_err(|e| failed(format!("not the JSON an earlier relay wrote ({e})")))
}

/// Writes what a file held; the file's rows win over rows with the same
/// key. Answers how many rows it wrote.
fn store_found(tx: &Transaction, found: &Found) -> rusqlite::Result<usize> {
    match found {
        Found::State(list) => {
            for m in list {
                insert_mapping(tx, m, "INSERT OR REPLACE")?;
            }
            Ok(list.len())
        }
        Found::Registry(saved) => {
            set_filter(tx, &saved.accept_filter)?;
            for r in &saved.agents {
                put_registration(tx, r)?;
            }
            Ok(1 + saved.agents.len())
        }
        Found::Otp(list) => {
            for e in list {
                insert_otp(tx, e, "INSERT OR REPLACE")?;
            }
            Ok(list.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn public(id: &str, device: &str, port: u16) -> Mapping {
        Mapping {
            id: id.into(),
            spec: Spec::Public {
                maxconnections: 3,
                heartbeatabsencethreshold: 200_000,
                device: device.into(),
                target: "127.0.0.1:80".into(),
            },
            port1: 7000,
            port2: port,
            passcode1: String::new(),
            passcode2: String::new(),
            timestamp: 1,
        }
    }

    fn private(id: &str) -> Mapping {
        Mapping {
            id: id.into(),
            spec: Spec::Private {
                maxconnectionsport1: 1,
                maxconnectionsport2: 2,
                heartbeatabsencethresholdport1: 100,
                heartbeatabsencethresholdport2: 300,
            },
            port1: 30001,
            port2: 30002,
            passcode1: "p1".into(),
            passcode2: "p2".into(),
            timestamp: 2,
        }
    }

    fn entry(device: &str, sha: &str, expires: i64, used: Option<i64>) -> Entry {
        Entry {
            device: device.into(),
            sha256: sha.into(),
            expires,
            used,
        }
    }

    #[test]
    fn every_table_keeps_its_rows_across_a_reopen_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/relay.db");
        let s = Store::open(&path, &Legacy::default()).unwrap();
        assert_eq!(s.filter().unwrap(), Filter::default());
        s.insert_mapping(&public("a", "d1", 30000)).unwrap();
        s.insert_mapping(&private("b")).unwrap();
        s.set_filter(&Filter {
            allow_all: false,
            device_ids: ["d1".to_string(), "d2".to_string()].into(),
        })
        .unwrap();
        let reg = Registration {
            device_id: "d3".into(),
            address: "h:1".into(),
            tls: false,
        };
        s.put_registration(&reg).unwrap();
        s.issue_otp(&entry("d1", "aa", i64::MAX, None), 10).unwrap();
        s.use_otp("d1", "aa", 11).unwrap();
        drop(s);
        let s = Store::open(&path, &Legacy::default()).unwrap();
        let m = s.mappings().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].spec, public("a", "d1", 30000).spec);
        assert_eq!((m[0].port2, m[0].timestamp), (30000, 1));
        assert_eq!(m[1].spec, private("b").spec);
        assert_eq!(
            (m[1].passcode1.as_str(), m[1].passcode2.as_str()),
            ("p1", "p2")
        );
        assert_eq!(s.filter().unwrap().device_ids.len(), 2);
        assert_eq!(s.registrations().unwrap(), vec![reg]);
        let otps = s.otps().unwrap();
        assert_eq!((otps.len(), otps[0].used), (1, Some(11)));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        s.delete_mapping("a").unwrap();
        s.delete_registration("d3").unwrap();
        assert_eq!(s.mappings().unwrap().len(), 1);
        assert!(s.registrations().unwrap().is_empty());
    }

    #[test]
    fn a_second_public_pipe_for_one_device_and_target_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("r.db"), &Legacy::default()).unwrap();
        s.insert_mapping(&public("a", "d1", 30000)).unwrap();
        assert!(s.insert_mapping(&public("b", "d1", 30001)).is_err());
        s.insert_mapping(&public("c", "d2", 30001)).unwrap();
    }

    #[test]
    fn issuing_forgets_expired_otps_and_the_devices_unused_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("r.db"), &Legacy::default()).unwrap();
        s.issue_otp(&entry("d1", "old", 100, None), 0).unwrap();
        s.issue_otp(&entry("d2", "used", 1000, Some(5)), 0).unwrap();
        s.issue_otp(&entry("d3", "gone", 50, None), 0).unwrap();
        s.issue_otp(&entry("d1", "new", 1000, None), 60).unwrap();
        let mut shas: Vec<String> = s.otps().unwrap().into_iter().map(|e| e.sha256).collect();
        shas.sort();
        assert_eq!(shas, ["new", "used"]);
    }

    #[test]
    fn a_full_database_fails_the_write_with_advice_and_keeps_the_rows() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("r.db"), &Legacy::default()).unwrap();
        s.insert_mapping(&public("a", "d1", 30000)).unwrap();
        // No page more: what a full disk does to SQLite.
        s.with(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
        })
        .unwrap();
        let many = Filter {
            allow_all: false,
            device_ids: (0..2000).map(|i| format!("device-{i:05}")).collect(),
        };
        let err = s.set_filter(&many).unwrap_err();
        assert!(matches!(err, DbError::Full { .. }), "{err}");
        assert!(not_saved(err).contains("nothing changed"));
        assert_eq!(s.filter().unwrap(), Filter::default());
        assert_eq!(s.mappings().unwrap().len(), 1);
    }

    #[test]
    fn json_files_of_an_earlier_relay_are_imported_once_and_renamed_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = |n: &str| dir.path().join(n);
        let mappings = vec![public("a", "d1", 30000), private("b")];
        std::fs::write(
            file("mappings.json"),
            serde_json::to_vec(&mappings).unwrap(),
        )
        .unwrap();
        std::fs::write(
            file("registry.json"),
            r#"{"acceptFilter":{"deviceIds":["d1"]},"agents":[{"deviceId":"d9","address":"h:7100"}]}"#,
        )
        .unwrap();
        std::fs::write(
            file("otps.json"),
            r#"[{"device":"d1","sha256":"ab","expires":99,"used":null}]"#,
        )
        .unwrap();
        let legacy = Legacy {
            state: Some(file("mappings.json")),
            registry: Some(file("registry.json")),
            otp: Some(file("otps.json")),
        };
        let s = Store::open(&file("relay.db"), &legacy).unwrap();
        assert_eq!(s.mappings().unwrap().len(), 2);
        assert!(s.filter().unwrap().allows("d1"));
        let regs = s.registrations().unwrap();
        assert_eq!((regs[0].device_id.as_str(), regs[0].tls), ("d9", true));
        assert_eq!(s.otps().unwrap()[0].sha256, "ab");
        for n in ["mappings.json", "registry.json", "otps.json"] {
            assert!(!file(n).exists(), "{n}");
            assert!(aside(&file(n)).exists(), "{n}");
        }
        // A file back in its place (a failed rename) is not imported again.
        s.delete_mapping("a").unwrap();
        drop(s);
        std::fs::rename(aside(&file("mappings.json")), file("mappings.json")).unwrap();
        let s = Store::open(&file("relay.db"), &legacy).unwrap();
        assert_eq!(s.mappings().unwrap().len(), 1);
        assert!(!file("mappings.json").exists());
    }

    #[test]
    fn a_broken_json_file_stops_the_open_and_imports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = |n: &str| dir.path().join(n);
        std::fs::write(
            file("registry.json"),
            r#"{"acceptFilter":{"allowAll":true}}"#,
        )
        .unwrap();
        std::fs::write(file("mappings.json"), "[{").unwrap();
        let legacy = Legacy {
            state: Some(file("mappings.json")),
            registry: Some(file("registry.json")),
            otp: Some(file("otps.json")),
        };
        let err = Store::open(&file("relay.db"), &legacy).err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("state") && text.contains("mappings.json"),
            "{text}"
        );
        assert!(text.contains("move it aside"), "{text}");
        assert!(file("registry.json").exists() && file("mappings.json").exists());
        std::fs::remove_file(file("mappings.json")).unwrap();
        let s = Store::open(&file("relay.db"), &legacy).unwrap();
        assert!(s.filter().unwrap().allow_all);
    }
}
