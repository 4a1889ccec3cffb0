//! The `iot-agent` command line: parsing and dispatch only; the commands
//! live in the library (`commands`, `agent`).
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use iot_agent::commands;
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
    /// SIGHUP makes it reload its enrollment.
    Run,
    /// Print the effective configuration, each value with the source it came from.
    Config {
        /// Print JSON: {"key": {"value": .., "source": {"kind": .., "detail": ..}}}.
        #[arg(long)]
        json: bool,
        /// Only check the configuration: exit 0 when valid, 1 with the reason.
        #[arg(long)]
        check: bool,
        /// Refuse unknown keys instead of warning about them (the snap's
        /// configure hook uses this, so `snap set` with a typo fails).
        #[arg(long)]
        strict: bool,
        /// Check, then print only a stable hash of the effective configuration
        /// (it changes exactly when a value the agent reads changes).
        #[arg(long, conflicts_with = "json")]
        fingerprint: bool,
    },
    /// Enroll with the identity service once: exit 0 when enrolled, 1 with the reason.
    Enroll,
    /// Forget the DMS registration: delete the credentials and make the agent enroll again.
    Unregister,
    /// Show whether the daemon runs and where enrollment stands.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the snap change history the agent keeps (oldest first), or show one change.
    /// Reads the database read-only: works while the daemon runs.
    Changes {
        #[command(subcommand)]
        show: Option<ChangesCommand>,
        /// Print JSON: the changes as snapd rendered them, tasks included.
        #[arg(long, global = true)]
        json: bool,
        /// Only changes with this status (Done, Error, Doing...); repeat or comma-separate.
        #[arg(long, value_name = "STATUS")]
        status: Vec<String>,
        /// Only changes of this kind (install-snap, refresh-snap...); repeat or comma-separate.
        #[arg(long, value_name = "KIND")]
        kind: Vec<String>,
        /// Only changes spawned since then: a duration back from now (2h, 3d) or an RFC 3339 time.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
    },
    /// Certificate provisioning over EST: show the certificate, its expiry and the state.
    Provisioning {
        #[command(subcommand)]
        command: ProvisioningCommand,
    },
    /// Store-and-forward telemetry: spool a message, show the backlog.
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Write the bundled nats-server's configuration (generated from this
    /// one, with passwords generated on first use) and print what happened:
    /// disabled, unchanged, written, reloaded or restart.
    NatsConfig {
        /// Send a running server SIGHUP when only its users changed.
        #[arg(long)]
        reload: bool,
        /// Outside a snap (scripts/run): when nats.url is the built-in
        /// default, use a free loopback port instead and print the URL to
        /// export as IOT_AGENT_NATS__URL.
        #[arg(long, conflicts_with = "reload")]
        local: bool,
    },
    /// Write the configuration as `nats-config` does, then run nats-server
    /// with it (what the snap's `nats` daemon runs).
    NatsServer,
    /// Sign an action JSON for one device with a private key (the operator's
    /// side of dms.signing; needs no agent or configuration), or make a key.
    /// Prints the signed envelope to publish in place of the action.
    Sign(commands::sign::SignArgs),
    /// Print the agent's version.
    Version,
}

#[derive(Subcommand)]
enum ChangesCommand {
    /// One change with its tasks (and the logs of its tasks).
    Show {
        /// The change id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ProvisioningCommand {
    /// The provisioned certificate (subject, validity, renewal) and the state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Spool one message durably (fsync'd before this returns); the daemon
    /// forwards it upstream. Data from DATA, --file, or standard input.
    Send {
        /// Stream name (letters, digits, '-', '_', dot-separated levels).
        #[arg(long)]
        stream: String,
        /// Read the message from this file.
        #[arg(long, value_name = "FILE", conflicts_with = "data")]
        file: Option<PathBuf>,
        /// The message itself.
        data: Option<String>,
    },
    /// Show the backlog, oldest age, drop counts, rates and upstream state.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// glibc malloc arenas of the daemon: one, shared by all its threads (see
/// `iot_agent::sys::limit_malloc_arenas`; `MALLOC_ARENA_MAX` overrides it).
const MALLOC_ARENAS: i32 = 1;

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
    if let Command::Version = cli.command {
        commands::write_stdout(&format!("iot-agent {}\n", env!("CARGO_PKG_VERSION")))?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Sign(args) = &cli.command {
        // The operator's machine: no configuration is read.
        return commands::sign::run(args);
    }
    let loaded = config::layers::load(&LoadOptions { file: cli.config })?;
    let warn = |w: &String| eprintln!("warning: {w}");
    match cli.command {
        Command::Version | Command::Sign(_) => unreachable!("handled above"),
        Command::Config {
            json,
            check,
            strict,
            fingerprint,
        } => {
            if strict {
                loaded.deny_unknown()?;
            }
            loaded.warnings().iter().for_each(warn);
            if fingerprint {
                commands::write_stdout(&format!("{}\n", loaded.fingerprint()))?;
            } else if !check {
                commands::config::print(&loaded, json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::NatsConfig { reload, local } => {
            if local {
                commands::nats::local_url(&loaded)
            } else {
                commands::nats::config(&loaded, reload)
            }
        }
        Command::NatsServer => commands::nats::serve(&loaded),
        Command::Enroll => commands::enroll::run(&loaded.config),
        Command::Unregister => commands::unregister::run(&loaded.config),
        Command::Status { json } => {
            commands::status::run(&loaded.config, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Changes {
            show,
            json,
            status,
            kind,
            since,
        } => {
            match show {
                Some(ChangesCommand::Show { id }) => {
                    commands::changes::show(&loaded.config, &id, json)?
                }
                None => {
                    let filter = iot_agent::subsystems::changes::store::Filter {
                        statuses: commands::changes::split_list(&status),
                        kinds: commands::changes::split_list(&kind),
                        since_ns: since
                            .as_deref()
                            .map(commands::changes::parse_since)
                            .transpose()?,
                    };
                    commands::changes::list(&loaded.config, &filter, json)?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Provisioning {
            command: ProvisioningCommand::Status { json },
        } => {
            commands::provisioning::status(&loaded.config, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { command } => match command {
            ExportCommand::Send { stream, file, data } => {
                let data = match (&data, &file) {
                    (Some(d), _) => commands::export::Data::Arg(d),
                    (None, Some(f)) => commands::export::Data::File(f),
                    (None, None) => commands::export::Data::Stdin,
                };
                commands::export::send(&loaded.config, &stream, data)
            }
            ExportCommand::Status { json } => {
                commands::export::status(&loaded.config, json)?;
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Run => {
            // Before any thread exists (docs/benchmarks.md, "Footprint").
            iot_agent::sys::limit_malloc_arenas(MALLOC_ARENAS);
            iot_agent::logging::init(&loaded.config.log.level);
            for w in &loaded.warnings() {
                tracing::warn!("{w}");
            }
            let rt = match loaded.config.runtime.workers {
                1 => tokio::runtime::Builder::new_current_thread(),
                n => {
                    let mut b = tokio::runtime::Builder::new_multi_thread();
                    if n > 1 {
                        b.worker_threads(n.into());
                    }
                    b
                }
            }
            .enable_all()
            .build()?;
            rt.block_on(iot_agent::agent::run(loaded.config))?;
            // Tasks still blocked on I/O must not hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_millis(500));
            Ok(ExitCode::SUCCESS)
        }
    }
}
