//! The agent's only calls into libc without a safe std equivalent: an
//! advisory file lock and signals to another process. Every `unsafe` block
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
