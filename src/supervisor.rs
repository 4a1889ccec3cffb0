//! The supervisor: runs each enabled subsystem as a task, restarts one that
//! fails with back-off, and stops them all within a bound on shutdown.
//!
//! snapd stops a daemon with SIGTERM and kills it after a while, so
//! everything the agent does must wind down promptly: subsystems watch the
//! shared [`CancellationToken`] and the supervisor aborts whatever is still
//! running when the grace period ends.

use crate::backoff::Backoff;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The result of one run of a subsystem.
pub type RunResult = Result<(), anyhow::Error>;

type RunFn = Arc<dyn Fn(CancellationToken) -> BoxFuture<'static, RunResult> + Send + Sync>;

/// A named, restartable unit of work.
#[derive(Clone)]
pub struct Subsystem {
    name: &'static str,
    run: RunFn,
}

impl Subsystem {
    /// `run` is called for every (re)start with the shutdown token. It
    /// returns `Ok(())` when it has finished for good (or was cancelled) and
    /// an error when it failed and should be restarted.
    pub fn new<F, Fut>(name: &'static str, run: F) -> Self
    where
        F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = RunResult> + Send + 'static,
    {
        Subsystem {
            name,
            run: Arc::new(move |t| Box::pin(run(t))),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// Restart and shutdown timing.
#[derive(Debug, Clone)]
pub struct Policy {
    pub restart_base: Duration,
    pub restart_cap: Duration,
    /// A run longer than this counts as healthy: back-off starts over.
    pub healthy_after: Duration,
    /// How long subsystems get to stop before they are aborted.
    pub grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            restart_base: Duration::from_secs(1),
            restart_cap: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
            grace: Duration::from_secs(8),
        }
    }
}

pub struct Supervisor {
    subsystems: Vec<Subsystem>,
    policy: Policy,
}

impl Supervisor {
    pub fn new(policy: Policy) -> Self {
        Supervisor {
            subsystems: Vec::new(),
            policy,
        }
    }

    pub fn add(&mut self, s: Subsystem) -> &mut Self {
        self.subsystems.push(s);
        self
    }

    /// Runs every subsystem until `shutdown` is cancelled (or all finished),
    /// then waits up to the grace period and aborts the rest. Returns the
    /// names of the subsystems that had to be aborted.
    pub async fn run(self, shutdown: CancellationToken) -> Vec<&'static str> {
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        for s in self.subsystems {
            tracing::info!(subsystem = s.name, "starting");
            let name = s.name;
            let handle = set.spawn(keep_running(s, self.policy.clone(), shutdown.clone()));
            names.insert(handle.id(), name);
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                done = set.join_next() => match done {
                    None => return Vec::new(),
                    Some(Ok(name)) => tracing::info!(subsystem = name, "finished"),
                    Some(Err(e)) => tracing::error!(error = %e, "subsystem task failed"),
                },
            }
        }
        let deadline = tokio::time::sleep(self.policy.grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                done = set.join_next() => match done {
                    None => return Vec::new(),
                    Some(Ok(name)) => tracing::debug!(subsystem = name, "stopped"),
                    Some(Err(_)) => {}
                },
            }
        }
        set.abort_all();
        let mut aborted = Vec::new();
        while let Some(r) = set.join_next_with_id().await {
            if let Err(e) = r {
                if let Some(name) = names.get(&e.id()) {
                    aborted.push(*name);
                }
            }
        }
        if !aborted.is_empty() {
            tracing::warn!(subsystems = ?aborted, "did not stop within the grace period; aborted");
        }
        aborted
    }
}

/// Runs one subsystem, restarting it after failures and panics.
async fn keep_running(s: Subsystem, policy: Policy, shutdown: CancellationToken) -> &'static str {
    let mut backoff = Backoff::new(policy.restart_base, policy.restart_cap);
    loop {
        let started = Instant::now();
        // Its own task, so a panic inside does not take the supervisor with
        // it; the guard aborts it if this task is aborted at the grace bound.
        let run = tokio::spawn((s.run)(shutdown.clone()));
        let _guard = AbortOnDrop(run.abort_handle());
        let outcome = run.await;
        if shutdown.is_cancelled() {
            return s.name;
        }
        let why = match outcome {
            Ok(Ok(())) => return s.name,
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) if e.is_panic() => "it panicked".to_string(),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= policy.healthy_after {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::error!(
            subsystem = s.name,
            error = %why,
            restart_in = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
            "subsystem failed; restarting"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return s.name,
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast() -> Policy {
        Policy {
            restart_base: Duration::from_millis(5),
            restart_cap: Duration::from_millis(20),
            healthy_after: Duration::from_secs(60),
            grace: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn failed_and_panicking_subsystems_are_restarted() {
        let runs = Arc::new(AtomicU32::new(0));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let done_tx = Arc::new(std::sync::Mutex::new(Some(done_tx)));
        let r = runs.clone();
        let mut sup = Supervisor::new(fast());
        sup.add(Subsystem::new("flaky", move |_t| {
            let n = r.fetch_add(1, Ordering::SeqCst);
            let done_tx = done_tx.clone();
            async move {
                match n {
                    0 => anyhow::bail!("first run fails"),
                    1 => panic!("second run panics"),
                    _ => {
                        if let Some(tx) = done_tx.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        Ok(())
                    }
                }
            }
        }));
        let aborted = sup.run(CancellationToken::new()).await;
        done_rx.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(aborted.is_empty());
    }

    #[tokio::test]
    async fn shutdown_stops_cooperative_and_aborts_stubborn_subsystems() {
        let mut sup = Supervisor::new(fast());
        sup.add(Subsystem::new(
            "polite",
            |t: CancellationToken| async move {
                t.cancelled().await;
                Ok(())
            },
        ));
        sup.add(Subsystem::new("stubborn", |_t| async move {
            futures::future::pending::<()>().await;
            Ok(())
        }));
        let token = CancellationToken::new();
        let run = tokio::spawn(sup.run(token.clone()));
        token.cancel();
        let aborted = run.await.unwrap();
        assert_eq!(aborted, vec!["stubborn"]);
    }
}
