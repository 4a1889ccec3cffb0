//! The snap configuration layer: what operators set with `snap set`.
//!
//! `snapctl get` refuses to run without keys ("get which option?"), so the
//! agent asks for each top-level key it knows; keys snapd does not have are
//! simply absent from the answer. `-d` makes the answer a JSON document even
//! for one key.

use figment::value::{Dict, Map};
use figment::{Error, Metadata, Profile, Provider};
use std::process::Command;

pub(super) const NAME: &str = "snap configuration";

pub(super) struct SnapCtl {
    pub keys: Vec<String>,
}

impl Provider for SnapCtl {
    fn metadata(&self) -> Metadata {
        Metadata::named(NAME)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let out = Command::new("snapctl")
            .arg("get")
            .arg("-d")
            .args(&self.keys)
            .output()
            .map_err(|e| Error::from(format!("cannot run snapctl get: {e}")))?;
        if !out.status.success() {
            return Err(Error::from(format!(
                "snapctl get failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let dict: Dict = if text.trim().is_empty() {
            Dict::new()
        } else {
            serde_json::from_str(&text)
                .map_err(|e| Error::from(format!("snapctl get answered invalid JSON: {e}")))?
        };
        Ok(Profile::Default.collect(dict))
    }
}
