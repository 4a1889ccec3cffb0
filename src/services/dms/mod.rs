//! The DMS management channel: actions in on `devices/sub/{deviceId}`,
//! responses out on `devices/pub/{deviceId}`, heartbeat and metrics.
//!
//! The session lives while the device has credentials: it starts when the
//! enrollment hands them over and ends when they are withdrawn
//! (unregister). A session that ends for any other reason is restarted
//! with back-off, and says so in `iot-agent status` and on
//! `iot.agent.mqtt.connection.status`.
//!
//! Every action goes through the [`ledger`] (see there for the order of
//! writes that makes an action run at most once and be answered at least
//! once). Actions run in their own tasks, at most `dms.actions.concurrency`
//! at once; beyond that the session stops acknowledging and the broker
//! holds the rest ([`crate::bus::driver`]).

pub mod actions;
pub mod completion;
pub mod heartbeat;
pub mod ledger;
pub mod metrics;
pub mod outbox;
pub mod request;
mod session;
pub mod snaps;
pub mod upload;

use crate::backoff::Backoff;
use crate::bus::mqtt::MqttHandle;
use crate::bus::{topics, ConnectionStatus, Topic};
use crate::identity::{Credentials, CredentialsRx, Store};
use crate::services::per_serial::PerSerial;
use crate::snapd;
use crate::subsystems::changes::Poller;
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use actions::{Ctx, Next};
use ledger::{Ledger, State, Unfinished};
use outbox::{Kind, Outbox};
use request::{Request, Response};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit};

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
/// How often finished ledger rows are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Actions without an effect on the device: run again after a crash
/// instead of being marked `started` first (one fsync less each).
const READ_ONLY: [&str; 5] = ["conf", "device", "info", "list", "server"];

/// Where the ledger lives.
#[derive(Debug, Clone)]
pub enum LedgerAt {
    /// A SQLite file.
    File(PathBuf),
    /// No persistence: the benchmark's baseline.
    Memory,
}

/// Settings of the channel (`dms.*`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `dms.heartbeat.interval`.
    pub heartbeat: Duration,
    /// `dms.metrics.interval`.
    pub metrics: Duration,
    /// `dms.change.timeout`: longest wait for a change an action started.
    pub change_timeout: Duration,
    /// `dms.upload.timeout`.
    pub upload_timeout: Duration,
    /// `dms.upload.limit`, in bytes.
    pub upload_limit: u64,
    /// Where snapshots are staged before an upload.
    pub scratch_dir: std::path::PathBuf,
    /// `dms.ca` and `dms.verify`: how the broker is trusted.
    pub ca: crate::config::PemSource,
    /// How the broker's certificate is verified.
    pub verify: crate::tls::Verify,
    /// `dms.protocol`: the MQTT version.
    pub protocol: crate::config::DmsProtocol,
    /// `dms.completion`: report the end of changes that actions started.
    pub completion: bool,
    /// `dms.keepalive`.
    pub keepalive: Duration,
    /// `dms.actions.concurrency`: actions admitted at once (backpressure beyond).
    pub concurrency: usize,
    /// Where the ledger lives.
    pub ledger: LedgerAt,
    /// `dms.ledger.max.age`: answered rows older than this are pruned.
    pub ledger_max_age: Duration,
    /// `dms.ledger.max.count`: at most this many answered rows are kept.
    pub ledger_max_count: u64,
    /// `dms.signing.*`: which actions are trusted (the per-serial tree has
    /// its own copy).
    pub signing: Arc<crate::signing::Policy>,
}

impl Settings {
    /// The settings of `dms.*` (and `dirs.common` for the scratch space).
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            heartbeat: config.dms.heartbeat.interval.get(),
            metrics: config.dms.metrics.interval.get(),
            change_timeout: config.dms.change.timeout.get(),
            upload_timeout: config.dms.upload.timeout.get(),
            upload_limit: config.dms.upload.limit,
            ca: config.dms.ca.clone(),
            verify: config.dms.verify,
            protocol: config.dms.protocol,
            completion: config.dms.completion,
            scratch_dir: config.common_dir().join("tmp"),
            keepalive: config.dms.keepalive.get(),
            concurrency: config.dms.actions.concurrency.max(1) as usize,
            ledger: LedgerAt::File(config.dms.ledger.location.path().to_path_buf()),
            ledger_max_age: config.dms.ledger.max.age.get(),
            ledger_max_count: config.dms.ledger.max.count,
            signing: Arc::new(crate::signing::Policy::from_config(&config.dms.signing)),
        }
    }
}

/// The DMS subsystem: what a session needs, kept across sessions.
#[derive(Clone)]
pub struct Dms {
    /// snapd, for the actions.
    pub snapd: snapd::Client,
    /// The shared change poller: completion reports follow changes there,
    /// and a change that became ready means the snaps may have changed, so
    /// the heartbeat hashes are built again.
    pub changes: Arc<Poller>,
    /// The per-serial action tree, served on this connection too.
    pub required: Option<Arc<PerSerial>>,
    /// The credentials, as enrollment publishes them.
    pub credentials: CredentialsRx,
    /// The link's state, for the mirror's status endpoint and the CLI.
    pub status: watch::Sender<ConnectionStatus>,
    /// The credential store (unregister removes from it).
    pub store: Store,
    /// Notified to reconnect with new credentials.
    pub reload: Arc<Notify>,
    /// `dms.*`.
    pub settings: Settings,
    /// The remote terminal and browser on the device's own topics.
    pub remote: crate::services::outlet::Remote,
}

/// What every action task needs.
struct Handler {
    ctx: Arc<Ctx>,
    /// `dms.completion`.
    report: bool,
    outbox: Outbox,
    ledger: Arc<Ledger>,
    store: Store,
    reload: Arc<Notify>,
    /// Action tasks are spawned here; a change being followed is left to
    /// the next start (the ledger has it) when the agent stops.
    shutdown: Shutdown,
}

/// Runs a ledger call off the async threads (every commit is fsync'd).
async fn blocking<T: Send + 'static>(
    ledger: &Arc<Ledger>,
    f: impl FnOnce(&Ledger) -> Result<T, crate::db::DbError> + Send + 'static,
) -> Result<T, String> {
    let l = ledger.clone();
    match tokio::task::spawn_blocking(move || f(&l)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the ledger call failed: {e}")),
    }
}

impl Subsystem for Dms {
    const NAME: &'static str = "dms";
    const SECTION: &'static str = "dms";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        self.serve(shutdown).await
    }
}

impl Dms {
    fn open_ledger(&self) -> Result<Ledger, crate::db::DbError> {
        match &self.settings.ledger {
            LedgerAt::File(p) => Ledger::open(p),
            LedgerAt::Memory => Ledger::in_memory(),
        }
    }

    /// Runs sessions for as long as the agent runs.
    async fn serve(&self, shutdown: Shutdown) -> RunResult {
        // Without its ledger the channel does not accept actions: each one
        // would be acknowledged with nothing to remember it by.
        let ledger = Arc::new(self.open_ledger()?);
        let signing = &self.settings.signing;
        let kids = signing.kids().join(", ");
        if signing.required {
            tracing::info!(keys = %kids, "only signed actions are run (dms.signing.required)");
        } else if !kids.is_empty() {
            tracing::info!(keys = %kids, "signed actions are verified; unsigned ones run too (dms.signing.required=false)");
        }
        let (session_tx, session_rx) = watch::channel::<Option<(MqttHandle, Topic)>>(None);
        let outbox = Outbox {
            session: session_rx,
            ledger: ledger.clone(),
        };
        shutdown.spawn(record_link(
            self.status.subscribe(),
            ledger.clone(),
            shutdown.clone(),
        ));
        shutdown.spawn(prune(
            ledger.clone(),
            self.settings.ledger_max_age,
            self.settings.ledger_max_count,
            shutdown.clone(),
        ));
        let mut creds_rx = self.credentials.clone();
        let mut resumed = false;
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            let creds = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = creds_rx.wait_for(Option::is_some) => match c {
                    Ok(c) => c.clone().expect("waited for Some"),
                    Err(_) => return Ok(()),
                },
            };
            let handler = Arc::new(Handler {
                ctx: Arc::new(self.ctx(&creds)?),
                report: self.settings.completion,
                outbox: outbox.clone(),
                ledger: ledger.clone(),
                store: self.store.clone(),
                reload: self.reload.clone(),
                shutdown: shutdown.clone(),
            });
            if !resumed {
                // Once per process: what a previous run left unfinished.
                resumed = true;
                resume(handler.clone()).await;
            }
            let session = shutdown.child();
            let started = std::time::Instant::now();
            let mut task = tokio::spawn(session::run(
                session::Params {
                    handler: handler.clone(),
                    creds: creds.clone(),
                    required: self.required.clone(),
                    status: self.status.clone(),
                    settings: self.settings.clone(),
                    session_tx: session_tx.clone(),
                    changes: self.changes.clone(),
                    remote: self.remote.clone(),
                },
                session.clone(),
            ));
            let ended = tokio::select! {
                _ = shutdown.cancelled() => None,
                _ = creds_rx.wait_for(|c| c.as_ref().map(|c| !Arc::ptr_eq(c, &creds)).unwrap_or(true)) => {
                    tracing::info!("device credentials changed; closing the DMS session");
                    None
                }
                r = &mut task => Some(r),
            };
            session.cancel();
            session_tx.send_replace(None);
            let by_itself = ended.is_some();
            let outcome = match ended {
                Some(r) => r,
                None => task.await,
            };
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if !by_itself {
                continue;
            }
            // The session ended by itself: say why, and start another.
            let why = match outcome {
                Ok(Ok(())) => "it stopped".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) if e.is_panic() => "it panicked".to_string(),
                Err(e) => e.to_string(),
            };
            if started.elapsed() > Duration::from_secs(60) {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            tracing::error!(
                error = %why,
                restart_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                "the DMS session ended; restarting it"
            );
            self.status
                .send_replace(ConnectionStatus::disconnected(format!(
                    "the DMS session ended ({why}); the agent restarts it"
                )));
            let l = ledger.clone();
            let _ = tokio::task::spawn_blocking(move || l.set_link(false, Some(&why), true)).await;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn ctx(&self, creds: &Arc<Credentials>) -> anyhow::Result<Ctx> {
        let s = &self.settings;
        let uploader = upload::Uploader::new(s.upload_timeout, s.upload_limit)
            .map_err(|e| anyhow::anyhow!("cannot build the upload client: {e}"))?;
        Ok(Ctx {
            snapd: self.snapd.clone(),
            changes: self.changes.clone(),
            creds: creds.clone(),
            uploader,
            change_timeout: s.change_timeout,
            scratch_dir: s.scratch_dir.clone(),
            protocol: s.protocol,
            hashes: heartbeat::HashCache::default(),
        })
    }
}

/// Keeps the ledger's copy of the link state (read by `iot-agent status`).
async fn record_link(
    mut status: watch::Receiver<ConnectionStatus>,
    ledger: Arc<Ledger>,
    shutdown: Shutdown,
) {
    loop {
        let s = status.borrow_and_update().clone();
        let l = ledger.clone();
        let written =
            tokio::task::spawn_blocking(move || l.set_link(s.connected, s.error.as_deref(), false))
                .await;
        if let Ok(Err(e)) = written {
            tracing::warn!(error = %e, "cannot record the DMS link state for `iot-agent status`");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            c = status.changed() => if c.is_err() { return },
        }
    }
}

async fn prune(ledger: Arc<Ledger>, age: Duration, count: u64, shutdown: Shutdown) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match blocking(&ledger, move |l| l.prune(age, count)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "pruned finished DMS actions from the ledger"),
            Err(e) => tracing::warn!(error = %e, "cannot prune the DMS ledger"),
        }
    }
}

/// Finishes what a previous run of the agent left: replies not
/// acknowledged are sent again, actions never started are run, actions
/// cut short are never run again (their change is followed when snapd made
/// one, otherwise they are reported failed), and changes still unreported
/// are followed.
async fn resume(h: Arc<Handler>) {
    let rows = match blocking(&h.ledger, |l| l.unfinished()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the DMS ledger; unfinished actions wait for the next start");
            return;
        }
    };
    if !rows.is_empty() {
        tracing::info!(
            actions = rows.len(),
            "resuming DMS actions a previous run left unfinished"
        );
    }
    for row in rows {
        let h = h.clone();
        h.shutdown
            .clone()
            .spawn(async move { resume_one(&h, row).await });
    }
}

async fn resume_one(h: &Handler, row: Unfinished) {
    let req = row.request;
    match row.state {
        State::Received => {
            tracing::info!(id = %req.id, action = %req.action, "running a DMS action received before the restart");
            run_action(h, req, None).await;
        }
        State::Started => resume_started(h, req, row.updated_ms).await,
        State::Done => {
            if let Some(resp) = row.unacked_response {
                h.outbox.send(&req.id, Kind::Response, resp).await;
            }
            if let Some(done) = row.unacked_completion {
                h.outbox.send(&req.id, Kind::Completion, done).await;
            }
            if let Some(change) = row.change_to_follow.filter(|_| h.report) {
                tracing::info!(id = %req.id, %change, "following the change of a DMS action after a restart");
                follow(h, &req, &change).await;
            }
        }
    }
}

/// An action cut short after it was marked `started` (never run again: it
/// may have taken effect). When snapd made its change, the reply it would
/// have had is sent and the change followed to its completion report;
/// otherwise it is reported failed, saying why.
async fn resume_started(h: &Handler, req: Request, started_ms: i64) {
    let found = match h.ctx.changes.first_snapshot(h.ctx.change_timeout).await {
        Some(snap) => actions::change_of_started(&req, started_ms, &snap.changes),
        None => Err("snapd's changes could not be read to find out".into()),
    };
    let (resp, change) = match found {
        Ok(Some(change)) => {
            tracing::info!(id = %req.id, action = %req.action, %change, "a DMS action cut short by a restart had started its change; following it");
            (Response::ok(&req, serde_json::json!(change)), Some(change))
        }
        Ok(None) => (
            Response::fail(
                &req.id,
                &req.action,
                "the agent stopped (restart or power cut) while running this action; snapd shows no \
                 change for it, so it most likely did not take effect; it was not run again: check \
                 the device (list) and send it again if needed",
            ),
            None,
        ),
        Err(why) => (
            Response::fail(
                &req.id,
                &req.action,
                format!(
                    "the agent stopped (restart or power cut) while running this action; it was \
                     not run again and may or may not have taken effect ({why}): check the device \
                     (list)"
                ),
            ),
            None,
        ),
    };
    if change.is_none() {
        tracing::warn!(id = %req.id, action = %req.action, "a DMS action was cut short by a restart; reporting it failed: {}", resp.message);
    }
    let bytes = resp.to_bytes();
    let (id, b, c) = (req.id.clone(), bytes.clone(), change.clone());
    if let Err(e) = blocking(&h.ledger, move |l| l.answer(&id, &b, c.as_deref())).await {
        tracing::error!(id = %req.id, error = %e, "cannot store a DMS reply");
    }
    h.outbox.send(&req.id, Kind::Response, bytes).await;
    if let Some(change) = change.filter(|_| h.report) {
        follow(h, &req, &change).await;
    }
}

/// Runs one accepted action start to finish: exactly one reply (and a
/// completion report when it starts a change), each stored before it is
/// sent. `permit` is the admission slot, released once the reply is stored.
async fn run_action(h: &Handler, req: Request, permit: Option<OwnedSemaphorePermit>) {
    if !READ_ONLY.contains(&req.action.as_str()) {
        let id = req.id.clone();
        if let Err(e) = blocking(&h.ledger, move |l| l.start(&id)).await {
            // Not recorded as started: running it could run it twice.
            let resp = Response::fail(
                &req.id,
                &req.action,
                format!("the device cannot record the action, so it did not run it: {e}"),
            );
            tracing::error!(id = %req.id, error = %e, "cannot mark a DMS action started");
            return h
                .outbox
                .send(&req.id, Kind::Unrecorded, resp.to_bytes())
                .await;
        }
    }
    tracing::info!(id = %req.id, action = %req.action, snap = %req.snap, "DMS action");
    let (resp, next) = actions::execute(&h.ctx, &req).await;
    if !resp.success {
        tracing::warn!(id = %req.id, action = %req.action, "DMS action failed: {}", resp.message);
    }
    let bytes = resp.to_bytes();
    let change = match &next {
        Next::FollowChange(c) => Some(c.clone()),
        _ => None,
    };
    let (id, b, c) = (req.id.clone(), bytes.clone(), change.clone());
    if let Err(e) = blocking(&h.ledger, move |l| l.answer(&id, &b, c.as_deref())).await {
        tracing::error!(id = %req.id, error = %e, "cannot store a DMS reply; sending it anyway");
    }
    drop(permit);
    match next {
        Next::Nothing => h.outbox.send(&req.id, Kind::Response, bytes).await,
        Next::FollowChange(_) if !h.report => h.outbox.send(&req.id, Kind::Response, bytes).await,
        Next::FollowChange(change) => {
            h.outbox.send(&req.id, Kind::Response, bytes).await;
            follow(h, &req, &change).await;
        }
        Next::Unregister => {
            let sent = tokio::time::timeout(
                REPLY_ACK_BOUND,
                h.outbox.send(&req.id, Kind::Response, bytes),
            )
            .await;
            if sent.is_err() {
                tracing::warn!(
                    "the broker did not confirm the unregister reply in time; unregistering anyway"
                );
            }
            match h.store.clear() {
                Ok(()) => {
                    tracing::info!("unregistered by the DMS: credentials deleted; enrolling again")
                }
                Err(e) => tracing::error!(error = %e, "cannot delete the credentials"),
            }
            h.reload.notify_one();
        }
    }
}

/// Waits for the change an action started and reports its end.
async fn follow(h: &Handler, req: &Request, change: &str) {
    let done = tokio::select! {
        // The ledger has the change to follow: the next start does.
        _ = h.shutdown.cancelled() => return,
        done = actions::completion(&h.ctx, req, change) => done,
    };
    h.ctx.hashes.mark_changed();
    tracing::info!(id = %req.id, %change, success = done.success, "change of a DMS action ready");
    let bytes = done.to_bytes();
    let (id, b) = (req.id.clone(), bytes.clone());
    if let Err(e) = blocking(&h.ledger, move |l| l.complete(&id, &b)).await {
        tracing::error!(id = %req.id, error = %e, "cannot store a completion report; sending it anyway");
    }
    h.outbox.send(&req.id, Kind::Completion, bytes).await;
}
