//! `/v2/apps`: list apps and start, stop or restart services.

use crate::snapd::names::query;
use crate::snapd::{App, Client, Error, Request};
use http::Method;
use serde_json::json;

impl Client {
    /// Apps (or only services) of the given snaps or `snap.app` names; all
    /// when `names` is empty.
    pub async fn apps(&self, names: &[&str], services_only: bool) -> Result<Vec<App>, Error> {
        let joined = names.join(",");
        let mut pairs = Vec::new();
        if services_only {
            pairs.push(("select", "service"));
        }
        if !names.is_empty() {
            pairs.push(("names", joined.as_str()));
        }
        self.get_result(&Request::get(format!("/v2/apps{}", query(pairs))))
            .await
    }

    /// `start`, `stop` or `restart` the named services (snap or snap.app).
    pub async fn app_action(&self, action: &str, names: &[String]) -> Result<String, Error> {
        let body = json!({"action": action, "names": names});
        self.start_change(&Request::with_json(Method::POST, "/v2/apps", &body))
            .await
    }
}
