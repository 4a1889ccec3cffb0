//! The MQTT connection to the DMS broker: mutual TLS with the enrollment's
//! credentials and the server verified (the TLS configuration is built by
//! [`crate::tls`] from the enrollment and `dms.ca` / `dms.verify`).
//!
//! rumqttc reconnects when its event loop is polled again after an error,
//! but it does not restore subscriptions on a new session; the loop here
//! subscribes again on every ConnAck. Incoming publishes are handed to a
//! channel so the event loop never waits for the work they cause.

use super::status::ConnectionStatus;
use super::Topic;
use crate::backoff::Backoff;
use crate::identity::Credentials;
use bytes::Bytes;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("the device credentials cannot be used for TLS: {0}")]
    Credentials(String),
    #[error("cannot publish on {topic}: {detail}")]
    Publish { topic: String, detail: String },
}

/// A message received from the broker. QoS 1 messages are acknowledged
/// only by [`MqttHandle::ack`], once their receiver has made them safe.
#[derive(Debug, Clone)]
pub struct MqttMessage {
    pub topic: Topic,
    pub payload: Bytes,
    publish: rumqttc::Publish,
}

/// Publishing side of the connection; cheap to clone.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    inflight: Arc<Inflight>,
}

/// Tracks QoS 1 publishes the broker has not acknowledged yet, so a caller
/// can wait until what it published has reached the broker (unregister
/// must not clear the credentials before its reply is delivered).
#[derive(Default)]
struct Inflight {
    state: Mutex<(u64, HashSet<u16>)>,
    changed: Notify,
}

impl Inflight {
    fn sent(&self, pkid: u16) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        s.1.insert(pkid);
        drop(s);
        self.changed.notify_waiters();
    }
    fn acked(&self, pkid: u16) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .remove(&pkid);
        self.changed.notify_waiters();
    }
    fn snapshot(&self) -> (u64, bool) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.0, s.1.is_empty())
    }
}

impl MqttHandle {
    /// Acknowledges a received message to the broker (PUBACK for QoS 1).
    pub async fn ack(&self, msg: &MqttMessage) {
        if let Err(e) = self.client.ack(&msg.publish).await {
            tracing::warn!(topic = %msg.topic, error = %e, "cannot acknowledge an MQTT message");
        }
    }

    pub async fn publish(&self, topic: &Topic, qos: QoS, payload: Bytes) -> Result<(), MqttError> {
        self.client
            .publish_bytes(topic.mqtt(), qos, false, payload)
            .await
            .map_err(|e| MqttError::Publish {
                topic: topic.to_string(),
                detail: e.to_string(),
            })
    }

    /// Publishes at QoS 1 and waits (up to `bound`) until the broker has
    /// acknowledged it and everything sent before it. Returns false when
    /// the bound passed first.
    pub async fn publish_confirmed(
        &self,
        topic: &Topic,
        payload: Bytes,
        bound: Duration,
    ) -> Result<bool, MqttError> {
        let (before, _) = self.inflight.snapshot();
        self.publish(topic, QoS::AtLeastOnce, payload).await?;
        let wait = async {
            loop {
                let notified = self.inflight.changed.notified();
                let (sent, empty) = self.inflight.snapshot();
                if sent > before && empty {
                    return;
                }
                notified.await;
            }
        };
        Ok(tokio::time::timeout(bound, wait).await.is_ok())
    }
}

/// A connection that keeps itself up until cancelled.
pub struct MqttLink {
    pub handle: MqttHandle,
    pub messages: mpsc::Receiver<MqttMessage>,
}

/// Connects with the credentials and drives the connection in a task until
/// `shutdown`. `subscriptions` are (re)subscribed at QoS 1 on every ConnAck.
/// `status` follows the connection for the outside world.
pub fn connect(
    c: &Credentials,
    tls: Arc<rustls::ClientConfig>,
    subscriptions: Vec<Topic>,
    status: watch::Sender<ConnectionStatus>,
    shutdown: CancellationToken,
) -> Result<MqttLink, MqttError> {
    let mut opts = MqttOptions::new(c.device_id.clone(), c.mqtt_host.clone(), c.mqtt_port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_keep_alive(Duration::from_secs(30))
        // A persistent session: the broker keeps QoS 1 actions sent while the
        // device was offline.
        .set_clean_session(false)
        // Receivers acknowledge what they have made safe (persisted, answered).
        .set_manual_acks(true)
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, eventloop) = AsyncClient::new(opts, 64);
    let (tx, messages) = mpsc::channel(256);
    let inflight = Arc::new(Inflight::default());
    let handle = MqttHandle {
        client: client.clone(),
        inflight: inflight.clone(),
    };
    let broker = format!("{}:{}", c.mqtt_host, c.mqtt_port);
    tokio::spawn(drive(
        eventloop,
        client,
        subscriptions,
        tx,
        inflight,
        status,
        broker,
        shutdown,
    ));
    Ok(MqttLink { handle, messages })
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    subscriptions: Vec<Topic>,
    tx: mpsc::Sender<MqttMessage>,
    inflight: Arc<Inflight>,
    status: watch::Sender<ConnectionStatus>,
    broker: String,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let mut logged_error: Option<String> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(%broker, session_present = ack.session_present, "connected to the DMS broker");
                backoff.reset();
                logged_error = None;
                status.send_replace(ConnectionStatus::connected());
                for topic in &subscriptions {
                    // try_subscribe: the event loop is this task; awaiting
                    // the request channel here could deadlock when it is full.
                    if let Err(e) = client.try_subscribe(topic.mqtt(), QoS::AtLeastOnce) {
                        tracing::error!(%topic, error = %e, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = MqttMessage {
                    topic: Topic::fixed(&p.topic),
                    payload: p.payload.clone(),
                    publish: p,
                };
                if tx.send(msg).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    tracing::error!(%broker, "the DMS broker refused the subscription to the action topic (check its ACL for this device)");
                } else {
                    tracing::info!(%broker, "subscribed to DMS actions");
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => inflight.acked(ack.pkid),
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) if pkid != 0 => {
                inflight.sent(pkid)
            }
            Ok(_) => {}
            Err(e) => {
                let detail = crate::errors::chain(&e);
                status.send_replace(ConnectionStatus::disconnected(&detail));
                let delay = backoff.next_delay();
                if logged_error.as_deref() != Some(detail.as_str()) {
                    tracing::warn!(
                        %broker,
                        error = %detail,
                        retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                        "DMS broker connection failed; retrying (check the network and the broker's TLS setup)"
                    );
                    logged_error = Some(detail);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
    status.send_replace(ConnectionStatus::disconnected(
        "the agent stopped the DMS connection",
    ));
}
