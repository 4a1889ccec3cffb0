//! The EST wire format (RFC 7030, updated by RFC 8951), shared by the
//! relay's EST server (`crate::relay::est`) and the agent's provisioning
//! client (`crate::subsystems::provisioning`): certs-only PKCS#7 bodies,
//! base64 that may or may not be line-wrapped, and HTTP Basic credentials.
//!
//! Everything here parses remote input, so every function returns an error
//! naming what was wrong and never panics (fuzzed: `fuzz/fuzz_targets/est.rs`).
//! The ASN.1 is the `cms` crate's; nothing is hand-rolled.

use base64::Engine;
use cms::cert::x509::Certificate;
use cms::cert::CertificateChoices;
use cms::content_info::ContentInfo;
use cms::signed_data::SignedData;
use der::{Decode, Encode};

/// The content type of `cacerts`, `simpleenroll` and `simplereenroll` answers.
pub const CERTS_ONLY: &str = "application/pkcs7-mime; smime-type=certs-only";
/// The content type of a CSR body.
pub const PKCS10: &str = "application/pkcs10";
/// The well-known path prefix of every EST operation.
pub const PREFIX: &str = "/.well-known/est";
/// Largest EST body either side reads (a CSR or a certificate bundle is a
/// few KiB; anything much larger is not EST).
pub const MAX_BODY: usize = 64 * 1024;

/// OID of CMS SignedData (RFC 5652).
const ID_SIGNED_DATA: der::oid::ObjectIdentifier =
    der::oid::ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");

/// Decodes base64 with or without line breaks (servers and clients differ;
/// RFC 8951 says to ignore Content-Transfer-Encoding and accept both).
pub fn decode_base64(body: &[u8]) -> Result<Vec<u8>, String> {
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if compact.is_empty() {
        return Err("the body is empty (expected base64 of DER)".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .map_err(|e| format!("the body is not base64: {e}"))
}

/// Encodes base64 unwrapped: the form every reader takes (strongSwan
/// cannot read wrapped input).
pub fn encode_base64(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// A certs-only PKCS#7 SignedData (no signers, no content) holding `certs`
/// (DER), as DER.
pub fn certs_only(certs: &[Vec<u8>]) -> Result<Vec<u8>, String> {
    let parsed = certs
        .iter()
        .map(|d| Certificate::from_der(d).map_err(|e| format!("not a certificate: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    ContentInfo::try_from(parsed)
        .and_then(|ci| ci.to_der())
        .map_err(|e| format!("cannot encode the certificates as PKCS#7: {e}"))
}

/// The certificates (DER) of a certs-only PKCS#7 (DER). Other content
/// (signers, CRLs) is ignored; no certificate at all is an error.
pub fn parse_certs_only(der: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let ci = ContentInfo::from_der(der).map_err(|e| format!("not a PKCS#7 ContentInfo: {e}"))?;
    if ci.content_type != ID_SIGNED_DATA {
        return Err(format!(
            "PKCS#7 content type {} is not signed-data",
            ci.content_type
        ));
    }
    let sd: SignedData = ci
        .content
        .decode_as()
        .map_err(|e| format!("not a PKCS#7 SignedData: {e}"))?;
    let mut out = Vec::new();
    for choice in sd.certificates.map(|s| s.0.into_vec()).unwrap_or_default() {
        if let CertificateChoices::Certificate(c) = choice {
            out.push(
                c.to_der()
                    .map_err(|e| format!("cannot re-encode a certificate: {e}"))?,
            );
        }
    }
    if out.is_empty() {
        return Err("the PKCS#7 holds no certificate".into());
    }
    Ok(out)
}

/// A base64 certs-only body (wrapped or not) to its certificates (DER).
pub fn parse_certs_body(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    parse_certs_only(&decode_base64(body)?)
}

/// HTTP Basic credentials: `(user, password)` of an `Authorization` value.
/// The password may contain `:`; the user may not be empty.
pub fn parse_basic(header: &str) -> Result<(String, String), String> {
    let (scheme, rest) = header
        .trim()
        .split_once(' ')
        .ok_or("the Authorization header is not `Basic <base64>`")?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(format!("authorization scheme {scheme:?} is not Basic"));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .map_err(|_| "the Basic credentials are not base64".to_string())?;
    let text =
        String::from_utf8(raw).map_err(|_| "the Basic credentials are not UTF-8".to_string())?;
    let (user, pass) = text
        .split_once(':')
        .ok_or("the Basic credentials have no `user:password` colon")?;
    if user.is_empty() {
        return Err("the Basic user (the device id) is empty".into());
    }
    Ok((user.to_string(), pass.to_string()))
}

/// The `Authorization` value for `user:password`.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// A `Retry-After` value in seconds (RFC 7030 §4.2.3 allows an HTTP date
/// too; a date in the past or unreadable means "soon": `None`).
pub fn parse_retry_after(value: &str) -> Option<std::time::Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let when = httpdate(v)?;
    let now = time::OffsetDateTime::now_utc();
    (when > now).then(|| (when - now).unsigned_abs())
}

fn httpdate(v: &str) -> Option<time::OffsetDateTime> {
    let fmt = time::format_description::parse_borrowed::<2>(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT",
    )
    .ok()?;
    time::PrimitiveDateTime::parse(v, &fmt)
        .ok()
        .map(|p| p.assume_utc())
}

/// What the `EST` fuzz target drives: every parser of remote input here.
pub fn fuzz_all(data: &[u8]) {
    let _ = decode_base64(data);
    let _ = parse_certs_only(data);
    let _ = parse_certs_body(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_basic(text);
        let _ = parse_retry_after(text);
    }
    let _ = crate::relay::ca::parse_csr(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn certs_only_round_trips_wrapped_and_unwrapped() {
        let (a, b) = (cert(), cert());
        let der = certs_only(&[a.clone(), b.clone()]).unwrap();
        let flat = encode_base64(&der);
        let wrapped: String = flat
            .as_bytes()
            .chunks(64)
            .map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap()))
            .collect();
        for body in [flat.as_bytes(), wrapped.as_bytes()] {
            let mut got = parse_certs_body(body).unwrap();
            got.sort();
            let mut want = vec![a.clone(), b.clone()];
            want.sort();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn bad_bodies_are_errors() {
        assert!(decode_base64(b"").unwrap_err().contains("empty"));
        assert!(decode_base64(b"!!!").unwrap_err().contains("base64"));
        assert!(parse_certs_only(b"\x30\x03\x02\x01\x01").is_err());
        assert!(parse_certs_only(&certs_only(&[]).unwrap())
            .unwrap_err()
            .contains("no certificate"));
    }

    #[test]
    fn basic_credentials() {
        assert_eq!(
            parse_basic(&basic("dev-1", "a:b")).unwrap(),
            ("dev-1".into(), "a:b".into())
        );
        assert!(parse_basic("Bearer x").is_err());
        assert!(parse_basic(&basic("", "x")).is_err());
        assert!(parse_basic("Basic ???").is_err());
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(
            parse_retry_after(" 7 "),
            Some(std::time::Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT"), None);
        assert_eq!(parse_retry_after("soon"), None);
    }
}
