//! The SQL of durable ingest: one group commit of a batch of events, in one statement.
//!
//! Why sequence numbers have no gaps: they come from `org_sequences`, incremented in the
//! same transaction that inserts the events, so a rolled-back transaction gives its numbers
//! back. The row lock taken by that increment also serializes the commits of one
//! organization across replicas, so sequence order is commit order. Organizations are
//! locked in sorted order, so two replicas' batches can never deadlock on each other. The
//! pipeline around it (batching, retries, publishing in order) is `ingest::durable`.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tokio_postgres::error::SqlState;

use super::{Store, StoreError};
use crate::protocol::{ExecutionStatus, Message};

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

/// An event to commit: the message, and what it changes besides the event log.
#[derive(Debug)]
pub struct NewEvent {
    pub msg: Message,
    pub projection: Projection,
}

/// Why a batch was not committed.
#[derive(Debug)]
pub enum CommitError {
    /// The store is unavailable (not migrated, no connection).
    Store(StoreError),
    /// A deadlock or serialization conflict: the same batch may succeed if tried again.
    Conflict(String),
    /// PostgreSQL refused the data (a data exception): retrying will not help.
    Data(String),
    /// Anything else: the connection broke, or the outcome is unknown.
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

/// Commits `events` in one statement; returns their sequence numbers, in order.
pub async fn commit(store: &Store, events: &[NewEvent]) -> Result<Vec<u64>, CommitError> {
    let client = store.client().await.map_err(CommitError::Store)?;
    let classify = |e: tokio_postgres::Error| -> CommitError {
        let text = super::describe(&e);
        match e.code() {
            Some(c)
                if *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE =>
            {
                CommitError::Conflict(text)
            }
            // Class 22: data exception (e.g. a JSON string PostgreSQL cannot store).
            Some(c) if c.code().starts_with("22") => CommitError::Data(text),
            _ => {
                let _ = store.failed(&e);
                CommitError::Other(text)
            }
        }
    };
    let orgs: Vec<&str> = events.iter().map(|j| j.msg.org.as_str()).collect();
    let names: Vec<&str> = events.iter().map(|j| j.msg.event.as_str()).collect();
    let data: Vec<&str> = events.iter().map(|j| j.msg.data.get()).collect();
    let users: Vec<Option<&str>> = events
        .iter()
        .map(|j| j.msg.user.as_ref().map(|u| u.as_str()))
        .collect();
    let (kinds, tasks): (Vec<Option<&str>>, Vec<Option<&str>>) = events
        .iter()
        .map(|j| match (&j.projection, &j.msg.user) {
            (Projection::Update { task, .. }, None) => (Some("update"), Some(task.as_str())),
            (Projection::Log { task }, None) => (Some("log"), Some(task.as_str())),
            _ => (None, None),
        })
        .unzip();
    let x = executions(events);
    let statement = client.prepare_cached(COMMIT).await.map_err(classify)?;
    let rows = client
        .query(
            &statement,
            &[
                &orgs,
                &names,
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

fn executions(events: &[NewEvent]) -> ExecutionRows {
    struct Merged {
        status: ExecutionStatus,
        started: bool,
        data: Map<String, Value>,
    }
    let mut merged: BTreeMap<(&str, &str), Merged> = BTreeMap::new();
    for job in events {
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

    fn job(org: &str, user: Option<&str>, projection: Projection) -> NewEvent {
        NewEvent {
            msg: Message {
                org: crate::protocol::OrgId::parse(org).unwrap(),
                event: crate::protocol::EventName::parse("execution-updated").unwrap(),
                data: RawValue::from_string("{}".into()).unwrap(),
                ts_ms: None,
                user: user.map(|u| crate::protocol::UserId::parse(u).unwrap()),
                via_ingest: true,
                seq: None,
                sig: None,
                stamp: None,
            },
            projection,
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
