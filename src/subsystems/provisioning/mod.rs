//! The provisioning subsystem (`provisioning.*`): obtains and renews the
//! device's certificate from an EST server (RFC 7030; an `iot-relay`).
//!
//! 1. With no certificate (or an expired one) and a one-time password that
//!    was not spent: `cacerts` first (stored as the CA bundle), then a key
//!    made here (never sent), a CSR naming `provisioning.device`, and
//!    `simpleenroll` with HTTP Basic `device:otp`.
//!    - `200`: the key and certificate are stored (one atomic 0600 file),
//!      the OTP is recorded as spent and removed from the snap configuration;
//!    - `202`: the same OTP and key are tried again after `Retry-After`;
//!    - `401`: reported once as "OTP refused" with what to do, recorded as
//!      spent so no restart sends it again; then it waits for a new OTP.
//! 2. With a certificate: at `provisioning.renew` of its lifetime,
//!    `simplereenroll` over mutual TLS with it (a new key each time);
//!    failures retry with back-off until the certificate expires, after
//!    which only a new OTP helps.
//!
//! The tunnel uses what is stored here when `tunnel.cert` is not set.

pub mod client;
pub mod store;

use crate::backoff::Backoff;
use crate::config::{Config, ProvisioningConfig};
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use client::{Est, Outcome};
use std::sync::Arc;
use std::time::Duration;
use store::{Identity, Store};

/// Back-off between failed attempts (network, server errors).
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(300);

/// The subsystem: a handle on its settings.
#[derive(Clone)]
pub struct Provisioning {
    config: Arc<ProvisioningConfig>,
}

impl Provisioning {
    /// The subsystem of `provisioning.*`.
    pub fn from_config(config: &Config) -> Provisioning {
        Provisioning {
            config: Arc::new(config.provisioning.clone()),
        }
    }
}

/// Whether `provisioning.url` is set (the subsystem runs).
pub fn enabled(config: &Config) -> bool {
    !config.provisioning.url.trim().is_empty()
}

impl Subsystem for Provisioning {
    const NAME: &'static str = "provisioning";
    const SECTION: &'static str = "provisioning";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        run(&self.config, &shutdown).await
    }
}

/// Sleeps `d` or until shutdown; false when shutting down.
async fn pause(d: Duration, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

fn now_s() -> i64 {
    crate::clock::now_s()
}

/// When `id` is due for re-enrollment (unix s).
fn renew_at(id: &Identity, fraction: f64) -> i64 {
    let life = (id.not_after - id.not_before).max(0) as f64;
    id.not_before + (life * fraction) as i64
}

/// Logs a state change once and records it for `provisioning status`.
struct Reporter<'a> {
    store: &'a Store,
    last: String,
}

impl Reporter<'_> {
    fn set(&mut self, state: &str, message: &str) {
        if let Err(e) = self.store.set_state(state, message) {
            tracing::warn!(error = %e, "cannot record the provisioning state");
        }
        let key = format!("{state}\n{message}");
        if key != self.last {
            match state {
                "otp-refused" | "expired" | "error" => {
                    tracing::error!(state, "provisioning: {message}")
                }
                "waiting-for-otp" | "deferred" => tracing::warn!(state, "provisioning: {message}"),
                _ => tracing::info!(state, "provisioning: {message}"),
            }
            self.last = key;
        }
    }
}

async fn run(c: &ProvisioningConfig, shutdown: &Shutdown) -> RunResult {
    let store = Store::new(c.dir.path());
    let mut report = Reporter {
        store: &store,
        last: String::new(),
    };
    // A configuration error is reported once and waits for a new
    // configuration (which restarts the agent): retrying cannot fix it.
    let anonymous = if c.device.trim().is_empty() {
        Err("provisioning.device is not set: the device id the certificate is for".to_string())
    } else {
        Est::new(c, None).map_err(|e| format!("{e:#}"))
    };
    let anonymous = match anonymous {
        Ok(est) => est,
        Err(e) => {
            report.set("error", &format!("cannot provision: {e}"));
            shutdown.cancelled().await;
            return Ok(());
        }
    };
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
    // The key of an enrollment deferred with 202: kept (in memory only) so
    // the retry asks for the same key.
    let mut pending_key: Option<String> = None;
    while !shutdown.is_cancelled() {
        let current = match store.identity() {
            Ok(id) => id,
            Err(e) => {
                report.set(
                    "error",
                    &format!("the stored certificate is unreadable ({e}); enrolling again"),
                );
                None
            }
        };
        let now = now_s();
        if let Some(id) = current.filter(|id| id.not_after > now) {
            let due = renew_at(&id, c.renew.get());
            if now < due {
                report.set(
                    "enrolled",
                    &format!(
                        "certificate {} valid until {}; renewal at {}",
                        id.subject,
                        fmt_s(id.not_after),
                        fmt_s(due)
                    ),
                );
                backoff.reset();
                // Wake at the renewal time (capped so a clock step is noticed).
                let wait = Duration::from_secs((due - now).clamp(1, 3600) as u64);
                if !pause(wait, shutdown).await {
                    break;
                }
                continue;
            }
            report.set(
                "renewing",
                &format!("re-enrolling {} over mutual TLS", id.subject),
            );
            match renew(c, &store, &id).await {
                Ok(new) => {
                    backoff.reset();
                    tracing::info!(subject = %new.subject, until = %fmt_s(new.not_after), "provisioning: re-enrolled");
                    continue;
                }
                Err(e) => {
                    let d = backoff.next_delay();
                    report.set(
                        "renewing",
                        &format!(
                            "re-enrollment failed ({e}); retrying in {}, the certificate is valid until {}",
                            humantime::format_duration(Duration::from_secs(d.as_secs().max(1))),
                            fmt_s(id.not_after)
                        ),
                    );
                    if !pause(d, shutdown).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let expired = store.identity().ok().flatten().is_some();
        let otp = c.otp.trim();
        if otp.is_empty() || store.is_spent(otp) {
            let why = if expired {
                "the certificate has expired"
            } else {
                "no certificate yet"
            };
            let state = if expired {
                "expired"
            } else {
                "waiting-for-otp"
            };
            let otp_note = if otp.is_empty() {
                "no one-time password is set"
            } else {
                "the configured one-time password was already used or refused"
            };
            report.set(
                state,
                &format!(
                    "{why} and {otp_note}; issue one on the relay (POST /api/v2/otp) and set it: \
                     snap set iot-agent provisioning.otp=<otp>"
                ),
            );
            // A new OTP arrives with a configuration change, which
            // restarts the agent.
            shutdown.cancelled().await;
            break;
        }
        report.set(
            "enrolling",
            &format!("enrolling {} with a one-time password", c.device),
        );
        let ca = match anonymous.cacerts().await {
            Ok(ca) => ca,
            Err(e) => {
                let d = backoff.next_delay();
                report.set(
                    "error",
                    &format!("cacerts failed: {e}; retrying in {}", secs(d)),
                );
                if !pause(d, shutdown).await {
                    break;
                }
                continue;
            }
        };
        if let Err(e) = store.save_ca(&ca) {
            report.set("error", &e);
        }
        let key_pem = match pending_key.take() {
            Some(k) => k,
            None => client::new_key().map_err(anyhow::Error::msg)?,
        };
        match anonymous
            .enroll(&key_pem, &c.device, Some((&c.device, otp)))
            .await
        {
            Outcome::Issued(chain) => match save(&store, &chain, &key_pem) {
                Ok(id) => {
                    if let Err(e) = store.spend(otp) {
                        tracing::warn!(error = %e, "cannot record the used one-time password");
                    }
                    forget_otp();
                    backoff.reset();
                    report.set(
                        "enrolled",
                        &format!(
                            "enrolled: {} valid until {}",
                            id.subject,
                            fmt_s(id.not_after)
                        ),
                    );
                }
                Err(e) => {
                    // The OTP is spent on the server; a new one is needed.
                    let _ = store.spend(otp);
                    report.set(
                        "error",
                        &format!("the issued certificate cannot be stored: {e}"),
                    );
                }
            },
            Outcome::Deferred(after) => {
                pending_key = Some(key_pem);
                report.set(
                    "deferred",
                    &format!(
                        "the EST server deferred the enrollment (202); the one-time password is \
                         kept and sent again in {}",
                        secs(after)
                    ),
                );
                if !pause(after, shutdown).await {
                    break;
                }
            }
            Outcome::Refused(msg) => {
                if let Err(e) = store.spend(otp) {
                    tracing::warn!(error = %e, "cannot record the refused one-time password");
                }
                report.set(
                    "otp-refused",
                    &format!(
                        "OTP refused by the EST server ({msg}); it is not sent again: issue a new \
                         one on the relay (POST /api/v2/otp) and set it with snap set iot-agent \
                         provisioning.otp=<otp>"
                    ),
                );
                // No retry storm: only a new OTP (a restart) helps.
                shutdown.cancelled().await;
                break;
            }
            Outcome::Failed(e) => {
                pending_key = Some(key_pem);
                let d = backoff.next_delay();
                report.set(
                    "error",
                    &format!("enrollment failed: {e}; retrying in {}", secs(d)),
                );
                if !pause(d, shutdown).await {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Re-enrollment over mutual TLS with the current identity.
async fn renew(c: &ProvisioningConfig, store: &Store, id: &Identity) -> Result<Identity, String> {
    let est = Est::new(c, Some((&id.cert_pem, &id.key_pem))).map_err(|e| format!("{e:#}"))?;
    if let Ok(ca) = est.cacerts().await {
        let _ = store.save_ca(&ca);
    }
    let key_pem = client::new_key()?;
    match est.enroll(&key_pem, &c.device, None).await {
        Outcome::Issued(chain) => save(store, &chain, &key_pem),
        Outcome::Deferred(after) => Err(format!("deferred (202, retry after {})", secs(after))),
        Outcome::Refused(m) => Err(format!("refused: {m}")),
        Outcome::Failed(m) => Err(m),
    }
}

/// Stores the issued chain with its key: the certificate whose public key
/// is ours goes first.
fn save(store: &Store, chain: &[Vec<u8>], key_pem: &str) -> Result<Identity, String> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| e.to_string())?;
    let ours = rcgen::PublicKeyData::subject_public_key_info(&key);
    let mut ordered: Vec<Vec<u8>> = Vec::new();
    for der in chain {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            continue;
        };
        if cert.public_key().raw == ours.as_slice() {
            ordered.insert(0, der.clone());
        } else {
            ordered.push(der.clone());
        }
    }
    let first_is_ours = ordered.first().is_some_and(|d| {
        use x509_parser::prelude::{FromDer, X509Certificate};
        X509Certificate::from_der(d).is_ok_and(|(_, c)| c.public_key().raw == ours.as_slice())
    });
    if !first_is_ours {
        return Err("the answer holds no certificate for this device's key".into());
    }
    store.save_identity(&ordered, key_pem)
}

/// In a snap, removes `provisioning.otp` from the snap configuration (it
/// is spent). Outside a snap the operator's file or environment cannot be
/// edited here; the OTP is recorded as spent and never sent again.
fn forget_otp() {
    if !crate::config::layers::in_snap() {
        tracing::info!(
            "provisioning: the one-time password is spent; remove provisioning.otp from the \
             configuration file or environment"
        );
        return;
    }
    match std::process::Command::new("snapctl")
        .args(["unset", "provisioning.otp"])
        .output()
    {
        Ok(o) if o.status.success() => {
            tracing::info!(
                "provisioning: removed the spent provisioning.otp from the snap configuration"
            )
        }
        Ok(o) => tracing::warn!(
            stderr = %String::from_utf8_lossy(&o.stderr).trim(),
            "cannot unset provisioning.otp; it is recorded as spent and not used again"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot run snapctl unset provisioning.otp"),
    }
}

fn secs(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs().max(1))).to_string()
}

/// Unix seconds as RFC 3339.
pub fn fmt_s(s: i64) -> String {
    crate::clock::format_ns(s.saturating_mul(1_000_000_000))
}
