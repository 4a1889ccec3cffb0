//! A signed action envelope (JWS, flattened JSON), as it arrives from the
//! broker: parsed, then checked by a policy with one key. Nothing it is fed
//! may panic, and nothing unsigned or badly signed may pass.
#![no_main]
use iot_agent::signing::{Admit, Envelope, Policy};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let _ = Envelope::parse(data);
    // The public key of the seed [1; 32] (the tests' "ops-a").
    let key = iot_agent::signing::keys::parse_entry(
        "ops-a:iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w",
    )
    .expect("a valid entry");
    let policy = Policy::new(
        [key],
        true,
        Duration::from_secs(300),
        Duration::from_secs(3600),
    );
    match policy.admit(data, &["dev"], 1_800_000_000) {
        // Forging a signature of that key is not what a fuzzer finds; a
        // pass means the input embeds a real one, for its own id.
        Ok(Admit::Signed(v)) => assert!(!v.nonce.is_empty()),
        Ok(Admit::Unsigned(_)) => panic!("unsigned passed with signatures required"),
        Err(r) => assert!(!r.message().is_empty()),
    }
});
