//! Provisioning as its users run it: a real `iot-relay` (its EST server and
//! admin API), real `iot-agent` processes with `provisioning.*` set, and
//! third-party EST clients (curl + openssl, strongSwan's `pki`).

use super::agent_proc::{run_once, AgentProcess};
use super::tls::TestPki;
use super::tunnel::{agent_env, api, Relay, TOKEN};
use std::path::Path;
use std::process::{Command, Output};

/// `POST /api/v2/otp` for `device` (form fields); panics unless 200.
pub fn issue_otp(relay: &Relay, device: &str, expiry: Option<&str>) -> String {
    let mut form = format!("device={device}");
    if let Some(e) = expiry {
        form.push_str(&format!("&expiry={e}"));
    }
    let (status, answer) = api(relay.api_port, "POST", "/api/v2/otp", Some(TOKEN), &form);
    assert_eq!(status, 200, "{answer}");
    answer["otp"].as_str().expect("otp").to_string()
}

/// The agent's settings for provisioning from `relay` as `device` with
/// `otp`, the tunnel on with no `tunnel.cert` (so it uses what is
/// provisioned); `extra` adds or overrides.
pub fn provisioned_env(
    pki: &TestPki,
    dir: &Path,
    relay: &Relay,
    device: &str,
    otp: &str,
    allow: &[&str],
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut more: Vec<(&'static str, String)> = vec![
        ("IOT_AGENT_TUNNEL__CERT", String::new()),
        ("IOT_AGENT_TUNNEL__KEY", String::new()),
        (
            "IOT_AGENT_PROVISIONING__URL",
            format!("https://localhost:{}", relay.est_port),
        ),
        (
            "IOT_AGENT_PROVISIONING__CA",
            pki.ca_cert.display().to_string(),
        ),
        ("IOT_AGENT_PROVISIONING__DEVICE", device.to_string()),
        ("IOT_AGENT_PROVISIONING__OTP", otp.to_string()),
    ];
    for (k, v) in extra {
        more.retain(|(key, _)| key != k);
        more.push((k, v.clone()));
    }
    agent_env(pki, dir, relay.agents_port, allow, &more)
}

/// `iot-agent provisioning status --json` with `env`.
pub fn status(env: &[(&'static str, String)]) -> serde_json::Value {
    let out = run_once(&["provisioning", "status", "--json"], env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// Starts an agent with `env`.
pub fn start(env: &[(&'static str, String)]) -> AgentProcess {
    AgentProcess::start(env)
}

/// Runs a shell command line (curl, openssl, pki) in `dir`.
pub fn sh(dir: &Path, script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("cannot run sh")
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Every byte of every file under `dir` (to look for a secret).
pub fn all_files_contain(dir: &Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                if b.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(p.display().to_string());
                }
            }
        }
    }
    hits
}

/// Makes the relay log a line now, and waits for it: every line it logged
/// before has then been read (one pipe, in order).
pub fn sync_relay_log(relay: &mut Relay) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", relay.est_port)).unwrap();
    let _ = s.write_all(b"not TLS\r\n\r\n");
    drop(s);
    relay.proc.wait_for("EST TLS handshake failed");
}

/// A minimal EST server of another make: it answers `cacerts` and
/// `simpleenroll` with base64 wrapped at 64 columns and CRLF (as some
/// servers do), signing with a CA of its own in `dir`. Returns its port.
pub fn wrapping_est_server(pki: &TestPki, dir: &Path) -> u16 {
    use http_body_util::{BodyExt, Full};
    use iot_agent::relay::ca::{parse_csr, Ca};
    use std::sync::Arc;
    let ca = Arc::new(
        Ca::load_or_create(&dir.join("double-ca.pem"), &dir.join("double-ca.key")).unwrap(),
    );
    let tls = iot_agent::tls::server_config(
        &std::fs::read_to_string(&pki.server_cert).unwrap(),
        &std::fs::read_to_string(&pki.server_key).unwrap(),
        None,
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let wrap = |der: &[u8]| -> bytes::Bytes {
        let flat = iot_agent::est::encode_base64(der);
        let lines: Vec<&str> = flat
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        bytes::Bytes::from(lines.join("\r\n") + "\r\n")
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, ca) = (acceptor.clone(), ca.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let ca = ca.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let der = if path.ends_with("/cacerts") {
                                    iot_agent::est::certs_only(std::slice::from_ref(&ca.cert_der))
                                        .unwrap()
                                } else {
                                    let csr =
                                        parse_csr(&iot_agent::est::decode_base64(&body).unwrap())
                                            .unwrap();
                                    let cn = csr.common_name.clone().unwrap();
                                    let cert = ca
                                        .sign(&csr, &cn, std::time::Duration::from_secs(3600))
                                        .unwrap();
                                    iot_agent::est::certs_only(&[cert]).unwrap()
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .header("content-type", iot_agent::est::CERTS_ONLY)
                                        .header("content-transfer-encoding", "base64")
                                        .body(Full::new(wrap(&der)))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    port
}
