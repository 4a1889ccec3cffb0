//! Every subject the mirror serves or publishes, in one table: the NATS
//! subscription the code makes and the address the AsyncAPI document
//! gives it (`asyncapi/asyncapi.yaml`; a test keeps the two in agreement).

use crate::bus::topics::{self, Topic};

/// Which side of the exchange the agent is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent answers requests on it.
    Serves,
    /// The agent publishes on it.
    Publishes,
}

/// What a served subject does (dispatch key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// snapd's REST API, one subject per method and path.
    Mirror,
    /// The reference's `snaps` list.
    CompatSnapsGet,
    /// The reference's snap actions.
    CompatSnapPost,
    /// The reference's app actions.
    CompatAppsPost,
    /// The reference's assertions.
    CompatAssertionsGet,
    /// The DMS link's state.
    MqttStatus,
    /// Answered inside async-nats's service API.
    Discovery,
    /// Published: changes as they progress.
    ChangeEvents,
    /// Published: answers to requests that had no reply subject.
    Replies,
}

/// One subject the agent serves or publishes, with who may use it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The micro-service endpoint name (`$SRV.INFO` lists it).
    pub name: &'static str,
    /// What it does.
    pub kind: Kind,
    /// Who may use it.
    pub role: Role,
    /// The NATS subject pattern (wildcards) the agent subscribes to or
    /// publishes under.
    pub subject: String,
    /// The AsyncAPI channel address: the subject with `{parameters}`.
    pub address: String,
}

fn nats(t: &str) -> String {
    Topic::fixed(t).nats()
}

/// The table. Everything else (subscriptions, the document test) reads it.
pub fn all() -> Vec<Endpoint> {
    use Kind::*;
    use Role::*;
    let e = |name, kind, role, subject: String, address: String| Endpoint {
        name,
        kind,
        role,
        subject,
        address,
    };
    let mirror = nats(topics::SNAPD_MIRROR);
    let snaps = nats(topics::COMPAT_SNAPS_PREFIX);
    let events = nats(topics::SNAPD_CHANGE_EVENTS);
    let replies = nats(topics::SNAPD_REPLY);
    vec![
        e(
            "snapd-mirror",
            Mirror,
            Serves,
            format!("{mirror}.>"),
            format!("{mirror}.{{path}}.{{method}}"),
        ),
        e(
            "v1-snaps-get",
            CompatSnapsGet,
            Serves,
            nats(topics::COMPAT_SNAPS_GET),
            nats(topics::COMPAT_SNAPS_GET),
        ),
        e(
            "v1-snaps-snap-post",
            CompatSnapPost,
            Serves,
            format!("{snaps}.*.post"),
            format!("{snaps}.{{snap}}.post"),
        ),
        e(
            "v1-apps-post",
            CompatAppsPost,
            Serves,
            nats(topics::COMPAT_APPS_POST),
            nats(topics::COMPAT_APPS_POST),
        ),
        e(
            "v1-assertions-get",
            CompatAssertionsGet,
            Serves,
            nats(topics::COMPAT_ASSERTIONS_GET),
            nats(topics::COMPAT_ASSERTIONS_GET),
        ),
        e(
            "mqtt-connection-status",
            MqttStatus,
            Serves,
            nats(topics::MQTT_CONNECTION_STATUS),
            nats(topics::MQTT_CONNECTION_STATUS),
        ),
        e(
            "srv-ping",
            Discovery,
            Serves,
            nats(topics::SERVICE_PING),
            nats(topics::SERVICE_PING),
        ),
        e(
            "srv-info",
            Discovery,
            Serves,
            nats(topics::SERVICE_INFO),
            nats(topics::SERVICE_INFO),
        ),
        e(
            "srv-stats",
            Discovery,
            Serves,
            nats(topics::SERVICE_STATS),
            nats(topics::SERVICE_STATS),
        ),
        e(
            "change-events",
            ChangeEvents,
            Publishes,
            format!("{events}.*"),
            format!("{events}.{{id}}"),
        ),
        e(
            "mqtt-replies",
            Replies,
            Publishes,
            format!("{replies}.*"),
            format!("{replies}.{{token}}"),
        ),
    ]
}

/// NATS subject matching: `*` one token, `>` one or more at the end.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subscription and the documented address describe the same
    /// subjects: the address with sample values for its parameters matches
    /// the subscription pattern.
    #[test]
    fn subscriptions_match_their_addresses() {
        for e in all() {
            let sample = e
                .address
                .replace("{path}", "snaps.hello")
                .replace("{method}", "get")
                .replace("{snap}", "hello")
                .replace("{id}", "42")
                .replace("{token}", "c-1");
            assert!(!sample.contains('{'), "unknown parameter in {}", e.address);
            assert!(
                subject_matches(&e.subject, &sample),
                "{} vs {}",
                e.subject,
                e.address
            );
        }
        assert!(subject_matches("snapd.v2.>", "snapd.v2.snaps.get"));
        assert!(!subject_matches("snapd.v2.>", "snapd.v2"));
        assert!(!subject_matches("a.*.c", "a.b.c.d"));
    }
}
