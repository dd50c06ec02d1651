//! Every task of a replica, spawned in one place, with a name, a policy and a watcher.
//!
//! A task whose `JoinHandle` is dropped can die unseen: a Redis subscriber that panicked
//! would leave a replica that says it is ready and receives nothing. So every long-running
//! task is started by [`Tasks::spawn`], which runs it inside a supervisor: when it panics,
//! or returns while the replica is not shutting down, the failure is logged, counted
//! (`fanout_task_failures_total{task}`) and shown by `/readyz` (503, naming the task), and
//! then, by the task's [`Policy`], it is started again after a backoff, or the replica
//! exits non-zero for the orchestrator to replace it. Short tasks (a gap fill, a refusal's
//! timer) go through [`Tasks::spawn_short`]: watched and counted too, never restarted.
//! Shutdown waits for all of them ([`Tasks::wait`]) within its deadline.
//!
//! Which policy a task gets is decided where it is spawned, by one rule: a task whose
//! state can be rebuilt from the rest of the replica is restarted (the subscriber
//! resubscribes from presence, a checker starts over); a task whose state is the only
//! copy (the session expiry schedule, the durable ingest queues, a listener) is fatal.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::retry::Backoff;

/// What happens when a task fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Started again after a backoff (its state is rebuilt from the replica).
    Restart,
    /// The replica shuts down and exits non-zero (its state cannot be rebuilt).
    Fatal,
}

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The supervisor of a replica's tasks. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    inner: Arc<Inner>,
}

struct Inner {
    tracker: TaskTracker,
    shutdown: Shutdown,
    /// Tasks that failed and are not running again yet.
    failed: Mutex<BTreeSet<&'static str>>,
    /// The first task that failed for good, if any.
    fatal: watch::Sender<Option<&'static str>>,
}

impl Tasks {
    /// Tasks that stop when `shutdown` is triggered.
    pub fn new(shutdown: Shutdown) -> Self {
        Self {
            inner: Arc::new(Inner {
                tracker: TaskTracker::new(),
                shutdown,
                failed: Mutex::new(BTreeSet::new()),
                fatal: watch::Sender::new(None),
            }),
        }
    }

    /// The shutdown signal the tasks stop on.
    pub fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    /// Runs `task` under supervision. `task` makes the task's future, once per start; the
    /// future should end when the shutdown signal it is given is triggered.
    pub fn spawn<F, Fut>(&self, name: &'static str, policy: Policy, mut task: F)
    where
        F: FnMut(Shutdown) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tasks = self.clone();
        self.inner.tracker.spawn(async move {
            let shutdown = tasks.inner.shutdown.clone();
            let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
            loop {
                let run = tokio::spawn(task(shutdown.clone()));
                let why = match run.await {
                    Ok(()) if shutdown.is_triggered() => return,
                    Ok(()) => "ended".to_string(),
                    Err(e) if e.is_panic() => panic_message(e.into_panic()),
                    Err(e) => e.to_string(),
                };
                ::metrics::counter!(metrics::TASK_FAILURES, "task" => name).increment(1);
                tasks.inner.failed.lock().unwrap().insert(name);
                match policy {
                    Policy::Fatal => {
                        tracing::error!(task = name, "task failed ({why}); the replica shuts down");
                        tasks.inner.fatal.send_if_modified(|first| {
                            let unset = first.is_none();
                            if unset {
                                *first = Some(name);
                            }
                            unset
                        });
                        return;
                    }
                    Policy::Restart => {
                        let delay = backoff.next_delay();
                        tracing::error!(
                            task = name,
                            "task failed ({why}); restarting in {delay:?}"
                        );
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = shutdown.wait() => return,
                        }
                        tasks.inner.failed.lock().unwrap().remove(name);
                    }
                }
            }
        });
    }

    /// Runs a short task (it ends by itself), watched: a panic is logged and counted, and
    /// the task stops at shutdown.
    pub fn spawn_short<Fut>(&self, name: &'static str, task: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.inner.shutdown.clone();
        self.inner.tracker.spawn(async move {
            let run = std::panic::AssertUnwindSafe(task).catch_unwind();
            tokio::select! {
                result = run => {
                    if let Err(panic) = result {
                        ::metrics::counter!(metrics::TASK_FAILURES, "task" => name).increment(1);
                        tracing::error!(task = name, "task failed ({})", panic_message(panic));
                    }
                }
                _ = shutdown.wait() => {}
            }
        });
    }

    /// The tasks that failed and are not running again yet (for readiness).
    pub fn failed(&self) -> Vec<&'static str> {
        self.inner.failed.lock().unwrap().iter().copied().collect()
    }

    /// Resolves with the name of the first task that failed for good.
    pub async fn fatal(&self) -> &'static str {
        let mut fatal = self.inner.fatal.subscribe();
        let name = fatal.wait_for(Option::is_some).await;
        name.ok().and_then(|n| *n).unwrap_or("tasks")
    }

    /// Waits until every task has ended (after the shutdown signal), at most `deadline`;
    /// returns whether they all did.
    pub async fn wait(&self, deadline: Duration) -> bool {
        self.inner.tracker.close();
        tokio::time::timeout(deadline, self.inner.tracker.wait())
            .await
            .is_ok()
    }

    /// Tasks still running (for the shutdown log).
    pub fn running(&self) -> usize {
        self.inner.tracker.len()
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string());
    format!("panicked: {text}")
}

/// Faults injected into named tasks, for the tests of supervision: with the
/// `fault-injection` feature, `POST /faults/{task}` on the internal listener makes the
/// next [`fault`] of that task resolve (the task then panics). Without the feature, a
/// fault never comes.
pub async fn fault(task: &'static str) {
    #[cfg(feature = "fault-injection")]
    faults::wait(task).await;
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = task;
        std::future::pending::<()>().await;
    }
}

#[cfg(feature = "fault-injection")]
pub mod faults {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock, Mutex};

    use tokio::sync::Notify;

    static FAULTS: LazyLock<Mutex<HashMap<String, Arc<Notify>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));

    fn notify(task: &str) -> Arc<Notify> {
        FAULTS
            .lock()
            .unwrap()
            .entry(task.to_string())
            .or_default()
            .clone()
    }

    /// Injects one fault into `task`.
    pub fn inject(task: &str) {
        notify(task).notify_one();
    }

    pub(super) async fn wait(task: &str) {
        notify(task).notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_failed_task_is_shown_counted_and_restarted() {
        let shutdown = Shutdown::new();
        let tasks = Tasks::new(shutdown.clone());
        let starts = Arc::new(AtomicUsize::new(0));
        let counter = starts.clone();
        tasks.spawn("flaky", Policy::Restart, move |stop| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("start {n} fails");
                }
                stop.wait().await;
            }
        });
        let failed = tasks.clone();
        let shown = tokio::time::timeout(Duration::from_secs(5), async move {
            while failed.failed().is_empty() {
                tokio::task::yield_now().await;
            }
        });
        shown.await.expect("the failure is shown");
        assert_eq!(tasks.failed(), ["flaky"]);
        // Two failures: restarted after backoffs of at most 0.5 s, then 1 s.
        tokio::time::timeout(Duration::from_secs(5), async {
            while starts.load(Ordering::SeqCst) < 3 || !tasks.failed().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("restarted, and running again");
        shutdown.trigger();
        assert!(tasks.wait(Duration::from_secs(1)).await);
    }

    #[tokio::test]
    async fn a_fatal_task_ends_the_replica() {
        let tasks = Tasks::new(Shutdown::new());
        tasks.spawn("listener", Policy::Fatal, |_| async {});
        assert_eq!(tasks.fatal().await, "listener");
        assert_eq!(tasks.failed(), ["listener"]);
    }

    #[tokio::test]
    async fn short_tasks_are_watched_and_stop_at_shutdown() {
        let shutdown = Shutdown::new();
        let tasks = Tasks::new(shutdown.clone());
        tasks.spawn_short("boom", async { panic!("short") });
        tasks.spawn_short("forever", std::future::pending());
        shutdown.trigger();
        assert!(tasks.wait(Duration::from_secs(1)).await);
        assert!(tasks.failed().is_empty(), "short tasks are not restarted");
    }
}
