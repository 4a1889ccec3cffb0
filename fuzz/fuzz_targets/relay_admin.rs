//! The relay's connection-management API bodies and path parts as a
//! client may send them: the accept filter, an agent registration, device
//! ids and addresses, the status stream's query.
#![no_main]
use iot_agent::relay::accept::check_device_id;
use iot_agent::relay::admin::check_address;
use iot_agent::relay::mapping_api::parse_form;
use iot_agent::relay::registry::{Filter, Registration};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = serde_json::from_slice::<Filter>(data) {
        for d in &f.device_ids {
            let _ = check_device_id(d);
        }
    }
    if let Ok(r) = serde_json::from_slice::<Registration>(data) {
        let _ = check_device_id(&r.device_id);
        let _ = check_address(&r.address);
    }
    let text = String::from_utf8_lossy(data);
    let _ = check_address(&text);
    let _ = check_device_id(&text);
    let _ = parse_form(&text);
});
