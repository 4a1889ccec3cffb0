//! Intake: messages from applications into the spool.
//!
//! One writer thread owns the intake's spool connection. Producers hand it
//! messages through a bounded channel; it takes everything waiting (up to
//! `export.batch.intake`) and commits it in one fsync'd transaction, then
//! answers each producer. With many concurrent producers the cost of the
//! fsync is shared by the whole batch (group commit); with one, it is paid
//! per message, as durability demands.
//!
//! On NATS, a request (`nats req export.STREAM DATA`) is answered only after
//! that commit: `{"ok":true,"seq":N}`, or `{"ok":false,"error":"..."}` when
//! the message was refused (bad stream name, larger than the upstream can
//! carry, spool full under
//! refuse-new) or the spool failed. A plain publish is spooled the same way
//! but nobody can be told the outcome, so scripts that need the guarantee
//! use requests or `iot-agent export send`.

use super::capacity::SharedCapacity;
use super::spool::{Limits, NewMessage, Outcome, Spool};
use crate::bus::{topics, Incoming, Nats, Topic};
use bytes::Bytes;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// Largest payload accepted in any case: NATS' default `max_payload` (the
/// device-local server's too). The upstream's own limit, less the
/// forwarder's headers, may be lower: see [`super::capacity`].
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// The answer to one producer: the message's seq, or why it was refused.
pub type Reply = Result<i64, String>;

/// One message for the writer, with the producer waiting on `done`.
pub struct Job {
    /// The message.
    pub msg: NewMessage,
    /// Told the message's sequence once it is committed, or why not.
    pub done: Option<oneshot::Sender<Reply>>,
}

/// A handle on the writer thread.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer thread; it ends when every [`Writer`] is dropped,
    /// after committing what was queued. `committed` is notified after
    /// each commit (the forwarder waits on it).
    pub fn spawn(
        mut spool: Spool,
        limits: Limits,
        max_batch: usize,
        committed: Arc<Notify>,
    ) -> (Writer, std::thread::JoinHandle<()>) {
        let max_batch = max_batch.max(1);
        let (tx, mut rx) = mpsc::channel::<Job>(max_batch * 4);
        let thread = std::thread::Builder::new()
            .name("export-writer".into())
            .spawn(move || {
                let mut jobs = Vec::with_capacity(max_batch);
                while let Some(first) = rx.blocking_recv() {
                    jobs.push(first);
                    while jobs.len() < max_batch {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    commit(&mut spool, limits, &mut jobs);
                    committed.notify_one();
                }
            })
            .expect("cannot start the export writer thread");
        (Writer { tx }, thread)
    }

    /// Queues a message; the reply comes once it is durably spooled (or
    /// refused). Waits while the writer is saturated (back-pressure).
    pub async fn submit(&self, msg: NewMessage) -> Reply {
        let (done, wait) = oneshot::channel();
        self.send(msg, Some(done)).await?;
        wait.await
            .map_err(|_| "the export writer stopped".to_string())?
    }

    /// Queues a message whose producer cannot be answered.
    pub async fn send(
        &self,
        msg: NewMessage,
        done: Option<oneshot::Sender<Reply>>,
    ) -> Result<(), String> {
        self.tx
            .send(Job { msg, done })
            .await
            .map_err(|_| "the export writer stopped".to_string())
    }
}

fn commit(spool: &mut Spool, limits: Limits, jobs: &mut Vec<Job>) {
    let msgs: Vec<NewMessage> = jobs.iter().map(|j| j.msg.clone()).collect();
    match spool.insert_batch(&msgs, limits) {
        Ok(outcomes) => {
            for (job, outcome) in jobs.drain(..).zip(outcomes) {
                let reply = match outcome {
                    Outcome::Spooled(seq) => Ok(seq),
                    Outcome::Refused(why) => {
                        if job.done.is_none() {
                            tracing::warn!(stream = %job.msg.stream, reason = %why, "export: message refused (plain publish, producer not told)");
                        }
                        Err(why)
                    }
                };
                if let Some(done) = job.done {
                    let _ = done.send(reply);
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, messages = jobs.len(), "export: cannot write to the spool");
            for job in jobs.drain(..) {
                if let Some(done) = job.done {
                    let _ = done.send(Err(format!("cannot write to the spool: {e}")));
                }
            }
        }
    }
}

/// The stream named by an intake subject (NATS form): the tokens after
/// the prefix, each letters, digits, `-` or `_`, dot-joined.
pub fn stream_of(subject: &str, intake: &Topic) -> Result<String, String> {
    let prefix = intake.nats();
    let prefix = prefix.trim_end_matches(".>");
    let rest = subject
        .strip_prefix(prefix)
        .ok_or_else(|| format!("{subject} is not under {prefix}"))?;
    let rest = match rest.strip_prefix('.') {
        Some(r) => r,
        None if rest.is_empty() => {
            return Err(format!("no stream named: publish on {prefix}.STREAM"))
        }
        None => return Err(format!("{subject} is not under {prefix}")),
    };
    for s in rest.split('.') {
        topics::segment(s).map_err(|e| format!("bad stream name: {e}"))?;
    }
    Ok(rest.to_string())
}

/// Serves the intake subject until cancelled.
pub async fn serve(
    bus: Nats,
    intake: Topic,
    writer: Writer,
    capacity: SharedCapacity,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut sub = bus.subscribe(&intake).await?;
    tracing::info!(subject = %intake.nats(), "export intake listening");
    let status = Topic::fixed(topics::EXPORT_STATUS);
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = sub.next() => m,
        };
        let Some(m) = m else {
            anyhow::bail!("the intake subscription on {} ended", intake.nats());
        };
        if m.topic == status {
            continue;
        }
        let stream = match stream_of(&m.subject, &intake) {
            Ok(s) => s,
            Err(why) => {
                answer(&bus, &m, Err(why)).await;
                continue;
            }
        };
        // Refused here, where the producer can be told, rather than
        // spooled and then refused by the upstream for good.
        if let Err(why) = capacity.get().check(&stream, m.payload.len()) {
            answer(&bus, &m, Err(why)).await;
            continue;
        }
        let msg = NewMessage::new(stream, m.payload.clone());
        if !m.wants_reply() {
            writer
                .send(msg, None)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            continue;
        }
        let (done, wait) = oneshot::channel();
        writer
            .send(msg, Some(done))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let bus = bus.clone();
        tokio::spawn(async move {
            let reply = wait
                .await
                .unwrap_or_else(|_| Err("the export writer stopped".into()));
            answer(&bus, &m, reply).await;
        });
    }
}

/// The JSON answer to a producer (requests only).
pub fn reply_doc(reply: &Reply) -> Bytes {
    let doc = match reply {
        Ok(seq) => json!({"ok": true, "seq": seq}),
        Err(why) => json!({"ok": false, "error": why}),
    };
    Bytes::from(doc.to_string())
}

async fn answer(bus: &Nats, m: &Incoming, reply: Reply) {
    if !m.wants_reply() {
        if let Err(why) = &reply {
            tracing::warn!(subject = %m.topic.nats(), reason = %why, "export: message refused (plain publish, producer not told)");
        }
        return;
    }
    if let Err(e) = bus.reply(m, reply_doc(&reply)).await {
        tracing::warn!(error = %e, "export: cannot answer the producer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_come_from_checked_segments() {
        let intake = topics::export_intake("export").unwrap();
        assert_eq!(stream_of("export.temp", &intake).unwrap(), "temp");
        assert_eq!(stream_of("export.a.b-c", &intake).unwrap(), "a.b-c");
        for bad in [
            "export",
            "export.",
            "exporter.x",
            "export.a b",
            "export.a/b",
            "x.export.a",
        ] {
            assert!(stream_of(bad, &intake).is_err(), "{bad}");
        }
    }

    /// Property-style check over generated subjects: parsing never panics
    /// and accepts exactly the subjects whose every segment is valid.
    #[test]
    fn stream_parsing_over_generated_subjects() {
        let intake = topics::export_intake("export").unwrap();
        let alphabet = ["a", "Z", "0", "-", "_", ".", " ", "*", ">", "é", "/", ""];
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..5000 {
            let mut s = String::from("export.");
            for _ in 0..(state % 7) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push_str(alphabet[(state % alphabet.len() as u64) as usize]);
            }
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let rest = &s["export.".len()..];
            let valid = !rest.is_empty() && rest.split('.').all(|seg| topics::segment(seg).is_ok());
            assert_eq!(stream_of(&s, &intake).is_ok(), valid, "{s:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_producers_share_commits_and_all_get_answers() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            &d.path().join("x.db"),
            super::super::spool::Durability::Full,
        )
        .unwrap();
        let limits = Limits {
            max_bytes: 1 << 30,
            policy: crate::config::FullPolicy::RefuseNew,
        };
        let (writer, thread) = Writer::spawn(spool, limits, 64, Arc::new(Notify::new()));
        let mut tasks = Vec::new();
        for p in 0..8 {
            let w = writer.clone();
            tasks.push(tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..50 {
                    let seq = w
                        .submit(NewMessage::new(format!("p{p}"), format!("{i}")))
                        .await
                        .unwrap();
                    seqs.push(seq);
                }
                seqs
            }));
        }
        for t in tasks {
            let seqs = t.await.unwrap();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "per-producer order");
        }
        drop(writer);
        thread.join().unwrap();
        let s = Spool::open(
            &d.path().join("x.db"),
            super::super::spool::Durability::Full,
        )
        .unwrap();
        assert_eq!(s.snapshot().unwrap().messages, 400);
    }
}
