//! The fleet simulator (`scripts/fleet-sim`, or `cargo bench --bench
//! fleet`): `FLEET_AGENTS` simulated agents in one process against one real
//! broker, and the DMS side that drives them all at once.
//!
//! Each simulated agent has its own broker connection and answers with
//! the agent's own topic handling: the topic vocabulary
//! (`iot_agent::bus::topics`), the DMS request parser and response type
//! (`services::dms::request`), the `deviceSnap` shape and heartbeat hashes
//! (`services::dms::snaps`) of a fake snap list, the per-serial tree's
//! `required-install` parser (`services::per_serial::request`), and on
//! MQTT the agent's MQTT driver itself (`bus::driver`: manual acks,
//! subscriptions retried until granted, reconnection with back-off) with
//! the DMS link's options (`bus::mqtt::options`). What it does not do is
//! ask snapd: the answers come from the fake list, so the numbers are the
//! broker's and the link's, not a device's.
//!
//! Transports (`FLEET_TRANSPORT`):
//! - `mqtt` (default): a real mosquitto with mutual TLS (the DMS's
//!   broker), every agent its own TLS connection and MQTT session;
//! - `nats`: a real nats-server (user/password, no TLS), every agent its
//!   own NATS connection, the same topics in NATS form.
//!
//! Connections are ramped through a semaphore (`FLEET_RAMP` handshakes at
//! once) with small per-connection buffers (MQTT: an in-flight window of
//! 4; NATS: 4 KiB read buffer, 64-message channels). Every agent sends its
//! heartbeat every `FLEET_HEARTBEAT_S` (60) s from a random phase. Then the
//! DMS side sends one action to every agent at once, for each of `device`,
//! `list` (dmscore's versioned reply) and the per-serial `required-install`,
//! and measures from each send until that agent's answer: p50, p99, max,
//! and the time until all answered. It reports connect time, the broker's
//! and its own memory and CPU time. Without `--bench` (as `cargo test
//! --all-targets` runs it) a smoke run with 20 agents that must all answer.
//! Method and results: docs/benchmarks.md; README "Fleet simulator".

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::mqtt_client::{connect_and_subscribe, TestMqtt};
use common::servers::{Mosquitto, NatsConfig, NatsServer, NatsUser};
use common::tls::TestPki;
use futures::StreamExt;
use iot_agent::bus::driver::{self, DriverSettings, Reconnect};
use iot_agent::bus::{topics, Topic};
use iot_agent::services::dms::request::{self, Request, Response};
use iot_agent::services::dms::snaps::{self, Hashes};
use iot_agent::services::per_serial;
use iot_agent::snapd::Snap;
use rumqttc::{MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

const ORG: &str = "fleet-org";
const PASSWORD: &str = "fleet-sim-password";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Mqtt,
    Nats,
}

/// One simulated device: what its answers need.
struct Device {
    id: String,
    serial: String,
    inbox: Topic,
    responses: Topic,
    health: Topic,
    serial_base: Topic,
}

impl Device {
    fn new(i: usize) -> Device {
        let id = format!("sim-{i:05}");
        let serial = format!("SIM{i:05}");
        Device {
            inbox: topics::dms_actions(&id).unwrap(),
            responses: topics::dms_responses(&id).unwrap(),
            health: topics::dms_health(&id).unwrap(),
            serial_base: topics::serial_actions(&serial).unwrap(),
            id,
            serial,
        }
    }

    fn subscriptions(&self) -> Vec<Topic> {
        vec![
            self.inbox.clone(),
            Topic::fixed(&format!("{}/#", self.serial_base.mqtt())),
        ]
    }
}

/// The fake snap list every device has (as snapd would list it).
fn fake_snaps() -> Vec<Snap> {
    let raw = json!([
        {"name": "core22", "version": "20241001", "revision": "1663", "channel": "latest/stable",
         "confinement": "strict", "installed-size": 77000000, "install-date": "2026-11-01T10:00:00Z",
         "status": "active", "type": "base"},
        {"name": "pc-kernel", "version": "5.15.0-122.132", "revision": "2038", "channel": "22/stable",
         "confinement": "strict", "installed-size": 300000000, "install-date": "2026-11-01T10:00:00Z",
         "status": "active", "type": "kernel"},
        {"name": "snapd", "version": "2.66", "revision": "23258", "channel": "latest/stable",
         "confinement": "strict", "installed-size": 40000000, "install-date": "2026-11-01T10:00:00Z",
         "status": "active", "type": "snapd"},
        {"name": "iot-agent", "version": "0.1.0", "revision": "12", "channel": "latest/stable",
         "confinement": "strict", "installed-size": 9000000, "install-date": "2026-11-20T10:00:00Z",
         "status": "active", "type": "app",
         "apps": [{"name": "agent", "daemon": "simple", "enabled": true, "active": true},
                  {"name": "nats", "daemon": "simple", "enabled": true, "active": true}]},
        {"name": "sensor-app", "version": "3.2", "revision": "7", "channel": "latest/stable",
         "confinement": "strict", "installed-size": 15000000, "install-date": "2026-11-21T10:00:00Z",
         "status": "active", "type": "app",
         "apps": [{"name": "collector", "daemon": "simple", "enabled": true, "active": true}]}
    ]);
    serde_json::from_value(raw).expect("the fake snap list is a snapd list")
}

/// The device's snap list as the DMS sees it, sorted by name.
fn device_list(d: &Device, snaps: &[Snap]) -> Vec<Value> {
    let mut out: Vec<Value> = snaps
        .iter()
        .map(|s| snaps::device_snap(&d.id, s, &Map::new()))
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

fn dms_answer(d: &Device, snaps: &[Snap], req: &Request) -> Response {
    match req.action.as_str() {
        "device" => Response::ok(
            req,
            json!({
                "orgId": ORG, "deviceId": d.id, "brand": "fleet", "model": "sim-board",
                "serial": d.serial, "store": "", "deviceKey": "",
                "version": {"deviceId": d.id, "version": "2.66", "series": "16", "osId": "ubuntu-core",
                            "osVersionId": "22", "onClassic": false, "kernelVersion": "5.15.0"},
            }),
        ),
        "list" => {
            let list = device_list(d, snaps);
            let h = Hashes::of(&list);
            let mut r = Response::ok(
                req,
                json!({"snapListHash": h.snap_list, "installedSnapsHash": h.installed_snaps, "snaps": list}),
            );
            r.version = Some("2".into());
            r
        }
        other => Response::fail(
            &req.id,
            other,
            "the fleet simulator answers device and list only",
        ),
    }
}

/// What a simulated agent publishes in answer to one message, if anything.
fn answer(d: &Device, snaps: &[Snap], topic: &Topic, payload: &[u8]) -> Option<(Topic, Bytes)> {
    if topic == &d.inbox {
        let resp = match request::parse(payload) {
            Ok(req) => dms_answer(d, snaps, &req),
            Err(refusal) => *refusal,
        };
        return Some((d.responses.clone(), resp.to_bytes()));
    }
    let rest = topic.strip_prefix(&d.serial_base)?;
    if rest != [per_serial::REQUIRED_INSTALL] {
        return None;
    }
    let result = Topic::fixed(&format!("{}/{}", topic.mqtt(), per_serial::RESULT));
    let body = match per_serial::request::parse(payload) {
        Ok(req) => {
            // Every required snap is on the fake device already.
            let done: Vec<Value> = req
                .snaps
                .iter()
                .map(|s| json!({"name": s.name.as_str(), "status": "already-installed", "change": null}))
                .collect();
            json!({"id": req.id, "success": true, "message": "", "snaps": done})
        }
        Err(r) => json!({"id": r.id, "success": false, "message": r.message, "snaps": []}),
    };
    Some((result, Bytes::from(body.to_string())))
}

fn heartbeat(d: &Device, h: &Hashes) -> Bytes {
    Bytes::from(
        json!({
            "orgId": ORG, "deviceId": d.id,
            "refresh": iot_agent::clock::now_rfc3339_seconds(),
            "snapListHash": h.snap_list, "installedSnapsHash": h.installed_snaps,
        })
        .to_string(),
    )
}

/// Shared by every simulated agent.
struct Sim {
    kind: Kind,
    snaps: Vec<Snap>,
    heartbeat: Duration,
    ramp: Semaphore,
    /// Connect time of every agent (from its turn in the ramp to its
    /// subscriptions granted), in µs.
    connect_us: Mutex<Vec<u64>>,
    heartbeats: AtomicU64,
    shutdown: CancellationToken,
    // MQTT
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    // NATS
    nats_url: String,
}

fn hashes(d: &Device, snaps: &[Snap]) -> Hashes {
    Hashes::of(&device_list(d, snaps))
}

/// First heartbeat at a random point of the period (devices do not boot
/// in step), then every period.
fn heartbeat_ticks(period: Duration) -> tokio::time::Interval {
    let phase = period.mul_f64(rand::random::<f64>());
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

async fn mqtt_agent(sim: Arc<Sim>, d: Device) {
    let permit = sim.ramp.acquire().await.unwrap();
    let started = Instant::now();
    let opts = iot_agent::bus::mqtt::options(
        &d.id,
        &sim.host,
        sim.port,
        sim.tls.clone().unwrap(),
        Duration::from_secs(60),
    );
    let (status, _status_rx) = iot_agent::bus::status::mqtt_status_channel();
    let mut link = driver::start(
        opts,
        DriverSettings {
            label: "DMS broker",
            broker: format!("{}:{}", sim.host, sim.port),
            subscriptions: d.subscriptions(),
            reconnect: Reconnect::Always,
            window: 4,
        },
        status,
        sim.shutdown.clone(),
    );
    let mut subscribed = link.handle.subscribed();
    if subscribed.wait_for(|s| *s).await.is_err() {
        return;
    }
    sim.connect_us
        .lock()
        .unwrap()
        .push(started.elapsed().as_micros() as u64);
    drop(permit);
    let h = hashes(&d, &sim.snaps);
    let mut beat = heartbeat_ticks(sim.heartbeat);
    loop {
        tokio::select! {
            _ = sim.shutdown.cancelled() => return,
            _ = beat.tick() => {
                if link.handle.publish_telemetry(&d.health, heartbeat(&d, &h)) {
                    sim.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
            m = link.messages.recv() => {
                let Some(msg) = m else { return };
                if let Some((topic, body)) = answer(&d, &sim.snaps, &msg.topic, &msg.payload) {
                    if let Err(e) = link.handle.publish(&topic, body).await {
                        eprintln!("{}: cannot answer: {e}", d.id);
                    }
                }
                link.handle.ack(&msg).await;
            }
        }
    }
}

async fn nats_agent(sim: Arc<Sim>, d: Device) {
    let permit = sim.ramp.acquire().await.unwrap();
    let started = Instant::now();
    let client = loop {
        match async_nats::ConnectOptions::with_user_and_password("snapd".into(), PASSWORD.into())
            .name(&d.id)
            .read_buffer_capacity(4096)
            .client_capacity(64)
            .subscription_capacity(64)
            .max_reconnects(None)
            .connect(sim.nats_url.as_str())
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                eprintln!("{}: cannot connect: {e}; retrying", d.id);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let mut subs = Vec::new();
    for t in d.subscriptions() {
        subs.push(client.subscribe(t.nats()).await.unwrap());
    }
    client.flush().await.unwrap();
    sim.connect_us
        .lock()
        .unwrap()
        .push(started.elapsed().as_micros() as u64);
    drop(permit);
    let mut messages = futures::stream::select_all(subs);
    let h = hashes(&d, &sim.snaps);
    let mut beat = heartbeat_ticks(sim.heartbeat);
    loop {
        tokio::select! {
            _ = sim.shutdown.cancelled() => return,
            _ = beat.tick() => {
                if client.publish(d.health.nats(), heartbeat(&d, &h)).await.is_ok() {
                    sim.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
            m = messages.next() => {
                let Some(msg) = m else { return };
                let topic = Topic::from_nats(msg.subject.as_str());
                if let Some((topic, body)) = answer(&d, &sim.snaps, &topic, &msg.payload) {
                    let _ = client.publish(topic.nats(), body).await;
                }
            }
        }
    }
}

/// /proc/PID: resident KiB and CPU seconds (user + system).
fn proc_usage(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is 3rd.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    (rss, (ticks(11) + ticks(12)) / 100.0)
}

/// The DMS side: sends to devices, collects answers.
enum Dms {
    Mqtt(rumqttc::AsyncClient),
    Nats(async_nats::Client),
}

impl Dms {
    async fn send(&self, topic: &Topic, body: String) {
        match self {
            Dms::Mqtt(c) => c
                .publish(topic.mqtt(), QoS::AtLeastOnce, false, body)
                .await
                .unwrap(),
            Dms::Nats(c) => c.publish(topic.nats(), body.into()).await.unwrap(),
        }
    }
}

struct Round {
    name: &'static str,
    answered: usize,
    failed: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    all: Duration,
    broker_cpu: f64,
    sim_cpu: f64,
}

fn pct(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Sends one action to every device and waits for every answer (or the
/// bound).
async fn fan_out(
    name: &'static str,
    dms: &Dms,
    answers: &mut mpsc::UnboundedReceiver<Value>,
    devices: &[Device],
    bound: Duration,
    broker_pid: u32,
) -> Round {
    let n = devices.len();
    let tag = format!("{name}-{}", rand::random::<u32>());
    let cpu0 = proc_usage(broker_pid).1;
    let sim0 = proc_usage(std::process::id()).1;
    let mut sent: Vec<Option<Instant>> = vec![None; n];
    let start = Instant::now();
    for (i, d) in devices.iter().enumerate() {
        let id = format!("{tag}-{i}");
        let (topic, body) = match name {
            "required-install" => (
                d.serial_base.join(&[per_serial::REQUIRED_INSTALL]).unwrap(),
                json!({"id": id, "snaps": [{"name": "sensor-app", "channel": "stable"}]})
                    .to_string(),
            ),
            action => (
                d.inbox.clone(),
                json!({"id": id, "action": action, "snap": "", "data": ""}).to_string(),
            ),
        };
        sent[i] = Some(Instant::now());
        dms.send(&topic, body).await;
    }
    let mut lat = Vec::with_capacity(n);
    let mut failed = 0;
    let mut last = start;
    let deadline = tokio::time::Instant::now() + bound;
    while lat.len() + failed < n {
        let v = match tokio::time::timeout_at(deadline, answers.recv()).await {
            Ok(Some(v)) => v,
            _ => break,
        };
        let Some(i) = v["id"]
            .as_str()
            .and_then(|id| id.strip_prefix(&format!("{tag}-")))
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        let Some(at) = sent.get_mut(i).and_then(Option::take) else {
            continue;
        };
        last = Instant::now();
        if v["success"] == true {
            lat.push(last - at);
        } else {
            eprintln!("{name}: device {i} answered with a failure: {v}");
            failed += 1;
        }
    }
    lat.sort();
    Round {
        name,
        answered: lat.len(),
        failed,
        p50: pct(&lat, 50),
        p99: pct(&lat, 99),
        max: lat.last().copied().unwrap_or_default(),
        all: last - start,
        broker_cpu: proc_usage(broker_pid).1 - cpu0,
        sim_cpu: proc_usage(std::process::id()).1 - sim0,
    }
}

/// As high as the hard limit allows (each connection is a file on both
/// sides; the brokers started from here inherit it).
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a stack value.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let n: usize = env_or("FLEET_AGENTS", if benching { 1000 } else { 20 });
    let kind = match std::env::var("FLEET_TRANSPORT").as_deref() {
        Ok("nats") => Kind::Nats,
        _ => Kind::Mqtt,
    };
    let ramp: usize = env_or("FLEET_RAMP", 64);
    let heartbeat = Duration::from_secs(env_or("FLEET_HEARTBEAT_S", 60));
    let bound = Duration::from_secs(env_or("FLEET_TIMEOUT_S", 60));
    let threads: usize = env_or(
        "FLEET_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );
    let fds = raise_fd_limit();
    if (fds as usize) < n + 256 {
        eprintln!("warning: the file-descriptor limit ({fds}) is below {n} agents: raise it (ulimit -Hn, as root) or expect refusals");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pki = TestPki::new("fleet-device");
        // The DMS gets every answer: no queue or in-flight limit of the
        // broker's may drop a burst of 10,000 (mosquitto's defaults queue
        // 1000 and send 20 at once).
        let mut mosquitto = None;
        let mut nats = None;
        let broker_pid = match kind {
            Kind::Mqtt => {
                let m = Mosquitto::start_tls_with(
                    &pki,
                    "max_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\nconnection_messages false\n",
                );
                let pid = m.pid().unwrap();
                mosquitto = Some(m);
                pid
            }
            Kind::Nats => {
                let n = NatsServer::start(NatsConfig {
                    users: vec![NatsUser::new("snapd", PASSWORD)],
                    ..Default::default()
                });
                let pid = n.pid().unwrap();
                nats = Some(n);
                pid
            }
        };
        let nats_url = nats.as_ref().map(NatsServer::url).unwrap_or_default();
        let (cert, key) = pki.issue_client("fleet-device");
        let client_tls = |cert: &str, key: &str| {
            iot_agent::tls::client_config(
                iot_agent::tls::Roots::new()
                    .pem(&pki.ca_pem, "test CA")
                    .unwrap(),
                Some(iot_agent::tls::ClientCert {
                    cert_pem: cert,
                    key_pem: key,
                }),
                iot_agent::tls::Verify::Chain,
                iot_agent::tls::Advice {
                    peer: "the fleet broker",
                    ca_key: "-",
                    verify_key: None,
                },
            )
            .unwrap()
        };
        let port = mosquitto.as_ref().map_or(0, Mosquitto::port);
        let sim = Arc::new(Sim {
            kind,
            snaps: fake_snaps(),
            heartbeat,
            ramp: Semaphore::new(ramp),
            connect_us: Mutex::new(Vec::with_capacity(n)),
            heartbeats: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            host: "localhost".into(),
            port,
            // One client certificate for every simulated device: the
            // handshake (and the broker's check of the client's chain) is
            // the same work per connection.
            tls: (kind == Kind::Mqtt).then(|| client_tls(&cert, &key)),
            nats_url,
        });

        // The DMS side first, so it hears every heartbeat and answer.
        let (tx, mut answers) = mpsc::unbounded_channel::<Value>();
        let heard_beats = Arc::new(AtomicU64::new(0));
        let dms_side = match kind {
            Kind::Mqtt => {
                let (cert, key) = pki.issue_client("dms");
                let mut opts = MqttOptions::new("dms-fleet", "localhost", port);
                opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    client_tls(&cert, &key),
                )))
                .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024)
                .set_keep_alive(Duration::from_secs(60))
                .set_inflight(1000);
                let TestMqtt {
                    client,
                    mut messages,
                } = connect_and_subscribe(
                    opts,
                    &[
                        "devices/pub/+",
                        "devices/actions/+/required-install/result",
                        "devices/health/+",
                    ],
                )
                .await;
                let beats = heard_beats.clone();
                tokio::spawn(async move {
                    while let Some((topic, payload)) = messages.recv().await {
                        if topic.starts_with("devices/health/") {
                            beats.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let _ = tx.send(serde_json::from_slice(&payload).unwrap_or_default());
                        }
                    }
                });
                Dms::Mqtt(client)
            }
            Kind::Nats => {
                let c = async_nats::ConnectOptions::with_user_and_password(
                    "snapd".into(),
                    PASSWORD.into(),
                )
                .name("dms-fleet")
                .subscription_capacity(1 << 20)
                .connect(sim.nats_url.as_str())
                .await
                .unwrap();
                let mut subs = Vec::new();
                for s in [
                    "devices.pub.*",
                    "devices.actions.*.required-install.result",
                    "devices.health.*",
                ] {
                    subs.push(c.subscribe(s).await.unwrap());
                }
                c.flush().await.unwrap();
                let mut all = futures::stream::select_all(subs);
                let beats = heard_beats.clone();
                tokio::spawn(async move {
                    while let Some(m) = all.next().await {
                        if m.subject.starts_with("devices.health.") {
                            beats.fetch_add(1, Ordering::Relaxed);
                        } else {
                            let _ = tx.send(serde_json::from_slice(&m.payload).unwrap_or_default());
                        }
                    }
                });
                Dms::Nats(c)
            }
        };

        let (broker_rss0, _) = proc_usage(broker_pid);
        let me = std::process::id();
        let (my_rss0, _) = proc_usage(me);
        let devices: Vec<Device> = (0..n).map(Device::new).collect();
        println!(
            "fleet: {n} agents over {kind:?}, ramp {ramp}, heartbeat {heartbeat:?}, {threads} threads, fd limit {fds}, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let cpu0 = proc_usage(broker_pid).1;
        let sim0 = proc_usage(me).1;
        let start = Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let d = Device::new(i);
            let s = sim.clone();
            tasks.push(tokio::spawn(async move {
                match s.kind {
                    Kind::Mqtt => mqtt_agent(s, d).await,
                    Kind::Nats => nats_agent(s, d).await,
                }
            }));
        }
        // Every agent connected and subscribed (bounded: a broker that
        // refuses connections shows here, with how many made it).
        let connect_bound = Instant::now() + Duration::from_secs(env_or("FLEET_CONNECT_S", 600));
        loop {
            let done = sim.connect_us.lock().unwrap().len();
            if done == n {
                break;
            }
            if Instant::now() > connect_bound {
                println!("only {done} of {n} agents connected within the bound");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ramp_time = start.elapsed();
        let ramp_cpu = proc_usage(broker_pid).1 - cpu0;
        let ramp_sim_cpu = proc_usage(me).1 - sim0;
        let mut connect: Vec<u64> = sim.connect_us.lock().unwrap().clone();
        connect.sort();
        let connected = connect.len();
        let c_pct = |p: usize| {
            Duration::from_micros(connect.get((connect.len() * p / 100).min(connect.len().saturating_sub(1))).copied().unwrap_or(0))
        };
        // Settle: first heartbeats go out, buffers reach their working size.
        tokio::time::sleep(Duration::from_secs(env_or("FLEET_SETTLE_S", if benching { 5 } else { 1 }))).await;
        let (broker_rss1, _) = proc_usage(broker_pid);
        let (my_rss1, _) = proc_usage(me);
        println!(
            "connect: {connected}/{n} in {:.1} s ({:.0}/s), per agent p50 {} p99 {} max {}; CPU: broker {:.1} s, simulator {:.1} s",
            ramp_time.as_secs_f64(),
            connected as f64 / ramp_time.as_secs_f64(),
            ms(c_pct(50)),
            ms(c_pct(99)),
            ms(c_pct(100)),
            ramp_cpu,
            ramp_sim_cpu
        );
        println!(
            "broker RSS: {:.1} MiB idle, {:.1} MiB with {connected} agents ({:.1} KiB per agent); simulator RSS {:.1} -> {:.1} MiB",
            broker_rss0 as f64 / 1024.0,
            broker_rss1 as f64 / 1024.0,
            (broker_rss1.saturating_sub(broker_rss0)) as f64 / connected.max(1) as f64,
            my_rss0 as f64 / 1024.0,
            my_rss1 as f64 / 1024.0
        );
        let mut rounds = Vec::new();
        for name in ["device", "list", "required-install"] {
            let r = fan_out(name, &dms_side, &mut answers, &devices, bound, broker_pid).await;
            rounds.push(r);
        }
        let (broker_rss2, _) = proc_usage(broker_pid);
        println!("| action | answered | failed | all answered in | p50 | p99 | max | broker CPU | simulator CPU |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rounds {
            println!(
                "| {} | {}/{n} | {} | {:.2} s | {} | {} | {} | {:.2} s | {:.2} s |",
                r.name,
                r.answered,
                r.failed,
                r.all.as_secs_f64(),
                ms(r.p50),
                ms(r.p99),
                ms(r.max),
                r.broker_cpu,
                r.sim_cpu
            );
        }
        println!(
            "heartbeats: {} sent, {} heard by the DMS side; broker RSS after the fan-outs {:.1} MiB",
            sim.heartbeats.load(Ordering::Relaxed),
            heard_beats.load(Ordering::Relaxed),
            broker_rss2 as f64 / 1024.0
        );
        sim.shutdown.cancel();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        if !benching {
            assert_eq!(connected, n, "every simulated agent connects");
            for r in &rounds {
                assert_eq!(r.answered, n, "every agent answers {}", r.name);
            }
        }
    });
}
