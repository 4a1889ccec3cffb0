//! `iot-agent unregister`: forget the DMS registration on this device.
//!
//! Stop the agent, delete `.secret` and `params`, start it again, so it
//! enrolls afresh (once the identity service has the device waiting again).
//! Inside a snap the daemon is stopped and started with `snapctl`; outside,
//! the running daemon (found by its pid file) is told with SIGHUP to drop
//! its credentials and enroll again.

use crate::config::Config;
use crate::control;
use crate::identity::Store;
use anyhow::Context;
use std::process::{Command, ExitCode};

/// Forgets the enrollment (`iot-agent unregister`): removes the credentials and the state.
pub fn run(config: &Config) -> anyhow::Result<ExitCode> {
    let store = Store::from_config(config);
    if crate::config::layers::in_snap() {
        let instance = std::env::var("SNAP_INSTANCE_NAME")
            .or_else(|_| std::env::var("SNAP_NAME"))
            .unwrap_or_else(|_| "iot-agent".into());
        let service = format!("{instance}.agent");
        snapctl(&["stop", &service])?;
        let cleared = store.clear();
        // Start again even when clearing failed: never leave the agent down.
        snapctl(&["start", &service])?;
        cleared.with_context(|| {
            format!(
                "cannot delete the credentials in {}",
                config.data_dir().display()
            )
        })?;
        println!("unregistered: credentials deleted, {service} restarted; it enrolls again");
        return Ok(ExitCode::SUCCESS);
    }
    store.clear().with_context(|| {
        format!(
            "cannot delete the credentials in {}",
            config.data_dir().display()
        )
    })?;
    match control::running_daemon(config.data_dir()) {
        Some(pid) => {
            control::signal_reload(pid)
                .with_context(|| format!("cannot signal the agent (pid {pid})"))?;
            println!(
                "unregistered: credentials deleted; the running agent (pid {pid}) enrolls again"
            );
        }
        None => println!(
            "unregistered: credentials deleted; no agent is running, it enrolls when started"
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn snapctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("snapctl")
        .args(args)
        .output()
        .context("cannot run snapctl")?;
    if !out.status.success() {
        anyhow::bail!(
            "snapctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
