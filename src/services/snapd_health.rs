//! Watches that snapd answers, and says so in the log when that changes.
//!
//! A failure ends the run with an error, so the supervisor restarts it with
//! back-off and logs why: the operator reads one clear line per attempt
//! rather than a crash or silence.

use crate::snapd;
use crate::supervisor::{RunResult, Shutdown, Subsystem};
use std::time::Duration;

/// How often a reachable snapd is checked again.
const CHECK_EVERY: Duration = Duration::from_secs(60);

/// The subsystem: snapd's client (`snapd.socket`).
#[derive(Clone)]
pub struct SnapdHealth {
    /// The agent's snapd client.
    pub client: snapd::Client,
}

impl Subsystem for SnapdHealth {
    const NAME: &'static str = "snapd-health";
    const SECTION: &'static str = "snapd";

    async fn run(self, shutdown: Shutdown) -> RunResult {
        check(self.client, shutdown).await
    }
}

async fn check(client: snapd::Client, shutdown: Shutdown) -> RunResult {
    let info = client.system_info().await?;
    tracing::info!(
        version = %info.version,
        series = %info.series,
        os = %format!("{} {}", info.os_release.id, info.os_release.version_id),
        on_classic = info.on_classic,
        socket = %client.socket().display(),
        "snapd is reachable"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        client.system_info().await?;
    }
}
