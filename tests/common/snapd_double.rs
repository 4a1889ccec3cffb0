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

// ------------------------------------------------------------------ state

#[derive(Debug, Clone)]
struct App {
    name: String,
    daemon: Option<String>,
    enabled: bool,
    active: bool,
}

impl App {
    fn to_json(&self, snap: &str) -> Value {
        let mut v = json!({"snap": snap, "name": self.name});
        if let Some(d) = &self.daemon {
            v["daemon"] = json!(d);
            v["daemon-scope"] = json!("system");
            v["enabled"] = json!(self.enabled);
            v["active"] = json!(self.active);
        }
        v
    }
}

#[derive(Debug, Clone)]
struct Snap {
    name: String,
    version: String,
    revision: String,
    channel: String,
    tracking: String,
    active: bool,
    apps: Vec<App>,
    install_date: u128,
    previous: Option<(String, String)>,
    hold: Option<String>,
}

impl Snap {
    fn new(name: &str, version: &str, revision: &str, channel: &str, now: u128) -> Snap {
        Snap {
            name: name.to_string(),
            version: version.to_string(),
            revision: revision.to_string(),
            channel: channel.to_string(),
            tracking: normalize_channel(channel),
            active: true,
            apps: Vec::new(),
            install_date: now,
            previous: None,
            hold: None,
        }
    }

    fn snap_type(&self) -> &'static str {
        match self.name.as_str() {
            "snapd" => "snapd",
            "core" => "os",
            n if n.starts_with("core") || n.starts_with("bare") => "base",
            n if n.ends_with("-kernel") => "kernel",
            "pc" | "pi" => "gadget",
            _ => "app",
        }
    }

    /// The shape of a snap object from `GET /v2/snaps` (snapd's
    /// `client.Snap`, with its omitempty fields left out when empty).
    fn to_json(&self) -> Value {
        let mut v = json!({
            "id": snap_id(&self.name),
            "title": self.name,
            "summary": format!("The {} snap", self.name),
            "description": format!("The {} snap, installed by the snapd test double.", self.name),
            "installed-size": 12345,
            "name": self.name,
            "publisher": {
                "id": "canonical",
                "username": "canonical",
                "display-name": "Canonical",
                "validation": "verified"
            },
            "developer": "canonical",
            "status": if self.active { "active" } else { "installed" },
            "type": self.snap_type(),
            "version": self.version,
            "channel": self.channel,
            "tracking-channel": self.tracking,
            "ignore-validation": false,
            "revision": self.revision,
            "confinement": "strict",
            "private": false,
            "devmode": false,
            "jailmode": false,
            "contact": "",
            "mounted-from": format!("/var/lib/snapd/snaps/{}_{}.snap", self.name, self.revision),
            "links": null
        });
        // snapd leaves `install-date` out for a snap that is not active
        // (a disabled one): the date is that of the active revision.
        if self.active {
            v["install-date"] = json!(rfc3339(self.install_date));
        }
        if self.snap_type() == "app" {
            v["base"] = json!("core24");
        }
        if !self.apps.is_empty() {
            v["apps"] = Value::Array(self.apps.iter().map(|a| a.to_json(&self.name)).collect());
        }
        if let Some(h) = &self.hold {
            v["hold"] = json!(h);
        }
        v
    }
}

#[derive(Debug, Clone)]
struct StoreSnap {
    version: String,
    revision: String,
}

#[derive(Debug, Clone)]
struct Task {
    id: String,
    kind: String,
    summary: String,
    status: String,
    log: Vec<String>,
    spawn: u128,
    ready_at: Option<u128>,
    /// `(done, total)` as a downloading task reports it; `None`: 0 or 1 of 1
    /// by status.
    progress: Option<(u64, u64)>,
}

impl Task {
    fn to_json(&self) -> Value {
        let (done, total) = self
            .progress
            .unwrap_or((u64::from(self.status == "Done"), 1));
        let mut v = json!({
            "id": self.id,
            "kind": self.kind,
            "summary": self.summary,
            "status": self.status,
            "progress": {"label": "", "done": done, "total": total},
            "spawn-time": rfc3339(self.spawn),
        });
        if !self.log.is_empty() {
            v["log"] = json!(self.log);
        }
        if let Some(r) = self.ready_at {
            v["ready-time"] = json!(rfc3339(r));
        }
        v
    }
}

/// What a change does to the device when it reaches Done.
#[derive(Debug, Clone)]
enum Effect {
    None,
    Install {
        name: String,
        channel: String,
        version: String,
        revision: String,
    },
    Refresh {
        name: String,
        channel: Option<String>,
        version: String,
        revision: String,
    },
    Remove(String),
    Revert {
        name: String,
    },
    SetActive {
        name: String,
        active: bool,
    },
    Switch {
        name: String,
        channel: String,
    },
    Hold {
        name: String,
        until: Option<String>,
    },
    Conf {
        snap: String,
        patch: Map<String, Value>,
    },
    Services {
        action: String,
        apps: Vec<(String, String)>,
        enable: bool,
        disable: bool,
    },
    Snapshot {
        set: u64,
        snaps: Vec<String>,
    },
    ForgetSnapshot(u64),
    Connect(Connection),
    Disconnect(Connection),
    Many(Vec<Effect>),
}

#[derive(Debug, Clone)]
struct Change {
    id: String,
    kind: String,
    summary: String,
    status: String,
    spawn: u128,
    ready_at: Option<u128>,
    err: Option<String>,
    data: Option<Value>,
    /// snapd's internal "snap-names", used by `?for=`.
    snap_names: Vec<String>,
    tasks: Vec<Task>,
    effect: Effect,
    applied: bool,
}

const STATUSES: &[&str] = &[
    "Do", "Doing", "Done", "Abort", "Undo", "Undoing", "Undone", "Hold", "Error", "Wait",
];

fn is_ready(status: &str) -> bool {
    matches!(status, "Done" | "Undone" | "Hold" | "Error")
}

impl Change {
    fn ready(&self) -> bool {
        is_ready(&self.status)
    }

    /// snapd's `changeInfo`: `tasks` omitted when empty, `ready-time` until
    /// ready, `err` unless failed, `data` unless there is api-data.
    fn to_json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "kind": self.kind,
            "summary": self.summary,
            "status": self.status,
            "ready": self.ready(),
            "spawn-time": rfc3339(self.spawn),
        });
        if !self.tasks.is_empty() {
            v["tasks"] = Value::Array(self.tasks.iter().map(Task::to_json).collect());
        }
        if let Some(r) = self.ready_at {
            v["ready-time"] = json!(rfc3339(r));
        }
        if let Some(e) = &self.err {
            v["err"] = json!(e);
        }
        if let Some(d) = &self.data {
            v["data"] = d.clone();
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Connection {
    plug_snap: String,
    plug: String,
    slot_snap: String,
    slot: String,
}

#[derive(Debug, Clone)]
struct SnapshotSet {
    id: u64,
    time: u128,
    snaps: Vec<(String, String, String)>, // name, version, revision
}

#[derive(Debug, Clone)]
struct Notice {
    id: String,
    key: String,
    kind: String,
    first: u128,
    last: u128,
    occurrences: u64,
}

struct State {
    mode: ChangeMode,
    fault: Option<Fault>,
    snaps: BTreeMap<String, Snap>,
    store: BTreeMap<String, StoreSnap>,
    conf: BTreeMap<String, Value>,
    changes: Vec<Change>,
    next_change: u64,
    next_task: u64,
    serial: Option<String>,
    requests: Vec<RecordedRequest>,
    reboots: usize,
    users: Vec<Value>,
    snapshots: Vec<SnapshotSet>,
    next_set: u64,
    connections: Vec<Connection>,
    logs: Vec<(u128, String, String)>,
    notices_enabled: bool,
    notices: Vec<Notice>,
    notify: Arc<Notify>,
    added_assertions: Vec<String>,
    last_time: u128,
}

impl State {
    fn new() -> State {
        let mut st = State {
            mode: ChangeMode::Auto,
            fault: None,
            snaps: BTreeMap::new(),
            store: BTreeMap::new(),
            conf: BTreeMap::new(),
            changes: Vec::new(),
            next_change: 1,
            next_task: 1,
            serial: None,
            requests: Vec::new(),
            reboots: 0,
            users: Vec::new(),
            snapshots: Vec::new(),
            next_set: 1,
            connections: Vec::new(),
            logs: Vec::new(),
            notices_enabled: false,
            notices: Vec::new(),
            notify: Arc::new(Notify::new()),
            added_assertions: Vec::new(),
            last_time: 0,
        };
        // Like real snapd: seeding is change 1, with two tasks, Done.
        let id = st.new_change(
            "seed",
            "Initialize system state",
            vec![
                (
                    "run-hook".into(),
                    "Run configure hook of \"core\" snap if present".into(),
                ),
                ("mark-seeded".into(), "Mark system seeded".into()),
            ],
            Vec::new(),
            None,
            Effect::None,
        );
        st.set_status(&id, "Done", "");
        st
    }

    /// Wall-clock nanoseconds, strictly increasing so that times order
    /// events (notices' `after` filter relies on it).
    fn now(&mut self) -> u128 {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .max(self.last_time + 1);
        self.last_time = t;
        t
    }

    fn change_mut(&mut self, id: &str) -> Option<&mut Change> {
        self.changes.iter_mut().find(|c| c.id == id)
    }

    /// Creates a change in `Do` (tasks as `(kind, summary)`) and returns its
    /// id; callers then apply the mode with [`State::start_change`].
    fn new_change(
        &mut self,
        kind: &str,
        summary: &str,
        tasks: Vec<(String, String)>,
        snap_names: Vec<String>,
        data: Option<Value>,
        effect: Effect,
    ) -> String {
        let now = self.now();
        let id = self.next_change.to_string();
        self.next_change += 1;
        let tasks = tasks
            .into_iter()
            .map(|(kind, summary)| {
                let tid = self.next_task.to_string();
                self.next_task += 1;
                Task {
                    id: tid,
                    kind,
                    summary,
                    status: "Do".into(),
                    log: Vec::new(),
                    spawn: now,
                    ready_at: None,
                    progress: None,
                }
            })
            .collect();
        self.changes.push(Change {
            id: id.clone(),
            kind: kind.to_string(),
            summary: summary.to_string(),
            status: "Do".into(),
            spawn: now,
            ready_at: None,
            err: None,
            data,
            snap_names,
            tasks,
            effect,
            applied: false,
        });
        self.bump_notice(&id, kind);
        id
    }

    /// A change with no tasks is Done at once (as in snapd); otherwise Auto
    /// mode finishes it now and Manual mode leaves it in Do.
    fn start_change(&mut self, id: &str) {
        let no_tasks = self
            .changes
            .iter()
            .find(|c| c.id == id)
            .is_some_and(|c| c.tasks.is_empty());
        if no_tasks || self.mode == ChangeMode::Auto {
            self.set_status(id, "Done", "");
        }
    }

    fn set_status(&mut self, id: &str, status: &str, reason: &str) {
        assert!(
            STATUSES.contains(&status),
            "snapd double: unknown change status {status:?} (one of {STATUSES:?})"
        );
        let now = self.now();
        let ch = self
            .change_mut(id)
            .unwrap_or_else(|| panic!("snapd double: no change with id {id:?}"));
        ch.status = status.to_string();
        let n = ch.tasks.len();
        for (i, t) in ch.tasks.iter_mut().enumerate() {
            t.status = match status {
                "Doing" if i > 0 => "Do",
                "Error" if i + 1 < n => "Undone",
                s => s,
            }
            .to_string();
            if status == "Error" && i + 1 == n {
                t.log.push(format!("{} ERROR {reason}", rfc3339(now)));
            }
            t.ready_at = if is_ready(&t.status) {
                t.ready_at.or(Some(now))
            } else {
                None
            };
        }
        ch.ready_at = if is_ready(status) {
            ch.ready_at.or(Some(now))
        } else {
            None
        };
        ch.err = (status == "Error").then(|| {
            let failed = ch
                .tasks
                .last()
                .map(|t| t.summary.clone())
                .unwrap_or_else(|| ch.summary.clone());
            format!("cannot perform the following tasks:\n- {failed} ({reason})")
        });
        let apply = status == "Done" && !ch.applied;
        if apply {
            ch.applied = true;
        }
        let effect = ch.effect.clone();
        let kind = ch.kind.clone();
        if apply {
            self.apply(effect);
        }
        self.bump_notice(id, &kind);
    }

    fn apply(&mut self, effect: Effect) {
        let now = self.now();
        match effect {
            Effect::None => {}
            Effect::Install {
                name,
                channel,
                version,
                revision,
            } => {
                self.snaps.insert(
                    name.clone(),
                    Snap::new(&name, &version, &revision, &channel, now),
                );
            }
            Effect::Refresh {
                name,
                channel,
                version,
                revision,
            } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    if s.revision != revision {
                        s.previous = Some((s.version.clone(), s.revision.clone()));
                    }
                    s.version = version;
                    s.revision = revision;
                    if let Some(c) = channel {
                        s.tracking = normalize_channel(&c);
                        s.channel = c;
                    }
                }
            }
            Effect::Remove(name) => {
                self.snaps.remove(&name);
                self.conf.remove(&name);
            }
            Effect::Revert { name } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    if let Some((v, r)) = s.previous.take() {
                        s.previous = Some((s.version.clone(), s.revision.clone()));
                        s.version = v;
                        s.revision = r;
                    }
                }
            }
            Effect::SetActive { name, active } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    s.active = active;
                    for a in s.apps.iter_mut().filter(|a| a.daemon.is_some()) {
                        a.active = active && a.enabled;
                    }
                }
            }
            Effect::Switch { name, channel } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    s.tracking = normalize_channel(&channel);
                    s.channel = channel;
                }
            }
            Effect::Hold { name, until } => {
                if let Some(s) = self.snaps.get_mut(&name) {
                    s.hold = until;
                }
            }
            Effect::Conf { snap, patch } => {
                let conf = self.conf.entry(snap).or_insert_with(|| json!({}));
                for (k, v) in patch {
                    set_dotted(conf, &k, v);
                }
            }
            Effect::Services {
                action,
                apps,
                enable,
                disable,
            } => {
                for (snap, app) in apps {
                    let Some(s) = self.snaps.get_mut(&snap) else {
                        continue;
                    };
                    let Some(a) = s.apps.iter_mut().find(|a| a.name == app) else {
                        continue;
                    };
                    match action.as_str() {
                        "stop" => {
                            a.active = false;
                            if disable {
                                a.enabled = false;
                            }
                        }
                        _ => {
                            a.active = true;
                            if enable {
                                a.enabled = true;
                            }
                        }
                    }
                }
            }
            Effect::Snapshot { set, snaps } => {
                let snaps = snaps
                    .iter()
                    .filter_map(|n| self.snaps.get(n))
                    .map(|s| (s.name.clone(), s.version.clone(), s.revision.clone()))
                    .collect();
                self.snapshots.push(SnapshotSet {
                    id: set,
                    time: now,
                    snaps,
                });
            }
            Effect::ForgetSnapshot(set) => self.snapshots.retain(|s| s.id != set),
            Effect::Connect(c) => {
                if !self.connections.contains(&c) {
                    self.connections.push(c);
                }
            }
            Effect::Disconnect(c) => self.connections.retain(|x| *x != c),
            Effect::Many(list) => {
                for e in list {
                    self.apply(e);
                }
            }
        }
    }

    /// Records a `change-update` notice for the change (newer snapd emits
    /// one on every status change) and wakes long-polling readers.
    fn bump_notice(&mut self, change_id: &str, kind: &str) {
        let now = self.now();
        if let Some(n) = self.notices.iter_mut().find(|n| n.key == change_id) {
            n.last = now;
            n.occurrences += 1;
            n.kind = kind.to_string();
        } else {
            let id = (self.notices.len() + 1).to_string();
            self.notices.push(Notice {
                id,
                key: change_id.to_string(),
                kind: kind.to_string(),
                first: now,
                last: now,
                occurrences: 1,
            });
        }
        self.notify.notify_waiters();
    }
}

// ------------------------------------------------------------- responses

/// An answer before it becomes a hyper response.
struct Reply {
    status: u16,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

fn json_reply(status: u16, v: Value) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        headers: Vec::new(),
        body: serde_json::to_vec(&v).expect("JSON always serializes"),
    }
}

fn sync(result: Value) -> Reply {
    json_reply(
        200,
        json!({"type": "sync", "status-code": 200, "status": "OK", "result": result}),
    )
}

fn async_reply(change: &str, result: Value) -> Reply {
    json_reply(
        202,
        json!({"type": "async", "status-code": 202, "status": "Accepted", "result": result, "change": change}),
    )
}

/// snapd's error envelope; `kind` and `value` are omitted when `None`.
fn error(
    status: u16,
    message: impl Into<String>,
    kind: Option<&str>,
    value: Option<Value>,
) -> Reply {
    let mut result = json!({"message": message.into()});
    if let Some(k) = kind {
        result["kind"] = json!(k);
    }
    if let Some(v) = value {
        result["value"] = v;
    }
    json_reply(
        status,
        json!({"type": "error", "status-code": status, "status": status_text(status), "result": result}),
    )
}

fn bad_request(message: impl Into<String>) -> Reply {
    error(400, message, None, None)
}

fn not_installed(name: &str) -> Reply {
    error(
        400,
        format!("snap \"{name}\" is not installed"),
        Some("snap-not-installed"),
        Some(json!(name)),
    )
}

fn assertion_reply(texts: &[&str], bundle: bool) -> Reply {
    let mut body = String::new();
    for (i, t) in texts.iter().enumerate() {
        if i > 0 {
            body.push('\n');
        }
        body.push_str(t.trim_end_matches('\n'));
        body.push('\n');
    }
    Reply {
        status: 200,
        content_type: if bundle {
            "application/x.ubuntu.assertion; bundle=y"
        } else {
            "application/x.ubuntu.assertion"
        },
        headers: vec![("X-Ubuntu-Assertions-Count", texts.len().to_string())],
        body: body.into_bytes(),
    }
}

fn into_response(r: Reply) -> Response<Body> {
    let mut b = Response::builder()
        .status(r.status)
        .header("Content-Type", r.content_type);
    for (k, v) in r.headers {
        b = b.header(k, v);
    }
    b.body(Full::new(Bytes::from(r.body)).boxed())
        .expect("a valid response")
}

/// The reply's head and the first half of its body, then nothing, ever.
fn into_stalled_response(r: Reply) -> Response<Body> {
    use futures::StreamExt;
    let half = Bytes::from(r.body[..r.body.len() / 2].to_vec());
    let frames = futures::stream::iter([Ok::<_, Infallible>(hyper::body::Frame::data(half))])
        .chain(futures::stream::pending());
    Response::builder()
        .status(r.status)
        .header("Content-Type", r.content_type)
        .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
        .expect("a valid response")
}

// --------------------------------------------------------------- routing

/// The request as the handlers see it.
struct Req {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    body: Vec<u8>,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }

    /// A comma-separated query list (`snaps=a,b`), empty items dropped.
    fn list(&self, key: &str) -> Vec<String> {
        self.q(key)
            .map(|s| {
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let uri = req.uri().clone();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => return into_response(bad_request(format!("cannot read request body: {e}"))),
    };
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string());
    let fault = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.requests.push(RecordedRequest {
            method: method.clone(),
            path_and_query,
            headers: headers.clone(),
            body: body.clone(),
        });
        let fault = st.fault.clone();
        if let Some(Fault::Conflict(n)) = fault {
            if method != "GET" {
                st.fault = (n > 1).then(|| Fault::Conflict(n - 1));
            }
        }
        fault
    };
    match fault {
        Some(Fault::Garbage) => {
            return into_response(Reply {
                status: 200,
                content_type: "application/json",
                headers: Vec::new(),
                body: b"<html>this is not JSON {\"type\":".to_vec(),
            })
        }
        Some(Fault::Status500) => {
            return into_response(error(500, "simulated internal error", None, None))
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(Fault::Conflict(_)) if method != "GET" => {
            return into_response(error(
                409,
                "snap \"hello-world\" has \"refresh-snap\" change in progress",
                Some("snap-change-conflict"),
                None,
            ))
        }
        Some(Fault::Conflict(_) | Fault::StallExport | Fault::LateAnswer(_)) | None => {}
    }
    let req = Req {
        method,
        path: uri.path().to_string(),
        query: parse_query(uri.query().unwrap_or("")),
        content_type: headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap_or_default(),
        body,
    };
    if req.path == "/v2/notices" && req.method == "GET" {
        let enabled = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notices_enabled;
        if enabled {
            return into_response(get_notices(&state, &req).await);
        }
    }
    let reply = route(&mut state.lock().unwrap_or_else(|e| e.into_inner()), &req);
    if fault == Some(Fault::StallExport) && req.path.ends_with("/export") && reply.status == 200 {
        return into_stalled_response(reply);
    }
    if let Some(Fault::LateAnswer(d)) = fault.filter(|_| req.method != "GET") {
        tokio::time::sleep(d).await;
    }
    into_response(reply)
}

fn route(st: &mut State, req: &Req) -> Reply {
    let segs: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    let allowed: &[&str] = match segs.as_slice() {
        ["v2", "system-info"] => &["GET"],
        ["v2", "snaps"] => &["GET", "POST"],
        ["v2", "snaps", _] => &["GET", "POST"],
        ["v2", "snaps", _, "conf"] => &["GET", "PUT"],
        ["v2", "changes"] => &["GET"],
        ["v2", "changes", _] => &["GET", "POST"],
        ["v2", "assertions"] => &["GET", "POST"],
        ["v2", "assertions", _] => &["GET"],
        ["v2", "model"] | ["v2", "model", "serial"] => &["GET"],
        ["v2", "apps"] => &["GET", "POST"],
        ["v2", "logs"] => &["GET"],
        ["v2", "snapshots"] => &["GET", "POST"],
        ["v2", "snapshots", _, "export"] => &["GET"],
        ["v2", "interfaces"] => &["GET", "POST"],
        ["v2", "connections"] => &["GET"],
        ["v2", "users"] => &["GET", "POST"],
        ["v2", "warnings"] | ["v2", "aliases"] => &["GET"],
        ["v2", "systems"] => &["GET", "POST"],
        _ => &[],
    };
    if allowed.is_empty() || segs.iter().any(|s| s.is_empty()) {
        return error(404, "not found", None, None);
    }
    if !allowed.contains(&req.method.as_str()) {
        return error(
            405,
            format!("method \"{}\" not allowed", req.method),
            None,
            None,
        );
    }
    let m = req.method.as_str();
    match (m, segs.as_slice()) {
        (_, ["v2", "system-info"]) => system_info(st),
        ("GET", ["v2", "snaps"]) => get_snaps(st, req),
        ("POST", ["v2", "snaps"]) => post_snaps(st, req),
        ("GET", ["v2", "snaps", name]) => match st.snaps.get(*name) {
            Some(s) => sync(s.to_json()),
            None => error(
                404,
                "snap not installed",
                Some("snap-not-found"),
                Some(json!(name)),
            ),
        },
        ("POST", ["v2", "snaps", name]) => post_snap(st, name, req),
        ("GET", ["v2", "snaps", name, "conf"]) => get_conf(st, name, req),
        ("PUT", ["v2", "snaps", name, "conf"]) => put_conf(st, name, req),
        ("GET", ["v2", "changes"]) => get_changes(st, req),
        ("GET", ["v2", "changes", id]) => match st.changes.iter().find(|c| c.id == *id) {
            Some(c) => sync(c.to_json()),
            None => error(
                404,
                format!("cannot find change with id \"{id}\""),
                None,
                None,
            ),
        },
        ("POST", ["v2", "changes", id]) => post_change(st, id, req),
        ("GET", ["v2", "assertions"]) => sync(json!({"types": ASSERTION_TYPES})),
        ("POST", ["v2", "assertions"]) => post_assertions(st, req),
        ("GET", ["v2", "assertions", kind]) => get_assertions(st, kind),
        ("GET", ["v2", "model"]) => {
            if req.q("json") == Some("true") {
                sync(json!({"headers": model_headers()}))
            } else {
                assertion_reply(&[MODEL_ASSERTION], false)
            }
        }
        ("GET", ["v2", "model", "serial"]) => match &st.serial {
            None => error(
                404,
                "no serial assertion yet",
                Some("assertion-not-found"),
                Some(json!("serial")),
            ),
            Some(s) if req.q("json") == Some("true") => sync(json!({"headers": simple_headers(s)})),
            Some(s) => assertion_reply(&[s], false),
        },
        ("GET", ["v2", "apps"]) => get_apps(st, req),
        ("POST", ["v2", "apps"]) => post_apps(st, req),
        ("GET", ["v2", "logs"]) => get_logs(st, req),
        ("GET", ["v2", "snapshots"]) => get_snapshots(st, req),
        ("POST", ["v2", "snapshots"]) => post_snapshots(st, req),
        ("GET", ["v2", "snapshots", set, "export"]) => export_snapshot(st, set),
        ("GET", ["v2", "interfaces"]) => get_interfaces(st, req),
        ("POST", ["v2", "interfaces"]) => post_interfaces(st, req),
        ("GET", ["v2", "connections"]) => get_connections(st),
        ("GET", ["v2", "users"]) => sync(Value::Array(st.users.clone())),
        ("POST", ["v2", "users"]) => post_users(st, req),
        ("GET", ["v2", "warnings"]) => sync(json!([])),
        ("GET", ["v2", "aliases"]) => sync(json!({})),
        ("GET", ["v2", "systems"]) => sync(json!({"systems": []})),
        ("POST", ["v2", "systems"]) => post_systems(st, req),
        _ => error(404, "not found", None, None),
    }
}

fn system_info(st: &mut State) -> Reply {
    let next = st.now() + 4 * 3600 * 1_000_000_000;
    sync(json!({
        "architecture": "amd64",
        "build-id": "5f1c2d9e8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e",
        "confinement": "strict",
        "kernel-version": "6.8.0-45-generic",
        "locations": {"snap-bin-dir": "/snap/bin", "snap-mount-dir": "/snap"},
        "managed": !st.users.is_empty(),
        "on-classic": false,
        "os-release": {"id": "ubuntu-core", "version-id": "24"},
        "refresh": {"timer": "00:00~24:00/4", "next": rfc3339(next)},
        "sandbox-features": {
            "apparmor": ["kernel:caps", "kernel:domain", "kernel:file", "kernel:mount", "kernel:network", "kernel:policy", "kernel:ptrace", "kernel:signal", "parser:unsafe", "policy:default"],
            "confinement-options": ["devmode", "strict"],
            "dbus": ["mediated-bus-access"],
            "kmod": ["mediated-modprobe"],
            "mount": ["freezer-cgroup-v1", "layouts", "mount-namespace", "per-snap-persistency", "per-snap-profiles", "per-snap-updates", "per-snap-user-profiles", "stale-base-invalidation"],
            "seccomp": ["bpf-actlog", "bpf-argument-filtering", "kernel:allow", "kernel:errno", "kernel:kill_process", "kernel:kill_thread", "kernel:log", "kernel:trace", "kernel:trap", "kernel:user_notif"],
            "udev": ["device-cgroup-v2", "device-filtering", "tagging"]
        },
        "series": "16",
        "system-mode": "run",
        "version": "2.61-double",
        "virtualization": "none"
    }))
}

fn get_snaps(st: &mut State, req: &Req) -> Reply {
    let wanted = req.list("snaps");
    match req.q("select") {
        None | Some("") | Some("all") | Some("enabled") | Some("refresh-inhibited") => {}
        Some(other) => return bad_request(format!("invalid select parameter: \"{other}\"")),
    }
    let enabled_only = req.q("select") == Some("enabled");
    let all_revisions = req.q("select") == Some("all");
    let mut list: Vec<Value> = Vec::new();
    for s in st
        .snaps
        .values()
        .filter(|s| wanted.is_empty() || wanted.contains(&s.name))
        .filter(|s| !enabled_only || s.active)
    {
        list.push(s.to_json());
        // `select=all` also lists the revisions kept for revert, inactive
        // (`installed`, no install-date), as snapd does.
        if let (true, Some((version, revision))) = (all_revisions, &s.previous) {
            let mut old = s.clone();
            old.version = version.clone();
            old.revision = revision.clone();
            old.active = false;
            list.push(old.to_json());
        }
    }
    json_reply(
        200,
        json!({"type": "sync", "status-code": 200, "status": "OK", "result": list, "sources": ["local"]}),
    )
}

/// A parsed snap instruction (`POST /v2/snaps[/{name}]` body).
struct Instruction {
    action: String,
    channel: Option<String>,
    revision: Option<String>,
    snaps: Vec<String>,
    time: Option<String>,
    hold_level: Option<String>,
}

fn parse_instruction(body: &[u8]) -> Result<Instruction, Reply> {
    let decode_err = |e: String| {
        bad_request(format!(
            "cannot decode request body into snap instruction: {e}"
        ))
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| decode_err(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| {
        decode_err(
            "json: cannot unmarshal non-object into Go value of type daemon.snapInstruction".into(),
        )
    })?;
    let string = |key: &str| -> Result<Option<String>, Reply> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(decode_err(format!(
                "json: cannot unmarshal {other} into Go struct field snapInstruction.{key} of type string"
            ))),
        }
    };
    let revision = match obj.get("revision") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) if n.as_i64().is_some() => Some(n.to_string()),
        Some(other) => return Err(decode_err(format!("invalid snap revision: {other}"))),
    };
    let snaps = match obj.get("snaps") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| decode_err("json: cannot unmarshal into []string".into()))?,
        Some(_) => return Err(decode_err("json: cannot unmarshal into []string".into())),
    };
    let inst = Instruction {
        action: string("action")?.unwrap_or_default(),
        channel: string("channel")?.filter(|c| !c.is_empty()),
        revision,
        snaps,
        time: string("time")?.filter(|c| !c.is_empty()),
        hold_level: string("hold-level")?.filter(|c| !c.is_empty()),
    };
    // snapInstruction.validate(), in snapd's order.
    if inst.action == "hold" {
        match inst.time.as_deref() {
            None => return Err(bad_request("hold action requires a non-empty time value")),
            Some("forever") => {}
            Some(t) if parse_rfc3339(t).is_none() => {
                return Err(bad_request(format!(
                    "hold action requires time to be \"forever\" or in RFC3339 format: parsing time \"{t}\""
                )))
            }
            Some(_) => {}
        }
        match inst.hold_level.as_deref() {
            None => {
                return Err(bad_request(
                    "hold action requires a non-empty hold-level value",
                ))
            }
            Some("auto-refresh") | Some("general") => {}
            Some(_) => {
                return Err(bad_request(
                    "hold action requires hold-level to be either \"auto-refresh\" or \"general\"",
                ))
            }
        }
    } else {
        if inst.time.is_some() {
            return Err(bad_request(
                "time can only be specified for the \"hold\" action",
            ));
        }
        if inst.hold_level.is_some() {
            return Err(bad_request(
                "hold-level can only be specified for the \"hold\" action",
            ));
        }
    }
    Ok(inst)
}

const SNAP_ACTIONS: &[&str] = &[
    "install", "refresh", "remove", "revert", "enable", "disable", "switch", "hold", "unhold",
];

/// One planned snap operation: summary, tasks and effect.
struct Plan {
    summary: String,
    tasks: Vec<(String, String)>,
    effect: Effect,
}

fn t(kind: &str, summary: String) -> (String, String) {
    (kind.to_string(), summary)
}

fn hold_time(inst: &Instruction, st: &mut State) -> Option<String> {
    match inst.time.as_deref() {
        // snapd holds "forever" as a time centuries ahead.
        Some("forever") => Some(rfc3339(
            st.now() + 300 * 365 * 24 * 3600 * 1_000_000_000u128,
        )),
        Some(t) => Some(t.to_string()),
        None => None,
    }
}

/// Plans `action` on one snap, or answers the error snapd would.
fn plan_one(st: &mut State, inst: &Instruction, name: &str) -> Result<Plan, Reply> {
    let action = inst.action.as_str();
    if action == "install" {
        if !valid_instance_name(name) {
            let base = name.split('_').next().unwrap_or(name);
            return Err(bad_request(format!(
                "cannot install \"{name}\": invalid instance name: invalid snap name: \"{base}\""
            )));
        }
        if st.snaps.contains_key(name) {
            return Err(error(
                400,
                format!("snap \"{name}\" is already installed"),
                Some("snap-already-installed"),
                Some(json!(name)),
            ));
        }
        let Some(store) = st.store.get(name).cloned() else {
            return Err(error(
                404,
                "snap not found",
                Some("snap-not-found"),
                Some(json!(name)),
            ));
        };
        let channel = inst.channel.clone().unwrap_or_else(|| "stable".into());
        let revision = inst.revision.clone().unwrap_or(store.revision);
        let mut summary = format!("Install \"{name}\" snap");
        if channel != "stable" {
            summary += &format!(" from \"{channel}\" channel");
        }
        return Ok(Plan {
            summary,
            tasks: vec![
                t(
                    "prerequisites",
                    format!("Ensure prerequisites for \"{name}\" are available"),
                ),
                t(
                    "download-snap",
                    format!("Download snap \"{name}\" ({revision}) from channel \"{channel}\""),
                ),
                t(
                    "link-snap",
                    format!("Make snap \"{name}\" ({revision}) available to the system"),
                ),
            ],
            effect: Effect::Install {
                name: name.to_string(),
                channel,
                version: store.version,
                revision,
            },
        });
    }
    let Some(snap) = st.snaps.get(name).cloned() else {
        return Err(not_installed(name));
    };
    let rev = snap.revision.clone();
    let plan = match action {
        "refresh" => {
            let store = st.store.get(name).cloned();
            let target_rev = inst
                .revision
                .clone()
                .or_else(|| store.as_ref().map(|s| s.revision.clone()))
                .unwrap_or_else(|| rev.clone());
            let version = store
                .filter(|s| s.revision == target_rev)
                .map(|s| s.version)
                .unwrap_or_else(|| snap.version.clone());
            let switching = inst
                .channel
                .as_ref()
                .is_some_and(|c| normalize_channel(c) != snap.tracking);
            if target_rev == rev && !switching {
                return Err(error(
                    400,
                    format!("snap \"{name}\" has no updates available"),
                    Some("snap-no-update-available"),
                    Some(json!(name)),
                ));
            }
            let summary = match &inst.channel {
                Some(c) if c != "stable" => format!("Refresh \"{name}\" snap from \"{c}\" channel"),
                _ => format!("Refresh \"{name}\" snap"),
            };
            Plan {
                summary,
                tasks: vec![
                    t(
                        "download-snap",
                        format!(
                            "Download snap \"{name}\" ({target_rev}) from channel \"{}\"",
                            inst.channel
                                .clone()
                                .unwrap_or_else(|| snap.tracking.clone())
                        ),
                    ),
                    t(
                        "link-snap",
                        format!("Make snap \"{name}\" ({target_rev}) available to the system"),
                    ),
                ],
                effect: Effect::Refresh {
                    name: name.to_string(),
                    channel: inst.channel.clone(),
                    version,
                    revision: target_rev,
                },
            }
        }
        "remove" => Plan {
            summary: format!("Remove \"{name}\" snap"),
            tasks: vec![
                t(
                    "stop-snap-services",
                    format!("Stop snap \"{name}\" ({rev}) services"),
                ),
                t(
                    "unlink-snap",
                    format!("Make snap \"{name}\" unavailable to the system"),
                ),
                t(
                    "discard-snap",
                    format!("Remove snap \"{name}\" ({rev}) from the system"),
                ),
            ],
            effect: Effect::Remove(name.to_string()),
        },
        "revert" => {
            if snap.previous.is_none() {
                return Err(bad_request(format!(
                    "cannot revert \"{name}\": no revision to revert to"
                )));
            }
            Plan {
                summary: format!("Revert \"{name}\" snap"),
                tasks: vec![t(
                    "link-snap",
                    format!("Make snap \"{name}\" available to the system"),
                )],
                effect: Effect::Revert {
                    name: name.to_string(),
                },
            }
        }
        "enable" | "disable" => {
            if inst.revision.is_some() {
                return Err(bad_request(format!(
                    "cannot {action} \"{name}\": {action} takes no revision"
                )));
            }
            let enable = action == "enable";
            if snap.active == enable {
                return Err(bad_request(format!(
                    "cannot {action} \"{name}\": snap \"{name}\" already {action}d"
                )));
            }
            let tasks = if enable {
                vec![
                    t(
                        "link-snap",
                        format!("Make snap \"{name}\" ({rev}) available to the system"),
                    ),
                    t(
                        "start-snap-services",
                        format!("Start snap \"{name}\" ({rev}) services"),
                    ),
                ]
            } else {
                vec![
                    t(
                        "stop-snap-services",
                        format!("Stop snap \"{name}\" ({rev}) services"),
                    ),
                    t(
                        "unlink-current-snap",
                        format!("Make current revision for snap \"{name}\" unavailable"),
                    ),
                ]
            };
            Plan {
                summary: format!(
                    "{} \"{name}\" snap",
                    if enable { "Enable" } else { "Disable" }
                ),
                tasks,
                effect: Effect::SetActive {
                    name: name.to_string(),
                    active: enable,
                },
            }
        }
        "switch" => {
            if inst.revision.is_some() {
                return Err(bad_request(format!(
                    "cannot switch \"{name}\": switch takes no revision"
                )));
            }
            let channel = inst.channel.clone().unwrap_or_default();
            Plan {
                summary: format!("Switch \"{name}\" snap to channel \"{channel}\""),
                tasks: vec![t(
                    "switch-snap-channel",
                    format!(
                        "Switch snap \"{name}\" from channel \"{}\" to \"{channel}\"",
                        snap.tracking
                    ),
                )],
                effect: Effect::Switch {
                    name: name.to_string(),
                    channel,
                },
            }
        }
        "hold" => {
            let level = inst.hold_level.as_deref().unwrap_or("general");
            Plan {
                summary: if level == "general" {
                    format!("Hold general refreshes for \"{name}\"")
                } else {
                    format!("Hold auto-refreshes for \"{name}\"")
                },
                tasks: Vec::new(),
                effect: Effect::Hold {
                    name: name.to_string(),
                    until: hold_time(inst, st),
                },
            }
        }
        "unhold" => Plan {
            summary: format!("Remove refresh hold on \"{name}\""),
            tasks: Vec::new(),
            effect: Effect::Hold {
                name: name.to_string(),
                until: None,
            },
        },
        other => return Err(bad_request(format!("unknown action {other}"))),
    };
    Ok(plan)
}

fn post_snap(st: &mut State, name: &str, req: &Req) -> Reply {
    let inst = match parse_instruction(&req.body) {
        Ok(i) => i,
        Err(r) => return r,
    };
    if !SNAP_ACTIONS.contains(&inst.action.as_str()) {
        return bad_request(format!("unknown action {}", inst.action));
    }
    let plan = match plan_one(st, &inst, name) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let id = st.new_change(
        &format!("{}-snap", inst.action),
        &plan.summary,
        plan.tasks,
        vec![name.to_string()],
        Some(json!({"snap-names": [name]})),
        plan.effect,
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn post_snaps(st: &mut State, req: &Req) -> Reply {
    // Like snapd: JSON bodies must say so (multipart would be a sideload).
    let media = req.content_type.split(';').next().unwrap_or("").trim();
    if media.is_empty() {
        return bad_request("cannot parse content type: mime: no media type");
    }
    if media != "application/json" {
        return bad_request(format!("unknown content type: {}", req.content_type));
    }
    let inst = match parse_instruction(&req.body) {
        Ok(i) => i,
        Err(r) => return r,
    };
    if inst.channel.is_some() || inst.revision.is_some() {
        return bad_request("unsupported option provided for multi-snap operation");
    }
    let names = inst.snaps.clone();
    let (summary, affected, plans, result) = match inst.action.as_str() {
        "install" => {
            if names.is_empty() {
                return bad_request("cannot install zero snaps");
            }
            let mut plans = Vec::new();
            for n in &names {
                match plan_one(st, &inst, n) {
                    Ok(p) => plans.push(p),
                    Err(r) => return r,
                }
            }
            let summary = if names.len() == 1 {
                plans[0].summary.clone()
            } else {
                format!("Install snaps {}", quoted(&names))
            };
            (summary, names.clone(), plans, Value::Null)
        }
        "refresh" => {
            for n in &names {
                if !st.snaps.contains_key(n) {
                    return not_installed(n);
                }
            }
            let candidates: Vec<String> = if names.is_empty() {
                st.snaps.keys().cloned().collect()
            } else {
                names.clone()
            };
            let mut plans = Vec::new();
            let mut updated = Vec::new();
            for n in &candidates {
                if let Ok(p) = plan_one(st, &inst, n) {
                    plans.push(p);
                    updated.push(n.clone());
                }
            }
            let summary = match updated.len() {
                0 if names.is_empty() => "Refresh all snaps: no updates".to_string(),
                0 => format!("Refresh snaps {}: no updates", quoted(&names)),
                1 => format!("Refresh snap \"{}\"", updated[0]),
                _ => format!("Refresh snaps {}", quoted(&updated)),
            };
            (summary, updated, plans, Value::Null)
        }
        "remove" => {
            if names.is_empty() {
                return bad_request("cannot remove zero snaps");
            }
            let mut plans = Vec::new();
            for n in &names {
                match plan_one(st, &inst, n) {
                    Ok(p) => plans.push(p),
                    Err(r) => return r,
                }
            }
            let summary = if names.len() == 1 {
                format!("Remove snap \"{}\"", names[0])
            } else {
                format!("Remove snaps {}", quoted(&names))
            };
            (summary, names.clone(), plans, Value::Null)
        }
        "hold" | "unhold" => {
            let targets: Vec<String> = if names.is_empty() {
                st.snaps.keys().cloned().collect()
            } else {
                names.clone()
            };
            let mut plans = Vec::new();
            for n in &targets {
                match plan_one(st, &inst, n) {
                    Ok(p) => plans.push(p),
                    Err(r) => return r,
                }
            }
            let summary = if inst.action == "hold" {
                format!("Hold refreshes for {}", quoted(&targets))
            } else {
                format!("Remove refresh hold on {}", quoted(&targets))
            };
            for p in &mut plans {
                p.tasks.clear();
            }
            (summary, targets, plans, Value::Null)
        }
        "snapshot" => {
            for n in &names {
                if !st.snaps.contains_key(n) {
                    return not_installed(n);
                }
            }
            let snaps: Vec<String> = if names.is_empty() {
                st.snaps.keys().cloned().collect()
            } else {
                names.clone()
            };
            let set = st.next_set;
            st.next_set += 1;
            let summary = if names.is_empty() {
                "Snapshot all snaps".to_string()
            } else {
                format!("Snapshot snaps {}", quoted(&names))
            };
            let plan = Plan {
                summary: summary.clone(),
                tasks: snaps
                    .iter()
                    .map(|n| {
                        t(
                            "save-snapshot",
                            format!("Save data of snap \"{n}\" in snapshot set #{set}"),
                        )
                    })
                    .collect(),
                effect: Effect::Snapshot {
                    set,
                    snaps: snaps.clone(),
                },
            };
            (summary, snaps, vec![plan], json!({"set-id": set}))
        }
        other => return bad_request(format!("unsupported multi-snap operation \"{other}\"")),
    };
    let mut tasks = Vec::new();
    let mut effects = Vec::new();
    for p in plans {
        tasks.extend(p.tasks);
        effects.push(p.effect);
    }
    let mut data = Map::new();
    if !affected.is_empty() {
        data.insert("snap-names".into(), json!(affected));
    }
    if let Some(set) = result.get("set-id") {
        data.insert("set-id".into(), set.clone());
    }
    let id = st.new_change(
        &format!("{}-snap", inst.action),
        &summary,
        tasks,
        affected,
        (!data.is_empty()).then_some(Value::Object(data)),
        Effect::Many(effects),
    );
    st.start_change(&id);
    async_reply(&id, result)
}

/// Snaps whose configuration exists without the snap being installed.
fn is_system_snap(name: &str) -> bool {
    matches!(name, "core" | "system" | "snapd")
}

fn get_conf(st: &mut State, name: &str, req: &Req) -> Reply {
    let conf = st.conf.get(name).cloned().unwrap_or_else(|| json!({}));
    let keys = req.list("keys");
    if keys.is_empty() {
        return sync(conf);
    }
    let mut out = Map::new();
    for k in keys {
        match get_dotted(&conf, &k) {
            Some(v) => {
                out.insert(k, v.clone());
            }
            None => {
                return error(
                    400,
                    format!("snap \"{name}\" has no \"{k}\" configuration option"),
                    Some("option-not-found"),
                    Some(json!({"SnapName": name, "Key": k})),
                )
            }
        }
    }
    sync(Value::Object(out))
}

fn put_conf(st: &mut State, name: &str, req: &Req) -> Reply {
    let patch: Map<String, Value> = match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => {
            return bad_request(
                "cannot decode request body into patch values: json: cannot unmarshal non-object into Go value of type map[string]interface {}",
            )
        }
        Err(e) => return bad_request(format!("cannot decode request body into patch values: {e}")),
    };
    if !is_system_snap(name) && !st.snaps.contains_key(name) {
        return error(
            404,
            format!("snap \"{name}\" is not installed"),
            Some("snap-not-found"),
            Some(json!(name)),
        );
    }
    let hook_snap = if is_system_snap(name) { "core" } else { name };
    let id = st.new_change(
        "configure-snap",
        &format!("Change configuration of \"{name}\" snap"),
        vec![t(
            "run-hook",
            format!("Run configure hook of \"{hook_snap}\" snap"),
        )],
        vec![name.to_string()],
        None,
        Effect::Conf {
            snap: name.to_string(),
            patch,
        },
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

fn get_changes(st: &mut State, req: &Req) -> Reply {
    let select = req.q("select").unwrap_or("in-progress");
    let keep: fn(&Change) -> bool = match select {
        "all" => |_| true,
        "in-progress" => |c| !c.ready(),
        "ready" => |c| c.ready(),
        _ => return bad_request("select should be one of: all,in-progress,ready"),
    };
    let for_snap = req.q("for").filter(|s| !s.is_empty());
    let list: Vec<Value> = st
        .changes
        .iter()
        .filter(|c| keep(c))
        .filter(|c| for_snap.is_none_or(|s| c.snap_names.iter().any(|n| n == s)))
        .map(Change::to_json)
        .collect();
    sync(Value::Array(list))
}

fn post_change(st: &mut State, id: &str, req: &Req) -> Reply {
    let action = match serde_json::from_slice::<Value>(&req.body) {
        Ok(v) => v["action"].as_str().unwrap_or("").to_string(),
        Err(e) => return bad_request(format!("cannot decode data from request body: {e}")),
    };
    let Some(ch) = st.changes.iter().find(|c| c.id == id) else {
        return error(
            404,
            format!("cannot find change with id \"{id}\""),
            None,
            None,
        );
    };
    if action != "abort" {
        return bad_request(format!("change action \"{action}\" is unsupported"));
    }
    if ch.ready() {
        return bad_request(format!("cannot abort change {id} with nothing pending"));
    }
    // Tasks not started go to Hold (ready); one already running must be
    // undone first, so the change sits in Abort until the test moves it.
    let next = if ch.tasks.iter().any(|t| t.status == "Doing") || ch.status == "Doing" {
        "Abort"
    } else {
        "Hold"
    };
    st.set_status(id, next, "");
    sync(
        st.changes
            .iter()
            .find(|c| c.id == id)
            .map(Change::to_json)
            .unwrap_or(Value::Null),
    )
}

const ASSERTION_TYPES: &[&str] = &[
    "account",
    "account-key",
    "account-key-request",
    "base-declaration",
    "device-session-request",
    "model",
    "preseed",
    "repair",
    "serial",
    "serial-request",
    "snap-build",
    "snap-declaration",
    "snap-developer",
    "snap-resource-pair",
    "snap-resource-revision",
    "snap-revision",
    "store",
    "system-user",
    "validation",
    "validation-set",
];

fn get_assertions(st: &mut State, kind: &str) -> Reply {
    match kind {
        "model" => assertion_reply(&[MODEL_ASSERTION], true),
        // Real snapd with no serial: 200, count 0, empty body.
        "serial" => match &st.serial {
            Some(s) => assertion_reply(&[s], true),
            None => assertion_reply(&[], true),
        },
        k if ASSERTION_TYPES.contains(&k) => assertion_reply(&[], true),
        other => bad_request(format!("invalid assert type: \"{other}\"")),
    }
}

fn post_assertions(st: &mut State, req: &Req) -> Reply {
    let text = String::from_utf8_lossy(&req.body).into_owned();
    if text.is_empty() {
        return bad_request("cannot decode request body into assertions: unexpected EOF");
    }
    if !text.starts_with("type: ") {
        return bad_request(
            "cannot decode request body into assertions: assertion content/signature separator not found",
        );
    }
    if text.starts_with("type: serial\n") {
        st.serial = Some(text.trim_end().to_string());
    }
    st.added_assertions.push(text);
    sync(Value::Null)
}

/// The model's headers as `GET /v2/model?json=true` gives them.
fn model_headers() -> Value {
    let snap = |name: &str, id: &str, kind: &str, channel: &str| json!({"default-channel": channel, "id": id, "name": name, "type": kind});
    json!({
        "architecture": "amd64",
        "authority-id": "canonical",
        "base": "core24",
        "brand-id": "canonical",
        "grade": "signed",
        "model": "ubuntu-core-24-amd64",
        "series": "16",
        "sign-key-sha3-384": "9tydnLa6MTJ-jaQTFUXEwHl1yRx7ZS4K5cyFDhYDcPzhS7uyEkDxdUjg9g08BtNn",
        "snaps": [
            snap("pc", "UqFziVZDHLSyO3TqSWgNBoAdHbLI4dAH", "gadget", "24/stable"),
            snap("pc-kernel", "pYVQrBcKmBa0mZ4CCN7ExT6jH8rY1hza", "kernel", "24/stable"),
            snap("core24", "dwTAh7MZZ01zyriOZErqd1JynQLiOGvM", "base", "latest/stable"),
            snap("snapd", "PMrrV4ml8uWuEUDBT8dSGnKUYbevVhc4", "snapd", "latest/stable"),
        ],
        "timestamp": "2024-04-19T12:00:00+00:00",
        "type": "model"
    })
}

/// Headers of a flat assertion (like a serial): `key: value` lines, with a
/// `key:` followed by indented lines becoming one newline-joined string.
fn simple_headers(text: &str) -> Value {
    let mut out = Map::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        if line.starts_with(' ') {
            if let Some(k) = &current {
                if let Some(Value::String(s)) = out.get_mut(k) {
                    if !s.is_empty() {
                        s.push('\n');
                    }
                    s.push_str(line.trim());
                }
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            out.insert(k.to_string(), json!(v.trim()));
            current = Some(k.to_string());
        }
    }
    Value::Object(out)
}

/// Resolves `names` (`snap` or `snap.app`) to apps, as `GET /v2/apps` and
/// `/v2/logs` do; an uninstalled snap is a 404 `snap-not-found`.
fn resolve_apps(
    st: &State,
    names: &[String],
    services_only: bool,
) -> Result<Vec<(String, App)>, Reply> {
    let mut out = Vec::new();
    let all: Vec<String> = if names.is_empty() {
        st.snaps.keys().cloned().collect()
    } else {
        names.to_vec()
    };
    for n in &all {
        let (snap, app) = match n.split_once('.') {
            Some((s, a)) => (s, Some(a)),
            None => (n.as_str(), None),
        };
        let Some(s) = st.snaps.get(snap) else {
            return Err(error(
                404,
                format!("snap \"{snap}\" not found"),
                Some("snap-not-found"),
                Some(json!(snap)),
            ));
        };
        for a in &s.apps {
            if app.is_some_and(|x| x != a.name) || (services_only && a.daemon.is_none()) {
                continue;
            }
            if !out
                .iter()
                .any(|(sn, x): &(String, App)| *sn == s.name && x.name == a.name)
            {
                out.push((s.name.clone(), a.clone()));
            }
        }
    }
    Ok(out)
}

fn no_matching(services: bool) -> Reply {
    error(
        404,
        if services {
            "no matching services"
        } else {
            "no matching apps"
        },
        Some("app-not-found"),
        None,
    )
}

fn get_apps(st: &mut State, req: &Req) -> Reply {
    let services = match req.q("select") {
        None | Some("") => false,
        Some("service") => true,
        Some(other) => return bad_request(format!("invalid select parameter: \"{other}\"")),
    };
    let names = req.list("names");
    let apps = match resolve_apps(st, &names, services) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if apps.is_empty() && !names.is_empty() {
        return no_matching(services);
    }
    sync(Value::Array(
        apps.iter().map(|(s, a)| a.to_json(s)).collect(),
    ))
}

fn post_apps(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into service operation: {e}"
            ))
        }
    };
    let action = v["action"].as_str().unwrap_or("").to_string();
    if !matches!(action.as_str(), "start" | "stop" | "restart") {
        return bad_request(format!("unknown action \"{action}\""));
    }
    let names: Vec<String> = v["names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return bad_request("cannot perform operation on services without a list of services");
    }
    let apps = match resolve_apps(st, &names, true) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if apps.is_empty() {
        return no_matching(true);
    }
    let mut snap_names: Vec<String> = apps.iter().map(|(s, _)| s.clone()).collect();
    snap_names.dedup();
    let mut tasks = Vec::new();
    for snap in &snap_names {
        let svc: Vec<String> = apps
            .iter()
            .filter(|(s, _)| s == snap)
            .map(|(_, a)| format!("\"{}\"", a.name))
            .collect();
        tasks.push(t(
            "service-control",
            format!(
                "Run service command \"{action}\" for services [{}] of snap \"{snap}\"",
                svc.join(" ")
            ),
        ));
    }
    let id = st.new_change(
        "service-control",
        "Running service command",
        tasks,
        snap_names,
        None,
        Effect::Services {
            action,
            apps: apps
                .iter()
                .map(|(s, a)| (s.clone(), a.name.clone()))
                .collect(),
            enable: v["enable"].as_bool().unwrap_or(false),
            disable: v["disable"].as_bool().unwrap_or(false),
        },
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

fn get_logs(st: &mut State, req: &Req) -> Reply {
    let names = req.list("names");
    let apps = match resolve_apps(st, &names, true) {
        Ok(a) => a,
        Err(r) => return r,
    };
    // Real snapd: no services at all (or none matching) is a 404.
    if apps.is_empty() {
        return no_matching(true);
    }
    let n: i64 = req.q("n").and_then(|n| n.parse().ok()).unwrap_or(10);
    let mut records: Vec<(u128, String, String)> = Vec::new();
    for (snap, app) in &apps {
        let sid = format!("{snap}.{}", app.name);
        let mine: Vec<_> = st
            .logs
            .iter()
            .filter(|(_, s, _)| *s == sid)
            .cloned()
            .collect();
        if mine.is_empty() {
            let base = st.now();
            for i in 0..3u128 {
                records.push((
                    base + i,
                    sid.clone(),
                    format!("{sid} synthetic log line {}", i + 1),
                ));
            }
        } else {
            records.extend(mine);
        }
    }
    records.sort_by_key(|r| r.0);
    if n >= 0 {
        let skip = records.len().saturating_sub(n as usize);
        records.drain(..skip);
    }
    let mut body = Vec::new();
    for (i, (time, sid, message)) in records.iter().enumerate() {
        body.push(0x1e);
        let rec = json!({
            "timestamp": rfc3339(*time),
            "message": message,
            "sid": sid,
            "pid": (1000 + i).to_string()
        });
        body.extend(serde_json::to_vec(&rec).expect("JSON"));
        body.push(b'\n');
    }
    Reply {
        status: 200,
        content_type: "application/json-seq",
        headers: Vec::new(),
        body,
    }
}

fn snapshot_json(set: &SnapshotSet) -> Value {
    let snapshots: Vec<Value> = set
        .snaps
        .iter()
        .map(|(name, version, revision)| {
            json!({
                "set": set.id,
                "time": rfc3339(set.time),
                "snap": name,
                "revision": revision,
                "snap-id": snap_id(name),
                "epoch": {"read": [0], "write": [0]},
                "summary": "",
                "version": version,
                "sha3-384": {"archive.tgz": format!("{:096x}", set.id)},
                "size": 4096,
                "auto": false
            })
        })
        .collect();
    json!({"id": set.id, "snapshots": snapshots})
}

fn get_snapshots(st: &mut State, req: &Req) -> Reply {
    let want_set: Option<u64> = req.q("set").and_then(|s| s.parse().ok());
    let want_snaps = req.list("snaps");
    let list: Vec<Value> = st
        .snapshots
        .iter()
        .filter(|s| want_set.is_none_or(|w| w == s.id))
        .map(|s| {
            let mut s = s.clone();
            if !want_snaps.is_empty() {
                s.snaps.retain(|(n, _, _)| want_snaps.contains(n));
            }
            s
        })
        .filter(|s| !s.snaps.is_empty())
        .map(|s| snapshot_json(&s))
        .collect();
    sync(Value::Array(list))
}

/// `POST /v2/snapshots` acts on existing sets (check, restore, forget).
/// Creating one is `POST /v2/snaps {"action":"snapshot"}`: real snapd
/// answers a `snapshot` action here with "requires snapshot set ID".
fn post_snapshots(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into snapshot operation: {e}"
            ))
        }
    };
    let set = v["set"].as_u64().unwrap_or(0);
    if set == 0 {
        return bad_request("snapshot operation requires snapshot set ID");
    }
    let action = v["action"].as_str().unwrap_or("").to_string();
    let (kind, verb) = match action.as_str() {
        "check" => ("check-snapshot", "Check"),
        "restore" => ("restore-snapshot", "Restore"),
        "forget" => ("forget-snapshot", "Forget"),
        other => return bad_request(format!("unknown snapshot operation \"{other}\"")),
    };
    let Some(found) = st.snapshots.iter().find(|s| s.id == set).cloned() else {
        return error(404, format!("no snapshot data found for {set}"), None, None);
    };
    let names: Vec<String> = found.snaps.iter().map(|(n, _, _)| n.clone()).collect();
    let tasks = names
        .iter()
        .map(|n| {
            t(
                kind,
                format!("{verb} data of snap \"{n}\" in snapshot set #{set}"),
            )
        })
        .collect();
    let effect = if action == "forget" {
        Effect::ForgetSnapshot(set)
    } else {
        Effect::None
    };
    let id = st.new_change(
        &format!("{action}-snapshot"),
        &format!("{verb} snapshot set #{set}"),
        tasks,
        names.clone(),
        Some(json!({"snap-names": names})),
        effect,
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

fn export_snapshot(st: &mut State, set: &str) -> Reply {
    let Ok(id) = set.parse::<u64>() else {
        return bad_request(format!("'{set}' is not a valid snapshot set ID"));
    };
    let Some(found) = st.snapshots.iter().find(|s| s.id == id) else {
        return bad_request(format!(
            "cannot export {id}: no snapshot data found for {id}"
        ));
    };
    let meta = serde_json::to_vec(&snapshot_json(found)).expect("JSON");
    let mtime = (found.time / 1_000_000_000) as u64;
    let mut body = Vec::new();
    tar_entry(&mut body, "export.json", &meta, mtime);
    body.extend_from_slice(&[0u8; 1024]);
    Reply {
        status: 200,
        content_type: "application/x.snapshot",
        headers: Vec::new(),
        body,
    }
}

fn conn_json(conns: &[Connection]) -> Value {
    let established: Vec<Value> = conns
        .iter()
        .map(|c| {
            json!({
                "slot": {"snap": c.slot_snap, "slot": c.slot},
                "plug": {"snap": c.plug_snap, "plug": c.plug},
                "interface": c.plug,
                "manual": true
            })
        })
        .collect();
    let plugs: Vec<Value> = conns
        .iter()
        .map(|c| json!({"snap": c.plug_snap, "plug": c.plug, "interface": c.plug, "connections": [{"snap": c.slot_snap, "slot": c.slot}]}))
        .collect();
    let slots: Vec<Value> = conns
        .iter()
        .map(|c| json!({"snap": c.slot_snap, "slot": c.slot, "interface": c.plug, "connections": [{"snap": c.plug_snap, "plug": c.plug}]}))
        .collect();
    json!({"established": established, "plugs": plugs, "slots": slots})
}

fn get_connections(st: &mut State) -> Reply {
    sync(conn_json(&st.connections))
}

fn get_interfaces(st: &mut State, req: &Req) -> Reply {
    match req.q("select") {
        // Legacy form: plugs and slots, both omitted when empty.
        None | Some("") => {
            let mut v = conn_json(&st.connections);
            let mut out = Map::new();
            for k in ["plugs", "slots"] {
                if v[k].as_array().is_some_and(|a| !a.is_empty()) {
                    out.insert(k.to_string(), v[k].take());
                }
            }
            sync(Value::Object(out))
        }
        Some("all") | Some("connected") => {
            let mut names: Vec<String> = st.connections.iter().map(|c| c.plug.clone()).collect();
            names.sort();
            names.dedup();
            sync(Value::Array(
                names
                    .iter()
                    .map(|n| json!({"name": n, "summary": format!("allows {n}")}))
                    .collect(),
            ))
        }
        Some(other) => bad_request(format!("unsupported select qualifier: \"{other}\"")),
    }
}

fn post_interfaces(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into an interface action: {e}"
            ))
        }
    };
    let action = v["action"].as_str().unwrap_or("").to_string();
    if !matches!(action.as_str(), "connect" | "disconnect") {
        return bad_request(format!("unsupported interface action: \"{action}\""));
    }
    let plugs = v["plugs"].as_array().cloned().unwrap_or_default();
    let slots = v["slots"].as_array().cloned().unwrap_or_default();
    if plugs.is_empty() || slots.is_empty() {
        return bad_request("at least one plug and slot is required");
    }
    if plugs.len() > 1 || slots.len() > 1 {
        return error(
            501,
            "many-to-many operations are not implemented",
            None,
            None,
        );
    }
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let mut c = Connection {
        plug_snap: s(&plugs[0], "snap"),
        plug: s(&plugs[0], "plug"),
        slot_snap: s(&slots[0], "snap"),
        slot: s(&slots[0], "slot"),
    };
    if c.slot_snap.is_empty() || is_system_snap(&c.slot_snap) {
        c.slot_snap = "snapd".into();
    }
    if c.slot.is_empty() {
        c.slot = c.plug.clone();
    }
    for snap in [&c.plug_snap, &c.slot_snap] {
        if snap != "snapd" && !st.snaps.contains_key(snap) {
            return bad_request(format!("snap \"{snap}\" is not installed"));
        }
    }
    let label = format!(
        "{}:{} {} {}:{}",
        c.plug_snap,
        c.plug,
        if action == "connect" { "to" } else { "from" },
        c.slot_snap,
        c.slot
    );
    let (summary, effect) = if action == "connect" {
        (format!("Connect {label}"), Effect::Connect(c.clone()))
    } else {
        if !st.connections.contains(&c) {
            return bad_request(format!(
                "cannot disconnect {}:{} from {}:{}, it is not connected",
                c.plug_snap, c.plug, c.slot_snap, c.slot
            ));
        }
        (format!("Disconnect {label}"), Effect::Disconnect(c.clone()))
    };
    let id = st.new_change(
        &format!("{action}-snap"),
        &summary,
        vec![t(&action, summary.clone())],
        vec![c.plug_snap.clone(), c.slot_snap.clone()],
        None,
        effect,
    );
    st.start_change(&id);
    async_reply(&id, Value::Null)
}

fn post_users(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode user action data from request body: {e}"
            ))
        }
    };
    match v["action"].as_str().unwrap_or("") {
        "create" => {
            let email = v["email"].as_str().unwrap_or("").to_string();
            if email.is_empty() {
                return bad_request("cannot create user: 'email' field is empty");
            }
            let username: String = email
                .split('@')
                .next()
                .unwrap_or("")
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
                .to_ascii_lowercase();
            if st.users.iter().any(|u| u["username"] == username.as_str()) {
                return bad_request(format!(
                    "cannot create user {username}: user already exists"
                ));
            }
            let user = json!({"id": st.users.len() + 1, "username": username, "email": email});
            st.users.push(user.clone());
            sync(json!([user]))
        }
        "remove" => {
            let username = v["username"].as_str().unwrap_or("");
            if username.is_empty() {
                return bad_request("need a username to remove");
            }
            let Some(pos) = st.users.iter().position(|u| u["username"] == username) else {
                return bad_request(format!("user \"{username}\" is not known"));
            };
            let user = st.users.remove(pos);
            sync(json!({"removed": [user]}))
        }
        "" => bad_request("missing user action"),
        other => bad_request(format!("unsupported user action \"{other}\"")),
    }
}

fn post_systems(st: &mut State, req: &Req) -> Reply {
    let v: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return bad_request(format!(
                "cannot decode request body into system action: {e}"
            ))
        }
    };
    match v["action"].as_str().unwrap_or("") {
        "reboot" => {
            st.reboots += 1;
            json_reply(
                200,
                json!({
                    "type": "sync", "status-code": 200, "status": "OK", "result": null,
                    "maintenance": {"message": "system is restarting", "kind": "system-restart", "value": {"op": "reboot"}}
                }),
            )
        }
        other => bad_request(format!("unsupported action \"{other}\"")),
    }
}

/// `GET /v2/notices?types=change-update&after=T&timeout=30s`: the notices
/// after `after`; with none and a `timeout`, waits for the next one (the
/// long poll newer snapd offers) without holding the state lock.
async fn get_notices(state: &Arc<Mutex<State>>, req: &Req) -> Reply {
    let types = req.list("types");
    let after = match req.q("after").filter(|s| !s.is_empty()) {
        None => 0,
        Some(a) => match parse_rfc3339(a) {
            Some(t) => t,
            None => return bad_request(format!("invalid \"after\" timestamp: \"{a}\"")),
        },
    };
    let timeout = match req.q("timeout").filter(|s| !s.is_empty()) {
        None => Duration::ZERO,
        Some(s) => match parse_go_duration(s) {
            Some(d) => d,
            None => return bad_request(format!("invalid timeout: \"{s}\"")),
        },
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let notify = state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .notify
        .clone();
    loop {
        // Register for the wake-up before looking, so a notice recorded
        // between the look and the wait is not missed.
        let mut notified = std::pin::pin!(notify.notified());
        notified.as_mut().enable();
        let list = {
            let st = state.lock().unwrap_or_else(|e| e.into_inner());
            let mut list: Vec<&Notice> = st
                .notices
                .iter()
                .filter(|n| n.last > after)
                .filter(|_| types.is_empty() || types.iter().any(|t| t == "change-update"))
                .collect();
            list.sort_by_key(|n| n.last);
            let json: Vec<Value> = list
                .iter()
                .map(|n| {
                    json!({
                        "id": n.id,
                        "user-id": null,
                        "type": "change-update",
                        "key": n.key,
                        "first-occurred": rfc3339(n.first),
                        "last-occurred": rfc3339(n.last),
                        "last-repeated": rfc3339(n.last),
                        "occurrences": n.occurrences,
                        "last-data": {"kind": n.kind},
                        "expire-after": "168h0m0s"
                    })
                })
                .collect();
            json
        };
        if !list.is_empty() || tokio::time::Instant::now() >= deadline {
            return sync(Value::Array(list));
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

// --------------------------------------------------------------- helpers

fn parse_query(q: &str) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// snapd's snap name rule: 2-40 of `[a-z0-9-]`, at least one letter, no
/// leading, trailing or doubled hyphen; an instance adds `_key`
/// (1-10 of `[a-z0-9]`).
fn valid_instance_name(name: &str) -> bool {
    let (snap, key) = match name.split_once('_') {
        Some((s, k)) => (s, Some(k)),
        None => (name, None),
    };
    let snap_ok = (2..=40).contains(&snap.len())
        && snap
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && snap.chars().any(|c| c.is_ascii_lowercase())
        && !snap.starts_with('-')
        && !snap.ends_with('-')
        && !snap.contains("--");
    let key_ok = key.is_none_or(|k| {
        (1..=10).contains(&k.len())
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    });
    snap_ok && key_ok
}

/// `stable` -> `latest/stable`, `24` -> `24/stable`, `24/edge` as is.
fn normalize_channel(channel: &str) -> String {
    const RISKS: &[&str] = &["stable", "candidate", "beta", "edge"];
    match channel {
        "" => "latest/stable".into(),
        c if RISKS.contains(&c) => format!("latest/{c}"),
        c if !c.contains('/') => format!("{c}/stable"),
        c => c.to_string(),
    }
}

/// A stable 32-character snap id derived from the name.
fn snap_id(name: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    (0..32)
        .map(|i| {
            for b in name.bytes().chain([i as u8]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            ALPHABET[(h % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

fn get_dotted<'a>(conf: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(conf, |v, k| v.get(k))
}

/// Sets `a.b.c` inside nested objects; `null` unsets, like `snap set a!`.
fn set_dotted(conf: &mut Value, key: &str, value: Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = conf;
    for p in &parts[..parts.len() - 1] {
        if !cur.get(*p).is_some_and(Value::is_object) {
            cur[*p] = json!({});
        }
        cur = &mut cur[*p];
    }
    let last = parts[parts.len() - 1];
    if value.is_null() {
        if let Some(m) = cur.as_object_mut() {
            m.remove(last);
        }
    } else {
        cur[last] = value;
    }
}

/// One ustar entry (header + data padded to 512 bytes).
fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8], mtime: u64) {
    let mut h = [0u8; 512];
    let put =
        |h: &mut [u8; 512], at: usize, s: &str| h[at..at + s.len()].copy_from_slice(s.as_bytes());
    put(&mut h, 0, name);
    put(&mut h, 100, "0000644\0");
    put(&mut h, 108, "0000000\0");
    put(&mut h, 116, "0000000\0");
    put(&mut h, 124, &format!("{:011o}\0", data.len()));
    put(&mut h, 136, &format!("{mtime:011o}\0"));
    put(&mut h, 148, "        ");
    h[156] = b'0';
    put(&mut h, 257, "ustar\0");
    put(&mut h, 263, "00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, &format!("{sum:06o}\0 "));
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

const NANOS: u128 = 1_000_000_000;

/// RFC 3339 in UTC with trailing-zero-trimmed nanoseconds, like Go's
/// `time.RFC3339Nano` (what snapd's JSON uses).
pub fn rfc3339(nanos: u128) -> String {
    let secs = (nanos / NANOS) as i64;
    let frac = nanos % NANOS;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let mut s = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    );
    if frac != 0 {
        let f = format!("{frac:09}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Parses RFC 3339 (`Z` or `±hh:mm`, optional fraction) to Unix nanoseconds.
pub fn parse_rfc3339(s: &str) -> Option<u128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut frac: u128 = 0;
    if let Some(r) = rest.strip_prefix('.') {
        let digits: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() {
            return None;
        }
        let padded = format!("{:0<9}", &digits[..digits.len().min(9)]);
        frac = padded.parse().ok()?;
        rest = &r[digits.len()..];
    }
    let offset: i64 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (o[1..3].parse::<i64>().ok()? * 3600 + o[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y, u32::try_from(mo).ok()?, u32::try_from(d).ok()?);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset;
    Some(u128::try_from(secs).ok()? * NANOS + frac)
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe as i64 + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = (y - era * 400) as u64;
    let mp = u64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + u64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i64 - 719_468
}

/// Go `time.ParseDuration` for the forms clients send (`30s`, `1m30s`,
/// `500ms`, `2h`).
fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s;
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    while !rest.is_empty() {
        let n: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        if n.is_empty() {
            return None;
        }
        rest = &rest[n.len()..];
        let unit: String = rest
            .chars()
            .take_while(|c| !c.is_ascii_digit() && *c != '.')
            .collect();
        rest = &rest[unit.len()..];
        let scale = match unit.as_str() {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n.parse::<f64>().ok()? * scale;
    }
    Some(Duration::from_secs_f64(total))
}
