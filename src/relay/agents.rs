//! The agents' port: each agent's one TLS connection (its device
//! certificate verified), its hello, its heartbeats, and the registry of
//! connected agents that pipes open streams through.

use super::config::AgentsConfig;
use crate::subsystems::tunnel::mux::{self, Opener, Side};
use crate::subsystems::tunnel::protocol::{Control, ControlStream, VERSION};
use crate::supervisor::Shutdown;
use anyhow::{anyhow, bail, Context};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound on an agent's TLS handshake, control stream and hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected agent, as pipes use it.
#[derive(Clone)]
pub struct Link {
    pub opener: Opener,
    /// Cancelled when this connection ends: its visitors are reset.
    pub ended: CancellationToken,
    session: u64,
}

/// The connected agents by device id. A device that connects again
/// replaces its previous connection (which may not have noticed it died).
#[derive(Default)]
pub struct Agents {
    links: Mutex<HashMap<String, Link>>,
    sessions: AtomicU64,
}

impl Agents {
    /// The device's live connection, if any.
    pub fn get(&self, device: &str) -> Option<Link> {
        let links = self.links.lock().expect("agents lock");
        links
            .get(device)
            .filter(|l| !l.ended.is_cancelled())
            .cloned()
    }

    pub fn is_connected(&self, device: &str) -> bool {
        self.get(device).is_some()
    }

    fn insert(&self, device: &str, opener: Opener, ended: CancellationToken) -> u64 {
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let link = Link {
            opener,
            ended,
            session,
        };
        if let Some(old) = self
            .links
            .lock()
            .expect("agents lock")
            .insert(device.into(), link)
        {
            old.ended.cancel();
        }
        session
    }

    fn remove(&self, device: &str, session: u64) {
        let mut links = self.links.lock().expect("agents lock");
        if links.get(device).is_some_and(|l| l.session == session) {
            links.remove(device);
        }
    }
}

/// Accepts agents until shutdown.
pub async fn serve(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    agents: Arc<Agents>,
    config: AgentsConfig,
    shutdown: Shutdown,
) {
    let config = Arc::new(config);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an agent connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (tls, agents, config, sd) = (
            tls.clone(),
            agents.clone(),
            config.clone(),
            shutdown.clone(),
        );
        shutdown.spawn(async move {
            if let Err(e) = session(tcp, tls, &agents, &config, &sd).await {
                tracing::info!(%peer, reason = %format!("{e:#}"), "agent refused");
            }
        });
    }
}

/// One agent connection: handshake, hello, then heartbeats until it ends.
/// An error is a refusal before the agent was taken.
async fn session(
    tcp: TcpStream,
    tls: tokio_rustls::TlsAcceptor,
    agents: &Agents,
    config: &AgentsConfig,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let tls = timeout(HELLO_TIMEOUT, tls.accept(tcp))
        .await
        .map_err(|_| anyhow!("no TLS handshake within {HELLO_TIMEOUT:?}"))?
        .context("TLS")?;
    let cn = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::tls::common_name)
        .ok_or_else(|| anyhow!("the device certificate has no subject CN"))?;
    let (opener, mut inbound, driver) = mux::start(tls, Side::Relay);
    let ended = shutdown.token().child_token();
    let stop = ended.clone();
    let driver = shutdown.spawn(async move {
        let why = tokio::select! {
            r = driver => match r {
                Ok(()) => "the connection was closed".to_string(),
                Err(e) => format!("the connection failed: {e}"),
            },
            _ = stop.cancelled() => String::new(),
        };
        stop.cancel();
        why
    });
    let _guard = ended.clone().drop_guard();

    let control = timeout(HELLO_TIMEOUT, inbound.recv())
        .await
        .map_err(|_| anyhow!("no control stream within {HELLO_TIMEOUT:?}"))?
        .ok_or_else(|| anyhow!("closed before the hello"))?;
    let mut ctrl = ControlStream::new(control);
    let hello = timeout(HELLO_TIMEOUT, ctrl.recv())
        .await
        .map_err(|_| anyhow!("no hello within {HELLO_TIMEOUT:?}"))?;
    let refusal = match hello {
        Ok(Some(Control::Hello { version, device })) if version != VERSION => Some(format!(
            "protocol version {version} (device {device}); this relay speaks {VERSION}"
        )),
        Ok(Some(Control::Hello { device, .. })) if device != cn => Some(format!(
            "hello names device {device:?} but its certificate is {cn:?}"
        )),
        Ok(Some(Control::Hello { .. })) => None,
        Ok(other) => bail!("expected a hello, got {other:?}"),
        Err(e) => bail!("hello: {e}"),
    };
    if let Some(reason) = refusal {
        let _ = ctrl
            .send(&Control::Refused {
                reason: reason.clone(),
            })
            .await;
        bail!(reason);
    }
    ctrl.send(&Control::Welcome { version: VERSION }).await?;
    let session = agents.insert(&cn, opener, ended.clone());
    tracing::info!(device = %cn, "agent connected");

    // Agents open no streams but the control stream: others are reset.
    let stop = ended.clone();
    shutdown.spawn(async move {
        loop {
            tokio::select! {
                s = inbound.recv() => if s.is_none() { break },
                _ = stop.cancelled() => break,
            }
        }
    });
    let outcome = ctrl
        .keep_alive(
            config.heartbeat.get(),
            config.threshold.get(),
            ended.clone().cancelled_owned(),
        )
        .await;
    agents.remove(&cn, session);
    ended.cancel();
    let reason = match outcome {
        Ok(()) if shutdown.is_cancelled() => "the relay is stopping".to_string(),
        Ok(()) if driver.is_finished() => driver.await.unwrap_or_default(),
        Ok(()) => "replaced by a newer connection".to_string(),
        Err(e) => e.to_string(),
    };
    tracing::info!(device = %cn, %reason, "agent disconnected");
    Ok(())
}
