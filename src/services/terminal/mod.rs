//! The remote terminal (`terminal.*`, off by default): a shell on a real
//! PTY on the device, opened, fed, resized and closed over the bus, its
//! output streamed back as numbered binary frames ([`protocol`]).
//!
//! Who may use it is decided by the broker: on the device-local NATS the
//! subjects lie in the protected `iot.agent.>` tree, which the shipped
//! `docs/nats-server.conf` opens to the operator user only; on the DMS
//! broker the topics are the device's own (`devices/terminal/{device id}/...`),
//! which the broker's ACL gives to the device and the operators' side. The
//! agent refuses to serve it on a NATS server that protects nothing (as it
//! does the other device-changing subjects). Every session is logged on the
//! device: who (as the operator's side names itself), the transport, when
//! it opened, how it ended and how long it lasted; never the keystrokes.

pub mod leftovers;
pub mod protocol;
pub mod session;

pub use crate::services::outlet::{Outlet, Route};

use crate::bus::{topics, Nats, Topic};
use crate::config::Config;
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use bytes::Bytes;
use protocol::{Answer, ErrorKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// `terminal.*`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The shell (`terminal.shell`).
    pub shell: String,
    /// `terminal.idle`.
    pub idle: Duration,
    /// `terminal.sessions.max`.
    pub max: usize,
    /// Where open sessions are recorded (`{dirs.data}/terminal`), so the
    /// next start kills what a crashed agent left; `None`: not recorded.
    pub state_dir: Option<std::path::PathBuf>,
}

impl Settings {
    /// From the configuration.
    pub fn from_config(c: &Config) -> Settings {
        Settings {
            shell: c.terminal.shell.clone(),
            idle: c.terminal.idle.get(),
            max: c.terminal.sessions.max as usize,
            state_dir: Some(c.data_dir().join("terminal")),
        }
    }
}

/// The addresses the terminal uses on the device-local NATS (NATS form),
/// for the documentation checks (asyncapi, protected trees).
pub fn nats_addresses() -> Vec<String> {
    addresses(&Topic::fixed(topics::TERMINAL).nats(), ".")
}

/// The addresses on the DMS broker (MQTT form).
pub fn dms_addresses() -> Vec<String> {
    addresses(&format!("{}/{{deviceId}}", topics::DMS_TERMINAL), "/")
}

/// Both.
pub fn documented_addresses() -> Vec<String> {
    nats_addresses()
        .into_iter()
        .chain(dms_addresses())
        .collect()
}

fn addresses(root: &str, sep: &str) -> Vec<String> {
    let mut v = vec![format!("{root}{sep}{}", protocol::OPEN)];
    for leaf in [
        protocol::INPUT,
        protocol::RESIZE,
        protocol::ACK,
        protocol::CLOSE,
        protocol::OUT,
    ] {
        v.push(format!("{root}{sep}{{session}}{sep}{leaf}"));
    }
    v.push(format!("{root}{sep}{}{sep}{{token}}", protocol::REPLY));
    v
}

struct Entry {
    commands: mpsc::Sender<session::Command>,
    /// Where answers go that have no address of their own (MQTT input).
    reply_to: Option<String>,
}

/// The open sessions of both transports (`terminal.sessions.max` counts
/// them together).
pub struct Terminals {
    settings: Settings,
    sessions: Arc<Mutex<HashMap<String, Entry>>>,
}

/// What to answer, and where when there is no reply subject.
pub struct Reply {
    /// The answer.
    pub answer: Answer,
    /// `{root}/reply/{token}` when set.
    pub reply_to: Option<String>,
}

impl Terminals {
    /// No sessions yet.
    pub fn new(settings: Settings) -> Arc<Terminals> {
        Arc::new(Terminals {
            settings,
            sessions: Default::default(),
        })
    }

    /// Kills the sessions a previous agent left running (see
    /// [`leftovers`]); run once when the agent starts, before either
    /// transport serves (it would kill this agent's own sessions later).
    pub async fn reap_leftovers(&self) {
        if let Some(dir) = &self.settings.state_dir {
            let n = leftovers::reap(dir).await;
            if n > 0 {
                tracing::warn!(sessions = n, "terminal sessions of a previous agent killed");
            }
        }
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request: `segments` after the route's root. `None`: nothing to
    /// answer (an `ack`, which is a notification).
    pub async fn request(
        &self,
        route: &Route,
        segments: &[&str],
        payload: Bytes,
        shutdown: &Shutdown,
    ) -> Option<Reply> {
        let bad = |kind, msg: String| {
            Some(Reply {
                answer: Answer::error(kind, msg),
                reply_to: None,
            })
        };
        match segments {
            [protocol::OPEN] => {
                let open: protocol::Open = match serde_json::from_slice(&payload) {
                    Ok(o) => o,
                    Err(e) => {
                        return bad(
                            ErrorKind::BadRequest,
                            format!("open takes {{\"rows\":N,\"cols\":N,\"command\"?:\"...\"}}: {e}"),
                        )
                    }
                };
                let reply_to = open.reply_to.clone();
                Some(Reply {
                    answer: self.open(route, open, shutdown),
                    reply_to,
                })
            }
            [sid, protocol::INPUT] => {
                let frame = match protocol::InputFrame::decode(&payload) {
                    Ok(f) => f,
                    Err(e) => return self.session_error(sid, ErrorKind::BadRequest, e),
                };
                self.ask(sid, None, |tx| session::Command::Input(frame, tx))
                    .await
            }
            [sid, protocol::RESIZE] => {
                let r: protocol::Resize = match serde_json::from_slice(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        return self.session_error(
                            sid,
                            ErrorKind::BadRequest,
                            format!("resize takes {{\"rows\":N,\"cols\":N}}: {e}"),
                        )
                    }
                };
                self.ask(sid, r.reply_to, |tx| {
                    session::Command::Resize(r.rows, r.cols, tx)
                })
                .await
            }
            [sid, protocol::CLOSE] => {
                let p: protocol::Plain = serde_json::from_slice(&payload).unwrap_or_default();
                self.ask(sid, p.reply_to, session::Command::Close).await
            }
            [sid, protocol::ACK] => {
                let a: protocol::Ack = match serde_json::from_slice(&payload) {
                    Ok(a) => a,
                    Err(e) => {
                        return self.session_error(
                            sid,
                            ErrorKind::BadRequest,
                            format!("ack takes {{\"seq\":N}}: {e}"),
                        )
                    }
                };
                let tx = self.lock().get(*sid).map(|e| e.commands.clone());
                match tx {
                    Some(tx) => {
                        let _ = tx.send(session::Command::Ack(a.seq)).await;
                        None
                    }
                    None => self.session_error(sid, ErrorKind::UnknownSession, unknown(sid)),
                }
            }
            // The agent's own output and answers, seen on a wildcard.
            [_, protocol::OUT] | [protocol::REPLY, ..] => None,
            other => bad(
                ErrorKind::BadSubject,
                format!(
                    "{:?} is not a terminal operation (open, {{session}}/input, resize, ack, close)",
                    other.join("/")
                ),
            ),
        }
    }

    /// An error about a session, addressed where its answers go.
    fn session_error(&self, sid: &str, kind: ErrorKind, msg: String) -> Option<Reply> {
        let reply_to = self.lock().get(sid).and_then(|e| e.reply_to.clone());
        Some(Reply {
            answer: Answer::error(kind, msg),
            reply_to,
        })
    }

    async fn ask(
        &self,
        sid: &str,
        reply_to: Option<String>,
        cmd: impl FnOnce(oneshot::Sender<Answer>) -> session::Command,
    ) -> Option<Reply> {
        let found = self
            .lock()
            .get(sid)
            .map(|e| (e.commands.clone(), e.reply_to.clone()));
        let Some((tx, default_reply)) = found else {
            return Some(Reply {
                answer: Answer::error(ErrorKind::UnknownSession, unknown(sid)),
                reply_to,
            });
        };
        let reply_to = reply_to.or(default_reply);
        let (atx, arx) = oneshot::channel();
        let answer = if tx.send(cmd(atx)).await.is_err() {
            Answer::error(ErrorKind::UnknownSession, "the session is over")
        } else {
            arx.await
                .unwrap_or_else(|_| Answer::error(ErrorKind::UnknownSession, "the session is over"))
        };
        Some(Reply { answer, reply_to })
    }

    fn open(&self, route: &Route, open: protocol::Open, shutdown: &Shutdown) -> Answer {
        if !(1..=1000).contains(&open.rows) || !(1..=1000).contains(&open.cols) {
            return Answer::error(
                ErrorKind::BadRequest,
                format!(
                    "rows and cols must be 1 to 1000; got {}x{}",
                    open.rows, open.cols
                ),
            );
        }
        if let Some(t) = &open.term {
            if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Answer::error(ErrorKind::BadRequest, "term must be a terminal name");
            }
        }
        let mut sessions = self.lock();
        if sessions.len() >= self.settings.max {
            return Answer::error(
                ErrorKind::TooMany,
                format!(
                    "{} terminal sessions are open, the most terminal.sessions.max allows",
                    sessions.len()
                ),
            );
        }
        let id = new_id();
        let who = open
            .user
            .as_deref()
            .map(|u| u.chars().filter(|c| !c.is_control()).take(64).collect())
            .unwrap_or_else(|| "(unnamed)".to_string());
        let reply_to = open.reply_to.clone();
        let (rows, cols) = (open.rows, open.cols);
        let has_command = open.command.is_some();
        let spec = session::Spec {
            state_dir: self.settings.state_dir.clone(),
            id: id.clone(),
            shell: self.settings.shell.clone(),
            open,
            idle: self.settings.idle,
            route: route.clone(),
            who: who.clone(),
        };
        let map = self.sessions.clone();
        let key = id.clone();
        let done = move || {
            map.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        };
        match session::start(spec, shutdown, done) {
            Ok(started) => {
                sessions.insert(
                    id.clone(),
                    Entry {
                        commands: started.commands,
                        reply_to,
                    },
                );
                tracing::info!(
                    session = %id,
                    by = %who,
                    transport = route.transport,
                    pid = started.pid,
                    rows,
                    cols,
                    command = has_command,
                    "terminal session opened"
                );
                Answer {
                    ok: true,
                    session: Some(id),
                    idle_secs: Some(self.settings.idle.as_secs()),
                    window: Some(protocol::WINDOW),
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!(by = %who, transport = route.transport, error = %e, "terminal session not opened");
                Answer::error(ErrorKind::Spawn, e)
            }
        }
    }
}

fn unknown(sid: &str) -> String {
    format!(
        "no terminal session {:?} (never opened, or over)",
        sid.chars().take(64).collect::<String>()
    )
}

/// A session id nobody can guess (the broker decides who may use the
/// subjects; the id keeps one operator's session apart from another's).
fn new_id() -> String {
    use rand::Rng;
    let mut b = [0u8; 12];
    rand::rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Publishes a reply: to the NATS reply subject when there is one, else to
/// `{root}/reply/{token}` when the request named one.
pub async fn send_reply(
    route: &Route,
    nats_reply: Option<(&Nats, &crate::bus::Incoming)>,
    reply: Reply,
) {
    let payload = reply.answer.to_bytes();
    if let Some((bus, msg)) = nats_reply.filter(|(_, m)| m.wants_reply()) {
        if let Err(e) = bus.reply(msg, payload).await {
            tracing::debug!(error = %e, "terminal answer not sent");
        }
        return;
    }
    let Some(token) = reply.reply_to else {
        return;
    };
    match route.root.join(&[protocol::REPLY, &token]) {
        Ok(t) => {
            if let Err(e) = route.outlet.publish(&t, payload).await {
                tracing::debug!(error = %e, "terminal answer not sent");
            }
        }
        Err(e) => tracing::debug!(error = %e, "terminal answer has no usable reply-to"),
    }
}

/// The terminal served on the device-local NATS (`iot.agent.terminal.>`).
#[derive(Clone)]
pub struct NatsTerminal {
    /// The sessions.
    pub terminals: Arc<Terminals>,
    /// The device-local NATS.
    pub bus: Nats,
}

impl Subsystem for NatsTerminal {
    const NAME: &'static str = "terminal-nats";
    const SECTION: &'static str = "terminal";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        let root = Topic::fixed(topics::TERMINAL);
        let mut sub = self
            .bus
            .subscribe(&Topic::fixed(&format!("{}/#", topics::TERMINAL)))
            .await?;
        let route = Route {
            outlet: Outlet::Nats(self.bus.clone()),
            root: root.clone(),
            transport: "nats",
        };
        // In force once the server processed it: only then "served"
        // (core NATS keeps nothing for a request that came before).
        self.bus.sync().await?;
        tracing::info!(subject = %root.nats(), "terminal served on NATS");
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = sub.next() => match m {
                    Some(m) => m,
                    None => anyhow::bail!("the NATS subscription to {root} ended"),
                },
            };
            let Some(segments) = msg.topic.strip_prefix(&root) else {
                continue;
            };
            if let Some(why) = self.bus.unprotected() {
                if msg.wants_reply() {
                    let a = Answer::error(
                        ErrorKind::Unprotected,
                        format!("the terminal is not served: {why}"),
                    );
                    let _ = self.bus.reply(&msg, a.to_bytes()).await;
                }
                continue;
            }
            let segments: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
            let close = segments.last().is_some_and(|s| s == protocol::CLOSE);
            let (t, r, b, s) = (
                self.terminals.clone(),
                route.clone(),
                self.bus.clone(),
                shutdown.clone(),
            );
            let work = async move {
                let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
                if let Some(reply) = t.request(&r, &segs, msg.payload.clone(), &s).await {
                    send_reply(&r, Some((&b, &msg)), reply).await;
                }
            };
            // Closing waits for the session's processes to end: not in the
            // way of other sessions' input. Everything else in order.
            if close {
                shutdown.spawn(work);
            } else {
                work.await;
            }
        }
    }
}
