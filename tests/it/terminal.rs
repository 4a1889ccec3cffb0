//! The remote terminal over a real nats-server: the agent's service
//! (in-process, as `iot-agent run` wires it) and the operator's client
//! library (`iot_agent::remote`, what `iot-remote shell` uses).

use crate::common::servers::{NatsConfig, NatsServer, NatsUser};
use bytes::Bytes;
use futures::StreamExt;
use iot_agent::bus::{topics, Nats, Topic};
use iot_agent::remote::terminal::{Event, Session};
use iot_agent::remote::Link;
use iot_agent::services::terminal::protocol::{self, Answer, OutFrame};
use iot_agent::services::terminal::{NatsTerminal, Settings, Terminals};
use iot_agent::supervisor::{Shutdown, Subsystem};
use std::sync::Arc;
use std::time::Duration;

const PASSWORD: &str = "terminal-test-password";
const EXAMPLE_CONF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/nats-server.conf");
/// Bound on every wait (not a timing assertion: a healthy run answers in
/// milliseconds).
const WAIT: Duration = Duration::from_secs(20);

pub struct Rig {
    pub nats: NatsServer,
    pub terminals: Arc<Terminals>,
    pub shutdown: Shutdown,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn settings(idle: Duration, max: usize) -> Settings {
    Settings {
        shell: "/bin/bash".into(),
        idle,
        max,
        state_dir: None,
    }
}

/// A nats-server (`conf`, or one `snapd` user) and the terminal service on it.
pub async fn rig_with(nats: NatsServer, agent_password: &str, settings: Settings) -> Rig {
    let bus = Nats::connect(
        &crate::common::agent_nats_config(&nats.url(), agent_password),
        "terminal-under-test",
    )
    .await
    .unwrap();
    let terminals = Terminals::new(settings);
    let shutdown = Shutdown::new();
    let service = NatsTerminal {
        terminals: terminals.clone(),
        bus: bus.clone(),
    };
    let s = shutdown.clone();
    let task = tokio::spawn(async move {
        service.run(s).await.expect("the terminal service failed");
    });
    // Served once an open is answered (the subscription is in place).
    let probe = link(&nats, "snapd", agent_password).await;
    let root = Topic::fixed(topics::TERMINAL);
    let open = root.join(&[protocol::OPEN]).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let Link::Nats(c) = &probe else {
            unreachable!()
        };
        if let Ok(Ok(m)) = tokio::time::timeout(
            Duration::from_secs(1),
            c.request(open.nats(), Bytes::from_static(b"not json")),
        )
        .await
        {
            let a: Answer = serde_json::from_slice(&m.payload).unwrap();
            if !a.ok {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the terminal never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Rig {
        nats,
        terminals,
        shutdown,
        task,
    }
}

pub async fn rig(settings: Settings) -> Rig {
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", PASSWORD)],
        ..Default::default()
    });
    rig_with(nats, PASSWORD, settings).await
}

pub async fn link(nats: &NatsServer, user: &str, password: &str) -> Link {
    let device = iot_agent::remote::Device::parse(&nats.url()).unwrap();
    Link::connect(&device, user, password).await.unwrap()
}

fn root() -> Topic {
    Topic::fixed(topics::TERMINAL)
}

pub(crate) fn open(command: &str) -> protocol::Open {
    protocol::Open {
        rows: 24,
        cols: 80,
        command: Some(command.into()),
        user: Some("test-operator".into()),
        ..Default::default()
    }
}

/// Reads output until `until` holds for everything read so far (or the
/// session exits); returns the bytes and the exit, if it came.
pub(crate) async fn read_until(
    s: &mut Session,
    until: impl Fn(&[u8]) -> bool,
) -> (Vec<u8>, Option<protocol::Exit>) {
    let mut got = Vec::new();
    loop {
        let ev = tokio::time::timeout(WAIT, s.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no more output; so far: {:?}",
                    String::from_utf8_lossy(&got)
                )
            })
            .unwrap();
        match ev {
            Event::Output(b) => {
                got.extend_from_slice(&b);
                if until(&got) {
                    return (got, None);
                }
            }
            Event::Exit(e) => return (got, Some(e)),
        }
    }
}

pub(crate) async fn read_to_exit(s: &mut Session) -> (Vec<u8>, protocol::Exit) {
    let (b, e) = read_until(s, |_| false).await;
    (b, e.unwrap())
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The number after `PID=` in the output (the echo of a typed `PID=$!`
/// is skipped).
pub(crate) fn pid_in(out: &[u8]) -> i32 {
    find_pid(out).expect("a PID=N line")
}

fn find_pid(out: &[u8]) -> Option<i32> {
    let text = String::from_utf8_lossy(out);
    text.match_indices("PID=").find_map(|(i, _)| {
        let rest = &text[i + 4..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let complete = rest.len() > digits.len();
        (!digits.is_empty() && complete)
            .then(|| digits.parse().ok())
            .flatten()
    })
}

/// A process is gone when /proc has no running process of that pid (a
/// zombie ran its course and waits only for its parent to be reaped).
pub(crate) fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
            matches!(state, Some(Some('Z' | 'X')))
        }
    }
}

pub(crate) fn has_pid_line(b: &[u8]) -> bool {
    find_pid(b).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_receives_every_byte_from_0_to_255_exactly_and_the_exit_code() {
    let rig = rig(settings(Duration::from_secs(60), 4)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    // Raw mode: the PTY passes output through untranslated (no \n -> \r\n).
    let escapes: String = (0..=255u32).map(|b| format!("\\{b:03o}")).collect();
    let cmd = format!("stty raw -echo; printf '{escapes}'; exit 3");
    let mut s = Session::open(&link, &root(), open(&cmd)).await.unwrap();
    let (out, exit) = read_to_exit(&mut s).await;
    let want: Vec<u8> = (0..=255u8).collect();
    assert_eq!(out, want);
    assert_eq!(exit.reason, "exited");
    assert_eq!(exit.code, Some(3));
    // The session is forgotten once over: nothing else is open.
    let deadline = tokio::time::Instant::now() + WAIT;
    while rig.terminals.open_sessions() != 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_with_commas_nul_and_non_utf8_arrives_intact_and_interactive_echo_works() {
    let rig = rig(settings(Duration::from_secs(60), 4)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typed");
    let sent: Vec<u8> = b"echo a,b,,c\x00\xff\xfe\xc3\x28 ,end"
        .iter()
        .copied()
        .chain(0..=255u8)
        .collect();
    let cmd = format!(
        "stty raw -echo -iexten; echo READY; head -c {} > {}; echo DONE",
        sent.len(),
        file.display()
    );
    let mut s = Session::open(&link, &root(), open(&cmd)).await.unwrap();
    read_until(&mut s, |b| contains(b, b"READY")).await;
    // In three frames, split inside the data.
    s.send(&sent[..5]).await.unwrap();
    s.send(&sent[5..20]).await.unwrap();
    s.send(&sent[20..]).await.unwrap();
    let (_, exit) = read_to_exit(&mut s).await;
    assert_eq!(exit.code, Some(0));
    assert_eq!(std::fs::read(&file).unwrap(), sent);

    // An interactive shell: `echo a,b` answers `a,b` (the reference agent
    // kept only what followed the comma).
    let mut open_shell = open("");
    open_shell.command = None;
    let mut s = Session::open(&link, &root(), open_shell).await.unwrap();
    s.send(b"echo a,b; exit 7\n").await.unwrap();
    let (out, exit) = read_to_exit(&mut s).await;
    assert!(
        contains(&out, b"a,b\r\n"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(exit.code, Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_changes_stty_size() {
    let rig = rig(settings(Duration::from_secs(60), 4)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    let mut s = Session::open(&link, &root(), open("stty size; read x; stty size"))
        .await
        .unwrap();
    read_until(&mut s, |b| contains(b, b"24 80")).await;
    s.resize(40, 100).await.unwrap();
    s.send(b"\n").await.unwrap();
    let (out, exit) = read_to_exit(&mut s).await;
    assert!(
        contains(&out, b"40 100"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(exit.code, Some(0));
    // Out of range: refused with an answer.
    let s = Session::open(&link, &root(), open("read x")).await.unwrap();
    let e = s.resize(0, 100).await.unwrap_err();
    assert!(e.starts_with("terminal-bad-request"), "{e}");
    s.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_kills_every_process_of_the_session_even_jobs_in_their_own_group() {
    let rig = rig(settings(Duration::from_secs(60), 4)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    // `set -m`: job control, so the sleep runs in a process group of its own
    // (as in an interactive shell); a second one ignores SIGHUP.
    let cmd =
        "set -m; sleep 1000 & echo PID=$!; nohup sleep 1001 >/dev/null 2>&1 & echo PID2=$!; wait";
    let mut s = Session::open(&link, &root(), open(cmd)).await.unwrap();
    let (out, _) = read_until(&mut s, |b| contains(b, b"PID2=") && b.ends_with(b"\r\n")).await;
    let pid = pid_in(&out);
    let text = String::from_utf8_lossy(&out).to_string();
    let pid2: i32 = text[text.find("PID2=").unwrap() + 5..]
        .trim()
        .parse()
        .unwrap();
    assert!(!gone(pid) && !gone(pid2), "the sleeps run");
    s.close().await.unwrap();
    // The answer comes once the processes are gone.
    assert!(gone(pid), "sleep {pid} survived the close");
    assert!(gone(pid2), "nohup sleep {pid2} survived the close");
    let (_, exit) = read_to_exit(&mut s).await;
    assert_eq!(exit.reason, "closed");
    // The session is over: input to it is answered with an error.
    let a = raw_request(
        &link,
        &format!("{}.input", session_prefix(s.id())),
        b"\0\0\0\0\0\0\0\x01x",
    )
    .await;
    assert_eq!(a.error.unwrap().kind, "terminal-unknown-session");
}

fn session_prefix(id: &str) -> String {
    root().join(&[id]).unwrap().nats()
}

async fn raw_request(link: &Link, subject: &str, payload: &[u8]) -> Answer {
    let Link::Nats(c) = link else { unreachable!() };
    let m = tokio::time::timeout(
        WAIT,
        c.request(subject.to_string(), Bytes::copy_from_slice(payload)),
    )
    .await
    .unwrap()
    .unwrap();
    serde_json::from_slice(&m.payload).unwrap()
}

/// The session over the wire, without the client library (which would keep
/// it alive): opened, listened to, then left alone until the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_and_its_processes_killed() {
    let rig = rig(settings(Duration::from_secs(1), 4)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    let Link::Nats(c) = &link else { unreachable!() };
    let body = serde_json::to_vec(&open("sleep 1000 & echo PID=$!; wait")).unwrap();
    let a = raw_request(
        &link,
        &root().join(&[protocol::OPEN]).unwrap().nats(),
        &body,
    )
    .await;
    assert!(a.ok, "{a:?}");
    assert_eq!(a.idle_secs, Some(1));
    let id = a.session.unwrap();
    let mut out = c
        .subscribe(format!("{}.out", session_prefix(&id)))
        .await
        .unwrap();
    c.flush().await.unwrap();
    c.publish(
        format!("{}.ack", session_prefix(&id)),
        r#"{"seq":0}"#.into(),
    )
    .await
    .unwrap();
    let mut bytes = Vec::new();
    let exit = loop {
        let m = tokio::time::timeout(WAIT, out.next())
            .await
            .unwrap()
            .unwrap();
        match OutFrame::decode(&m.payload).unwrap() {
            OutFrame::Output { data, .. } => bytes.extend_from_slice(&data),
            OutFrame::Exit { exit, .. } => break exit,
        }
    };
    assert_eq!(exit.reason, "idle");
    let pid = pid_in(&bytes);
    assert!(gone(pid), "sleep {pid} survived the idle timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_beyond_the_maximum_is_refused_and_agent_shutdown_kills_them_all() {
    let rig = rig(settings(Duration::from_secs(60), 2)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    let mut a = Session::open(&link, &root(), open("sleep 1000 & echo PID=$!; wait"))
        .await
        .unwrap();
    let mut b = Session::open(&link, &root(), open("sleep 1000 & echo PID=$!; wait"))
        .await
        .unwrap();
    let e = Session::open(&link, &root(), open("true"))
        .await
        .err()
        .unwrap();
    assert!(e.starts_with("terminal-too-many-sessions"), "{e}");
    let (out_a, _) = read_until(&mut a, has_pid_line).await;
    let (out_b, _) = read_until(&mut b, has_pid_line).await;
    let (pa, pb) = (pid_in(&out_a), pid_in(&out_b));
    // The agent stops: every session ends, its processes killed.
    rig.shutdown.cancel();
    let (_, ea) = read_to_exit(&mut a).await;
    let (_, eb) = read_to_exit(&mut b).await;
    assert_eq!(
        (ea.reason.as_str(), eb.reason.as_str()),
        ("shutdown", "shutdown")
    );
    assert!(
        gone(pa) && gone(pb),
        "a session's sleep survived the shutdown"
    );
    tokio::time::timeout(WAIT, rig.task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_answers() {
    let rig = rig(settings(Duration::from_secs(60), 2)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    let open_subject = root().join(&[protocol::OPEN]).unwrap().nats();
    let kind = |a: Answer| a.error.map(|e| e.kind).unwrap_or_default();
    assert_eq!(
        kind(raw_request(&link, &open_subject, b"{").await),
        "terminal-bad-request"
    );
    assert_eq!(
        kind(raw_request(&link, &open_subject, br#"{"rows":0,"cols":80}"#).await),
        "terminal-bad-request"
    );
    let nope = session_prefix("nope");
    assert_eq!(
        kind(raw_request(&link, &format!("{nope}.input"), b"\0\0\0\0\0\0\0\x01x").await),
        "terminal-unknown-session"
    );
    assert_eq!(
        kind(raw_request(&link, &format!("{nope}.input"), b"xx").await),
        "terminal-bad-request"
    );
    assert_eq!(
        kind(raw_request(&link, &format!("{nope}.close"), b"{}").await),
        "terminal-unknown-session"
    );
    assert_eq!(
        kind(raw_request(&link, &format!("{nope}.resize"), br#"{"rows":1,"cols":1}"#).await),
        "terminal-unknown-session"
    );
    assert_eq!(
        kind(raw_request(&link, &format!("{nope}.bogus"), b"{}").await),
        "terminal-bad-subject"
    );
    // A missing shell is an answer too.
    drop(rig);
    let rig = crate::terminal::rig(Settings {
        shell: "/nonexistent/shell".into(),
        ..settings(Duration::from_secs(60), 2)
    })
    .await;
    let link = crate::terminal::link(&rig.nats, "snapd", PASSWORD).await;
    let e = Session::open(&link, &root(), open("true"))
        .await
        .err()
        .unwrap();
    assert!(e.starts_with("terminal-spawn-failed"), "{e}");
}

/// Who may open a session is the broker's decision: with the shipped
/// `docs/nats-server.conf`, the `device` user's open is refused by the
/// server (it never reaches the agent), the `operator` user's works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_configuration_lets_the_operator_in_and_refuses_the_device_user() {
    let nats = NatsServer::start(NatsConfig {
        include: Some(EXAMPLE_CONF.into()),
        ..Default::default()
    });
    let rig = rig_with(
        nats,
        "change this agent password",
        settings(Duration::from_secs(60), 4),
    )
    .await;
    let (tx, mut violations) = tokio::sync::mpsc::unbounded_channel::<String>();
    let device = async_nats::ConnectOptions::with_user_and_password(
        "device".into(),
        "change this device password".into(),
    )
    .request_timeout(Some(Duration::from_secs(2)))
    .event_callback(move |e| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = e {
                let _ = tx.send(e.to_string().to_lowercase());
            }
        }
    })
    .connect(rig.nats.url())
    .await
    .unwrap();
    let open_subject = root().join(&[protocol::OPEN]).unwrap().nats();
    let body = serde_json::to_vec(&open("echo hi")).unwrap();
    let r = device.request(open_subject.clone(), body.into()).await;
    assert!(r.is_err(), "the device user's open was answered");
    let want = format!("permissions violation for publish to \"{open_subject}\"");
    loop {
        let got = tokio::time::timeout(WAIT, violations.recv())
            .await
            .unwrap()
            .unwrap();
        if got.contains(&want) {
            break;
        }
    }
    assert_eq!(rig.terminals.open_sessions(), 0);

    // The operator user may open sessions, nothing else of the agent's.
    let (otx, mut op_violations) = tokio::sync::mpsc::unbounded_channel::<String>();
    let op = async_nats::ConnectOptions::with_user_and_password(
        "operator".into(),
        "change this operator password".into(),
    )
    .event_callback(move |e| {
        let tx = otx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = e {
                let _ = tx.send(e.to_string().to_lowercase());
            }
        }
    })
    .connect(rig.nats.url())
    .await
    .unwrap();
    op.publish("snapd.v2.snaps.get", "{}".into()).await.unwrap();
    op.flush().await.unwrap();
    let want = "permissions violation for publish to \"snapd.v2.snaps.get\"";
    loop {
        let got = tokio::time::timeout(WAIT, op_violations.recv())
            .await
            .unwrap()
            .unwrap();
        if got.contains(want) {
            break;
        }
    }

    let operator = link(&rig.nats, "operator", "change this operator password").await;
    let mut s = Session::open(&operator, &root(), open("echo hi-from-device"))
        .await
        .unwrap();
    let (out, exit) = read_to_exit(&mut s).await;
    assert!(contains(&out, b"hi-from-device"));
    assert_eq!(exit.code, Some(0));
}

/// A tmux server of its own (its own socket), killed when dropped.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn start(width: u16, height: u16, env: &[(&str, &str)]) -> Tmux {
        let t = Tmux {
            socket: format!(
                "iot-agent-test-{}-{}",
                std::process::id(),
                iot_agent::remote::link::reply_token()
            ),
        };
        let mut cmd = std::process::Command::new("tmux");
        cmd.args([
            "-L",
            &t.socket,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "t",
        ])
        .args(["-x", &width.to_string(), "-y", &height.to_string()]);
        for (k, v) in env {
            cmd.args(["-e", &format!("{k}={v}")]);
        }
        cmd.args(["bash", "--norc", "--noprofile"]);
        let out = cmd.output().expect("tmux runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        t.run(&["set-option", "-g", "status", "off"]);
        t
    }

    pub fn run(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types a line (and Enter).
    pub fn type_line(&self, text: &str) {
        self.run(&["send-keys", "-t", "t", "-l", text]);
        self.run(&["send-keys", "-t", "t", "Enter"]);
    }

    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t", "-S", "-200"])
    }

    /// Waits until the screen shows `text`; returns the screen.
    pub fn wait_for(&self, text: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let s = self.screen();
            if s.contains(text) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the screen never showed {text:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.run(&["kill-server"]);
    }
}

/// The operator's command in a real terminal (tmux): `iot-remote shell`
/// attaches, a typed command runs on the device, the device's `stty size`
/// follows the local window (also after a resize: SIGWINCH), the remote
/// exit code comes back, and the local terminal is out of raw mode again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_cli_in_tmux_runs_a_command_on_the_device() {
    let nats = NatsServer::start(NatsConfig {
        include: Some(EXAMPLE_CONF.into()),
        ..Default::default()
    });
    let rig = rig_with(
        nats,
        "change this agent password",
        settings(Duration::from_secs(60), 4),
    )
    .await;
    let url = rig.nats.url();
    let tmux = tokio::task::spawn_blocking(move || {
        let tmux = Tmux::start(
            100,
            30,
            &[
                ("IOT_REMOTE_USER", "operator"),
                ("IOT_REMOTE_PASSWORD", "change this operator password"),
                ("PS1", "local$ "),
                ("TERM", "xterm"),
            ],
        );
        tmux.wait_for("local$");
        tmux.type_line(&format!("{} shell {url}", env!("CARGO_BIN_EXE_iot-remote")));
        tmux.wait_for("iot-remote: attached to session");
        // The device's shell: a prompt of its own (written so that the
        // typed line does not show it).
        tmux.type_line("PS1='\\144evice$ '");
        tmux.wait_for("\ndevice$");
        tmux.type_line("echo remote-$((6*7)) from $$");
        tmux.wait_for("remote-42 from");
        tmux.type_line("echo size=$(stty size)");
        tmux.wait_for("size=30 100");
        tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
        tmux.wait_for_size_change();
        tmux.type_line("echo size=$(stty size)");
        tmux.wait_for("size=40 120");
        tmux.type_line("exit 5");
        tmux.wait_until(|s| s.matches("local$").count() == 2);
        tmux.type_line("echo code=$? raw=$(stty -a | grep -c -- -icanon)");
        tmux.wait_for("code=5 raw=0");
        tmux
    })
    .await
    .unwrap();
    drop(tmux);
    assert_eq!(rig.terminals.open_sessions(), 0);
}

impl Tmux {
    fn wait_until(&self, done: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let s = self.screen();
            if done(&s) {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "never:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_size_change(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        while self
            .run(&[
                "display-message",
                "-p",
                "-t",
                "t",
                "#{pane_height} #{pane_width}",
            ])
            .trim()
            != "40 120"
        {
            assert!(std::time::Instant::now() < deadline, "tmux did not resize");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A shell that does not read its input fills the PTY: further input is
/// refused with an answer (`terminal-input-full`), never waited for, so a
/// close still ends the session and its processes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_the_shell_does_not_read_is_refused_and_close_still_works() {
    let rig = rig(settings(Duration::from_secs(60), 4)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    let Link::Nats(c) = &link else { unreachable!() };
    // Raw mode without echo: the kernel takes what fits in the PTY's
    // buffers and then makes the writer wait (in canonical mode it would
    // drop what exceeds a line, and echo would make it depend on output).
    let mut s = Session::open(
        &link,
        &root(),
        open("stty raw -echo; sleep 1000 & echo PID=$!; wait"),
    )
    .await
    .unwrap();
    let (out, _) = read_until(&mut s, has_pid_line).await;
    let pid = pid_in(&out);
    let inbox = c.new_inbox();
    let mut answers = c.subscribe(inbox.clone()).await.unwrap();
    let input = format!("{}.input", session_prefix(s.id()));
    let chunk = vec![b'x'; 4096];
    let mut full = None;
    for seq in 1..=2000u64 {
        let frame = protocol::InputFrame {
            seq,
            data: chunk.clone().into(),
        };
        c.publish_with_reply(input.clone(), inbox.clone(), frame.encode())
            .await
            .unwrap();
        let m = tokio::time::timeout(WAIT, answers.next())
            .await
            .unwrap()
            .unwrap();
        let a: Answer = serde_json::from_slice(&m.payload).unwrap();
        if !a.ok {
            full = Some(a.error.unwrap().kind);
            break;
        }
    }
    assert_eq!(full.as_deref(), Some("terminal-input-full"));
    s.close().await.unwrap();
    assert!(gone(pid), "sleep {pid} survived the close");
    let (_, exit) = read_to_exit(&mut s).await;
    assert_eq!(exit.reason, "closed");
}

/// Backpressure: the agent never sends output more than the window beyond
/// the operator's acknowledgement (it stops reading the PTY instead), and
/// every byte arrives once the operator catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_never_runs_more_than_the_window_ahead_of_the_acknowledgements() {
    let rig = rig(settings(Duration::from_secs(60), 4)).await;
    let link = link(&rig.nats, "snapd", PASSWORD).await;
    let Link::Nats(c) = &link else { unreachable!() };
    let body = serde_json::to_vec(&open(
        "stty raw -echo; head -c 3000000 /dev/zero | tr '\\0' x; exit 0",
    ))
    .unwrap();
    let a = raw_request(
        &link,
        &root().join(&[protocol::OPEN]).unwrap().nats(),
        &body,
    )
    .await;
    let window = a.window.unwrap();
    let prefix = session_prefix(&a.session.unwrap());
    let mut out = c.subscribe(format!("{prefix}.out")).await.unwrap();
    c.flush().await.unwrap();
    let ack = |seq: u64| {
        let c = c.clone();
        let subject = format!("{prefix}.ack");
        async move {
            c.publish(subject, format!(r#"{{"seq":{seq}}}"#).into())
                .await
                .unwrap();
        }
    };
    ack(0).await;
    let (mut acked, mut bytes, mut stalls) = (0u64, 0usize, 0u32);
    let exit = loop {
        let m = tokio::time::timeout(WAIT, out.next())
            .await
            .unwrap()
            .unwrap();
        let frame = OutFrame::decode(&m.payload).unwrap();
        let seq = frame.seq();
        // Output within the window; the exit frame may follow it.
        let bound = acked + window + matches!(frame, OutFrame::Exit { .. }) as u64;
        assert!(
            seq <= bound,
            "frame {seq} sent with only {acked} acknowledged (window {window})"
        );
        match frame {
            OutFrame::Output { data, .. } => bytes += data.len(),
            OutFrame::Exit { exit, .. } => break exit,
        }
        // Acknowledge only when the window is used up: the agent must wait.
        if seq == acked + window {
            stalls += 1;
            acked = seq;
            ack(seq).await;
        }
    };
    assert_eq!(exit.code, Some(0));
    assert_eq!(bytes, 3_000_000);
    assert!(stalls >= 2, "the window was used up {stalls} times");
}

/// The agent killed with SIGKILL cannot close its sessions: the next start
/// kills what they left running (a `nohup`ed job in a group of its own
/// here), and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_left_by_a_killed_agent_are_killed_by_the_next_start() {
    use crate::common::agent_proc::AgentProcess;
    use crate::common::servers::free_port;
    let nats = NatsServer::start(NatsConfig {
        users: vec![NatsUser::new("snapd", PASSWORD)],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, String)> = vec![
        (
            "IOT_AGENT_DIRS__DATA",
            dir.path().join("data").display().to_string(),
        ),
        (
            "IOT_AGENT_DIRS__COMMON",
            dir.path().join("common").display().to_string(),
        ),
        ("IOT_AGENT_URL", format!("http://127.0.0.1:{}", free_port())),
        (
            "IOT_AGENT_SNAPD__SOCKET",
            dir.path().join("none.socket").display().to_string(),
        ),
        ("IOT_AGENT_NATS__URL", nats.url()),
        ("IOT_AGENT_NATS__SNAPD__PASSWORD", PASSWORD.into()),
        ("IOT_AGENT_DMS__ENABLED", "false".into()),
        ("IOT_AGENT_TERMINAL__ENABLED", "true".into()),
    ];
    let mut agent = AgentProcess::start(&env);
    agent.wait_for("terminal served on NATS");
    let link = link(&nats, "snapd", PASSWORD).await;
    let mut s = Session::open(
        &link,
        &root(),
        open("set -m; nohup sleep 1000 >/dev/null 2>&1 & echo PID=$!; wait"),
    )
    .await
    .unwrap();
    let (out, _) = read_until(&mut s, has_pid_line).await;
    let pid = pid_in(&out);
    agent.signal("KILL");
    agent.wait_exit();
    assert!(!gone(pid), "the job runs on after the agent was killed");
    let mut again = AgentProcess::start(&env);
    again.wait_for("killed a terminal session left running");
    assert!(gone(pid), "sleep {pid} survived the next start");
    again.signal("TERM");
    again.wait_exit();
}
