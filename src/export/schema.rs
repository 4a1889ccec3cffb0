//! Versioned schema of the spool: the SQL files of `migrations/export/`,
//! embedded in the binary and applied in order, each in its own
//! transaction, with the version recorded in `PRAGMA user_version`.
//!
//! Kept small and local on purpose: when the shared migration runner lands
//! (change history), this list is handed to it instead.

use rusqlite::Connection;

/// `(version, file name, SQL)`, in order, versions 1, 2, 3...
pub const MIGRATIONS: &[(u32, &str, &str)] = &[(
    1,
    "0001_spool.sql",
    include_str!("../../migrations/export/0001_spool.sql"),
)];

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the spool has schema version {found}, newer than this agent knows ({known}); \
         it was written by a newer iot-agent"
    )]
    TooNew { found: u32, known: u32 },
    #[error("migration {file} failed: {source}")]
    Failed {
        file: &'static str,
        source: rusqlite::Error,
    },
    #[error("cannot read the schema version: {0}")]
    Version(rusqlite::Error),
}

/// The newest schema version this build knows.
pub fn latest() -> u32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Brings the database up to [`latest`]; returns the version it had.
pub fn migrate(conn: &mut Connection) -> Result<u32, SchemaError> {
    let found = version(conn)?;
    if found > latest() {
        return Err(SchemaError::TooNew {
            found,
            known: latest(),
        });
    }
    for &(v, file, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        let apply = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // Another process may have migrated while we waited for the lock.
            let now: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            if now < v {
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", v)?;
            }
            tx.commit()
        };
        apply(conn).map_err(|source| SchemaError::Failed { file, source })?;
    }
    Ok(found)
}

pub fn version(conn: &Connection) -> Result<u32, SchemaError> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(SchemaError::Version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_apply_once() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.0 as usize, i + 1, "{}", m.1);
            assert!(m.1.starts_with(&format!("{:04}_", m.0)), "{}", m.1);
        }
        let mut c = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut c).unwrap(), 0);
        assert_eq!(version(&c).unwrap(), latest());
        // A second run changes nothing (and does not fail on CREATE TABLE).
        assert_eq!(migrate(&mut c).unwrap(), latest());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let mut c = Connection::open_in_memory().unwrap();
        c.pragma_update(None, "user_version", latest() + 1).unwrap();
        let err = migrate(&mut c).unwrap_err();
        assert!(err.to_string().contains("newer"), "{err}");
    }
}
