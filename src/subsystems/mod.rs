//! Subsystems: parts that own state and work on their own (a database, a
//! queue, a connection they keep up), whatever the bus asks of them. They are
//! supervised like services ([`crate::supervisor::Subsystem`]); what sets
//! them apart is that stopping one mid-way must lose nothing it accepted.
//!
//! - [`changes`]: snapd's changes: the poller, the SQLite history, the watchdog;
//! - [`export`]: store-and-forward telemetry (spool, upstream forwarding);
//! - [`tunnel`]: the tunnel client, one connection to an `iot-relay` that
//!   opens streams to allowed device-local ports (off until configured);
//! - [`provisioning`]: the device certificate from an EST server with a
//!   one-time password, renewed over mutual TLS (off until configured).

pub mod changes;
pub mod export;
pub mod provisioning;
pub mod tunnel;
