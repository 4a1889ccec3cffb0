//! The tunnel against the ceiling and the references, in one run
//! (`scripts/bench-tunnel`, which installs rathole and bore first): direct
//! loopback, this tunnel (`iot-relay` + `iot-agent run`, TLS, one yamux
//! connection), rathole 0.5 over TCP and over TLS, and bore. Each carries a
//! visitor port to a local target in this process; the relay/server half is
//! pinned to CPU 0 and the agent/client half to CPU 1 (`taskset -a`), the
//! load runs unpinned.
//!
//! Measured per setup: throughput of 1 stream (one 1000 MiB upload) and 8
//! streams (8 x 125 MiB at once) to a sink that answers the byte count at
//! the end; connect + first byte (connect, send 1 byte, read its echo)
//! p50/p99 over 1000 visitors, one after another; RSS of both halves idle
//! and with 1000 idle visitors connected (each has had one byte echoed, so
//! its stream or data connection exists end to end), and bytes per idle
//! stream from the difference. Without `--bench` (as `cargo test
//! --all-targets` runs it) a small smoke run of direct and this tunnel.
//! Method and results: docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use common::servers::free_port;
use common::tls::TestPki;
use common::tunnel::{start_agent, Relay, DEVICE};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Sizes {
    upload: usize,
    round_trips: usize,
    idle: usize,
}

/// One way from a visitor port to the target.
struct Setup {
    name: &'static str,
    port: u16,
    /// (half, pid): relay/server first, agent/client second.
    halves: Vec<(&'static str, u32)>,
    _keep: Vec<Box<dyn std::any::Any>>,
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` with its output in `log` (shown if the setup fails).
fn spawn(cmd: &mut Command, log: &std::path::Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    Proc(
        cmd.stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
    )
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// The bench's local target: a first byte `S` makes a connection a sink
/// (it answers the number of bytes it read, after the visitor's FIN);
/// anything else is echoed, that byte included.
fn target() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut first = [0u8; 1];
                if c.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'S' {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut n = 0u64;
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k as u64,
                        }
                    }
                    let _ = c.write_all(&n.to_be_bytes());
                } else {
                    if c.write_all(&first).is_err() {
                        return;
                    }
                    let mut r = c.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut c);
                }
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// Waits until a visitor of `port` gets an echo (the setup is ready).
fn ready(port: u16, logs: &[&std::path::Path]) {
    let ok = common::poll_until(Instant::now() + Duration::from_secs(60), || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"E").ok()?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        Some(())
    });
    let logs: Vec<&std::path::Path> = logs.to_vec();
    assert!(
        ok.is_some(),
        "port {port} never carried an echo:\n{}",
        common::servers::tail_files(&logs, 20)
    );
}

fn pin(halves: &[(&'static str, u32)]) {
    for (i, (_, pid)) in halves.iter().enumerate() {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", &i.to_string(), &pid.to_string()])
            .stdout(Stdio::null())
            .status();
    }
}

fn direct(target: u16) -> Setup {
    Setup {
        name: "direct loopback",
        port: target,
        halves: Vec::new(),
        _keep: Vec::new(),
    }
}

fn this_tunnel(target: u16) -> Setup {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let quiet = ("IOT_RELAY_LOG__LEVEL", "info".to_string());
    let relay = Relay::start_with(
        &pki,
        dir.path(),
        1,
        &[
            quiet,
            ("IOT_RELAY_AGENTS__HEARTBEAT", "10s".into()),
            ("IOT_RELAY_AGENTS__THRESHOLD", "30s".into()),
        ],
    );
    let t = format!("127.0.0.1:{target}");
    let mut agent = start_agent(
        &pki,
        dir.path(),
        relay.agents_port,
        &[&t],
        &[
            ("IOT_AGENT_LOG__LEVEL", "info".into()),
            ("IOT_AGENT_TUNNEL__HEARTBEAT", "10s".into()),
            ("IOT_AGENT_TUNNEL__THRESHOLD", "30s".into()),
        ],
    );
    agent.wait_for("tunnel connected");
    let port = relay.add_public(&t, 5000);
    let halves = vec![("relay", relay.proc.pid()), ("agent", agent.pid())];
    Setup {
        name: "this tunnel (TLS, yamux)",
        port,
        halves,
        _keep: vec![
            Box::new(relay),
            Box::new(agent),
            Box::new(dir),
            Box::new(pki),
        ],
    }
}

fn rathole(target: u16, tls: bool) -> Option<Setup> {
    if !on_path("rathole") {
        eprintln!("rathole not on PATH (scripts/bench-tunnel installs it): skipped");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ctrl, port) = (free_port(), free_port());
    let pki = TestPki::new("client");
    let (server_tls, client_tls, kind) = if tls {
        let pfx = dir.path().join("identity.pfx");
        let ok = Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:bench", "-out"])
            .arg(&pfx)
            .arg("-inkey")
            .arg(&pki.server_key)
            .arg("-in")
            .arg(&pki.server_cert)
            .arg("-certfile")
            .arg(&pki.ca_cert)
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl pkcs12");
        (
            format!(
                "[server.transport.tls]\npkcs12 = {:?}\npkcs12_password = \"bench\"\n",
                pfx.display().to_string()
            ),
            format!(
                "[client.transport.tls]\ntrusted_root = {:?}\nhostname = \"localhost\"\n",
                pki.ca_cert.display().to_string()
            ),
            "tls",
        )
    } else {
        (String::new(), String::new(), "tcp")
    };
    let server = dir.path().join("server.toml");
    std::fs::write(
        &server,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{ctrl}\"\n[server.transport]\ntype = \"{kind}\"\n{server_tls}\
             [server.services.bench]\ntoken = \"bench-token\"\nbind_addr = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    let client = dir.path().join("client.toml");
    std::fs::write(
        &client,
        format!(
            "[client]\nremote_addr = \"localhost:{ctrl}\"\n[client.transport]\ntype = \"{kind}\"\n{client_tls}\
             [client.services.bench]\ntoken = \"bench-token\"\nlocal_addr = \"127.0.0.1:{target}\"\n"
        ),
    )
    .unwrap();
    let (slog, clog) = (dir.path().join("server.log"), dir.path().join("client.log"));
    let s = spawn(Command::new("rathole").arg("--server").arg(&server), &slog);
    let c = spawn(Command::new("rathole").arg("--client").arg(&client), &clog);
    ready(port, &[&slog, &clog]);
    let halves = vec![("server", s.0.id()), ("client", c.0.id())];
    Some(Setup {
        name: if tls {
            "rathole 0.5, TLS"
        } else {
            "rathole 0.5, TCP"
        },
        port,
        halves,
        _keep: vec![Box::new(s), Box::new(c), Box::new(dir), Box::new(pki)],
    })
}

fn bore(target: u16) -> Option<Setup> {
    if !on_path("bore") {
        eprintln!("bore not on PATH (scripts/bench-tunnel installs it): skipped");
        return None;
    }
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let (slog, clog) = (dir.path().join("server.log"), dir.path().join("client.log"));
    // bore's control port is fixed (7835).
    let s = spawn(
        Command::new("bore").args([
            "server",
            "--bind-addr",
            "127.0.0.1",
            "--min-port",
            &port.to_string(),
            "--max-port",
            &port.to_string(),
        ]),
        &slog,
    );
    let c = spawn(
        Command::new("bore").args([
            "local",
            &target.to_string(),
            "--local-host",
            "127.0.0.1",
            "--to",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ]),
        &clog,
    );
    ready(port, &[&slog, &clog]);
    let halves = vec![("server", s.0.id()), ("client", c.0.id())];
    Some(Setup {
        name: "bore",
        port,
        halves,
        _keep: vec![Box::new(s), Box::new(c), Box::new(dir)],
    })
}

/// Gbit/s of `streams` uploads of `total / streams` bytes each at once.
fn throughput(port: u16, streams: usize, total: usize) -> f64 {
    let each = total / streams;
    let start = Instant::now();
    let threads: Vec<_> = (0..streams)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let _ = s.set_nodelay(true);
                s.write_all(b"S").unwrap();
                let chunk = vec![0x5au8; 256 * 1024];
                let mut left = each;
                while left > 0 {
                    let n = left.min(chunk.len());
                    s.write_all(&chunk[..n]).unwrap();
                    left -= n;
                }
                s.shutdown(Shutdown::Write).unwrap();
                let mut count = [0u8; 8];
                s.read_exact(&mut count).unwrap();
                assert_eq!(u64::from_be_bytes(count), each as u64, "bytes lost");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (each * streams) as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// (p50, p99) of connect + one byte echoed, in ms.
fn first_byte(port: u16, n: usize) -> (f64, f64) {
    let mut ms: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let _ = s.set_nodelay(true);
            s.write_all(b"E").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    (at(0.50), at(0.99))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `n` visitors connected, each with one byte echoed.
fn idle_visitors(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("visitor {i}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(b"E").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
                .unwrap_or_else(|e| panic!("visitor {i}: {e}"));
            s
        })
        .collect()
}

/// Starts a setup toward the target port (`None`: its tool is missing).
type MakeSetup = fn(u16) -> Option<Setup>;

struct Row {
    name: &'static str,
    one: f64,
    eight: f64,
    p50: f64,
    p99: f64,
    /// Per half: (name, idle KiB, with idle streams KiB).
    rss: Vec<(&'static str, u64, u64)>,
}

fn measure(s: &Setup, sizes: &Sizes) -> Row {
    pin(&s.halves);
    // Warm up (and let the halves settle after start).
    let _ = first_byte(s.port, 10);
    let idle: Vec<u64> = s.halves.iter().map(|(_, p)| rss_kib(*p)).collect();
    let held = idle_visitors(s.port, sizes.idle);
    let loaded: Vec<u64> = s.halves.iter().map(|(_, p)| rss_kib(*p)).collect();
    drop(held);
    let one = throughput(s.port, 1, sizes.upload);
    let eight = throughput(s.port, 8, sizes.upload);
    let (p50, p99) = first_byte(s.port, sizes.round_trips);
    Row {
        name: s.name,
        one,
        eight,
        p50,
        p99,
        rss: s
            .halves
            .iter()
            .zip(idle.iter().zip(loaded))
            .map(|((h, _), (i, l))| (*h, *i, l))
            .collect(),
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes = if bench {
        Sizes {
            upload: 1000 << 20,
            round_trips: 1000,
            idle: 1000,
        }
    } else {
        Sizes {
            upload: 8 << 20,
            round_trips: 20,
            idle: 50,
        }
    };
    // BENCH_SETUPS=direct,tunnel,... runs only those (direct is always
    // run: it is the ceiling the ratios are of).
    let only = std::env::var("BENCH_SETUPS").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|o| o == name);
    let t = target();
    let mut rows = Vec::new();
    // One setup at a time, so only its processes run while it is measured.
    rows.push(measure(&direct(t), &sizes));
    let mut setups: Vec<(&str, MakeSetup)> = vec![("tunnel", |t| Some(this_tunnel(t)))];
    if bench {
        setups.push(("rathole-tcp", |t| rathole(t, false)));
        setups.push(("rathole-tls", |t| rathole(t, true)));
        setups.push(("bore", bore));
    }
    for (name, make) in setups {
        if wanted(name) {
            if let Some(s) = make(t) {
                rows.push(measure(&s, &sizes));
            }
        }
    }
    report(&rows, &sizes, bench);
}

fn report(rows: &[Row], sizes: &Sizes, bench: bool) {
    let base = &rows[0];
    println!(
        "\n{} MiB uploads, {} connect+first-byte round trips, {} idle visitors{}\n",
        sizes.upload >> 20,
        sizes.round_trips,
        sizes.idle,
        if bench { "" } else { " (smoke run)" }
    );
    println!("| setup | 1 stream Gbit/s | 8 streams Gbit/s | connect+first byte p50 / p99 ms | RSS idle (KiB) | RSS with idle visitors (KiB) | bytes per idle stream |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let rss = |f: &dyn Fn(&(&str, u64, u64)) -> String| {
            if r.rss.is_empty() {
                "-".to_string()
            } else {
                r.rss.iter().map(f).collect::<Vec<_>>().join(", ")
            }
        };
        println!(
            "| {} | {:.2} ({:.2}x direct) | {:.2} ({:.2}x) | {:.3} / {:.3} | {} | {} | {} |",
            r.name,
            r.one,
            r.one / base.one,
            r.eight,
            r.eight / base.eight,
            r.p50,
            r.p99,
            rss(&|(h, i, _)| format!("{h} {i}")),
            rss(&|(h, _, l)| format!("{h} {l}")),
            rss(&|(h, i, l)| format!(
                "{h} {}",
                (l.saturating_sub(*i) * 1024) / sizes.idle.max(1) as u64
            )),
        );
    }
}
