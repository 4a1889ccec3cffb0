//! The NATS server the agent brings along (the snap's `nats` daemon, and
//! `scripts/run` outside a snap): its configuration generated from the
//! agent's ([`render`]), its passwords generated on first use
//! ([`secrets`]), and applying a new configuration to a running server
//! (SIGHUP when users changed, a restart when the listeners did).
//!
//! Files, under the data directory (`$SNAP_DATA` in the snap):
//! `nats/nats-server.conf` (0600: it holds the passwords),
//! `nats/nats-server.pid`, `nats/snapd.password` (the agent's generated
//! password) and `nats/device/{user,password}` (the `device` user's, the
//! directory the snap's `nats-device` content slot shares).

pub mod render;
pub mod secrets;

use crate::config::{Config, Loaded, Source};
use crate::fsutil;
use std::path::{Path, PathBuf};

/// Why the bundled server's configuration cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    /// The keys do not make a valid configuration.
    #[error("cannot generate the NATS server configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{what} {path}: {err}")]
    Io {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        err: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NatsServerError {
    let path = path.to_path_buf();
    move |err| NatsServerError::Io { what, path, err }
}

/// Where the bundled server's files are.
#[derive(Debug, Clone)]
pub struct Files {
    /// The server's directory (`$SNAP_DATA/nats`).
    pub dir: PathBuf,
    /// The generated `nats-server.conf`.
    pub conf: PathBuf,
    /// The server's pid file (for a reload).
    pub pid: PathBuf,
    /// The agent's own generated password (0600).
    pub agent_password: PathBuf,
    /// Where other snaps find the device user's credentials.
    pub device_dir: PathBuf,
    /// The device user's name, for other snaps.
    pub device_user: PathBuf,
    /// The device user's password, for other snaps.
    pub device_password: PathBuf,
}

impl Files {
    /// The files for this configuration.
    pub fn of(config: &Config) -> Files {
        let dir = config.data_dir().join("nats");
        let device_dir = dir.join("device");
        Files {
            conf: dir.join("nats-server.conf"),
            pid: dir.join("nats-server.pid"),
            agent_password: dir.join("snapd.password"),
            device_user: device_dir.join("user"),
            device_password: device_dir.join("password"),
            device_dir,
            dir,
        }
    }
}

/// Puts the generated passwords into `config` where the operator has set
/// none (read at load, so the agent logs in with what the server was
/// configured with). Files that do not exist yet, or cannot be read by
/// this user, leave the configuration as it is.
pub fn resolve_generated(loaded_source: impl Fn(&str) -> Source, config: &mut Config) {
    let files = Files::of(config);
    if loaded_source("nats.snapd.password") == Source::Default {
        if let Some(p) = secrets::read(&files.agent_password) {
            config.nats.snapd.password = p;
        }
    }
    if config.nats.device.password.is_empty() {
        if let Some(p) = secrets::read(&files.device_password) {
            config.nats.device.password = p;
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `nats.bundled` is false: nothing written.
    Disabled,
    /// The configuration on disk was already this one.
    Unchanged,
    /// Written; no server runs from it (it reads it when it starts).
    Written,
    /// Written, and the running server was told to reload it (SIGHUP).
    Reloaded,
    /// Written, but the listeners or the store changed, which nats-server
    /// cannot reload: the server must be restarted.
    Restart,
}

impl Outcome {
    /// The word the log and `nats-config` print.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Disabled => "disabled",
            Outcome::Unchanged => "unchanged",
            Outcome::Written => "written",
            Outcome::Reloaded => "reloaded",
            Outcome::Restart => "restart",
        }
    }
}

/// Generates the passwords that are missing, writes the configuration
/// (atomically, 0600) when it differs from the one on disk, and, with
/// `reload`, makes a running server take it: SIGHUP when only users or
/// leaf nodes changed, [`Outcome::Restart`] when more did.
pub fn apply(loaded: &Loaded, reload: bool) -> Result<Outcome, NatsServerError> {
    let config = &loaded.config;
    if !config.nats.bundled {
        return Ok(Outcome::Disabled);
    }
    let files = Files::of(config);
    let agent = if loaded.source("nats.snapd.password") == Source::Default
        || config.nats.snapd.password.is_empty()
    {
        secrets::ensure(&files.agent_password)?
    } else {
        config.nats.snapd.password.clone()
    };
    let device = if loaded.source("nats.device.password") == Source::Default
        || config.nats.device.password.is_empty()
    {
        secrets::ensure(&files.device_password)?
    } else {
        config.nats.device.password.clone()
    };
    // The user name next to the password: what a consumer of the content
    // slot needs to log in.
    let user_line = format!("{}\n", config.nats.device.user);
    if std::fs::read_to_string(&files.device_user).ok().as_deref() != Some(&user_line) {
        fsutil::write_atomic(
            &files.device_user,
            user_line.as_bytes(),
            fsutil::SECRET_MODE,
        )
        .map_err(io("cannot write", &files.device_user))?;
    }
    let text = render::render(
        config,
        &files,
        &render::Passwords {
            agent: &agent,
            device: &device,
        },
    )?;
    let old = std::fs::read_to_string(&files.conf).ok();
    if old.as_deref() == Some(text.as_str()) {
        return Ok(Outcome::Unchanged);
    }
    fsutil::write_atomic(&files.conf, text.as_bytes(), fsutil::SECRET_MODE)
        .map_err(io("cannot write", &files.conf))?;
    let Some(pid) = running_server(&files.pid) else {
        return Ok(Outcome::Written);
    };
    let fixed = |t: &str| {
        t.split(render::RELOADABLE_MARKER)
            .next()
            .map(str::to_string)
    };
    if old.as_deref().and_then(fixed) != fixed(&text) {
        return Ok(Outcome::Restart);
    }
    if !reload {
        return Ok(Outcome::Written);
    }
    // The pid is read from the server's own pid file and checked to be a
    // live nats-server just above.
    if let Err(err) = crate::sys::kill(pid, libc::SIGHUP) {
        return Err(NatsServerError::Io {
            what: "cannot signal nats-server from",
            path: files.pid.clone(),
            err,
        });
    }
    Ok(Outcome::Reloaded)
}

/// The pid of the live nats-server named by `pid_file`; `None` for a
/// missing or stale file (a pid now used by another program is never
/// signalled).
pub fn running_server(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "nats-server").then_some(pid)
}

/// The nats-server binary: the staged one in the snap, else from `PATH`.
pub fn server_binary() -> PathBuf {
    match std::env::var_os("SNAP") {
        Some(snap) => Path::new(&snap).join("usr/sbin/nats-server"),
        None => PathBuf::from("nats-server"),
    }
}
