//! Names as snapd checks them (`naming.ValidateInstance`), channels as it
//! normalizes them, and store-like snap ids.

/// snapd's `naming.ValidateInstance`, with its messages: the snap name
/// (before the first `_`) is 2-40 of `[a-z0-9-]` with at least one letter
/// and no leading, trailing or doubled hyphen; an instance key after the
/// `_` is 1-10 of `[a-z0-9]`.
pub(super) fn validate_instance(name: &str) -> Result<(), String> {
    let (snap, key) = match name.split_once('_') {
        Some((s, k)) => (s, Some(k)),
        None => (name, None),
    };
    validate_snap(snap)?;
    match key {
        Some(k)
            if !(1..=10).contains(&k.len())
                || !k
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()) =>
        {
            Err(format!("invalid instance key: {k:?}"))
        }
        _ => Ok(()),
    }
}

/// snapd's `naming.ValidateSnap`.
fn validate_snap(name: &str) -> Result<(), String> {
    let ok = (2..=40).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("invalid snap name: {name:?}"))
    }
}

/// `stable` -> `latest/stable`, `24` -> `24/stable`, `24/edge` as is.
pub(super) fn normalize_channel(channel: &str) -> String {
    const RISKS: &[&str] = &["stable", "candidate", "beta", "edge"];
    match channel {
        "" => "latest/stable".into(),
        c if RISKS.contains(&c) => format!("latest/{c}"),
        c if !c.contains('/') => format!("{c}/stable"),
        c => c.to_string(),
    }
}

/// A stable 32-character snap id derived from the name.
pub(super) fn snap_id(name: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    (0..32)
        .map(|i| {
            for b in name.bytes().chain([i as u8]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            ALPHABET[(h % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}
