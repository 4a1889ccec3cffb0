//! Sessions that outlived their agent. Closing, the idle timeout and a
//! shutdown kill a session's processes; an agent killed with SIGKILL (or a
//! crash) cannot. So every open session is recorded in a file
//! (`{dirs.data}/terminal/{session}`: the shell's pid and its start time in
//! clock ticks after boot) while it runs, and the next start of the agent
//! kills what those files name, once it checked the pid is still that
//! shell (the start time tells a reused pid apart).

use std::path::{Path, PathBuf};

/// The record of a running session.
pub struct Record {
    path: Option<PathBuf>,
}

impl Record {
    /// Writes the record of session `id` (shell `pid`) under `dir`; a
    /// failure is logged (the session runs; only the crash cleanup is lost).
    pub fn write(dir: Option<&Path>, id: &str, pid: u32) -> Record {
        let Some(dir) = dir else {
            return Record { path: None };
        };
        let Some(start) = start_time(pid as i32) else {
            return Record { path: None };
        };
        let path = dir.join(id);
        let r = crate::fsutil::make_private_dir(dir).and_then(|()| {
            crate::fsutil::write_atomic(&path, format!("{pid} {start}\n").as_bytes(), 0o600)
        });
        match r {
            Ok(()) => Record { path: Some(path) },
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the terminal session; a crash of the agent would leave it running");
                Record { path: None }
            }
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = crate::fsutil::remove_if_exists(p);
        }
    }
}

/// The start time of a process (clock ticks after boot), `None` when gone.
fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid)
        .ok()?
        .stat()
        .ok()
        .map(|s| s.starttime)
}

/// Kills the sessions recorded under `dir` by an agent that is gone, and
/// removes their records. Returns how many were still running.
pub async fn reap(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut killed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parts = text.split_whitespace();
        let (Some(pid), Some(start)) = (
            parts.next().and_then(|p| p.parse::<i32>().ok()),
            parts.next().and_then(|s| s.parse::<u64>().ok()),
        ) else {
            let _ = crate::fsutil::remove_if_exists(&path);
            continue;
        };
        // The shell itself (its start time tells a reused pid apart), or
        // processes of its session that outlived it (a session id is the
        // leader's pid, and is not reused while a member runs).
        let leader = pid > 1 && start_time(pid) == Some(start);
        if leader || (pid > 1 && !super::session::session_members(pid).is_empty()) {
            super::session::kill_session(pid as u32).await;
            tracing::warn!(
                session = %e.file_name().to_string_lossy(),
                pid,
                "killed a terminal session left running by an agent that stopped without closing it"
            );
            killed += 1;
        }
        let _ = crate::fsutil::remove_if_exists(&path);
    }
    killed
}
