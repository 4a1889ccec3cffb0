//! `iot-agent enroll`: one enrollment attempt, for scripts and operators.

use super::block_on;
use crate::config::Config;
use crate::identity::{enroll_once, IdentityService, Store, Stored};
use crate::{control, snapd};
use std::process::ExitCode;

/// Enrolls once now (`iot-agent enroll`); the exit code tells the outcome.
pub fn run(config: &Config) -> anyhow::Result<ExitCode> {
    let store = Store::from_config(config);
    match store.load() {
        Stored::Valid { credentials, .. } => {
            println!(
                "already enrolled as device {} (organization {}); `iot-agent unregister` to start over",
                credentials.device_id, credentials.org_id
            );
            return Ok(ExitCode::SUCCESS);
        }
        Stored::Corrupt(why) => {
            eprintln!("stored credentials are unusable ({why}); enrolling again")
        }
        Stored::Missing => {}
    }
    let service = IdentityService::new(config)?;
    let snapd = snapd::Client::from_config(config);
    let outcome = block_on(enroll_once(&snapd, &service, &store, config.url.as_str()))?;
    match outcome {
        Ok(c) => {
            println!(
                "enrolled as device {} (organization {}, broker {}:{})",
                c.device_id, c.org_id, c.mqtt_host, c.mqtt_port
            );
            if let Some(pid) = control::running_daemon(config.data_dir()) {
                let _ = control::signal_reload(pid);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(state) => {
            eprintln!("iot-agent: not enrolled: {state}");
            Ok(ExitCode::FAILURE)
        }
    }
}
