//! `iot-agent config`: the effective configuration and its sources.

use super::write_stdout;
use crate::config::{Effective, Loaded};
use std::fmt::Write;

/// Prints every effective value and its source (`iot-agent config [--json]`).
pub fn print(loaded: &Loaded, json: bool) -> anyhow::Result<()> {
    write_stdout(&render(loaded, json)?)
}

/// Prints values with their sources (also `iot-relay config`).
pub fn print_values(values: Vec<Effective>, json: bool) -> anyhow::Result<()> {
    write_stdout(&render_values(values, json)?)
}

fn render(loaded: &Loaded, json: bool) -> anyhow::Result<String> {
    render_values(loaded.effective(), json)
}

fn render_values(values: Vec<Effective>, json: bool) -> anyhow::Result<String> {
    if json {
        let map: serde_json::Map<String, serde_json::Value> = values
            .into_iter()
            .map(|e| {
                let v = serde_json::json!({"value": e.value, "source": e.source});
                (e.key, v)
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&map)? + "\n");
    }
    let rows: Vec<(String, String, String)> = values
        .iter()
        .map(|e| {
            let v = match &e.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (e.key.clone(), v, e.source.to_string())
        })
        .collect();
    let kw = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let vw = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    let mut out = String::new();
    writeln!(out, "{:kw$}  {:vw$}  SOURCE", "KEY", "VALUE")?;
    for (k, v, s) in rows {
        writeln!(out, "{k:kw$}  {v:vw$}  {s}")?;
    }
    Ok(out)
}
