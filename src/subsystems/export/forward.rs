//! The forwarder: spool -> upstream, strictly in order, at least once.
//!
//! Messages are read in `seq` order and published on one connection, up to
//! `export.batch.forward` awaiting acknowledgement at a time; acks are taken
//! in order and only acknowledged messages are deleted. Any failure (lost
//! connection, refused or missing ack) ends the session: the connection is
//! dropped so nothing queued in it can go out later, and the next session
//! starts again from the oldest message still in the spool. Because a
//! connection delivers in order and is never resumed, what the upstream got
//! from a dead session is a prefix of what was sent, and the new session
//! sends that prefix again (JetStream drops it by `Nats-Msg-Id`; over MQTT
//! it arrives twice and is counted as `resent`) followed by the rest: the
//! upstream sees every message, in order, with no gap.
//!
//! The first message of a session goes alone: only once it is acknowledged
//! (JetStream answers, the stream exists) are more put in flight, so a
//! message refused while the upstream was still coming up cannot be
//! overtaken by the next one.
//!
//! No message can stall the spool for good. One over what the upstream can
//! carry ([`super::capacity`]: spooled before the limit was known, or the
//! limit shrank) is moved to the dead letters without being sent; one the
//! upstream refuses for good (JetStream's answer) is moved there when
//! refused. A broker that cannot say why it refuses (mosquitto's
//! `max_packet_size` closes the connection; a broker may never ack) shows
//! up as sessions that all fail on the same message sent alone: after
//! [`POISON_TRIES`] such sessions in a row, the message is moved aside if it
//! is larger than any the upstream has acknowledged (so a broken upstream
//! that takes nothing cannot empty the spool into the dead letters).

use super::capacity::{Capacity, SharedCapacity};
use super::spool::{Durability, Row, Spool, SpoolError};
use super::upstream::{Acknowledgement, Session, ACK_TIMEOUT};
use crate::backoff::Backoff;
use crate::config::ExportConfig;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often the spool is looked at when nothing was committed by the
/// daemon itself (`iot-agent export send` writes from another process).
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Sessions in a row that may fail on the same message, sent alone, before
/// it is taken for one the broker refuses for its size.
pub const POISON_TRIES: u32 = 3;

/// Why a session ended.
struct Failure {
    why: String,
    /// The session's first message, sent alone, was never acknowledged (the
    /// connection was lost or no ack came): its seq and size.
    alone: Option<(i64, u64)>,
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure { why, alone: None }
    }
}

/// Sessions in a row that failed on the same message sent alone.
#[derive(Default)]
struct Strikes {
    seq: i64,
    n: u32,
}

/// The forwarder's state, as the status reports it.
#[derive(Debug, Default)]
pub struct Shared {
    /// Whether the upstream is connected.
    pub connected: AtomicBool,
    /// The last upstream error, for the status.
    pub last_error: Mutex<Option<String>>,
}

impl Shared {
    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }
}

/// The forwarder's spool connection, used from async code.
#[derive(Clone)]
pub struct Db(Arc<Mutex<Spool>>);

impl Db {
    /// Wraps the forwarder's spool connection.
    pub fn new(spool: Spool) -> Db {
        Db(Arc::new(Mutex::new(spool)))
    }

    /// Runs `f` on the spool off the async runtime.
    pub async fn call<T, F>(&self, f: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Spool) -> Result<T, SpoolError> + Send + 'static,
    {
        let s = self.0.clone();
        tokio::task::spawn_blocking(move || f(&mut s.lock().unwrap_or_else(|e| e.into_inner())))
            .await
            .unwrap_or_else(|e| {
                Err(SpoolError::Open {
                    path: PathBuf::new(),
                    detail: format!("spool task failed: {e}"),
                })
            })
    }
}

/// Runs until cancelled, reconnecting with back-off.
pub async fn run(
    cfg: ExportConfig,
    spool_path: PathBuf,
    committed: Arc<Notify>,
    shared: Arc<Shared>,
    capacity: SharedCapacity,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !cfg.upstream.url.is_set() {
        tracing::warn!("export.upstream.url is not set: messages are spooled but not forwarded");
        shutdown.cancelled().await;
        return Ok(());
    }
    let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_path, Durability::Relaxed))
        .await??;
    let spool_id = spool.id().to_string();
    let db = Db::new(spool);
    let window = cfg.batch.forward.max(1) as usize;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let url = cfg.upstream.url.as_str().to_string();
    let mut strikes = Strikes::default();
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            s = Session::connect(&cfg.upstream, window) => s,
        };
        let why = match connected {
            Ok(mut session) => {
                tracing::info!(url = %url, "export upstream connected");
                shared.connected.store(true, Ordering::SeqCst);
                shared.set_error(None);
                backoff.reset();
                if let Some(learned) = session.learned().cloned() {
                    capacity.set(Capacity::new(&cfg.upstream, Some(&learned)));
                    db.call(move |s| s.put_learned_capacity(&learned)).await?;
                }
                let run = Forwarding {
                    db: &db,
                    spool_id: &spool_id,
                    window,
                    committed: &committed,
                    shutdown: &shutdown,
                    capacity: &capacity,
                };
                let r = run.session(&mut session).await;
                shared.connected.store(false, Ordering::SeqCst);
                match r {
                    Ok(()) => return Ok(()),
                    Err(f) => {
                        strike(&db, &url, &mut strikes, f.alone).await?;
                        f.why
                    }
                }
            }
            Err(e) => {
                // An upstream that cannot be reached is unwell itself: the
                // message that failed before is not the suspect any more.
                strikes = Strikes::default();
                e.to_string()
            }
        };
        let delay = backoff.next_delay();
        tracing::warn!(
            url = %url,
            error = %why,
            retry_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
            "export upstream unavailable; messages stay in the spool"
        );
        shared.set_error(Some(why));
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Counts a session that failed on its first message sent alone, and moves
/// that message to the dead letters after [`POISON_TRIES`] in a row when it
/// is larger than anything the upstream acknowledged.
async fn strike(
    db: &Db,
    url: &str,
    strikes: &mut Strikes,
    alone: Option<(i64, u64)>,
) -> Result<(), SpoolError> {
    let Some((seq, size)) = alone else {
        *strikes = Strikes::default();
        return Ok(());
    };
    if strikes.seq == seq {
        strikes.n += 1;
    } else {
        *strikes = Strikes { seq, n: 1 };
    }
    if strikes.n < POISON_TRIES {
        return Ok(());
    }
    let largest = db.call(|s| s.largest_acked()).await?;
    if largest == 0 || size <= largest {
        tracing::error!(
            seq,
            size,
            largest_acknowledged = largest,
            tries = strikes.n,
            "export upstream fails every session on the same message, which is not larger than \
             what it acknowledged before: the upstream is at fault; the message stays in the spool"
        );
        return Ok(());
    }
    let why = format!(
        "the upstream {url} dropped the connection or never acknowledged, {} times in a row, when \
         sent this message alone ({size} bytes; the largest it acknowledged was {largest} bytes): \
         most likely over the broker's size limit (mosquitto max_packet_size or \
         message_size_limit; set export.upstream.max.payload to it)",
        strikes.n
    );
    tracing::error!(seq, error = %why, "export: message moved to the dead letters (see iot-agent export status)");
    db.call(move |s| s.dead_letter(seq, &why)).await?;
    *strikes = Strikes::default();
    Ok(())
}

struct Forwarding<'a> {
    db: &'a Db,
    spool_id: &'a str,
    window: usize,
    committed: &'a Notify,
    shutdown: &'a CancellationToken,
    capacity: &'a SharedCapacity,
}

/// Acknowledged messages not yet deleted.
#[derive(Default)]
struct Acked {
    first: Option<i64>,
    last: i64,
    n: u64,
    duplicates: u64,
}

impl Forwarding<'_> {
    /// Forwards until cancelled (Ok) or the session fails (Err: why).
    ///
    /// Deleting acknowledged messages runs beside the publishing, in a task
    /// of its own, so the pipeline to the upstream never waits for it.
    async fn session(&self, session: &mut Session) -> Result<(), Failure> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Acked>();
        let db = self.db.clone();
        let deleter = tokio::spawn(async move {
            while let Some(a) = rx.recv().await {
                let Some(first) = a.first else { continue };
                db.call(move |s| s.remove_acked(first, a.last, a.n, a.duplicates))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        });
        let r = self.pump(session, &tx).await;
        // Whatever happened, what was acknowledged leaves the spool.
        drop(tx);
        let flushed = deleter
            .await
            .unwrap_or_else(|e| Err(format!("spool delete task failed: {e}")));
        r?;
        flushed.map_err(Failure::from)
    }

    async fn pump(
        &self,
        session: &mut Session,
        deletes: &tokio::sync::mpsc::UnboundedSender<Acked>,
    ) -> Result<(), Failure> {
        let sent_before = self
            .db
            .call(|s| s.sent_through())
            .await
            .map_err(|e| e.to_string())?;
        let mut acked = Acked::default();
        let flush = |acked: &mut Acked| -> Result<(), String> {
            if acked.first.is_some() {
                deletes
                    .send(std::mem::take(acked))
                    .map_err(|_| "spool delete task stopped".to_string())?;
            }
            Ok(())
        };
        let mut inflight: VecDeque<(i64, u64, Acknowledgement)> = VecDeque::new();
        let mut read_after = 0i64;
        let mut first_acked = false;
        // One cancellation future and one ack deadline for the session, not
        // one per message: at replay rates their setup cost shows.
        let cancelled = self.shutdown.cancelled();
        tokio::pin!(cancelled);
        let lost_token = session.lost();
        let lost = lost_token.cancelled();
        tokio::pin!(lost);
        let deadline = tokio::time::sleep(ACK_TIMEOUT);
        tokio::pin!(deadline);
        let mut last_ack = tokio::time::Instant::now();
        loop {
            let cap = if first_acked { self.window } else { 1 };
            // Top up once a quarter of the window is free: the upstream
            // always has most of a window to work on while the spool is read.
            if inflight.len() <= cap - cap.div_ceil(4) {
                let want = cap - inflight.len();
                // Read and record as sent in one go (one trip to the spool).
                let rows: Vec<Row> = self
                    .db
                    .call(move |s| {
                        let rows = s.read_after(read_after, want)?;
                        if let Some(last) = rows.last().map(|r| r.seq) {
                            let resent =
                                rows.iter().filter(|r| r.seq <= sent_before).count() as u64;
                            s.mark_sent(last, resent)?;
                        }
                        Ok(rows)
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                let capacity = self.capacity.get();
                let mut set_aside = 0;
                for row in rows {
                    read_after = row.seq;
                    if let Err(why) = capacity.check(&row.stream, row.payload.len()) {
                        // Spooled before the limit was known: it can never
                        // go, and sending it would end the session.
                        tracing::error!(seq = row.seq, error = %why, "export: message moved to the dead letters unsent (see iot-agent export status)");
                        let seq = row.seq;
                        self.db
                            .call(move |s| s.dead_letter(seq, &why))
                            .await
                            .map_err(|e| e.to_string())?;
                        set_aside += 1;
                        continue;
                    }
                    let id = format!("{}-{}", self.spool_id, row.seq);
                    let ack = session
                        .publish(&row, &id)
                        .await
                        .map_err(|e| e.to_string())?;
                    let size = (row.payload.len() + row.stream.len()) as u64;
                    inflight.push_back((row.seq, size, ack));
                }
                if set_aside > 0 && inflight.is_empty() {
                    // Only oversized ones were read: read on, do not idle.
                    continue;
                }
            }
            let Some((seq, size, mut ack)) = inflight.pop_front() else {
                flush(&mut acked)?;
                tokio::select! {
                    _ = &mut cancelled => return Ok(()),
                    _ = &mut lost => return Err("upstream connection lost".to_string().into()),
                    _ = self.committed.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                // Waiting for acks starts now, not at the last ack before idling.
                last_ack = tokio::time::Instant::now();
                continue;
            };
            // Sent alone as the session's first: if it fails, it may be
            // what the broker cannot take.
            let alone = (!first_acked && inflight.is_empty()).then_some((seq, size));
            let ack = loop {
                tokio::select! {
                    biased;
                    a = &mut ack => break Ok(a),
                    _ = &mut cancelled => return Ok(flush(&mut acked)?),
                    _ = &mut lost => {
                        flush(&mut acked)?;
                        return Err(Failure {
                            why: format!(
                                "upstream connection lost with {} messages unacknowledged",
                                inflight.len() + 1
                            ),
                            alone,
                        });
                    }
                    _ = &mut deadline => {
                        // The timer is re-armed lazily: only a wait of
                        // ACK_TIMEOUT without any acknowledgement fails.
                        let due = last_ack + ACK_TIMEOUT;
                        if due <= tokio::time::Instant::now() {
                            break Err(());
                        }
                        deadline.as_mut().reset(due);
                    }
                }
            };
            if ack.is_ok() {
                last_ack = tokio::time::Instant::now();
            }
            match ack {
                Ok(Ok(a)) => {
                    first_acked = true;
                    acked.first.get_or_insert(seq);
                    acked.last = seq;
                    acked.n += 1;
                    acked.duplicates += a.duplicate as u64;
                }
                Ok(Err(e)) if e.permanent => {
                    // Retrying cannot succeed: move it aside, so the rest
                    // flows. The session ends and the next one starts after
                    // it (what is in flight behind it is sent again,
                    // dropped by JetStream as duplicates).
                    flush(&mut acked)?;
                    tracing::error!(
                        seq,
                        error = %e,
                        "export upstream refused a message for good; moved to the dead letters (see iot-agent export status)"
                    );
                    let why = e.detail.clone();
                    self.db
                        .call(move |s| s.dead_letter(seq, &why))
                        .await
                        .map_err(|e| e.to_string())?;
                    return Err(
                        format!("message {seq} refused for good, dead-lettered: {e}").into(),
                    );
                }
                Ok(Err(e)) => {
                    flush(&mut acked)?;
                    return Err(Failure {
                        why: format!("message {seq} not acknowledged: {e}"),
                        alone: alone.filter(|_| e.link_lost),
                    });
                }
                Err(_) => {
                    flush(&mut acked)?;
                    return Err(Failure {
                        why: format!(
                            "no acknowledgement for message {seq} within {}s",
                            ACK_TIMEOUT.as_secs()
                        ),
                        alone,
                    });
                }
            }
            if acked.n as usize >= self.window / 2 || inflight.is_empty() {
                flush(&mut acked)?;
            }
        }
    }
}
