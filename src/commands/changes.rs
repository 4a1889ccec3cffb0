//! `iot-agent changes`: the change history, read-only, while the daemon
//! runs (SQLite in WAL mode lets a reader in beside the writer).

use super::write_stdout;
use crate::clock;
use crate::config::Config;
use crate::snapd::Change;
use crate::subsystems::changes::store::{Filter, Store, Stored};
use anyhow::{bail, Context};

/// `iot-agent changes [--status S] [--kind K] [--since T] [--json]`.
pub fn list(config: &Config, filter: &Filter, as_json: bool) -> anyhow::Result<()> {
    let store = open(config)?;
    let rows = store.list(filter)?;
    if as_json {
        let changes: Vec<serde_json::Value> = rows.iter().map(json_of).collect();
        return write_stdout(&(serde_json::to_string_pretty(&changes)? + "\n"));
    }
    if rows.is_empty() {
        return write_stdout("no changes in the history match\n");
    }
    let mut table = vec![row(["ID", "Status", "Spawn", "Ready", "Kind", "Summary"])];
    for c in &rows {
        table.push(row([
            &c.id,
            &c.status,
            &clock::format_short(c.spawn_ns),
            &ready_cell(c.ready_time.as_deref()),
            &c.kind,
            &c.summary,
        ]));
    }
    write_stdout(&render(&table))
}

/// `iot-agent changes show ID [--json]`: one change with its tasks.
pub fn show(config: &Config, id: &str, as_json: bool) -> anyhow::Result<()> {
    let store = open(config)?;
    let Some(stored) = store.get(id)? else {
        bail!(
            "change {id:?} is not in the history at {} (`iot-agent changes` lists what is)",
            store.path().display()
        );
    };
    if as_json {
        return write_stdout(&(serde_json::to_string_pretty(&json_of(&stored))? + "\n"));
    }
    let change = stored
        .change()
        .with_context(|| format!("change {id} is stored in a form this agent cannot read"))?;
    write_stdout(&render_change(&stored, &change))
}

fn open(config: &Config) -> anyhow::Result<Store> {
    let path = config.snaplogger.database.location.path();
    Store::open_read_only(path)
        .with_context(|| "cannot read the change history (snaplogger.database.location)")
}

/// The change as snapd rendered it (tasks included) plus when the agent
/// first saw it.
fn json_of(s: &Stored) -> serde_json::Value {
    let mut v = serde_json::from_str::<serde_json::Value>(&s.body)
        .unwrap_or_else(|_| serde_json::to_value(s).unwrap_or_default());
    if let Some(o) = v.as_object_mut() {
        o.insert("first-seen".into(), s.first_seen.clone().into());
    }
    v
}

fn ready_cell(ready_time: Option<&str>) -> String {
    ready_time
        .and_then(clock::parse_ns)
        .map(clock::format_short)
        .unwrap_or_else(|| "-".into())
}

fn render_change(s: &Stored, c: &Change) -> String {
    let mut out = String::new();
    let ready = ready_cell(s.ready_time.as_deref());
    for (label, value) in [
        ("id", s.id.as_str()),
        ("kind", &s.kind),
        ("summary", &s.summary),
        ("status", &s.status),
        ("spawn", &clock::format_short(s.spawn_ns)),
        ("ready", &ready),
        ("first seen", &s.first_seen),
    ] {
        out.push_str(&format!("{:12}{value}\n", format!("{label}:")));
    }
    if let Some(err) = s.err.as_deref().filter(|e| !e.is_empty()) {
        out.push_str("error:\n");
        for line in err.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out.push('\n');
    let mut table = vec![row(["Status", "Spawn", "Ready", "Summary"])];
    for t in &c.tasks {
        let status = serde_json::to_value(t.status)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        table.push(row([
            &status,
            &clock::parse_ns(&t.spawn_time)
                .map(clock::format_short)
                .unwrap_or_default(),
            &ready_cell(t.ready_time.as_deref()),
            &t.summary,
        ]));
    }
    out.push_str(&render(&table));
    let logged: Vec<_> = c.tasks.iter().filter(|t| !t.log.is_empty()).collect();
    if !logged.is_empty() {
        out.push_str("\n......................................................................\n");
        for t in logged {
            out.push_str(&format!("{}\n\n", t.summary));
            for line in &t.log {
                out.push_str(&format!("{line}\n"));
            }
            out.push('\n');
        }
    }
    out
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| c.replace(['\n', '\t'], " ")).collect()
}

/// Columns padded to their widest cell; the last one is not padded.
fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == cols {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

/// `--since`: a duration back from now (`2h`, `1d`) or an RFC 3339 time.
pub fn parse_since(s: &str) -> anyhow::Result<i64> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(clock::now_ns().saturating_sub(clock::duration_ns(d)));
    }
    clock::parse_ns(s).with_context(|| {
        format!("invalid --since {s:?}: write a duration such as \"2h\" or \"3d\", or an RFC 3339 time such as \"2026-11-21T05:00:00Z\"")
    })
}

/// `--status`/`--kind` values: repeated or comma separated.
pub fn split_list(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_lists_split() {
        let t = render(&[row(["ID", "Summary"]), row(["10", "a\nb"])]);
        assert_eq!(t, "ID  Summary\n10  a b\n");
        assert_eq!(
            split_list(&["Error, Done".into(), "Doing".into()]),
            ["Error", "Done", "Doing"]
        );
    }

    #[test]
    fn since_takes_durations_and_times() {
        let now = clock::now_ns();
        let two_h = parse_since("2h").unwrap();
        assert!((now - two_h - 7_200_000_000_000).abs() < 60_000_000_000);
        assert_eq!(
            parse_since("2026-11-21T05:00:00Z").unwrap(),
            clock::parse_ns("2026-11-21T05:00:00Z").unwrap()
        );
        let err = parse_since("last tuesday").unwrap_err().to_string();
        assert!(err.contains("last tuesday"), "{err}");
    }
}
