//! The reads behind the REST API: one organization's executions and the log chunks of one
//! of its tasks.
//!
//! Every statement takes the organization as its first parameter and filters on it, and no
//! function here can be called without one: there is no read that spans organizations.
//!
//! Rows are rendered to JSON by PostgreSQL (`json_build_object`) and come back as text that
//! the API sends as it is ([`RawValue`]): the stored `data` (jsonb) is never parsed on its
//! way out, and timestamps are formatted by the server, so no date-time crate is needed.
//!
//! Pages of executions use a keyset cursor, `(updated_at, task_id)` of the last row sent,
//! not an offset: a page costs the same wherever it starts, and rows updated meanwhile are
//! neither skipped nor repeated because of rows that moved before the position. The order
//! (`updated_at DESC, task_id DESC`) is that of the indexes of migration 0003.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;

use super::{Store, StoreError};
use crate::protocol::{ExecutionStatus, OrgId, TaskId};

/// `timestamptz` column → RFC 3339 text in UTC with milliseconds (`null` stays `null`).
macro_rules! utc {
    ($column:literal) => {
        concat!(
            "to_char(",
            $column,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

/// One row of `executions` as the API's JSON object (`json`, not `jsonb`: keys stay in
/// this order).
const EXECUTION_JSON: &str = concat!(
    "json_build_object(",
    "'taskId', task_id, ",
    "'status', status, ",
    "'startedAt', ",
    utc!("started_at"),
    ", 'finishedAt', ",
    utc!("finished_at"),
    ", 'updatedAt', ",
    utc!("updated_at"),
    ", 'lastSeq', last_seq, ",
    "'data', data)::text"
);

const LOG_JSON: &str = concat!(
    "json_build_object('seq', seq, 'data', data, 'createdAt', ",
    utc!("created_at"),
    ")::text"
);

/// A position in an organization's list of executions: the `(updated_at, task_id)` of the
/// last row of a page. The next page starts strictly after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `updated_at` in microseconds since the Unix epoch: PostgreSQL's own precision, so
    /// the position is exact (milliseconds would skip or repeat rows updated within one).
    updated_at_us: i64,
    task_id: String,
}

/// Format version, first in every cursor, so that the format can change without old
/// cursors being misread.
const CURSOR_VERSION: &str = "1";
/// Years 1 to 9999 in microseconds since the epoch: inside PostgreSQL's range, so a forged
/// cursor is refused here (400) rather than by the server.
const CURSOR_RANGE_US: std::ops::RangeInclusive<i64> =
    -62_135_596_800_000_000..=253_402_300_799_999_999;

impl Cursor {
    /// The opaque text handed to clients: hex of `1:<micros>:<task_id>`.
    pub fn encode(&self) -> String {
        let plain = format!("{CURSOR_VERSION}:{}:{}", self.updated_at_us, self.task_id);
        plain.bytes().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a cursor made by [`Cursor::encode`]; `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        if !text.len().is_multiple_of(2) || !text.is_ascii() {
            return None;
        }
        let bytes = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let plain = String::from_utf8(bytes).ok()?;
        let (version, rest) = plain.split_once(':')?;
        let (micros, task_id) = rest.split_once(':')?;
        // The task id goes to PostgreSQL: it must be one (no NUL or other control).
        if version != CURSOR_VERSION || TaskId::parse(task_id).is_err() {
            return None;
        }
        // `parse` accepts a leading '+'; a cursor we made never has one.
        if micros.starts_with('+') {
            return None;
        }
        let updated_at_us = micros.parse().ok()?;
        if !CURSOR_RANGE_US.contains(&updated_at_us) {
            return None;
        }
        Some(Self {
            updated_at_us,
            task_id: task_id.to_string(),
        })
    }

    fn updated_at(&self) -> SystemTime {
        let magnitude = Duration::from_micros(self.updated_at_us.unsigned_abs());
        if self.updated_at_us >= 0 {
            UNIX_EPOCH + magnitude
        } else {
            UNIX_EPOCH - magnitude
        }
    }

    fn new(updated_at: SystemTime, task_id: String) -> Self {
        let updated_at_us = match updated_at.duration_since(UNIX_EPOCH) {
            Ok(after) => after.as_micros() as i64,
            Err(before) => -(before.duration().as_micros() as i64),
        };
        Self {
            updated_at_us,
            task_id,
        }
    }
}

/// One page of executions, each a JSON object, and where the next page starts (`None` on
/// the last page).
#[derive(Debug)]
pub struct ExecutionPage {
    pub executions: Vec<Box<RawValue>>,
    pub next: Option<Cursor>,
}

/// One page of log chunks, each a JSON object, and the `seq` of the last one.
#[derive(Debug)]
pub struct LogPage {
    pub logs: Vec<Box<RawValue>>,
    pub last_seq: Option<i64>,
}

/// `org`'s executions, most recently updated first, `limit` per page, optionally only those
/// in `status`, starting after `after`.
pub async fn executions(
    store: &Store,
    org: &OrgId,
    status: Option<ExecutionStatus>,
    after: Option<&Cursor>,
    limit: u32,
) -> Result<ExecutionPage, StoreError> {
    let org = org.as_str();
    // One more row than asked for says whether there is a next page.
    let fetch = i64::from(limit) + 1;
    let after_ts = after.map(Cursor::updated_at);
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&org];
    let mut sql = format!(
        "SELECT {EXECUTION_JSON}, updated_at, task_id FROM executions WHERE organization_id = $1"
    );
    if let Some(status) = &status {
        params.push(status);
        sql.push_str(&format!(" AND status = ${}", params.len()));
    }
    if let (Some(cursor), Some(ts)) = (after, &after_ts) {
        params.push(ts);
        params.push(&cursor.task_id);
        sql.push_str(&format!(
            " AND (updated_at, task_id) < (${}, ${})",
            params.len() - 1,
            params.len()
        ));
    }
    params.push(&fetch);
    sql.push_str(&format!(
        " ORDER BY updated_at DESC, task_id DESC LIMIT ${}",
        params.len()
    ));

    let client = store.client().await?;
    let statement = client
        .prepare_cached(&sql)
        .await
        .map_err(|e| store.failed(&e))?;
    let rows = client
        .query(&statement, &params)
        .await
        .map_err(|e| store.failed(&e))?;
    let more = rows.len() > limit as usize;
    let rows = &rows[..rows.len().min(limit as usize)];
    let next = match rows.last() {
        Some(last) if more => Some(Cursor::new(last.get(1), last.get(2))),
        _ => None,
    };
    let executions = rows
        .iter()
        .map(|row| raw(row.get(0)))
        .collect::<Result<_, _>>()?;
    Ok(ExecutionPage { executions, next })
}

/// One execution of `org`, or `None` if `org` has none with this `task_id`.
pub async fn execution(
    store: &Store,
    org: &OrgId,
    task_id: &TaskId,
) -> Result<Option<Box<RawValue>>, StoreError> {
    let client = store.client().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {EXECUTION_JSON} FROM executions WHERE organization_id = $1 AND task_id = $2"
        ))
        .await
        .map_err(|e| store.failed(&e))?;
    let row = client
        .query_opt(&statement, &[&org.as_str(), &task_id.as_str()])
        .await
        .map_err(|e| store.failed(&e))?;
    row.map(|row| raw(row.get(0))).transpose()
}

/// The log chunks of `org`'s task `task_id` with `seq > after_seq`, in `seq` order, at most
/// `limit` of them.
pub async fn logs(
    store: &Store,
    org: &OrgId,
    task_id: &TaskId,
    after_seq: i64,
    limit: u32,
) -> Result<LogPage, StoreError> {
    let client = store.client().await?;
    let statement = client
        .prepare_cached(&format!(
            "SELECT {LOG_JSON}, seq FROM execution_logs
             WHERE organization_id = $1 AND task_id = $2 AND seq > $3
             ORDER BY seq LIMIT $4"
        ))
        .await
        .map_err(|e| store.failed(&e))?;
    let rows = client
        .query(
            &statement,
            &[
                &org.as_str(),
                &task_id.as_str(),
                &after_seq,
                &i64::from(limit),
            ],
        )
        .await
        .map_err(|e| store.failed(&e))?;
    let last_seq = rows.last().map(|row| row.get(1));
    let logs = rows
        .iter()
        .map(|row| raw(row.get(0)))
        .collect::<Result<_, _>>()?;
    Ok(LogPage { logs, last_seq })
}

/// PostgreSQL's JSON text as a value to embed in a response.
fn raw(text: String) -> Result<Box<RawValue>, StoreError> {
    RawValue::from_string(text)
        .map_err(|e| StoreError::Unavailable(format!("PostgreSQL returned invalid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_exactly() {
        for (us, task) in [
            (1_764_150_000_123_456, "t-42"),
            (0, "a:b:c"),
            (-1_500_000, "before 1970"),
            (253_402_300_799_999_999, "é"),
        ] {
            let cursor = Cursor {
                updated_at_us: us,
                task_id: task.into(),
            };
            let text = cursor.encode();
            assert!(text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
            assert_eq!(Cursor::decode(&text), Some(cursor.clone()));
            assert_eq!(Cursor::new(cursor.updated_at(), task.into()), cursor);
        }
    }

    #[test]
    fn anything_else_is_not_a_cursor() {
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        for bad in [
            String::new(),
            "zz".into(),
            "abc".into(),
            "é".into(),
            hex("1:123"),
            hex("1:123:"),
            hex("2:123:t"),
            hex("1:+123:t"),
            hex("1:12x:t"),
            hex("1:99999999999999999999:t"),
            hex("1:253402300800000000:t"),
        ] {
            assert_eq!(Cursor::decode(&bad), None, "{bad:?}");
        }
        // Non-UTF-8 bytes.
        assert_eq!(Cursor::decode("ff3a"), None);
    }

    #[test]
    fn rows_are_rendered_as_json_objects() {
        assert!(EXECUTION_JSON.starts_with("json_build_object('taskId', task_id"));
        assert!(EXECUTION_JSON.contains(
            "to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        ));
        assert!(LOG_JSON.ends_with(")::text"));
    }
}
