//! The relay's database (`db`) with real `iot-relay` processes: the JSON
//! files of an earlier relay imported on first start, and a write the disk
//! refuses answered 500 with nothing changed, in memory or after a kill -9.

use crate::common::servers::free_port;
use crate::common::tls::TestPki;
use crate::common::tunnel::{api, echo_service, round_trip, start_agent, Relay, DEVICE, TOKEN};
use serde_json::json;
use std::path::{Path, PathBuf};

const IMPORTED: &str = "the JSON files of an earlier relay were imported";

fn mappings(relay: &Relay) -> Vec<serde_json::Value> {
    let (status, list) = api(relay.api_port, "GET", "/api/v2/mapping", Some(TOKEN), "");
    assert_eq!(status, 200, "{list}");
    list["mappings"].as_array().unwrap().clone()
}

fn filter(relay: &Relay) -> serde_json::Value {
    let (status, f) = relay.admin("GET", "/api/v2/accept-filter", None);
    assert_eq!(status, 200, "{f}");
    f
}

fn aside(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.imported", p.display()))
}

#[test]
fn a_relay_imports_an_earlier_relays_json_files_once_and_keeps_them_after_a_kill() {
    let echo = echo_service();
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let file = |n: &str| dir.path().join(n);
    // What an earlier relay left: a public pipe on its port, a filter that
    // takes the device, a registration and an OTP hash.
    let port = free_port();
    std::fs::write(
        file("mappings.json"),
        json!([{
            "id": "oldpipe", "spec": {"type": "public", "maxconnections": 5,
            "heartbeatabsencethreshold": 200000, "device": DEVICE, "target": echo},
            "port1": 7000, "port2": port, "passcode1": "", "passcode2": "", "timestamp": 1
        }])
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        file("registry.json"),
        json!({"acceptFilter": {"deviceIds": [DEVICE]},
               "agents": [{"deviceId": "device-9", "address": format!("127.0.0.1:{}", free_port())}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        file("otps.json"),
        json!([{"device": DEVICE, "sha256": "ab".repeat(32), "expires": i64::MAX, "used": null}])
            .to_string(),
    )
    .unwrap();

    let mut relay = Relay::start_closed(&pki, dir.path(), 1, &[]);
    // One line, logged before "iot-relay running" (which start waited on).
    assert_eq!(relay.proc.count(IMPORTED), 1, "{:?}", relay.proc.seen);
    for n in ["mappings.json", "registry.json", "otps.json"] {
        assert!(!file(n).exists(), "{n} is still in its place");
        assert!(aside(&file(n)).exists(), "{n} was not renamed aside");
    }
    assert_eq!(filter(&relay)["deviceIds"], json!([DEVICE]));
    let list = mappings(&relay);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0]["id"].clone(), list[0]["port2"].clone()),
        (json!("oldpipe"), json!(port))
    );
    let (_, agents) = relay.admin("GET", "/api/v2/agents", None);
    assert!(
        agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["deviceId"] == "device-9"),
        "{agents}"
    );
    let db = rusqlite::Connection::open(file("relay.db")).unwrap();
    let otps: i64 = db
        .query_row(
            "SELECT count(*) FROM otps WHERE device = ?1",
            [DEVICE],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(otps, 1);
    drop(db);

    // The imported filter lets the agent in, the imported pipe serves.
    let mut agent = start_agent(&pki, dir.path(), relay.agents_port, &[&echo], &[]);
    agent.wait_for("tunnel connected");
    relay.proc.wait_for("agent connected");
    assert_eq!(round_trip(port, b"imported").unwrap(), b"imported");

    // After a kill -9 it all comes from the database; nothing is imported.
    relay.kill();
    agent.wait_for("tunnel lost");
    relay.restart();
    assert_eq!(relay.proc.count(IMPORTED), 0, "{:?}", relay.proc.seen);
    assert_eq!(
        relay.proc.count("pipe restored"),
        1,
        "{:?}",
        relay.proc.seen
    );
    agent.wait_for("tunnel connected");
    relay.proc.wait_for("agent connected");
    assert_eq!(round_trip(port, b"again").unwrap(), b"again");
    assert_eq!(filter(&relay)["deviceIds"], json!([DEVICE]));
}

#[test]
fn a_broken_json_file_of_an_earlier_relay_stops_the_start_with_advice() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("registry.json"), "{\"acceptFilter\":").unwrap();
    // The relay opens its database before any port: these settings suffice.
    let path = |n: &str| dir.path().join(n).display().to_string();
    let relay_env = vec![
        ("IOT_RELAY_API__TOKEN", TOKEN.to_string()),
        (
            "IOT_RELAY_AGENTS__CERT",
            pki.server_cert.display().to_string(),
        ),
        (
            "IOT_RELAY_AGENTS__KEY",
            pki.server_key.display().to_string(),
        ),
        ("IOT_RELAY_CA__CERT", path("ca/ca.pem")),
        ("IOT_RELAY_CA__KEY", path("ca/ca.key")),
        ("IOT_RELAY_DB", path("relay.db")),
        ("IOT_RELAY_STATE", path("mappings.json")),
        ("IOT_RELAY_REGISTRY", path("registry.json")),
        ("IOT_RELAY_OTP__STATE", path("otps.json")),
    ];
    let out = crate::common::tunnel::relay_command(&["run"], &relay_env)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("registry") && err.contains("registry.json"),
        "{err}"
    );
    assert!(err.contains("move it aside"), "{err}");
    assert!(
        dir.path().join("registry.json").exists(),
        "the file was moved: {err}"
    );
}

/// A small tmpfs the test fills up; unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: PathBuf) -> Option<SmallDisk> {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(at))
    }

    /// Writes a file until the disk says it is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "{e}"); // ENOSPC
                    break;
                }
            }
        }
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_write_the_full_disk_refuses_is_answered_500_and_changes_nothing() {
    let pki = TestPki::new(DEVICE);
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(dir.path().join("small")) else {
        eprintln!("skipped: cannot mount a tmpfs here (the test needs root and mount)");
        return;
    };
    let db = disk.0.join("relay.db").display().to_string();
    let mut relay = Relay::start_closed(&pki, dir.path(), 2, &[("IOT_RELAY_DB", db)]);
    relay.accept(&json!({ "deviceIds": [DEVICE] }));
    let port = relay.add_public("127.0.0.1:1", 1);
    let before = mappings(&relay);

    disk.fill();
    let full = |(status, answer): (u16, serde_json::Value), what: &str| {
        assert_eq!(status, 500, "{what}: {answer}");
        let m = answer["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("nothing changed") && m.contains("disk is full"),
            "{what}: {m}"
        );
    };
    full(
        relay.admin(
            "PUT",
            "/api/v2/accept-filter",
            Some(&json!({"allowAll": true})),
        ),
        "accept filter",
    );
    full(
        relay.add(&json!({"type": "public", "device": "device-2", "target": "127.0.0.1:2"})),
        "mapping add",
    );
    let id = before[0]["id"].as_str().unwrap();
    full(
        api(
            relay.api_port,
            "POST",
            "/api/v2/mapping/remove",
            Some(TOKEN),
            &format!("mappingid={id}"),
        ),
        "mapping remove",
    );
    full(
        relay.admin(
            "POST",
            "/api/v2/agents",
            Some(&json!({"deviceId": "device-9", "address": "127.0.0.1:9"})),
        ),
        "registration",
    );
    full(
        api(
            relay.api_port,
            "POST",
            "/api/v2/otp",
            Some(TOKEN),
            "device=device-3",
        ),
        "otp",
    );
    // The old state stays, in memory: the same filter, the same pipe still
    // on its port, no registration.
    assert_eq!(filter(&relay)["allowAll"], false);
    assert_eq!(filter(&relay)["deviceIds"], json!([DEVICE]));
    let now = mappings(&relay);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0]["id"], before[0]["id"]);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let (_, agents) = relay.admin("GET", "/api/v2/agents", None);
    assert!(
        !agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["deviceId"] == "device-9"),
        "{agents}"
    );

    // Space again: the next write works, and a kill -9 keeps it.
    disk.free();
    relay.accept(&json!({ "allowAll": true }));
    relay.kill();
    relay.restart();
    assert_eq!(filter(&relay)["allowAll"], true);
    assert_eq!(mappings(&relay).len(), 1);
    relay.kill();
    drop(disk);
}
