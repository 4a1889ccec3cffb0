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
    Duration, ExpandPath, Fraction, LogLevel, NatsUrl, OptPath, PemSource, ServiceUrl, SigningKeys,
    StringList, TrustAnchor, UpstreamUrl,
};

/// Declares a configuration section: the struct, deserialized with
/// `#[serde(default)]` so that every key is optional, and its `Default`,
/// with each field's default written next to the field (`= expr`; a field
/// without one takes its type's default). The defaults are written here
/// once: `iot-agent config`, the README's table and the snap's hook all
/// read them from `Config::default()`.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                pub $field:ident: $ty:ty $(= $default:expr)?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(default)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: section!(@default $($default)?), )* }
            }
        }
    };
    (@default $default:expr) => { $default };
    (@default) => { Default::default() };
}
/// For the relay's configuration (`crate::relay::config`), declared alike.
pub(crate) use section;

/// The password that the reference agent shipped for the `snapd` NATS user.
/// Anyone who has read its source knows it, so the agent warns when it is in use.
pub const WELL_KNOWN_NATS_PASSWORD: &str = "accept solve carbon atmosphere";

section! {
    /// Every setting of the agent. Field docs are the user-facing key docs.
    pub struct Config {
        /// Base URL of the IoT Identity service.
        pub url: ServiceUrl = ServiceUrl::new("http://localhost:8030"),
        /// `identity.*`.
        pub identity: IdentityConfig,
        /// `snapd.*`.
        pub snapd: SnapdConfig,
        /// `nats.*`: the local NATS server and the mirror.
        pub nats: NatsConfig,
        /// `log.*`.
        pub log: LogConfig,
        /// `runtime.*`.
        pub runtime: RuntimeConfig,
        /// `dirs.*`.
        pub dirs: Dirs,
        /// `snaplogger.*`: the change history.
        pub snaplogger: SnapLogger,
        /// `dms.*`: the DMS link.
        pub dms: DmsConfig,
        /// `required.*`: the per-serial action tree.
        pub required: RequiredConfig,
        /// `watchdog.*`: reboots for stuck changes.
        pub watchdog: Watchdog,
        /// `export.*`: store-and-forward telemetry.
        pub export: ExportConfig,
        /// `terminal.*`: the remote terminal.
        pub terminal: TerminalConfig,
        /// `browser.*`: the remote browser.
        pub browser: BrowserConfig,
        /// `tunnel.*`: the tunnel client.
        pub tunnel: TunnelConfig,
        /// `provisioning.*`: certificates over EST.
        pub provisioning: ProvisioningConfig,
    }
}

section! {
    /// How the agent talks to the identity service at `url`.
    pub struct IdentityConfig {
        /// Extra CA certificate(s) (PEM) trusted for `https://` URLs, for a
        /// private PKI; the system's roots are trusted as well.
        pub ca: OptPath,
        /// Bound on one enrollment request.
        pub timeout: Duration = Duration::from_secs(30),
        /// Longest wait between enrollment attempts.
        pub retry: IdentityRetry,
        /// Allow a plain `http://` identity service on a host that is not
        /// loopback (the answer carries the device's private key in clear).
        pub insecure: bool,
    }
}

section! {
    /// `identity.retry.*`.
    pub struct IdentityRetry {
        /// Longest wait between enrollment attempts (back-off cap).
        pub max: Duration = Duration::from_secs(600),
    }
}

section! {
    /// `snapd.*`: how snapd is reached.
    pub struct SnapdConfig {
        /// snapd's REST API socket.
        pub socket: ExpandPath = ExpandPath::new("/run/snapd.socket"),
        /// Bound on one request to snapd (connect, send and read the whole answer).
        pub timeout: Duration = Duration::from_secs(30),
    }
}

section! {
    /// `nats.*`: the device-local NATS server, the mirror's users and the bundled server.
    pub struct NatsConfig {
        /// Device-local NATS server(s), comma separated.
        pub url: NatsUrl = NatsUrl::new("nats://127.0.0.1:4222"),
        /// The agent's own user (`snapd` by default).
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
        pub timeout: Duration = Duration::from_secs(4),
        /// Run the snap's own nats-server (the `nats` daemon), configured by
        /// `iot-agent nats-config` from these keys; `false` turns it off for
        /// users who run their own server at `nats.url`.
        pub bundled: bool = true,
        /// JetStream's store of the bundled server (MQTT sessions).
        pub store: ExpandPath = ExpandPath::new("$SNAP_COMMON/nats"),
        /// `nats.mqtt.*`.
        pub mqtt: NatsMqtt,
        /// The user for every other local client (other snaps): any subject but
        /// the agent's trees. Its password is generated on first start.
        pub device: NatsCredentials = NatsCredentials {
            user: "device".into(),
            password: String::new(),
        },
        /// An optional user for an operator's terminal or browser (empty user:
        /// none): it may request everything, but not serve the agent's subjects.
        pub operator: NatsCredentials = NatsCredentials {
            user: String::new(),
            password: String::new(),
        },
        /// `nats.leaf.*`.
        pub leaf: NatsLeaf,
    }
}

section! {
    /// The bundled server's MQTT listener (loopback).
    pub struct NatsMqtt {
        /// Port on 127.0.0.1; 0: no MQTT listener.
        pub port: u16,
    }
}

section! {
    /// A leaf-node connection of the bundled server toward the fleet's cluster.
    pub struct NatsLeaf {
        /// `nats-leaf://host:7422` or `tls://host:7422`; empty: no leaf node.
        pub url: String,
        /// The leaf node's user at the cluster.
        pub user: String,
        /// The leaf node's password.
        pub password: String,
    }
}

section! {
    /// A user name and password on the local NATS server.
    pub struct NatsCredentials {
        /// The user name.
        pub user: String = "snapd".into(),
        /// The password; empty: generated on first start (bundled server).
        pub password: String = WELL_KNOWN_NATS_PASSWORD.into(),
    }
}

section! {
    /// `log.*`.
    pub struct LogConfig {
        /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive.
        pub level: LogLevel = LogLevel::new("info"),
    }
}

section! {
    /// The async runtime the daemon runs on. Every blocking write (SQLite
    /// with `synchronous=FULL`, fsync) goes to tokio's blocking pool, so
    /// even one thread keeps answering while a disk is slow.
    pub struct RuntimeConfig {
        /// Worker threads: `0` one per core (tokio's default), `1` a single
        /// thread, `N` N threads. One by default: the smallest footprint (a
        /// thread and its malloc arena fewer per core), and no slower for a
        /// device's load, whose requests come one or a few at a time
        /// (docs/benchmarks.md, "Footprint"); more serve a heavy local
        /// mirror load on more cores.
        pub workers: u16 = 1,
    }
}

section! {
    /// Where the agent keeps state. In a snap these follow `$SNAP_DATA` (per
    /// revision, rolled back with the snap) and `$SNAP_COMMON` (kept across
    /// revisions); outside a snap they are fixed system paths, never the
    /// current directory.
    pub struct Dirs {
        // `$SNAP_DATA` is expanded from the snap's environment; outside a
        // snap there is no such variable and the system path is used.
        /// Where state is kept (`$SNAP_DATA` in the snap).
        pub data: ExpandPath = in_snap_or("SNAP_DATA", "/var/lib/iot-agent"),
        /// Where state shared across revisions is kept (`$SNAP_COMMON` in the snap).
        pub common: ExpandPath = in_snap_or("SNAP_COMMON", "/var/lib/iot-agent/common"),
    }
}

/// `$VAR` when the snap's environment has it, else `outside`.
fn in_snap_or(var: &str, outside: &str) -> ExpandPath {
    if std::env::var_os(var).is_some() {
        ExpandPath::new(&format!("${var}"))
    } else {
        ExpandPath::new(outside)
    }
}

section! {
    /// Per-serial action topics (`devices/actions/{serial}/...`).
    pub struct RequiredConfig {
        /// Serve the per-serial action tree.
        pub enabled: bool = true,
        /// Switch a required snap that is installed but tracks another channel.
        pub switch: bool = true,
        /// `required.database.*`.
        pub database: Location,
        /// Attempts before a required-install is reported as failed.
        pub attempts: u32 = 10,
        /// `required.retry.*`.
        pub retry: RetryCap,
    }
}

section! {
    /// `*.location` of a file.
    pub struct Location {
        /// The SQLite file.
        pub location: ExpandPath = ExpandPath::new("$SNAP_DATA/required.db"),
    }
}

section! {
    /// `*.retry.max`: the longest wait between attempts.
    pub struct RetryCap {
        /// Longest wait between retries (back-off cap).
        pub max: Duration = Duration::from_secs(600),
    }
}

section! {
    /// The DMS management channel (MQTT with the enrollment's credentials).
    pub struct DmsConfig {
        /// Connect to the DMS once enrolled.
        pub enabled: bool = true,
        /// The CA certificate that signs the broker (a file path or the PEM
        /// text), trusted besides the enrollment's organization certificate.
        /// A reference deployment's broker is signed by the identity service's
        /// CA, which the enrollment does not carry.
        pub ca: PemSource = PemSource::None,
        /// `full` (chain and host name) or `chain` (chain only, for a broker
        /// certificate such as `CN=mqtt` without subjectAltName).
        pub verify: crate::tls::Verify = crate::tls::Verify::Full,
        /// `dmscore` (heartbeat hashes, `list` answered as `version:"2"`) or
        /// `devicetwin` (the original DMS: no hashes, `list` as an array).
        pub protocol: DmsProtocol = DmsProtocol::Dmscore,
        /// Send a `completion` report when a change started by an action is ready.
        pub completion: bool = true,
        /// `dms.heartbeat.*`.
        pub heartbeat: Every,
        /// `dms.metrics.*`.
        pub metrics: Every,
        /// `dms.change.*`.
        pub change: DmsChange,
        /// `dms.upload.*`.
        pub upload: DmsUpload,
        /// MQTT keep-alive with the DMS broker: a silent broker is noticed
        /// after about 1.5 times this.
        pub keepalive: Duration = Duration::from_secs(30),
        /// `dms.actions.*`.
        pub actions: DmsActions,
        /// `dms.ledger.*`.
        pub ledger: DmsLedger,
        /// `dms.signing.*`.
        pub signing: DmsSigning,
    }
}

section! {
    /// `dms.signing.*`: signed actions (README, "Signed actions"), for the
    /// DMS topic and the per-serial tree alike.
    pub struct DmsSigning {
        /// Ed25519 public keys whose signatures are accepted, each
        /// `kid:key` (base64url), comma separated; several at once for a
        /// rotation, and a key left out is revoked.
        pub keys: SigningKeys,
        /// Refuse (and answer) every action not signed with one of `keys`.
        /// Off: unsigned actions run as before, signed ones are checked.
        pub required: bool,
        /// Clock difference allowed between signer and device for `iat`
        /// and `exp`.
        pub skew: Duration = Duration::from_secs(300),
        /// Longest validity (`exp - iat`) a signature may claim: a replay
        /// is refused as expired after it, so the ledger keeps each signed
        /// action's id this long.
        pub lifetime: Duration = Duration::from_secs(24 * 3600),
    }
}

section! {
    /// `dms.actions.*`.
    pub struct DmsActions {
        /// Actions running at once; beyond it the agent stops acknowledging,
        /// so the broker holds the rest.
        pub concurrency: u32 = 16,
    }
}

section! {
    /// `dms.ledger.*`: the durable record of DMS actions.
    pub struct DmsLedger {
        /// The SQLite file.
        pub location: ExpandPath = ExpandPath::new("$SNAP_DATA/dms.db"),
        /// `dms.ledger.max.*`.
        pub max: DmsLedgerMax,
    }
}

section! {
    /// `dms.ledger.max.*`: finished actions are pruned beyond either bound.
    pub struct DmsLedgerMax {
        /// Answered actions older than this are pruned.
        pub age: Duration = Duration::from_secs(30 * 24 * 3600),
        /// At most this many answered actions are kept.
        pub count: u64 = 10_000,
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

section! {
    /// `*.interval`.
    pub struct Every {
        /// How often.
        pub interval: Duration = Duration::from_secs(60),
    }
}

section! {
    /// `dms.change.*`.
    pub struct DmsChange {
        /// How long a change started by an action is followed for its report.
        pub timeout: Duration = Duration::from_secs(3600),
    }
}

section! {
    /// `dms.upload.*`: uploads of logs and snapshots that actions ask for.
    pub struct DmsUpload {
        /// Bound on one upload.
        pub timeout: Duration = Duration::from_secs(300),
        /// Bytes; larger log or snapshot uploads are refused.
        pub limit: u64 = 512 * 1024 * 1024,
    }
}

section! {
    /// The change history (`snaplogger.*`, the reference agent's key names).
    pub struct SnapLogger {
        /// `snaplogger.database.*`.
        pub database: SnapLoggerDatabase,
        /// `snaplogger.maximum.*`.
        pub maximum: SnapLoggerMaximum,
        /// `snaplogger.duration.*`.
        pub duration: SnapLoggerDuration,
        /// `snaplogger.log.*`.
        pub log: SnapLoggerLog,
    }
}

section! {
    /// `snaplogger.database.*`.
    pub struct SnapLoggerDatabase {
        /// The SQLite file.
        pub location: ExpandPath = ExpandPath::new("$SNAP_DATA/changes.db"),
    }
}

section! {
    /// `snaplogger.maximum.*`.
    pub struct SnapLoggerMaximum {
        /// `snaplogger.maximum.changes.*`.
        pub changes: SnapLoggerKeep,
    }
}

section! {
    /// `snaplogger.maximum.changes.*`.
    pub struct SnapLoggerKeep {
        /// Most changes kept; older ones are pruned.
        pub keep: u32 = 1000,
    }
}

section! {
    /// `snaplogger.duration.*`.
    pub struct SnapLoggerDuration {
        /// `snaplogger.duration.between.*`.
        pub between: SnapLoggerBetween,
    }
}

section! {
    /// `snaplogger.duration.between.*`.
    pub struct SnapLoggerBetween {
        /// How often snapd's changes are read when nothing wakes the poller earlier.
        pub checks: Duration = Duration::from_secs(3600),
    }
}

section! {
    /// `snaplogger.log.*`.
    pub struct SnapLoggerLog {
        /// `snaplogger.log.changes.*`.
        pub changes: SnapLoggerStartup,
        /// The level of change log lines.
        pub level: LogLevel = LogLevel::new("info"),
    }
}

section! {
    /// `snaplogger.log.changes.*`.
    pub struct SnapLoggerStartup {
        /// Log the changes already in the history at start.
        pub startup: bool = true,
    }
}

section! {
    /// The snap-change watchdog: reboots the device when a change is stuck.
    pub struct Watchdog {
        /// Reboot for stuck changes.
        pub enabled: bool = true,
        /// A change not ready whose tasks made no progress for this long
        /// (measured from when the agent first saw it) is stuck.
        pub threshold: Duration = Duration::from_secs(3600),
        /// Change kinds that are never stuck (they legitimately retry forever).
        // `become-operational` retries the device registration for as
        // long as there is no serial (no network, a classic machine).
        /// Change kinds never counted as stuck.
        pub ignore: StringList = StringList::new(&["become-operational"]),
        /// `watchdog.reboot.*`.
        pub reboot: WatchdogReboot,
        /// `watchdog.budget.*`.
        pub budget: WatchdogBudget,
        /// `watchdog.boot.*`.
        pub boot: WatchdogBoot,
    }
}

section! {
    /// At most `reboots` reboots per `window`, across agent restarts and
    /// change ids.
    pub struct WatchdogBudget {
        /// Most watchdog reboots in a window: no reboot loop.
        pub reboots: u32 = 1,
        /// The window of the budget.
        pub window: Duration = Duration::from_secs(24 * 3600),
    }
}

section! {
    /// `watchdog.boot.*`.
    pub struct WatchdogBoot {
        /// No reboot this soon after the system booted.
        pub grace: Duration = Duration::from_secs(15 * 60),
    }
}

section! {
    /// `watchdog.reboot.*`.
    pub struct WatchdogReboot {
        /// A shell command that reboots; empty means through snapd.
        pub command: String,
    }
}

section! {
    /// The export subsystem (`export.*`): store-and-forward telemetry from
    /// applications on the device to an upstream broker.
    pub struct ExportConfig {
        /// Off by default: the spool takes disk space and the upstream must be
        /// chosen by the operator.
        pub enabled: bool,
        /// Intake subject prefix on the device-local NATS: applications publish
        /// on `{subject}.{stream}`.
        pub subject: String = "export".into(),
        /// `export.spool.*`.
        pub spool: ExportSpool,
        /// `export.upstream.*`.
        pub upstream: ExportUpstream,
        /// `export.batch.*`.
        pub batch: ExportBatch,
        /// `export.status.*`.
        pub status: ExportStatus,
    }
}

section! {
    /// `export.spool.*`: the SQLite spool.
    pub struct ExportSpool {
        /// The SQLite spool (in `$SNAP_COMMON`: kept across snap revisions).
        pub path: ExpandPath = ExpandPath::new("$SNAP_COMMON/export.db"),
        /// `export.spool.max.*`.
        pub max: ExportSpoolMax,
        /// What happens when a new message does not fit.
        pub full: FullPolicy = FullPolicy::DropOldest,
    }
}

section! {
    /// `export.spool.max.*`.
    pub struct ExportSpoolMax {
        /// Bound on spooled payload and stream-name bytes.
        pub bytes: u64 = 256 * 1024 * 1024,
        /// Messages older than this are dropped (counted as expired).
        pub age: Duration = Duration::from_secs(7 * 24 * 3600),
    }
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
    /// The name as `snap set` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            FullPolicy::DropOldest => "drop-oldest",
            FullPolicy::RefuseNew => "refuse-new",
        }
    }
}

section! {
    /// `export.upstream.*`: where spooled messages go.
    pub struct ExportUpstream {
        /// `nats://`/`tls://` (JetStream) or `mqtt://`/`mqtts://` (QoS 1);
        /// empty: spool only.
        pub url: UpstreamUrl,
        /// Upstream subject (NATS) or topic (MQTT, dots become `/`) prefix.
        pub subject: String = "telemetry".into(),
        /// JetStream stream to create when missing (empty: it must exist).
        pub stream: String,
        /// The upstream user.
        pub user: String,
        /// The upstream password.
        pub password: String,
        /// Extra CA certificate (PEM) for `tls://` and `mqtts://`.
        pub ca: OptPath,
        /// MQTT client id.
        pub client: String = "iot-agent-export".into(),
        /// `export.upstream.max.*`.
        pub max: ExportUpstreamMax,
    }
}

section! {
    /// Bounds the upstream imposes that the agent cannot learn by itself.
    pub struct ExportUpstreamMax {
        /// Largest payload the upstream takes, in bytes (an MQTT broker's
        /// `message_size_limit`: MQTT 3.1.1 cannot tell it, and mosquitto
        /// acknowledges an oversized message and drops it). 0: what the
        /// upstream says (NATS `max_payload`, the stream's `max_msg_size`), 1 MiB
        /// for MQTT. Intake refuses larger messages so none can be lost or
        /// block the spool later (`crate::subsystems::export::capacity`).
        pub payload: u64,
    }
}

section! {
    /// `export.batch.*`.
    pub struct ExportBatch {
        /// Most messages committed in one spool transaction (group commit).
        pub intake: u32 = 1024,
        /// Most messages in flight to the upstream awaiting acknowledgement.
        pub forward: u32 = 2048,
    }
}

section! {
    /// `export.status.*`.
    pub struct ExportStatus {
        /// How often the status is published on the health subject.
        pub interval: Duration = Duration::from_secs(10),
    }
}

section! {
    /// The remote terminal (`terminal.*`): a shell on the device for whoever
    /// the broker lets use `iot.agent.terminal.>` (NATS) or the device's
    /// `devices/terminal/{device id}/...` topics (DMS broker).
    pub struct TerminalConfig {
        /// Off by default: a shell on the device is root on the device.
        pub enabled: bool,
        /// The shell, run as a session leader on a new PTY (`-c COMMAND` when
        /// the operator names a command).
        pub shell: String = "/bin/bash".into(),
        /// A session nobody sent anything to (input, resize, acknowledgement)
        /// for this long is closed and its processes killed.
        pub idle: Duration = Duration::from_secs(600),
        /// `terminal.sessions.*`.
        pub sessions: TerminalSessions,
    }
}

section! {
    /// `terminal.sessions.*`.
    pub struct TerminalSessions {
        /// Sessions open at once (both transports); one more is refused.
        pub max: u32 = 4,
    }
}

section! {
    /// The remote browser (`browser.*`): HTTP requests in messages, executed
    /// against allow-listed local origins.
    pub struct BrowserConfig {
        /// Off by default.
        pub enabled: bool,
        /// The origins that may be reached, `127.0.0.1:PORT` entries (comma
        /// separated); anything else is refused.
        pub allow: StringList,
        /// `browser.max.*`.
        pub max: BrowserMax,
        /// Bound on one request to the origin (connect, send, whole answer).
        pub timeout: Duration = Duration::from_secs(30),
    }
}

section! {
    /// `browser.max.*`.
    pub struct BrowserMax {
        /// Bytes; a larger response (or request) body is refused.
        pub body: u64 = 16 * 1024 * 1024,
    }
}

section! {
    /// The tunnel client (`tunnel.*`): one outbound TLS connection to an
    /// `iot-relay`, through which the relay reaches the local ports that
    /// `allow` lists; no inbound port is opened on the device.
    pub struct TunnelConfig {
        /// Off by default: the relay and the exposed ports are the
        /// operator's choice.
        pub enabled: bool,
        /// The relay's agents' port, `host:port`; `host` is the name its
        /// certificate must carry.
        pub relay: String,
        /// The CA certificate that signs the relay's certificate (a file
        /// path or the PEM text); nothing else is trusted.
        pub ca: PemSource = PemSource::None,
        /// The device certificate (PEM file) the relay verifies; its CN is
        /// the device id. Empty: the certificate `provisioning.*` obtains.
        pub cert: OptPath,
        /// The device certificate's private key (PEM file, 0600); empty
        /// with `cert`: the provisioned key.
        pub key: OptPath,
        /// The local `host:port` targets the relay may open; any other is
        /// refused. Empty: none.
        pub allow: StringList = StringList::new(&[]),
        /// How often the agent tells the relay it is alive.
        pub heartbeat: Duration = Duration::from_secs(10),
        /// A relay silent this long is dropped and the agent reconnects.
        pub threshold: Duration = Duration::from_secs(30),
        /// `host:port` to wait on for the relay to dial (relay-dials, for a
        /// device the relay can reach); empty: the agent dials
        /// `tunnel.relay`, whose host still names the relay's certificate.
        pub listen: String,
        /// `false`: plain TCP, only with `tunnel.listen` and a relay
        /// registration that says `"tls":false` too (a lab setting).
        pub tls: bool = true,
        /// The device id said over plain TCP; empty: the CN of
        /// `tunnel.cert`. With TLS it is always the certificate's CN.
        pub device: String,
        /// Announce the agent on the local network by DNS-SD over mDNS
        /// (`_iot-agent._tcp`), for `iot-relay discover`.
        pub announce: bool,
    }
}

section! {
    /// Certificate provisioning over EST (RFC 7030) with a one-time password
    /// (`provisioning.*`): the key is made on the device and never leaves
    /// it; the certificate and the CA bundle are kept in `dir`, and the
    /// tunnel uses them when `tunnel.cert` is not set.
    pub struct ProvisioningConfig {
        /// The EST server, `https://host:port` (an `iot-relay`'s `est.listen`);
        /// empty: provisioning off.
        pub url: String,
        /// An EST label (`/.well-known/est/<label>/...`); empty: none.
        pub label: String,
        /// What the EST server's certificate is checked against: the CA
        /// certificate (a file path or the PEM text), or `sha256:<hex>` of
        /// the server's own certificate (a pin). Required with `url`.
        pub ca: TrustAnchor = TrustAnchor::None,
        /// The device id: the HTTP Basic user and the certificate's CN.
        pub device: String,
        /// The one-time password for the first enrollment (`snap set` it
        /// once): removed from the snap configuration after it was used,
        /// and never used twice.
        pub otp: String,
        /// When to re-enroll: this fraction of the certificate's lifetime.
        pub renew: Fraction = Fraction::new("2/3"),
        /// The provisioned key and certificate (`device.pem`, 0600), the CA
        /// bundle (`ca.pem`) and the state (`state.json`).
        pub dir: ExpandPath = ExpandPath::new("$SNAP_DATA/provisioning"),
        /// Bound on one EST request.
        pub timeout: Duration = Duration::from_secs(30),
    }
}

impl ExportUpstream {
    /// `subject` without surrounding dots.
    pub fn upstream_prefix(&self) -> String {
        self.subject.trim_matches('.').to_string()
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
