//! Replies to the DMS: published at QoS 1 on whichever session is current,
//! and sent again until the broker acknowledged them. A reply stored in the
//! ledger is marked acknowledged there, so a restart re-sends only what the
//! broker may not have.

use super::ledger::Ledger;
use crate::backoff::Backoff;
use crate::bus::mqtt::MqttHandle;
use crate::bus::Topic;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Which reply of an action a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Not in the ledger (a request that could not be read).
    Unrecorded,
    /// A reply to an action.
    Response,
    /// A completion report of an action's change.
    Completion,
}

/// Sends replies from the ledger: what the broker did not take is sent again on the next session.
#[derive(Clone)]
pub struct Outbox {
    /// The current session's connection (None between sessions).
    pub session: watch::Receiver<Option<(MqttHandle, Topic)>>,
    /// Where replies are stored and marked acknowledged.
    pub ledger: Arc<Ledger>,
}

impl Outbox {
    /// Sends until the broker acknowledged it (tasks that outlive a session
    /// deliver on the next one).
    pub async fn send(&self, id: &str, kind: Kind, payload: Bytes) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut session = self.session.clone();
        loop {
            let current = match session.wait_for(Option::is_some).await {
                Ok(s) => s.clone(),
                Err(_) => return,
            };
            let Some((mqtt, topic)) = current else {
                continue;
            };
            let outcome = match mqtt.publish_confirmed(&topic, payload.clone()).await {
                Ok(confirmation) => confirmation.await,
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => break,
                Err(why) => {
                    tracing::debug!(%id, %why, "a DMS reply was not acknowledged; sending it again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        if kind == Kind::Unrecorded {
            return;
        }
        let (ledger, id) = (self.ledger.clone(), id.to_string());
        let completion = kind == Kind::Completion;
        let stored = tokio::task::spawn_blocking(move || ledger.acked(&id, completion)).await;
        if let Ok(Err(e)) = stored {
            tracing::warn!(error = %e, "cannot record that the broker took a DMS reply; it may be sent again after a restart");
        }
    }
}
