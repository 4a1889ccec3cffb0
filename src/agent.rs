//! `iot-agent run`: wires configuration, snapd, the bus and the subsystems
//! together under the supervisor, and stops on SIGTERM or SIGINT.

use crate::bus::Bus;
use crate::config::Config;
use crate::services;
use crate::snapd;
use crate::supervisor::{Policy, Subsystem, Supervisor};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The name the agent gives itself on brokers.
pub const CLIENT_NAME: &str = "iot-agent";

/// Runs the daemon until a termination signal arrives.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    if config.uses_default_nats_password() {
        tracing::warn!(
            "nats.snapd.password is the well-known default of the reference agent: anyone who \
             can reach the NATS server can manage snaps; set a password of your own \
             (snap set iot-agent nats.snapd.password=...) and the same in nats-server's config"
        );
    }
    prepare_dirs(&config);

    let snapd = snapd::Client::from_config(&config);
    let bus = Bus::connect_nats(&config.nats, CLIENT_NAME).await?;
    tracing::info!(url = %config.nats.url.as_str(), user = %config.nats.snapd.user, "NATS connection started");

    let mut sup = Supervisor::new(Policy::default());
    sup.add(Subsystem::new("snapd-health", move |t| {
        services::snapd_health::run(snapd.clone(), t)
    }));

    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "iot-agent running");
    sup.run(shutdown).await;
    signals.abort();
    // Deliver what is buffered, within the remaining shutdown budget.
    if bus.is_connected() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bus.flush()).await;
    }
    tracing::info!("iot-agent stopped");
    Ok(())
}

/// Creates the data and common directories (0700 for data: it will hold
/// credentials). A failure is logged, not fatal: nothing may need them yet.
fn prepare_dirs(config: &Config) {
    for (dir, mode) in [(config.data_dir(), 0o700), (config.common_dir(), 0o755)] {
        if dir.is_dir() {
            continue;
        }
        let made = std::fs::create_dir_all(dir).and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        });
        if let Err(e) = made {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot create directory; set dirs.data / dirs.common to a writable place"
            );
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
            return;
        }
    };
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = which, "stopping");
    shutdown.cancel();
}
