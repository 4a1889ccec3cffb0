//! Status events to NATS (`nats.url`): each event of the board published
//! on `relay.status.{deviceId}` by one task over one connection, so they
//! arrive in the order they happened. The connection is made and kept in
//! the background (async-nats reconnects); events wait in a bounded queue
//! meanwhile.

use super::config::RelayNats;
use super::status::{Board, NATS_BACKLOG};
use crate::bus::topics;
use crate::supervisor::Shutdown;
use std::time::Duration;

/// Back-off of (re)connecting to NATS: first delay and cap.
const RECONNECT_BASE: Duration = Duration::from_millis(250);
const RECONNECT_CAP: Duration = Duration::from_secs(10);

/// The subjects this module publishes, as the AsyncAPI document names them.
pub fn documented_addresses() -> Vec<String> {
    topics::relay_status("PLACEHOLDER")
        .map(|t| t.nats().replace("PLACEHOLDER", "{deviceId}"))
        .into_iter()
        .collect()
}

/// The relay's NATS client options (`nats.*`): retried with back-off for
/// ever, the first attempt included, each state change logged.
pub fn connect_options(cfg: &RelayNats) -> async_nats::ConnectOptions {
    let mut opts = async_nats::ConnectOptions::new()
        .name("iot-relay")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            let failed = attempts.saturating_sub(1);
            if failed == 0 {
                return Duration::ZERO;
            }
            crate::backoff::delay(RECONNECT_BASE, RECONNECT_CAP, failed as u32 - 1)
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("relay connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("relay disconnected from NATS; reconnecting")
                }
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if !cfg.user.is_empty() {
        opts = opts.user_and_password(cfg.user.clone(), cfg.password.clone());
    }
    opts
}

/// Starts the publisher; events from now on are queued for it.
pub fn start(cfg: &RelayNats, board: &Board, shutdown: &Shutdown) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(NATS_BACKLOG);
    board.publish_to(tx);
    let cfg = cfg.clone();
    let sd = shutdown.clone();
    shutdown.spawn(async move {
        let url = cfg.url.clone();
        let opts = connect_options(&cfg);
        let client = tokio::select! {
            c = opts.connect(url.as_str()) => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(%url, error = %e, "nats.url: cannot use it; status events go to the admin API only");
                    return;
                }
            },
            _ = sd.cancelled() => return,
        };
        loop {
            let event = tokio::select! {
                e = rx.recv() => match e { Some(e) => e, None => break },
                _ = sd.cancelled() => break,
            };
            let subject = match topics::relay_status(&event.device_id) {
                Ok(t) => t.nats(),
                Err(e) => {
                    tracing::warn!(error = %e, "status event not published on NATS");
                    continue;
                }
            };
            let payload = serde_json::to_vec(&*event).unwrap_or_default();
            if let Err(e) = client.publish(subject, payload.into()).await {
                tracing::warn!(error = %e, "cannot publish a status event");
            }
        }
        let _ = client.flush().await;
    });
}
