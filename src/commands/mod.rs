//! The one-shot subcommands of `iot-agent` (the daemon is [`crate::agent`]).
//! Each returns the process exit code; errors are printed by `main`.

pub mod changes;
pub mod config;
pub mod enroll;
pub mod export;
pub mod nats;
pub mod provisioning;
pub mod sign;
pub mod status;
pub mod unregister;

use std::io::Write;

/// Writes to stdout; a closed pipe (`iot-agent config | head`) is not an error.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A current-thread runtime for a one-shot command.
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f))
}
