//! What the operator set through the admin API and the relay must not
//! forget on a restart: the accept filter and the agents it dials. One
//! JSON file (`registry`, 0600, written atomically), read at start.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;

/// Which devices that dial in the relay takes. Nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    /// Accept every device whose certificate the agents' port trusts.
    #[serde(default)]
    pub allow_all: bool,
    /// The devices accepted.
    #[serde(default)]
    pub device_ids: BTreeSet<String>,
}

impl Filter {
    /// Whether `device` may connect.
    pub fn allows(&self, device: &str) -> bool {
        self.allow_all || self.device_ids.contains(device)
    }
}

/// An agent the relay dials and keeps connected (relay-dials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registration {
    /// The device that listens.
    pub device_id: String,
    /// `host:port` of the agent's `tunnel.listen`.
    pub address: String,
    /// `false` only when the operator said so: plain TCP, a lab setting.
    #[serde(default = "yes")]
    pub tls: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    #[serde(default)]
    accept_filter: Filter,
    #[serde(default)]
    agents: Vec<Registration>,
}

/// The registry file and its contents in memory.
pub struct Registry {
    path: PathBuf,
    saved: Mutex<Saved>,
}

impl Registry {
    /// Reads the file; a missing file is an empty registry.
    pub fn load(path: PathBuf) -> anyhow::Result<Registry> {
        let saved = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| anyhow::anyhow!("{} is not a relay registry: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        Ok(Registry {
            path,
            saved: Mutex::new(saved),
        })
    }

    /// The accept filter now.
    pub fn filter(&self) -> Filter {
        self.saved
            .lock()
            .expect("registry lock")
            .accept_filter
            .clone()
    }

    /// Whether `device` may connect.
    pub fn allows(&self, device: &str) -> bool {
        self.saved
            .lock()
            .expect("registry lock")
            .accept_filter
            .allows(device)
    }

    /// Replaces the filter and writes the file (the old filter stays on a
    /// write error).
    pub fn set_filter(&self, filter: Filter) -> Result<(), String> {
        self.update(|s| s.accept_filter = filter)
    }

    /// The relay-dials registrations.
    pub fn agents(&self) -> Vec<Registration> {
        self.saved.lock().expect("registry lock").agents.clone()
    }

    /// Adds or replaces the registration of its device.
    pub fn put_agent(&self, r: Registration) -> Result<(), String> {
        self.update(|s| {
            s.agents.retain(|a| a.device_id != r.device_id);
            s.agents.push(r);
        })
    }

    /// Removes a device's registration; `false` if there was none.
    pub fn remove_agent(&self, device: &str) -> Result<bool, String> {
        let mut found = false;
        self.update(|s| {
            let before = s.agents.len();
            s.agents.retain(|a| a.device_id != device);
            found = s.agents.len() != before;
        })?;
        Ok(found)
    }

    fn update(&self, change: impl FnOnce(&mut Saved)) -> Result<(), String> {
        let mut saved = self.saved.lock().expect("registry lock");
        let mut next = saved.clone();
        change(&mut next);
        let json = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
        crate::fsutil::write_atomic(&self.path, &json, crate::fsutil::SECRET_MODE)
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        *saved = next;
        Ok(())
    }
}
