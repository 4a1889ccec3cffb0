//! `/v2/snapshots`: list, take and export snapshots.

use crate::snapd::names::query;
use crate::snapd::{Client, Error, Request, SnapName};
use http::Method;
use serde_json::{json, Value};

impl Client {
    /// Snapshot sets; one set when `set` is given.
    pub async fn snapshots(&self, set: Option<u64>) -> Result<Value, Error> {
        let set_s = set.map(|s| s.to_string());
        let pairs: Vec<(&str, &str)> = set_s.iter().map(|s| ("set", s.as_str())).collect();
        self.get_result(&Request::get(format!("/v2/snapshots{}", query(pairs))))
            .await
    }

    /// Takes a snapshot of the snaps (all when empty): change id. The set id
    /// is in the change's `data` (`set-id`) once it is ready.
    pub async fn snapshot(&self, snaps: &[SnapName]) -> Result<String, Error> {
        let body = json!({"action": "snapshot", "snaps": snaps.iter().map(SnapName::as_str).collect::<Vec<_>>()});
        self.start_change(&Request::with_json(Method::POST, "/v2/snapshots", &body))
            .await
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
