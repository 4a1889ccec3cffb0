//! The cost of verifying signed actions (`cargo bench --bench signing`):
//! `Policy::admit` on a signed `install` envelope (parse the envelope,
//! base64, Ed25519 `verify_strict`, the claims) against the same call on
//! the unsigned action in the same run and against the bare parse (what an
//! unsigned action paid before signing existed), and the ledger's accept
//! of one action on a file (fsync'd), the cost every action already pays,
//! for scale. Results: docs/benchmarks.md.

use iot_agent::services::dms::ledger::Ledger;
use iot_agent::services::dms::request::Request;
use iot_agent::signing::{self, Admit, Policy};
use std::time::{Duration, Instant};

fn per_op(n: usize, mut f: impl FnMut(usize)) -> Duration {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed() / n as u32
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 20_000 } else { 100 };
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let policy = |required| {
        Policy::new(
            [("ops".to_string(), key.verifying_key())],
            required,
            Duration::from_secs(300),
            Duration::from_secs(3600),
        )
    };
    let (off, on) = (policy(false), policy(true));
    let now = iot_agent::clock::now_s();
    let action = br#"{"id":"b1","action":"install","snap":"hello-world","data":""}"#;
    let envelope = signing::sign(&key, "ops", "dev", now, now + 600, action).unwrap();
    // The parse every action paid before signing existed.
    let parse_only = per_op(n, |_| {
        let _ = iot_agent::services::dms::request::parse(action).unwrap();
    });
    let unsigned = per_op(n, |_| {
        let a = off.admit(action, &["dev"], now).unwrap();
        assert!(matches!(a, Admit::Unsigned(_)));
        let _ = iot_agent::services::dms::request::parse(action).unwrap();
    });
    let signed = per_op(n, |_| {
        let Admit::Signed(v) = on.admit(envelope.as_bytes(), &["dev"], now).unwrap() else {
            panic!("not verified")
        };
        let _ = iot_agent::services::dms::request::parse(&v.payload).unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(&dir.path().join("dms.db")).unwrap();
    let m = (n / 20).max(10);
    let accept = per_op(m, |i| {
        let r = Request {
            id: format!("r{i}"),
            action: "install".into(),
            snap: "hello".into(),
            data: String::new(),
        };
        ledger.accept(&[(&r, "d")]).unwrap();
    });
    println!(
        "parse only {parse_only:>9.3?} | admit+parse: unsigned {unsigned:>9.3?} (/parse {:.1}) | signed (verify) {signed:>9.3?} (/unsigned {:.1}) | ledger accept (1 fsync'd commit) {accept:>9.3?} | signed/accept {:.3}",
        unsigned.as_secs_f64() / parse_only.as_secs_f64(),
        signed.as_secs_f64() / unsigned.as_secs_f64(),
        signed.as_secs_f64() / accept.as_secs_f64()
    );
}
