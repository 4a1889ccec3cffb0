//! `iot-agent run` as its user runs it: against a real snapd and a real
//! nats-server, stopped with SIGTERM or SIGINT.

use crate::common::agent_proc::AgentProcess;
use crate::common::servers::{free_port, NatsConfig, NatsServer, NatsUser, RealSnapd};

fn base_env(dir: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "IOT_AGENT_DIRS__DATA",
            dir.join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.join("common").display().to_string(),
        ),
        // Nothing listens there: enrollment waits and retries quietly.
        ("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port())),
    ]
}

#[test]
fn run_connects_to_snapd_and_nats_and_stops_cleanly_on_sigterm() {
    let snapd = RealSnapd::start();
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", "test-password")],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = base_env(dir.path());
    env.push((
        "IOT_AGENT_SNAPD__SOCKET",
        snapd.socket().display().to_string(),
    ));
    env.push(("IOT_AGENT_NATS__URL", nats.url()));
    env.push(("IOT_AGENT_NATS__SNAPD__PASSWORD", "test-password".into()));
    let mut agent = AgentProcess::start(&env);

    let lines = agent.wait_for_all(&["snapd is reachable", "connected to NATS"]);
    assert!(lines[0].contains("version="), "{}", lines[0]);
    assert!(dir.path().join("data").is_dir(), "data dir created");
    let pid_file = dir.path().join("data/agent.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        agent.pid().to_string()
    );

    agent.signal("TERM");
    let status = agent.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(agent.count("iot-agent stopped") == 1, "{:?}", agent.seen);
    assert!(!pid_file.exists(), "pid file removed at exit");
    assert_eq!(
        agent.count("test-password"),
        0,
        "the password reached the log"
    );
    assert_eq!(agent.count("well-known default"), 0);
}

#[test]
fn run_without_snapd_or_nats_retries_with_clear_lines_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = base_env(dir.path());
    env.push((
        "IOT_AGENT_SNAPD__SOCKET",
        dir.path().join("none.socket").display().to_string(),
    ));
    env.push((
        "IOT_AGENT_NATS__URL",
        format!("nats://127.0.0.1:{}", free_port()),
    ));
    let mut agent = AgentProcess::start(&env);

    agent.wait_for("well-known default");
    // snapd's and NATS's retries run side by side: their lines come in any order.
    let lines = agent.wait_for_all(&["subsystem failed; restarting", "NATS server not reachable"]);
    assert!(lines[0].contains("is snapd running"), "{}", lines[0]);
    // Still retrying, not crashed: a second attempt is logged.
    agent.wait_for("subsystem failed; restarting");

    agent.signal("INT");
    assert!(agent.wait_exit().success());
    assert_eq!(agent.count("panicked"), 0);
}

/// snapd stops the agent with SIGTERM and kills it 10 s later (its default
/// stop timeout): with every subsystem running and a producer sending
/// export messages as fast as the agent acknowledges them, the agent exits
/// by itself within that bound, every subsystem stopped (none aborted), and
/// each message it acknowledged is in its spool afterwards.
#[test]
fn sigterm_stops_every_subsystem_within_10_s_and_keeps_everything_acknowledged() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let snapd = RealSnapd::start();
    let nats = NatsServer::start(NatsConfig {
        users: vec![
            NatsUser::new("snapd", "test-password"),
            NatsUser::new("app", "app-password")
                .publish(vec!["export.>"])
                .subscribe(vec!["_INBOX.>"]),
        ],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let mut env = base_env(dir.path());
    env.push((
        "IOT_AGENT_SNAPD__SOCKET",
        snapd.socket().display().to_string(),
    ));
    env.push(("IOT_AGENT_NATS__URL", nats.url()));
    env.push(("IOT_AGENT_NATS__SNAPD__PASSWORD", "test-password".into()));
    // No upstream listens: what is acknowledged stays in the spool.
    env.push(("IOT_AGENT_EXPORT__ENABLED", "true".into()));
    env.push((
        "IOT_AGENT_EXPORT__UPSTREAM__URL",
        format!("nats://127.0.0.1:{}", free_port()),
    ));
    let mut agent = AgentProcess::start(&env);
    agent.wait_for_all(&[
        "snapd is reachable",
        "export intake listening",
        "snapd mirror serving",
    ]);

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (acked, stop, url) = (acked.clone(), stop.clone(), nats.url());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let client = async_nats::ConnectOptions::with_user_and_password(
                    "app".into(),
                    "app-password".into(),
                )
                .request_timeout(Some(Duration::from_secs(2)))
                .connect(url)
                .await
                .unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(m) = client.request("export.s1", format!("{i}").into()).await {
                        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                        if v["ok"] == true {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    i += 1;
                }
            })
        })
    };
    crate::common::poll_until(Instant::now() + Duration::from_secs(60), || {
        (acked.load(Ordering::SeqCst) >= 100).then_some(())
    })
    .expect("the agent acknowledged too few messages");

    agent.signal("TERM");
    let signalled = Instant::now();
    let status = agent.wait_exit();
    let took = signalled.elapsed();
    stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(10),
        "the agent took {took:?} to stop; snapd kills it at 10 s"
    );
    assert_eq!(
        agent.count("did not stop within the grace period"),
        0,
        "{:?}",
        agent.seen
    );
    assert_eq!(agent.count("iot-agent stopped"), 1, "{:?}", agent.seen);

    let acked = acked.load(Ordering::SeqCst);
    let out = crate::common::agent_proc::run_once(&["export", "status", "--json"], &env);
    assert!(out.status.success(), "{out:?}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let spooled = st["backlog"]["messages"].as_u64().unwrap();
    assert!(
        spooled >= acked,
        "{acked} messages acknowledged but {spooled} in the spool: {st}"
    );
}
