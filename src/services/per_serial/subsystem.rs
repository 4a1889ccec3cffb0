//! The tree's two subsystems in the supervisor's shape: the queue worker
//! (the [`PerSerial`] handle itself) and its NATS side ([`NatsSide`]); the
//! DMS session serves the MQTT side.

use super::PerSerial;
use crate::bus::Nats;
use crate::snapd;
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use std::sync::Arc;

impl Subsystem for Arc<PerSerial> {
    const NAME: &'static str = "required-install";
    const SECTION: &'static str = "required";

    /// Works through the queue until shutdown.
    async fn run(self, shutdown: Shutdown) -> RunResult {
        self.run_worker(shutdown.token().clone()).await
    }
}

/// The tree served on the device-local NATS.
#[derive(Clone)]
pub struct NatsSide {
    /// The queue the requests go to.
    pub required: Arc<PerSerial>,
    /// The device-local NATS.
    pub bus: Nats,
    /// Where the serial comes from.
    pub snapd: snapd::Client,
}

impl Subsystem for NatsSide {
    const NAME: &'static str = "per-serial-nats";
    const SECTION: &'static str = "required";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        super::serve_nats(
            self.required,
            self.bus,
            self.snapd,
            shutdown.token().clone(),
        )
        .await
    }
}
