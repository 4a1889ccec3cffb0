//! A quick, seeded stand-in for the fuzzers in `fuzz/` (run those with
//! `cargo fuzz run <target>`): every parser of remote input gets valid
//! samples, mutated thousands of times, and must answer without panicking.

use iot_agent::services::dms::request;
use iot_agent::snapd::{self, Assertion};
use rand::{Rng, SeedableRng};

const SAMPLES: &[&str] = &[
    r#"{"id":"1","action":"install","snap":"hello","data":""}"#,
    r#"{"id":"2","action":"setconf","snap":"x","data":"{\"a\":1}"}"#,
    r#"{"type":"sync","status-code":200,"status":"OK","result":[{"id":"1","kind":"seed","summary":"s","status":"Done","ready":true,"spawn-time":"2026-01-01T00:00:00Z","tasks":[{"id":"1","kind":"k","summary":"","status":"Done","progress":{"label":"","done":1,"total":1},"spawn-time":"x"}]}]}"#,
    r#"{"type":"error","status-code":409,"status":"Conflict","result":{"message":"m","kind":"snap-change-conflict","value":"x"}}"#,
    "type: model\nauthority-id: generic\nbrand-id: generic\nmodel: m\nbody-length: 3\n\nabc\n\nSIG",
    "\u{1e}{\"timestamp\":\"t\",\"message\":\"m\",\"sid\":\"s\",\"pid\":\"1\"}\n",
    r#"{"rows":24,"cols":80,"command":"echo a,b","user":"op","reply-to":"t1"}"#,
    r#"{"origin":"127.0.0.1:8080","method":"GET","path":"/x?y","headers":[["cookie","a=b"]],"body":"AAE="}"#,
    "\0\0\0\0\0\0\0\x01echo",
    "x\0\0\0\0\0\0\0\x02{\"reason\":\"idle\"}",
    "h\0\0\0\0\0\0\0\x01{\"status\":200,\"headers\":[]}",
    r#"{"code":"","message":"","enrollment":{"id":"d","status":2,"deviceData":"","device":{},"credentials":{"privateKey":"eA==","certificate":"eA==","mqttUrl":"h","mqttPort":"1"},"organization":{"id":"o","rootcert":"eA=="}}}"#,
];

fn mutate(rng: &mut impl Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..8) {
        match rng.random_range(0..4) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] = rng.random();
            }
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v.truncate(i);
            }
            2 => {
                let i = rng.random_range(0..=v.len());
                let b = *b"{}[]\":,\n \\0-x"
                    .get(rng.random_range(0..14))
                    .unwrap_or(&b'x');
                v.insert(i, b);
            }
            _ if v.len() > 1 => {
                let (a, b) = (rng.random_range(0..v.len()), rng.random_range(0..v.len()));
                v.swap(a, b);
            }
            _ => {}
        }
    }
    v
}

#[test]
fn parsers_of_remote_input_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x10_7a6e);
    for round in 0..20_000 {
        let sample = SAMPLES[round % SAMPLES.len()].as_bytes();
        let input = mutate(&mut rng, sample);
        let _ = request::parse(&input);
        let text = String::from_utf8_lossy(&input);
        let _ = Assertion::parse_all(&text);
        let resp = snapd::RawResponse {
            status: 200,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from(input.clone()),
        };
        if let Ok(env) = snapd::envelope("GET /v2/x", &resp) {
            let _ = serde_json::from_value::<Vec<snapd::Change>>(env.result.clone());
        }
        let _ = snapd::parse_json_seq(&input);
        remote_frames(&input);
        if let Ok(r) = serde_json::from_slice::<iot_agent::identity::wire::EnrollResponse>(&input) {
            if let Some(e) = r.enrollment {
                let _ = iot_agent::identity::Credentials::from_enrollment(&e);
            }
        }
    }
}

/// The signature envelope (the fuzz target `signed_envelope`): mutations of
/// a real envelope never panic, and none that passes carries other bytes
/// than the action that was signed.
#[test]
fn signed_envelopes_never_panic_and_never_verify_other_bytes() {
    use iot_agent::signing::{self, Admit, Policy};
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let policy = Policy::new(
        [("ops-a".to_string(), key.verifying_key())],
        true,
        std::time::Duration::from_secs(300),
        std::time::Duration::from_secs(3600),
    );
    let now = 1_800_000_000;
    let action = br#"{"id":"f1","action":"install","snap":"hello","data":""}"#;
    let good = signing::sign(&key, "ops-a", "dev", now, now + 60, action).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5167);
    for _ in 0..20_000 {
        let input = mutate(&mut rng, good.as_bytes());
        let _ = signing::Envelope::parse(&input);
        match policy.admit(&input, &["dev"], now) {
            Ok(Admit::Signed(v)) => {
                assert_eq!(v.payload, action, "{}", String::from_utf8_lossy(&input))
            }
            Ok(Admit::Unsigned(_)) => panic!("unsigned passed with signatures required"),
            Err(r) => assert!(!r.message().is_empty()),
        }
    }
}

/// What `fuzz/fuzz_targets/remote_frames.rs` runs.
fn remote_frames(data: &[u8]) {
    use iot_agent::services::browser::protocol as browser;
    use iot_agent::services::terminal::protocol as terminal;
    let b = bytes::Bytes::copy_from_slice(data);
    if let Ok(f) = terminal::InputFrame::decode(&b) {
        assert_eq!(f.encode(), b);
    }
    let _ = terminal::OutFrame::decode(&b);
    let _ = browser::Frame::decode(&b);
    let _ = serde_json::from_slice::<terminal::Open>(data);
    let _ = serde_json::from_slice::<terminal::Resize>(data);
    if let Ok(r) = serde_json::from_slice::<browser::Request>(data) {
        let _ = r.body_bytes();
        let _ = iot_agent::services::browser::check_origin(&r.origin);
    }
}

/// The tunnel's frames and the relay's mapping form, as `fuzz/fuzz_targets/tunnel_control.rs`.
#[test]
fn tunnel_frames_and_mapping_forms_never_panic() {
    use iot_agent::relay::mapping_api::parse_form;
    use iot_agent::relay::pipes::Spec;
    use iot_agent::subsystems::tunnel::protocol::{self, Control, Open, Opened};
    let mut samples: Vec<Vec<u8>> = vec![
        protocol::encode(&Control::Hello {
            version: 1,
            device: "d".into(),
        }),
        protocol::encode(&Control::Heartbeat),
        protocol::encode(&Open {
            pipe: "p".into(),
            target: "127.0.0.1:80".into(),
        }),
        protocol::encode(&Opened::Refused { reason: "r".into() }),
        br#"mapping={"type":"private","maxconnectionsport1":1,"maxconnectionsport2":1}&x=%7B"#
            .to_vec(),
        br#"mapping=%7B%22type%22%3A%22public%22%2C%22device%22%3A%22d%22%7D"#.to_vec(),
    ];
    let two = [samples[0].clone(), samples[1].clone()].concat();
    samples.push(two);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7a_11e1);
    for round in 0..20_000 {
        let input = mutate(&mut rng, &samples[round % samples.len()]);
        let mut rest = &input[..];
        while let Ok(Some((payload, used))) = protocol::split_frame(rest) {
            let _ = protocol::decode::<Control>(payload);
            let _ = protocol::decode::<Open>(payload);
            let _ = protocol::decode::<Opened>(payload);
            rest = &rest[used..];
        }
        for (k, v) in parse_form(&String::from_utf8_lossy(&input)) {
            if k == "mapping" {
                let _ = serde_json::from_str::<Spec>(&v);
            }
        }
    }
}

/// EST bodies, CSRs and Basic credentials, as `fuzz/fuzz_targets/est.rs`.
#[test]
fn est_bodies_csrs_and_credentials_never_panic() {
    use iot_agent::est;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["d".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "device-1");
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let cert = params.self_signed(&key).unwrap().der().to_vec();
    let p7 = est::certs_only(&[cert]).unwrap();
    let samples: Vec<Vec<u8>> = vec![
        csr.clone(),
        est::encode_base64(&csr).into_bytes(),
        p7.clone(),
        est::encode_base64(&p7).into_bytes(),
        est::basic("device-1", "otp:x").into_bytes(),
        b"120".to_vec(),
        b"Wed, 02 Dec 2026 14:30:31 GMT".to_vec(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xe5_7000);
    for round in 0..6_000 {
        let input = mutate(&mut rng, &samples[round % samples.len()]);
        est::fuzz_all(&input);
    }
}

/// The relay's admin bodies, as `fuzz/fuzz_targets/relay_admin.rs`.
#[test]
fn relay_admin_bodies_never_panic() {
    use iot_agent::relay::accept::check_device_id;
    use iot_agent::relay::admin::check_address;
    use iot_agent::relay::mapping_api::parse_form;
    use iot_agent::relay::registry::{Filter, Registration};
    let samples: Vec<Vec<u8>> = vec![
        br#"{"allowAll":true}"#.to_vec(),
        br#"{"deviceIds":["device-1","a.b",""]}"#.to_vec(),
        br#"{"deviceId":"d","address":"[::1]:7100","tls":false}"#.to_vec(),
        b"deviceId=device-1&x=%7B".to_vec(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xad_31);
    for round in 0..20_000 {
        let input = mutate(&mut rng, &samples[round % samples.len()]);
        if let Ok(f) = serde_json::from_slice::<Filter>(&input) {
            for d in &f.device_ids {
                let _ = check_device_id(d);
            }
        }
        if let Ok(r) = serde_json::from_slice::<Registration>(&input) {
            let _ = check_device_id(&r.device_id);
            let _ = check_address(&r.address);
        }
        let text = String::from_utf8_lossy(&input);
        let _ = check_address(&text);
        let _ = check_device_id(&text);
        let _ = parse_form(&text);
    }
}
