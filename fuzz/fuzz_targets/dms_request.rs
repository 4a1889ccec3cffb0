//! A DMS action request, as it arrives from the broker.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match iot_agent::services::dms::request::parse(data) {
        Ok(r) => assert!(!r.id.is_empty()),
        Err(resp) => assert!(!resp.success && !resp.message.is_empty()),
    }
});
