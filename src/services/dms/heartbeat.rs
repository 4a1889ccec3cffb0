//! The heartbeat: `{"orgId","deviceId","refresh","snapListHash",
//! "installedSnapsHash"}`. The DMS asks for `list` when a hash changes, so
//! both hashes are computed from exactly what `list` answers (sorted by
//! name): SHA-256, hex.

use super::actions::{self, Ctx};
use serde_json::{json, Value};

pub async fn heartbeat(ctx: &Ctx) -> Result<Value, String> {
    let list = actions::list(ctx).await?;
    let names: Vec<&str> = list
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    Ok(json!({
        "orgId": ctx.creds.org_id,
        "deviceId": ctx.creds.device_id,
        "refresh": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "snapListHash": sha256_hex(list.to_string().as_bytes()),
        "installedSnapsHash": sha256_hex(json!(names).to_string().as_bytes()),
    }))
}

pub fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_is_hex_of_the_digest() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
