//! `/v2/system-info`, `/v2/systems` (reboot), `/v2/logs`, `/v2/warnings`.

use crate::snapd::names::query;
use crate::snapd::{Client, Error, LogEntry, Request, SystemInfo};
use http::Method;
use serde_json::{json, Value};

impl Client {
    /// `GET /v2/system-info`.
    pub async fn system_info(&self) -> Result<SystemInfo, Error> {
        self.get_result(&Request::get("/v2/system-info")).await
    }

    /// Reboots the device through snapd (root only; no `shutdown` interface
    /// needed).
    pub async fn reboot(&self) -> Result<(), Error> {
        let req = Request::with_json(Method::POST, "/v2/systems", &json!({"action": "reboot"}));
        self.call(&req).await.map(drop)
    }

    /// The last `n` journal lines of the given snaps or services (all when
    /// `names` is empty). snapd answers `application/json-seq`.
    pub async fn logs(&self, n: u32, names: &[&str]) -> Result<Vec<LogEntry>, Error> {
        let n_s = n.to_string();
        let joined = names.join(",");
        let mut pairs = vec![("n", n_s.as_str())];
        if !names.is_empty() {
            pairs.push(("names", joined.as_str()));
        }
        let req = Request::get(format!("/v2/logs{}", query(pairs)));
        let resp = self.send(&req).await?;
        if resp.status != 200 || !resp.content_type().starts_with("application/json-seq") {
            crate::snapd::envelope(&req.what(), &resp)?;
        }
        parse_json_seq(&resp.body).map_err(|detail| Error::Malformed {
            what: req.what(),
            status: resp.status,
            detail,
        })
    }

    /// `GET /v2/warnings`.
    pub async fn warnings(&self) -> Result<Value, Error> {
        self.get_result(&Request::get("/v2/warnings")).await
    }
}

/// Splits an RFC 7464 JSON text sequence (records start with 0x1E).
pub fn parse_json_seq(body: &[u8]) -> Result<Vec<LogEntry>, String> {
    body.split(|b| *b == 0x1e)
        .filter(|rec| !rec.iter().all(u8::is_ascii_whitespace))
        .map(|rec| serde_json::from_slice(rec).map_err(|e| format!("bad log record: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_seq_records_split_on_record_separator() {
        let body = b"\x1e{\"timestamp\":\"t\",\"message\":\"a\",\"sid\":\"s\",\"pid\":\"1\"}\n\x1e{\"message\":\"b\"}\n";
        let recs = super::parse_json_seq(body).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].message, "b");
        assert!(super::parse_json_seq(b"\x1e{oops").is_err());
        assert!(super::parse_json_seq(b"").unwrap().is_empty());
    }
}
