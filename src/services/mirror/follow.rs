//! Change events: after the mirror starts a change (an async answer with a
//! `change` id), follow that change and publish it on
//! `snapd.events.changes.{id}` each time its status moves, so the client
//! that started an install can watch it instead of polling.
//!
//! The change is followed through the shared change poller
//! ([`crate::subsystems::changes::Poller::follow`]), the one way the agent follows a
//! change: following costs snapd no request of its own.

use crate::bus::{topics, Nats};
use crate::subsystems::changes::Poller;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// When and for how long a change is followed, and how many at once.
#[derive(Debug, Clone)]
pub struct FollowPolicy {
    /// The wait before the first look at the change: the requester
    /// subscribes to the events after it got the change id, so the first
    /// event must not race it.
    pub first_look: Duration,
    /// A change still not ready after this is no longer followed (snapd
    /// itself may keep it for hours: `become-operational` on an unregistered
    /// device).
    pub max_age: Duration,
    /// Changes followed at once; beyond it new changes are not followed
    /// (logged), so a burst of requests cannot pile up followers.
    pub max_followed: usize,
}

impl Default for FollowPolicy {
    fn default() -> Self {
        FollowPolicy {
            first_look: Duration::from_millis(500),
            max_age: Duration::from_secs(3600),
            max_followed: 32,
        }
    }
}

/// Follows the changes that mirrored requests start and publishes their progress.
#[derive(Clone)]
pub struct Follower {
    bus: Nats,
    changes: Arc<Poller>,
    policy: FollowPolicy,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
}

impl Follower {
    /// A follower publishing on `bus`, bounded by `policy`.
    pub fn new(
        bus: Nats,
        changes: Arc<Poller>,
        policy: FollowPolicy,
        shutdown: CancellationToken,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(policy.max_followed));
        Follower {
            bus,
            changes,
            policy,
            slots,
            shutdown,
        }
    }

    /// Starts following change `id` in the background.
    pub fn follow(&self, id: &str) {
        let Ok(topic) = topics::change_events(id) else {
            tracing::debug!(change = id, "change id unusable as a subject; not followed");
            return;
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(
                change = id,
                max = self.policy.max_followed,
                "too many changes followed at once; no events for this one"
            );
            return;
        };
        let me = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = me.shutdown.cancelled() => {}
                _ = me.run(&id, &topic) => {}
            }
        });
    }

    async fn run(&self, id: &str, topic: &topics::Topic) {
        let deadline = tokio::time::Instant::now() + self.policy.max_age;
        tokio::time::sleep(self.policy.first_look).await;
        let mut following = self.changes.follow(id);
        loop {
            let change = match tokio::time::timeout_at(deadline, following.next()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    tracing::debug!(change = id, error = %e, "change no longer followed");
                    return;
                }
                Ok(Ok(change)) => change,
            };
            let payload = serde_json::to_vec(&change).unwrap_or_default();
            if let Err(e) = self.bus.publish(topic, payload.into()).await {
                tracing::debug!(change = id, error = %e, "cannot publish change event");
            }
            if change.ready {
                return;
            }
        }
        tracing::info!(
            change = id,
            "change still not ready after {}; no more events for it",
            humantime::format_duration(self.policy.max_age)
        );
    }
}
