//! Watches that snapd answers, and says so in the log when that changes.
//!
//! A failure ends the run with an error, so the supervisor restarts it with
//! back-off and logs why: the operator reads one clear line per attempt
//! rather than a crash or silence.

use crate::snapd;
use crate::supervisor::RunResult;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a reachable snapd is checked again.
const CHECK_EVERY: Duration = Duration::from_secs(60);

pub async fn run(client: snapd::Client, shutdown: CancellationToken) -> RunResult {
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
