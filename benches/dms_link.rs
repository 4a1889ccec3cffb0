//! The DMS link end to end (`cargo bench --bench dms_link`): actions per
//! second and latency from the DMS's publish to the agent's response,
//! through a real mosquitto (mutual TLS, persistence on, as the fault tests
//! run it) and the real `iot-agent run` process (release build) answering
//! from the snapd double, with the action ledger on a disk file against the
//! same agent with its ledger file on tmpfs (`/dev/shm`: the same code and
//! SQLite work, but no write reaches a disk: persistence off) in the same
//! run.
//!
//! mosquitto runs with `set_tcp_nodelay true` (`BENCH_BROKER_NAGLE=1`:
//! its default, which adds its wait for a delayed ACK to each reply).
//! The action is `server` (one `GET /v2/system-info` to the double), the
//! cheapest action the DMS sends. Each window keeps that many actions in
//! flight (1: unloaded latency; 16: `dms.actions.concurrency`; all at once:
//! a burst, as a persistent session delivers a backlog). Without `--bench`
//! (as `cargo test --all-targets` runs it) a small smoke run. Method and
//! results: docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use common::agent_proc::AgentProcess;
use common::identity_double::{IdentityDouble, DEVICE_ID};
use common::mqtt_client::{connect_and_subscribe, TestMqtt};
use common::servers::{free_port, Mosquitto};
use common::snapd_double::{SnapdDouble, SERIAL_ASSERTION};
use common::tls::TestPki;
use rumqttc::{AsyncClient, MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One agent with its broker, doubles and DMS-side client.
struct Link {
    name: &'static str,
    _dirs: Vec<tempfile::TempDir>,
    _broker: Mosquitto,
    _identity: IdentityDouble,
    _snapd: SnapdDouble,
    agent: AgentProcess,
    dms: AsyncClient,
    /// Responses on `devices/pub/{deviceId}`, routed to the running window.
    responses: Arc<Mutex<Option<mpsc::UnboundedSender<Value>>>>,
}

/// Starts broker, doubles and agent with its ledger under `ledger_dir`.
async fn link(name: &'static str, ledger_dir: tempfile::TempDir) -> Link {
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    // mosquitto's Nagle wait would be most of an unloaded action's latency;
    // BENCH_BROKER_NAGLE=1 keeps its default to see it.
    let broker = if std::env::var("BENCH_BROKER_NAGLE").is_ok_and(|v| v == "1") {
        Mosquitto::start_tls_persistent(&pki)
    } else {
        Mosquitto::start_tls_persistent_nodelay(&pki)
    };
    let identity = IdentityDouble::start_with(false, pki.clone(), broker.port()).await;
    let snapd = SnapdDouble::start().await;
    snapd.set_serial(Some(SERIAL_ASSERTION.to_string()));
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("IOT_AGENT_URL", identity.url().to_string()),
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
        (
            "IOT_AGENT_NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        ),
        (
            "IOT_AGENT_DMS__LEDGER__LOCATION",
            ledger_dir.path().join("dms.db").display().to_string(),
        ),
    ];
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("subscribed to DMS actions");

    let (cert, key) = pki.issue_client("dms");
    let tls = iot_agent::tls::client_config(
        iot_agent::tls::Roots::new()
            .pem(&pki.ca_pem, "test CA")
            .unwrap(),
        Some(iot_agent::tls::ClientCert {
            cert_pem: &cert,
            key_pem: &key,
        }),
        iot_agent::tls::Verify::Chain,
        iot_agent::tls::Advice {
            peer: "the bench broker",
            ca_key: "-",
            verify_key: None,
        },
    )
    .unwrap();
    let mut opts = MqttOptions::new(format!("dms-{name}"), "localhost", broker.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024)
        .set_inflight(1000);
    let TestMqtt {
        client,
        mut messages,
    } = connect_and_subscribe(opts, &[&format!("devices/pub/{DEVICE_ID}")]).await;
    let responses: Arc<Mutex<Option<mpsc::UnboundedSender<Value>>>> = Default::default();
    let route = responses.clone();
    tokio::spawn(async move {
        while let Some((_, payload)) = messages.recv().await {
            let v: Value = serde_json::from_slice(&payload).unwrap_or_default();
            if let Some(tx) = route.lock().unwrap().as_ref() {
                let _ = tx.send(v);
            }
        }
    });
    Link {
        name,
        _dirs: vec![dir, ledger_dir],
        _broker: broker,
        _identity: identity,
        _snapd: snapd,
        agent,
        dms: client,
        responses,
    }
}

struct Outcome {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// Sends `n` `server` actions keeping at most `window` unanswered; every
/// one must be answered with success (else the numbers would lie).
async fn run(l: &Link, tag: &str, n: usize, window: usize) -> Outcome {
    let (tx, mut rx) = mpsc::unbounded_channel();
    *l.responses.lock().unwrap() = Some(tx);
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let slots = Arc::new(Semaphore::new(window));
    let (s, sl) = (sent.clone(), slots.clone());
    let collect = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let v = tokio::time::timeout(Duration::from_secs(120), rx.recv())
                .await
                .expect("no response for 120 s: the link stalled")
                .expect("the DMS client stopped");
            let id = v["id"].as_str().unwrap_or_default().to_string();
            let Some(at) = s.lock().unwrap().remove(&id) else {
                continue;
            };
            assert_eq!(v["success"], true, "an action failed: {v}");
            lat.push(at.elapsed());
            sl.add_permits(1);
        }
        lat
    });
    let start = Instant::now();
    for i in 0..n {
        slots.acquire().await.unwrap().forget();
        let id = format!("{tag}-{i}");
        let payload = json!({"id": id, "action": "server", "snap": "", "data": ""}).to_string();
        sent.lock().unwrap().insert(id, Instant::now());
        l.dms
            .publish(
                format!("devices/sub/{DEVICE_ID}"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }
    let mut lat = collect.await.unwrap();
    let elapsed = start.elapsed();
    *l.responses.lock().unwrap() = None;
    lat.sort();
    Outcome {
        rate: n as f64 / elapsed.as_secs_f64(),
        p50: lat[lat.len() / 2],
        p99: lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let n = env_usize("BENCH_ACTIONS", if benching { 3000 } else { 40 });
    let unloaded = env_usize("BENCH_UNLOADED", if benching { 500 } else { 20 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let disk = tempfile::tempdir().unwrap();
        let shm = tempfile::Builder::new()
            .prefix("iot-agent-bench-")
            .tempdir_in("/dev/shm")
            .expect("a tmpfs at /dev/shm for the no-persistence baseline");
        let mut links = vec![
            link("ledger on (disk)", disk).await,
            link("persistence off (tmpfs)", shm).await,
        ];
        for l in &links {
            run(l, "warm", 100.min(n), 16).await;
        }
        println!(
            "action `server`, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        for (window, count) in [(1, unloaded), (16, n), (n, n)] {
            let mut out = Vec::new();
            for (i, l) in links.iter().enumerate() {
                let o = run(l, &format!("w{window}-{i}"), count, window).await;
                println!(
                    "{:<24} window {window:>5} actions {count:>5}: {:>7.0}/s p50 {:>10} p99 {:>10}",
                    l.name,
                    o.rate,
                    ms(o.p50),
                    ms(o.p99)
                );
                out.push(o);
            }
            println!(
                "{:<24} window {window:>5}: on/off rate {:.3}, p50 {:.2}x, p99 {:.2}x",
                "ledger cost",
                out[0].rate / out[1].rate,
                out[0].p50.as_secs_f64() / out[1].p50.as_secs_f64(),
                out[0].p99.as_secs_f64() / out[1].p99.as_secs_f64()
            );
        }
        for l in links.iter_mut() {
            l.agent.signal("TERM");
            l.agent.wait_exit();
        }
    });
}
