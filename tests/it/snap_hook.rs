//! The snap's configure hook, run as snapd runs it: `meta/hooks/configure`
//! of the laid-out snap tree (the wrapper, which execs
//! `$SNAP/snap/hooks/configure`, which runs `$SNAP/bin/iot-agent`), with
//! the snap's environment. `snapctl` works only inside a real snap, so a
//! fake one on PATH answers `get` with the pending configuration, `services`
//! with the agent's state, and records every call.

use crate::snap_tool as snap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_iot-agent");

/// A laid-out snap, its `$SNAP_DATA`, and the fake `snapctl`.
struct Snap {
    dir: tempfile::TempDir,
}

impl Snap {
    fn new() -> Snap {
        let dir = tempfile::tempdir().unwrap();
        let src = snap::Sources::of_project(Path::new(ROOT), Path::new(BIN));
        snap::layout(&src, &dir.path().join("snap")).unwrap();
        for d in ["data", "common", "fakebin"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let script = format!(
            r#"#!/bin/sh
d='{d}'
echo "$*" >> "$d/calls"
case "$1" in
  get) cat "$d/config.json" ;;
  services) echo "Service          Startup  Current  Notes"
            echo "$2  $(cat "$d/startup")  $(cat "$d/state")  -" ;;
  restart) ;;
  stop) echo disabled > "$d/startup" ;;
  start) echo enabled > "$d/startup" ;;
  *) echo "fake snapctl: unexpected $*" >&2; exit 1 ;;
esac
"#,
            d = dir.path().display()
        );
        let snapctl = dir.path().join("fakebin/snapctl");
        std::fs::write(&snapctl, script).unwrap();
        std::fs::set_permissions(&snapctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let snap = Snap { dir };
        snap.set_state("active");
        std::fs::write(snap.path("startup"), "enabled").unwrap();
        snap
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// What `snapctl get -d` answers: the configuration `snap set` made.
    fn set_config(&self, json: &str) {
        std::fs::write(self.path("config.json"), json).unwrap();
    }

    fn set_state(&self, state: &str) {
        std::fs::write(self.path("state"), state).unwrap();
    }

    /// Runs the hook; returns its output and the snapctl calls it made.
    /// A script this test process just wrote can be "Text file busy" for a
    /// moment: another test's fork may still hold its write descriptor
    /// (until that child execs). That is the test harness, not the hook:
    /// run it again then.
    fn configure(&self) -> (Output, Vec<String>) {
        for _ in 0..50 {
            let (out, calls) = self.configure_once();
            if !String::from_utf8_lossy(&out.stderr).contains("Text file busy") {
                return (out, calls);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.configure_once()
    }

    fn configure_once(&self) -> (Output, Vec<String>) {
        let _ = std::fs::remove_file(self.path("calls"));
        let out = std::process::Command::new(self.path("snap/meta/hooks/configure"))
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.path("fakebin").display()),
            )
            .env("SNAP", self.path("snap"))
            .env("SNAP_DATA", self.path("data"))
            .env("SNAP_COMMON", self.path("common"))
            .env("SNAP_NAME", "iot-agent")
            .env("SNAP_INSTANCE_NAME", "iot-agent")
            .output()
            .unwrap();
        let calls = std::fs::read_to_string(self.path("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        (out, calls)
    }

    fn fingerprint(&self) -> Option<String> {
        std::fs::read_to_string(self.path("data/config.fingerprint")).ok()
    }
}

fn restarts(calls: &[String]) -> usize {
    calls
        .iter()
        .filter(|c| *c == "restart iot-agent.agent")
        .count()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "configure failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn configure_accepts_good_values_and_restarts_only_when_a_value_changed() {
    let snap = Snap::new();

    // Install: nothing set; no fingerprint yet, so the started agent is restarted
    // once to be sure it runs with what the hook validated.
    snap.set_config("{}");
    let (out, calls) = snap.configure();
    ok(&out);
    assert!(calls[0].starts_with("get -d "), "{calls:?}");
    assert_eq!(restarts(&calls), 1, "{calls:?}");
    let first = snap.fingerprint().expect("fingerprint kept in $SNAP_DATA");
    let mode = std::fs::metadata(snap.path("data/config.fingerprint"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The same configuration again: no restart.
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 0, "{calls:?}");

    // A value set to what it already was (the default): nothing the agent
    // reads changed, so no restart.
    snap.set_config(
        r#"{"snapd": {"timeout": "30s"}, "snaplogger": {"log": {"changes": {"startup": true}}}}"#,
    );
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 0, "{calls:?}");
    assert_eq!(snap.fingerprint().unwrap(), first);

    // Real changes, as `snap set` types them (numbers arrive as numbers).
    snap.set_config(
        r#"{"snapd": {"timeout": "45s"}, "snaplogger": {"maximum": {"changes": {"keep": 5}}},
            "nats": {"snapd": {"password": "correct horse"}}, "url": "https://id.example.com"}"#,
    );
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 1, "{calls:?}");
    let second = snap.fingerprint().unwrap();
    assert_ne!(second, first);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("correct horse")
            && !String::from_utf8_lossy(&out.stderr).contains("correct horse")
    );

    // Only the password changes: that is read too, so restart.
    snap.set_config(
        r#"{"snapd": {"timeout": "45s"}, "snaplogger": {"maximum": {"changes": {"keep": 5}}},
            "nats": {"snapd": {"password": "battery staple"}}, "url": "https://id.example.com"}"#,
    );
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 1, "{calls:?}");

    // A stopped agent is not started by a change: it reads the new
    // configuration when it starts. The fingerprint still moves on.
    snap.set_state("inactive");
    snap.set_config(r#"{"log": {"level": "debug"}}"#);
    let before = snap.fingerprint().unwrap();
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 0, "{calls:?}");
    assert!(
        calls.iter().any(|c| c == "services iot-agent.agent"),
        "{calls:?}"
    );
    assert_ne!(snap.fingerprint().unwrap(), before);
}

#[test]
fn configure_rejects_bad_values_naming_the_key_and_leaves_the_agent_alone() {
    let snap = Snap::new();
    snap.set_config(r#"{"snaplogger": {"maximum": {"changes": {"keep": 5}}}}"#);
    let (out, _) = snap.configure();
    ok(&out);
    let good = snap.fingerprint().unwrap();

    let cases: &[(&str, &str, &str)] = &[
        // wrong type
        (
            r#"{"snaplogger": {"maximum": {"changes": {"keep": "lots"}}}}"#,
            "snaplogger.maximum.changes.keep",
            "lots",
        ),
        (
            r#"{"snaplogger": {"log": {"changes": {"startup": "maybe"}}}}"#,
            "snaplogger.log.changes.startup",
            "maybe",
        ),
        (r#"{"snapd": 5}"#, "snapd", "5"),
        // negative keep count
        (
            r#"{"snaplogger": {"maximum": {"changes": {"keep": -5}}}}"#,
            "snaplogger.maximum.changes.keep",
            "-5",
        ),
        // durations that do not parse
        (
            r#"{"snaplogger": {"duration": {"between": {"checks": "soon"}}}}"#,
            "snaplogger.duration.between.checks",
            "soon",
        ),
        (r#"{"snapd": {"timeout": 30}}"#, "snapd.timeout", "30"),
        // other bad values
        (r#"{"url": "ftp://x"}"#, "url", "ftp://x"),
        (r#"{"log": {"level": "loud"}}"#, "log.level", "loud"),
        // unknown keys (typos)
        (
            r#"{"snaplogger": {"maximum": {"changes": {"kep": 5}}}}"#,
            "snaplogger.maximum.changes.kep",
            "unknown",
        ),
        (
            r#"{"nats": {"snapd": {"pasword": "x"}}}"#,
            "nats.snapd.pasword",
            "unknown",
        ),
    ];
    for (json, key, shown) in cases {
        snap.set_config(json);
        let (out, calls) = snap.configure();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{json} was accepted");
        assert!(err.contains(&format!("\"{key}\"")), "{json}: {err}");
        assert!(err.contains(shown), "{json}: {err}");
        assert!(err.contains("snap configuration"), "{json}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        // The running agent untouched: no restart, nothing else asked of
        // snapd but the configuration, the last good fingerprint kept.
        assert_eq!(calls.len(), 1, "{json}: {calls:?}");
        assert!(calls[0].starts_with("get -d "), "{calls:?}");
        assert_eq!(snap.fingerprint().unwrap(), good, "{json}");
    }

    // The message lists the section's known keys: the fix is at hand.
    snap.set_config(r#"{"snaplogger": {"maximum": {"changes": {"kep": 5}}}}"#);
    let (out, _) = snap.configure();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("snaplogger.maximum.changes.keep"), "{err}");

    // Fixed again: accepted, and since it is what the agent already runs
    // with, no restart.
    snap.set_config(r#"{"snaplogger": {"maximum": {"changes": {"keep": 5}}}}"#);
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 0, "{calls:?}");
}

/// The bundled NATS server through the hook, with a real nats-server
/// running the generated configuration (as the `nats` daemon would): the
/// configuration is regenerated on every `snap set`, the server gets SIGHUP
/// only when its users changed, a restart when its listeners did, and
/// `nats.bundled=false` disables the daemon (set back: enabled again).
#[test]
fn configure_regenerates_the_nats_configuration_and_reloads_only_on_change() {
    use crate::nats_bundled::ServerProc;
    let snap = Snap::new();
    let port = crate::common::servers::free_port();
    let base = format!(r#""url": "nats://127.0.0.1:{port}""#);
    snap.set_config(&format!(r#"{{"nats": {{{base}}}}}"#));
    let (out, calls) = snap.configure();
    ok(&out);
    assert!(
        !calls
            .iter()
            .any(|c| c.contains(".nats") && (c.starts_with("restart") || c.starts_with("stop"))),
        "{calls:?}"
    );
    let conf = snap.path("data/nats/nats-server.conf");
    let device = std::fs::read_to_string(snap.path("data/nats/device/password")).unwrap();
    assert_eq!(device.trim().len(), 32);
    assert_eq!(
        std::fs::read_to_string(snap.path("data/nats/device/user")).unwrap(),
        "device\n"
    );
    let server = ServerProc::start(&conf, port);
    let reloads = || {
        server
            .log_text()
            .matches("Reloaded server configuration")
            .count()
    };

    // Nothing changed: no signal, no restart.
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(reloads(), 0);
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("restart iot-agent.nats")),
        "{calls:?}"
    );

    // An operator user: the server is told with SIGHUP, not restarted.
    snap.set_config(&format!(
        r#"{{"nats": {{{base}, "operator": {{"user": "op", "password": "op secret"}}}}}}"#
    ));
    let (out, calls) = snap.configure();
    ok(&out);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let seen = crate::common::poll_until(deadline, || (reloads() == 1).then_some(()));
    assert!(seen.is_some(), "no reload\n{}", server.tail());
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("restart iot-agent.nats")),
        "{calls:?}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("op secret"));
    // The device's generated password survived the regeneration.
    assert_eq!(
        std::fs::read_to_string(snap.path("data/nats/device/password")).unwrap(),
        device
    );

    // A new MQTT listener: nats-server cannot reload that, so a restart.
    let mqtt = crate::common::servers::free_port();
    snap.set_config(&format!(
        r#"{{"nats": {{{base}, "operator": {{"user": "op", "password": "op secret"}}, "mqtt": {{"port": {mqtt}}}}}}}"#
    ));
    let (out, calls) = snap.configure();
    ok(&out);
    assert!(
        calls.iter().any(|c| c == "restart iot-agent.nats"),
        "{calls:?}"
    );
    assert_eq!(reloads(), 1);

    // Turned off and on again.
    snap.set_config(&format!(r#"{{"nats": {{{base}, "bundled": false}}}}"#));
    let (out, calls) = snap.configure();
    ok(&out);
    assert!(
        calls.iter().any(|c| c == "stop --disable iot-agent.nats"),
        "{calls:?}"
    );
    let (out, calls) = snap.configure();
    ok(&out);
    assert!(!calls.iter().any(|c| c.starts_with("stop")), "{calls:?}");
    snap.set_config(&format!(r#"{{"nats": {{{base}}}}}"#));
    let (out, calls) = snap.configure();
    ok(&out);
    assert!(
        calls.iter().any(|c| c == "start --enable iot-agent.nats"),
        "{calls:?}"
    );

    // A bad NATS setting is refused before anything is touched.
    snap.set_config(r#"{"nats": {"url": "nats://10.1.2.3:4222"}}"#);
    let (out, calls) = snap.configure();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nats.bundled=false"));
    assert!(!calls.iter().any(|c| !c.starts_with("get")), "{calls:?}");
}

/// `snap set iot-agent dms.signing.keys=a:KEY,b:KEY` arrives as one string
/// (not JSON), a JSON list works too; removing a key from the list changes
/// what the agent reads, so the hook restarts it (the key is revoked);
/// requiring signatures without a key is refused before the agent sees it.
#[test]
fn signing_keys_are_set_rotated_and_revoked_with_snap_set() {
    let entry = |n: u8, kid: &str| {
        let k = ed25519_dalek::SigningKey::from_bytes(&[n; 32]).verifying_key();
        iot_agent::signing::keys::entry(kid, &k)
    };
    let (a, b) = (entry(1, "ops-a"), entry(2, "ops-b"));
    let snap = Snap::new();
    snap.set_config("{}");
    ok(&snap.configure().0);

    let both = format!(r#"{{"dms": {{"signing": {{"keys": "{a},{b}", "required": true}}}}}}"#);
    snap.set_config(&both);
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 1, "{calls:?}");
    // The same keys as a JSON list: the same configuration, no restart.
    snap.set_config(&format!(
        r#"{{"dms": {{"signing": {{"keys": ["{a}", "{b}"], "required": true}}}}}}"#
    ));
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 0, "{calls:?}");

    // Rotation done: ops-a removed, the agent restarted without it.
    snap.set_config(&format!(
        r#"{{"dms": {{"signing": {{"keys": "{b}", "required": true}}}}}}"#
    ));
    let (out, calls) = snap.configure();
    ok(&out);
    assert_eq!(restarts(&calls), 1, "{calls:?}");

    for bad in [
        r#"{"dms": {"signing": {"keys": "", "required": true}}}"#.to_string(),
        r#"{"dms": {"signing": {"keys": "ops-a:short"}}}"#.to_string(),
        format!(r#"{{"dms": {{"signing": {{"keys": "{a},{a}"}}}}}}"#),
    ] {
        snap.set_config(&bad);
        let (out, calls) = snap.configure();
        assert!(!out.status.success(), "{bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("dms.signing"), "{bad}: {err}");
        assert_eq!(restarts(&calls), 0, "{calls:?}");
    }
}
