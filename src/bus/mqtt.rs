//! The MQTT connection to the DMS broker: mutual TLS with the enrollment's
//! credentials, the organization certificate as the only trust root, and
//! the server verified.
//!
//! The connection itself is run by the shared [`super::driver`].

use super::driver::{self, DriverSettings, Reconnect};
pub use super::driver::{Confirmation, MqttHandle, MqttLink, MqttMessage, PublishError};
use super::status::ConnectionStatus;
use super::Topic;
use crate::identity::Credentials;
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// QoS 1 publishes (responses, results) awaiting their PUBACK at once.
const WINDOW: u16 = 64;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("the device credentials cannot be used for TLS: {0}")]
    Credentials(String),
    #[error("cannot publish on {topic}: {detail}")]
    Publish { topic: String, detail: String },
}

/// Builds the TLS configuration: the organization root as the only trust
/// anchor, the device certificate and key for client authentication.
pub fn tls_config(c: &Credentials) -> Result<Arc<rustls::ClientConfig>, MqttError> {
    let bad = |e: String| MqttError::Credentials(e);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(c.root_ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| bad(format!("organization root: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("organization root: {e}")))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("client certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
        .map_err(|e| bad(format!("client key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad(format!("client certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// Connects with the credentials and drives the connection (see
/// [`super::driver`]) until `shutdown`. `subscriptions` are (re)subscribed
/// at QoS 1 on every new connection. `status` follows the connection for
/// the outside world.
pub fn connect(
    c: &Credentials,
    subscriptions: Vec<Topic>,
    keep_alive: Duration,
    status: watch::Sender<ConnectionStatus>,
    shutdown: CancellationToken,
) -> Result<MqttLink, MqttError> {
    let mut opts = MqttOptions::new(c.device_id.clone(), c.mqtt_host.clone(), c.mqtt_port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_config(c)?,
    )))
    .set_keep_alive(keep_alive)
    // A persistent session: the broker keeps QoS 1 actions sent while the
    // device was offline.
    .set_clean_session(false)
    .set_max_packet_size(1024 * 1024, 1024 * 1024);
    let settings = DriverSettings {
        label: "DMS broker",
        broker: format!("{}:{}", c.mqtt_host, c.mqtt_port),
        subscriptions,
        reconnect: Reconnect::Always,
        window: WINDOW,
    };
    Ok(driver::start(opts, settings, status, shutdown))
}
