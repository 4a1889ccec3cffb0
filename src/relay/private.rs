//! Private pipes: two relay ports, `port1` and `port2`, each side with its
//! passcode; every authorized connection on one port is joined with one on
//! the other (the oldest waiting), so a pipe carries many logical
//! connections, each pair its own, never reused.
//!
//! A side's wire, before it is joined (docs/tunnel-protocol.md):
//! 1. the client sends its passcode (exactly [`PASSCODE_LEN`] bytes);
//!    the relay compares it in constant time and answers `AUTHORIZED`, or
//!    resets the connection;
//! 2. while it waits for a partner, the relay sends `BEAT` every third of
//!    the side's threshold and the client answers `BEAT`; a side that
//!    leaves one unanswered past its threshold is reset;
//! 3. when joined, the relay sends `PAIRED` (only with no `BEAT`
//!    outstanding, so no heartbeat byte can be taken for data) and from
//!    then on every byte is data, `BEAT` and `AUTHORIZED` included.

use super::pipes::{Mapping, Slot, Spec, PASSCODE_LEN};
use crate::subsystems::tunnel::mux::{copy, reset_tcp};
use crate::supervisor::Shutdown;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Said to a side whose passcode is right.
pub const AUTHORIZED: &[u8] = b"AUTHORIZED";
/// The heartbeat a waiting side must answer.
pub const BEAT: &[u8] = b"BEAT";
/// Said to both sides once they are joined.
pub const PAIRED: &[u8] = b"PAIRED";

/// A joined partner: its connection and the slot it holds on its side.
type Partner = (TcpStream, Slot);

/// One private pipe: two ports, each with its passcode, joined in pairs.
pub struct Private {
    id: String,
    passcodes: [String; 2],
    max: [u32; 2],
    threshold: [Duration; 2],
    active: [Arc<AtomicU32>; 2],
    /// Connections of each side waiting for a partner, oldest first.
    waiting: Mutex<[VecDeque<oneshot::Sender<Partner>>; 2]>,
    stop: CancellationToken,
}

impl Private {
    /// The pipe of mapping `m`, counting its active sides.
    pub fn new(m: &Mapping, active: [Arc<AtomicU32>; 2], stop: CancellationToken) -> Arc<Private> {
        let Spec::Private {
            maxconnectionsport1,
            maxconnectionsport2,
            heartbeatabsencethresholdport1,
            heartbeatabsencethresholdport2,
        } = m.spec
        else {
            unreachable!("a private pipe's spec")
        };
        Arc::new(Private {
            id: m.id.clone(),
            passcodes: [m.passcode1.clone(), m.passcode2.clone()],
            max: [maxconnectionsport1, maxconnectionsport2],
            threshold: [
                Duration::from_millis(heartbeatabsencethresholdport1),
                Duration::from_millis(heartbeatabsencethresholdport2),
            ],
            active,
            waiting: Mutex::new([VecDeque::new(), VecDeque::new()]),
            stop,
        })
    }
}

/// Accepts the connections of one side (0: port1, 1: port2).
pub async fn accept(listener: TcpListener, side: usize, pipe: Arc<Private>, tasks: Shutdown) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => { tasks.spawn(connection(tcp, side, pipe.clone())); }
                Err(e) => {
                    tracing::warn!(id = %pipe.id, error = %e, "cannot accept a private pipe connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = pipe.stop.cancelled() => return,
        }
    }
}

fn refuse(tcp: &TcpStream, pipe: &Private, side: usize, why: &str) {
    tracing::debug!(id = %pipe.id, port = side + 1, reason = why, "private pipe connection refused");
    reset_tcp(tcp);
}

async fn connection(mut tcp: TcpStream, side: usize, pipe: Arc<Private>) {
    let Some(slot) = Slot::take(&pipe.active[side], pipe.max[side]) else {
        return refuse(&tcp, &pipe, side, "maxconnections reached");
    };
    let _ = tcp.set_nodelay(true);
    let threshold = pipe.threshold[side];
    let mut given = [0u8; PASSCODE_LEN];
    let read = tokio::time::timeout(threshold, tcp.read_exact(&mut given)).await;
    let expected = pipe.passcodes[side].as_bytes();
    if !matches!(read, Ok(Ok(_))) || !bool::from(given.as_slice().ct_eq(expected)) {
        return refuse(&tcp, &pipe, side, "no or wrong passcode");
    }
    if tcp.write_all(AUTHORIZED).await.is_err() {
        return;
    }
    // Join the oldest waiting connection of the other side, or wait.
    let mut offer = Some((tcp, slot));
    let rx = {
        let mut waiting = pipe.waiting.lock().expect("waiting lock");
        while let Some(tx) = waiting[1 - side].pop_front() {
            match tx.send(offer.take().expect("still ours")) {
                Ok(()) => break,
                Err(back) => offer = Some(back),
            }
        }
        match offer {
            None => return, // the waiting side's task carries on with both
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                waiting[side].push_back(tx);
                rx
            }
        }
    };
    let (mut tcp, _slot) = offer.expect("not handed over");
    let Some((mut partner, _partner_slot)) = wait(&mut tcp, rx, threshold, &pipe, side).await
    else {
        return;
    };
    if tcp.write_all(PAIRED).await.is_err() || partner.write_all(PAIRED).await.is_err() {
        reset_tcp(&tcp);
        reset_tcp(&partner);
        return;
    }
    let outcome = tokio::select! {
        r = copy::both_ways(&mut tcp, &mut partner, |_, _| false) => r,
        _ = pipe.stop.cancelled() => Err(std::io::ErrorKind::ConnectionAborted.into()),
    };
    if let Err(e) = outcome {
        tracing::debug!(id = %pipe.id, error = %e, "private pipe connection reset");
        reset_tcp(&tcp);
        reset_tcp(&partner);
    }
}

/// Heartbeats with a waiting side until a partner comes (returned, with
/// no `BEAT` outstanding) or the side fails, leaves or goes silent.
async fn wait(
    tcp: &mut TcpStream,
    mut rx: oneshot::Receiver<Partner>,
    threshold: Duration,
    pipe: &Private,
    side: usize,
) -> Option<Partner> {
    let mut tick = tokio::time::interval(threshold / 3);
    tick.tick().await; // the first tick is now: nothing to ask yet
    let mut partner: Option<Partner> = None;
    let mut outstanding: Option<Instant> = None;
    let mut answer = Vec::with_capacity(BEAT.len());
    let mut byte = [0u8; 1];
    loop {
        if partner.is_some() && outstanding.is_none() {
            return partner;
        }
        let deadline = tokio::time::sleep_until(
            outstanding.map_or(Instant::now() + threshold * 2, |t| t + threshold),
        );
        tokio::select! {
            p = &mut rx, if partner.is_none() => match p {
                Ok(p) => partner = Some(p),
                Err(_) => return abandon(&mut partner),
            },
            _ = tick.tick(), if outstanding.is_none() && partner.is_none() => {
                if tcp.write_all(BEAT).await.is_err() {
                    return abandon(&mut partner);
                }
                outstanding = Some(Instant::now());
            }
            r = tcp.read(&mut byte) => match r {
                Ok(1) if outstanding.is_some() => {
                    answer.push(byte[0]);
                    if !BEAT.starts_with(&answer) {
                        refuse(tcp, pipe, side, "bytes other than BEAT while waiting");
                        return abandon(&mut partner);
                    }
                    if answer.len() == BEAT.len() {
                        answer.clear();
                        outstanding = None;
                    }
                }
                Ok(0) | Err(_) => return abandon(&mut partner),
                Ok(_) => {
                    refuse(tcp, pipe, side, "bytes before PAIRED that answer no BEAT");
                    return abandon(&mut partner);
                }
            },
            _ = deadline, if outstanding.is_some() => {
                refuse(tcp, pipe, side, "BEAT unanswered past the threshold");
                return abandon(&mut partner);
            }
            _ = pipe.stop.cancelled() => return abandon(&mut partner),
        }
    }
}

/// Gives up a partner already handed over: it is reset, not left waiting
/// on a side that is gone.
fn abandon(partner: &mut Option<Partner>) -> Option<Partner> {
    if let Some((p, _)) = partner.take() {
        reset_tcp(&p);
    }
    None
}
