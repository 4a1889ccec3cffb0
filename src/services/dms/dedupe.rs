//! QoS 1 may deliver an action twice. An action id seen before is not run
//! again; its response is sent again (once the first run has one).

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tokio::sync::watch;

/// How many recent ids are remembered.
const REMEMBER: usize = 1024;

#[derive(Default)]
pub struct Dedupe {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    seen: HashMap<String, watch::Receiver<Option<Bytes>>>,
    order: VecDeque<String>,
}

/// The first sighting of an id: report its response here.
pub struct First(watch::Sender<Option<Bytes>>);

impl First {
    pub fn done(self, response: Bytes) {
        self.0.send_replace(Some(response));
    }
}

pub enum Seen {
    First(First),
    /// Seen before: the response, when (or once) it exists.
    Again(watch::Receiver<Option<Bytes>>),
}

impl Dedupe {
    pub fn check(&self, id: &str) -> Seen {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = inner.seen.get(id) {
            return Seen::Again(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        inner.seen.insert(id.to_string(), rx);
        inner.order.push_back(id.to_string());
        if inner.order.len() > REMEMBER {
            if let Some(old) = inner.order.pop_front() {
                inner.seen.remove(&old);
            }
        }
        Seen::First(First(tx))
    }
}

/// Waits for the response of a repeated id (None if the first run vanished).
pub async fn response_of(mut rx: watch::Receiver<Option<Bytes>>) -> Option<Bytes> {
    rx.wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|r| r.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_repeated_id_gets_the_first_response() {
        let d = Dedupe::default();
        let Seen::First(first) = d.check("a") else {
            panic!("first")
        };
        let Seen::Again(rx) = d.check("a") else {
            panic!("again")
        };
        first.done(Bytes::from_static(b"resp"));
        assert_eq!(response_of(rx).await.unwrap(), "resp");
        assert!(matches!(d.check("b"), Seen::First(_)));
    }
}
