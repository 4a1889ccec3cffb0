//! `/v2/snaps`, `/v2/snaps/{name}` and `/v2/snaps/{name}/conf`.

use crate::snapd::names::{escape_segment, query};
use crate::snapd::{Client, Error, Request, Snap, SnapAction, SnapName};
use http::Method;
use serde_json::{json, Map, Value};

impl Client {
    /// Every installed snap.
    pub async fn snaps(&self) -> Result<Vec<Snap>, Error> {
        self.get_result(&Request::get("/v2/snaps")).await
    }

    /// Every installed revision of every snap (`select=all`): disabled
    /// revisions too, each with its status.
    pub async fn snaps_all_revisions(&self) -> Result<Vec<Snap>, Error> {
        self.get_result(&Request::get(format!(
            "/v2/snaps{}",
            query([("select", "all")])
        )))
        .await
    }

    /// The installed snaps among `names`.
    pub async fn snaps_named(&self, names: &[SnapName]) -> Result<Vec<Snap>, Error> {
        let list = names
            .iter()
            .map(SnapName::as_str)
            .collect::<Vec<_>>()
            .join(",");
        self.get_result(&Request::get(format!(
            "/v2/snaps{}",
            query([("snaps", list.as_str())])
        )))
        .await
    }

    /// One installed snap (`snap-not-found` when it is not installed).
    pub async fn snap(&self, name: &SnapName) -> Result<Snap, Error> {
        self.get_result(&Request::get(snap_path(name, ""))).await
    }

    /// install, refresh, remove, revert, enable, disable, switch, hold, unhold.
    /// Returns the change id.
    pub async fn snap_action(&self, name: &SnapName, action: &SnapAction) -> Result<String, Error> {
        self.start_change(&Request::with_json(
            Method::POST,
            snap_path(name, ""),
            action,
        ))
        .await
    }

    /// One action on several snaps (`install`, `refresh`, `remove`, ...).
    pub async fn snaps_action(&self, action: &str, names: &[SnapName]) -> Result<String, Error> {
        let body = json!({"action": action, "snaps": names.iter().map(SnapName::as_str).collect::<Vec<_>>()});
        self.start_change(&Request::with_json(Method::POST, "/v2/snaps", &body))
            .await
    }

    /// The snap's configuration; all of it when `keys` is empty.
    pub async fn conf(&self, name: &SnapName, keys: &[&str]) -> Result<Map<String, Value>, Error> {
        let joined = keys.join(",");
        let q = if keys.is_empty() {
            String::new()
        } else {
            query([("keys", joined.as_str())])
        };
        self.get_result(&Request::get(format!("{}{q}", snap_path(name, "/conf"))))
            .await
    }

    /// Sets configuration keys (runs the snap's configure hook): change id.
    pub async fn set_conf(
        &self,
        name: &SnapName,
        values: &Map<String, Value>,
    ) -> Result<String, Error> {
        self.start_change(&Request::with_json(
            Method::PUT,
            snap_path(name, "/conf"),
            values,
        ))
        .await
    }
}

fn snap_path(name: &SnapName, tail: &str) -> String {
    format!("/v2/snaps/{}{tail}", escape_segment(name.as_str()))
}
