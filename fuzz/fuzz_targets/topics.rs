//! Topics and subjects as messages arrive on them (MQTT `a/b`, NATS
//! `a.b`): the segments a service routes on, the protected-tree check,
//! and the per-serial topic built from a serial the DMS chose.
#![no_main]
use iot_agent::bus::topics::{self, Topic};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let bases = [
        Topic::fixed(topics::SERIAL_ACTIONS),
        Topic::fixed(topics::SNAPD_MIRROR),
        Topic::fixed(topics::TERMINAL),
        Topic::fixed(topics::BROWSER),
        Topic::fixed(topics::DMS_TERMINAL),
        Topic::fixed(topics::DMS_BROWSER),
    ];
    for t in [Topic::fixed(s), Topic::from_nats(s)] {
        let _ = t.nats();
        for b in &bases {
            if let Some(segs) = t.strip_prefix(b) {
                assert!(segs.iter().all(|g| !g.contains('/')));
            }
        }
    }
    let _ = topics::is_protected(s);
    if let Ok(seg) = topics::segment(s) {
        // A checked segment adds exactly one level, in both forms.
        let t = Topic::fixed("a").join(&[seg]).expect("checked");
        assert_eq!(Topic::from_nats(&t.nats()), t);
        assert_eq!(t.strip_prefix(&Topic::fixed("a")), Some(vec![seg]));
    }
    if let Ok(t) = topics::serial_actions(s) {
        assert_eq!(t.strip_prefix(&bases[0]).map(|v| v.len()), Some(1));
    }
    let _ = topics::export_intake(s);
});
