//! The enrollment loop: load, or enroll with back-off, then hand over.

use super::{Credentials, EnrollState, IdentityService, Store, Stored};
use crate::backoff::Backoff;
use crate::snapd;
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

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
    let body = enrollment_body(&model, &serial)?;
    let enrollment = service.enroll(body).await?;
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

/// The request body: the current model assertion, a blank line, and the
/// serial assertion that belongs to it, each verbatim. The identity service
/// refuses a third assertion, and snapd may hold several of each (a
/// remodelled or re-registered device): the serial is the newest one, the
/// model the one it names (the latest revision of it).
pub fn enrollment_body(model: &str, serial: &str) -> Result<String, EnrollState> {
    let unreadable = |what: &str, e: snapd::AssertionError| EnrollState::SnapdUnreachable {
        detail: format!("snapd's {what} assertions cannot be read: {e}"),
    };
    let serials = snapd::Assertion::parse_all_raw(serial).map_err(|e| unreadable("serial", e))?;
    let models = snapd::Assertion::parse_all_raw(model).map_err(|e| unreadable("model", e))?;
    let Some((serial, serial_raw)) = serials
        .iter()
        .filter(|(a, _)| a.kind() == "serial")
        .max_by_key(|(a, _)| timestamp(a))
    else {
        return Err(EnrollState::NoSerial);
    };
    let same = |a: &snapd::Assertion, k: &str| a.header(k) == serial.header(k);
    let revision = |a: &snapd::Assertion| {
        a.header("revision")
            .and_then(|r| r.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (_, model_raw) = models
        .iter()
        .filter(|(a, _)| a.kind() == "model" && same(a, "brand-id") && same(a, "model"))
        .max_by_key(|(a, _)| revision(a))
        .ok_or_else(|| EnrollState::SnapdUnreachable {
            detail: format!(
                "snapd holds no model assertion for {}/{} (the model of the serial assertion)",
                serial.header("brand-id").unwrap_or(""),
                serial.header("model").unwrap_or("")
            ),
        })?;
    Ok(format!("{model_raw}\n\n{serial_raw}\n"))
}

/// An assertion's `timestamp` as Unix seconds (0 when missing or odd).
fn timestamp(a: &snapd::Assertion) -> i64 {
    a.header("timestamp")
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| t.unix_timestamp())
        .unwrap_or(0)
}

/// The enrollment subsystem.
#[derive(Clone)]
pub struct Enroller {
    /// snapd, for the serial assertion and the device's identity.
    pub snapd: snapd::Client,
    /// The identity service's client.
    pub service: IdentityService,
    /// Where the credentials are kept.
    pub store: Store,
    /// The service's URL as configured (recorded in `params`).
    pub identity_url: String,
    /// Longest wait between attempts (`identity.retry.max`).
    pub retry_cap: Duration,
    /// Publishes the credentials to the DMS link once they exist.
    pub credentials: watch::Sender<Option<Arc<Credentials>>>,
    /// Notified when the stored credentials changed under the agent
    /// (unregister, a one-shot `enroll`): reload them.
    pub reload: Arc<Notify>,
}

impl Subsystem for Enroller {
    const NAME: &'static str = "enrollment";
    const SECTION: &'static str = "identity";

    /// Loads the stored credentials or enrolls (with back-off), hands them
    /// over, and reloads on SIGHUP; until `shutdown`.
    async fn run(self, shutdown: Shutdown) -> RunResult {
        self.serve(shutdown).await
    }
}

impl Enroller {
    async fn serve(&self, shutdown: Shutdown) -> RunResult {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let text = std::fs::read_to_string(format!(
            "{}/tests/fixtures/reference/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        text.split_once("\n# ---\n").unwrap().1.to_string()
    }

    #[test]
    fn one_model_and_one_serial_even_when_snapd_holds_several() {
        // The identity service's own request bodies: model + serial.
        let both = fixture("01-identity-enroll-body-model-serial.txt");
        let all = snapd::Assertion::parse_all_raw(&both).unwrap();
        let (model, serial) = (all[0].1, all[1].1);
        let old_serial = serial
            .replace("2019-01-10T17:40:44.771564Z", "2018-01-01T00:00:00Z")
            .replace("serial: d75f7300", "serial: 0ld5e71a1");
        let other_model = model.replace("model: ubuntu-core-18-amd64", "model: other-model");
        let body = enrollment_body(
            &format!("{other_model}\n\n{model}\n"),
            &format!("{old_serial}\n\n{serial}\n"),
        )
        .unwrap();
        let sent = snapd::Assertion::parse_all(&body).unwrap();
        assert_eq!(sent.len(), 2, "{body}");
        assert_eq!(sent[0].kind(), "model");
        assert_eq!(sent[0].header("model"), Some("ubuntu-core-18-amd64"));
        assert_eq!(
            sent[1].header("serial"),
            Some("d75f7300-abbf-4c11-bf0a-8b7103038490")
        );
        assert!(body.starts_with(model) && body.contains(serial), "verbatim");
        assert_eq!(enrollment_body(model, ""), Err(EnrollState::NoSerial));
    }
}
