//! The remote terminal and browser over the DMS broker, end to end: the
//! real agent binary enrolled and connected to a real mosquitto with mutual
//! TLS (as in `dms.rs`), `terminal.enabled` and `browser.enabled` set, and
//! an operator's client on the same broker with a certificate of its own,
//! on the device's `devices/terminal/{id}/...` and `devices/browser/{id}/...`.

use crate::common::identity_double::DEVICE_ID;
use crate::common::servers::Mosquitto;
use crate::common::tls::TestPki;
use crate::terminal::{contains, gone, has_pid_line, open, pid_in, read_to_exit, read_until};
use iot_agent::bus::topics;
use iot_agent::remote::terminal::Session;
use iot_agent::remote::Link;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminal_and_browser_work_over_the_dms_broker() {
    let (site_port, seen) = crate::browser::site().await;
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    let broker = Mosquitto::start_tls(&pki);
    let s = crate::dms::setup_on(
        pki.clone(),
        broker,
        &[
            ("IOT_AGENT_TERMINAL__ENABLED", "true".into()),
            ("IOT_AGENT_BROWSER__ENABLED", "true".into()),
            ("IOT_AGENT_BROWSER__ALLOW", format!("127.0.0.1:{site_port}")),
        ],
        "subscribed to DMS actions",
    )
    .await;
    use iot_agent::tls;
    let (cert, key) = pki.issue_client("operator");
    let cfg = tls::client_config(
        tls::Roots::new().pem(&pki.ca_pem, "test CA").unwrap(),
        Some(tls::ClientCert {
            cert_pem: &cert,
            key_pem: &key,
        }),
        tls::Verify::Chain,
        tls::Advice {
            peer: "the test broker",
            ca_key: "-",
            verify_key: None,
        },
    )
    .unwrap();
    let link = Link::connect_mqtt("127.0.0.1", s.broker.port(), Some(cfg), "", "")
        .await
        .unwrap();
    let root = topics::dms_terminal(DEVICE_ID).unwrap();

    // Every byte, exactly, and the exit code.
    let escapes: String = (0..=255u32).map(|b| format!("\\{b:03o}")).collect();
    let cmd = format!("stty raw -echo; printf '{escapes}'; exit 3");
    let mut t = Session::open(&link, &root, open(&cmd)).await.unwrap();
    let (out, exit) = read_to_exit(&mut t).await;
    assert_eq!(out, (0..=255u8).collect::<Vec<_>>());
    assert_eq!(exit.code, Some(3));

    // Input with commas and non-UTF-8, in an interactive shell; a job of the
    // session is killed by close.
    let mut shell = open("");
    shell.command = None;
    let mut t = Session::open(&link, &root, shell).await.unwrap();
    t.send(b"echo a,b\xff | od -An -c; set -m; sleep 1000 & echo PID=$!\n")
        .await
        .unwrap();
    let (out, _) = read_until(&mut t, |b| has_pid_line(b) && contains(b, b"377")).await;
    assert!(
        contains(&out, b"a   ,   b 377"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let pid = pid_in(&out);
    t.close().await.unwrap();
    assert!(gone(pid), "sleep {pid} survived the close");

    // The browser: a page and a 3 MB body through the operator's proxy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(iot_agent::remote::browse::serve(
        link.clone(),
        topics::dms_browser(DEVICE_ID).unwrap(),
        listener,
        String::new(),
    ));
    let http = reqwest::Client::new();
    let page = http
        .get(format!("http://127.0.0.1:{port}/go/next"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Redirected (relative) to the final page; cookies are the Chromium test's.
    assert!(page.contains("Hello from the device"), "{page}");
    let big = http
        .get(format!("http://127.0.0.1:{port}/big"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        big.to_vec(),
        (0..3_000_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
    );
    assert!(seen.lock().unwrap().iter().any(|(p, _)| p == "/final"));
}
