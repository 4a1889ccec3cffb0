//! The tunnel end to end with real processes on loopback: `iot-relay`,
//! `iot-agent run` with the tunnel on, device-local services, visitors.

use crate::common::tls::TestPki;
use crate::common::tunnel::{
    api, echo_service, first_read, private_side, relay_command, round_trip, start_agent,
    until_paired, web_page, Relay, DEVICE, TOKEN,
};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

/// A relay, and an agent connected to it that may reach `allow`.
fn rig(
    pipes: usize,
    allow: &[&str],
) -> (
    TestPki,
    tempfile::TempDir,
    Relay,
    crate::common::agent_proc::AgentProcess,
) {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&pki, dir.path(), pipes);
    let mut agent = start_agent(&pki, dir.path(), relay.agents_port, allow, &[]);
    agent.wait_for("tunnel connected");
    relay.proc.wait_for("agent connected");
    (pki, dir, relay, agent)
}

fn assert_reset(r: std::io::Result<usize>) {
    match r {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
}

#[test]
fn a_public_pipe_carries_a_half_closed_round_trip_and_a_web_page() {
    let echo = echo_service();
    let page = web_page("hello from the device");
    let (_pki, _dir, relay, _agent) = rig(2, &[&echo, &page]);
    let port = relay.add_public(&echo, 10);

    // 1 MiB up, FIN, then the whole echo back and the device's FIN.
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(round_trip(port, &data).unwrap(), data);

    let web = relay.add_public(&page, 10);
    let answer = round_trip(web, b"GET / HTTP/1.1\r\nHost: device\r\n\r\n").unwrap();
    let answer = String::from_utf8(answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello from the device"), "{answer}");

    let (status, list) = api(relay.api_port, "GET", "/api/v2/mapping", Some(TOKEN), "");
    assert_eq!(status, 200);
    let mappings = list["mappings"].as_array().unwrap();
    assert_eq!(mappings.len(), 2);
    assert!(mappings.iter().all(|m| m["connected"] == true), "{list}");
}

#[test]
fn a_hundred_concurrent_visitors_each_get_only_their_own_bytes() {
    let echo = echo_service();
    let (_pki, _dir, relay, _agent) = rig(1, &[&echo]);
    let port = relay.add_public(&echo, 200);
    let visitors: Vec<_> = (0..100u32)
        .map(|i| {
            std::thread::spawn(move || {
                let data: Vec<u8> = format!("visitor {i} ").repeat(2000).into_bytes();
                let back = round_trip(port, &data).unwrap();
                assert!(
                    back == data,
                    "visitor {i} got {} bytes not its own",
                    back.len()
                );
            })
        })
        .collect();
    for v in visitors {
        v.join().unwrap();
    }
}

#[test]
fn the_visitor_beyond_maxconnections_is_reset_at_once() {
    let echo = echo_service();
    let (_pki, _dir, relay, _agent) = rig(1, &[&echo]);
    let port = relay.add_public(&echo, 2);
    let mut served = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        served.push(s);
    }
    let mut third = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_reset(first_read(&mut third));
    // A slot freed is a slot for the next visitor.
    drop(served.pop());
    let data = b"after one left".to_vec();
    let back = crate::common::poll_until(
        std::time::Instant::now() + std::time::Duration::from_secs(10),
        || round_trip(port, &data).ok(),
    );
    assert_eq!(back.unwrap(), data);
}

#[test]
fn a_target_outside_the_allow_list_and_an_absent_device_are_reset() {
    let echo = echo_service();
    let other = echo_service();
    let (_pki, _dir, relay, mut agent) = rig(2, &[&echo]);
    let port = relay.add_public(&other, 5);
    let mut v = TcpStream::connect(("127.0.0.1", port)).unwrap();
    v.write_all(b"hello").unwrap();
    assert_reset(first_read(&mut v));
    agent.wait_for("is not in tunnel.allow");

    let (status, answer) = relay.add(&serde_json::json!({
        "type": "public", "maxconnections": 5, "device": "no-such-device", "target": echo,
    }));
    assert_eq!(status, 200, "{answer}");
    let port = answer["port2"].as_u64().unwrap() as u16;
    let mut v = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_reset(first_read(&mut v));
}

#[test]
fn a_device_certificate_of_another_ca_is_refused() {
    let pki = TestPki::new(DEVICE);
    let stranger = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&pki, dir.path(), 1);
    let echo = echo_service();
    let port = relay.add_public(&echo, 5);
    // The stranger's device certificate, the right relay CA.
    let mut agent = start_agent(
        &pki,
        dir.path(),
        relay.agents_port,
        &[&echo],
        &[
            (
                "IOT_AGENT_TUNNEL__CERT",
                stranger.client_cert.display().to_string(),
            ),
            (
                "IOT_AGENT_TUNNEL__KEY",
                stranger.client_key.display().to_string(),
            ),
        ],
    );
    agent.wait_for("tunnel cannot connect");
    relay.proc.wait_for("agent refused");
    let mut v = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_reset(first_read(&mut v));
    assert_eq!(agent.count("tunnel connected"), 0);
}

#[test]
fn a_relay_not_signed_by_tunnel_ca_is_refused() {
    let pki = TestPki::new(DEVICE);
    let stranger = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 1);
    let mut agent = start_agent(
        &pki,
        dir.path(),
        relay.agents_port,
        &[],
        &[(
            "IOT_AGENT_TUNNEL__CA",
            stranger.ca_cert.display().to_string(),
        )],
    );
    let line = agent.wait_for("tunnel cannot connect");
    assert!(line.contains("tunnel.ca"), "{line}");
    assert_eq!(agent.count("tunnel connected"), 0);
}

#[test]
fn the_mapping_api_answers_like_iofog_and_wants_the_token() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 1);
    let p = relay.api_port;
    let (status, _) = api(p, "GET", "/api/v2/mapping", None, "");
    assert_eq!(status, 401);
    let (status, _) = api(p, "GET", "/api/v2/mapping", Some("wrong"), "");
    assert_eq!(status, 401);
    let (status, _) = api(p, "POST", "/api/v2/mapping/add", Some(TOKEN), "mapping=");
    assert_eq!(status, 400);
    let (status, _) = api(
        p,
        "POST",
        "/api/v2/mapping/add",
        Some(TOKEN),
        "mapping=%7Bnot%20json",
    );
    assert_eq!(status, 400);

    let spec = serde_json::json!({
        "type": "public", "maxconnections": 60, "heartbeatabsencethreshold": 200000,
        "device": DEVICE, "target": "127.0.0.1:80",
    });
    let (status, answer) = relay.add(&spec);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "ok");
    for key in [
        "id",
        "port1",
        "port2",
        "passcode1",
        "passcode2",
        "timestamp",
    ] {
        assert!(answer.get(key).is_some(), "no {key} in {answer}");
    }
    assert_eq!(answer["port2"].as_u64().unwrap() as u16, relay.ports[0]);
    assert_eq!(relay.add(&spec).0, 409, "duplicate");
    let other = serde_json::json!({"type": "public", "device": "d2", "target": "127.0.0.1:81"});
    assert_eq!(relay.add(&other).0, 507, "one port only");

    let id = answer["id"].as_str().unwrap();
    let (status, removed) = api(
        p,
        "POST",
        "/api/v2/mapping/remove",
        Some(TOKEN),
        &format!("mappingid={id}"),
    );
    assert_eq!(status, 200, "{removed}");
    assert_eq!(removed["id"], id);
    let (status, _) = api(
        p,
        "POST",
        "/api/v2/mapping/remove",
        Some(TOKEN),
        &format!("mappingid={id}"),
    );
    assert_eq!(status, 404);
    assert_eq!(relay.add(&other).0, 200, "the port is free again");
}

#[test]
fn iot_relay_config_shows_each_value_with_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, "[agents]\nlisten = \"0.0.0.0:9000\"\n").unwrap();
    let out = relay_command(
        &["--config", file.to_str().unwrap(), "config"],
        &[
            ("IOT_RELAY_API__TOKEN", "s3cret-token".into()),
            ("IOT_RELAY_DEV", "true".into()),
        ],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
            .to_string()
    };
    assert!(line("agents.listen").contains("config file"), "{text}");
    assert!(line("dev").contains("IOT_RELAY_DEV"), "{text}");
    assert!(line("pipes.ports").contains("built-in default"), "{text}");
    assert!(!text.contains("s3cret-token"), "the token was printed");
}

/// A visitor in the middle of an exchange: connected, one echo done.
fn mid_exchange(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s
}

#[test]
fn a_killed_and_restarted_relay_gets_its_agent_back_on_the_same_ports() {
    let echo = echo_service();
    let (_pki, _dir, mut relay, mut agent) = rig(1, &[&echo]);
    let port = relay.add_public(&echo, 10);
    let mut visitor = mid_exchange(port);

    relay.kill();
    // The visitor's connection died with the relay: an error or the end,
    // never a hang.
    let _ = first_read(&mut visitor);
    agent.wait_for("tunnel lost; reconnecting");
    relay.restart();
    assert_eq!(
        relay.proc.count("pipe restored"),
        1,
        "{:?}",
        relay.proc.seen
    );
    agent.wait_for("tunnel connected");
    relay.proc.wait_for("agent connected");
    assert_eq!(
        round_trip(port, b"after the restart").unwrap(),
        b"after the restart"
    );
    // It came back from the relay's database, not a JSON file.
    assert!(relay.dir.join("relay.db").exists());
    assert!(!relay.dir.join("mappings.json").exists());
}

#[test]
fn visitors_of_a_killed_agent_are_reset_at_once() {
    let echo = echo_service();
    let (_pki, _dir, mut relay, mut agent) = rig(1, &[&echo]);
    let port = relay.add_public(&echo, 10);
    let mut visitors: Vec<TcpStream> = (0..3).map(|_| mid_exchange(port)).collect();

    agent.signal("KILL");
    agent.wait_exit();
    for v in &mut visitors {
        assert_reset(first_read(v));
    }
    relay.proc.wait_for("agent disconnected");
    let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_reset(first_read(&mut late));
}

#[test]
fn a_frozen_agent_is_dropped_after_the_threshold_and_comes_back() {
    let echo = echo_service();
    let (_pki, _dir, mut relay, mut agent) = rig(1, &[&echo]);
    let port = relay.add_public(&echo, 10);
    let mut visitor = mid_exchange(port);

    agent.signal("STOP");
    let line = relay.proc.wait_for("agent disconnected");
    assert!(line.contains("no heartbeat for 1s"), "{line}");
    // Its visitor is reset, and a new one refused, while it is frozen.
    assert_reset(first_read(&mut visitor));
    let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_reset(first_read(&mut late));

    agent.signal("CONT");
    agent.wait_for("tunnel lost; reconnecting");
    agent.wait_for("tunnel connected");
    assert_eq!(round_trip(port, b"thawed").unwrap(), b"thawed");
}

#[test]
fn a_visitor_sending_beat_and_authorized_has_them_carried_as_data() {
    let echo = echo_service();
    let (_pki, _dir, relay, _agent) = rig(1, &[&echo]);
    let port = relay.add_public(&echo, 10);
    for data in [
        &b"BEAT"[..],
        b"AUTHORIZED",
        b"BEATBEATBEAT",
        b"\0\0\0\x05hello",
    ] {
        assert_eq!(round_trip(port, data).unwrap(), data);
    }
}

/// A private pipe: (port1, passcode1, port2, passcode2).
fn private_pipe(relay: &Relay, max: u32, threshold_ms: u64) -> (u16, String, u16, String) {
    let (status, a) = relay.add(&serde_json::json!({
        "type": "private", "maxconnectionsport1": max, "maxconnectionsport2": max,
        "heartbeatabsencethresholdport1": threshold_ms, "heartbeatabsencethresholdport2": threshold_ms,
    }));
    assert_eq!(status, 200, "{a}");
    let s = |k: &str| a[k].as_str().unwrap().to_string();
    let p = |k: &str| a[k].as_u64().unwrap() as u16;
    assert_ne!(s("passcode1"), s("passcode2"));
    (p("port1"), s("passcode1"), p("port2"), s("passcode2"))
}

#[test]
fn a_private_pipe_joins_its_two_sides_and_carries_beat_as_data() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 2);
    let (port1, pass1, port2, pass2) = private_pipe(&relay, 4, 300);

    // Side 1 waits and answers a heartbeat; then side 2 comes.
    let (answered_tx, answered) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut s = private_side(port1, &pass1).unwrap();
        let mut beat = [0u8; 4];
        s.read_exact(&mut beat).unwrap();
        assert_eq!(&beat, b"BEAT");
        s.write_all(b"BEAT").unwrap();
        answered_tx.send(()).unwrap();
        until_paired(&mut s).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap(); // up to side 2's FIN
        s.write_all(b"BEAT").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        got
    });
    answered.recv().unwrap();
    let mut s2 = private_side(port2, &pass2).unwrap();
    until_paired(&mut s2).unwrap();
    s2.write_all(b"BEATAUTHORIZEDPAIRED").unwrap();
    s2.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s2.read_to_end(&mut back).unwrap();
    let got = waiter.join().unwrap();
    assert_eq!(got, b"BEATAUTHORIZEDPAIRED");
    assert_eq!(back, b"BEAT");
}

#[test]
fn a_private_pipe_carries_many_pairs_each_its_own_and_refuses_the_rest() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 2);
    let (port1, pass1, port2, pass2) = private_pipe(&relay, 3, 5000);

    // Wrong passcode, and the right one on the wrong port: reset.
    let mut wrong = TcpStream::connect(("127.0.0.1", port1)).unwrap();
    wrong.write_all(&[b'x'; 32]).unwrap();
    assert_reset(first_read(&mut wrong));
    let mut swapped = TcpStream::connect(("127.0.0.1", port2)).unwrap();
    swapped.write_all(pass1.as_bytes()).unwrap();
    assert_reset(first_read(&mut swapped));

    let sides1: Vec<TcpStream> = (0..3)
        .map(|_| private_side(port1, &pass1).unwrap())
        .collect();
    // maxconnectionsport1 + 1: reset before any passcode is read.
    let mut extra = TcpStream::connect(("127.0.0.1", port1)).unwrap();
    assert_reset(first_read(&mut extra));

    // Which port1 connection a port2 one is joined with is the relay's
    // choice (the oldest waiting); each must get one whole message.
    let readers: Vec<_> = sides1
        .into_iter()
        .map(|mut s1| {
            std::thread::spawn(move || {
                until_paired(&mut s1).unwrap();
                let mut got = Vec::new();
                s1.read_to_end(&mut got).unwrap();
                got
            })
        })
        .collect();
    let sent: Vec<Vec<u8>> = (0..3)
        .map(|i| format!("pair {i} ").repeat(1000).into_bytes())
        .collect();
    let writers: Vec<_> = sent
        .iter()
        .cloned()
        .map(|msg| {
            let pass2 = pass2.clone();
            std::thread::spawn(move || {
                let mut s2 = private_side(port2, &pass2).unwrap();
                until_paired(&mut s2).unwrap();
                s2.write_all(&msg).unwrap();
                s2.shutdown(std::net::Shutdown::Write).unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut got: Vec<Vec<u8>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    got.sort();
    assert!(got == sent, "messages were mixed or lost");
}

#[test]
fn a_waiting_private_side_that_stops_answering_is_reset_after_its_threshold() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 2);
    let (port1, pass1, _, _) = private_pipe(&relay, 1, 300);
    let mut s = private_side(port1, &pass1).unwrap();
    // Read the relay's BEATs but never answer: reset after 300 ms.
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    let err = loop {
        match s.read(&mut buf) {
            Ok(0) => panic!("closed, not reset"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(got.starts_with(b"BEAT"), "{got:?}");
    // Its slot is free again.
    private_side(port1, &pass1).unwrap();
}

/// The README's walk-through, run as written (with free ports): relay,
/// agent, a public pipe added with curl over HTTPS, the device's page
/// fetched through the relay port.
#[test]
fn the_readme_walk_through_works() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let script: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "<!-- tunnel walk-through -->")
        .skip(2)
        .take_while(|l| *l != "```")
        .collect();
    assert!(script[0].starts_with("AGENTS_PORT="), "{script:?}");
    use crate::common::servers::free_port;
    let first = format!(
        "AGENTS_PORT={} API_PORT={} PIPE_PORTS={} PAGE_PORT={}",
        free_port(),
        free_port(),
        free_port(),
        free_port()
    );
    let body = script[1..].join("\n");
    let bins = std::path::Path::new(crate::common::tunnel::RELAY_BIN)
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Whatever happens, the background processes go with the script.
    let full = format!("trap 'kill $(jobs -p) 2>/dev/null' EXIT\n{first}\n{body}\n");
    let out = std::process::Command::new("timeout")
        .args(["120", "bash", "-euo", "pipefail", "-c", &full])
        .env_clear()
        .env("PATH", path)
        // Not the machine's NATS, snapd or identity service: none at all.
        .env(
            "IOT_AGENT_NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        )
        .env("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port()))
        .env("IOT_AGENT_SNAPD__SOCKET", "/nonexistent/snapd.socket")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.trim_end().ends_with("hello from the device"),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_stalled_stream_does_not_hold_up_another_on_the_same_connection() {
    let echo = echo_service();
    let sink = crate::common::tunnel::stalled_service();
    let (_pki, _dir, relay, _agent) = rig(2, &[&echo, &sink]);
    let stalled = relay.add_public(&sink, 1);
    let port = relay.add_public(&echo, 10);

    // Fill the stalled stream until the relay stops taking its bytes.
    let (full_tx, full) = std::sync::mpsc::channel();
    let mut bulk = TcpStream::connect(("127.0.0.1", stalled)).unwrap();
    let writer = std::thread::spawn(move || {
        bulk.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        loop {
            match bulk.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    // Blocked for good once nothing moves for a while:
                    // poll a few times to be sure it is not just slow.
                    let mut moved = false;
                    for _ in 0..50 {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        if let Ok(n) = bulk.write(&chunk) {
                            sent += n;
                            moved = true;
                            break;
                        }
                    }
                    if !moved {
                        break;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        full_tx.send(sent).unwrap();
        bulk
    });
    let sent = full.recv().unwrap();
    assert!(sent >= 256 * 1024, "only {sent} bytes before the stall");
    // The other stream still carries its small exchanges.
    for i in 0..20 {
        let msg = format!("small write {i}");
        assert_eq!(round_trip(port, msg.as_bytes()).unwrap(), msg.as_bytes());
    }
    drop(writer.join().unwrap());
}
