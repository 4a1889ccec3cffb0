//! From a subject and a payload to an HTTP request for snapd.
//!
//! The subject `snapd.v2.{segments}.{method}` names the resource
//! (`/v2/{segments}`) and the method. Every segment is checked against a
//! narrow alphabet and then percent-encoded anyway, so nothing in a subject
//! can reach another path, add a query, or walk up with `..`.
//!
//! The payload is empty or one JSON object, always in the same form:
//!
//! ```json
//! {"query": {"select": "all", "names": ["a", "b"]},
//!  "body": {"action": "install", "channel": "stable"},
//!  "assertion": "type: account-key\n...",
//!  "reply-to": "snapd/reply/my-client-7"}
//! ```
//!
//! all fields optional: `query` becomes the query string (arrays are joined
//! with `,` as snapd expects lists), `body` is sent as JSON, `assertion` as
//! `application/x.ubuntu.assertion` (for `POST /v2/assertions`), and
//! `reply-to` names where to answer when the message has no NATS reply
//! subject (MQTT clients). Unknown fields are refused: a snapd body sent
//! bare (`{"action":"install"}`) gets a clear error rather than being
//! silently dropped.

use super::envelope::AgentError;
use crate::bus::topics::{self, Topic};
use crate::snapd::names::{escape_segment, query};
use crate::snapd::{Request, ASSERTION_CONTENT_TYPE};
use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Most path segments in one subject (snapd's deepest path has four).
const MAX_SEGMENTS: usize = 8;
/// Longest path segment accepted.
const MAX_SEGMENT_LEN: usize = 128;

/// A parsed mirror request.
#[derive(Debug, Clone)]
pub struct MirrorRequest {
    /// The snapd request to make.
    pub request: Request,
    /// Where to publish the answer when the message has no reply subject.
    pub reply_to: Option<Topic>,
}

/// The payload's documented form.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    #[serde(default)]
    query: Option<Map<String, Value>>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    assertion: Option<String>,
    #[serde(default, rename = "reply-to")]
    reply_to: Option<String>,
}

/// The segments after `snapd.v2`: `["snaps", "hello", "post"]`.
pub fn parse(segments: &[&str], payload: &[u8]) -> Result<MirrorRequest, AgentError> {
    let (method, path) = parse_subject(segments)?;
    let p = parse_payload(payload)?;
    let reply_to = p.reply_to.as_deref().map(parse_reply_to).transpose()?;
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in p.query.unwrap_or_default() {
        pairs.push((k.clone(), query_value(&k, &v)?));
    }
    let path = format!(
        "{path}{}",
        query(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    );
    let (body, content_type) = match (p.body, p.assertion) {
        (Some(_), Some(_)) => {
            return Err(AgentError::BadRequest(
                "give either \"body\" (JSON) or \"assertion\" (text), not both".into(),
            ))
        }
        (Some(Value::Null), None) | (None, None) => (None, None),
        (Some(v), None) => (
            Some(Bytes::from(serde_json::to_vec(&v).unwrap_or_default())),
            Some("application/json"),
        ),
        (None, Some(text)) => (Some(Bytes::from(text)), Some(ASSERTION_CONTENT_TYPE)),
    };
    Ok(MirrorRequest {
        request: Request {
            method,
            path,
            body,
            content_type,
            timeout: None,
        },
        reply_to,
    })
}

/// The `reply-to` of a payload, when the request itself was refused
/// (best effort: an MQTT client still gets its error envelope).
pub fn reply_to_of(payload: &[u8]) -> Option<Topic> {
    let p = parse_payload(payload).ok()?;
    parse_reply_to(p.reply_to.as_deref()?).ok()
}

fn method(m: &str) -> Option<Method> {
    match m {
        "get" => Some(Method::GET),
        "post" => Some(Method::POST),
        "put" => Some(Method::PUT),
        "delete" => Some(Method::DELETE),
        _ => None,
    }
}

/// `(method, "/v2/a/b")` from `["a", "b", "get"]`.
fn parse_subject(segments: &[&str]) -> Result<(Method, String), AgentError> {
    let Some((last, resource)) = segments.split_last() else {
        return Err(AgentError::BadSubject(
            "the subject names no resource: use snapd.v2.{path segments}.{get|post|put|delete}"
                .into(),
        ));
    };
    let Some(method) = method(last) else {
        return Err(AgentError::BadSubject(format!(
            "the subject ends in {:?}, not a method: get, post, put or delete",
            trunc(last)
        )));
    };
    if resource.is_empty() {
        return Err(AgentError::BadSubject(
            "the subject names no resource: use snapd.v2.{path segments}.{method}, \
             e.g. snapd.v2.snaps.get"
                .into(),
        ));
    }
    if resource.len() > MAX_SEGMENTS {
        return Err(AgentError::BadSubject(format!(
            "the subject has {} path segments; at most {MAX_SEGMENTS}",
            resource.len()
        )));
    }
    let mut path = String::from("/v2");
    for seg in resource {
        check_segment(seg)?;
        path.push('/');
        path.push_str(&escape_segment(seg));
    }
    Ok((method, path))
}

/// Path segments: letters, digits, `-`, `_`, `:`, `@`, `~`, `=`, `,` (snap,
/// app, interface and assertion names, change and snapshot ids). No NATS
/// or MQTT wildcard, no `%`, nothing that could restructure the URL.
fn check_segment(seg: &str) -> Result<(), AgentError> {
    let ok = !seg.is_empty()
        && seg.len() <= MAX_SEGMENT_LEN
        && seg.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'@' | b'~' | b'=' | b',')
        });
    if ok {
        Ok(())
    } else {
        Err(AgentError::BadSubject(format!(
            "path segment {:?} is not allowed: use letters, digits and - _ : @ ~ = , (at most {MAX_SEGMENT_LEN})",
            trunc(seg)
        )))
    }
}

fn parse_payload(payload: &[u8]) -> Result<Payload, AgentError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(Payload::default());
    }
    serde_json::from_slice(payload).map_err(|e| {
        AgentError::BadRequest(format!(
            "the payload must be empty or a JSON object {{\"query\":{{..}},\"body\":..,\
             \"assertion\":\"..\",\"reply-to\":\"..\"}} (put snapd's request body under \
             \"body\"): {e}"
        ))
    })
}

/// A query value: string, number or bool; an array of those is joined with
/// `,` (snapd's list syntax: `names=a,b`).
fn query_value(key: &str, v: &Value) -> Result<String, AgentError> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let out = match v {
        Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        other => scalar(other),
    };
    out.ok_or_else(|| {
        AgentError::BadRequest(format!(
            "query value of {:?} must be a string, number, bool or an array of those",
            trunc(key)
        ))
    })
}

/// `snapd/reply/{token}` (or the NATS form `snapd.reply.{token}`): replies
/// only ever go there, so a request cannot make the agent publish on some
/// other subject.
fn parse_reply_to(s: &str) -> Result<Topic, AgentError> {
    let bad = || {
        AgentError::BadRequest(format!(
            "reply-to {:?} must be {}/{{token}} with a token of letters, digits, - and _",
            trunc(s),
            topics::SNAPD_REPLY
        ))
    };
    let prefix = topics::SNAPD_REPLY;
    let nats_prefix = Topic::fixed(prefix).nats();
    let token = s
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .or_else(|| {
            s.strip_prefix(nats_prefix.as_str())
                .and_then(|r| r.strip_prefix('.'))
        })
        .ok_or_else(bad)?;
    topics::snapd_reply(token).map_err(|_| bad())
}

fn trunc(s: &str) -> String {
    s.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(s: &str) -> Vec<&str> {
        s.split('.').collect()
    }

    #[test]
    fn subjects_map_to_paths_and_methods() {
        let r = parse(&segs("snaps.get"), b"").unwrap().request;
        assert_eq!((r.method, r.path.as_str()), (Method::GET, "/v2/snaps"));
        assert!(r.body.is_none());
        let r = parse(&segs("snaps.hello-world.conf.put"), br#"{"body":{"a":1}}"#)
            .unwrap()
            .request;
        assert_eq!(r.method, Method::PUT);
        assert_eq!(r.path, "/v2/snaps/hello-world/conf");
        assert_eq!(&r.body.unwrap()[..], br#"{"a":1}"#);
        assert_eq!(r.content_type, Some("application/json"));
        let r = parse(&segs("model.serial.get"), b"  \n").unwrap().request;
        assert_eq!(r.path, "/v2/model/serial");
    }

    #[test]
    fn queries_are_encoded_and_lists_joined() {
        let r = parse(
            &segs("changes.get"),
            br#"{"query":{"select":"all","for":"a&b=c","n":10,"names":["x","y"]}}"#,
        )
        .unwrap()
        .request;
        assert_eq!(
            r.path,
            "/v2/changes?for=a%26b%3Dc&n=10&names=x,y&select=all"
        );
        assert!(parse(&segs("changes.get"), br#"{"query":{"a":{"b":1}}}"#).is_err());
        assert!(parse(&segs("changes.get"), br#"{"query":{"a":null}}"#).is_err());
    }

    #[test]
    fn assertions_go_as_text() {
        let r = parse(
            &segs("assertions.post"),
            br#"{"assertion":"type: x\n\nsig"}"#,
        )
        .unwrap()
        .request;
        assert_eq!(r.content_type, Some(ASSERTION_CONTENT_TYPE));
        assert_eq!(&r.body.unwrap()[..], b"type: x\n\nsig");
        let e = parse(&segs("assertions.post"), br#"{"assertion":"a","body":{}}"#).unwrap_err();
        assert_eq!(e.kind(), "agent-bad-request");
    }

    #[test]
    fn bad_subjects_are_refused() {
        for s in [
            "get",
            "snaps",
            "snaps.patch",
            "snaps.GET",
            "a%2F..%2Fb.get",
            "a/b.get",
            "snaps.*.get",
            "snaps.>.get",
            "snaps.#.get",
            "snaps.+.get",
            "sn aps.get",
            "a.b.c.d.e.f.g.h.i.get",
            "snaps..get",
            "snaps.é.get",
            "snaps.a?b.get",
        ] {
            let e = parse(&segs(s), b"").unwrap_err();
            assert_eq!(e.kind(), "agent-bad-subject", "{s}");
        }
        assert!(parse(&[], b"").is_err());
    }

    #[test]
    fn bad_payloads_are_refused() {
        for p in [
            &b"not json"[..],
            b"[1,2]",
            b"\"x\"",
            br#"{"action":"install"}"#,
            br#"{"query":"x"}"#,
            br#"{"reply-to":"elsewhere"}"#,
            br#"{"reply-to":"snapd/reply/a/b"}"#,
            br#"{"reply-to":"snapd/reply/"}"#,
            br#"{"reply-to":"snapd/v2/snaps/post"}"#,
            br#"{"reply-to":"snapd/reply/>"}"#,
        ] {
            let e = parse(&segs("snaps.post"), p).unwrap_err();
            assert_eq!(
                e.kind(),
                "agent-bad-request",
                "{}",
                String::from_utf8_lossy(p)
            );
        }
    }

    #[test]
    fn reply_to_accepts_both_forms() {
        for p in [
            &br#"{"reply-to":"snapd/reply/c-1"}"#[..],
            br#"{"reply-to":"snapd.reply.c-1"}"#,
        ] {
            let r = parse(&segs("snaps.get"), p).unwrap();
            assert_eq!(r.reply_to.unwrap().nats(), "snapd.reply.c-1");
        }
    }

    /// Corpus-style property test of the payload parser: mutations of valid
    /// payloads and random bytes never panic and only ever fail with
    /// `agent-bad-request`.
    #[test]
    fn arbitrary_payloads_never_panic() {
        let corpus: [&[u8]; 5] = [
            br#"{"query":{"a":"b","n":[1,true,"x"]},"body":{"action":"install"}}"#,
            br#"{"assertion":"type: x\n\nsig","reply-to":"snapd/reply/t"}"#,
            br#"{"body":null}"#,
            b"",
            br#"{"query":{}}"#,
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..20_000 {
            let mut p = corpus[i % corpus.len()].to_vec();
            for _ in 0..(next() % 4) {
                let r = next() as usize;
                match r % 3 {
                    0 if !p.is_empty() => {
                        let at = r / 3 % p.len();
                        p[at] = (next() % 256) as u8;
                    }
                    1 if !p.is_empty() => {
                        p.truncate(r / 3 % p.len());
                    }
                    _ => p.push((next() % 256) as u8),
                }
            }
            if let Err(e) = parse(&["snaps", "post"], &p) {
                assert_eq!(e.kind(), "agent-bad-request");
            }
            let _ = reply_to_of(&p);
        }
    }

    /// Property test over generated subjects: whatever the segments, the
    /// path stays under /v2, has exactly one `/` per segment and no query
    /// unless one was given.
    #[test]
    fn no_subject_escapes_the_v2_tree() {
        let alphabet: Vec<char> = "aZ09-_:@~=,./?#%&+*> \u{e9}\\".chars().collect();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = (next() % 4 + 1) as usize;
            let segs: Vec<String> = (0..n)
                .map(|_| {
                    let len = (next() % 6) as usize;
                    (0..len)
                        .map(|_| alphabet[(next() as usize) % alphabet.len()])
                        .collect()
                })
                .collect();
            let refs: Vec<&str> = segs
                .iter()
                .map(String::as_str)
                .chain(std::iter::once("get"))
                .collect();
            if let Ok(r) = parse(&refs, b"") {
                let p = r.request.path;
                assert!(p.starts_with("/v2/"), "{p}");
                assert_eq!(p.matches('/').count(), n + 1, "{p}");
                assert!(
                    !p.contains('?') && !p.contains("..") && !p.contains('#'),
                    "{p}"
                );
            }
        }
    }
}
