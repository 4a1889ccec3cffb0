//! The tunnel's frames as the other side may send them: control messages
//! on the control stream, the open frame and its answer on data streams,
//! and the relay's mapping API form (remote input of both halves).
#![no_main]
use iot_agent::relay::mapping_api::parse_form;
use iot_agent::relay::pipes::Spec;
use iot_agent::subsystems::tunnel::protocol::{self, Control, Open, Opened};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((payload, used))) = protocol::split_frame(rest) {
        let _ = protocol::decode::<Control>(payload);
        let _ = protocol::decode::<Open>(payload);
        let _ = protocol::decode::<Opened>(payload);
        rest = &rest[used..];
    }
    if let Ok(text) = std::str::from_utf8(data) {
        for (k, v) in parse_form(text) {
            if k == "mapping" {
                let _ = serde_json::from_str::<Spec>(&v);
            }
        }
    }
});
