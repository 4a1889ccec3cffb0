//! A per-serial action (`devices/actions/{serial}/...`), as it arrives from
//! the DMS broker: the `required-install` payload, and the id read from
//! the payload of an action topic the device does not know.
#![no_main]
use iot_agent::services::per_serial::request::{self, RISKS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match request::parse(data) {
        Ok(r) => {
            assert!(!r.id.trim().is_empty());
            assert!((1..=256).contains(&r.snaps.len()));
            for s in &r.snaps {
                // Always `track/risk[/branch]` with a known risk.
                let parts: Vec<&str> = s.channel.split('/').collect();
                assert!((2..=3).contains(&parts.len()), "{}", s.channel);
                assert!(RISKS.contains(&parts[1]), "{}", s.channel);
            }
        }
        Err(r) => assert!(!r.message.is_empty()),
    }
    let _ = serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string));
});
