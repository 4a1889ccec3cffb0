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

/// The streaming services the DMS session serves on its per-device topics
/// besides the actions (each `None` when off).
#[derive(Clone, Default)]
pub struct Remote {
    /// `terminal.enabled`: the same sessions as on NATS.
    pub terminal: Option<std::sync::Arc<crate::services::terminal::Terminals>>,
    /// `browser.enabled`.
    pub browser: Option<std::sync::Arc<crate::services::browser::Browser>>,
}

impl Remote {
    /// The filters to subscribe for a device.
    pub fn subscriptions(&self, device_id: &str) -> Vec<Topic> {
        let mut v = Vec::new();
        if self.terminal.is_some() {
            if let Ok(t) = crate::bus::topics::dms_terminal(device_id) {
                v.push(Topic::fixed(&format!("{}/#", t.mqtt())));
            }
        }
        if self.browser.is_some() {
            if let Ok(t) = crate::bus::topics::dms_browser(device_id) {
                v.extend(t.join(&[crate::services::browser::protocol::REQUEST]).ok());
            }
        }
        v
    }

    /// Serves a message of the DMS connection when it is one of these
    /// services' (true), acknowledging it once handled.
    pub async fn serve_mqtt(
        &self,
        mqtt: &MqttHandle,
        device_id: &str,
        msg: &crate::bus::mqtt::MqttMessage,
        shutdown: &crate::supervisor::Shutdown,
    ) -> bool {
        if let (Some(t), Ok(root)) = (&self.terminal, crate::bus::topics::dms_terminal(device_id)) {
            if let Some(segments) = msg.topic.strip_prefix(&root) {
                let route = Route {
                    outlet: Outlet::Mqtt(mqtt.clone()),
                    root,
                    transport: "mqtt",
                };
                let segments: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
                let close = segments.last().map(String::as_str)
                    == Some(crate::services::terminal::protocol::CLOSE);
                let (t, payload, s) = (t.clone(), msg.payload.clone(), shutdown.clone());
                let work = async move {
                    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
                    if let Some(reply) = t.request(&route, &segs, payload, &s).await {
                        crate::services::terminal::send_reply(&route, None, reply).await;
                    }
                };
                // In order, as on NATS; closing waits for the kill.
                if close {
                    shutdown.spawn(work);
                } else {
                    work.await;
                }
                mqtt.ack(msg).await;
                return true;
            }
        }
        if let (Some(b), Ok(root)) = (&self.browser, crate::bus::topics::dms_browser(device_id)) {
            if msg.topic.strip_prefix(&root).is_some() {
                let route = Route {
                    outlet: Outlet::Mqtt(mqtt.clone()),
                    root,
                    transport: "mqtt",
                };
                let (b, payload, s) = (b.clone(), msg.payload.clone(), shutdown.clone());
                shutdown.spawn(async move {
                    tokio::select! {
                        _ = b.serve(payload, crate::services::browser::Sink::topic(route, None)) => {}
                        _ = s.cancelled() => {}
                    }
                });
                mqtt.ack(msg).await;
                return true;
            }
        }
        false
    }
}
