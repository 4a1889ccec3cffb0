//! The `iot-agent` binary run as its users run it, with its log lines
//! readable as events.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_iot-agent");

/// A command with a clean environment: nothing from the test runner
/// (IOT_AGENT_*, SNAP_*) leaks in.
pub fn command(args: &[&str], envs: &[(&str, String)]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c
}

/// Runs a one-shot subcommand to completion.
pub fn run_once(args: &[&str], envs: &[(&str, String)]) -> Output {
    command(args, envs).output().expect("cannot run iot-agent")
}

/// `iot-agent run` in the background.
pub struct AgentProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl AgentProcess {
    pub fn start(envs: &[(&str, String)]) -> AgentProcess {
        Self::spawn(command(&["run"], envs))
    }

    /// Another daemon of the crate (`iot-relay run`), read the same way.
    pub fn spawn(mut cmd: Command) -> AgentProcess {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start the daemon");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        AgentProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next log line containing `text` (bounded, so a broken
    /// agent fails the test instead of hanging it).
    pub fn wait_for(&mut self, text: &str) -> String {
        self.wait_for_within(text, Duration::from_secs(60))
    }

    /// [`AgentProcess::wait_for`] with another bound, for events that take
    /// long by nature (a real snapd giving up on its dead store).
    pub fn wait_for_within(&mut self, text: &str, bound: Duration) -> String {
        let deadline = Instant::now() + bound;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line with {text:?}; saw:\n{}", self.seen.join("\n"));
    }

    /// Waits until each of `texts` has appeared in a line from now on, in
    /// any order: for events of independent subsystems (snapd answering,
    /// NATS connecting) whose order is not fixed. Returns the lines, in the
    /// order of `texts`.
    pub fn wait_for_all(&mut self, texts: &[&str]) -> Vec<String> {
        let start = self.seen.len();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let found: Vec<Option<&String>> = texts
                .iter()
                .map(|t| self.seen[start..].iter().find(|l| l.contains(t)))
                .collect();
            if found.iter().all(Option::is_some) {
                return found.into_iter().flatten().cloned().collect();
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "not all of {texts:?} were logged; saw:\n{}",
            self.seen.join("\n")
        );
    }

    /// Takes every line logged so far into `seen` (without waiting).
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// How many lines seen so far contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.seen.iter().filter(|l| l.contains(text)).count()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit after a signal (bounded).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Collect what it logged on the way out.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "iot-agent did not exit after the signal"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
