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
