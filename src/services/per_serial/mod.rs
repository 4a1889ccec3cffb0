//! Per-serial action topics: `devices/actions/{sanitized serial}/#`.
//!
//! One handler serves the tree from both transports: the DMS broker (MQTT)
//! and the device-local NATS (`devices.actions.{serial}.>`, also what MQTT
//! clients of a nats-server with its MQTT listener reach). Today the tree
//! has one action, `required-install`: the listed snaps must be installed
//! (idempotently, on the channel given). A request is stored in SQLite
//! before it is acknowledged; a worker installs what is missing, retries
//! failures with back-off, and publishes the outcome on
//! `.../required-install/result` on every transport the agent has.

pub mod request;
pub mod store;
mod subsystem;

pub use subsystem::NatsSide;

use crate::backoff;
use crate::bus::{topics, Nats, Topic};
use crate::signing::{Admit, Refusal};
use crate::snapd::{self, SnapAction, SnapName, Status};
use crate::subsystems::changes::Poller;
use crate::supervisor::RunResult;
use bytes::Bytes;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use store::{Added, Pending, SnapRow, Store};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

/// The one action of the tree today.
pub const REQUIRED_INSTALL: &str = "required-install";
/// Results go to `{request topic}/result`; messages there are ours.
pub const RESULT: &str = "result";

/// The NATS subjects of this tree, as the AsyncAPI document names them.
pub fn documented_addresses() -> Vec<String> {
    let base = format!("{}.{{serial}}", Topic::fixed(topics::SERIAL_ACTIONS).nats());
    vec![
        format!("{base}.{REQUIRED_INSTALL}"),
        format!("{base}.{REQUIRED_INSTALL}.{RESULT}"),
    ]
}

/// Settings (`required.*`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Switch a required snap that tracks another channel.
    pub switch_channel: bool,
    /// Attempts before a request is reported as failed.
    pub attempts: u32,
    /// Longest wait between attempts.
    pub retry_max: Duration,
    /// Longest wait for one install.
    pub change_timeout: Duration,
    /// `dms.signing.*`: the same trust as the DMS topic's actions.
    pub signing: Arc<crate::signing::Policy>,
}

/// How a message reached the tree, for its signature checks.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// The names this device answers to in a signature's `aud` (the
    /// serial, and the device id on the DMS connection).
    pub audiences: &'a [String],
    /// The broker's own redelivery (MQTT DUP): a repeat answered as any
    /// repeat, not a replay (it never runs twice either way).
    pub redelivered: bool,
}

/// The audiences of the tree on a transport that knows only the serial:
/// as in the serial assertion and sanitized as in topics.
pub fn serial_audiences(serial: &str) -> Vec<String> {
    let mut out = vec![serial.to_string()];
    let clean = topics::sanitize_serial(serial);
    if clean != serial {
        out.push(clean);
    }
    out
}

/// The per-serial action tree: requests queued durably, installed in order, results published.
pub struct PerSerial {
    snapd: snapd::Client,
    /// The shared change poller: installs are followed there.
    changes: Arc<Poller>,
    /// Opened by the worker (retried with back-off by the supervisor when
    /// the file cannot be opened); requests are refused until then.
    store: std::sync::OnceLock<Store>,
    db_path: std::path::PathBuf,
    settings: Settings,
    wake: Notify,
    results: broadcast::Sender<(Topic, Bytes)>,
    /// True once the worker opened the queue.
    opened: tokio::sync::watch::Sender<bool>,
}

/// How long serving waits at start for the queue to open; after it,
/// requests are served (and refused while the queue stays closed).
const OPEN_WAIT: Duration = Duration::from_secs(3);

use crate::clock::now_s as unix_now;

fn result_topic(request_topic: &Topic) -> Topic {
    Topic::fixed(&format!("{}/{RESULT}", request_topic.mqtt()))
}

fn failure(id: &str, message: &str) -> Bytes {
    Bytes::from(json!({"id": id, "success": false, "message": message, "snaps": []}).to_string())
}

impl PerSerial {
    /// The tree, its queue opened by the worker.
    pub fn new(
        snapd: snapd::Client,
        changes: Arc<Poller>,
        db_path: &std::path::Path,
        settings: Settings,
    ) -> Arc<PerSerial> {
        let (results, _) = broadcast::channel(64);
        Arc::new(PerSerial {
            snapd,
            changes,
            store: std::sync::OnceLock::new(),
            db_path: db_path.to_path_buf(),
            settings,
            wake: Notify::new(),
            results,
            opened: tokio::sync::watch::channel(false).0,
        })
    }

    /// The queue; only called by the worker, after it opened it.
    fn store(&self) -> &Store {
        self.store
            .get()
            .expect("the worker opens the queue before using it")
    }

    /// Results to publish, for a transport to forward.
    pub fn results(&self) -> broadcast::Receiver<(Topic, Bytes)> {
        self.results.subscribe()
    }

    /// Takes a message under `base` (the serial's tree). Returns a message
    /// to publish at once (a refusal, or a finished request's result again);
    /// `None` when the request was queued (or the message was a result).
    /// When this returns, a queued request is on disk: acknowledge then.
    pub fn receive(
        &self,
        base: &Topic,
        topic: &Topic,
        payload: &[u8],
        delivery: Delivery,
    ) -> Option<(Topic, Bytes)> {
        let sub = topic.strip_prefix(base)?;
        if sub.last() == Some(&RESULT) || sub.is_empty() {
            return None;
        }
        if sub != [REQUIRED_INSTALL] {
            let id = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
                .unwrap_or_default();
            let msg = format!(
                "unknown action topic {:?}; this device knows {REQUIRED_INSTALL}",
                sub.join("/")
            );
            tracing::warn!(%topic, "{msg}");
            return Some((result_topic(topic), failure(&id, &msg)));
        }
        // Signed (or required to be) like the DMS topic's actions.
        let names: Vec<&str> = delivery.audiences.iter().map(String::as_str).collect();
        let (payload, signed) = match self.settings.signing.admit(payload, &names, unix_now()) {
            Ok(Admit::Unsigned(bytes)) => (std::borrow::Cow::Borrowed(bytes), false),
            Ok(Admit::Signed(v)) => (std::borrow::Cow::Owned(v.payload), true),
            Err(why) => {
                tracing::warn!(%topic, id = %why.id, check = why.check.as_str(), "refused a required-install: {}", why.message());
                return Some((result_topic(topic), failure(&why.id, &why.message())));
            }
        };
        let req = match request::parse(&payload) {
            Ok(r) => r,
            Err(refusal) => {
                tracing::warn!(%topic, id = %refusal.id, "refused a required-install: {}", refusal.message);
                return Some((result_topic(topic), failure(&refusal.id, &refusal.message)));
            }
        };
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let Some(store) = self.store.get() else {
            let msg = format!(
                "the device cannot store the request: its queue {} is not open (the agent retries; see its log)",
                self.db_path.display()
            );
            return Some((result_topic(topic), failure(&req.id, &msg)));
        };
        // The last line before the synchronous write (a test waits for it).
        tracing::debug!(id = %req.id, "storing a required-install");
        match store.add(&req, topic.mqtt(), &now) {
            Ok(Added::New) => {
                let names: Vec<&str> = req.snaps.iter().map(|s| s.name.as_str()).collect();
                tracing::info!(id = %req.id, snaps = ?names, "required-install queued");
                self.wake.notify_one();
                None
            }
            // A signed request seen before (its id is in the queue, which
            // keeps every id): a replay, refused.
            Ok(Added::Pending | Added::Done(_)) if signed && !delivery.redelivered => {
                let why = Refusal::replay(
                    &req.id,
                    "",
                    format!(
                        "request id {:?} was accepted before: a signed request runs once",
                        req.id
                    ),
                );
                tracing::warn!(%topic, id = %req.id, "refused a required-install: {}", why.message());
                Some((result_topic(topic), failure(&req.id, &why.message())))
            }
            Ok(Added::Pending) => {
                tracing::info!(id = %req.id, "required-install already queued");
                None
            }
            Ok(Added::Done(result)) => Some((result_topic(topic), Bytes::from(result))),
            Err(e) => {
                tracing::error!(id = %req.id, error = %e, "cannot queue a required-install");
                Some((
                    result_topic(topic),
                    failure(
                        &req.id,
                        &format!("the device cannot store the request: {e}"),
                    ),
                ))
            }
        }
    }

    /// Works through the queue until shutdown.
    pub async fn run_worker(self: Arc<Self>, shutdown: CancellationToken) -> RunResult {
        if self.store.get().is_none() {
            // An error ends this run; the supervisor retries with back-off.
            let path = self.db_path.clone();
            let store = tokio::task::spawn_blocking(move || Store::open(&path)).await??;
            let _ = self.store.set(store);
            tracing::info!(database = %self.db_path.display(), "per-serial queue open");
            self.opened.send_replace(true);
        }
        loop {
            let due = self.store().due(unix_now())?;
            for p in due {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                self.process(p).await?;
            }
            let wait = match self.store().next_due()? {
                Some(at) => Duration::from_secs((at - unix_now()).clamp(0, 3600) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait.max(Duration::from_millis(100))) => {}
            }
        }
    }

    async fn process(&self, mut p: Pending) -> RunResult {
        let installed: HashMap<String, snapd::Snap> = match self.snapd.snaps().await {
            Ok(list) => list.into_iter().map(|s| (s.name.clone(), s)).collect(),
            Err(e) => {
                tracing::warn!(id = %p.id, error = %e, "cannot list snaps; retrying the required-install later");
                return self.later(&p, &e.to_string());
            }
        };
        let mut pending_left = false;
        for row in p.snaps.iter_mut() {
            if matches!(
                row.status.as_str(),
                "installed" | "already-installed" | "switched"
            ) {
                continue;
            }
            self.ensure(&p.id, row, installed.get(&row.name)).await?;
            pending_left |= row.status == "failed";
        }
        if pending_left && p.attempts + 1 < self.settings.attempts {
            let why = p
                .snaps
                .iter()
                .filter_map(|s| s.error.clone())
                .collect::<Vec<_>>()
                .join("; ");
            return self.later(&p, &why);
        }
        let success = !pending_left;
        let message = if success {
            String::new()
        } else {
            p.snaps
                .iter()
                .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.name)))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let result = json!({
            "id": p.id,
            "success": success,
            "message": message,
            "snaps": p.snaps.iter().map(|s| json!({"name": s.name, "status": s.status, "change": s.change})).collect::<Vec<_>>(),
        })
        .to_string();
        self.store().finish(&p.id, &result)?;
        tracing::info!(id = %p.id, success, "required-install done");
        let _ = self
            .results
            .send((result_topic(&Topic::fixed(&p.topic)), Bytes::from(result)));
        Ok(())
    }

    fn later(&self, p: &Pending, why: &str) -> RunResult {
        let delay = backoff::delay(Duration::from_secs(5), self.settings.retry_max, p.attempts);
        tracing::warn!(id = %p.id, attempt = p.attempts + 1, retry_in = ?delay, "required-install not complete ({why}); retrying");
        self.store()
            .retry_later(&p.id, p.attempts + 1, unix_now() + delay.as_secs() as i64)?;
        Ok(())
    }

    /// Brings one snap to its required state and records every step.
    async fn ensure(
        &self,
        req: &str,
        row: &mut SnapRow,
        installed: Option<&snapd::Snap>,
    ) -> RunResult {
        // A change started before a restart: see it through first.
        if let Some(change) = row.change.clone().filter(|_| row.status == "pending") {
            match self.wait(&change).await {
                Ok(()) => {
                    row.status = if installed.is_some() {
                        "switched"
                    } else {
                        "installed"
                    }
                    .into();
                    row.error = None;
                    return Ok(self.store().set_snap(req, row)?);
                }
                Err(e) => row.error = Some(e),
            }
        }
        let name = SnapName::parse(&row.name)?;
        let action = match installed {
            Some(s) if !self.settings.switch_channel || tracking(s) == row.channel => {
                row.status = "already-installed".into();
                row.error = None;
                return Ok(self.store().set_snap(req, row)?);
            }
            Some(_) => "switch",
            None => "install",
        };
        let started = self
            .snapd
            .snap_action(
                &name,
                &SnapAction::new(action).channel(Some(row.channel.clone())),
            )
            .await;
        let change = match started {
            Ok(c) => c,
            Err(e) => {
                row.status = "failed".into();
                row.error = Some(e.to_string());
                return Ok(self.store().set_snap(req, row)?);
            }
        };
        row.change = Some(change.clone());
        row.status = "pending".into();
        self.store().set_snap(req, row)?;
        tracing::info!(id = %req, snap = %row.name, %change, "required-install change started and recorded");
        match self.wait(&change).await {
            Ok(()) => {
                row.status = if action == "switch" {
                    "switched"
                } else {
                    "installed"
                }
                .into();
                row.error = None;
            }
            Err(e) => {
                row.status = "failed".into();
                row.error = Some(e);
            }
        }
        Ok(self.store().set_snap(req, row)?)
    }

    /// Waits for a change to be ready (through the shared change poller);
    /// Ok when it is Done.
    async fn wait(&self, id: &str) -> Result<(), String> {
        let ch = self
            .changes
            .wait_ready(id, self.settings.change_timeout)
            .await?;
        if ch.status == Status::Done {
            Ok(())
        } else {
            Err(ch
                .err
                .unwrap_or_else(|| format!("change {id} ended {:?}", ch.status)))
        }
    }
}

/// The channel a snap tracks, in `track/risk` form.
fn tracking(s: &snapd::Snap) -> String {
    let t = if s.tracking_channel.is_empty() {
        &s.channel
    } else {
        &s.tracking_channel
    };
    if t.contains('/') {
        t.clone()
    } else {
        format!("latest/{t}")
    }
}

/// Serves the tree on the device-local NATS: subscribes once the device has
/// a serial, answers refusals at once, and forwards the worker's results.
pub async fn serve_nats(
    required: Arc<PerSerial>,
    bus: Nats,
    snapd: snapd::Client,
    shutdown: CancellationToken,
) -> RunResult {
    let serial = wait_for_serial(&snapd, &shutdown).await;
    let Some(serial) = serial else { return Ok(()) };
    let base = topics::serial_actions(&serial)?;
    // Core NATS never redelivers: every repeat of a signed id is a replay.
    let audiences = Arc::new(serial_audiences(&serial));
    // Connected (the server's INFO is known) once the server answered.
    bus.sync().await?;
    // Held back while the server protects nothing; looked at again now and
    // then (a reconnection may reach a configured server).
    let mut told = false;
    while let Some(why) = bus.unprotected() {
        if !told {
            tracing::error!(
                subject = %base.nats(),
                "NOT serving per-serial actions on NATS: {why}"
            );
            told = true;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
    // Requests that arrive before the worker opened the queue would be
    // refused: at start, give it a moment (it opens in milliseconds).
    let mut opened = required.opened.subscribe();
    let _ = tokio::time::timeout(OPEN_WAIT, opened.wait_for(|o| *o)).await;
    let mut sub = bus
        .subscribe(&Topic::fixed(&format!("{}/#", base.mqtt())))
        .await?;
    // The subscription is in force once the server processed it: only
    // then is "serving" true (core NATS keeps nothing for latecomers).
    bus.sync().await?;
    tracing::info!(subject = %base.nats(), "serving per-serial actions on NATS");
    let mut results = required.results();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = results.recv() => match r {
                Ok((topic, payload)) => bus.publish(&topic, payload).await?,
                Err(broadcast::error::RecvError::Lagged(n)) => tracing::warn!(n, "per-serial results dropped for NATS"),
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            m = sub.next() => {
                let Some(m) = m else { anyhow::bail!("the NATS subscription ended") };
                if let Some(why) = bus.unprotected() {
                    // Reconnected to a server that protects nothing: start
                    // again (the check above then holds the tree back).
                    anyhow::bail!("per-serial action on {} not taken: {why}", m.topic);
                }
                // SQLite with synchronous=FULL and an fsync: off the runtime.
                let (r, b, topic, payload, aud) = (required.clone(), base.clone(), m.topic.clone(), m.payload.clone(), audiences.clone());
                let immediate = tokio::task::spawn_blocking(move || {
                    r.receive(&b, &topic, &payload, Delivery { audiences: &aud, redelivered: false })
                })
                    .await
                    .map_err(|e| anyhow::anyhow!("the per-serial queue write failed: {e}"))?;
                if let Some((topic, payload)) = &immediate {
                    bus.publish(topic, payload.clone()).await?;
                }
                if m.wants_reply() {
                    let ack = immediate.map(|(_, p)| p).unwrap_or_else(|| Bytes::from_static(br#"{"accepted":true}"#));
                    let _ = bus.reply(&m, ack).await;
                }
            }
        }
    }
}

/// The device's serial from snapd, waiting (logged once) while it has none.
async fn wait_for_serial(snapd: &snapd::Client, shutdown: &CancellationToken) -> Option<String> {
    let mut logged = false;
    let mut backoff = backoff::Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
    loop {
        match snapd.serial().await {
            Ok(Some(text)) => {
                if let Some(s) = snapd::Assertion::parse(&text)
                    .ok()
                    .and_then(|a| a.header("serial").map(str::to_string))
                {
                    return Some(s);
                }
            }
            Ok(None) | Err(_) if !logged => {
                tracing::info!("no serial from snapd yet (not registered, or snapd unreachable): per-serial actions wait for it");
                logged = true;
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
