//! The relay (`iot-relay`): the cloud half of the tunnel. Agents dial its
//! agents' port ([`agents`]); pipes ([`pipes`]) open relay ports to
//! visitors and carry each one as a stream to its device; the mapping API
//! ([`mapping_api`]) adds and removes pipes. The wire protocol is the
//! agent's (`crate::subsystems::tunnel::protocol`).

pub mod accept;
pub mod admin;
pub mod agents;
pub mod ca;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dialer;
pub mod discover;
pub mod est;
pub mod mapping_api;
pub mod otp;
pub mod pipes;
pub mod private;
pub mod registry;
pub mod status;
pub mod status_nats;
pub mod store;

use crate::supervisor::Shutdown;
use anyhow::{anyhow, bail, Context};
use config::RelayConfig;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Runs the relay until `shutdown` is cancelled.
pub async fn run(config: RelayConfig, shutdown: Shutdown) -> anyhow::Result<()> {
    if config.api.token.is_empty() {
        bail!("api.token is not set: the mapping API needs a bearer token (IOT_RELAY_API__TOKEN)");
    }
    let (Some(cert), Some(key)) = (config.agents.cert.path(), config.agents.key.path()) else {
        bail!("agents.cert and agents.key must name the relay's certificate and key files");
    };
    let cert_pem = crate::tls::read_pem(cert, "agents.cert")?;
    let key_pem = crate::tls::read_pem(key, "agents.key")?;
    // The relay's own device CA (created on first start) signs what EST
    // issues; the agents' port trusts it and `agents.ca` besides.
    let ca = Arc::new(ca::Ca::load_or_create(
        config.ca.cert.path(),
        config.ca.key.path(),
    )?);
    let roots = crate::tls::Roots::new()
        .source(&config.agents.ca, "agents.ca")?
        .pem(&ca.cert_pem, "ca.cert")?;
    let agents_tls = crate::tls::server_config(&cert_pem, &key_pem, Some(roots))?;
    // Before any port opens: a database that cannot be opened (or an
    // earlier relay's file that cannot be imported) stops the start.
    let store = Arc::new(store::Store::open(
        config.db.path(),
        &store::Legacy {
            state: Some(config.state.path().to_path_buf()),
            registry: Some(config.registry.path().to_path_buf()),
            otp: Some(config.otp.state.path().to_path_buf()),
        },
    )?);
    let otps = Arc::new(otp::Otps::open(store.clone())?);
    let api_tls = if config.dev {
        None
    } else {
        let (cert_pem, key_pem) = match (config.api.cert.path(), config.api.key.path()) {
            (Some(c), Some(k)) => (
                crate::tls::read_pem(c, "api.cert")?,
                crate::tls::read_pem(k, "api.key")?,
            ),
            _ => (cert_pem.clone(), key_pem.clone()),
        };
        Some(tokio_rustls::TlsAcceptor::from(crate::tls::server_config(
            &cert_pem, &key_pem, None,
        )?))
    };
    let pool = config::port_pool(&config.pipes).map_err(|e| anyhow!(e))?;

    let agents_listener = TcpListener::bind(&config.agents.listen)
        .await
        .with_context(|| format!("agents.listen {}", config.agents.listen))?;
    let api_listener = TcpListener::bind(&config.api.listen)
        .await
        .with_context(|| format!("api.listen {}", config.api.listen))?;
    let agents_addr = agents_listener.local_addr()?;
    let api_addr = api_listener.local_addr()?;
    let est_addr = if config.est.enabled {
        let (cert_pem, key_pem) = match (config.est.cert.path(), config.est.key.path()) {
            (Some(c), Some(k)) => (
                crate::tls::read_pem(c, "est.cert")?,
                crate::tls::read_pem(k, "est.key")?,
            ),
            _ => (cert_pem.clone(), key_pem.clone()),
        };
        let tls = crate::tls::server_config_with(
            &cert_pem,
            &key_pem,
            crate::tls::ClientAuth::Optional(
                crate::tls::Roots::new().pem(&ca.cert_pem, "ca.cert")?,
            ),
        )?;
        let listener = TcpListener::bind(&config.est.listen)
            .await
            .with_context(|| format!("est.listen {}", config.est.listen))?;
        let addr = listener.local_addr()?;
        shutdown.spawn(est::serve(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            Arc::new(est::Est::new(
                ca.clone(),
                otps.clone(),
                config.est.lifetime.get(),
                config.est.defer.get(),
                config.est.require_binding,
            )),
            shutdown.clone(),
        ));
        addr.to_string()
    } else {
        "off".to_string()
    };

    let relay_id = match config.id.as_str() {
        "" => host_label(),
        id => id.to_string(),
    };
    crate::bus::topics::segment(&relay_id)
        .map_err(|e| anyhow!("id (the relay's name among relays): {e}"))?;
    let registry = Arc::new(registry::Registry::load(store.clone())?);
    let board = Arc::new(status::Board::default());
    if !config.nats.url.is_empty() {
        status_nats::start(&config.nats, &board, &shutdown);
    }
    let agents = Arc::new(agents::Agents::new(registry, board));
    let pipes = Arc::new(pipes::Pipes::new(
        pool,
        config.pipes.bind.clone(),
        store,
        agents_addr.port(),
        agents.clone(),
        shutdown.clone(),
    ));
    pipes.restore()?;
    let agents_tls = tokio_rustls::TlsAcceptor::from(agents_tls);
    let dialer = Arc::new(dialer::Dialer::new(
        agents.clone(),
        config.agents.clone(),
        agents_tls.clone(),
        shutdown.clone(),
    ));
    dialer.start_registered();
    let cluster = (!config.nats.url.is_empty()).then(|| {
        cluster::Cluster::start(
            relay_id.clone(),
            &config.nats,
            agents.board.clone(),
            pipes.clone(),
            &shutdown,
        )
    });
    let admin = Arc::new(admin::Admin {
        agents: agents.clone(),
        pipes: pipes.clone(),
        dialer,
        cluster,
    });
    shutdown.spawn(agents::serve(
        agents_listener,
        agents_tls,
        agents,
        config.agents.clone(),
        shutdown.clone(),
    ));
    shutdown.spawn(mapping_api::serve(
        api_listener,
        api_tls,
        pipes,
        config.api.token.clone(),
        Arc::new(otp::OtpApi {
            otps,
            expiry: config.otp.expiry.get(),
            max: config.otp.max.get(),
        }),
        admin,
        shutdown.clone(),
    ));
    tracing::info!(
        id = %relay_id,
        version = env!("CARGO_PKG_VERSION"),
        agents = %agents_addr,
        api = %api_addr,
        est = %est_addr,
        api_scheme = if config.dev { "http" } else { "https" },
        "iot-relay running"
    );
    shutdown.cancelled().await;
    tracing::info!("iot-relay stopped");
    Ok(())
}

/// The host name's first label, made a subject token (the default `id`).
fn host_label() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label = crate::bus::topics::sanitize_serial(name.trim().split('.').next().unwrap_or(""));
    if label.is_empty() {
        "relay".into()
    } else {
        label
    }
}
