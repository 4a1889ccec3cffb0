//! SQLite databases of the agent: opening them the same way everywhere and
//! upgrading their schema in place.
//!
//! Each database owns a list of [`Migration`]s (files under `migrations/`,
//! embedded with `include_str!`). Migration N brings the schema from version
//! N-1 to N; the version lives in SQLite's `user_version`, so no bookkeeping
//! table can disagree with the schema it describes. A migration runs in the
//! same `BEGIN IMMEDIATE` transaction that bumps the version: a crash leaves
//! the old schema or the new one, and two processes opening the same file
//! at once (the history and the watchdog) do not both apply it.
//!
//! Errors are classified ([`DbError`]) so the log says what the operator can
//! do: a corrupt file, a file locked by someone else, a read-only or full
//! disk each get their own advice.

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a writer waits for another one before giving up with "locked".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One schema step of a database.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The schema version this migration produces (1, 2, ... without gaps).
    pub version: u32,
    /// The file name, for messages.
    pub name: &'static str,
    /// The migration's SQL, run in one transaction.
    pub sql: &'static str,
}

/// What went wrong with a database, with the advice the log line carries.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The file is not an SQLite database, or is damaged.
    #[error("database {path} is corrupt or not an SQLite file ({source}); move it aside (the agent then starts a new one) or restore a backup")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// Another process holds the lock longer than [`BUSY_TIMEOUT`].
    #[error("database {path} is locked by another process ({source}); the agent retries; if it persists, find the process holding it (fuser {path})")]
    Locked {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file or its directory cannot be written.
    #[error("database {path} cannot be written ({source}): the file, its directory or the disk is read-only or not ours; fix the permissions or set the location to a writable place")]
    ReadOnly {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The disk is full.
    #[error("database {path}: the disk is full ({source}); free space on it (the agent retries)")]
    Full {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A read-only open of a file that does not exist yet.
    #[error("database {path} does not exist yet; the agent creates it when it runs")]
    Missing {
        /// The database file.
        path: PathBuf,
    },
    /// The schema was written by a newer agent.
    #[error("database {path} has schema version {found}, newer than this agent knows ({known}); it was written by a newer iot-agent: upgrade the agent or move the file aside")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The file's schema version.
        found: u32,
        /// The newest version this build knows.
        known: u32,
    },
    /// The database's directory cannot be created.
    #[error("database {path}: cannot create its directory: {source}")]
    Dir {
        /// The database file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file cannot be created at mode 0600.
    #[error("database {path}: cannot create it or make it private (0600): {source}")]
    Private {
        /// The database file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A migration's SQL failed (its transaction is rolled back).
    #[error("database {path}: migration {name} failed: {source}")]
    Migration {
        /// The database file.
        path: PathBuf,
        /// The migration's file name.
        name: &'static str,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// Any other SQLite error.
    #[error("database {path}: {source}")]
    Other {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

impl DbError {
    /// Classifies a rusqlite error on the database at `path`.
    pub fn classify(path: &Path, source: rusqlite::Error) -> DbError {
        let path = path.to_path_buf();
        let code = match &source {
            rusqlite::Error::SqliteFailure(e, _) => Some(e.code),
            _ => None,
        };
        use rusqlite::ErrorCode as C;
        match code {
            Some(C::DatabaseCorrupt | C::NotADatabase) => DbError::Corrupt { path, source },
            Some(C::DatabaseBusy | C::DatabaseLocked) => DbError::Locked { path, source },
            Some(C::ReadOnly | C::PermissionDenied | C::CannotOpen) => {
                DbError::ReadOnly { path, source }
            }
            Some(C::DiskFull) => DbError::Full { path, source },
            _ => DbError::Other { path, source },
        }
    }

    /// A migration failure keeps its class when the class has advice.
    fn in_migration(path: &Path, name: &'static str, source: rusqlite::Error) -> DbError {
        match DbError::classify(path, source) {
            DbError::Other { path, source } => DbError::Migration { path, name, source },
            classified => classified,
        }
    }
}

/// The latest version a migration list produces.
pub fn latest(migrations: &[Migration]) -> u32 {
    migrations.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Opens (creating it and its directory if needed) a database for writing
/// and brings its schema up to date. WAL mode lets readers (`iot-agent
/// changes`) read while the daemon writes.
pub fn open(path: &Path, migrations: &[Migration]) -> Result<Connection, DbError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DbError::Dir {
            path: path.to_path_buf(),
            source,
        })?;
    }
    // 0600 before SQLite writes a byte (it gives -wal/-shm the same mode).
    crate::fsutil::make_private_file(path).map_err(|source| DbError::Private {
        path: path.to_path_buf(),
        source,
    })?;
    let err = |e| DbError::classify(path, e);
    let conn = Connection::open(path).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // The first statement that reads the file: a corrupt or foreign file
    // fails here, before any migration touches it.
    conn.pragma_update(None, "journal_mode", "wal")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "normal")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(err)?;
    migrate(&conn, path, migrations)?;
    Ok(conn)
}

/// Opens an existing database read-only (the CLI, while the daemon runs).
/// Refuses a schema newer than `migrations` know; an older one is read as
/// it is (the daemon upgrades it).
pub fn open_read_only(path: &Path, migrations: &[Migration]) -> Result<Connection, DbError> {
    if !path.exists() {
        return Err(DbError::Missing {
            path: path.to_path_buf(),
        });
    }
    let err = |e| DbError::classify(path, e);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    let found = user_version(&conn).map_err(err)?;
    let known = latest(migrations);
    if found > known {
        return Err(DbError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    Ok(conn)
}

/// The schema version recorded in the file.
pub fn user_version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Applies the migrations newer than the file's version, each in its own
/// transaction together with the version bump.
pub fn migrate(conn: &Connection, path: &Path, migrations: &[Migration]) -> Result<(), DbError> {
    debug_assert!(
        migrations
            .iter()
            .enumerate()
            .all(|(i, m)| m.version as usize == i + 1),
        "migrations must be numbered 1, 2, ... in order"
    );
    let known = latest(migrations);
    for m in migrations {
        // IMMEDIATE takes the write lock first, so the version read below is
        // the one this transaction will change (another process may have
        // migrated in between).
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
            .map_err(|e| DbError::classify(path, e))?;
        let found = user_version(&tx).map_err(|e| DbError::classify(path, e))?;
        if found > known {
            return Err(DbError::TooNew {
                path: path.to_path_buf(),
                found,
                known,
            });
        }
        if found >= m.version {
            continue;
        }
        tx.execute_batch(m.sql)
            .map_err(|e| DbError::in_migration(path, m.name, e))?;
        // PRAGMA takes no parameters; the version is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", m.version))
            .map_err(|e| DbError::in_migration(path, m.name, e))?;
        tx.commit()
            .map_err(|e| DbError::in_migration(path, m.name, e))?;
        tracing::info!(database = %path.display(), migration = m.name, version = m.version, "database schema upgraded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: Migration = Migration {
        version: 1,
        name: "0001_a.sql",
        sql: "CREATE TABLE a (x INTEGER);",
    };
    const V2: Migration = Migration {
        version: 2,
        name: "0002_b.sql",
        sql: "ALTER TABLE a ADD COLUMN y TEXT NOT NULL DEFAULT 'new';",
    };

    #[test]
    fn upgrades_in_place_and_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/t.db");
        let c = open(&path, &[V1]).unwrap();
        c.execute("INSERT INTO a (x) VALUES (7)", []).unwrap();
        assert_eq!(user_version(&c).unwrap(), 1);
        drop(c);
        let c = open(&path, &[V1, V2]).unwrap();
        assert_eq!(user_version(&c).unwrap(), 2);
        let (x, y): (i64, String) = c
            .query_row("SELECT x, y FROM a", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((x, y.as_str()), (7, "new"));
        // Opening again applies nothing.
        drop(c);
        open(&path, &[V1, V2]).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(open(&path, &[V1, V2]).unwrap());
        let err = open(&path, &[V1]).unwrap_err();
        assert!(
            matches!(
                err,
                DbError::TooNew {
                    found: 2,
                    known: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade the agent"), "{err}");
        let err = open_read_only(&path, &[V1]).unwrap_err();
        assert!(matches!(err, DbError::TooNew { .. }), "{err}");
    }

    #[test]
    fn a_failing_migration_leaves_the_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(open(&path, &[V1]).unwrap());
        let bad = Migration {
            version: 2,
            name: "0002_bad.sql",
            sql: "ALTER TABLE a ADD COLUMN z TEXT; SELECT * FROM nowhere;",
        };
        let err = open(&path, &[V1, bad]).unwrap_err();
        assert!(err.to_string().contains("0002_bad.sql"), "{err}");
        let c = open_read_only(&path, &[V1, bad]).unwrap();
        assert_eq!(user_version(&c).unwrap(), 1);
        // The half-applied column was rolled back with the transaction.
        assert!(c.prepare("SELECT z FROM a").is_err());
    }

    #[test]
    fn garbage_files_are_reported_as_corrupt_and_missing_ones_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = open(&path, &[V1]).unwrap_err();
        assert!(matches!(err, DbError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("move it aside"), "{err}");
        let err = open_read_only(&dir.path().join("none.db"), &[V1]).unwrap_err();
        assert!(matches!(err, DbError::Missing { .. }), "{err}");
    }
}
