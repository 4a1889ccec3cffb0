//! One DMS session: the broker connection, heartbeat and metrics, and the
//! intake of actions.
//!
//! Intake, in this order for every batch of messages the driver has: take
//! an admission slot per action (waiting here, never in the event loop,
//! when `dms.actions.concurrency` actions run), record the batch in the
//! ledger in one transaction, acknowledge each message, then run the new
//! ones. A message is acknowledged only once its action is on disk.

use super::ledger::{self, Admission, Entry, Nonce, State};
use super::outbox::Kind;
use super::request::{self, Request, Response};
use super::{blocking, heartbeat, metrics, run_action, Handler, Settings};
use crate::bus::mqtt::{self, MqttHandle, MqttMessage};
use crate::bus::{topics, ConnectionStatus, Topic};
use crate::identity::Credentials;
use crate::services::per_serial::PerSerial;
use crate::signing::{Admit, Refusal, Verified};
use crate::supervisor::RunResult;
use crate::supervisor::Shutdown;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Most messages recorded in one ledger transaction.
const BATCH: usize = 256;

pub(super) struct Params {
    pub handler: Arc<Handler>,
    pub creds: Arc<Credentials>,
    pub required: Option<Arc<PerSerial>>,
    pub status: watch::Sender<ConnectionStatus>,
    pub settings: Settings,
    pub session_tx: watch::Sender<Option<(MqttHandle, Topic)>>,
    pub changes: Arc<crate::subsystems::changes::Poller>,
    pub remote: crate::services::outlet::Remote,
}

pub(super) async fn run(p: Params, token: Shutdown) -> RunResult {
    let creds = &p.creds;
    let inbox = topics::dms_actions(&creds.device_id)?;
    let outbox = topics::dms_responses(&creds.device_id)?;
    let health = topics::dms_health(&creds.device_id)?;
    let metrics_topic = topics::dms_metrics(&creds.org_id)?;
    // The per-serial tree, when the enrollment names the serial.
    let serial_base = match (&p.required, creds.device.serial.as_str()) {
        (Some(_), serial) if !serial.is_empty() => topics::serial_actions(serial).ok(),
        _ => None,
    };
    let audiences = audiences(creds);
    let mut subscriptions = vec![inbox];
    if let Some(base) = &serial_base {
        subscriptions.push(Topic::fixed(&format!("{}/#", base.mqtt())));
    }
    subscriptions.extend(p.remote.subscriptions(&creds.device_id));
    let s = &p.settings;
    let tls = crate::tls::dms_broker(creds, &s.ca, s.verify)
        .map_err(|e| anyhow::anyhow!("cannot set up TLS for the DMS broker: {e}"))?;
    let mut link = mqtt::connect(
        creds,
        tls,
        subscriptions,
        p.settings.keepalive,
        p.status.clone(),
        token.token().clone(),
    )?;
    let mqtt = link.handle.clone();
    p.session_tx.send_replace(Some((mqtt.clone(), outbox)));
    token.spawn(log_subscribed(mqtt.subscribed(), token.clone()));
    if let (Some(r), Some(_)) = (&p.required, &serial_base) {
        token.spawn(forward_results(r.clone(), mqtt.clone(), token.clone()));
    }
    token.spawn(watch_snap_changes(
        p.changes.events(),
        p.handler.ctx.hashes.clone(),
        token.clone(),
    ));
    let (c, m) = (p.handler.ctx.clone(), mqtt.clone());
    token.spawn(periodically(
        p.settings.heartbeat,
        token.clone(),
        move || {
            let (c, m, topic) = (c.clone(), m.clone(), health.clone());
            async move {
                let doc = heartbeat::heartbeat(&c).await;
                if !m.publish_telemetry(&topic, doc.to_string().into()) {
                    tracing::debug!("heartbeat not sent: the DMS broker is not connected");
                }
            }
        },
    ));
    let (device, m) = (creds.device_id.clone(), mqtt.clone());
    let mut prev = metrics::cpu_sample();
    token.spawn(periodically(p.settings.metrics, token.clone(), move || {
        let text = metrics::lines(&device, &mut prev);
        let (m, topic) = (m.clone(), metrics_topic.clone());
        async move {
            m.publish_telemetry(&topic, text.into());
        }
    }));

    let slots = Arc::new(Semaphore::new(p.settings.concurrency.max(1)));
    loop {
        // Admission: a slot before each action is taken. Waiting here holds
        // back the PUBACKs, and so the broker; a batch is only as large as
        // the free slots (never waiting for a slot while holding a batch).
        let mut slot = Some(tokio::select! {
            _ = token.cancelled() => return Ok(()),
            s = slots.clone().acquire_owned() => s?,
        });
        let first = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            m = link.messages.recv() => match m {
                Some(m) => m,
                None => {
                    if token.is_cancelled() {
                        return Ok(());
                    }
                    anyhow::bail!("the MQTT driver of the DMS link stopped")
                }
            },
        };
        // Serial-tree messages, unreadable and refused requests need no slot.
        let mut actions: Vec<Intake> = Vec::new();
        let mut permits = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if p.remote
                .serve_mqtt(&mqtt, &creds.device_id, &msg, &token)
                .await
            {
                next = link.messages.try_recv();
                continue;
            }
            if let Some((req, signed)) =
                triage(&p, &mqtt, serial_base.as_ref(), &audiences, &msg).await
            {
                actions.push(Intake { msg, req, signed });
                permits.extend(slot.take());
            }
            if actions.len() >= BATCH {
                break;
            }
            if slot.is_none() {
                match slots.clone().try_acquire_owned() {
                    Ok(s) => slot = Some(s),
                    Err(_) => break,
                }
            }
            next = link.messages.try_recv();
        }
        drop(slot);
        if actions.is_empty() {
            continue;
        }
        let skew = p.settings.signing.skew_s();
        /// A signed action's nonce as the ledger keeps it: key id, expiry.
        type Kept = Option<(String, i64)>;
        let batch: Vec<(Request, String, Kept)> = actions
            .iter()
            .map(|a| {
                let kept = a
                    .signed
                    .as_ref()
                    .map(|v| (v.kid.clone(), v.exp.saturating_add(skew)));
                (a.req.clone(), ledger::digest(&a.msg.payload), kept)
            })
            .collect();
        let admitted = blocking(&p.handler.ledger, move |l| {
            let entries: Vec<Entry> = batch
                .iter()
                .map(|(request, digest, kept)| Entry {
                    request,
                    digest,
                    signed: kept.as_ref().map(|(kid, expires_s)| Nonce {
                        kid,
                        expires_s: *expires_s,
                    }),
                })
                .collect();
            l.accept_entries(&entries)
        })
        .await;
        for a in &actions {
            mqtt.ack(&a.msg).await;
        }
        let admitted = match admitted {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot record DMS actions in the ledger; refusing them");
                for Intake { req, .. } in actions {
                    let resp = Response::fail(
                        &req.id,
                        &req.action,
                        format!("the device cannot record the action, so it did not run it: {e}"),
                    );
                    let h = p.handler.clone();
                    h.shutdown.clone().spawn(async move {
                        h.outbox
                            .send(&req.id, Kind::Unrecorded, resp.to_bytes())
                            .await
                    });
                }
                continue;
            }
        };
        for ((intake, admission), permit) in actions.into_iter().zip(admitted).zip(permits) {
            let h = p.handler.clone();
            let Intake { msg, req, signed } = intake;
            if let Some(why) = replay(&req, signed.as_ref(), msg.redelivered(), &admission) {
                drop(permit);
                refuse(&h, why);
                continue;
            }
            match admission {
                Admission::New => {
                    h.shutdown
                        .clone()
                        .spawn(async move { run_action(&h, req, Some(permit)).await });
                }
                Admission::Again {
                    state,
                    response,
                    completion,
                } => {
                    drop(permit);
                    again(h, req, state, response, completion);
                }
                Admission::Replayed { .. } => {
                    // Only signed entries are checked against the nonces,
                    // and `replay` above refused each of them.
                    drop(permit);
                }
                Admission::Conflict { action } => {
                    drop(permit);
                    let resp = Response::fail(
                        &req.id,
                        &req.action,
                        format!(
                            "id {:?} was already used for a different {action} request; this one was not run",
                            req.id
                        ),
                    );
                    tracing::warn!(id = %req.id, "DMS request id reused for a different request; refused");
                    h.shutdown.clone().spawn(async move {
                        h.outbox
                            .send(&req.id, Kind::Unrecorded, resp.to_bytes())
                            .await
                    });
                }
            }
        }
    }
}

/// An action taken from the broker, with what verified it.
struct Intake {
    msg: MqttMessage,
    req: Request,
    signed: Option<Verified>,
}

/// The names this device answers to in a signature's `aud`: its device id
/// and its serial (as in the serial assertion, and sanitized as in topics).
fn audiences(creds: &Credentials) -> Vec<String> {
    let serial = creds.device.serial.as_str();
    let mut out = vec![creds.device_id.clone()];
    for s in [serial.to_string(), topics::sanitize_serial(serial)] {
        if !s.is_empty() && !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// A signed action seen before is a replay, refused: its id is in the
/// ledger (an action row, or the nonce of a pruned one). One exception:
/// the broker's own redelivery (MQTT DUP) of a message it never had our
/// PUBACK for is answered from the ledger as any repeat (it is never run
/// again either way; whoever sets DUP gets at most the stored reply again).
fn replay(
    req: &Request,
    signed: Option<&Verified>,
    redelivered: bool,
    admission: &Admission,
) -> Option<Refusal> {
    signed?;
    let when = |ms: i64| crate::clock::format_short(ms.saturating_mul(1_000_000));
    let detail = match admission {
        Admission::New => return None,
        Admission::Again { .. } if redelivered => return None,
        Admission::Again { .. } => format!(
            "action id {:?} was accepted before: a signed action runs once",
            req.id
        ),
        Admission::Conflict { action } => format!(
            "action id {:?} was accepted before (for a different {action} request): a signed action runs once",
            req.id
        ),
        Admission::Replayed { received_ms } => format!(
            "action id {:?} was accepted at {}: a signed action runs once",
            req.id,
            when(*received_ms)
        ),
    };
    Some(Refusal::replay(&req.id, &req.action, detail))
}

/// Answers a refused action (never recorded, never run).
fn refuse(h: &Arc<Handler>, why: Refusal) {
    tracing::warn!(id = %why.id, action = %why.action, check = why.check.as_str(), "refused a DMS action: {}", why.message());
    let resp = Response::fail(&why.id, &why.action, why.message());
    let h2 = h.clone();
    h.shutdown.clone().spawn(async move {
        h2.outbox
            .send(&why.id, Kind::Unrecorded, resp.to_bytes())
            .await
    });
}

/// A repeated id: never run again; its stored replies are sent again.
fn again(
    h: Arc<Handler>,
    req: Request,
    state: State,
    response: Option<bytes::Bytes>,
    completion: Option<bytes::Bytes>,
) {
    match (state, response) {
        (State::Done, Some(resp)) => {
            tracing::info!(id = %req.id, action = %req.action, "repeated DMS request; answering again from the ledger");
            h.shutdown.clone().spawn(async move {
                h.outbox.send(&req.id, Kind::Response, resp).await;
                if let Some(done) = completion {
                    h.outbox.send(&req.id, Kind::Completion, done).await;
                }
            });
        }
        _ => {
            tracing::info!(id = %req.id, action = %req.action, "repeated DMS request still in progress; its reply follows");
        }
    }
}

/// Handles what needs no admission (the per-serial tree, unreadable
/// requests: answered and acknowledged here); returns the actions.
async fn triage(
    p: &Params,
    mqtt: &MqttHandle,
    serial_base: Option<&Topic>,
    audiences: &[String],
    msg: &MqttMessage,
) -> Option<(Request, Option<Verified>)> {
    if let (Some(r), Some(base)) = (&p.required, serial_base) {
        if msg.topic.strip_prefix(base).is_some() {
            // Stored (or refused) before the broker hears PUBACK; the write
            // (SQLite, synchronous=FULL) runs off the runtime.
            let (r, base, topic, payload) = (
                r.clone(),
                base.clone(),
                msg.topic.clone(),
                msg.payload.clone(),
            );
            let (audiences, redelivered) = (audiences.to_vec(), msg.redelivered());
            let stored = tokio::task::spawn_blocking(move || {
                let delivery = crate::services::per_serial::Delivery {
                    audiences: &audiences,
                    redelivered,
                };
                r.receive(&base, &topic, &payload, delivery)
            })
            .await;
            match stored {
                Ok(immediate) => {
                    if let Some((topic, payload)) = immediate {
                        let _ = mqtt.publish(&topic, payload).await;
                    }
                    mqtt.ack(msg).await;
                }
                // Not acknowledged: the broker delivers it again.
                Err(e) => {
                    tracing::error!(topic = %msg.topic, "the per-serial queue write failed: {e}")
                }
            }
            return None;
        }
    }
    let names: Vec<&str> = audiences.iter().map(String::as_str).collect();
    let verdict = match p
        .settings
        .signing
        .admit(&msg.payload, &names, crate::clock::now_s())
    {
        Ok(v) => v,
        Err(why) => {
            mqtt.ack(msg).await;
            refuse(&p.handler, why);
            return None;
        }
    };
    let parsed = match &verdict {
        Admit::Unsigned(bytes) => request::parse(bytes),
        Admit::Signed(v) => request::parse(&v.payload),
    };
    let signed = match verdict {
        Admit::Signed(v) => Some(v),
        Admit::Unsigned(_) => None,
    };
    match parsed {
        Ok(req) => Some((req, signed)),
        Err(resp) => {
            tracing::warn!(id = %resp.id, "refused a DMS request: {}", resp.message);
            mqtt.ack(msg).await;
            let h = p.handler.clone();
            h.shutdown.clone().spawn(async move {
                h.outbox
                    .send(&resp.id.clone(), Kind::Unrecorded, resp.to_bytes())
                    .await
            });
            None
        }
    }
}

/// Logs each time the subscriptions are granted (tests and operators wait
/// for this line).
async fn log_subscribed(mut subscribed: watch::Receiver<bool>, token: Shutdown) {
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            r = subscribed.wait_for(|s| *s) => if r.is_err() { return },
        }
        tracing::info!("subscribed to DMS actions");
        tokio::select! {
            _ = token.cancelled() => return,
            r = subscribed.wait_for(|s| !*s) => if r.is_err() { return },
        }
    }
}

/// Marks the heartbeat hashes stale whenever a change becomes ready (or
/// events were missed).
async fn watch_snap_changes(
    mut events: tokio::sync::broadcast::Receiver<crate::subsystems::changes::ChangeEvent>,
    hashes: heartbeat::HashCache,
    token: Shutdown,
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
async fn forward_results(required: Arc<PerSerial>, mqtt: MqttHandle, token: Shutdown) {
    let mut results = required.results();
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            r = results.recv() => match r {
                Ok((topic, payload)) => {
                    let _ = mqtt.publish(&topic, payload).await;
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
        }
    }
}

/// Runs `tick` now and then every `every`, until the session ends.
async fn periodically<F, Fut>(every: Duration, token: Shutdown, mut tick: F)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::Check;

    #[test]
    fn a_signed_id_seen_before_is_a_replay_unless_the_broker_redelivers_it() {
        let req = Request {
            id: "a".into(),
            action: "install".into(),
            snap: "x".into(),
            data: String::new(),
        };
        let signed = Verified {
            payload: Vec::new(),
            kid: "k".into(),
            nonce: "a".into(),
            exp: 0,
        };
        let again = Admission::Again {
            state: State::Done,
            response: None,
            completion: None,
        };
        let conflict = Admission::Conflict {
            action: "remove".into(),
        };
        let pruned = Admission::Replayed { received_ms: 0 };
        // Unsigned: the ledger's rules as before.
        for a in [&Admission::New, &again, &conflict] {
            assert!(replay(&req, None, false, a).is_none());
        }
        assert!(replay(&req, Some(&signed), false, &Admission::New).is_none());
        // The broker's redelivery: answered from the ledger, not refused.
        assert!(replay(&req, Some(&signed), true, &again).is_none());
        for (a, dup) in [
            (&again, false),
            (&conflict, false),
            (&conflict, true),
            (&pruned, false),
            (&pruned, true),
        ] {
            let r = replay(&req, Some(&signed), dup, a).expect("a replay");
            assert_eq!(
                (r.check, r.id.as_str(), r.action.as_str()),
                (Check::Replay, "a", "install")
            );
        }
    }
}
