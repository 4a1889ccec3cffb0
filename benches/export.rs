//! Export benchmark (`cargo bench --bench export`, release, bounded):
//!
//! 1. durable intake of 200-byte messages: fsync'd group commits through
//!    the writer thread, with 1 producer (a commit per message) and with
//!    64 concurrent producers; and end to end as NATS requests to the
//!    intake on a real nats-server (64 in flight);
//! 2. replay after an outage: a spool of queued messages forwarded to a
//!    real JetStream, next to the broker's own publish rate measured in the
//!    same run with the same client, message size, `Nats-Msg-Id` and window.
//!
//! Results and method: docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use common::servers::{NatsConfig, NatsServer, NatsUser};
use iot_agent::bus::{topics, Nats};
use iot_agent::config::{self, ExportConfig, FullPolicy, UpstreamUrl};
use iot_agent::subsystems::export::{forward, intake, spool};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const SIZE: usize = 200;

fn limits() -> spool::Limits {
    spool::Limits {
        max_bytes: 8 << 30,
        policy: FullPolicy::RefuseNew,
    }
}

fn env_n(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Messages/s of `total` submits spread over `producers` tasks.
async fn writer_rate(dir: &std::path::Path, producers: u64, total: u64) -> f64 {
    let path = dir.join(format!("intake-{producers}.db"));
    let s = spool::Spool::open(&path, spool::Durability::Full).unwrap();
    let (writer, thread) = intake::Writer::spawn(s, limits(), 1024, Arc::new(Notify::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let w = writer.clone();
        let n = total / producers;
        tasks.push(tokio::spawn(async move {
            for _ in 0..n {
                w.submit(spool::NewMessage::new(format!("p{p}"), vec![b'x'; SIZE]))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    drop(writer);
    thread.join().unwrap();
    rate
}

/// Messages/s of NATS requests answered by the intake (each answered after
/// its commit), `inflight` outstanding at a time.
async fn nats_intake_rate(dir: &std::path::Path, inflight: usize, total: u64) -> f64 {
    let server = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", "pw")],
        ..Default::default()
    });
    let cfg = config::NatsConfig {
        url: config::NatsUrl::new(&server.url()),
        snapd: config::NatsCredentials {
            user: "snapd".into(),
            password: "pw".into(),
        },
        ..Default::default()
    };
    let bus = Nats::connect(&cfg, "bench").await.unwrap();
    let s = spool::Spool::open(&dir.join("nats.db"), spool::Durability::Full).unwrap();
    let (writer, thread) = intake::Writer::spawn(s, limits(), 1024, Arc::new(Notify::new()));
    let stop = CancellationToken::new();
    let serve = tokio::spawn(intake::serve(
        bus.clone(),
        topics::export_intake("export").unwrap(),
        writer,
        iot_agent::subsystems::export::capacity::SharedCapacity::new(
            iot_agent::subsystems::export::capacity::Capacity::new(
                &ExportConfig::default().upstream,
                None,
            ),
        ),
        stop.clone(),
    ));
    let client = async_nats::ConnectOptions::with_user_and_password("snapd".into(), "pw".into())
        .connect(server.url())
        .await
        .unwrap();
    // Wait until the intake answers.
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(1),
            client.request("export.warmup", "x".into()),
        )
        .await
        {
            break;
        }
    }
    let start = Instant::now();
    let per = total / inflight as u64;
    let mut tasks = Vec::new();
    for _ in 0..inflight {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let m = c
                    .request("export.bench", vec![b'x'; SIZE].into())
                    .await
                    .unwrap();
                assert!(m.payload.starts_with(b"{\"ok\":true"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (per * inflight as u64) as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = serve.await;
    thread.join().unwrap();
    rate
}

/// The broker's own rate: pipelined JetStream publishes with Nats-Msg-Id,
/// `window` awaiting acks, as the forwarder does.
async fn broker_rate(url: &str, total: u64, window: usize) -> f64 {
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BASELINE".into(),
        subjects: vec!["baseline.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let start = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    for i in 0..total {
        let mut h = async_nats::HeaderMap::new();
        h.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("b-{i}").as_str(),
        );
        let ack = js
            .publish_with_headers("baseline.s", h, vec![b'x'; SIZE].into())
            .await
            .unwrap();
        inflight.push_back(ack);
        if inflight.len() >= window {
            inflight.pop_front().unwrap().await.unwrap();
        }
    }
    for a in inflight {
        a.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// Messages/s of draining a spool of `total` messages to JetStream.
async fn replay_rate(dir: &std::path::Path, url: &str, total: u64, window: u32) -> f64 {
    let path = dir.join("replay.db");
    {
        let mut s = spool::Spool::open(&path, spool::Durability::Relaxed).unwrap();
        let batch: Vec<_> = (0..1000)
            .map(|_| spool::NewMessage::new("s", vec![b'x'; SIZE]))
            .collect();
        for _ in 0..total / 1000 {
            s.insert_batch(&batch, limits()).unwrap();
        }
    }
    let mut cfg = ExportConfig::default();
    cfg.upstream.url = serde_json::from_value::<UpstreamUrl>(serde_json::json!(url)).unwrap();
    cfg.upstream.stream = "REPLAY".into();
    cfg.batch.forward = window;
    let probe = spool::Spool::open(&path, spool::Durability::Relaxed).unwrap();
    let stop = CancellationToken::new();
    let start = Instant::now();
    let capacity = iot_agent::subsystems::export::capacity::SharedCapacity::new(
        iot_agent::subsystems::export::capacity::Capacity::new(&cfg.upstream, None),
    );
    let fwd = tokio::spawn(forward::run(
        cfg,
        path.clone(),
        Arc::new(Notify::new()),
        Arc::new(forward::Shared::default()),
        capacity,
        stop.clone(),
    ));
    loop {
        if probe.backlog().unwrap().0 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = fwd.await;
    rate
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it: then a small smoke run keeps the bench working
    // without costing the suite time.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let benching = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("export-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let total = env_n(
        "EXPORT_BENCH_MESSAGES",
        if benching { 100_000 } else { 500 },
    );
    let window = env_n("EXPORT_BENCH_WINDOW", 2048) as u32;
    rt.block_on(async {
        let one = writer_rate(dir.path(), 1, 2_000.min(total)).await;
        println!("intake, 1 producer (fsync per message):    {one:>10.0} msg/s");
        let many = writer_rate(dir.path(), 64, total).await;
        println!("intake, 64 producers (group commit):       {many:>10.0} msg/s");
        let nats = nats_intake_rate(dir.path(), 64, total).await;
        println!("intake, NATS requests, 64 in flight:        {nats:>10.0} msg/s");

        let up = NatsServer::start(NatsConfig {
            jetstream: true,
            ..Default::default()
        });
        let broker = broker_rate(&up.url(), total, window as usize).await;
        println!("JetStream publish (broker baseline):        {broker:>10.0} msg/s");
        let replay = replay_rate(dir.path(), &up.url(), total, window).await;
        println!("replay of {total} spooled messages:          {replay:>10.0} msg/s");
        println!(
            "replay / broker baseline:                   {:>10.0} %",
            replay / broker * 100.0
        );
    });
}
