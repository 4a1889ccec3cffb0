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
        match cli.command {
            Command::Shell { device, command } => {
                let device = match iot_agent::remote::Device::parse(&device) {
                    Ok(d) => d,
                    Err(e) => return fail(&e),
                };
                match iot_agent::remote::shell::run(&device, &cli.user, &cli.password, command)
                    .await
                {
                    Ok(code) => code,
                    Err(e) => fail(&e),
                }
            }
            Command::Browse {
                device,
                listen,
                origin,
            } => {
                let device = match iot_agent::remote::Device::parse(&device) {
                    Ok(d) => d,
                    Err(e) => return fail(&e),
                };
                match iot_agent::remote::browse::run(
                    &device,
                    &cli.user,
                    &cli.password,
                    listen,
                    &origin,
                )
                .await
                {
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
