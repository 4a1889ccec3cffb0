//! The agent's own snap configuration through the mirror.
//!
//! The mirror can `PUT /v2/snaps/{snap}/conf` for any snap, the agent's own
//! included. Most of the agent's keys are fine to set that way, but a few
//! change what the agent itself executes as root (`watchdog.reboot.command`
//! is a shell command) or switch off the protection of the mirror itself
//! (`nats.insecure`): setting those through a NATS message would turn a
//! NATS login into root on the device. They are refused here and can only
//! be set by someone who is root already (`snap set`).

use crate::snapd::Request;
use http::Method;
use serde_json::Value;

/// Keys of the agent's configuration the mirror never sets for its snap.
pub const PROTECTED_KEYS: &[&str] = &["watchdog.reboot.command", "nats.insecure"];

/// The agent's snap name: `$SNAP_INSTANCE_NAME` in a snap (parallel
/// installs have their own), else the snap's name.
pub fn own_snap_name() -> String {
    std::env::var("SNAP_INSTANCE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "iot-agent".to_string())
}

/// The refusal for a request that would set a protected key of `own_snap`;
/// `None` for every other request.
pub fn refusal(own_snap: &str, req: &Request) -> Option<String> {
    if req.method != Method::PUT {
        return None;
    }
    let path = req.path.split('?').next().unwrap_or_default();
    let conf_of = path
        .strip_prefix("/v2/snaps/")
        .and_then(|r| r.strip_suffix("/conf"))?;
    if conf_of != own_snap {
        return None;
    }
    let body: Value = serde_json::from_slice(req.body.as_deref()?).ok()?;
    let mut keys = Vec::new();
    flatten("", &body, &mut keys);
    let hit = keys.iter().find_map(|k| {
        PROTECTED_KEYS
            .iter()
            .find(|p| touches(k, p))
            .map(|p| (k.clone(), *p))
    })?;
    Some(format!(
        "setting {:?} of {own_snap} through the mirror is refused: it would change {:?}, which \
         the agent acts on as root; set it with `snap set {own_snap}` on the device",
        hit.0, hit.1
    ))
}

/// Every key path a conf body sets: `{"a":{"b":1},"c.d":2}` sets `a.b` and
/// `c.d`; an empty object or a non-object value sets its own path.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        _ if !prefix.is_empty() => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Whether setting `key` sets or replaces `protected`: the key itself, one
/// of its parents (`watchdog`, `watchdog.reboot`), or a part of it.
fn touches(key: &str, protected: &str) -> bool {
    key == protected
        || protected
            .strip_prefix(key)
            .is_some_and(|rest| rest.starts_with('.'))
        || key
            .strip_prefix(protected)
            .is_some_and(|rest| rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn put(path: &str, body: &str) -> Request {
        Request {
            method: Method::PUT,
            path: path.into(),
            body: Some(Bytes::from(body.to_string())),
            content_type: Some("application/json"),
            timeout: None,
        }
    }

    #[test]
    fn every_spelling_of_the_reboot_command_is_refused_for_the_own_snap_only() {
        for body in [
            r#"{"watchdog.reboot.command":"sh -c id"}"#,
            r#"{"watchdog":{"reboot":{"command":"id"}}}"#,
            r#"{"watchdog.reboot":{"command":"id"}}"#,
            r#"{"watchdog":{"reboot.command":"id"}}"#,
            r#"{"watchdog":null}"#,
            r#"{"watchdog.threshold":"1h","nats.insecure":true}"#,
            r#"{"nats":{"insecure":"true"}}"#,
        ] {
            let r = put("/v2/snaps/iot-agent/conf", body);
            let why = refusal("iot-agent", &r).unwrap_or_else(|| panic!("{body} passed"));
            assert!(why.contains("snap set iot-agent"), "{why}");
            assert!(
                refusal("iot-agent", &put("/v2/snaps/other/conf", body)).is_none(),
                "{body}"
            );
        }
        for body in [
            r#"{"watchdog.threshold":"2h"}"#,
            r#"{"watchdog":{"enabled":false}}"#,
            r#"{"nats.readonly":true}"#,
            "not json",
        ] {
            assert!(
                refusal("iot-agent", &put("/v2/snaps/iot-agent/conf?x=1", body)).is_none(),
                "{body}"
            );
        }
        let mut get = put("/v2/snaps/iot-agent/conf", "{}");
        get.method = Method::GET;
        assert!(refusal("iot-agent", &get).is_none());
    }
}
