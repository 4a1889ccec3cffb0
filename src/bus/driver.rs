//! The one MQTT driver of the agent: the DMS link and the export
//! upstream's MQTT mode both run their connection through it.
//!
//! Why it is built this way (each point was a bug once):
//! - **The event loop is polled all the time** by its own task and never
//!   awaits anything but the network and the shutdown token: inbound
//!   messages go to an unbounded channel, and everything the loop must
//!   tell (acknowledgements, SubAcks, connection state) is a quick update
//!   under a short lock. rumqttc's request channel is drained only by
//!   `poll()`, so a loop that waited for a consumer who waited for that
//!   channel stopped for good.
//! - **Backpressure is by not acknowledging** (manual acks): the broker
//!   sends a client only so many unacknowledged QoS 1 messages (mosquitto's
//!   `max_inflight_messages`), so a consumer that admits work with a
//!   semaphore and acknowledges once the work is recorded bounds the
//!   channel without the loop ever waiting. QoS 0 messages, which nothing
//!   bounds, are dropped (counted) beyond [`INBOX_QOS0_LIMIT`].
//! - **Subscriptions are made by a task** that awaits each SubAck and
//!   retries with back-off until the broker granted every filter, on every
//!   new connection: a subscription that failed once used to leave the
//!   device deaf until the next reconnect.
//! - **QoS 0 telemetry is not queued while offline** ([`MqttHandle::publish_telemetry`]
//!   drops it): a heartbeat from an hour ago is a lie about the present.
//! - **A confirmed publish waits for its own packet id.** rumqttc does not
//!   return the id, so publishes are registered in the order they enter
//!   rumqttc's request channel (under the same lock), and matched with
//!   `Outgoing::Publish(pkid)` events, which come in that order. When the
//!   connection drops, everything not yet acknowledged (and whatever is
//!   still in the request channel) is failed and dropped from rumqttc's
//!   re-send queue: the caller decides what to send again (the DMS ledger
//!   re-sends stored responses; the export forwarder restarts from its
//!   spool), so the register and rumqttc never disagree on what is in
//!   flight.
#![warn(missing_docs)]

use super::status::ConnectionStatus;
use super::Topic;
use crate::backoff::Backoff;
use bytes::Bytes;
use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// QoS 0 messages waiting for their consumer beyond this are dropped.
pub const INBOX_QOS0_LIMIT: usize = 1024;
/// Bound on the broker's answer to one SUBSCRIBE before it is sent again.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("cannot publish on {topic}: {detail}")]
/// A publish that could not be queued or was refused.
pub struct PublishError {
    /// Where it was for.
    pub topic: String,
    /// Why it failed.
    pub detail: String,
}

/// A message received from the broker. QoS 1 messages are acknowledged
/// only by [`MqttHandle::ack`], once their receiver has made them safe.
#[derive(Debug, Clone)]
pub struct MqttMessage {
    /// Where it was published.
    pub topic: Topic,
    /// Its body.
    pub payload: Bytes,
    publish: rumqttc::Publish,
}

impl MqttMessage {
    /// True when the broker delivered it before (MQTT's DUP flag).
    pub fn redelivered(&self) -> bool {
        self.publish.dup
    }
}

/// What to do when the connection is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Reconnect with back-off until shut down (the DMS link).
    Always,
    /// End the session (the export upstream restarts from its spool).
    Never,
}

/// How a connection is driven.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// For log lines: what this connection is ("DMS broker").
    pub label: &'static str,
    /// `host:port`, for log lines.
    pub broker: String,
    /// Subscribed at QoS 1 on every new connection.
    pub subscriptions: Vec<Topic>,
    /// Whether a lost connection is made again.
    pub reconnect: Reconnect,
    /// QoS 1 publishes awaiting their PUBACK at once (also rumqttc's
    /// inflight window).
    pub window: u16,
}

/// A publish accepted by the driver: resolves when the broker acknowledged
/// it (Ok) or the connection it was sent on was lost (Err, with why).
pub type Confirmation = futures::future::BoxFuture<'static, Result<(), String>>;

struct Waiter {
    tx: oneshot::Sender<Result<(), String>>,
    _slot: OwnedSemaphorePermit,
}

type SubWaiter = oneshot::Sender<Vec<SubscribeReasonCode>>;

#[derive(Default)]
struct Register {
    /// Publishes in rumqttc's request channel, in order, not yet given a
    /// packet id.
    queued: VecDeque<Waiter>,
    by_pkid: HashMap<u16, Waiter>,
    sub_queued: VecDeque<SubWaiter>,
    sub_by_pkid: HashMap<u16, SubWaiter>,
    connected: bool,
    /// Set when a `Reconnect::Never` connection is gone.
    dead: Option<String>,
}

impl Register {
    fn fail_all(&mut self, why: &str) {
        for w in self
            .queued
            .drain(..)
            .chain(self.by_pkid.drain().map(|(_, w)| w))
        {
            let _ = w.tx.send(Err(why.to_string()));
        }
        // Dropping the senders tells the subscription task.
        self.sub_queued.clear();
        self.sub_by_pkid.clear();
    }
}

struct Shared {
    register: Mutex<Register>,
    window: Arc<Semaphore>,
    /// QoS 0 messages in the inbox now.
    inbox_qos0: AtomicUsize,
    dropped_qos0: AtomicU64,
    /// Counts connections (ConnAcks); the subscription task watches it.
    connections: watch::Sender<u64>,
    /// True once every subscription of the current connection is granted.
    subscribed: watch::Sender<bool>,
    lost: CancellationToken,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Register> {
        self.register.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Publishing side of the connection; cheap to clone.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    shared: Arc<Shared>,
}

/// A connection that keeps itself up (or ends, see [`Reconnect`]).
pub struct MqttLink {
    /// Publishes and acknowledges on the connection.
    pub handle: MqttHandle,
    /// What the broker delivers.
    pub messages: Inbox,
    /// Ends when the driver ends (shutdown, or a lost `Never` connection).
    pub driver: tokio::task::JoinHandle<()>,
}

/// Starts driving a connection with `opts` (manual acks are switched on
/// here: every receiver acknowledges what it made safe). `status` follows
/// the connection for the outside world.
pub fn start(
    mut opts: MqttOptions,
    settings: DriverSettings,
    status: watch::Sender<ConnectionStatus>,
    shutdown: CancellationToken,
) -> MqttLink {
    let window = settings.window.max(1);
    opts.set_manual_acks(true).set_inflight(window);
    // Room for every publish of the window, the acks the broker may have
    // outstanding, and subscribes.
    let (client, mut eventloop) = AsyncClient::new(opts, window as usize * 2 + 256);
    // Small packets go out at once: with Nagle's algorithm a PUBACK or a
    // reply written while the last one is unacknowledged waits for the
    // broker's delayed ACK (some 40 ms on Linux), which cost a DMS action
    // about 90 ms of its latency (docs/benchmarks.md).
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        register: Mutex::new(Register::default()),
        window: Arc::new(Semaphore::new(window as usize)),
        inbox_qos0: AtomicUsize::new(0),
        dropped_qos0: AtomicU64::new(0),
        connections: watch::channel(0).0,
        subscribed: watch::channel(false).0,
        lost: CancellationToken::new(),
    });
    let handle = MqttHandle {
        client: client.clone(),
        shared: shared.clone(),
    };
    let session = shutdown.child_token();
    if !settings.subscriptions.is_empty() {
        tokio::spawn(subscribe_task(
            handle.clone(),
            settings.subscriptions.clone(),
            settings.label,
            session.clone(),
        ));
    }
    let driver = tokio::spawn(async move {
        drive(
            eventloop,
            client,
            settings,
            tx,
            shared,
            status,
            session.clone(),
        )
        .await;
        session.cancel();
    });
    MqttLink {
        messages: Inbox {
            rx,
            shared: handle.shared.clone(),
        },
        handle,
        driver,
    }
}

impl MqttHandle {
    /// Acknowledges a received message to the broker (PUBACK for QoS 1).
    /// Waits only for room in rumqttc's request channel, which the driver
    /// drains continuously.
    pub async fn ack(&self, msg: &MqttMessage) {
        if msg.publish.qos == QoS::AtMostOnce {
            return;
        }
        if let Err(e) = self.client.ack(&msg.publish).await {
            tracing::warn!(topic = %msg.topic, error = %e, "cannot acknowledge an MQTT message");
        }
    }

    /// Whether the broker connection is up now.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().connected
    }

    /// Cancelled when a [`Reconnect::Never`] connection is lost.
    pub fn lost(&self) -> CancellationToken {
        self.shared.lost.clone()
    }

    /// True once every subscription of the current connection is granted.
    pub fn subscribed(&self) -> watch::Receiver<bool> {
        self.shared.subscribed.subscribe()
    }

    /// Publishes at QoS 0 when connected; returns false (nothing queued)
    /// when offline or when rumqttc's request channel is full. Telemetry
    /// only: it is worthless later.
    pub fn publish_telemetry(&self, topic: &Topic, payload: Bytes) -> bool {
        let r = self.shared.lock();
        if !r.connected {
            return false;
        }
        self.client
            .try_publish(topic.mqtt(), QoS::AtMostOnce, false, payload.to_vec())
            .is_ok()
    }

    /// Publishes at QoS 1. Returns once the publish is in rumqttc's hands
    /// (waiting for a slot of the in-flight window); the [`Confirmation`]
    /// resolves with the broker's PUBACK for this very publish.
    pub async fn publish_confirmed(
        &self,
        topic: &Topic,
        payload: Bytes,
    ) -> Result<Confirmation, PublishError> {
        let err = |detail: String| PublishError {
            topic: topic.to_string(),
            detail,
        };
        let slot = self
            .shared
            .window
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| err("the connection is closed".into()))?;
        let (tx, rx) = oneshot::channel();
        let mut waiter = Some(Waiter { tx, _slot: slot });
        let mut pause = Duration::from_millis(1);
        loop {
            {
                let mut r = self.shared.lock();
                if let Some(why) = &r.dead {
                    return Err(err(why.clone()));
                }
                match self.client.try_publish(
                    topic.mqtt(),
                    QoS::AtLeastOnce,
                    false,
                    payload.to_vec(),
                ) {
                    Ok(()) => {
                        r.queued.extend(waiter.take());
                        break;
                    }
                    Err(ClientError::TryRequest(_)) => {}
                    Err(e) => return Err(err(e.to_string())),
                }
            }
            // The request channel is full: the driver is draining it.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        Ok(Box::pin(async move {
            rx.await
                .unwrap_or_else(|_| Err("the MQTT connection closed".to_string()))
        }))
    }

    /// Publishes at QoS 1 without waiting for the broker: a lost publish is
    /// logged (callers that must know use [`MqttHandle::publish_confirmed`]).
    pub async fn publish(&self, topic: &Topic, payload: Bytes) -> Result<(), PublishError> {
        let confirmation = self.publish_confirmed(topic, payload).await?;
        let topic = topic.to_string();
        tokio::spawn(async move {
            if let Err(why) = confirmation.await {
                tracing::debug!(%topic, %why, "a QoS 1 publish was not acknowledged");
            }
        });
        Ok(())
    }

    /// Sends one SUBSCRIBE for `filters`; resolves with the broker's codes
    /// (None when the connection dropped first).
    fn subscribe(
        &self,
        filters: &[Topic],
    ) -> Result<impl Future<Output = Option<Vec<SubscribeReasonCode>>>, ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut r = self.shared.lock();
            self.client.try_subscribe_many(
                filters
                    .iter()
                    .map(|t| SubscribeFilter::new(t.mqtt().to_string(), QoS::AtLeastOnce)),
            )?;
            r.sub_queued.push_back(tx);
        }
        Ok(async move { rx.await.ok() })
    }
}

/// On every new connection: subscribe, and again with back-off until the
/// broker granted every filter.
async fn subscribe_task(
    handle: MqttHandle,
    filters: Vec<Topic>,
    label: &'static str,
    session: CancellationToken,
) {
    let mut connections = handle.shared.connections.subscribe();
    loop {
        tokio::select! {
            _ = session.cancelled() => return,
            c = connections.changed() => if c.is_err() { return },
        }
        let generation = *connections.borrow_and_update();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            let outcome = match handle.subscribe(&filters) {
                Ok(answer) => tokio::select! {
                    _ = session.cancelled() => return,
                    a = tokio::time::timeout(SUBACK_TIMEOUT, answer) => match a {
                        Ok(Some(codes)) => refused(&filters, &codes),
                        Ok(None) => Some("the connection dropped before the SubAck".to_string()),
                        Err(_) => Some(format!("no SubAck within {SUBACK_TIMEOUT:?}")),
                    },
                },
                Err(e) => Some(format!("cannot send SUBSCRIBE: {e}")),
            };
            match outcome {
                None => {
                    tracing::debug!(broker = label, filters = ?filters.iter().map(Topic::mqtt).collect::<Vec<_>>(), "subscriptions granted");
                    handle.shared.subscribed.send_replace(true);
                    break;
                }
                Some(why) => {
                    let delay = backoff.next_delay();
                    tracing::error!(
                        broker = label,
                        error = %why,
                        retry_in = ?delay,
                        "subscription not granted; retrying (check the broker's ACL for this device)"
                    );
                    tokio::select! {
                        _ = session.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    if *connections.borrow() != generation || !handle.is_connected() {
                        // A new connection subscribes afresh.
                        break;
                    }
                }
            }
        }
    }
}

/// Why a SubAck is not a full grant (None when it is).
fn refused(filters: &[Topic], codes: &[SubscribeReasonCode]) -> Option<String> {
    if codes.len() != filters.len() {
        return Some(format!(
            "the broker answered {} codes for {} filters",
            codes.len(),
            filters.len()
        ));
    }
    let denied: Vec<&str> = filters
        .iter()
        .zip(codes)
        .filter(|(_, c)| matches!(c, SubscribeReasonCode::Failure))
        .map(|(t, _)| t.mqtt())
        .collect();
    (!denied.is_empty()).then(|| format!("the broker refused {denied:?}"))
}

async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    settings: DriverSettings,
    tx: mpsc::UnboundedSender<MqttMessage>,
    shared: Arc<Shared>,
    status: watch::Sender<ConnectionStatus>,
    shutdown: CancellationToken,
) {
    let broker = &settings.broker;
    let label = settings.label;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let mut logged_error: Option<String> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(%broker, session_present = ack.session_present, "connected to the {label}");
                backoff.reset();
                logged_error = None;
                shared.lock().connected = true;
                status.send_replace(ConnectionStatus::connected());
                shared.connections.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let qos0 = p.qos == QoS::AtMostOnce;
                if qos0 && shared.inbox_qos0.load(Ordering::Relaxed) >= INBOX_QOS0_LIMIT {
                    let n = shared.dropped_qos0.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        tracing::warn!(%broker, dropped = n, "QoS 0 messages dropped: their consumer is behind");
                    }
                    continue;
                }
                if qos0 {
                    shared.inbox_qos0.fetch_add(1, Ordering::Relaxed);
                }
                let msg = MqttMessage {
                    topic: Topic::fixed(&p.topic),
                    payload: p.payload.clone(),
                    publish: p,
                };
                if tx.send(msg).is_err() {
                    break;
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                let mut r = shared.lock();
                if !r.by_pkid.contains_key(&pkid) {
                    if let Some(w) = r.queued.pop_front() {
                        r.by_pkid.insert(pkid, w);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(w) = shared.lock().by_pkid.remove(&ack.pkid) {
                    let _ = w.tx.send(Ok(()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                let mut r = shared.lock();
                if let Some(w) = r.sub_queued.pop_front() {
                    r.sub_by_pkid.insert(pkid, w);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if let Some(w) = shared.lock().sub_by_pkid.remove(&ack.pkid) {
                    let _ = w.send(ack.return_codes);
                }
            }
            Ok(_) => {}
            Err(e) => {
                let detail = crate::errors::chain(&e);
                {
                    // Under the register's lock no publisher can slip a
                    // request in between: what rumqttc would re-send and
                    // what the register waits for are dropped together.
                    let mut r = shared.lock();
                    r.connected = false;
                    eventloop.clean();
                    eventloop.pending.clear();
                    r.fail_all(&format!("the connection to the {label} was lost: {detail}"));
                    if settings.reconnect == Reconnect::Never {
                        r.dead = Some(format!("the connection to the {label} was lost: {detail}"));
                    }
                }
                shared.subscribed.send_replace(false);
                status.send_replace(ConnectionStatus::disconnected(&detail));
                if settings.reconnect == Reconnect::Never {
                    tracing::warn!(%broker, error = %detail, "connection to the {label} lost");
                    shared.lost.cancel();
                    return;
                }
                let delay = backoff.next_delay();
                if logged_error.as_deref() != Some(detail.as_str()) {
                    tracing::warn!(
                        %broker,
                        error = %detail,
                        retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                        "{label} connection failed; retrying (check the network and the broker's TLS setup)"
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
    {
        let mut r = shared.lock();
        r.connected = false;
        r.fail_all("the agent closed the connection");
        r.dead = Some("the agent closed the connection".into());
    }
    shared.lost.cancel();
    let _ = client.try_disconnect();
    status.send_replace(ConnectionStatus::disconnected(format!(
        "the agent stopped the {label} connection"
    )));
}

/// Messages from the broker, in order of arrival.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<MqttMessage>,
    shared: Arc<Shared>,
}

impl Inbox {
    /// The next message; None once the driver ended.
    pub async fn recv(&mut self) -> Option<MqttMessage> {
        let m = self.rx.recv().await?;
        if m.publish.qos == QoS::AtMostOnce {
            self.shared.inbox_qos0.fetch_sub(1, Ordering::Relaxed);
        }
        Some(m)
    }

    /// The next message if one is waiting (batching).
    pub fn try_recv(&mut self) -> Option<MqttMessage> {
        let m = self.rx.try_recv().ok()?;
        if m.publish.qos == QoS::AtMostOnce {
            self.shared.inbox_qos0.fetch_sub(1, Ordering::Relaxed);
        }
        Some(m)
    }
}
