//! A reader for snapd's assertion text (`application/x.ubuntu.assertion`).
//!
//! An assertion is a block of `name: value` headers, a blank line, an
//! optional body of `body-length` bytes followed by a blank line, and the
//! signature. A bundle is several of those separated by blank lines. Values
//! spanning several lines (lists, maps, long text) are indented; they are
//! kept as their raw text. The agent needs only headers (brand-id, model,
//! serial); the full text is always passed on verbatim.

use std::collections::BTreeMap;

/// One assertion in snapd's text format: headers, body, signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assertion {
    headers: BTreeMap<String, String>,
    body: String,
    signature: String,
}

/// Why an assertion's text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed assertion text: {0}")]
pub struct AssertionError(String);

/// Bound on the assertions in one bundle: a hostile answer cannot make the
/// reader allocate without end.
const MAX_ASSERTIONS: usize = 10_000;

impl Assertion {
    /// The assertion type (`model`, `serial`, ...).
    pub fn kind(&self) -> &str {
        self.header("type").unwrap_or("")
    }
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
    /// Every header.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }
    /// The body (empty for most assertions).
    pub fn body(&self) -> &str {
        &self.body
    }
    /// The signature, as text.
    pub fn signature(&self) -> &str {
        &self.signature
    }

    /// Reads every assertion of a bundle. Empty text is an empty bundle.
    pub fn parse_all(text: &str) -> Result<Vec<Assertion>, AssertionError> {
        let mut out = Vec::new();
        let mut rest = text.trim_start_matches('\n');
        while !rest.trim().is_empty() {
            if out.len() == MAX_ASSERTIONS {
                return Err(err("too many assertions"));
            }
            let (a, tail) = parse_one(rest)?;
            out.push(a);
            rest = tail.trim_start_matches('\n');
        }
        Ok(out)
    }

    /// Reads every assertion of a bundle with its own text, verbatim
    /// (without the blank lines that separate it from the next).
    pub fn parse_all_raw(text: &str) -> Result<Vec<(Assertion, &str)>, AssertionError> {
        let mut out = Vec::new();
        let mut rest = text.trim_start_matches('\n');
        while !rest.trim().is_empty() {
            if out.len() == MAX_ASSERTIONS {
                return Err(err("too many assertions"));
            }
            let (a, tail) = parse_one(rest)?;
            let raw = rest[..rest.len() - tail.len()].trim_end_matches('\n');
            out.push((a, raw));
            rest = tail.trim_start_matches('\n');
        }
        Ok(out)
    }

    /// Reads exactly one assertion.
    pub fn parse(text: &str) -> Result<Assertion, AssertionError> {
        let mut all = Self::parse_all(text)?;
        match all.len() {
            1 => Ok(all.remove(0)),
            0 => Err(err("no assertion")),
            n => Err(err(&format!("expected one assertion, found {n}"))),
        }
    }
}

fn err(s: &str) -> AssertionError {
    AssertionError(s.to_string())
}

fn parse_one(text: &str) -> Result<(Assertion, &str), AssertionError> {
    let (head, after) = text
        .split_once("\n\n")
        .ok_or_else(|| err("no blank line after the headers"))?;
    let headers = parse_headers(head)?;
    if !headers.contains_key("type") {
        return Err(err("no type header"));
    }
    let body_len: usize = match headers.get("body-length") {
        None => 0,
        Some(v) => v
            .parse()
            .map_err(|_| err(&format!("body-length {v:?} is not a number")))?,
    };
    let (body, after) = if body_len > 0 {
        let body = after
            .get(..body_len)
            .ok_or_else(|| err("body shorter than body-length"))?;
        let tail = after[body_len..]
            .strip_prefix("\n\n")
            .ok_or_else(|| err("no blank line after the body"))?;
        (body.to_string(), tail)
    } else {
        (String::new(), after)
    };
    let (signature, rest) = after.split_once("\n\n").unwrap_or((after, ""));
    let signature = signature.trim_end_matches('\n');
    if signature.is_empty() {
        return Err(err("no signature"));
    }
    Ok((
        Assertion {
            headers,
            body,
            signature: signature.to_string(),
        },
        rest,
    ))
}

fn parse_headers(head: &str) -> Result<BTreeMap<String, String>, AssertionError> {
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in head.split('\n') {
        if line.starts_with(' ') {
            let name = current
                .as_ref()
                .ok_or_else(|| err("indented line before any header"))?;
            let v = headers.entry(name.clone()).or_default();
            if !v.is_empty() {
                v.push('\n');
            }
            v.push_str(line.trim_start());
            continue;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| err(&format!("header line without a colon: {:.60?}", line)))?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(err(&format!("bad header name {:.60?}", name)));
        }
        if headers.contains_key(name) {
            return Err(err(&format!("repeated header {name:?}")));
        }
        headers.insert(name.to_string(), value.trim_start().to_string());
        current = Some(name.to_string());
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "type: model\nauthority-id: generic\nseries: 16\nbrand-id: generic\nmodel: generic-classic\nclassic: true\ntimestamp: 2017-07-27T00:00:00.0Z\nsign-key-sha3-384: d-JcZF9nD9eBw7bwMnH61x\n\nAcLBXAQAAQoABgUCWYuXiAAKCRAdLQyY\nKvEWYvzOWNhNlVSfwNOkFjs3uMHgCO6";

    #[test]
    fn reads_headers_and_signature() {
        let a = Assertion::parse(MODEL).unwrap();
        assert_eq!(a.kind(), "model");
        assert_eq!(a.header("brand-id"), Some("generic"));
        assert!(a.signature().starts_with("AcLBX"));
    }

    #[test]
    fn reads_bundles_bodies_and_multiline_values() {
        let serial = "type: serial\nbrand-id: canonical\nserial: A1\ndevice-key:\n    AcbBTQRWhcGAARAAtJGIguK7FhSyRxL\n    lAQHEx\nbody-length: 5\n\nhello\n\nSIG";
        let all = Assertion::parse_all(&format!("{MODEL}\n\n{serial}\n")).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].body(), "hello");
        assert_eq!(
            all[1].header("device-key"),
            Some("AcbBTQRWhcGAARAAtJGIguK7FhSyRxL\nlAQHEx")
        );
        assert!(Assertion::parse_all("").unwrap().is_empty());
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in [
            "garbage",
            "type: model\n",
            "no-type: x\n\nSIG",
            "type: x\nbody-length: 99\n\nshort\n\nSIG",
            "type: x\nbody-length: nope\n\nSIG",
            " indented: first\n\nSIG",
            "type: x\ntype: y\n\nSIG",
        ] {
            assert!(Assertion::parse_all(bad).is_err(), "{bad:?}");
        }
    }
}
