//! The credential store: `params` and `.secret` in the data directory,
//! `device-data.bin` in the common directory, all written atomically with
//! mode 0600 (the file names are what operators and the `unregister`
//! tooling expect). Also the enrollment state record that `iot-agent
//! status` reads while the daemon runs.

use super::credentials::{device_data, Credentials};
use super::wire::Enrollment;
use super::EnrollState;
use crate::fsutil::{remove_if_exists, write_atomic, SECRET_MODE};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The enrollment and its credentials (0600), in the data directory.
pub const SECRET_FILE: &str = ".secret";
/// Where the credentials came from (service URL and endpoint).
pub const PARAMS_FILE: &str = "params";
/// The device data the service sent, as is.
pub const DEVICE_DATA_FILE: &str = "device-data.bin";
/// The daemon's latest enrollment state, for `iot-agent status`.
pub const STATE_FILE: &str = "enrollment-state.json";

/// The credential store: files in the snap's data and common directories, written atomically at 0600.
#[derive(Debug, Clone)]
pub struct Store {
    data_dir: PathBuf,
    common_dir: PathBuf,
}

/// What the store holds.
pub enum Stored {
    /// Nothing stored: not enrolled.
    Missing,
    /// A complete, parseable enrollment.
    Valid {
        /// What the DMS link needs.
        credentials: Arc<Credentials>,
        /// The enrollment as the service sent it.
        enrollment: Box<Enrollment>,
    },
    /// Present but unusable (half-written, edited, truncated): re-enroll.
    Corrupt(String),
}

/// `params`: where the credentials came from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Params {
    /// The identity service's URL.
    pub url: String,
    /// The enrollment endpoint's path.
    pub path: String,
}

/// The daemon's latest enrollment state, for `iot-agent status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateRecord {
    /// The state.
    #[serde(flatten)]
    pub state: EnrollState,
    /// A line for the operator.
    pub message: String,
    /// When the state was entered (RFC 3339).
    pub since: String,
}

impl Store {
    /// A store in these directories.
    pub fn new(data_dir: &Path, common_dir: &Path) -> Self {
        Store {
            data_dir: data_dir.to_path_buf(),
            common_dir: common_dir.to_path_buf(),
        }
    }

    /// The store in the configured `dirs.data` and `dirs.common`.
    pub fn from_config(c: &crate::config::Config) -> Self {
        Self::new(c.data_dir(), c.common_dir())
    }

    /// `.secret`'s path.
    pub fn secret_path(&self) -> PathBuf {
        self.data_dir.join(SECRET_FILE)
    }
    /// `params`'s path.
    pub fn params_path(&self) -> PathBuf {
        self.data_dir.join(PARAMS_FILE)
    }
    /// `device-data.bin`'s path.
    pub fn device_data_path(&self) -> PathBuf {
        self.common_dir.join(DEVICE_DATA_FILE)
    }
    /// `enrollment-state.json`'s path.
    pub fn state_path(&self) -> PathBuf {
        self.data_dir.join(STATE_FILE)
    }

    /// Reads and checks the stored enrollment.
    pub fn load(&self) -> Stored {
        let bytes = match std::fs::read(self.secret_path()) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Stored::Missing,
            Err(e) => return Stored::Corrupt(format!("cannot read it ({e})")),
        };
        let enrollment: Enrollment = match serde_json::from_slice(&bytes) {
            Ok(e) => e,
            Err(e) => return Stored::Corrupt(format!("it is not an enrollment ({e})")),
        };
        self.scrub(&bytes, &enrollment);
        match Credentials::from_enrollment(&enrollment) {
            Ok(credentials) => Stored::Valid {
                credentials,
                enrollment: Box::new(enrollment),
            },
            Err(e) => Stored::Corrupt(e.to_string()),
        }
    }

    /// Rewrites a `.secret` that holds the organization's private key (the
    /// reference agent stored the whole answer, key `"-"` included) without
    /// it. Parsing already dropped the key; writing the parsed enrollment
    /// back removes it from the disk too.
    fn scrub(&self, bytes: &[u8], enrollment: &Enrollment) {
        let holds_key = serde_json::from_slice::<serde_json::Value>(bytes)
            .map(|v| has_key(&v, "-"))
            .unwrap_or(false);
        if !holds_key {
            return;
        }
        let written = serde_json::to_vec(enrollment)
            .map_err(io::Error::other)
            .and_then(|clean| write_atomic(&self.secret_path(), &clean, SECRET_MODE));
        match written {
            Ok(()) => tracing::info!(
                file = %self.secret_path().display(),
                "removed the organization's private key from the stored enrollment"
            ),
            Err(e) => tracing::warn!(
                file = %self.secret_path().display(),
                error = %e,
                "the stored enrollment holds the organization's private key and cannot be rewritten without it"
            ),
        }
    }

    /// Stores a checked enrollment. `.secret` is written last: it is the
    /// mark of a complete enrollment.
    pub fn save(&self, url: &str, e: &Enrollment) -> io::Result<()> {
        let data = device_data(e).map_err(|u| io::Error::new(io::ErrorKind::InvalidData, u))?;
        write_atomic(&self.device_data_path(), &data, SECRET_MODE)?;
        let params = Params {
            url: url.to_string(),
            path: self.data_dir.display().to_string(),
        };
        write_atomic(
            &self.params_path(),
            &serde_json::to_vec(&params).map_err(io::Error::other)?,
            SECRET_MODE,
        )?;
        write_atomic(
            &self.secret_path(),
            &serde_json::to_vec(e).map_err(io::Error::other)?,
            SECRET_MODE,
        )
    }

    /// Forgets the enrollment (`.secret` and `params`), as unregister does.
    pub fn clear(&self) -> io::Result<()> {
        remove_if_exists(&self.secret_path())?;
        remove_if_exists(&self.params_path())
    }

    /// The stored `params`, if readable.
    pub fn params(&self) -> Option<Params> {
        let bytes = std::fs::read(self.params_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records the daemon's state (atomically).
    pub fn write_state(&self, state: &EnrollState) -> io::Result<()> {
        let rec = StateRecord {
            state: state.clone(),
            message: state.to_string(),
            since: crate::clock::now_rfc3339_seconds(),
        };
        write_atomic(
            &self.state_path(),
            &serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?,
            SECRET_MODE,
        )
    }

    /// The recorded state, if any.
    pub fn read_state(&self) -> Option<StateRecord> {
        let bytes = std::fs::read(self.state_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Whether `key` names a member of any object in `v`.
fn has_key(v: &serde_json::Value, key: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => m.contains_key(key) || m.values().any(|x| has_key(x, key)),
        serde_json::Value::Array(a) => a.iter().any(|x| has_key(x, key)),
        _ => false,
    }
}
