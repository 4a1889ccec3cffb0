//! What provisioning keeps in `provisioning.dir`:
//! - `device.pem`: the certificate chain and its private key in one file
//!   (0600), written atomically, so a crash leaves the old pair or the new
//!   one, never a key without its certificate;
//! - `ca.pem`: the CA bundle from `cacerts`;
//! - `state.json`: where provisioning stands (for `iot-agent provisioning
//!   status`) and the SHA-256 of OTPs used or refused (never the OTP).

use crate::fsutil::{write_atomic, SECRET_MODE};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The provisioned identity, as read back.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The certificate chain (PEM).
    pub cert_pem: String,
    /// The private key (PEM).
    pub key_pem: String,
    /// The certificate's subject.
    pub subject: String,
    /// Its issuer.
    pub issuer: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// Where provisioning stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    /// `off`, `waiting-for-otp`, `enrolling`, `deferred`, `otp-refused`,
    /// `enrolled`, `renewing`, `expired`, `error`.
    pub state: String,
    /// What happened last and what to do about it.
    pub message: String,
    /// Unix ms of the last change.
    pub updated: i64,
    /// SHA-256 (hex) of OTPs already used or refused: never sent again.
    #[serde(default)]
    pub spent_otps: Vec<String>,
}

/// The files of one `provisioning.dir`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// SHA-256 (hex) of an OTP, as `State::spent_otps` keeps it.
pub fn otp_digest(otp: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, otp.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// The store in `dir`.
    pub fn new(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    /// `device.pem`: the certificate chain and the key.
    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("device.pem")
    }

    /// `ca.pem`: the relay CA the EST server answered.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn prepare(&self) -> std::io::Result<()> {
        crate::fsutil::make_private_dir(&self.dir)
    }

    /// The stored identity; `Ok(None)` when there is none yet.
    pub fn identity(&self) -> Result<Option<Identity>, String> {
        let path = self.identity_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        parse_identity(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces the identity (chain first, then the key; one atomic write).
    pub fn save_identity(&self, chain: &[Vec<u8>], key_pem: &str) -> Result<Identity, String> {
        let mut text = String::new();
        for der in chain {
            text.push_str(&pem("CERTIFICATE", der));
        }
        text.push_str(key_pem);
        let id = parse_identity(&text)?;
        self.prepare().map_err(|e| e.to_string())?;
        write_atomic(&self.identity_path(), text.as_bytes(), SECRET_MODE)
            .map_err(|e| format!("cannot write {}: {e}", self.identity_path().display()))?;
        Ok(id)
    }

    /// Writes the CA certificates (atomically).
    pub fn save_ca(&self, certs: &[Vec<u8>]) -> Result<(), String> {
        let text: String = certs.iter().map(|d| pem("CERTIFICATE", d)).collect();
        self.prepare().map_err(|e| e.to_string())?;
        write_atomic(&self.ca_path(), text.as_bytes(), 0o644)
            .map_err(|e| format!("cannot write {}: {e}", self.ca_path().display()))
    }

    /// The provisioning state, as recorded.
    pub fn state(&self) -> State {
        std::fs::read(self.state_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records the state (and keeps the spent OTP list).
    pub fn set_state(&self, state: &str, message: &str) -> Result<(), String> {
        let mut s = self.state();
        s.state = state.to_string();
        s.message = message.to_string();
        s.updated = crate::clock::now_ms();
        self.write_state(&s)
    }

    /// Adds an OTP's digest to the spent list.
    pub fn spend(&self, otp: &str) -> Result<(), String> {
        let mut s = self.state();
        let d = otp_digest(otp);
        if !s.spent_otps.contains(&d) {
            s.spent_otps.push(d);
        }
        self.write_state(&s)
    }

    /// Whether `otp` was used before (only its hash is kept).
    pub fn is_spent(&self, otp: &str) -> bool {
        self.state().spent_otps.contains(&otp_digest(otp))
    }

    fn write_state(&self, s: &State) -> Result<(), String> {
        self.prepare().map_err(|e| e.to_string())?;
        let bytes = serde_json::to_vec_pretty(s).map_err(|e| e.to_string())?;
        write_atomic(&self.state_path(), &bytes, SECRET_MODE)
            .map_err(|e| format!("cannot write {}: {e}", self.state_path().display()))
    }
}

fn pem(tag: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

/// Reads a `device.pem` text: the first certificate is the device's.
pub fn parse_identity(text: &str) -> Result<Identity, String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let chain =
        crate::tls::certs_from_pem(text, "the device certificate").map_err(|e| e.to_string())?;
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|e| format!("no private key: {e}"))?;
    let first: &CertificateDer<'_> = &chain[0];
    let (_, cert) = X509Certificate::from_der(first.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    Ok(Identity {
        cert_pem: text.to_string(),
        key_pem: text.to_string(),
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}
