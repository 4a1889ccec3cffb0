//! The relay's configuration, layered like the agent's: built-in defaults
//! < TOML file (`--config`, default `$SNAP_DATA/relay.toml` in a snap,
//! `/etc/iot-relay/config.toml` outside) < environment (`IOT_RELAY_A__B`).
//! `iot-relay config` prints every key with its value and source.

use crate::config::layers::{effective_values, flatten_json, ConfigError, Effective, Source};
use crate::config::{section, Duration, ExpandPath, LogLevel, OptPath, PemSource, StringList};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Environment variables that set the relay's keys start with this.
pub const ENV_PREFIX: &str = "IOT_RELAY_";
const DEFAULTS_NAME: &str = "built-in default";
/// Keys never printed or logged.
pub const SECRET_KEYS: &[&str] = &["api.token", "nats.password"];

section! {
    /// Every setting of the relay.
    pub struct RelayConfig {
        /// `agents.*`: the port agents dial.
        pub agents: AgentsConfig,
        /// `api.*`: the admin and mapping API.
        pub api: ApiConfig,
        /// `pipes.*`: the ports pipes get.
        pub pipes: PipesConfig,
        /// ioFog's `dev`: the mapping API over plain HTTP instead of HTTPS.
        pub dev: bool,
        /// The relay's database (SQLite, 0600): the mappings (pipes, ports,
        /// passcodes), the accept filter, the agents the relay dials and
        /// the OTP hashes, kept across restarts so agents and visitors find
        /// their pipes on the same ports.
        pub db: ExpandPath = ExpandPath::new("$SNAP_DATA/relay.db"),
        /// Only an import source: the mappings file of earlier relays,
        /// imported into `db` once and renamed to `<file>.imported`.
        pub state: ExpandPath = ExpandPath::new("$SNAP_DATA/mappings.json"),
        /// Only an import source: the accept filter and relay-dials file of
        /// earlier relays, imported into `db` once.
        pub registry: ExpandPath = ExpandPath::new("$SNAP_DATA/registry.json"),
        /// This relay's name among relays sharing a registry (`nats.url`):
        /// letters, digits, `-`, `_`; empty: the host name's first label.
        pub id: String,
        /// `nats.*`: status events and the shared registry.
        pub nats: RelayNats,
        /// `log.*`.
        pub log: RelayLog,
        /// `ca.*`: the relay's device CA.
        pub ca: CaConfig,
        /// `est.*`: certificate enrollment.
        pub est: EstConfig,
        /// `otp.*`: one-time passwords for first enrollment.
        pub otp: OtpConfig,
    }
}

section! {
    /// The relay's device CA: it signs the certificates EST issues, and
    /// the agents' port trusts it. Created on first start when both files
    /// are missing (the key 0600).
    pub struct CaConfig {
        /// The CA certificate (created on first start).
        pub cert: ExpandPath = ExpandPath::new("$SNAP_DATA/ca/ca.pem"),
        /// The CA key (0600, created on first start).
        pub key: ExpandPath = ExpandPath::new("$SNAP_DATA/ca/ca.key"),
    }
}

section! {
    /// The EST server (RFC 7030) under `/.well-known/est/`: HTTPS; a TLS
    /// client certificate is asked for but optional (re-enrollment needs it).
    pub struct EstConfig {
        /// Off: no EST port (device certificates come from elsewhere).
        pub enabled: bool = true,
        /// Address of the EST port.
        pub listen: String = "0.0.0.0:7002".into(),
        /// Its HTTPS certificate and key; empty: `agents.cert`/`agents.key`.
        pub cert: OptPath,
        /// Its HTTPS key.
        pub key: OptPath,
        /// How long an issued device certificate is valid.
        pub lifetime: Duration = Duration::from_secs(30 * 24 * 3600),
        /// More than 0s: a device's enrollment is answered `202 Accepted`
        /// with `Retry-After` this long first (manual approval, a slow CA);
        /// the OTP is not used until the retry is served.
        pub defer: Duration = Duration::from_secs(0),
        /// Refuse a CSR that does not carry the TLS connection's channel
        /// binding (RFC 9266 tls-exporter as its challengePassword; the
        /// agent always sends it, curl/openssl and strongSwan do not).
        pub require_binding: bool,
    }
}

section! {
    /// One-time passwords for first enrollment (`POST /api/v2/otp`).
    pub struct OtpConfig {
        /// How long an OTP is valid when the request gives no `expiry`.
        pub expiry: Duration = Duration::from_secs(24 * 3600),
        /// The longest `expiry` a request may ask for.
        pub max: Duration = Duration::from_secs(30 * 24 * 3600),
        /// Only an import source: the OTP file of earlier relays (only
        /// hashes), imported into `db` once; OTPs are kept in `db`.
        pub state: ExpandPath = ExpandPath::new("$SNAP_DATA/otps.json"),
    }
}

section! {
    /// The agents' port: TLS, each agent presents its device certificate.
    pub struct AgentsConfig {
        /// Address of the agents' port.
        pub listen: String = "0.0.0.0:7000".into(),
        /// The relay's certificate chain and key (PEM files).
        pub cert: OptPath,
        /// The relay's key.
        pub key: OptPath,
        /// Another CA that signs device certificates (a file path or the
        /// PEM text), trusted besides the relay's own (`ca.cert`); an agent
        /// without a certificate one of them signed is refused.
        pub ca: PemSource = PemSource::None,
        /// How often the relay tells each agent it is alive.
        pub heartbeat: Duration = Duration::from_secs(10),
        /// An agent silent this long is dropped (its visitors reset).
        pub threshold: Duration = Duration::from_secs(30),
    }
}

section! {
    /// The mapping API (ioFog's `/api/v2/mapping/*`).
    pub struct ApiConfig {
        /// Address of the admin API.
        pub listen: String = "127.0.0.1:7001".into(),
        /// Its HTTPS certificate and key; empty: `agents.cert`/`agents.key`.
        pub cert: OptPath,
        /// Its HTTPS key.
        pub key: OptPath,
        /// The bearer token every request must carry (required).
        pub token: String,
    }
}

section! {
    /// The ports pipes are given, ioFog's `ports` and `exclude`.
    pub struct PipesConfig {
        /// Address the pipe ports listen on.
        pub bind: String = "0.0.0.0".into(),
        /// Ranges (`30000-39999`) and single ports.
        pub ports: StringList = StringList::new(&["30000-39999"]),
        /// Ports never given out.
        pub exclude: StringList = StringList::new(&[]),
    }
}

section! {
    /// Where status events go besides the admin API's stream.
    pub struct RelayNats {
        /// A NATS server (`nats://host:port`); empty: no NATS. Each status
        /// event is published on `relay.status.{deviceId}`.
        pub url: String,
        /// The NATS user.
        pub user: String,
        /// The NATS password.
        pub password: String,
        /// How often a relay re-writes the agents it holds in the shared
        /// registry; an entry not re-written for 3 times this is taken as
        /// left by a relay that is gone.
        pub refresh: Duration = Duration::from_secs(10),
    }
}

section! {
    /// `log.*`.
    pub struct RelayLog {
        /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter directive.
        pub level: LogLevel = LogLevel::new("info"),
    }
}

/// The configuration and where each value came from.
pub struct LoadedRelay {
    /// The configuration, every layer applied.
    pub config: RelayConfig,
    figment: Figment,
}

fn default_file() -> PathBuf {
    match std::env::var_os("SNAP_DATA") {
        Some(d) => Path::new(&d).join("relay.toml"),
        None => PathBuf::from("/etc/iot-relay/config.toml"),
    }
}

/// Layers and checks the configuration.
pub fn load(file: Option<PathBuf>) -> Result<LoadedRelay, ConfigError> {
    let file = match file {
        Some(f) if !f.exists() => return Err(ConfigError::FileMissing(f)),
        Some(f) => f,
        None => default_file(),
    };
    let mut figment = Figment::new().merge(Named(
        Serialized::defaults(RelayConfig::default()),
        DEFAULTS_NAME,
    ));
    if file.exists() {
        figment = figment.merge(Toml::file_exact(&file));
    }
    figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
    // `$SNAP_DATA` outside a snap: the relay's system directory.
    let dir = Path::new("/var/lib/iot-relay");
    let config = crate::config::values::with_dirs(dir, dir, || {
        figment
            .extract::<RelayConfig>()
            .map_err(|e| invalid(&figment, e))
    })?;
    Ok(LoadedRelay { config, figment })
}

/// figment's first error, naming key, value (unless secret) and source.
fn invalid(figment: &Figment, e: figment::Error) -> ConfigError {
    let e = e.into_iter().next().expect("an error has an entry");
    let key = e.path.join(".");
    let value = if SECRET_KEYS.contains(&key.as_str()) {
        "(secret, not shown)".into()
    } else {
        figment
            .find_value(&key)
            .ok()
            .and_then(|v| serde_json::to_string(&v).ok())
            .unwrap_or_else(|| "(missing)".into())
    };
    ConfigError::Invalid {
        origin: e
            .metadata
            .as_ref()
            .map(|m| source_of(m, &key))
            .unwrap_or(Source::Default),
        value,
        key,
        message: e.kind.to_string(),
    }
}

impl LoadedRelay {
    /// Every key, its value (secrets hidden) and source, sorted by key.
    pub fn effective(&self) -> Vec<Effective> {
        let mut out = effective_values(&self.config, SECRET_KEYS, |key| {
            self.figment
                .find_metadata(key)
                .map(|m| source_of(m, key))
                .unwrap_or(Source::Default)
        });
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

fn source_of(meta: &figment::Metadata, key: &str) -> Source {
    if let Some(figment::Source::File(path)) = &meta.source {
        return Source::File(path.clone());
    }
    match meta.name.as_ref() {
        DEFAULTS_NAME => Source::Default,
        _ => Source::Env(format!(
            "{ENV_PREFIX}{}",
            key.to_ascii_uppercase().replace('.', "__")
        )),
    }
}

/// A provider with our own name, so sources read well.
struct Named<P>(P, &'static str);

impl<P: figment::Provider> figment::Provider for Named<P> {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.1)
    }
    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.0.data()
    }
}

/// Every key of the relay's namespace, sorted (the README's table lists
/// exactly these).
pub fn known_keys() -> Vec<String> {
    let value = serde_json::to_value(RelayConfig::default()).unwrap_or_default();
    let mut keys = Vec::new();
    flatten_json("", &value, &mut |k, _| keys.push(k.to_string()));
    keys.sort();
    keys
}

/// The ports of `pipes.ports` minus `pipes.exclude`, in order.
pub fn port_pool(p: &PipesConfig) -> Result<Vec<u16>, String> {
    let parse = |list: &StringList| -> Result<Vec<u16>, String> {
        let mut out = Vec::new();
        for item in list.items() {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b): (u16, u16) = match (a.trim().parse(), b.trim().parse()) {
                (Ok(a), Ok(b)) if a <= b && a > 0 => (a, b),
                _ => return Err(format!("{item:?} is not a port or a range a-b")),
            };
            out.extend(a..=b);
        }
        Ok(out)
    };
    let exclude = parse(&p.exclude).map_err(|e| format!("pipes.exclude: {e}"))?;
    Ok(parse(&p.ports)
        .map_err(|e| format!("pipes.ports: {e}"))?
        .into_iter()
        .filter(|p| !exclude.contains(p))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_pool_is_ranges_minus_exclusions() {
        let p = PipesConfig {
            ports: StringList::new(&["6000-6001", "7000-7002"]),
            exclude: StringList::new(&["7001"]),
            ..Default::default()
        };
        assert_eq!(port_pool(&p).unwrap(), vec![6000, 6001, 7000, 7002]);
        let bad = PipesConfig {
            ports: StringList::new(&["9-1"]),
            ..Default::default()
        };
        assert!(port_pool(&bad).unwrap_err().contains("pipes.ports"));
    }
}
