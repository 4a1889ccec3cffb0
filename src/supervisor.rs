//! The supervisor: runs each enabled subsystem as a task, restarts one that
//! fails with back-off, and stops them all within a bound on shutdown.
//!
//! Every subsystem has one shape, [`Subsystem`]: a name, the configuration
//! section it is configured by, and `run(self, shutdown)`. `agent.rs` builds
//! each enabled one from the configuration and hands it to
//! [`Supervisor::add`]; that line is all the wiring a new subsystem needs.
//!
//! snapd stops a daemon with SIGTERM and kills it after a while, so
//! everything the agent does must wind down promptly: subsystems watch the
//! [`Shutdown`] they are given and spawn their background tasks through it
//! ([`Shutdown::spawn`]), so the supervisor waits for those tasks too, not
//! only for `run`. Whatever is still running when the grace period ends is
//! aborted and named in the log.
#![warn(missing_docs)]

use crate::backoff::Backoff;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

/// The result of one run of a subsystem.
pub type RunResult = Result<(), anyhow::Error>;

/// A part of the agent that owns its state and runs until shutdown (the
/// DMS link, the snapd mirror, export, ...).
///
/// The value is a cheap handle (a struct of clones, or an `Arc` of the
/// subsystem's state): the supervisor keeps it and runs a fresh clone on
/// every (re)start, so state that must survive a restart lives behind the
/// handle, and state of one run lives in `run`.
pub trait Subsystem: Clone + Send + Sync + 'static {
    /// Its name in the log (`subsystem=...`).
    const NAME: &'static str;
    /// The configuration section it is configured by (`dms`, `export`,
    /// ...), named in the log when it starts.
    const SECTION: &'static str;

    /// Runs until `shutdown` is cancelled, then returns `Ok(())` promptly
    /// (the agent has a few seconds in all). Returning `Ok(())` earlier
    /// means finished for good; an error means failed: the supervisor logs
    /// it and starts a fresh clone after back-off. Tasks it spawns go
    /// through [`Shutdown::spawn`].
    fn run(self, shutdown: Shutdown) -> impl Future<Output = RunResult> + Send;
}

/// What a subsystem stops by: the agent's stop signal, and the tracker of
/// the tasks it spawned, which the supervisor waits for on shutdown.
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Shutdown {
    /// A stop signal of its own, with a fresh tracker (tests, benchmarks).
    pub fn new() -> Self {
        Shutdown::default()
    }

    /// Resolves once the agent stops.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// True once the agent stops.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Stops whatever was given this (or a [`Shutdown::child`] of it).
    pub fn cancel(&self) {
        self.token.cancel()
    }

    /// The stop signal as a token, for code that takes one.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// A signal that stops with this one and can also be stopped alone
    /// (one DMS session), with the same tracker.
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
            tasks: self.tasks.clone(),
        }
    }

    /// Spawns a task the supervisor waits for when the agent stops (within
    /// the grace period): the task must itself watch [`Shutdown::cancelled`].
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Waits for every task spawned through this tracker (after `run`
    /// returned: nothing spawns any more).
    async fn wait_tasks(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl From<CancellationToken> for Shutdown {
    fn from(token: CancellationToken) -> Self {
        Shutdown {
            token,
            tasks: TaskTracker::new(),
        }
    }
}

type RunFn = Arc<dyn Fn(Shutdown) -> BoxFuture<'static, RunResult> + Send + Sync>;

/// A subsystem as the supervisor holds it: named, restartable.
#[derive(Clone)]
struct Unit {
    name: &'static str,
    section: &'static str,
    run: RunFn,
}

impl Unit {
    fn of<S: Subsystem>(s: S) -> Self {
        Unit {
            name: S::NAME,
            section: S::SECTION,
            run: Arc::new(move |shutdown| Box::pin(s.clone().run(shutdown))),
        }
    }
}

/// Restart and shutdown timing.
#[derive(Debug, Clone)]
pub struct Policy {
    /// First delay before restarting a failed subsystem.
    pub restart_base: Duration,
    /// Longest delay between restarts.
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

/// Runs the subsystems it was given until shutdown.
pub struct Supervisor {
    units: Vec<Unit>,
    policy: Policy,
}

impl Supervisor {
    /// A supervisor with no subsystems yet.
    pub fn new(policy: Policy) -> Self {
        Supervisor {
            units: Vec::new(),
            policy,
        }
    }

    /// Adds a subsystem, started by [`Supervisor::run`].
    pub fn add<S: Subsystem>(&mut self, s: S) -> &mut Self {
        self.units.push(Unit::of(s));
        self
    }

    /// Runs every subsystem until `shutdown` is cancelled (or all finished),
    /// then waits up to the grace period and aborts the rest. Returns the
    /// names of the subsystems that had to be aborted.
    pub async fn run(self, shutdown: CancellationToken) -> Vec<&'static str> {
        let mut set = JoinSet::new();
        let mut names = HashMap::new();
        for s in self.units {
            tracing::info!(subsystem = s.name, section = s.section, "starting");
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

/// Runs one subsystem, restarting it after failures and panics; once the
/// agent stops, waits for the tasks it spawned too.
async fn keep_running(s: Unit, policy: Policy, shutdown: CancellationToken) -> &'static str {
    let shutdown = Shutdown::from(shutdown);
    let name = run_until_done(&s, &policy, &shutdown).await;
    shutdown.wait_tasks().await;
    name
}

async fn run_until_done(s: &Unit, policy: &Policy, shutdown: &Shutdown) -> &'static str {
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

    impl Unit {
        /// A unit from a closure, as the tests write them.
        fn from_fn<F, Fut>(name: &'static str, run: F) -> Unit
        where
            F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = RunResult> + Send + 'static,
        {
            Unit {
                name,
                section: "test",
                run: Arc::new(move |s: Shutdown| Box::pin(run(s.token().clone()))),
            }
        }
    }

    impl Supervisor {
        fn add_fn<F, Fut>(&mut self, name: &'static str, run: F) -> &mut Self
        where
            F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = RunResult> + Send + 'static,
        {
            self.units.push(Unit::from_fn(name, run));
            self
        }
    }

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
        sup.add_fn("flaky", move |_t| {
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
        });
        let aborted = sup.run(CancellationToken::new()).await;
        done_rx.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(aborted.is_empty());
    }

    #[tokio::test]
    async fn shutdown_stops_cooperative_and_aborts_stubborn_subsystems() {
        let mut sup = Supervisor::new(fast());
        sup.add_fn("polite", |t: CancellationToken| async move {
            t.cancelled().await;
            Ok(())
        });
        sup.add_fn("stubborn", |_t| async move {
            futures::future::pending::<()>().await;
            Ok(())
        });
        let token = CancellationToken::new();
        let run = tokio::spawn(sup.run(token.clone()));
        token.cancel();
        let aborted = run.await.unwrap();
        assert_eq!(aborted, vec!["stubborn"]);
    }

    /// A subsystem in the one shape, with a background task that needs a
    /// moment to finish once the agent stops.
    #[derive(Clone)]
    struct Slow {
        finished: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Subsystem for Slow {
        const NAME: &'static str = "slow";
        const SECTION: &'static str = "test";

        async fn run(self, shutdown: Shutdown) -> RunResult {
            let s = shutdown.clone();
            shutdown.spawn(async move {
                s.cancelled().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.finished.store(true, Ordering::SeqCst);
            });
            shutdown.cancelled().await;
            Ok(())
        }
    }

    #[tokio::test]
    async fn shutdown_waits_for_the_tasks_a_subsystem_spawned() {
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut sup = Supervisor::new(fast());
        sup.add(Slow {
            finished: finished.clone(),
        });
        let token = CancellationToken::new();
        let run = tokio::spawn(sup.run(token.clone()));
        tokio::task::yield_now().await;
        token.cancel();
        let aborted = run.await.unwrap();
        assert!(aborted.is_empty(), "{aborted:?}");
        assert!(
            finished.load(Ordering::SeqCst),
            "returned before the task ended"
        );
    }
}
