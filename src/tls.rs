//! The project's one TLS builder: trusted roots (a file, inline PEM, the
//! system store), an optional client certificate, and the verification
//! mode. Every TLS client of the agent (the DMS broker, the identity
//! service, the export upstream, the tunnel) and every TLS server of the
//! relay ([`server_config`]: the agents' port with client certificates
//! required, the mapping API) is built here, so "TLS verified always" is
//! decided in one place.
//!
//! Two modes, never a skip:
//! - [`Verify::Full`]: webpki's chain verification and the host name;
//! - [`Verify::Chain`]: the same chain verification, with only a host-name
//!   mismatch accepted. The reference deployment's broker certificate has
//!   `CN=mqtt` and no subjectAltName, which no host-name check can pass.
//!
//! A certificate that does not verify is refused with an error that says
//! what the server presented and which configuration key would fix it.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// How a server certificate is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verify {
    /// The chain to a trusted root and the host name.
    #[default]
    Full,
    /// The chain to a trusted root; the host name is not checked.
    Chain,
}

impl Verify {
    /// The name `snap set` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Verify::Full => "full",
            Verify::Chain => "chain",
        }
    }
}

/// Why a TLS configuration cannot be built; each names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// The text is not PEM certificates.
    #[error("{what} is not PEM certificate text: {detail}")]
    NotPem {
        /// The key or file.
        what: String,
        /// Why.
        detail: String,
    },
    /// No certificate in it.
    #[error("{what} holds no certificate")]
    Empty {
        /// The key or file.
        what: String,
    },
    /// The file cannot be read.
    #[error("cannot read {what} {path}: {detail}")]
    Read {
        /// The key.
        what: String,
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// A certificate rustls does not accept as a root.
    #[error("{what} cannot be a trust root: {detail}")]
    BadRoot {
        /// The key or file.
        what: String,
        /// Why.
        detail: String,
    },
    /// The client certificate does not match its key, or is unusable.
    #[error("the client certificate and key cannot be used: {0}")]
    ClientCert(String),
    /// No root to verify against.
    #[error("no trusted root certificate for {0}")]
    NoRoots(String),
    /// rustls refused the configuration.
    #[error("cannot build the TLS configuration: {0}")]
    Build(String),
}

impl TlsError {
    /// The cause alone, for a caller whose own message already names the
    /// file (`cannot read identity.ca /x: <this>`).
    pub fn detail(&self) -> String {
        match self {
            TlsError::Read { detail, .. } => detail.clone(),
            other => other.to_string(),
        }
    }
}

/// Parses PEM certificate text; `what` names its source in errors.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::NotPem {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// The trust anchors of one client.
#[derive(Debug, Clone)]
pub struct Roots {
    store: rustls::RootCertStore,
}

impl Default for Roots {
    fn default() -> Self {
        Self::new()
    }
}

impl Roots {
    /// No roots yet.
    pub fn new() -> Self {
        Roots {
            store: rustls::RootCertStore::empty(),
        }
    }

    /// Adds every certificate in PEM text. A leaf certificate is accepted
    /// as an anchor too (the organization certificate of an enrollment is
    /// one): webpki anchors on subject and key, not on the CA flag.
    pub fn pem(mut self, pem: &str, what: &str) -> Result<Self, TlsError> {
        for cert in certs_from_pem(pem, what)? {
            self.store.add(cert).map_err(|e| TlsError::BadRoot {
                what: what.to_string(),
                detail: e.to_string(),
            })?;
        }
        Ok(self)
    }

    /// Adds every certificate in a PEM file.
    pub fn file(self, path: &Path, what: &str) -> Result<Self, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|e| TlsError::Read {
            what: what.to_string(),
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        self.pem(&text, &format!("{what} ({})", path.display()))
    }

    /// Adds a configured PEM value (a path or the text itself).
    pub fn source(self, src: &crate::config::PemSource, what: &str) -> Result<Self, TlsError> {
        match src {
            crate::config::PemSource::None => Ok(self),
            crate::config::PemSource::Inline(text) => self.pem(text, what),
            crate::config::PemSource::File(p) => self.file(p.path(), what),
        }
    }

    /// Adds the system's trusted roots (unreadable ones are skipped).
    pub fn system(mut self) -> Self {
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = self.store.add(cert);
        }
        self
    }

    /// Whether no root was added.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

/// Which configuration keys fix a refused server certificate, for the
/// error message.
#[derive(Debug, Clone, Copy)]
pub struct Advice {
    /// What the server is, e.g. "the DMS broker".
    pub peer: &'static str,
    /// The key that adds a trusted CA, e.g. `dms.ca`.
    pub ca_key: &'static str,
    /// The key that selects [`Verify`], when the client has one.
    pub verify_key: Option<&'static str>,
}

/// A client certificate chain and its key, as PEM text.
pub struct ClientCert<'a> {
    /// The certificate chain.
    pub cert_pem: &'a str,
    /// Its key.
    pub key_pem: &'a str,
}

/// Builds a rustls client configuration (ring provider).
pub fn client_config(
    roots: Roots,
    client: Option<ClientCert<'_>>,
    verify: Verify,
    advice: Advice,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots(format!(
            "{}; set {}",
            advice.peer, advice.ca_key
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Verifier::new(roots, provider.clone(), verify, advice)?);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Build(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    with_client(builder, client)
}

/// Reads a PEM file (a certificate chain or a key) for a builder below;
/// `what` names the configuration key in the error.
pub fn read_pem(path: &Path, what: &str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Read {
        what: what.to_string(),
        path: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// Builds a rustls server configuration (ring provider) from a certificate
/// chain and its key. With `client_roots`, every client must present a
/// certificate that chains to one of them (mutual TLS: the relay's agents'
/// port); without, none is asked for (the mapping API, which has a token).
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_roots: Option<Roots>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let auth = match client_roots {
        None => ClientAuth::None,
        Some(r) => ClientAuth::Required(r),
    };
    server_config_with(cert_pem, key_pem, auth)
}

/// What a server asks of its clients' certificates.
pub enum ClientAuth {
    /// None asked for.
    None,
    /// Required, chaining to these roots.
    Required(Roots),
    /// Asked for and verified against these roots when presented, but a
    /// client may present none (the EST server: first enrollment has only
    /// a password, re-enrollment the certificate being renewed).
    Optional(Roots),
}

/// [`server_config`] with the client-certificate policy spelt out.
pub fn server_config_with(
    cert_pem: &str,
    key_pem: &str,
    auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Build(e.to_string()))?;
    let (roots, optional) = match auth {
        ClientAuth::None => (None, false),
        ClientAuth::Required(r) => (Some(r), false),
        ClientAuth::Optional(r) => (Some(r), true),
    };
    let builder = match roots {
        None => builder.with_no_client_auth(),
        Some(roots) if roots.is_empty() => {
            return Err(TlsError::NoRoots("the clients' certificates".into()))
        }
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots.store),
                provider,
            );
            let verifier = if optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Build(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = certs_from_pem(cert_pem, "the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Build(format!("server key: {e}")))?;
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Build(format!("server certificate and key: {e}")))?;
    Ok(Arc::new(config))
}

/// The SHA-256 of a DER certificate (what a `sha256:` pin names).
pub fn cert_sha256(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A client configuration that trusts exactly one server certificate, by
/// the SHA-256 of its DER (`provisioning.ca=sha256:...`): bootstrapping
/// trust before the CA bundle is known. It is a real verifier: the
/// certificate must be the pinned one and within its validity dates, and
/// the handshake must be signed by its key; nothing else is trusted.
pub fn pinned_client_config(
    pin: [u8; 32],
    client: Option<ClientCert<'_>>,
    advice: Advice,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        pin,
        algorithms: provider.signature_verification_algorithms,
        advice,
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Build(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    with_client(builder, client)
}

fn with_client(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    client: Option<ClientCert<'_>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let chain = certs_from_pem(c.cert_pem, "the client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
                .map_err(|e| TlsError::ClientCert(format!("client key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::ClientCert(e.to_string()))?
        }
    };
    Ok(Arc::new(config))
}

/// The pin verifier of [`pinned_client_config`].
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
    advice: Advice,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use subtle::ConstantTimeEq;
        use x509_parser::prelude::{FromDer, X509Certificate};
        let got = cert_sha256(end_entity.as_ref());
        let fail = |why: String| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                PinRefused(why),
            ))))
        };
        if !bool::from(got.ct_eq(&self.pin)) {
            return Err(fail(format!(
                "{} presented a certificate with SHA-256 {} ({}), not the pinned {}; set {} to \
                 sha256:<the server certificate's SHA-256> or to its CA certificate",
                self.advice.peer,
                hex(&got),
                describe(end_entity),
                hex(&self.pin),
                self.advice.ca_key
            )));
        }
        let (_, cert) = X509Certificate::from_der(end_entity.as_ref()).map_err(|_| {
            fail(format!(
                "{} presented an unreadable certificate",
                self.advice.peer
            ))
        })?;
        let at = x509_parser::time::ASN1Time::from_timestamp(now.as_secs() as i64)
            .map_err(|_| fail("the device clock is out of range".into()))?;
        if !cert.validity().is_valid_at(at) {
            return Err(fail(format!(
                "{} presented the pinned certificate outside its validity ({}); renew it or \
                 check the device clock",
                self.advice.peer,
                describe(end_entity)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A refused pinned certificate (rustls shows `Other` errors with `{:?}`).
struct PinRefused(String);

impl std::fmt::Display for PinRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for PinRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinRefused {}

/// The channel binding of a TLS 1.3 connection, base64 (RFC 9266:
/// `tls-exporter`, label `EXPORTER-Channel-Binding`, no context, 32 bytes):
/// EST binds a CSR to the connection that carries it with it. `None` on
/// TLS 1.2, where rustls offers no tls-unique.
pub fn channel_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Option<String> {
    if conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return None;
    }
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, b"EXPORTER-Channel-Binding", None)
        .ok()?;
    use base64::Engine;
    Some(base64::engine::general_purpose::STANDARD.encode(out))
}

/// The subject's common name of a DER certificate (a device certificate
/// names the device there), if it has one.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// When a DER certificate stops being valid (`notAfter`, Unix seconds).
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// webpki's verifier, with the host-name mismatch accepted in chain mode
/// and refusals explained.
#[derive(Debug)]
struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    verify: Verify,
    advice: Advice,
}

impl Verifier {
    fn new(
        roots: Roots,
        provider: Arc<rustls::crypto::CryptoProvider>,
        verify: Verify,
        advice: Advice,
    ) -> Result<Verifier, TlsError> {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots.store), provider)
            .build()
            .map_err(|e| TlsError::Build(e.to_string()))?;
        Ok(Verifier {
            inner,
            verify,
            advice,
        })
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (and validity dates) first and the name
        // last, so a name error means everything else verified.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.verify == Verify::Chain => Ok(ServerCertVerified::assertion()),
            Err(rustls::Error::InvalidCertificate(cause)) => {
                let refused = Refused {
                    advice: self.advice,
                    server_name: server_name.to_str().into_owned(),
                    presented: describe(end_entity),
                    cause,
                };
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(refused)),
                )))
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A refused server certificate: what was presented, why, what to set.
struct Refused {
    advice: Advice,
    server_name: String,
    presented: String,
    cause: CertificateError,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = &self.advice;
        write!(
            f,
            "{} presented a certificate that does not verify ({}): ",
            a.peer, self.presented
        )?;
        match &self.cause {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => write!(
                f,
                "it is not signed by a trusted root; set {} to the CA certificate that signs it (a file path or the PEM text)",
                a.ca_key
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                write!(f, "it is not valid for the name {:?}", self.server_name)?;
                match a.verify_key {
                    Some(k) => write!(
                        f,
                        "; set {k}=chain to accept a certificate without that name (such as CN=mqtt without subjectAltName), or connect by a name it carries"
                    ),
                    None => write!(f, "; connect by a name the certificate carries"),
                }
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => write!(
                f,
                "it has expired; renew the server's certificate (or check the device clock)"
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => write!(
                f,
                "it is not valid yet; check the device clock"
            ),
            other => write!(f, "{other:?}; check the server's certificate and {}", a.ca_key),
        }
    }
}

/// rustls shows an `Other` certificate error with `{:?}`: the message.
impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Refused {}

/// `subject ..., issuer ..., names ...` of a DER certificate, for messages.
fn describe(der: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else {
        return "an unreadable certificate".into();
    };
    let names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => Some(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string()),
                        _ => Some(format!("{ip:02x?}")),
                    },
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let names = if names.is_empty() {
        "no subjectAltName".to_string()
    } else {
        format!("subjectAltName {}", names.join(", "))
    };
    format!(
        "subject {}, issuer {}, {names}, valid until {}",
        cert.subject(),
        cert.issuer(),
        cert.validity().not_after
    )
}

/// The DMS broker: the enrollment's client certificate; trusted roots
/// `dms.ca` (when set) and the organization certificate of the enrollment.
pub fn dms_broker(
    creds: &crate::identity::Credentials,
    ca: &crate::config::PemSource,
    verify: Verify,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let roots = Roots::new()
        .source(ca, "dms.ca")?
        .pem(&creds.root_ca_pem, "the organization certificate")?;
    client_config(
        roots,
        Some(ClientCert {
            cert_pem: &creds.cert_pem,
            key_pem: &creds.key_pem,
        }),
        verify,
        Advice {
            peer: "the DMS broker",
            ca_key: "dms.ca",
            verify_key: Some("dms.verify"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    /// A CA `CN=mqtt` and a server certificate `CN=mqtt` without SAN
    /// signed by it (the reference broker); `expired` dates it in the past.
    fn reference_pki(expired: bool) -> (String, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name.push(DnType::CommonName, "mqtt");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(Vec::<String>::new()).unwrap();
        server.distinguished_name.push(DnType::CommonName, "mqtt");
        if expired {
            let now = time::OffsetDateTime::now_utc();
            server.not_before = now - time::Duration::days(30);
            server.not_after = now - time::Duration::days(1);
        }
        let cert = server.signed_by(&key, &issuer).unwrap();
        (ca_pem, cert.der().clone())
    }

    fn verify(ca_pem: &str, cert: &CertificateDer<'_>, mode: Verify) -> Result<(), String> {
        let verifier = Verifier::new(
            Roots::new().pem(ca_pem, "test CA").unwrap(),
            Arc::new(rustls::crypto::ring::default_provider()),
            mode,
            Advice {
                peer: "the DMS broker",
                ca_key: "dms.ca",
                verify_key: Some("dms.verify"),
            },
        )
        .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        verifier
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn chain_mode_accepts_only_the_missing_host_name() {
        let (ca, cert) = reference_pki(false);
        assert_eq!(verify(&ca, &cert, Verify::Chain), Ok(()));
        let full = verify(&ca, &cert, Verify::Full).unwrap_err();
        assert!(full.contains("set dms.verify=chain"), "{full}");
        assert!(
            full.contains("CN=mqtt") && full.contains("no subjectAltName"),
            "{full}"
        );

        let (other_ca, _) = reference_pki(false);
        let foreign = verify(&other_ca, &cert, Verify::Chain).unwrap_err();
        assert!(foreign.contains("set dms.ca"), "{foreign}");

        let (ca, old) = reference_pki(true);
        let expired = verify(&ca, &old, Verify::Chain).unwrap_err();
        assert!(expired.contains("expired"), "{expired}");
    }

    #[test]
    fn a_pin_accepts_only_its_certificate_within_its_dates() {
        let advice = Advice {
            peer: "the EST server",
            ca_key: "provisioning.ca",
            verify_key: None,
        };
        let (_, cert) = reference_pki(false);
        let (_, other) = reference_pki(false);
        let (_, old) = reference_pki(true);
        let check = |pin: [u8; 32], c: &CertificateDer<'_>| {
            let v = Pinned {
                pin,
                algorithms: rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms,
                advice,
            };
            let name = ServerName::try_from("localhost").unwrap();
            v.verify_server_cert(c, &[], &name, &[], UnixTime::now())
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert_eq!(check(cert_sha256(cert.as_ref()), &cert), Ok(()));
        let e = check(cert_sha256(cert.as_ref()), &other).unwrap_err();
        assert!(
            e.contains("not the pinned") && e.contains("provisioning.ca"),
            "{e}"
        );
        let e = check(cert_sha256(old.as_ref()), &old).unwrap_err();
        assert!(e.contains("outside its validity"), "{e}");
        assert!(pinned_client_config([0; 32], None, advice).is_ok());
    }

    #[test]
    fn no_roots_and_bad_pem_are_refused_with_the_key() {
        let e = client_config(
            Roots::new(),
            None,
            Verify::Full,
            Advice {
                peer: "the DMS broker",
                ca_key: "dms.ca",
                verify_key: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("set dms.ca"), "{e}");
        let e = Roots::new()
            .pem(
                "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
                "dms.ca",
            )
            .unwrap_err();
        assert!(e.to_string().contains("dms.ca is not PEM"), "{e}");
    }
}
