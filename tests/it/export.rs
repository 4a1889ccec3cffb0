//! Export end to end: the real `iot-agent` binary between a device-local
//! nats-server (intake) and a real upstream (nats-server with JetStream,
//! mosquitto), with the upstream stopped mid-stream and the agent killed
//! with SIGKILL while producers send. Every acknowledged message must
//! arrive, in order, with no gap; duplicates only where the upstream cannot
//! de-duplicate (MQTT), and no more than the agent counted as re-sent.

use crate::common::agent_proc::{run_once, AgentProcess};
use crate::common::poll_until;
use crate::common::servers::{free_port, Mosquitto, NatsConfig, NatsServer, NatsUser};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const AGENT_PASSWORD: &str = "agent-pw";
const APP_PASSWORD: &str = "app-pw";
/// Upstream JetStream stream the agent creates (`export.upstream.stream`).
const JS_STREAM: &str = "TELEMETRY";

/// The device-local NATS: the agent's user, and an application that may
/// only publish into the intake (and receive its answers).
fn local_nats() -> NatsServer {
    NatsServer::start(NatsConfig {
        users: vec![
            NatsUser::new("snapd", AGENT_PASSWORD),
            NatsUser::new("app", APP_PASSWORD)
                .publish(vec!["export.>"])
                .subscribe(vec!["_INBOX.>"]),
        ],
        ..Default::default()
    })
}

fn agent_env(
    dir: &Path,
    local: &NatsServer,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut env = vec![
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
            "IOT_AGENT_SNAPD__SOCKET",
            dir.join("no-snapd.socket").display().to_string(),
        ),
        ("IOT_AGENT_NATS__URL", local.url()),
        ("IOT_AGENT_NATS__SNAPD__PASSWORD", AGENT_PASSWORD.into()),
        ("IOT_AGENT_EXPORT__ENABLED", "true".into()),
        ("IOT_AGENT_EXPORT__STATUS__INTERVAL", "200ms".into()),
        ("IOT_AGENT_EXPORT__BATCH__FORWARD", "64".into()),
    ];
    env.extend(extra.iter().cloned());
    env
}

fn start_agent(env: &[(&'static str, String)]) -> AgentProcess {
    let mut agent = AgentProcess::start(env);
    agent.wait_for("export intake listening");
    agent
}

fn kill_and_restart(agent: &mut AgentProcess, env: &[(&'static str, String)]) {
    agent.signal("KILL");
    agent.wait_exit();
    *agent = start_agent(env);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn app_client(local: &NatsServer) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password("app".into(), APP_PASSWORD.into())
        .request_timeout(Some(Duration::from_secs(3)))
        .connect(local.url())
        .await
        .unwrap()
}

fn payload(i: u64) -> String {
    // ~200 bytes, the number first.
    format!("{i:08}:{}", "x".repeat(190))
}

fn number(p: &[u8]) -> u64 {
    std::str::from_utf8(&p[..8]).unwrap().parse().unwrap()
}

/// Sends `from..to` on `export.{stream}` as requests, each retried until the
/// agent answers ok (it may be dead or restarting). Returns how many
/// retries happened after an unanswered request: the message may then be
/// spooled twice, which is the producer's duplicate, not the agent's.
async fn produce(
    client: &async_nats::Client,
    stream: &str,
    from: u64,
    to: u64,
    progress: &AtomicU64,
) -> u64 {
    let subject = format!("export.{stream}");
    let mut ambiguous = 0;
    for i in from..to {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "message {i} never acknowledged");
            match client.request(subject.clone(), payload(i).into()).await {
                Ok(m) => {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    assert_eq!(v["ok"], true, "{v}");
                    break;
                }
                Err(e) => {
                    if e.kind() == async_nats::RequestErrorKind::TimedOut {
                        ambiguous += 1;
                    }
                    // The agent is down or restarting: retry (back-off only).
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        progress.store(i + 1, Ordering::SeqCst);
    }
    ambiguous
}

/// Every number 0..n in order with no gap; a number at or below the highest
/// seen so far is a duplicate. Returns the duplicates.
fn check_in_order(received: &[u64], n: u64) -> u64 {
    let mut next = 0;
    let mut dups = 0;
    for (pos, &v) in received.iter().enumerate() {
        if v < next {
            dups += 1;
        } else {
            assert_eq!(
                v, next,
                "gap or reorder at position {pos}: got {v}, expected {next}"
            );
            next += 1;
        }
    }
    assert_eq!(next, n, "not every message arrived");
    dups
}

fn wait_progress(progress: &AtomicU64, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    poll_until(deadline, || {
        (progress.load(Ordering::SeqCst) >= at_least).then_some(())
    })
    .unwrap_or_else(|| panic!("producer stuck below {at_least}"));
}

fn export_status(env: &[(&'static str, String)]) -> serde_json::Value {
    let out = run_once(&["export", "status", "--json"], env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// All messages of the upstream JetStream stream, in stream order.
async fn read_jetstream(url: &str) -> Vec<u64> {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream(JS_STREAM).await else {
        return Vec::new();
    };
    let info = stream.info().await.unwrap();
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return out;
    }
    for seq in first..=last {
        let m = stream.get_raw_message(seq).await.unwrap();
        assert!(m.headers.get("Nats-Msg-Id").is_some());
        out.push(number(&m.payload));
    }
    out
}

/// Waits (tight polling, bounded) until the upstream stream holds more than
/// `more_than` messages; returns how many it held.
async fn wait_stream_grows(url: &str, more_than: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        assert!(Instant::now() < deadline, "upstream not reachable");
        if let Ok(c) = async_nats::connect(url).await {
            break c;
        }
    };
    let js = async_nats::jetstream::new(client);
    loop {
        assert!(Instant::now() < deadline, "the backlog was not forwarded");
        if let Ok(mut st) = js.get_stream(JS_STREAM).await {
            if let Ok(info) = st.info().await {
                if info.state.messages > more_than {
                    return info.state.messages;
                }
            }
        }
    }
}

#[test]
fn jetstream_upstream_cut_mid_stream_and_agent_killed_repeatedly_loses_nothing() {
    const N: u64 = 2200;
    let local = local_nats();
    let mut upstream = NatsServer::start(NatsConfig {
        jetstream: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(
        dir.path(),
        &local,
        &[
            ("IOT_AGENT_EXPORT__UPSTREAM__URL", upstream.url()),
            ("IOT_AGENT_EXPORT__UPSTREAM__STREAM", JS_STREAM.into()),
        ],
    );
    let mut agent = start_agent(&env);
    let rt = runtime();
    let client = rt.block_on(app_client(&local));
    let progress = Arc::new(AtomicU64::new(0));
    let producer = {
        let (client, progress) = (client.clone(), progress.clone());
        rt.spawn(async move { produce(&client, "s1", 0, N, &progress).await })
    };

    // The upstream goes away while producers send; the agent is killed
    // while it is away: the backlog must survive.
    wait_progress(&progress, 200);
    upstream.stop();
    wait_progress(&progress, 600);
    kill_and_restart(&mut agent, &env);
    wait_progress(&progress, 1400);
    // Back, and killed again while the backlog drains, with messages in
    // flight (cut as soon as JetStream got part of the backlog).
    upstream.restart();
    let at_cut = rt.block_on(wait_stream_grows(&upstream.url(), 300));
    upstream.stop();
    eprintln!("jetstream: upstream cut while draining, {at_cut} of >1400 stored");
    upstream.restart();
    agent.wait_for("export upstream connected");
    // The agent killed again and again while producing and forwarding.
    for at in [1600, 1800, 2000] {
        wait_progress(&progress, at);
        kill_and_restart(&mut agent, &env);
    }
    let ambiguous = rt.block_on(producer).unwrap();

    let deadline = Instant::now() + Duration::from_secs(90);
    let received = poll_until(deadline, || {
        let r = rt.block_on(read_jetstream(&upstream.url()));
        let distinct: std::collections::BTreeSet<u64> = r.iter().copied().collect();
        (distinct.len() as u64 == N).then_some(r)
    })
    .unwrap_or_else(|| panic!("not all {N} messages reached JetStream"));
    let dups = check_in_order(&received, N);
    // JetStream drops the agent's re-sends by Nats-Msg-Id: only a producer's
    // own retry of an unanswered request can appear twice.
    assert!(
        dups <= ambiguous,
        "{dups} duplicates, {ambiguous} producer retries"
    );

    let st = poll_until(Instant::now() + Duration::from_secs(30), || {
        let st = export_status(&env);
        (st["backlog"]["messages"] == 0).then_some(st)
    })
    .expect("backlog not drained");
    let c = &st["counters"];
    eprintln!("jetstream: {dups} duplicates, {ambiguous} producer retries, counters {c}");
    assert!(c["forwarded"].as_u64().unwrap() >= N, "{st}");
    assert_eq!(c["dropped-oldest"], 0, "{st}");
    assert_eq!(c["refused"], 0, "{st}");
    assert_eq!(agent.count("panicked"), 0);
}

/// A test subscriber on the MQTT upstream that re-subscribes whenever the
/// broker lost its session, and records every payload.
struct MqttChecker {
    received: Arc<Mutex<Vec<u64>>>,
    subscribed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttChecker {
    fn start(rt: &tokio::runtime::Runtime, port: u16) -> MqttChecker {
        let received = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicU64::new(0));
        let (r, s) = (received.clone(), subscribed.clone());
        let task = rt.spawn(async move {
            use rumqttc::{Event, Packet, QoS};
            let mut opts = rumqttc::MqttOptions::new("checker", "127.0.0.1", port);
            opts.set_clean_session(false);
            let (client, mut ev) = rumqttc::AsyncClient::new(opts, 100);
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe("telemetry/#", QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        s.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        r.lock().unwrap().push(number(&p.payload));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        MqttChecker {
            received,
            subscribed,
            task,
        }
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn wait_subscribed(&self, times: u64) {
        poll_until(Instant::now() + Duration::from_secs(30), || {
            (self.subscribed.load(Ordering::SeqCst) >= times).then_some(())
        })
        .expect("checker did not subscribe");
    }

    /// Waits until `n` distinct numbers arrived.
    fn wait_distinct(&self, n: u64) -> Vec<u64> {
        poll_until(Instant::now() + Duration::from_secs(90), || {
            let r = self.received.lock().unwrap().clone();
            let distinct: std::collections::BTreeSet<u64> = r.iter().copied().collect();
            (distinct.len() as u64 >= n).then_some(r)
        })
        .unwrap_or_else(|| panic!("fewer than {n} messages reached the MQTT subscriber"))
    }
}

#[test]
fn mqtt_upstream_outage_and_agent_kills_deliver_everything_in_order_with_counted_resends() {
    const N: u64 = 1200;
    let local = local_nats();
    let mut broker = Mosquitto::start_plain();
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(
        dir.path(),
        &local,
        &[("IOT_AGENT_EXPORT__UPSTREAM__URL", broker.url())],
    );
    let rt = runtime();
    let checker = MqttChecker::start(&rt, broker.port());
    checker.wait_subscribed(1);
    let mut agent = start_agent(&env);
    let client = rt.block_on(app_client(&local));
    let progress = Arc::new(AtomicU64::new(0));
    let mut ambiguous = rt.block_on(produce(&client, "s1", 0, 300, &progress));
    checker.wait_distinct(300);

    // The broker goes away (mosquitto without persistence would lose what
    // it acknowledged but had not delivered, so it is cut between messages;
    // cuts with messages in flight are the JetStream test's). The agent
    // keeps taking messages, is killed with the upstream down, and sends
    // the backlog once both are back.
    broker.stop();
    ambiguous += rt.block_on(produce(&client, "s1", 300, 600, &progress));
    agent.signal("KILL");
    agent.wait_exit();
    broker.restart();
    checker.wait_subscribed(2);
    agent = start_agent(&env);

    // Killed repeatedly while producing and forwarding.
    let producer = {
        let (client, progress) = (client.clone(), progress.clone());
        rt.spawn(async move { produce(&client, "s1", 600, N, &progress).await })
    };
    for at in [750, 900, 1050] {
        wait_progress(&progress, at);
        kill_and_restart(&mut agent, &env);
    }
    ambiguous += rt.block_on(producer).unwrap();
    let received = checker.wait_distinct(N);
    // Let the backlog drain, then compare duplicates with what the agent
    // counted as re-sent.
    let st = poll_until(Instant::now() + Duration::from_secs(30), || {
        let st = export_status(&env);
        (st["backlog"]["messages"] == 0).then_some(st)
    })
    .expect("backlog not drained");
    let received_now = checker.received.lock().unwrap().clone();
    assert!(received_now.len() >= received.len());
    let dups = check_in_order(&received_now, N);
    let resent = st["counters"]["resent"].as_u64().unwrap();
    eprintln!(
        "mqtt: {dups} duplicates, {resent} counted re-sends, {ambiguous} producer retries, counters {}",
        st["counters"]
    );
    assert!(
        dups <= resent + ambiguous,
        "{dups} duplicates but only {resent} counted re-sends and {ambiguous} producer retries"
    );
    assert!(checker.count() as u64 >= N);
    checker.task.abort();
}

#[test]
fn refuse_new_answers_the_producer_with_an_error_and_counts_it() {
    let local = local_nats();
    let dir = tempfile::tempdir().unwrap();
    // No upstream: everything stays in a spool that holds about ten messages.
    let env = agent_env(
        dir.path(),
        &local,
        &[
            ("IOT_AGENT_EXPORT__SPOOL__MAX__BYTES", "2100".into()),
            ("IOT_AGENT_EXPORT__SPOOL__FULL", "refuse-new".into()),
        ],
    );
    let _agent = start_agent(&env);
    let rt = runtime();
    let (accepted, refusal) = rt.block_on(async {
        let client = app_client(&local).await;
        let mut accepted = 0;
        for i in 0..15u64 {
            let m = loop {
                match client.request("export.s1", payload(i).into()).await {
                    Ok(m) => break m,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if v["ok"] == true {
                accepted += 1;
            } else {
                return (accepted, v);
            }
        }
        panic!("the spool never filled up");
    });
    assert_eq!(accepted, 10);
    assert!(
        refusal["error"].as_str().unwrap().contains("full"),
        "{refusal}"
    );
    // A bad stream name gets an answer too.
    let bad = rt.block_on(async {
        let client = app_client(&local).await;
        client.request("export.a b", "x".into()).await
    });
    if let Ok(m) = bad {
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["ok"], false, "{v}");
    }
    let st = export_status(&env);
    assert_eq!(st["backlog"]["messages"], 10, "{st}");
    assert_eq!(st["counters"]["refused"], 1, "{st}");
    assert_eq!(st["limits"]["full"], "refuse-new");
    // The same is published on the health subject.
    let published = rt.block_on(async {
        use futures::StreamExt;
        let c = async_nats::ConnectOptions::with_user_and_password(
            "snapd".into(),
            AGENT_PASSWORD.into(),
        )
        .connect(local.url())
        .await
        .unwrap();
        let mut sub = c.subscribe("iot.agent.export.status").await.unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("no status published")
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()
    });
    assert_eq!(published["backlog"]["messages"], 10, "{published}");
    assert_eq!(published["counters"]["refused"], 1, "{published}");
    assert!(published["backlog"]["oldest-age-s"].as_f64().is_some());
    // The CLI is refused the same way, with a non-zero exit.
    let out = run_once(&["export", "send", "--stream", "s1", &payload(99)], &env);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("full"));
}

#[test]
fn drop_oldest_keeps_the_newest_and_forwards_them_in_order() {
    let local = local_nats();
    let upstream = NatsServer::start(NatsConfig {
        jetstream: true,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(
        dir.path(),
        &local,
        &[
            ("IOT_AGENT_EXPORT__SPOOL__MAX__BYTES", "2100".into()),
            ("IOT_AGENT_EXPORT__UPSTREAM__URL", upstream.url()),
            ("IOT_AGENT_EXPORT__UPSTREAM__STREAM", JS_STREAM.into()),
        ],
    );
    // Scripts spool with the CLI while the daemon is not running, the data
    // as an argument or from a file.
    let file = dir.path().join("msg");
    let f = file.display().to_string();
    for i in 0..25u64 {
        let p = payload(i);
        let args = if i % 2 == 0 {
            std::fs::write(&file, &p).unwrap();
            ["export", "send", "--stream", "s1", "--file", &f]
        } else {
            ["export", "send", "--stream", "s1", "--", &p]
        };
        let out = run_once(&args, &env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let st = export_status(&env);
    assert_eq!(st["backlog"]["messages"], 10, "{st}");
    assert_eq!(st["counters"]["dropped-oldest"], 15, "{st}");
    assert!(!st["daemon"]["running"].as_bool().unwrap());

    let _agent = start_agent(&env);
    let rt = runtime();
    let received = poll_until(Instant::now() + Duration::from_secs(60), || {
        let r = rt.block_on(read_jetstream(&upstream.url()));
        (r.len() >= 10).then_some(r)
    })
    .expect("the kept messages did not arrive");
    assert_eq!(received, (15..25).collect::<Vec<_>>());
}

/// A message the upstream refuses for good (over the stream's
/// `max_msg_size`) in the middle of a backlog: before the dead letters it
/// ended every session at the same row and nothing behind it was delivered.
/// Now it is moved aside, listed and counted, and the rest arrive in order.
#[test]
fn a_message_over_the_streams_max_msg_size_is_dead_lettered_and_the_rest_flow_in_order() {
    // More than one forwarding window (export.batch.forward = 64) behind it.
    const N: u64 = 100;
    const POISON: u64 = 5;
    let local = local_nats();
    let upstream = NatsServer::start(NatsConfig {
        jetstream: true,
        ..Default::default()
    });
    let rt = runtime();
    // The operator's stream, smaller per message than the poison one (the
    // agent finds it and does not change it).
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(upstream.url()).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: JS_STREAM.into(),
            subjects: vec!["telemetry.>".into()],
            max_message_size: 1024,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(
        dir.path(),
        &local,
        &[
            ("IOT_AGENT_EXPORT__UPSTREAM__URL", upstream.url()),
            ("IOT_AGENT_EXPORT__UPSTREAM__STREAM", JS_STREAM.into()),
        ],
    );
    // The backlog is spooled while the daemon is down.
    for i in 0..N {
        let p = if i == POISON {
            format!("{i:08}:{}", "y".repeat(4000))
        } else {
            payload(i)
        };
        let out = run_once(&["export", "send", "--stream", "s1", "--", &p], &env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _agent = start_agent(&env);
    let expected: Vec<u64> = (0..N).filter(|&i| i != POISON).collect();
    let received = poll_until(Instant::now() + Duration::from_secs(60), || {
        let r = rt.block_on(read_jetstream(&upstream.url()));
        (r.len() >= expected.len()).then_some(r)
    })
    .expect("the messages behind the poison one were not delivered");
    assert_eq!(received, expected);
    let st = poll_until(Instant::now() + Duration::from_secs(30), || {
        let st = export_status(&env);
        (st["backlog"]["messages"] == 0).then_some(st)
    })
    .expect("the spool did not drain");
    assert_eq!(st["counters"]["dead-lettered"], 1, "{st}");
    let dead = st["dead-letters"].as_array().expect("dead-letters list");
    assert_eq!(dead.len(), 1, "{st}");
    assert_eq!(dead[0]["stream"], "s1", "{st}");
    assert!(dead[0]["size"].as_u64().unwrap() > 4000, "{st}");
    assert!(!dead[0]["error"].as_str().unwrap().is_empty(), "{st}");
}

/// The last status the daemon published on `iot.agent.export.status`.
fn published_status(
    rt: &tokio::runtime::Runtime,
    local: &NatsServer,
    until: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    rt.block_on(async {
        use futures::StreamExt;
        let c = async_nats::ConnectOptions::with_user_and_password(
            "snapd".into(),
            AGENT_PASSWORD.into(),
        )
        .connect(local.url())
        .await
        .unwrap();
        let mut sub = c.subscribe("iot.agent.export.status").await.unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
                .await
                .expect("no status published")
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            if until(&v) {
                return v;
            }
        }
    })
}

/// A payload of exactly `len` bytes, numbered like [`payload`].
fn sized(i: u64, len: usize) -> String {
    format!("{i:08}:{}", "z".repeat(len - 9))
}

/// One request on the intake; the agent's JSON answer. "No responders"
/// (the intake's subscription not yet on the server) is retried: that
/// request reached nobody, so it cannot be spooled twice.
async fn request(client: &async_nats::Client, stream: &str, p: String) -> serde_json::Value {
    for _ in 0..200 {
        match client
            .request(format!("export.{stream}"), p.clone().into())
            .await
        {
            Ok(m) => return serde_json::from_slice(&m.payload).unwrap(),
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("the intake did not answer: {e}"),
        }
    }
    panic!("the intake never subscribed");
}

/// The intake is capped at what the upstream can carry: the JetStream
/// stream's `max_msg_size` less the forwarder's headers, learned when the
/// forwarder connects. A message over it is refused to its producer (NATS
/// answer, `export send` exit status) instead of being accepted and then
/// refused by the upstream; one at the cap is delivered, so the header
/// allowance is not too small.
#[test]
fn intake_refuses_what_the_jetstream_stream_cannot_take_and_delivers_up_to_the_cap() {
    let local = local_nats();
    let upstream = NatsServer::start(NatsConfig {
        jetstream: true,
        ..Default::default()
    });
    let rt = runtime();
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(upstream.url()).await.unwrap());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: JS_STREAM.into(),
            subjects: vec!["telemetry.>".into()],
            max_message_size: 1024,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(
        dir.path(),
        &local,
        &[
            ("IOT_AGENT_EXPORT__UPSTREAM__URL", upstream.url()),
            ("IOT_AGENT_EXPORT__UPSTREAM__STREAM", JS_STREAM.into()),
        ],
    );
    let _agent = start_agent(&env);
    // The forwarder learned the stream's limit (and kept it in the spool).
    poll_until(Instant::now() + Duration::from_secs(30), || {
        (export_status(&env)["limits"]["message"]["max-bytes"] == 1024).then_some(())
    })
    .expect("the stream's max_msg_size was not learned");
    let cap = 1024 - iot_agent::subsystems::export::upstream::header_bytes("s1");
    let (over, at) = rt.block_on(async {
        let client = app_client(&local).await;
        (
            request(&client, "s1", sized(1, cap + 1)).await,
            request(&client, "s1", sized(0, cap)).await,
        )
    });
    assert_eq!(over["ok"], false, "{over}");
    let why = over["error"].as_str().unwrap();
    assert!(
        why.contains(&format!("at most {cap} bytes")) && why.contains("max_msg_size"),
        "{why}"
    );
    assert_eq!(at["ok"], true, "{at}");
    let out = run_once(
        &["export", "send", "--stream", "s1", "--", &sized(2, cap + 1)],
        &env,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("at most {cap} bytes")) && stderr.contains("split"),
        "{stderr}"
    );
    let received = poll_until(Instant::now() + Duration::from_secs(30), || {
        let r = rt.block_on(read_jetstream(&upstream.url()));
        (!r.is_empty()).then_some(r)
    })
    .expect("the message at the cap was not delivered");
    assert_eq!(received, vec![0]);
    let st = export_status(&env);
    assert_eq!(st["counters"]["dead-lettered"], 0, "{st}");
    assert_eq!(st["backlog"]["messages"], 0, "{st}");
}

/// MQTT 3.1.1 cannot tell its size limit, and mosquitto acknowledges a
/// message over `message_size_limit` and drops it: delivery would be
/// claimed for a lost message. With `export.upstream.max.payload` set to the
/// broker's limit, intake refuses larger messages, and one spooled before
/// the limit was configured is moved to the dead letters unsent instead of
/// being silently lost.
#[test]
fn an_mqtt_brokers_configured_size_limit_caps_intake_and_nothing_is_lost_silently() {
    const LIMIT: usize = 1000;
    let local = local_nats();
    let broker = Mosquitto::start_plain_with(&format!("message_size_limit {LIMIT}\n"));
    let dir = tempfile::tempdir().unwrap();
    let url = ("IOT_AGENT_EXPORT__UPSTREAM__URL", broker.url());
    // Spooled while no limit was configured (daemon down).
    let unlimited = agent_env(dir.path(), &local, std::slice::from_ref(&url));
    let out = run_once(
        &["export", "send", "--stream", "s1", "--", &sized(0, 1500)],
        &unlimited,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let env = agent_env(
        dir.path(),
        &local,
        &[
            url,
            (
                "IOT_AGENT_EXPORT__UPSTREAM__MAX__PAYLOAD",
                LIMIT.to_string(),
            ),
        ],
    );
    let out = run_once(
        &[
            "export",
            "send",
            "--stream",
            "s1",
            "--",
            &sized(9, LIMIT + 1),
        ],
        &env,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("at most {LIMIT} bytes"))
            && stderr.contains("export.upstream.max.payload"),
        "{stderr}"
    );
    let out = run_once(
        &["export", "send", "--stream", "s1", "--", &sized(1, LIMIT)],
        &env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let rt = runtime();
    let checker = MqttChecker::start(&rt, broker.port());
    checker.wait_subscribed(1);
    let agent = start_agent(&env);
    let (over, at) = rt.block_on(async {
        let client = app_client(&local).await;
        (
            request(&client, "s1", sized(8, LIMIT + 1)).await,
            request(&client, "s1", sized(2, LIMIT)).await,
        )
    });
    assert_eq!(over["ok"], false, "{over}");
    assert!(
        over["error"]
            .as_str()
            .unwrap()
            .contains(&format!("at most {LIMIT} bytes")),
        "{over}"
    );
    assert_eq!(at["ok"], true, "{at}");
    let received = checker.wait_distinct(2);
    assert_eq!(received, vec![1, 2], "only what the broker takes, in order");
    let st = poll_until(Instant::now() + Duration::from_secs(30), || {
        let st = export_status(&env);
        (st["backlog"]["messages"] == 0).then_some(st)
    })
    .expect("the spool did not drain");
    assert_eq!(st["counters"]["dead-lettered"], 1, "{st}");
    assert_eq!(st["counters"]["forwarded"], 2, "{st}");
    let dead = &st["dead-letters"][0];
    assert_eq!(dead["seq"], 1, "{st}");
    assert!(
        dead["error"]
            .as_str()
            .unwrap()
            .contains("export.upstream.max.payload"),
        "{st}"
    );
    assert_eq!(agent.count("panicked"), 0);
    checker.task.abort();
}

/// mosquitto's `max_packet_size` closes the connection on a larger message
/// and says nothing else. Before, every session ended on that message and
/// nothing behind it was ever delivered; now, after a few sessions that
/// fail on it sent alone, it is moved to the dead letters (it is larger
/// than anything the broker acknowledged) and the rest flow in order. The
/// dead letter is listed in the published status too.
#[test]
fn a_message_the_mqtt_broker_drops_the_connection_for_is_dead_lettered_and_the_rest_flow() {
    // More than one forwarding window (export.batch.forward = 64) behind it.
    const N: u64 = 100;
    const POISON: u64 = 5;
    let local = local_nats();
    let broker = Mosquitto::start_plain_with("max_packet_size 2000\n");
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(
        dir.path(),
        &local,
        &[("IOT_AGENT_EXPORT__UPSTREAM__URL", broker.url())],
    );
    for i in 0..N {
        let p = if i == POISON {
            sized(i, 4000)
        } else {
            payload(i)
        };
        let out = run_once(&["export", "send", "--stream", "s1", "--", &p], &env);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rt = runtime();
    let checker = MqttChecker::start(&rt, broker.port());
    checker.wait_subscribed(1);
    let mut agent = start_agent(&env);
    agent.wait_for("moved to the dead letters");
    let received = checker.wait_distinct(N - 1);
    assert!(!received.contains(&POISON));
    // Renumbered without the poison one: 0..N-1 in order, re-sends after
    // each cut allowed.
    let renumbered: Vec<u64> = received
        .iter()
        .map(|&v| if v > POISON { v - 1 } else { v })
        .collect();
    let dups = check_in_order(&renumbered, N - 1);
    let st = poll_until(Instant::now() + Duration::from_secs(30), || {
        let st = export_status(&env);
        (st["backlog"]["messages"] == 0).then_some(st)
    })
    .expect("the spool did not drain");
    assert!(dups <= st["counters"]["resent"].as_u64().unwrap(), "{st}");
    assert_eq!(st["counters"]["dead-lettered"], 1, "{st}");
    let dead = &st["dead-letters"][0];
    assert_eq!(dead["seq"], POISON + 1, "{st}");
    assert!(
        dead["error"].as_str().unwrap().contains("size limit"),
        "{st}"
    );
    let published = published_status(&rt, &local, |v| {
        v["dead-letters"].as_array().is_some_and(|d| !d.is_empty())
    });
    assert_eq!(
        published["dead-letters"][0]["seq"],
        POISON + 1,
        "{published}"
    );
    assert_eq!(published["counters"]["dead-lettered"], 1, "{published}");
    assert_eq!(agent.count("panicked"), 0);
    checker.task.abort();
}
