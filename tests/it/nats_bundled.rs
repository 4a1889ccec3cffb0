//! The bundled NATS server: `iot-agent nats-config`'s output run as it is
//! by a real nats-server on free loopback ports, and every user's
//! permissions tried with real clients, subject by subject, from the topic
//! vocabulary (`topics::PROTECTED_TREES`); then a change of users applied
//! with SIGHUP, and a change of listeners reported as needing a restart.

use crate::common::poll_until;
use crate::common::servers::{free_port, tail_files, tcp_accepts};
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use iot_agent::bus::topics::{self, Topic};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_iot-agent");
const WAIT: Duration = Duration::from_secs(15);

/// A data/common directory pair and the environment that points the agent's
/// configuration at it, with its own ports.
pub struct Bundle {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub env: Vec<(String, String)>,
}

impl Bundle {
    pub fn new(extra: &[(&str, &str)]) -> Bundle {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut env = vec![
            (
                "IOT_AGENT_DIRS__DATA".to_string(),
                dir.path().join("data").display().to_string(),
            ),
            (
                "IOT_AGENT_DIRS__COMMON".to_string(),
                dir.path().join("common").display().to_string(),
            ),
            (
                "IOT_AGENT_NATS__URL".to_string(),
                format!("nats://127.0.0.1:{port}"),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Bundle { dir, port, env }
    }

    pub fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    /// Runs `iot-agent ARGS` with this environment; its stdout.
    pub fn agent(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "iot-agent {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn nats_dir(&self) -> PathBuf {
        self.dir.path().join("data/nats")
    }

    pub fn conf(&self) -> PathBuf {
        self.nats_dir().join("nats-server.conf")
    }

    pub fn password(&self, which: &str) -> String {
        let file = match which {
            "snapd" => self.nats_dir().join("snapd.password"),
            _ => self.nats_dir().join("device/password"),
        };
        std::fs::read_to_string(file).unwrap().trim().to_string()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// nats-server running a configuration file as it is.
pub struct ServerProc {
    child: Option<Child>,
    log: PathBuf,
    conf: PathBuf,
}

impl ServerProc {
    /// Starts `nats-server -c conf` and waits until `port` accepts.
    pub fn start(conf: &Path, port: u16) -> ServerProc {
        let log = conf.with_extension("log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("nats-server is installed");
        let mut s = ServerProc {
            child: Some(child),
            log,
            conf: conf.to_path_buf(),
        };
        let ready = poll_until(Instant::now() + WAIT, || {
            if let Ok(Some(status)) = s.child.as_mut().unwrap().try_wait() {
                panic!("nats-server exited ({status})\n{}", s.tail());
            }
            tcp_accepts(port).then_some(())
        });
        assert!(ready.is_some(), "nats-server not ready\n{}", s.tail());
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn tail(&self) -> String {
        tail_files(&[&self.log, &self.conf], 40)
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client that reports the server's permission errors on a channel.
async fn client_with_errors(
    url: &str,
    user: &str,
    password: &str,
) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let c = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .request_timeout(Some(Duration::from_secs(2)))
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    let _ = tx.send(e.to_string().to_lowercase());
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect as {user}: {e}"));
    (c, rx)
}

async fn expect_violation(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    what: &str,
    subject: &str,
) {
    let want = format!("permissions violation for {what} to \"{subject}\"").to_lowercase();
    loop {
        let got = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} on {subject} was not refused"))
            .unwrap();
        if got.contains(&want) {
            return;
        }
    }
}

/// A subject inside each protected tree, from the vocabulary.
fn probes() -> Vec<String> {
    topics::PROTECTED_TREES
        .iter()
        .map(|t| Topic::fixed(&t.replace('#', "probe")).nats())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_configuration_locks_every_agent_tree_on_a_real_server() {
    let mqtt = free_port();
    let mut b = Bundle::new(&[
        ("IOT_AGENT_NATS__MQTT__PORT", &mqtt.to_string()),
        ("IOT_AGENT_NATS__OPERATOR__USER", "operator"),
        ("IOT_AGENT_NATS__OPERATOR__PASSWORD", "operator secret"),
    ]);
    assert_eq!(b.agent(&["nats-config"]), "written");
    assert_eq!(b.agent(&["nats-config"]), "unchanged");
    let conf = std::fs::read_to_string(b.conf()).unwrap();
    for line in conf.lines().filter(|l| l.contains("listen:")) {
        assert!(line.contains("\"127.0.0.1:"), "not loopback: {line}");
    }
    use std::os::unix::fs::PermissionsExt;
    for f in [
        b.conf(),
        b.nats_dir().join("snapd.password"),
        b.nats_dir().join("device/password"),
    ] {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    let (agent_pw, device_pw) = (b.password("snapd"), b.password("device"));
    assert_ne!(agent_pw, device_pw);
    assert!(!conf.contains(iot_agent::config::WELL_KNOWN_NATS_PASSWORD));

    let server = ServerProc::start(&b.conf(), b.port);
    let url = b.url();
    assert!(tcp_accepts(mqtt), "MQTT listener\n{}", server.tail());

    // Nobody gets in without a password: the INFO says so, and the agent's
    // guard (issue 22) reads the same flag.
    let anon = async_nats::ConnectOptions::new().connect(&url);
    let anon = tokio::time::timeout(Duration::from_secs(5), anon).await;
    assert!(!matches!(anon, Ok(Ok(_))), "anonymous login accepted");

    let (agent, _) = client_with_errors(&url, "snapd", &agent_pw).await;
    assert!(agent.server_info().auth_required);
    let mut seen_by_agent = agent.subscribe(">").await.unwrap();
    agent.flush().await.unwrap();

    // The device user: every protected tree refused, both directions.
    let (device, mut device_errors) = client_with_errors(&url, "device", &device_pw).await;
    for subject in probes() {
        device
            .publish(subject.clone(), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        device.flush().await.unwrap();
        expect_violation(&mut device_errors, "publish", &subject).await;
        let _sub = device.subscribe(subject.clone()).await.unwrap();
        device.flush().await.unwrap();
        expect_violation(&mut device_errors, "subscription", &subject).await;
    }
    // Its own subjects work.
    let mut own = device.subscribe("app.echo").await.unwrap();
    device.flush().await.unwrap();
    device
        .publish("app.echo", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, own.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&m.payload[..], b"hi");
    // Nothing it sent into a protected tree reached the agent: the first
    // protected-tree message the agent sees is its own marker.
    agent.publish("snapd.marker", Bytes::new()).await.unwrap();
    loop {
        let m = tokio::time::timeout(WAIT, seen_by_agent.next())
            .await
            .unwrap()
            .unwrap();
        if topics::is_protected(m.subject.as_str()) {
            assert_eq!(m.subject.as_str(), "snapd.marker");
            break;
        }
    }

    // The operator: may request in the agent's trees (the agent gets it),
    // may not subscribe where the agent is served.
    let (operator, mut operator_errors) =
        client_with_errors(&url, "operator", "operator secret").await;
    operator
        .publish("snapd.v2.system-info.get", Bytes::new())
        .await
        .unwrap();
    operator.flush().await.unwrap();
    let m = tokio::time::timeout(WAIT, seen_by_agent.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.subject.as_str(), "snapd.v2.system-info.get");
    for subject in iot_agent::nats_server::render::served_request_subjects() {
        let _sub = operator.subscribe(subject.clone()).await.unwrap();
        operator.flush().await.unwrap();
        expect_violation(&mut operator_errors, "subscription", &subject).await;
    }

    // A new operator password is applied with SIGHUP: the server keeps
    // running (same pid) and takes the new password.
    b.set("IOT_AGENT_NATS__OPERATOR__PASSWORD", "rotated");
    assert_eq!(b.agent(&["nats-config", "--reload"]), "reloaded");
    let srv_pid = server.pid();
    let reloaded = poll_until(Instant::now() + WAIT, || {
        server
            .log_text()
            .contains("Reloaded server configuration")
            .then_some(())
    });
    assert!(reloaded.is_some(), "no reload\n{}", server.tail());
    assert_eq!(server.pid(), srv_pid);
    client_with_errors(&url, "operator", "rotated").await;
    let old = async_nats::ConnectOptions::with_user_and_password(
        "operator".into(),
        "operator secret".into(),
    )
    .connect(&url)
    .await;
    assert!(old.is_err(), "the old operator password still works");

    // A listener change cannot be reloaded: reported as a restart.
    b.set("IOT_AGENT_NATS__MQTT__PORT", &free_port().to_string());
    assert_eq!(b.agent(&["nats-config", "--reload"]), "restart");

    // Turned off: nothing written, nothing signalled.
    b.set("IOT_AGENT_NATS__BUNDLED", "false");
    assert_eq!(b.agent(&["nats-config", "--reload"]), "disabled");
}

#[test]
fn a_leaf_remote_gets_its_credentials_and_bad_settings_are_refused() {
    let b = Bundle::new(&[
        (
            "IOT_AGENT_NATS__LEAF__URL",
            "nats-leaf://hub.example.com:7422",
        ),
        ("IOT_AGENT_NATS__LEAF__USER", "edge-1"),
        ("IOT_AGENT_NATS__LEAF__PASSWORD", "p@ss word"),
    ]);
    b.agent(&["nats-config"]);
    let conf = std::fs::read_to_string(b.conf()).unwrap();
    assert!(
        conf.contains("url: \"nats-leaf://edge-1:p%40ss%20word@hub.example.com:7422\""),
        "{conf}"
    );
    // nats-server itself accepts the file.
    let out = Command::new("nats-server")
        .arg("-t")
        .arg("-c")
        .arg(b.conf())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    for (key, value, want) in [
        (
            "IOT_AGENT_NATS__LEAF__URL",
            "hub.example.com",
            "nats.leaf.url",
        ),
        (
            "IOT_AGENT_NATS__URL",
            "nats://10.0.0.5:4222",
            "nats.bundled=false",
        ),
        ("IOT_AGENT_NATS__OPERATOR__USER", "snapd", "twice"),
    ] {
        let mut bad = Bundle::new(&[]);
        bad.set(key, value);
        let out = Command::new(BIN)
            .arg("nats-config")
            .envs(bad.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}={value} accepted");
        assert!(err.contains(want), "{key}={value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
