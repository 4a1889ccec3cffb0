//! The agent's configuration: one typed [`Config`], one key namespace.
//!
//! A key such as `snaplogger.maximum.changes.keep` is the same path everywhere:
//! `snap set iot-agent snaplogger.maximum.changes.keep=5`, the TOML table
//! `[snaplogger.maximum.changes]` / `keep = 5`, and the environment variable
//! `IOT_AGENT_SNAPLOGGER__MAXIMUM__CHANGES__KEEP=5`. The struct nesting below
//! *is* that namespace, so a key is declared exactly once. Layering lives in
//! [`layers`]; value types that validate themselves live in [`values`].

pub mod layers;
mod snapctl;
pub mod values;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use layers::{Effective, Loaded, Source};
pub use values::{
    Duration, ExpandPath, LogLevel, NatsUrl, OptPath, PemSource, ServiceUrl, StringList,
    UpstreamUrl,
};

/// The password that the reference agent shipped for the `snapd` NATS user.
/// Anyone who has read its source knows it, so the agent warns when it is in use.
pub const WELL_KNOWN_NATS_PASSWORD: &str = "accept solve carbon atmosphere";

/// Every setting of the agent. Field docs are the user-facing key docs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Base URL of the IoT Identity service.
    pub url: ServiceUrl,
    pub identity: IdentityConfig,
    pub snapd: SnapdConfig,
    pub nats: NatsConfig,
    pub log: LogConfig,
    pub dirs: Dirs,
    pub snaplogger: SnapLogger,
    pub dms: DmsConfig,
    pub required: RequiredConfig,
    pub watchdog: Watchdog,
    pub export: ExportConfig,
}

/// How the agent talks to the identity service at `url`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityConfig {
    /// Extra CA certificate(s) (PEM) trusted for `https://` URLs, for a
    /// private PKI; the system's roots are trusted as well.
    pub ca: OptPath,
    /// Bound on one enrollment request.
    pub timeout: Duration,
    /// Longest wait between enrollment attempts.
    pub retry: IdentityRetry,
    /// Allow a plain `http://` identity service on a host that is not
    /// loopback (the answer carries the device's private key in clear).
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct IdentityRetry {
    pub max: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            ca: OptPath::default(),
            timeout: Duration::from_secs(30),
            retry: IdentityRetry::default(),
            insecure: false,
        }
    }
}

impl Default for IdentityRetry {
    fn default() -> Self {
        IdentityRetry {
            max: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapdConfig {
    /// snapd's REST API socket.
    pub socket: ExpandPath,
    /// Bound on one request to snapd (connect, send and read the whole answer).
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsConfig {
    /// Device-local NATS server(s), comma separated.
    pub url: NatsUrl,
    pub snapd: NatsCredentials,
    /// Refuse every mirrored snapd request but GET (`agent-read-only`).
    pub readonly: bool,
    /// Serve writes (and the per-serial tree) even on a NATS server that
    /// requires no authorization, or with the well-known default password:
    /// then every local process can manage the device. Off: such a server
    /// gets a read-only mirror and no per-serial tree.
    pub insecure: bool,
    /// Bound on one mirrored snapd request: the requester gets an
    /// `agent-timeout` answer after it, so it must stay below the request
    /// timeout of the NATS clients (commonly 5 to 10 s).
    pub timeout: Duration,
    /// Run the snap's own nats-server (the `nats` daemon), configured by
    /// `iot-agent nats-config` from these keys; `false` turns it off for
    /// users who run their own server at `nats.url`.
    pub bundled: bool,
    /// JetStream's store of the bundled server (MQTT sessions).
    pub store: ExpandPath,
    pub mqtt: NatsMqtt,
    /// The user for every other local client (other snaps): any subject but
    /// the agent's trees. Its password is generated on first start.
    pub device: NatsCredentials,
    /// An optional user for an operator's terminal or browser (empty user:
    /// none): it may request everything, but not serve the agent's subjects.
    pub operator: NatsCredentials,
    pub leaf: NatsLeaf,
}

/// The bundled server's MQTT listener (loopback).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NatsMqtt {
    /// Port on 127.0.0.1; 0: no MQTT listener.
    pub port: u16,
}

/// A leaf-node connection of the bundled server toward the fleet's cluster.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NatsLeaf {
    /// `nats-leaf://host:7422` or `tls://host:7422`; empty: no leaf node.
    pub url: String,
    pub user: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsCredentials {
    pub user: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive.
    pub level: LogLevel,
}

/// Where the agent keeps state. In a snap these follow `$SNAP_DATA` (per
/// revision, rolled back with the snap) and `$SNAP_COMMON` (kept across
/// revisions); outside a snap they are fixed system paths, never the current
/// directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Dirs {
    pub data: ExpandPath,
    pub common: ExpandPath,
}

/// Per-serial action topics (`devices/actions/{serial}/...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RequiredConfig {
    pub enabled: bool,
    /// Switch a required snap that is installed but tracks another channel.
    pub switch: bool,
    pub database: Location,
    /// Attempts before a required-install is reported as failed.
    pub attempts: u32,
    pub retry: RetryCap,
}

/// `*.location` of a file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Location {
    pub location: ExpandPath,
}

impl Default for Location {
    fn default() -> Self {
        Location {
            location: ExpandPath::new("$SNAP_DATA/required.db"),
        }
    }
}

/// `*.retry.max`: the longest wait between attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RetryCap {
    pub max: Duration,
}

impl Default for RetryCap {
    fn default() -> Self {
        RetryCap {
            max: Duration::from_secs(600),
        }
    }
}

impl Default for RequiredConfig {
    fn default() -> Self {
        RequiredConfig {
            enabled: true,
            switch: true,
            database: Location::default(),
            attempts: 10,
            retry: RetryCap::default(),
        }
    }
}

/// The DMS management channel (MQTT with the enrollment's credentials).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DmsConfig {
    pub enabled: bool,
    /// The CA certificate that signs the broker (a file path or the PEM
    /// text), trusted besides the enrollment's organization certificate.
    /// A reference deployment's broker is signed by the identity service's
    /// CA, which the enrollment does not carry.
    pub ca: PemSource,
    /// `full` (chain and host name) or `chain` (chain only, for a broker
    /// certificate such as `CN=mqtt` without subjectAltName).
    pub verify: crate::tls::Verify,
    /// `dmscore` (heartbeat hashes, `list` answered as `version:"2"`) or
    /// `devicetwin` (the original DMS: no hashes, `list` as an array).
    pub protocol: DmsProtocol,
    /// Send a `completion` report when a change started by an action is ready.
    pub completion: bool,
    pub heartbeat: Every,
    pub metrics: Every,
    pub change: DmsChange,
    pub upload: DmsUpload,
    /// MQTT keep-alive with the DMS broker: a silent broker is noticed
    /// after about 1.5 times this.
    pub keepalive: Duration,
    pub actions: DmsActions,
    pub ledger: DmsLedger,
}

/// `dms.actions.*`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DmsActions {
    /// Actions running at once; beyond it the agent stops acknowledging,
    /// so the broker holds the rest.
    pub concurrency: u32,
}

impl Default for DmsActions {
    fn default() -> Self {
        DmsActions { concurrency: 16 }
    }
}

/// `dms.ledger.*`: the durable record of DMS actions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DmsLedger {
    pub location: ExpandPath,
    pub max: DmsLedgerMax,
}

/// `dms.ledger.max.*`: finished actions are pruned beyond either bound.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DmsLedgerMax {
    pub age: Duration,
    pub count: u64,
}

impl Default for DmsLedger {
    fn default() -> Self {
        DmsLedger {
            location: ExpandPath::new("$SNAP_DATA/dms.db"),
            max: DmsLedgerMax::default(),
        }
    }
}

impl Default for DmsLedgerMax {
    fn default() -> Self {
        DmsLedgerMax {
            age: Duration::from_secs(30 * 24 * 3600),
            count: 10_000,
        }
    }
}

/// Which DMS generation the agent talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmsProtocol {
    /// everactive dmscore: heartbeat hashes and the versioned list reply.
    #[default]
    Dmscore,
    /// canonical iot-devicetwin / iot-management: no hashes, list as an array.
    Devicetwin,
}

/// `*.interval`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Every {
    pub interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DmsChange {
    /// How long a change started by an action is followed for its report.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DmsUpload {
    pub timeout: Duration,
    /// Bytes; larger log or snapshot uploads are refused.
    pub limit: u64,
}

impl Default for Every {
    fn default() -> Self {
        Every {
            interval: Duration::from_secs(60),
        }
    }
}

impl Default for DmsConfig {
    fn default() -> Self {
        DmsConfig {
            enabled: true,
            ca: PemSource::None,
            verify: crate::tls::Verify::Full,
            protocol: DmsProtocol::Dmscore,
            completion: true,
            heartbeat: Every::default(),
            metrics: Every::default(),
            change: DmsChange::default(),
            upload: DmsUpload::default(),
            keepalive: Duration::from_secs(30),
            actions: DmsActions::default(),
            ledger: DmsLedger::default(),
        }
    }
}

impl Default for DmsChange {
    fn default() -> Self {
        DmsChange {
            timeout: Duration::from_secs(3600),
        }
    }
}

impl Default for DmsUpload {
    fn default() -> Self {
        DmsUpload {
            timeout: Duration::from_secs(300),
            limit: 512 * 1024 * 1024,
        }
    }
}

/// The change history (`snaplogger.*`, the reference agent's key names).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SnapLogger {
    pub database: SnapLoggerDatabase,
    pub maximum: SnapLoggerMaximum,
    pub duration: SnapLoggerDuration,
    pub log: SnapLoggerLog,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapLoggerDatabase {
    pub location: ExpandPath,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SnapLoggerMaximum {
    pub changes: SnapLoggerKeep,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapLoggerKeep {
    pub keep: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SnapLoggerDuration {
    pub between: SnapLoggerBetween,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapLoggerBetween {
    pub checks: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapLoggerLog {
    pub changes: SnapLoggerStartup,
    pub level: LogLevel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SnapLoggerStartup {
    pub startup: bool,
}

impl Default for SnapLoggerStartup {
    fn default() -> Self {
        SnapLoggerStartup { startup: true }
    }
}

/// The snap-change watchdog: reboots the device when a change is stuck.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Watchdog {
    pub enabled: bool,
    /// A change not ready whose tasks made no progress for this long
    /// (measured from when the agent first saw it) is stuck.
    pub threshold: Duration,
    /// Change kinds that are never stuck (they legitimately retry forever).
    pub ignore: StringList,
    pub reboot: WatchdogReboot,
    pub budget: WatchdogBudget,
    pub boot: WatchdogBoot,
}

/// At most `reboots` reboots per `window`, across agent restarts and
/// change ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchdogBudget {
    pub reboots: u32,
    pub window: Duration,
}

impl Default for WatchdogBudget {
    fn default() -> Self {
        WatchdogBudget {
            reboots: 1,
            window: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WatchdogBoot {
    /// No reboot this soon after the system booted.
    pub grace: Duration,
}

impl Default for WatchdogBoot {
    fn default() -> Self {
        WatchdogBoot {
            grace: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct WatchdogReboot {
    /// A shell command that reboots; empty means through snapd.
    pub command: String,
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog {
            enabled: true,
            threshold: Duration::from_secs(3600),
            // `become-operational` retries the device registration for as
            // long as there is no serial (no network, a classic machine).
            ignore: StringList::new(&["become-operational"]),
            reboot: WatchdogReboot::default(),
            budget: WatchdogBudget::default(),
            boot: WatchdogBoot::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            url: ServiceUrl::new("http://localhost:8030"),
            identity: IdentityConfig::default(),
            snapd: SnapdConfig::default(),
            nats: NatsConfig::default(),
            log: LogConfig::default(),
            dirs: Dirs::default(),
            snaplogger: SnapLogger::default(),
            dms: DmsConfig::default(),
            required: RequiredConfig::default(),
            watchdog: Watchdog::default(),
            export: ExportConfig::default(),
        }
    }
}

impl Default for SnapdConfig {
    fn default() -> Self {
        SnapdConfig {
            socket: ExpandPath::new("/run/snapd.socket"),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: NatsUrl::new("nats://127.0.0.1:4222"),
            snapd: NatsCredentials::default(),
            readonly: false,
            insecure: false,
            timeout: Duration::from_secs(4),
            bundled: true,
            store: ExpandPath::new("$SNAP_COMMON/nats"),
            mqtt: NatsMqtt::default(),
            device: NatsCredentials {
                user: "device".into(),
                password: String::new(),
            },
            operator: NatsCredentials {
                user: String::new(),
                password: String::new(),
            },
            leaf: NatsLeaf::default(),
        }
    }
}

impl Default for NatsCredentials {
    fn default() -> Self {
        NatsCredentials {
            user: "snapd".into(),
            password: WELL_KNOWN_NATS_PASSWORD.into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::new("info"),
        }
    }
}

impl Default for Dirs {
    fn default() -> Self {
        // `$SNAP_DATA` is expanded from the snap's environment; outside a snap
        // `values::expand` has no such variable and the system path is used.
        let data = if std::env::var_os("SNAP_DATA").is_some() {
            "$SNAP_DATA"
        } else {
            "/var/lib/iot-agent"
        };
        let common = if std::env::var_os("SNAP_COMMON").is_some() {
            "$SNAP_COMMON"
        } else {
            "/var/lib/iot-agent/common"
        };
        Dirs {
            data: ExpandPath::new(data),
            common: ExpandPath::new(common),
        }
    }
}

impl Default for SnapLoggerDatabase {
    fn default() -> Self {
        SnapLoggerDatabase {
            location: ExpandPath::new("$SNAP_DATA/changes.db"),
        }
    }
}

impl Default for SnapLoggerKeep {
    fn default() -> Self {
        SnapLoggerKeep { keep: 1000 }
    }
}

impl Default for SnapLoggerBetween {
    fn default() -> Self {
        SnapLoggerBetween {
            checks: Duration::from_secs(3600),
        }
    }
}

impl Default for SnapLoggerLog {
    fn default() -> Self {
        SnapLoggerLog {
            changes: SnapLoggerStartup::default(),
            level: LogLevel::new("info"),
        }
    }
}

/// The export subsystem (`export.*`): store-and-forward telemetry from
/// applications on the device to an upstream broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportConfig {
    /// Off by default: the spool takes disk space and the upstream must be
    /// chosen by the operator.
    pub enabled: bool,
    /// Intake subject prefix on the device-local NATS: applications publish
    /// on `{subject}.{stream}`.
    pub subject: String,
    pub spool: ExportSpool,
    pub upstream: ExportUpstream,
    pub batch: ExportBatch,
    pub status: ExportStatus,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportSpool {
    /// The SQLite spool (in `$SNAP_COMMON`: kept across snap revisions).
    pub path: ExpandPath,
    pub max: ExportSpoolMax,
    /// What happens when a new message does not fit.
    pub full: FullPolicy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportSpoolMax {
    /// Bound on spooled payload and stream-name bytes.
    pub bytes: u64,
    /// Messages older than this are dropped (counted as expired).
    pub age: Duration,
}

/// The policy when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FullPolicy {
    /// Delete the oldest messages to make room (counted as dropped).
    DropOldest,
    /// Refuse the new message with an error to its producer (counted).
    RefuseNew,
}

impl FullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FullPolicy::DropOldest => "drop-oldest",
            FullPolicy::RefuseNew => "refuse-new",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportUpstream {
    /// `nats://`/`tls://` (JetStream) or `mqtt://`/`mqtts://` (QoS 1);
    /// empty: spool only.
    pub url: UpstreamUrl,
    /// Upstream subject (NATS) or topic (MQTT, dots become `/`) prefix.
    pub subject: String,
    /// JetStream stream to create when missing (empty: it must exist).
    pub stream: String,
    pub user: String,
    pub password: String,
    /// Extra CA certificate (PEM) for `tls://` and `mqtts://`.
    pub ca: OptPath,
    /// MQTT client id.
    pub client: String,
    pub max: ExportUpstreamMax,
}

/// Bounds the upstream imposes that the agent cannot learn by itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportUpstreamMax {
    /// Largest payload the upstream takes, in bytes (an MQTT broker's
    /// `message_size_limit`: MQTT 3.1.1 cannot tell it, and mosquitto
    /// acknowledges an oversized message and drops it). 0: what the
    /// upstream says (NATS `max_payload`, the stream's `max_msg_size`), 1 MiB
    /// for MQTT. Intake refuses larger messages so none can be lost or
    /// block the spool later (`crate::export::capacity`).
    pub payload: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportBatch {
    /// Most messages committed in one spool transaction (group commit).
    pub intake: u32,
    /// Most messages in flight to the upstream awaiting acknowledgement.
    pub forward: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ExportStatus {
    /// How often the status is published on the health subject.
    pub interval: Duration,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            enabled: false,
            subject: "export".into(),
            spool: ExportSpool::default(),
            upstream: ExportUpstream::default(),
            batch: ExportBatch::default(),
            status: ExportStatus::default(),
        }
    }
}

impl Default for ExportSpool {
    fn default() -> Self {
        ExportSpool {
            path: ExpandPath::new("$SNAP_COMMON/export.db"),
            max: ExportSpoolMax::default(),
            full: FullPolicy::DropOldest,
        }
    }
}

impl Default for ExportSpoolMax {
    fn default() -> Self {
        ExportSpoolMax {
            bytes: 256 * 1024 * 1024,
            age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl Default for ExportUpstream {
    fn default() -> Self {
        ExportUpstream {
            url: UpstreamUrl::default(),
            subject: "telemetry".into(),
            stream: String::new(),
            user: String::new(),
            password: String::new(),
            ca: OptPath::default(),
            client: "iot-agent-export".into(),
            max: ExportUpstreamMax::default(),
        }
    }
}

impl ExportUpstream {
    /// `subject` without surrounding dots.
    pub fn upstream_prefix(&self) -> String {
        self.subject.trim_matches('.').to_string()
    }
}

impl Default for ExportBatch {
    fn default() -> Self {
        ExportBatch {
            intake: 1024,
            forward: 2048,
        }
    }
}

impl Default for ExportStatus {
    fn default() -> Self {
        ExportStatus {
            interval: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// The data directory (`$SNAP_DATA` in a snap): credentials, history.
    pub fn data_dir(&self) -> &Path {
        self.dirs.data.path()
    }

    /// The common directory (`$SNAP_COMMON` in a snap): spools, device data.
    pub fn common_dir(&self) -> &Path {
        self.dirs.common.path()
    }

    /// The default config file: `$SNAP_DATA/config.toml` in a snap,
    /// `/etc/iot-agent/config.toml` outside.
    pub fn default_file() -> PathBuf {
        match std::env::var_os("SNAP_DATA") {
            Some(d) => Path::new(&d).join("config.toml"),
            None => PathBuf::from("/etc/iot-agent/config.toml"),
        }
    }

    /// True when the well-known reference password guards `snapd.>`.
    pub fn uses_default_nats_password(&self) -> bool {
        self.nats.snapd.password == WELL_KNOWN_NATS_PASSWORD
    }
}
