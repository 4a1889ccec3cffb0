//! The running daemon, seen from a one-shot command: its pid file in the
//! data directory, and SIGHUP to make it reload its enrollment (after
//! `unregister` or `enroll` changed the stored credentials).

use std::io;
use std::path::{Path, PathBuf};

/// The running agent's pid file, in the data directory.
pub const PID_FILE: &str = "agent.pid";

/// Where the running agent's pid file is.
pub fn pid_path(data_dir: &Path) -> PathBuf {
    data_dir.join(PID_FILE)
}

/// The daemon's hold on its pid file: an exclusive `flock` for as long as
/// the process lives (the kernel drops it when the process ends, even on
/// SIGKILL). A pid file nobody holds is stale, whatever process now has
/// that pid.
#[derive(Debug)]
pub struct PidLock {
    _file: std::fs::File,
}

use crate::sys::flock;

/// Records this process as the running daemon and holds the lock. Fails
/// when another daemon holds it.
pub fn write_pid(data_dir: &Path) -> io::Result<PidLock> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = pid_path(data_dir);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)?;
    flock(&file, libc::LOCK_EX | libc::LOCK_NB).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("{} is locked by another running agent: {e}", path.display()),
        )
    })?;
    file.set_len(0)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    file.sync_all()?;
    Ok(PidLock { _file: file })
}

/// Removes the pid file if it still names this process.
pub fn remove_pid(data_dir: &Path) {
    if running_daemon(data_dir) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(pid_path(data_dir));
    }
}

/// The pid of the running daemon: only when its pid file is locked (a
/// stale file may name an unrelated process that reused the pid).
pub fn running_daemon(data_dir: &Path) -> Option<i32> {
    let file = std::fs::File::open(pid_path(data_dir)).ok()?;
    match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
        // Nobody holds it: stale.
        Ok(()) => return None,
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {}
        Err(_) => return None,
    }
    let text = std::fs::read_to_string(pid_path(data_dir)).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0)?;
    // Signal 0 checks that the process exists and may be signalled.
    crate::sys::kill(pid, 0).ok().map(|()| pid)
}

/// Asks the daemon to reload its enrollment.
pub fn signal_reload(pid: i32) -> io::Result<()> {
    crate::sys::kill(pid, libc::SIGHUP)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stale pid file naming a live, unrelated process (the pid was
    /// reused) is not the daemon; the locked one is.
    #[test]
    fn only_a_locked_pid_file_names_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(pid_path(dir.path()), format!("{}\n", other.id())).unwrap();
        assert_eq!(running_daemon(dir.path()), None, "an unrelated process");
        let lock = write_pid(dir.path()).unwrap();
        assert_eq!(running_daemon(dir.path()), Some(std::process::id() as i32));
        assert!(write_pid(dir.path()).is_err(), "a second daemon");
        drop(lock);
        assert_eq!(running_daemon(dir.path()), None);
        let _ = other.kill();
        let _ = other.wait();
    }
}
