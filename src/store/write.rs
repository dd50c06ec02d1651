//! Durable ingest: group commit, then publish in sequence order.
//!
//! Every event accepted by the HTTP ingest gets the next sequence number of its
//! organization and is committed, with the projections it changes, before it is published
//! and before the worker is answered. One task (the *committer*) takes whatever requests are
//! waiting and commits them in one transaction: a busy replica makes few, large commits, an
//! idle one answers a lone request at once (there is no batching delay).
//!
//! Why sequence numbers have no gaps: they come from `org_sequences`, incremented in the
//! same transaction that inserts the events, so a rolled-back transaction gives its numbers
//! back. The row lock taken by that increment also serializes the commits of one
//! organization across replicas, so sequence order is commit order. Organizations are
//! locked in sorted order, so two replicas' batches can never deadlock on each other.
//!
//! Why a separate publisher task: the committer can start the next transaction while the
//! previous batch is on its way to the bus, yet batches are still published in the order
//! they were committed. A replica therefore publishes each organization's events in
//! sequence order; across replicas the order is restored by the receiving replicas
//! (`delivery::history`), which also read back from the history whatever the bus lost.
//!
//! When the commit succeeds but the publish fails, the event is durable and keeps its
//! number: the worker is told it was stored (`published: false`), it must not retry, and
//! the replicas deliver it from the history (see `fanout_durable_unpublished_total`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;

use super::{Store, StoreError};
use crate::bus::Bus;
use crate::ops::metrics;
use crate::protocol::{ExecutionStatus, Message};

/// Most events in one transaction.
const MAX_BATCH: usize = 512;
/// Requests waiting for the committer; beyond this, `append` waits (back-pressure).
const QUEUE: usize = 8192;
/// Attempts of a batch that lost a deadlock or serialization conflict.
const CONFLICT_ATTEMPTS: usize = 3;

/// What an accepted event changes besides the event log.
#[derive(Debug, Clone)]
pub enum Projection {
    /// Not an execution event: only the log.
    None,
    /// `execution-updated`: the execution's status and merged data.
    Update {
        task: String,
        status: ExecutionStatus,
        data: Map<String, Value>,
    },
    /// `execution-log`: one more log chunk of the task.
    Log { task: String },
}

/// The answer to an accepted event.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub seq: u64,
    /// Whether the bus acknowledged it (see the module doc for `false`).
    pub published: bool,
}

/// Hands events to the committer.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

struct Job {
    msg: Message,
    projection: Projection,
    reply: oneshot::Sender<Result<Stored, StoreError>>,
}

/// A committed batch on its way to the bus: messages carry their sequence numbers.
struct Committed {
    messages: Vec<Message>,
    replies: Vec<oneshot::Sender<Result<Stored, StoreError>>>,
}

impl Writer {
    /// Starts the committer and the publisher. They stop when every `Writer` is dropped.
    pub fn start(store: Store, bus: Arc<Bus>) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let (committed_tx, committed_rx) = mpsc::unbounded_channel();
        tokio::spawn(commit_loop(store, rx, committed_tx));
        tokio::spawn(publish_loop(bus, committed_rx));
        Self { jobs }
    }

    /// Commits `msg` (its `seq` is assigned here), publishes it, and says how it went.
    pub async fn append(&self, msg: Message, projection: Projection) -> Result<Stored, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            msg,
            projection,
            reply,
        };
        let gone = || StoreError::Unavailable("the replica is shutting down".into());
        self.jobs.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn commit_loop(
    store: Store,
    mut jobs: mpsc::Receiver<Job>,
    committed: mpsc::UnboundedSender<Committed>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let jobs = std::mem::take(&mut batch);
        match commit_with_retry(&store, &jobs).await {
            Ok(seqs) => {
                let mut messages = Vec::with_capacity(jobs.len());
                let mut replies = Vec::with_capacity(jobs.len());
                for (job, seq) in jobs.into_iter().zip(seqs) {
                    messages.push(numbered(&store, job.msg, seq));
                    replies.push(job.reply);
                }
                let _ = committed.send(Committed { messages, replies });
            }
            Err(BatchError::Unavailable(e)) => {
                for job in jobs {
                    let _ = job.reply.send(Err(StoreError::Unavailable(e.clone())));
                }
            }
            Err(BatchError::Rejected(_)) if jobs.len() > 1 => {
                // One event the database refuses must not fail the others: commit them
                // one by one so only the culprit gets the error.
                for job in jobs {
                    let one = [job];
                    match commit_with_retry(&store, &one).await {
                        Ok(seqs) => {
                            let [job] = one;
                            let _ = committed.send(Committed {
                                messages: vec![numbered(&store, job.msg, seqs[0])],
                                replies: vec![job.reply],
                            });
                        }
                        Err(e) => {
                            let [job] = one;
                            let _ = job.reply.send(Err(e.into()));
                        }
                    }
                }
            }
            Err(e) => {
                for job in jobs {
                    let _ = job.reply.send(Err(e.clone().into()));
                }
            }
        }
    }
}

/// A committed message with its sequence number, signed so that receiving replicas believe
/// the number (see [`crate::protocol::BusKey`]).
fn numbered(store: &Store, mut msg: Message, seq: u64) -> Message {
    msg.seq = Some(seq);
    msg.sig = store.bus_key().and_then(|key| key.sign(&msg));
    msg
}

async fn publish_loop(bus: Arc<Bus>, mut committed: mpsc::UnboundedReceiver<Committed>) {
    while let Some(Committed { messages, replies }) = committed.recv().await {
        let published = match bus.publish_batch(&messages).await {
            Ok(()) => true,
            Err(e) => {
                ::metrics::counter!(metrics::UNPUBLISHED).increment(messages.len() as u64);
                tracing::warn!(
                    events = messages.len(),
                    "committed events could not be published ({e}); replicas will deliver them from the history"
                );
                false
            }
        };
        ::metrics::counter!(metrics::PUBLISHED, "source" => "http")
            .increment(messages.len() as u64);
        for (msg, reply) in messages.iter().zip(replies) {
            let seq = msg.seq.expect("committed messages have a sequence number");
            let _ = reply.send(Ok(Stored { seq, published }));
        }
    }
}

#[derive(Debug, Clone)]
enum BatchError {
    /// PostgreSQL is unreachable, or the transaction's outcome is unknown.
    Unavailable(String),
    /// PostgreSQL refused the data (a data exception): retrying will not help.
    Rejected(String),
}

impl From<BatchError> for StoreError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Unavailable(e) => StoreError::Unavailable(e),
            BatchError::Rejected(e) => StoreError::Rejected(e),
        }
    }
}

async fn commit_with_retry(store: &Store, jobs: &[Job]) -> Result<Vec<u64>, BatchError> {
    let mut attempt = 1;
    loop {
        let started = Instant::now();
        match commit(store, jobs).await {
            Ok(seqs) => {
                ::metrics::histogram!(metrics::COMMIT_DURATION)
                    .record(started.elapsed().as_secs_f64());
                ::metrics::histogram!(metrics::COMMIT_BATCH).record(jobs.len() as f64);
                ::metrics::counter!(metrics::DURABLE_EVENTS).increment(jobs.len() as u64);
                return Ok(seqs);
            }
            Err(Failure::Conflict(e)) if attempt < CONFLICT_ATTEMPTS => {
                tracing::debug!(attempt, "group commit conflicted ({e}); retrying");
                attempt += 1;
            }
            Err(Failure::Conflict(e)) | Err(Failure::Other(e)) => {
                return Err(BatchError::Unavailable(e));
            }
            Err(Failure::Store(e)) => return Err(BatchError::Unavailable(e.to_string())),
            Err(Failure::Data(e)) => return Err(BatchError::Rejected(e)),
        }
    }
}

enum Failure {
    Store(StoreError),
    Conflict(String),
    Data(String),
    Other(String),
}

/// The whole group commit as one statement: one round trip, atomic by itself (no
/// BEGIN/COMMIT), prepared once per pooled connection.
///
/// - `input`: one row per event, in batch order (`ord`); `kind` is `update` or `log` for
///   events that feed a projection, else NULL.
/// - `taken`: each organization's counter moves by its number of events, in organization
///   order (so two replicas' batches lock rows in the same order and cannot deadlock); the
///   row lock is held until the statement commits, which serializes an organization's
///   commits across replicas.
/// - `numbered`: event `k` of an organization in the batch gets `last - n + k`.
/// - the events, the log chunks and the executions are written from `numbered`; the
///   executions come merged per task from the caller (`$7`-`$12`), which only lacks the
///   sequence number of each task's last update.
const COMMIT: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
        WITH ORDINALITY AS i(org, event, data, user_id, kind, task, ord)
), counts AS (
    SELECT org, count(*) AS n FROM input GROUP BY org
), taken AS (
    INSERT INTO org_sequences (organization_id, last_seq)
    SELECT org, n FROM counts ORDER BY org
    ON CONFLICT (organization_id)
    DO UPDATE SET last_seq = org_sequences.last_seq + EXCLUDED.last_seq
    RETURNING organization_id, last_seq
), numbered AS (
    SELECT i.*, t.last_seq - c.n + row_number() OVER (PARTITION BY i.org ORDER BY i.ord) AS seq
    FROM input i
    JOIN counts c ON c.org = i.org
    JOIN taken t ON t.organization_id = i.org
), written_events AS (
    INSERT INTO events (organization_id, seq, event, data, user_id)
    SELECT org, seq, event, data::json, user_id FROM numbered
), written_logs AS (
    INSERT INTO execution_logs (organization_id, task_id, seq, data)
    SELECT org, task, seq, data::jsonb FROM numbered WHERE kind = 'log'
), written_executions AS (
    INSERT INTO executions AS x
        (organization_id, task_id, status, started_at, finished_at, updated_at, data, last_seq)
    SELECT u.o, u.t, u.st::execution_status,
           CASE WHEN u.started THEN now() END,
           CASE WHEN u.finished THEN now() END,
           now(), u.d::jsonb,
           (SELECT max(n.seq) FROM numbered n
            WHERE n.org = u.o AND n.task = u.t AND n.kind = 'update')
    FROM unnest($7::text[], $8::text[], $9::text[], $10::bool[], $11::bool[], $12::text[])
         AS u(o, t, st, started, finished, d)
    ON CONFLICT (organization_id, task_id) DO UPDATE SET
        status = EXCLUDED.status,
        started_at = COALESCE(x.started_at, EXCLUDED.started_at),
        finished_at = EXCLUDED.finished_at,
        updated_at = EXCLUDED.updated_at,
        data = x.data || EXCLUDED.data,
        last_seq = EXCLUDED.last_seq
)
SELECT seq FROM numbered ORDER BY ord";

/// Commits `jobs` in one statement; returns their sequence numbers, in order.
async fn commit(store: &Store, jobs: &[Job]) -> Result<Vec<u64>, Failure> {
    let client = store.client().await.map_err(Failure::Store)?;
    let classify = |e: tokio_postgres::Error| -> Failure {
        let text = super::describe(&e);
        match e.code() {
            Some(c)
                if *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                Failure::Conflict(text)
            }
            // Class 22: data exception (e.g. a JSON string PostgreSQL cannot store).
            Some(c) if c.code().starts_with("22") => Failure::Data(text),
            _ => {
                let _ = store.failed(&e);
                Failure::Other(text)
            }
        }
    };
    let orgs: Vec<&str> = jobs.iter().map(|j| j.msg.org.as_str()).collect();
    let events: Vec<&str> = jobs.iter().map(|j| j.msg.event.as_str()).collect();
    let data: Vec<&str> = jobs.iter().map(|j| j.msg.data.get()).collect();
    let users: Vec<Option<&str>> = jobs
        .iter()
        .map(|j| j.msg.user.as_ref().map(|u| u.as_str()))
        .collect();
    let (kinds, tasks): (Vec<Option<&str>>, Vec<Option<&str>>) = jobs
        .iter()
        .map(|j| match (&j.projection, &j.msg.user) {
            (Projection::Update { task, .. }, None) => (Some("update"), Some(task.as_str())),
            (Projection::Log { task }, None) => (Some("log"), Some(task.as_str())),
            _ => (None, None),
        })
        .unzip();
    let x = executions(jobs);
    let statement = client.prepare_cached(COMMIT).await.map_err(classify)?;
    let rows = client
        .query(
            &statement,
            &[
                &orgs,
                &events,
                &data,
                &users,
                &kinds,
                &tasks,
                &x.org,
                &x.task,
                &x.status,
                &x.started,
                &x.finished,
                &x.data,
            ],
        )
        .await
        .map_err(classify)?;
    Ok(rows.iter().map(|row| row.get::<_, i64>(0) as u64).collect())
}

/// One row per execution the batch changes: the batch's updates of a task, merged in
/// batch order (an upsert may touch each row once per statement).
#[derive(Default)]
struct ExecutionRows {
    org: Vec<String>,
    task: Vec<String>,
    status: Vec<&'static str>,
    started: Vec<bool>,
    finished: Vec<bool>,
    data: Vec<String>,
}

fn executions(jobs: &[Job]) -> ExecutionRows {
    struct Merged {
        status: ExecutionStatus,
        started: bool,
        data: Map<String, Value>,
    }
    let mut merged: BTreeMap<(&str, &str), Merged> = BTreeMap::new();
    for job in jobs {
        // User-targeted events stay private: they never reach the shared projections.
        let (Projection::Update { task, status, data }, None) = (&job.projection, &job.msg.user)
        else {
            continue;
        };
        let row = merged
            .entry((job.msg.org.as_str(), task.as_str()))
            .or_insert_with(|| Merged {
                status: *status,
                started: false,
                data: Map::new(),
            });
        row.status = *status;
        row.started |= *status != ExecutionStatus::Pending;
        row.data
            .extend(data.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let mut rows = ExecutionRows::default();
    for ((org, task), row) in merged {
        rows.org.push(org.to_string());
        rows.task.push(task.to_string());
        rows.status.push(row.status.as_str());
        rows.started.push(row.started);
        rows.finished.push(row.status.is_final());
        rows.data.push(Value::Object(row.data).to_string());
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::value::RawValue;

    fn job(org: &str, user: Option<&str>, projection: Projection) -> Job {
        Job {
            msg: Message {
                org: crate::protocol::OrgId::parse(org).unwrap(),
                event: crate::protocol::EventName::parse("execution-updated").unwrap(),
                data: RawValue::from_string("{}".into()).unwrap(),
                ts_ms: None,
                user: user.map(|u| crate::protocol::UserId::parse(u).unwrap()),
                via_ingest: true,
                seq: None,
                sig: None,
            },
            projection,
            reply: oneshot::channel().0,
        }
    }

    fn update(task: &str, status: ExecutionStatus, data: serde_json::Value) -> Projection {
        Projection::Update {
            task: task.into(),
            status,
            data: data.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn updates_of_one_task_in_a_batch_merge_into_one_row_in_order() {
        use ExecutionStatus::*;
        let jobs = [
            job("acme", None, update("t1", Pending, json!({"a": 1, "b": 1}))),
            job("acme", None, update("t2", Running, json!({"x": 1}))),
            job("acme", None, update("t1", Running, json!({"b": 2}))),
            job(
                "acme",
                Some("bob"),
                update("t1", Failed, json!({"secret": 1})),
            ),
            job("acme", None, update("t1", Passed, json!({"c": 3}))),
            job("acme", None, Projection::Log { task: "t1".into() }),
        ];
        let rows = executions(&jobs);
        assert_eq!(rows.task, ["t1", "t2"]);
        assert_eq!(rows.status, ["PASSED", "RUNNING"]);
        assert_eq!(rows.started, [true, true]);
        assert_eq!(rows.finished, [true, false]);
        let merged: serde_json::Value = serde_json::from_str(&rows.data[0]).unwrap();
        assert_eq!(
            merged,
            json!({"a": 1, "b": 2, "c": 3}),
            "later fields win; a user's private update stays out"
        );
    }

    #[test]
    fn a_pending_only_task_has_not_started() {
        let jobs = [job(
            "acme",
            None,
            update("t1", ExecutionStatus::Pending, json!({})),
        )];
        let rows = executions(&jobs);
        assert_eq!((rows.started[0], rows.finished[0]), (false, false));
    }
}
