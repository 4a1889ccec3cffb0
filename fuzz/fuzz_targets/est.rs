//! EST remote input (`iot_agent::est::fuzz_all`): base64 bodies wrapped or
//! not, certs-only PKCS#7 (what the agent reads from an EST server), PKCS#10
//! CSRs with their signatures (what the relay reads from devices), HTTP
//! Basic credentials and Retry-After values.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    iot_agent::est::fuzz_all(data);
});
