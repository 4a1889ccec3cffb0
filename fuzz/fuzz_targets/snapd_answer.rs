//! Whatever snapd's socket answers: the envelope and the json-seq logs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let resp = iot_agent::snapd::RawResponse {
        status: 200,
        headers: http::HeaderMap::new(),
        body: bytes::Bytes::copy_from_slice(data),
    };
    if let Ok(env) = iot_agent::snapd::envelope("GET /v2/x", &resp) {
        let _ = env.api_error();
        let _ = serde_json::from_value::<Vec<iot_agent::snapd::Change>>(env.result.clone());
        let _ = serde_json::from_value::<Vec<iot_agent::snapd::Snap>>(env.result);
    }
    let _ = iot_agent::snapd::parse_json_seq(data);
});
