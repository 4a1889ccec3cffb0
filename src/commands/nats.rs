//! `iot-agent nats-config` and `iot-agent nats-server`: the bundled NATS
//! server's configuration, and running the server with it.

use crate::config::{Loaded, Source};
use crate::nats_server::{self, Files, Outcome};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

/// Writes the configuration; prints the [`Outcome`].
pub fn config(loaded: &Loaded, reload: bool) -> anyhow::Result<ExitCode> {
    let outcome = nats_server::apply(loaded, reload)?;
    super::write_stdout(&format!("{}\n", outcome.as_str()))?;
    Ok(ExitCode::SUCCESS)
}

/// The URL a local run serves NATS on: `nats.url` when configured, else a
/// loopback port free right now (the usual 4222 may be another server's).
pub fn local_url(loaded: &Loaded) -> anyhow::Result<ExitCode> {
    let url = if loaded.source("nats.url") == Source::Default {
        let probe = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
        format!("nats://127.0.0.1:{}", probe.local_addr()?.port())
    } else {
        loaded.config.nats.url.as_str().to_string()
    };
    super::write_stdout(&format!("{url}\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// Writes the configuration, then becomes nats-server running it.
pub fn serve(loaded: &Loaded) -> anyhow::Result<ExitCode> {
    let outcome = nats_server::apply(loaded, false)?;
    if outcome == Outcome::Disabled {
        eprintln!(
            "iot-agent: nats.bundled is false: the bundled NATS server does not run \
             (the agent uses the server at nats.url)"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let files = Files::of(&loaded.config);
    let binary = nats_server::server_binary();
    eprintln!(
        "iot-agent: starting {} -c {} (listening on 127.0.0.1:{})",
        binary.display(),
        files.conf.display(),
        nats_server::render::listen_port(&loaded.config)?
    );
    let err = std::process::Command::new(&binary)
        .arg("-c")
        .arg(&files.conf)
        .exec();
    anyhow::bail!(
        "cannot run {}: {err} (install nats-server, e.g. apt-get install nats-server)",
        binary.display()
    )
}
