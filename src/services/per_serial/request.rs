//! The `required-install` payload:
//! `{"id":"..","snaps":[{"name":"x","channel":"stable","track":"latest"}]}`,
//! where `snaps` may also be one object. Names are checked by snapd's rules
//! and channels by their shape, so nothing odd reaches snapd.

use crate::snapd::SnapName;
use serde_json::Value;

/// An install request of the per-serial tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredInstall {
    /// The request's id (its results carry it).
    pub id: String,
    /// The snaps to install, in order.
    pub snaps: Vec<RequiredSnap>,
}

/// One snap to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredSnap {
    /// The snap (a valid snap name).
    pub name: SnapName,
    /// `track/risk` (`latest/stable` when neither is given).
    pub channel: String,
}

/// A refusal: the id when it could be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The id, or empty.
    pub id: String,
    /// Why it was refused.
    pub message: String,
}

const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_SNAPS: usize = 256;

/// Reads an install request, bounded in size and count.
pub fn parse(payload: &[u8]) -> Result<RequiredInstall, Refusal> {
    let refuse = |id: &str, m: String| Refusal {
        id: id.to_string(),
        message: m,
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(refuse(
            "",
            format!("payload larger than {MAX_PAYLOAD} bytes"),
        ));
    }
    let v: Value = serde_json::from_slice(payload)
        .map_err(|e| refuse("", format!("payload is not valid JSON: {e}")))?;
    let id = match v.get("id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => return Err(refuse("", "payload needs an \"id\" string".into())),
    };
    let list: Vec<&Value> = match v.get("snaps") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(o @ Value::Object(_)) => vec![o],
        _ => {
            return Err(refuse(
                &id,
                "payload needs \"snaps\": a snap object or an array of them".into(),
            ))
        }
    };
    if list.is_empty() || list.len() > MAX_SNAPS {
        return Err(refuse(
            &id,
            format!("\"snaps\" must list 1 to {MAX_SNAPS} snaps"),
        ));
    }
    let mut snaps: Vec<RequiredSnap> = Vec::with_capacity(list.len());
    for s in list {
        let text = |k: &str| -> Result<Option<String>, Refusal> {
            match s.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(t)) if t.trim().is_empty() => Ok(None),
                Some(Value::String(t)) => Ok(Some(t.trim().to_string())),
                Some(_) => Err(refuse(&id, format!("snap field \"{k}\" must be a string"))),
            }
        };
        let name =
            text("name")?.ok_or_else(|| refuse(&id, "every snap needs a \"name\"".into()))?;
        let name = SnapName::parse(&name).map_err(|e| refuse(&id, e.to_string()))?;
        let channel = channel(text("track")?, text("channel")?).map_err(|m| refuse(&id, m))?;
        if snaps.iter().any(|r| r.name == name) {
            return Err(refuse(&id, format!("snap {name} is listed twice")));
        }
        snaps.push(RequiredSnap { name, channel });
    }
    Ok(RequiredInstall { id, snaps })
}

/// snapd's risk levels, most stable first.
pub const RISKS: [&str; 4] = ["stable", "candidate", "beta", "edge"];

fn is_risk(s: &str) -> bool {
    RISKS.contains(&s)
}

/// `track/risk` from the payload's `track` and `channel`.
///
/// The two DMS generations fill the pair differently: the schema says
/// `{"channel":"stable","track":"latest"}`, dmscore sends
/// `{"channel":"latest","track":"stable"}`. So the risk is whichever of the
/// two is a risk, the other is the track; a risk is never taken as a track
/// and no branch is ever built from the pair. A complete channel
/// (`4.0/candidate`, `latest/stable/fix`) may be given in `channel` alone.
fn channel(track: Option<String>, channel: Option<String>) -> Result<String, String> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
            && !s.contains("//")
            && !s.starts_with('/')
            && !s.ends_with('/')
    };
    let unknown = |given: &str| {
        format!(
            "channel {given:?} names no risk: give one of {} (with a track or not)",
            RISKS.join(", ")
        )
    };
    let full = match (track, channel) {
        (None, None) => "latest/stable".to_string(),
        (None, Some(c)) if c.contains('/') => {
            let parts: Vec<&str> = c.split('/').collect();
            match parts.as_slice() {
                // risk/branch
                [risk, _] if is_risk(risk) => format!("latest/{c}"),
                [_, risk] | [_, risk, _] if is_risk(risk) => c.clone(),
                _ => return Err(unknown(&c)),
            }
        }
        (Some(t), Some(c)) if t.contains('/') || c.contains('/') => {
            return Err(format!(
                "give a complete channel in \"channel\" alone, or a track and a risk: not track {t:?} with channel {c:?}"
            ))
        }
        (None, Some(one)) | (Some(one), None) if is_risk(&one) => format!("latest/{one}"),
        // `4.0/candidate` as a track would become `4.0/candidate/stable`:
        // a branch nobody asked for (found by fuzzing).
        (Some(t), None) if t.contains('/') => {
            return Err(format!(
                "track {t:?} is not a track name: give a complete channel in \"channel\" alone"
            ))
        }
        (Some(track), None) => format!("{track}/stable"),
        (None, Some(c)) => return Err(unknown(&c)),
        (Some(a), Some(b)) => match (is_risk(&a), is_risk(&b)) {
            (false, true) => format!("{a}/{b}"),
            (true, false) => format!("{b}/{a}"),
            (true, true) => {
                return Err(format!(
                    "track {a:?} and channel {b:?} are both risks; one must be the track"
                ))
            }
            (false, false) => return Err(unknown(&format!("{a}/{b}"))),
        },
    };
    if ok(&full) && full.split('/').count() <= 3 {
        Ok(full)
    } else {
        Err(format!(
            "channel {full:?} is not a valid track/risk channel"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_or_an_array() {
        let one = parse(br#"{"id":"a","snaps":{"name":"x"}}"#).unwrap();
        assert_eq!(one.snaps.len(), 1);
        assert_eq!(one.snaps[0].channel, "latest/stable");
        let many = parse(
            br#"{"id":"b","snaps":[{"name":"x","channel":"edge"},{"name":"y","track":"22","channel":"beta"},{"name":"z","channel":"4.0/candidate"},{"name":"w","track":"2"}]}"#,
        )
        .unwrap();
        let ch: Vec<&str> = many.snaps.iter().map(|s| s.channel.as_str()).collect();
        assert_eq!(ch, ["latest/edge", "22/beta", "4.0/candidate", "2/stable"]);
    }

    #[test]
    fn both_orders_of_the_pair_mean_the_same_channel() {
        let ch = |p: &str| parse(p.as_bytes()).map(|r| r.snaps[0].channel.clone());
        // dmscore's order (fixture 30) and the schema's.
        for p in [
            r#"{"id":"a","snaps":[{"channel":"latest","name":"x","track":"stable"}]}"#,
            r#"{"id":"a","snaps":[{"channel":"stable","name":"x","track":"latest"}]}"#,
            r#"{"id":"a","snaps":[{"name":"x","track":"stable"}]}"#,
            r#"{"id":"a","snaps":[{"name":"x","channel":"latest/stable"}]}"#,
        ] {
            assert_eq!(ch(p).unwrap(), "latest/stable", "{p}");
        }
        assert_eq!(
            ch(r#"{"id":"a","snaps":[{"name":"x","track":"edge","channel":"22"}]}"#).unwrap(),
            "22/edge"
        );
        assert_eq!(
            ch(r#"{"id":"a","snaps":[{"name":"x","channel":"stable/hotfix-1"}]}"#).unwrap(),
            "latest/stable/hotfix-1"
        );
        // Never a risk as a track, never a branch from the pair.
        for (p, m) in [
            (
                r#"{"id":"a","snaps":[{"name":"x","channel":"latest"}]}"#,
                "names no risk",
            ),
            (
                r#"{"id":"a","snaps":[{"name":"x","channel":"hardened","track":"latest"}]}"#,
                "names no risk",
            ),
            (
                r#"{"id":"a","snaps":[{"name":"x","channel":"stable","track":"edge"}]}"#,
                "both risks",
            ),
            (
                r#"{"id":"a","snaps":[{"name":"x","channel":"stable/x","track":"latest"}]}"#,
                "alone",
            ),
            (
                r#"{"id":"a","snaps":[{"name":"x","channel":"latest/hardened"}]}"#,
                "names no risk",
            ),
            // A channel in `track` alone: not `4.0/candidate/stable`
            // (fuzz/corpus/per_serial_request/regress-track-with-a-slash).
            (
                r#"{"id":"a","snaps":[{"name":"x","track":"4.0/candidate"}]}"#,
                "not a track name",
            ),
            (
                r#"{"id":"a","snaps":[{"name":"x","track":"ltebe/tast"}]}"#,
                "not a track name",
            ),
        ] {
            let e = ch(p).unwrap_err();
            assert!(e.message.contains(m), "{p}: {}", e.message);
        }
    }

    #[test]
    fn refusals_name_the_problem_and_keep_the_id() {
        for (p, id, m) in [
            (&b"nope"[..], "", "not valid JSON"),
            (br#"{"snaps":[]}"#, "", "\"id\""),
            (br#"{"id":"x"}"#, "x", "\"snaps\""),
            (br#"{"id":"x","snaps":[]}"#, "x", "1 to"),
            (
                br#"{"id":"x","snaps":[{"channel":"edge"}]}"#,
                "x",
                "\"name\"",
            ),
            (
                br#"{"id":"x","snaps":[{"name":"../etc"}]}"#,
                "x",
                "snap name",
            ),
            (
                br#"{"id":"x","snaps":[{"name":"a","channel":"x y"}]}"#,
                "x",
                "channel",
            ),
            (
                br#"{"id":"x","snaps":[{"name":"a","channel":5}]}"#,
                "x",
                "must be a string",
            ),
            (
                br#"{"id":"x","snaps":[{"name":"a"},{"name":"a"}]}"#,
                "x",
                "twice",
            ),
        ] {
            let r = parse(p).unwrap_err();
            assert_eq!(r.id, id, "{}", String::from_utf8_lossy(p));
            assert!(
                r.message.contains(m),
                "{} -> {}",
                String::from_utf8_lossy(p),
                r.message
            );
        }
    }
}
