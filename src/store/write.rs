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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;

use super::{Store, StoreError};
use crate::bus::Bus;
use crate::ops::metrics;
use crate::protocol::{ExecutionStatus, Message, OrgId};

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
                    let mut msg = job.msg;
                    msg.seq = Some(seq);
                    messages.push(msg);
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
                            let mut msg = job.msg;
                            msg.seq = Some(seqs[0]);
                            let _ = committed.send(Committed {
                                messages: vec![msg],
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

// Prepared once per pooled connection (`prepare_cached`), so a batch costs one round trip
// per statement.
/// Takes `count` numbers for each organization; returns the last one taken.
const NEXT_SEQS: &str = "INSERT INTO org_sequences (organization_id, last_seq)
    SELECT * FROM unnest($1::text[], $2::int8[])
    ON CONFLICT (organization_id)
    DO UPDATE SET last_seq = org_sequences.last_seq + EXCLUDED.last_seq
    RETURNING organization_id, last_seq";
/// Appends the events, their data as `json` (kept byte for byte).
const INSERT_EVENTS: &str = "INSERT INTO events (organization_id, seq, event, data, user_id)
    SELECT o, s, e, d::json, u
    FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[]) AS t(o, s, e, d, u)";
/// Applies one merged update per execution.
const UPSERT_EXECUTIONS: &str = "INSERT INTO executions AS x
    (organization_id, task_id, status, started_at, finished_at, updated_at, data, last_seq)
    SELECT o, t, st::execution_status,
    CASE WHEN started THEN now() END,
    CASE WHEN finished THEN now() END,
    now(), d::jsonb, s
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::bool[], $6::text[], $7::int8[])
    AS u(o, t, st, started, finished, d, s)
    ON CONFLICT (organization_id, task_id) DO UPDATE SET
    status = EXCLUDED.status,
    started_at = COALESCE(x.started_at, EXCLUDED.started_at),
    finished_at = EXCLUDED.finished_at,
    updated_at = EXCLUDED.updated_at,
    data = x.data || EXCLUDED.data,
    last_seq = EXCLUDED.last_seq";
/// Appends log chunks.
const INSERT_LOGS: &str = "INSERT INTO execution_logs (organization_id, task_id, seq, data)
    SELECT o, t, s, d::jsonb
    FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) AS l(o, t, s, d)";

/// Commits `jobs` in one transaction; returns their sequence numbers, in order.
async fn commit(store: &Store, jobs: &[Job]) -> Result<Vec<u64>, Failure> {
    let plan = Plan::new(jobs);
    let mut client = store.client().await.map_err(Failure::Store)?;
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
    let tx = client.transaction().await.map_err(classify)?;

    // Sequence numbers: one increment per organization, in sorted order (no deadlocks).
    let rows = tx
        .query(
            &tx.prepare_cached(NEXT_SEQS).await.map_err(classify)?,
            &[&plan.orgs, &plan.counts],
        )
        .await
        .map_err(classify)?;
    // RETURNING does not promise input order: match rows to organizations by name.
    let counts: HashMap<&str, i64> = plan
        .orgs
        .iter()
        .map(String::as_str)
        .zip(plan.counts.iter().copied())
        .collect();
    let mut next: HashMap<String, i64> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let org: String = row.get(0);
        let last: i64 = row.get(1);
        let count = counts[org.as_str()];
        next.insert(org, last - count + 1);
    }
    let seqs: Vec<i64> = jobs
        .iter()
        .map(|job| {
            let slot = next
                .get_mut(job.msg.org.as_str())
                .expect("every organization of the batch got numbers");
            let seq = *slot;
            *slot += 1;
            seq
        })
        .collect();

    let orgs: Vec<&str> = jobs.iter().map(|j| j.msg.org.as_str()).collect();
    let events: Vec<&str> = jobs.iter().map(|j| j.msg.event.as_str()).collect();
    let data: Vec<&str> = jobs.iter().map(|j| j.msg.data.get()).collect();
    let users: Vec<Option<&str>> = jobs
        .iter()
        .map(|j| j.msg.user.as_ref().map(|u| u.as_str()))
        .collect();
    tx.execute(
        &tx.prepare_cached(INSERT_EVENTS).await.map_err(classify)?,
        &[&orgs, &seqs, &events, &data, &users],
    )
    .await
    .map_err(classify)?;

    let updates = plan.executions(jobs, &seqs);
    if !updates.org.is_empty() {
        tx.execute(
            &tx.prepare_cached(UPSERT_EXECUTIONS)
                .await
                .map_err(classify)?,
            &[
                &updates.org,
                &updates.task,
                &updates.status,
                &updates.started,
                &updates.finished,
                &updates.data,
                &updates.seq,
            ],
        )
        .await
        .map_err(classify)?;
    }

    let mut log_org = Vec::new();
    let mut log_task = Vec::new();
    let mut log_seq = Vec::new();
    let mut log_data = Vec::new();
    for (job, seq) in jobs.iter().zip(&seqs) {
        if let (Projection::Log { task }, None) = (&job.projection, &job.msg.user) {
            log_org.push(job.msg.org.as_str());
            log_task.push(task.as_str());
            log_seq.push(*seq);
            log_data.push(job.msg.data.get());
        }
    }
    if !log_org.is_empty() {
        tx.execute(
            &tx.prepare_cached(INSERT_LOGS).await.map_err(classify)?,
            &[&log_org, &log_task, &log_seq, &log_data],
        )
        .await
        .map_err(classify)?;
    }

    tx.commit().await.map_err(classify)?;
    Ok(seqs.into_iter().map(|s| s as u64).collect())
}

/// The organizations of a batch, sorted, with how many events each has.
struct Plan {
    orgs: Vec<String>,
    counts: Vec<i64>,
}

/// One row per execution the batch changes: the batch's updates of a task, merged in
/// sequence order (the upsert may touch each row once per statement).
#[derive(Default)]
struct ExecutionRows {
    org: Vec<String>,
    task: Vec<String>,
    status: Vec<&'static str>,
    started: Vec<bool>,
    finished: Vec<bool>,
    data: Vec<String>,
    seq: Vec<i64>,
}

impl Plan {
    fn new(jobs: &[Job]) -> Self {
        let mut per_org: BTreeMap<&OrgId, i64> = BTreeMap::new();
        for job in jobs {
            *per_org.entry(&job.msg.org).or_default() += 1;
        }
        Self {
            orgs: per_org.keys().map(|o| o.as_str().to_string()).collect(),
            counts: per_org.values().copied().collect(),
        }
    }

    fn executions(&self, jobs: &[Job], seqs: &[i64]) -> ExecutionRows {
        struct Merged<'a> {
            status: ExecutionStatus,
            started: bool,
            data: Map<String, Value>,
            seq: i64,
            key: (&'a str, &'a str),
        }
        let mut merged: BTreeMap<(&str, &str), Merged<'_>> = BTreeMap::new();
        for (job, seq) in jobs.iter().zip(seqs) {
            // User-targeted events stay private: they never reach the shared projections.
            let (Projection::Update { task, status, data }, None) =
                (&job.projection, &job.msg.user)
            else {
                continue;
            };
            let key = (job.msg.org.as_str(), task.as_str());
            let row = merged.entry(key).or_insert_with(|| Merged {
                status: *status,
                started: false,
                data: Map::new(),
                seq: *seq,
                key,
            });
            row.status = *status;
            row.started |= *status != ExecutionStatus::Pending;
            row.data
                .extend(data.iter().map(|(k, v)| (k.clone(), v.clone())));
            row.seq = *seq;
        }
        let mut rows = ExecutionRows::default();
        for row in merged.into_values() {
            rows.org.push(row.key.0.to_string());
            rows.task.push(row.key.1.to_string());
            rows.status.push(row.status.as_str());
            rows.started.push(row.started);
            rows.finished.push(row.status.is_final());
            rows.data.push(Value::Object(row.data).to_string());
            rows.seq.push(row.seq);
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::value::RawValue;

    fn job(org: &str, user: Option<&str>, projection: Projection) -> Job {
        Job {
            msg: Message {
                org: OrgId::parse(org).unwrap(),
                event: crate::protocol::EventName::parse("execution-updated").unwrap(),
                data: RawValue::from_string("{}".into()).unwrap(),
                ts_ms: None,
                user: user.map(|u| crate::protocol::UserId::parse(u).unwrap()),
                via_ingest: true,
                seq: None,
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
    fn organizations_are_locked_in_sorted_order_with_their_counts() {
        let jobs = [
            job("zeta", None, Projection::None),
            job("acme", None, Projection::None),
            job("zeta", None, Projection::None),
            job("mid", None, Projection::None),
        ];
        let plan = Plan::new(&jobs);
        assert_eq!(plan.orgs, ["acme", "mid", "zeta"]);
        assert_eq!(plan.counts, [1, 1, 2]);
    }

    #[test]
    fn updates_of_one_task_in_a_batch_merge_into_one_row_in_seq_order() {
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
        let rows = Plan::new(&jobs).executions(&jobs, &[1, 2, 3, 4, 5, 6]);
        assert_eq!(rows.task, ["t1", "t2"]);
        assert_eq!(rows.status, ["PASSED", "RUNNING"]);
        assert_eq!(rows.started, [true, true]);
        assert_eq!(rows.finished, [true, false]);
        assert_eq!(rows.seq, [5, 2]);
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
        let rows = Plan::new(&jobs).executions(&jobs, &[7]);
        assert_eq!((rows.started[0], rows.finished[0]), (false, false));
    }
}
