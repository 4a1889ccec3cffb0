//! Enrollment with the identity service: the contract, the credential
//! store, the waiting states, and the daemon's behaviour around them.

use crate::common::agent_proc::{run_once, AgentProcess};
use crate::common::identity_double::{
    Behaviour, IdentityDouble, DEVICE_ID, ORG_PRIVATE_KEY_MARKER,
};
use crate::common::servers::{free_port, RealSnapd};
use crate::common::snapd_double::{SnapdDouble, SERIAL_ASSERTION};
use iot_agent::config::Config;
use iot_agent::identity::{enroll_once, EnrollState, IdentityService, Store, Stored};
use iot_agent::snapd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn env_for(dir: &Path, url: &str, snapd_socket: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("IOT_AGENT_URL", url.to_string()),
        (
            "IOT_AGENT_DIRS__DATA",
            dir.join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.join("common").display().to_string(),
        ),
        (
            "IOT_AGENT_SNAPD__SOCKET",
            snapd_socket.display().to_string(),
        ),
        (
            "IOT_AGENT_NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        ),
        ("IOT_AGENT_IDENTITY__TIMEOUT", "2s".into()),
    ]
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

async fn registered_snapd() -> SnapdDouble {
    let d = SnapdDouble::start().await;
    d.set_serial(Some(SERIAL_ASSERTION.to_string()));
    d
}

async fn attempt(
    c: &Config,
) -> Result<std::sync::Arc<iot_agent::identity::Credentials>, EnrollState> {
    let service = IdentityService::new(c).unwrap();
    enroll_once(
        &snapd::Client::from_config(c),
        &service,
        &Store::from_config(c),
        c.url.as_str(),
    )
    .await
}

#[tokio::test]
async fn enrolls_over_http_and_stores_credentials_0600() {
    let snapd = registered_snapd().await;
    let id = IdentityDouble::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[]);

    let creds = attempt(&c).await.unwrap();
    assert_eq!(creds.device_id, DEVICE_ID);
    assert_eq!(
        (creds.mqtt_host.as_str(), creds.mqtt_port),
        ("localhost", 8883)
    );
    assert!(creds.cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(creds.root_ca_pem.contains("BEGIN CERTIFICATE"));

    // The request: content type and the assertions exactly as snapd gave them.
    let calls = id.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].content_type, "application/x.ubuntu.assertion");
    let client = snapd::Client::from_config(&c);
    let model = client.assertions_text("model", &[]).await.unwrap();
    let serial = client.assertions_text("serial", &[]).await.unwrap();
    assert_eq!(calls[0].body, format!("{model}\n{serial}"));

    // The files: names operators expect, mode 0600, no organization key.
    let store = Store::from_config(&c);
    for f in [
        store.secret_path(),
        store.params_path(),
        store.device_data_path(),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    let secret = std::fs::read_to_string(store.secret_path()).unwrap();
    assert!(
        !secret.contains(ORG_PRIVATE_KEY_MARKER),
        "the org key was stored"
    );
    assert!(!secret.contains("\"-\""), "{secret}");
    assert_eq!(
        std::fs::read(store.device_data_path()).unwrap(),
        b"opaque device data"
    );
    let params: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.params_path()).unwrap()).unwrap();
    assert_eq!(params["url"], id.url());
    assert!(matches!(store.load(), Stored::Valid { .. }));
}

/// Builds the config through the real loader so paths are expanded.
fn reparse_with_socket(dir: &Path, url: &str, socket: &Path, extra: &[(&str, &str)]) -> Config {
    let mut toml = format!(
        "url = \"{url}\"\n[dirs]\ndata = \"{0}/data\"\ncommon = \"{0}/common\"\n[snapd]\nsocket = \"{1}\"\n[identity]\ntimeout = \"2s\"\n",
        dir.display(),
        socket.display()
    );
    for (k, v) in extra {
        toml.push_str(&format!("{k} = \"{v}\"\n"));
    }
    let file = dir.join("config.toml");
    std::fs::write(&file, toml).unwrap();
    iot_agent::config::layers::load(&iot_agent::config::layers::LoadOptions { file: Some(file) })
        .unwrap()
        .config
}

#[tokio::test]
async fn enrolls_over_verified_tls_with_a_private_ca_only() {
    let snapd = registered_snapd().await;
    let id = IdentityDouble::start(true).await;
    let dir = tempfile::tempdir().unwrap();

    // Without the private CA the server is not trusted: no enrollment.
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[]);
    match attempt(&c).await {
        Err(EnrollState::ServiceUnreachable { detail, .. }) => {
            assert!(detail.to_lowercase().contains("certificate"), "{detail}")
        }
        other => panic!("unverified TLS must fail: {other:?}"),
    }
    assert!(id.calls().is_empty());

    let ca = id.pki.ca_cert.display().to_string();
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[("ca", &ca)]);
    let creds = attempt(&c).await.unwrap();
    assert_eq!(creds.device_id, DEVICE_ID);
}

#[tokio::test]
async fn every_waiting_state_is_explicit() {
    let snapd = registered_snapd().await;
    let id = IdentityDouble::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[]);
    let store = Store::from_config(&c);

    type Check = fn(&EnrollState) -> bool;
    let cases: Vec<(Behaviour, Check, bool)> = vec![
        (Behaviour::Status(1), |s| *s == EnrollState::Waiting, false),
        (Behaviour::Status(3), |s| *s == EnrollState::Disabled, true),
        (
            Behaviour::Refuse("cannot find device".into()),
            |s| matches!(s, EnrollState::Refused { message, .. } if message.contains("cannot find device")),
            true,
        ),
        (
            Behaviour::ServerError,
            |s| matches!(s, EnrollState::ServiceUnreachable { detail, .. } if detail.contains("503")),
            false,
        ),
        (
            Behaviour::Garbage,
            |s| matches!(s, EnrollState::BadAnswer { .. }),
            false,
        ),
        (
            Behaviour::WrongKey,
            |s| matches!(s, EnrollState::BadAnswer { detail } if detail.contains("does not belong")),
            false,
        ),
        (
            Behaviour::Slow(std::time::Duration::from_secs(30)),
            |s| matches!(s, EnrollState::ServiceUnreachable { .. }),
            false,
        ),
    ];
    for (behaviour, expected, permanent) in cases {
        id.set(behaviour.clone());
        let state = attempt(&c).await.unwrap_err();
        assert!(expected(&state), "{behaviour:?} gave {state:?}");
        assert_eq!(state.is_permanent(), permanent, "{state:?}");
        assert!(!state.to_string().is_empty());
        assert!(
            matches!(store.load(), Stored::Missing),
            "{behaviour:?} stored something"
        );
    }

    // A service that is not there at all.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let c2 = reparse_with_socket(dir.path(), &dead, &snapd.socket(), &[]);
    let state = attempt(&c2).await.unwrap_err();
    assert!(
        matches!(state, EnrollState::ServiceUnreachable { .. }),
        "{state:?}"
    );
    assert!(state.to_string().contains("check `url`"), "{state}");
}

#[tokio::test]
async fn without_a_serial_nothing_is_sent() {
    let snapd = SnapdDouble::start().await; // no serial
    let id = IdentityDouble::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[]);
    assert_eq!(attempt(&c).await.unwrap_err(), EnrollState::NoSerial);
    assert!(id.calls().is_empty());
}

#[test]
fn a_real_unregistered_snapd_makes_enrollment_wait_clearly() {
    let snapd = RealSnapd::start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    let mut env = env_for(dir.path(), &url, &snapd.socket());

    // One shot: non-zero with the reason.
    let out = run_once(&["enroll"], &env);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no serial assertion"), "{err}");

    // The daemon: logged once, retried, visible in `status`.
    env.push(("IOT_AGENT_LOG__LEVEL", "debug".into()));
    env.push(("IOT_AGENT_IDENTITY__RETRY__MAX", "1s".into()));
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("no serial assertion yet");
    for _ in 0..3 {
        agent.wait_for("enrollment retry scheduled");
    }
    assert_eq!(
        agent.count("no serial assertion yet"),
        1,
        "{:#?}",
        agent.seen
    );
    let out = run_once(&["status", "--json"], &env);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["enrollment"]["state"], "no-serial");
    assert_eq!(status["daemon"]["running"], true);
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_enrolls_once_and_reuses_its_credentials() {
    let snapd = registered_snapd().await;
    let id = IdentityDouble::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let env = env_for(dir.path(), id.url(), &snapd.socket());

    let mut agent = AgentProcess::start(&env);
    agent.wait_for("device credentials ready");
    assert_eq!(id.calls().len(), 1);
    agent.signal("TERM");
    assert!(agent.wait_exit().success());

    let mut agent = AgentProcess::start(&env);
    let line = agent.wait_for("device credentials ready");
    assert!(line.contains(DEVICE_ID), "{line}");
    assert_eq!(
        id.calls().len(),
        1,
        "enrolled again although credentials were stored"
    );
    assert_eq!(agent.count(ORG_PRIVATE_KEY_MARKER), 0);

    let out = run_once(&["status"], &env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("enrolled") && text.contains(DEVICE_ID),
        "{text}"
    );
    assert!(text.contains("running"), "{text}");

    // unregister: credentials deleted, the running agent enrolls again.
    let out = run_once(&["unregister"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_for("reloading the enrollment");
    agent.wait_for("device credentials ready");
    assert_eq!(id.calls().len(), 2);
    assert!(dir.path().join("data/.secret").exists());
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_secret_is_detected_and_replaced() {
    let snapd = registered_snapd().await;
    let id = IdentityDouble::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let env = env_for(dir.path(), id.url(), &snapd.socket());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();

    // Half-written JSON: the one-shot command re-enrolls.
    std::fs::write(
        data.join(".secret"),
        "{\"id\":\"d3v1ce-0001\",\"status\":2,\"cred",
    )
    .unwrap();
    let out = run_once(&["enroll"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unusable"));
    assert_eq!(id.calls().len(), 1);

    // Valid JSON whose certificate was damaged: the daemon re-enrolls.
    let mut secret: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join(".secret")).unwrap()).unwrap();
    secret["credentials"]["certificate"] = "bm90IGEgY2VydA==".into();
    std::fs::write(data.join(".secret"), secret.to_string()).unwrap();
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("stored credentials are unusable");
    agent.wait_for("device credentials ready");
    assert_eq!(id.calls().len(), 2);
    assert_eq!(mode(&data.join(".secret")), 0o600);
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}

/// The real service's edge cases: snapd holding two serial assertions
/// (a re-registered device) still sends exactly one model and one serial
/// (the service refuses a third); a `deviceData` that is not base64 is
/// stored as given; a 400 answer is quoted to the operator.
#[tokio::test]
async fn enrollment_edge_cases_of_the_real_service() {
    let snapd = registered_snapd().await;
    let older = SERIAL_ASSERTION
        .replace("serial: A1B2-c3d4/5", "serial: OLD-0001")
        .replace("timestamp: ", "timestamp: 1");
    // `timestamp: 1...` is not a time: the newest readable one wins.
    snapd.set_serial(Some(format!("{}\n\n{SERIAL_ASSERTION}", older.trim_end())));
    let id = IdentityDouble::start(false).await;
    id.set(Behaviour::DeviceData("abc".into()));
    let dir = tempfile::tempdir().unwrap();
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[]);
    let creds = attempt(&c).await.unwrap();
    assert_eq!(creds.device_id, DEVICE_ID);
    let body = &id.calls()[0].body;
    let sent = snapd::Assertion::parse_all(body).unwrap();
    assert_eq!(sent.len(), 2, "{body}");
    assert_eq!(sent[1].header("serial"), Some("A1B2-c3d4/5"));
    let store = Store::from_config(&c);
    assert_eq!(std::fs::read(store.device_data_path()).unwrap(), b"abc");
    assert!(matches!(store.load(), Stored::Valid { .. }));

    // 400 with the service's own message.
    let dir = tempfile::tempdir().unwrap();
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[]);
    let message = "the device `canonical/ubuntu-core-18-amd64/d75f7300` is already enrolled";
    id.set(Behaviour::Refuse(message.into()));
    match attempt(&c).await {
        Err(e @ EnrollState::Refused { .. }) => {
            assert!(e.to_string().contains(message), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// A `.secret` written by the reference agent holds the organization's
/// private key under `"-"`: the first load rewrites it without the key.
#[tokio::test]
async fn a_reference_secret_is_scrubbed_on_first_load() {
    let snapd = registered_snapd().await;
    let id = IdentityDouble::start(false).await;
    let dir = tempfile::tempdir().unwrap();
    let c = reparse_with_socket(dir.path(), id.url(), &snapd.socket(), &[]);
    attempt(&c).await.unwrap();
    let store = Store::from_config(&c);
    let mut secret: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.secret_path()).unwrap()).unwrap();
    secret["organization"]["-"] = ORG_PRIVATE_KEY_MARKER.into();
    secret["-"] = ORG_PRIVATE_KEY_MARKER.into();
    std::fs::write(store.secret_path(), secret.to_string()).unwrap();
    assert!(matches!(store.load(), Stored::Valid { .. }));
    let after = std::fs::read_to_string(store.secret_path()).unwrap();
    assert!(!after.contains(ORG_PRIVATE_KEY_MARKER), "{after}");
    assert_eq!(mode(&store.secret_path()), 0o600);
    assert!(matches!(store.load(), Stored::Valid { .. }));
}

/// Plain http:// to a host that is not loopback is refused, naming the
/// key that allows it; loopback and the opt-in work.
#[test]
fn plain_http_to_a_remote_identity_service_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("snapd.socket");
    let c = reparse_with_socket(dir.path(), "http://identity.example.com:8030", &socket, &[]);
    let e = IdentityService::new(&c).err().expect("refused");
    assert!(e.to_string().contains("identity.insecure=true"), "{e}");
    let mut c = c;
    c.identity.insecure = true;
    assert!(IdentityService::new(&c).is_ok());
}
