//! Relay-dials connections (G-SDK's asynchronous connections): for each
//! registered agent the relay dials the agent's `tunnel.listen` and keeps
//! it connected, dialing again with back-off after a loss or a failure.
//! Above TCP everything is as when the agent dials: the agent is the TLS
//! and yamux client and says hello; the relay verifies its certificate.
//! A registration is the operator's explicit accept: the accept filter is
//! for agents that dial in.

use super::agents::{session, Agents, Conn};
use super::config::AgentsConfig;
use super::registry::Registration;
use super::status::Mode;
use crate::backoff::Backoff;
use crate::supervisor::Shutdown;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Bound on one TCP connect to an agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off between dials: first delay and cap.
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// The registered agents' dialing tasks.
pub struct Dialer {
    agents: Arc<Agents>,
    config: Arc<AgentsConfig>,
    tls: tokio_rustls::TlsAcceptor,
    shutdown: Shutdown,
    running: Mutex<HashMap<String, CancellationToken>>,
}

impl Dialer {
    /// The dialer of the registered agents; nothing is dialed until started.
    pub fn new(
        agents: Arc<Agents>,
        config: AgentsConfig,
        tls: tokio_rustls::TlsAcceptor,
        shutdown: Shutdown,
    ) -> Dialer {
        Dialer {
            agents,
            config: Arc::new(config),
            tls,
            shutdown,
            running: Mutex::default(),
        }
    }

    /// Starts dialing every agent of the registry (at start).
    pub fn start_registered(&self) {
        for r in self.agents.registry.agents() {
            self.spawn(r);
        }
    }

    /// Registers (or re-registers) an agent, saved, and starts dialing it.
    pub fn add(&self, r: Registration) -> Result<(), String> {
        self.agents.registry.put_agent(r.clone())?;
        self.spawn(r);
        Ok(())
    }

    /// Forgets a registration: no more dialing, its live connection closed.
    pub fn remove(&self, device: &str) -> Result<bool, String> {
        let found = self.agents.registry.remove_agent(device)?;
        if let Some(stop) = self.running.lock().expect("dialer lock").remove(device) {
            stop.cancel();
        }
        self.agents.board.unregister(device);
        Ok(found)
    }

    fn spawn(&self, r: Registration) {
        self.agents.board.register(&r.device_id, &r.address, r.tls);
        let stop = self.shutdown.token().child_token();
        if let Some(old) = self
            .running
            .lock()
            .expect("dialer lock")
            .insert(r.device_id.clone(), stop.clone())
        {
            old.cancel();
        }
        let (agents, config, tls, sd) = (
            self.agents.clone(),
            self.config.clone(),
            self.tls.clone(),
            self.shutdown.clone(),
        );
        self.shutdown
            .spawn(async move { keep(r, agents, config, tls, stop, sd).await });
    }
}

/// Keeps one registered agent connected until `stop`.
async fn keep(
    r: Registration,
    agents: Arc<Agents>,
    config: Arc<AgentsConfig>,
    tls: tokio_rustls::TlsAcceptor,
    stop: CancellationToken,
    shutdown: Shutdown,
) {
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    let mut last_failure = String::new();
    while !stop.is_cancelled() {
        // Already connected (a connection of an earlier registration):
        // wait for it to end.
        if let Some(link) = agents.get(&r.device_id) {
            tokio::select! {
                _ = link.ended.cancelled() => {}
                _ = stop.cancelled() => {
                    link.ended.cancel();
                    return;
                }
            }
            continue;
        }
        let dial = async {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&r.address))
                .await
                .map_err(|_| anyhow::anyhow!("no TCP connection within {CONNECT_TIMEOUT:?}"))??;
            anyhow::Ok(tcp)
        };
        let outcome = tokio::select! {
            tcp = dial => match tcp {
                Ok(tcp) => {
                    let peer = tcp.peer_addr().ok();
                    match peer {
                        Some(peer) => {
                            let conn = Conn {
                                mode: Mode::RelayDials,
                                peer,
                                tls: r.tls.then(|| tls.clone()),
                                expect: Some(r.device_id.clone()),
                                parent: Some(stop.clone()),
                            };
                            session(tcp, conn, &agents, &config, &shutdown).await
                        }
                        None => Err(anyhow::anyhow!("the connection closed at once")),
                    }
                }
                Err(e) => Err(e),
            },
            _ = stop.cancelled() => return,
        };
        if stop.is_cancelled() {
            return;
        }
        let delay = match outcome {
            Ok(()) => {
                backoff.reset();
                last_failure.clear();
                let d = backoff.next_delay();
                tracing::info!(device = %r.device_id, address = %r.address, "dialing the agent again");
                d
            }
            Err(e) => {
                let why = format!("{e:#}");
                let d = backoff.next_delay();
                if why != last_failure {
                    let retry_in =
                        humantime::format_duration(Duration::from_millis(d.as_millis() as u64));
                    tracing::warn!(device = %r.device_id, address = %r.address, reason = %why, %retry_in, "cannot connect the agent; retrying");
                    agents.board.note(&r.device_id, &why);
                }
                last_failure = why;
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
    }
}
