//! The agent's half of the tunnel: dial the relay, keep the one connection
//! alive, and connect the streams the relay opens to allowed local targets.

use super::mux::{self, Side, Stream};
use super::protocol::{self, Control, ControlStream, Open, Opened, VERSION};
use crate::backoff::Backoff;
use crate::config::TunnelConfig;
use crate::supervisor::Shutdown;
use anyhow::{anyhow, bail, Context};
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Bound on dialing the relay (TCP and TLS) and on its welcome.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a data stream's open frame and on connecting the local target.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect back-off: first delay and cap.
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// What the client needs, read once from `tunnel.*`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `tunnel.*`.
    pub config: TunnelConfig,
    /// The provisioned `device.pem` (certificate and key) used when
    /// `tunnel.cert` is not set, if provisioning is on.
    pub provisioned: Option<std::path::PathBuf>,
}

/// How the agent speaks to the relay over a TCP connection (dialed or,
/// with `tunnel.listen`, accepted): TLS with the device certificate, or
/// plain TCP where explicitly set. Built from the files at each run, so a
/// certificate replaced on disk is picked up by the next restart.
pub(super) struct Dialer {
    wire: Wire,
    pub(super) device: String,
}

enum Wire {
    Tls {
        connector: tokio_rustls::TlsConnector,
        name: ServerName<'static>,
    },
    Plain,
}

/// What the multiplexer runs over.
pub(super) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

impl Dialer {
    pub(super) fn new(
        c: &TunnelConfig,
        provisioned: Option<&std::path::Path>,
    ) -> anyhow::Result<Dialer> {
        if !c.tls {
            if c.listen.is_empty() {
                bail!("tunnel.tls=false is only for tunnel.listen (a relay that dials the agent)");
            }
            let device = if !c.device.is_empty() {
                c.device.clone()
            } else if let Some(cert) = c.cert.path() {
                let pem = crate::tls::read_pem(cert, "tunnel.cert")?;
                let chain = crate::tls::certs_from_pem(&pem, "tunnel.cert")?;
                crate::tls::common_name(&chain[0])
                    .ok_or_else(|| anyhow!("tunnel.cert has no subject CN (the device id)"))?
            } else {
                bail!("tunnel.tls=false needs tunnel.device (or tunnel.cert) to name the device");
            };
            return Ok(Dialer {
                wire: Wire::Plain,
                device,
            });
        }
        let (host, _) = c
            .relay
            .rsplit_once(':')
            .ok_or_else(|| anyhow!("tunnel.relay {:?} is not host:port", c.relay))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| anyhow!("tunnel.relay host {host:?}: {e}"))?;
        let (cert_pem, key_pem) = match (c.cert.path(), c.key.path(), provisioned) {
            (Some(cert), Some(key), _) => (
                crate::tls::read_pem(cert, "tunnel.cert")?,
                crate::tls::read_pem(key, "tunnel.key")?,
            ),
            (None, None, Some(device)) if !device.exists() => bail!(
                "no device certificate yet: provisioning has not enrolled \
                 (iot-agent provisioning status)"
            ),
            (None, None, Some(device)) => {
                // One file holds both, replaced atomically on renewal.
                let pem = crate::tls::read_pem(device, "the provisioned certificate")?;
                (pem.clone(), pem)
            }
            _ => bail!(
                "tunnel.cert and tunnel.key must name the device certificate and key files \
                 (or leave both empty and set provisioning.url)"
            ),
        };
        let chain = crate::tls::certs_from_pem(&cert_pem, "tunnel.cert")?;
        let device = crate::tls::common_name(&chain[0])
            .ok_or_else(|| anyhow!("tunnel.cert has no subject CN (the device id)"))?;
        let roots = crate::tls::Roots::new().source(&c.ca, "tunnel.ca")?;
        let config = crate::tls::client_config(
            roots,
            Some(crate::tls::ClientCert {
                cert_pem: &cert_pem,
                key_pem: &key_pem,
            }),
            crate::tls::Verify::Full,
            crate::tls::Advice {
                peer: "the relay",
                ca_key: "tunnel.ca",
                verify_key: None,
            },
        )?;
        Ok(Dialer {
            wire: Wire::Tls {
                connector: tokio_rustls::TlsConnector::from(config),
                name,
            },
            device,
        })
    }

    /// TLS as the client over `tcp` (whoever dialed), or `tcp` itself.
    async fn wrap(&self, tcp: TcpStream) -> anyhow::Result<Box<dyn Io>> {
        match &self.wire {
            Wire::Plain => Ok(Box::new(tcp)),
            Wire::Tls { connector, name } => {
                let tls = timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| anyhow!("no TLS handshake within {CONNECT_TIMEOUT:?}"))?
                    .context("TLS")?;
                Ok(Box::new(tls))
            }
        }
    }
}

/// Runs the client until shutdown: connect, serve, and after a loss wait
/// (jittered back-off) and connect again. One log line per state change:
/// connected, lost, and each new reason a connection attempt fails for.
pub async fn run(settings: &Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    let c = &settings.config;
    let provisioned = settings.provisioned.as_deref();
    // Without provisioning a bad file is a configuration error; with it the
    // certificate may not be there yet, and is read again at each attempt
    // (a renewed one is picked up at the next connection).
    let mut first = match Dialer::new(c, provisioned) {
        Ok(d) => Some(d),
        Err(e) if provisioned.is_none() => return Err(e),
        Err(_) => None,
    };
    let allow: Arc<[String]> = c.allow.items().into();
    // Announcing and being dialed need the identity at once: until
    // provisioning has one, this fails and the supervisor retries.
    if (c.announce || !c.listen.is_empty()) && first.is_none() {
        first = Some(Dialer::new(c, provisioned)?);
    }
    // Not being found is no reason not to connect: a failure is logged.
    let _announcer = match (&first, c.announce) {
        (Some(d), true) => super::announce::Announcer::start(c, &d.device)
            .inspect_err(|e| tracing::error!(error = %format!("{e:#}"), "tunnel.announce: cannot announce on the local network"))
            .ok(),
        _ => None,
    };
    if let (false, Some(dialer)) = (c.listen.is_empty(), first.take()) {
        return super::listen::run(c, Arc::new(dialer), allow, shutdown).await;
    }
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    let mut last_failure = String::new();
    while !shutdown.is_cancelled() {
        let mut connected = false;
        let outcome = match first.take().map_or_else(|| Dialer::new(c, provisioned), Ok) {
            Ok(dialer) => session(c, &dialer, &allow, &shutdown, &mut connected).await,
            Err(e) => Err(e),
        };
        if shutdown.is_cancelled() {
            break;
        }
        if connected {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let why = match outcome {
            Ok(()) => "the relay closed the connection".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let retry_in = humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
        if connected {
            tracing::warn!(relay = %c.relay, reason = %why, %retry_in, "tunnel lost; reconnecting");
        } else if why != last_failure {
            tracing::warn!(relay = %c.relay, reason = %why, %retry_in, "tunnel cannot connect; retrying");
        }
        last_failure = if connected { String::new() } else { why };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    Ok(())
}

/// One connection to the relay, until it ends.
async fn session(
    c: &TunnelConfig,
    dialer: &Dialer,
    allow: &Arc<[String]>,
    shutdown: &Shutdown,
    connected: &mut bool,
) -> anyhow::Result<()> {
    let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect(&c.relay))
        .await
        .map_err(|_| anyhow!("no TCP connection within {CONNECT_TIMEOUT:?}"))??;
    let on_welcome =
        || tracing::info!(relay = %c.relay, device = %dialer.device, "tunnel connected");
    session_over(
        tcp,
        c,
        dialer,
        allow,
        shutdown,
        shutdown.token().clone(),
        connected,
        on_welcome,
    )
    .await
}

/// The protocol over a TCP connection to the relay, however it came
/// about: hello, welcome (then `on_welcome`), heartbeats and the relay's
/// streams until it ends or `parent` is cancelled.
#[allow(clippy::too_many_arguments)]
pub(super) async fn session_over(
    tcp: TcpStream,
    c: &TunnelConfig,
    dialer: &Dialer,
    allow: &Arc<[String]>,
    shutdown: &Shutdown,
    parent: CancellationToken,
    connected: &mut bool,
    on_welcome: impl FnOnce(),
) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let io = dialer.wrap(tcp).await?;
    let (opener, mut inbound, driver) = mux::start(io, Side::Agent);
    // Everything of this connection stops with it: the driver, the
    // acceptor, every local connection (reset).
    let ended = parent.child_token();
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

    let mut ctrl = ControlStream::new(opener.open().await?);
    ctrl.send(&Control::Hello {
        version: VERSION,
        device: dialer.device.clone(),
    })
    .await?;
    match timeout(CONNECT_TIMEOUT, ctrl.recv()).await {
        Err(_) => bail!("no welcome from the relay within {CONNECT_TIMEOUT:?}"),
        Ok(Ok(Some(Control::Welcome { .. }))) => {}
        Ok(Ok(Some(Control::Refused { reason, code }))) => match code {
            Some(code) => bail!("the relay refused ({code}): {reason}"),
            None => bail!("the relay refused: {reason}"),
        },
        Ok(Ok(other)) => bail!("unexpected answer to hello: {other:?}"),
        Ok(Err(e)) => bail!("answer to hello: {e}"),
    }
    *connected = true;
    on_welcome();

    let (allow, tasks, stop) = (allow.clone(), shutdown.clone(), ended.clone());
    shutdown.spawn(async move {
        loop {
            tokio::select! {
                s = inbound.recv() => match s {
                    Some(s) => { tasks.spawn(serve(s, allow.clone(), stop.clone())); }
                    None => break,
                },
                _ = stop.cancelled() => break,
            }
        }
    });
    ctrl.keep_alive(
        c.heartbeat.get(),
        c.threshold.get(),
        ended.clone().cancelled_owned(),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    ended.cancel();
    match driver.await {
        Ok(why) if !why.is_empty() => bail!(why),
        _ => Ok(()),
    }
}

/// One data stream: read which target, check it is allowed, connect it,
/// answer, then carry bytes until both sides are done.
async fn serve(mut s: Stream, allow: Arc<[String]>, stop: CancellationToken) {
    let open: Open = match timeout(OPEN_TIMEOUT, protocol::read_frame(&mut s)).await {
        Ok(Ok(open)) => open,
        // Dropped unclosed: the relay sees a reset.
        Ok(Err(e)) => return tracing::debug!(error = %e, "bad open frame"),
        Err(_) => return,
    };
    let refuse = |reason: String| Opened::Refused { reason };
    let answer = if !allow.contains(&open.target) {
        Err(refuse(format!("{} is not in tunnel.allow", open.target)))
    } else {
        match timeout(OPEN_TIMEOUT, TcpStream::connect(&open.target)).await {
            Ok(Ok(tcp)) => Ok(tcp),
            Ok(Err(e)) => Err(refuse(format!("cannot connect {}: {e}", open.target))),
            Err(_) => Err(refuse(format!("{} did not answer", open.target))),
        }
    };
    match answer {
        Err(refused) => {
            tracing::info!(pipe = %open.pipe, target = %open.target, answer = ?refused, "tunnel stream refused");
            let _ = protocol::write_frame(&mut s, &refused).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
        }
        Ok(mut tcp) => {
            let _ = tcp.set_nodelay(true);
            if protocol::write_frame(&mut s, &Opened::Ok).await.is_ok() {
                if let Err(e) = mux::splice(&mut s, &mut tcp, stop.cancelled()).await {
                    tracing::debug!(pipe = %open.pipe, error = %e, "tunnel stream ended");
                }
            }
        }
    }
}
