//! What the operator set through the admin API and the relay must not
//! forget on a restart: the accept filter and the agents it dials, kept
//! in the relay's database ([`super::store`]), read at start.

use super::store::{not_saved, Store};
use crate::db::DbError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

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

/// Both halves, in memory; also the JSON file (`registry`) earlier relays
/// kept them in, which [`super::store`] imports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Saved {
    #[serde(default)]
    pub(super) accept_filter: Filter,
    #[serde(default)]
    pub(super) agents: Vec<Registration>,
}

/// The registry: the database's rows and, for the agents' port that asks
/// on every connection, their copy in memory.
pub struct Registry {
    store: Arc<Store>,
    saved: Mutex<Saved>,
}

impl Registry {
    /// Reads the registry from the database.
    pub fn load(store: Arc<Store>) -> Result<Registry, DbError> {
        let saved = Saved {
            accept_filter: store.filter()?,
            agents: store.registrations()?,
        };
        Ok(Registry {
            store,
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

    /// Replaces the filter, committed first (the old filter stays on a
    /// write error). Blocks on SQLite.
    pub fn set_filter(&self, filter: Filter) -> Result<(), String> {
        let mut saved = self.saved.lock().expect("registry lock");
        self.store.set_filter(&filter).map_err(not_saved)?;
        saved.accept_filter = filter;
        Ok(())
    }

    /// The relay-dials registrations.
    pub fn agents(&self) -> Vec<Registration> {
        self.saved.lock().expect("registry lock").agents.clone()
    }

    /// Adds or replaces the registration of its device. Blocks on SQLite.
    pub fn put_agent(&self, r: Registration) -> Result<(), String> {
        let mut saved = self.saved.lock().expect("registry lock");
        self.store.put_registration(&r).map_err(not_saved)?;
        saved.agents.retain(|a| a.device_id != r.device_id);
        saved.agents.push(r);
        Ok(())
    }

    /// Removes a device's registration; `false` if there was none. Blocks
    /// on SQLite.
    pub fn remove_agent(&self, device: &str) -> Result<bool, String> {
        let mut saved = self.saved.lock().expect("registry lock");
        if !saved.agents.iter().any(|a| a.device_id == device) {
            return Ok(false);
        }
        self.store.delete_registration(device).map_err(not_saved)?;
        saved.agents.retain(|a| a.device_id != device);
        Ok(true)
    }
}
