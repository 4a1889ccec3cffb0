//! The tunnel subsystem (`tunnel.*`): the agent's client of an
//! `iot-relay`. One outbound mutually authenticated TLS connection carries
//! every stream the relay opens to the device's allowed local ports, so no
//! inbound port is open on the device. The wire protocol ([`protocol`]) and
//! the multiplexer ([`mux`]) are shared with the relay (`crate::relay`).

pub mod announce;
pub mod client;
pub mod listen;
pub mod mux;
pub mod protocol;

use crate::config::Config;
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use std::sync::Arc;

/// The subsystem: a handle on its settings (`tunnel.*`, and where the
/// provisioned identity is when provisioning is on).
#[derive(Clone)]
pub struct Tunnel {
    settings: Arc<client::Settings>,
}

impl Tunnel {
    /// The subsystem of `tunnel.*`.
    pub fn from_config(config: &Config) -> Tunnel {
        Tunnel {
            settings: Arc::new(client::Settings {
                config: config.tunnel.clone(),
                provisioned: crate::subsystems::provisioning::enabled(config).then(|| {
                    crate::subsystems::provisioning::store::Store::new(
                        config.provisioning.dir.path(),
                    )
                    .identity_path()
                }),
            }),
        }
    }
}

impl Subsystem for Tunnel {
    const NAME: &'static str = "tunnel";
    const SECTION: &'static str = "tunnel";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        client::run(&self.settings, shutdown).await
    }
}
