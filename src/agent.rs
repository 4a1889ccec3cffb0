//! `iot-agent run`: wires configuration, snapd, the bus and the subsystems
//! together under the supervisor. SIGTERM or SIGINT stops it; SIGHUP makes
//! it reload its enrollment (after `iot-agent unregister` or `enroll`).

use crate::bus::Nats;
use crate::config::Config;
use crate::identity::{CredentialsRx, Enroller, IdentityService, Store};
use crate::services::dms::{self, Dms};
use crate::services::per_serial::{self, PerSerial};
use crate::services::snapd_health::SnapdHealth;
use crate::subsystems::changes;
use crate::subsystems::export::Export;
use crate::supervisor::{Policy, Supervisor};
use crate::{control, services, snapd};
use std::sync::Arc;
use tokio::sync::{watch, Notify};
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
    let _pid_lock = match control::write_pid(config.data_dir()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "cannot write the pid file; `iot-agent unregister` will not find this agent");
            None
        }
    };

    let snapd = snapd::Client::from_config(&config);
    let identity = IdentityService::new(&config)?;
    let bus = Nats::connect(&config.nats, CLIENT_NAME).await?;
    tracing::info!(url = %config.nats.url.as_str(), user = %config.nats.snapd.user, "NATS connection started");

    let reload = Arc::new(Notify::new());
    let store = Store::from_config(&config);
    let (creds_tx, creds_rx): (_, CredentialsRx) = watch::channel(None);
    let enroller = Enroller {
        snapd: snapd.clone(),
        service: identity,
        store: store.clone(),
        identity_url: config.url.as_str().to_string(),
        retry_cap: config.identity.retry.max.get(),
        credentials: creds_tx,
        reload: reload.clone(),
    };

    // The one reader of snapd's changes, shared by the change subsystems,
    // the DMS (which rebuilds its heartbeat hashes when snaps change), and
    // everything that follows the changes it starts (DMS actions, the
    // per-serial required-install, the mirror's change events).
    let poller = Arc::new(changes::Poller::new(
        snapd.clone(),
        config.snaplogger.duration.between.checks.get(),
    ));
    // The DMS session owns the sender; the mirror reports what it says.
    let (mqtt_status_tx, mqtt_status) = crate::bus::status::mqtt_status_channel();
    let mirror = services::mirror::Mirror::new(
        bus.clone(),
        services::mirror::snapd_client(&config),
        poller.clone(),
        services::mirror::Settings::from_config(&config),
        mqtt_status,
    );

    let required = config
        .required
        .enabled
        .then(|| required_queue(&config, &snapd, &poller));

    // Every subsystem in one shape (crate::supervisor::Subsystem): built
    // from its configuration section here, started and stopped by the
    // supervisor. A new subsystem is one more `sup.add` line.
    let mut sup = Supervisor::new(Policy::default());
    // The remote terminal and browser: off unless enabled; served on NATS
    // here and on the DMS session's per-device topics.
    let remote = remote_services(&config);
    if let Some(terminals) = &remote.terminal {
        terminals.reap_leftovers().await;
    }
    if let Some(terminals) = &remote.terminal {
        sup.add(services::terminal::NatsTerminal {
            terminals: terminals.clone(),
            bus: bus.clone(),
        });
    }
    if let Some(browser) = &remote.browser {
        sup.add(services::browser::NatsBrowser {
            browser: browser.clone(),
            bus: bus.clone(),
        });
    }
    if let Some(required) = &required {
        sup.add(required.clone());
        sup.add(per_serial::NatsSide {
            required: required.clone(),
            bus: bus.clone(),
            snapd: snapd.clone(),
        });
    }
    if config.dms.enabled {
        sup.add(Dms {
            snapd: snapd.clone(),
            changes: poller.clone(),
            required,
            credentials: creds_rx,
            status: mqtt_status_tx,
            store,
            reload: reload.clone(),
            settings: dms::Settings::from_config(&config),
            remote,
        });
    }
    sup.add(Arc::new(changes::History::from_config(
        &config,
        poller.subscribe(),
    )));
    if config.watchdog.enabled {
        sup.add(Arc::new(
            changes::Watchdog::from_config(&config, snapd.clone(), poller.subscribe())
                .with_events(bus.clone()),
        ));
    } else {
        tracing::info!("snap change watchdog off (watchdog.enabled=false)");
    }
    sup.add(poller);
    sup.add(mirror);
    sup.add(SnapdHealth {
        client: snapd.clone(),
    });
    sup.add(enroller);
    if config.export.enabled {
        sup.add(Export {
            config: config.clone(),
            bus: bus.clone(),
        });
    }
    if crate::subsystems::provisioning::enabled(&config) {
        sup.add(crate::subsystems::provisioning::Provisioning::from_config(
            &config,
        ));
    }
    if config.tunnel.enabled {
        sup.add(crate::subsystems::tunnel::Tunnel::from_config(&config));
    }

    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(handle_signals(shutdown.clone(), reload));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "iot-agent running");
    sup.run(shutdown).await;
    signals.abort();
    if bus.is_connected() {
        // Deliver what is buffered, within the remaining shutdown budget.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bus.flush()).await;
    }
    control::remove_pid(config.data_dir());
    tracing::info!("iot-agent stopped");
    Ok(())
}

/// The per-serial action tree's queue (`required.*`): its worker is a
/// subsystem, and the NATS side and the DMS session serve the tree with it.
fn required_queue(
    config: &Config,
    snapd: &snapd::Client,
    poller: &Arc<changes::Poller>,
) -> Arc<PerSerial> {
    PerSerial::new(
        snapd.clone(),
        poller.clone(),
        config.required.database.location.path(),
        per_serial::Settings {
            switch_channel: config.required.switch,
            attempts: config.required.attempts.max(1),
            retry_max: config.required.retry.max.get(),
            change_timeout: config.dms.change.timeout.get(),
            signing: Arc::new(crate::signing::Policy::from_config(&config.dms.signing)),
        },
    )
}

/// The remote terminal and browser as configured (`terminal.enabled`,
/// `browser.enabled`).
fn remote_services(config: &Config) -> services::outlet::Remote {
    let mut remote = services::outlet::Remote::default();
    if config.terminal.enabled {
        remote.terminal = Some(services::terminal::Terminals::new(
            services::terminal::Settings::from_config(config),
        ));
    } else {
        tracing::info!("remote terminal off (terminal.enabled=false)");
    }
    if config.browser.enabled {
        match services::browser::Browser::new(services::browser::Settings::from_config(config)) {
            Ok(b) => remote.browser = Some(b),
            Err(e) => tracing::error!(error = %e, "remote browser not started"),
        }
    } else {
        tracing::info!("remote browser off (browser.enabled=false)");
    }
    remote
}

/// Creates the data and common directories, 0700 even when they existed
/// (data holds credentials, common the spools). A failure is logged, not
/// fatal: each user of a directory reports its own error with the path.
fn prepare_dirs(config: &Config) {
    for dir in [config.data_dir(), config.common_dir()] {
        if let Err(e) = crate::fsutil::make_private_dir(dir) {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot create directory (0700); set dirs.data / dirs.common to a writable place"
            );
        }
    }
}

async fn handle_signals(shutdown: CancellationToken, reload: Arc<Notify>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return;
    };
    loop {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                tracing::info!(signal = "SIGHUP", "reloading the enrollment");
                reload.notify_one();
                continue;
            }
        };
        tracing::info!(signal = which, "stopping");
        shutdown.cancel();
        return;
    }
}
