//! `iot-agent sign` (and `iot-relay sign`): the operator's half of signed actions. Signs an
//! action JSON for one device with a private key file, so an operator or a
//! DMS integration can publish it (README, "Signed actions"); `--keygen`
//! makes a key, `--public` prints the `dms.signing.keys` entry of one.
//!
//! It needs no configuration and no agent: it runs where the key is kept,
//! not on the device.

use crate::signing::{self, keys};
use anyhow::{bail, Context};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The options of `sign`, the same in `iot-agent sign` and `iot-relay sign`
/// (the operator's side may have either binary).
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  sign --keygen --key ops-2026.key --kid ops-2026\n  \
sign --key ops-2026.key --kid ops-2026 --aud DEVICE_ID \\\n      \
'{\"id\":\"a1\",\"action\":\"install\",\"snap\":\"hello\",\"data\":\"\"}'"
)]
pub struct SignArgs {
    /// The private key file (PKCS#8 PEM, mode 0600; `openssl genpkey
    /// -algorithm ed25519` writes one too).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The key's id, as the device knows it in dms.signing.keys.
    #[arg(long)]
    pub kid: String,
    /// Write a new key to --key (never over an existing file) and print
    /// its dms.signing.keys entry.
    #[arg(long, conflicts_with_all = ["public", "aud", "file", "action"])]
    pub keygen: bool,
    /// Print the dms.signing.keys entry of --key.
    #[arg(long, conflicts_with_all = ["aud", "file", "action"])]
    pub public: bool,
    /// The device: its device id (DMS topic) or its serial (per-serial tree).
    #[arg(long, required_unless_present_any = ["keygen", "public"])]
    pub aud: Option<String>,
    /// How long the signature stays valid (at most the device's dms.signing.lifetime).
    #[arg(long, default_value = "1h", value_name = "DURATION")]
    pub ttl: humantime::Duration,
    /// Read the action from this file.
    #[arg(long, value_name = "FILE", conflicts_with = "action")]
    pub file: Option<PathBuf>,
    /// The action JSON itself (else --file, else standard input).
    pub action: Option<String>,
}

/// Runs `sign` as its options say.
pub fn run(a: &SignArgs) -> anyhow::Result<ExitCode> {
    if a.keygen {
        return keygen(&a.key, &a.kid);
    }
    if a.public {
        return public(&a.key, &a.kid);
    }
    let from = match (&a.action, &a.file) {
        (Some(act), _) => Action::Arg(act),
        (None, Some(f)) => Action::File(f),
        (None, None) => Action::Stdin,
    };
    let aud = a.aud.as_deref().unwrap_or_default();
    sign(&a.key, &a.kid, aud, a.ttl.into(), from)
}

/// Where the action comes from.
pub enum Action<'a> {
    /// The command-line argument itself.
    Arg(&'a str),
    /// The contents of a file.
    File(&'a Path),
    /// Everything read from standard input.
    Stdin,
}

/// Writes a new key to `key` (0600; never over an existing file) and prints
/// its `dms.signing.keys` entry.
pub fn keygen(key: &Path, kid: &str) -> anyhow::Result<ExitCode> {
    keys::check_kid(kid).map_err(anyhow::Error::msg)?;
    let k = keys::generate().map_err(anyhow::Error::msg)?;
    keys::write_new_private(key, &k).map_err(anyhow::Error::msg)?;
    let entry = keys::entry(kid, &k.verifying_key());
    eprintln!(
        "wrote the private key {} (mode 0600; keep it off the devices). Its public entry \
         follows; add it to the device's keys, e.g.\n  snap set iot-agent dms.signing.keys=<the keys in use>,{entry}",
        key.display()
    );
    super::write_stdout(&format!("{entry}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the `dms.signing.keys` entry of an existing private key.
pub fn public(key: &Path, kid: &str) -> anyhow::Result<ExitCode> {
    keys::check_kid(kid).map_err(anyhow::Error::msg)?;
    let k = keys::read_private(key).map_err(anyhow::Error::msg)?;
    super::write_stdout(&format!("{}\n", keys::entry(kid, &k.verifying_key())))?;
    Ok(ExitCode::SUCCESS)
}

/// Signs the action for `aud`, valid from now for `ttl`, and prints the
/// envelope (one line of JSON: the payload to publish).
pub fn sign(
    key: &Path,
    kid: &str,
    aud: &str,
    ttl: Duration,
    action: Action,
) -> anyhow::Result<ExitCode> {
    let bytes = match action {
        Action::Arg(a) => a.as_bytes().to_vec(),
        Action::File(f) => {
            std::fs::read(f).with_context(|| format!("cannot read the action {}", f.display()))?
        }
        Action::Stdin => {
            let mut v = Vec::new();
            std::io::stdin()
                .read_to_end(&mut v)
                .context("cannot read the action from standard input")?;
            v
        }
    };
    // A file or a pipe ends with a newline the action need not carry.
    let bytes = bytes.trim_ascii_end();
    if ttl.is_zero() {
        bail!("--ttl must be longer than zero");
    }
    let k = keys::read_private(key).map_err(anyhow::Error::msg)?;
    let iat = crate::clock::now_s();
    let exp = iat.saturating_add(ttl.as_secs().max(1).min(i64::MAX as u64) as i64);
    let envelope = signing::sign(&k, kid, aud, iat, exp, bytes).map_err(anyhow::Error::msg)?;
    super::write_stdout(&format!("{envelope}\n"))?;
    Ok(ExitCode::SUCCESS)
}
