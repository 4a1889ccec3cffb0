//! Discovery across a real network: an agent announcing itself by mDNS in
//! one network namespace, `iot-relay discover` in another, the two joined
//! by a veth pair the test creates (as root; `ip netns`, iproute2). Where
//! namespaces cannot be made the test says so and passes without running.

use crate::common::agent_proc::{AgentProcess, BIN};
use crate::common::tls::TestPki;
use crate::common::tunnel::{agent_env, DEVICE, RELAY_BIN};
use std::process::Command;
use std::time::{Duration, Instant};

/// Addresses inside the test's own namespaces only (never routed).
const AGENT_IP: &str = "10.217.17.1";
const RELAY_IP: &str = "10.217.17.2";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by a veth pair; removed on drop.
struct Namespaces {
    agent: String,
    relay: String,
}

impl Namespaces {
    fn create() -> Result<Namespaces, String> {
        let tag = std::process::id() % 100_000;
        let ns = Namespaces {
            agent: format!("iot17a-{tag}"),
            relay: format!("iot17r-{tag}"),
        };
        ip(&["netns", "add", &ns.agent])?;
        ip(&["netns", "add", &ns.relay])?;
        let (va, vr) = (format!("v17a{tag}"), format!("v17r{tag}"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vr])?;
        ip(&["link", "set", &va, "netns", &ns.agent])?;
        ip(&["link", "set", &vr, "netns", &ns.relay])?;
        for (n, dev, addr) in [(&ns.agent, &va, AGENT_IP), (&ns.relay, &vr, RELAY_IP)] {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", n, "link", "set", dev, "multicast", "on", "up"])?;
            ip(&["-n", n, "route", "add", "224.0.0.0/4", "dev", dev])?;
        }
        Ok(ns)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and the
        // pair with it.
        let _ = ip(&["netns", "del", &self.agent]);
        let _ = ip(&["netns", "del", &self.relay]);
    }
}

#[test]
fn iot_relay_discover_lists_an_announcing_agent_on_another_host() {
    let ns = match Namespaces::create() {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED iot_relay_discover_lists_an_announcing_agent_on_another_host: cannot create network namespaces here ({e})");
            return;
        }
    };
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let env = agent_env(
        &pki,
        dir.path(),
        7000,
        &[],
        &[
            ("IOT_AGENT_TUNNEL__LISTEN", format!("{AGENT_IP}:7100")),
            ("IOT_AGENT_TUNNEL__ANNOUNCE", "true".into()),
        ],
    );
    let mut cmd = Command::new("ip");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(["netns", "exec", &ns.agent, BIN, "run"]);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut agent = AgentProcess::spawn(cmd);
    agent.wait_for("tunnel announced on the local network");

    // From the other namespace: asked until it answers (mDNS probing and
    // announcing take a moment after the agent starts).
    let deadline = Instant::now() + Duration::from_secs(60);
    let found = loop {
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns.relay, RELAY_BIN, "discover", "--wait", "3s", "--json",
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        if let Some(f) = list.into_iter().find(|f| f["deviceId"] == DEVICE) {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never answered a discover"
        );
    };
    assert_eq!(found["address"], AGENT_IP, "{found}");
    assert_eq!(found["port"], 7100, "{found}");
    assert_eq!(found["tls"], true, "{found}");
    assert_eq!(found["mode"], "relay-dials", "{found}");

    // The table form names the same.
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.relay, RELAY_BIN, "discover", "--wait", "3s",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("DEVICE"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(DEVICE))
        .unwrap_or_else(|| panic!("no row for {DEVICE}: {text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [DEVICE, AGENT_IP, "7100", "yes", "relay-dials"],
        "{text}"
    );
    drop(agent);
}
