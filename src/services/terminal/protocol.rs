//! The terminal's wire format, shared by the agent's service and the
//! operator's side (`iot-remote shell`), so both are written against one
//! definition.
//!
//! Under a root (NATS `iot.agent.terminal`, MQTT
//! `devices/terminal/{device id}`):
//! - `open` (JSON [`Open`]) answers [`Answer`] with the session id;
//! - `{session}/input`: a binary [`InputFrame`] (sequence number, then the
//!   bytes as typed: commas, NUL and non-UTF-8 are data like any other);
//! - `{session}/resize` (JSON [`Resize`]), `{session}/ack` (JSON [`Ack`]),
//!   `{session}/close` (JSON `{}`);
//! - `{session}/out`: the agent's binary [`OutFrame`]s, numbered from 1 with
//!   no gap: output bytes, then one exit frame last.
//!
//! Why binary frames: output is whatever the PTY produced, and text inside
//! JSON would have to mangle or escape bytes that are not UTF-8 (the
//! reference agent's defect). Why sequence numbers on both directions: an
//! MQTT broker may deliver a QoS 1 message twice, so each side drops what it
//! saw already and the receiver of output can put it in order.
use serde::{Deserialize, Serialize};

/// The leaf that opens a session.
pub const OPEN: &str = "open";
/// The session's input leaf.
pub const INPUT: &str = "input";
/// The session's resize leaf.
pub const RESIZE: &str = "resize";
/// The session's flow-control leaf: what the operator has received.
pub const ACK: &str = "ack";
/// The session's close leaf.
pub const CLOSE: &str = "close";
/// The session's output leaf (agent to operator).
pub const OUT: &str = "out";
/// Answers to requests that came without a NATS reply subject (MQTT):
/// `{root}/reply/{reply-to}`.
pub const REPLY: &str = "reply";

/// Output frames the agent sends beyond the operator's last [`Ack`] before
/// it stops reading the PTY (end-to-end backpressure: a slow operator slows
/// the shell, nothing is dropped).
pub const WINDOW: u64 = 64;
/// Largest output chunk of one frame.
pub const CHUNK: usize = 16 * 1024;

/// `open`: a new session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Open {
    /// Terminal rows (1 to 1000).
    pub rows: u16,
    /// Terminal columns (1 to 1000).
    pub cols: u16,
    /// A command for the shell to run (`shell -c command`) instead of an
    /// interactive shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// `TERM` for the session (default `xterm-256color`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    /// Who opens it, as the operator's side states it (logged; the broker's
    /// permissions decided whether it may).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// MQTT: the token of the topic the answer goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// `resize`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Resize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
    /// See [`Open::reply_to`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// `ack`: every output frame up to `seq` arrived.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Ack {
    /// The highest output sequence number received without a gap.
    pub seq: u64,
}

/// `close` (and other bodies that carry nothing but the answer's address).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Plain {
    /// See [`Open::reply_to`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// Every request's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Answer {
    /// True when done.
    pub ok: bool,
    /// The session (answers to `open`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The idle timeout in seconds (answers to `open`): the operator's side
    /// sends an [`Ack`] at least this often to keep a quiet session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_secs: Option<u64>,
    /// The output window (answers to `open`), see [`WINDOW`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// An error answer's body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// Stable, for programs (see [`ErrorKind`]).
    pub kind: String,
    /// For people.
    pub message: String,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Unreadable or out-of-range request.
    BadRequest,
    /// The subject names no operation.
    BadSubject,
    /// No such session (never opened, or over).
    UnknownSession,
    /// `terminal.sessions.max` sessions are open.
    TooMany,
    /// The PTY or the shell could not be started.
    Spawn,
    /// Input arrived with a gap in its sequence numbers.
    OutOfOrder,
    /// The NATS server protects nothing, so the terminal is not served.
    Unprotected,
    /// The shell is not reading its input: this frame was not taken (the
    /// next expected sequence number stays the same: send it again).
    InputFull,
}

impl ErrorKind {
    /// The `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "terminal-bad-request",
            ErrorKind::BadSubject => "terminal-bad-subject",
            ErrorKind::UnknownSession => "terminal-unknown-session",
            ErrorKind::TooMany => "terminal-too-many-sessions",
            ErrorKind::Spawn => "terminal-spawn-failed",
            ErrorKind::OutOfOrder => "terminal-out-of-order",
            ErrorKind::Unprotected => "terminal-unprotected",
            ErrorKind::InputFull => "terminal-input-full",
        }
    }

    /// Every kind, for the documentation check.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::BadRequest,
        ErrorKind::BadSubject,
        ErrorKind::UnknownSession,
        ErrorKind::TooMany,
        ErrorKind::Spawn,
        ErrorKind::OutOfOrder,
        ErrorKind::Unprotected,
        ErrorKind::InputFull,
    ];
}

impl Answer {
    /// Done.
    pub fn ok() -> Answer {
        Answer {
            ok: true,
            ..Default::default()
        }
    }

    /// Refused.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Answer {
        Answer {
            ok: false,
            error: Some(ErrorBody {
                kind: kind.as_str().into(),
                message: message.into(),
            }),
            ..Default::default()
        }
    }

    /// As JSON.
    pub fn to_bytes(&self) -> bytes::Bytes {
        serde_json::to_vec(self)
            .expect("an answer always serializes")
            .into()
    }
}

/// A binary input frame: the sequence number (u64, big endian, from 1)
/// and the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFrame {
    /// From 1, one more per frame.
    pub seq: u64,
    /// As typed.
    pub data: bytes::Bytes,
}

impl InputFrame {
    /// Encodes.
    pub fn encode(&self) -> bytes::Bytes {
        let mut v = Vec::with_capacity(8 + self.data.len());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.data);
        v.into()
    }

    /// Decodes remote input.
    pub fn decode(b: &bytes::Bytes) -> Result<InputFrame, String> {
        if b.len() < 8 {
            return Err(format!(
                "an input frame starts with an 8-byte sequence number; got {} bytes",
                b.len()
            ));
        }
        let seq = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
        if seq == 0 {
            return Err("input sequence numbers start at 1".into());
        }
        Ok(InputFrame {
            seq,
            data: b.slice(8..),
        })
    }
}

/// What ended a session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Exit {
    /// The shell's exit code, when it exited by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended the shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `exited`, `closed`, `idle` or `shutdown`.
    pub reason: String,
}

/// A frame on `{session}/out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// PTY output.
    Output {
        /// From 1, one more per frame.
        seq: u64,
        /// The bytes as the PTY produced them.
        data: bytes::Bytes,
    },
    /// The session is over; the last frame.
    Exit {
        /// Sequence number.
        seq: u64,
        /// How it ended.
        exit: Exit,
    },
}

const KIND_OUTPUT: u8 = b'o';
const KIND_EXIT: u8 = b'x';

impl OutFrame {
    /// Its sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            OutFrame::Output { seq, .. } | OutFrame::Exit { seq, .. } => *seq,
        }
    }

    /// Encodes: one kind byte (`o` output, `x` exit), the sequence number
    /// (u64, big endian), then the bytes or the exit's JSON.
    pub fn encode(&self) -> bytes::Bytes {
        let (kind, seq, body): (u8, u64, Vec<u8>) = match self {
            OutFrame::Output { seq, data } => (KIND_OUTPUT, *seq, data.to_vec()),
            OutFrame::Exit { seq, exit } => (
                KIND_EXIT,
                *seq,
                serde_json::to_vec(exit).expect("an exit always serializes"),
            ),
        };
        let mut v = Vec::with_capacity(9 + body.len());
        v.push(kind);
        v.extend_from_slice(&seq.to_be_bytes());
        v.extend_from_slice(&body);
        v.into()
    }

    /// Decodes a frame from the agent.
    pub fn decode(b: &bytes::Bytes) -> Result<OutFrame, String> {
        if b.len() < 9 {
            return Err(format!(
                "an output frame has at least 9 bytes; got {}",
                b.len()
            ));
        }
        let seq = u64::from_be_bytes(b[1..9].try_into().expect("8 bytes"));
        match b[0] {
            KIND_OUTPUT => Ok(OutFrame::Output {
                seq,
                data: b.slice(9..),
            }),
            KIND_EXIT => Ok(OutFrame::Exit {
                seq,
                exit: serde_json::from_slice(&b[9..])
                    .map_err(|e| format!("bad exit frame: {e}"))?,
            }),
            k => Err(format!("unknown output frame kind {k:#04x}")),
        }
    }
}

/// Puts frames back in order and drops duplicates: what the receiver of a
/// numbered stream does (the agent's input side, the operator's output
/// side).
#[derive(Debug)]
pub struct Reorder<T> {
    next: u64,
    held: std::collections::BTreeMap<u64, T>,
    /// Most frames held waiting for a gap to fill.
    limit: usize,
}

impl<T> Reorder<T> {
    /// Expects sequence number 1 first.
    pub fn new(limit: usize) -> Self {
        Reorder {
            next: 1,
            held: Default::default(),
            limit,
        }
    }

    /// The next sequence number expected.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Takes a frame; returns the frames now deliverable, in order, or an
    /// error when more than the limit wait for a gap.
    pub fn push(&mut self, seq: u64, item: T) -> Result<Vec<T>, String> {
        if seq < self.next || self.held.contains_key(&seq) {
            return Ok(Vec::new());
        }
        self.held.insert(seq, item);
        let mut out = Vec::new();
        while let Some(v) = self.held.remove(&self.next) {
            out.push(v);
            self.next += 1;
        }
        if self.held.len() > self.limit {
            return Err(format!(
                "frame {} never arrived ({} later frames waiting)",
                self.next,
                self.held.len()
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_any_bytes() {
        let all: Vec<u8> = (0..=255).collect();
        let f = OutFrame::Output {
            seq: 7,
            data: all.clone().into(),
        };
        assert_eq!(OutFrame::decode(&f.encode()).unwrap(), f);
        let i = InputFrame {
            seq: 3,
            data: b"echo a,b\xff\x00".to_vec().into(),
        };
        assert_eq!(InputFrame::decode(&i.encode()).unwrap(), i);
        assert!(InputFrame::decode(&bytes::Bytes::from_static(b"short")).is_err());
        assert!(OutFrame::decode(&bytes::Bytes::from_static(b"z12345678")).is_err());
    }

    #[test]
    fn reorder_puts_in_order_and_drops_duplicates() {
        let mut r = Reorder::new(4);
        assert_eq!(r.push(2, "b").unwrap(), Vec::<&str>::new());
        assert_eq!(r.push(1, "a").unwrap(), vec!["a", "b"]);
        assert_eq!(r.push(1, "a").unwrap(), Vec::<&str>::new());
        assert_eq!(r.push(3, "c").unwrap(), vec!["c"]);
        for s in 5..10 {
            let _ = r.push(s, "x");
        }
        assert!(r.push(10, "x").is_err());
    }
}
