//! Tests of the harness itself: the servers really start, isolate, refuse
//! what they should and go away on drop; the snapd double answers like the
//! real snapd (checked side by side against one where possible).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::servers::{
    free_port, tcp_accepts, Mosquitto, NatsConfig, NatsServer, NatsUser, RealSnapd,
};
use crate::common::snapd_double::{
    ChangeMode, Fault, SnapdDouble, MODEL_ASSERTION, SERIAL_ASSERTION,
};
use crate::common::tls::TestPki;
use crate::common::{poll_until, unix_http, HttpReply};

const T: Duration = Duration::from_secs(5);

// ------------------------------------------------------------ helpers ---

/// Opens a NATS client connection, sends `send` after the INFO line and
/// returns everything read until a line contains one of `stop_at` (or 5 s).
fn nats_session(port: u16, send: &str, stop_at: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to nats");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    s.write_all(send.as_bytes()).expect("write to nats");
    let deadline = Instant::now() + T;
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !stop_at.iter().any(|p| text.contains(p)) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => continue,
        }
    }
    text
}

fn nats_info(port: u16) -> String {
    let text = nats_session(port, "", &["\r\n"]);
    text.lines().next().unwrap_or_default().to_string()
}

/// An MQTT 3.1.1 CONNECT packet.
fn mqtt_connect(client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut var = Vec::new();
    field(&mut var, "MQTT");
    var.push(4); // protocol level 3.1.1
    var.push(0x02 | if login.is_some() { 0xC0 } else { 0 });
    var.extend_from_slice(&30u16.to_be_bytes()); // keep-alive
    field(&mut var, client_id);
    if let Some((u, p)) = login {
        field(&mut var, u);
        field(&mut var, p);
    }
    let mut packet = vec![0x10];
    let mut len = var.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend(var);
    packet
}

/// Sends CONNECT over plain TCP; `Ok(return_code)` from the CONNACK, or
/// `Err` when the broker closed or did not answer.
fn mqtt_connack(port: u16, client_id: &str, login: Option<(&str, &str)>) -> Result<u8, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(T)).map_err(|e| e.to_string())?;
    s.write_all(&mqtt_connect(client_id, login))
        .map_err(|e| e.to_string())?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack)
        .map_err(|e| format!("no CONNACK: {e}"))?;
    if ack[0] != 0x20 || ack[1] != 0x02 {
        return Err(format!("not a CONNACK: {ack:02x?}"));
    }
    Ok(ack[3])
}

/// Runs a CLI with a deadline (mosquitto_pub has no overall timeout).
fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn CLI");
    let done = poll_until(Instant::now() + limit, || child.try_wait().ok().flatten());
    if done.is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().expect("CLI output")
}

fn mosquitto_pub(port: u16, ca: &Path, cert: &Path, key: &Path) -> Output {
    run_bounded(
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .arg("--cafile")
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-q", "1", "-t", "harness/hello", "-m", "hi"]),
        Duration::from_secs(15),
    )
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn get(socket: &Path, path: &str) -> HttpReply {
    unix_http(socket, "GET", path, None, T)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

async fn send(socket: &Path, method: &str, path: &str, body: &str) -> HttpReply {
    unix_http(socket, method, path, Some(body.as_bytes()), T)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

// --------------------------------------------------------------- NATS ---

#[test]
fn nats_servers_with_auth_start_in_parallel_on_their_own_ports() {
    let starts: Vec<_> = (0..2)
        .map(|i| {
            thread::spawn(move || {
                NatsServer::start(NatsConfig {
                    users: vec![NatsUser::new(format!("agent{i}"), "secret")],
                    ..Default::default()
                })
            })
        })
        .collect();
    let servers: Vec<NatsServer> = starts
        .into_iter()
        .map(|h| h.join().expect("start"))
        .collect();
    assert_ne!(servers[0].port(), servers[1].port());
    for s in &servers {
        assert_eq!(s.url(), format!("nats://127.0.0.1:{}", s.port()));
        let info = nats_info(s.port());
        assert!(info.starts_with("INFO {"), "{info}");
        assert!(info.contains("\"auth_required\":true"), "{info}");
    }
}

#[test]
fn nats_refuses_unknown_users_and_enforces_permissions() {
    let s = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("agent", "secret")
            .publish(vec!["dev.>"])
            .subscribe(vec!["_INBOX.>"])],
        ..Default::default()
    });
    let refused = nats_session(
        s.port(),
        "CONNECT {\"user\":\"x\",\"pass\":\"y\",\"verbose\":false}\r\nPING\r\n",
        &["-ERR", "PONG"],
    );
    assert!(
        refused.contains("-ERR 'Authorization Violation'"),
        "{refused}"
    );

    let login = "CONNECT {\"user\":\"agent\",\"pass\":\"secret\",\"verbose\":false}\r\n";
    let denied = nats_session(
        s.port(),
        &format!("{login}PUB other.x 2\r\nhi\r\nPING\r\n"),
        &["PONG"],
    );
    assert!(
        denied.contains("-ERR 'Permissions Violation for Publish to \"other.x\"'"),
        "{denied}"
    );
    let allowed = nats_session(
        s.port(),
        &format!("{login}PUB dev.a 2\r\nhi\r\nPING\r\n"),
        &["PONG"],
    );
    assert!(
        allowed.contains("PONG") && !allowed.contains("-ERR"),
        "{allowed}"
    );
}

#[test]
fn nats_with_mqtt_accepts_mqtt_clients_with_nats_credentials() {
    let s = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("device", "pw")],
        mqtt: true,
        ..Default::default()
    });
    let port = s.mqtt_port().expect("an MQTT port");
    assert_ne!(port, s.port());
    assert_eq!(mqtt_connack(port, "dev-1", Some(("device", "pw"))), Ok(0));
    let bad = mqtt_connack(port, "dev-2", Some(("device", "wrong")));
    assert!(!matches!(bad, Ok(0)), "wrong password accepted: {bad:?}");
}

#[test]
fn nats_stop_then_restart_serves_on_the_same_port_with_jetstream() {
    let mut s = NatsServer::start(NatsConfig {
        jetstream: true,
        ..Default::default()
    });
    let port = s.port();
    let js_info = |port| {
        nats_session(
            port,
            "CONNECT {\"verbose\":false}\r\nSUB _INBOX.js 1\r\nPUB $JS.API.INFO _INBOX.js 0\r\n\r\n",
            &["account_info_response"],
        )
    };
    let first = js_info(port);
    assert!(
        first.contains("account_info_response") && !first.contains("\"error\""),
        "{first}"
    );

    let pid = s.pid().expect("running");
    s.stop();
    assert!(s.pid().is_none() && !pid_alive(pid));
    assert!(!tcp_accepts(port), "port {port} still open after stop");

    s.restart();
    assert_eq!(s.port(), port);
    assert!(nats_info(port).starts_with("INFO {"));
    let again = js_info(port);
    assert!(again.contains("account_info_response"), "{again}");
    assert!(s.store_dir().join("jetstream").is_dir());
}

// ---------------------------------------------------------- Mosquitto ---

#[test]
fn mosquitto_plain_accepts_anonymous_mqtt() {
    let m = Mosquitto::start_plain();
    assert_eq!(mqtt_connack(m.port(), "anon", None), Ok(0));
}

#[test]
fn mosquitto_tls_requires_a_client_certificate_from_its_ca() {
    let pki = TestPki::new("device-1");
    let m = Mosquitto::start_tls(&pki);
    let port = m.port();

    // Plain MQTT on the TLS listener never gets a CONNACK.
    assert!(mqtt_connack(port, "plain", None).is_err());

    let ok = mosquitto_pub(port, &pki.ca_cert, &pki.client_cert, &pki.client_key);
    assert!(
        ok.status.success(),
        "mosquitto_pub with the PKI's client cert failed: {}\n{}",
        String::from_utf8_lossy(&ok.stderr),
        m.log_tail()
    );
    // use_identity_as_username: the certificate CN is the MQTT username.
    let seen = poll_until(Instant::now() + T, || {
        m.log_text().contains("u'device-1'").then_some(())
    });
    assert!(seen.is_some(), "{}", m.log_tail());

    // A second client from the same CA works; one from another CA does not.
    let (cert, key) = pki.issue_client("device-2");
    let (cert2, key2) = (
        pki.write_file("d2.crt", &cert),
        pki.write_file("d2.key", &key),
    );
    assert!(mosquitto_pub(port, &pki.ca_cert, &cert2, &key2)
        .status
        .success());
    let other = TestPki::new("intruder");
    let refused = mosquitto_pub(port, &pki.ca_cert, &other.client_cert, &other.client_key);
    assert!(!refused.status.success(), "foreign client cert accepted");
}

#[test]
fn mosquitto_stop_then_restart_serves_on_the_same_port() {
    let mut m = Mosquitto::start_plain();
    let port = m.port();
    m.stop();
    assert!(!tcp_accepts(port));
    m.restart();
    assert_eq!(m.port(), port);
    assert_eq!(mqtt_connack(port, "again", None), Ok(0));
}

#[test]
fn dropped_servers_free_their_ports_and_leave_no_child() {
    let nats = NatsServer::start(NatsConfig::default());
    let mosquitto = Mosquitto::start_plain();
    let ports = [nats.port(), mosquitto.port()];
    let pids = [nats.pid().expect("pid"), mosquitto.pid().expect("pid")];
    let dirs = [nats.dir().to_path_buf(), mosquitto.dir().to_path_buf()];
    drop(nats);
    drop(mosquitto);
    for ((port, pid), dir) in ports.into_iter().zip(pids).zip(dirs) {
        assert!(!tcp_accepts(port), "port {port} still open");
        assert!(!pid_alive(pid), "pid {pid} still there");
        assert!(!dir.exists(), "{} not removed", dir.display());
    }
    // free_port never hands out the same port twice in one process.
    let (a, b) = (free_port(), free_port());
    assert_ne!(a, b);
}

// -------------------------------------------------------------- snapd ---

#[test]
fn real_snapds_run_side_by_side_and_answer_for_real() {
    let starts: Vec<_> = (0..2).map(|_| thread::spawn(RealSnapd::start)).collect();
    let mut snapds: Vec<RealSnapd> = starts
        .into_iter()
        .map(|h| h.join().expect("start"))
        .collect();
    assert_ne!(snapds[0].socket(), snapds[1].socket());
    for s in &snapds {
        let info =
            crate::common::unix_http_blocking(&s.socket(), "GET", "/v2/system-info", None, T)
                .expect("system-info");
        assert_eq!(info.status, 200);
        let v = info.json();
        assert_eq!(v["result"]["on-classic"], true, "{v}");
        assert_eq!(v["result"]["series"], "16");
        assert!(s.root().join("var/lib/snapd/state.json").exists());
    }
    let last = snapds.pop().expect("two");
    let (pid, root) = (last.pid().expect("pid"), last.root().to_path_buf());
    drop(last);
    assert!(!pid_alive(pid), "snapd {pid} survived drop");
    assert!(!root.exists());
}

/// The double and a real snapd give byte-identical JSON for the same
/// requests wherever their state is the same (a fresh device, nothing
/// installed), and the same key sets for system-info and the seed change.
#[tokio::test]
async fn double_answers_exactly_like_real_snapd() {
    let real = tokio::task::spawn_blocking(RealSnapd::start)
        .await
        .expect("start snapd");
    let double = SnapdDouble::start().await;
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/v2/snaps", None),
        ("GET", "/v2/snaps/hello-world", None),
        (
            "POST",
            "/v2/snaps/hello-world",
            Some(r#"{"action":"remove"}"#),
        ),
        (
            "POST",
            "/v2/snaps/hello-world",
            Some(r#"{"action":"frob"}"#),
        ),
        (
            "POST",
            "/v2/snaps",
            Some(r#"{"action":"frob","snaps":["a"]}"#),
        ),
        (
            "POST",
            "/v2/snaps",
            Some(r#"{"action":"snapshot","snaps":["foo"]}"#),
        ),
        ("GET", "/v2/changes", None),
        ("GET", "/v2/changes/999", None),
        ("POST", "/v2/changes/1", Some(r#"{"action":"abort"}"#)),
        ("GET", "/v2/changes?select=frob", None),
        ("GET", "/v2/apps?select=service", None),
        ("GET", "/v2/apps?select=service&names=foo", None),
        ("GET", "/v2/apps?select=frob", None),
        ("GET", "/v2/snaps/foo/conf?keys=nope", None),
        ("PUT", "/v2/snaps/foo/conf", Some(r#"{"a":1}"#)),
        ("GET", "/v2/model/serial", None),
        ("GET", "/v2/assertions/frob", None),
        ("GET", "/v2/logs?n=3", None),
        ("GET", "/v2/snapshots", None),
        (
            "POST",
            "/v2/snapshots",
            Some(r#"{"action":"snapshot","snaps":["foo"]}"#),
        ),
        ("GET", "/v2/snapshots/1/export", None),
        ("GET", "/v2/interfaces", None),
        ("GET", "/v2/connections", None),
        (
            "POST",
            "/v2/interfaces",
            Some(
                r#"{"action":"connect","plugs":[{"snap":"a","plug":"b"}],"slots":[{"snap":"c","slot":"d"}]}"#,
            ),
        ),
        ("GET", "/v2/warnings", None),
        ("GET", "/v2/aliases", None),
        ("GET", "/v2/notices", None),
        ("PUT", "/v2/system-info", None),
        ("GET", "/v2/nope", None),
        // Routing is on the decoded path, as snapd's router does it.
        ("GET", "/v2/snaps/hello%2Dworld", None),
        ("GET", "/v2/snaps/foo%2Fconf?keys=nope", None),
        ("GET", "/v2/snaps%2Ffoo", None),
    ];
    // snapd's name rule (naming.ValidateInstance), refused before the store.
    let too_long = format!("/v2/snaps/{}", "a".repeat(41));
    let mut names: Vec<String> = [
        "a",
        "-ab",
        "ab-",
        "a--b",
        "1234",
        "Ab",
        "a.b",
        "ab_",
        "ab_12345678901",
        "ab_x_y",
        "ab_X",
    ]
    .iter()
    .map(|n| format!("/v2/snaps/{n}"))
    .collect();
    names.push(too_long);
    let install = Some(r#"{"action":"install"}"#);
    let name_cases: Vec<(&str, &str, Option<&str>)> = names
        .iter()
        .map(|p| ("POST", p.as_str(), install))
        .collect();
    for (method, path, body) in cases.iter().chain(&name_cases) {
        let b = body.map(str::as_bytes);
        let r = unix_http(&real.socket(), method, path, b, T)
            .await
            .expect("real");
        let d = unix_http(&double.socket(), method, path, b, T)
            .await
            .expect("double");
        assert_eq!(
            (r.status, r.json()),
            (d.status, d.json()),
            "{method} {path}: real vs double"
        );
    }
    // Same fields where values differ by nature.
    let (r, d) = (
        get(&real.socket(), "/v2/system-info").await.json(),
        get(&double.socket(), "/v2/system-info").await.json(),
    );
    assert_eq!(keys(&r), keys(&d));
    assert_eq!(keys(&r["result"]), keys(&d["result"]));
    let (r, d) = (
        get(&real.socket(), "/v2/changes?select=all").await.json(),
        get(&double.socket(), "/v2/changes?select=all").await.json(),
    );
    let (rc, dc) = (&r["result"][0], &d["result"][0]);
    assert_eq!(keys(rc), keys(dc));
    assert_eq!(keys(&rc["tasks"][0]), keys(&dc["tasks"][0]));
    for k in ["id", "kind", "summary", "status", "ready"] {
        assert_eq!(rc[k], dc[k], "seed change {k}");
    }
    assert_eq!(rc["tasks"].as_array().map(Vec::len), Some(2));
    assert_eq!(dc["tasks"].as_array().map(Vec::len), Some(2));
    // Assertion answers: same media type and count header.
    for path in ["/v2/assertions/serial", "/v2/assertions/model", "/v2/model"] {
        let (r, d) = (
            get(&real.socket(), path).await,
            get(&double.socket(), path).await,
        );
        assert_eq!(r.status, d.status, "{path}");
        assert_eq!(r.header("content-type"), d.header("content-type"), "{path}");
        assert_eq!(
            r.header("x-ubuntu-assertions-count"),
            d.header("x-ubuntu-assertions-count"),
            "{path}"
        );
        assert_eq!(r.body.ends_with(b"\n"), d.body.ends_with(b"\n"), "{path}");
    }
}

// -------------------------------------------------------- snapd double ---

#[tokio::test]
async fn double_install_in_manual_mode_moves_do_doing_done() {
    let d = SnapdDouble::start().await;
    d.add_store_snap("hello-world");
    d.set_change_mode(ChangeMode::Manual);
    let sock = d.socket();

    let r = send(
        &sock,
        "POST",
        "/v2/snaps/hello-world",
        r#"{"action":"install","channel":"edge"}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    let v = r.json();
    assert_eq!(
        v,
        json!({"type":"async","status-code":202,"status":"Accepted","result":null,"change":"2"})
    );

    let change = |r: HttpReply| r.json()["result"].clone();
    let c = change(get(&sock, "/v2/changes/2").await);
    assert_eq!(c["kind"], "install-snap");
    assert_eq!(
        c["summary"],
        "Install \"hello-world\" snap from \"edge\" channel"
    );
    assert_eq!(
        (c["status"].as_str(), c["ready"].as_bool()),
        (Some("Do"), Some(false))
    );
    assert!(c.get("ready-time").is_none() && c.get("err").is_none());
    assert_eq!(c["data"], json!({"snap-names": ["hello-world"]}));
    assert!(c["tasks"].as_array().is_some_and(|t| t.len() >= 2));
    let in_progress = get(&sock, "/v2/changes").await.json();
    assert_eq!(in_progress["result"].as_array().map(Vec::len), Some(1));

    d.set_change_status("2", "Doing");
    let c = change(get(&sock, "/v2/changes/2").await);
    assert_eq!(c["status"], "Doing");
    assert_eq!(c["tasks"][0]["status"], "Doing");
    assert_eq!(get(&sock, "/v2/snaps/hello-world").await.status, 404);

    d.set_change_status("2", "Done");
    let c = change(get(&sock, "/v2/changes/2").await);
    assert_eq!(
        (c["status"].as_str(), c["ready"].as_bool()),
        (Some("Done"), Some(true))
    );
    let ready_time = c["ready-time"].as_str().expect("ready-time once ready");
    assert!(ready_time.ends_with('Z') && ready_time.contains('T'));
    assert_eq!(
        c["tasks"][0]["progress"],
        json!({"label":"","done":1,"total":1})
    );

    let snaps = get(&sock, "/v2/snaps").await.json();
    assert_eq!(snaps["sources"], json!(["local"]));
    let snap = &snaps["result"][0];
    assert_eq!(snap["name"], "hello-world");
    assert_eq!(snap["channel"], "edge");
    assert_eq!(snap["tracking-channel"], "latest/edge");
    assert_eq!(snap["revision"], "1");
    assert_eq!(d.installed(), vec!["hello-world".to_string()]);
    let for_snap = get(&sock, "/v2/changes?select=all&for=hello-world")
        .await
        .json();
    assert_eq!(for_snap["result"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn double_answers_snapd_error_kinds() {
    let d = SnapdDouble::start().await;
    d.add_installed("core24", "20240101", "423", "latest/stable");
    let sock = d.socket();
    let err = |r: &HttpReply| {
        let v = r.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["status-code"], r.status);
        (
            r.status,
            v["result"]["kind"].clone(),
            v["result"]["message"].clone(),
        )
    };
    let post = |body: &'static str, name: &'static str| {
        let sock = sock.clone();
        async move { send(&sock, "POST", &format!("/v2/snaps/{name}"), body).await }
    };

    let r = post(r#"{"action":"install"}"#, "core24").await;
    assert_eq!(err(&r).0, 400);
    assert_eq!(err(&r).1, "snap-already-installed");
    let r = post(r#"{"action":"install"}"#, "no-such-snap").await;
    assert_eq!((err(&r).0, err(&r).1), (404, json!("snap-not-found")));
    let r = post(r#"{"action":"refresh"}"#, "absent").await;
    assert_eq!((err(&r).0, err(&r).1), (400, json!("snap-not-installed")));
    let r = post(r#"{"action":"refresh"}"#, "core24").await;
    assert_eq!(err(&r).1, "snap-no-update-available");
    let r = post(r#"{"action":"dance"}"#, "core24").await;
    assert_eq!((err(&r).0, err(&r).1), (400, Value::Null));
    let r = post(r#"{"action":"#, "core24").await;
    assert_eq!((err(&r).0, err(&r).1), (400, Value::Null));
    let r = post(r#"{"action":"install"}"#, "Bad_Name!").await;
    assert_eq!(err(&r).0, 400);
    let r = get(&sock, "/v2/snaps/absent").await;
    assert_eq!(
        err(&r),
        (404, json!("snap-not-found"), json!("snap not installed"))
    );
    let r = get(&sock, "/v2/snaps/core24/conf?keys=nope").await;
    assert_eq!(err(&r).1, "option-not-found");
    let r = get(&sock, "/v2/apps?select=service&names=core24").await;
    assert_eq!(
        err(&r),
        (404, json!("app-not-found"), json!("no matching services"))
    );
    let r = get(&sock, "/v2/changes/42").await;
    assert_eq!(
        err(&r),
        (404, Value::Null, json!("cannot find change with id \"42\""))
    );
    let r = get(&sock, "/v2/model/serial").await;
    assert_eq!(
        r.json(),
        json!({"type":"error","status-code":404,"status":"Not Found","result":{"message":"no serial assertion yet","kind":"assertion-not-found","value":"serial"}})
    );
    let r = unix_http(&sock, "DELETE", "/v2/snaps", None, T)
        .await
        .expect("405");
    assert_eq!(
        r.json(),
        json!({"type":"error","status-code":405,"status":"Method Not Allowed","result":{"message":"method \"DELETE\" not allowed"}})
    );
    let r = get(&sock, "/v2/whatever").await;
    assert_eq!(err(&r), (404, Value::Null, json!("not found")));
}

#[tokio::test]
async fn double_serves_assertions_and_a_settable_serial() {
    let d = SnapdDouble::start().await;
    let sock = d.socket();
    let r = get(&sock, "/v2/assertions/model").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("application/x.ubuntu.assertion; bundle=y")
    );
    assert_eq!(r.header("x-ubuntu-assertions-count"), Some("1"));
    assert_eq!(r.text(), format!("{MODEL_ASSERTION}\n"));
    assert!(r
        .text()
        .contains("brand-id: canonical\nmodel: ubuntu-core-24-amd64\n"));

    let r = get(&sock, "/v2/assertions/serial").await;
    assert_eq!(r.header("x-ubuntu-assertions-count"), Some("0"));
    assert!(r.body.is_empty());

    d.set_serial(Some(SERIAL_ASSERTION.to_string()));
    let r = get(&sock, "/v2/model/serial").await;
    assert_eq!(
        r.header("content-type"),
        Some("application/x.ubuntu.assertion")
    );
    assert!(r.text().contains("serial: A1B2-c3d4/5\n"));
    let r = get(&sock, "/v2/model/serial?json=true").await;
    assert_eq!(r.json()["result"]["headers"]["serial"], "A1B2-c3d4/5");
    let r = get(&sock, "/v2/assertions/serial").await;
    assert_eq!(r.header("x-ubuntu-assertions-count"), Some("1"));

    let r = send(
        &sock,
        "POST",
        "/v2/assertions",
        "type: account\nauthority-id: canonical\n\nsig",
    )
    .await;
    assert_eq!(r.json()["result"], Value::Null);
    let r = send(&sock, "POST", "/v2/assertions", "garbage").await;
    assert_eq!(r.status, 400);
    assert_eq!(d.added_assertions().len(), 1);
}

#[tokio::test]
async fn double_logs_are_json_seq_records() {
    let d = SnapdDouble::start().await;
    d.add_installed("mqtt-broker", "2.0", "7", "stable");
    let sock = d.socket();
    // Like real snapd: with no services there is nothing to log.
    assert_eq!(get(&sock, "/v2/logs?n=5").await.status, 404);

    d.add_service("mqtt-broker", "daemon", true);
    d.add_log("mqtt-broker.daemon", "started");
    d.add_log("mqtt-broker.daemon", "listening");
    let r = get(&sock, "/v2/logs?n=1&names=mqtt-broker").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json-seq"));
    assert_eq!(r.body.first(), Some(&0x1e));
    let records: Vec<Value> = r
        .body
        .split(|b| *b == 0x1e)
        .filter(|rec| !rec.is_empty())
        .map(|rec| serde_json::from_slice(rec).expect("each record is JSON"))
        .collect();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["message"], "listening");
    assert_eq!(records[0]["sid"], "mqtt-broker.daemon");
    assert!(records[0]["pid"].is_string() && records[0]["timestamp"].is_string());
}

#[tokio::test]
async fn double_faults_break_answers_on_demand() {
    let d = SnapdDouble::start().await;
    let sock = d.socket();
    d.set_fault(Some(Fault::Garbage));
    let r = get(&sock, "/v2/system-info").await;
    assert_eq!(r.status, 200);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());

    d.set_fault(Some(Fault::Status500));
    let r = get(&sock, "/v2/system-info").await;
    assert_eq!((r.status, r.json()["type"].clone()), (500, json!("error")));

    d.set_fault(Some(Fault::Slow(Duration::from_millis(300))));
    let started = Instant::now();
    let timed_out = unix_http(
        &sock,
        "GET",
        "/v2/system-info",
        None,
        Duration::from_millis(50),
    )
    .await;
    assert!(timed_out.is_err());
    let r = get(&sock, "/v2/system-info").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.json()["result"]["version"], "2.61-double");

    d.set_fault(None);
    assert_eq!(get(&sock, "/v2/system-info").await.status, 200);
    // Every request is recorded, faulty or not.
    let seen = d.requests();
    assert_eq!(seen.len(), 5);
    assert!(seen
        .iter()
        .all(|r| r.method == "GET" && r.path_and_query == "/v2/system-info"));
}

#[tokio::test]
async fn double_keeps_state_across_requests() {
    let d = SnapdDouble::start().await;
    d.add_installed("agent", "1.0", "12", "stable");
    d.add_service("agent", "daemon", false);
    let sock = d.socket();

    let r = send(
        &sock,
        "PUT",
        "/v2/snaps/agent/conf",
        r#"{"nats.url":"nats://x","debug":true}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    assert_eq!(
        d.conf("agent"),
        json!({"nats": {"url": "nats://x"}, "debug": true})
    );
    let r = get(&sock, "/v2/snaps/agent/conf?keys=nats.url").await;
    assert_eq!(r.json()["result"], json!({"nats.url": "nats://x"}));

    let r = send(
        &sock,
        "POST",
        "/v2/apps",
        r#"{"action":"start","names":["agent.daemon"]}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    let apps = get(&sock, "/v2/apps?select=service").await.json();
    assert_eq!(
        apps["result"],
        json!([{"snap":"agent","name":"daemon","daemon":"simple","daemon-scope":"system","enabled":true,"active":true}])
    );

    let r = send(
        &sock,
        "POST",
        "/v2/snaps",
        r#"{"action":"snapshot","snaps":["agent"]}"#,
    )
    .await;
    assert_eq!(r.json()["result"], json!({"set-id": 1}));
    let sets = get(&sock, "/v2/snapshots").await.json();
    assert_eq!(sets["result"][0]["snapshots"][0]["snap"], "agent");
    let export = get(&sock, "/v2/snapshots/1/export").await;
    assert_eq!(
        export.header("content-type"),
        Some("application/x.snapshot")
    );
    assert_eq!(&export.body[257..262], b"ustar");

    let r = send(&sock, "POST", "/v2/systems", r#"{"action":"reboot"}"#).await;
    assert_eq!(r.json()["maintenance"]["kind"], "system-restart");
    assert_eq!(d.reboots(), 1);

    let r = send(&sock, "POST", "/v2/snaps/agent", r#"{"action":"remove"}"#).await;
    assert_eq!(r.status, 202);
    assert!(d.installed().is_empty());
    assert_eq!(d.conf("agent"), json!({}));
}

#[tokio::test]
async fn double_abort_and_error_follow_snapd_rules() {
    let d = SnapdDouble::start().await;
    d.add_store_snap("aa-snap");
    d.add_store_snap("bb-snap");
    d.set_change_mode(ChangeMode::Manual);
    let sock = d.socket();
    let id = |r: HttpReply| r.json()["change"].as_str().expect("change id").to_string();

    let first = id(send(
        &sock,
        "POST",
        "/v2/snaps/aa-snap",
        r#"{"action":"install"}"#,
    )
    .await);
    let r = send(
        &sock,
        "POST",
        &format!("/v2/changes/{first}"),
        r#"{"action":"abort"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (
            r.json()["result"]["status"].clone(),
            r.json()["result"]["ready"].clone()
        ),
        (json!("Hold"), json!(true))
    );
    let r = send(
        &sock,
        "POST",
        &format!("/v2/changes/{first}"),
        r#"{"action":"abort"}"#,
    )
    .await;
    assert_eq!(r.status, 400);

    let second = id(send(
        &sock,
        "POST",
        "/v2/snaps/bb-snap",
        r#"{"action":"install"}"#,
    )
    .await);
    d.set_change_error(&second, "cannot download");
    let c = d.change(&second).expect("change");
    assert_eq!(c["status"], "Error");
    let err = c["err"].as_str().expect("err");
    assert!(
        err.starts_with("cannot perform the following tasks:\n- "),
        "{err}"
    );
    assert!(err.ends_with("(cannot download)"), "{err}");
    assert!(d.installed().is_empty());

    let seeded = d.add_change(
        "refresh-snap",
        "Refresh \"x\" snap",
        "Done",
        "2024-01-02T03:04:05.123456789Z",
    );
    let c = d.change(&seeded).expect("seeded");
    assert_eq!(c["spawn-time"], "2024-01-02T03:04:05.123456789Z");
    assert_eq!(c["ready-time"], "2024-01-02T03:04:06.123456789Z");
}

#[tokio::test]
async fn double_notices_are_off_by_default_and_long_poll_when_on() {
    let d = SnapdDouble::start().await;
    let sock = d.socket();
    assert_eq!(get(&sock, "/v2/notices").await.status, 404);
    d.set_notices_supported(true);
    let all = get(&sock, "/v2/notices?types=change-update").await.json();
    let last = all["result"]
        .as_array()
        .and_then(|a| a.last())
        .expect("the seed change has a notice")["last-repeated"]
        .as_str()
        .expect("time")
        .to_string();
    d.add_store_snap("xx-snap");
    let poll = {
        let sock = sock.clone();
        let path = format!("/v2/notices?types=change-update&after={last}&timeout=5s");
        tokio::spawn(async move { get(&sock, &path).await })
    };
    // Install once the double has the poll in hand (so it is waiting).
    let deadline = tokio::time::Instant::now() + T;
    while !d
        .requests()
        .iter()
        .any(|r| r.path_and_query.contains("timeout=5s"))
    {
        assert!(tokio::time::Instant::now() < deadline, "poll never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = send(
        &sock,
        "POST",
        "/v2/snaps/xx-snap",
        r#"{"action":"install"}"#,
    )
    .await;
    assert_eq!(r.status, 202);
    let woke = poll.await.expect("poll task").json();
    assert_eq!(woke["result"][0]["key"], "2");
    assert_eq!(woke["result"][0]["type"], "change-update");
}

#[tokio::test]
async fn double_dropped_leaves_no_socket() {
    let d = SnapdDouble::start().await;
    let sock = d.socket();
    assert_eq!(get(&sock, "/v2/system-info").await.status, 200);
    drop(d);
    assert!(!sock.exists());
    assert!(unix_http(&sock, "GET", "/v2/system-info", None, T)
        .await
        .is_err());
}
