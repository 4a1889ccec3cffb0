//! The `iot-agent` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use iot_agent::config::{self, layers::LoadOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "iot-agent",
    version,
    about = "Device-management agent for Ubuntu Core",
    long_about = "Device-management agent for Ubuntu Core: enrolls with the IoT Identity \
service, executes the device-management service's actions through snapd, and mirrors \
snapd's REST API onto NATS subjects.\n\nConfiguration is layered: built-in defaults < \
config file < snap configuration (snap set) < environment (IOT_AGENT_A__B=...)."
)]
struct Cli {
    /// Configuration file (TOML). Default: $SNAP_DATA/config.toml in a snap,
    /// /etc/iot-agent/config.toml outside; a missing default file is fine.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent daemon until SIGTERM or SIGINT (what the snap's `agent` app runs).
    Run,
    /// Print the effective configuration, each value with the source it came from.
    Config {
        /// Print JSON: {"key": {"value": .., "source": {"kind": .., "detail": ..}}}.
        #[arg(long)]
        json: bool,
        /// Only check the configuration: exit 0 when valid, 1 with the reason.
        #[arg(long)]
        check: bool,
    },
    /// Print the agent's version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("iot-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let opts = LoadOptions { file: cli.config };
    match cli.command {
        Command::Version => {
            write_stdout(&format!("iot-agent {}\n", env!("CARGO_PKG_VERSION")))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { json, check } => {
            let loaded = config::layers::load(&opts)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            if check {
                return Ok(ExitCode::SUCCESS);
            }
            print_config(&loaded, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let loaded = config::layers::load(&opts)?;
            iot_agent::logging::init(&loaded.config.log.level);
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(iot_agent::agent::run(loaded.config))?;
            // Tasks still blocked on I/O must not hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_config(loaded: &config::Loaded, json: bool) -> anyhow::Result<()> {
    let text = render_config(loaded, json)?;
    write_stdout(&text)
}

/// Writes to stdout; a closed pipe (`iot-agent config | head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn render_config(loaded: &config::Loaded, json: bool) -> anyhow::Result<String> {
    use std::fmt::Write;
    let values = loaded.effective();
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
    let width = values.iter().map(|e| e.key.len()).max().unwrap_or(0);
    let shown: Vec<(String, String, String)> = values
        .iter()
        .map(|e| {
            let v = match &e.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (e.key.clone(), v, e.source.to_string())
        })
        .collect();
    let vwidth = shown.iter().map(|s| s.1.len()).max().unwrap_or(0);
    let mut out = String::new();
    writeln!(out, "{:width$}  {:vwidth$}  SOURCE", "KEY", "VALUE")?;
    for (k, v, s) in shown {
        writeln!(out, "{k:width$}  {v:vwidth$}  {s}")?;
    }
    Ok(out)
}
