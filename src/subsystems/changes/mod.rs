//! snapd's changes: read once by the [`poller`], stored and logged by the
//! [`history`] (snaplogger), watched by the [`watchdog`] that reboots a
//! device whose change is stuck.
//!
//! ```text
//! snapd --GET /v2/changes--> Poller --watch<Snapshot>--> History  -> SQLite (store)
//!        (/v2/notices wakes it)    |                 \-> Watchdog -> report + reboot
//!                                  \--follow(id)--> DMS completion reports,
//!                                                   required-install, mirror
//!                                                   change events (NATS)
//! ```

pub mod guard;
pub mod history;
pub mod poller;
pub mod store;
pub mod watchdog;

pub use history::History;
pub use poller::{ChangeEvent, Following, Poller, Snapshot, SnapshotRx};
pub use store::Store;
pub use watchdog::Watchdog;
