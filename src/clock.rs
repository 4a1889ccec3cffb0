//! The one clock: "now" in the units the agent stores (Unix seconds for
//! the per-serial queue, milliseconds for the DMS ledger and the export
//! spool, nanoseconds for snapd's changes), and snapd's timestamps: RFC 3339
//! with nanoseconds (Go's `time.RFC3339Nano`), in UTC or with an offset,
//! compared as Unix nanoseconds.
//!
//! This is wall-clock time, for what is stored or shown. Waiting and
//! timeouts use `tokio::time` (monotonic, and paused in tests).
#![warn(missing_docs)]

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Unix nanoseconds of an RFC 3339 timestamp; `None` when it does not parse
/// or lies outside 1677..2262 (Go's zero time `0001-01-01T00:00:00Z`).
pub fn parse_ns(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

/// Now, in Unix seconds (0 before 1970: a board without a real-time clock).
pub fn now_s() -> i64 {
    now_ns().div_euclid(1_000_000_000).max(0)
}

/// Now, in Unix milliseconds (0 before 1970).
pub fn now_ms() -> i64 {
    now_ns().div_euclid(1_000_000).max(0)
}

/// Now, in Unix nanoseconds.
pub fn now_ns() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

/// Now as RFC 3339 in UTC, to the second (`2026-11-21T05:33:55Z`).
pub fn now_rfc3339_seconds() -> String {
    format_short(now_ns())
}

/// Now as RFC 3339 in UTC, with nanoseconds.
pub fn now_rfc3339() -> String {
    format_ns(now_ns())
}

/// Unix nanoseconds as RFC 3339 in UTC, with nanoseconds.
pub fn format_ns(ns: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Unix nanoseconds as `2026-11-21T05:33:55Z` (seconds), for tables.
pub fn format_short(ns: i64) -> String {
    format_ns(ns - ns.rem_euclid(1_000_000_000))
}

/// Nanoseconds in a std duration, saturating.
pub fn duration_ns(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapd_timestamps_parse_with_offsets_and_nanoseconds() {
        let utc = parse_ns("2026-11-21T05:33:55.867330386Z").unwrap();
        assert_eq!(utc % 1_000_000_000, 867_330_386);
        let off = parse_ns("2026-11-21T07:33:55.867330386+02:00").unwrap();
        assert_eq!(utc, off);
        assert_eq!(format_short(utc), "2026-11-21T05:33:55Z");
        assert_eq!(parse_ns(&format_ns(utc)), Some(utc));
        assert!(parse_ns("yesterday").is_none());
        assert!(parse_ns("").is_none());
        assert!(parse_ns("0001-01-01T00:00:00Z").is_none());
    }

    /// Corpus and random mutations of snapd timestamps (remote input):
    /// never a panic, and whatever parses formats back to the same instant.
    #[test]
    fn mutated_timestamps_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let corpus = [
            "2026-11-21T05:33:55.867330386Z",
            "2026-11-21T07:33:55+02:00",
            "1970-01-01T00:00:00Z",
            "2262-04-11T23:47:16.854775807Z",
            "9999-12-31T23:59:59.999999999-23:59",
        ];
        let bytes = b"0123456789-:.TZz+ \xff";
        for _ in 0..20_000 {
            let mut s = corpus[rng.random_range(0..corpus.len())]
                .as_bytes()
                .to_vec();
            for _ in 0..rng.random_range(0..4) {
                let i = rng.random_range(0..=s.len());
                match rng.random_range(0..3) {
                    0 if i < s.len() => s[i] = bytes[rng.random_range(0..bytes.len())],
                    1 if i < s.len() => {
                        s.remove(i);
                    }
                    _ => s.insert(i, bytes[rng.random_range(0..bytes.len())]),
                }
            }
            let text = String::from_utf8_lossy(&s);
            if let Some(ns) = parse_ns(&text) {
                assert_eq!(parse_ns(&format_ns(ns)), Some(ns), "{text}");
            }
        }
    }
}
