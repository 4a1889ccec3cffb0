//! The enrollment loop: load, or enroll with back-off, then hand over.

use super::{Credentials, EnrollState, IdentityService, Store, Stored};
use crate::backoff::Backoff;
use crate::snapd;
use crate::supervisor::RunResult;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// The MQTT side watches this: `Some` while the device has credentials.
pub type CredentialsRx = watch::Receiver<Option<Arc<Credentials>>>;

/// First delay between enrollment attempts (the cap is `identity.retry.max`).
const RETRY_BASE: Duration = Duration::from_secs(2);

/// One enrollment attempt: assertions from snapd, the service's answer
/// checked, the credentials stored.
pub async fn enroll_once(
    snapd: &snapd::Client,
    service: &IdentityService,
    store: &Store,
    identity_url: &str,
) -> Result<Arc<Credentials>, EnrollState> {
    let snapd_err = |e: snapd::Error| EnrollState::SnapdUnreachable {
        detail: e.to_string(),
    };
    let model = snapd
        .assertions_text("model", &[])
        .await
        .map_err(snapd_err)?;
    let serial = snapd
        .assertions_text("serial", &[])
        .await
        .map_err(snapd_err)?;
    if serial.trim().is_empty() {
        return Err(EnrollState::NoSerial);
    }
    let enrollment = service.enroll(format!("{model}\n{serial}")).await?;
    let credentials =
        Credentials::from_enrollment(&enrollment).map_err(|e| EnrollState::BadAnswer {
            detail: e.to_string(),
        })?;
    // Atomic writes with fsync: off the runtime.
    let (s, url) = (store.clone(), identity_url.to_string());
    tokio::task::spawn_blocking(move || s.save(&url, &enrollment))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|e| EnrollState::StoreFailed {
            detail: e.to_string(),
        })?;
    Ok(credentials)
}

/// The enrollment subsystem.
pub struct Enroller {
    pub snapd: snapd::Client,
    pub service: IdentityService,
    pub store: Store,
    pub identity_url: String,
    pub retry_cap: Duration,
    pub credentials: watch::Sender<Option<Arc<Credentials>>>,
    /// Notified when the stored credentials changed under the agent
    /// (unregister, a one-shot `enroll`): reload them.
    pub reload: Arc<Notify>,
}

impl Enroller {
    pub async fn run(&self, shutdown: CancellationToken) -> RunResult {
        let mut backoff = Backoff::new(RETRY_BASE, self.retry_cap);
        let mut last: Option<&'static str> = None;
        loop {
            let store = self.store.clone();
            let stored = tokio::task::spawn_blocking(move || store.load())
                .await
                .unwrap_or_else(|e| Stored::Corrupt(format!("cannot read it ({e})")));
            match stored {
                Stored::Valid { credentials, .. } => {
                    let state = EnrollState::Enrolled {
                        device_id: credentials.device_id.clone(),
                    };
                    self.report(&state, &mut last);
                    tracing::info!(
                        device_id = %credentials.device_id,
                        organization = %credentials.org_id,
                        broker = %format!("{}:{}", credentials.mqtt_host, credentials.mqtt_port),
                        "device credentials ready"
                    );
                    self.credentials.send_replace(Some(credentials));
                    backoff.reset();
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = self.reload.notified() => {
                            tracing::info!("reloading the enrollment (credentials changed on disk)");
                            self.credentials.send_replace(None);
                            last = None;
                            continue;
                        }
                    }
                }
                Stored::Corrupt(why) => tracing::warn!(
                    file = %self.store.secret_path().display(),
                    "stored credentials are unusable ({why}); enrolling again"
                ),
                Stored::Missing => {}
            }
            match enroll_once(&self.snapd, &self.service, &self.store, &self.identity_url).await {
                Ok(c) => {
                    tracing::info!(device_id = %c.device_id, url = %self.service.endpoint(), "enrolled with the identity service");
                    continue;
                }
                Err(state) => {
                    self.report(&state, &mut last);
                    if state.is_permanent() {
                        backoff.to_cap();
                    }
                }
            }
            let delay = backoff.next_delay();
            tracing::debug!(retry_in = ?delay, "enrollment retry scheduled");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
                _ = self.reload.notified() => backoff.reset(),
            }
        }
    }

    /// Logs a state once when it begins, and records it for `status`.
    fn report(&self, state: &EnrollState, last: &mut Option<&'static str>) {
        if *last == Some(state.name()) {
            return;
        }
        *last = Some(state.name());
        // A small fsync'd file: written off the runtime, not waited for.
        let (store, recorded) = (self.store.clone(), state.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.write_state(&recorded) {
                tracing::warn!(error = %e, "cannot record the enrollment state for `iot-agent status`");
            }
        });
        match state {
            EnrollState::Enrolled { .. } => {}
            s if s.is_permanent() => tracing::error!(state = s.name(), "{s}"),
            s => tracing::warn!(state = s.name(), "{s}"),
        }
    }
}
