//! `/v2/changes` and `/v2/notices`.

use crate::snapd::names::{change_id, escape_segment, query};
use crate::snapd::{Change, Client, Error, ErrorKind, Request, SnapName};
use http::Method;
use serde_json::{json, Value};
use std::time::Duration;

/// Which changes `GET /v2/changes` lists (snapd's default is in-progress).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSelect {
    /// Every change snapd remembers.
    All,
    /// Changes not ready yet.
    InProgress,
    /// Changes that are ready.
    Ready,
}

impl ChangeSelect {
    fn as_str(self) -> &'static str {
        match self {
            ChangeSelect::All => "all",
            ChangeSelect::InProgress => "in-progress",
            ChangeSelect::Ready => "ready",
        }
    }
}

/// The answer of a notices long poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Notices {
    /// This snapd has no `/v2/notices` (older than 2.60): poll changes.
    Unsupported,
    /// The notices that arrived.
    Some(Vec<Value>),
}

impl Client {
    /// `GET /v2/changes`, optionally for one snap.
    pub async fn changes(
        &self,
        select: ChangeSelect,
        for_snap: Option<&SnapName>,
    ) -> Result<Vec<Change>, Error> {
        let mut pairs = vec![("select", select.as_str())];
        if let Some(s) = for_snap {
            pairs.push(("for", s.as_str()));
        }
        self.get_result(&Request::get(format!("/v2/changes{}", query(pairs))))
            .await
    }

    /// `GET /v2/changes/{id}`.
    pub async fn change(&self, id: &str) -> Result<Change, Error> {
        let id = change_id(id)?;
        self.get_result(&Request::get(format!("/v2/changes/{}", escape_segment(id))))
            .await
    }

    /// Aborts a change that is not ready yet.
    pub async fn abort_change(&self, id: &str) -> Result<Change, Error> {
        let id = change_id(id)?;
        let req = Request::with_json(
            Method::POST,
            format!("/v2/changes/{}", escape_segment(id)),
            &json!({"action": "abort"}),
        );
        self.get_result(&req).await
    }

    /// Long-polls change notices after `after` (RFC 3339), waiting up to
    /// `wait`. Older snapd answers 404: [`Notices::Unsupported`].
    pub async fn change_notices(
        &self,
        after: Option<&str>,
        wait: Duration,
    ) -> Result<Notices, Error> {
        let wait_s = format!("{}s", wait.as_secs());
        let mut pairs = vec![("types", "change-update"), ("timeout", wait_s.as_str())];
        if let Some(a) = after {
            pairs.push(("after", a));
        }
        let mut req = Request::get(format!("/v2/notices{}", query(pairs)));
        req.timeout = Some(wait + Duration::from_secs(10));
        match self.get_result::<Option<Vec<Value>>>(&req).await {
            Ok(v) => Ok(Notices::Some(v.unwrap_or_default())),
            Err(Error::Api {
                status: 404, error, ..
            }) if error.kind.is_none()
                || error.kind == Some(ErrorKind::Other("not-found".into())) =>
            {
                Ok(Notices::Unsupported)
            }
            Err(e) => Err(e),
        }
    }
}
