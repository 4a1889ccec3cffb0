//! The DMS management channel end to end: the real agent binary enrolls
//! with the identity double, connects to a real mosquitto with mutual TLS
//! (`require_certificate`, `use_identity_as_username`), and a DMS-side
//! client drives every action through it against the snapd double.

use crate::common::agent_proc::AgentProcess;
use crate::common::dms_types::{self, Decoded};
use crate::common::identity_double::{IdentityDouble, DEVICE_ID, ORG_ID};
use crate::common::mqtt_client::{connect_and_subscribe, TestMqtt};
use crate::common::servers::{free_port, Mosquitto};
use crate::common::snapd_double::{ChangeMode, SnapdDouble, MODEL_ASSERTION, SERIAL_ASSERTION};
use crate::common::tls::TestPki;
use crate::common::upload_sink::{Hanging, UploadSink};
use rumqttc::{AsyncClient, MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// The DMS side: publishes actions, collects what the agent sends, and
/// reads every reply and heartbeat with the DMS's own types
/// ([`dms_types`]): a message the DMS could not decode fails the test.
/// Like the reference DMS it keeps a record per action id, routed by the
/// reply's `action` (iot-devicetwin `ActionResponse`): `requested` when
/// sent, `complete` from a reply that decodes with `success:true`, `error`
/// otherwise; replies under actions it does not know leave records alone.
pub(crate) struct DmsClient {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    seen: Vec<(String, Vec<u8>)>,
    records: std::collections::HashMap<String, String>,
}

/// The actions the reference DMS records replies of.
const ROUTED: [&str; 12] = [
    "device", "list", "install", "remove", "refresh", "revert", "enable", "disable", "setconf",
    "conf", "info", "server",
];

impl DmsClient {
    pub(crate) async fn connect(pki: &TestPki, port: u16) -> DmsClient {
        Self::connect_with(pki, port, "dms", true).await
    }

    /// The next message of any topic (None when nothing came within `bound`).
    pub(crate) async fn next(&mut self, bound: Duration) -> Option<(String, Vec<u8>)> {
        if !self.seen.is_empty() {
            return Some(self.seen.remove(0));
        }
        let got = tokio::time::timeout(bound, self.rx.recv())
            .await
            .ok()
            .flatten();
        if let Some((t, p)) = &got {
            self.check(t, p);
        }
        got
    }

    /// With `clean` false the broker keeps the DMS client's session (and
    /// what arrives for it) across its reconnections and broker restarts.
    pub(crate) async fn connect_with(pki: &TestPki, port: u16, id: &str, clean: bool) -> DmsClient {
        use iot_agent::tls;
        let (cert, key) = pki.issue_client("dms");
        // The reference DMS did not check the broker's name at all; the
        // test DMS checks the chain (the reference broker has no SAN).
        let tls = tls::client_config(
            tls::Roots::new().pem(&pki.ca_pem, "test CA").unwrap(),
            Some(tls::ClientCert {
                cert_pem: &cert,
                key_pem: &key,
            }),
            tls::Verify::Chain,
            tls::Advice {
                peer: "the test broker",
                ca_key: "-",
                verify_key: None,
            },
        )
        .unwrap();
        let mut opts = MqttOptions::new(id, "localhost", port);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
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
            records: Default::default(),
        }
    }

    /// Reads a message as the DMS would; panics when the DMS could not.
    fn check(&mut self, topic: &str, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        if topic.starts_with("devices/pub/") {
            let (head, _decoded) = dms_types::decode_reply(payload)
                .unwrap_or_else(|e| panic!("the DMS cannot decode a reply: {e}\n{text}"));
            let (id, action) = (head.id.unwrap_or_default(), head.action.unwrap_or_default());
            if ROUTED.contains(&action.as_str()) {
                let status = if head.success == Some(true) {
                    "complete"
                } else {
                    "error"
                };
                self.records.insert(id, status.to_string());
            }
        } else if topic.starts_with("devices/health/") {
            dms_types::decode_health(payload)
                .unwrap_or_else(|e| panic!("the DMS cannot decode a heartbeat: {e}\n{text}"));
        }
    }

    /// The DMS's record of an action.
    fn record(&self, id: &str) -> Option<&str> {
        self.records.get(id).map(String::as_str)
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
            self.check(&got.0, &got.1);
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
        self.records.insert(id.to_string(), "requested".to_string());
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
    /// The log line `setup_with` waited for.
    ready_line: String,
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
    setup_with(
        TestPki::new(DEVICE_ID),
        extra_env,
        "subscribed to DMS actions",
    )
    .await
}

/// [`setup`] with a PKI of its own; returns once the agent logged `ready`.
async fn setup_with(pki: TestPki, extra_env: &[(&'static str, String)], ready: &str) -> Setup {
    let pki = Arc::new(pki);
    let broker = Mosquitto::start_tls(&pki);
    setup_on(pki, broker, extra_env, ready).await
}

/// [`setup`] on a given broker (a persistent one for the fault tests).
pub(crate) async fn setup_on(
    pki: Arc<TestPki>,
    broker: Mosquitto,
    extra_env: &[(&'static str, String)],
    ready: &str,
) -> Setup {
    let identity = IdentityDouble::start_with(false, pki.clone(), broker.port()).await;
    let snapd = SnapdDouble::start().await;
    snapd.set_serial(Some(SERIAL_ASSERTION.to_string()));
    snapd.add_installed("hello-world", "6.4", "29", "latest/stable");
    snapd.add_service("hello-world", "daemon", true);
    // As real snapd answers for a disabled snap: no install-date; and a
    // local revision.
    snapd.add_disabled("sleepy", "0.1", "x1", "latest/stable");
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
    let ready_line = agent.wait_for(ready);
    Setup {
        ready_line,
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
    assert_eq!(v["version"], "2", "dmscore's versioned list: {v}");
    let sleepy = v["result"]["snaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "sleepy")
        .unwrap()
        .clone();
    assert_eq!(sleepy["installedDate"], "0001-01-01T00:00:00Z", "{sleepy}");
    assert_eq!(sleepy["revision"], -1, "{sleepy}");
    let hw = v["result"]["snaps"]
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
    assert_eq!(v["result"]["revision"], 29, "{v}");
    let v = dms.call("5", "conf", "hello-world", "").await;
    let conf: Value = serde_json::from_str(v["result"]["config"].as_str().unwrap()).unwrap();
    assert_eq!(conf["greeting"], "hello", "{v}");

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
        assert_eq!(done["action"], "completion", "{done}");
        assert_eq!(done["success"], true, "{action} completion: {done}");
        assert_eq!(done["result"]["action"], action, "{done}");
        assert_eq!(done["result"]["change"], change.as_str());
        assert_eq!(done["result"]["status"], "Done");
        if ROUTED.contains(&action) {
            assert_eq!(dms.record(id), Some("complete"), "{action}");
        }
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
        (
            "b15",
            "start",
            "helloworld",
            r#"{"services":["helloworld.service1","jelloworld.service2"]}"#,
            "belongs to snap \"jelloworld\"",
        ),
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
        (
            "IOT_AGENT_SNAPLOGGER__DURATION__BETWEEN__CHECKS",
            "1s".to_string(),
        ),
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
    let names = json!(["hello-world", "sleepy"]).to_string();
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

    // A snap installed from outside (`snap install` on the device): the
    // change poller sees its change become ready, the hashes are rebuilt.
    s.snapd.add_installed("extra", "1", "1", "latest/stable");
    s.snapd.add_change(
        "install-snap",
        "Install \"extra\" snap",
        "Done",
        &now_rfc3339(),
    );
    let topic = format!("devices/health/{DEVICE_ID}");
    let raw = dms2
        .wait(&topic, |p| {
            serde_json::from_slice::<Value>(p)
                .map(|v| v["installedSnapsHash"] != hb["installedSnapsHash"])
                .unwrap_or(false)
        })
        .await;
    let hb2: Value = serde_json::from_slice(&raw).unwrap();
    let names = json!(["extra", "hello-world", "sleepy"]).to_string();
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

/// The decoder is the DMS's: it reads what the DMS's own tests feed it
/// and refuses the types the DMS refuses (so the tests above can fail).
#[test]
fn the_dms_types_read_the_reference_payloads_and_refuse_wrong_types() {
    use crate::common::fixture;
    for name in [
        "21-dms-expects-device-response.json",
        "22-dms-expects-list-response.json",
        "23-dms-expects-install-response.json",
        "24-dms-expects-conf-response.json",
        "25-dms-expects-server-response.json",
        "26-dms-expects-unregister-response.json",
    ] {
        let text = fixture(name);
        dms_types::decode_reply(text.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let v2 = fixture("32-DERIVED-dmscore-list-response-v2.json");
    match dms_types::decode_reply(v2.as_bytes()).unwrap().1 {
        Decoded::SnapsV2(r) => assert_eq!(r.snaps.unwrap()[0].revision.0, 1033),
        other => panic!("{other:?}"),
    }
    dms_types::decode_health(fixture("27-dms-health-minimal.json").as_bytes())
        .expect_err("refresh is required by the health schema");
    for bad in [
        r#"{"id":"a","action":"list","success":true,"result":[{"name":"x","revision":"33"}]}"#,
        r#"{"id":"a","action":"list","success":true,"result":[{"name":"x","installedDate":""}]}"#,
        r#"{"id":"a","action":"list","success":true,"result":[{"name":"x","services":[{"name":"d","active":true,"enabled":true}]}]}"#,
        r#"{"id":"a","action":"install","success":true,"result":{"change":"5"}}"#,
        r#"{"id":"a","action":"device","success":true,"result":{"deviceId":"d","version":{"version":"1"}}}"#,
        r#"{"id":"a","action":"conf","success":true,"result":{"greeting":"hi","revision":"1"}}"#,
        r#"{"id":"a","action":"list","version":"2","success":true,"message":"","result":[]}"#,
    ] {
        assert!(dms_types::decode_reply(bad.as_bytes()).is_err(), "{bad}");
    }
}

/// A deployment made like the reference: the identity service's CA
/// (`CN=mqtt`) signs the broker (`CN=mqtt`, no subjectAltName) and every
/// device; the enrollment's organization certificate is a leaf. With
/// `dms.ca` (inline PEM, as `snap set dms.ca="$(cat ca.crt)"`) and
/// `dms.verify=chain` the agent connects and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reference_broker_is_trusted_through_dms_ca_and_chain_verification() {
    let pki = TestPki::reference(DEVICE_ID);
    let ca = pki.ca_pem.clone();
    let s = setup_with(
        pki,
        &[
            ("IOT_AGENT_DMS__CA", ca),
            ("IOT_AGENT_DMS__VERIFY", "chain".to_string()),
        ],
        "subscribed to DMS actions",
    )
    .await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms.call("ref-1", "device", "", "").await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"]["version"]["deviceId"], DEVICE_ID, "{v}");
    assert_eq!(dms.record("ref-1"), Some("complete"));

    // dms.ca as a file path works the same.
    drop(s);
    let pki = TestPki::reference(DEVICE_ID);
    let path = pki.ca_cert.display().to_string();
    let _s = setup_with(
        pki,
        &[
            ("IOT_AGENT_DMS__CA", path),
            ("IOT_AGENT_DMS__VERIFY", "chain".to_string()),
        ],
        "subscribed to DMS actions",
    )
    .await;
}

/// A broker certificate that does not verify is refused, and the log
/// says what was presented and which key to set; never a silent skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_does_not_verify_is_refused_with_the_key_to_set() {
    // The reference broker without dms.ca: only the organization leaf is
    // trusted, which does not sign the broker.
    let s = setup_with(
        TestPki::reference(DEVICE_ID),
        &[("IOT_AGENT_DMS__VERIFY", "chain".to_string())],
        "DMS broker connection failed",
    )
    .await;
    let line = &s.ready_line;
    assert!(line.contains("set dms.ca"), "{line}");
    assert!(line.contains("CN=mqtt"), "what was presented: {line}");
    assert_eq!(s.agent.count("subscribed to DMS actions"), 0);
    drop(s);

    // dms.ca right but the host-name check on: the CN-only certificate
    // cannot pass it; the log names dms.verify=chain.
    let pki = TestPki::reference(DEVICE_ID);
    let ca = pki.ca_pem.clone();
    let s = setup_with(
        pki,
        &[("IOT_AGENT_DMS__CA", ca)],
        "DMS broker connection failed",
    )
    .await;
    let line = &s.ready_line;
    assert!(line.contains("set dms.verify=chain"), "{line}");
    assert!(line.contains("no subjectAltName"), "{line}");
    drop(s);

    // The CA of another deployment.
    let other = TestPki::reference("someone-else");
    let s = setup_with(
        TestPki::reference(DEVICE_ID),
        &[
            ("IOT_AGENT_DMS__CA", other.ca_pem.clone()),
            ("IOT_AGENT_DMS__VERIFY", "chain".to_string()),
        ],
        "DMS broker connection failed",
    )
    .await;
    let line = &s.ready_line;
    assert!(line.contains("not signed by a trusted root"), "{line}");
    drop(s);

    // An expired broker certificate, even in chain mode.
    let pki = TestPki::with_layout(
        DEVICE_ID,
        crate::common::tls::Layout {
            expired_server: true,
            ..Default::default()
        },
    );
    let s = setup_with(
        pki,
        &[("IOT_AGENT_DMS__VERIFY", "chain".to_string())],
        "DMS broker connection failed",
    )
    .await;
    let line = &s.ready_line;
    assert!(line.contains("expired"), "{line}");
}

/// The reference's action semantics: fully qualified service names (as
/// the DMS sends them) go to snapd as given; `switch` refreshes onto the
/// channel, so the snap moves now.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qualified_services_and_switch_as_a_refresh() {
    use crate::common::fixture;
    let s = setup(&[]).await;
    s.snapd
        .add_installed("helloworld", "1", "3", "latest/stable");
    s.snapd.add_service("helloworld", "service1", false);
    s.snapd.add_service("helloworld", "service2", false);
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;

    let req = fixture("16-dms-req-start-services-qualified.json");
    let req: Value = serde_json::from_str(&req).unwrap();
    let v = dms
        .call("q1", "start", "helloworld", req["data"].as_str().unwrap())
        .await;
    assert_eq!(v["success"], true, "{v}");
    let apps = s
        .snapd
        .requests()
        .into_iter()
        .rfind(|r| r.method == "POST" && r.path_and_query == "/v2/apps")
        .unwrap()
        .json();
    assert_eq!(
        apps["names"],
        json!(["helloworld.service1", "helloworld.service2"]),
        "{apps}"
    );

    let v = dms.call("sw", "switch", "hello-world", "latest/beta").await;
    assert_eq!(v["success"], true, "{v}");
    let done = dms.response("sw").await;
    assert_eq!(done["action"], "completion");
    let post = s
        .snapd
        .requests()
        .into_iter()
        .rfind(|r| r.method == "POST" && r.path_and_query == "/v2/snaps/hello-world")
        .unwrap()
        .json();
    assert_eq!(post["action"], "refresh", "{post}");
    assert_eq!(post["channel"], "latest/beta", "{post}");
    assert_eq!(
        s.snapd.snap("hello-world").unwrap()["tracking-channel"],
        "latest/beta"
    );
}

/// With `dms.completion=false` no completion report is sent; the reply
/// alone completes the DMS's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completion_reports_can_be_turned_off() {
    let s = setup(&[("IOT_AGENT_DMS__COMPLETION", "false".to_string())]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms.call("nc", "install", "other", "").await;
    assert_eq!(v["success"], true, "{v}");
    let change = v["result"].as_str().unwrap().to_string();
    // A report starts by reading the change at once, before the reply
    // to a later request (which itself takes several snapd calls).
    let v = dms.call("after", "device", "", "").await;
    assert_eq!(v["success"], true, "{v}");
    let polled = s
        .snapd
        .requests()
        .iter()
        .any(|r| r.path_and_query == format!("/v2/changes/{change}"));
    assert!(!polled, "the agent followed the change for a report");
    assert!(
        !dms.seen
            .iter()
            .any(|(_, p)| String::from_utf8_lossy(p).contains("\"completion\"")),
        "{:?}",
        dms.seen
    );
    assert_eq!(dms.record("nc"), Some("complete"));
}

impl DmsClient {
    /// The next message from the broker, read as the DMS reads it.
    async fn next_message(&mut self) -> (String, Vec<u8>) {
        let got = tokio::time::timeout(Duration::from_secs(30), self.rx.recv())
            .await
            .expect("nothing from the agent within 30 s")
            .unwrap();
        self.check(&got.0, &got.1);
        got
    }
}

/// dmscore's hash keeping (pkg/devicetwin/service.go): the first heartbeat
/// with hashes is stored; a later one whose hashes differ from the stored
/// ones makes it ask for `list`; only a `version:"2"` list reply updates
/// the stored hashes. So after a snap change the device must be asked
/// once, and then its heartbeats must match again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_snap_change_dmscore_asks_for_the_list_once() {
    let s = setup(&[("IOT_AGENT_DMS__HEARTBEAT__INTERVAL", "1s".to_string())]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let health = format!("devices/health/{DEVICE_ID}");
    let hashes = |v: &Value| {
        (
            v["snapListHash"].as_str().unwrap_or("").to_string(),
            v["installedSnapsHash"].as_str().unwrap_or("").to_string(),
        )
    };
    let mut stored: Option<(String, String)> = None;
    let mut asked = 0;
    // Heartbeats after the last stored list reply, and whether a change
    // has happened yet.
    let mut matching_after_reply = 0;
    let mut changed = false;
    let mut replies_stored = 0;
    let mut heartbeats = 0;
    while !(changed && replies_stored > 0 && matching_after_reply >= 3) {
        assert!(
            heartbeats < 30,
            "no steady state after {heartbeats} heartbeats"
        );
        let (topic, payload) = dms.next_message().await;
        let v: Value = serde_json::from_slice(&payload).unwrap();
        if topic == health {
            heartbeats += 1;
            let h = hashes(&v);
            assert!(!h.0.is_empty() && !h.1.is_empty(), "dmscore hashes: {v}");
            match &stored {
                None => stored = Some(h),
                Some(known) if *known == h => {
                    if replies_stored > 0 {
                        matching_after_reply += 1;
                    }
                    if !changed && stored.is_some() {
                        // Steady: now change a snap through snapd.
                        changed = true;
                        let req = json!({"id": "chg", "action": "install", "snap": "other"});
                        dms.publish_raw(req.to_string().into_bytes()).await;
                    }
                }
                Some(_) => {
                    assert!(
                        replies_stored == 0 || matching_after_reply == 0,
                        "the heartbeat differs from the stored list reply again: {v}"
                    );
                    assert!(asked < 10, "asked for list on every heartbeat: {v}");
                    asked += 1;
                    matching_after_reply = 0;
                    let req = json!({"id": format!("list-{asked}"), "action": "list"});
                    dms.publish_raw(req.to_string().into_bytes()).await;
                }
            }
        } else if v["action"] == "list" && v["version"] == "2" && changed {
            stored = Some(hashes(&v["result"]));
            replies_stored += 1;
            matching_after_reply = 0;
        }
    }
    assert!(asked >= 1, "the snap change never changed the hashes");
    assert!(
        asked <= 2,
        "asked for list {asked} times for one change (once, or twice if a heartbeat overtook the reply)"
    );
    assert!(s.snapd.installed().contains(&"other".to_string()));
}

/// `dms.protocol=devicetwin`: the original DMS gets heartbeats without
/// hashes and the unversioned list array.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_original_dms_gets_the_unversioned_list_and_no_hashes() {
    let s = setup(&[
        ("IOT_AGENT_DMS__PROTOCOL", "devicetwin".to_string()),
        ("IOT_AGENT_DMS__HEARTBEAT__INTERVAL", "1s".to_string()),
    ])
    .await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms.call("l", "list", "", "").await;
    assert!(v.get("version").is_none(), "{v}");
    assert!(v["result"].as_array().unwrap().len() >= 2, "{v}");
    let raw = dms
        .wait(&format!("devices/health/{DEVICE_ID}"), |_| true)
        .await;
    let hb: Value = serde_json::from_slice(&raw).unwrap();
    assert!(hb.get("snapListHash").is_none(), "{hb}");
    assert!(hb["refresh"].is_string(), "{hb}");
}

fn now_rfc3339() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    crate::common::snapd_double::rfc3339(nanos)
}

/// The heartbeat does not depend on snapd: while nothing changes it lists
/// nothing, and with snapd down it still goes out every period with the
/// last known hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_heartbeat_goes_out_without_snapd() {
    use crate::common::snapd_double::Fault;
    let s = setup(&[("IOT_AGENT_DMS__HEARTBEAT__INTERVAL", "1s".to_string())]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let topic = format!("devices/health/{DEVICE_ID}");
    let first: Value = serde_json::from_slice(&dms.wait(&topic, |_| true).await).unwrap();
    assert!(first["snapListHash"].is_string(), "{first}");
    let listings = || {
        s.snapd
            .requests()
            .iter()
            .filter(|r| r.path_and_query == "/v2/snaps")
            .count()
    };
    let before = listings();
    for _ in 0..3 {
        let hb: Value = serde_json::from_slice(&dms.wait(&topic, |_| true).await).unwrap();
        assert_eq!(hb["snapListHash"], first["snapListHash"], "{hb}");
    }
    assert_eq!(
        listings(),
        before,
        "the heartbeat listed the snaps with nothing changed"
    );

    s.snapd.set_fault(Some(Fault::Status500));
    for _ in 0..3 {
        let hb: Value = serde_json::from_slice(&dms.wait(&topic, |_| true).await).unwrap();
        assert_eq!(hb["snapListHash"], first["snapListHash"], "{hb}");
        assert_eq!(
            hb["installedSnapsHash"], first["installedSnapsHash"],
            "{hb}"
        );
    }
}
