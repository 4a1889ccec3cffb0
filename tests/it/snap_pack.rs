//! The snap's metadata: `meta/snap.yaml` as generated agrees with
//! `snap/snapcraft.yaml` and with the packaging spec, drift between them is
//! caught, and the laid-out tree passes snapd's own skeleton check and the
//! tree check `scripts/snap-pack` runs on the packed file.

use crate::snap_tool as snap;
use serde_norway::Value;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_iot-agent");

fn snapcraft_yaml() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("snap/snapcraft.yaml")).unwrap()
}

fn generated() -> String {
    snap::generate(&snapcraft_yaml(), snap::snap_arch().unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn generated_snap_yaml_agrees_with_snapcraft_yaml_and_the_spec() {
    let meta = generated();
    let drift = snap::disagreements(&snapcraft_yaml(), &meta).unwrap();
    assert!(drift.is_empty(), "{drift:#?}");

    let m: Value = serde_norway::from_str(&meta).unwrap();
    assert_eq!(m["name"], "iot-agent");
    assert_eq!(
        m["version"],
        env!("CARGO_PKG_VERSION"),
        "snap vs Cargo.toml"
    );
    assert_eq!(m["confinement"], "strict");
    assert_eq!(m["base"], "core24");
    assert_eq!(
        strings(&m["architectures"]),
        [snap::snap_arch().unwrap().to_string()]
    );
    assert!(m.get("parts").is_none(), "build-only keys stay out");

    let agent = &m["apps"]["agent"];
    assert_eq!(agent["command"], "bin/iot-agent run");
    assert_eq!(agent["daemon"], "simple");
    assert_eq!(
        strings(&agent["plugs"]),
        ["network", "network-bind", "snapd-control", "shutdown"]
    );
    assert_eq!(
        m["apps"]["unregister"]["command"],
        "bin/iot-agent unregister"
    );
    assert!(m["apps"]["unregister"].get("daemon").is_none());
    // The operators' command line, `iot-agent` on the device.
    let cli = &m["apps"]["iot-agent"];
    assert_eq!(cli["command"], "bin/iot-agent");
    assert!(cli.get("daemon").is_none());
    assert_eq!(strings(&cli["plugs"]), ["network", "snapd-control"]);
    // The bundled NATS server: a second daemon, started before the agent.
    let nats = &m["apps"]["nats"];
    assert_eq!(nats["command"], "bin/iot-agent nats-server");
    assert_eq!(nats["daemon"], "simple");
    assert_eq!(strings(&nats["before"]), ["agent"]);
    assert_eq!(strings(&nats["plugs"]), ["network", "network-bind"]);
    let apps: Vec<_> = m["apps"].as_mapping().unwrap().keys().collect();
    // The relay: a daemon installed stopped, and its command line.
    let relay = &m["apps"]["relay"];
    assert_eq!(relay["command"], "bin/iot-relay run");
    assert_eq!(relay["install-mode"], "disable");
    assert_eq!(m["apps"]["iot-relay"]["command"], "bin/iot-relay");
    assert_eq!(apps.len(), 6, "{apps:?}");
    // Other snaps get the device user's credentials through a content slot.
    let slot = &m["slots"]["nats-device"];
    assert_eq!(slot["interface"], "content");
    assert_eq!(strings(&slot["read"]), ["$SNAP_DATA/nats/device"]);
    // nats-server comes from Debian's package, as stage-packages would.
    let staged = snap::staged_files(&snapcraft_yaml()).unwrap();
    assert!(
        staged
            .iter()
            .any(|f| f.package == "nats-server" && f.path == "usr/sbin/nats-server"),
        "{staged:?}"
    );

    let hooks = snap::hook_names(&Path::new(ROOT).join("snap/hooks")).unwrap();
    assert_eq!(hooks, ["configure"]);
}

#[test]
fn drift_between_snapcraft_yaml_and_snap_yaml_is_caught() {
    let project = snapcraft_yaml();
    let meta = generated();

    // snapcraft.yaml gains a plug that the packed snap.yaml lacks.
    let more_plugs = project.replace(
        "      - shutdown\n",
        "      - shutdown\n      - hardware-observe\n",
    );
    assert_ne!(more_plugs, project);
    let drift = snap::disagreements(&more_plugs, &meta).unwrap();
    assert!(
        drift
            .iter()
            .any(|d| d.contains("agent plugs") && d.contains("hardware-observe")),
        "{drift:#?}"
    );

    // snap.yaml changed by hand: another daemon type, an extra app, a
    // build-only key, and a missing summary.
    let edited = meta
        .replace("daemon: simple", "daemon: forking")
        .replace("summary: ", "title: ")
        + "parts: {}\n";
    let edited = edited.replace(
        "apps:\n",
        "apps:\n  debug:\n    command: bin/iot-agent config\n",
    );
    let drift = snap::disagreements(&project, &edited).unwrap().join("\n");
    for want in [
        "app agent daemon: snapcraft.yaml has simple, meta/snap.yaml has forking",
        "meta/snap.yaml has app debug",
        "build-only key parts",
        "meta/snap.yaml lacks summary",
        "meta/snap.yaml has title",
    ] {
        assert!(drift.contains(want), "{want:?} not in:\n{drift}");
    }

    // The bundled NATS daemon or the content slot dropped from snap.yaml.
    let start = meta.find("  nats:\n").unwrap();
    let end = start + meta[start..].find("  unregister:\n").unwrap();
    let no_nats = format!("{}{}", &meta[..start], &meta[end..]);
    let no_slot = meta.replace("interface: content", "interface: dbus");
    let drift = snap::disagreements(&project, &no_nats).unwrap().join("\n");
    assert!(drift.contains("meta/snap.yaml lacks app nats"), "{drift}");
    let drift = snap::disagreements(&project, &no_slot).unwrap().join("\n");
    assert!(drift.contains("slots:"), "{drift}");

    // A key the generator does not know fails loudly instead of being
    // left out of the snap.
    let app_key = project.replace(
        "    daemon: simple\n",
        "    daemon: simple\n    environment:\n      RUST_BACKTRACE: '1'\n",
    );
    let err = snap::generate(&app_key, "amd64").unwrap_err();
    assert!(
        err.contains("app agent") && err.contains("environment"),
        "{err}"
    );
    let top_key = format!("{project}layout:\n  /etc/x:\n    bind: $SNAP_DATA/x\n");
    let err = snap::generate(&top_key, "amd64").unwrap_err();
    assert!(err.contains("layout"), "{err}");
}

#[test]
fn laid_out_tree_passes_snapds_skeleton_check_and_the_tree_check() {
    let dir = tempfile::tempdir().unwrap();
    let prime = dir.path().join("prime");
    let src = snap::Sources::of_project(Path::new(ROOT), Path::new(BIN));
    snap::layout(&src, &prime).unwrap();

    // snapd's validation of snap.yaml, apps' commands and hooks.
    let out = Command::new("snap")
        .args(["pack", "--check-skeleton"])
        .arg(&prime)
        .output()
        .expect("`snap` is missing: scripts/setup installs snapd");
    assert!(
        out.status.success(),
        "snap pack --check-skeleton: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let checked = snap::check_tree(&src, &prime).unwrap().join("\n");
    for want in [
        "meta/snap.yaml agrees",
        "app agent (daemon: simple): bin/iot-agent run; plugs: network, network-bind, snapd-control, shutdown",
        "app unregister: bin/iot-agent unregister",
        "app nats (daemon: simple): bin/iot-agent nats-server; plugs: network, network-bind",
        "usr/sbin/nats-server (staged from package nats-server)",
        "accepts the configuration bin/iot-agent nats-config generates",
        "hook configure: meta/hooks/configure -> snap/hooks/configure",
        "prints \"iot-agent ",
        "app relay (daemon: simple): bin/iot-relay run; plugs: network, network-bind",
        "prints \"iot-relay ",
    ] {
        assert!(checked.contains(want), "{want:?} not in:\n{checked}");
    }

    // A broken tree is refused, every problem named.
    use std::os::unix::fs::PermissionsExt;
    let hook = prime.join("snap/hooks/configure");
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o644)).unwrap();
    let meta = prime.join("meta/snap.yaml");
    let text = std::fs::read_to_string(&meta).unwrap();
    std::fs::write(&meta, text.replace("    - shutdown\n", "")).unwrap();
    std::fs::write(prime.join("bin/iot-agent"), "#!/bin/sh\necho iot-agent 0\n").unwrap();
    std::fs::write(prime.join("usr/sbin/nats-server"), "not the package's").unwrap();
    let err = snap::check_tree(&src, &prime).unwrap_err();
    for want in [
        "meta/snap.yaml differs from the one generated",
        "app agent plugs",
        "hook configure:",
        "bin/iot-agent is not an ELF executable",
        "usr/sbin/nats-server differs from package nats-server's",
    ] {
        assert!(err.contains(want), "{want:?} not in:\n{err}");
    }
}
