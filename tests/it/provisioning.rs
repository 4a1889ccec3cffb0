//! Certificate provisioning over EST with real processes: `iot-relay` (EST
//! server, admin API, device CA) and `iot-agent run` with `provisioning.*`,
//! plus third-party EST clients (curl + openssl, strongSwan's `pki`).

use crate::common::est::{
    all_files_contain, have, issue_otp, provisioned_env, sh, start, status, sync_relay_log,
};
use crate::common::tls::TestPki;
use crate::common::tunnel::{echo_service, round_trip, Relay, DEVICE};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn device_pem(dir: &Path) -> std::path::PathBuf {
    dir.join("data/provisioning/device.pem")
}

#[test]
fn an_otp_enrolls_the_device_and_its_tunnel_comes_up_with_the_provisioned_identity() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&pki, dir.path(), 1);
    let otp = issue_otp(&relay, DEVICE, Some("10m"));
    let echo = echo_service();
    let env = provisioned_env(&pki, dir.path(), &relay, DEVICE, &otp, &[&echo], &[]);
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
    agent.wait_for("tunnel connected");
    relay.proc.wait_for("EST issued a device certificate");
    let line = relay.proc.wait_for("agent connected");
    assert!(line.contains(DEVICE), "{line}");

    // The tunnel works with the identity the relay's CA issued.
    let port = relay.add_public(&echo, 5);
    assert_eq!(round_trip(port, b"provisioned").unwrap(), b"provisioned");

    // Key and certificate in one 0600 file; the CA bundle beside it.
    let pem = device_pem(dir.path());
    assert_eq!(mode(&pem), 0o600);
    let text = std::fs::read_to_string(&pem).unwrap();
    assert!(text.contains("PRIVATE KEY") && text.contains("CERTIFICATE"));
    let ca = std::fs::read_to_string(dir.path().join("data/provisioning/ca.pem")).unwrap();
    assert_eq!(
        ca.trim(),
        std::fs::read_to_string(dir.path().join("ca/ca.pem"))
            .unwrap()
            .trim()
    );
    // The OTP is nowhere on the device's disk.
    assert_eq!(
        all_files_contain(&dir.path().join("data"), &otp),
        Vec::<String>::new()
    );

    let st = status(&env);
    assert_eq!(st["state"], "enrolled", "{st}");
    let subject = st["certificate"]["subject"].as_str().unwrap();
    assert!(subject.contains(DEVICE), "{st}");
    assert!(st["certificate"]["issuer"]
        .as_str()
        .unwrap()
        .contains("iot-relay device CA"));
    assert!(st["certificate"]["not-after"].is_string(), "{st}");

    // A restart keeps the identity: no second enrollment.
    agent.signal("TERM");
    agent.wait_exit();
    let mut again = start(&env);
    again.wait_for_all(&["tunnel connected", "renewal at"]);
    assert_eq!(again.count("enrolling"), 0, "{:?}", again.seen);
}

#[test]
fn a_replayed_otp_is_refused_reported_once_and_never_sent_again() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&pki, dir.path(), 0);
    let otp = issue_otp(&relay, DEVICE, None);
    let first = tempfile::tempdir().unwrap();
    let env = provisioned_env(&pki, first.path(), &relay, DEVICE, &otp, &[], &[]);
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
    // The relay killed and restarted: the used OTP stays used.
    relay.kill();
    relay.restart();

    // Another device directory with the same OTP: refused, said once.
    let second = tempfile::tempdir().unwrap();
    let env2 = provisioned_env(&pki, second.path(), &relay, DEVICE, &otp, &[], &[]);
    let mut replay = start(&env2);
    let line = replay.wait_for("OTP refused");
    assert!(line.contains("already used"), "{line}");
    assert!(
        line.contains("POST /api/v2/otp") && line.contains("snap set"),
        "{line}"
    );
    assert_eq!(status(&env2)["state"], "otp-refused");
    assert!(!device_pem(second.path()).exists());

    // Restarted with the same OTP: it is not sent again.
    replay.signal("TERM");
    replay.wait_exit();
    let mut replay = start(&env2);
    replay.wait_for("already used or refused");
    sync_relay_log(&mut relay);
    assert_eq!(
        relay.proc.count("EST enrollment refused"),
        1,
        "{:?}",
        relay.proc.seen
    );
    assert_eq!(replay.count("OTP refused"), 0);
}

#[test]
fn an_expired_otp_is_refused() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 0);
    // Expired by the time any request arrives.
    let otp = issue_otp(&relay, DEVICE, Some("1ms"));
    let env = provisioned_env(&pki, dir.path(), &relay, DEVICE, &otp, &[], &[]);
    let mut agent = start(&env);
    let line = agent.wait_for("OTP refused");
    assert!(line.contains("expired"), "{line}");
    assert!(!device_pem(dir.path()).exists());
}

#[test]
fn a_deferred_enrollment_keeps_the_otp_and_is_served_after_retry_after() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(
        &pki,
        dir.path(),
        0,
        &[("IOT_RELAY_EST__DEFER", "2s".into())],
    );
    let otp = issue_otp(&relay, DEVICE, None);
    let env = provisioned_env(&pki, dir.path(), &relay, DEVICE, &otp, &[], &[]);
    let mut agent = start(&env);
    let line = agent.wait_for("deferred the enrollment (202)");
    assert!(line.contains("sent again in 2s"), "{line}");
    assert_eq!(status(&env)["state"], "deferred");
    agent.wait_for("provisioning: enrolled");
    relay.proc.wait_for("EST enrollment deferred");
    relay.proc.wait_for("EST issued a device certificate");
    assert_eq!(relay.proc.count("EST enrollment refused"), 0);
}

#[test]
fn sigkill_while_enrolling_leaves_no_half_identity_and_the_retry_succeeds() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(
        &pki,
        dir.path(),
        0,
        &[("IOT_RELAY_EST__DEFER", "2s".into())],
    );
    let otp = issue_otp(&relay, DEVICE, None);
    let env = provisioned_env(&pki, dir.path(), &relay, DEVICE, &otp, &[], &[]);
    let mut agent = start(&env);
    agent.wait_for("deferred the enrollment (202)");
    agent.signal("KILL");
    agent.wait_exit();
    // The key lived in memory only: nothing half-written on disk.
    let prov = dir.path().join("data/provisioning");
    let names: Vec<String> = std::fs::read_dir(&prov)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n == "ca.pem" || n == "state.json"),
        "{names:?}"
    );
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
    assert_eq!(mode(&device_pem(dir.path())), 0o600);
}

#[test]
fn the_certificate_is_renewed_over_mutual_tls_before_it_expires() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(
        &pki,
        dir.path(),
        0,
        &[("IOT_RELAY_EST__LIFETIME", "20s".into())],
    );
    let otp = issue_otp(&relay, DEVICE, None);
    let env = provisioned_env(
        &pki,
        dir.path(),
        &relay,
        DEVICE,
        &otp,
        &[],
        &[("IOT_AGENT_PROVISIONING__RENEW", "25%".into())],
    );
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
    let before = std::fs::read_to_string(device_pem(dir.path())).unwrap();
    agent.wait_for("provisioning: re-enrolled");
    relay.proc.wait_for("how=\"simpleenroll\"");
    relay.proc.wait_for("how=\"simplereenroll\"");
    let after = std::fs::read_to_string(device_pem(dir.path())).unwrap();
    assert_ne!(before, after, "a new key and certificate");
    assert_eq!(mode(&device_pem(dir.path())), 0o600);
    assert_eq!(relay.proc.count("EST enrollment refused"), 0);
}

/// A connection does not outlive the certificate it was made with: the
/// relay ends it when that certificate expires, and the agent dials again
/// with the one it renewed meanwhile.
#[test]
fn the_relay_ends_a_connection_at_its_certificate_expiry_and_the_renewed_one_takes_over() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(
        &pki,
        dir.path(),
        1,
        &[("IOT_RELAY_EST__LIFETIME", "12s".into())],
    );
    let otp = issue_otp(&relay, DEVICE, None);
    let echo = echo_service();
    let env = provisioned_env(
        &pki,
        dir.path(),
        &relay,
        DEVICE,
        &otp,
        &[&echo],
        &[("IOT_AGENT_PROVISIONING__RENEW", "25%".into())],
    );
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
    agent.wait_for("tunnel connected");
    relay.proc.wait_for("agent connected");
    agent.wait_for("provisioning: re-enrolled");

    let line = relay.proc.wait_for("agent disconnected");
    assert!(line.contains("the device certificate expired"), "{line}");
    let line = relay.proc.wait_for("agent connected");
    assert!(line.contains(DEVICE), "{line}");
    // The new connection carries visitors.
    let port = relay.add_public(&echo, 5);
    assert_eq!(round_trip(port, b"renewed").unwrap(), b"renewed");
}

#[test]
fn an_expired_certificate_waits_for_a_new_otp() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(
        &pki,
        dir.path(),
        0,
        &[("IOT_RELAY_EST__LIFETIME", "2s".into())],
    );
    let otp = issue_otp(&relay, DEVICE, None);
    let env = provisioned_env(&pki, dir.path(), &relay, DEVICE, &otp, &[], &[]);
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
    // The agent is gone while the certificate expires (a device off for
    // longer than its certificate lives).
    agent.signal("KILL");
    agent.wait_exit();
    let expired = crate::common::poll_until(
        std::time::Instant::now() + std::time::Duration::from_secs(30),
        || (status(&env)["certificate"]["expired"] == true).then_some(()),
    );
    assert!(expired.is_some(), "the certificate never expired");
    let mut agent = start(&env);
    let line = agent.wait_for("state=\"expired\"");
    assert!(line.contains("provisioning.otp"), "{line}");
    assert_eq!(status(&env)["state"], "expired");
    agent.signal("TERM");
    agent.wait_exit();

    let fresh = issue_otp(&relay, DEVICE, None);
    let env = provisioned_env(&pki, dir.path(), &relay, DEVICE, &fresh, &[], &[]);
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
}

#[test]
fn an_untrusted_est_server_and_a_wrong_pin_are_refused_and_the_right_pin_works() {
    let pki = TestPki::new("unused-client");
    let other = TestPki::new("other");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 0);
    let otp = issue_otp(&relay, DEVICE, None);

    let untrusted = provisioned_env(
        &pki,
        dir.path(),
        &relay,
        DEVICE,
        &otp,
        &[],
        &[(
            "IOT_AGENT_PROVISIONING__CA",
            other.ca_cert.display().to_string(),
        )],
    );
    let mut agent = start(&untrusted);
    let line = agent.wait_for("cacerts failed");
    assert!(
        line.contains("does not verify") && line.contains("provisioning.ca"),
        "{line}"
    );
    agent.signal("KILL");
    agent.wait_exit();

    let pin_of = |path: &Path| {
        let pem = std::fs::read_to_string(path).unwrap();
        let der = iot_agent::tls::certs_from_pem(&pem, "test").unwrap();
        let hex: String = iot_agent::tls::cert_sha256(der[0].as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    };
    let wrong = provisioned_env(
        &pki,
        dir.path(),
        &relay,
        DEVICE,
        &otp,
        &[],
        &[("IOT_AGENT_PROVISIONING__CA", pin_of(&other.server_cert))],
    );
    let mut agent = start(&wrong);
    let line = agent.wait_for("cacerts failed");
    assert!(line.contains("not the pinned"), "{line}");
    agent.signal("KILL");
    agent.wait_exit();
    assert!(!device_pem(dir.path()).exists());

    let right = provisioned_env(
        &pki,
        dir.path(),
        &relay,
        DEVICE,
        &otp,
        &[],
        &[("IOT_AGENT_PROVISIONING__CA", pin_of(&pki.server_cert))],
    );
    let mut agent = start(&right);
    agent.wait_for("provisioning: enrolled");
}

/// curl and openssl as the EST client: the wire format is real EST, and
/// bad input gets the right status with a message and nothing signed.
#[test]
fn curl_and_openssl_enroll_and_bad_requests_are_refused() {
    assert!(
        have("curl") && have("openssl"),
        "curl and openssl are needed (scripts/setup installs them)"
    );
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(&pki, dir.path(), 0);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let base = format!(
        "curl -sS --cacert {} -o body -w '%{{http_code}}' https://localhost:{}/.well-known/est",
        pki.ca_cert.display(),
        relay.est_port
    );
    let run = |script: &str| {
        let out = sh(w, script);
        let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            !code.is_empty(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body = std::fs::read_to_string(w.join("body")).unwrap_or_default();
        (code, body)
    };

    // cacerts: base64 certs-only PKCS#7 that openssl reads.
    let (code, _) = run(&format!("{base}/cacerts"));
    assert_eq!(code, "200");
    let out = sh(
        w,
        "base64 -d body | openssl pkcs7 -inform DER -print_certs -noout",
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("iot-relay device CA"),
        "{out:?}"
    );

    // A CSR from openssl, base64 wrapped at 64 columns.
    let csr = |cn: &str, file: &str| {
        let out = sh(
            w,
            &format!(
                "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
                 -keyout {file}.key -subj /CN={cn} -outform DER -out {file}.der && \
                 base64 -w 64 {file}.der > {file}.b64"
            ),
        );
        assert!(out.status.success(), "{out:?}");
    };
    csr("dev-curl", "a");
    let otp = issue_otp(&relay, "dev-curl", None);
    let post = |auth: &str, ctype: &str, file: &str| {
        format!("{base}/simpleenroll {auth} -H 'Content-Type: {ctype}' --data-binary @{file}")
    };
    let good = format!("-u dev-curl:{otp}");

    // Bad input first: each refused, and the OTP still good afterwards.
    let (code, body) = run(&post("", "application/pkcs10", "a.b64"));
    assert_eq!(code, "401", "{body}");
    let out = sh(
        w,
        &format!(
            "curl -sS -D - -o /dev/null --cacert {} -H 'Content-Type: application/pkcs10' \
             --data-binary @a.b64 https://localhost:{}/.well-known/est/simpleenroll",
            pki.ca_cert.display(),
            relay.est_port
        ),
    );
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(headers.contains("www-authenticate: basic"), "{headers}");
    let (code, body) = run(&post(&good, "text/plain", "a.b64"));
    assert_eq!(code, "415", "{body}");
    std::fs::write(w.join("junk.b64"), "this is not base64!").unwrap();
    let (code, body) = run(&post(&good, "application/pkcs10", "junk.b64"));
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("base64"), "{body}");
    std::fs::write(w.join("notcsr.b64"), "AAECAwQF").unwrap();
    let (code, body) = run(&post(&good, "application/pkcs10", "notcsr.b64"));
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("PKCS#10"), "{body}");
    std::fs::write(w.join("big.b64"), "A".repeat(200 * 1024)).unwrap();
    let (code, _) = run(&post(&good, "application/pkcs10", "big.b64"));
    assert_eq!(code, "413");
    // A CSR whose signature does not verify: its last byte flipped.
    let mut der = std::fs::read(w.join("a.der")).unwrap();
    *der.last_mut().unwrap() ^= 0x01;
    std::fs::write(w.join("badsig.der"), &der).unwrap();
    sh(w, "base64 -w0 badsig.der > badsig.b64");
    let (code, body) = run(&post(&good, "application/pkcs10", "badsig.b64"));
    assert_eq!(code, "400", "{body}");
    // A CSR for another device than the Basic user.
    csr("someone-else", "b");
    let (code, body) = run(&post(&good, "application/pkcs10", "b.b64"));
    assert_eq!(code, "403", "{body}");
    assert!(body.contains("someone-else"), "{body}");
    let (code, _) = run(&post("-u dev-curl:wrong", "application/pkcs10", "a.b64"));
    assert_eq!(code, "401");

    // Now the real enrollment: a certificate openssl reads, CN = device.
    let (code, body) = run(&post(&good, "application/pkcs10", "a.b64"));
    assert_eq!(code, "200", "{body}");
    let out = sh(
        w,
        "base64 -d body | openssl pkcs7 -inform DER -print_certs > a.pem && \
         openssl x509 -in a.pem -noout -subject -issuer",
    );
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(shown.contains("CN = dev-curl"), "{shown}");
    assert!(shown.contains("iot-relay device CA"), "{shown}");
    // Replayed: refused.
    let (code, body) = run(&post(&good, "application/pkcs10", "a.b64"));
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("already used"), "{body}");

    // Re-enrollment with the issued certificate (curl's TLS client cert),
    // and without one: refused.
    csr("dev-curl", "c");
    let reenroll =
        format!("{base}/simplereenroll -H 'Content-Type: application/pkcs10' --data-binary @c.b64");
    let (code, _) = run(&reenroll);
    assert_eq!(code, "401");
    let (code, body) = run(&format!("{reenroll} --cert a.pem --key a.key"));
    assert_eq!(code, "200", "{body}");
    // Nothing was issued for any bad request: exactly two certificates.
    sync_relay_log(&mut relay);
    assert_eq!(
        relay.proc.count("EST issued a device certificate"),
        2,
        "{:?}",
        relay.proc.seen
    );
}

/// strongSwan's `pki --estca` / `pki --est`, a third-party EST client.
#[test]
fn strongswan_pki_enrolls_and_re_enrolls() {
    if !have("pki") {
        eprintln!(
            "SKIPPED: strongSwan's pki is not installed (apt-get install strongswan-pki \
             libstrongswan-extra-plugins; scripts/setup does)"
        );
        return;
    }
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 0);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let url = format!("https://localhost:{}", relay.est_port);
    let tls_ca = pki.ca_cert.display().to_string();
    let ok = |script: &str| {
        let out = sh(w, script);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (done, log) = ok(&format!(
        "pki --estca --url {url} --cacert {tls_ca} --caout estca.pem --outform pem"
    ));
    assert!(done, "{log}");
    assert!(log.contains("iot-relay device CA"), "{log}");

    let otp = issue_otp(&relay, "sw-device", None);
    let (done, log) = ok(
        "pki --gen --type ecdsa --size 256 --outform pem > k1.pem && \
         pki --req --in k1.pem --dn CN=sw-device --outform pem > r1.pem",
    );
    assert!(done, "{log}");
    let enroll = format!(
        "pki --est --url {url} --cacert {tls_ca} --cacert estca.pem --in r1.pem \
         --userpass sw-device:{otp} --outform pem"
    );
    let (done, log) = ok(&format!("{enroll} > c1.pem"));
    assert!(done, "{log}");
    assert!(log.contains("Issued certificate is trusted"), "{log}");
    let (_, shown) = ok("openssl x509 -in c1.pem -noout -subject");
    assert!(shown.contains("sw-device"), "{shown}");

    // The same OTP again: refused (HTTP 401).
    let (done, log) = ok(&format!("{enroll} > again.pem"));
    assert!(!done, "{log}");
    assert!(log.contains("401"), "{log}");

    // Re-enrollment with the issued certificate and a new key.
    let (done, log) = ok(&format!(
        "pki --gen --type ecdsa --size 256 --outform pem > k2.pem && \
         pki --req --in k2.pem --dn CN=sw-device --outform pem > r2.pem && \
         pki --est --url {url} --cacert {tls_ca} --cacert estca.pem --in r2.pem \
         --cert c1.pem --key k1.pem --outform pem > c2.pem"
    ));
    assert!(done, "{log}");
    let (_, a) = ok("openssl x509 -in c1.pem -noout -serial");
    let (_, b) = ok("openssl x509 -in c2.pem -noout -serial -subject");
    assert!(b.contains("sw-device") && a != b, "{a} {b}");
}

/// The README's provisioning walk-through, run as written (with free
/// ports): relay, OTP with curl, the agent configured with it, its
/// certificate, its tunnel, the page through the relay.
#[test]
fn the_readme_provisioning_walk_through_works() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let script: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "<!-- provisioning walk-through -->")
        .skip(2)
        .take_while(|l| *l != "```")
        .collect();
    assert!(script[0].starts_with("AGENTS_PORT="), "{script:?}");
    use crate::common::servers::free_port;
    let first = format!(
        "AGENTS_PORT={} API_PORT={} EST_PORT={} PIPE_PORTS={} PAGE_PORT={}",
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port()
    );
    let body = script[1..].join("\n");
    let bins = Path::new(crate::common::tunnel::RELAY_BIN)
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let full = format!("trap 'kill $(jobs -p) 2>/dev/null' EXIT\n{first}\n{body}\n");
    let out = std::process::Command::new("timeout")
        .args(["120", "bash", "-euo", "pipefail", "-c", &full])
        .env_clear()
        .env("PATH", path)
        .env(
            "IOT_AGENT_NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        )
        .env("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port()))
        .env("IOT_AGENT_SNAPD__SOCKET", "/nonexistent/snapd.socket")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .trim_end()
            .ends_with("hello from a provisioned device"),
        "{report}"
    );
    assert!(stdout.contains("state:       enrolled"), "{report}");
    assert!(
        stdout.contains("CN=device-1") && stdout.contains("iot-relay device CA"),
        "{report}"
    );
}

/// In a snap the spent OTP leaves the snap configuration (`snapctl unset`),
/// as well as never being written to the device's disk.
#[test]
fn in_a_snap_the_spent_otp_is_unset_from_the_snap_configuration() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 0);
    let otp = issue_otp(&relay, DEVICE, None);
    // A fake snapctl over a JSON document: `get -d KEYS` and `unset KEY`.
    let doc = dir.path().join("snap-config.json");
    std::fs::write(
        &doc,
        serde_json::json!({"provisioning": {"otp": otp}}).to_string(),
    )
    .unwrap();
    let bin = dir.path().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        r#"#!/bin/sh
exec python3 - "$@" <<'PY'
import json, sys
path = "{doc}"
args = sys.argv[1:]
with open(path + ".args", "a") as f:
    f.write(" ".join(args) + "\n")
doc = json.load(open(path))
if args[:2] == ["get", "-d"]:
    print(json.dumps({{k: doc[k] for k in args[2:] if k in doc}}))
elif args[:1] == ["unset"]:
    for key in args[1:]:
        parts = key.split(".")
        d = doc
        for p in parts[:-1]:
            d = d.get(p, {{}})
        d.pop(parts[-1], None)
    json.dump(doc, open(path, "w"))
else:
    sys.exit("fake snapctl: unexpected " + " ".join(args))
PY
"#,
        doc = doc.display()
    );
    let fake = bin.join("snapctl");
    std::fs::write(&fake, script).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut env = provisioned_env(&pki, dir.path(), &relay, DEVICE, "", &[], &[]);
    env.retain(|(k, _)| *k != "IOT_AGENT_PROVISIONING__OTP");
    env.push(("SNAP_NAME", "iot-agent".into()));
    env.push((
        "PATH",
        format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    ));
    let mut agent = start(&env);
    agent.wait_for_all(&[
        "provisioning: enrolled",
        "removed the spent provisioning.otp from the snap configuration",
    ]);
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&doc).unwrap()).unwrap();
    assert_eq!(after, serde_json::json!({"provisioning": {}}));
    let calls = std::fs::read_to_string(dir.path().join("snap-config.json.args")).unwrap();
    assert!(calls.contains("unset provisioning.otp"), "{calls}");
    assert_eq!(
        all_files_contain(&dir.path().join("data"), &otp),
        Vec::<String>::new()
    );
}

/// An EST server that wraps its base64 (CRLF every 64 columns): the agent
/// reads it as well as the relay's unwrapped answers.
#[test]
fn the_agent_reads_line_wrapped_answers_of_another_est_server() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(&pki, dir.path(), 0);
    let port = crate::common::est::wrapping_est_server(&pki, dir.path());
    let env = provisioned_env(
        &pki,
        dir.path(),
        &relay,
        DEVICE,
        "any-otp",
        &[],
        &[(
            "IOT_AGENT_PROVISIONING__URL",
            format!("https://localhost:{port}"),
        )],
    );
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");
    let st = status(&env);
    assert!(
        st["certificate"]["subject"]
            .as_str()
            .unwrap()
            .contains(DEVICE),
        "{st}"
    );
    let bundle = std::fs::read_to_string(dir.path().join("data/provisioning/ca.pem")).unwrap();
    assert_eq!(
        bundle.trim(),
        std::fs::read_to_string(dir.path().join("double-ca.pem"))
            .unwrap()
            .trim()
    );
}

/// The agent binds each CSR to its TLS connection (RFC 9266 tls-exporter
/// as the challengePassword): a relay that requires it serves the agent
/// and refuses an unbound CSR and one bound to another connection.
#[test]
fn csrs_are_bound_to_their_tls_connection() {
    let pki = TestPki::new("unused-client");
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(
        &pki,
        dir.path(),
        0,
        &[("IOT_RELAY_EST__REQUIRE_BINDING", "true".into())],
    );
    let otp = issue_otp(&relay, DEVICE, None);
    let env = provisioned_env(&pki, dir.path(), &relay, DEVICE, &otp, &[], &[]);
    let mut agent = start(&env);
    agent.wait_for("provisioning: enrolled");

    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(
        w.join("req.cnf"),
        "[req]\nprompt = no\ndistinguished_name = dn\nattributes = attrs\n\
         [dn]\nCN = dev-b\n[attrs]\nchallengePassword = AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    )
    .unwrap();
    let out = sh(
        w,
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout k.pem \
         -subj /CN=dev-b -outform DER 2>/dev/null | base64 -w0 > plain.b64 && \
         openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout k2.pem \
         -config req.cnf -outform DER 2>/dev/null | base64 -w0 > other.b64",
    );
    assert!(out.status.success(), "{out:?}");
    let other_otp = issue_otp(&relay, "dev-b", None);
    for (file, want) in [
        ("plain.b64", "requires the TLS channel binding"),
        ("other.b64", "not this TLS connection's channel binding"),
    ] {
        let out = sh(
            w,
            &format!(
                "curl -sS --cacert {} -u dev-b:{other_otp} -H 'Content-Type: application/pkcs10' \
                 --data-binary @{file} -w ' %{{http_code}}' \
                 https://localhost:{}/.well-known/est/simpleenroll",
                pki.ca_cert.display(),
                relay.est_port
            ),
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.trim_end().ends_with("400"), "{text}");
        assert!(text.contains(want), "{text}");
    }
    sync_relay_log(&mut relay);
    assert_eq!(relay.proc.count("EST issued a device certificate"), 1);
}
