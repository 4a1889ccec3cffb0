//! The MQTT connection to the DMS broker: mutual TLS with the enrollment's
//! credentials and the server verified (the TLS configuration is built by
//! [`crate::tls`] from the enrollment and `dms.ca` / `dms.verify`).
//!
//! The connection itself is run by the shared [`super::driver`].
#![warn(missing_docs)]

use super::driver::{self, DriverSettings, Reconnect};
pub use super::driver::{Confirmation, MqttHandle, MqttLink, MqttMessage, PublishError};
use super::status::ConnectionStatus;
use super::Topic;
use crate::identity::Credentials;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// QoS 1 publishes (responses, results) awaiting their PUBACK at once.
const WINDOW: u16 = 64;

/// Why the DMS link could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// The enrollment's certificate or key is unusable.
    #[error("the device credentials cannot be used for TLS: {0}")]
    Credentials(String),
    /// A publish failed.
    #[error("cannot publish on {topic}: {detail}")]
    Publish {
        /// Where it was for.
        topic: String,
        /// Why it failed.
        detail: String,
    },
}

/// The DMS connection's options for device `client_id` (the fleet
/// simulator, `benches/fleet.rs`, connects its simulated devices with them).
pub fn options(
    client_id: &str,
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    keep_alive: Duration,
) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(keep_alive)
        // A persistent session: the broker keeps QoS 1 actions sent while the
        // device was offline.
        .set_clean_session(false)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts
}

/// Largest MQTT packet either way (a `list` reply of many snaps); a limit,
/// not a buffer: buffers grow to the packets that come.
pub const MAX_PACKET: usize = 1024 * 1024;

/// Connects with the credentials and drives the connection (see
/// [`super::driver`]) until `shutdown`. `subscriptions` are (re)subscribed
/// at QoS 1 on every new connection. `status` follows the connection for
/// the outside world.
pub fn connect(
    c: &Credentials,
    tls: Arc<rustls::ClientConfig>,
    subscriptions: Vec<Topic>,
    keep_alive: Duration,
    status: watch::Sender<ConnectionStatus>,
    shutdown: CancellationToken,
) -> Result<MqttLink, MqttError> {
    let opts = options(&c.device_id, &c.mqtt_host, c.mqtt_port, tls, keep_alive);
    let settings = DriverSettings {
        label: "DMS broker",
        broker: format!("{}:{}", c.mqtt_host, c.mqtt_port),
        subscriptions,
        reconnect: Reconnect::Always,
        window: WINDOW,
    };
    Ok(driver::start(opts, settings, status, shutdown))
}
