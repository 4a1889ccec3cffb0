//! The device-local NATS connection ([`Nats`]): connection with back-off,
//! the guard that holds back the device-changing subjects on a server that
//! protects nothing, and publish/subscribe/request/reply by [`Topic`].

use super::Topic;
use crate::backoff;
use crate::config::NatsConfig;
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

/// What can go wrong on the local NATS connection; each names the subject.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server at `url` could not be reached or refused us.
    #[error("cannot connect to NATS at {url}: {detail}")]
    Connect {
        /// The server(s) tried.
        url: String,
        /// The client's error.
        detail: String,
    },
    /// The server refused the subscription (commonly: not authorized).
    #[error("cannot subscribe to {topic}: {detail}")]
    Subscribe {
        /// The subject.
        topic: String,
        /// The client's error.
        detail: String,
    },
    /// The message could not be handed to the connection.
    #[error("cannot publish on {topic}: {detail}")]
    Publish {
        /// The subject.
        topic: String,
        /// The client's error.
        detail: String,
    },
    /// No answer came, or the server refused the request.
    #[error("request on {topic} failed: {detail}")]
    Request {
        /// The subject.
        topic: String,
        /// The client's error.
        detail: String,
    },
    /// A request came without a reply subject, so it cannot be answered.
    #[error("the message on {topic} has no reply subject")]
    NoReplyTo {
        /// The subject it came on.
        topic: String,
    },
}

/// First and longest delay between reconnection attempts.
const RECONNECT_BASE: Duration = Duration::from_millis(250);
const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// Bound on [`Nats::sync`]'s round trip to the server.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// A cloneable handle on the device-local NATS connection.
#[derive(Clone, Debug)]
pub struct Nats {
    nats: async_nats::Client,
    guard: Guard,
}

/// What decides whether the device-changing subjects may be served on this
/// connection: the agent is root on the device, and a server that lets
/// anyone in (or the well-known password) would hand that to every local
/// process.
#[derive(Clone, Debug, Default)]
struct Guard {
    /// `nats.insecure`: serve anyway.
    insecure: bool,
    /// `nats.snapd.password` is the reference agent's published default.
    default_password: bool,
}

/// A message received on a subscription.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The subject in the vocabulary's `/` form.
    pub topic: Topic,
    /// The subject as received (NATS form). `topic` maps `.` to `/`, so a
    /// NATS token holding a `/` is only told apart here.
    pub subject: String,
    /// The message body.
    pub payload: Bytes,
    reply: Option<async_nats::Subject>,
}

impl Incoming {
    /// True when the sender waits for an answer (a request).
    pub fn wants_reply(&self) -> bool {
        self.reply.is_some()
    }

    /// The reply subject, for answers of several messages (the remote
    /// browser's response frames).
    pub fn reply_subject(&self) -> Option<&str> {
        self.reply.as_ref().map(|s| s.as_str())
    }
}

/// A stream of [`Incoming`] messages; unsubscribes when dropped.
pub struct Subscription {
    inner: async_nats::Subscriber,
}

impl Subscription {
    /// The next message, or `None` once the subscription is closed.
    pub async fn next(&mut self) -> Option<Incoming> {
        let m = self.inner.next().await?;
        Some(Incoming {
            topic: Topic::from_nats(m.subject.as_str()),
            subject: m.subject.to_string(),
            payload: m.payload,
            reply: m.reply,
        })
    }
}

impl Nats {
    /// Connects to NATS as `nats.snapd.user`. Returns at once: the first
    /// connection and every reconnection happen in the background with
    /// back-off, each failure logged with what to check.
    pub async fn connect(cfg: &NatsConfig, client_name: &str) -> Result<Nats, NatsError> {
        let url = cfg.url.as_str().to_string();
        let log_url = url.clone();
        let opts = async_nats::ConnectOptions::with_user_and_password(
            cfg.snapd.user.clone(),
            cfg.snapd.password.clone(),
        )
        .name(client_name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempts| {
            // async-nats calls this before every attempt, the first one
            // included (attempts = 1): that one goes at once.
            let failed = attempts.saturating_sub(1);
            if failed == 0 {
                return Duration::ZERO;
            }
            let d = backoff::delay(RECONNECT_BASE, RECONNECT_CAP, failed as u32 - 1);
            // One line per doubling, then one per capped delay: visible, not a flood.
            if failed.is_power_of_two() || d >= RECONNECT_CAP.mul_f64(0.8) {
                tracing::warn!(
                    url = %log_url,
                    attempt = attempts,
                    retry_in = %humantime::format_duration(Duration::from_millis(d.as_millis() as u64)),
                    "NATS server not reachable; retrying (is nats-server running? check nats.url)"
                );
            }
            d
        })
        .event_callback(move |event| async move {
            use async_nats::{Event, ServerError};
            match event {
                Event::Connected => tracing::info!("connected to NATS"),
                Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                Event::ServerError(ServerError::AuthorizationViolation) => tracing::error!(
                    "NATS refused the agent's user: check nats.snapd.user and nats.snapd.password \
                     against the server's authorization block"
                ),
                Event::LameDuckMode => tracing::warn!("NATS server is shutting down (lame duck)"),
                Event::SlowConsumer(sid) => tracing::warn!(sid, "NATS slow consumer: messages dropped"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
        let nats = opts
            .connect(cfg.url.servers())
            .await
            .map_err(|e| NatsError::Connect {
                url,
                detail: e.to_string(),
            })?;
        let guard = Guard {
            insecure: cfg.insecure,
            default_password: cfg.snapd.password == crate::config::WELL_KNOWN_NATS_PASSWORD,
        };
        Ok(Nats { nats, guard })
    }

    /// Why subjects that change the device (mirror writes, the per-serial
    /// tree) must not be served on this connection; `None` when they may.
    /// Read from the server's latest INFO on every call, so a reconnection
    /// to a differently configured server is noticed. Until the first INFO
    /// arrives the answer is "not yet" (the safe side).
    pub fn unprotected(&self) -> Option<String> {
        if self.guard.insecure {
            return None;
        }
        let info = self.nats.server_info();
        if info.server_id.is_empty() {
            return Some("the agent is not connected to NATS yet".into());
        }
        if !info.auth_required {
            return Some(
                "the NATS server requires no authorization, so every local process could use \
                 the agent's subjects (configure users as in docs/nats-server.conf, or set \
                 nats.insecure=true to accept this)"
                    .into(),
            );
        }
        if self.guard.default_password {
            return Some(
                "nats.snapd.password is the reference agent's well-known default, which anyone \
                 can use (set your own, or set nats.insecure=true to accept this)"
                    .into(),
            );
        }
        None
    }

    /// The underlying NATS client, for APIs the handle does not wrap
    /// (the micro-service registration).
    pub fn client(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Whether the client is connected to a server right now.
    pub fn is_connected(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `payload` on `topic` (fire and forget, as NATS core does).
    pub async fn publish(&self, topic: &Topic, payload: Bytes) -> Result<(), NatsError> {
        self.nats
            .publish(topic.nats(), payload)
            .await
            .map_err(|e| NatsError::Publish {
                topic: topic.to_string(),
                detail: e.to_string(),
            })
    }

    /// Subscribes to `topic` (wildcards allowed).
    pub async fn subscribe(&self, topic: &Topic) -> Result<Subscription, NatsError> {
        let inner = self
            .nats
            .subscribe(topic.nats())
            .await
            .map_err(|e| NatsError::Subscribe {
                topic: topic.to_string(),
                detail: e.to_string(),
            })?;
        Ok(Subscription { inner })
    }

    /// Sends a request and waits for its answer (the client's request
    /// timeout applies).
    pub async fn request(&self, topic: &Topic, payload: Bytes) -> Result<Bytes, NatsError> {
        self.nats
            .request(topic.nats(), payload)
            .await
            .map(|m| m.payload)
            .map_err(|e| NatsError::Request {
                topic: topic.to_string(),
                detail: e.to_string(),
            })
    }

    /// Answers a request.
    pub async fn reply(&self, to: &Incoming, payload: Bytes) -> Result<(), NatsError> {
        let subject = to.reply.clone().ok_or_else(|| NatsError::NoReplyTo {
            topic: to.topic.to_string(),
        })?;
        self.nats
            .publish(subject, payload)
            .await
            .map_err(|e| NatsError::Publish {
                topic: to.topic.to_string(),
                detail: e.to_string(),
            })
    }

    /// Waits until the server has processed everything this client sent
    /// before, subscriptions included. [`Nats::flush`] is not enough for
    /// that: async-nats's flush only writes the buffer to the socket, so
    /// another client's publish right after it can still miss a new
    /// subscription (core NATS keeps nothing for latecomers). A message to
    /// a fresh inbox comes back only after the server handled what came
    /// before it on this connection, which a server does in order.
    pub async fn sync(&self) -> Result<(), NatsError> {
        let inbox = self.nats.new_inbox();
        let failed = |detail: String| NatsError::Request {
            topic: inbox.clone(),
            detail,
        };
        let mut echo = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.nats
            .publish(inbox.clone(), Bytes::new())
            .await
            .map_err(|e| failed(e.to_string()))?;
        match tokio::time::timeout(SYNC_TIMEOUT, echo.next()).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(failed("the connection closed".into())),
            Err(_) => Err(failed(format!(
                "the server did not answer within {SYNC_TIMEOUT:?} (is `_INBOX.>` allowed to this user?)"
            ))),
        }
    }

    /// Waits until everything published so far reached the server.
    pub async fn flush(&self) -> Result<(), NatsError> {
        self.nats.flush().await.map_err(|e| NatsError::Publish {
            topic: "(flush)".into(),
            detail: e.to_string(),
        })
    }
}
