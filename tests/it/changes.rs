//! The change history, the change logger and the watchdog, end to end: the
//! `iot-agent` binary against the snapd double (stuck changes, notices,
//! faults) and against a real snapd (its seed change and a failed install).
//!
//! The watchdog's reboot is always a command that records its call into a
//! file: no test may reboot a real snapd or the host.

use crate::common::agent_proc::{run_once, AgentProcess};
use crate::common::servers::{free_port, RealSnapd};
use crate::common::snapd_double::{parse_rfc3339, rfc3339, Fault, SnapdDouble};
use iot_agent::subsystems::changes::Store;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn ago(d: Duration) -> String {
    rfc3339(now_nanos() - d.as_nanos())
}

/// The double's change ids, oldest spawn first (the CLI's order). The
/// double starts with its seed change, "1", like a real snapd.
fn double_ids_by_spawn(d: &SnapdDouble) -> Vec<String> {
    let mut all: Vec<(u128, String)> = d
        .changes()
        .iter()
        .map(|c| {
            (
                parse_rfc3339(c["spawn-time"].as_str().unwrap()).unwrap(),
                c["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    all.sort();
    all.into_iter().map(|(_, id)| id).collect()
}

/// Where the recording reboot command appends the stuck change's id.
fn reboots_file(dir: &Path) -> PathBuf {
    dir.join("reboots.log")
}

fn reboots(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(reboots_file(dir))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn env_for(dir: &Path, socket: &Path) -> Vec<(&'static str, String)> {
    vec![
        (
            "IOT_AGENT_DIRS__DATA",
            dir.join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.join("common").display().to_string(),
        ),
        ("IOT_AGENT_SNAPD__SOCKET", socket.display().to_string()),
        // Nothing listens on either: enrollment and NATS retry quietly.
        ("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port())),
        (
            "IOT_AGENT_NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        ),
        (
            "IOT_AGENT_WATCHDOG__REBOOT__COMMAND",
            format!(
                "echo \"$IOT_AGENT_STUCK_CHANGE\" >> '{}'",
                reboots_file(dir).display()
            ),
        ),
        // The host may have booted minutes ago.
        ("IOT_AGENT_WATCHDOG__BOOT__GRACE", "0s".to_string()),
    ]
}

fn with(
    mut env: Vec<(&'static str, String)>,
    k: &'static str,
    v: &str,
) -> Vec<(&'static str, String)> {
    env.push((k, v.to_string()));
    env
}

/// The first line with `text` that also contains `tag`, seen already or
/// waited for (subsystems log independently: their order is not fixed).
fn wait_for_with(agent: &mut AgentProcess, text: &str, tag: &str) -> String {
    if let Some(line) = agent
        .seen
        .iter()
        .find(|l| l.contains(text) && l.contains(tag))
    {
        return line.clone();
    }
    loop {
        let line = agent.wait_for(text);
        if line.contains(tag) {
            return line;
        }
    }
}

/// Returns at once when a line with `text` was already seen, else waits:
/// for lines of independent subsystems whose order is not fixed.
fn seen_or_wait(agent: &mut AgentProcess, text: &str) {
    if agent.count(text) == 0 {
        agent.wait_for(text);
    }
}

/// Waits for a change logger line about change `id` (`id=N` as logged).
fn wait_for_change(agent: &mut AgentProcess, text: &str, id: &str) -> String {
    wait_for_with(agent, text, &format!("id={id} "))
}

fn stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "iot-agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_ids(out: &std::process::Output) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&stdout(out)).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_change_is_reported_and_reboots_once_even_across_restarts() {
    let d = SnapdDouble::start().await;
    let done = d.add_change(
        "install-snap",
        "Install \"a\" snap",
        "Done",
        &ago(Duration::from_secs(600)),
    );
    let failed = d.add_change(
        "refresh-snap",
        "Refresh \"b\" snap",
        "Error",
        &ago(Duration::from_secs(300)),
    );
    // Retries forever on a device without serial: ignored by default.
    let operational = d.add_change(
        "become-operational",
        "Initialize device",
        "Doing",
        &ago(Duration::from_secs(2 * 86_400)),
    );
    let stuck = d.add_change(
        "install-snap",
        "Install \"stuck\" snap",
        "Doing",
        &ago(Duration::ZERO),
    );
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        env_for(dir.path(), &d.socket()),
        "IOT_AGENT_WATCHDOG__THRESHOLD",
        "2s",
    );

    let mut agent = AgentProcess::start(&env);
    let line = wait_for_with(
        &mut agent,
        "snap change stuck; rebooting the device",
        &format!("change={stuck} "),
    );
    assert!(line.contains("past the watchdog threshold of 2s"), "{line}");
    seen_or_wait(&mut agent, "reboot command ran");
    assert_eq!(reboots(dir.path()), std::slice::from_ref(&stuck));

    // The report: every change snapd knows, with its tasks.
    let report_path = dir.path().join(format!("data/snap_changes_{stuck}.json"));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["stuck-change"], stuck.as_str());
    let mut reported: Vec<String> = report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(!c["tasks"].as_array().unwrap().is_empty(), "{c}");
            c["id"].as_str().unwrap().to_string()
        })
        .collect();
    reported.sort();
    let mut all = double_ids_by_spawn(&d);
    all.sort();
    assert_eq!(reported, all);
    assert!([&done, &failed, &operational]
        .iter()
        .all(|id| all.contains(id)));
    assert!(!dir
        .path()
        .join(format!("data/snap_changes_{operational}.json"))
        .exists());

    agent.signal("TERM");
    assert!(agent.wait_exit().success());
    assert_eq!(
        reboots(dir.path()),
        std::slice::from_ref(&stuck),
        "called exactly once"
    );
    assert_eq!(agent.count("panicked"), 0);

    // After the "reboot" the change is still stuck: never a second reboot.
    let mut agent = AgentProcess::start(&env);
    wait_for_with(
        &mut agent,
        "already caused a reboot; not rebooting again",
        &format!("change={stuck} "),
    );
    seen_or_wait(&mut agent, "change history in step with snapd");
    assert_eq!(
        agent.count("snap change seen"),
        0,
        "no change logged twice: {:?}",
        agent.seen
    );

    // The CLI reads the history while the daemon runs.
    let table = stdout(&run_once(&["changes"], &env));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("Status") && lines[0].contains("Summary"),
        "{table}"
    );
    assert_eq!(lines.len(), 1 + d.changes().len(), "{table}");
    // Oldest first, like `snap changes`.
    assert!(lines[1].starts_with(&format!("{operational} ")), "{table}");
    let stuck_row = lines
        .iter()
        .find(|l| l.starts_with(&format!("{stuck} ")))
        .unwrap();
    assert!(
        stuck_row.contains("Doing") && stuck_row.contains("Install \"stuck\" snap"),
        "{table}"
    );
    assert_eq!(
        json_ids(&run_once(&["changes", "--json", "--status", "doing"], &env)),
        [operational.clone(), stuck.clone()]
    );
    assert_eq!(
        json_ids(&run_once(
            &[
                "changes",
                "--json",
                "--since",
                "1h",
                "--kind",
                "install-snap"
            ],
            &env
        )),
        [done.clone(), stuck.clone()]
    );
    let shown = stdout(&run_once(&["changes", "show", &failed], &env));
    assert!(shown.contains("status:     Error"), "{shown}");
    assert!(shown.contains("Status  Spawn"), "tasks table: {shown}");
    assert!(
        shown.contains("ERROR simulated failure"),
        "task log: {shown}"
    );
    let missing = run_once(&["changes", "show", "999"], &env);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not in the history"));

    agent.signal("TERM");
    assert!(agent.wait_exit().success());
    assert_eq!(reboots(dir.path()), [stuck], "not again after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_keeps_the_newest_logs_at_start_and_when_ready_and_survives_snapd_faults() {
    let d = SnapdDouble::start().await;
    d.set_notices_supported(true);
    for age_h in [72, 71, 3, 2, 1] {
        d.add_change(
            "install-snap",
            &format!("Install {age_h}"),
            "Done",
            &ago(Duration::from_secs(age_h * 3600)),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        env_for(dir.path(), &d.socket()),
        "IOT_AGENT_SNAPLOGGER__MAXIMUM__CHANGES__KEEP",
        "3",
    );

    let mut agent = AgentProcess::start(&env);
    let line = agent.wait_for("snap changes of the last 24 hours");
    // The double's seed change (spawned now) and the three of the last hours.
    assert!(line.contains("count=4"), "{line}");
    agent.wait_for("change history in step with snapd");
    assert_eq!(agent.count("snap change seen"), 0, "{:?}", agent.seen);

    // A new change: seen when it appears, ready when it is (notices wake
    // the poller; the default interval of 1h would never get there).
    let live = d.add_change(
        "refresh-snap",
        "Refresh \"c\" snap",
        "Doing",
        &ago(Duration::ZERO),
    );
    wait_for_change(&mut agent, "snap change seen", &live);
    // snapd fails for a while; the change finishes meanwhile (its notice
    // wakes the poller, whose read then fails).
    d.set_fault(Some(Fault::Status500));
    d.set_change_status(&live, "Done");
    wait_for_with(&mut agent, "subsystem failed; restarting", "change-poller");
    d.set_fault(None);
    wait_for_change(&mut agent, "snap change ready", &live);
    assert_eq!(
        agent.count(&format!("id={live} ")),
        2,
        "seen once, ready once"
    );

    // The keep limit: the 3 newest, oldest removed first.
    let ids = json_ids(&run_once(&["changes", "--json"], &env));
    let all = double_ids_by_spawn(&d);
    assert_eq!(ids, all[all.len() - 3..]);
    agent.signal("TERM");
    assert!(agent.wait_exit().success());

    // Startup logging off, change logger at warn: only failures are logged.
    let env = with(env, "IOT_AGENT_SNAPLOGGER__LOG__CHANGES__STARTUP", "false");
    let env = with(env, "IOT_AGENT_SNAPLOGGER__LOG__LEVEL", "warn");
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("change history in step with snapd");
    let ok = d.add_change(
        "refresh-snap",
        "Refresh \"ok\" snap",
        "Doing",
        &ago(Duration::ZERO),
    );
    let bad = d.add_change(
        "refresh-snap",
        "Refresh \"bad\" snap",
        "Doing",
        &ago(Duration::ZERO),
    );
    d.set_change_status(&ok, "Done");
    d.set_change_error(&bad, "no space left");
    let line = wait_for_change(&mut agent, "snap change", &bad);
    assert!(
        line.contains("WARN") && line.contains("no space left"),
        "{line}"
    );
    assert_eq!(agent.count("snap change"), 1, "{:?}", agent.seen);
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_database_is_reported_while_the_rest_runs_and_the_watchdog_still_works() {
    let d = SnapdDouble::start().await;
    let stuck = d.add_change(
        "install-snap",
        "Install \"x\" snap",
        "Doing",
        &ago(Duration::from_secs(3600)),
    );
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("data/changes.db");
    std::fs::create_dir_all(db.parent().unwrap()).unwrap();
    std::fs::write(&db, vec![0x42u8; 16384]).unwrap();
    let env = with(
        env_for(dir.path(), &d.socket()),
        "IOT_AGENT_WATCHDOG__THRESHOLD",
        "2s",
    );

    let mut agent = AgentProcess::start(&env);
    let line = wait_for_with(&mut agent, "subsystem failed; restarting", "change-history");
    assert!(
        line.contains("corrupt") && line.contains("move it aside"),
        "{line}"
    );
    seen_or_wait(&mut agent, "snapd is reachable");
    // Without its database the watchdog remembers by the report file.
    wait_for_with(
        &mut agent,
        "snap change stuck; rebooting the device",
        &format!("change={stuck} "),
    );
    seen_or_wait(&mut agent, "reboot command ran");
    assert_eq!(reboots(dir.path()), std::slice::from_ref(&stuck));

    // The operator moves the file aside: the history recovers by itself.
    std::fs::rename(&db, dir.path().join("data/changes.db.corrupt")).unwrap();
    agent.wait_for("change history open");
    agent.wait_for("change history in step with snapd");
    let ids = json_ids(&run_once(&["changes", "--json"], &env));
    assert_eq!(ids, double_ids_by_spawn(&d));
    assert!(ids.contains(&stuck));
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
    assert_eq!(reboots(dir.path()), [stuck]);
}

#[test]
fn an_older_schema_is_upgraded_in_place_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.db");
    {
        // A database as the first version of the agent left it.
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(include_str!("../../migrations/changes/0001_history.sql"))
            .unwrap();
        c.execute_batch("PRAGMA user_version = 1").unwrap();
        c.execute(
            "INSERT INTO changes (id, kind, summary, status, ready, spawn_time, spawn_ns, \
             ready_time, err, body, first_seen, updated) VALUES ('7', 'install-snap', \
             'Install \"old\" snap', 'Done', 1, '2025-01-02T03:04:05Z', 1735787045000000000, \
             '2025-01-02T03:05:05Z', NULL, ?1, '2025-01-02T03:04:06Z', '2025-01-02T03:05:06Z')",
            [serde_json::json!({"id": "7", "kind": "install-snap", "summary": "Install \"old\" snap",
                "status": "Done", "ready": true, "spawn-time": "2025-01-02T03:04:05Z",
                "ready-time": "2025-01-02T03:05:05Z", "tasks": []})
            .to_string()],
        )
        .unwrap();
    }
    let env = vec![
        ("IOT_AGENT_DIRS__DATA", dir.path().display().to_string()),
        ("IOT_AGENT_DIRS__COMMON", dir.path().display().to_string()),
    ];
    // The CLI reads an old schema as it is.
    assert_eq!(json_ids(&run_once(&["changes", "--json"], &env)), ["7"]);

    let store = Store::open(&path).unwrap();
    assert!(
        !store.rebooted_for("7").unwrap(),
        "the version-2 table exists"
    );
    assert_eq!(
        store.list(&Default::default()).unwrap()[0].summary,
        "Install \"old\" snap"
    );
    drop(store);
    let version: u32 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        version,
        iot_agent::db::latest(iot_agent::subsystems::changes::store::MIGRATIONS)
    );

    // A newer agent's database: refused with advice, never rewritten.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    let out = run_once(&["changes"], &env);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("newer iot-agent") && err.contains("99"),
        "{err}"
    );
    assert!(Store::open(&path).is_err());
}

#[test]
fn the_cli_says_when_there_is_no_history_yet() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        ("IOT_AGENT_DIRS__DATA", dir.path().display().to_string()),
        ("IOT_AGENT_DIRS__COMMON", dir.path().display().to_string()),
    ];
    let out = run_once(&["changes"], &env);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist yet") && err.contains("snaplogger.database.location"),
        "{err}"
    );
    let out = run_once(&["changes", "--since", "soon"], &env);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --since \"soon\""));
}

/// A snap whose base is not installed: snapd accepts the file, then fails
/// the change when it cannot fetch the base from the (dead) store.
fn snap_needing_a_base(dir: &Path) -> Vec<u8> {
    let root = dir.join("snap");
    std::fs::create_dir_all(root.join("meta")).unwrap();
    std::fs::write(
        root.join("meta/snap.yaml"),
        "name: needs-base\nversion: \"1.0\"\nsummary: t\ndescription: t\nbase: core22\n",
    )
    .unwrap();
    let file = dir.join("needs-base.snap");
    let ok = std::process::Command::new("mksquashfs")
        .arg(&root)
        .arg(&file)
        .args(["-noappend", "-all-root", "-no-xattrs", "-quiet"])
        .status()
        .expect("mksquashfs (squashfs-tools) is needed: scripts/test installs it");
    assert!(ok.success());
    std::fs::read(file).unwrap()
}

fn sideload_request(snap: &[u8]) -> iot_agent::snapd::Request {
    const BOUNDARY: &str = "iotagenttestboundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"dangerous\"\r\n\r\ntrue\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"snap\"; filename=\"needs-base.snap\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
    );
    body.extend_from_slice(snap);
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    iot_agent::snapd::Request {
        method: http::Method::POST,
        path: "/v2/snaps".into(),
        body: Some(body.into()),
        content_type: Some("multipart/form-data; boundary=iotagenttestboundary"),
        timeout: None,
    }
}

#[test]
fn a_real_snapd_history_records_its_seed_and_a_failed_install() {
    let snapd = RealSnapd::start();
    // Where snapd spools an uploaded snap (a packaged snapd ships it).
    std::fs::create_dir_all(snapd.root().join("var/lib/snapd/snaps")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // snapd 2.57 has no notices: a new change is found by the next read.
    let env = with(
        env_for(dir.path(), &snapd.socket()),
        "IOT_AGENT_SNAPLOGGER__DURATION__BETWEEN__CHECKS",
        "1s",
    );
    let mut agent = AgentProcess::start(&env);
    let line = wait_for_change(&mut agent, "snap change", "1");
    assert!(
        line.contains("kind=seed") && line.contains("status=Done"),
        "{line}"
    );
    agent.wait_for("change history in step with snapd");

    // The file is accepted at once; the change fails when snapd gives up
    // fetching the base from the dead store.
    // (A plain store install fails in the request itself, before snapd
    // makes a change: there is nothing for a history to record.)
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = iot_agent::snapd::Client::new(snapd.socket(), Duration::from_secs(30));
    let snap = snap_needing_a_base(dir.path());
    let answer = rt.block_on(client.call(&sideload_request(&snap))).unwrap();
    let id = answer.change.expect("an async answer with a change id");

    wait_for_change(&mut agent, "snap change seen", &id);
    // snapd first spends ~30 s on its catalog refresh against the dead
    // store, then ~30 s on fetching the base: wait longer than usual.
    let line = loop {
        let line = agent.wait_for_within("snap change ready", Duration::from_secs(150));
        if line.contains(&format!("id={id} ")) {
            break line;
        }
    };
    assert!(
        line.contains("status=Error") && line.contains("core22"),
        "{line}"
    );
    let out = run_once(&["changes", "--json"], &env);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let list = v.as_array().unwrap();
    let seed = list.iter().find(|c| c["id"] == "1").expect("seed change");
    assert_eq!(
        (seed["kind"].as_str(), seed["status"].as_str()),
        (Some("seed"), Some("Done"))
    );
    assert!(!seed["tasks"].as_array().unwrap().is_empty());
    let install = list
        .iter()
        .find(|c| c["id"] == id.as_str())
        .expect("install change");
    assert_eq!(install["kind"], "install-snap");
    assert_eq!(install["status"], "Error");
    assert!(
        install["err"]
            .as_str()
            .unwrap()
            .contains("cannot install snap base"),
        "{install}"
    );
    let table = stdout(&run_once(&["changes", "--status", "Error"], &env));
    assert!(
        table.contains("install-snap") && table.contains("needs-base"),
        "{table}"
    );
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
    assert!(reboots(dir.path()).is_empty(), "nothing is stuck past 1h");
}

#[test]
fn watchdog_ignore_is_a_list_from_toml_env_or_comma_separated_text() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[watchdog]\nignore = [\"x\", \"y\"]\n").unwrap();
    let base = vec![("IOT_AGENT_DIRS__DATA", dir.path().display().to_string())];
    let value = |args: &[&str], env: &[(&str, String)]| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&stdout(&run_once(args, env))).unwrap();
        v["watchdog.ignore"]["value"].clone()
    };
    let f = file.display().to_string();
    assert_eq!(
        value(&["config", "--json"], &base),
        serde_json::json!(["become-operational"])
    );
    assert_eq!(
        value(&["-c", &f, "config", "--json"], &base),
        serde_json::json!(["x", "y"])
    );
    let env = with(base, "IOT_AGENT_WATCHDOG__IGNORE", "a, b");
    assert_eq!(
        value(&["config", "--json"], &env),
        serde_json::json!(["a", "b"])
    );
}

/// The default reboot goes to snapd (`POST /v2/systems {"action":"reboot"}`):
/// checked against the double only, which counts reboots and does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_the_watchdog_asks_snapd_to_reboot() {
    let d = SnapdDouble::start().await;
    let stuck = d.add_change(
        "install-snap",
        "Install \"x\" snap",
        "Doing",
        &ago(Duration::from_secs(7200)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = iot_agent::config::Config::default();
    config.dirs.data = iot_agent::config::ExpandPath::new(&dir.path().display().to_string());
    config.snaplogger.database.location =
        iot_agent::config::ExpandPath::new(&dir.path().join("changes.db").display().to_string());
    assert!(config.watchdog.reboot.command.is_empty());
    config.watchdog.threshold = iot_agent::config::Duration::from_secs(1);
    config.watchdog.boot.grace = iot_agent::config::Duration::from_secs(0);
    let snapd = iot_agent::snapd::Client::new(d.socket(), Duration::from_secs(5));
    let poller = std::sync::Arc::new(iot_agent::subsystems::changes::Poller::new(
        snapd.clone(),
        Duration::from_secs(3600),
    ));
    let watchdog = std::sync::Arc::new(iot_agent::subsystems::changes::Watchdog::from_config(
        &config,
        snapd,
        poller.subscribe(),
    ));
    let stop = tokio_util::sync::CancellationToken::new();
    let p = poller.clone();
    let t = stop.clone();
    use iot_agent::supervisor::Subsystem;
    let polling = tokio::spawn(async move { p.run(t.into()).await });
    let watching = tokio::spawn(watchdog.clone().run(stop.clone().into()));

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while d.reboots() == 0 {
        assert!(std::time::Instant::now() < deadline, "no reboot asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dir
        .path()
        .join(format!("snap_changes_{stuck}.json"))
        .exists());
    stop.cancel();
    polling.await.unwrap().unwrap();
    watching.await.unwrap().unwrap();
    assert_eq!(d.reboots(), 1);
    // Remembered in the database too.
    assert!(Store::open(&dir.path().join("changes.db"))
        .unwrap()
        .rebooted_for(&stuck)
        .unwrap());
}

/// snapd's auto-refresh retries make new change ids: after the one reboot
/// of the budget (`watchdog.budget.reboots` 1 per 24h by default), a new
/// stuck change does not reboot the device again, not even after an agent
/// restart; the hold is logged at ERROR and published on NATS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reboot_budget_holds_back_new_change_ids_across_restarts() {
    use crate::common::servers::{NatsConfig, NatsServer, NatsUser};
    use futures::StreamExt;
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", "wd-pw")],
        ..Default::default()
    });
    let nc = async_nats::ConnectOptions::with_user_and_password("snapd".into(), "wd-pw".into())
        .connect(nats.url())
        .await
        .unwrap();
    let mut events = nc.subscribe("iot.agent.watchdog.events").await.unwrap();
    nc.flush().await.unwrap();
    let d = SnapdDouble::start().await;
    let first = d.add_change(
        "auto-refresh",
        "Auto-refresh \"k\"",
        "Doing",
        &ago(Duration::ZERO),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut env = with(
        env_for(dir.path(), &d.socket()),
        "IOT_AGENT_WATCHDOG__THRESHOLD",
        "2s",
    );
    env.retain(|(k, _)| *k != "IOT_AGENT_NATS__URL");
    env.push(("IOT_AGENT_NATS__URL", nats.url()));
    env.push(("IOT_AGENT_NATS__SNAPD__PASSWORD", "wd-pw".into()));

    let mut agent = AgentProcess::start(&env);
    agent.wait_for("reboot command ran");
    assert_eq!(reboots(dir.path()), std::slice::from_ref(&first));
    // The "reboot": the agent stops and starts again.
    agent.signal("TERM");
    assert!(agent.wait_exit().success());

    // The refresh gave up; snapd retries it as a new change, stuck again.
    d.set_change_status(&first, "Error");
    let retry = d.add_change(
        "auto-refresh",
        "Auto-refresh \"k\"",
        "Doing",
        &ago(Duration::ZERO),
    );
    let mut agent = AgentProcess::start(&env);
    let line = wait_for_with(&mut agent, "reboot held back", &format!("change={retry} "));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("1 reboot(s) in the last 1day"), "{line}");
    let event = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .expect("no watchdog event")
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(v["event"], "reboot-held");
    assert_eq!(v["reason"], "reboot-budget");
    assert_eq!(v["change"], retry.as_str());
    assert!(v["retry-after-s"].as_u64().unwrap() > 23 * 3600, "{v}");
    agent.signal("TERM");
    assert!(agent.wait_exit().success());

    // A restart does not reset the budget.
    let mut agent = AgentProcess::start(&env);
    wait_for_with(&mut agent, "reboot held back", &format!("change={retry} "));
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
    assert_eq!(reboots(dir.path()), [first], "one reboot in all");
}

/// A change that keeps moving (a large download: its task's `done`
/// grows) is not stuck however long it runs, even spawned days ago; once
/// it stops moving for the threshold, it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_that_makes_progress_is_not_stuck_however_long_it_runs() {
    let d = SnapdDouble::start().await;
    let slow = d.add_change(
        "install-snap",
        "Install \"big\" snap",
        "Doing",
        &ago(Duration::from_secs(2 * 86_400)),
    );
    let dir = tempfile::tempdir().unwrap();
    let env = with(
        env_for(dir.path(), &d.socket()),
        "IOT_AGENT_WATCHDOG__THRESHOLD",
        "2s",
    );
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("change watchdog on");
    // Three thresholds' worth of progress; the agent looks at least twice.
    for done in 1..=30u64 {
        d.set_task_progress(&slow, done * 1000, 1_000_000);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    seen_or_wait(&mut agent, "made progress since the last look");
    assert!(reboots(dir.path()).is_empty(), "rebooted while it moved");
    assert_eq!(agent.count("rebooting the device"), 0);
    // Now it stops.
    agent.wait_for("reboot command ran");
    assert_eq!(reboots(dir.path()), [slow]);
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}
