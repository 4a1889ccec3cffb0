//! The relay's certificate authority: the key and self-signed certificate
//! that sign device certificates (EST, [`super::est`]) and that the agents'
//! port trusts. Created on first start when missing (key 0600), loaded
//! after. The CA signs what it decides, not what a CSR asks for: the
//! subject is the device id alone, client authentication only, never a CA.

use crate::fsutil::{write_atomic, SECRET_MODE};
use anyhow::{anyhow, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use std::path::Path;
use std::time::Duration;

/// How long the CA's own certificate is valid when the relay creates it.
const CA_LIFETIME: Duration = Duration::from_secs(20 * 365 * 24 * 3600);

/// A loaded CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, DER (what `cacerts` serves).
    pub cert_der: Vec<u8>,
    /// The same as PEM (what the agents' port trusts).
    pub cert_pem: String,
}

/// A CSR that parsed and whose signature verified.
#[derive(Debug)]
pub struct Csr {
    /// The subject's common name (the device id the CSR asks for).
    pub common_name: Option<String>,
    /// The PKCS#9 challengePassword, if any (EST channel binding).
    pub challenge_password: Option<String>,
    /// The SubjectPublicKeyInfo, DER.
    spki: Vec<u8>,
}

/// Parses a DER PKCS#10 request and verifies its self-signature (proof
/// the requester holds the key).
pub fn parse_csr(der: &[u8]) -> Result<Csr, String> {
    use x509_parser::prelude::FromDer;
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| format!("the CSR does not parse as PKCS#10: {e}"))?;
    if !rest.is_empty() {
        return Err("the CSR has trailing bytes after its DER".into());
    }
    csr.verify_signature()
        .map_err(|e| format!("the CSR's signature does not verify: {e}"))?;
    let info = &csr.certification_request_info;
    let common_name = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let challenge_password =
        csr.certification_request_info
            .attributes()
            .iter()
            .find_map(|a| match a.parsed_attribute() {
                x509_parser::cri_attributes::ParsedCriAttribute::ChallengePassword(p) => {
                    Some(p.0.clone())
                }
                _ => None,
            });
    Ok(Csr {
        common_name,
        challenge_password,
        spki: info.subject_pki.raw.to_vec(),
    })
}

impl Ca {
    /// Loads the CA from `cert`/`key`, or creates both when neither exists
    /// (key 0600, certificate 0644). One present without the other is an
    /// error: a CA is not silently replaced.
    pub fn load_or_create(cert: &Path, key: &Path) -> anyhow::Result<Ca> {
        match (cert.exists(), key.exists()) {
            (true, true) => {
                let cert_pem = crate::tls::read_pem(cert, "ca.cert")?;
                let key_pem = crate::tls::read_pem(key, "ca.key")?;
                let kp = KeyPair::from_pem(&key_pem).map_err(|e| anyhow!("ca.key: {e}"))?;
                let issuer = Issuer::from_ca_cert_pem(&cert_pem, kp)
                    .map_err(|e| anyhow!("ca.cert {}: {e}", cert.display()))?;
                let der = crate::tls::certs_from_pem(&cert_pem, "ca.cert")?
                    .remove(0)
                    .to_vec();
                Ok(Ca {
                    issuer,
                    cert_der: der,
                    cert_pem,
                })
            }
            (false, false) => {
                let kp = KeyPair::generate().map_err(|e| anyhow!("cannot make the CA key: {e}"))?;
                let mut params = CertificateParams::default();
                params
                    .distinguished_name
                    .push(DnType::CommonName, "iot-relay device CA");
                params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
                params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
                let now = time::OffsetDateTime::now_utc();
                params.not_before = now - time::Duration::hours(1);
                params.not_after = now + CA_LIFETIME;
                let made = params
                    .self_signed(&kp)
                    .map_err(|e| anyhow!("cannot make the CA certificate: {e}"))?;
                write_atomic(key, kp.serialize_pem().as_bytes(), SECRET_MODE)
                    .with_context(|| format!("ca.key {}", key.display()))?;
                write_atomic(cert, made.pem().as_bytes(), 0o644)
                    .with_context(|| format!("ca.cert {}", cert.display()))?;
                tracing::info!(cert = %cert.display(), "created the relay's device CA");
                Ok(Ca {
                    cert_der: made.der().to_vec(),
                    cert_pem: made.pem(),
                    issuer: Issuer::new(params, kp),
                })
            }
            (c, _) => Err(anyhow!(
                "only one of ca.cert {} and ca.key {} exists ({} is missing): restore it or \
                 remove both to make a new CA (every device must then enroll again)",
                cert.display(),
                key.display(),
                if c { "the key" } else { "the certificate" }
            )),
        }
    }

    /// Signs a device certificate for `device` with the CSR's key, valid
    /// for `lifetime`. Only the key is taken from the CSR.
    pub fn sign(&self, csr: &Csr, device: &str, lifetime: Duration) -> Result<Vec<u8>, String> {
        let spki = SubjectPublicKeyInfo::from_der(&csr.spki)
            .map_err(|e| format!("the CSR's public key is not supported: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let mut serial = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        // Slack for device clocks slightly behind the relay's: 5 minutes,
        // or a tenth of a short lifetime (renewal is a fraction of it).
        let slack = (lifetime / 10).min(Duration::from_secs(300));
        params.not_before = now - time::Duration::try_from(slack).unwrap_or_default();
        params.not_after = now + lifetime;
        params
            .signed_by(&spki, &self.issuer)
            .map(|c| c.der().to_vec())
            .map_err(|e| format!("cannot sign: {e}"))
    }
}
