//! Per-serial action topics end to end: the real agent on a real
//! nats-server (with its MQTT listener), the snapd double installing.

use crate::common::agent_proc::AgentProcess;
use crate::common::mqtt_client::{connect_and_subscribe, TestMqtt};
use crate::common::servers::{free_port, NatsConfig, NatsServer, NatsUser};
use crate::common::snapd_double::{ChangeMode, SnapdDouble, SERIAL_ASSERTION};
use futures::StreamExt;
use rumqttc::{MqttOptions, QoS};
use serde_json::{json, Value};
use std::time::Duration;

/// `A1B2-c3d4/5` with everything outside `[a-zA-Z0-9_-]` removed.
const SERIAL: &str = "A1B2-c3d45";

struct Setup {
    _dir: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
    nats: NatsServer,
    snapd: SnapdDouble,
    agent: AgentProcess,
}

async fn setup(extra: &[(&'static str, String)]) -> Setup {
    let nats = NatsServer::start(NatsConfig {
        users: vec![
            NatsUser::new("snapd", "agent-pw"),
            NatsUser::new("dms", "dms-pw"),
        ],
        mqtt: true,
        jetstream: true,
        ..Default::default()
    });
    let snapd = SnapdDouble::start().await;
    snapd.set_serial(Some(SERIAL_ASSERTION.to_string()));
    snapd.add_store_snap("other");
    snapd.add_store_snap("third");
    snapd.add_installed("hello-world", "6.4", "29", "latest/stable");
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port())),
        (
            "IOT_AGENT_DIRS__DATA",
            dir.path().join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.path().join("common").display().to_string(),
        ),
        (
            "IOT_AGENT_SNAPD__SOCKET",
            snapd.socket().display().to_string(),
        ),
        ("IOT_AGENT_NATS__URL", nats.url()),
        ("IOT_AGENT_NATS__SNAPD__PASSWORD", "agent-pw".into()),
    ];
    env.extend(extra.iter().cloned());
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("serving per-serial actions on NATS");
    // Requests are refused until the queue is open (a subsystem of its
    // own): wait for it too, unless the test makes it unusable.
    let usable = !extra
        .iter()
        .any(|(k, _)| *k == "IOT_AGENT_REQUIRED__DATABASE__LOCATION");
    if usable && agent.count("per-serial queue open") == 0 {
        agent.wait_for("per-serial queue open");
    }
    Setup {
        _dir: dir,
        env,
        nats,
        snapd,
        agent,
    }
}

async fn nats_client(s: &Setup) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password("dms".into(), "dms-pw".into())
        .connect(s.nats.url())
        .await
        .unwrap()
}

fn topic(sub: &str) -> String {
    format!("devices.actions.{SERIAL}.{sub}")
}

/// The next result on a subscription (bounded wait).
async fn next_result(sub: &mut async_nats::Subscriber) -> Value {
    let m = tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .expect("no result in time")
        .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mqtt_client_of_nats_gets_a_required_snap_installed() {
    let s = setup(&[]).await;
    // An MQTT client of nats-server's MQTT listener, as the DMS side may be.
    let mut opts = MqttOptions::new("dms-mqtt", "127.0.0.1", s.nats.mqtt_port().unwrap());
    opts.set_credentials("dms", "dms-pw");
    let result_topic = format!("devices/actions/{SERIAL}/required-install/result");
    let TestMqtt {
        client,
        messages: mut rx,
    } = connect_and_subscribe(opts, &[&result_topic]).await;
    let req = json!({"id": "r1", "snaps": [{"name": "other", "channel": "edge"}]});
    client
        .publish(
            format!("devices/actions/{SERIAL}/required-install"),
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(&req).unwrap(),
        )
        .await
        .unwrap();
    let (t, payload) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(t, result_topic);
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["id"], "r1");
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["snaps"][0]["name"], "other");
    assert_eq!(v["snaps"][0]["status"], "installed");
    assert!(s.snapd.installed().contains(&"other".to_string()));
    assert_eq!(s.snapd.snap("other").unwrap()["channel"], "latest/edge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_request_twice_installs_once_and_answers_twice() {
    let s = setup(&[]).await;
    let nc = nats_client(&s).await;
    let mut results = nc
        .subscribe(topic("required-install.result"))
        .await
        .unwrap();
    // A single snap object, not an array: both forms work.
    let req = json!({"id": "twice", "snaps": {"name": "other"}}).to_string();
    nc.publish(topic("required-install"), req.clone().into())
        .await
        .unwrap();
    let first = next_result(&mut results).await;
    assert_eq!(first["success"], true, "{first}");
    nc.publish(topic("required-install"), req.into())
        .await
        .unwrap();
    let again = next_result(&mut results).await;
    assert_eq!(again, first);
    // A new id for snaps that are installed: nothing to do, success.
    let req =
        json!({"id": "later", "snaps": [{"name": "other"}, {"name": "hello-world"}]}).to_string();
    nc.publish(topic("required-install"), req.into())
        .await
        .unwrap();
    let v = next_result(&mut results).await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["snaps"][0]["status"], "already-installed");
    let posts = s.snapd.posts_to("/v2/snaps/other");
    assert_eq!(posts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_in_the_middle_resumes_the_install() {
    let mut s = setup(&[]).await;
    s.snapd.set_change_mode(ChangeMode::Manual);
    let nc = nats_client(&s).await;
    let mut results = nc
        .subscribe(topic("required-install.result"))
        .await
        .unwrap();
    let req = json!({"id": "resume", "snaps": [{"name": "other"}, {"name": "third", "track": "2", "channel": "beta"}]});
    // A request (with a reply) is acknowledged once it is stored.
    let ack = nc
        .request(topic("required-install"), req.to_string().into())
        .await
        .unwrap();
    assert_eq!(&ack.payload[..], br#"{"accepted":true}"#);
    s.agent.wait_for("required-install queued");
    // Wait until the first install is under way, then kill the agent hard.
    let change = loop {
        if let Some(c) = s
            .snapd
            .changes()
            .iter()
            .find(|c| c["kind"] == "install-snap" && c["status"] == "Do")
        {
            break c["id"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Killed once the agent recorded it (not merely once snapd made it).
    s.agent
        .wait_for("required-install change started and recorded");
    s.agent.signal("KILL");
    s.agent.wait_exit();
    s.snapd.set_change_mode(ChangeMode::Auto);
    let mut agent = AgentProcess::start(&s.env);
    agent.wait_for("serving per-serial actions on NATS");
    s.snapd.set_change_status(&change, "Done");
    let v = next_result(&mut results).await;
    assert_eq!(v["id"], "resume");
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(
        v["snaps"][0]["change"],
        change.as_str(),
        "the first change was followed, not redone"
    );
    assert_eq!(v["snaps"][1]["status"], "installed");
    assert_eq!(s.snapd.snap("third").unwrap()["channel"], "2/beta");
    let posts = s.snapd.posts_to("/v2/snaps/other");
    assert_eq!(posts, 1, "installed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_payloads_and_unknown_topics_get_a_failed_result() {
    let s = setup(&[]).await;
    let nc = nats_client(&s).await;
    let mut install_results = nc
        .subscribe(topic("required-install.result"))
        .await
        .unwrap();
    let mut other_results = nc.subscribe(topic("reboot-now.result")).await.unwrap();
    for (payload, id, expect) in [
        ("not json", "", "not valid JSON"),
        (
            r#"{"id":"n1","snaps":[{"name":"../../x"}]}"#,
            "n1",
            "snap name",
        ),
        (r#"{"id":"n2"}"#, "n2", "\"snaps\""),
    ] {
        nc.publish(topic("required-install"), payload.to_string().into())
            .await
            .unwrap();
        let v = next_result(&mut install_results).await;
        assert_eq!(v["success"], false, "{v}");
        assert_eq!(v["id"], id);
        assert!(v["message"].as_str().unwrap().contains(expect), "{v}");
    }
    nc.publish(topic("reboot-now"), r#"{"id":"u1"}"#.into())
        .await
        .unwrap();
    let v = next_result(&mut other_results).await;
    assert_eq!(
        (v["id"].as_str(), v["success"].as_bool()),
        (Some("u1"), Some(false))
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("unknown action topic"),
        "{v}"
    );
    assert!(
        s.snapd.requests().iter().all(|r| r.method == "GET"),
        "nothing reached snapd"
    );
}

/// Publishes one required-install on NATS and returns its result.
async fn require(s: &Setup, req: Value) -> Value {
    let nc = nats_client(s).await;
    let mut results = nc
        .subscribe(topic("required-install.result"))
        .await
        .unwrap();
    nc.publish(topic("required-install"), req.to_string().into())
        .await
        .unwrap();
    next_result(&mut results).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snap_on_another_channel_is_switched_unless_configured_not_to() {
    let req = json!({"id": "sw", "snaps": [{"name": "hello-world", "channel": "beta"}]});
    for (env, status, channel) in [
        (vec![], "switched", "latest/beta"),
        (
            vec![("IOT_AGENT_REQUIRED__SWITCH", "false".to_string())],
            "already-installed",
            "latest/stable",
        ),
    ] {
        let s = setup(&env).await;
        let v = require(&s, req.clone()).await;
        assert_eq!(v["snaps"][0]["status"], status, "{v}");
        assert_eq!(s.snapd.snap("hello-world").unwrap()["channel"], channel);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unusable_queue_is_retried_and_requests_are_refused_meanwhile() {
    let mut s = setup(&[(
        "IOT_AGENT_REQUIRED__DATABASE__LOCATION",
        "/dev/null/required.db".into(),
    )])
    .await;
    let line = s.agent.wait_for("subsystem failed; restarting");
    assert!(
        line.contains("required-install") && line.contains("/dev/null"),
        "{line}"
    );
    let nc = nats_client(&s).await;
    let mut results = nc
        .subscribe(topic("required-install.result"))
        .await
        .unwrap();
    let req = json!({"id": "q", "snaps": {"name": "other"}}).to_string();
    nc.publish(topic("required-install"), req.into())
        .await
        .unwrap();
    let v = next_result(&mut results).await;
    assert_eq!(
        (v["id"].as_str(), v["success"].as_bool()),
        (Some("q"), Some(false))
    );
    assert!(
        v["message"].as_str().unwrap().contains("cannot store"),
        "{v}"
    );
    // Everything else keeps running: the agent is still connected and
    // retries the queue.
    s.agent.wait_for("subsystem failed; restarting");
}

/// The required-install dmscore sends (fixture 30: `{"channel":"latest",
/// "track":"stable"}`) installs from `latest/stable`; a snap already on
/// that channel is left alone; an unknown risk never reaches snapd.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dms_channel_pair_installs_from_latest_stable() {
    let s = setup(&[]).await;
    s.snapd.add_store_snap("network-manager");
    let req: Value = serde_json::from_str(&crate::common::fixture(
        "30-DERIVED-required-install-as-dms-sends-it.json",
    ))
    .unwrap();
    let v = require(&s, req).await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["snaps"][0]["status"], "installed", "{v}");
    let post = s
        .snapd
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path_and_query == "/v2/snaps/network-manager")
        .unwrap()
        .json();
    assert_eq!(post["channel"], "latest/stable", "{post}");

    let req = json!({"id": "same", "snaps": [{"name": "hello-world", "channel": "latest", "track": "stable"}]});
    let v = require(&s, req).await;
    assert_eq!(v["snaps"][0]["status"], "already-installed", "{v}");
    assert_eq!(s.snapd.posts_to("/v2/snaps/hello-world"), 0);

    let before = s.snapd.requests().len();
    let req = json!({"id": "bad", "snaps": [{"name": "other", "channel": "latest", "track": "hardened"}]});
    let v = require(&s, req).await;
    assert_eq!(v["success"], false, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("names no risk"),
        "{v}"
    );
    assert!(
        s.snapd.requests()[before..]
            .iter()
            .all(|r| r.method == "GET"),
        "an unknown risk reached snapd"
    );
}

/// The queue's SQLite write (`synchronous=FULL`, an fsync) runs off the
/// async runtime, so a slow or locked disk stalls only that request. The
/// agent runs on ONE thread here (`runtime.workers=1`) and the test holds
/// the queue's write lock: had the write run on the runtime, it would hold
/// the only thread in SQLite's busy wait, the mirror could not answer until
/// the wait gave up (5 s), and the request would then be refused. Off the
/// runtime, the mirror answers while the lock is held, the lock is let go,
/// and the request is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_queue_database_stalls_no_other_request_on_a_one_thread_runtime() {
    let mut s = setup(&[
        ("IOT_AGENT_RUNTIME__WORKERS", "1".into()),
        (
            "IOT_AGENT_LOG__LEVEL",
            "iot_agent::services::per_serial=debug,info".into(),
        ),
    ])
    .await;
    let db = s._dir.path().join("data").join("required.db");
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let nc = nats_client(&s).await;
    let req = json!({"id": "locked", "snaps": [{"name": "other"}]}).to_string();
    let pending = tokio::spawn({
        let nc = nc.clone();
        async move { nc.request(topic("required-install"), req.into()).await }
    });
    // Its last line before the write: from here the write waits on the lock.
    s.agent.wait_for("storing a required-install");
    let info = tokio::time::timeout(
        Duration::from_secs(60),
        nc.request("snapd.v2.system-info.get", "".into()),
    )
    .await
    .expect("the mirror did not answer while the queue was locked")
    .unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["status-code"], 200, "{info}");
    lock.execute_batch("ROLLBACK").unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("no answer to the required-install")
        .unwrap()
        .unwrap();
    let answer: Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["accepted"], true, "{answer}");
}
