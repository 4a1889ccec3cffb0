//! The relay's view of its agents (G-SDK's device list and status
//! stream): one record per device that was taken or is registered, and one
//! event per transition, numbered in the order they happened. The events
//! go to every subscriber of the admin API's stream and, with `nats.url`
//! set, to NATS (`relay.status.{deviceId}`), in that same order.

use serde::Serialize;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{broadcast, mpsc};

/// Events a slow stream subscriber may fall behind by before it is told
/// it lost some (and its stream ends).
pub const STREAM_BACKLOG: usize = 1024;
/// Events held for NATS while it is slow or away; beyond, dropped (logged).
pub const NATS_BACKLOG: usize = 4096;

/// Who dials whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The agent dials the relay's agents' port (G-SDK's DEVICE_TO_SERVER).
    DeviceDials,
    /// The relay dials the agent's `tunnel.listen` (SERVER_TO_DEVICE).
    RelayDials,
}

/// A transition, as published.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Increases by one per event of this relay process.
    pub seq: u64,
    /// The device.
    pub device_id: String,
    /// `connected` (plain TCP), `tls-connected`, `disconnected`, `refused`.
    pub event: &'static str,
    /// Why, for `disconnected` and `refused`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who dialed whom.
    pub mode: Mode,
    /// The other end's address.
    pub address: String,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
}

/// Bytes of one connection, as its yamux frames (after TLS).
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes received from the agent.
    pub bytes_in: AtomicU64,
    /// Bytes sent to the agent.
    pub bytes_out: AtomicU64,
}

struct Record {
    mode: Mode,
    address: String,
    tls: bool,
    /// The live connection's session number and since when.
    live: Option<(u64, i64)>,
    counters: Arc<Counters>,
    /// Why it last disconnected or was refused.
    last_reason: Option<String>,
    /// A relay-dials registration keeps the record while disconnected.
    registered: bool,
}

#[derive(Default)]
struct Inner {
    records: BTreeMap<String, Record>,
    seq: u64,
}

/// The records and the event fan-out.
pub struct Board {
    inner: Mutex<Inner>,
    stream: broadcast::Sender<Arc<Event>>,
    nats: Mutex<Option<mpsc::Sender<Arc<Event>>>>,
    nats_dropped: AtomicU64,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            inner: Mutex::default(),
            stream: broadcast::channel(STREAM_BACKLOG).0,
            nats: Mutex::new(None),
            nats_dropped: AtomicU64::new(0),
        }
    }
}

/// What a connection is, for its record and events.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Who dialed whom.
    pub mode: Mode,
    /// The other end's address.
    pub address: String,
    /// Whether the connection is TLS.
    pub tls: bool,
}

impl Board {
    /// Events from now on, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.stream.subscribe()
    }

    /// Sends every later event to `tx` too (the NATS publisher).
    pub fn publish_to(&self, tx: mpsc::Sender<Arc<Event>>) {
        *self.nats.lock().expect("board lock") = Some(tx);
    }

    /// Numbers and sends an event; called with the records locked, so the
    /// numbering, the records and the order sent agree.
    fn emit(
        &self,
        inner: &mut Inner,
        device: &str,
        event: &'static str,
        reason: Option<String>,
        c: &ConnInfo,
    ) {
        inner.seq += 1;
        let e = Arc::new(Event {
            seq: inner.seq,
            device_id: device.to_string(),
            event,
            reason,
            mode: c.mode,
            address: c.address.clone(),
            tls: c.tls,
            timestamp: crate::clock::now_ms(),
        });
        tracing::debug!(device, event, seq = e.seq, "status event");
        let _ = self.stream.send(e.clone());
        if let Some(tx) = self.nats.lock().expect("board lock").as_ref() {
            if tx.try_send(e).is_err() {
                let n = self.nats_dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    tracing::warn!(
                        dropped = n + 1,
                        "status events not published: NATS is behind by {NATS_BACKLOG}"
                    );
                }
            }
        }
    }

    /// A connection was taken. A live older connection of the device is
    /// reported disconnected first (it is being replaced).
    pub fn connected(&self, device: &str, session: u64, c: &ConnInfo, counters: Arc<Counters>) {
        let mut inner = self.inner.lock().expect("board lock");
        let old = inner.records.get(device).and_then(|r| {
            r.live.map(|_| ConnInfo {
                mode: r.mode,
                address: r.address.clone(),
                tls: r.tls,
            })
        });
        if let Some(old) = old {
            self.emit(
                &mut inner,
                device,
                "disconnected",
                Some("replaced by a newer connection".into()),
                &old,
            );
        }
        let registered = inner.records.get(device).is_some_and(|r| r.registered);
        inner.records.insert(
            device.to_string(),
            Record {
                mode: c.mode,
                address: c.address.clone(),
                tls: c.tls,
                live: Some((session, crate::clock::now_ms())),
                counters,
                last_reason: None,
                registered,
            },
        );
        let event = if c.tls { "tls-connected" } else { "connected" };
        self.emit(&mut inner, device, event, None, c);
    }

    /// The connection `session` ended (nothing if it was replaced already).
    pub fn disconnected(&self, device: &str, session: u64, reason: &str) {
        let mut inner = self.inner.lock().expect("board lock");
        let Some(r) = inner.records.get_mut(device) else {
            return;
        };
        if r.live.map(|(s, _)| s) != Some(session) {
            return;
        }
        r.live = None;
        r.last_reason = Some(reason.to_string());
        let c = ConnInfo {
            mode: r.mode,
            address: r.address.clone(),
            tls: r.tls,
        };
        // A relay-dials agent whose registration was removed goes.
        if r.mode == Mode::RelayDials && !r.registered {
            inner.records.remove(device);
        }
        self.emit(&mut inner, device, "disconnected", Some(reason.into()), &c);
    }

    /// A device was refused (accept filter, version, identity).
    pub fn refused(&self, device: &str, c: &ConnInfo, reason: &str) {
        let mut inner = self.inner.lock().expect("board lock");
        if let Some(r) = inner.records.get_mut(device) {
            if r.live.is_none() {
                r.last_reason = Some(reason.to_string());
            }
        }
        self.emit(&mut inner, device, "refused", Some(reason.into()), c);
    }

    /// Why the relay could not connect a registered agent (no event: it
    /// was not connected).
    pub fn note(&self, device: &str, reason: &str) {
        let mut inner = self.inner.lock().expect("board lock");
        if let Some(r) = inner.records.get_mut(device) {
            if r.live.is_none() {
                r.last_reason = Some(reason.to_string());
            }
        }
    }

    /// A relay-dials registration: listed (disconnected) until it connects.
    pub fn register(&self, device: &str, address: &str, tls: bool) {
        let mut inner = self.inner.lock().expect("board lock");
        let r = inner
            .records
            .entry(device.to_string())
            .or_insert_with(|| Record {
                mode: Mode::RelayDials,
                address: address.to_string(),
                tls,
                live: None,
                counters: Arc::default(),
                last_reason: None,
                registered: true,
            });
        r.registered = true;
        if r.live.is_none() {
            r.mode = Mode::RelayDials;
            r.address = address.to_string();
            r.tls = tls;
        }
    }

    /// The registration is gone; a disconnected record goes with it.
    pub fn unregister(&self, device: &str) {
        let mut inner = self.inner.lock().expect("board lock");
        if let Some(r) = inner.records.get_mut(device) {
            r.registered = false;
            if r.live.is_none() {
                inner.records.remove(device);
            }
        }
    }

    /// Every record, by device id, as the admin API lists it (without the
    /// pipes, which the caller adds).
    pub fn list(&self) -> Vec<serde_json::Value> {
        let inner = self.inner.lock().expect("board lock");
        inner
            .records
            .iter()
            .map(|(device, r)| {
                serde_json::json!({
                    "deviceId": device,
                    "status": if r.live.is_some() { "connected" } else { "disconnected" },
                    "mode": r.mode,
                    "address": r.address,
                    "tls": r.tls,
                    "autoReconnect": r.registered,
                    "connectedSince": r.live.map(|(_, since)| since),
                    "bytesIn": r.counters.bytes_in.load(Ordering::Relaxed),
                    "bytesOut": r.counters.bytes_out.load(Ordering::Relaxed),
                    "lastReason": r.last_reason,
                })
            })
            .collect()
    }
}

/// An I/O object that counts the bytes through it.
pub struct Counted<T> {
    inner: T,
    counters: Arc<Counters>,
}

impl<T> Counted<T> {
    /// Counts the bytes through `inner` into `counters`.
    pub fn new(inner: T, counters: Arc<Counters>) -> Self {
        Counted { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = (buf.filled().len() - before) as u64;
            this.counters.bytes_in.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(tls: bool) -> ConnInfo {
        ConnInfo {
            mode: Mode::DeviceDials,
            address: "127.0.0.1:1".into(),
            tls,
        }
    }

    #[test]
    fn a_replaced_connection_is_reported_before_the_new_one_and_only_once() {
        let b = Board::default();
        let mut rx = b.subscribe();
        b.connected("d", 1, &info(true), Arc::default());
        b.connected("d", 2, &info(true), Arc::default());
        // The old session's own end comes late: nothing more.
        b.disconnected("d", 1, "the connection was closed");
        b.disconnected("d", 2, "no heartbeat for 1s");
        let got: Vec<(u64, &str, Option<String>)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| (e.seq, e.event, e.reason.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "tls-connected", None),
                (
                    2,
                    "disconnected",
                    Some("replaced by a newer connection".into())
                ),
                (3, "tls-connected", None),
                (4, "disconnected", Some("no heartbeat for 1s".into())),
            ]
        );
    }

    #[test]
    fn registrations_are_listed_while_disconnected() {
        let b = Board::default();
        b.register("d", "10.0.0.1:7100", false);
        let list = b.list();
        assert_eq!(list[0]["status"], "disconnected");
        assert_eq!(list[0]["mode"], "relay-dials");
        assert_eq!(list[0]["autoReconnect"], true);
        b.unregister("d");
        assert!(b.list().is_empty());
    }
}
