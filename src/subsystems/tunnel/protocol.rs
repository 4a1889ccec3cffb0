//! The tunnel's wire protocol, shared by the agent's client and the relay
//! (`docs/tunnel-protocol.md` is its description).
//!
//! Below it: one TLS connection (mutual, the agent dials), multiplexed by
//! yamux ([`super::mux`]), which gives every stream open, FIN, reset and
//! credit flow control. On top of it, two kinds of yamux streams:
//! - the **control stream**, the first stream the agent opens: [`Control`]
//!   messages only (hello, welcome, heartbeats), never visitor data;
//! - **data streams**, opened by the relay, one per visitor: one [`Open`]
//!   frame naming the pipe and the local target, one [`Opened`] answer
//!   from the agent, then the visitor's bytes, untouched, until FIN or reset.
//!
//! Every message is a frame: a 4-byte big-endian length, then that many
//! bytes of JSON. Frames are small; a longer one is a protocol error.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// The protocol version in the hello; a relay refuses another.
pub const VERSION: u32 = 1;

/// The largest frame either side accepts (its JSON payload).
pub const MAX_FRAME: usize = 16 * 1024;

/// A message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// The agent's first message: who it is. The relay checks `device`
    /// against the CN of the certificate the agent presented.
    Hello {
        /// The protocol version.
        version: u32,
        /// The device id.
        device: String,
    },
    /// The relay's answer when it takes the agent.
    Welcome {
        /// The protocol version.
        version: u32,
    },
    /// The relay's answer when it does not; the connection is closed.
    /// `code` says which refusal it is, for the agent to act on (see
    /// [`refusal`]); absent from relays that predate it.
    Refused {
        /// Why, for the log.
        reason: String,
        /// Which refusal ([`refusal`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
    /// Sent by both sides every heartbeat interval; a side that hears
    /// nothing for its threshold drops the connection.
    Heartbeat,
}

/// The codes of [`Control::Refused`].
pub mod refusal {
    /// The relay's accept filter does not list the device: it is in the
    /// relay's pending list until an operator allows it.
    pub const NOT_ACCEPTED: &str = "not-accepted";
    /// The hello's protocol version is not the relay's.
    pub const VERSION: &str = "version";
    /// The hello's device is not the certificate's (or not the one the
    /// relay dialed this address for).
    pub const DEVICE_MISMATCH: &str = "device-mismatch";
}

/// The first frame on a data stream (relay to agent): which pipe the
/// visitor came through and which local target to connect it to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// The pipe's id.
    pub pipe: String,
    /// `host:port` on the device.
    pub target: String,
}

/// The agent's answer to [`Open`]: the local target is connected, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Opened {
    /// Connected: bytes follow.
    Ok,
    /// Not connected.
    Refused {
        /// Why.
        reason: String,
    },
}

/// What is wrong with a frame the other side sent.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A frame longer than the limit.
    #[error("frame of {0} bytes is longer than {MAX_FRAME}")]
    TooLong(usize),
    /// A frame that is not a message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// One frame: length and JSON.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let json = serde_json::to_vec(msg).expect("protocol messages serialize");
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Parses a frame's payload (the JSON after the length).
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Splits one complete frame off the front of `buf`: `Ok(None)` when more
/// bytes are needed, else the payload and the bytes consumed.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let Some(len) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLong(len));
    }
    Ok(buf.get(4..4 + len).map(|p| (p, 4 + len)))
}

/// Reads exactly one frame (no byte beyond it: data may follow).
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, ProtocolError>
where
    R: AsyncRead + Unpin,
    T: for<'a> Deserialize<'a>,
{
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::TooLong(len));
    }
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    decode(&payload)
}

/// Writes one frame and flushes it.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    w.write_all(&encode(msg)).await?;
    w.flush().await
}

/// The control stream: [`Control`] frames each way. Receiving is
/// cancel-safe (a frame is either whole or still buffered), so it can sit
/// in a `select!` beside timers.
pub struct ControlStream<S> {
    rd: FramedRead<ReadHalf<S>, LengthDelimitedCodec>,
    wr: WriteHalf<S>,
}

impl<S: AsyncRead + AsyncWrite> ControlStream<S> {
    /// Frames on `stream`.
    pub fn new(stream: S) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        let codec = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(MAX_FRAME)
            .new_codec();
        ControlStream {
            rd: FramedRead::new(rd, codec),
            wr,
        }
    }

    /// The next message; `Ok(None)` when the other side closed the stream.
    pub async fn recv(&mut self) -> Result<Option<Control>, ProtocolError> {
        match self.rd.next().await {
            None => Ok(None),
            Some(Ok(frame)) => decode(&frame).map(Some),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Err(ProtocolError::Malformed(e.to_string()))
            }
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &Control) -> std::io::Result<()> {
        write_frame(&mut self.wr, msg).await
    }

    /// Sends a last message and waits, within `bound`, for the other side
    /// to hang up: a connection dropped at once can lose the message still
    /// queued in the multiplexer (a refusal the agent must read).
    pub async fn send_last(&mut self, msg: &Control, bound: Duration) {
        let _ = tokio::time::timeout(bound, async {
            self.send(msg).await?;
            self.wr.shutdown().await?;
            while let Ok(Some(_)) = self.recv().await {}
            std::io::Result::Ok(())
        })
        .await;
    }

    /// Heartbeats both ways until the other side is silent for `threshold`,
    /// closes the stream, breaks the protocol, or `stop` resolves (then
    /// `Ok`). The same on the relay and on the agent, so the absence
    /// threshold is enforced on both sides alike.
    pub async fn keep_alive(
        &mut self,
        interval: Duration,
        threshold: Duration,
        stop: impl Future<Output = ()>,
    ) -> Result<(), Silence> {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        tokio::pin!(stop);
        loop {
            let deadline = tokio::time::sleep_until(heard + threshold);
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tick.tick() => self.send(&Control::Heartbeat).await.map_err(|e| Silence::Broken(e.to_string()))?,
                _ = deadline => return Err(Silence::Silent(threshold)),
                msg = self.recv() => match msg {
                    Ok(Some(Control::Heartbeat)) => heard = Instant::now(),
                    Ok(Some(other)) => return Err(Silence::Broken(format!("unexpected {other:?}"))),
                    Ok(None) => return Err(Silence::Broken("the control stream was closed".into())),
                    Err(e) => return Err(Silence::Broken(e.to_string())),
                },
            }
        }
    }
}

/// Why [`ControlStream::keep_alive`] ended.
#[derive(Debug, thiserror::Error)]
pub enum Silence {
    /// Nothing heard for this long.
    #[error("no heartbeat for {}", humantime::format_duration(*.0))]
    Silent(Duration),
    /// The connection failed.
    #[error("{0}")]
    Broken(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_split_at_their_length() {
        let hello = Control::Hello {
            version: VERSION,
            device: "dev-1".into(),
        };
        let mut bytes = encode(&hello);
        assert_eq!(split_frame(&bytes[..3]).unwrap(), None);
        assert_eq!(split_frame(&bytes[..bytes.len() - 1]).unwrap(), None);
        bytes.extend_from_slice(b"BEAT");
        let (payload, used) = split_frame(&bytes).unwrap().unwrap();
        assert_eq!(decode::<Control>(payload).unwrap(), hello);
        assert_eq!(&bytes[used..], b"BEAT");
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert!(matches!(
            split_frame(&[0xff, 0xff, 0xff, 0xff]),
            Err(ProtocolError::TooLong(_))
        ));
        assert!(decode::<Control>(b"{\"type\":\"launch\"}").is_err());
        assert!(decode::<Opened>(b"BEAT").is_err());
    }
}
