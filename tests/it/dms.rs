//! The DMS management channel end to end: the real agent binary enrolls
//! with the identity double, connects to a real mosquitto with mutual TLS
//! (`require_certificate`, `use_identity_as_username`), and a DMS-side
//! client drives every action through it against the snapd double.

use crate::common::agent_proc::AgentProcess;
use crate::common::identity_double::{IdentityDouble, DEVICE_ID, ORG_ID};
use crate::common::mqtt_client::{connect_and_subscribe, TestMqtt};
use crate::common::servers::{free_port, Mosquitto};
use crate::common::snapd_double::{ChangeMode, SnapdDouble, MODEL_ASSERTION, SERIAL_ASSERTION};
use crate::common::tls::TestPki;
use crate::common::upload_sink::{Hanging, UploadSink};
use rumqttc::{AsyncClient, MqttOptions, QoS, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The DMS side: publishes actions, collects what the agent sends.
pub(crate) struct DmsClient {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    seen: Vec<(String, Vec<u8>)>,
}

impl DmsClient {
    pub(crate) async fn connect(pki: &TestPki, port: u16) -> DmsClient {
        Self::connect_with(pki, port, "dms", true).await
    }

    /// The next message of any topic (None when nothing came within `bound`).
    pub(crate) async fn next(&mut self, bound: Duration) -> Option<(String, Vec<u8>)> {
        if !self.seen.is_empty() {
            return Some(self.seen.remove(0));
        }
        tokio::time::timeout(bound, self.rx.recv()).await.ok().flatten()
    }

    /// With `clean` false the broker keeps the DMS client's session (and
    /// what arrives for it) across its reconnections and broker restarts.
    pub(crate) async fn connect_with(pki: &TestPki, port: u16, id: &str, clean: bool) -> DmsClient {
        let (cert, key) = pki.issue_client("dms");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
        let mut opts = MqttOptions::new(id, "localhost", port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )))
        .set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024)
        .set_clean_session(clean);
        let topics = [
            "devices/pub/#",
            "devices/health/#",
            "metrics/#",
            "devices/actions/#",
        ];
        let TestMqtt {
            client,
            messages: rx,
        } = connect_and_subscribe(opts, &topics).await;
        DmsClient {
            client,
            rx,
            seen: Vec::new(),
        }
    }

    pub(crate) async fn publish_raw(&self, payload: Vec<u8>) {
        self.client
            .publish(
                format!("devices/sub/{DEVICE_ID}"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    /// The next message on `topic` that `pick` accepts (bounded wait).
    pub(crate) async fn wait(&mut self, topic: &str, pick: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        if let Some(i) = self.seen.iter().position(|(t, p)| t == topic && pick(p)) {
            return self.seen.remove(i).1;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("nothing on {topic}; saw {:?}", self.seen))
                .unwrap();
            if got.0 == topic && pick(&got.1) {
                return got.1;
            }
            self.seen.push(got);
        }
    }

    /// A response with this id (`nth`: 0 = the first, 1 = the second).
    pub(crate) async fn response(&mut self, id: &str) -> Value {
        let topic = format!("devices/pub/{DEVICE_ID}");
        let raw = self
            .wait(&topic, |p| {
                serde_json::from_slice::<Value>(p)
                    .map(|v| v["id"] == id)
                    .unwrap_or(false)
            })
            .await;
        let v: Value = serde_json::from_slice(&raw).unwrap();
        for key in ["id", "action", "success", "message", "result"] {
            assert!(v.get(key).is_some(), "response without {key}: {v}");
        }
        v
    }

    pub(crate) async fn call(&mut self, id: &str, action: &str, snap: &str, data: &str) -> Value {
        let req = json!({"id": id, "action": action, "snap": snap, "data": data});
        self.publish_raw(serde_json::to_vec(&req).unwrap()).await;
        let v = self.response(id).await;
        assert_eq!(v["action"], action, "{v}");
        v
    }
}

/// Everything a DMS test needs, with the agent enrolled and subscribed.
pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    pub pki: Arc<TestPki>,
    pub broker: Mosquitto,
    identity: IdentityDouble,
    pub snapd: SnapdDouble,
    pub agent: AgentProcess,
    data_dir: std::path::PathBuf,
    pub env: Vec<(&'static str, String)>,
}

impl Setup {
    /// Starts the agent again with the same environment (after it stopped
    /// or was killed), and waits until it is subscribed.
    pub(crate) fn start_agent_again(&mut self) {
        self.agent = AgentProcess::start(&self.env);
        self.agent.wait_for("subscribed to DMS actions");
    }
}

async fn setup(extra_env: &[(&'static str, String)]) -> Setup {
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    let broker = Mosquitto::start_tls(&pki);
    setup_on(pki, broker, extra_env).await
}

/// [`setup`] on a given broker (a persistent one for the fault tests).
pub(crate) async fn setup_on(
    pki: Arc<TestPki>,
    broker: Mosquitto,
    extra_env: &[(&'static str, String)],
) -> Setup {
    let identity = IdentityDouble::start_with(false, pki.clone(), broker.port()).await;
    let snapd = SnapdDouble::start().await;
    snapd.set_serial(Some(SERIAL_ASSERTION.to_string()));
    snapd.add_installed("hello-world", "6.4", "29", "latest/stable");
    snapd.add_service("hello-world", "daemon", true);
    snapd.set_conf("hello-world", json!({"greeting": "hello"}));
    snapd.add_log("hello-world.daemon", "started");
    snapd.add_store_snap("other");
    snapd.add_store_snap_version("hello-world", "6.5", "30");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut env = vec![
        ("IOT_AGENT_URL", identity.url().to_string()),
        ("IOT_AGENT_DIRS__DATA", data_dir.display().to_string()),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.path().join("common").display().to_string(),
        ),
        (
            "IOT_AGENT_SNAPD__SOCKET",
            snapd.socket().display().to_string(),
        ),
        (
            "IOT_AGENT_NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        ),
    ];
    env.extend(extra_env.iter().cloned());
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("subscribed to DMS actions");
    Setup {
        _dir: dir,
        pki,
        broker,
        identity,
        snapd,
        agent,
        data_dir,
        env,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_action_answers_in_the_contract_shape() {
    let mut s = setup(&[]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let sink = UploadSink::start().await;

    let v = dms.call("1", "device", "", "").await;
    assert_eq!(v["success"], true, "{v}");
    let r = &v["result"];
    assert_eq!(
        (r["orgId"].as_str(), r["deviceId"].as_str()),
        (Some(ORG_ID), Some(DEVICE_ID))
    );
    assert_eq!(r["brand"], "canonical");
    assert!(r["serial"].as_str().unwrap().contains("A1B2"), "{r}");
    assert!(r["version"]["series"].is_string(), "{r}");

    let v = dms.call("2", "server", "", "").await;
    for k in [
        "deviceId",
        "version",
        "series",
        "osId",
        "osVersionId",
        "onClassic",
        "kernelVersion",
    ] {
        assert!(v["result"].get(k).is_some(), "server without {k}: {v}");
    }

    let v = dms.call("3", "list", "", "").await;
    let hw = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "hello-world")
        .unwrap()
        .clone();
    for k in [
        "deviceId",
        "name",
        "installedSize",
        "installedDate",
        "status",
        "channel",
        "confinement",
        "version",
        "revision",
        "devmode",
        "config",
    ] {
        assert!(hw.get(k).is_some(), "list entry without {k}: {hw}");
    }
    let conf: Value = serde_json::from_str(hw["config"].as_str().unwrap()).unwrap();
    assert_eq!(conf["greeting"], "hello");
    assert_eq!(hw["services"][0]["name"], "daemon");

    let v = dms.call("4", "info", "hello-world", "").await;
    assert_eq!(v["result"]["name"], "hello-world");
    let v = dms.call("5", "conf", "hello-world", "").await;
    assert_eq!(v["result"]["greeting"], "hello");

    // Actions that start a change: the change id now, its end later.
    let cases = [
        ("10", "setconf", "hello-world", r#"{"greeting":"hi"}"#),
        ("11", "install", "other", ""),
        ("12", "refresh", "hello-world", ""),
        ("13", "revert", "hello-world", ""),
        ("14", "disable", "hello-world", ""),
        ("15", "enable", "hello-world", ""),
        ("16", "switch", "hello-world", "latest/beta"),
        ("17", "restart", "hello-world", r#"{"services":["daemon"]}"#),
        ("18", "stop", "hello-world", ""),
        ("19", "start", "hello-world", r#"{"services":[]}"#),
        ("20", "remove", "other", ""),
    ];
    for (id, action, snap, data) in cases {
        let v = dms.call(id, action, snap, data).await;
        assert_eq!(v["success"], true, "{action}: {v}");
        let change = v["result"]
            .as_str()
            .unwrap_or_else(|| panic!("{action}: no change id: {v}"))
            .to_string();
        let done = dms.response(id).await;
        assert_eq!(done["success"], true, "{action} completion: {done}");
        assert_eq!(done["result"]["change"], change.as_str());
        assert_eq!(done["result"]["status"], "Done");
    }
    assert_eq!(s.snapd.conf("hello-world")["greeting"], "hi");
    assert!(!s.snapd.installed().contains(&"other".to_string()));

    let v = dms.call("30", "ack", "", MODEL_ASSERTION).await;
    assert_eq!(v["success"], true, "{v}");

    let v = dms
        .call(
            "31",
            "user",
            "",
            r#"{"action":"create","email":"ops@example.com","sudoer":true}"#,
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    let username = v["result"][0]["username"].as_str().unwrap().to_string();
    let v = dms
        .call(
            "32",
            "user",
            "",
            &format!(r#"{{"action":"remove","username":"{username}"}}"#),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");

    let v = dms
        .call(
            "40",
            "logs",
            "",
            &json!({"url": sink.url("logs.txt"), "limit": 10}).to_string(),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    let v = dms
        .call(
            "41",
            "snapshot",
            "hello-world",
            &json!({"url": sink.url("snap.tar")}).to_string(),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    let uploads = sink.uploads();
    let logs = uploads
        .iter()
        .find(|u| u.path_and_query.starts_with("/bucket/logs.txt"))
        .unwrap();
    assert!(
        String::from_utf8_lossy(&logs.body).contains("started"),
        "{logs:?}"
    );
    let snap = uploads
        .iter()
        .find(|u| u.path_and_query.starts_with("/bucket/snap.tar"))
        .unwrap();
    assert!(!snap.body.is_empty());
    assert_eq!(
        snap.content_length,
        Some(snap.body.len() as u64),
        "object stores need a length"
    );
    assert_eq!(
        s.agent.count("secret-signature"),
        0,
        "a presigned URL reached the log"
    );

    // unregister: the reply arrives, then the agent forgets and re-enrolls.
    let v = dms.call("50", "unregister", "", "").await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"]["deviceId"], DEVICE_ID);
    s.agent.wait_for("unregistered by the DMS");
    s.agent.wait_for("subscribed to DMS actions");
    assert_eq!(
        s.identity.calls().len(),
        2,
        "enrolled again after unregister"
    );
    assert!(s.data_dir.join(".secret").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_always_gets_an_answer_and_never_reaches_snapd_raw() {
    let s = setup(&[("IOT_AGENT_DMS__UPLOAD__TIMEOUT", "2s".to_string())]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let topic = format!("devices/pub/{DEVICE_ID}");

    // Unreadable requests are answered with an empty id.
    for (payload, expect) in [
        (b"{not json".to_vec(), "not valid JSON"),
        (b"\"a string\"".to_vec(), "JSON object"),
        (br#"{"action":"list"}"#.to_vec(), "no id"),
        (vec![b' '; 300 * 1024], "more than"),
    ] {
        dms.publish_raw(payload).await;
        let raw = dms
            .wait(&topic, |p| {
                serde_json::from_slice::<Value>(p)
                    .map(|v| v["id"] == "")
                    .unwrap_or(false)
            })
            .await;
        let v: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(v["success"], false);
        assert!(v["message"].as_str().unwrap().contains(expect), "{v}");
    }

    let before = s.snapd.requests().len();
    for (id, action, snap, data, expect) in [
        ("b1", "fly", "", "", "unknown action"),
        ("b2", "install", "", "", "needs a snap name"),
        (
            "b3",
            "install",
            "../../v2/system-info",
            "",
            "invalid snap name",
        ),
        ("b4", "remove", "a/b", "", "invalid snap name"),
        ("b5", "info", "a?x=1", "", "invalid snap name"),
        ("b6", "conf", "a b", "", "invalid snap name"),
        ("b7", "setconf", "hello-world", "not json", "must be json"),
        ("b8", "setconf", "hello-world", "[1,2]", "must be json"),
        (
            "b9",
            "restart",
            "hello-world",
            r#"{"services":["../x"]}"#,
            "not valid",
        ),
        ("b10", "switch", "hello-world", "", "channel"),
        (
            "b11",
            "user",
            "",
            r#"{"action":"explode"}"#,
            "create or remove",
        ),
        ("b12", "logs", "", r#"{"url":"file:///etc/passwd"}"#, "http"),
        ("b13", "ack", "", "garbage", "ack"),
        ("b14", "install", "nowhere", "", "not found"),
    ] {
        let v = dms.call(id, action, snap, data).await;
        assert_eq!(v["success"], false, "{id}: {v}");
        let msg = v["message"].as_str().unwrap().to_lowercase();
        assert!(msg.contains(expect), "{id}: {msg}");
    }
    // Only the one well-formed install reached snapd.
    let reached: Vec<String> = s.snapd.requests()[before..]
        .iter()
        .map(|r| r.path_and_query.clone())
        .collect();
    assert!(
        reached
            .iter()
            .all(|p| !p.contains("..") && !p.contains("a/b") && !p.contains(' ')),
        "{reached:?}"
    );

    // Uploads that are refused or hang: an answer, within the timeout.
    let dead = format!("http://127.0.0.1:{}/x", free_port());
    let v = dms
        .call("u1", "logs", "", &json!({"url": dead}).to_string())
        .await;
    assert_eq!(v["success"], false, "{v}");
    let hanging = Hanging::start().await;
    let url = format!("http://127.0.0.1:{}/x", hanging.port);
    let v = dms
        .call("u2", "logs", "", &json!({"url": url}).to_string())
        .await;
    assert_eq!(v["success"], false, "{v}");
    assert!(v["message"].as_str().unwrap().contains("timed out"), "{v}");

    // Still serving.
    let v = dms.call("ok", "device", "", "").await;
    assert_eq!(v["success"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_ids_run_once_and_are_answered_again() {
    let s = setup(&[]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let req = json!({"id": "dup", "action": "install", "snap": "other", "data": ""}).to_string();
    dms.publish_raw(req.clone().into_bytes()).await;
    let first = dms.response("dup").await;
    dms.publish_raw(req.into_bytes()).await;
    // The first answer, its completion, and the answer again: same id.
    let mut answers = vec![first];
    answers.push(dms.response("dup").await);
    answers.push(dms.response("dup").await);
    assert!(answers.iter().all(|a| a["success"] == true), "{answers:?}");
    let posts = s.snapd.posts_to("/v2/snaps/other");
    assert_eq!(posts, 1, "the repeated action ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn change_completion_reports_failure_and_the_loop_stays_free() {
    let s = setup(&[]).await;
    s.snapd.set_change_mode(ChangeMode::Manual);
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms.call("c1", "install", "other", "").await;
    let change = v["result"].as_str().unwrap().to_string();
    // While that change runs, other actions are answered.
    let v = dms.call("c2", "device", "", "").await;
    assert_eq!(v["success"], true);
    s.snapd.set_change_status(&change, "Error");
    let done = dms.response("c1").await;
    assert_eq!(done["success"], false, "{done}");
    assert_eq!(done["result"]["status"], "Error");
    assert!(
        done["message"].as_str().unwrap().contains("cannot perform"),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeat_and_metrics_are_published() {
    // Short intervals: the DMS client subscribes after the session started.
    let s = setup(&[
        ("IOT_AGENT_DMS__HEARTBEAT__INTERVAL", "1s".to_string()),
        ("IOT_AGENT_DMS__METRICS__INTERVAL", "1s".to_string()),
    ])
    .await;
    let mut dms2 = DmsClient::connect(&s.pki, s.broker.port()).await;
    let raw = dms2
        .wait(&format!("devices/health/{DEVICE_ID}"), |_| true)
        .await;
    let hb: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(hb["orgId"], ORG_ID);
    assert_eq!(hb["deviceId"], DEVICE_ID);
    assert!(
        humantime::parse_rfc3339(hb["refresh"].as_str().unwrap()).is_ok(),
        "{hb}"
    );
    let names = json!(["hello-world"]).to_string();
    assert_eq!(
        hb["installedSnapsHash"],
        iot_agent::services::dms::heartbeat::sha256_hex(names.as_bytes())
    );
    assert_eq!(hb["snapListHash"].as_str().unwrap().len(), 64);

    let raw = dms2.wait(&format!("metrics/{ORG_ID}"), |_| true).await;
    let text = String::from_utf8(raw).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("memory,device={DEVICE_ID} total="))),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("cpu,device={DEVICE_ID} user="))),
        "{text}"
    );

    // A new snap changes the installed-snaps hash.
    s.snapd.add_installed("extra", "1", "1", "latest/stable");
    let topic = format!("devices/health/{DEVICE_ID}");
    let raw = dms2
        .wait(&topic, |p| {
            serde_json::from_slice::<Value>(p)
                .map(|v| v["installedSnapsHash"] != hb["installedSnapsHash"])
                .unwrap_or(false)
        })
        .await;
    let hb2: Value = serde_json::from_slice(&raw).unwrap();
    let names = json!(["extra", "hello-world"]).to_string();
    assert_eq!(
        hb2["installedSnapsHash"],
        iot_agent::services::dms::heartbeat::sha256_hex(names.as_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_restores_the_subscription() {
    let mut s = setup(&[]).await;
    s.broker.stop();
    s.agent.wait_for("DMS broker connection failed");
    s.broker.restart();
    s.agent.wait_for("subscribed to DMS actions");
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms.call("after-restart", "device", "", "").await;
    assert_eq!(v["success"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_serial_actions_arrive_on_the_dms_connection_too() {
    let s = setup(&[]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    // The serial `A1B2-c3d4/5`, sanitized.
    let base = "devices/actions/A1B2-c3d45";
    let req = json!({"id": "rq", "snaps": {"name": "other", "channel": "candidate"}});
    dms.client
        .publish(
            format!("{base}/required-install"),
            QoS::AtLeastOnce,
            false,
            req.to_string(),
        )
        .await
        .unwrap();
    let raw = dms
        .wait(&format!("{base}/required-install/result"), |_| true)
        .await;
    let v: Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["success"].as_bool()),
        (Some("rq"), Some(true)),
        "{v}"
    );
    assert_eq!(
        s.snapd.snap("other").unwrap()["channel"],
        "latest/candidate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dms_connection_state_is_served_on_nats() {
    use crate::common::servers::{NatsConfig, NatsServer, NatsUser};
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", "pw")],
        ..Default::default()
    });
    let mut s = setup(&[
        ("IOT_AGENT_NATS__URL", nats.url()),
        ("IOT_AGENT_NATS__SNAPD__PASSWORD", "pw".to_string()),
    ])
    .await;
    let nc = async_nats::ConnectOptions::with_user_and_password("snapd".into(), "pw".into())
        .connect(nats.url())
        .await
        .unwrap();
    // Asked until the mirror is serving (it may still be connecting).
    let ask = || async {
        for _ in 0..200 {
            let r = nc
                .request("iot.agent.mqtt.connection.status", bytes::Bytes::new())
                .await;
            if let Ok(m) = r {
                return serde_json::from_slice::<Value>(&m.payload).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("iot.agent.mqtt.connection.status never answered");
    };
    assert_eq!(ask().await["connected"], true);
    s.broker.stop();
    s.agent.wait_for("DMS broker connection failed");
    let v = ask().await;
    assert_eq!(v["connected"], false, "{v}");
    assert!(
        !v["errorInfo"]["message"].as_str().unwrap().is_empty(),
        "{v}"
    );
}
