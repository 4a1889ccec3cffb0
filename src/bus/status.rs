//! The state of the DMS's MQTT connection, shared between the side that
//! owns the connection (it sends) and the services that report it (the
//! `iot.agent.mqtt.connection.status` subject reads).
//!
//! A `watch` channel rather than a shared lock: readers always see the
//! latest value without waiting on the writer, and the writer never learns
//! (or cares) how many readers there are.
#![warn(missing_docs)]

use tokio::sync::watch;

/// What is known about a connection right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStatus {
    /// Connected to the broker now.
    pub connected: bool,
    /// Why it is not connected (the last error), when known.
    pub error: Option<String>,
}

impl ConnectionStatus {
    /// Connected, no error.
    pub fn connected() -> Self {
        ConnectionStatus {
            connected: true,
            error: None,
        }
    }

    /// Not connected, for the reason given.
    pub fn disconnected(why: impl Into<String>) -> Self {
        ConnectionStatus {
            connected: false,
            error: Some(why.into()),
        }
    }

    /// The state before anything tried to connect.
    pub fn not_established() -> Self {
        Self::disconnected("the DMS MQTT connection is not established")
    }
}

/// The sending half, held by whoever owns the MQTT connection.
pub type StatusTx = watch::Sender<ConnectionStatus>;
/// The reading half, cloned into every service that reports the state.
pub type StatusRx = watch::Receiver<ConnectionStatus>;

/// A new channel in the [`ConnectionStatus::not_established`] state.
pub fn mqtt_status_channel() -> (StatusTx, StatusRx) {
    watch::channel(ConnectionStatus::not_established())
}
