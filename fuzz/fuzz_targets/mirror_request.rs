//! A snapd mirror request, as it arrives from NATS or MQTT: the subject
//! (first line: `snapd.v2.{segments}.{method}`) and the payload (the
//! rest). Whatever it asks, it reaches snapd only as a `/v2/` path that is
//! a valid URI, and replies go only under `snapd/reply/`.
#![no_main]
use iot_agent::bus::topics::{Topic, SNAPD_MIRROR, SNAPD_REPLY};
use iot_agent::services::mirror::{own_conf, request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (subject, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let subject = String::from_utf8_lossy(subject);
    // As the mirror splits it.
    let prefix = Topic::fixed(SNAPD_MIRROR).nats();
    let rest = subject
        .strip_prefix(prefix.as_str())
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or("");
    let segments: Vec<&str> = rest.split('.').collect();
    match request::parse(&segments, payload) {
        Ok(r) => {
            let path = &r.request.path;
            assert!(path.starts_with("/v2/"), "{path}");
            assert!(!path.split(['/', '?']).any(|s| s == ".."), "{path}");
            // What the snapd transport builds its URI from.
            let uri = format!("unix://00:0{path}");
            assert!(uri.parse::<http::Uri>().is_ok(), "{path:?}");
            if let Some(t) = &r.reply_to {
                assert!(t.mqtt().starts_with(&format!("{SNAPD_REPLY}/")), "{t}");
            }
            let _ = own_conf::refusal("iot-agent", &r.request);
        }
        Err(e) => {
            let _ = e.to_envelope();
        }
    }
    if let Some(t) = request::reply_to_of(payload) {
        assert!(t.mqtt().starts_with(&format!("{SNAPD_REPLY}/")), "{t}");
    }
});
