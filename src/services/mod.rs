//! Services: what the agent answers on a bus (NATS or the DMS's MQTT), one
//! module per request tree. A service keeps no state of its own beyond what
//! an answer needs (a ledger of actions, a queue of requests); parts that
//! own state and run on their own are [`crate::subsystems`].
//!
//! - [`dms`]: the DMS's remote actions, heartbeats and metrics (MQTT);
//! - [`mirror`]: snapd's REST API on NATS subjects;
//! - [`per_serial`]: the per-serial action tree `devices/actions/{serial}/...`
//!   on both transports;
//! - [`snapd_health`]: the agent's view of snapd's reachability.

pub mod browser;
pub mod dms;
pub mod mirror;
pub mod outlet;
pub mod per_serial;
pub mod snapd_health;
pub mod terminal;
