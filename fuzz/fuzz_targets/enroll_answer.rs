//! The identity service's answer to an enrollment.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<iot_agent::identity::wire::EnrollResponse>(data) {
        if let Some(e) = r.enrollment {
            let _ = iot_agent::identity::Credentials::from_enrollment(&e);
            let _ = iot_agent::identity::credentials::device_data(&e);
        }
    }
});
