//! Export: store-and-forward telemetry that loses nothing and keeps order.
//!
//! Applications on the device publish on `{export.subject}.{stream}` on the
//! device-local NATS (or run `iot-agent export send`); [`intake`] commits
//! each message to the SQLite [`spool`] (fsync'd, group commit) before it
//! answers; [`forward`] sends the spool upstream ([`upstream`]: JetStream or
//! MQTT QoS 1) in order and deletes only what the upstream acknowledged;
//! [`status`] reports backlog, drops and rates. The README's "Export"
//! section is the user's view.

pub mod capacity;
pub mod forward;
pub mod intake;
pub mod spool;
pub mod status;
pub mod upstream;

use crate::bus::{topics, Nats};
use crate::config::Config;
use spool::{Durability, Limits, Spool};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The spool bounds of a configuration.
pub fn limits(config: &Config) -> Limits {
    Limits {
        max_bytes: config.export.spool.max.bytes,
        policy: config.export.spool.full,
    }
}

/// The export subsystem (`export.*`, started when `export.enabled`).
#[derive(Clone)]
pub struct Export {
    /// The agent's configuration (`export` and the directories).
    pub config: Arc<Config>,
    /// The device-local NATS, where the intake listens.
    pub bus: Nats,
}

impl crate::supervisor::Subsystem for Export {
    const NAME: &'static str = "export";
    const SECTION: &'static str = "export";

    async fn run(self, shutdown: crate::supervisor::Shutdown) -> anyhow::Result<()> {
        run(self.config, self.bus, shutdown.token().clone()).await
    }
}

/// Runs intake, forwarder and status until cancelled (it waits for all
/// three); an error (spool unusable, intake subscription lost) ends all
/// three and the supervisor restarts the subsystem.
pub async fn run(
    config: Arc<Config>,
    bus: Nats,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = config.export.clone();
    let intake_topic = topics::export_intake(&cfg.subject).map_err(|e| {
        anyhow::anyhow!(
            "export.subject {:?} is not a usable subject prefix: {e}",
            cfg.subject
        )
    })?;
    let path = cfg.spool.path.path().to_path_buf();
    let p = path.clone();
    let spool = tokio::task::spawn_blocking(move || Spool::open(&p, Durability::Full)).await??;
    // What the upstream said last time applies before it is reached again.
    let capacity = capacity::SharedCapacity::new(capacity::Capacity::new(
        &cfg.upstream,
        spool.learned_capacity()?.as_ref(),
    ));
    let committed = Arc::new(Notify::new());
    let (writer, writer_thread) = intake::Writer::spawn(
        spool,
        limits(&config),
        cfg.batch.intake as usize,
        committed.clone(),
    );
    let shared = Arc::new(forward::Shared::default());
    let stop = shutdown.child_token();
    tracing::info!(
        spool = %path.display(),
        subject = %intake_topic.nats(),
        upstream = %cfg.upstream.url.as_str(),
        full = cfg.spool.full.as_str(),
        "export running"
    );
    let mut intake = tokio::spawn(intake::serve(
        bus.clone(),
        intake_topic,
        writer,
        capacity.clone(),
        stop.clone(),
    ));
    let mut fwd = tokio::spawn(forward::run(
        cfg.clone(),
        path.clone(),
        committed,
        shared.clone(),
        capacity.clone(),
        stop.clone(),
    ));
    let mut status = tokio::spawn(status::run(cfg, path, bus, shared, capacity, stop.clone()));
    let flat = |r: Result<anyhow::Result<()>, tokio::task::JoinError>| match r {
        Ok(r) => r,
        Err(e) => Err(anyhow::anyhow!("export task failed: {e}")),
    };
    let result = tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = &mut intake => flat(r).and(Err(anyhow::anyhow!("export intake stopped"))),
        r = &mut fwd => flat(r).and(Err(anyhow::anyhow!("export forwarder stopped"))),
        r = &mut status => flat(r).and(Err(anyhow::anyhow!("export status stopped"))),
    };
    stop.cancel();
    for t in [intake, fwd, status] {
        if !t.is_finished() {
            let _ = t.await;
        }
    }
    // The intake dropped its writer handle: the thread commits what was
    // queued and ends.
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    result
}

/// The NATS subjects of export (with the default intake prefix), as the
/// AsyncAPI document names them.
pub fn documented_addresses() -> Vec<String> {
    let prefix = crate::config::ExportConfig::default().subject;
    vec![
        format!("{prefix}.{{stream}}"),
        crate::bus::Topic::fixed(crate::bus::topics::EXPORT_STATUS).nats(),
    ]
}
