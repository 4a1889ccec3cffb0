//! `scripts/run` (what the README's run command and `task run` run) with
//! nothing configured but snapd (a real one) and the agent's data dirs: it
//! brings up the bundled nats-server with the generated configuration on a
//! free loopback port, then the agent; a NATS request on
//! `snapd.v2.system-info.get` as the agent's user is answered; Ctrl-C
//! (SIGINT to the script) stops both.

use crate::common::poll_until;
use crate::common::servers::{free_port, RealSnapd};
use bytes::Bytes;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_iot-agent");
const WAIT: Duration = Duration::from_secs(30);

fn alive(pid: u32) -> bool {
    // A zombie is not running any more.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn scripts_run_brings_up_nats_and_the_agent_and_stops_both_on_ctrl_c() {
    let snapd = RealSnapd::start();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(format!("{ROOT}/scripts/run"))
        .env("IOT_AGENT_BIN", BIN)
        .env("IOT_AGENT_DIRS__DATA", &data)
        .env("IOT_AGENT_DIRS__COMMON", dir.path().join("common"))
        .env("IOT_AGENT_SNAPD__SOCKET", snapd.socket())
        // Nothing listens there: enrollment waits and retries quietly.
        .env("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port()))
        .env_remove("IOT_AGENT_NATS__URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let line = lines
        .recv_timeout(WAIT)
        .expect("scripts/run printed nothing");
    let rest = line
        .strip_prefix("scripts/run: NATS at ")
        .unwrap_or_else(|| panic!("{line}"));
    let (url, pid) = rest.split_once(" (nats-server pid ").unwrap();
    let nats_pid: u32 = pid.trim_end_matches(')').parse().unwrap();
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    assert_ne!(url, "nats://127.0.0.1:4222", "the system's port");

    let password = std::fs::read_to_string(data.join("nats/snapd.password")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let answer = rt.block_on(async {
        let client = async_nats::ConnectOptions::with_user_and_password(
            "snapd".into(),
            password.trim().into(),
        )
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(url)
        .await
        .unwrap();
        // The agent subscribes once it is up: until then, no responders.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match client
                .request("snapd.v2.system-info.get", Bytes::new())
                .await
            {
                Ok(m) => break m,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no answer: {e}"),
            }
        }
    });
    let v: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(v["type"], "sync", "{v}");
    assert!(v["result"]["version"].is_string(), "{v}");
    let agent_pid: u32 = std::fs::read_to_string(data.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // Ctrl-C.
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let gone = poll_until(Instant::now() + WAIT, || {
        (!alive(nats_pid) && !alive(agent_pid)).then_some(())
    });
    assert!(
        gone.is_some(),
        "nats-server or the agent outlived scripts/run"
    );
}
