//! snapd's REST API mirrored onto NATS subjects (and, through
//! nats-server's MQTT listener, MQTT topics).
//!
//! `snapd.v2.{path segments}.{method}` becomes `METHOD /v2/{path}` on
//! snapd's socket ([`request`]); the reply is snapd's envelope unchanged,
//! or the same shape for non-JSON answers and for failures that never
//! reached snapd ([`envelope`]). The reference agent's subjects keep their
//! shapes ([`compat`]), changes started here are followed and published
//! ([`follow`]), and every subject is listed once in [`endpoints`].
//!
//! ## Registered as a NATS micro service
//! Every served subject is an endpoint of the async-nats service API
//! (service `iot-agent`), so `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS`
//! find and describe it. The service API expresses the wildcard well: an
//! endpoint is a queue subscription on any subject pattern, so the whole
//! mirror is one endpoint on `snapd.v2.>` (INFO lists that subject) and the
//! request's own subject tells which resource it is for. Two limits of the
//! API, accepted: STATS counts requests per endpoint, not per snapd
//! resource; and `num_errors` stays 0, because errors are answered as
//! envelopes (the API counts only replies sent as NATS service errors,
//! which carry no payload a snapd client could read).
//!
//! ## Always an answer, never a blocked loop
//! Each request runs in its own task (at most `MAX_IN_FLIGHT` at once;
//! beyond that, new requests wait in the subscription's buffer), bounded by
//! `nats.timeout`, so one slow snapd call delays nobody else and every
//! requester gets an envelope before its own timeout.
//!
//! ## MQTT clients
//! An MQTT 3.1.1 client has no reply subject: nats-server's MQTT bridge
//! delivers its publish on `snapd/v2/snaps/get` as a plain message on
//! `snapd.v2.snaps.get`. Such a client names a reply topic in the payload,
//! `"reply-to": "snapd/reply/{token}"`, subscribes to it first, and gets the
//! same envelope there. Replies only ever go under `snapd/reply/`, so a
//! request cannot make the agent publish elsewhere, and that tree is inside
//! the authorization-protected `snapd/#`. A message with neither a reply
//! subject nor a `reply-to` is not executed (nobody could learn the result);
//! it is logged.

pub mod compat;
pub mod endpoints;
pub mod envelope;
pub mod follow;
pub mod own_conf;
pub mod request;

use crate::bus::topics::{self, Topic};
use crate::bus::{Nats, StatusRx};
use crate::config::Config;
use crate::snapd::{self, RetryPolicy};
use crate::subsystems::changes::Poller;
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use async_nats::service::ServiceExt;
use bytes::Bytes;
use endpoints::{Kind, Role};
use envelope::AgentError;
use follow::{FollowPolicy, Follower};
use futures::StreamExt;
use http::Method;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The micro-service name (`$SRV.PING.iot-agent`).
pub const SERVICE_NAME: &str = "iot-agent";
/// Requests handled at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Answers above this size are checked against the server's `max_payload`.
const SMALL_ANSWER: usize = 32 * 1024;
/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// How the mirror behaves (from `nats.*`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `nats.readonly`: refuse every write.
    pub read_only: bool,
    /// The agent's own snap, whose root-relevant keys the mirror never sets
    /// ([`own_conf`]).
    pub own_snap: String,
    /// `nats.timeout`: bound on one request.
    pub timeout: Duration,
    /// Requests served at once.
    pub max_in_flight: usize,
    /// How changes are followed.
    pub follow: FollowPolicy,
}

impl Settings {
    /// The settings of `nats.*`.
    pub fn from_config(config: &Config) -> Self {
        Settings {
            read_only: config.nats.readonly,
            own_snap: own_conf::own_snap_name(),
            timeout: config.nats.timeout.get(),
            max_in_flight: MAX_IN_FLIGHT,
            follow: FollowPolicy::default(),
        }
    }
}

/// The mirror service; cheap to clone (one per supervisor restart).
#[derive(Clone)]
pub struct Mirror {
    bus: Nats,
    snapd: snapd::Client,
    /// The shared change poller: changes started here are followed there.
    changes: Arc<Poller>,
    settings: Settings,
    mqtt_status: StatusRx,
}

/// The snapd client the mirror uses: the request bound is `nats.timeout`;
/// GETs that could not connect are retried briefly, but a
/// `snap-change-conflict` is passed on at once (the requester decides).
pub fn snapd_client(config: &Config) -> snapd::Client {
    snapd::Client::new(config.snapd.socket.path(), config.nats.timeout.get()).with_retry(
        RetryPolicy {
            get_retries: 2,
            conflict_retries: 0,
            base_delay: Duration::from_millis(100),
        },
    )
}

impl Mirror {
    /// The mirror of snapd on `bus`.
    pub fn new(
        bus: Nats,
        snapd: snapd::Client,
        changes: Arc<Poller>,
        settings: Settings,
        mqtt_status: StatusRx,
    ) -> Self {
        Mirror {
            bus,
            snapd,
            changes,
            settings,
            mqtt_status,
        }
    }
}

impl Subsystem for Mirror {
    const NAME: &'static str = "snapd-mirror";
    const SECTION: &'static str = "nats";

    /// Serves until `shutdown`; an error (the subscriptions ended) makes
    /// the supervisor start it again.
    async fn run(self, shutdown: Shutdown) -> RunResult {
        let service = self
            .bus
            .client()
            .service_builder()
            .description("snapd's REST API mirrored onto NATS subjects (asyncapi/asyncapi.yaml)")
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow::anyhow!("cannot register the NATS micro service: {e}"))?;
        let mut streams = Vec::new();
        for e in endpoints::all() {
            if e.role != Role::Serves || e.kind == Kind::Discovery {
                continue;
            }
            let kind = e.kind;
            let ep = service
                .endpoint_builder()
                .name(e.name)
                .add(e.subject.clone())
                .await
                .map_err(|err| anyhow::anyhow!("cannot subscribe to {}: {err}", e.subject))?;
            streams.push(ep.map(move |r| (kind, r)).boxed());
        }
        let mut incoming = futures::stream::select_all(streams);
        // The subscriptions are in force (and the server's INFO is known)
        // once the server processed them: only then "serving".
        let _ = self.bus.sync().await;
        if let (false, Some(why)) = (self.settings.read_only, self.bus.unprotected()) {
            tracing::error!(
                "snapd mirror READ-ONLY: {why}; only GET is served and the per-serial tree is not"
            );
        }
        tracing::info!(
            read_only = self.settings.read_only,
            timeout = %humantime::format_duration(self.settings.timeout),
            "snapd mirror serving snapd.v2.> and the reference agent's v1 subjects"
        );

        let follower = Follower::new(
            self.bus.clone(),
            self.changes.clone(),
            self.settings.follow.clone(),
            shutdown.token().child_token(),
        );
        let ctx = Arc::new(Ctx {
            mirror: self,
            follower,
        });
        let permits = Arc::new(Semaphore::new(ctx.mirror.settings.max_in_flight));
        let mut tasks = JoinSet::new();
        let ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = incoming.next() => match next {
                    Some((kind, req)) => {
                        let Ok(permit) = permits.clone().acquire_owned().await else { break None };
                        let ctx = ctx.clone();
                        tasks.spawn(async move {
                            ctx.handle(kind, req).await;
                            drop(permit);
                        });
                    }
                    None => break Some(anyhow::anyhow!("the mirror's NATS subscriptions ended")),
                }
            }
        };
        // Let in-flight requests answer; whatever is left is aborted.
        let _ =
            tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
        tasks.abort_all();
        if let Err(e) = service.stop().await {
            tracing::debug!(error = %e, "stopping the micro service");
        }
        match ended {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

struct Ctx {
    mirror: Mirror,
    follower: Follower,
}

impl Ctx {
    async fn handle(&self, kind: Kind, req: async_nats::service::Request) {
        let msg = &req.message;
        let subject = msg.subject.as_str();
        let (answer, reply_to) = match kind {
            Kind::Mirror => self.mirror(subject, &msg.payload).await,
            Kind::CompatSnapsGet => {
                let r = self
                    .bounded(compat::snaps_get(&self.mirror.snapd), |e| {
                        compat::SnapsResponse {
                            error: e,
                            ..Default::default()
                        }
                    })
                    .await;
                (json(&r), None)
            }
            Kind::CompatSnapPost => {
                let snap = subject.split('.').nth(4).unwrap_or_default();
                let refusal = self.write_refusal();
                self.compat_change(compat::snap_post(
                    &self.mirror.snapd,
                    snap,
                    &msg.payload,
                    refusal.as_deref(),
                ))
                .await
            }
            Kind::CompatAppsPost => {
                let refusal = self.write_refusal();
                self.compat_change(compat::apps_post(
                    &self.mirror.snapd,
                    &msg.payload,
                    refusal.as_deref(),
                ))
                .await
            }
            Kind::CompatAssertionsGet => {
                let r = self
                    .bounded(
                        compat::assertions_get(&self.mirror.snapd, &msg.payload),
                        |e| compat::AssertionsResponse {
                            error: e,
                            ..Default::default()
                        },
                    )
                    .await;
                (json(&r), None)
            }
            Kind::MqttStatus => (json(&compat::mqtt_status(&self.mirror.mqtt_status)), None),
            Kind::Discovery | Kind::ChangeEvents | Kind::Replies => return,
        };
        let answer = self.fit(answer);
        if msg.reply.is_some() {
            if let Err(e) = req.respond(Ok(answer)).await {
                tracing::warn!(subject, error = %e, "cannot send the answer");
            }
        } else if let Some(to) = reply_to {
            if let Err(e) = self.mirror.bus.publish(&to, answer).await {
                tracing::warn!(subject, reply_to = %to, error = %e, "cannot send the answer");
            }
        } else {
            tracing::warn!(
                subject,
                "request without a reply subject or \"reply-to\" was not executed (nobody could \
                 read its answer); MQTT clients: see asyncapi/asyncapi.yaml"
            );
        }
    }

    /// A generic mirror request: the answer and the `reply-to` topic.
    /// A reference-agent call that starts a change: bounded, answered in
    /// its shape, and its change followed on the event subject.
    async fn compat_change(
        &self,
        call: impl std::future::Future<Output = compat::AsyncResponse>,
    ) -> (Bytes, Option<Topic>) {
        let r = self
            .bounded(call, |e| compat::AsyncResponse {
                error: e,
                ..Default::default()
            })
            .await;
        self.follow_id(&r.change_id);
        (json(&r), None)
    }

    async fn mirror(&self, subject: &str, payload: &[u8]) -> (Bytes, Option<Topic>) {
        let prefix = Topic::fixed(topics::SNAPD_MIRROR).nats();
        let rest = subject
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or("");
        let segments: Vec<&str> = rest.split('.').collect();
        let parsed = match request::parse(&segments, payload) {
            Ok(p) => p,
            Err(e) => return (e.to_envelope(), request::reply_to_of(payload)),
        };
        let reply_to = parsed.reply_to;
        let mut req = parsed.request;
        if req.method != Method::GET {
            if let Some(why) = self.write_refusal() {
                let e = AgentError::ReadOnly(format!(
                    "{} refused: {why}; only GET is served",
                    req.method
                ));
                return (e.to_envelope(), reply_to);
            }
        }
        if let Some(why) = own_conf::refusal(&self.mirror.settings.own_snap, &req) {
            tracing::warn!(subject, "{why}");
            return (AgentError::Forbidden(why).to_envelope(), reply_to);
        }
        // Leave this request no more than the whole bound on the transport.
        req.timeout = Some(self.mirror.settings.timeout);
        let answer =
            match tokio::time::timeout(self.mirror.settings.timeout, self.mirror.snapd.send(&req))
                .await
            {
                Err(_) => Err(AgentError::Timeout(format!(
                    "snapd did not answer {} within {} (nats.timeout)",
                    req.what(),
                    humantime::format_duration(self.mirror.settings.timeout)
                ))),
                Ok(Err(e)) => Err(AgentError::from_snapd(e)),
                Ok(Ok(resp)) => {
                    if resp.status == 202 {
                        if let Some(id) = change_id(&resp.body) {
                            self.follow_id(&id);
                        }
                    }
                    envelope::from_snapd(&resp)
                }
            };
        (answer.unwrap_or_else(|e| e.to_envelope()), reply_to)
    }

    /// Why a request that changes the device is refused now, if it is:
    /// `nats.readonly`, or a NATS server that does not keep other local
    /// users off the agent's subjects.
    fn write_refusal(&self) -> Option<String> {
        if self.mirror.settings.read_only {
            return Some("the agent is in read-only mode (nats.readonly)".into());
        }
        self.mirror.bus.unprotected()
    }

    /// Runs a compat call within `nats.timeout`, or answers with `err`.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = T>,
        err: impl FnOnce(String) -> T,
    ) -> T {
        let limit = self.mirror.settings.timeout;
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => err(format!(
                "snapd did not answer within {} (nats.timeout)",
                humantime::format_duration(limit)
            )),
        }
    }

    fn follow_id(&self, id: &str) {
        if !id.is_empty() && id != "-1" {
            self.follower.follow(id);
        }
    }

    /// An answer too large for one NATS message becomes an error envelope
    /// (publishing it would fail, and the requester would wait in vain).
    fn fit(&self, answer: Bytes) -> Bytes {
        if answer.len() <= SMALL_ANSWER {
            return answer;
        }
        let max = self.mirror.bus.client().server_info().max_payload;
        if max == 0 || answer.len() <= max {
            return answer;
        }
        AgentError::TooLarge(format!(
            "the answer has {} bytes; the NATS server takes at most {max} in one message \
             (max_payload); ask for less (e.g. a query that selects fewer items)",
            answer.len()
        ))
        .to_envelope()
    }
}

/// The `change` of an async envelope.
fn change_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Async {
        change: Option<String>,
    }
    serde_json::from_slice::<Async>(body).ok()?.change
}

fn json(v: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}
