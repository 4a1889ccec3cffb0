//! snapd's timestamps: RFC 3339 with nanoseconds (Go's `time.RFC3339Nano`),
//! in UTC or with an offset. Compared as Unix nanoseconds.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Unix nanoseconds of an RFC 3339 timestamp; `None` when it does not parse
/// or lies outside 1677..2262 (Go's zero time `0001-01-01T00:00:00Z`).
pub fn parse_ns(s: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos()).ok()
}

/// Now, in Unix nanoseconds.
pub fn now_ns() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX)
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
}
