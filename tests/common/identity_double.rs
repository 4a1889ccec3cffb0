//! A double of the IoT Identity service (the Go service cannot run here),
//! following `shared/spec/identity.md` to the letter: `POST
//! /v1/device/enroll` with `Content-Type: application/x.ubuntu.assertion`
//! and a body of the model and serial assertions; an answer whose byte
//! fields are base64 of PEM, with the organization's private key under the
//! JSON key `"-"` as older servers send it; 400 `{"code","message"}`
//! errors. Served over plain HTTP or TLS (the test PKI's server cert).

use super::tls::TestPki;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// The organization private key the double leaks under `"-"`: it must
/// never appear in the agent's files or logs.
pub const ORG_PRIVATE_KEY_MARKER: &str = "ORG-PRIVATE-KEY-DO-NOT-STORE";
pub const DEVICE_ID: &str = "d3v1ce-0001";
pub const ORG_ID: &str = "org-42";

/// What the double answers next.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Status 2 with working credentials.
    Enroll,
    /// A 200 answer with this enrollment status (1 waiting, 3 disabled).
    Status(i64),
    /// HTTP 400 `{"code":"EnrollDevice","message":..}`.
    Refuse(String),
    /// HTTP 503.
    ServerError,
    /// Waits this long, then enrolls.
    Slow(Duration),
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// Status 2, but the key does not belong to the certificate.
    WrongKey,
    /// Status 2 with this `deviceData`, as the operator registered it (the
    /// service's own tests use `abc`, which is not base64).
    DeviceData(String),
}

#[derive(Debug, Clone)]
pub struct Call {
    pub content_type: String,
    pub body: String,
}

struct Shared {
    behaviour: Behaviour,
    calls: Vec<Call>,
    mqtt_port: u16,
}

pub struct IdentityDouble {
    url: String,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
    pub pki: Arc<TestPki>,
}

impl Drop for IdentityDouble {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IdentityDouble {
    /// Starts on a free loopback port; `tls` serves HTTPS with the PKI's
    /// server certificate (for `localhost`).
    pub async fn start(tls: bool) -> IdentityDouble {
        Self::start_with(tls, Arc::new(TestPki::new("identity-double")), 8883).await
    }

    /// Hands out credentials from `pki` (whose CA is the organization
    /// root) for a broker on `localhost:mqtt_port`: the PKI of a test
    /// mosquitto makes an enrolled agent able to connect to it.
    pub async fn start_with(tls: bool, pki: Arc<TestPki>, mqtt_port: u16) -> IdentityDouble {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared {
            behaviour: Behaviour::Enroll,
            calls: Vec::new(),
            mqtt_port,
        }));
        let acceptor = tls.then(|| tls_acceptor(&pki));
        let (s, p) = (shared.clone(), pki.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (s, p, acceptor) = (s.clone(), p.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (s, p) = (s.clone(), p.clone());
                        async move { Ok::<_, std::convert::Infallible>(handle(req, s, p).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(a) => {
                            if let Ok(stream) = a.accept(tcp).await {
                                let io = hyper_util::rt::TokioIo::new(stream);
                                let _ = http.serve_connection(io, svc).await;
                            }
                        }
                        None => {
                            let io = hyper_util::rt::TokioIo::new(tcp);
                            let _ = http.serve_connection(io, svc).await;
                        }
                    }
                });
            }
        });
        let scheme = if tls {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        IdentityDouble {
            url: format!("{scheme}:{port}"),
            shared,
            task,
            pki,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn set(&self, b: Behaviour) {
        self.shared.lock().unwrap().behaviour = b;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.lock().unwrap().calls.clone()
    }
}

fn tls_acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .unwrap()
}

fn refuse(message: &str) -> Response<Full<Bytes>> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"code": "EnrollDevice", "message": message}),
    )
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    shared: Arc<Mutex<Shared>>,
    pki: Arc<TestPki>,
) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/device/enroll" {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"code": "NotFound", "message": "not found"}),
        );
    }
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body).into_owned();
    let (behaviour, mqtt_port) = {
        let mut s = shared.lock().unwrap();
        s.calls.push(Call {
            content_type: content_type.clone(),
            body: body.clone(),
        });
        (s.behaviour.clone(), s.mqtt_port)
    };
    if content_type != "application/x.ubuntu.assertion" {
        return refuse("invalid content type");
    }
    // The service reads brand, model, serial and device key from the assertions.
    let assertions = match iot_agent::snapd::Assertion::parse_all(&body) {
        Ok(a) => a,
        Err(e) => return refuse(&format!("cannot decode assertions: {e}")),
    };
    // The service decodes the stream and refuses anything past the model
    // and the serial (iot-identity web/device_test.go req4).
    if assertions.len() > 2 {
        return refuse("unexpected assertion in the request stream");
    }
    let model = assertions.iter().find(|a| a.kind() == "model");
    let serial = assertions.iter().find(|a| a.kind() == "serial");
    let (Some(model), Some(serial)) = (model, serial) else {
        return refuse("the model and serial assertions are both required");
    };
    let device = serde_json::json!({
        "brand": model.header("brand-id").unwrap_or_default(),
        "model": model.header("model").unwrap_or_default(),
        "serial": serial.header("serial").unwrap_or_default(),
        "store": model.header("store").unwrap_or_default(),
        "deviceKey": serial.header("device-key").unwrap_or_default(),
    });
    let status = match behaviour {
        Behaviour::Enroll | Behaviour::WrongKey | Behaviour::DeviceData(_) => 2,
        Behaviour::Status(s) => s,
        Behaviour::Refuse(m) => return refuse(&m),
        Behaviour::ServerError => {
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"code": "Unavailable", "message": "database is down"}),
            )
        }
        Behaviour::Slow(d) => {
            tokio::time::sleep(d).await;
            2
        }
        Behaviour::Garbage => {
            return Response::builder()
                .status(200)
                .header("Content-Type", "application/json")
                .body(Full::new(Bytes::from_static(b"<html>proxy error</html>")))
                .unwrap()
        }
    };
    let (cert, mut key) = pki.issue_client(DEVICE_ID);
    if matches!(behaviour, Behaviour::WrongKey) {
        key = pki.issue_client(DEVICE_ID).1;
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "code": "",
            "message": "",
            "enrollment": {
                "id": DEVICE_ID,
                "status": status,
                "deviceData": match &behaviour {
                    Behaviour::DeviceData(d) => d.clone(),
                    _ => b64("opaque device data"),
                },
                "device": device,
                "credentials": {
                    "privateKey": b64(&key),
                    "certificate": b64(&cert),
                    "mqttUrl": "localhost",
                    "mqttPort": mqtt_port.to_string(),
                },
                "organization": {
                    "id": ORG_ID,
                    "name": "Example Org",
                    "rootcert": b64(&pki.org_pem),
                    "-": ORG_PRIVATE_KEY_MARKER,
                },
                "-": ORG_PRIVATE_KEY_MARKER,
            }
        }),
    )
}
