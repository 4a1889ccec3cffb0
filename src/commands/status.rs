//! `iot-agent status`: is the daemon running, and where does enrollment stand.

use super::write_stdout;
use crate::config::Config;
use crate::control;
use crate::identity::{Store, Stored};
use serde_json::json;

/// Prints the enrollment state and the credentials' summary (`iot-agent status`).
pub fn run(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let store = Store::from_config(config);
    let daemon = control::running_daemon(config.data_dir());
    let recorded = store.read_state();
    let enrollment = match store.load() {
        Stored::Valid { credentials: c, .. } => json!({
            "state": "enrolled",
            "device-id": c.device_id,
            "organization": c.org_id,
            "broker": format!("{}:{}", c.mqtt_host, c.mqtt_port),
            "identity-url": store.params().map(|p| p.url),
        }),
        Stored::Corrupt(why) => json!({
            "state": "corrupt",
            "message": format!("stored credentials are unusable ({why}); the agent enrolls again"),
        }),
        Stored::Missing => match &recorded {
            Some(r) => json!({"state": r.state.name(), "message": r.message, "since": r.since}),
            None => {
                json!({"state": "not-enrolled", "message": "no credentials stored; the agent enrolls when it runs"})
            }
        },
    };
    let dms = dms_link(config);
    let doc = json!({
        "daemon": {"running": daemon.is_some(), "pid": daemon},
        "enrollment": enrollment,
        "dms": dms,
        "data-dir": config.data_dir(),
    });
    if as_json {
        return write_stdout(&(serde_json::to_string_pretty(&doc)? + "\n"));
    }
    let e = &doc["enrollment"];
    let mut out = format!(
        "daemon:      {}\nenrollment:  {}\n",
        match daemon {
            Some(pid) => format!("running (pid {pid})"),
            None => "not running".into(),
        },
        e["state"].as_str().unwrap_or("")
    );
    for (label, key) in [
        ("device id", "device-id"),
        ("organization", "organization"),
        ("broker", "broker"),
        ("identity", "identity-url"),
        ("detail", "message"),
        ("since", "since"),
    ] {
        if let Some(v) = e[key].as_str() {
            out.push_str(&format!("{:13}{v}\n", format!("{label}:")));
        }
    }
    let d = &doc["dms"];
    let link = match d["connected"].as_bool() {
        Some(true) => "connected".to_string(),
        Some(false) => format!(
            "not connected ({})",
            d["detail"].as_str().unwrap_or("no detail")
        ),
        None => d["message"].as_str().unwrap_or("").to_string(),
    };
    out.push_str(&format!("{:13}{link}\n", "dms link:"));
    if let Some(n) = d["session-restarts"].as_i64().filter(|n| *n > 0) {
        out.push_str(&format!("{:13}{n}\n", "restarts:"));
    }
    write_stdout(&out)
}

/// The DMS link as the daemon last recorded it in its ledger.
fn dms_link(config: &Config) -> serde_json::Value {
    use crate::services::dms::ledger::Ledger;
    let path = config.dms.ledger.location.path();
    match Ledger::read_link(path) {
        Ok(Some(l)) => json!({
            "connected": l.connected,
            "detail": l.detail,
            "since": humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(l.since_ms.max(0) as u64)
            ).to_string(),
            "session-restarts": l.restarts,
        }),
        Ok(None) => json!({"message": "the daemon has not recorded the DMS link yet"}),
        Err(e) => json!({"message": format!("DMS link state unknown: {e}")}),
    }
}
