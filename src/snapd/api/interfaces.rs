//! `/v2/interfaces`, `/v2/connections`, `/v2/aliases`.
//!
//! snapd lists connections at `GET /v2/connections` and changes them with
//! `POST /v2/interfaces` (`connect`/`disconnect`); `POST /v2/connections`
//! does not exist on any snapd this agent targets.

use crate::snapd::{Client, Error, Request};
use http::Method;
use serde_json::{json, Value};

/// One end of a connection: snap and plug or slot name.
pub type Endpoint<'a> = (&'a str, &'a str);

impl Client {
    /// `GET /v2/interfaces`.
    pub async fn interfaces(&self) -> Result<Value, Error> {
        self.get_result(&Request::get("/v2/interfaces?select=all"))
            .await
    }

    /// `GET /v2/connections`.
    pub async fn connections(&self) -> Result<Value, Error> {
        self.get_result(&Request::get("/v2/connections")).await
    }

    /// `connect` or `disconnect` a plug and a slot: change id.
    pub async fn interface_action(
        &self,
        action: &str,
        plug: Endpoint<'_>,
        slot: Endpoint<'_>,
    ) -> Result<String, Error> {
        let body = json!({
            "action": action,
            "plugs": [{"snap": plug.0, "plug": plug.1}],
            "slots": [{"snap": slot.0, "slot": slot.1}],
        });
        self.start_change(&Request::with_json(Method::POST, "/v2/interfaces", &body))
            .await
    }

    /// `GET /v2/aliases`.
    pub async fn aliases(&self) -> Result<Value, Error> {
        self.get_result(&Request::get("/v2/aliases")).await
    }
}
