//! `iot-agent config`: layering of the four sources, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_iot-agent");

/// A command with a clean environment: no IOT_AGENT_* or SNAP_* from the
/// test runner leaks in.
fn agent(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args);
    c
}

/// A fake `snapctl` (snapctl works only inside a snap) that answers
/// `snapctl get -d KEYS..` with `doc` and records its arguments.
fn fake_snapctl(dir: &Path, doc: &str) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        "#!/bin/sh\necho \"$@\" > '{}'\ncat <<'JSON'\n{doc}\nJSON\n",
        dir.join("snapctl-args").display()
    );
    let path = bin.join("snapctl");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "iot-agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("config --json prints JSON")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn config_json_layers_defaults_file_snap_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "url = \"https://identity.example.com\"\n\
         [snapd]\ntimeout = \"45s\"\n\
         [nats]\nurl = \"nats://file.example:4222\"\n\
         [log]\nlevel = \"warn\"\n",
    )
    .unwrap();
    let bin = fake_snapctl(
        dir.path(),
        r#"{"nats": {"url": "nats://snap.example:4222"}, "log": {"level": "debug"},
            "snaplogger": {"maximum": {"changes": {"keep": 5}}}}"#,
    );
    let out = agent(&["config", "--json", "--config", file.to_str().unwrap()])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("SNAP_NAME", "iot-agent")
        .env("IOT_AGENT_LOG__LEVEL", "error")
        .output()
        .unwrap();
    let v = json(&out);
    let src = |k: &str| v[k]["source"]["kind"].as_str().unwrap().to_string();

    assert_eq!(v["snapd.socket"]["value"], "/run/snapd.socket");
    assert_eq!(src("snapd.socket"), "default");

    assert_eq!(v["snapd.timeout"]["value"], "45s");
    assert_eq!(src("snapd.timeout"), "file");
    assert_eq!(
        v["snapd.timeout"]["source"]["detail"],
        file.to_str().unwrap()
    );
    assert_eq!(v["url"]["value"], "https://identity.example.com");

    // The snap layer beats the file ...
    assert_eq!(v["nats.url"]["value"], "nats://snap.example:4222");
    assert_eq!(src("nats.url"), "snap");
    assert_eq!(v["snaplogger.maximum.changes.keep"]["value"], 5);
    assert_eq!(src("snaplogger.maximum.changes.keep"), "snap");

    // ... and the environment beats both.
    assert_eq!(v["log.level"]["value"], "error");
    assert_eq!(src("log.level"), "env");
    assert_eq!(v["log.level"]["source"]["detail"], "IOT_AGENT_LOG__LEVEL");

    // snapctl was asked for a document of the top-level keys.
    let args = std::fs::read_to_string(dir.path().join("snapctl-args")).unwrap();
    assert!(args.starts_with("get -d "), "{args}");
    for key in ["url", "snapd", "nats", "snaplogger"] {
        assert!(args.split_whitespace().any(|a| a == key), "{args}");
    }
}

#[test]
fn snap_layer_is_read_only_inside_a_snap() {
    let dir = tempfile::tempdir().unwrap();
    let bin = fake_snapctl(dir.path(), r#"{"url": "http://from-snap:1"}"#);
    let out = agent(&["config", "--json"])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .output()
        .unwrap();
    assert_eq!(json(&out)["url"]["value"], "http://localhost:8030");
    assert!(!dir.path().join("snapctl-args").exists());
}

#[test]
fn table_output_names_sources_and_hides_the_password() {
    let out = agent(&["config"])
        .env("IOT_AGENT_NATS__SNAPD__PASSWORD", "hunter2-secret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2-secret"), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("nats.snapd.password"))
        .unwrap();
    assert!(line.contains("IOT_AGENT_NATS__SNAPD__PASSWORD"), "{line}");
    assert!(text.lines().any(|l| l.starts_with("snapd.socket")
        && l.contains("/run/snapd.socket")
        && l.ends_with("built-in default")));
}

#[test]
fn paths_expand_variables_and_default_under_the_data_dir() {
    let out = agent(&["config", "--json"])
        .env("IOT_AGENT_DIRS__DATA", "/srv/agent")
        .env("HOME_FOR_TEST", "/home/x")
        .env("IOT_AGENT_SNAPD__SOCKET", "$HOME_FOR_TEST/snapd.socket")
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(
        v["snaplogger.database.location"]["value"],
        "/srv/agent/changes.db"
    );
    assert_eq!(v["snapd.socket"]["value"], "/home/x/snapd.socket");

    // In a snap, $SNAP_DATA is the snap's own.
    let out = agent(&["config", "--json"])
        .env("SNAP_DATA", "/var/snap/iot-agent/7")
        .env("SNAP_COMMON", "/var/snap/iot-agent/common")
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["dirs.data"]["value"], "/var/snap/iot-agent/7");
    assert_eq!(v["dirs.common"]["value"], "/var/snap/iot-agent/common");
    assert_eq!(
        v["snaplogger.database.location"]["value"],
        "/var/snap/iot-agent/7/changes.db"
    );
}

#[test]
fn invalid_values_stop_with_key_value_and_source() {
    let cases: &[(&str, &str, &str)] = &[
        ("IOT_AGENT_SNAPD__TIMEOUT", "soon", "snapd.timeout"),
        ("IOT_AGENT_URL", "ftp://x", "url"),
        ("IOT_AGENT_NATS__URL", "http://x:1", "nats.url"),
        ("IOT_AGENT_LOG__LEVEL", "loud", "log.level"),
        (
            "IOT_AGENT_SNAPLOGGER__MAXIMUM__CHANGES__KEEP",
            "-5",
            "snaplogger.maximum.changes.keep",
        ),
        (
            "IOT_AGENT_SNAPLOGGER__LOG__CHANGES__STARTUP",
            "maybe",
            "snaplogger.log.changes.startup",
        ),
        ("IOT_AGENT_DIRS__DATA", "relative/dir", "dirs.data"),
        (
            "IOT_AGENT_SNAPLOGGER__DATABASE__LOCATION",
            "$NOT_SET_ANYWHERE/x.db",
            "snaplogger.database.location",
        ),
        ("IOT_AGENT_DMS__VERIFY", "sometimes", "dms.verify"),
        ("IOT_AGENT_DMS__PROTOCOL", "v3", "dms.protocol"),
        ("IOT_AGENT_DMS__CA", "ca.crt", "dms.ca"),
    ];
    for (var, value, key) in cases {
        let out = agent(&["config", "--check"])
            .env(var, value)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{var}={value}: {err}");
        assert!(err.contains(&format!("\"{key}\"")), "{var}: {err}");
        assert!(err.contains(value), "{var}: {err}");
        assert!(err.contains(var), "{var}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A dms.ca given as PEM text that is not a certificate.
    let out = agent(&["config", "--check"])
        .env(
            "IOT_AGENT_DMS__CA",
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("dms.ca") && err.contains("not PEM"), "{err}");
    // `run` refuses too, before doing anything.
    let out = agent(&["run"])
        .env("IOT_AGENT_SNAPD__TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("snapd.timeout"));
}

#[test]
fn bad_files_and_unknown_keys_are_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[snapd\nsocket = ").unwrap();
    let out = agent(&["config", "-c", broken.to_str().unwrap()])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(broken.to_str().unwrap()) && err.contains("TOML"),
        "{err}"
    );

    let wrong_type = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong_type,
        "[snaplogger.maximum.changes]\nkeep = \"lots\"\n",
    )
    .unwrap();
    let out = agent(&["config", "-c", wrong_type.to_str().unwrap()])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("snaplogger.maximum.changes.keep") && err.contains("lots"),
        "{err}"
    );

    let missing = dir.path().join("nope.toml");
    let out = agent(&["config", "-c", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not exist"));

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[snapd]\nsockett = \"/x\"\n").unwrap();
    let out = agent(&["config", "--check", "-c", unknown.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "an unknown key is only a warning");
    let err = stderr(&out);
    assert!(
        err.contains("warning") && err.contains("snapd.sockett"),
        "{err}"
    );
    // --strict (the snap's configure hook) refuses it, naming it.
    let out = agent(&[
        "config",
        "--check",
        "--strict",
        "-c",
        unknown.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unknown configuration key \"snapd.sockett\"")
            && err.contains("snapd.socket, snapd.timeout"),
        "{err}"
    );
}

#[test]
fn snapctl_failure_is_an_error_not_a_silent_default() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("snapctl");
    std::fs::write(
        &path,
        "#!/bin/sh\necho 'error: cannot communicate with server' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = agent(&["config"])
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("SNAP_NAME", "iot-agent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("snapctl") && err.contains("cannot communicate"),
        "{err}"
    );
}

#[test]
fn version_prints_the_package_version() {
    let out = agent(&["version"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("iot-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A secret that does not validate (a numeric password from `snap set`, a
/// table in a file) is named by key and source, never by value: the
/// configure hook's output lands in snapd's task log.
#[test]
fn invalid_secrets_are_never_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[export.upstream.password]\nsecret = \"table-secret-9731\"\n",
    )
    .unwrap();
    /// Arguments, an environment variable, the secret, its key.
    type Case<'a> = (Vec<&'a str>, Option<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["config", "--check"],
            Some(("IOT_AGENT_NATS__SNAPD__PASSWORD", "84736251")),
            "84736251",
            "nats.snapd.password",
        ),
        (
            vec!["config", "--check", "-c", file.to_str().unwrap()],
            None,
            "table-secret-9731",
            "export.upstream.password",
        ),
    ];
    for (args, env, secret, key) in cases {
        let mut c = agent(&args);
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let all = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
        assert_eq!(out.status.code(), Some(1), "{all}");
        assert!(all.contains(key), "{all}");
        assert!(!all.contains(secret), "the secret was echoed: {all}");
    }
}
