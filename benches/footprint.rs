//! The agent's memory footprint (`cargo bench --bench footprint`): resident
//! memory of the real `iot-agent run` process (release build) with every
//! default subsystem on — enrolled with the identity double and connected
//! to a real mosquitto over mutual TLS (DMS session, heartbeat, per-serial
//! tree), the snapd mirror and the health subjects on a real nats-server,
//! change history and watchdog, and export (off by default, switched on
//! here with the same nats-server as its upstream).
//!
//! Several variants (environment or configuration of the same binary, and
//! optionally another binary: `BENCH_BASELINE_BIN`) run side by side, each
//! with its own brokers and doubles, so they idle through the same minute
//! on the same machine. For each: `/proc/PID/status` (VmRSS, VmHWM,
//! RssAnon, RssFile, Threads) after `BENCH_IDLE_S` (60) s idle, and again
//! after `BENCH_REQUESTS` (1000) mirrored requests (`snapd.v2.system-info.get`,
//! 8 in flight). Then, in interleaved rounds, the unloaded latency of a
//! mirrored request and of a DMS action round trip (`server`, as
//! benches/dms_link.rs), as ratios against the first variant. Without
//! `--bench` (as `cargo test --all-targets` runs it) a short smoke run.
//! Method and results: docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use common::agent_proc::{command, AgentProcess, BIN};
use common::identity_double::{IdentityDouble, DEVICE_ID};
use common::mqtt_client::{connect_and_subscribe, TestMqtt};
use common::servers::{Mosquitto, NatsConfig, NatsServer, NatsUser};
use common::snapd_double::{SnapdDouble, SERIAL_ASSERTION};
use common::tls::TestPki;
use rumqttc::{AsyncClient, MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const PASSWORD: &str = "footprint-bench-password";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One variant: a name, the binary, and what is added to its environment.
struct Variant {
    name: String,
    bin: String,
    env: Vec<(&'static str, String)>,
}

/// What `/proc/PID/status` says, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

fn mem(pid: u32) -> Mem {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Mem {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
        threads: field("Threads:"),
    }
}

/// One agent with its own brokers, doubles and DMS-side client.
struct Rig {
    variant: Variant,
    _dir: tempfile::TempDir,
    _broker: Mosquitto,
    nats: NatsServer,
    _identity: IdentityDouble,
    _snapd: SnapdDouble,
    agent: AgentProcess,
    requester: async_nats::Client,
    dms: AsyncClient,
    responses: mpsc::UnboundedReceiver<Value>,
}

async fn rig(variant: Variant) -> Rig {
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    let broker = Mosquitto::start_tls_persistent_nodelay(&pki);
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", PASSWORD)],
        ..Default::default()
    });
    let identity = IdentityDouble::start_with(false, pki.clone(), broker.port()).await;
    let snapd = SnapdDouble::start().await;
    snapd.set_serial(Some(SERIAL_ASSERTION.to_string()));
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
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
        ("IOT_AGENT_NATS__URL", nats.url()),
        ("IOT_AGENT_NATS__SNAPD__PASSWORD", PASSWORD.into()),
        ("IOT_AGENT_EXPORT__ENABLED", "true".into()),
        ("IOT_AGENT_EXPORT__UPSTREAM__URL", nats.url()),
        ("IOT_AGENT_EXPORT__UPSTREAM__USER", "snapd".into()),
        ("IOT_AGENT_EXPORT__UPSTREAM__PASSWORD", PASSWORD.into()),
        (
            "IOT_AGENT_EXPORT__SPOOL__PATH",
            dir.path().join("common/export.db").display().to_string(),
        ),
    ];
    env.extend(variant.env.iter().cloned());
    let mut cmd = command(&["run"], &env);
    if variant.bin != BIN {
        cmd = std::process::Command::new(&variant.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k, v)));
    }
    let mut agent = AgentProcess::spawn(cmd);
    agent.wait_for_all(&["subscribed to DMS actions", "connected to NATS"]);

    let requester =
        async_nats::ConnectOptions::with_user_and_password("snapd".into(), PASSWORD.into())
            .request_timeout(Some(Duration::from_secs(30)))
            .connect(nats.url())
            .await
            .unwrap();
    // The mirror answers once it has registered its endpoints.
    let deadline = Instant::now() + Duration::from_secs(60);
    while mirrored(&requester).await.is_err() {
        assert!(Instant::now() < deadline, "the mirror never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
    let mut opts = MqttOptions::new("dms-footprint", "localhost", broker.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
        .set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    let TestMqtt {
        client,
        mut messages,
    } = connect_and_subscribe(opts, &[&format!("devices/pub/{DEVICE_ID}")]).await;
    let (tx, responses) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((_, payload)) = messages.recv().await {
            let _ = tx.send(serde_json::from_slice(&payload).unwrap_or_default());
        }
    });
    Rig {
        variant,
        _dir: dir,
        _broker: broker,
        nats,
        _identity: identity,
        _snapd: snapd,
        agent,
        requester,
        dms: client,
        responses,
    }
}

async fn mirrored(c: &async_nats::Client) -> Result<(), String> {
    let m = c
        .request("snapd.v2.system-info.get", "".into())
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&m.payload).map_err(|e| e.to_string())?;
    if v["type"] == "sync" {
        Ok(())
    } else {
        Err(format!("not a sync envelope: {v}"))
    }
}

/// `n` mirrored requests, `window` in flight; each must succeed.
async fn burst(c: &async_nats::Client, n: usize, window: usize) {
    use futures::StreamExt;
    futures::stream::iter(0..n)
        .map(|_| async { mirrored(c).await.expect("a mirrored request failed") })
        .buffer_unordered(window)
        .collect::<Vec<()>>()
        .await;
}

fn percentiles(mut lat: Vec<Duration>) -> (Duration, Duration) {
    lat.sort();
    (
        lat[lat.len() / 2],
        lat[(lat.len() * 99 / 100).min(lat.len() - 1)],
    )
}

async fn mirror_latency(r: &Rig, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        mirrored(&r.requester).await.unwrap();
        lat.push(t.elapsed());
    }
    lat
}

async fn action_latency(r: &mut Rig, tag: &str, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{tag}-{i}");
        let payload = json!({"id": id, "action": "server", "snap": "", "data": ""}).to_string();
        let t = Instant::now();
        r.dms
            .publish(
                format!("devices/sub/{DEVICE_ID}"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
        loop {
            let v = tokio::time::timeout(Duration::from_secs(60), r.responses.recv())
                .await
                .expect("no DMS response for 60 s")
                .expect("the DMS client stopped");
            if v["id"] == id.as_str() {
                assert_eq!(v["success"], true, "an action failed: {v}");
                break;
            }
        }
        lat.push(t.elapsed());
    }
    lat
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// `BENCH_VARIANTS`: comma-separated names of [`variants`] (default: all).
fn variants() -> Vec<Variant> {
    let v = |name: &str, env: &[(&'static str, &str)]| Variant {
        name: name.into(),
        bin: BIN.into(),
        env: env.iter().map(|(k, v)| (*k, v.to_string())).collect(),
    };
    let mut all = Vec::new();
    if let Ok(bin) = std::env::var("BENCH_BASELINE_BIN") {
        all.push(Variant {
            name: "baseline binary".into(),
            bin,
            env: vec![],
        });
    }
    all.extend([
        // runtime.workers=1 and one malloc arena (the defaults), then each
        // undone alone, then both: what each saves.
        v("defaults", &[]),
        v(
            "workers=0 (per core)",
            &[("IOT_AGENT_RUNTIME__WORKERS", "0")],
        ),
        // glibc's own cap: eight arenas per core.
        v("MALLOC_ARENA_MAX=16", &[("MALLOC_ARENA_MAX", "16")]),
        v(
            "workers=0, MALLOC_ARENA_MAX=16",
            &[
                ("IOT_AGENT_RUNTIME__WORKERS", "0"),
                ("MALLOC_ARENA_MAX", "16"),
            ],
        ),
    ]);
    match std::env::var("BENCH_VARIANTS") {
        Ok(names) => {
            let names: Vec<&str> = names.split(',').collect();
            all.into_iter()
                .filter(|v| names.contains(&v.name.as_str()))
                .collect()
        }
        Err(_) => all,
    }
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let idle = Duration::from_secs(env_usize("BENCH_IDLE_S", if benching { 60 } else { 2 }) as u64);
    let requests = env_usize("BENCH_REQUESTS", if benching { 1000 } else { 50 });
    let unloaded = env_usize("BENCH_UNLOADED", if benching { 1000 } else { 10 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut rigs = Vec::new();
        for v in variants() {
            rigs.push(rig(v).await);
        }
        println!(
            "{} variants side by side, {} cores; idle {:?}, {requests} mirrored requests",
            rigs.len(),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            idle
        );
        tokio::time::sleep(idle).await;
        let idle_mem: Vec<Mem> = rigs.iter().map(|r| mem(r.agent.pid())).collect();
        for r in &rigs {
            burst(&r.requester, requests, 8).await;
        }
        let busy_mem: Vec<Mem> = rigs.iter().map(|r| mem(r.agent.pid())).collect();
        println!(
            "| variant | idle VmRSS | idle VmHWM | idle RssAnon | idle RssFile | threads | after requests VmRSS | VmHWM | mirror p50 | mirror p99 | DMS action p50 | DMS action p99 |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        // Latency in interleaved rounds (each variant in turn, again and
        // again), so that the load of the machine, which moves, falls on
        // every variant alike.
        for (i, r) in rigs.iter_mut().enumerate() {
            mirror_latency(r, 20).await;
            action_latency(r, &format!("warm{i}"), 5).await;
        }
        let rounds = 10;
        let mut mirror: Vec<Vec<Duration>> = vec![Vec::new(); rigs.len()];
        let mut action: Vec<Vec<Duration>> = vec![Vec::new(); rigs.len()];
        for round in 0..rounds {
            for (i, r) in rigs.iter_mut().enumerate() {
                mirror[i].extend(mirror_latency(r, unloaded / rounds + 1).await);
                action[i].extend(
                    action_latency(r, &format!("lat{i}-{round}"), unloaded / rounds / 3 + 1).await,
                );
            }
        }
        let mut ratios = Vec::new();
        let base = (percentiles(mirror[0].clone()).0, percentiles(action[0].clone()).0);
        for (i, r) in rigs.iter().enumerate() {
            let (mp50, mp99) = percentiles(mirror[i].clone());
            let (ap50, ap99) = percentiles(action[i].clone());
            let (m, b) = (idle_mem[i], busy_mem[i]);
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.variant.name,
                mib(m.rss),
                mib(m.hwm),
                mib(m.anon),
                mib(m.file),
                m.threads,
                mib(b.rss),
                mib(b.hwm),
                us(mp50),
                us(mp99),
                us(ap50),
                us(ap99)
            );
            ratios.push(format!(
                "{}: mirror p50 {:.2}x, DMS action p50 {:.2}x ({} and {} samples)",
                r.variant.name,
                mp50.as_secs_f64() / base.0.as_secs_f64(),
                ap50.as_secs_f64() / base.1.as_secs_f64(),
                mirror[i].len(),
                action[i].len()
            ));
        }
        println!("latency against the first variant:");
        for l in ratios {
            println!("  {l}");
        }
        println!(
            "nats-server RSS of the first rig: {} MiB",
            rigs[0].nats.pid().map_or("?".into(), |p| mib(mem(p).rss))
        );
        for r in rigs.iter_mut() {
            r.agent.signal("TERM");
            r.agent.wait_exit();
        }
    });
}
