//! `iot-remote shell DEVICE`: the local terminal attached to a session on
//! the device. Raw mode while attached (every key, Ctrl-C included, goes to
//! the device), the window size sent on open and on every SIGWINCH, and the
//! terminal restored however the session ends.

use super::terminal::{Event, Session};
use super::{Device, Link};
use crate::services::terminal::protocol;
use std::io::Write;
use std::os::fd::AsFd;
use tokio::io::AsyncReadExt;

/// Puts a terminal in raw mode and restores it when dropped (also when
/// unwinding from a panic).
pub struct RawMode {
    saved: Option<rustix::termios::Termios>,
}

impl RawMode {
    /// Raw mode on standard input when it is a terminal; nothing otherwise.
    pub fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        if !rustix::termios::isatty(fd) {
            return RawMode { saved: None };
        }
        let Ok(saved) = rustix::termios::tcgetattr(fd) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if rustix::termios::tcsetattr(fd, rustix::termios::OptionalActions::Now, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let stdin = std::io::stdin();
            let _ = rustix::termios::tcsetattr(
                stdin.as_fd(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// The local window size (rows, cols), 24x80 when not a terminal.
pub fn window_size() -> (u16, u16) {
    let out = std::io::stdout();
    match rustix::termios::tcgetwinsize(out.as_fd()) {
        Ok(w) if w.ws_row > 0 && w.ws_col > 0 => (w.ws_row, w.ws_col),
        _ => (24, 80),
    }
}

/// Who the operator is, for the device's log: `$USER@host`.
pub fn operator_name() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{user}@{host}")
}

/// Runs a session until it ends; returns the exit code to exit with: the
/// remote shell's, 128 + its signal, or 1 when it was closed for it.
pub async fn run(link: &Link, device: &Device, command: Option<String>) -> Result<i32, String> {
    let (rows, cols) = window_size();
    let open = protocol::Open {
        rows,
        cols,
        command,
        term: std::env::var("TERM").ok().filter(|t| !t.is_empty()),
        user: Some(operator_name()),
        reply_to: None,
    };
    let mut session = Session::open(link, &device.terminal_root(), open).await?;
    eprintln!(
        "iot-remote: attached to session {} (the session ends with its shell)",
        session.id()
    );
    let raw = RawMode::enter();
    let outcome = attach(&mut session).await;
    drop(raw);
    match outcome {
        Ok(exit) => {
            if exit.reason != "exited" {
                eprintln!("iot-remote: the session ended ({})", exit.reason);
            }
            Ok(match (exit.code, exit.signal) {
                (Some(c), _) => c,
                (None, Some(s)) => 128 + s,
                _ => 1,
            })
        }
        Err(e) => {
            // Best effort: do not leave the shell running on the device.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), session.close()).await;
            Err(e)
        }
    }
}

async fn attach(session: &mut Session) -> Result<protocol::Exit, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut winch =
        signal(SignalKind::window_change()).map_err(|e| format!("cannot watch SIGWINCH: {e}"))?;
    let mut stdin = tokio::io::stdin();
    let mut stdout = std::io::stdout();
    let mut buf = vec![0u8; 4096];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => stdin_open = false,
                Ok(n) => session.send(&buf[..n]).await?,
            },
            _ = winch.recv() => {
                let (rows, cols) = window_size();
                session.resize(rows, cols).await?;
            }
            ev = session.next() => match ev? {
                Event::Output(b) => {
                    stdout.write_all(&b).map_err(|e| e.to_string())?;
                    stdout.flush().map_err(|e| e.to_string())?;
                }
                Event::Exit(exit) => return Ok(exit),
            },
        }
    }
}
