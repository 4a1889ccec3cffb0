//! `iot-agent sign`: the operator's half of signed actions. Signs an
//! action JSON for one device with a private key file, so an operator or a
//! DMS integration can publish it (README, "Signed actions"); `--keygen`
//! makes a key, `--public` prints the `dms.signing.keys` entry of one.
//!
//! It needs no configuration and no agent: it runs where the key is kept,
//! not on the device.

use crate::signing::{self, keys};
use anyhow::{bail, Context};
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// Where the action comes from.
pub enum Action<'a> {
    Arg(&'a str),
    File(&'a Path),
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
