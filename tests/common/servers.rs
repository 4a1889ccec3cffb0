//! Real server processes for integration tests: `nats-server`, `mosquitto`
//! and `snapd`, each on its own loopback port(s) or socket and temp dir so
//! tests run in parallel without sharing anything.
//!
//! Readiness is always decided by probing the server itself (a TCP connect,
//! the NATS `INFO` line, an HTTP answer on the unix socket), bounded by a
//! deadline; the only sleeps are polling intervals and retry back-offs.
//! Every process is killed and reaped on `Drop`, and its stdout/stderr go to
//! a log file whose tail is put into every panic message.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::tls::TestPki;
use super::{poll_until, unix_http_blocking};

/// How long a TCP server gets to become ready before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How many times a start is retried when the chosen port turned out taken.
const PORT_ATTEMPTS: usize = 5;
/// Lines of server log quoted in panic messages.
const TAIL_LINES: usize = 40;

/// Ports already handed out by [`free_port`] in this test process.
static HANDED_OUT: LazyLock<Mutex<BTreeSet<u16>>> = LazyLock::new(|| Mutex::new(BTreeSet::new()));

/// A loopback TCP port that was free a moment ago.
///
/// The kernel picks it (bind to port 0), so it does not clash with ports in
/// use; the port is remembered so that two tests of the same binary never
/// get the same one even after the probe listener is closed. Another process
/// can still grab it before our server binds it: the servers below detect
/// that (the process exits with "address already in use") and retry on a
/// new port.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("cannot bind a probe socket on 127.0.0.1");
        let port = listener
            .local_addr()
            .expect("probe socket has no address")
            .port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// True when something accepts TCP connections on `127.0.0.1:port`.
pub fn tcp_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok()
}

/// The last `lines` lines of each file, labelled, for panic messages.
pub fn tail_files(files: &[&Path], lines: usize) -> String {
    let mut out = String::new();
    for path in files {
        let text = fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read: {e}>"));
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        out.push_str(&format!(
            "--- {} (last {} lines) ---\n",
            path.display(),
            lines
        ));
        for line in &all[start..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// How a start attempt ended.
enum Startup {
    Ready,
    Exited(ExitStatus),
    TimedOut,
}

/// Starts `cmd` with stdin closed and stdout/stderr appended to `log`,
/// after a marker line saying what is being started (the log is shared by
/// every attempt and restart of one server).
fn spawn_logged(cmd: &mut Command, log: &Path, what: &str) -> Child {
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", log.display()));
    let _ = writeln!(out, "=== harness: starting {what} ===");
    let err = out
        .try_clone()
        .expect("cannot duplicate the log file handle");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {what}: {e} (is it installed?)"))
}

/// Waits until `probe` says ready, the child exits, or `timeout` passes.
/// Checks for exit first so that a port answered by some other process is
/// not mistaken for ours once ours has died.
fn wait_ready(child: &mut Child, timeout: Duration, mut probe: impl FnMut() -> bool) -> Startup {
    let deadline = Instant::now() + timeout;
    poll_until(deadline, || match child.try_wait() {
        Ok(Some(status)) => Some(Startup::Exited(status)),
        Ok(None) if probe() => Some(Startup::Ready),
        _ => None,
    })
    .unwrap_or(Startup::TimedOut)
}

/// SIGKILL and reap, so no zombie or listener outlives the test.
fn kill_and_reap(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Whether the log says the process died because its port was taken, the
/// only start failure worth retrying on another port.
fn port_was_taken(log_text: &str) -> bool {
    log_text
        .to_ascii_lowercase()
        .contains("address already in use")
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn running_as_root() -> bool {
    // The owner of /proc/self is the effective uid of this process.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn quote(s: &str) -> String {
    // JSON string syntax is valid NATS config string syntax.
    serde_json::to_string(s).expect("a string always serializes")
}

// ---------------------------------------------------------------- NATS ---

/// One NATS user of the `authorization` block. `None` permissions mean no
/// restriction; `Some(list)` is an allow list of subjects.
#[derive(Debug, Clone)]
pub struct NatsUser {
    pub user: String,
    pub password: String,
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
}

impl NatsUser {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> NatsUser {
        NatsUser {
            user: user.into(),
            password: password.into(),
            publish: None,
            subscribe: None,
        }
    }

    /// Allow publishing only to these subjects (wildcards allowed).
    pub fn publish<S: Into<String>>(mut self, subjects: Vec<S>) -> NatsUser {
        self.publish = Some(subjects.into_iter().map(Into::into).collect());
        self
    }

    /// Allow subscribing only to these subjects (wildcards allowed).
    pub fn subscribe<S: Into<String>>(mut self, subjects: Vec<S>) -> NatsUser {
        self.subscribe = Some(subjects.into_iter().map(Into::into).collect());
        self
    }
}

/// What the test NATS server offers. No users means anonymous access.
#[derive(Debug, Clone, Default)]
pub struct NatsConfig {
    pub users: Vec<NatsUser>,
    /// Also listen for MQTT clients (forces JetStream on: nats-server's MQTT
    /// layer keeps its sessions in JetStream and needs a `server_name`).
    pub mqtt: bool,
    pub jetstream: bool,
    /// A complete configuration file (e.g. the shipped example) to start
    /// from: it is copied into the server's dir and included first; the
    /// harness then overrides `server_name`, `listen`, the JetStream store
    /// and the MQTT port, keeping its users and permissions.
    pub include: Option<PathBuf>,
    /// Be one node of a cluster (a `cluster` block with routes to the others).
    pub cluster: Option<NatsCluster>,
    /// Serve the monitoring endpoints (`/connz`...) on a free loopback port.
    pub monitor: bool,
}

/// One node's part of a NATS cluster: its route port (chosen by the
/// caller with [`free_port`], so every node can name every other's) and
/// the route ports of the others.
#[derive(Debug, Clone)]
pub struct NatsCluster {
    pub name: String,
    pub port: u16,
    pub routes: Vec<u16>,
}

/// A `nats-server` child process with its own config, ports and JetStream
/// store in a temp dir.
pub struct NatsServer {
    dir: TempDir,
    name: String,
    port: u16,
    mqtt_port: Option<u16>,
    http_port: Option<u16>,
    jetstream: bool,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Writes the config and starts the server, waiting until the client
    /// port answers with our own `INFO` (the `server_name` is unique per
    /// instance, so a port grabbed by another server is never mistaken for
    /// ours) and the MQTT port accepts connections. Retries on new ports when
    /// the port turned out taken; panics with the log tail otherwise.
    pub fn start(cfg: NatsConfig) -> NatsServer {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = tempfile::Builder::new()
            .prefix("iot-agent-nats-")
            .tempdir()
            .expect("cannot create a temp dir for nats-server");
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut server = NatsServer {
            name: format!("test-{}-{n}", std::process::id()),
            port: 0,
            mqtt_port: None,
            http_port: None,
            // An included file may enable them with its own ports and paths:
            // always override those.
            jetstream: cfg.jetstream || cfg.mqtt || cfg.include.is_some(),
            conf: dir.path().join("nats.conf"),
            log: dir.path().join("nats.log"),
            child: None,
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            server.mqtt_port = (cfg.mqtt || cfg.include.is_some()).then(free_port);
            server.http_port = cfg.monitor.then(free_port);
            let text = server.render_config(&cfg);
            fs::write(&server.conf, text).expect("cannot write nats.conf");
            match server.spawn_and_wait(attempt) {
                Startup::Ready => return server,
                Startup::Exited(status) if port_was_taken(&server.log_text()) => {
                    eprintln!(
                        "nats-server exited ({status}) because port {} or {:?} was taken; retrying",
                        server.port, server.mqtt_port
                    );
                }
                Startup::Exited(status) => {
                    panic!(
                        "nats-server exited during start-up ({status})\n{}",
                        server.log_tail()
                    )
                }
                Startup::TimedOut => {
                    kill_and_reap(&mut server.child);
                    panic!(
                        "nats-server not ready on port {} within {START_TIMEOUT:?}\n{}",
                        server.port,
                        server.log_tail()
                    )
                }
            }
        }
        panic!(
            "nats-server could not get a free port in {PORT_ATTEMPTS} attempts\n{}",
            server.log_tail()
        )
    }

    fn render_config(&self, cfg: &NatsConfig) -> String {
        let mut c = String::from("# Written by tests/common/servers.rs for one test.\n");
        if let Some(base) = &cfg.include {
            let copy = self.dir.path().join("base.conf");
            fs::copy(base, &copy).unwrap_or_else(|e| panic!("cannot copy {}: {e}", base.display()));
            // Later keys override the included ones.
            c += "include \"base.conf\"\n";
        }
        c += &format!("server_name: {}\n", quote(&self.name));
        c += &format!("listen: {}\n", quote(&format!("127.0.0.1:{}", self.port)));
        if self.jetstream {
            // Small limits: many servers run side by side on a test machine.
            c += &format!(
                "jetstream {{\n  store_dir: {}\n  max_memory_store: 67108864\n  max_file_store: 268435456\n}}\n",
                quote(&self.store_dir().display().to_string())
            );
        }
        if !cfg.users.is_empty() {
            c += "authorization {\n  users = [\n";
            for u in &cfg.users {
                c += &format!(
                    "    {{ user: {}, password: {}",
                    quote(&u.user),
                    quote(&u.password)
                );
                let mut perms = Vec::new();
                for (kind, list) in [("publish", &u.publish), ("subscribe", &u.subscribe)] {
                    if let Some(list) = list {
                        let items: Vec<String> = list.iter().map(|s| quote(s)).collect();
                        perms.push(format!("{kind}: {{ allow: [{}] }}", items.join(", ")));
                    }
                }
                if !perms.is_empty() {
                    c += &format!(", permissions: {{ {} }}", perms.join(", "));
                }
                c += " }\n";
            }
            c += "  ]\n}\n";
        }
        if let Some(mqtt) = self.mqtt_port {
            c += &format!(
                "mqtt {{\n  listen: {}\n}}\n",
                quote(&format!("127.0.0.1:{mqtt}"))
            );
        }
        if let Some(http) = self.http_port {
            c += &format!("http: {}\n", quote(&format!("127.0.0.1:{http}")));
        }
        if let Some(cl) = &cfg.cluster {
            let routes: Vec<String> = cl
                .routes
                .iter()
                .map(|p| quote(&format!("nats-route://127.0.0.1:{p}")))
                .collect();
            c += &format!(
                "cluster {{\n  name: {}\n  listen: {}\n  routes: [{}]\n}}\n",
                quote(&cl.name),
                quote(&format!("127.0.0.1:{}", cl.port)),
                routes.join(", ")
            );
        }
        c
    }

    fn spawn_and_wait(&mut self, attempt: usize) -> Startup {
        let what = format!(
            "nats-server port {} mqtt {:?} (attempt {attempt})",
            self.port, self.mqtt_port
        );
        let mut child = spawn_logged(
            Command::new("nats-server").arg("-c").arg(&self.conf),
            &self.log,
            &what,
        );
        let (port, mqtt, name) = (self.port, self.mqtt_port, self.name.clone());
        let outcome = wait_ready(&mut child, START_TIMEOUT, || {
            mqtt.is_none_or(tcp_accepts) && nats_info_names(port, &name)
        });
        self.child = Some(child);
        if let Startup::Exited(_) = outcome {
            kill_and_reap(&mut self.child);
        }
        outcome
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `/connz` of the monitoring endpoint (needs `monitor`): the clients
    /// connected to this node, as nats-server reports them.
    pub fn connz(&self) -> serde_json::Value {
        let port = self.http_port.expect("started without monitor: true");
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .unwrap_or_else(|e| panic!("monitoring port {port}: {e}"));
        stream
            .write_all(b"GET /connz HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/connz is not JSON ({e}): {raw}"))
    }

    /// Whether a client named `name` is connected to this node now.
    pub fn has_client(&self, name: &str) -> bool {
        self.connz()["connections"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == name))
    }

    pub fn mqtt_port(&self) -> Option<u16> {
        self.mqtt_port
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The temp dir holding config, log and JetStream store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// JetStream's `store_dir` (nats-server adds a `jetstream/` level).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// Kills the server (SIGKILL, like a crash) but keeps its dir and ports
    /// so [`NatsServer::restart`] brings the same server back.
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Starts the server again on the same ports and store (stopping it
    /// first if running). A port can linger briefly after a kill, so "taken"
    /// is retried with a short back-off instead of moving ports.
    pub fn restart(&mut self) {
        self.stop();
        for attempt in 1..=10 {
            match self.spawn_and_wait(attempt) {
                Startup::Ready => return,
                Startup::Exited(_) if port_was_taken(&self.log_text()) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Startup::Exited(status) => panic!(
                    "nats-server exited during restart ({status})\n{}",
                    self.log_tail()
                ),
                Startup::TimedOut => {
                    kill_and_reap(&mut self.child);
                    panic!(
                        "nats-server not ready again on port {} within {START_TIMEOUT:?}\n{}",
                        self.port,
                        self.log_tail()
                    )
                }
            }
        }
        panic!(
            "nats-server could not get port {} back\n{}",
            self.port,
            self.log_tail()
        )
    }

    /// The last lines of the server log (config errors, auth failures...).
    pub fn log_tail(&self) -> String {
        tail_files(&[&self.log, &self.conf], TAIL_LINES)
    }

    fn log_text(&self) -> String {
        read_from(&self.log, 0)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Reads the first protocol line on the client port and checks it is an
/// `INFO` from the server called `name`.
fn nats_info_names(port: u16, name: &str) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(250)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    line.starts_with("INFO ") && line.contains(&format!("\"server_name\":{}", quote(name)))
}

// ----------------------------------------------------------- Mosquitto ---

/// A `mosquitto` broker in the foreground with its own config and log.
pub struct Mosquitto {
    dir: TempDir,
    port: u16,
    conf: PathBuf,
    /// Mosquitto's own log (`log_dest file`).
    log: PathBuf,
    /// What the process wrote on stdout/stderr (start-up errors land here).
    console: PathBuf,
    tls: Option<TlsFiles>,
    /// Sessions and queued messages kept on disk (`persistence true`).
    persistent: bool,
    /// Lines added to the configuration (a test's own limits).
    extra: String,
    child: Option<Child>,
}

#[derive(Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Mosquitto {
    /// Plain MQTT on `127.0.0.1:PORT`, anonymous clients allowed.
    pub fn start_plain() -> Mosquitto {
        Mosquitto::start(None, false, "")
    }

    /// [`Mosquitto::start_plain`] with extra configuration lines (limits
    /// such as `message_size_limit` or `max_packet_size`).
    pub fn start_plain_with(extra: &str) -> Mosquitto {
        Mosquitto::start(None, false, extra)
    }

    /// MQTT over TLS on `127.0.0.1:PORT`: clients must present a certificate
    /// signed by the PKI's CA, and its CN becomes their username
    /// (`use_identity_as_username`). Anonymous access is off; Mosquitto 2.0
    /// counts the certificate identity as a username, so such clients are
    /// accepted while clients without a certificate are refused.
    pub fn start_tls(pki: &TestPki) -> Mosquitto {
        Mosquitto::start(Some(Self::tls_files(pki)), false, "")
    }

    /// [`Mosquitto::start_tls`] with persistence on, as a DMS deployment
    /// runs it: persistent sessions and their queued QoS 1 messages survive
    /// a broker restart that saves them ([`Mosquitto::terminate`]), and the
    /// queue per client is large enough for a burst of several thousand.
    pub fn start_tls_persistent(pki: &TestPki) -> Mosquitto {
        Mosquitto::start(Some(Self::tls_files(pki)), true, "")
    }

    /// [`Mosquitto::start_tls_persistent`] that sends small packets at once
    /// (`set_tcp_nodelay true`): for the link benchmark, whose latency
    /// should be the agent's, not mosquitto's Nagle wait for a delayed ACK.
    pub fn start_tls_persistent_nodelay(pki: &TestPki) -> Mosquitto {
        Mosquitto::start(Some(Self::tls_files(pki)), true, "set_tcp_nodelay true\n")
    }

    /// [`Mosquitto::start_tls`] with more configuration lines (the fleet
    /// simulator's queue and in-flight limits).
    pub fn start_tls_with(pki: &TestPki, extra: &str) -> Mosquitto {
        Mosquitto::start(Some(Self::tls_files(pki)), false, extra)
    }

    fn tls_files(pki: &TestPki) -> TlsFiles {
        TlsFiles {
            ca: pki.ca_cert.clone(),
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
        }
    }

    fn start(tls: Option<TlsFiles>, persistent: bool, extra: &str) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("iot-agent-mosquitto-")
            .tempdir()
            .expect("cannot create a temp dir for mosquitto");
        let mut broker = Mosquitto {
            port: 0,
            conf: dir.path().join("mosquitto.conf"),
            log: dir.path().join("mosquitto.log"),
            console: dir.path().join("console.log"),
            tls,
            persistent,
            extra: extra.to_string(),
            child: None,
            dir,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            broker.port = free_port();
            fs::write(&broker.conf, broker.render_config()).expect("cannot write mosquitto.conf");
            match broker.spawn_and_wait(attempt) {
                Startup::Ready => return broker,
                Startup::Exited(status) if port_was_taken(&broker.console_text()) => {
                    eprintln!(
                        "mosquitto exited ({status}) because port {} was taken; retrying",
                        broker.port
                    );
                }
                Startup::Exited(status) => panic!(
                    "mosquitto exited during start-up ({status})\n{}",
                    broker.log_tail()
                ),
                Startup::TimedOut => {
                    kill_and_reap(&mut broker.child);
                    panic!(
                        "mosquitto not ready on port {} within {START_TIMEOUT:?}\n{}",
                        broker.port,
                        broker.log_tail()
                    )
                }
            }
        }
        panic!(
            "mosquitto could not get a free port in {PORT_ATTEMPTS} attempts\n{}",
            broker.log_tail()
        )
    }

    fn render_config(&self) -> String {
        let mut c = String::from("# Written by tests/common/servers.rs for one test.\n");
        if running_as_root() {
            // Started as root, mosquitto switches to user `mosquitto`, which
            // cannot read the temp dir (0700) holding keys and log.
            c += "user root\n";
        }
        c += "per_listener_settings false\n";
        if self.persistent {
            c += &format!(
                "persistence true\npersistence_location {}/\nautosave_interval 0\nmax_queued_messages 100000\n",
                self.dir.path().display()
            );
        } else {
            c += "persistence false\n";
        }
        c += &format!("log_dest file {}\n", self.log.display());
        c += "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n";
        c += "connection_messages true\n";
        c += &format!("listener {} 127.0.0.1\n", self.port);
        match &self.tls {
            None => c += "allow_anonymous true\n",
            Some(t) => {
                c += &format!(
                    "cafile {}\ncertfile {}\nkeyfile {}\n",
                    t.ca.display(),
                    t.cert.display(),
                    t.key.display()
                );
                c += "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n";
            }
        }
        c += &self.extra;
        if !c.ends_with('\n') {
            c.push('\n');
        }
        c
    }

    /// Ready = our own log says `running` (written after the listener is
    /// bound; a process that failed to bind never writes it) and the port
    /// accepts TCP.
    fn spawn_and_wait(&mut self, attempt: usize) -> Startup {
        let from = file_len(&self.log);
        let what = format!("mosquitto port {} (attempt {attempt})", self.port);
        let mut child = spawn_logged(
            Command::new("mosquitto").arg("-c").arg(&self.conf),
            &self.console,
            &what,
        );
        let (port, log) = (self.port, self.log.clone());
        let outcome = wait_ready(&mut child, START_TIMEOUT, || {
            read_from(&log, from).contains(" running") && tcp_accepts(port)
        });
        self.child = Some(child);
        if let Startup::Exited(_) = outcome {
            kill_and_reap(&mut self.child);
        }
        outcome
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT` (or `mqtts://` for the TLS broker).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Mosquitto's own log file (connections, auth decisions, TLS errors).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Kills the broker (SIGKILL) but keeps its dir and port. A persistent
    /// broker loses what it did not save: the sessions, unless it saved
    /// them before ([`Mosquitto::terminate`]).
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
    }

    /// Stops the broker with SIGTERM and waits for it: a persistent broker
    /// saves its sessions and queued messages on the way out.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }

    /// Deletes the saved sessions (the broker must be stopped): the next
    /// start knows no client.
    pub fn forget_sessions(&mut self) {
        assert!(self.child.is_none(), "stop the broker first");
        let _ = fs::remove_file(self.dir.path().join("mosquitto.db"));
    }

    /// Starts the broker again on the same port (stopping it first if
    /// running); a port lingering after the kill is retried with back-off.
    pub fn restart(&mut self) {
        self.stop();
        for attempt in 1..=10 {
            match self.spawn_and_wait(attempt) {
                Startup::Ready => return,
                Startup::Exited(_) if port_was_taken(&self.console_text()) => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Startup::Exited(status) => panic!(
                    "mosquitto exited during restart ({status})\n{}",
                    self.log_tail()
                ),
                Startup::TimedOut => {
                    kill_and_reap(&mut self.child);
                    panic!(
                        "mosquitto not ready again on port {} within {START_TIMEOUT:?}\n{}",
                        self.port,
                        self.log_tail()
                    )
                }
            }
        }
        panic!(
            "mosquitto could not get port {} back\n{}",
            self.port,
            self.log_tail()
        )
    }

    /// The last lines of the broker log, its console output and config.
    pub fn log_tail(&self) -> String {
        tail_files(&[&self.log, &self.console, &self.conf], TAIL_LINES)
    }

    /// Everything in mosquitto's own log so far.
    pub fn log_text(&self) -> String {
        read_from(&self.log, 0)
    }

    fn console_text(&self) -> String {
        read_from(&self.console, 0) + &read_from(&self.log, 0)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// --------------------------------------------------------------- snapd ---

const SNAPD_BIN: &str = "/usr/lib/snapd/snapd";
/// snapd seeds in well under a second here; the bound is for slow CI.
const SNAPD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long snapd gets to exit on SIGTERM before SIGKILL. Kept short on
/// purpose: snapd 2.57 here takes 7-17 s to exit on SIGTERM (its catalog
/// refresh keeps retrying the unreachable store, and a store call in a
/// request retries for ~30 s), and its temp root is thrown away anyway, so a
/// clean shutdown buys nothing but slower tests.
const SNAPD_TERM_GRACE: Duration = Duration::from_millis(500);

/// A real snapd (Debian's package) with its own global root in a temp dir
/// and its own network namespace.
///
/// `SNAPPY_GLOBAL_ROOT` moves `/run/snapd.socket`, `/var/lib/snapd`... under
/// the temp root, so several can run side by side; `unshare -n` (then `ip
/// link set lo up`) keeps its store and device-registration attempts on a
/// loopback of its own; `SNAPPY_FORCE_API_URL` points the store at a closed
/// port; `SNAPD_STANDBY_WAIT` stops it going to standby with no snaps.
/// `unshare` without `--fork` and `exec` mean the child pid is snapd itself.
pub struct RealSnapd {
    root: TempDir,
    log: PathBuf,
    child: Option<Child>,
}

impl RealSnapd {
    /// Starts snapd and waits until `GET /v2/system-info` answers 200 and
    /// the seeding change (id "1") is ready, since tests read it.
    pub fn start() -> RealSnapd {
        if !Path::new(SNAPD_BIN).exists() {
            panic!("{SNAPD_BIN} is missing: scripts/test installs snapd (apt-get install snapd)");
        }
        let root = tempfile::Builder::new()
            .prefix("iot-agent-snapd-")
            .tempdir()
            .expect("cannot create a temp root for snapd");
        fs::create_dir_all(root.path().join("run")).expect("mkdir run");
        fs::create_dir_all(root.path().join("usr/lib")).expect("mkdir usr/lib");
        std::os::unix::fs::symlink("/usr/lib/snapd", root.path().join("usr/lib/snapd"))
            .expect("cannot symlink usr/lib/snapd into the snapd root");
        let log = root.path().join("snapd.log");
        let child = spawn_logged(
            Command::new("unshare")
                .args(["-n", "--", "sh", "-c"])
                .arg(format!("ip link set lo up; exec {SNAPD_BIN}"))
                .current_dir(root.path())
                .env("SNAP_REEXEC", "0")
                .env("SNAPPY_GLOBAL_ROOT", root.path())
                .env("SNAPPY_FORCE_API_URL", "http://127.0.0.1:9/")
                .env("SNAPD_STANDBY_WAIT", "10m"),
            &log,
            "snapd (unshare -n)",
        );
        let mut snapd = RealSnapd {
            root,
            log,
            child: Some(child),
        };
        let socket = snapd.socket();
        let child = snapd.child.as_mut().expect("just spawned");
        match wait_ready(child, SNAPD_START_TIMEOUT, || snapd_seeded(&socket)) {
            Startup::Ready => snapd,
            Startup::Exited(status) => panic!(
                "snapd exited during start-up ({status}); `unshare -n` needs root or CAP_SYS_ADMIN\n{}",
                snapd.log_tail()
            ),
            Startup::TimedOut => panic!(
                "snapd not seeded within {SNAPD_START_TIMEOUT:?} (socket {})\n{}",
                socket.display(),
                snapd.log_tail()
            ),
        }
    }

    /// `$ROOT/run/snapd.socket`
    pub fn socket(&self) -> PathBuf {
        self.root.path().join("run/snapd.socket")
    }

    /// The temp global root (`$ROOT/var/lib/snapd/state.json`...).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_tail(&self) -> String {
        tail_files(&[&self.log], TAIL_LINES)
    }
}

impl Drop for RealSnapd {
    /// SIGTERM first so snapd can release its state lock and sockets;
    /// SIGKILL once the (short) grace bound passes. The temp root is then
    /// removed by `TempDir`, which ignores errors (nothing is mounted there
    /// in practice, but a failure to clean must not fail the test).
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + SNAPD_TERM_GRACE;
        if poll_until(deadline, || child.try_wait().ok().flatten()).is_none() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// system-info answers 200 and change 1 (seed) is ready.
fn snapd_seeded(socket: &Path) -> bool {
    if !socket.exists() {
        return false;
    }
    let t = Duration::from_secs(2);
    let info = unix_http_blocking(socket, "GET", "/v2/system-info", None, t);
    if !matches!(info, Ok(ref r) if r.status == 200) {
        return false;
    }
    let Ok(changes) = unix_http_blocking(socket, "GET", "/v2/changes?select=all", None, t) else {
        return false;
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&changes.body) else {
        return false;
    };
    v["result"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["id"] == "1" && c["ready"] == true)
}
