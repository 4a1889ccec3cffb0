//! Value types that check themselves while deserializing, so a bad value is
//! reported by figment together with its key and the source it came from.
//! Each error message repeats the offending value: the operator sees what
//! they typed, not only what was expected.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};

/// A duration written the humantime way: `90s`, `15m`, `1h 30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// A duration of `s` seconds (for defaults).
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    /// The duration as std's type.
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = text_value(d, "a duration such as \"90s\" or \"1h\"")?;
        humantime::parse_duration(text.trim())
            .map(Duration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write it like \"90s\", \"15m\" or \"1h\""
                ))
            })
    }
}

/// A log filter: a level (`info`) or a tracing directive (`iot_agent=debug,info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(String);

impl LogLevel {
    /// A level or `tracing` filter directive, as given.
    pub fn new(s: &str) -> Self {
        LogLevel(s.to_string())
    }
    /// The level as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for LogLevel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = text_value(d, "a log level")?;
        let trimmed = text.trim();
        let lower = trimmed.to_ascii_lowercase();
        let plain = ["off", "error", "warn", "info", "debug", "trace"].contains(&lower.as_str());
        // A bare word that is not a level would be taken by tracing as a
        // target name and silently filter everything: refuse it.
        let directive = trimmed.contains('=') || trimmed.contains(',');
        if plain {
            return Ok(LogLevel(lower));
        }
        if directive && tracing_subscriber::EnvFilter::try_new(trimmed).is_ok() {
            return Ok(LogLevel(trimmed.to_string()));
        }
        Err(de::Error::custom(format!(
            "invalid log level {text:?}: use error, warn, info, debug or trace"
        )))
    }
}

/// A list of words: a TOML/JSON array, or one comma-separated string (what
/// an environment variable or a plain `snap set key=a,b` gives).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StringList(Vec<String>);

impl StringList {
    /// A list of the given items (for defaults).
    pub fn new(items: &[&str]) -> Self {
        StringList(items.iter().map(|s| s.to_string()).collect())
    }
    /// The items, in the order given.
    pub fn items(&self) -> &[String] {
        &self.0
    }
    /// Whether `item` is one of the items.
    pub fn contains(&self, item: &str) -> bool {
        self.0.iter().any(|s| s == item)
    }
}

impl Serialize for StringList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of words, or one comma-separated string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringList, E> {
                Ok(StringList(
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                ))
            }
            // One number alone (`IOT_RELAY_PIPES__PORTS=30000`) arrives as one.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StringList, E> {
                Ok(StringList(vec![v.to_string()]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StringList, E> {
                Ok(StringList(vec![v.to_string()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    let item = item.trim();
                    if !item.is_empty() {
                        out.push(item.to_string());
                    }
                }
                Ok(StringList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Ed25519 public keys with their ids (`dms.signing.keys`): entries
/// `kid:key` (the key in base64url), as a TOML/JSON array or one
/// comma-separated string, so `snap set iot-agent
/// dms.signing.keys=ops-1:KEY1,ops-2:KEY2` works; setting it without a key
/// revokes that key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SigningKeys(Vec<(String, ed25519_dalek::VerifyingKey)>);

impl SigningKeys {
    /// The keys, in the order given.
    pub fn entries(&self) -> &[(String, ed25519_dalek::VerifyingKey)] {
        &self.0
    }
    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for SigningKeys {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entries: Vec<String> = self
            .0
            .iter()
            .map(|(kid, k)| crate::signing::keys::entry(kid, k))
            .collect();
        entries.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SigningKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let words = StringList::deserialize(d)?;
        let mut out: Vec<(String, ed25519_dalek::VerifyingKey)> = Vec::new();
        for w in words.items() {
            let (kid, key) = crate::signing::keys::parse_entry(w).map_err(de::Error::custom)?;
            if out.iter().any(|(k, _)| *k == kid) {
                return Err(de::Error::custom(format!(
                    "key id {kid:?} is given twice; each key needs its own id"
                )));
            }
            out.push((kid, key));
        }
        Ok(SigningKeys(out))
    }
}

/// An `http://` or `https://` base URL (the identity service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrl(String);

impl ServiceUrl {
    /// The URL, without a trailing `/`.
    pub fn new(s: &str) -> Self {
        ServiceUrl(s.trim_end_matches('/').to_string())
    }
    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Joins an absolute path such as `/v1/device/enroll` onto the base URL.
    pub fn join(&self, path: &str) -> String {
        format!("{}{}", self.0, path)
    }
}

impl Serialize for ServiceUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ServiceUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = text_value(d, "a URL")?;
        let bad = |why: &str| de::Error::custom(format!("invalid URL {text:?}: {why}"));
        let uri: http::Uri = text.trim().parse().map_err(|_| bad("it does not parse"))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(bad("it must start with http:// or https://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("it has no host"));
        }
        Ok(ServiceUrl::new(text.trim()))
    }
}

/// One or more NATS server URLs, comma separated (`nats://host:4222`, `tls://..`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl(String);

impl NatsUrl {
    /// The URL list as given.
    pub fn new(s: &str) -> Self {
        NatsUrl(s.to_string())
    }
    /// The URL list as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The parsed server addresses (validated at deserialization).
    pub fn servers(&self) -> Vec<async_nats::ServerAddr> {
        self.0
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }
}

impl Serialize for NatsUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NatsUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = text_value(d, "a NATS URL")?;
        for part in text.split(',') {
            part.trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| de::Error::custom(format!("invalid NATS URL {part:?}: {e}")))?;
        }
        Ok(NatsUrl(text))
    }
}

/// The export upstream: `nats://` or `tls://` (JetStream), `mqtt://` or
/// `mqtts://` (MQTT QoS 1), one `host:port`; empty means "spool only".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UpstreamUrl(String);

/// The transport an [`UpstreamUrl`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// A NATS server (`nats://`, or `tls://` with TLS).
    Nats {
        /// Whether the URL asks for TLS.
        tls: bool,
    },
    /// An MQTT broker (`mqtt://`, or `mqtts://` with TLS).
    Mqtt {
        /// Whether the URL asks for TLS.
        tls: bool,
    },
}

impl UpstreamUrl {
    /// The URL, trimmed.
    pub fn new(s: &str) -> Self {
        UpstreamUrl(s.trim().to_string())
    }
    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Whether an upstream is configured.
    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
    /// The transport, or `None` when unset.
    pub fn kind(&self) -> Option<UpstreamKind> {
        let (scheme, _) = self.0.split_once("://")?;
        match scheme {
            "nats" => Some(UpstreamKind::Nats { tls: false }),
            "tls" => Some(UpstreamKind::Nats { tls: true }),
            "mqtt" => Some(UpstreamKind::Mqtt { tls: false }),
            "mqtts" => Some(UpstreamKind::Mqtt { tls: true }),
            _ => None,
        }
    }
    /// Host and port (the port defaults to the scheme's usual one).
    pub fn host_port(&self) -> Option<(String, u16)> {
        let uri: http::Uri = self.0.parse().ok()?;
        let host = uri.host().filter(|h| !h.is_empty())?.to_string();
        let default = match self.kind()? {
            UpstreamKind::Nats { .. } => 4222,
            UpstreamKind::Mqtt { tls: false } => 1883,
            UpstreamKind::Mqtt { tls: true } => 8883,
        };
        Some((host, uri.port_u16().unwrap_or(default)))
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = text_value(d, "an upstream URL")?;
        let url = UpstreamUrl::new(&text);
        if !url.is_set() {
            return Ok(url);
        }
        if url.kind().is_none() {
            return Err(de::Error::custom(format!(
                "invalid upstream URL {text:?}: use nats://, tls://, mqtt:// or mqtts://"
            )));
        }
        if url.host_port().is_none() {
            return Err(de::Error::custom(format!(
                "invalid upstream URL {text:?}: it needs a host (and optionally a port)"
            )));
        }
        Ok(url)
    }
}

/// A path in which environment variables are expanded (`$SNAP_DATA/changes.db`).
///
/// Outside a snap, `$SNAP_DATA` and `$SNAP_COMMON` stand for the configured
/// `dirs.data` and `dirs.common`, so one default works in both worlds. The
/// expanded path must be absolute: a relative path would silently depend on
/// the directory the agent was started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandPath {
    raw: String,
    path: PathBuf,
}

impl ExpandPath {
    /// An unexpanded path (used for defaults; deserialization expands).
    pub fn new(raw: &str) -> Self {
        ExpandPath {
            raw: raw.to_string(),
            path: PathBuf::from(raw),
        }
    }
    /// Expands and checks a configured value.
    fn from_raw(raw: String) -> Result<Self, String> {
        let expanded = expand(&raw)?;
        if !expanded.is_absolute() {
            return Err(format!(
                "invalid path {raw:?}: it must be absolute (expanded to {expanded:?})"
            ));
        }
        Ok(ExpandPath {
            raw,
            path: expanded,
        })
    }

    /// The expanded path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The value as written, before expansion.
    pub fn raw(&self) -> &str {
        &self.raw
    }
}

impl Serialize for ExpandPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.path.to_string_lossy())
    }
}

impl<'de> Deserialize<'de> for ExpandPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = text_value(d, "a path")?;
        ExpandPath::from_raw(raw).map_err(de::Error::custom)
    }
}

/// An optional path: the empty string means "not set".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OptPath(Option<ExpandPath>);

impl OptPath {
    /// The path, with `$SNAP*` expanded, when set.
    pub fn path(&self) -> Option<&Path> {
        self.0.as_ref().map(ExpandPath::path)
    }
}

impl Serialize for OptPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(p) => p.serialize(s),
            None => s.serialize_str(""),
        }
    }
}

impl<'de> Deserialize<'de> for OptPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = text_value(d, "a path")?;
        if raw.trim().is_empty() {
            return Ok(OptPath(None));
        }
        ExpandPath::from_raw(raw)
            .map(|p| OptPath(Some(p)))
            .map_err(de::Error::custom)
    }
}

/// A PEM value given either as a file path or as the PEM text itself, so
/// `snap set iot-agent dms.ca="$(cat ca.crt)"` works as well as a path. The
/// empty string means "not set". Inline text is checked to be PEM
/// certificates when the configuration is read; a file when it is used.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PemSource {
    /// Not set.
    #[default]
    None,
    /// PEM text given in the value itself.
    Inline(String),
    /// A file holding PEM text.
    File(ExpandPath),
}

impl PemSource {
    /// Whether certificates are configured.
    pub fn is_set(&self) -> bool {
        !matches!(self, PemSource::None)
    }
}

impl Serialize for PemSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PemSource::None => s.serialize_str(""),
            PemSource::Inline(t) => s.serialize_str(t),
            PemSource::File(p) => p.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for PemSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = text_value(d, "a path or PEM text")?;
        let text = raw.trim();
        if text.is_empty() {
            return Ok(PemSource::None);
        }
        if text.contains("-----BEGIN") {
            crate::tls::certs_from_pem(text, "the PEM text").map_err(de::Error::custom)?;
            return Ok(PemSource::Inline(text.to_string()));
        }
        ExpandPath::from_raw(raw)
            .map(PemSource::File)
            .map_err(|e| de::Error::custom(format!("{e} (or give the PEM text itself)")))
    }
}

/// What a client trusts for one server: a CA (a file path or the PEM
/// text, as [`PemSource`]) or a `sha256:` pin of the server's own
/// certificate (64 hex digits; `:` separators, as `openssl x509
/// -fingerprint -sha256` prints them, are accepted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TrustAnchor {
    /// Not set: the system's roots.
    #[default]
    None,
    /// Certificates to trust.
    Pem(PemSource),
    /// The SHA-256 of the one certificate to accept.
    Pin([u8; 32]),
}

impl TrustAnchor {
    /// Whether an anchor is configured.
    pub fn is_set(&self) -> bool {
        !matches!(self, TrustAnchor::None)
    }
}

impl Serialize for TrustAnchor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TrustAnchor::None => s.serialize_str(""),
            TrustAnchor::Pem(p) => p.serialize(s),
            TrustAnchor::Pin(pin) => {
                let hex: String = pin.iter().map(|b| format!("{b:02x}")).collect();
                s.serialize_str(&format!("sha256:{hex}"))
            }
        }
    }
}

impl<'de> Deserialize<'de> for TrustAnchor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = text_value(d, "a CA file path, PEM text or sha256:<hex>")?;
        let text = raw.trim();
        if text.is_empty() {
            return Ok(TrustAnchor::None);
        }
        if let Some(hex) = text
            .strip_prefix("sha256:")
            .or_else(|| text.strip_prefix("SHA256:"))
        {
            let digits: String = hex.chars().filter(|c| *c != ':').collect();
            let bytes: Option<Vec<u8>> = (digits.len() == 64 && digits.is_ascii())
                .then(|| {
                    (0..32)
                        .map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).ok())
                        .collect()
                })
                .flatten();
            return match bytes {
                Some(b) => Ok(TrustAnchor::Pin(b.try_into().expect("32 bytes"))),
                None => Err(de::Error::custom(format!(
                    "invalid pin {text:?}: write sha256: and the 64 hex digits of the server \
                     certificate's SHA-256 (openssl x509 -noout -fingerprint -sha256)"
                ))),
            };
        }
        PemSource::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(text))
            .map(TrustAnchor::Pem)
    }
}

/// A fraction of something (a certificate's lifetime): `2/3`, `0.75` or
/// `75%`, more than 0 and less than 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Fraction {
    raw: String,
    value: f64,
}

impl Fraction {
    /// A fraction from its text (for defaults; panics on a bad literal).
    pub fn new(raw: &str) -> Self {
        Fraction {
            raw: raw.to_string(),
            value: Self::parse(raw).expect("a valid default fraction"),
        }
    }
    /// The fraction, in 0..=1.
    pub fn get(&self) -> f64 {
        self.value
    }
    fn parse(raw: &str) -> Result<f64, String> {
        let t = raw.trim();
        let v = if let Some(p) = t.strip_suffix('%') {
            p.trim().parse::<f64>().map(|v| v / 100.0).ok()
        } else if let Some((a, b)) = t.split_once('/') {
            match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
                (Ok(a), Ok(b)) if b != 0.0 => Some(a / b),
                _ => None,
            }
        } else {
            t.parse::<f64>().ok()
        };
        match v {
            Some(v) if v > 0.0 && v < 1.0 => Ok(v),
            _ => Err(format!(
                "invalid fraction {raw:?}: write it like \"2/3\", \"0.75\" or \"75%\" (more than 0, less than 1)"
            )),
        }
    }
}

impl Serialize for Fraction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = text_value(d, "a fraction such as \"2/3\" or \"75%\"")?;
        let value = Fraction::parse(&raw).map_err(de::Error::custom)?;
        Ok(Fraction { raw, value })
    }
}

thread_local! {
    /// `dirs.data` and `dirs.common` while the rest of the configuration is
    /// extracted (set by [`with_dirs`]): `$SNAP_DATA`/`$SNAP_COMMON` fall
    /// back to them outside a snap.
    static DIRS: RefCell<Option<(PathBuf, PathBuf)>> = const { RefCell::new(None) };
}

/// Runs `f` with `$SNAP_DATA`/`$SNAP_COMMON` standing for `data`/`common`
/// wherever the real variables are unset.
pub(crate) fn with_dirs<T>(data: &Path, common: &Path, f: impl FnOnce() -> T) -> T {
    DIRS.with(|d| *d.borrow_mut() = Some((data.to_path_buf(), common.to_path_buf())));
    let out = f();
    DIRS.with(|d| *d.borrow_mut() = None);
    out
}

fn expand(raw: &str) -> Result<PathBuf, String> {
    let lookup = |name: &str| -> Result<Option<String>, String> {
        if let Ok(v) = std::env::var(name) {
            return Ok(Some(v));
        }
        let fallback = DIRS.with(|d| {
            d.borrow().as_ref().and_then(|(data, common)| match name {
                "SNAP_DATA" => Some(data.to_string_lossy().into_owned()),
                "SNAP_COMMON" => Some(common.to_string_lossy().into_owned()),
                _ => None,
            })
        });
        match fallback {
            Some(v) => Ok(Some(v)),
            None => Err(format!("environment variable ${name} is not set")),
        }
    };
    shellexpand::env_with_context(raw, lookup)
        .map(|s| PathBuf::from(s.as_ref()))
        .map_err(|e| format!("cannot expand path {raw:?}: {}", e.cause))
}

/// Reads a scalar as text. Snap configuration and environment variables type
/// values loosely (`90` arrives as a number), so numbers are accepted here
/// and judged by the caller's parser, which names the value.
fn text_value<'de, D: Deserializer<'de>>(d: D, what: &'static str) -> Result<String, D::Error> {
    struct V(&'static str);
    impl de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V(what))
}

#[cfg(test)]
mod tests {

    #[test]
    fn trust_anchors_take_a_pin_with_or_without_colons_and_refuse_a_short_one() {
        let parse = |v: &str| serde_json::from_value::<TrustAnchor>(serde_json::json!(v));
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(
            parse(&format!("sha256:{hex}")).unwrap(),
            TrustAnchor::Pin([0xab; 32])
        );
        assert_eq!(
            parse(&format!("sha256:{colons}")).unwrap(),
            TrustAnchor::Pin([0xab; 32])
        );
        let e = parse("sha256:abcd").unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        assert_eq!(parse("").unwrap(), TrustAnchor::None);
        assert!(matches!(
            parse("/etc/ca.pem").unwrap(),
            TrustAnchor::Pem(PemSource::File(_))
        ));
        let pin = TrustAnchor::Pin([1; 32]);
        let text = serde_json::to_value(&pin).unwrap();
        assert_eq!(serde_json::from_value::<TrustAnchor>(text).unwrap(), pin);
    }

    #[test]
    fn fractions_as_ratio_decimal_or_percent() {
        let parse = |v: &str| serde_json::from_value::<Fraction>(serde_json::json!(v));
        assert!((parse("2/3").unwrap().get() - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(parse("0.5").unwrap().get(), 0.5);
        assert_eq!(parse("75%").unwrap().get(), 0.75);
        for bad in ["0", "1", "3/2", "x", "1/0", "150%"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
    use super::*;

    fn de<T: for<'a> Deserialize<'a>>(v: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn durations_are_humantime_and_errors_name_the_value() {
        let d: Duration = de(serde_json::json!("1h 30m")).unwrap();
        assert_eq!(d.get().as_secs(), 5400);
        let err = de::<Duration>(serde_json::json!("soon")).unwrap_err();
        assert!(err.contains("\"soon\""), "{err}");
        // A bare number has no unit: refused, with the number in the message.
        let err = de::<Duration>(serde_json::json!(90)).unwrap_err();
        assert!(err.contains("\"90\""), "{err}");
    }

    #[test]
    fn log_levels_accept_levels_and_directives_only() {
        assert_eq!(
            de::<LogLevel>(serde_json::json!("DEBUG")).unwrap().as_str(),
            "debug"
        );
        assert!(de::<LogLevel>(serde_json::json!("iot_agent=trace,warn")).is_ok());
        let err = de::<LogLevel>(serde_json::json!("loud")).unwrap_err();
        assert!(err.contains("\"loud\""), "{err}");
    }

    #[test]
    fn service_urls_need_http_and_a_host() {
        assert_eq!(
            de::<ServiceUrl>(serde_json::json!("https://id.example.com/"))
                .unwrap()
                .join("/v1/x"),
            "https://id.example.com/v1/x"
        );
        assert!(de::<ServiceUrl>(serde_json::json!("ftp://x")).is_err());
        assert!(de::<ServiceUrl>(serde_json::json!("not a url")).is_err());
    }

    #[test]
    fn string_lists_come_as_arrays_or_comma_separated_text() {
        let l: StringList = de(serde_json::json!(["a", " b "])).unwrap();
        assert_eq!(l.items(), ["a", "b"]);
        let l: StringList = de(serde_json::json!("a, b,,c")).unwrap();
        assert_eq!(l.items(), ["a", "b", "c"]);
        let l: StringList = de(serde_json::json!("")).unwrap();
        assert!(l.items().is_empty());
        assert!(de::<StringList>(serde_json::json!([1])).is_err());
    }

    #[test]
    fn nats_urls_are_checked_one_by_one() {
        assert!(de::<NatsUrl>(serde_json::json!("nats://a:4222, tls://b:4443")).is_ok());
        let err = de::<NatsUrl>(serde_json::json!("nats://a:4222,http://b")).unwrap_err();
        assert!(err.contains("http://b"), "{err}");
    }

    #[test]
    fn upstream_urls_name_their_transport() {
        let u: UpstreamUrl = de(serde_json::json!("mqtts://broker.example:8884")).unwrap();
        assert_eq!(u.kind(), Some(UpstreamKind::Mqtt { tls: true }));
        assert_eq!(u.host_port(), Some(("broker.example".into(), 8884)));
        let u: UpstreamUrl = de(serde_json::json!("nats://127.0.0.1")).unwrap();
        assert_eq!(u.host_port(), Some(("127.0.0.1".into(), 4222)));
        assert!(!de::<UpstreamUrl>(serde_json::json!("")).unwrap().is_set());
        let err = de::<UpstreamUrl>(serde_json::json!("http://x")).unwrap_err();
        assert!(err.contains("http://x"), "{err}");
    }

    #[test]
    fn paths_expand_snap_variables_from_the_configured_dirs() {
        let p: ExpandPath = with_dirs(Path::new("/d"), Path::new("/c"), || {
            de(serde_json::json!("$SNAP_DATA/changes.db"))
        })
        .unwrap();
        if std::env::var_os("SNAP_DATA").is_none() {
            assert_eq!(p.path(), Path::new("/d/changes.db"));
        }
        assert_eq!(p.raw(), "$SNAP_DATA/changes.db");
        let err = de::<ExpandPath>(serde_json::json!("$NO_SUCH_VAR_X/y")).unwrap_err();
        assert!(err.contains("NO_SUCH_VAR_X"), "{err}");
        let err = de::<ExpandPath>(serde_json::json!("relative/path")).unwrap_err();
        assert!(err.contains("absolute"), "{err}");
    }
}
