//! Output throughput of the remote terminal, side by side with its limits,
//! in one run on the same machine and nats-server:
//!
//! - `pty local`: the same command on a PTY read locally (pty-process),
//!   no bus: what the shell and the kernel's PTY give;
//! - `nats raw`: the same number of bytes published in 16 KiB messages by
//!   one client to another on the server, with the same window of 64
//!   messages and acknowledgements every 16 (the transport's limit);
//! - `terminal`: `head -c N /dev/zero` in raw mode through the agent's
//!   terminal service and the operator's client library (open to exit).
//!
//! `BENCH_BYTES` (default 64 MiB) per scenario, `BENCH_ROUNDS` (default 3)
//! rounds, the best of each reported with the ratio to `nats raw`. Run:
//! `cargo bench --bench terminal`; results in docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use common::servers::{NatsConfig, NatsServer, NatsUser};
use futures::StreamExt;
use iot_agent::bus::{topics, Nats, Topic};
use iot_agent::remote::terminal::{Event, Session};
use iot_agent::remote::{Device, Link};
use iot_agent::services::terminal::{protocol, NatsTerminal, Settings, Terminals};
use iot_agent::supervisor::{Shutdown, Subsystem};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

const PASSWORD: &str = "bench";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn command(bytes: usize) -> String {
    format!("stty raw -echo; head -c {bytes} /dev/zero; exit 0")
}

async fn pty_local(bytes: usize) -> Duration {
    let started = Instant::now();
    let (pty, pts) = pty_process::open().unwrap();
    pty.resize(pty_process::Size::new(24, 80)).unwrap();
    let mut child = pty_process::Command::new("/bin/bash")
        .arg("-c")
        .arg(command(bytes))
        .spawn(pts)
        .unwrap();
    let (mut r, _w) = pty.into_split();
    let mut buf = vec![0u8; protocol::CHUNK];
    let mut got = 0;
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        got += n;
    }
    child.wait().await.unwrap();
    assert_eq!(got, bytes);
    started.elapsed()
}

async fn nats_raw(url: &str, bytes: usize) -> Duration {
    let c = |name: &'static str| {
        async_nats::ConnectOptions::with_user_and_password("snapd".into(), PASSWORD.into())
            .name(name)
            .connect(url.to_string())
    };
    let (tx, rx) = (c("tx").await.unwrap(), c("rx").await.unwrap());
    let mut data = rx.subscribe("bench.data").await.unwrap();
    let mut acks = tx.subscribe("bench.ack").await.unwrap();
    rx.flush().await.unwrap();
    tx.flush().await.unwrap();
    let chunk = Bytes::from(vec![0u8; 16 * 1024]);
    let frames = bytes.div_ceil(chunk.len()) as u64;
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut acked = 0u64;
        for seq in 1..=frames {
            while seq > acked + protocol::WINDOW {
                let m = acks.next().await.unwrap();
                acked = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            }
            tx.publish("bench.data", chunk.clone()).await.unwrap();
        }
        tx.flush().await.unwrap();
    });
    let mut seq = 0u64;
    while seq < frames {
        data.next().await.unwrap();
        seq += 1;
        if seq.is_multiple_of(protocol::WINDOW / 4) {
            rx.publish("bench.ack", seq.to_string().into())
                .await
                .unwrap();
        }
    }
    sender.await.unwrap();
    started.elapsed()
}

async fn terminal(link: &Link, bytes: usize) -> Duration {
    let started = Instant::now();
    let open = protocol::Open {
        rows: 24,
        cols: 80,
        command: Some(command(bytes)),
        ..Default::default()
    };
    let mut s = Session::open(link, &Topic::fixed(topics::TERMINAL), open)
        .await
        .unwrap();
    let mut got = 0;
    loop {
        match s.next().await.unwrap() {
            Event::Output(b) => got += b.len(),
            Event::Exit(e) => {
                assert_eq!(e.code, Some(0));
                break;
            }
        }
    }
    assert_eq!(got, bytes);
    started.elapsed()
}

fn main() {
    let bytes = env_usize("BENCH_BYTES", 64 * 1024 * 1024);
    let rounds = env_usize("BENCH_ROUNDS", 3);
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", PASSWORD)],
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bus = Nats::connect(&common::agent_nats_config(&nats.url(), PASSWORD), "bench")
            .await
            .unwrap();
        let service = NatsTerminal {
            terminals: Terminals::new(Settings {
                shell: "/bin/bash".into(),
                idle: Duration::from_secs(600),
                max: 4,
                state_dir: None,
            }),
            bus,
        };
        tokio::spawn(service.run(Shutdown::new()));
        let link = Link::connect(&Device::parse(&nats.url()).unwrap(), "snapd", PASSWORD)
            .await
            .unwrap();
        // Served once a session opens.
        let mut ready = false;
        for _ in 0..100 {
            let o = protocol::Open {
                rows: 1,
                cols: 1,
                command: Some("true".into()),
                ..Default::default()
            };
            if let Ok(Ok(mut s)) = tokio::time::timeout(
                Duration::from_secs(1),
                Session::open(&link, &Topic::fixed(topics::TERMINAL), o),
            )
            .await
            {
                while !matches!(s.next().await, Ok(Event::Exit(_)) | Err(_)) {}
                ready = true;
                break;
            }
        }
        assert!(ready, "the terminal never answered");
        let mut best = [Duration::MAX; 3];
        for _ in 0..rounds {
            best[0] = best[0].min(pty_local(bytes).await);
            best[1] = best[1].min(nats_raw(&nats.url(), bytes).await);
            best[2] = best[2].min(terminal(&link, bytes).await);
        }
        let mib = bytes as f64 / (1024.0 * 1024.0);
        println!("terminal output, {mib:.0} MiB per run, best of {rounds}");
        println!(
            "{:<12} {:>10} {:>10} {:>12}",
            "scenario", "seconds", "MiB/s", "vs nats raw"
        );
        for (name, d) in ["pty local", "nats raw", "terminal"].iter().zip(best) {
            println!(
                "{:<12} {:>10.3} {:>10.1} {:>12.2}",
                name,
                d.as_secs_f64(),
                mib / d.as_secs_f64(),
                best[1].as_secs_f64() / d.as_secs_f64()
            );
        }
    });
}
