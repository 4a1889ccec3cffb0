//! The snapd mirror against a real nats-server and the snapd double: the
//! generic subjects, the wrappers, change events, every agent error kind,
//! read-only mode, the reference agent's subjects, micro-service discovery,
//! authorization, and MQTT clients through nats-server's MQTT listener.

use crate::common::agent_proc::AgentProcess;
use crate::common::servers::{free_port, NatsConfig, NatsServer, NatsUser};
use crate::common::snapd_double::{ChangeMode, Fault, SnapdDouble, MODEL_ASSERTION};
use crate::common::unix_http;
use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use iot_agent::bus::{ConnectionStatus, Nats, StatusTx};
use iot_agent::services::mirror::{follow::FollowPolicy, Mirror, Settings};
use iot_agent::snapd::{self, RetryPolicy};
use iot_agent::subsystems::changes::Poller;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The shipped example configuration and its placeholder passwords.
const EXAMPLE_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/nats-server.conf");
const EXAMPLE_AGENT_PASSWORD: &str = "change this agent password";
const EXAMPLE_DEVICE_PASSWORD: &str = "change this device password";
const PASSWORD: &str = "mirror-test-password";
/// Bound on every wait of these tests (not a timing assertion: a healthy
/// run answers in milliseconds).
const WAIT: Duration = Duration::from_secs(15);

struct Rig {
    nats: NatsServer,
    snapd: SnapdDouble,
    /// A requester as an authorized user.
    client: Client,
    mqtt_status: StatusTx,
    shutdown: CancellationToken,
    _task: tokio::task::JoinHandle<()>,
}

struct Opts {
    read_only: bool,
    timeout: Duration,
    /// Point the mirror here instead of at the double.
    socket: Option<PathBuf>,
    example_conf: bool,
    /// Run the shared change poller the mirror follows its changes through
    /// (its reads of snapd would show among the requests the other tests
    /// count).
    poller: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            read_only: false,
            timeout: Duration::from_secs(5),
            socket: None,
            example_conf: false,
            poller: false,
        }
    }
}

async fn connect(url: &str, user: &str, password: &str) -> Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .request_timeout(Some(WAIT))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect as {user}: {e}"))
}

async fn rig(opts: Opts) -> Rig {
    // Blocking start-up first, before the double runs on this runtime.
    let (nats, password) = if opts.example_conf {
        let n = NatsServer::start(NatsConfig {
            include: Some(EXAMPLE_CONF.into()),
            ..Default::default()
        });
        (n, EXAMPLE_AGENT_PASSWORD)
    } else {
        let n = NatsServer::start(NatsConfig {
            users: vec![NatsUser::new("snapd", PASSWORD)],
            ..Default::default()
        });
        (n, PASSWORD)
    };
    let double = SnapdDouble::start().await;
    let socket = opts.socket.clone().unwrap_or_else(|| double.socket());
    let snapd = snapd::Client::new(&socket, opts.timeout).with_retry(RetryPolicy {
        get_retries: 1,
        conflict_retries: 0,
        base_delay: Duration::from_millis(10),
    });
    let bus = Nats::connect(
        &crate::common::agent_nats_config(&nats.url(), password),
        "mirror-under-test",
    )
    .await
    .unwrap();
    let (mqtt_status, mqtt_rx) = iot_agent::bus::status::mqtt_status_channel();
    let settings = Settings {
        read_only: opts.read_only,
        own_snap: "iot-agent".into(),
        timeout: opts.timeout,
        max_in_flight: 16,
        follow: FollowPolicy {
            first_look: Duration::from_millis(50),
            ..Default::default()
        },
    };
    let shutdown = CancellationToken::new();
    // The shared change poller the mirror follows its changes through, run
    // as the agent runs it when the test follows changes.
    let poller = Arc::new(Poller::new(snapd.clone(), Duration::from_secs(60)));
    if opts.poller {
        let (p, token) = (poller.clone(), shutdown.clone());
        tokio::spawn(iot_agent::supervisor::Subsystem::run(p, token.into()));
    }
    let mirror = Mirror::new(bus, snapd, poller, settings, mqtt_rx);
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        use iot_agent::supervisor::Subsystem;
        mirror.run(token.into()).await.expect("the mirror failed");
    });
    let client = connect(&nats.url(), "snapd", password).await;
    let rig = Rig {
        nats,
        snapd: double,
        client,
        mqtt_status,
        shutdown,
        _task: task,
    };
    rig.wait_ready().await;
    rig
}

impl Rig {
    /// Until the mirror's subscriptions are in place, a request finds no
    /// responders; poll (bounded) until one is answered.
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = self
                .client
                .request("iot.agent.mqtt.connection.status", Bytes::new())
                .await;
            if r.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the mirror never answered: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ask_raw(&self, subject: &str, payload: &str) -> Bytes {
        self.client
            .request(subject.to_string(), Bytes::from(payload.to_string()))
            .await
            .unwrap_or_else(|e| panic!("no answer on {subject}: {e}"))
            .payload
    }

    async fn ask(&self, subject: &str, payload: &str) -> Value {
        let raw = self.ask_raw(subject, payload).await;
        serde_json::from_slice(&raw).unwrap_or_else(|e| {
            panic!(
                "answer on {subject} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&raw)
            )
        })
    }

    /// The same request straight to the double.
    async fn direct(&self, method: &str, path: &str, body: Option<&[u8]>) -> Bytes {
        let r = unix_http(&self.snapd.socket(), method, path, body, WAIT)
            .await
            .unwrap();
        Bytes::from(r.body)
    }

    fn paths_seen(&self) -> Vec<String> {
        self.snapd
            .requests()
            .into_iter()
            .map(|r| format!("{} {}", r.method, r.path_and_query))
            .collect()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn assert_agent_error(v: &Value, kind: &str, status: u64) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["result"]["kind"], kind, "{v}");
    assert_eq!(v["status-code"], status, "{v}");
    assert!(
        !v["result"]["message"].as_str().unwrap_or("").is_empty(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_post_put_with_bodies_and_queries_pass_through() {
    let rig = rig(Opts::default()).await;
    rig.snapd
        .add_installed("hello", "1.0", "3", "latest/stable");
    rig.snapd.add_store_snap("world");

    // GET: snapd's envelope, byte for byte.
    let via_nats = rig.ask_raw("snapd.v2.snaps.hello.get", "").await;
    let direct = rig.direct("GET", "/v2/snaps/hello", None).await;
    assert_eq!(via_nats, direct);

    // GET with a query (lists joined with ',', values escaped).
    let v = rig
        .ask(
            "snapd.v2.changes.get",
            r#"{"query":{"select":"all","for":"hello"}}"#,
        )
        .await;
    assert_eq!(v["type"], "sync", "{v}");
    assert!(rig
        .paths_seen()
        .contains(&"GET /v2/changes?for=hello&select=all".to_string()));

    // PUT with a body: snapd starts a configure change.
    let v = rig
        .ask(
            "snapd.v2.snaps.hello.conf.put",
            r#"{"body":{"port":8080,"name":"x"}}"#,
        )
        .await;
    assert_eq!(v["type"], "async", "{v}");
    assert_eq!(rig.snapd.conf("hello"), json!({"port":8080,"name":"x"}));
    let v = rig
        .ask(
            "snapd.v2.snaps.hello.conf.get",
            r#"{"query":{"keys":["port"]}}"#,
        )
        .await;
    assert_eq!(v["result"], json!({"port":8080}), "{v}");

    // POST with a body: an install that succeeds.
    let v = rig
        .ask(
            "snapd.v2.snaps.world.post",
            r#"{"body":{"action":"install","channel":"stable"}}"#,
        )
        .await;
    assert_eq!(v["type"], "async", "{v}");
    assert_eq!(v["status-code"], 202);
    assert!(v["change"].as_str().is_some(), "{v}");
    assert!(rig.snapd.installed().contains(&"world".to_string()));
    let post = rig
        .snapd
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    assert_eq!(post.path_and_query, "/v2/snaps/world");
    assert_eq!(post.json(), json!({"action":"install","channel":"stable"}));

    // snapd's own errors pass through unchanged too.
    let v = rig.ask("snapd.v2.snaps.nope.get", "").await;
    assert_eq!(v["type"], "error");
    assert_eq!(v["result"]["kind"], "snap-not-found", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assertions_and_logs_come_in_the_documented_wrappers() {
    let rig = rig(Opts::default()).await;
    let v = rig.ask("snapd.v2.model.get", "").await;
    let text = String::from_utf8(rig.direct("GET", "/v2/model", None).await.to_vec()).unwrap();
    assert!(text.starts_with(MODEL_ASSERTION));
    assert_eq!(
        v,
        json!({"type":"sync","status-code":200,"status":"OK","result":text,
               "content-type":"application/x.ubuntu.assertion"})
    );
    let v = rig.ask("snapd.v2.assertions.model.get", "").await;
    assert_eq!(v["content-type"], "application/x.ubuntu.assertion");
    assert!(v["result"].as_str().unwrap().starts_with("type: model"));

    rig.snapd
        .add_installed("hello", "1.0", "3", "latest/stable");
    rig.snapd.add_service("hello", "svc", true);
    rig.snapd.add_log("hello.svc", "first");
    rig.snapd.add_log("hello.svc", "second");
    let v = rig
        .ask(
            "snapd.v2.logs.get",
            r#"{"query":{"names":"hello.svc","n":2}}"#,
        )
        .await;
    assert_eq!(v["content-type"], "application/json-seq", "{v}");
    let messages: Vec<&str> = v["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(messages, ["first", "second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_change_is_followed_on_its_event_subject() {
    let rig = rig(Opts {
        poller: true,
        ..Default::default()
    })
    .await;
    rig.snapd.set_change_mode(ChangeMode::Manual);
    rig.snapd.add_store_snap("world");
    let mut events = rig
        .client
        .subscribe("snapd.events.changes.>")
        .await
        .unwrap();
    rig.client.flush().await.unwrap();

    let v = rig
        .ask(
            "snapd.v2.snaps.world.post",
            r#"{"body":{"action":"install"}}"#,
        )
        .await;
    let id = v["change"].as_str().unwrap().to_string();
    let subject = format!("snapd.events.changes.{id}");

    let mut next = async || {
        let m = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("no change event")
            .unwrap();
        assert_eq!(m.subject.as_str(), subject);
        serde_json::from_slice::<Value>(&m.payload).unwrap()
    };
    let e = next().await;
    assert_eq!(
        (e["id"].as_str(), e["status"].as_str()),
        (Some(&*id), Some("Do"))
    );
    assert_eq!(e["ready"], false);
    assert_eq!(e["kind"], "install-snap");

    rig.snapd.set_change_status(&id, "Doing");
    assert_eq!(next().await["status"], "Doing");
    rig.snapd.set_change_status(&id, "Done");
    let e = next().await;
    assert_eq!(
        (e["status"].as_str(), e["ready"].as_bool()),
        (Some("Done"), Some(true))
    );
    assert!(e["ready-time"].as_str().is_some(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_never_reach_snapd_get_agent_error_envelopes() {
    let rig = rig(Opts {
        timeout: Duration::from_millis(700),
        ..Default::default()
    })
    .await;
    for subject in [
        "snapd.v2.snaps.patch",
        "snapd.v2.get",
        "snapd.v2.snaps",
        "snapd.v2.snaps.a%2Fb.get",
    ] {
        let v = rig.ask(subject, "").await;
        assert_agent_error(&v, "agent-bad-subject", 404);
    }
    for payload in [
        "not json",
        r#"{"action":"install"}"#,
        r#"{"query":{"a":{"b":1}}}"#,
        r#"{"reply-to":"devices.pub.x"}"#,
    ] {
        let v = rig.ask("snapd.v2.snaps.post", payload).await;
        assert_agent_error(&v, "agent-bad-request", 400);
    }
    // Nothing above reached snapd.
    assert!(rig.paths_seen().is_empty(), "{:?}", rig.paths_seen());

    // snapd answers garbage.
    rig.snapd.set_fault(Some(Fault::Garbage));
    let v = rig.ask("snapd.v2.system-info.get", "").await;
    assert_agent_error(&v, "agent-bad-response", 502);

    // snapd is slow: the answer comes at nats.timeout, not the client's.
    rig.snapd
        .set_fault(Some(Fault::Slow(Duration::from_secs(30))));
    let v = rig.ask("snapd.v2.system-info.get", "").await;
    assert_agent_error(&v, "agent-timeout", 504);
    rig.snapd.set_fault(None);

    // An answer larger than the server's max_payload (1 MiB by default).
    rig.snapd.add_installed("big", "1.0", "1", "latest/stable");
    rig.snapd
        .set_conf("big", json!({"blob": "x".repeat(1_200_000)}));
    let v = rig.ask("snapd.v2.snaps.big.conf.get", "").await;
    assert_agent_error(&v, "agent-too-large", 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapd_down_is_an_error_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let rig = rig(Opts {
        socket: Some(dir.path().join("missing.socket")),
        ..Default::default()
    })
    .await;
    let v = rig.ask("snapd.v2.system-info.get", "").await;
    assert_agent_error(&v, "agent-snapd-unreachable", 503);
    assert!(v["result"]["message"]
        .as_str()
        .unwrap()
        .contains("missing.socket"));
    // The compat subjects answer in their own shape.
    let v = rig.ask("v1.snapd.v2.snaps.get", "{}").await;
    assert!(
        v["error"].as_str().unwrap().contains("cannot reach snapd"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_does_not_hold_up_the_others() {
    let rig = rig(Opts {
        timeout: Duration::from_secs(20),
        ..Default::default()
    })
    .await;
    rig.snapd
        .set_fault(Some(Fault::Slow(Duration::from_secs(15))));
    let client = rig.client.clone();
    let mut slow = tokio::spawn(async move {
        client
            .request("snapd.v2.system-info.get", Bytes::new())
            .await
    });
    // Once snapd holds the slow request, clear the fault: the next request
    // must be answered while the first is still waiting.
    let deadline = tokio::time::Instant::now() + WAIT;
    while rig.snapd.requests().is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.snapd.set_fault(None);
    let v = rig.ask("snapd.v2.snaps.get", "").await;
    assert_eq!(v["type"], "sync");
    assert!(
        futures::poll!(&mut slow).is_pending(),
        "the slow request finished first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_agent_subjects_keep_their_shapes() {
    let rig = rig(Opts::default()).await;
    rig.snapd
        .add_installed("hello", "1.0", "3", "latest/stable");
    rig.snapd.add_service("hello", "svc", true);

    let v = rig.ask("v1.snapd.v2.snaps.get", "{}").await;
    let hello = v["snaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "hello")
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_eq!(hello["revision"], "3");
    assert_eq!(hello["version"], "1.0");
    assert_eq!(hello["trackingChannel"], "latest/stable");
    assert!(hello["installDate"].as_str().is_some(), "{hello}");
    assert_eq!(
        hello["apps"],
        json!([{"active":true,"daemon":"simple","enabled":true,"name":"svc"}])
    );
    assert!(hello.get("tracking-channel").is_none(), "camelCase only");
    // All revisions, as the reference agent asked for them.
    assert!(
        rig.snapd
            .requests()
            .iter()
            .any(|r| r.path_and_query == "/v2/snaps?select=all"),
        "{:?}",
        rig.snapd
            .requests()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    );

    let v = rig
        .ask(
            "v1.snapd.v2.snaps.hello.post",
            r#"{"action":"switch","channel":"beta"}"#,
        )
        .await;
    let id = v["changeId"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(v.get("error").is_none(), "{v}");
    assert_eq!(rig.snapd.change(id).unwrap()["kind"], "switch-snap");
    assert_eq!(
        rig.snapd.snap("hello").unwrap()["tracking-channel"],
        "latest/beta"
    );

    let v = rig
        .ask("v1.snapd.v2.snaps.hello.post", r#"{"action":"dance"}"#)
        .await;
    assert_eq!(v, json!({"changeId":"-1","error":"Invalid action"}));
    let v = rig
        .ask(
            "v1.snapd.v2.snaps.NOT_A_SNAP.post",
            r#"{"action":"switch"}"#,
        )
        .await;
    assert_eq!(v["changeId"], "-1");
    assert!(v["error"].as_str().unwrap().contains("snap name"), "{v}");

    let v = rig
        .ask(
            "v1.snapd.v2.apps.post",
            r#"{"action":"stop","names":["hello.svc"]}"#,
        )
        .await;
    assert!(v["changeId"].as_str().is_some(), "{v}");
    let v = rig
        .ask(
            "v1.snapd.v2.apps.post",
            r#"{"action":"explode","names":[]}"#,
        )
        .await;
    assert!(v["error"].as_str().unwrap().contains("supported"), "{v}");
    assert!(v.get("changeId").is_none(), "{v}");

    let v = rig
        .ask("v1.snapd.v2.assertions.get", r#"{"type":"model"}"#)
        .await;
    assert_eq!(v["stream"].as_str().unwrap().trim_end(), MODEL_ASSERTION);
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let v = rig
        .ask("v1.snapd.v2.assertions.get", r#"{"type":"../x"}"#)
        .await;
    assert!(
        v["error"].as_str().unwrap().contains("assertion type"),
        "{v}"
    );

    let v = rig.ask("iot.agent.mqtt.connection.status", "").await;
    assert_eq!(v["connected"], false);
    assert!(v["errorInfo"]["message"]
        .as_str()
        .unwrap()
        .contains("not established"));
    rig.mqtt_status.send(ConnectionStatus::connected()).unwrap();
    let v = rig.ask("iot.agent.mqtt.connection.status", "{}").await;
    assert_eq!(v, json!({"connected":true}));
    rig.mqtt_status
        .send(ConnectionStatus::disconnected(
            "broker refused the certificate",
        ))
        .unwrap();
    let v = rig.ask("iot.agent.mqtt.connection.status", "").await;
    assert_eq!(
        v,
        json!({"connected":false,"errorInfo":{"message":"broker refused the certificate"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_is_a_discoverable_micro_service() {
    let rig = rig(Opts::default()).await;
    rig.ask("snapd.v2.system-info.get", "").await;

    let ping = rig.ask("$SRV.PING", "").await;
    assert_eq!(ping["name"], "iot-agent", "{ping}");
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");

    let info = rig.ask("$SRV.INFO.iot-agent", "").await;
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    for s in [
        "snapd.v2.>",
        "v1.snapd.v2.snaps.get",
        "v1.snapd.v2.snaps.*.post",
        "iot.agent.mqtt.connection.status",
    ] {
        assert!(subjects.contains(&s), "{s} not in {subjects:?}");
    }

    let stats = rig.ask("$SRV.STATS.iot-agent", "").await;
    let mirror = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["subject"] == "snapd.v2.>")
        .unwrap()
        .clone();
    assert!(mirror["num_requests"].as_u64().unwrap() >= 1, "{mirror}");
}

/// The shipped example configuration, on a real nats-server: the `device`
/// user cannot get a request to snapd through the agent, nor read the
/// agent's events, while its own subjects work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_permission_cannot_reach_snapd() {
    let rig = rig(Opts {
        example_conf: true,
        ..Default::default()
    })
    .await;
    let device = async_nats::ConnectOptions::with_user_and_password(
        "device".into(),
        EXAMPLE_DEVICE_PASSWORD.into(),
    )
    .request_timeout(Some(Duration::from_secs(2)))
    .connect(rig.nats.url())
    .await
    .unwrap();

    // Its own subjects work (the connection is fine).
    let mut own = device.subscribe("app.echo").await.unwrap();
    let responder = device.clone();
    tokio::spawn(async move {
        while let Some(m) = own.next().await {
            let _ = responder.publish(m.reply.unwrap(), m.payload).await;
        }
    });
    let echoed = device
        .request("app.echo", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    assert_eq!(&echoed.payload[..], b"hi");

    // Requests the agent would execute, were they delivered.
    let attempts = [
        (
            "snapd.v2.snaps.hello.post",
            r#"{"body":{"action":"remove"}}"#,
        ),
        ("v1.snapd.v2.snaps.hello.post", r#"{"action":"switch"}"#),
        (
            "v1.snapd.v2.apps.post",
            r#"{"action":"stop","names":["x"]}"#,
        ),
        ("$SRV.PING", ""),
    ]
    .map(|(subject, payload)| {
        let device = device.clone();
        async move {
            let r = device
                .request(subject, Bytes::from_static(payload.as_bytes()))
                .await;
            assert!(r.is_err(), "{subject} answered: {r:?}");
        }
    });
    futures::future::join_all(attempts).await;

    // The agent's own user is served on the same server; once its request
    // is answered, nothing from the device user has reached snapd.
    let v = rig.ask("snapd.v2.system-info.get", "").await;
    assert_eq!(v["type"], "sync");
    assert_eq!(rig.paths_seen(), ["GET /v2/system-info"]);
}

/// An MQTT client (mosquitto's CLI) through nats-server's MQTT listener,
/// configured by the shipped example: it publishes on `snapd/v2/...` with a
/// `reply-to` and reads the envelope on `snapd/reply/{token}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_client_reaches_the_mirror_with_a_reply_topic() {
    let rig = rig(Opts {
        example_conf: true,
        ..Default::default()
    })
    .await;
    rig.snapd
        .add_installed("hello", "1.0", "3", "latest/stable");
    let port = rig.nats.mqtt_port().unwrap();

    let answer = tokio::task::spawn_blocking(move || {
        let mut sub = MqttSubscriber::start(port, "snapd/reply/mqtt-client-1");
        mosquitto_pub(
            port,
            "snapd/v2/snaps/hello/get",
            r#"{"reply-to":"snapd/reply/mqtt-client-1"}"#,
        );
        let first = sub.next_message();
        // A refused request answers on the reply topic too.
        mosquitto_pub(
            port,
            "snapd/v2/snaps/hello/patch",
            r#"{"reply-to":"snapd/reply/mqtt-client-1"}"#,
        );
        (first, sub.next_message())
    })
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&answer.0).unwrap();
    assert_eq!(v["type"], "sync", "{v}");
    assert_eq!(v["result"]["name"], "hello");
    let v: Value = serde_json::from_str(&answer.1).unwrap();
    assert_agent_error(&v, "agent-bad-subject", 404);
}

fn mosquitto_pub(port: u16, topic: &str, message: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-u", "snapd", "-P", EXAMPLE_AGENT_PASSWORD])
        .args(["-q", "1", "-t", topic, "-m", message])
        .output()
        .expect("mosquitto_pub is installed");
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
}

/// `mosquitto_sub -d` in the background, its stdout read as events: the
/// SUBACK line says the subscription is in place.
struct MqttSubscriber {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl MqttSubscriber {
    fn start(port: u16, topic: &str) -> MqttSubscriber {
        use std::io::BufRead;
        // Line-buffered: its stdout is a pipe, and the SUBACK line must
        // arrive before anything is published.
        let mut child = Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-u", "snapd", "-P", EXAMPLE_AGENT_PASSWORD])
            .args(["-d", "-q", "1", "-t", topic])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub is installed");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut s = MqttSubscriber { child, lines };
        s.wait_line(|l| l.contains("SUBACK"));
        s
    }

    fn wait_line(&mut self, want: impl Fn(&str) -> bool) -> String {
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(l) if want(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("mosquitto_sub: no expected line ({e})"),
            }
        }
    }

    /// The next payload (the JSON line; `-d` adds protocol lines around it).
    fn next_message(&mut self) -> String {
        self.wait_line(|l| l.starts_with('{'))
    }
}

impl Drop for MqttSubscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary wires the mirror in and reads `nats.readonly` and
/// `nats.timeout`: reads are served, writes refused before snapd sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_the_mirror_read_only_when_configured() {
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", PASSWORD)],
        ..Default::default()
    });
    let double = SnapdDouble::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(dir.path(), &double.socket(), &nats.url());
    let mut agent = tokio::task::spawn_blocking(move || {
        let mut a = AgentProcess::start(&env);
        a.wait_for("snapd mirror serving");
        a
    })
    .await
    .unwrap();
    let client = connect(&nats.url(), "snapd", PASSWORD).await;
    let ask = async |subject: &str, payload: &'static str| -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            // Retry only "no responders" while the subscriptions settle.
            match client
                .request(subject.to_string(), Bytes::from_static(payload.as_bytes()))
                .await
            {
                Ok(m) => return serde_json::from_slice(&m.payload).unwrap(),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{subject}: {e}"),
            }
        }
    };
    let v = ask("snapd.v2.system-info.get", "").await;
    assert_eq!(v["type"], "sync", "{v}");
    let v = ask(
        "snapd.v2.snaps.hello.post",
        r#"{"body":{"action":"remove"}}"#,
    )
    .await;
    assert_agent_error(&v, "agent-read-only", 403);
    let v = ask(
        "v1.snapd.v2.apps.post",
        r#"{"action":"stop","names":["x"]}"#,
    )
    .await;
    assert!(v["error"].as_str().unwrap().contains("read-only"), "{v}");
    assert!(double.requests().iter().all(|r| r.method == "GET"));

    tokio::task::spawn_blocking(move || {
        agent.signal("TERM");
        assert!(agent.wait_exit().success());
        assert_eq!(agent.count(PASSWORD), 0, "the password reached the log");
    })
    .await
    .unwrap();
}

fn agent_env(dir: &Path, socket: &Path, nats_url: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "IOT_AGENT_DIRS__DATA",
            dir.join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.join("common").display().to_string(),
        ),
        ("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port())),
        ("IOT_AGENT_SNAPD__SOCKET", socket.display().to_string()),
        ("IOT_AGENT_NATS__URL", nats_url.to_string()),
        ("IOT_AGENT_NATS__SNAPD__PASSWORD", PASSWORD.to_string()),
        ("IOT_AGENT_NATS__READONLY", "true".to_string()),
        ("IOT_AGENT_NATS__TIMEOUT", "3s".to_string()),
    ]
}

/// Every subject the agent serves or publishes on the device-local NATS,
/// from the code's own tables (the AsyncAPI test reads the same ones), with
/// sample values for their parameters; the export intake is left out: it
/// is meant for every application.
fn agent_subjects() -> Vec<String> {
    let intake = format!("{}.", iot_agent::config::ExportConfig::default().subject);
    iot_agent::services::mirror::endpoints::all()
        .into_iter()
        .map(|e| e.address)
        .chain(iot_agent::services::per_serial::documented_addresses())
        .chain(iot_agent::subsystems::export::documented_addresses())
        .chain(iot_agent::subsystems::changes::watchdog::documented_addresses())
        .chain(iot_agent::services::terminal::nats_addresses())
        .chain(iot_agent::services::browser::nats_addresses())
        .filter(|a| !a.starts_with(&intake))
        .map(|a| {
            a.replace("{path}", "snaps.hello")
                .replace("{method}", "post")
                .replace("{snap}", "hello")
                .replace("{id}", "42")
                .replace("{token}", "t-1")
                .replace("{serial}", "SERIAL1")
                .replace("{session}", "0a1b2c")
        })
        .collect()
}

/// Every subject tree the agent serves is protected, and the shipped
/// example configuration keeps the `device` user out of each, on a real
/// nats-server: both its publish and its subscription there are refused as
/// permission violations. A tree added to the code without protection
/// fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_configuration_denies_every_tree_the_agent_serves() {
    use iot_agent::bus::topics;
    let subjects = agent_subjects();
    assert!(subjects.len() >= 10, "{subjects:?}");
    let unprotected: Vec<_> = subjects
        .iter()
        .filter(|s| !topics::is_protected(s))
        .collect();
    assert!(
        unprotected.is_empty(),
        "served outside PROTECTED_TREES: {unprotected:?}"
    );

    let nats = NatsServer::start(NatsConfig {
        include: Some(EXAMPLE_CONF.into()),
        ..Default::default()
    });
    let (tx, mut violations) = tokio::sync::mpsc::unbounded_channel::<String>();
    let device = async_nats::ConnectOptions::with_user_and_password(
        "device".into(),
        EXAMPLE_DEVICE_PASSWORD.into(),
    )
    .event_callback(move |e| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = e {
                let _ = tx.send(e.to_string().to_lowercase());
            }
        }
    })
    .connect(nats.url())
    .await
    .unwrap();
    // What the agent's own user would receive there.
    let agent = connect(&nats.url(), "snapd", EXAMPLE_AGENT_PASSWORD).await;
    let mut agent_sub = agent.subscribe(">").await.unwrap();
    agent.flush().await.unwrap();

    for subject in &subjects {
        for (what, op) in [("publish", 0), ("subscription", 1)] {
            if op == 0 {
                device
                    .publish(subject.clone(), Bytes::from_static(b"{}"))
                    .await
                    .unwrap();
            } else {
                let _sub = device.subscribe(subject.clone()).await.unwrap();
            }
            device.flush().await.unwrap();
            // async-nats lower-cases the server's error text.
            let want = format!("permissions violation for {what} to \"{subject}\"").to_lowercase();
            loop {
                let got = tokio::time::timeout(WAIT, violations.recv())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("the device user's {what} on {subject} was not refused")
                    })
                    .unwrap();
                if got.contains(&want) {
                    break;
                }
            }
        }
    }
    // Nothing the device user published reached a subscriber; a marker
    // from the agent's user is the first message it sees.
    agent.publish("snapd.marker", Bytes::new()).await.unwrap();
    let first = tokio::time::timeout(WAIT, agent_sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.subject.as_str(), "snapd.marker");

    // The configuration file itself names each tree for both directions.
    let conf = std::fs::read_to_string(EXAMPLE_CONF).unwrap();
    for tree in topics::PROTECTED_TREES {
        let nats_form = iot_agent::bus::Topic::fixed(tree).nats();
        assert_eq!(
            conf.matches(&format!("\"{nats_form}\"")).count(),
            2,
            "{nats_form} must be denied for publish and subscribe"
        );
    }
}

/// A nats-server with no authorization lets every local process in: the
/// agent serves the mirror read-only there, holds the per-serial tree back
/// and says why; `nats.insecure=true` accepts the risk. The reference
/// agent's well-known password counts as no protection either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprotected_server_gets_a_read_only_mirror_unless_insecure_is_set() {
    use crate::common::snapd_double::SERIAL_ASSERTION;
    let open = NatsServer::start(NatsConfig::default());
    let well_known = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new(
            "snapd",
            iot_agent::config::WELL_KNOWN_NATS_PASSWORD,
        )],
        ..Default::default()
    });
    let double = SnapdDouble::start().await;
    double.set_serial(Some(SERIAL_ASSERTION.to_string()));
    double.add_installed("hello", "1.0", "3", "latest/stable");
    let dir = tempfile::tempdir().unwrap();

    let cases = [
        (&open, PASSWORD, false, "requires no authorization"),
        (
            &well_known,
            iot_agent::config::WELL_KNOWN_NATS_PASSWORD,
            false,
            "well-known default",
        ),
        (&open, PASSWORD, true, ""),
    ];
    for (nats, password, insecure, why) in cases {
        let mut env: Vec<_> = agent_env(dir.path(), &double.socket(), &nats.url())
            .into_iter()
            .filter(|(k, _)| !k.ends_with("READONLY") && !k.ends_with("SNAPD__PASSWORD"))
            .collect();
        env.push(("IOT_AGENT_NATS__SNAPD__PASSWORD", password.to_string()));
        env.push(("IOT_AGENT_NATS__INSECURE", insecure.to_string()));
        env.push(("IOT_AGENT_DMS__ENABLED", "false".to_string()));
        let expect = if insecure {
            vec!["snapd mirror serving", "serving per-serial actions on NATS"]
        } else {
            vec!["snapd mirror READ-ONLY", "NOT serving per-serial actions"]
        };
        let mut agent = tokio::task::spawn_blocking(move || {
            let mut a = AgentProcess::start(&env);
            let lines = a.wait_for_all(&expect);
            (a, lines)
        })
        .await
        .unwrap();
        for l in &agent.1 {
            assert!(l.contains(why), "{l}");
        }
        let client = connect(&nats.url(), "snapd", password).await;
        let v: Value = serde_json::from_slice(
            &client
                .request(
                    "snapd.v2.snaps.hello.post",
                    Bytes::from_static(br#"{"body":{"action":"remove"}}"#),
                )
                .await
                .unwrap()
                .payload,
        )
        .unwrap();
        let removed = double.requests().iter().any(|r| r.method == "POST");
        if insecure {
            assert_eq!(v["type"], "async", "{v}");
            assert!(removed);
        } else {
            assert_agent_error(&v, "agent-read-only", 403);
            assert!(
                v["result"]["message"].as_str().unwrap().contains(why),
                "{v}"
            );
            assert!(!removed, "a write reached snapd");
            // Reads are served.
            let v: Value = serde_json::from_slice(
                &client
                    .request("snapd.v2.snaps.hello.get", Bytes::new())
                    .await
                    .unwrap()
                    .payload,
            )
            .unwrap();
            assert_eq!(v["type"], "sync", "{v}");
            // The per-serial tree has no responder.
            let r = client
                .request(
                    "devices.actions.A1B2-c3d45.required-install",
                    Bytes::from_static(br#"{"id":"r1","snaps":[{"name":"x"}]}"#),
                )
                .await;
            assert!(r.is_err(), "{r:?}");
        }
        tokio::task::spawn_blocking(move || {
            agent.0.signal("TERM");
            assert!(agent.0.wait_exit().success());
        })
        .await
        .unwrap();
    }
}

/// The agent's own root-relevant keys cannot be set through the mirror
/// (every spelling), while its other keys and other snaps' keys can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_reboot_command_cannot_be_set_through_the_mirror() {
    let rig = rig(Opts::default()).await;
    for body in [
        r#"{"body":{"watchdog.reboot.command":"id > /tmp/pwned"}}"#,
        r#"{"body":{"watchdog":{"reboot":{"command":"id"}}}}"#,
        r#"{"body":{"nats.insecure":true}}"#,
    ] {
        let v = rig.ask("snapd.v2.snaps.iot-agent.conf.put", body).await;
        assert_agent_error(&v, "agent-forbidden", 403);
    }
    assert!(rig.paths_seen().is_empty(), "{:?}", rig.paths_seen());
    let v = rig
        .ask(
            "snapd.v2.snaps.iot-agent.conf.put",
            r#"{"body":{"watchdog.threshold":"2h"}}"#,
        )
        .await;
    assert_ne!(v["result"]["kind"], "agent-forbidden", "{v}");
    let v = rig
        .ask(
            "snapd.v2.snaps.other.conf.put",
            r#"{"body":{"watchdog.reboot.command":"x"}}"#,
        )
        .await;
    assert_ne!(v["result"]["kind"], "agent-forbidden", "{v}");
    assert_eq!(
        rig.paths_seen(),
        ["PUT /v2/snaps/iot-agent/conf", "PUT /v2/snaps/other/conf"]
    );
}

/// `v1.snapd.v2.snaps.get` lists every revision (`select=all`), as the
/// reference agent did: after a refresh, the previous revision too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_snap_list_has_every_revision() {
    let rig = rig(Opts::default()).await;
    rig.snapd
        .add_installed("hello", "1.0", "3", "latest/stable");
    rig.snapd.add_store_snap_version("hello", "1.1", "4");
    let v = rig
        .ask("v1.snapd.v2.snaps.hello.post", r#"{"action":"refresh"}"#)
        .await;
    assert!(v.get("error").is_none(), "{v}");
    let v = rig.ask("v1.snapd.v2.snaps.get", "{}").await;
    let mut revisions: Vec<(String, String)> = v["snaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "hello")
        .map(|s| {
            (
                s["revision"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    revisions.sort();
    assert_eq!(
        revisions,
        [
            ("3".to_string(), "installed".to_string()),
            ("4".to_string(), "active".to_string())
        ],
        "{v}"
    );
}
