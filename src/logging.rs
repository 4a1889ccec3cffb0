//! Log output through tracing, friendly to journald: when the agent runs
//! under systemd (as a snap daemon does) journald adds timestamps and the
//! unit name itself, so the lines carry neither time nor colour.

use crate::config::LogLevel;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call once per process.
pub fn init(level: &LogLevel) {
    let filter = EnvFilter::try_new(directives(level)).unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let colour = std::io::stderr().is_terminal();
    let _ = if under_journald {
        builder.without_time().with_ansi(false).try_init()
    } else {
        builder.with_ansi(colour).try_init()
    };
}

/// A plain level applies to the agent; the NATS client's own per-event
/// lines (it logs every failed reconnect at info) are kept to warnings
/// unless debugging, because the agent logs connection state itself.
fn directives(level: &LogLevel) -> String {
    match level.as_str() {
        l @ ("info" | "warn" | "error" | "off") => format!("{l},async_nats=warn"),
        other => other.to_string(),
    }
}
