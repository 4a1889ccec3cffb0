//! A terminal session as the operator's side holds it: opens, sends input
//! in numbered frames, acknowledges output (the agent's backpressure
//! window), puts output back in order and drops duplicates, and keeps a
//! quiet session alive.

use super::link::{Link, Messages};
use crate::bus::Topic;
use crate::services::terminal::protocol::{self, Answer, Exit, InputFrame, OutFrame, Reorder};
use bytes::Bytes;
use std::time::Duration;

/// What a session gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Output bytes, in order.
    Output(Bytes),
    /// The session is over.
    Exit(Exit),
}

/// An open session.
pub struct Session {
    link: Link,
    root: Topic,
    id: String,
    out: Messages,
    answers: Messages,
    /// NATS: the inbox input answers come to.
    inbox: Option<String>,
    input_seq: u64,
    reorder: Reorder<OutFrame>,
    /// In order, not yet returned.
    pending: std::collections::VecDeque<OutFrame>,
    acked: u64,
    keepalive: Duration,
}

/// An error answer as text: `kind: message`.
pub fn answer_error(a: &Answer) -> String {
    match &a.error {
        Some(e) => format!("{}: {}", e.kind, e.message),
        None => "refused without a reason".into(),
    }
}

fn parse_answer(b: &[u8]) -> Result<Answer, String> {
    serde_json::from_slice(b).map_err(|e| format!("unreadable answer from the device: {e}"))
}

impl Session {
    /// Opens a session under `root` (see [`super::Device::terminal_root`]).
    pub async fn open(link: &Link, root: &Topic, open: protocol::Open) -> Result<Session, String> {
        let token = super::link::reply_token();
        let reply = root
            .join(&[protocol::REPLY, &token])
            .map_err(|e| e.to_string())?;
        let open_topic = root.join(&[protocol::OPEN]).map_err(|e| e.to_string())?;
        let (answer, mut answers, inbox) = match link {
            Link::Nats(c) => {
                let inbox = c.new_inbox();
                let answers = link.subscribe(&Topic::from_nats(&inbox)).await?;
                let body = serde_json::to_value(&open).expect("JSON");
                let a = link.request(root, &open_topic, body).await?;
                (a, answers, Some(inbox))
            }
            Link::Mqtt(_) => {
                let mut answers = link.subscribe(&reply).await?;
                let mut o = open.clone();
                o.reply_to = Some(token.clone());
                link.publish(&open_topic, serde_json::to_vec(&o).expect("JSON").into())
                    .await?;
                let a = match tokio::time::timeout(super::link::REQUEST_TIMEOUT, answers.next())
                    .await
                {
                    Ok(Some((_, b))) => b,
                    Ok(None) => return Err("the connection closed".into()),
                    Err(_) => {
                        return Err(format!(
                            "no answer on {open_topic} (is the terminal enabled on the device?)"
                        ))
                    }
                };
                (a, answers, None)
            }
        };
        let answer = parse_answer(&answer)?;
        if !answer.ok {
            return Err(answer_error(&answer));
        }
        let id = answer
            .session
            .ok_or("the device's answer names no session")?;
        let out_topic = root
            .join(&[&id, protocol::OUT])
            .map_err(|e| e.to_string())?;
        let out = link.subscribe(&out_topic).await?;
        let keepalive = Duration::from_secs(answer.idle_secs.unwrap_or(60).max(3) / 3);
        // Drain anything that came on the answer stream before (the open's
        // own answer on MQTT was read above).
        while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, answers.next()).await {}
        let s = Session {
            link: link.clone(),
            root: root.clone(),
            id,
            out,
            answers,
            inbox,
            input_seq: 0,
            reorder: Reorder::new(4 * protocol::WINDOW as usize),
            pending: Default::default(),
            acked: 0,
            keepalive,
        };
        // Says "listening": the agent holds the output until then.
        s.ack(0).await?;
        Ok(s)
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn topic(&self, leaf: &str) -> Result<Topic, String> {
        self.root.join(&[&self.id, leaf]).map_err(|e| e.to_string())
    }

    async fn ack(&self, seq: u64) -> Result<(), String> {
        let body = serde_json::to_vec(&protocol::Ack { seq }).expect("JSON");
        self.link
            .publish(&self.topic(protocol::ACK)?, body.into())
            .await
    }

    /// Sends input bytes (any bytes).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        self.input_seq += 1;
        let frame = InputFrame {
            seq: self.input_seq,
            data: Bytes::copy_from_slice(data),
        }
        .encode();
        let topic = self.topic(protocol::INPUT)?;
        match (&self.link, &self.inbox) {
            (Link::Nats(c), Some(inbox)) => c
                .publish_with_reply(topic.nats(), inbox.clone(), frame)
                .await
                .map_err(|e| format!("cannot send input: {e}")),
            _ => self.link.publish(&topic, frame).await,
        }
    }

    /// Changes the window size.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        let body = serde_json::to_value(protocol::Resize {
            rows,
            cols,
            reply_to: None,
        })
        .expect("JSON");
        let a = self
            .link
            .request(&self.root, &self.topic(protocol::RESIZE)?, body)
            .await?;
        let a = parse_answer(&a)?;
        if a.ok {
            Ok(())
        } else {
            Err(answer_error(&a))
        }
    }

    /// Ends the session; returns once the device killed its processes.
    pub async fn close(&self) -> Result<(), String> {
        let a = self
            .link
            .request(
                &self.root,
                &self.topic(protocol::CLOSE)?,
                serde_json::json!({}),
            )
            .await?;
        let a = parse_answer(&a)?;
        if a.ok {
            Ok(())
        } else {
            Err(answer_error(&a))
        }
    }

    /// The next output, in order, or the exit; an error answer to input
    /// ends it with the error.
    pub async fn next(&mut self) -> Result<Event, String> {
        loop {
            if !self.pending.is_empty() {
                // Acknowledged before it is taken out: a caller that drops
                // this future (select!) loses no frame.
                let got = self.reorder.next_seq() - self.pending.len() as u64;
                if got >= self.acked + protocol::WINDOW / 4 {
                    self.ack(got).await?;
                    self.acked = got;
                }
                let f = self.pending.pop_front().expect("not empty");
                return Ok(match f {
                    OutFrame::Output { data, .. } => Event::Output(data),
                    OutFrame::Exit { exit, .. } => Event::Exit(exit),
                });
            }
            let tick = tokio::time::sleep(self.keepalive);
            tokio::select! {
                m = self.out.next() => {
                    let (_, b) = m.ok_or("the connection closed")?;
                    let frame = OutFrame::decode(&b)?;
                    let seq = frame.seq();
                    self.pending.extend(self.reorder.push(seq, frame)?);
                }
                a = self.answers.next() => {
                    let (_, b) = a.ok_or("the connection closed")?;
                    let a = parse_answer(&b)?;
                    if !a.ok {
                        return Err(answer_error(&a));
                    }
                }
                _ = tick => {
                    let got = self.reorder.next_seq() - 1 - self.pending.len() as u64;
                    self.acked = got;
                    self.ack(got).await?;
                }
            }
        }
    }
}
