//! Retention: deletes durable events older than `FANOUT_EVENT_RETENTION`.
//!
//! Only `events` expires. It is the replay log: a client that was away longer than the
//! retention cannot be replayed to and resyncs over REST instead. The projections
//! (`executions`, `execution_logs`) are current state, not history, and are kept.
//! `org_sequences` is never touched either, so sequence numbers keep increasing after the
//! events that used them are gone.
//!
//! Why batches: one `DELETE` of a day's events would be one long transaction holding row
//! locks on all of them and holding back vacuum, on every table, until it commits. Instead
//! each statement deletes at most `BATCH` rows (chosen by `ctid` through the `created_at`
//! index) and commits on its own, and the task yields between statements. None of this can
//! block ingest: a `DELETE` takes the same table lock as ingest's `INSERT` (ROW EXCLUSIVE,
//! which does not conflict with itself), it locks only expired rows, which ingest never
//! writes, and `events` has no foreign key, so no row of `org_sequences` is read or locked.
//! Every replica runs this task; `SKIP LOCKED` lets them share the work instead of queueing
//! on each other's rows.
//!
//! The task waits for the store to be migrated, deletes once, then again every
//! `interval(retention)`. While PostgreSQL is down it retries with backoff, quietly: a debug
//! line per failure and a warning at most every few minutes (the store itself reports the
//! outage).

use std::time::Duration;

use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::retry::Retry;
use crate::tasks::{Policy, Tasks};

use super::{Store, StoreError, describe};

/// Rows deleted per statement: large enough that a backlog goes quickly, small enough that
/// each transaction is short.
const BATCH: i64 = 5_000;
/// The longest wait between two passes, however long the retention.
const MAX_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// How often the task checks whether the store has migrated.
const MIGRATED_POLL: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// At most one warning per this interval while passes fail.
const WARN_EVERY: Duration = Duration::from_secs(5 * 60);

const DELETE_BATCH: &str = "
    DELETE FROM events
    WHERE ctid = ANY (ARRAY(
        SELECT ctid FROM events
        WHERE created_at < now() - make_interval(secs => $1)
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    ))";

/// Time between two passes: a tenth of the retention (events outlive it by at most 10%),
/// at most five minutes.
fn interval(retention: Duration) -> Duration {
    (retention / 10).min(MAX_INTERVAL)
}

/// Spawns the retention task for `store`. Restarted if it fails: it keeps no state.
pub fn start(store: Store, retention: Duration, tasks: &Tasks) {
    tasks.spawn("retention", Policy::Restart, move |shutdown| {
        run(store.clone(), retention, shutdown)
    });
}

async fn run(store: Store, retention: Duration, shutdown: Shutdown) {
    // Registered at 0, so that dashboards see the series before the first deletion.
    ::metrics::counter!(metrics::RETENTION_DELETED).increment(0);
    while !store.is_migrated() {
        tokio::select! {
            _ = tokio::time::sleep(MIGRATED_POLL) => {}
            _ = shutdown.wait() => return,
        }
    }
    let every = interval(retention);
    let mut retry = Retry::new("delete expired events", BACKOFF_MIN, every, WARN_EVERY);
    loop {
        let (deleted, result) = pass(&store, retention, &shutdown).await;
        if deleted > 0 {
            tracing::info!(
                deleted,
                retention_secs = retention.as_secs(),
                "deleted expired events"
            );
        }
        let go_on = match result {
            Ok(()) => {
                retry.succeeded();
                tokio::select! {
                    _ = tokio::time::sleep(every) => true,
                    _ = shutdown.wait() => false,
                }
            }
            Err(reason) => retry.failed(reason, &shutdown).await,
        };
        if !go_on {
            return;
        }
    }
}

/// Deletes expired events batch by batch until none is left. Returns how many were deleted,
/// and why the pass stopped early, if it did.
async fn pass(
    store: &Store,
    retention: Duration,
    shutdown: &Shutdown,
) -> (u64, Result<(), String>) {
    let age = retention.as_secs_f64();
    let mut total = 0;
    loop {
        if shutdown.is_triggered() {
            return (total, Ok(()));
        }
        let deleted = match delete_batch(store, age).await {
            Ok(n) => n,
            Err(reason) => return (total, Err(reason)),
        };
        ::metrics::counter!(metrics::RETENTION_DELETED).increment(deleted);
        total += deleted;
        if deleted < BATCH as u64 {
            return (total, Ok(()));
        }
        tokio::task::yield_now().await;
    }
}

/// One statement, one transaction: deletes up to `BATCH` events older than `age` seconds.
async fn delete_batch(store: &Store, age: f64) -> Result<u64, String> {
    let client = store.client().await.map_err(reason)?;
    client
        .execute(DELETE_BATCH, &[&age, &BATCH])
        .await
        .map_err(|e| {
            store.failed(&e);
            describe(&e)
        })
}

fn reason(error: StoreError) -> String {
    match error {
        StoreError::Unavailable(reason) => reason,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenth_of_the_retention_at_most_five_minutes() {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        assert_eq!(interval(minutes(1)), Duration::from_secs(6));
        assert_eq!(interval(minutes(30)), minutes(3));
        assert_eq!(interval(minutes(50)), minutes(5));
        assert_eq!(interval(minutes(60)), minutes(5));
        assert_eq!(interval(Duration::from_secs(7 * 86_400)), minutes(5));
    }
}
