//! Layering: built-in defaults < config file < snap configuration < environment.
//!
//! figment keeps, for every value, the provider it came from; that is what
//! `iot-agent config` shows and what error messages name.

use super::{snapctl, values, Config, Dirs};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

/// Prefix of the environment layer; `__` separates key segments.
pub const ENV_PREFIX: &str = "IOT_AGENT_";
const DEFAULTS_NAME: &str = "built-in default";

/// Keys whose values are secrets: never printed, never logged.
pub const SECRET_KEYS: &[&str] = &[
    "nats.snapd.password",
    "nats.device.password",
    "nats.operator.password",
    "nats.leaf.password",
    "export.upstream.password",
    "provisioning.otp",
];

/// Why a configuration could not be loaded; each names the key and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` names a file that does not exist.
    #[error("configuration file {0} does not exist (given with --config)")]
    FileMissing(PathBuf),
    /// A key's value does not parse as its type.
    #[error("invalid configuration value for key \"{key}\" = {value} (from {origin}): {message}")]
    Invalid {
        /// The dotted key, e.g. `dms.ledger.max.age`.
        key: String,
        /// The value as given.
        value: String,
        /// Which layer gave it.
        origin: Source,
        /// What is wrong with it.
        message: String,
    },
    /// A key the agent does not know (refused by `config --strict`).
    #[error("unknown configuration key \"{key}\" (from {origin}); {hint}")]
    Unknown {
        /// The dotted key as given.
        key: String,
        /// Which layer gave it.
        origin: Source,
        /// The known keys of the same section, so a typo is easy to fix
        /// (inside a snap there is no `iot-agent config` at hand).
        hint: String,
    },
    /// A layer could not be read at all (a file that is not TOML, say).
    #[error("cannot read the configuration{}: {message}", from.as_ref().map(|s| format!(" from {s}")).unwrap_or_default())]
    Unreadable {
        /// The layer, when it is known.
        from: Option<Source>,
        /// What went wrong.
        message: String,
    },
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum Source {
    /// The agent's built-in default.
    Default,
    /// The `--config` TOML file.
    File(PathBuf),
    /// The snap's configuration (`snap set`).
    Snap,
    /// An environment variable, by name.
    Env(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Source::Default => f.write_str("built-in default"),
            Source::File(p) => write!(f, "config file {}", p.display()),
            Source::Snap => f.write_str("snap configuration"),
            Source::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// A configuration with the layers it was built from.
pub struct Loaded {
    /// The configuration, every layer applied.
    pub config: Config,
    /// Keys that some source sets but the agent does not know, with their
    /// source. The daemon only warns about them (a key written for a newer
    /// version must not stop an older one); `config --strict`, which the
    /// snap's configure hook runs, refuses them so a typo in `snap set` is
    /// caught while the operator is still looking.
    pub unknown: Vec<(String, Source)>,
    figment: Figment,
}

/// One effective value and its source, as `iot-agent config` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Effective {
    /// The dotted key.
    pub key: String,
    /// The value in effect.
    pub value: serde_json::Value,
    /// The layer it came from.
    pub source: Source,
}

/// What to layer. `file: None` means the default file, which may be absent.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// The `--config` file.
    pub file: Option<PathBuf>,
}

/// Builds the layered configuration and checks every value.
pub fn load(opts: &LoadOptions) -> Result<Loaded, ConfigError> {
    let figment = layered(opts)?;
    // `dirs` first: the other paths expand `$SNAP_DATA`/`$SNAP_COMMON` to
    // them outside a snap.
    let dirs = figment
        .extract::<DirsOnly>()
        .map_err(|e| invalid(&figment, e))?
        .dirs;
    let mut config: Config = values::with_dirs(dirs.data.path(), dirs.common.path(), || {
        figment.extract().map_err(|e| invalid(&figment, e))
    })?;
    // The bundled server's generated passwords, where none is configured.
    crate::nats_server::resolve_generated(
        |key| {
            figment
                .find_metadata(key)
                .map(|m| source_of(m, key))
                .unwrap_or(Source::Default)
        },
        &mut config,
    );
    check_together(&figment, &config)?;
    let unknown = unknown_keys(&figment)?;
    Ok(Loaded {
        config,
        unknown,
        figment,
    })
}

/// Values that are valid alone but not together.
fn check_together(figment: &Figment, config: &Config) -> Result<(), ConfigError> {
    let signing = &config.dms.signing;
    if signing.required && signing.keys.is_empty() {
        let key = "dms.signing.required";
        return Err(ConfigError::Invalid {
            key: key.into(),
            value: "true".into(),
            origin: figment
                .find_metadata(key)
                .map(|m| source_of(m, key))
                .unwrap_or(Source::Default),
            message: "dms.signing.keys is empty, so every action would be refused: \
                      set the keys first (or together)"
                .into(),
        });
    }
    Ok(())
}

/// The `dirs` table alone (the rest of the keys are ignored here).
#[derive(serde::Deserialize)]
struct DirsOnly {
    #[serde(default)]
    dirs: Dirs,
}

fn layered(opts: &LoadOptions) -> Result<Figment, ConfigError> {
    let file = match &opts.file {
        Some(f) if !f.exists() => return Err(ConfigError::FileMissing(f.clone())),
        Some(f) => f.clone(),
        None => Config::default_file(),
    };
    let mut figment = Figment::new().merge(Named(
        Serialized::defaults(Config::default()),
        DEFAULTS_NAME,
    ));
    // The default file is optional; an explicit one was checked above.
    if file.exists() {
        figment = figment.merge(Toml::file_exact(&file));
    }
    if in_snap() {
        figment = figment.merge(snapctl::SnapCtl {
            keys: top_level_keys(),
        });
    }
    Ok(figment.merge(Env::prefixed(ENV_PREFIX).split("__")))
}

/// Running as a snap app or hook (snapctl works only there).
pub fn in_snap() -> bool {
    std::env::var_os("SNAP_NAME").is_some()
}

impl Loaded {
    /// Warnings that do not stop the agent: one per unknown key.
    pub fn warnings(&self) -> Vec<String> {
        self.unknown
            .iter()
            .map(|(key, source)| {
                format!(
                    "unknown configuration key \"{key}\" (from {source}) is ignored; \
                     run `iot-agent config` to list the known keys"
                )
            })
            .collect()
    }

    /// Refuses unknown keys (`config --strict`): the first one is the error.
    pub fn deny_unknown(&self) -> Result<(), ConfigError> {
        match self.unknown.first() {
            Some((key, origin)) => Err(ConfigError::Unknown {
                key: key.clone(),
                origin: origin.clone(),
                hint: known_near(key),
            }),
            None => Ok(()),
        }
    }

    /// A stable hash (SHA-256, hex) of the effective configuration: every
    /// value the agent reads, after layering and path expansion, and nothing
    /// about where it came from. The configure hook compares it with the last
    /// one to restart the daemon only when something it reads changed.
    pub fn fingerprint(&self) -> String {
        // serde_json writes struct fields in declaration order and maps
        // sorted: the same configuration always gives the same bytes.
        let bytes = serde_json::to_vec(&self.config).unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Every key with its effective value and source, sorted by key.
    /// Secrets are replaced by a marker.
    pub fn effective(&self) -> Vec<Effective> {
        effective_values(&self.config, SECRET_KEYS, |key| {
            self.figment
                .find_metadata(key)
                .map(|m| source_of(m, key))
                .unwrap_or(Source::Default)
        })
    }

    /// The source of one key's value.
    pub fn source(&self, key: &str) -> Source {
        self.figment
            .find_metadata(key)
            .map(|m| source_of(m, key))
            .unwrap_or(Source::Default)
    }
}

fn source_of(meta: &Metadata, key: &str) -> Source {
    if let Some(figment::Source::File(path)) = &meta.source {
        return Source::File(path.clone());
    }
    match meta.name.as_ref() {
        DEFAULTS_NAME => Source::Default,
        snapctl::NAME => Source::Snap,
        _ => Source::Env(env_var(key)),
    }
}

/// Every key of `config` (flattened to dotted keys) with its value, the
/// values of `secrets` replaced by a marker, and its source as `source`
/// tells it. The agent and the relay each name their own sources.
pub(crate) fn effective_values<T: Serialize>(
    config: &T,
    secrets: &[&str],
    source: impl Fn(&str) -> Source,
) -> Vec<Effective> {
    let value = serde_json::to_value(config).unwrap_or_default();
    let mut out = Vec::new();
    flatten_json("", &value, &mut |key, v| {
        let value = if secrets.contains(&key) {
            serde_json::Value::String("(secret, not shown)".into())
        } else {
            v.clone()
        };
        out.push(Effective {
            key: key.to_string(),
            value,
            source: source(key),
        });
    });
    out
}

/// The environment variable of a key: `a.b_c` -> `IOT_AGENT_A__B_C`.
pub fn env_var(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

/// Turns figment's error into one that names key, value and source.
fn invalid(figment: &Figment, err: figment::Error) -> ConfigError {
    // The first error is the one to fix first; figment may chain more.
    let err = err
        .into_iter()
        .next()
        .expect("an error has at least one entry");
    let key = err.path.join(".");
    let from = err.metadata.as_ref().map(|m| source_of(m, &key));
    if key.is_empty() {
        return ConfigError::Unreadable {
            from,
            message: err.kind.to_string(),
        };
    }
    if is_secret(&key) {
        // figment's text quotes the value ("found unsigned int `1234`"):
        // say only what was expected.
        let message = match &err.kind {
            figment::error::Kind::InvalidType(_, expected) => {
                format!("invalid type, expected {expected} (quote a numeric password)")
            }
            _ => "the value is not valid".to_string(),
        };
        return ConfigError::Invalid {
            origin: from.unwrap_or(Source::Default),
            key,
            value: "(secret, not shown)".into(),
            message,
        };
    }
    let value = figment
        .find_value(&key)
        .ok()
        .and_then(|v| serde_json::to_string(&v).ok())
        .unwrap_or_else(|| "(missing)".into());
    ConfigError::Invalid {
        origin: from.unwrap_or(Source::Default),
        key,
        value,
        message: err.kind.to_string(),
    }
}

/// A secret key, or a key inside one (a table given where a secret goes).
fn is_secret(key: &str) -> bool {
    SECRET_KEYS.iter().any(|s| {
        key == *s
            || key
                .strip_prefix(s)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

fn unknown_keys(figment: &Figment) -> Result<Vec<(String, Source)>, ConfigError> {
    let known: BTreeSet<String> = leaf_keys(&Config::default());
    let data = figment.data().map_err(|e| invalid(figment, e))?;
    let mut unknown = Vec::new();
    if let Some(dict) = data.get(&Profile::Default) {
        let mut seen = Vec::new();
        flatten_dict("", dict, &mut seen);
        for key in seen {
            if !known.contains(&key) {
                let source = figment
                    .find_metadata(&key)
                    .map(|m| source_of(m, &key))
                    .unwrap_or(Source::Default);
                unknown.push((key, source));
            }
        }
    }
    Ok(unknown)
}

/// The dotted keys of every leaf of a serializable value.
fn leaf_keys<T: Serialize>(v: &T) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let value = serde_json::to_value(v).unwrap_or_default();
    flatten_json("", &value, &mut |k, _| {
        keys.insert(k.to_string());
    });
    keys
}

/// The top-level keys of the namespace (what `snapctl get` is asked for).
pub fn top_level_keys() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The known keys in the top-level section of `key`, as a hint.
fn known_near(key: &str) -> String {
    let section = key.split('.').next().unwrap_or_default();
    let prefix = format!("{section}.");
    let near: Vec<String> = known_keys()
        .into_iter()
        .filter(|k| k.starts_with(&prefix))
        .collect();
    if near.is_empty() {
        "run `iot-agent config` to list the known keys".into()
    } else {
        format!("the known keys under \"{section}\" are {}", near.join(", "))
    }
}

/// Every known key of the namespace, sorted.
pub fn known_keys() -> Vec<String> {
    leaf_keys(&Config::default()).into_iter().collect()
}

/// Calls `f` with each leaf of `v` and its dotted key.
pub(crate) fn flatten_json(
    prefix: &str,
    v: &serde_json::Value,
    f: &mut dyn FnMut(&str, &serde_json::Value),
) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                flatten_json(&join(prefix, k), v, f);
            }
        }
        _ => f(prefix, v),
    }
}

fn flatten_dict(prefix: &str, dict: &Dict, out: &mut Vec<String>) {
    for (k, v) in dict {
        let key = join(prefix, k);
        match v {
            Value::Dict(_, d) => flatten_dict(&key, d, out),
            _ => out.push(key),
        }
    }
}

fn join(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_string()
    } else {
        format!("{prefix}.{k}")
    }
}

/// A provider with our own name, so sources read well in messages.
struct Named<P>(P, &'static str);

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.1)
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.0.data()
    }
}
