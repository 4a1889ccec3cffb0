//! Connection management on the relay with real processes: the accept
//! filter and pending list, the agent list (API and `iot-relay agents`),
//! status events (server-sent events and NATS), relay-dials agents.

use crate::common::poll_until;
use crate::common::tls::TestPki;
use crate::common::tunnel::{
    api_raw, echo_service, relay_command, round_trip, start_agent, Relay, DEVICE, TOKEN,
};
use serde_json::json;
use std::time::{Duration, Instant};

/// The relay's agent threshold for tests that count transitions: one no
/// loaded machine misses (a killed peer is noticed by its FIN at once).
fn calm() -> (&'static str, String) {
    ("IOT_RELAY_AGENTS__THRESHOLD", "10s".into())
}

fn within(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

/// The entry of `device` in `GET /api/v2/pending`, once it has `tries`.
fn pending_with(relay: &Relay, device: &str, tries: u64) -> serde_json::Value {
    poll_until(within(60), || {
        let (status, answer) = relay.admin("GET", "/api/v2/pending", None);
        assert_eq!(status, 200, "{answer}");
        answer["pending"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["deviceId"] == device && e["tries"].as_u64() >= Some(tries))
            .cloned()
    })
    .unwrap_or_else(|| panic!("{device} never reached {tries} tries in the pending list"))
}

/// The agent `device` in `GET /api/v2/agents`, once `ok` holds for it.
fn agent_where(
    relay: &Relay,
    device: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_until(within(60), || {
        let (status, answer) = relay.admin("GET", "/api/v2/agents", None);
        assert_eq!(status, 200, "{answer}");
        answer["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["deviceId"] == device && ok(a))
            .cloned()
    })
    .unwrap_or_else(|| {
        let (_, answer) = relay.admin("GET", "/api/v2/agents", None);
        panic!("{device} never matched; agents: {answer}")
    })
}

#[test]
fn a_relay_takes_no_agent_until_the_filter_allows_it_and_lists_it_pending_meanwhile() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_closed(&pki, dir.path(), 1, &[]);
    let (status, filter) = relay.admin("GET", "/api/v2/accept-filter", None);
    assert_eq!(status, 200);
    assert_eq!(filter["allowAll"], false, "{filter}");
    assert_eq!(filter["deviceIds"], json!([]), "{filter}");

    let echo = echo_service();
    let mut agent = start_agent(&pki, dir.path(), relay.agents_port, &[&echo], &[]);
    // Refused, told why, and listed with its address and last try.
    let line = agent.wait_for("not-accepted");
    assert!(line.contains("tunnel cannot connect"), "{line}");
    assert!(line.contains("pending list"), "{line}");
    // Four tries: the agent has handled the third refusal.
    let entry = pending_with(&relay, DEVICE, 4);
    assert!(
        entry["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{entry}"
    );
    let age = iot_agent::clock::now_ms() - entry["lastTry"].as_i64().unwrap();
    assert!((0..60_000).contains(&age), "{entry}");
    // Four refusals, one line: the agent logs a state change once.
    agent.drain();
    assert_eq!(agent.count("not-accepted"), 1, "{:#?}", agent.seen);
    // Not connected, so not listed as an agent; its pipe resets visitors.
    let (_, agents) = relay.admin("GET", "/api/v2/agents", None);
    assert_eq!(agents["agents"], json!([]), "{agents}");

    relay.accept(&json!({ "deviceIds": [DEVICE, "device-2"] }));
    agent.wait_for("tunnel connected");
    let (_, filter) = relay.admin("GET", "/api/v2/accept-filter", None);
    assert_eq!(filter["deviceIds"], json!([DEVICE, "device-2"]), "{filter}");
    let (_, pending) = relay.admin("GET", "/api/v2/pending", None);
    assert_eq!(
        pending["pending"],
        json!([]),
        "taken, so no longer pending: {pending}"
    );

    // The agent list: status, mode, address, TLS, since, pipes, bytes.
    let port = relay.add_public(&echo, 5);
    assert_eq!(round_trip(port, b"counted").unwrap(), b"counted");
    let a = agent_where(&relay, DEVICE, |a| a["bytesOut"].as_u64() > Some(0));
    assert_eq!(a["status"], "connected", "{a}");
    assert_eq!(a["mode"], "device-dials", "{a}");
    assert_eq!(a["tls"], true, "{a}");
    assert_eq!(a["pipes"], 1, "{a}");
    assert!(
        a["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{a}"
    );
    assert!(a["connectedSince"].as_i64().unwrap() > 0, "{a}");
    assert!(a["bytesIn"].as_u64().unwrap() > 0, "{a}");

    // The filter is kept (in the relay's database): a relay killed and
    // restarted takes it back.
    relay.kill();
    agent.wait_for("tunnel lost");
    relay.restart();
    agent.wait_for("tunnel connected");
    assert!(!relay.dir.join("registry.json").exists());

    // A filter without it: dropped at its next connection, pending again.
    relay.accept(&json!({ "deviceIds": ["device-2"] }));
    relay.kill();
    relay.restart();
    agent.wait_for("not-accepted");
    pending_with(&relay, DEVICE, 1);

    // allowAll takes any device the CA signed.
    relay.accept(&json!({ "allowAll": true }));
    agent.wait_for("tunnel connected");
}

#[test]
fn the_admin_api_refuses_bad_input_with_400_and_a_message() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 1);
    let put = |body: &str| {
        api_raw(
            relay.api_port,
            "PUT",
            "/api/v2/accept-filter",
            Some(TOKEN),
            "application/json",
            body,
        )
    };
    for (body, says) in [
        ("", "empty body"),
        ("not json", "bad JSON"),
        (r#"{"allowAll":"yes"}"#, "bad JSON"),
        (r#"{"deviceIds":"device-1"}"#, "bad JSON"),
        (r#"{"devices":["device-1"]}"#, "unknown field"),
        (r#"{"deviceIds":["a.b"]}"#, "letters, digits"),
        (r#"{"deviceIds":[""]}"#, "letters, digits"),
        (r#"{"allowAll":true,"deviceIds":["x"]}"#, "not both"),
    ] {
        let (status, answer) = put(body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["status"], "error", "{answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    // Unchanged by all that.
    let (_, filter) = relay.admin("GET", "/api/v2/accept-filter", None);
    assert_eq!(filter["deviceIds"], json!([DEVICE]), "{filter}");

    let post = |body: serde_json::Value| relay.admin("POST", "/api/v2/agents", Some(&body));
    for (body, says) in [
        (json!({"address": "127.0.0.1:1"}), "missing field"),
        (json!({"deviceId": "d", "address": "nowhere"}), "host:port"),
        (json!({"deviceId": "d", "address": "h:0"}), "host:port"),
        (
            json!({"deviceId": "d e", "address": "h:1"}),
            "letters, digits",
        ),
        (
            json!({"deviceId": "d", "address": "h:1", "tls": "no"}),
            "bad JSON",
        ),
    ] {
        let (status, answer) = post(body.clone());
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(says),
            "{answer}"
        );
    }
    let (status, _) = relay.admin("DELETE", "/api/v2/agents/nobody", None);
    assert_eq!(status, 404);
    let (status, _) = relay.admin("POST", "/api/v2/pending", None);
    assert_eq!(status, 405);
    // Every endpoint wants the token.
    for (method, path) in [
        ("GET", "/api/v2/accept-filter"),
        ("PUT", "/api/v2/accept-filter"),
        ("GET", "/api/v2/pending"),
        ("GET", "/api/v2/agents"),
        ("POST", "/api/v2/agents"),
        ("DELETE", "/api/v2/agents/x"),
        ("GET", "/api/v2/status"),
    ] {
        let (status, _) = api_raw(
            relay.api_port,
            method,
            path,
            Some("wrong"),
            "application/json",
            "{}",
        );
        assert_eq!(status, 401, "{method} {path}");
    }
}

#[test]
fn iot_relay_agents_prints_a_table_and_json() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 1);
    let echo = echo_service();
    let mut agent = start_agent(&pki, dir.path(), relay.agents_port, &[&echo], &[]);
    agent.wait_for("tunnel connected");
    agent_where(&relay, DEVICE, |a| a["status"] == "connected");

    let out = relay_command(&["agents"], &relay.env).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("DEVICE  "), "{text}");
    for col in [
        "STATUS",
        "MODE",
        "ADDRESS",
        "TLS",
        "CONNECTED SINCE",
        "PIPES",
        "IN",
        "OUT",
    ] {
        assert!(lines[0].contains(col), "{text}");
    }
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[..3], &[DEVICE, "connected", "device-dials"], "{text}");
    assert!(row[3].starts_with("127.0.0.1:"), "{text}");
    assert_eq!(row[4], "yes", "{text}");

    let out = relay_command(&["agents", "--json"], &relay.env)
        .output()
        .unwrap();
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["deviceId"], DEVICE, "{list}");
    assert_eq!(list[0]["status"], "connected", "{list}");

    // A wrong token is a clear error, not a table.
    let mut env = relay.env.clone();
    env.retain(|(k, _)| *k != "IOT_RELAY_API__TOKEN");
    env.push(("IOT_RELAY_API__TOKEN", "not-the-token-4711".into()));
    let out = relay_command(&["agents"], &env).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("bearer token"), "{err}");
    assert!(!err.contains("4711"), "the token is not echoed: {err}");
}

/// A client of `GET /api/v2/status`: each event as (event, data), read by
/// a thread; returns once the stream is open (its first comment line).
fn status_stream(port: u16, query: &str) -> std::sync::mpsc::Receiver<(String, serde_json::Value)> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET /api/v2/status{query} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        // Chunk-size lines of the chunked body carry neither prefix.
        for line in BufReader::new(s).lines().map_while(Result::ok) {
            let line = line.trim_end();
            if line.starts_with(": relay status events") {
                let _ = open_tx.send(());
            } else if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                let data = serde_json::from_str(d).unwrap();
                if tx.send((std::mem::take(&mut event), data)).is_err() {
                    return;
                }
            }
        }
    });
    open_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the status stream did not open");
    rx
}

fn next_event(
    rx: &std::sync::mpsc::Receiver<(String, serde_json::Value)>,
) -> (String, serde_json::Value) {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no status event within 60 s")
}

#[test]
fn status_events_reach_the_stream_and_nats_once_each_in_order() {
    use crate::common::servers::{NatsConfig, NatsServer};
    use futures::StreamExt;
    let nats = NatsServer::start(NatsConfig::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut sub = rt.block_on(async {
        let c = async_nats::connect(nats.url()).await.unwrap();
        let sub = c.subscribe("relay.status.>").await.unwrap();
        c.flush().await.unwrap();
        // The client lives as long as the subscription.
        std::mem::forget(c);
        sub
    });

    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_closed(
        &pki,
        dir.path(),
        1,
        &[("IOT_RELAY_NATS__URL", nats.url()), calm()],
    );
    relay.accept(&json!({ "deviceIds": [DEVICE] }));
    let all = status_stream(relay.api_port, "");
    let only_2 = status_stream(relay.api_port, "?deviceId=device-2");

    // device-1: taken, then killed; device-2 (same CA, not allowed): refused.
    let echo = echo_service();
    let agent_calm = [("IOT_AGENT_TUNNEL__THRESHOLD", "10s".to_string())];
    let mut agent = start_agent(&pki, dir.path(), relay.agents_port, &[&echo], &agent_calm);
    agent.wait_for("tunnel connected");
    agent.signal("KILL");
    agent.wait_exit();
    let (cert, key) = pki.issue_client("device-2");
    let other = tempfile::tempdir().unwrap();
    let mut second = start_agent(
        &pki,
        other.path(),
        relay.agents_port,
        &[],
        &[
            (
                "IOT_AGENT_TUNNEL__CERT",
                pki.write_file("d2.crt", &cert).display().to_string(),
            ),
            (
                "IOT_AGENT_TUNNEL__KEY",
                pki.write_file("d2.key", &key).display().to_string(),
            ),
        ],
    );
    second.wait_for("not-accepted");

    let mut seen = Vec::new();
    let (event, e) = next_event(&all);
    assert_eq!(
        (event.as_str(), &e["deviceId"]),
        ("tls-connected", &json!(DEVICE)),
        "{e}"
    );
    assert_eq!(e["mode"], "device-dials");
    assert_eq!(e["tls"], true);
    assert!(
        e["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{e}"
    );
    seen.push(e);
    let (event, e) = next_event(&all);
    assert_eq!(
        (event.as_str(), &e["deviceId"]),
        ("disconnected", &json!(DEVICE)),
        "{e}"
    );
    assert!(!e["reason"].as_str().unwrap().is_empty(), "{e}");
    seen.push(e);
    let (event, e) = next_event(&all);
    assert_eq!(
        (event.as_str(), &e["deviceId"]),
        ("refused", &json!("device-2")),
        "{e}"
    );
    assert!(
        e["reason"].as_str().unwrap().contains("accept filter"),
        "{e}"
    );
    seen.push(e);
    let seqs: Vec<u64> = seen.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // The filtered stream: only device-2's events.
    let (event, e) = next_event(&only_2);
    assert_eq!(
        (event.as_str(), &e["deviceId"]),
        ("refused", &json!("device-2")),
        "{e}"
    );

    // NATS: the same events, each once, in the same order, per device
    // subject.
    for want in &seen {
        let msg = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), sub.next()).await })
            .expect("no NATS status event within 60 s")
            .unwrap();
        let got: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(&got, want);
        assert_eq!(
            msg.subject.as_str(),
            format!("relay.status.{}", want["deviceId"].as_str().unwrap())
        );
    }
}

/// An agent that waits for the relay on a free port; returns it and the
/// port.
fn listening_agent(
    pki: &TestPki,
    dir: &std::path::Path,
    relay: &Relay,
    port: Option<u16>,
    allow: &[&str],
    extra: &[(&'static str, String)],
) -> (crate::common::agent_proc::AgentProcess, u16) {
    let port = port.unwrap_or_else(crate::common::servers::free_port);
    // A threshold no loaded machine misses: these tests count transitions.
    let mut env = vec![
        ("IOT_AGENT_TUNNEL__LISTEN", format!("127.0.0.1:{port}")),
        ("IOT_AGENT_TUNNEL__THRESHOLD", "10s".into()),
    ];
    env.extend(extra.iter().cloned());
    let mut agent = start_agent(pki, dir, relay.agents_port, allow, &env);
    agent.wait_for("tunnel waiting for the relay to dial");
    (agent, port)
}

#[test]
fn a_relay_dials_a_registered_agent_keeps_it_connected_and_lets_it_go_when_deleted() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    // No accept filter: a registration is the operator's accept.
    let mut relay = Relay::start_closed(&pki, dir.path(), 1, &[calm()]);
    let events = status_stream(relay.api_port, "");
    let echo = echo_service();
    let (mut agent, port) = listening_agent(&pki, dir.path(), &relay, None, &[&echo], &[]);

    let (status, answer) = relay.admin(
        "POST",
        "/api/v2/agents",
        Some(&json!({"deviceId": DEVICE, "address": format!("127.0.0.1:{port}")})),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["tls"], true, "TLS unless told otherwise: {answer}");
    agent.wait_for("tunnel connected");
    let (event, e) = next_event(&events);
    assert_eq!(event, "tls-connected", "{e}");
    assert_eq!(e["mode"], "relay-dials", "{e}");
    assert_eq!(e["address"], format!("127.0.0.1:{port}"), "{e}");
    let pipe = relay.add_public(&echo, 5);
    assert_eq!(round_trip(pipe, b"dialed").unwrap(), b"dialed");
    let a = agent_where(&relay, DEVICE, |a| a["status"] == "connected");
    assert_eq!(a["mode"], "relay-dials", "{a}");
    assert_eq!(a["autoReconnect"], true, "{a}");
    assert_eq!(a["tls"], true, "{a}");

    // The agent killed: disconnected, and dialed again once it is back.
    agent.signal("KILL");
    agent.wait_exit();
    let (event, e) = next_event(&events);
    assert_eq!(event, "disconnected", "{e}");
    agent_where(&relay, DEVICE, |a| {
        a["status"] == "disconnected" && a["lastReason"].is_string()
    });
    let (mut agent, _) = listening_agent(&pki, dir.path(), &relay, Some(port), &[&echo], &[]);
    agent.wait_for("tunnel connected");
    assert_eq!(next_event(&events).0, "tls-connected");
    assert_eq!(round_trip(pipe, b"again").unwrap(), b"again");

    // The registration is kept: a restarted relay dials it again.
    relay.kill();
    agent.wait_for("tunnel lost");
    relay.restart();
    agent.wait_for("tunnel connected");
    let events = status_stream(relay.api_port, "");

    // Deleted: its connection is closed and it is no longer listed.
    let (status, answer) = relay.admin("DELETE", &format!("/api/v2/agents/{DEVICE}"), None);
    assert_eq!(status, 200, "{answer}");
    loop {
        // (A reconnection of the restart may come first.)
        let Ok((event, e)) = events.recv_timeout(Duration::from_secs(60)) else {
            relay.proc.drain();
            agent.drain();
            panic!(
                "no disconnected event; relay:\n{}\nagent:\n{}",
                relay.proc.seen.join("\n"),
                agent.seen.join("\n")
            );
        };
        if event == "disconnected" && e["reason"] == "the registration was removed" {
            break;
        }
    }
    agent.wait_for("tunnel lost");
    let (_, agents) = relay.admin("GET", "/api/v2/agents", None);
    assert_eq!(agents["agents"], json!([]), "{agents}");
    let (status, _) = relay.admin("DELETE", &format!("/api/v2/agents/{DEVICE}"), None);
    assert_eq!(status, 404);
}

#[test]
fn plain_tcp_is_used_only_when_the_registration_and_the_agent_both_say_so() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_closed(&pki, dir.path(), 1, &[calm()]);
    let echo = echo_service();
    let (mut agent, port) = listening_agent(
        &pki,
        dir.path(),
        &relay,
        None,
        &[&echo],
        &[
            ("IOT_AGENT_TUNNEL__TLS", "false".into()),
            ("IOT_AGENT_TUNNEL__DEVICE", DEVICE.into()),
        ],
    );
    let address = format!("127.0.0.1:{port}");
    // Registered with TLS (the default): a plain agent is not taken.
    let (status, _) = relay.admin(
        "POST",
        "/api/v2/agents",
        Some(&json!({"deviceId": DEVICE, "address": address})),
    );
    assert_eq!(status, 200);
    let a = agent_where(&relay, DEVICE, |a| a["lastReason"].is_string());
    assert_eq!(a["status"], "disconnected", "{a}");
    assert!(a["lastReason"].as_str().unwrap().contains("TLS"), "{a}");

    // Both plain: taken, reported `connected` (not tls-connected).
    let events = status_stream(relay.api_port, "");
    let (status, _) = relay.admin(
        "POST",
        "/api/v2/agents",
        Some(&json!({"deviceId": DEVICE, "address": address, "tls": false})),
    );
    assert_eq!(status, 200);
    agent.wait_for("tunnel connected");
    let (event, e) = next_event(&events);
    assert_eq!(event, "connected", "{e}");
    assert_eq!(e["tls"], false, "{e}");
    let pipe = relay.add_public(&echo, 5);
    assert_eq!(round_trip(pipe, b"plain").unwrap(), b"plain");

    // Plain TCP to the relay's own port is never possible: an agent that
    // dials with tunnel.tls=false does not start.
    let mut dialing = start_agent(
        &pki,
        dir.path(),
        relay.agents_port,
        &[],
        &[("IOT_AGENT_TUNNEL__TLS", "false".into())],
    );
    dialing.wait_for("tunnel.tls=false is only for tunnel.listen");
}

/// Waits until the relay has joined the shared registry.
fn joined(relay: &mut Relay) {
    let line = "joined the relays' shared registry";
    if !relay.proc.seen.iter().any(|l| l.contains(line)) {
        relay.proc.wait_for(line);
    }
}

#[test]
fn relays_sharing_a_registry_list_every_agent_and_forward_a_mapping_to_the_holder() {
    use crate::common::servers::{NatsConfig, NatsServer};
    let nats = NatsServer::start(NatsConfig {
        jetstream: true,
        ..Default::default()
    });
    let pki = TestPki::new(DEVICE);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shared = |id: &str| {
        vec![
            ("IOT_RELAY_NATS__URL", nats.url()),
            ("IOT_RELAY_ID", id.to_string()),
            ("IOT_RELAY_NATS__REFRESH", "1s".to_string()),
        ]
    };
    let mut a = Relay::start_closed(&pki, dir_a.path(), 1, &shared("relay-a"));
    let mut b = Relay::start_closed(&pki, dir_b.path(), 1, &shared("relay-b"));
    b.accept(&json!({ "deviceIds": [DEVICE] }));
    joined(&mut a);
    joined(&mut b);
    let echo = echo_service();
    let mut agent = start_agent(&pki, dir_b.path(), b.agents_port, &[&echo], &[]);
    agent.wait_for("tunnel connected");

    // Relay A lists the agent relay B holds; B lists it as its own.
    let seen_on_a = agent_where(&a, DEVICE, |x| {
        x["relay"] == "relay-b" && x["status"] == "connected"
    });
    assert_eq!(seen_on_a["mode"], "device-dials", "{seen_on_a}");
    let on_b = agent_where(&b, DEVICE, |x| x["status"] == "connected");
    assert_eq!(on_b["relay"], "relay-b", "{on_b}");

    // A mapping added on A for it is served by B, on one of B's ports.
    let (status, answer) = a.add(&json!({
        "type": "public", "maxconnections": 5, "device": DEVICE, "target": echo,
    }));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["relay"], "relay-b", "{answer}");
    let port = answer["port2"].as_u64().unwrap() as u16;
    assert!(
        b.ports.contains(&port),
        "{answer} not on B's ports {:?}",
        b.ports
    );
    assert_eq!(round_trip(port, b"through B").unwrap(), b"through B");
    let id = answer["id"].as_str().unwrap().to_string();

    // Every relay lists it; removed on A, B stops serving it.
    poll_until(within(60), || {
        let (_, list) =
            crate::common::tunnel::api(a.api_port, "GET", "/api/v2/mapping", Some(TOKEN), "");
        list["mappings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == id.as_str() && m["relay"] == "relay-b")
            .then_some(())
    })
    .expect("relay A never listed B's mapping");
    let (status, answer) = crate::common::tunnel::api(
        a.api_port,
        "POST",
        "/api/v2/mapping/remove",
        Some(TOKEN),
        &format!("mappingid={id}"),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["relay"], "relay-b", "{answer}");
    let (_, list) =
        crate::common::tunnel::api(b.api_port, "GET", "/api/v2/mapping", Some(TOKEN), "");
    assert_eq!(list["mappings"], json!([]), "{list}");
    poll_until(within(30), || {
        round_trip(port, b"gone").is_err().then_some(())
    })
    .expect("B still serves the removed mapping's port");

    // B killed without a goodbye: its entry goes stale and A says so.
    b.kill();
    let gone = agent_where(&a, DEVICE, |x| x["status"] == "disconnected");
    assert_eq!(gone["relay"], "relay-b", "{gone}");
    assert!(
        gone["lastReason"]
            .as_str()
            .unwrap()
            .contains("has not refreshed"),
        "{gone}"
    );
}
