//! The `iot-relay` command line: parsing and dispatch only; the relay
//! lives in the library (`iot_agent::relay`).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use iot_agent::relay;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "iot-relay",
    version,
    about = "The cloud half of the iot-agent tunnel: agents dial it, visitors reach device ports through it",
    long_about = "The cloud half of the iot-agent tunnel: agents dial its TLS agents' port with their \
device certificates; pipes (added through the ioFog-compatible mapping API) open relay ports whose \
visitors are carried to a device's local ports.\n\nConfiguration is layered: built-in defaults < \
config file < environment (IOT_RELAY_A__B=...)."
)]
struct Cli {
    /// Configuration file (TOML). Default: $SNAP_DATA/relay.toml in a snap,
    /// /etc/iot-relay/config.toml outside; a missing default file is fine.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run,
    /// Print the effective configuration, each value with the source it came from.
    Config {
        /// Print JSON: {"key": {"value": .., "source": {"kind": .., "detail": ..}}}.
        #[arg(long)]
        json: bool,
    },
    /// Sign an action JSON for one device with a private key, or make a key
    /// (the operator's side of the agent's dms.signing; reads no
    /// configuration). Prints the signed envelope to publish in place of the
    /// action; the same as `iot-agent sign`.
    Sign(iot_agent::commands::sign::SignArgs),
    /// List the relay's agents (asks the running relay's admin API).
    Agents {
        /// Print the JSON list instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the agents on the local network that answer a DNS-SD (mDNS)
    /// search: device id, address, port, TLS.
    Discover {
        /// How long to wait for answers.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the relay's version.
    Version,
}

/// How to reach the admin API; by default from the configuration.
#[derive(clap::Args)]
struct ApiArgs {
    /// The admin API's base URL. Default: from api.listen and dev.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// CA certificate (PEM file) that signs the API's certificate.
    /// Default: agents.ca, and the system roots.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iot-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if let Command::Version = cli.command {
        println!("iot-relay {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if let Command::Sign(args) = &cli.command {
        iot_agent::commands::sign::run(args)?;
        return Ok(());
    }
    if let Command::Discover { wait, json } = cli.command {
        return relay::discover::command(wait, json);
    }
    let loaded = relay::config::load(cli.config)?;
    match cli.command {
        Command::Version | Command::Sign(_) | Command::Discover { .. } => {
            unreachable!("handled above")
        }
        Command::Config { json } => {
            iot_agent::commands::config::print_values(loaded.effective(), json)
        }
        Command::Agents { json, api } => {
            relay::cli::agents(&loaded.config, api.url.as_deref(), api.ca.as_deref(), json)
        }
        Command::Run => {
            iot_agent::logging::init(&loaded.config.log.level);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let shutdown = iot_agent::supervisor::Shutdown::new();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{signal, SignalKind};
                    let (Ok(mut term), Ok(mut int)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) else {
                        return;
                    };
                    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                    stop.cancel();
                });
                relay::run(loaded.config, shutdown).await
            })?;
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            Ok(())
        }
    }
}
