//! Bounds and refusals from the hardening review (#22) that belong to no
//! single subsystem's suite: a snapd answer body that stalls, an upload
//! redirected from https to http, the export status command on a spool it
//! cannot fully read.

use super::dms::{setup_on, DmsClient};
use crate::common::agent_proc::run_once;
use crate::common::identity_double::DEVICE_ID;
use crate::common::servers::Mosquitto;
use crate::common::snapd_double::Fault;
use crate::common::tls::TestPki;
use crate::common::upload_sink::{TlsRedirect, UploadSink};
use serde_json::json;
use std::sync::Arc;

/// snapd sends the export's headers and part of the archive, then nothing:
/// the `snapshot` action fails with an answer naming `snapd.timeout`
/// instead of holding the action (and its worker) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_snapshot_export_is_bounded_by_the_snapd_timeout() {
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    let broker = Mosquitto::start_tls(&pki);
    let s = setup_on(
        pki,
        broker,
        &[("IOT_AGENT_SNAPD__TIMEOUT", "2s".to_string())],
        "subscribed to DMS actions",
    )
    .await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let sink = UploadSink::start().await;
    s.snapd.set_fault(Some(Fault::StallExport));
    let v = dms
        .call(
            "stall",
            "snapshot",
            "hello-world",
            &json!({"url": sink.url("snap.tar")}).to_string(),
        )
        .await;
    assert_eq!(v["success"], false, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("snapd.timeout"), "{msg}");
    assert!(sink.uploads().is_empty(), "a partial export was uploaded");
    // The agent still serves.
    s.snapd.set_fault(None);
    let v = dms.call("after", "device", "", "").await;
    assert_eq!(v["success"], true, "{v}");
}

/// A presigned https URL whose server redirects the upload to plain http
/// (which would carry the logs and the signature in clear): refused, and
/// the http server never sees the upload. The https server's certificate
/// is trusted through `SSL_CERT_FILE`, as the system roots would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_redirected_from_https_to_http_is_refused() {
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    let broker = Mosquitto::start_tls(&pki);
    let ca = pki.ca_cert.display().to_string();
    let sink = UploadSink::start().await;
    let redirect =
        TlsRedirect::start(&pki.server_cert, &pki.server_key, sink.url("logs.txt")).await;
    let s = setup_on(
        pki,
        broker,
        &[("SSL_CERT_FILE", ca)],
        "subscribed to DMS actions",
    )
    .await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms
        .call(
            "redir",
            "logs",
            "",
            &json!({"url": redirect.url(), "limit": 10}).to_string(),
        )
        .await;
    assert_eq!(v["success"], false, "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("plain http"), "{msg}");
    assert!(!msg.contains("secret-signature"), "{msg}");
    assert!(sink.uploads().is_empty(), "the upload went out over http");
    // The same upload straight to https would have gone through: the
    // refusal is the redirect's (a direct http upload is allowed).
    let v = dms
        .call(
            "direct",
            "logs",
            "",
            &json!({"url": sink.url("direct.txt"), "limit": 10}).to_string(),
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
}

/// `iot-agent export status` on a spool whose dead-letter table cannot be
/// read: an error and a non-zero exit, not an empty list that says all is
/// well.
#[test]
fn export_status_reports_dead_letters_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        (
            "IOT_AGENT_DIRS__DATA",
            dir.path().join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.path().join("common").display().to_string(),
        ),
    ];
    let out = run_once(&["export", "send", "--stream", "s1", "--", "x"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spool = dir.path().join("common/export.db");
    rusqlite::Connection::open(&spool)
        .unwrap()
        .execute_batch("DROP TABLE dead_letters")
        .unwrap();
    let out = run_once(&["export", "status", "--json"], &env);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dead letters"), "{stderr}");
}
