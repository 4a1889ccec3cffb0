//! `iot-remote`: the operator's side of the agent's remote terminal and
//! remote browser. The logic is in the library (`iot_agent::remote`).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "iot-remote",
    version,
    about = "Remote terminal and browser of a device running iot-agent, over its NATS or DMS MQTT broker",
    long_about = "Remote terminal and browser of a device running iot-agent.\n\n\
        DEVICE is where the device is reached: nats://HOST:PORT (its NATS server, directly or \
        through the fleet's cluster) or mqtt://HOST:PORT/DEVICE_ID (mqtts:// with TLS; the DMS \
        broker). The broker decides who may: with docs/nats-server.conf, the `operator` user."
)]
struct Cli {
    /// Broker user name.
    #[arg(long, env = "IOT_REMOTE_USER", default_value = "")]
    user: String,
    /// Broker password (better from the environment than on the command line).
    #[arg(
        long,
        env = "IOT_REMOTE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    password: String,
    /// mqtts://: a CA certificate (PEM) trusted besides the system's roots.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// mqtts://: a client certificate (PEM), for brokers that require one.
    #[arg(long, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// mqtts://: the client certificate's key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach this terminal to a shell on the device (raw mode; the window
    /// size follows; the terminal is restored on exit).
    Shell {
        /// nats://HOST:PORT or mqtt[s]://HOST:PORT/DEVICE_ID
        device: String,
        /// Run this command instead of an interactive shell.
        #[arg(long)]
        command: Option<String>,
    },
    /// Serve the device's web UI (its browser.allow origin) on a local port.
    Browse {
        /// nats://HOST:PORT or mqtt[s]://HOST:PORT/DEVICE_ID
        device: String,
        /// Local address to serve on (loopback).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The device's origin to reach (`127.0.0.1:PORT` as in its
        /// browser.allow); empty: the first one it allows.
        #[arg(long, default_value = "")]
        origin: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = rt.block_on(async move {
        let name = match &cli.command {
            Command::Shell { device, .. } | Command::Browse { device, .. } => device.clone(),
        };
        let device = match iot_agent::remote::Device::parse(&name) {
            Ok(d) => d,
            Err(e) => return fail(&e),
        };
        let files = iot_agent::remote::link::TlsFiles {
            ca: cli.ca.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
        };
        let link =
            match iot_agent::remote::Link::connect_with(&device, &cli.user, &cli.password, &files)
                .await
            {
                Ok(l) => l,
                Err(e) => return fail(&e),
            };
        match cli.command {
            Command::Shell { command, .. } => {
                match iot_agent::remote::shell::run(&link, &device, command).await {
                    Ok(code) => code,
                    Err(e) => fail(&e),
                }
            }
            Command::Browse { listen, origin, .. } => {
                match iot_agent::remote::browse::run(link, &device, listen, &origin).await {
                    Ok(()) => 0,
                    Err(e) => fail(&e),
                }
            }
        }
    });
    // The blocking reader of standard input may still wait for a key.
    std::process::exit(code);
}

fn fail(e: &str) -> i32 {
    eprintln!("iot-remote: {e}");
    2
}
