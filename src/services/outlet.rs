//! Where a streaming service (terminal, browser) publishes its frames and
//! answers: the transport a request came on, and the root it is served
//! under there.

use crate::bus::mqtt::MqttHandle;
use crate::bus::{Nats, Topic};
use bytes::Bytes;

/// Where frames and answers are published.
#[derive(Clone)]
pub enum Outlet {
    /// The device-local NATS.
    Nats(Nats),
    /// The DMS broker (QoS 1).
    Mqtt(MqttHandle),
}

impl Outlet {
    /// Publishes.
    pub async fn publish(&self, topic: &Topic, payload: Bytes) -> Result<(), String> {
        match self {
            Outlet::Nats(n) => n.publish(topic, payload).await.map_err(|e| e.to_string()),
            Outlet::Mqtt(m) => m.publish(topic, payload).await.map_err(|e| e.to_string()),
        }
    }

    /// Waits until what was published went out (NATS; MQTT confirms each).
    pub async fn flush(&self) -> Result<(), String> {
        match self {
            Outlet::Nats(n) => n.flush().await.map_err(|e| e.to_string()),
            Outlet::Mqtt(_) => Ok(()),
        }
    }
}

/// A transport and the root the service answers under on it.
#[derive(Clone)]
pub struct Route {
    /// How to publish.
    pub outlet: Outlet,
    /// `iot/agent/terminal`, `devices/terminal/{device id}`, ...
    pub root: Topic,
    /// `nats` or `mqtt`, for the log.
    pub transport: &'static str,
}
