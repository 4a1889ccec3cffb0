//! `/v2/users`: create or remove local users (DMS `user` action).

use crate::snapd::{Client, Error, Request, User};
use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The body of a user creation.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct CreateUser {
    /// The store account's e-mail (for a store user).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub email: String,
    /// The local user name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    /// Give the user sudo.
    #[serde(default)]
    pub sudoer: bool,
    /// Create it even where the device is not managed yet.
    #[serde(rename = "force-managed", default)]
    pub force_managed: bool,
}

impl Client {
    /// `POST /v2/users` with `action: create`.
    pub async fn create_user(&self, user: &CreateUser) -> Result<Vec<User>, Error> {
        let mut body = serde_json::to_value(user).unwrap_or_default();
        body["action"] = json!("create");
        self.get_result(&Request::with_json(Method::POST, "/v2/users", &body))
            .await
    }

    /// `POST /v2/users` with `action: remove`.
    pub async fn remove_user(&self, username: &str) -> Result<Vec<User>, Error> {
        let body = json!({"action": "remove", "username": username});
        let env = self
            .call(&Request::with_json(Method::POST, "/v2/users", &body))
            .await?;
        // snapd answers `{"removed": [...]}`.
        crate::snapd::decode("POST /v2/users", env.result["removed"].clone())
    }
}
