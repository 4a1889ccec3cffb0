//! Local HTTP servers standing in for the object store the DMS's presigned
//! upload URLs point at: one that records PUTs, one that never answers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Upload {
    pub path_and_query: String,
    pub content_length: Option<u64>,
    pub body: Vec<u8>,
}

pub struct UploadSink {
    port: u16,
    uploads: Arc<Mutex<Vec<Upload>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UploadSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UploadSink {
    pub async fn start() -> UploadSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let uploads = Arc::new(Mutex::new(Vec::new()));
        let u = uploads.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let u = u.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let u = u.clone();
                            async move {
                                let path_and_query = req
                                    .uri()
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default();
                                let content_length = req
                                    .headers()
                                    .get("content-length")
                                    .and_then(|v| v.to_str().ok())
                                    .and_then(|v| v.parse().ok());
                                let ok = req.method() == hyper::Method::PUT;
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                if ok {
                                    u.lock().unwrap().push(Upload {
                                        path_and_query,
                                        content_length,
                                        body: body.to_vec(),
                                    });
                                }
                                let status = if ok { 200 } else { 405 };
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
        UploadSink {
            port,
            uploads,
            task,
        }
    }

    /// A presigned-looking URL on this sink.
    pub fn url(&self, name: &str) -> String {
        format!(
            "http://127.0.0.1:{}/bucket/{name}?X-Amz-Signature=secret-signature",
            self.port
        )
    }

    pub fn uploads(&self) -> Vec<Upload> {
        self.uploads.lock().unwrap().clone()
    }
}

/// Accepts connections and never answers (an upload that hangs).
pub struct Hanging {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hanging {
    pub async fn start() -> Hanging {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        Hanging { port, task }
    }
}

/// An https server (the test PKI's server certificate for 127.0.0.1) that
/// answers every request with `307 Temporary Redirect` to `location`: a
/// presigned https URL that sends the upload on to plain http.
pub struct TlsRedirect {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsRedirect {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsRedirect {
    pub async fn start(
        cert_pem: &std::path::Path,
        key_pem: &std::path::Path,
        location: String,
    ) -> TlsRedirect {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key_pem).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, location) = (acceptor.clone(), location.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |_req: hyper::Request<hyper::body::Incoming>| {
                            let location = location.clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .status(307)
                                        .header("Location", location)
                                        .body(Full::new(Bytes::new()))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsRedirect { port, task }
    }

    /// A presigned-looking https URL on this server.
    pub fn url(&self) -> String {
        format!(
            "https://127.0.0.1:{}/bucket/logs.txt?X-Amz-Signature=secret-signature",
            self.port
        )
    }
}
