//! The DMS management channel: actions in on `devices/sub/{deviceId}`,
//! responses out on `devices/pub/{deviceId}`, heartbeat and metrics.
//!
//! The session lives while the device has credentials: it starts when the
//! enrollment hands them over and ends when they are withdrawn
//! (unregister). Every request is handled in its own task, so a slow action
//! (an upload, a change that takes minutes) never holds up the MQTT event
//! loop or other requests.

pub mod actions;
pub mod completion;
pub mod dedupe;
pub mod heartbeat;
pub mod metrics;
pub mod request;
pub mod snaps;
pub mod upload;

use crate::bus::mqtt::{self, MqttHandle, MqttMessage};
use crate::bus::{topics, ConnectionStatus, Topic};
use crate::identity::{Credentials, CredentialsRx, Store};
use crate::services::required::Required;
use crate::snapd;
use crate::supervisor::RunResult;
use actions::{Ctx, Next};
use dedupe::{Dedupe, Seen};
use request::Response;
use rumqttc::QoS;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// The DMS topics, with their `{deviceId}`/`{orgId}` placeholders, as the
/// AsyncAPI document names them (its test compares the two).
pub fn documented_addresses() -> Vec<String> {
    let placeholder = |t: Result<Topic, crate::bus::topics::BadSegment>, name: &str| {
        t.map(|t| t.mqtt().replace("PLACEHOLDER", name))
            .unwrap_or_default()
    };
    vec![
        placeholder(topics::dms_actions("PLACEHOLDER"), "{deviceId}"),
        placeholder(topics::dms_responses("PLACEHOLDER"), "{deviceId}"),
        placeholder(topics::dms_health("PLACEHOLDER"), "{deviceId}"),
        placeholder(topics::dms_metrics("PLACEHOLDER"), "{orgId}"),
    ]
}

/// How long unregister waits for the broker to take its reply.
const REPLY_ACK_BOUND: Duration = Duration::from_secs(10);

/// Settings of the channel (`dms.*`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat: Duration,
    pub metrics: Duration,
    pub change_timeout: Duration,
    pub upload_timeout: Duration,
    pub upload_limit: u64,
    pub scratch_dir: std::path::PathBuf,
    /// `dms.ca` and `dms.verify`: how the broker is trusted.
    pub ca: crate::config::PemSource,
    pub verify: crate::tls::Verify,
    pub protocol: crate::config::DmsProtocol,
    /// `dms.completion`: report the end of changes that actions started.
    pub completion: bool,
}

pub struct Dms {
    pub snapd: snapd::Client,
    /// The per-serial action tree, served on this connection too.
    pub required: Option<Arc<Required>>,
    pub credentials: CredentialsRx,
    pub status: watch::Sender<ConnectionStatus>,
    pub store: Store,
    pub reload: Arc<Notify>,
    /// The shared change poller: a change that became ready means the
    /// snaps may have changed, so the heartbeat hashes are built again.
    pub poller: Option<Arc<crate::changes::Poller>>,
    pub settings: Settings,
}

impl Dms {
    /// Runs sessions for as long as the agent runs.
    pub async fn run(&self, shutdown: CancellationToken) -> RunResult {
        let mut creds_rx = self.credentials.clone();
        loop {
            let creds = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = creds_rx.wait_for(Option::is_some) => match c {
                    Ok(c) => c.clone().expect("waited for Some"),
                    Err(_) => return Ok(()),
                },
            };
            let session = shutdown.child_token();
            let task = tokio::spawn(self.session(creds.clone(), session.clone()));
            // Credentials withdrawn or replaced: end this session.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = creds_rx.wait_for(|c| c.as_ref().map(|c| !Arc::ptr_eq(c, &creds)).unwrap_or(true)) => {
                    tracing::info!("device credentials changed; closing the DMS session");
                }
            }
            session.cancel();
            match task.await {
                Ok(Err(e)) => return Err(e),
                Err(e) if e.is_panic() => anyhow::bail!("the DMS session panicked"),
                _ => {}
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }

    fn session(
        &self,
        creds: Arc<Credentials>,
        token: CancellationToken,
    ) -> impl std::future::Future<Output = RunResult> + Send + 'static {
        let snapd = self.snapd.clone();
        let status = self.status.clone();
        let store = self.store.clone();
        let reload = self.reload.clone();
        let s = self.settings.clone();
        let required = self.required.clone();
        let change_events = self.poller.as_ref().map(|p| p.events());
        async move {
            let inbox = topics::dms_actions(&creds.device_id)?;
            let outbox = topics::dms_responses(&creds.device_id)?;
            let health = topics::dms_health(&creds.device_id)?;
            let metrics_topic = topics::dms_metrics(&creds.org_id)?;
            let uploader = upload::Uploader::new(s.upload_timeout, s.upload_limit)
                .map_err(|e| anyhow::anyhow!("cannot build the upload client: {e}"))?;
            let ctx = Arc::new(Ctx {
                snapd,
                creds: creds.clone(),
                uploader,
                change_timeout: s.change_timeout,
                scratch_dir: s.scratch_dir.clone(),
                protocol: s.protocol,
                hashes: heartbeat::HashCache::default(),
            });
            // The per-serial tree, when the enrollment names the serial.
            let serial_base = match (&required, creds.device.serial.as_str()) {
                (Some(_), serial) if !serial.is_empty() => topics::serial_actions(serial).ok(),
                _ => None,
            };
            let mut subscriptions = vec![inbox];
            if let Some(base) = &serial_base {
                subscriptions.push(Topic::fixed(&format!("{}/#", base.mqtt())));
            }
            let tls = crate::tls::dms_broker(&creds, &s.ca, s.verify)
                .map_err(|e| anyhow::anyhow!("cannot set up TLS for the DMS broker: {e}"))?;
            let mut link = mqtt::connect(&creds, tls, subscriptions, status, token.clone())?;
            if let (Some(r), Some(_)) = (&required, &serial_base) {
                tokio::spawn(forward_results(
                    r.clone(),
                    link.handle.clone(),
                    token.clone(),
                ));
            }
            let out = Outbox {
                mqtt: link.handle.clone(),
                topic: outbox,
            };
            if let Some(events) = change_events {
                tokio::spawn(watch_snap_changes(
                    events,
                    ctx.hashes.clone(),
                    token.clone(),
                ));
            }
            let (c, mqtt) = (ctx.clone(), link.handle.clone());
            tokio::spawn(periodically(s.heartbeat, token.clone(), move || {
                let (c, mqtt, topic) = (c.clone(), mqtt.clone(), health.clone());
                async move {
                    let doc = heartbeat::heartbeat(&c).await;
                    let _ = mqtt
                        .publish(&topic, QoS::AtMostOnce, doc.to_string().into())
                        .await;
                }
            }));
            let (device, mqtt) = (creds.device_id.clone(), link.handle.clone());
            let mut prev = metrics::cpu_sample();
            tokio::spawn(periodically(s.metrics, token.clone(), move || {
                let text = metrics::lines(&device, &mut prev);
                let (mqtt, topic) = (mqtt.clone(), metrics_topic.clone());
                async move {
                    let _ = mqtt.publish(&topic, QoS::AtMostOnce, text.into()).await;
                }
            }));
            let dedupe = Arc::new(Dedupe::default());
            loop {
                let msg: MqttMessage = tokio::select! {
                    _ = token.cancelled() => return Ok(()),
                    m = link.messages.recv() => match m {
                        Some(m) => m,
                        None => return Ok(()),
                    },
                };
                if let (Some(r), Some(base)) = (&required, &serial_base) {
                    if msg.topic.strip_prefix(base).is_some() {
                        // Stored (or refused) before the broker hears PUBACK.
                        if let Some((topic, payload)) = r.receive(base, &msg.topic, &msg.payload) {
                            let _ = link.handle.publish(&topic, QoS::AtLeastOnce, payload).await;
                        }
                        link.handle.ack(&msg).await;
                        continue;
                    }
                }
                // Actions are remembered by id from here on (dedupe).
                link.handle.ack(&msg).await;
                let (ctx, out, dedupe) = (ctx.clone(), out.clone(), dedupe.clone());
                let (store, reload) = (store.clone(), reload.clone());
                let report = s.completion;
                tokio::spawn(async move {
                    handle(&ctx, &out, &dedupe, &msg.payload, &store, &reload, report).await;
                });
            }
        }
    }
}

#[derive(Clone)]
struct Outbox {
    mqtt: MqttHandle,
    topic: Topic,
}

impl Outbox {
    async fn send(&self, resp: &Response) {
        if let Err(e) = self
            .mqtt
            .publish(&self.topic, QoS::AtLeastOnce, resp.to_bytes())
            .await
        {
            tracing::error!(id = %resp.id, error = %e, "cannot send a DMS response");
        }
    }
}

/// One request, start to finish: exactly one response, and a completion
/// report (see [`completion`]) when it started a change and `report` is on.
async fn handle(
    ctx: &Ctx,
    out: &Outbox,
    dedupe: &Dedupe,
    payload: &[u8],
    store: &Store,
    reload: &Notify,
    report: bool,
) {
    let req = match request::parse(payload) {
        Ok(r) => r,
        Err(resp) => {
            tracing::warn!(id = %resp.id, "refused a DMS request: {}", resp.message);
            return out.send(&resp).await;
        }
    };
    let first = match dedupe.check(&req.id) {
        Seen::First(f) => f,
        Seen::Again(rx) => {
            tracing::info!(id = %req.id, action = %req.action, "repeated DMS request; answering again");
            if let Some(bytes) = dedupe::response_of(rx).await {
                if let Err(e) = out.mqtt.publish(&out.topic, QoS::AtLeastOnce, bytes).await {
                    tracing::error!(id = %req.id, error = %e, "cannot send a DMS response");
                }
            }
            return;
        }
    };
    tracing::info!(id = %req.id, action = %req.action, snap = %req.snap, "DMS action");
    let (resp, next) = actions::execute(ctx, &req).await;
    if !resp.success {
        tracing::warn!(id = %req.id, action = %req.action, "DMS action failed: {}", resp.message);
    }
    first.done(resp.to_bytes());
    match next {
        Next::Nothing => out.send(&resp).await,
        Next::FollowChange(_) if !report => out.send(&resp).await,
        Next::FollowChange(change) => {
            out.send(&resp).await;
            let done = actions::completion(ctx, &req, &change).await;
            ctx.hashes.mark_changed();
            tracing::info!(id = %req.id, %change, success = done.success, "change of a DMS action ready");
            out.send(&done).await;
        }
        Next::Unregister => {
            match out
                .mqtt
                .publish_confirmed(&out.topic, resp.to_bytes(), REPLY_ACK_BOUND)
                .await
            {
                Ok(true) => {}
                Ok(false) => tracing::warn!(
                    "the broker did not confirm the unregister reply in time; unregistering anyway"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot send the unregister reply; unregistering anyway")
                }
            }
            match store.clear() {
                Ok(()) => {
                    tracing::info!("unregistered by the DMS: credentials deleted; enrolling again")
                }
                Err(e) => tracing::error!(error = %e, "cannot delete the credentials"),
            }
            reload.notify_one();
        }
    }
}

/// Marks the heartbeat hashes stale whenever a change becomes ready (or
/// events were missed).
async fn watch_snap_changes(
    mut events: tokio::sync::broadcast::Receiver<crate::changes::ChangeEvent>,
    hashes: heartbeat::HashCache,
    token: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            e = events.recv() => match e {
                Ok(ev) if ev.change.ready => hashes.mark_changed(),
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => hashes.mark_changed(),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Publishes the per-serial results on the DMS connection.
async fn forward_results(required: Arc<Required>, mqtt: MqttHandle, token: CancellationToken) {
    let mut results = required.results();
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            r = results.recv() => match r {
                Ok((topic, payload)) => {
                    let _ = mqtt.publish(&topic, QoS::AtLeastOnce, payload).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
        }
    }
}

/// Runs `tick` now and then every `every`, until the session ends.
async fn periodically<F, Fut>(every: Duration, token: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut interval = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = interval.tick() => tick().await,
        }
    }
}
