//! The agents' port: each agent's one TLS connection (its device
//! certificate verified), its hello, its heartbeats, and the registry of
//! connected agents that pipes open streams through.

use super::accept::Pending;
use super::config::AgentsConfig;
use super::registry::Registry;
use super::status::{Board, ConnInfo, Counted, Counters, Mode};
use crate::subsystems::tunnel::mux::{self, Opener, Side};
use crate::subsystems::tunnel::protocol::refusal;
use crate::subsystems::tunnel::protocol::{Control, ControlStream, VERSION};
use crate::supervisor::Shutdown;
use anyhow::{anyhow, bail, Context};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound on an agent's TLS handshake, control stream and hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected agent, as pipes use it.
#[derive(Clone)]
pub struct Link {
    /// Opens a stream to the device.
    pub opener: Opener,
    /// Cancelled when this connection ends: its visitors are reset.
    pub ended: CancellationToken,
    session: u64,
}

/// The connected agents by device id. A device that connects again
/// replaces its previous connection (which may not have noticed it died).
pub struct Agents {
    links: Mutex<HashMap<String, Link>>,
    sessions: AtomicU64,
    /// The accept filter (and the relay-dials registrations).
    pub registry: Arc<Registry>,
    /// Devices the filter refused.
    pub pending: Pending,
    /// Records and status events.
    pub board: Arc<Board>,
}

/// How a connection came about, for the checks and the records.
pub struct Conn {
    /// Who dialed whom.
    pub mode: Mode,
    /// The other end's address.
    pub peer: std::net::SocketAddr,
    /// TLS (the device certificate names the device), or plain TCP (only
    /// for a relay-dials registration that says so).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The device this connection must be (relay-dials: the registration's).
    pub expect: Option<String>,
    /// Cancelled to close this connection (a registration removed);
    /// `None`: only the relay's shutdown closes it.
    pub parent: Option<CancellationToken>,
}

/// Anything a connection may run over: TLS or, where allowed, plain TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Agents {
    /// No agent connected yet.
    pub fn new(registry: Arc<Registry>, board: Arc<Board>) -> Agents {
        Agents {
            links: Mutex::default(),
            sessions: AtomicU64::new(0),
            registry,
            pending: Pending::default(),
            board,
        }
    }

    /// The device's live connection, if any.
    pub fn get(&self, device: &str) -> Option<Link> {
        let links = self.links.lock().expect("agents lock");
        links
            .get(device)
            .filter(|l| !l.ended.is_cancelled())
            .cloned()
    }

    /// Whether `device` is connected now.
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
            let conn = Conn {
                mode: Mode::DeviceDials,
                peer,
                tls: Some(tls),
                expect: None,
                parent: None,
            };
            if let Err(e) = session(tcp, conn, &agents, &config, &sd).await {
                tracing::info!(%peer, reason = %format!("{e:#}"), "agent refused");
            }
        });
    }
}

/// One agent connection: handshake, hello, then heartbeats until it ends.
/// An error is a refusal before the agent was taken; `Ok` once it was.
pub async fn session(
    tcp: TcpStream,
    conn: Conn,
    agents: &Agents,
    config: &AgentsConfig,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let (io, cn, expires): (Box<dyn Io>, Option<String>, Option<i64>) = match &conn.tls {
        Some(acceptor) => {
            let tls = timeout(HELLO_TIMEOUT, acceptor.accept(tcp))
                .await
                .map_err(|_| anyhow!("no TLS handshake within {HELLO_TIMEOUT:?}"))?
                .context("TLS")?;
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let cn = leaf
                .and_then(crate::tls::common_name)
                .ok_or_else(|| anyhow!("the device certificate has no subject CN"))?;
            let expires = leaf.and_then(crate::tls::not_after);
            (Box::new(tls), Some(cn), expires)
        }
        None => (Box::new(tcp), None, None),
    };
    let info = ConnInfo {
        mode: conn.mode,
        address: conn.peer.to_string(),
        tls: conn.tls.is_some(),
    };
    let counters = Arc::new(Counters::default());
    let io = Counted::new(io, counters.clone());
    let (opener, mut inbound, driver) = mux::start(io, Side::Relay);
    let ended = match &conn.parent {
        Some(p) => p.child_token(),
        None => shutdown.token().child_token(),
    };
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
    let (version, device) = match hello {
        Ok(Some(Control::Hello { version, device })) => (version, device),
        Ok(other) => bail!("expected a hello, got {other:?}"),
        Err(e) => bail!("hello: {e}"),
    };
    // Who it is: the certificate's CN, or for plain TCP the registration's
    // device (the hello alone proves nothing).
    let known = cn.clone().or_else(|| conn.expect.clone());
    let refusal = if version != VERSION {
        Some((
            refusal::VERSION,
            format!("protocol version {version} (device {device}); this relay speaks {VERSION}"),
        ))
    } else if cn.as_ref().is_some_and(|cn| *cn != device) {
        Some((
            refusal::DEVICE_MISMATCH,
            format!("hello names device {device:?} but its certificate is {cn:?}"),
        ))
    } else if conn.expect.as_ref().is_some_and(|e| *e != device) {
        Some((
            refusal::DEVICE_MISMATCH,
            format!(
                "this relay dialed {} for device {:?}, not {device:?}",
                conn.peer,
                conn.expect.as_deref().unwrap_or_default()
            ),
        ))
    } else if conn.mode == Mode::DeviceDials && !agents.registry.allows(&device) {
        agents.pending.record(&device, &info.address);
        Some((
            refusal::NOT_ACCEPTED,
            format!(
                "device {device} is not in this relay's accept filter; it is in the pending \
                 list until an operator allows it"
            ),
        ))
    } else {
        None
    };
    if let Some((code, reason)) = refusal {
        if let Some(device) = &known {
            agents.board.refused(device, &info, &reason);
        }
        ctrl.send_last(
            &Control::Refused {
                reason: reason.clone(),
                code: Some(code.into()),
            },
            HELLO_TIMEOUT,
        )
        .await;
        bail!(reason);
    }
    let cn = device;
    ctrl.send(&Control::Welcome { version: VERSION }).await?;
    let session = agents.insert(&cn, opener, ended.clone());
    agents.pending.forget(&cn);
    agents.board.connected(&cn, session, &info, counters);
    tracing::info!(device = %cn, mode = ?conn.mode, tls = info.tls, "agent connected");

    // The handshake checked the certificate's dates once; a connection must
    // not outlive them. It is ended when the certificate expires, and the
    // agent dials again with the one it renewed meanwhile (provisioning
    // renews well before the end), which the handshake checks afresh.
    let expired = Arc::new(AtomicBool::new(false));
    if let Some(at) = expires {
        let (stop, flag) = (ended.clone(), expired.clone());
        let left = Duration::from_secs((at - crate::clock::now_s()).max(0) as u64);
        shutdown.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(left) => {
                    flag.store(true, Ordering::SeqCst);
                    stop.cancel();
                }
                _ = stop.cancelled() => {}
            }
        });
    }

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
    // The relay's own reasons first: ending the connection also makes the
    // heartbeat loop see it closed, whichever it noticed first.
    let reason = match outcome {
        _ if shutdown.is_cancelled() => "the relay is stopping".to_string(),
        _ if expired.load(Ordering::SeqCst) => "the device certificate expired".to_string(),
        _ if conn.parent.as_ref().is_some_and(|p| p.is_cancelled()) => {
            "the registration was removed".to_string()
        }
        Ok(()) if driver.is_finished() => driver.await.unwrap_or_default(),
        Ok(()) => "replaced by a newer connection".to_string(),
        Err(e) => e.to_string(),
    };
    agents.board.disconnected(&cn, session, &reason);
    tracing::info!(device = %cn, %reason, "agent disconnected");
    Ok(())
}
