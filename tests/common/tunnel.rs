//! The tunnel as its users run it: a real `iot-relay` process, real
//! `iot-agent` processes with the tunnel on, a device-local echo service
//! and a tiny HTTP page, and a client of the mapping API.

use super::agent_proc::AgentProcess;
use super::servers::free_port;
use super::tls::TestPki;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub const RELAY_BIN: &str = env!("CARGO_BIN_EXE_iot-relay");
pub const TOKEN: &str = "test-token-0123456789";
pub const DEVICE: &str = "device-1";

/// `iot-relay <args>` with a clean environment.
pub fn relay_command(args: &[&str], envs: &[(&str, String)]) -> Command {
    let mut c = Command::new(RELAY_BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

/// A running relay and what it was started with.
pub struct Relay {
    pub proc: AgentProcess,
    pub agents_port: u16,
    pub api_port: u16,
    /// The EST server's HTTPS port (`est.listen`).
    pub est_port: u16,
    pub ports: Vec<u16>,
    pub dir: PathBuf,
    pub env: Vec<(&'static str, String)>,
}

impl Relay {
    /// [`Relay::start_with`] with no extra settings.
    pub fn start(pki: &TestPki, dir: &std::path::Path, pipes: usize) -> Relay {
        Relay::start_with(pki, dir, pipes, &[])
    }

    /// [`Relay::start_closed`] with settings added or overridden
    /// (`est.defer`...), then its accept filter set to take [`DEVICE`] (a
    /// relay takes no agent by default).
    pub fn start_with(
        pki: &TestPki,
        dir: &std::path::Path,
        pipes: usize,
        extra: &[(&'static str, String)],
    ) -> Relay {
        let relay = Relay::start_closed(pki, dir, pipes, extra);
        relay.accept(&serde_json::json!({ "deviceIds": [DEVICE] }));
        relay
    }

    /// `PUT /api/v2/accept-filter`, which must succeed.
    pub fn accept(&self, filter: &serde_json::Value) {
        let (status, answer) = self.admin("PUT", "/api/v2/accept-filter", Some(filter));
        assert_eq!(status, 200, "{answer}");
    }

    /// A request to the admin API with a JSON body: (status, answer).
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        api_raw(
            self.api_port,
            method,
            path,
            Some(TOKEN),
            "application/json",
            &body.map(|b| b.to_string()).unwrap_or_default(),
        )
    }

    /// Starts a relay with the PKI's server certificate, trusting its CA
    /// for device certificates, the API in plain HTTP (`dev=true`), and
    /// `pipes` free pipe ports; its database in `dir`; the accept filter as the
    /// relay has it (none: it takes no agent). `extra` adds settings.
    pub fn start_closed(
        pki: &TestPki,
        dir: &std::path::Path,
        pipes: usize,
        extra: &[(&'static str, String)],
    ) -> Relay {
        let agents_port = free_port();
        let est_port = free_port();
        let api_port = free_port();
        let ports: Vec<u16> = (0..pipes).map(|_| free_port()).collect();
        let list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let env = vec![
            (
                "IOT_RELAY_AGENTS__LISTEN",
                format!("127.0.0.1:{agents_port}"),
            ),
            (
                "IOT_RELAY_AGENTS__CERT",
                pki.server_cert.display().to_string(),
            ),
            (
                "IOT_RELAY_AGENTS__KEY",
                pki.server_key.display().to_string(),
            ),
            ("IOT_RELAY_AGENTS__CA", pki.ca_cert.display().to_string()),
            ("IOT_RELAY_AGENTS__HEARTBEAT", "200ms".into()),
            ("IOT_RELAY_AGENTS__THRESHOLD", "1s".into()),
            ("IOT_RELAY_API__LISTEN", format!("127.0.0.1:{api_port}")),
            ("IOT_RELAY_API__TOKEN", TOKEN.into()),
            ("IOT_RELAY_DEV", "true".into()),
            ("IOT_RELAY_PIPES__BIND", "127.0.0.1".into()),
            ("IOT_RELAY_PIPES__PORTS", list),
            // The relay's database, and the JSON files of earlier relays it
            // would import (in the test's dir: never the host's).
            ("IOT_RELAY_DB", dir.join("relay.db").display().to_string()),
            (
                "IOT_RELAY_STATE",
                dir.join("mappings.json").display().to_string(),
            ),
            (
                "IOT_RELAY_REGISTRY",
                dir.join("registry.json").display().to_string(),
            ),
            ("IOT_RELAY_LOG__LEVEL", "info,iot_agent=debug".into()),
            // The relay's own CA, OTP store and EST port, in the test's dir.
            (
                "IOT_RELAY_CA__CERT",
                dir.join("ca/ca.pem").display().to_string(),
            ),
            (
                "IOT_RELAY_CA__KEY",
                dir.join("ca/ca.key").display().to_string(),
            ),
            (
                "IOT_RELAY_OTP__STATE",
                dir.join("otps.json").display().to_string(),
            ),
            ("IOT_RELAY_EST__LISTEN", format!("127.0.0.1:{est_port}")),
        ];
        let mut env = env;
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push((k, v.clone()));
        }
        let mut relay = Relay {
            proc: AgentProcess::spawn(relay_command(&["run"], &env)),
            agents_port,
            api_port,
            est_port,
            ports,
            dir: dir.to_path_buf(),
            env,
        };
        relay.proc.wait_for("iot-relay running");
        relay
    }

    /// Starts the relay again with the same settings (after a kill).
    pub fn restart(&mut self) {
        self.proc = AgentProcess::spawn(relay_command(&["run"], &self.env));
        self.proc.wait_for("iot-relay running");
    }

    pub fn kill(&mut self) {
        self.proc.signal("KILL");
        self.proc.wait_exit();
    }

    /// `POST /api/v2/mapping/add` with `mapping=<json>`: (status, answer).
    pub fn add(&self, mapping: &serde_json::Value) -> (u16, serde_json::Value) {
        let body = format!(
            "mapping={}",
            percent_encoding::utf8_percent_encode(
                &mapping.to_string(),
                percent_encoding::NON_ALPHANUMERIC
            )
        );
        api(
            self.api_port,
            "POST",
            "/api/v2/mapping/add",
            Some(TOKEN),
            &body,
        )
    }

    /// A public pipe to `target` on [`DEVICE`]; returns its relay port.
    pub fn add_public(&self, target: &str, max: u32) -> u16 {
        let (status, answer) = self.add(&serde_json::json!({
            "type": "public", "maxconnections": max, "heartbeatabsencethreshold": 200000,
            "device": DEVICE, "target": target,
        }));
        assert_eq!(status, 200, "{answer}");
        answer["port2"].as_u64().expect("port2") as u16
    }
}

/// One request to the mapping API over plain HTTP (`dev=true`).
pub fn api(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    form: &str,
) -> (u16, serde_json::Value) {
    api_raw(
        port,
        method,
        path,
        token,
        "application/x-www-form-urlencoded",
        form,
    )
}

/// One request to the admin API over plain HTTP with a body of `kind`.
pub fn api_raw(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    kind: &str,
    form: &str,
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the API");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n{auth}\
         Content-Type: {kind}\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let reply = super::parse_http_reply(&raw).unwrap();
    (reply.status, reply.json())
}

/// Starts `iot-agent run` with only the tunnel of interest: DMS, the
/// required-install worker and the watchdog off, nothing at NATS or snapd
/// (those subsystems retry quietly). `extra` overrides or adds settings.
pub fn start_agent(
    pki: &TestPki,
    dir: &std::path::Path,
    relay_port: u16,
    allow: &[&str],
    extra: &[(&'static str, String)],
) -> AgentProcess {
    AgentProcess::start(&agent_env(pki, dir, relay_port, allow, extra))
}

/// The environment [`start_agent`] starts the agent with (for one-shot
/// commands that must see the same configuration).
pub fn agent_env(
    pki: &TestPki,
    dir: &std::path::Path,
    relay_port: u16,
    allow: &[&str],
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = vec![
        (
            "IOT_AGENT_DIRS__DATA",
            dir.join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.join("common").display().to_string(),
        ),
        ("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port())),
        (
            "IOT_AGENT_NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        ),
        (
            "IOT_AGENT_SNAPD__SOCKET",
            dir.join("none.socket").display().to_string(),
        ),
        ("IOT_AGENT_DMS__ENABLED", "false".into()),
        ("IOT_AGENT_REQUIRED__ENABLED", "false".into()),
        ("IOT_AGENT_WATCHDOG__ENABLED", "false".into()),
        ("IOT_AGENT_TUNNEL__ENABLED", "true".into()),
        ("IOT_AGENT_TUNNEL__RELAY", format!("localhost:{relay_port}")),
        ("IOT_AGENT_TUNNEL__CA", pki.ca_cert.display().to_string()),
        (
            "IOT_AGENT_TUNNEL__CERT",
            pki.client_cert.display().to_string(),
        ),
        (
            "IOT_AGENT_TUNNEL__KEY",
            pki.client_key.display().to_string(),
        ),
        ("IOT_AGENT_TUNNEL__ALLOW", allow.join(",")),
        ("IOT_AGENT_TUNNEL__HEARTBEAT", "200ms".into()),
        ("IOT_AGENT_TUNNEL__THRESHOLD", "1s".into()),
        (
            "IOT_AGENT_LOG__LEVEL",
            "info,iot_agent::subsystems::tunnel=debug".into(),
        ),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k, v.clone()));
    }
    env
}

/// A device-local echo service: each connection gets back what it sent,
/// and after the client's FIN the rest and a FIN (a half-close round trip).
pub fn echo_service() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut r = c.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut c);
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// A device-local web page: any request gets `200` and `body`.
pub fn web_page(body: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// Sends `data` through the relay port, half-closes, reads the whole answer.
pub fn round_trip(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = s.try_clone()?;
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        w.write_all(&data)?;
        w.shutdown(Shutdown::Write)
    });
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    writer.join().unwrap()?;
    Ok(out)
}

/// What a visitor that is not served sees: its first read fails with a
/// reset (never a silent accept and hang). `Ok(n)` if bytes came instead.
pub fn first_read(s: &mut TcpStream) -> std::io::Result<usize> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = [0u8; 64];
    s.read(&mut buf)
}

/// One side of a private pipe: connect, send the passcode, read
/// `AUTHORIZED`.
pub fn private_side(port: u16, passcode: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(passcode.as_bytes())?;
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf)?;
    assert_eq!(&buf, b"AUTHORIZED");
    Ok(s)
}

/// Answers the relay's `BEAT`s until it says `PAIRED`; returns how many
/// heartbeats were answered.
pub fn until_paired(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut beats = 0;
    loop {
        let mut first = [0u8; 1];
        s.read_exact(&mut first)?;
        match first[0] {
            b'B' => {
                let mut rest = [0u8; 3];
                s.read_exact(&mut rest)?;
                assert_eq!(&rest, b"EAT");
                s.write_all(b"BEAT")?;
                beats += 1;
            }
            b'P' => {
                let mut rest = [0u8; 5];
                s.read_exact(&mut rest)?;
                assert_eq!(&rest, b"AIRED");
                return Ok(beats);
            }
            other => panic!("unexpected byte {other} before PAIRED"),
        }
    }
}

/// A device-local service that accepts and never reads: a stream to it
/// stalls once its credit and the socket buffers are full.
pub fn stalled_service() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().flatten() {
            held.push(c);
        }
    });
    addr
}
