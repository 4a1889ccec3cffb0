//! Connections to the upstream broker: NATS JetStream or MQTT (QoS 1).
//!
//! A [`Session`] is one connection. It never reconnects by itself, on
//! purpose: both clients would otherwise re-send what they had queued when
//! the link came back, behind the forwarder's back and possibly after a
//! message that was lost in the cut, which breaks order. When anything
//! fails the forwarder drops the session (nothing more leaves it) and opens
//! a new one that starts again from the oldest unacknowledged message.

use super::capacity::Learned;
use super::spool::Row;
use crate::config::values::UpstreamKind;
use crate::config::ExportUpstream;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Bound on connecting (TCP, TLS, protocol handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one acknowledgement.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Stands for "never": the delay before a dead NATS connection would retry.
const NEVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Why the upstream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No upstream configured.
    #[error("export.upstream.url is not set")]
    NoUrl,
    /// The upstream did not take the connection.
    #[error("cannot connect to the upstream {url}: {detail}")]
    Connect {
        /// The upstream.
        url: String,
        /// Why.
        detail: String,
    },
    /// The JetStream stream cannot be created or read.
    #[error("cannot set up JetStream stream {stream}: {detail}")]
    Stream {
        /// The stream.
        stream: String,
        /// Why.
        detail: String,
    },
    /// `export.upstream.ca` cannot be read.
    #[error("cannot read export.upstream.ca {path}: {detail}")]
    Ca {
        /// The configured path.
        path: String,
        /// Why.
        detail: String,
    },
    /// A publish failed.
    #[error("upstream publish failed: {0}")]
    Publish(String),
}

/// What the upstream said about one message.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// JetStream recognised the `Nats-Msg-Id` and did not store it again.
    pub duplicate: bool,
}

/// Resolves when the upstream acknowledged (or refused) one message.
pub type AckFuture = BoxFuture<'static, Result<Ack, String>>;

/// Why the upstream did not take one message.
///
/// `permanent` means sending it again can never succeed (it is larger than
/// the server's `max_payload` or the stream's `max_msg_size`): the forwarder
/// moves it to the dead letters instead of retrying it forever, which would
/// stall everything behind it. Anything else (lost link, timeout, stream
/// missing, storage full) is transient and the message is retried.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Sending it again can never succeed.
    pub permanent: bool,
    /// The connection was lost before the answer came (what a broker that
    /// cannot say "too large" does: mosquitto's `max_packet_size`).
    pub link_lost: bool,
    /// What the upstream said.
    pub detail: String,
}

impl Refusal {
    /// An MQTT confirmation fails only when its connection is lost.
    fn link_lost(detail: String) -> Refusal {
        Refusal {
            permanent: false,
            link_lost: true,
            detail,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// A message's acknowledgement, with its refusal classified.
pub type Acknowledgement = BoxFuture<'static, Result<Ack, Refusal>>;

/// Whether a JetStream publish error can never succeed on retry.
fn nats_permanent(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    use async_nats::jetstream::ErrorCode;
    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
        return true;
    }
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|j| j.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// A connection to the upstream, NATS JetStream or MQTT.
pub enum Session {
    /// Boxed: the JetStream context is several times the MQTT handle.
    Nats(Box<NatsSession>),
    /// An MQTT broker.
    Mqtt(MqttSession),
}

impl Session {
    /// Connects to `export.upstream.url`, with at most `window` messages in flight.
    pub async fn connect(cfg: &ExportUpstream, window: usize) -> Result<Session, UpstreamError> {
        match cfg.url.kind() {
            None => Err(UpstreamError::NoUrl),
            Some(UpstreamKind::Nats { tls }) => Ok(Session::Nats(Box::new(
                NatsSession::connect(cfg, tls).await?,
            ))),
            Some(UpstreamKind::Mqtt { tls }) => {
                Ok(Session::Mqtt(MqttSession::connect(cfg, tls, window).await?))
            }
        }
    }

    /// Hands one message to the connection; the future resolves with the
    /// upstream's acknowledgement. Messages go out in call order.
    pub async fn publish(
        &mut self,
        row: &Row,
        msg_id: &str,
    ) -> Result<Acknowledgement, UpstreamError> {
        match self {
            Session::Nats(s) => s.publish(row, msg_id).await,
            Session::Mqtt(s) => Ok(s
                .publish(row)
                .await?
                .map(|r| r.map_err(Refusal::link_lost))
                .boxed()),
        }
    }

    /// What the upstream said about its size limit when it was connected
    /// (NATS); MQTT cannot say.
    pub fn learned(&self) -> Option<&Learned> {
        match self {
            Session::Nats(s) => Some(&s.learned),
            Session::Mqtt(_) => None,
        }
    }

    /// Whether the upstream de-duplicates re-sent messages.
    pub fn deduplicates(&self) -> bool {
        matches!(self, Session::Nats(_))
    }

    /// Cancelled as soon as the connection is lost: the forwarder ends the
    /// session at once instead of waiting for acknowledgements that cannot
    /// come.
    pub fn lost(&self) -> CancellationToken {
        match self {
            Session::Nats(s) => s.lost.clone(),
            Session::Mqtt(s) => s.lost.clone(),
        }
    }
}

/// The upstream subject (NATS) of a stream.
pub fn nats_subject(prefix: &str, stream: &str) -> String {
    if prefix.is_empty() {
        stream.to_string()
    } else {
        format!("{prefix}.{stream}")
    }
}

/// The upstream topic (MQTT) of a stream: the NATS form with `/` for `.`.
pub fn mqtt_topic(prefix: &str, stream: &str) -> String {
    nats_subject(prefix, stream).replace('.', "/")
}

// ------------------------------------------------------------- NATS ---

/// Headers the forwarder adds to each NATS message (besides `Nats-Msg-Id`).
const HEADER_STREAM: &str = "Export-Stream";
const HEADER_RECEIVED: &str = "Export-Received-Ms";

/// The most bytes the forwarder's headers take on the wire for a message
/// of `stream`: they count against `max_payload` and `max_msg_size`, so
/// the intake cap ([`super::capacity`]) takes them off. An upper bound:
/// the message id and time at their longest (`{spool id}-{i64}`, an i64).
pub fn header_bytes(stream: &str) -> usize {
    const VERSION_LINE: usize = "NATS/1.0\r\n".len();
    const I64: usize = 20;
    const MSG_ID: usize = 16 + 1 + I64;
    let line = |name: &str, value: usize| name.len() + ": ".len() + value + "\r\n".len();
    VERSION_LINE
        + line(
            AsRef::<str>::as_ref(&async_nats::header::NATS_MESSAGE_ID),
            MSG_ID,
        )
        + line(HEADER_STREAM, stream.len())
        + line(HEADER_RECEIVED, I64)
        + "\r\n".len()
}

/// A JetStream connection.
pub struct NatsSession {
    js: async_nats::jetstream::Context,
    lost: CancellationToken,
    prefix: String,
    learned: Learned,
}

impl NatsSession {
    async fn connect(cfg: &ExportUpstream, tls: bool) -> Result<NatsSession, UpstreamError> {
        let url = cfg.url.as_str().to_string();
        let err = |detail: String| UpstreamError::Connect {
            url: url.clone(),
            detail,
        };
        // Once connected, a lost connection is never re-established by the
        // client (see the module doc): one attempt, after "never".
        let established = Arc::new(AtomicBool::new(false));
        let lost = CancellationToken::new();
        let on_event = lost.clone();
        let flag = established.clone();
        let mut opts = async_nats::ConnectOptions::new()
            .name("iot-agent-export")
            .connection_timeout(CONNECT_TIMEOUT)
            .max_reconnects(1)
            .reconnect_delay_callback(move |_| {
                if flag.load(Ordering::SeqCst) {
                    NEVER
                } else {
                    Duration::ZERO
                }
            })
            .event_callback(move |e| {
                let lost = on_event.clone();
                async move {
                    if matches!(e, async_nats::Event::Disconnected) {
                        lost.cancel();
                    }
                    tracing::debug!(event = %e, "export upstream NATS event")
                }
            });
        if !cfg.user.is_empty() {
            opts = opts.user_and_password(cfg.user.clone(), cfg.password.clone());
        }
        if tls {
            opts = opts.require_tls(true);
        }
        if let Some(ca) = cfg.ca.path() {
            opts = opts.add_root_certificates(ca.to_path_buf());
        }
        let client = tokio::time::timeout(CONNECT_TIMEOUT * 2, opts.connect(url.as_str()))
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(e.to_string()))?;
        established.store(true, Ordering::SeqCst);
        let max_payload = client.server_info().max_payload as u64;
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .build(client);
        let mut stream_max = None;
        if !cfg.stream.is_empty() {
            let subjects = vec![format!("{}.>", cfg.upstream_prefix())];
            let stream = js
                .get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: cfg.stream.clone(),
                    subjects,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .map_err(|e| UpstreamError::Stream {
                    stream: cfg.stream.clone(),
                    detail: e.to_string(),
                })?;
            stream_max = Some(stream.cached_info().config.max_message_size as i64);
        }
        let learned = Learned::nats(
            &url,
            max_payload,
            stream_max.map(|m| (cfg.stream.as_str(), m)),
        );
        Ok(NatsSession {
            js,
            lost,
            prefix: cfg.upstream_prefix(),
            learned,
        })
    }

    async fn publish(&mut self, row: &Row, msg_id: &str) -> Result<Acknowledgement, UpstreamError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        headers.insert(HEADER_STREAM, row.stream.as_str());
        headers.insert(HEADER_RECEIVED, row.received_ms.to_string().as_str());
        let ack = match self
            .js
            .publish_with_headers(
                nats_subject(&self.prefix, &row.stream),
                headers,
                row.payload.clone(),
            )
            .await
        {
            Ok(ack) => ack,
            // Over the server's max_payload: refused before it is sent.
            Err(e) if nats_permanent(&e) => {
                let r = Refusal {
                    permanent: true,
                    link_lost: false,
                    detail: e.to_string(),
                };
                return Ok(futures::future::ready(Err(r)).boxed());
            }
            Err(e) => return Err(UpstreamError::Publish(e.to_string())),
        };
        Ok(async move {
            ack.await
                .map(|a| Ack {
                    duplicate: a.duplicate,
                })
                .map_err(|e| Refusal {
                    permanent: nats_permanent(&e),
                    link_lost: false,
                    detail: e.to_string(),
                })
        }
        .boxed())
    }
}

// ------------------------------------------------------------- MQTT ---

/// An MQTT upstream session on the agent's one MQTT driver
/// ([`crate::bus::driver`]), in its "never reconnect" mode.
pub struct MqttSession {
    handle: crate::bus::driver::MqttHandle,
    lost: CancellationToken,
    prefix: String,
    /// Cancelling it ends the driver and closes the socket: nothing queued
    /// is re-sent behind the forwarder's back.
    stop: CancellationToken,
}

impl Drop for MqttSession {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl MqttSession {
    async fn connect(
        cfg: &ExportUpstream,
        tls: bool,
        window: usize,
    ) -> Result<MqttSession, UpstreamError> {
        use crate::bus::driver::{self, DriverSettings, Reconnect};
        let url = cfg.url.as_str().to_string();
        let err = |detail: String| UpstreamError::Connect {
            url: url.clone(),
            detail,
        };
        let (host, port) = cfg.url.host_port().ok_or_else(|| err("no host".into()))?;
        let mut opts = rumqttc::MqttOptions::new(cfg.client.clone(), host.clone(), port);
        opts.set_keep_alive(Duration::from_secs(30));
        // The spool, not the broker's session, is what survives a cut.
        opts.set_clean_session(true);
        opts.set_max_packet_size(
            super::intake::MAX_PAYLOAD + 64 * 1024,
            super::intake::MAX_PAYLOAD + 64 * 1024,
        );
        if !cfg.user.is_empty() {
            opts.set_credentials(cfg.user.clone(), cfg.password.clone());
        }
        if tls {
            opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                Arc::new(tls_config(cfg)?),
            )));
        }
        let (status_tx, mut status) =
            tokio::sync::watch::channel(crate::bus::ConnectionStatus::not_established());
        let stop = CancellationToken::new();
        let link = driver::start(
            opts,
            DriverSettings {
                label: "export upstream",
                broker: format!("{host}:{port}"),
                subscriptions: Vec::new(),
                reconnect: Reconnect::Never,
                window: window.clamp(1, u16::MAX as usize) as u16,
            },
            status_tx,
            stop.clone(),
        );
        let handle = link.handle;
        let lost = handle.lost();
        let probe = status.clone();
        let connack = async {
            tokio::select! {
                _ = status.wait_for(|s| s.connected) => Ok(()),
                _ = lost.cancelled() => Err(probe.borrow().error.clone().unwrap_or_default()),
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connack).await {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                stop.cancel();
                return Err(err(why));
            }
            Err(_) => {
                stop.cancel();
                return Err(err("no CONNACK in time".into()));
            }
        }
        Ok(MqttSession {
            handle,
            lost,
            prefix: cfg.upstream_prefix(),
            stop,
        })
    }

    async fn publish(&mut self, row: &Row) -> Result<AckFuture, UpstreamError> {
        let topic = crate::bus::Topic::fixed(&mqtt_topic(&self.prefix, &row.stream));
        let confirmation = self
            .handle
            .publish_confirmed(&topic, row.payload.clone())
            .await
            .map_err(|e| UpstreamError::Publish(e.to_string()))?;
        Ok(async move { confirmation.await.map(|()| Ack { duplicate: false }) }.boxed())
    }
}

/// Verified TLS from the project's one builder: the system's roots plus
/// `export.upstream.ca`.
fn tls_config(cfg: &ExportUpstream) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = crate::tls::Roots::new().system();
    if let Some(ca) = cfg.ca.path() {
        roots = roots
            .file(ca, "export.upstream.ca")
            .map_err(|e| UpstreamError::Ca {
                path: ca.display().to_string(),
                detail: e.detail(),
            })?;
    }
    crate::tls::client_config(
        roots,
        None,
        crate::tls::Verify::Full,
        crate::tls::Advice {
            peer: "the export upstream",
            ca_key: "export.upstream.ca",
            verify_key: None,
        },
    )
    .map(|c| (*c).clone())
    .map_err(|e| UpstreamError::Connect {
        url: cfg.url.as_str().into(),
        detail: e.to_string(),
    })
}
