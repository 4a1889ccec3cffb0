//! The operator's side of the remote terminal and browser (`iot-remote`):
//! the same wire format as the agent's services ([`crate::services::terminal::protocol`]),
//! spoken over a [`Link`] to the device's broker.
//!
//! A device is named by where it is reached:
//! - `nats://HOST:PORT` (or `tls://`): the device's NATS server (directly,
//!   or through the fleet's cluster its leaf node joins); subjects under
//!   `iot.agent.terminal` / `iot.agent.browser`.
//! - `mqtt://HOST:PORT/DEVICE_ID` (or `mqtts://`): the DMS broker; topics
//!   under `devices/terminal/DEVICE_ID` / `devices/browser/DEVICE_ID`.

pub mod browse;
pub mod link;
pub mod shell;
pub mod terminal;

pub use link::{Device, Link};
