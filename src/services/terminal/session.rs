//! One terminal session: a PTY, the shell on it as a session leader, and
//! the three tasks that move bytes (PTY to bus, bus to PTY) and watch the
//! end (exit, close, idle, shutdown).
//!
//! Ending a session kills every process of it: the shell's process group,
//! then every process whose session id is the shell's (an interactive shell
//! puts each job in a group of its own, so the group alone would let
//! `sleep 100 &` live on). The reference agent only forgot the session,
//! leaking the shell and the PTY.

use super::protocol::{self, Answer, ErrorKind, Exit, InputFrame, OutFrame};
use super::Route;
use crate::bus::Topic;
use crate::supervisor::Shutdown;
use bytes::Bytes;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// What the session loop is asked to do.
pub enum Command {
    /// Write bytes (answered once queued for the PTY).
    Input(InputFrame, oneshot::Sender<Answer>),
    /// Change the window size.
    Resize(u16, u16, oneshot::Sender<Answer>),
    /// The operator received output up to this number.
    Ack(u64),
    /// End it (answered once its processes are gone).
    Close(oneshot::Sender<Answer>),
}

/// How far output may run ahead of the operator.
#[derive(Debug, Clone, Copy, Default)]
struct Flow {
    acked: u64,
    /// The operator listens: its first `ack` (with 0) says it subscribed to
    /// the output, which NATS would otherwise drop unseen.
    started: bool,
    /// The session is over: read what is left without waiting for acks.
    closing: bool,
    /// Nobody will listen: read and discard what is left.
    abandoned: bool,
}

impl Flow {
    /// Whether the reader may send another frame after `seq`.
    fn may_send(&self, seq: u64) -> bool {
        self.abandoned || (self.started && seq < self.acked + protocol::WINDOW)
    }
}

/// How long a session that ended keeps its last output for an operator who
/// acknowledges nothing.
const UNHEARD_GRACE: Duration = Duration::from_secs(10);

/// What opening needs.
pub struct Spec {
    /// See [`super::Settings::state_dir`].
    pub state_dir: Option<std::path::PathBuf>,
    /// The session id.
    pub id: String,
    /// The shell to run.
    pub shell: String,
    /// What the opener asked for (size, env).
    pub open: protocol::Open,
    /// Idle time after which it is closed.
    pub idle: Duration,
    /// Where output goes.
    pub route: Route,
    /// Who opened it (for the log).
    pub who: String,
}

/// A started session: its command channel.
pub struct Started {
    /// Input, resize and close.
    pub commands: mpsc::Sender<Command>,
    /// The shell's pid (also its process group and session id).
    pub pid: u32,
}

/// Starts the shell on a new PTY and the session's tasks. `done` runs when
/// the session is over (it forgets the session).
pub fn start(
    spec: Spec,
    shutdown: &Shutdown,
    done: impl FnOnce() + Send + 'static,
) -> Result<Started, String> {
    let (pty, pts) = pty_process::open().map_err(|e| format!("cannot open a PTY: {e}"))?;
    pty.resize(pty_process::Size::new(spec.open.rows, spec.open.cols))
        .map_err(|e| format!("cannot size the PTY: {e}"))?;
    let term = spec
        .open
        .term
        .clone()
        .unwrap_or_else(|| "xterm-256color".into());
    let mut cmd = pty_process::Command::new(&spec.shell)
        .env("TERM", term)
        .kill_on_drop(true);
    if let Some(c) = &spec.open.command {
        cmd = cmd.arg("-c").arg(c);
    }
    // A session leader with the PTY as its controlling terminal (what
    // pty-process's spawn does): its pid is its group and session id.
    let child = cmd
        .spawn(pts)
        .map_err(|e| format!("cannot start {}: {e}", spec.shell))?;
    let pid = child
        .id()
        .ok_or_else(|| "the shell exited at once".to_string())?;
    let (reader, writer) = pty.into_split();
    let (commands, rx) = mpsc::channel(64);
    let (flow_tx, flow_rx) = watch::channel(Flow::default());
    let (exit_tx, exit_rx) = oneshot::channel();
    let (drained_tx, drained_rx) = oneshot::channel();
    let out = spec
        .route
        .root
        .join(&[&spec.id, protocol::OUT])
        .map_err(|e| e.to_string())?;
    shutdown.spawn(pump_output(
        reader,
        spec.route.clone(),
        out,
        flow_rx,
        drained_tx,
        exit_rx,
    ));
    let (input_tx, input_rx) = mpsc::channel::<ToPty>(INPUT_QUEUE);
    shutdown.spawn(pump_input(writer, input_rx));
    let s = shutdown.clone();
    let record = super::leftovers::Record::write(spec.state_dir.as_deref(), &spec.id, pid);
    shutdown.spawn(async move {
        let started = Instant::now();
        let ends = Ends {
            commands: rx,
            input: input_tx,
            flow: flow_tx,
            drained: drained_rx,
        };
        let exit = supervise(child, pid, ends, spec.idle, &s).await;
        tracing::info!(
            session = %spec.id,
            by = %spec.who,
            transport = spec.route.transport,
            reason = %exit.reason,
            code = ?exit.code,
            signal = ?exit.signal,
            duration = %humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
            "terminal session ended"
        );
        // Its processes are gone: no record for the next start to act on.
        drop(record);
        done();
        let _ = exit_tx.send(exit);
    });
    Ok(Started { commands, pid })
}

/// The session loop's ends of its channels.
struct Ends {
    /// From the bus.
    commands: mpsc::Receiver<Command>,
    /// To the PTY.
    input: mpsc::Sender<ToPty>,
    /// To the output pump: how far it may go.
    flow: watch::Sender<Flow>,
    /// From the output pump: the PTY is read to its end.
    drained: oneshot::Receiver<()>,
}

/// The session loop: until the shell exits, the operator closes, the idle
/// timeout passes or the agent stops; then kills the session's processes.
async fn supervise(
    mut child: tokio::process::Child,
    pid: u32,
    ends: Ends,
    idle: Duration,
    shutdown: &Shutdown,
) -> Exit {
    let Ends {
        mut commands,
        input,
        flow,
        mut drained,
    } = ends;
    let mut next_input = 1u64;
    let mut deadline = Instant::now() + idle;
    let mut status = None;
    let (reason, closer) = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break ("shutdown", None),
            _ = tokio::time::sleep_until(deadline) => break ("idle", None),
            st = child.wait() => {
                status = st.ok();
                break ("exited", None);
            }
            c = commands.recv() => {
                deadline = Instant::now() + idle;
                match c {
                    None => break ("closed", None),
                    Some(Command::Close(tx)) => break ("closed", Some(tx)),
                    Some(Command::Ack(seq)) => flow.send_modify(|f| {
                        f.started = true;
                        f.acked = f.acked.max(seq);
                    }),
                    Some(Command::Resize(rows, cols, tx)) => {
                        if !(1..=1000).contains(&rows) || !(1..=1000).contains(&cols) {
                            let _ = tx.send(Answer::error(
                                ErrorKind::BadRequest,
                                format!("rows and cols must be 1 to 1000; got {rows}x{cols}"),
                            ));
                        } else if let Err(e) = input.try_send(ToPty::Size(rows, cols, tx)) {
                            let full = matches!(e, mpsc::error::TrySendError::Full(_));
                            if let ToPty::Size(_, _, tx) = e.into_inner() {
                                let _ = tx.send(not_taken(full));
                            }
                        }
                    }
                    Some(Command::Input(frame, tx)) => {
                        let answer = if frame.seq < next_input {
                            // A redelivery (MQTT QoS 1): written already.
                            Answer::ok()
                        } else if frame.seq > next_input {
                            Answer::error(
                                ErrorKind::OutOfOrder,
                                format!("input {} arrived before input {next_input}", frame.seq),
                            )
                        } else {
                            // Never waits: the loop must stay free for close,
                            // idle and shutdown while the shell does not read.
                            match input.try_send(ToPty::Data(frame.data)) {
                                Ok(()) => {
                                    next_input += 1;
                                    Answer::ok()
                                }
                                Err(e) => {
                                    not_taken(matches!(e, mpsc::error::TrySendError::Full(_)))
                                }
                            }
                        };
                        let _ = tx.send(answer);
                    }
                }
            }
        }
    };
    flow.send_modify(|f| f.closing = true);
    kill_session(pid).await;
    if status.is_none() {
        status = child.wait().await.ok();
    }
    drop(input);
    let mut exit = Exit {
        reason: reason.to_string(),
        ..Default::default()
    };
    if reason == "exited" {
        if let Some(st) = status {
            use std::os::unix::process::ExitStatusExt;
            exit.code = st.code();
            exit.signal = st.signal();
        }
    }
    if let Some(tx) = closer {
        let _ = tx.send(Answer::ok());
    }
    let gone = || Answer::error(ErrorKind::UnknownSession, "the session is over");
    // The rest of the output goes at the operator's pace, as before (and
    // waits for a command that ended before its operator listened), until
    // the PTY is drained, or nothing was heard from the operator for a while.
    if matches!(reason, "exited" | "closed") {
        let grace = tokio::time::sleep(UNHEARD_GRACE);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                _ = &mut drained => break,
                _ = &mut grace => break,
                _ = shutdown.cancelled() => break,
                c = commands.recv() => match c {
                    None => break,
                    Some(Command::Ack(seq)) => {
                        flow.send_modify(|f| {
                            f.started = true;
                            f.acked = f.acked.max(seq);
                        });
                        grace.as_mut().reset(Instant::now() + UNHEARD_GRACE);
                    }
                    Some(Command::Input(_, tx) | Command::Resize(_, _, tx) | Command::Close(tx)) => {
                        let _ = tx.send(gone());
                    }
                },
            }
        }
    }
    flow.send_modify(|f| f.abandoned = true);
    // Anything still asked of the session is answered: it is over.
    commands.close();
    while let Some(c) = commands.recv().await {
        match c {
            Command::Input(_, tx) | Command::Resize(_, _, tx) | Command::Close(tx) => {
                let _ = tx.send(gone());
            }
            Command::Ack(_) => {}
        }
    }
    exit
}

/// The answer to input the PTY cannot take now.
fn not_taken(full: bool) -> Answer {
    if full {
        Answer::error(
            ErrorKind::InputFull,
            format!(
                "the shell is not reading its input ({INPUT_QUEUE} writes wait); send this input again later"
            ),
        )
    } else {
        Answer::error(
            ErrorKind::UnknownSession,
            "the terminal no longer takes input",
        )
    }
}

/// Writes waiting for the PTY (each one input frame).
const INPUT_QUEUE: usize = 256;

/// What goes to the PTY, in order: bytes and size changes.
enum ToPty {
    Data(Bytes),
    Size(u16, u16, oneshot::Sender<Answer>),
}

/// Writes input to the PTY in order, and sets its size.
async fn pump_input(mut w: pty_process::OwnedWritePty, mut rx: mpsc::Receiver<ToPty>) {
    while let Some(m) = rx.recv().await {
        match m {
            ToPty::Data(b) => {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
            ToPty::Size(rows, cols, tx) => {
                let a = match w.resize(pty_process::Size::new(rows, cols)) {
                    Ok(()) => Answer::ok(),
                    Err(e) => Answer::error(ErrorKind::Spawn, format!("cannot resize: {e}")),
                };
                let _ = tx.send(a);
            }
        }
    }
}

/// Reads the PTY into numbered frames on `out`, never more than
/// [`protocol::WINDOW`] beyond the operator's acknowledgement (so a slow or
/// gone operator stops the reading, and the kernel's PTY buffer stops the
/// shell), then the exit frame.
async fn pump_output(
    mut r: pty_process::OwnedReadPty,
    route: Route,
    out: Topic,
    mut flow: watch::Receiver<Flow>,
    drained: oneshot::Sender<()>,
    exit: oneshot::Receiver<Exit>,
) {
    let mut seq = 0u64;
    let mut buf = vec![0u8; protocol::CHUNK];
    loop {
        let f = match flow.wait_for(|f| f.may_send(seq)).await {
            Ok(f) => *f,
            Err(_) => Flow {
                closing: true,
                abandoned: true,
                ..Default::default()
            },
        };
        // Once over, what is left is read for a moment only: a process
        // that escaped the session could hold the PTY open.
        let read = if f.closing {
            match tokio::time::timeout(Duration::from_millis(500), r.read(&mut buf)).await {
                Ok(x) => x,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                x = r.read(&mut buf) => x,
                // Wake up to look at the window again once it is over.
                _ = flow.wait_for(|f| f.closing) => continue,
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seq += 1;
                let frame = OutFrame::Output {
                    seq,
                    data: Bytes::copy_from_slice(&buf[..n]),
                };
                if let Err(e) = route.outlet.publish(&out, frame.encode()).await {
                    tracing::debug!(topic = %out, error = %e, "terminal output not sent");
                }
            }
        }
    }
    let _ = drained.send(());
    let exit = exit.await.unwrap_or_else(|_| Exit {
        reason: "shutdown".into(),
        ..Default::default()
    });
    seq += 1;
    let frame = OutFrame::Exit { seq, exit };
    if let Err(e) = route.outlet.publish(&out, frame.encode()).await {
        tracing::debug!(topic = %out, error = %e, "terminal exit not sent");
    }
    let _ = route.outlet.flush().await;
}

/// Kills the shell's process group and every process of its session, and
/// returns once none is left running (bounded: a process that cannot be
/// killed is logged).
pub async fn kill_session(sid: u32) {
    let sid = sid as i32;
    let _ = crate::sys::kill(-sid, libc::SIGKILL);
    for _ in 0..200 {
        let alive = session_members(sid);
        if alive.is_empty() {
            return;
        }
        for pid in alive {
            let _ = crate::sys::kill(pid, libc::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::warn!(
        session = sid,
        "processes of a terminal session are still running"
    );
}

/// Processes of session `sid` still running (zombies have ended: they only
/// wait for their parent to read their status).
pub fn session_members(sid: i32) -> Vec<i32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(|p| p.ok())
        .filter_map(|p| p.stat().ok())
        .filter(|st| st.session == sid && st.state != 'Z' && st.state != 'X')
        .map(|st| st.pid)
        .collect()
}
