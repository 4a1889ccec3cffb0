//! Signed actions end to end (`dms.signing.*`): the real agent on a real
//! mosquitto, a DMS-side client that publishes signed envelopes (made by
//! the library's signer, as `iot-agent sign` makes them), the snapd double
//! counting what reached snapd. Every refusal is answered in the DMS's
//! reply shape, naming the check, and never reaches snapd.

use super::dms::{setup_on, DmsClient, Setup};
use crate::common::agent_proc::run_once;
use crate::common::identity_double::DEVICE_ID;
use crate::common::servers::Mosquitto;
use crate::common::tls::TestPki;
use ed25519_dalek::SigningKey;
use iot_agent::signing::{self, keys};
use serde_json::{json, Value};
use std::sync::Arc;

pub(crate) fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub(crate) fn keys_env(list: &[(&str, u8)]) -> (&'static str, String) {
    let entries: Vec<String> = list
        .iter()
        .map(|(kid, n)| keys::entry(kid, &key(*n).verifying_key()))
        .collect();
    ("IOT_AGENT_DMS__SIGNING__KEYS", entries.join(","))
}

pub(crate) fn required() -> (&'static str, String) {
    ("IOT_AGENT_DMS__SIGNING__REQUIRED", "true".to_string())
}

fn action(id: &str, action: &str, snap: &str) -> Vec<u8> {
    json!({"id": id, "action": action, "snap": snap, "data": ""})
        .to_string()
        .into_bytes()
}

/// An envelope signed with key `n` under `kid`, valid from `iat` to `exp`
/// seconds around now.
pub(crate) fn signed_at(n: u8, kid: &str, aud: &str, iat: i64, exp: i64, act: &[u8]) -> Vec<u8> {
    let now = iot_agent::clock::now_s();
    signing::sign(&key(n), kid, aud, now + iat, now + exp, act)
        .unwrap()
        .into_bytes()
}

fn signed(n: u8, kid: &str, act: &[u8]) -> Vec<u8> {
    signed_at(n, kid, DEVICE_ID, 0, 600, act)
}

async fn start(env: &[(&'static str, String)]) -> Setup {
    let pki = Arc::new(TestPki::new(DEVICE_ID));
    let broker = Mosquitto::start_tls(&pki);
    let s = setup_on(pki, broker, env, "subscribed to DMS actions").await;
    s.snapd.add_store_snap("third");
    s
}

/// Publishes and returns the next reply with `id`.
async fn send(dms: &mut DmsClient, id: &str, payload: Vec<u8>) -> Value {
    dms.publish_raw(payload).await;
    dms.response(id).await
}

fn assert_refused(v: &Value, id: &str, check: &str) {
    assert_eq!(v["id"], id, "{v}");
    assert_eq!(v["success"], false, "{v}");
    let m = v["message"].as_str().unwrap();
    assert!(
        m.starts_with(&format!("refused, not run: {check}:")),
        "{id}: expected {check:?}: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signed_actions_run_and_every_refusal_is_answered_and_never_run() {
    let s = start(&[keys_env(&[("ops-a", 1), ("ops-b", 2)]), required()]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;

    // Both keys of a rotation are accepted; the action runs as unsigned
    // ones do, with its completion report.
    let v = send(
        &mut dms,
        "s1",
        signed(1, "ops-a", &action("s1", "install", "other")),
    )
    .await;
    assert_eq!(
        (v["success"].as_bool(), v["action"].as_str()),
        (Some(true), Some("install")),
        "{v}"
    );
    let done = dms.response("s1").await;
    assert_eq!(done["action"], "completion", "{done}");
    let v = send(
        &mut dms,
        "s2",
        signed(2, "ops-b", &action("s2", "device", "")),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"]["deviceId"], DEVICE_ID);
    // The serial is an audience too.
    let by_serial = signing::sign(
        &key(2),
        "ops-b",
        "A1B2-c3d4/5",
        iot_agent::clock::now_s(),
        iot_agent::clock::now_s() + 60,
        &action("s3", "device", ""),
    )
    .unwrap();
    let v = send(&mut dms, "s3", by_serial.into_bytes()).await;
    assert_eq!(v["success"], true, "{v}");

    // Each refusal: answered, saying which check, and snapd never asked.
    let third = |id: &str| action(id, "install", "third");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("r-unsigned", third("r-unsigned"), "unsigned"),
        (
            "r-badsig",
            signed(3, "ops-a", &third("r-badsig")),
            "bad signature",
        ),
        (
            "r-expired",
            signed_at(1, "ops-a", DEVICE_ID, -7200, -3600, &third("r-expired")),
            "expired",
        ),
        (
            "r-future",
            signed_at(1, "ops-a", DEVICE_ID, 3600, 4000, &third("r-future")),
            "not yet valid",
        ),
        (
            "r-aud",
            signed_at(1, "ops-a", "another-device", 0, 600, &third("r-aud")),
            "wrong audience",
        ),
        (
            "r-kid",
            signed(9, "ops-z", &third("r-kid")),
            "unknown key",
        ),
        (
            "r-malformed",
            json!({"protected": "e30", "payload": base64_url(&third("r-malformed")), "signature": "AA"})
                .to_string()
                .into_bytes(),
            "malformed signature envelope",
        ),
    ];
    for (id, payload, check) in cases {
        let v = send(&mut dms, id, payload).await;
        assert_refused(&v, id, check);
        assert_eq!(v["action"], "install", "answered under its action: {v}");
    }
    // A replay of an action that ran: refused, not run again.
    let v = send(
        &mut dms,
        "s1",
        signed(1, "ops-a", &action("s1", "install", "other")),
    )
    .await;
    assert_refused(&v, "s1", "replay");
    assert_eq!(
        s.snapd.posts_to("/v2/snaps/third"),
        0,
        "a refused action ran"
    );
    assert_eq!(s.snapd.posts_to("/v2/snaps/other"), 1, "the replay ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_after_a_restart_is_refused_and_a_removed_key_is_revoked() {
    let mut s = start(&[keys_env(&[("ops-a", 1), ("ops-b", 2)]), required()]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let first = signed(2, "ops-b", &action("k1", "install", "other"));
    let v = send(&mut dms, "k1", first.clone()).await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(dms.response("k1").await["action"], "completion");

    // kill -9, and back with ops-a removed (what `snap set` of the list
    // without it does: the configure hook restarts the agent).
    s.agent.signal("KILL");
    s.agent.wait_exit();
    let (k, v) = keys_env(&[("ops-b", 2)]);
    s.env.retain(|(name, _)| *name != k);
    s.env.push((k, v));
    s.start_agent_again();

    let v = send(&mut dms, "k1", first).await;
    assert_refused(&v, "k1", "replay");
    assert_eq!(s.snapd.posts_to("/v2/snaps/other"), 1, "the replay ran");
    let v = send(
        &mut dms,
        "k2",
        signed(1, "ops-a", &action("k2", "install", "third")),
    )
    .await;
    assert_refused(&v, "k2", "unknown key");
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");
    assert_eq!(s.snapd.posts_to("/v2/snaps/third"), 0);
    let v = send(
        &mut dms,
        "k3",
        signed(2, "ops-b", &action("k3", "device", "")),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_verification_off_unsigned_actions_still_run_and_signed_ones_are_checked() {
    let s = start(&[keys_env(&[("ops-a", 1)])]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    let v = dms.call("u1", "install", "other", "").await;
    assert_eq!(v["success"], true, "unsigned runs: {v}");
    let v = send(
        &mut dms,
        "u2",
        signed(1, "ops-a", &action("u2", "device", "")),
    )
    .await;
    assert_eq!(v["success"], true, "{v}");
    // A signature that does not verify is refused even so: it is tampered.
    let v = send(
        &mut dms,
        "u3",
        signed(5, "ops-a", &action("u3", "install", "third")),
    )
    .await;
    assert_refused(&v, "u3", "bad signature");
    assert_eq!(s.snapd.posts_to("/v2/snaps/third"), 0);
}

#[test]
fn requiring_signatures_without_a_key_is_refused_by_the_configuration() {
    let out = run_once(
        &["config", "--check"],
        &[required(), ("IOT_AGENT_DMS__SIGNING__KEYS", String::new())],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dms.signing.required") && err.contains("dms.signing.keys"),
        "{err}"
    );
    let bad = run_once(
        &["config", "--check"],
        &[("IOT_AGENT_DMS__SIGNING__KEYS", "ops-a:not-a-key".into())],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("dms.signing.keys"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `iot-agent sign` end to end: a key made by `--keygen` signs an action
/// that the verifier accepts for the device named.
#[test]
fn the_signer_command_makes_keys_and_envelopes_the_device_accepts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("ops.key");
    let path = key_path.display().to_string();
    let out = run_once(&["sign", "--keygen", "--key", &path, "--kid", "ops-1"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entry = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read_to_string(&key_path).unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains(pem.lines().nth(1).unwrap()));

    let again = run_once(&["sign", "--keygen", "--key", &path, "--kid", "ops-1"], &[]);
    assert!(!again.status.success(), "a key file was replaced");
    // The relay binary (the operator's side) signs the same way.
    let relay = std::process::Command::new(env!("CARGO_BIN_EXE_iot-relay"))
        .args(["sign", "--public", "--key", &path, "--kid", "ops-1"])
        .output()
        .unwrap();
    assert!(
        relay.status.success(),
        "{}",
        String::from_utf8_lossy(&relay.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&relay.stdout).trim(), entry);

    let act = r#"{"id":"c1","action":"install","snap":"hello","data":""}"#;
    let out = run_once(
        &[
            "sign", "--key", &path, "--kid", "ops-1", "--aud", DEVICE_ID, "--ttl", "10m", act,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (kid, pubkey) = keys::parse_entry(&entry).unwrap();
    let policy = signing::Policy::new(
        [(kid, pubkey)],
        true,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(3600),
    );
    let envelope = out.stdout.trim_ascii_end().to_vec();
    match policy.admit(&envelope, &[DEVICE_ID], iot_agent::clock::now_s()) {
        Ok(signing::Admit::Signed(v)) => assert_eq!(v.payload, act.as_bytes()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_serial_requests_on_the_dms_connection_are_signed_the_same_way() {
    use rumqttc::QoS;
    let s = start(&[keys_env(&[("ops-a", 1)]), required()]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;
    // The serial `A1B2-c3d4/5`, sanitized.
    let base = "devices/actions/A1B2-c3d45";
    let result = format!("{base}/required-install/result");
    let req = |id: &str, snap: &str| {
        json!({"id": id, "snaps": {"name": snap}})
            .to_string()
            .into_bytes()
    };
    let mut ask = async |id: &str, payload: Vec<u8>| -> Value {
        dms.client
            .publish(
                format!("{base}/required-install"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
        let raw = dms
            .wait(&result, |p| {
                serde_json::from_slice::<Value>(p).is_ok_and(|v| v["id"] == id)
            })
            .await;
        serde_json::from_slice(&raw).unwrap()
    };
    let good = signed_at(1, "ops-a", "A1B2-c3d4/5", 0, 600, &req("q1", "other"));
    let v = ask("q1", good.clone()).await;
    assert_eq!(v["success"], true, "{v}");
    for (id, payload, check) in [
        ("q2", req("q2", "third"), "unsigned"),
        (
            "q3",
            signed_at(4, "ops-a", "A1B2-c3d45", 0, 600, &req("q3", "third")),
            "bad signature",
        ),
        (
            "q4",
            signed_at(1, "ops-a", "B0-other-serial", 0, 600, &req("q4", "third")),
            "wrong audience",
        ),
        ("q1", good, "replay"),
    ] {
        let v = ask(id, payload).await;
        assert_eq!(v["success"], false, "{v}");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.starts_with(&format!("refused, not run: {check}:")),
            "{id}: {m}"
        );
    }
    assert_eq!(
        s.snapd.posts_to("/v2/snaps/third"),
        0,
        "a refused request ran"
    );
    assert_eq!(s.snapd.posts_to("/v2/snaps/other"), 1, "the replay ran");
}

/// The README's example, command for command: a key from `iot-agent sign
/// --keygen`, its entry set as the device's key, an action signed by
/// `iot-agent sign` into a file, published by `mosquitto_pub -f` with the
/// DMS's client certificate (the broker fully verified), and run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_example_signs_with_the_cli_and_publishes_with_mosquitto_pub() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("ops-2026.key").display().to_string();
    let out = run_once(
        &["sign", "--keygen", "--key", &key_file, "--kid", "ops-2026"],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entry = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let s = start(&[("IOT_AGENT_DMS__SIGNING__KEYS", entry), required()]).await;
    let mut dms = DmsClient::connect(&s.pki, s.broker.port()).await;

    let act = r#"{"id":"op-0001","action":"install","snap":"other","data":""}"#;
    let out = run_once(
        &[
            "sign", "--key", &key_file, "--kid", "ops-2026", "--aud", DEVICE_ID, act,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jws = dir.path().join("op-0001.jws");
    std::fs::write(&jws, &out.stdout).unwrap();
    let (cert, key) = s.pki.issue_client("dms");
    let (ca, cert, key) = (
        s.pki.write_file("ca.crt", &s.pki.ca_pem),
        s.pki.write_file("dms.crt", &cert),
        s.pki.write_file("dms.key", &key),
    );
    let port = s.broker.port().to_string();
    let topic = format!("devices/sub/{DEVICE_ID}");
    let published = std::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &port, "--cafile"])
        .arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .args(["-q", "1", "-t", &topic, "-f"])
        .arg(&jws)
        .output()
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let v = dms.response("op-0001").await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(dms.response("op-0001").await["action"], "completion");
    assert!(s.snapd.installed().contains(&"other".to_string()));
}

/// Interoperability: a key made by `openssl genpkey` is read by the signer
/// (`--public` prints its entry), and an envelope whose signature openssl
/// made (another Ed25519 implementation, as a DMS integration would use)
/// over `protected.payload` is accepted: the format is plain JWS.
#[test]
fn openssl_keys_and_openssl_signatures_are_accepted() {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ossl.pem");
    let ok = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run_once(
        &[
            "sign",
            "--public",
            "--key",
            &key.display().to_string(),
            "--kid",
            "ossl",
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (kid, public) = keys::parse_entry(String::from_utf8_lossy(&out.stdout).trim()).unwrap();

    let now = iot_agent::clock::now_s();
    let act = br#"{"id":"o1","action":"list","snap":"","data":""}"#;
    let header =
        json!({"alg":"EdDSA","kid":"ossl","aud":DEVICE_ID,"iat":now,"exp":now+60,"nonce":"o1"});
    let protected = base64_url(header.to_string().as_bytes());
    let payload = base64_url(act);
    let input = dir.path().join("input");
    std::fs::write(&input, format!("{protected}.{payload}")).unwrap();
    let sig = Command::new("openssl")
        .args(["pkeyutl", "-sign", "-rawin", "-inkey"])
        .arg(&key)
        .arg("-in")
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        sig.status.success(),
        "{}",
        String::from_utf8_lossy(&sig.stderr)
    );
    let envelope =
        json!({"protected": protected, "payload": payload, "signature": base64_url(&sig.stdout)});
    let policy = signing::Policy::new(
        [(kid, public)],
        true,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(3600),
    );
    match policy.admit(envelope.to_string().as_bytes(), &[DEVICE_ID], now) {
        Ok(signing::Admit::Signed(v)) => assert_eq!(v.payload, act),
        other => panic!("{other:?}"),
    }

    // The other way: openssl reads a key `iot-agent sign --keygen` wrote,
    // and finds the public key the entry names.
    let ours = dir.path().join("ours.key");
    let out = run_once(
        &[
            "sign",
            "--keygen",
            "--key",
            &ours.display().to_string(),
            "--kid",
            "ours",
        ],
        &[],
    );
    assert!(out.status.success());
    let (_, public) = keys::parse_entry(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&ours)
        .output()
        .unwrap();
    assert!(
        der.status.success(),
        "{}",
        String::from_utf8_lossy(&der.stderr)
    );
    assert!(
        der.stdout.ends_with(&public.to_bytes()),
        "openssl sees another key"
    );
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}
