//! The topic vocabulary: every topic and subject the agent uses, written
//! once, in MQTT form (`a/b/c`). [`Topic::nats`] gives the NATS subject
//! (`a.b.c`), mapping wildcards (`+` -> `*`, `#` -> `>`), so a service
//! written against a [`Topic`] runs on either transport.
#![warn(missing_docs)]

use std::fmt;

/// A topic in MQTT form.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(String);

/// A variable part of a topic (device id, serial, change id) was unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} cannot be part of a topic: only letters, digits, '-' and '_' are allowed")]
pub struct BadSegment {
    /// The value refused.
    pub value: String,
}

impl Topic {
    /// A topic from fixed text (the constants below).
    pub fn fixed(s: &str) -> Topic {
        Topic(s.to_string())
    }

    /// The MQTT form.
    pub fn mqtt(&self) -> &str {
        &self.0
    }

    /// The NATS subject.
    pub fn nats(&self) -> String {
        self.0
            .split('/')
            .map(|seg| match seg {
                "+" => "*",
                "#" => ">",
                s => s,
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    /// The topic of a NATS subject.
    pub fn from_nats(subject: &str) -> Topic {
        Topic(
            subject
                .split('.')
                .map(|seg| match seg {
                    "*" => "+",
                    ">" => "#",
                    s => s,
                })
                .collect::<Vec<_>>()
                .join("/"),
        )
    }

    /// Appends checked segments.
    pub fn join(&self, segments: &[&str]) -> Result<Topic, BadSegment> {
        let mut s = self.0.clone();
        for seg in segments {
            s.push('/');
            s.push_str(segment(seg)?);
        }
        Ok(Topic(s))
    }

    /// The segments after `prefix`, if the topic is under it.
    pub fn strip_prefix(&self, prefix: &Topic) -> Option<Vec<&str>> {
        let rest = self.0.strip_prefix(prefix.0.as_str())?;
        if rest.is_empty() {
            return Some(Vec::new());
        }
        Some(rest.strip_prefix('/')?.split('/').collect())
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a variable topic segment: it must not add levels, wildcards or
/// (in NATS form) tokens.
pub fn segment(s: &str) -> Result<&str, BadSegment> {
    if !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(s)
    } else {
        Err(BadSegment {
            value: s.chars().take(64).collect(),
        })
    }
}

/// Removes every character outside `[a-zA-Z0-9_-]` (the DMS's rule for
/// serials in per-serial action topics).
pub fn sanitize_serial(serial: &str) -> String {
    serial
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect()
}

// ---- The vocabulary ----------------------------------------------------

/// DMS -> agent: management actions for a device id (QoS 1).
pub fn dms_actions(device_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed("devices/sub").join(&[device_id])
}

/// Agent -> DMS: action responses (QoS 1, not retained).
pub fn dms_responses(device_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed("devices/pub").join(&[device_id])
}

/// Agent -> DMS: heartbeat (QoS 0).
pub fn dms_health(device_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed("devices/health").join(&[device_id])
}

/// Agent -> DMS: metrics in InfluxDB line protocol (QoS 0).
pub fn dms_metrics(org_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed("metrics").join(&[org_id])
}

/// Relay -> NATS: a tunnel agent's connection status events.
pub fn relay_status(device_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed("relay/status").join(&[device_id])
}

/// Relay -> relay: a mapping request (`op` is `add` or `remove`)
/// forwarded to the relay that holds the device or serves the pipe.
pub fn relay_cluster_mapping(relay_id: &str, op: &str) -> Result<Topic, BadSegment> {
    Topic::fixed("relay/cluster").join(&[relay_id, "mapping", op])
}

/// Root of the per-serial action trees.
pub const SERIAL_ACTIONS: &str = "devices/actions";

/// The per-serial action tree `devices/actions/{sanitized serial}`.
pub fn serial_actions(serial: &str) -> Result<Topic, BadSegment> {
    Topic::fixed(SERIAL_ACTIONS).join(&[&sanitize_serial(serial)])
}

/// Root of the generic snapd mirror: `snapd/v2/{path..}/{method}`.
pub const SNAPD_MIRROR: &str = "snapd/v2";
/// Change progress events: `snapd/events/changes/{id}`.
pub const SNAPD_CHANGE_EVENTS: &str = "snapd/events/changes";
/// Answers to mirror requests that arrived without a NATS reply subject
/// (MQTT clients): `snapd/reply/{token}`, named by the request's `reply-to`.
/// Inside `snapd/#`, so only users allowed there can read them.
pub const SNAPD_REPLY: &str = "snapd/reply";
/// The reference agent's subjects, kept for existing clients.
pub const COMPAT_SNAPS_GET: &str = "v1/snapd/v2/snaps/get";
/// The reference agent's apps (services) action.
pub const COMPAT_APPS_POST: &str = "v1/snapd/v2/apps/post";
/// The reference agent's assertions query.
pub const COMPAT_ASSERTIONS_GET: &str = "v1/snapd/v2/assertions/get";
/// `v1/snapd/v2/snaps/{snap}/post`.
pub const COMPAT_SNAPS_PREFIX: &str = "v1/snapd/v2/snaps";
/// Export intake: applications publish on `{prefix}/{stream}` (NATS
/// `{prefix}.{stream}`); the prefix is `export.subject` in NATS form.
pub fn export_intake(prefix: &str) -> Result<Topic, BadSegment> {
    let mut t = String::new();
    for seg in prefix.split('.') {
        if !t.is_empty() {
            t.push('/');
        }
        t.push_str(segment(seg)?);
    }
    Ok(Topic(t + "/#"))
}
/// Export status (backlog, drops, rates), published periodically. Outside
/// any intake prefix made of one segment, so it is never spooled itself.
pub const EXPORT_STATUS: &str = "iot/agent/export/status";
/// The watchdog's events (a reboot held back), published.
pub const WATCHDOG_EVENTS: &str = "iot/agent/watchdog/events";
/// MQTT connection state of the DMS channel.
pub const MQTT_CONNECTION_STATUS: &str = "iot/agent/mqtt/connection/status";
/// The remote terminal on the device-local NATS (`iot.agent.terminal.>`;
/// leaves in [`crate::services::terminal::protocol`]).
pub const TERMINAL: &str = "iot/agent/terminal";
/// The remote browser on the device-local NATS (`iot.agent.browser.>`).
pub const BROWSER: &str = "iot/agent/browser";
/// Root of the remote terminal on the DMS broker:
/// `devices/terminal/{device id}/...`, the device's own topics.
pub const DMS_TERMINAL: &str = "devices/terminal";
/// Root of the remote browser on the DMS broker: `devices/browser/{device id}/...`.
pub const DMS_BROWSER: &str = "devices/browser";

/// `devices/terminal/{device id}`.
pub fn dms_terminal(device_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed(DMS_TERMINAL).join(&[device_id])
}

/// `devices/browser/{device id}`.
pub fn dms_browser(device_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed(DMS_BROWSER).join(&[device_id])
}

/// The NATS micro-service protocol's discovery subjects, answered by
/// async-nats's service API (each also with `.{name}` and `.{name}.{id}`).
pub const SERVICE_PING: &str = "$SRV/PING";
/// See [`SERVICE_PING`].
pub const SERVICE_INFO: &str = "$SRV/INFO";
/// See [`SERVICE_PING`].
pub const SERVICE_STATS: &str = "$SRV/STATS";

/// The trees that let a client manage the device as if it held
/// snapd-control (or read what the agent answers there): only the agent's
/// own NATS user, and the snaps trusted to manage the device, may publish
/// or subscribe in them. `docs/nats-server.conf` denies each to ordinary
/// users; a test checks that every subject the agent serves lies in one.
pub const PROTECTED_TREES: [&str; 5] = [
    "snapd/#",
    "v1/snapd/#",
    "iot/agent/#",
    "devices/actions/#",
    "$SRV/#",
];

/// Whether a NATS subject lies in one of [`PROTECTED_TREES`].
pub fn is_protected(subject: &str) -> bool {
    PROTECTED_TREES.iter().any(|tree| {
        let root = tree.trim_end_matches("/#");
        let root = Topic::fixed(root).nats();
        subject
            .strip_prefix(root.as_str())
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// `snapd/events/changes/{id}`.
pub fn change_events(change_id: &str) -> Result<Topic, BadSegment> {
    Topic::fixed(SNAPD_CHANGE_EVENTS).join(&[change_id])
}

/// `snapd/reply/{token}`.
pub fn snapd_reply(token: &str) -> Result<Topic, BadSegment> {
    Topic::fixed(SNAPD_REPLY).join(&[token])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_and_nats_forms_map_both_ways() {
        let t = dms_actions("abc-123").unwrap();
        assert_eq!(t.mqtt(), "devices/sub/abc-123");
        assert_eq!(t.nats(), "devices.sub.abc-123");
        let wild = Topic::fixed("devices/actions/+/#");
        assert_eq!(wild.nats(), "devices.actions.*.>");
        assert_eq!(Topic::from_nats("devices.actions.*.>"), wild);
        assert_eq!(
            Topic::fixed(MQTT_CONNECTION_STATUS).nats(),
            "iot.agent.mqtt.connection.status"
        );
    }

    #[test]
    fn segments_cannot_add_levels_or_wildcards() {
        for bad in ["a/b", "a.b", "+", "#", "*", ">", "", "a b"] {
            assert!(dms_actions(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serials_are_sanitized_as_the_dms_does() {
        assert_eq!(sanitize_serial("A1B2-c3d4/5.x y_z"), "A1B2-c3d45xy_z");
        assert_eq!(serial_actions("A/1").unwrap().mqtt(), "devices/actions/A1");
        assert!(serial_actions("///").is_err());
    }

    #[test]
    fn export_intake_is_a_checked_prefix_with_a_wildcard() {
        assert_eq!(export_intake("export").unwrap().nats(), "export.>");
        assert_eq!(export_intake("app.export").unwrap().nats(), "app.export.>");
        for bad in ["", "a.>", "a..b", "*", "a b"] {
            assert!(export_intake(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn protected_trees_cover_the_agents_roots_and_not_their_neighbours() {
        for t in [
            SNAPD_MIRROR,
            COMPAT_SNAPS_GET,
            MQTT_CONNECTION_STATUS,
            SERVICE_PING,
        ] {
            assert!(is_protected(&Topic::fixed(t).nats()), "{t}");
        }
        assert!(is_protected(&serial_actions("s1").unwrap().nats()));
        assert!(!is_protected("snapdx.v2"));
        assert!(!is_protected("snapd"));
        assert!(!is_protected("export.app"));
    }

    #[test]
    fn prefixes_strip_to_segments() {
        let t = Topic::fixed("snapd/v2/snaps/hello/post");
        let p = Topic::fixed(SNAPD_MIRROR);
        assert_eq!(t.strip_prefix(&p).unwrap(), vec!["snaps", "hello", "post"]);
        assert!(Topic::fixed("snapd/v22/x").strip_prefix(&p).is_none());
    }
}
