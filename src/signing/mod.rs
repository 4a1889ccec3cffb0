//! Signed actions: a device that obeys its operator, not whoever can
//! publish on its topic.
//!
//! Without signatures every action is trusted because it arrived on the
//! device's topic, so a compromised broker, a leaked admin certificate or a
//! loose ACL is enough to install snaps or create sudo users on every
//! device. With `dms.signing.keys` an action may carry (and with
//! `dms.signing.required` must carry) an Ed25519 signature of the operator.
//!
//! The envelope is a JWS (RFC 7515) in its flattened JSON serialization,
//! signed with EdDSA (RFC 8037), around the unchanged action bytes:
//!
//! ```text
//! {"protected":"<b64url(header)>","payload":"<b64url(action)>","signature":"<b64url(64 bytes)>"}
//! ```
//!
//! The protected header holds the claims, as JWT's registered names used as
//! header parameters (RFC 7519 §5.3), so any JOSE library can check it:
//! `{"alg":"EdDSA","kid":..,"aud":"<device id or serial>","iat":..,"exp":..,"nonce":"<action id>"}`.
//!
//! The checks run in a fixed order, and the first that fails names the
//! refusal ([`Check`]): the envelope's shape, the key id, the signature
//! (only a verified header is believed), the audience, the validity window
//! (with a skew allowance), the nonce against the action's id. Whether the
//! id was seen before (a replay) is the caller's check, against its durable
//! ledger, so it survives restarts.

pub mod keys;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// The only `alg` accepted (RFC 8037: EdDSA; the key decides the curve).
pub const ALG: &str = "EdDSA";
/// Larger envelopes are refused unread (an action is at most 256 KiB,
/// which base64 makes a third larger).
pub const MAX_ENVELOPE: usize = 512 * 1024;

/// Which check refused an action; its text leads the refusal message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Verification is required and the action carries no signature.
    Unsigned,
    /// The envelope is not a JWS this agent reads.
    Malformed,
    /// The key id is not among `dms.signing.keys` (never was, or revoked).
    UnknownKey,
    /// The signature does not verify with the key named.
    BadSignature,
    /// `aud` names another device.
    WrongAudience,
    /// `exp` has passed (beyond the skew allowance).
    Expired,
    /// `iat` is in the future (beyond the skew allowance).
    NotYetValid,
    /// `exp - iat` is longer than `dms.signing.lifetime`.
    TooLongLived,
    /// `nonce` is not the action's id.
    Nonce,
    /// The action id was seen before (its ledger has it).
    Replay,
}

impl Check {
    /// The check's name in refusals (`signature`, `replay`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Unsigned => "unsigned",
            Check::Malformed => "malformed signature envelope",
            Check::UnknownKey => "unknown key",
            Check::BadSignature => "bad signature",
            Check::WrongAudience => "wrong audience",
            Check::Expired => "expired",
            Check::NotYetValid => "not yet valid",
            Check::TooLongLived => "validity too long",
            Check::Nonce => "nonce mismatch",
            Check::Replay => "replay",
        }
    }
}

/// Why an action was refused, with the id and action name it claims (for
/// the answer; read from the payload even when it could not be trusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Which check failed.
    pub check: Check,
    /// What the check found.
    pub detail: String,
    /// The action id the payload claims.
    pub id: String,
    /// The action name the payload claims.
    pub action: String,
}

impl Refusal {
    /// The answer's message: `refused, not run: <check>: <detail>`.
    pub fn message(&self) -> String {
        format!("refused, not run: {}: {}", self.check.as_str(), self.detail)
    }

    /// A replay of `id` (the caller's ledger had it).
    pub fn replay(id: &str, action: &str, detail: impl Into<String>) -> Refusal {
        Refusal {
            check: Check::Replay,
            detail: detail.into(),
            id: id.to_string(),
            action: action.to_string(),
        }
    }
}

/// The verified header claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The key id.
    pub kid: String,
    /// The devices (or fleets) it is meant for.
    pub aud: Vec<String>,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds.
    pub exp: i64,
    /// The action id, which makes a replay recognisable.
    pub nonce: String,
}

/// A parsed envelope, not yet verified.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `BASE64URL(protected) || '.' || BASE64URL(payload)` as received: what
    /// the signature covers (RFC 7515 §5.2).
    signing_input: Vec<u8>,
    /// The protected header's claims.
    pub header: Header,
    /// The action bytes.
    pub payload: Vec<u8>,
    signature: Signature,
}

/// True when `v` is a JSON object that carries a signature envelope (an
/// action of either tree never has a `signature` member).
pub fn is_envelope(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.contains_key("signature"))
}

fn b64(field: &str, text: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|e| format!("{field} is not unpadded base64url: {e}"))
}

impl Envelope {
    /// Reads an envelope (a JSON object with a `signature` member); a
    /// refusal says what is wrong with it. The fuzz target `signed_envelope`
    /// feeds this.
    pub fn parse(bytes: &[u8]) -> Result<Envelope, String> {
        if bytes.len() > MAX_ENVELOPE {
            return Err(format!(
                "{} bytes is more than the {MAX_ENVELOPE} an envelope may have",
                bytes.len()
            ));
        }
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(obj) = v else {
            return Err("a JWS in flattened JSON form is a JSON object".into());
        };
        Self::from_object(&obj)
    }

    fn from_object(obj: &Map<String, Value>) -> Result<Envelope, String> {
        for key in obj.keys() {
            match key.as_str() {
                "protected" | "payload" | "signature" => {}
                "header" => {
                    return Err(
                        "unprotected header parameters are not accepted: put every parameter in \"protected\""
                            .into(),
                    )
                }
                "signatures" => {
                    return Err("the general JSON form (\"signatures\") is not accepted: send the flattened form with one signature".into())
                }
                other => return Err(format!("unknown member {other:?}")),
            }
        }
        let text = |name: &str| -> Result<&str, String> {
            match obj.get(name) {
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(_) => Err(format!("\"{name}\" must be a string")),
                None => Err(format!("\"{name}\" is missing")),
            }
        };
        let (protected, payload, signature) =
            (text("protected")?, text("payload")?, text("signature")?);
        let sig = b64("signature", signature)?;
        let sig: [u8; 64] = sig
            .try_into()
            .map_err(|s: Vec<u8>| format!("an Ed25519 signature has 64 bytes, not {}", s.len()))?;
        let header_bytes = b64("protected", protected)?;
        let header: Value = serde_json::from_slice(&header_bytes)
            .map_err(|e| format!("the protected header is not valid JSON: {e}"))?;
        let header = parse_header(&header)?;
        let payload_bytes = b64("payload", payload)?;
        let mut signing_input = Vec::with_capacity(protected.len() + 1 + payload.len());
        signing_input.extend_from_slice(protected.as_bytes());
        signing_input.push(b'.');
        signing_input.extend_from_slice(payload.as_bytes());
        Ok(Envelope {
            signing_input,
            header,
            payload: payload_bytes,
            signature: Signature::from_bytes(&sig),
        })
    }
}

fn parse_header(v: &Value) -> Result<Header, String> {
    let Value::Object(h) = v else {
        return Err("the protected header must be a JSON object".into());
    };
    match h.get("alg") {
        Some(Value::String(a)) if a == ALG => {}
        Some(other) => return Err(format!("alg must be {ALG:?} (RFC 8037), not {other}")),
        None => return Err("the protected header has no alg".into()),
    }
    if h.contains_key("crit") {
        return Err("no header extension is understood here (\"crit\")".into());
    }
    let string = |name: &str| -> Result<String, String> {
        match h.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(format!("the header's {name} is empty")),
            Some(_) => Err(format!("the header's {name} must be a string")),
            None => Err(format!("the header has no {name}")),
        }
    };
    let number = |name: &str| -> Result<i64, String> {
        match h.get(name) {
            Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
                format!("the header's {name} must be whole seconds since 1970 (NumericDate)")
            }),
            Some(_) => Err(format!(
                "the header's {name} must be a number (seconds since 1970)"
            )),
            None => Err(format!("the header has no {name}")),
        }
    };
    let aud = match h.get("aud") {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= 64 => a
            .iter()
            .map(|x| match x {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err("every aud must be a non-empty string".to_string()),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(
                "the header's aud must be the device id or serial (or a short list of them)".into(),
            )
        }
        None => return Err("the header has no aud".into()),
    };
    Ok(Header {
        kid: string("kid")?,
        aud,
        iat: number("iat")?,
        exp: number("exp")?,
        nonce: string("nonce")?,
    })
}

/// What verification lets through.
#[derive(Debug)]
pub enum Admit<'a> {
    /// No signature, and none required: the bytes as they came.
    Unsigned(&'a [u8]),
    /// A verified action: its bytes and claims.
    Signed(Verified),
}

/// A signed action that passed every check but the replay check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The action, exactly as signed.
    pub payload: Vec<u8>,
    /// The key that signed it.
    pub kid: String,
    /// The action id.
    pub nonce: String,
    /// Unix seconds: past this (and the skew) a replay is refused as expired
    /// anyway, so the ledger need remember the nonce only until then.
    pub exp: i64,
}

/// The verification settings (`dms.signing.*`), for both action trees.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    keys: BTreeMap<String, VerifyingKey>,
    /// Refuse actions without a signature.
    pub required: bool,
    skew_s: i64,
    lifetime_s: i64,
}

impl Policy {
    /// A policy with these keys and bounds.
    pub fn new(
        keys: impl IntoIterator<Item = (String, VerifyingKey)>,
        required: bool,
        skew: Duration,
        lifetime: Duration,
    ) -> Policy {
        Policy {
            keys: keys.into_iter().collect(),
            required,
            skew_s: skew.as_secs().min(i64::MAX as u64) as i64,
            lifetime_s: lifetime.as_secs().min(i64::MAX as u64) as i64,
        }
    }

    /// The policy of `dms.signing.*`.
    pub fn from_config(c: &crate::config::DmsSigning) -> Policy {
        Policy::new(
            c.keys.entries().iter().cloned(),
            c.required,
            c.skew.get(),
            c.lifetime.get(),
        )
    }

    /// The skew allowance in seconds.
    pub fn skew_s(&self) -> i64 {
        self.skew_s
    }

    /// The key ids accepted.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    /// Checks one message: `audiences` are the names this device answers to
    /// (device id, serial), `now_s` the time in Unix seconds.
    pub fn admit<'a>(
        &self,
        bytes: &'a [u8],
        audiences: &[&str],
        now_s: i64,
    ) -> Result<Admit<'a>, Refusal> {
        let value = (bytes.len() <= MAX_ENVELOPE)
            .then(|| serde_json::from_slice::<Value>(bytes).ok())
            .flatten();
        let Some(value) = value.filter(is_envelope) else {
            if !self.required {
                return Ok(Admit::Unsigned(bytes));
            }
            let (id, action) = serde_json::from_slice::<Value>(bytes)
                .map(|v| claimed(&v))
                .unwrap_or_default();
            return Err(Refusal {
                check: Check::Unsigned,
                detail: "this device takes only actions signed with one of dms.signing.keys \
                         (dms.signing.required)"
                    .into(),
                id,
                action,
            });
        };
        let obj = value.as_object().expect("is_envelope checked it");
        // Who the action claims to be, for the answer (not trusted).
        let (id, action) = obj
            .get("payload")
            .and_then(Value::as_str)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
            .map(|v| claimed(&v))
            .unwrap_or_default();
        let refuse = |check: Check, detail: String| Refusal {
            check,
            detail,
            id: id.clone(),
            action: action.clone(),
        };
        let env = Envelope::from_object(obj).map_err(|e| refuse(Check::Malformed, e))?;
        let h = &env.header;
        let Some(key) = self.keys.get(&h.kid) else {
            let known = if self.keys.is_empty() {
                "no key is configured (dms.signing.keys)".to_string()
            } else {
                format!("the keys are {}", self.kids().join(", "))
            };
            return Err(refuse(
                Check::UnknownKey,
                format!(
                    "key id {:?} is not among dms.signing.keys (never configured, or revoked); {known}",
                    h.kid
                ),
            ));
        };
        key.verify_strict(&env.signing_input, &env.signature)
            .map_err(|_| {
                refuse(
                    Check::BadSignature,
                    format!(
                        "the signature does not verify with key {:?}: the action or its header was changed, or another key signed it",
                        h.kid
                    ),
                )
            })?;
        // From here on the header is the signer's.
        if !h.aud.iter().any(|a| audiences.contains(&a.as_str())) {
            return Err(refuse(
                Check::WrongAudience,
                format!(
                    "addressed to {}, not to this device ({})",
                    h.aud.join(", "),
                    audiences.join(", ")
                ),
            ));
        }
        let when = |s: i64| crate::clock::format_short(s.saturating_mul(1_000_000_000));
        let skew = humantime::format_duration(Duration::from_secs(self.skew_s as u64));
        if now_s > h.exp.saturating_add(self.skew_s) {
            return Err(refuse(
                Check::Expired,
                format!(
                    "expired at {} (exp); the device's time is {}, skew allowance {skew} (dms.signing.skew)",
                    when(h.exp),
                    when(now_s)
                ),
            ));
        }
        if h.iat > now_s.saturating_add(self.skew_s) {
            return Err(refuse(
                Check::NotYetValid,
                format!(
                    "issued at {} (iat), in the future: the device's time is {}, skew allowance {skew} (dms.signing.skew)",
                    when(h.iat),
                    when(now_s)
                ),
            ));
        }
        let life = h.exp.saturating_sub(h.iat);
        if life < 0 || life > self.lifetime_s {
            return Err(refuse(
                Check::TooLongLived,
                format!(
                    "valid from {} to {}: at most {} (dms.signing.lifetime) is accepted",
                    when(h.iat),
                    when(h.exp),
                    humantime::format_duration(Duration::from_secs(self.lifetime_s as u64))
                ),
            ));
        }
        let payload_id = serde_json::from_slice::<Value>(&env.payload)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string));
        if payload_id.as_deref() != Some(h.nonce.as_str()) {
            return Err(refuse(
                Check::Nonce,
                format!(
                    "the nonce {:?} is not the action's id {:?}",
                    h.nonce,
                    payload_id.unwrap_or_default()
                ),
            ));
        }
        Ok(Admit::Signed(Verified {
            payload: env.payload,
            kid: env.header.kid,
            nonce: env.header.nonce,
            exp: env.header.exp,
        }))
    }
}

/// The `id` and `action` an action claims (empty when absent).
fn claimed(v: &Value) -> (String, String) {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    (s("id"), s("action"))
}

/// Signs `action` (the exact bytes to be run, a JSON object with an `id`)
/// for the device `aud`, valid from `iat` to `exp` (Unix seconds), with
/// the key `kid`. Returns the envelope as JSON text.
pub fn sign(
    key: &SigningKey,
    kid: &str,
    aud: &str,
    iat: i64,
    exp: i64,
    action: &[u8],
) -> Result<String, String> {
    let v: Value =
        serde_json::from_slice(action).map_err(|e| format!("the action is not valid JSON: {e}"))?;
    if is_envelope(&v) {
        return Err("the action is already signed".into());
    }
    let id = match v.get("id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err("the action needs an \"id\" string: it is the signature's nonce".into()),
    };
    keys::check_kid(kid)?;
    if aud.is_empty() {
        return Err("the audience (device id or serial) is empty".into());
    }
    if exp <= iat {
        return Err("the signature must expire after it is issued".into());
    }
    let header = json!({"alg": ALG, "kid": kid, "aud": aud, "iat": iat, "exp": exp, "nonce": id});
    let protected = URL_SAFE_NO_PAD.encode(header.to_string());
    let payload = URL_SAFE_NO_PAD.encode(action);
    let signature = key.sign(format!("{protected}.{payload}").as_bytes());
    Ok(json!({
        "protected": protected,
        "payload": payload,
        "signature": URL_SAFE_NO_PAD.encode(signature.to_bytes()),
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn policy(required: bool) -> Policy {
        Policy::new(
            [
                ("a".to_string(), key(1).verifying_key()),
                ("b".to_string(), key(2).verifying_key()),
            ],
            required,
            Duration::from_secs(60),
            Duration::from_secs(3600),
        )
    }

    const ACTION: &[u8] = br#"{"id":"x1","action":"install","snap":"hello","data":""}"#;

    fn signed(k: u8, kid: &str, aud: &str, iat: i64, exp: i64, action: &[u8]) -> Vec<u8> {
        sign(&key(k), kid, aud, iat, exp, action)
            .unwrap()
            .into_bytes()
    }

    fn refusal(p: &Policy, bytes: &[u8]) -> Refusal {
        p.admit(bytes, &["dev", "serial-1"], NOW).unwrap_err()
    }

    #[test]
    fn a_signed_action_passes_with_either_key_and_keeps_its_bytes() {
        let p = policy(true);
        for (k, kid) in [(1, "a"), (2, "b")] {
            let env = signed(k, kid, "serial-1", NOW, NOW + 600, ACTION);
            match p.admit(&env, &["dev", "serial-1"], NOW).unwrap() {
                Admit::Signed(v) => {
                    assert_eq!(v.payload, ACTION);
                    assert_eq!((v.kid.as_str(), v.nonce.as_str()), (kid, "x1"));
                    assert_eq!(v.exp, NOW + 600);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn unsigned_actions_pass_only_when_not_required() {
        assert!(matches!(
            policy(false).admit(ACTION, &["dev"], NOW),
            Ok(Admit::Unsigned(b)) if b == ACTION
        ));
        let r = refusal(&policy(true), ACTION);
        assert_eq!(
            (r.check, r.id.as_str(), r.action.as_str()),
            (Check::Unsigned, "x1", "install")
        );
        assert!(r.message().starts_with("refused, not run: unsigned:"));
        // Not JSON at all: refused as unsigned too, without an id.
        assert_eq!(refusal(&policy(true), b"{nope").check, Check::Unsigned);
    }

    #[test]
    fn a_signed_action_is_checked_even_when_signatures_are_optional() {
        let env = signed(3, "a", "dev", NOW, NOW + 60, ACTION);
        assert_eq!(refusal(&policy(false), &env).check, Check::BadSignature);
    }

    #[test]
    fn each_check_refuses_and_says_which() {
        let p = policy(true);
        let ok = |k, kid, aud, iat, exp| signed(k, kid, aud, iat, exp, ACTION);
        let cases: Vec<(Vec<u8>, Check, &str)> = vec![
            (ok(1, "c", "dev", NOW, NOW + 60), Check::UnknownKey, "\"c\""),
            (
                ok(2, "a", "dev", NOW, NOW + 60),
                Check::BadSignature,
                "\"a\"",
            ),
            (
                ok(1, "a", "other", NOW, NOW + 60),
                Check::WrongAudience,
                "other",
            ),
            (
                ok(1, "a", "dev", NOW - 700, NOW - 61),
                Check::Expired,
                "dms.signing.skew",
            ),
            (
                ok(1, "a", "dev", NOW + 61, NOW + 600),
                Check::NotYetValid,
                "future",
            ),
            (
                ok(1, "a", "dev", NOW, NOW + 3601),
                Check::TooLongLived,
                "dms.signing.lifetime",
            ),
        ];
        for (env, check, detail) in cases {
            let r = refusal(&p, &env);
            assert_eq!(r.check, check, "{}", r.message());
            assert!(r.message().contains(detail), "{}", r.message());
            assert_eq!(r.id, "x1", "the answer carries the claimed id");
            assert_eq!(r.action, "install");
        }
        // Within the skew: fine.
        assert!(p
            .admit(&ok(1, "a", "dev", NOW + 59, NOW + 600), &["dev"], NOW)
            .is_ok());
        assert!(p
            .admit(&ok(1, "a", "dev", NOW - 600, NOW - 59), &["dev"], NOW)
            .is_ok());
    }

    #[test]
    fn a_changed_payload_or_header_breaks_the_signature() {
        let p = policy(true);
        let env: Value =
            serde_json::from_slice(&signed(1, "a", "dev", NOW, NOW + 60, ACTION)).unwrap();
        let mut other_payload = env.clone();
        other_payload["payload"] =
            json!(URL_SAFE_NO_PAD
                .encode(br#"{"id":"x1","action":"remove","snap":"hello","data":""}"#));
        let mut other_header = env.clone();
        other_header["protected"] = json!(URL_SAFE_NO_PAD.encode(
            json!({"alg":"EdDSA","kid":"a","aud":"dev","iat":NOW,"exp":NOW+60,"nonce":"x2"})
                .to_string()
        ));
        for e in [other_payload, other_header] {
            let r = refusal(&p, e.to_string().as_bytes());
            assert_eq!(r.check, Check::BadSignature, "{}", r.message());
        }
    }

    #[test]
    fn the_nonce_is_the_action_id() {
        // A header whose nonce is another id, signed by a good key.
        let k = key(1);
        let protected = URL_SAFE_NO_PAD.encode(
            json!({"alg":"EdDSA","kid":"a","aud":"dev","iat":NOW,"exp":NOW+60,"nonce":"zz"})
                .to_string(),
        );
        let payload = URL_SAFE_NO_PAD.encode(ACTION);
        let sig = k.sign(format!("{protected}.{payload}").as_bytes());
        let env = json!({"protected": protected, "payload": payload,
            "signature": URL_SAFE_NO_PAD.encode(sig.to_bytes())});
        let r = refusal(&policy(true), env.to_string().as_bytes());
        assert_eq!(r.check, Check::Nonce, "{}", r.message());
    }

    #[test]
    fn malformed_envelopes_are_refused_with_the_reason() {
        let good: Value =
            serde_json::from_slice(&signed(1, "a", "dev", NOW, NOW + 60, ACTION)).unwrap();
        let with = |k: &str, v: Value| {
            let mut e = good.clone();
            e[k] = v;
            e.to_string()
        };
        let header = |h: Value| with("protected", json!(URL_SAFE_NO_PAD.encode(h.to_string())));
        let cases = [
            (with("header", json!({"kid": "a"})), "unprotected"),
            (with("extra", json!(1)), "unknown member"),
            (with("signature", json!(5)), "must be a string"),
            (with("signature", json!("AAAA")), "64 bytes"),
            (with("payload", json!("a=")), "base64url"),
            (header(json!({"alg":"HS256"})), "EdDSA"),
            (header(json!({"alg":"none"})), "EdDSA"),
            (header(json!({"alg":"EdDSA","crit":["x"]})), "crit"),
            (header(json!({"alg":"EdDSA","kid":"a"})), "no aud"),
            (
                header(
                    json!({"alg":"EdDSA","kid":"a","aud":"dev","iat":"now","exp":1,"nonce":"x1"}),
                ),
                "number",
            ),
            (
                header(json!({"alg":"EdDSA","kid":"a","aud":[],"iat":1,"exp":2,"nonce":"x1"})),
                "aud",
            ),
            (json!({"signature": "x"}).to_string(), "missing"),
        ];
        for (env, why) in cases {
            let r = refusal(&policy(false), env.as_bytes());
            assert_eq!(r.check, Check::Malformed, "{env}: {}", r.message());
            assert!(r.message().contains(why), "{env}: {}", r.message());
        }
    }

    #[test]
    fn the_signer_refuses_what_it_cannot_sign() {
        let k = key(1);
        assert!(sign(&k, "a", "dev", NOW, NOW + 1, b"[1]").is_err());
        assert!(sign(&k, "a", "dev", NOW, NOW + 1, br#"{"action":"list"}"#).is_err());
        assert!(sign(&k, "a b", "dev", NOW, NOW + 1, ACTION).is_err());
        assert!(sign(&k, "a", "dev", NOW, NOW, ACTION).is_err());
        let env = sign(&k, "a", "dev", NOW, NOW + 1, ACTION).unwrap();
        assert!(sign(&k, "a", "dev", NOW, NOW + 1, env.as_bytes()).is_err());
    }
}
