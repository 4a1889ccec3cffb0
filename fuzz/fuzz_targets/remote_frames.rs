//! The remote terminal's and browser's messages, as they arrive from the
//! broker: input frames, request bodies, and (on the operator's side) the
//! agent's output and response frames.
#![no_main]
use iot_agent::services::browser::protocol as browser;
use iot_agent::services::terminal::protocol as terminal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let b = bytes::Bytes::copy_from_slice(data);
    if let Ok(f) = terminal::InputFrame::decode(&b) {
        assert_eq!(f.encode(), b);
    }
    if let Ok(f) = terminal::OutFrame::decode(&b) {
        let _ = f.seq();
    }
    let _ = browser::Frame::decode(&b);
    let _ = serde_json::from_slice::<terminal::Open>(data);
    let _ = serde_json::from_slice::<terminal::Resize>(data);
    let _ = serde_json::from_slice::<terminal::Ack>(data);
    if let Ok(r) = serde_json::from_slice::<browser::Request>(data) {
        let _ = r.body_bytes();
        let _ = iot_agent::services::browser::check_origin(&r.origin);
    }
});
