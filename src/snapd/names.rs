//! Names and ids that end up in snapd URLs. Values from remote input (a DMS
//! action, a NATS request) are checked here, so `../`, `?` or `/` can never
//! change which resource a request reaches.

use super::Error;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use std::fmt;

/// A valid snap (instance) name: `hello-world` or `hello-world_foo`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapName(String);

impl SnapName {
    /// Checks a snap name by snapd's rules: lowercase letters, digits and
    /// single hyphens, at least one letter, at most 40 characters, not
    /// starting or ending with a hyphen; optionally `_` and an instance key
    /// of up to 10 lowercase letters or digits.
    pub fn parse(s: &str) -> Result<SnapName, Error> {
        let bad = |why| Error::InvalidInput {
            what: "snap name",
            value: s.chars().take(80).collect(),
            why,
        };
        let (name, key) = match s.split_once('_') {
            Some((n, k)) => (n, Some(k)),
            None => (s, None),
        };
        if name.is_empty() || name.len() > 40 {
            return Err(bad("a snap name has 1 to 40 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad(
                "a snap name has only lowercase letters, digits and hyphens",
            ));
        }
        if !name.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(bad("a snap name has at least one letter"));
        }
        if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
            return Err(bad(
                "a snap name cannot start or end with a hyphen or have two in a row",
            ));
        }
        if let Some(key) = key {
            if key.is_empty()
                || key.len() > 10
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return Err(bad(
                    "an instance key has 1 to 10 lowercase letters or digits",
                ));
            }
        }
        Ok(SnapName(s.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapName {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a change id (snapd's are decimal numbers).
pub fn change_id(s: &str) -> Result<&str, Error> {
    if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s)
    } else {
        Err(Error::InvalidInput {
            what: "change id",
            value: s.chars().take(40).collect(),
            why: "a change id is a number",
        })
    }
}

/// Checks an assertion type name (`model`, `serial`, `snap-declaration`).
pub fn assertion_type(s: &str) -> Result<&str, Error> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s)
    } else {
        Err(Error::InvalidInput {
            what: "assertion type",
            value: s.chars().take(40).collect(),
            why: "an assertion type has lowercase letters, digits and hyphens",
        })
    }
}

/// Characters escaped in a path segment: everything that could end or
/// restructure it, and anything outside visible ASCII.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Characters escaped in a query key or value.
const QUERY: &AsciiSet = &SEGMENT.add(b'&').add(b'=').add(b'+').add(b';');

/// Percent-encodes one path segment. `.` and `..` are encoded too: they
/// would otherwise walk the path.
pub fn escape_segment(s: &str) -> String {
    match s {
        "." => "%2E".into(),
        ".." => "%2E%2E".into(),
        _ => utf8_percent_encode(s, SEGMENT).to_string(),
    }
}

/// Builds `?k=v&..` with every key and value encoded; empty when no pairs.
pub fn query<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        out.push(if out.is_empty() { '?' } else { '&' });
        out.extend(utf8_percent_encode(k, QUERY));
        out.push('=');
        out.extend(utf8_percent_encode(v, QUERY));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snap_names_follow_snapd_rules() {
        for ok in ["hello-world", "core24", "a", "hello_key1", "x-1-y"] {
            assert!(SnapName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "../x", "a/b", "a?b", "a b", "UPPER", "-a", "a-", "a--b", "123", "a_", "a_KEY",
            "a_b_c", "hello%2f",
        ] {
            assert!(SnapName::parse(bad).is_err(), "{bad:?}");
        }
        assert!(SnapName::parse(&"a".repeat(41)).is_err());
    }

    #[test]
    fn segments_and_queries_cannot_restructure_a_url() {
        assert_eq!(escape_segment("a/../b?c#d"), "a%2F..%2Fb%3Fc%23d");
        assert_eq!(escape_segment(".."), "%2E%2E");
        assert_eq!(
            query([("a", "x&y=z"), ("b", "1 2")]),
            "?a=x%26y%3Dz&b=1%202"
        );
        assert_eq!(query([]), "");
    }

    #[test]
    fn change_ids_are_numbers() {
        assert!(change_id("42").is_ok());
        assert!(change_id("4/2").is_err());
        assert!(change_id("").is_err());
    }
}
