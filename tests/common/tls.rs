//! A throw-away PKI per test: one CA, a server certificate for `localhost`
//! and `127.0.0.1`, and client certificates whose CN is the device identity
//! (Mosquitto's `use_identity_as_username` turns that CN into the MQTT user).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// Certificates and keys written as PEM files into `dir`, which is removed
/// when the value is dropped. The PEM texts the agent is likely to take as
/// configuration values are kept as strings too.
pub struct TestPki {
    pub dir: TempDir,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    /// What the identity double hands out as the organization certificate
    /// (`rootcert`): the CA itself in the default layout, a leaf signed by
    /// the CA in the reference layout.
    pub org_pem: String,
    /// Kept so more client certificates can be issued later.
    issuer: Issuer<'static, KeyPair>,
}

/// How the PKI is laid out.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// As the reference deployment (iot-identity's `ca.crt` and the
    /// broker certificate it makes): the CA has `CN=mqtt`, the server
    /// certificate `CN=mqtt` and no subjectAltName, the organization
    /// certificate is a leaf signed by the CA.
    pub reference: bool,
    /// The server certificate expired yesterday.
    pub expired_server: bool,
}

impl TestPki {
    /// Makes a CA, a server certificate and a client certificate with
    /// CN = `client_cn`. Panics with a clear message if generation fails:
    /// nothing sensible can be tested without the PKI.
    pub fn new(client_cn: &str) -> TestPki {
        Self::with_layout(client_cn, Layout::default())
    }

    /// The PKI of a reference deployment (see [`Layout::reference`]).
    pub fn reference(client_cn: &str) -> TestPki {
        Self::with_layout(
            client_cn,
            Layout {
                reference: true,
                ..Layout::default()
            },
        )
    }

    pub fn with_layout(client_cn: &str, layout: Layout) -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("iot-agent-pki-")
            .tempdir()
            .expect("cannot create a temp dir for the test PKI");

        let ca_key = KeyPair::generate().expect("cannot generate the CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.distinguished_name.push(
            DnType::CommonName,
            if layout.reference {
                "mqtt"
            } else {
                "iot-agent test CA"
            },
        );
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .expect("cannot self-sign the CA certificate");
        let ca_pem = ca_cert.pem();
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("cannot generate the server key");
        let (names, cn) = if layout.reference {
            (Vec::new(), "mqtt")
        } else {
            (
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
                "localhost",
            )
        };
        let mut server_params = CertificateParams::new(names).expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, cn);
        if layout.expired_server {
            let now = time::OffsetDateTime::now_utc();
            server_params.not_before = now - time::Duration::days(30);
            server_params.not_after = now - time::Duration::days(1);
        }
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server_params.use_authority_key_identifier_extension = true;
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("cannot sign the server certificate");

        let mut pki = TestPki {
            ca_cert: dir.path().join("ca.crt"),
            ca_key: dir.path().join("ca.key"),
            server_cert: dir.path().join("server.crt"),
            server_key: dir.path().join("server.key"),
            client_cert: dir.path().join("client.crt"),
            client_key: dir.path().join("client.key"),
            dir,
            ca_pem,
            client_cert_pem: String::new(),
            client_key_pem: String::new(),
            org_pem: String::new(),
            issuer,
        };
        pki.org_pem = if layout.reference {
            pki.issue_client("Example Org").0
        } else {
            pki.ca_pem.clone()
        };
        let (client_cert_pem, client_key_pem) = pki.issue_client(client_cn);
        write(&pki.ca_cert, &pki.ca_pem);
        write(&pki.ca_key, &ca_key_pem);
        write(&pki.server_cert, &server_cert.pem());
        write(&pki.server_key, &server_key.serialize_pem());
        write(&pki.client_cert, &client_cert_pem);
        write(&pki.client_key, &client_key_pem);
        pki.client_cert_pem = client_cert_pem;
        pki.client_key_pem = client_key_pem;
        pki
    }

    /// Issues another client certificate (CN = `cn`, client-auth EKU) from
    /// the same CA; returns `(cert_pem, key_pem)`. Nothing is written to disk.
    pub fn issue_client(&self, cn: &str) -> (String, String) {
        let key = KeyPair::generate().expect("cannot generate a client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("cannot sign a client certificate for {cn:?}: {e}"));
        (cert.pem(), key.serialize_pem())
    }

    /// Writes PEM text into the PKI dir (e.g. an extra client's cert for a
    /// CLI tool) and returns its path.
    pub fn write_file(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        write(&path, pem);
        path
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
