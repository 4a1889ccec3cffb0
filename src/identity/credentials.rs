//! Credentials checked for use: PEM decoded, certificate and key parsed and
//! proven to belong together, broker address complete.

use super::wire::{Device, Enrollment, STATUS_ENROLLED};
use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// What the MQTT side needs to connect to the DMS.
#[derive(Clone)]
pub struct Credentials {
    /// The enrollment id: MQTT client id and the `{deviceId}` of topics.
    pub device_id: String,
    /// The organization's id in the identity service.
    pub org_id: String,
    /// The organization's name.
    pub org_name: String,
    /// The device as the identity service knows it (brand, model, serial).
    pub device: Device,
    /// The DMS's MQTT broker host.
    pub mqtt_host: String,
    /// The DMS's MQTT broker port.
    pub mqtt_port: u16,
    /// Client certificate chain (PEM).
    pub cert_pem: String,
    /// Client private key (PEM). Never logged (see the Debug impl).
    pub key_pem: String,
    /// The organization's root certificate (PEM): the trust root of the broker.
    pub root_ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("device_id", &self.device_id)
            .field("org_id", &self.org_id)
            .field("mqtt", &format!("{}:{}", self.mqtt_host, self.mqtt_port))
            .finish_non_exhaustive()
    }
}

/// Why an enrollment cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unusable(pub String);

fn bad(s: impl Into<String>) -> Unusable {
    Unusable(s.into())
}

impl Credentials {
    /// Checks an enrollment and extracts its credentials.
    pub fn from_enrollment(e: &Enrollment) -> Result<Arc<Credentials>, Unusable> {
        if e.status != STATUS_ENROLLED {
            return Err(bad(format!("status is {}, not 2 (enrolled)", e.status)));
        }
        crate::bus::topics::segment(&e.id)
            .map_err(|_| bad(format!("device id {:?} cannot be used in topics", e.id)))?;
        let cert_pem = decode_pem("credentials.certificate", &e.credentials.certificate)?;
        let key_pem = decode_pem("credentials.privateKey", &e.credentials.private_key)?;
        let root_ca_pem = decode_pem("organization.rootcert", &e.organization.rootcert)?;

        let chain = certs("credentials.certificate", &cert_pem)?;
        certs("organization.rootcert", &root_ca_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            bad(format!(
                "credentials.privateKey is not a PEM private key ({e})"
            ))
        })?;
        keys_match(chain, key)?;

        let mqtt_host = e.credentials.mqtt_url.trim().to_string();
        if mqtt_host.is_empty() || mqtt_host.contains('/') || mqtt_host.contains(' ') {
            return Err(bad(format!(
                "credentials.mqttUrl {:?} is not a host name",
                e.credentials.mqtt_url
            )));
        }
        let mqtt_port = e.credentials.mqtt_port.trim().parse::<u16>().map_err(|_| {
            bad(format!(
                "credentials.mqttPort {:?} is not a port number",
                e.credentials.mqtt_port
            ))
        })?;
        Ok(Arc::new(Credentials {
            device_id: e.id.clone(),
            org_id: e.organization.id.clone(),
            org_name: e.organization.name.clone(),
            device: e.device.clone(),
            mqtt_host,
            mqtt_port,
            cert_pem,
            key_pem,
            root_ca_pem,
        }))
    }
}

/// Decodes a base64 field whose content must be PEM text.
fn decode_pem(field: &str, b64: &str) -> Result<String, Unusable> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| bad(format!("{field} is not base64 ({e})")))?;
    let text = String::from_utf8(bytes).map_err(|_| bad(format!("{field} is not PEM text")))?;
    if !text.contains("-----BEGIN ") {
        return Err(bad(format!("{field} is not PEM")));
    }
    Ok(text)
}

fn certs(field: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, Unusable> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("{field} does not parse as PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(bad(format!("{field} holds no certificate")));
    }
    Ok(certs)
}

/// Proves the key belongs to the first certificate: rustls derives the
/// key's public half and compares it with the certificate's.
fn keys_match(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<(), Unusable> {
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad(format!("credentials.privateKey is not usable ({e})")))?;
    rustls::sign::CertifiedKey::new(chain, signing)
        .keys_match()
        .map_err(|e| {
            bad(format!(
                "credentials.privateKey does not belong to credentials.certificate ({e})"
            ))
        })
}

/// `deviceData` for `device-data.bin`: decoded when it is base64, else
/// kept as the raw text. It is whatever the operator registered (the
/// identity service's own tests use `abc`), and once the service answered
/// the device is enrolled there for good: refusing the answer would leave
/// it stuck ("already enrolled" on every later attempt).
pub fn device_data(e: &Enrollment) -> Result<Vec<u8>, Unusable> {
    let text = e.device_data.trim();
    match base64::engine::general_purpose::STANDARD.decode(text) {
        Ok(bytes) => Ok(bytes),
        Err(_) => {
            tracing::info!(
                bytes = text.len(),
                "deviceData is not base64; storing it as given"
            );
            Ok(text.as_bytes().to_vec())
        }
    }
}
