//! iot-agent: a device-management agent for Ubuntu Core.
//!
//! Module map (see `README.md` for the picture):
//! - [`config`]: the layered configuration, one key namespace everywhere;
//! - [`snapd`]: the REST client over snapd's unix socket;
//! - [`identity`]: enrollment with the identity service, the credential store;
//! - [`bus`]: broker connections and the topic vocabulary;
//! - [`supervisor`]: runs subsystems, restarts them, stops them on signal;
//! - [`services`]: what the agent answers and watches;
//! - [`changes`]: snapd's changes: the poller, the history (SQLite), the watchdog;
//! - [`db`]: SQLite databases and their schema migrations;
//! - [`export`]: store-and-forward telemetry (spool, upstream forwarding);
//! - [`tls`]: the one TLS client builder (roots, client certificate, verify mode);
//! - [`agent`]: the `run` command that wires it all together.

pub mod agent;
pub mod backoff;
pub mod bus;
pub mod changes;
pub mod commands;
pub mod config;
pub mod control;
pub mod db;
pub mod errors;
pub mod export;
pub mod fsutil;
pub mod identity;
pub mod logging;
pub mod services;
pub mod snapd;
pub mod supervisor;
pub mod tls;
