//! One-time passwords for first enrollment: issued by the admin API
//! (`POST /api/v2/otp`), checked by EST `simpleenroll` (HTTP Basic, user =
//! device id). Only a SHA-256 of each OTP is kept (in the relay's
//! database, [`super::store`]), compared in constant time; an OTP is good
//! for one enrollment of one device until it expires. Used OTPs are kept
//! until they expire so a replay is refused as "already used", not as
//! "unknown", and across relay restarts.

use super::store::{not_saved, Store};
use crate::db::DbError;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Why an OTP was refused (the EST answer's message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such OTP was issued.
    #[error("no such one-time password for this device (issue one: POST /api/v2/otp)")]
    Unknown,
    /// Already used once.
    #[error("this one-time password was already used (issue a new one: POST /api/v2/otp)")]
    Used,
    /// Past its expiry.
    #[error("this one-time password has expired (issue a new one: POST /api/v2/otp)")]
    Expired,
}

/// One OTP as kept (a row of `otps`; also the JSON of the `otp.state`
/// file earlier relays wrote, which [`super::store`] imports).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    pub(super) device: String,
    /// SHA-256 of the OTP, hex.
    pub(super) sha256: String,
    /// Unix ms.
    pub(super) expires: i64,
    /// Unix ms of the enrollment that used it.
    pub(super) used: Option<i64>,
}

/// The OTPs: the database's rows and their copy in memory (every check
/// compares against all of them).
pub struct Otps {
    store: Arc<Store>,
    entries: Mutex<Vec<Entry>>,
}

fn digest(otp: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, otp.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Otps {
    /// Reads the OTPs from the database.
    pub fn open(store: Arc<Store>) -> Result<Otps, DbError> {
        let entries = store.otps()?;
        Ok(Otps {
            store,
            entries: Mutex::new(entries),
        })
    }

    /// Issues a fresh OTP for `device`, valid for `ttl`; an earlier unused
    /// OTP of the same device stops being valid (the newest one counts).
    /// Returns the OTP (shown once, never stored) and its expiry (unix ms).
    /// Blocks on SQLite.
    pub fn issue(&self, device: &str, ttl: Duration) -> Result<(String, i64), String> {
        let mut raw = [0u8; 18];
        rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
        use base64::Engine;
        let otp = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = crate::clock::now_ms();
        let expires = now.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
        let mut entries = self.entries.lock().expect("otp lock");
        let entry = Entry {
            device: device.to_string(),
            sha256: digest(&otp),
            expires,
            used: None,
        };
        self.store.issue_otp(&entry, now).map_err(not_saved)?;
        // What the transaction did, in memory.
        entries.retain(|e| e.expires > now && !(e.device == device && e.used.is_none()));
        entries.push(entry);
        Ok((otp, expires))
    }

    fn find(entries: &[Entry], device: &str, otp: &str) -> Option<usize> {
        let want = digest(otp);
        let mut found = None;
        // Every entry is compared, so the time taken does not say which.
        for (i, e) in entries.iter().enumerate() {
            let same = e.sha256.as_bytes().ct_eq(want.as_bytes());
            if bool::from(same) && e.device == device {
                found = Some(i);
            }
        }
        found
    }

    fn judge(e: &Entry, now: i64) -> Result<(), Refusal> {
        if e.used.is_some() {
            Err(Refusal::Used)
        } else if e.expires <= now {
            Err(Refusal::Expired)
        } else {
            Ok(())
        }
    }

    /// Whether `otp` would be accepted for `device` now (nothing changes:
    /// a deferred enrollment keeps its OTP).
    pub fn check(&self, device: &str, otp: &str) -> Result<(), Refusal> {
        let entries = self.entries.lock().expect("otp lock");
        let i = Self::find(&entries, device, otp).ok_or(Refusal::Unknown)?;
        Self::judge(&entries[i], crate::clock::now_ms())
    }

    /// Uses `otp` for `device`: accepted once, recorded as used on disk
    /// before the caller signs anything. `Err(Ok(refusal))`: refused;
    /// `Err(Err(message))`: the store cannot be written (nothing used).
    /// Blocks on SQLite.
    pub fn consume(&self, device: &str, otp: &str) -> Result<(), Result<Refusal, String>> {
        let mut entries = self.entries.lock().expect("otp lock");
        let now = crate::clock::now_ms();
        let i = Self::find(&entries, device, otp).ok_or(Ok(Refusal::Unknown))?;
        Self::judge(&entries[i], now).map_err(Ok)?;
        self.store
            .use_otp(device, &entries[i].sha256, now)
            .map_err(|e| Err(not_saved(e)))?;
        entries[i].used = Some(now);
        Ok(())
    }
}

/// What the admin API needs to issue OTPs.
pub struct OtpApi {
    /// The OTP store.
    pub otps: std::sync::Arc<Otps>,
    /// `otp.expiry` and `otp.max`.
    pub expiry: Duration,
    /// The longest expiry a request may ask for (`otp.max`).
    pub max: Duration,
}

/// The admin API's `POST /api/v2/otp`: a JSON body (or form fields)
/// `{"device": "...", "expiry": "1h"}` or the form `device=...&expiry=1h`;
/// `expiry` is optional (`otp.expiry`)
/// and at most `max`. Answers `(status, JSON)`; the OTP is committed (off
/// the async threads) before it is answered.
pub async fn issue_request(
    otps: &Arc<Otps>,
    body: &[u8],
    default_ttl: Duration,
    max: Duration,
) -> (http::StatusCode, serde_json::Value) {
    use http::StatusCode;
    use serde_json::json;
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            json!({"status": "error", "message": m}),
        )
    };
    // JSON by its first byte (curl -d says form-urlencoded for anything).
    let json_body = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let (device, expiry) = if !json_body {
        let text = String::from_utf8_lossy(body);
        let form = super::mapping_api::parse_form(&text);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        (get("device"), get("expiry"))
    } else {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Req {
            device: String,
            expiry: Option<String>,
        }
        match serde_json::from_slice::<Req>(body) {
            Ok(r) => (Some(r.device), r.expiry),
            Err(e) => {
                return bad(format!(
                    "the body is not {{\"device\": \"<id>\", \"expiry\": \"1h\"}}: {e}"
                ))
            }
        }
    };
    let Some(device) = device
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty())
    else {
        return bad("device is missing: the device id the OTP is for".into());
    };
    if device.len() > 128 || device.chars().any(|c| c.is_control() || c == ':') {
        return bad(
            "device must be at most 128 characters, without ':' or control characters".into(),
        );
    }
    let ttl = match expiry.as_deref().map(str::trim).filter(|e| !e.is_empty()) {
        None => default_ttl,
        Some(e) => match humantime::parse_duration(e) {
            Ok(d) if d.is_zero() => return bad("expiry must be more than 0s".into()),
            Ok(d) if d > max => {
                return bad(format!(
                    "expiry {e} is longer than otp.max ({})",
                    humantime::format_duration(max)
                ))
            }
            Ok(d) => d,
            Err(err) => {
                return bad(format!(
                    "expiry {e:?} is not a duration like 15m or 1h: {err}"
                ))
            }
        },
    };
    let o = otps.clone();
    let d = device.clone();
    let issued = super::store::blocking(move || o.issue(&d, ttl))
        .await
        .and_then(|r| r);
    match issued {
        Ok((otp, expires)) => (
            StatusCode::OK,
            json!({
                "status": "ok",
                "device": device,
                "otp": otp,
                "expires": crate::clock::format_ns(expires.saturating_mul(1_000_000)),
            }),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"status": "error", "message": e}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::store::Legacy;

    fn store(path: &std::path::Path) -> Arc<Store> {
        Arc::new(Store::open(path, &Legacy::default()).unwrap())
    }

    #[test]
    fn an_otp_is_good_once_for_its_device_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let otps = Otps::open(store(&path)).unwrap();
        let (otp, _) = otps.issue("d1", Duration::from_secs(60)).unwrap();
        assert_eq!(otps.check("d2", &otp), Err(Refusal::Unknown));
        assert_eq!(otps.check("d1", "nope"), Err(Refusal::Unknown));
        assert_eq!(otps.check("d1", &otp), Ok(()));
        assert_eq!(otps.consume("d1", &otp), Ok(()));
        assert_eq!(otps.consume("d1", &otp), Err(Ok(Refusal::Used)));
        drop(otps);
        let again = Otps::open(store(&path)).unwrap();
        assert_eq!(again.check("d1", &otp), Err(Refusal::Used));
        // Only the hash is kept.
        let db = std::fs::read(&path).unwrap();
        let wal = std::fs::read(dir.path().join("relay.db-wal")).unwrap_or_default();
        for bytes in [db, wal] {
            assert!(!bytes.windows(otp.len()).any(|w| w == otp.as_bytes()));
        }
    }

    #[test]
    fn a_newer_otp_replaces_an_unused_one_and_expired_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let otps = Otps::open(store(&dir.path().join("relay.db"))).unwrap();
        let (first, _) = otps.issue("d1", Duration::from_secs(60)).unwrap();
        let (second, _) = otps.issue("d1", Duration::from_secs(60)).unwrap();
        assert_eq!(otps.check("d1", &first), Err(Refusal::Unknown));
        assert_eq!(otps.check("d1", &second), Ok(()));
        let (short, _) = otps.issue("d3", Duration::from_millis(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(otps.check("d3", &short), Err(Refusal::Expired));
    }
}
