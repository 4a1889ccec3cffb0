//! `/v2/assertions` and `/v2/model`: assertion text in and out.

use crate::snapd::names::{assertion_type, escape_segment, query};
use crate::snapd::{
    envelope, Assertion, Client, Error, ErrorKind, RawResponse, Request, ASSERTION_CONTENT_TYPE,
};
use bytes::Bytes;
use http::Method;

impl Client {
    /// The assertions of a type, as snapd's text (a bundle; empty when none).
    /// `filters` are header constraints (`brand-id=..`).
    pub async fn assertions_text(
        &self,
        kind: &str,
        filters: &[(&str, &str)],
    ) -> Result<String, Error> {
        let kind = assertion_type(kind)?;
        let req = Request::get(format!(
            "/v2/assertions/{}{}",
            escape_segment(kind),
            query(filters.iter().copied())
        ));
        let resp = self.send(&req).await?;
        assertion_text(&req, resp)
    }

    /// The assertions of a type, parsed.
    pub async fn assertions(
        &self,
        kind: &str,
        filters: &[(&str, &str)],
    ) -> Result<Vec<Assertion>, Error> {
        let text = self.assertions_text(kind, filters).await?;
        Assertion::parse_all(&text).map_err(|e| Error::Malformed {
            what: format!("GET /v2/assertions/{kind}"),
            status: 200,
            detail: e.to_string(),
        })
    }

    /// Adds an assertion (text) to snapd's database.
    pub async fn add_assertion(&self, text: &str) -> Result<(), Error> {
        let req = Request {
            method: Method::POST,
            path: "/v2/assertions".into(),
            body: Some(Bytes::from(text.to_owned())),
            content_type: Some(ASSERTION_CONTENT_TYPE),
            timeout: None,
        };
        self.call(&req).await.map(drop)
    }

    /// The device's model assertion (text).
    pub async fn model(&self) -> Result<String, Error> {
        let req = Request::get("/v2/model");
        let resp = self.send(&req).await?;
        assertion_text(&req, resp)
    }

    /// The device's serial assertion (text); `None` while the device has
    /// none yet (not registered).
    pub async fn serial(&self) -> Result<Option<String>, Error> {
        let req = Request::get("/v2/model/serial");
        let resp = self.send(&req).await?;
        match assertion_text(&req, resp) {
            Ok(text) if text.trim().is_empty() => Ok(None),
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == Some(&ErrorKind::AssertionNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The text of an assertion answer; JSON answers are snapd's errors.
fn assertion_text(req: &Request, resp: RawResponse) -> Result<String, Error> {
    if resp.status == 200 && resp.content_type().starts_with(ASSERTION_CONTENT_TYPE) {
        return String::from_utf8(resp.body.to_vec()).map_err(|_| Error::Malformed {
            what: req.what(),
            status: resp.status,
            detail: "assertion text is not UTF-8".into(),
        });
    }
    // An error envelope (or garbage): let the envelope reader say which.
    envelope(&req.what(), &resp)?;
    Err(Error::Malformed {
        what: req.what(),
        status: resp.status,
        detail: format!(
            "expected {ASSERTION_CONTENT_TYPE}, got {:?}",
            resp.content_type()
        ),
    })
}
