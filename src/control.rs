//! The running daemon, seen from a one-shot command: its pid file in the
//! data directory, and SIGHUP to make it reload its enrollment (after
//! `unregister` or `enroll` changed the stored credentials).

use std::io;
use std::path::{Path, PathBuf};

pub const PID_FILE: &str = "agent.pid";

pub fn pid_path(data_dir: &Path) -> PathBuf {
    data_dir.join(PID_FILE)
}

/// Records this process as the running daemon.
pub fn write_pid(data_dir: &Path) -> io::Result<()> {
    crate::fsutil::write_atomic(
        &pid_path(data_dir),
        format!("{}\n", std::process::id()).as_bytes(),
        0o644,
    )
}

/// Removes the pid file if it still names this process.
pub fn remove_pid(data_dir: &Path) {
    if running_daemon(data_dir) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(pid_path(data_dir));
    }
}

/// The pid of the running daemon, if its pid file names a live process.
pub fn running_daemon(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(pid_path(data_dir)).ok()?;
    let pid: i32 = text.trim().parse().ok().filter(|p| *p > 0)?;
    // Signal 0 checks that the process exists and may be signalled.
    (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Asks the daemon to reload its enrollment.
pub fn signal_reload(pid: i32) -> io::Result<()> {
    if unsafe { libc::kill(pid, libc::SIGHUP) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
