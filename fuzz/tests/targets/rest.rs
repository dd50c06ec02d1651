//! REST parameters and cursors (`api::list_query`, `api::logs_query`, `Cursor`): the query
//! strings anyone on the internet can send to the public listener.

use bolero::TypeGenerator;
use fanout::api::{self, EXECUTIONS_LIMIT, LOGS_LIMIT, ListQuery, LogsQuery};
use fanout::protocol::{ExecutionStatus, TaskId};
use fanout::store::read::Cursor;
use http::Uri;

/// The query string of a request line, as hyper would have parsed it (requests whose
/// target is not a URI never reach the API).
fn uri(path: &str, query: &[u8]) -> Option<Uri> {
    let mut target = path.as_bytes().to_vec();
    target.push(b'?');
    target.extend_from_slice(query);
    Uri::try_from(target).ok()
}

/// The parameter a refusal is about: every 400 names it.
fn names_a_parameter(message: &str) -> bool {
    [
        "\"limit\"",
        "\"status\"",
        "\"cursor\"",
        "\"afterSeq\"",
        "\"organizationId\"",
        "query string",
    ]
    .iter()
    .any(|name| message.contains(name))
}

fn cursor_ok(cursor: &Cursor) {
    let text = cursor.encode();
    assert!(
        text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{text}"
    );
    assert_eq!(Cursor::decode(&text).as_ref(), Some(cursor));
}

/// Any query string on each route: accepted parameters are within their bounds, refused
/// ones are a 400 that names the parameter.
#[test]
fn rest_query_strings() {
    bolero::check!().for_each(|query: &[u8]| {
        if let Some(uri) = uri("/v1/executions", query) {
            match api::list_query(&uri) {
                Ok(ListQuery {
                    status,
                    limit,
                    cursor,
                }) => {
                    assert!((1..=EXECUTIONS_LIMIT.1).contains(&limit));
                    if let Some(status) = status {
                        assert_eq!(status.as_str().parse::<ExecutionStatus>(), Ok(status));
                    }
                    if let Some(cursor) = &cursor {
                        cursor_ok(cursor);
                    }
                }
                Err(message) => assert!(names_a_parameter(&message), "{message}"),
            }
            if let Err(message) = api::execution_query(&uri) {
                assert!(names_a_parameter(&message), "{message}");
            }
        }
        if let Some(uri) = uri("/v1/executions/t1/logs", query) {
            match api::logs_query(&uri) {
                Ok(LogsQuery { after_seq, limit }) => {
                    assert!(after_seq >= 0);
                    assert!((1..=LOGS_LIMIT.1).contains(&limit));
                }
                Err(message) => assert!(names_a_parameter(&message), "{message}"),
            }
        }
    });
}

/// Any text as a cursor: what decodes encodes back to a cursor that decodes the same
/// (one value, however it was spelled), and a task id PostgreSQL can store.
#[test]
fn rest_cursor_text() {
    bolero::check!().for_each(|bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        if let Some(cursor) = Cursor::decode(&text) {
            cursor_ok(&cursor);
            assert!(cursor.encode().len() <= text.len());
        }
    });
}

#[derive(Debug, TypeGenerator)]
struct Params {
    status: Option<u8>,
    limit: Option<u32>,
    micros: i64,
    task: String,
    cursor: bool,
    after_seq: Option<i64>,
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Parameters written as a client writes them: read back exactly when valid, and a
/// cursor of any valid position and task id round-trips.
#[test]
fn rest_query_round_trip() {
    const YEARS_1_TO_9999_US: std::ops::RangeInclusive<i64> =
        -62_135_596_800_000_000..=253_402_300_799_999_999;
    bolero::check!().with_type::<Params>().for_each(|p| {
        let status = p.status.map(|i| ExecutionStatus::ALL[usize::from(i) % 6]);
        let cursor_text = hex(&format!("1:{}:{}", p.micros, p.task));
        let mut pairs = vec![];
        if let Some(status) = status {
            pairs.push(("status", status.as_str().to_string()));
        }
        if let Some(limit) = p.limit {
            pairs.push(("limit", limit.to_string()));
        }
        if p.cursor {
            pairs.push(("cursor", cursor_text.clone()));
        }
        let query = serde_urlencoded::to_string(&pairs).unwrap();
        let list = uri("/v1/executions", query.as_bytes()).expect("an encoded query is a URI");
        let valid_limit = p
            .limit
            .is_none_or(|l| (1..=EXECUTIONS_LIMIT.1).contains(&l));
        let valid_cursor = TaskId::parse(&p.task).is_ok() && YEARS_1_TO_9999_US.contains(&p.micros);
        match api::list_query(&list) {
            Ok(q) => {
                assert!(valid_limit && (valid_cursor || !p.cursor), "{query}");
                assert_eq!(q.status, status);
                assert_eq!(q.limit, p.limit.unwrap_or(EXECUTIONS_LIMIT.0));
                assert_eq!(q.cursor.is_some(), p.cursor);
                if let Some(cursor) = q.cursor {
                    assert_eq!(cursor.encode(), cursor_text);
                }
            }
            Err(message) => {
                assert!(
                    !valid_limit || (p.cursor && !valid_cursor),
                    "{query}: {message}"
                );
                assert!(names_a_parameter(&message), "{message}");
            }
        }
        assert_eq!(Cursor::decode(&cursor_text).is_some(), valid_cursor);

        let mut pairs = vec![];
        if let Some(after) = p.after_seq {
            pairs.push(("afterSeq", after.to_string()));
        }
        if let Some(limit) = p.limit {
            pairs.push(("limit", limit.to_string()));
        }
        let query = serde_urlencoded::to_string(&pairs).unwrap();
        let logs = uri("/v1/executions/t1/logs", query.as_bytes()).unwrap();
        let valid_after = p.after_seq.is_none_or(|a| a >= 0);
        let valid_limit = p.limit.is_none_or(|l| (1..=LOGS_LIMIT.1).contains(&l));
        match api::logs_query(&logs) {
            Ok(q) => {
                assert!(valid_after && valid_limit, "{query}");
                assert_eq!(q.after_seq, p.after_seq.unwrap_or(0));
                assert_eq!(q.limit, p.limit.unwrap_or(LOGS_LIMIT.0));
            }
            Err(message) => {
                assert!(!valid_after || !valid_limit, "{query}: {message}");
                assert!(names_a_parameter(&message), "{message}");
            }
        }
    });
}
