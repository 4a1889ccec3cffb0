//! How large a message the upstream can carry, and so how large a message
//! intake may accept.
//!
//! A message the upstream can never take is poison: retried, it would end
//! every session at the same row. So the cap is applied where the producer
//! can still be told (the intake's answer, `iot-agent export send`'s exit
//! status), not after the message was promised delivery. The forwarder
//! learns the upstream's limit on each connection (NATS: the server's
//! `max_payload` from INFO and the JetStream stream's `max_msg_size`) and
//! keeps it in the spool, so a restarted daemon and the `export send`
//! command (another process, perhaps with the daemon stopped) apply it
//! before any connection. MQTT 3.1.1 cannot tell its limit (and mosquitto
//! acknowledges a message over `message_size_limit` and drops it): the
//! operator sets `export.upstream.max.payload`.
//!
//! The NATS limits count the headers the forwarder adds
//! ([`super::upstream::header_bytes`]); they are taken off per stream.

use super::intake::MAX_PAYLOAD;
use crate::config::values::UpstreamKind;
use crate::config::ExportUpstream;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};

/// What an upstream said about its size limit on its last connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Learned {
    /// The upstream it was learned from: a limit of another upstream
    /// (the URL was changed) is not applied.
    pub url: String,
    /// Largest message, headers included.
    pub max_bytes: u64,
    /// Where the figure comes from, for messages.
    pub source: String,
}

impl Learned {
    /// The smaller of a NATS server's `max_payload` and the stream's
    /// `max_msg_size` (negative or 0: unlimited).
    pub fn nats(url: &str, max_payload: u64, stream: Option<(&str, i64)>) -> Learned {
        let mut l = Learned {
            url: url.to_string(),
            max_bytes: max_payload,
            source: format!("the upstream server's max_payload of {max_payload} bytes"),
        };
        if let Some((name, max)) = stream.filter(|(_, m)| *m > 0) {
            if (max as u64) < l.max_bytes {
                l.max_bytes = max as u64;
                l.source = format!("JetStream stream {name}'s max_msg_size of {max} bytes");
            }
        }
        l
    }
}

/// The cap intake applies, for one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    /// Largest message the upstream takes (headers included when
    /// `headers`).
    max_bytes: u64,
    /// The forwarder adds headers that count against `max_bytes` (NATS).
    headers: bool,
    source: String,
}

impl Capacity {
    /// The cap from the configuration and what the upstream said last
    /// (`learned`, ignored when it was another upstream).
    pub fn new(cfg: &ExportUpstream, learned: Option<&Learned>) -> Capacity {
        let headers = matches!(cfg.url.kind(), Some(UpstreamKind::Nats { .. }));
        let mut c = Capacity {
            max_bytes: MAX_PAYLOAD as u64,
            headers,
            source: if headers {
                format!("NATS' default max_payload of {MAX_PAYLOAD} bytes (the upstream was not reached yet)")
            } else {
                format!("the agent's limit of {MAX_PAYLOAD} bytes")
            },
        };
        if let Some(l) = learned.filter(|l| l.url == cfg.url.as_str()) {
            c.max_bytes = l.max_bytes;
            c.source = l.source.clone();
        }
        if cfg.max.payload > 0 && cfg.max.payload < c.max_bytes {
            c.max_bytes = cfg.max.payload;
            c.source = format!("export.upstream.max.payload = {}", cfg.max.payload);
        }
        c
    }

    /// The largest payload accepted for `stream`.
    pub fn payload_cap(&self, stream: &str) -> usize {
        let overhead = if self.headers {
            super::upstream::header_bytes(stream) as u64
        } else {
            0
        };
        (self.max_bytes.saturating_sub(overhead) as usize).min(MAX_PAYLOAD)
    }

    /// Whether a payload of `len` bytes for `stream` can reach the
    /// upstream; the refusal says the limit, where it comes from and what
    /// to do.
    pub fn check(&self, stream: &str, len: usize) -> Result<(), String> {
        let cap = self.payload_cap(stream);
        if len <= cap {
            return Ok(());
        }
        let why = if cap < MAX_PAYLOAD || !self.headers {
            let hdr = if self.headers {
                format!(
                    " less {} bytes of export headers",
                    super::upstream::header_bytes(stream)
                )
            } else {
                String::new()
            };
            format!("{}{hdr}", self.source)
        } else {
            format!("the agent's limit of {MAX_PAYLOAD} bytes")
        };
        Err(format!(
            "message of {len} bytes is larger than the upstream can carry: at most {cap} bytes \
             on stream {stream} ({why}); split it into smaller messages or raise the \
             upstream's limit"
        ))
    }

    /// For the status document.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "max-bytes": self.max_bytes,
            "headers-counted": self.headers,
            "source": self.source,
        })
    }
}

/// The cap shared by the forwarder (which learns it) and the intake.
#[derive(Debug, Clone)]
pub struct SharedCapacity(Arc<RwLock<Capacity>>);

impl SharedCapacity {
    /// A shared cap, starting at `c`.
    pub fn new(c: Capacity) -> SharedCapacity {
        SharedCapacity(Arc::new(RwLock::new(c)))
    }

    /// The cap now.
    pub fn get(&self) -> Capacity {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the cap.
    pub fn set(&self, c: Capacity) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::UpstreamUrl;

    fn upstream(url: &str, max: u64) -> ExportUpstream {
        ExportUpstream {
            url: UpstreamUrl::new(url),
            max: crate::config::ExportUpstreamMax { payload: max },
            ..Default::default()
        }
    }

    #[test]
    fn nats_caps_take_off_the_headers_and_prefer_the_smallest_limit() {
        let cfg = upstream("nats://127.0.0.1:4222", 0);
        let h = super::super::upstream::header_bytes("s1");
        let c = Capacity::new(&cfg, None);
        assert_eq!(c.payload_cap("s1"), MAX_PAYLOAD - h);
        let learned = Learned::nats(cfg.url.as_str(), 1 << 20, Some(("T", 1024)));
        let c = Capacity::new(&cfg, Some(&learned));
        assert_eq!(c.payload_cap("s1"), 1024 - h);
        let err = c.check("s1", 1024).unwrap_err();
        assert!(
            err.contains("max_msg_size") && err.contains("split"),
            "{err}"
        );
        assert!(c.check("s1", 1024 - h).is_ok());
        // Another upstream's figure is not applied.
        let other = Learned::nats("nats://elsewhere:4222", 10, None);
        assert_eq!(
            Capacity::new(&cfg, Some(&other)).payload_cap("s1"),
            MAX_PAYLOAD - h
        );
        // Unlimited stream: the server's max_payload.
        let l = Learned::nats(cfg.url.as_str(), 2048, Some(("T", -1)));
        assert_eq!(Capacity::new(&cfg, Some(&l)).payload_cap("s1"), 2048 - h);
    }

    #[test]
    fn mqtt_caps_are_the_configured_payload_limit() {
        let cfg = upstream("mqtt://127.0.0.1:1883", 1000);
        let c = Capacity::new(&cfg, None);
        assert_eq!(c.payload_cap("s1"), 1000);
        let err = c.check("s1", 1001).unwrap_err();
        assert!(err.contains("export.upstream.max.payload"), "{err}");
        assert_eq!(
            Capacity::new(&upstream("mqtt://h:1", 0), None).payload_cap("x"),
            MAX_PAYLOAD
        );
    }
}
