//! Relay-dials (`tunnel.listen`): the agent waits for the relay to dial it
//! instead of dialing, for a device on a network the relay can reach. Above
//! TCP the connection is the same as a dialed one: the agent is the TLS
//! client (it verifies the relay's certificate for the host of
//! `tunnel.relay` against `tunnel.ca`), says hello and serves the relay's
//! streams. Anyone can connect to the port, so a connection replaces the
//! live one only once the relay has welcomed it, and only a few unfinished
//! handshakes are served at once.

use super::client::{session_over, Dialer};
use crate::config::TunnelConfig;
use crate::supervisor::Shutdown;
use anyhow::Context;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections whose handshake and hello are under way at once; more are
/// closed at once.
const HANDSHAKES: usize = 4;

/// Accepts the relay's connections until shutdown.
pub(super) async fn run(
    c: &TunnelConfig,
    dialer: Arc<Dialer>,
    allow: Arc<[String]>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&c.listen)
        .await
        .with_context(|| format!("tunnel.listen {}", c.listen))?;
    tracing::info!(listen = %listener.local_addr()?, tls = c.tls, device = %dialer.device, "tunnel waiting for the relay to dial");
    let live: Arc<Mutex<Option<CancellationToken>>> = Arc::default();
    let last_failure: Arc<Mutex<String>> = Arc::default();
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES));
    let c = Arc::new(c.clone());
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a relay connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many unfinished handshakes: connection closed");
            continue;
        };
        let (c, dialer, allow, sd) = (c.clone(), dialer.clone(), allow.clone(), shutdown.clone());
        let (live, last_failure) = (live.clone(), last_failure.clone());
        shutdown.spawn(async move {
            let mine = sd.token().child_token();
            let mut connected = false;
            let on_welcome = || {
                drop(permit);
                if let Some(old) = live.lock().expect("live lock").replace(mine.clone()) {
                    old.cancel();
                }
                last_failure.lock().expect("failure lock").clear();
                tracing::info!(relay = %peer, device = %dialer.device, "tunnel connected");
            };
            let outcome = session_over(
                tcp,
                &c,
                &dialer,
                &allow,
                &sd,
                mine.clone(),
                &mut connected,
                on_welcome,
            )
            .await;
            if sd.is_cancelled() {
                return;
            }
            let why = match outcome {
                Ok(()) if mine.is_cancelled() => "replaced by a newer connection".to_string(),
                Ok(()) => "the relay closed the connection".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if connected {
                tracing::warn!(relay = %peer, reason = %why, "tunnel lost; waiting for the relay to dial again");
            } else {
                let mut last = last_failure.lock().expect("failure lock");
                if *last != why {
                    tracing::warn!(relay = %peer, reason = %why, "tunnel connection from the relay failed");
                    *last = why;
                }
            }
        });
    }
}
