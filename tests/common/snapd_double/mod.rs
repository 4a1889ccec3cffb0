//! A stateful, in-process snapd test double on a unix socket.
//!
//! It answers in snapd's exact wire shapes (envelopes, error kinds and
//! messages, change/task objects, assertion media types, json-seq logs) as
//! observed on a real snapd 2.57 and read from snapd's source, and it keeps
//! enough state (installed snaps, store catalogue, changes, config, services,
//! snapshots, connections, users) that a sequence of requests behaves like a
//! device would. It exists for what a containerised real snapd cannot do:
//! installs that succeed, long-running changes, a serial assertion, faults.
//!
//! By concern: [`state`] (what it remembers and how a change moves),
//! [`routes`] (snapd's routing on the decoded path, and the handlers),
//! [`wire`] (envelopes, assertion and tar formats), [`names`] (snapd's name
//! rule) and [`time`] (RFC 3339 and Go durations). This file is the
//! double's public face: start it, drive it, read what it saw.
//!
//! Tests drive it through synchronous controls (`add_installed`,
//! `set_change_status`, `set_fault`...) on shared state behind a std mutex,
//! which is never held across an await point.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tempfile::TempDir;
use tokio::net::UnixListener;
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

mod names;
mod routes;
mod state;
mod time;
mod wire;

use names::*;
use routes::*;
use state::*;
use time::*;
pub use time::{parse_rfc3339, rfc3339};
use wire::*;

/// The model assertion served by the double: an Ubuntu Core 24 model of
/// brand `canonical` (signature shortened; nothing checks it).
pub const MODEL_ASSERTION: &str = "type: model
authority-id: canonical
series: 16
brand-id: canonical
model: ubuntu-core-24-amd64
architecture: amd64
base: core24
grade: signed
snaps:
  -
    default-channel: 24/stable
    id: UqFziVZDHLSyO3TqSWgNBoAdHbLI4dAH
    name: pc
    type: gadget
  -
    default-channel: 24/stable
    id: pYVQrBcKmBa0mZ4CCN7ExT6jH8rY1hza
    name: pc-kernel
    type: kernel
  -
    default-channel: latest/stable
    id: dwTAh7MZZ01zyriOZErqd1JynQLiOGvM
    name: core24
    type: base
  -
    default-channel: latest/stable
    id: PMrrV4ml8uWuEUDBT8dSGnKUYbevVhc4
    name: snapd
    type: snapd
timestamp: 2024-04-19T12:00:00+00:00
sign-key-sha3-384: 9tydnLa6MTJ-jaQTFUXEwHl1yRx7ZS4K5cyFDhYDcPzhS7uyEkDxdUjg9g08BtNn

AcLBXAQAAQoABgUCZiJeMAAKCRDgT5vottzAEpqKD/9v4cSXiNx1kS0Xy8a0ZZLy6bGlR2Gk5Ib1
bH1MTuvJx4K1m+qW5iY8jF0N4GHSCn6vxGd2h+Yjbk6VpQZrbK1+9zJnHr0GJwWZ1vK0bTm3Mcq8
sTq2cWfMd8vYJx0K7qf5u3xQJ+Z2v3pZbcR1Vh3WmC0ZyDq0Nn9u4qXvFh8pS2d1rGmE7yA0wYqb";

/// A serial assertion for [`MODEL_ASSERTION`]. The serial `A1B2-c3d4/5`
/// contains a `/` on purpose, so code turning it into a NATS subject or a
/// file name must sanitize it. Not served until [`SnapdDouble::set_serial`].
pub const SERIAL_ASSERTION: &str = "type: serial
authority-id: canonical
brand-id: canonical
model: ubuntu-core-24-amd64
serial: A1B2-c3d4/5
device-key:
    AcbBTQRWhcGAARAAxS4ZQ0oZ7h1Gm8l4m4Jt6sXw2nP7WbKbQ3o9wq1LZs0k5mCq3xT3b0n8b8P
    sV9kS2n0Vq3wz5cN6q8Qm9yL4bC1fJ2hD3tK5pR7sV9xZ1cE3gH5jK7mN9pQ2sT4vW6yA8bD0f
    H2jL4nP6rT8vX0zB2dF4hJ6lN8pR0tV2xZ4bD6fH8jL0nP2rT4vX6zB8dF0hJ2lN4pR6tV8x
device-key-sha3-384: kJ3kq0n9vXb5p2YzQ8mWcR7tH4sL1aF6dG0eU9iO3yT5rE2wK8jN4bV7cX1zA6sD
timestamp: 2024-05-02T09:30:00.000000Z
sign-key-sha3-384: BWDEoaqyr25nF5SNCvEv2v7QnM9QsfCc0PBMYD_i2NGSQ32EF2d4D0hqUel3m8ul

AcLBUgQAAQoABgUCZjNdWAAAIkIQAFdHvL0lZ8wAJ3y1rQ0o9XbG5f2h8mK3cN6pS1tV4xZ7bD0f
H3jL6nP9rT2vX5zB8dF1hJ4lN7pR0tV3xZ6bD9fH2jL5nP8rT1vX4zB7dF0hJ3lN6pR9tV2xZ5b";

/// How new changes progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeMode {
    /// A new change is Done at once, with its effect applied (the default).
    Auto,
    /// A new change stays `Do` until the test moves it with
    /// [`SnapdDouble::set_change_status`]; its effect applies when `Done`.
    Manual,
}

/// A fault injected into every answer while set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `HTTP/1.1 200 OK`, `Content-Type: application/json`, non-JSON body.
    Garbage,
    /// Wait this long, then answer normally.
    Slow(Duration),
    /// A snapd-shaped 500 error for every request.
    Status500,
    /// The next N non-GET requests get 409 `snap-change-conflict` (another
    /// change is running for the snap); then the fault clears itself.
    Conflict(u32),
    /// `GET /v2/snapshots/{set}/export` sends its status line, headers and
    /// the first half of the archive, then nothing more, with the
    /// connection left open (a stalled export). Other requests are served.
    StallExport,
    /// Non-GET requests take effect at once (their change exists), but the
    /// answer comes this late: a client that dies meanwhile never learns
    /// the change id.
    LateAnswer(Duration),
}

/// What the double answers with: whole bodies, or one that stalls.
type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One request as the double received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path_and_query: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The double: serves until dropped; the socket lives in its own temp dir.
pub struct SnapdDouble {
    dir: TempDir,
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
}

impl SnapdDouble {
    /// Binds `snapd.socket` in a fresh temp dir and serves it on the current
    /// tokio runtime. The socket is bound before this returns, so clients
    /// can connect at once (no readiness wait needed).
    pub async fn start() -> SnapdDouble {
        let dir = tempfile::Builder::new()
            .prefix("iot-agent-snapd-double-")
            .tempdir()
            .expect("cannot create a temp dir for the snapd double");
        let socket = dir.path().join("snapd.socket");
        let listener = UnixListener::bind(&socket)
            .unwrap_or_else(|e| panic!("cannot bind {}: {e}", socket.display()));
        let state = Arc::new(Mutex::new(State::new()));
        let shared = state.clone();
        let server = tokio::spawn(async move {
            // Connection tasks live in this set: aborting the accept task on
            // drop drops the set, which aborts every open connection too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let st = shared.clone();
                            conns.spawn(async move {
                                let svc = service_fn(move |req| {
                                    let st = st.clone();
                                    async move { Ok::<_, Infallible>(handle(st, req).await) }
                                });
                                let _ = http1::Builder::new()
                                    .serve_connection(TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                        Err(e) => {
                            eprintln!("snapd double: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        SnapdDouble {
            dir,
            socket,
            state,
            server,
        }
    }

    /// The unix socket to point the agent's snapd client at.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// The temp dir holding the socket.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs a snap directly (no change). `channel` is stored as given in
    /// `channel`; `tracking-channel` gets the normalized `track/risk` form.
    /// No apps: add them with [`SnapdDouble::add_service`] / `add_app`.
    pub fn add_installed(&self, name: &str, version: &str, revision: &str, channel: &str) {
        let mut st = self.lock();
        let now = st.now();
        st.snaps.insert(
            name.to_string(),
            Snap::new(name, version, revision, channel, now),
        );
    }

    /// Installs a snap that is disabled (`status: installed`, no
    /// `install-date`), as `snap disable` leaves it.
    pub fn add_disabled(&self, name: &str, version: &str, revision: &str, channel: &str) {
        self.add_installed(name, version, revision, channel);
        if let Some(s) = self.lock().snaps.get_mut(name) {
            s.active = false;
        }
    }

    /// Adds a `simple` system service `app` to installed `snap` (enabled;
    /// active as given). Panics if the snap is not installed.
    pub fn add_service(&self, snap: &str, app: &str, active: bool) {
        self.push_app(
            snap,
            App {
                name: app.to_string(),
                daemon: Some("simple".to_string()),
                enabled: true,
                active,
            },
        );
    }

    /// Adds a non-service app (a command) to installed `snap`.
    pub fn add_app(&self, snap: &str, app: &str) {
        self.push_app(
            snap,
            App {
                name: app.to_string(),
                daemon: None,
                enabled: false,
                active: false,
            },
        );
    }

    fn push_app(&self, snap: &str, app: App) {
        let mut st = self.lock();
        let s = st.snaps.get_mut(snap).unwrap_or_else(|| {
            panic!("snapd double: add an app to {snap:?}, which is not installed")
        });
        s.apps.retain(|a| a.name != app.name);
        s.apps.push(app);
    }

    /// Makes `name` installable from the (pretend) store: version "1.0",
    /// revision "1".
    pub fn add_store_snap(&self, name: &str) {
        self.add_store_snap_version(name, "1.0", "1");
    }

    /// Publishes `name` at this version/revision; a refresh of an installed
    /// snap with another revision then finds an update.
    pub fn add_store_snap_version(&self, name: &str, version: &str, revision: &str) {
        self.lock().store.insert(
            name.to_string(),
            StoreSnap {
                version: version.to_string(),
                revision: revision.to_string(),
            },
        );
    }

    /// Sets (or clears) the serial assertion text, e.g. `SERIAL_ASSERTION`.
    pub fn set_serial(&self, serial: Option<String>) {
        self.lock().serial = serial;
    }

    pub fn set_change_mode(&self, mode: ChangeMode) {
        self.lock().mode = mode;
    }

    /// Moves a change (and its tasks) to `status`: one of Do, Doing, Done,
    /// Abort, Undo, Undoing, Undone, Hold, Error, Wait. `Done` applies the
    /// change's effect; `Error` sets `err` to snapd's
    /// `cannot perform the following tasks:` text. Panics on an unknown id
    /// or status.
    pub fn set_change_status(&self, id: &str, status: &str) {
        self.lock().set_status(id, status, "simulated failure");
    }

    /// Sets the progress of a change's first task (`done` of `total`
    /// bytes), as snapd reports a download moving. Panics on an unknown id.
    pub fn set_task_progress(&self, change_id: &str, done: u64, total: u64) {
        let mut st = self.lock();
        let ch = st
            .change_mut(change_id)
            .expect("snapd double: no such change");
        if let Some(t) = ch.tasks.first_mut() {
            t.progress = Some((done, total));
        }
    }

    /// Fails a change with this reason in `err` and in the failing task log.
    pub fn set_change_error(&self, id: &str, reason: &str) {
        self.lock().set_status(id, "Error", reason);
    }

    /// Seeds history: a change with one task, in `status`, spawned at
    /// `spawn_time` (RFC 3339). Returns its id.
    pub fn add_change(&self, kind: &str, summary: &str, status: &str, spawn_time: &str) -> String {
        let spawn = parse_rfc3339(spawn_time)
            .unwrap_or_else(|| panic!("snapd double: bad RFC 3339 time {spawn_time:?}"));
        let mut st = self.lock();
        let id = st.new_change(
            kind,
            summary,
            vec![(kind.to_string(), summary.to_string())],
            Vec::new(),
            None,
            Effect::None,
        );
        let ch = st.change_mut(&id).expect("just created");
        ch.spawn = spawn;
        for t in &mut ch.tasks {
            t.spawn = spawn;
        }
        st.set_status(&id, status, "simulated failure");
        // Ready history keeps its own times rather than "now".
        let ch = st.change_mut(&id).expect("just created");
        if ch.ready_at.is_some() {
            ch.ready_at = Some(spawn + 1_000_000_000);
            for t in &mut ch.tasks {
                t.ready_at = t.ready_at.map(|_| spawn + 1_000_000_000);
            }
        }
        id
    }

    /// Every change as snapd renders it, by id.
    pub fn changes(&self) -> Vec<Value> {
        let st = self.lock();
        st.changes.iter().map(Change::to_json).collect()
    }

    /// One change as snapd renders it.
    pub fn change(&self, id: &str) -> Option<Value> {
        let st = self.lock();
        st.changes.iter().find(|c| c.id == id).map(Change::to_json)
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// How many POSTs reached exactly this path (e.g. `/v2/snaps/x`): how
    /// often an action really ran.
    pub fn posts_to(&self, path: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method == "POST" && r.path_and_query == path)
            .count()
    }

    /// How many `POST /v2/systems {"action":"reboot"}` were received.
    pub fn reboots(&self) -> usize {
        self.lock().reboots
    }

    /// Replaces a snap's whole configuration.
    pub fn set_conf(&self, snap: &str, conf: Value) {
        self.lock().conf.insert(snap.to_string(), conf);
    }

    /// A snap's configuration (`{}` when none).
    pub fn conf(&self, snap: &str) -> Value {
        self.lock()
            .conf
            .get(snap)
            .cloned()
            .unwrap_or_else(|| json!({}))
    }

    /// Names of installed snaps, sorted.
    pub fn installed(&self) -> Vec<String> {
        self.lock().snaps.keys().cloned().collect()
    }

    /// An installed snap as `GET /v2/snaps/{name}` renders it.
    pub fn snap(&self, name: &str) -> Option<Value> {
        self.lock().snaps.get(name).map(Snap::to_json)
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().fault = fault;
    }

    /// Whether `GET /v2/notices` exists (newer snapd) or answers 404 like
    /// snapd 2.57 (the default).
    pub fn set_notices_supported(&self, supported: bool) {
        self.lock().notices_enabled = supported;
    }

    /// Adds a journal line for `GET /v2/logs`; `sid` is `snap.app`.
    /// Services without lines get three synthetic ones.
    pub fn add_log(&self, sid: &str, message: &str) {
        let mut st = self.lock();
        let now = st.now();
        st.logs.push((now, sid.to_string(), message.to_string()));
    }

    /// Users created through `POST /v2/users`.
    pub fn users(&self) -> Vec<Value> {
        self.lock().users.clone()
    }

    /// Assertion texts received by `POST /v2/assertions`.
    pub fn added_assertions(&self) -> Vec<String> {
        self.lock().added_assertions.clone()
    }
}

impl Drop for SnapdDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}
