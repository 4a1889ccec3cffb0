//! Throughput and latency of the snapd mirror, side by side with the limits
//! it sits between, in one run on the same machine:
//!
//! - `nats echo`: a bare NATS responder on the same nats-server answering
//!   with a payload of the same size (the transport's limit);
//! - `http direct`: `GET /v2/system-info` straight to the snapd double over
//!   its unix socket with the agent's snapd client (snapd's side);
//! - `mirror`: `snapd.v2.system-info.get` through the mirror to the double.
//!
//! Each scenario sends `BENCH_REQUESTS` requests (default 20000) from
//! `BENCH_CONCURRENCY` tasks (default 32, also run with 1 for unloaded
//! latency) after a warm-up, and reports requests/s, p50 and p99. Run:
//! `cargo bench --bench mirror` (or `scripts/bench --bench mirror`); method
//! and results are in docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::servers::{NatsConfig, NatsServer, NatsUser};
use common::snapd_double::SnapdDouble;
use futures::StreamExt;
use iot_agent::bus::Nats;
use iot_agent::config;
use iot_agent::services::mirror::{Mirror, Settings};
use iot_agent::snapd::{self, Request};
use iot_agent::subsystems::changes::Poller;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "bench";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Result {
    name: &'static str,
    concurrency: usize,
    requests: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Result {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `requests` calls of `call` from `concurrency` tasks; every call
/// must succeed (a failed call aborts the run: the numbers would lie).
async fn measure<F, Fut>(name: &'static str, requests: usize, concurrency: usize, call: F) -> Result
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<usize, String>> + Send,
{
    let call = Arc::new(call);
    // Warm-up: connections, pools, caches.
    for _ in 0..200.min(requests / 4) {
        call().await.expect("warm-up call failed");
    }
    let per_task = (requests / concurrency).max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                let n = call().await.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!(n > 0, "{name}: empty answer");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::with_capacity(requests);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Result {
        name,
        concurrency,
        requests: all.len(),
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it: then a quick smoke run keeps the bench working
    // without costing the suite time.
    let benching = std::env::args().any(|a| a == "--bench");
    let requests = env_usize("BENCH_REQUESTS", if benching { 20_000 } else { 64 });
    let concurrency = env_usize("BENCH_CONCURRENCY", 32);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", PASSWORD)],
        ..Default::default()
    });
    rt.block_on(async move {
        let double = SnapdDouble::start().await;
        let snapd = snapd::Client::new(double.socket(), Duration::from_secs(10));

        // The mirror, as the agent runs it (own NATS connection).
        let cfg = config::NatsConfig {
            url: config::NatsUrl::new(&nats.url()),
            snapd: config::NatsCredentials {
                password: PASSWORD.into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let bus = Nats::connect(&cfg, "bench-mirror").await.unwrap();
        let (_tx, status) = iot_agent::bus::status::mqtt_status_channel();
        let settings = Settings {
            read_only: false,
            own_snap: "iot-agent".into(),
            timeout: Duration::from_secs(10),
            max_in_flight: iot_agent::services::mirror::MAX_IN_FLIGHT,
            follow: Default::default(),
        };
        let shutdown = CancellationToken::new();
        // Reads start no change: the shared change poller is not run.
        let poller = Arc::new(Poller::new(snapd.clone(), Duration::from_secs(60)));
        let mirror = Mirror::new(bus, snapd.clone(), poller, settings, status);
        tokio::spawn(iot_agent::supervisor::Subsystem::run(
            mirror,
            shutdown.clone().into(),
        ));

        // The bare echo responder (own NATS connection), answering with a
        // payload the size of snapd's system-info envelope.
        let reference = snapd
            .send(&Request::get("/v2/system-info"))
            .await
            .unwrap()
            .body;
        let echo_conn = connect(&nats.url()).await;
        let mut echo_sub = echo_conn.subscribe("bench.echo").await.unwrap();
        let answer = reference.clone();
        tokio::spawn(async move {
            while let Some(m) = echo_sub.next().await {
                if let Some(r) = m.reply {
                    let _ = echo_conn.publish(r, answer.clone()).await;
                }
            }
        });

        let client = connect(&nats.url()).await;
        wait_answered(&client, "snapd.v2.system-info.get").await;
        wait_answered(&client, "bench.echo").await;

        println!(
            "snapd answer: {} bytes; {requests} requests per scenario; machine: {} CPUs",
            reference.len(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let mut results = Vec::new();
        for c in [1, concurrency] {
            let n = if c == 1 { requests / 4 } else { requests };
            let cl = client.clone();
            results.push(
                measure("nats echo", n, c, move || {
                    let cl = cl.clone();
                    async move {
                        cl.request("bench.echo", Bytes::new())
                            .await
                            .map(|m| m.payload.len())
                            .map_err(|e| e.to_string())
                    }
                })
                .await,
            );
            let sd = snapd.clone();
            results.push(
                measure("http direct", n, c, move || {
                    let sd = sd.clone();
                    async move {
                        sd.send(&Request::get("/v2/system-info"))
                            .await
                            .map(|r| r.body.len())
                            .map_err(|e| e.to_string())
                    }
                })
                .await,
            );
            let cl = client.clone();
            results.push(
                measure("mirror", n, c, move || {
                    let cl = cl.clone();
                    async move {
                        let m = cl
                            .request("snapd.v2.system-info.get", Bytes::new())
                            .await
                            .map_err(|e| e.to_string())?;
                        let sync = br#""type":"sync""#;
                        if !m.payload.windows(sync.len()).any(|w| w == sync) {
                            return Err(format!(
                                "not a sync answer: {}",
                                String::from_utf8_lossy(&m.payload)
                            ));
                        }
                        Ok(m.payload.len())
                    }
                })
                .await,
            );
        }
        println!();
        println!("| scenario | concurrency | requests | req/s | p50 | p99 |");
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &results {
            println!(
                "| {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs |",
                r.name,
                r.concurrency,
                r.requests,
                r.rate(),
                r.p50.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6
            );
        }
        for c in [1, concurrency] {
            let rate = |name| {
                results
                    .iter()
                    .find(|r| r.name == name && r.concurrency == c)
                    .map_or(0.0, Result::rate)
            };
            println!(
                "\nconcurrency {c}: mirror at {:.0}% of the echo responder's throughput",
                100.0 * rate("mirror") / rate("nats echo")
            );
        }
        shutdown.cancel();
    });
}

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password("snapd".into(), PASSWORD.into())
        .request_timeout(Some(Duration::from_secs(10)))
        .connect(url)
        .await
        .unwrap()
}

/// Until the responder's subscription is in place there are no responders.
async fn wait_answered(client: &async_nats::Client, subject: &'static str) {
    for _ in 0..500 {
        if client.request(subject, Bytes::new()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing answers on {subject}");
}
