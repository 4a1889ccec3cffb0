//! The agent's only calls into libc without a safe std equivalent: an
//! advisory file lock, signals to another process, and malloc's arena cap. Every `unsafe` block
//! of the crate is here (the crate denies `unsafe_code` elsewhere), each a
//! plain system call on values owned by the caller.
#![warn(missing_docs)]
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// flock(2) on an open file; `op` is `libc::LOCK_*`.
pub fn flock(file: &std::fs::File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: the descriptor belongs to `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// kill(2): sends `signal` to `pid` (0: only checks that the process exists
/// and may be signalled).
pub fn kill(pid: i32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Caps glibc malloc at `arenas` arenas, unless `MALLOC_ARENA_MAX` is set
/// (the operator's choice wins). glibc gives threads that allocate at the
/// same time arenas of their own, up to eight per core, and an arena keeps
/// what was freed into it: on the agent, whose tokio blocking threads come
/// and go with every SQLite write, that is resident memory nobody uses
/// (docs/benchmarks.md, "Footprint"). The agent's allocations are few and
/// small, so the lock they then share costs nothing measurable. Call it
/// before any thread starts.
pub fn limit_malloc_arenas(arenas: i32) {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt(3) takes two integers; called before other threads
    // exist, as glibc asks of arena settings.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}
