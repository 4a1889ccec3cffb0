//! `/v2/snapshots`: list, take and export snapshots.

use crate::snapd::names::query;
use crate::snapd::{Client, Error, Request, SnapName};
use http::Method;
use serde_json::{json, Value};

/// A snapshot being taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStarted {
    /// snapd's change id.
    pub change: String,
    /// The snapshot set's id, when snapd answered it.
    pub set_id: Option<u64>,
}

impl Client {
    /// Snapshot sets; one set when `set` is given.
    pub async fn snapshots(&self, set: Option<u64>) -> Result<Value, Error> {
        let set_s = set.map(|s| s.to_string());
        let pairs: Vec<(&str, &str)> = set_s.iter().map(|s| ("set", s.as_str())).collect();
        self.get_result(&Request::get(format!("/v2/snapshots{}", query(pairs))))
            .await
    }

    /// Takes a snapshot of the snaps (all when empty). snapd does this with
    /// `POST /v2/snaps` action `snapshot` (not `/v2/snapshots`), and tells
    /// the set id at once, in the async answer's `result`.
    pub async fn snapshot(&self, snaps: &[SnapName]) -> Result<SnapshotStarted, Error> {
        let body = json!({"action": "snapshot", "snaps": snaps.iter().map(SnapName::as_str).collect::<Vec<_>>()});
        let req = Request::with_json(Method::POST, "/v2/snaps", &body);
        let env = self.call(&req).await?;
        let change = env.change.ok_or_else(|| Error::Malformed {
            what: req.what(),
            status: env.status_code,
            detail: "expected an async answer with a change id".into(),
        })?;
        Ok(SnapshotStarted {
            change,
            set_id: env.result.get("set-id").and_then(Value::as_u64),
        })
    }

    /// Streams a snapshot set as snapd exports it (a tar archive).
    pub async fn export_snapshot(
        &self,
        set: u64,
    ) -> Result<http::Response<hyper::body::Incoming>, Error> {
        let req = Request::get(format!("/v2/snapshots/{set}/export"));
        let resp = self.open(&req).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(Error::Api {
            what: req.what(),
            status: resp.status().as_u16(),
            error: crate::snapd::ApiError {
                message: format!("snapshot set {set} cannot be exported"),
                kind: None,
                value: None,
            },
        })
    }
}
