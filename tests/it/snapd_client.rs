//! The snapd client against a real snapd (what a container can do) and the
//! stateful double (the rest), plus sockets that misbehave.

use crate::common::servers::RealSnapd;
use crate::common::snapd_double::{ChangeMode, Fault, SnapdDouble};
use iot_agent::snapd::{
    ChangeSelect, Client, CreateUser, Error, ErrorKind, RetryPolicy, SnapAction, SnapName, Status,
};
use std::time::Duration;

fn client(socket: &std::path::Path) -> Client {
    Client::new(socket, Duration::from_secs(10))
}

fn name(s: &str) -> SnapName {
    SnapName::parse(s).unwrap()
}

#[tokio::test]
async fn reads_system_info_snaps_changes_and_model_from_a_real_snapd() {
    let snapd = RealSnapd::start();
    let c = client(&snapd.socket());

    let info = c.system_info().await.unwrap();
    assert_eq!(info.series, "16");
    assert!(info.on_classic);
    assert!(!info.version.is_empty());

    assert!(
        c.snaps().await.unwrap().is_empty(),
        "a fresh snapd has no snaps"
    );

    let changes = c.changes(ChangeSelect::All, None).await.unwrap();
    let seed = changes
        .iter()
        .find(|ch| ch.kind == "seed")
        .expect("seed change");
    assert_eq!(seed.status, Status::Done);
    assert!(seed.ready && !seed.tasks.is_empty());
    assert_eq!(c.change(&seed.id).await.unwrap().id, seed.id);

    let model = c.model().await.unwrap();
    let parsed = iot_agent::snapd::Assertion::parse(&model).unwrap();
    assert_eq!(parsed.kind(), "model");
    assert_eq!(parsed.header("model"), Some("generic-classic"));
    let listed = c.assertions("model", &[]).await.unwrap();
    assert_eq!(listed.len(), 1);

    // An unregistered classic machine has no serial: None, not an error.
    assert_eq!(c.serial().await.unwrap(), None);
}

#[tokio::test]
async fn real_snapd_errors_arrive_with_their_kinds() {
    let snapd = RealSnapd::start();
    let c = client(&snapd.socket());

    let err = c.snap(&name("hello-world")).await.unwrap_err();
    assert_eq!(err.kind(), Some(&ErrorKind::SnapNotFound), "{err}");

    // The store is a dead loopback port: an install fails (after snapd's
    // own retries, about 30 s) with snapd's error, not a hang.
    let patient = Client::new(snapd.socket(), Duration::from_secs(120));
    let err = patient
        .snap_action(&name("hello-world"), &SnapAction::new("install"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Api { .. }), "{err}");

    let err = c.change("999999").await.unwrap_err();
    assert!(matches!(err, Error::Api { status: 404, .. }), "{err}");

    let err = c.apps(&["no-such-snap"], true).await.unwrap_err();
    // snapd says which name it did not find: here the snap.
    assert_eq!(err.kind(), Some(&ErrorKind::SnapNotFound), "{err}");

    // Old snapd has no notices endpoint: the client says so.
    let notices = c
        .change_notices(None, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(notices, iot_agent::snapd::Notices::Unsupported);
}

#[tokio::test]
async fn install_moves_through_do_doing_done_on_the_double() {
    let double = SnapdDouble::start().await;
    double.set_change_mode(ChangeMode::Manual);
    double.add_store_snap("hello-world");
    let c = client(&double.socket());

    let id = c
        .snap_action(
            &name("hello-world"),
            &SnapAction::new("install").channel(Some("latest/edge".into())),
        )
        .await
        .unwrap();
    assert_eq!(c.change(&id).await.unwrap().status, Status::Do);
    assert_eq!(
        c.changes(ChangeSelect::InProgress, None)
            .await
            .unwrap()
            .len(),
        1
    );

    double.set_change_status(&id, "Doing");
    let ch = c.change(&id).await.unwrap();
    assert_eq!(ch.status, Status::Doing);
    assert!(!ch.ready && ch.ready_time.is_none());

    double.set_change_status(&id, "Done");
    let ch = c.change(&id).await.unwrap();
    assert!(ch.ready && ch.ready_time.is_some());
    let snap = c.snap(&name("hello-world")).await.unwrap();
    assert_eq!(snap.channel, "latest/edge");
    assert!(!snap.revision.is_empty());

    // The request body reached snapd as JSON with the channel.
    let reqs = double.requests();
    let post = reqs
        .iter()
        .find(|r| r.method == "POST" && r.path_and_query == "/v2/snaps/hello-world")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&post.body).unwrap();
    assert_eq!(body["action"], "install");
    assert_eq!(body["channel"], "latest/edge");
}

#[tokio::test]
async fn failed_changes_carry_their_error() {
    let double = SnapdDouble::start().await;
    double.set_change_mode(ChangeMode::Manual);
    double.add_store_snap("hello-world");
    let c = client(&double.socket());
    let id = c
        .snap_action(&name("hello-world"), &SnapAction::new("install"))
        .await
        .unwrap();
    double.set_change_status(&id, "Error");
    let ch = c.change(&id).await.unwrap();
    assert_eq!(ch.status, Status::Error);
    assert!(ch.ready);
    assert!(ch.err.unwrap_or_default().contains("cannot perform"));
    assert!(c.snap(&name("hello-world")).await.is_err(), "not installed");
}

#[tokio::test]
async fn every_area_of_the_api_answers_on_the_double() {
    let double = SnapdDouble::start().await;
    double.add_installed("hello-world", "6.4", "29", "latest/stable");
    double.add_service("hello-world", "daemon", true);
    double.add_store_snap("other");
    double.set_serial(Some(
        crate::common::snapd_double::SERIAL_ASSERTION.to_string(),
    ));
    let c = client(&double.socket());
    let hw = name("hello-world");

    // snaps
    assert_eq!(c.snaps().await.unwrap()[0].name, "hello-world");
    assert_eq!(
        c.snaps_named(std::slice::from_ref(&hw))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(c.snap(&hw).await.unwrap().version, "6.4");
    double.add_store_snap_version("hello-world", "6.5", "30");
    for action in ["refresh", "revert", "disable", "enable", "unhold"] {
        c.snap_action(&hw, &SnapAction::new(action)).await.unwrap();
    }
    let hold = SnapAction {
        time: Some("forever".into()),
        hold_level: Some("general".into()),
        ..SnapAction::new("hold")
    };
    c.snap_action(&hw, &hold).await.unwrap();
    c.snap_action(&hw, &SnapAction::new("switch").channel(Some("beta".into())))
        .await
        .unwrap();
    c.snaps_action("install", &[name("other")]).await.unwrap();
    assert_eq!(
        c.snap_action(&name("other"), &SnapAction::new("install"))
            .await
            .unwrap_err()
            .kind(),
        Some(&ErrorKind::SnapAlreadyInstalled)
    );
    assert_eq!(
        c.snap_action(&name("nowhere"), &SnapAction::new("remove"))
            .await
            .unwrap_err()
            .kind(),
        Some(&ErrorKind::SnapNotInstalled)
    );

    // conf
    let mut conf = serde_json::Map::new();
    conf.insert("greeting".into(), serde_json::json!("hi"));
    c.set_conf(&hw, &conf).await.unwrap();
    assert_eq!(c.conf(&hw, &[]).await.unwrap()["greeting"], "hi");
    assert_eq!(c.conf(&hw, &["greeting"]).await.unwrap()["greeting"], "hi");
    assert_eq!(
        c.conf(&hw, &["missing"]).await.unwrap_err().kind(),
        Some(&ErrorKind::OptionNotFound)
    );

    // apps
    let apps = c.apps(&["hello-world"], true).await.unwrap();
    assert_eq!(apps[0].name, "daemon");
    assert!(apps[0].daemon.is_some() && apps[0].active);
    c.app_action("restart", &["hello-world.daemon".into()])
        .await
        .unwrap();

    // changes: abort one that is running
    double.set_change_mode(ChangeMode::Manual);
    let id = c
        .snap_action(&hw, &SnapAction::new("refresh"))
        .await
        .unwrap();
    let aborted = c.abort_change(&id).await.unwrap();
    assert_eq!(aborted.id, id);
    let all = c.changes(ChangeSelect::All, Some(&hw)).await.unwrap();
    assert!(all.iter().any(|ch| ch.id == id));
    double.set_change_mode(ChangeMode::Auto);

    // assertions, model and serial
    let serial = c.serial().await.unwrap().expect("serial");
    let parsed = iot_agent::snapd::Assertion::parse(&serial).unwrap();
    assert_eq!(parsed.kind(), "serial");
    assert!(parsed.header("serial").is_some());
    assert!(c.model().await.unwrap().starts_with("type: model"));
    assert_eq!(c.assertions("serial", &[]).await.unwrap().len(), 1);
    c.add_assertion(crate::common::snapd_double::MODEL_ASSERTION)
        .await
        .unwrap();
    assert!(c.add_assertion("not an assertion").await.is_err());

    // logs (json-seq)
    let logs = c.logs(5, &["hello-world"]).await.unwrap();
    assert!(!logs.is_empty() && !logs[0].message.is_empty());

    // snapshots
    let started = c.snapshot(std::slice::from_ref(&hw)).await.unwrap();
    let set = started.set_id.expect("snapd tells the set id");
    c.snapshots(Some(set)).await.unwrap();
    let export = c.export_snapshot(set).await.unwrap();
    assert!(export.status().is_success());

    // interfaces, connections, aliases, warnings, users, reboot
    c.interfaces().await.unwrap();
    c.connections().await.unwrap();
    c.interface_action("connect", ("hello-world", "network"), ("snapd", "network"))
        .await
        .unwrap();
    c.aliases().await.unwrap();
    c.warnings().await.unwrap();
    let users = c
        .create_user(&CreateUser {
            email: "ops@example.com".into(),
            sudoer: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!users.is_empty());
    c.reboot().await.unwrap();
    assert_eq!(double.reboots(), 1);
}

#[tokio::test]
async fn names_from_remote_input_never_reach_the_url() {
    for bad in [
        "../../v2/system-info",
        "a/b",
        "x?y=1",
        "a b",
        "%2e%2e",
        "UPPER",
    ] {
        assert!(SnapName::parse(bad).is_err(), "{bad}");
    }
    let double = SnapdDouble::start().await;
    let c = client(&double.socket());
    assert!(matches!(
        c.change("1/../2").await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        c.assertions_text("model?x=1", &[]).await,
        Err(Error::InvalidInput { .. })
    ));
    // Filters are escaped, not pasted.
    c.assertions_text("model", &[("brand-id", "a&model=b")])
        .await
        .unwrap();
    let last = double.requests().pop().unwrap();
    assert_eq!(
        last.path_and_query,
        "/v2/assertions/model?brand-id=a%26model%3Db"
    );
}

#[tokio::test]
async fn a_missing_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&dir.path().join("snapd.socket")).with_retry(RetryPolicy {
        get_retries: 1,
        conflict_retries: 0,
        base_delay: Duration::from_millis(10),
    });
    let err = c.system_info().await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("is snapd running"), "{err}");
}

#[tokio::test]
async fn garbage_slow_and_failing_answers_are_errors_not_panics() {
    let double = SnapdDouble::start().await;
    let c = Client::new(double.socket(), Duration::from_millis(500)).with_retry(RetryPolicy {
        get_retries: 0,
        conflict_retries: 0,
        base_delay: Duration::from_millis(10),
    });

    double.set_fault(Some(Fault::Garbage));
    let err = c.system_info().await.unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err}");

    double.set_fault(Some(Fault::Status500));
    let err = c.system_info().await.unwrap_err();
    assert!(err.is_transient(), "{err}");

    double.set_fault(Some(Fault::Slow(Duration::from_secs(30))));
    let err = c.system_info().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");

    double.set_fault(None);
    c.system_info().await.unwrap();
}

/// A raw unix socket server that answers every connection with `reply`.
async fn raw_server(reply: Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.socket");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (dir, path)
}

#[tokio::test]
async fn sockets_that_speak_nonsense_or_hang_up_mid_answer() {
    let quick = RetryPolicy {
        get_retries: 0,
        conflict_retries: 0,
        base_delay: Duration::from_millis(1),
    };
    // Not HTTP at all.
    let (_d1, p1) = raw_server(b"\x00\x01garbage\r\n\r\n".to_vec()).await;
    let err = client(&p1)
        .with_retry(quick.clone())
        .system_info()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Broken { .. }), "{err}");

    // Closes after half the promised body.
    let (_d2, p2) = raw_server(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"type\":\"sync\""
            .to_vec(),
    )
    .await;
    let err = client(&p2)
        .with_retry(quick.clone())
        .system_info()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Broken { .. }), "{err}");

    // An answer larger than the limit.
    let body = format!(
        "{{\"type\":\"sync\",\"status-code\":200,\"status\":\"OK\",\"result\":\"{}\"}}",
        "x".repeat(4096)
    );
    let mut reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend_from_slice(body.as_bytes());
    let (_d3, p3) = raw_server(reply).await;
    let err = client(&p3)
        .with_retry(quick)
        .with_max_body(1024)
        .system_info()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

#[tokio::test]
async fn change_conflicts_are_retried_then_reported() {
    let double = SnapdDouble::start().await;
    double.add_installed("hello-world", "6.4", "29", "latest/stable");
    double.set_fault(Some(Fault::Conflict(2)));
    let c = client(&double.socket()).with_retry(RetryPolicy {
        get_retries: 0,
        conflict_retries: 3,
        base_delay: Duration::from_millis(5),
    });
    // Two conflicts, then success: the caller sees only the success.
    c.snap_action(&name("hello-world"), &SnapAction::new("disable"))
        .await
        .unwrap();

    double.set_fault(Some(Fault::Conflict(10)));
    let err = c
        .snap_action(&name("hello-world"), &SnapAction::new("enable"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), Some(&ErrorKind::SnapChangeConflict));
}
