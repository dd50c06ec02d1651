//! The ingest API for workers, on the internal listener.
//!
//! Every answer is definite: 200 means the message was accepted; anything else is a JSON
//! `{ "error" }` saying what to fix (4xx) or that nothing was accepted (503), so a worker
//! can always tell whether to retry.
//!
//! Without a store, accepted means the bus has the message. With one (`DATABASE_URL`),
//! accepted means committed to the history with a sequence number (`seq` in the answer),
//! and then published; an execution update must then carry a known status, because it also
//! updates the `executions` projection.

pub mod client;
pub mod doc;
pub mod durable;
pub mod keys;

use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Extension, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::post;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::bus::{Bus, BusError};
use crate::ops::metrics;
use crate::protocol::{
    ErrorBody, EventName, ExecutionStatus, InvalidId, MAX_JSON_DEPTH, Message, OrgId, TaskId,
    UserId, json_depth, now_ms,
};
use crate::rates::Budgets;
use crate::retry::{RateLimit, retry_after_secs};
use crate::store::StoreError;
use crate::store::write::Projection;
use durable::Writer;
use keys::{Grant, KeyName, Keys};

#[derive(Clone)]
pub struct IngestState {
    pub bus: Arc<Bus>,
    pub keys: Arc<Keys>,
    pub max_payload_bytes: usize,
    /// Set when the replica has a store: accepted messages are durable events.
    pub writer: Option<Writer>,
    /// Set with `FANOUT_INGEST_RATE`: each key's budget of messages per second (a worker in
    /// a loop would otherwise take the bus's and the history's capacity from all others).
    pub rates: Option<Arc<Budgets<KeyName>>>,
}

/// At most one warning per this interval while ingest refuses messages (503).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The event names whose data feed the projections.
const EXECUTION_UPDATED: &str = "execution-updated";
const EXECUTION_LOG: &str = "execution-log";

pub fn router(state: IngestState) -> Router {
    Router::new()
        .route("/executions/update", post(execution_update))
        .route("/executions/log", post(execution_log))
        .route("/v1/publish", post(publish))
        .method_not_allowed_fallback(|| async { IngestError::MethodNotAllowed.into_response() })
        .layer(DefaultBodyLimit::max(state.max_payload_bytes))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .with_state(state)
}

/// A refused or failed ingest request.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(
        "missing or unknown ingest key: send \"Authorization: Bearer <key>\" with a key from FANOUT_INGEST_KEYS or FANOUT_INGEST_KEYS_FILE"
    )]
    Unauthorized,
    #[error(
        "ingest key {key:?} does not cover organization {org:?} (its scope in FANOUT_INGEST_KEYS_FILE); nothing was accepted"
    )]
    Forbidden { key: String, org: String },
    #[error(
        "ingest key {key} is over its rate of {per_second} messages/s (FANOUT_INGEST_RATE); nothing was accepted: retry after {} s",
        retry_after_secs(*.retry_after)
    )]
    RateLimited {
        key: KeyName,
        per_second: u32,
        retry_after: Duration,
    },
    #[error("only POST is allowed here")]
    MethodNotAllowed,
    #[error("request body is larger than {limit} bytes (FANOUT_MAX_PAYLOAD_BYTES)")]
    TooLarge { limit: usize },
    #[error("cannot read the request body: {0}")]
    Body(String),
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body must be a JSON object")]
    NotAnObject,
    #[error(
        "request body nests deeper than {} levels of arrays and objects: it is the event's data, which the bus envelope nests one level deeper",
        MAX_JSON_DEPTH - 1
    )]
    TooDeep,
    #[error("\"{field}\" {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error(transparent)]
    Unavailable(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IngestError {
    fn field(field: &'static str, problem: InvalidId) -> Self {
        Self::Field {
            field,
            problem: problem.to_string(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(StoreError::Rejected(_)) => StatusCode::BAD_REQUEST,
            Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // An outage refuses every request: one line per period says so, with a count.
            static WARN: LazyLock<Mutex<RateLimit>> =
                LazyLock::new(|| Mutex::new(RateLimit::new(WARN_EVERY)));
            match WARN.lock().unwrap().check() {
                Some(suppressed) => tracing::warn!(
                    suppressed_since_last = suppressed,
                    "ingest refused a message: {self}"
                ),
                None => tracing::debug!("ingest refused a message: {self}"),
            }
        }
        let mut resp = (status, Json(ErrorBody::new(&self))).into_response();
        match self {
            Self::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
            }
            Self::MethodNotAllowed => {
                resp.headers_mut()
                    .insert(header::ALLOW, "POST".parse().unwrap());
            }
            Self::RateLimited { retry_after, .. } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_secs(retry_after).into());
            }
            _ => {}
        }
        resp
    }
}

async fn require_key(State(s): State<IngestState>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(grant) = s.keys.current().check_header(header).cloned() else {
        return IngestError::Unauthorized.into_response();
    };
    ::metrics::counter!(metrics::INGEST_KEY_USED, "key" => grant.name.to_string()).increment(1);
    if let Some(rates) = &s.rates
        && let Err(retry_after) = rates.check(&grant.name)
    {
        ::metrics::counter!(metrics::INGEST_RATE_LIMITED, "key" => grant.name.to_string())
            .increment(1);
        return IngestError::RateLimited {
            key: grant.name,
            per_second: rates.per_second(),
            retry_after,
        }
        .into_response();
    }
    let mut req = req;
    req.extensions_mut().insert(grant);
    next.run(req).await
}

/// The answer of an accepted message (200).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({"status": "broadcasted", "seq": 42}))]
pub struct Accepted {
    pub status: AcceptedStatus,
    /// With a history (`DATABASE_URL`): the event's sequence number in its organization.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub seq: Option<u64>,
    /// `false` with `stored`, absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub published: Option<bool>,
}

/// `broadcasted` (the `/executions/*` routes) or `published` (`/v1/publish`): the bus took
/// the message (with a history: committed first). `stored`: committed with its `seq`, but
/// the bus refused it; replicas deliver it from the history: do not retry.
#[derive(Debug, Clone, Copy, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AcceptedStatus {
    Broadcasted,
    Published,
    Stored,
}

/// The body as text, with its top-level fields, or the reason it is refused.
struct Body {
    text: String,
    fields: Map<String, Value>,
}

/// The bytes of the body, or why they could not be read (over the size limit, cut off).
fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, IngestError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge { limit }
        } else {
            IngestError::Body(e.body_text())
        }
    })
}

fn read_body(bytes: &[u8]) -> Result<Body, IngestError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| IngestError::InvalidJson("not UTF-8".into()))?
        .to_owned();
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(fields)) => Ok(Body { text, fields }),
        Ok(_) => Err(IngestError::NotAnObject),
        Err(e) => Err(IngestError::InvalidJson(e.to_string())),
    }
}

fn org_of(fields: &Map<String, Value>) -> Result<OrgId, IngestError> {
    OrgId::from_json(fields.get("organizationId").unwrap_or(&Value::Null))
        .map_err(|e| IngestError::field("organizationId", e))
}

fn require(fields: &Map<String, Value>, field: &'static str) -> Result<(), IngestError> {
    match fields.get(field) {
        None | Some(Value::Null) => Err(IngestError::field(field, InvalidId::Missing)),
        Some(Value::String(s)) if s.is_empty() => Err(IngestError::field(field, InvalidId::Empty)),
        Some(_) => Ok(()),
    }
}

/// Publishes `msg` (or, with a store, commits then publishes it) and builds the answer.
/// `status` is the answer's status when the message reached the bus.
async fn send(
    state: &IngestState,
    grant: &Grant,
    msg: Message,
    status: AcceptedStatus,
) -> Result<Json<Accepted>, IngestError> {
    if !grant.covers(&msg.org) {
        ::metrics::counter!(metrics::INGEST_FORBIDDEN, "key" => grant.name.to_string())
            .increment(1);
        let err = IngestError::Forbidden {
            key: grant.name.to_string(),
            org: msg.org.as_str().to_owned(),
        };
        // A worker with the wrong key repeats: one line per period, with a count.
        static WARN: LazyLock<Mutex<RateLimit>> =
            LazyLock::new(|| Mutex::new(RateLimit::new(WARN_EVERY)));
        if let Some(suppressed) = WARN.lock().unwrap().check() {
            tracing::warn!(
                suppressed_since_last = suppressed,
                "ingest refused a message: {err}"
            );
        }
        return Err(err);
    }
    let Some(writer) = &state.writer else {
        state.bus.publish(msg).await?;
        ::metrics::counter!(metrics::PUBLISHED, "source" => "http").increment(1);
        return Ok(Json(Accepted {
            status,
            seq: None,
            published: None,
        }));
    };
    let projection = projection(&msg)?;
    let stored = writer.append(msg, projection).await?;
    Ok(Json(if stored.published {
        Accepted {
            status,
            seq: Some(stored.seq),
            published: None,
        }
    } else {
        // Durable, numbered, and delivered from the history: the worker must not retry.
        Accepted {
            status: AcceptedStatus::Stored,
            seq: Some(stored.seq),
            published: Some(false),
        }
    }))
}

/// What a durable event changes besides the event log, checking what that needs: an
/// execution event names its task, and an update a known status. Events for one user
/// stay out of the organization-wide projections.
///
/// Public (hidden) for the fuzz targets in `fuzz/`: it parses the worker's `data`.
#[doc(hidden)]
pub fn projection(msg: &Message) -> Result<Projection, IngestError> {
    let event = msg.event.as_str();
    if msg.user.is_some() || (event != EXECUTION_UPDATED && event != EXECUTION_LOG) {
        return Ok(Projection::None);
    }
    // The projections are jsonb, which cannot hold a NUL character.
    if msg.data.get().contains("\\u0000") {
        return Err(IngestError::Field {
            field: "data",
            problem: "must not contain \\u0000 in a string: the history cannot store it".into(),
        });
    }
    let Ok(Value::Object(data)) = serde_json::from_str::<Value>(msg.data.get()) else {
        return Err(IngestError::Field {
            field: "data",
            problem: format!("of {event} must be a JSON object with \"taskId\""),
        });
    };
    let task = task_id(data.get("taskId"))?;
    if event == EXECUTION_LOG {
        return Ok(Projection::Log { task });
    }
    let status = match data.get("status") {
        Some(Value::String(s)) => s
            .parse::<ExecutionStatus>()
            .map_err(|e| IngestError::Field {
                field: "status",
                problem: format!("is invalid: {e}"),
            })?,
        None | Some(Value::Null) => return Err(IngestError::field("status", InvalidId::Missing)),
        Some(_) => {
            return Err(IngestError::Field {
                field: "status",
                problem: "must be a string".into(),
            });
        }
    };
    Ok(Projection::Update { task, status, data })
}

/// A task id: a non-empty string of printable characters, or a non-negative integer.
fn task_id(value: Option<&Value>) -> Result<String, IngestError> {
    let text = match value {
        None | Some(Value::Null) => return Err(IngestError::field("taskId", InvalidId::Missing)),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_u64() => n.to_string(),
        Some(_) => return Err(IngestError::field("taskId", InvalidId::WrongType)),
    };
    TaskId::parse(&text).map_err(|e| IngestError::field("taskId", e))?;
    Ok(text)
}

/// The ingest route a body was sent to: each makes its message differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `POST /executions/update`: the body is the data of `execution-updated`.
    ExecutionUpdate,
    /// `POST /executions/log`: the body is the data of `execution-log`.
    ExecutionLog,
    /// `POST /v1/publish`: `{ organizationId, event, data, userId? }`.
    Publish,
}

/// The message a worker's body makes on `route`, or the 400 that says what to fix. No I/O:
/// the one parser of ingest bodies, which is why it is public (hidden): the fuzz targets in
/// `fuzz/` drive it directly.
#[doc(hidden)]
pub fn decode(route: Route, body: &[u8]) -> Result<Message, IngestError> {
    let body = read_body(body)?;
    match route {
        Route::ExecutionUpdate => broadcast_body(body, EXECUTION_UPDATED, &["taskId", "status"]),
        Route::ExecutionLog => broadcast_body(body, EXECUTION_LOG, &["taskId", "log"]),
        Route::Publish => publish_body(body),
    }
}

/// The body itself becomes the event's data, byte for byte.
fn broadcast_body(
    body: Body,
    event: &'static str,
    required: &[&'static str],
) -> Result<Message, IngestError> {
    let org = org_of(&body.fields)?;
    for field in required {
        require(&body.fields, field)?;
    }
    // serde_json took the body at up to MAX_JSON_DEPTH levels; as the envelope's `data` it
    // is one level deeper, which subscribers refuse: refused here, not lost there.
    if json_depth(&body.text) >= MAX_JSON_DEPTH {
        return Err(IngestError::TooDeep);
    }
    let data =
        RawValue::from_string(body.text).map_err(|e| IngestError::InvalidJson(e.to_string()))?;
    Ok(Message {
        org,
        event: EventName::parse(event).expect("built-in event names are valid"),
        data,
        ts_ms: Some(now_ms()),
        user: None,
        via_ingest: true,
        seq: None,
        sig: None,
        stamp: None,
    })
}

/// `{ organizationId, event, data, userId? }`: `data` is the event's data.
fn publish_body(Body { fields, text }: Body) -> Result<Message, IngestError> {
    let org = org_of(&fields)?;
    let event = match fields.get("event") {
        Some(Value::String(name)) => {
            EventName::parse(name).map_err(|e| IngestError::field("event", e))?
        }
        None | Some(Value::Null) => return Err(IngestError::field("event", InvalidId::Missing)),
        Some(_) => {
            return Err(IngestError::Field {
                field: "event",
                problem: "must be a string".into(),
            });
        }
    };
    if !fields.contains_key("data") {
        return Err(IngestError::field("data", InvalidId::Missing));
    }
    // `data` is passed on as the worker wrote it (key order included), not re-serialised.
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
    }
    let raw: Raw<'_> =
        serde_json::from_str(&text).map_err(|e| IngestError::InvalidJson(e.to_string()))?;
    let data = raw.data.to_owned();
    let user = match fields.get("userId") {
        None | Some(Value::Null) => None,
        Some(v) => Some(UserId::from_json(v).map_err(|e| IngestError::field("userId", e))?),
    };
    Ok(Message {
        org,
        event,
        data,
        ts_ms: Some(now_ms()),
        user,
        via_ingest: true,
        seq: None,
        sig: None,
        stamp: None,
    })
}

/// Broadcast an execution update
///
/// The body is delivered as `execution-updated` to every socket of its organization, its
/// bytes unchanged. With a history, it is committed first (`seq` in the answer) and updates
/// the execution the REST API reads.
#[utoipa::path(
    post,
    path = "/executions/update",
    tag = "ingest",
    security(("ingestKey" = [])),
    request_body(content = doc::ExecutionUpdate, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted: see `status`.", body = Accepted),
        doc::Refusals,
    )
)]
async fn execution_update(
    State(s): State<IngestState>,
    Extension(grant): Extension<Grant>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, IngestError> {
    let msg = decode(
        Route::ExecutionUpdate,
        &body_bytes(body, s.max_payload_bytes)?,
    )?;
    send(&s, &grant, msg, AcceptedStatus::Broadcasted).await
}

/// Broadcast an execution's log chunk
///
/// The body is delivered as `execution-log` to every socket of its organization, its bytes
/// unchanged. With a history, it is committed first (`seq` in the answer) and stored as one
/// log chunk of the task.
#[utoipa::path(
    post,
    path = "/executions/log",
    tag = "ingest",
    security(("ingestKey" = [])),
    request_body(content = doc::ExecutionLog, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted: see `status`.", body = Accepted),
        doc::Refusals,
    )
)]
async fn execution_log(
    State(s): State<IngestState>,
    Extension(grant): Extension<Grant>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, IngestError> {
    let msg = decode(Route::ExecutionLog, &body_bytes(body, s.max_payload_bytes)?)?;
    send(&s, &grant, msg, AcceptedStatus::Broadcasted).await
}

/// Publish any event
///
/// `data` is delivered as `event` to every socket of the organization, or with `userId` to
/// that user's only. With a history, it is committed first (`seq` in the answer).
#[utoipa::path(
    post,
    path = "/v1/publish",
    tag = "ingest",
    security(("ingestKey" = [])),
    request_body(content = doc::Publish, content_type = "application/json"),
    responses(
        (status = 200, description = "Accepted: see `status`.", body = Accepted,
            example = json!({"status": "published", "seq": 43})),
        doc::Refusals,
    )
)]
async fn publish(
    State(s): State<IngestState>,
    Extension(grant): Extension<Grant>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, IngestError> {
    let msg = decode(Route::Publish, &body_bytes(body, s.max_payload_bytes)?)?;
    send(&s, &grant, msg, AcceptedStatus::Published).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BusKey, ENVELOPE_OVERHEAD, Stamp};

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    /// Found by the fuzz target `ingest_bodies`: a body is the data of its envelope, one
    /// level deeper, so it may nest one level less than serde_json allows.
    #[test]
    fn update_bodies_nest_no_deeper_than_their_envelope_can() {
        let body = |depth: usize| {
            format!(
                r#"{{"organizationId":"acme","taskId":"t1","status":"RUNNING","x":{}}}"#,
                nested(depth)
            )
        };
        let err = decode(Route::ExecutionUpdate, body(126).as_bytes()).unwrap_err();
        assert!(matches!(err, IngestError::TooDeep), "{err}");
        assert_eq!(err.into_response().status(), StatusCode::BAD_REQUEST);
        let msg = decode(Route::ExecutionUpdate, body(125).as_bytes()).unwrap();
        Message::from_envelope(msg.org.clone(), &msg.to_envelope(), usize::MAX).unwrap();
        // `data` of a publish is already a level down: serde_json's limit is the envelope's.
        let publish = format!(
            r#"{{"organizationId":"acme","event":"e","data":{}}}"#,
            nested(126)
        );
        let msg = decode(Route::Publish, publish.as_bytes()).unwrap();
        Message::from_envelope(msg.org.clone(), &msg.to_envelope(), usize::MAX).unwrap();
    }

    /// Found by the fuzz target `ingest_bodies`: the envelope of a body of the largest size
    /// is larger than the body, by at most `ENVELOPE_OVERHEAD`.
    #[test]
    fn envelopes_exceed_their_body_by_at_most_the_overhead() {
        let frame = r#"{"organizationId":"a","taskId":"t","status":"PENDING"}"#;
        let mut msg = decode(Route::ExecutionUpdate, frame.as_bytes()).unwrap();
        msg.seq = Some(u64::MAX);
        msg.sig = BusKey::new(&[1; 32]).unwrap().sign(&msg);
        msg.stamp = Some(Stamp {
            origin: u64::MAX,
            epoch: u32::MAX,
            n: u64::MAX,
        });
        let envelope = msg.to_envelope();
        assert!(envelope.len() > frame.len());
        assert!(envelope.len() <= frame.len() + ENVELOPE_OVERHEAD);
        Message::from_envelope(msg.org, &envelope, frame.len() + ENVELOPE_OVERHEAD).unwrap();
    }
}
