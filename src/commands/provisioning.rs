//! `iot-agent provisioning status`: the provisioned certificate (subject,
//! issuer, validity, renewal time), the CA bundle, and where provisioning
//! stands, as the daemon last recorded it. Reads files only: works whether
//! or not the daemon runs.

use super::write_stdout;
use crate::config::Config;
use crate::subsystems::provisioning::{self, fmt_s, store::Store};
use serde_json::json;

/// Prints the provisioned certificate's state (`iot-agent provisioning status`).
pub fn status(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let c = &config.provisioning;
    let store = Store::new(c.dir.path());
    let recorded = store.state();
    let now = crate::clock::now_s();
    let certificate = match store.identity() {
        Ok(Some(id)) => {
            let life = (id.not_after - id.not_before).max(0) as f64;
            let renew = id.not_before + (life * c.renew.get()) as i64;
            json!({
                "file": store.identity_path(),
                "subject": id.subject,
                "issuer": id.issuer,
                "not-before": fmt_s(id.not_before),
                "not-after": fmt_s(id.not_after),
                "expired": id.not_after <= now,
                "renewal": fmt_s(renew),
            })
        }
        Ok(None) => serde_json::Value::Null,
        Err(e) => json!({"error": e}),
    };
    let state = if !provisioning::enabled(config) {
        "off".to_string()
    } else if recorded.state.is_empty() {
        "not-started".to_string()
    } else {
        recorded.state.clone()
    };
    let message = if !provisioning::enabled(config) {
        "provisioning.url is not set".to_string()
    } else if recorded.message.is_empty() {
        "the agent has not run provisioning yet".to_string()
    } else {
        recorded.message.clone()
    };
    let doc = json!({
        "state": state,
        "message": message,
        "updated": (recorded.updated > 0).then(|| crate::clock::format_ns(recorded.updated * 1_000_000)),
        "url": c.url,
        "device": c.device,
        "certificate": certificate,
        "ca-bundle": store.ca_path().exists().then(|| store.ca_path()),
    });
    if as_json {
        return write_stdout(&(serde_json::to_string_pretty(&doc)? + "\n"));
    }
    let mut out = format!("state:       {state}\nmessage:     {message}\n");
    if let Some(u) = doc["updated"].as_str() {
        out += &format!("updated:     {u}\n");
    }
    out += &format!("url:         {}\ndevice:      {}\n", c.url, c.device);
    match &doc["certificate"] {
        serde_json::Value::Null => out += "certificate: none\n",
        cert if cert.get("error").is_some() => {
            out += &format!("certificate: unreadable: {}\n", cert["error"].as_str().unwrap_or(""))
        }
        cert => {
            out += &format!(
                "certificate: {}\n  issuer:    {}\n  valid:     {} .. {}{}\n  renewal:   {}\n  file:      {}\n",
                cert["subject"].as_str().unwrap_or(""),
                cert["issuer"].as_str().unwrap_or(""),
                cert["not-before"].as_str().unwrap_or(""),
                cert["not-after"].as_str().unwrap_or(""),
                if cert["expired"] == true { " (EXPIRED)" } else { "" },
                cert["renewal"].as_str().unwrap_or(""),
                store.identity_path().display(),
            )
        }
    }
    if store.ca_path().exists() {
        out += &format!("ca bundle:   {}\n", store.ca_path().display());
    }
    write_stdout(&out)
}
