//! Assertion text (from snapd, or from a DMS `ack` action).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(all) = iot_agent::snapd::Assertion::parse_all(text) {
            for a in all {
                let _ = (a.kind(), a.body(), a.signature());
            }
        }
    }
});
