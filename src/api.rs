//! The REST API on the public listener: an organization's execution history, read from
//! PostgreSQL, for dashboards that need the state of things they were not connected for.
//!
//! Authentication is the Socket.IO one: the same JWT, sent as `Authorization: Bearer`, checked
//! by the same [`Verifier`], refused with the same two messages. The organization comes from
//! the token and from nothing else: no route or parameter names one, and every read in
//! [`crate::store::read`] is scoped to it, so another organization's task looks exactly like
//! a task that does not exist.
//!
//! Without `DATABASE_URL` there is no history, and the routes answer 404 saying so: 503 is
//! kept for "PostgreSQL is configured but unreachable", the one case where retrying helps.
//!
//! Reads share the store's pool with durable ingest, and anyone on the internet can send
//! requests: at most `MAX_CONCURRENT_READS` run at once and each is bounded by
//! `READ_TIMEOUT`, so dashboards cannot starve ingest of connections. And each user has a
//! budget of reads per second (`FANOUT_REST_RATE_PER_USER`), checked once the token is
//! verified and before any read: one user's script in a loop gets 429 with `Retry-After`
//! instead of those eight places.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use utoipa::{IntoResponses, ToSchema};

use crate::auth::{self, AuthError, Bearer, Verifier};
use crate::ops::{self, metrics};
use crate::protocol::{ErrorBody, ExecutionStatus, OrgId, TaskId, UserId};
use crate::rates::Budgets;
use crate::retry::{RateLimit, retry_after_secs};
use crate::store::read::{self, Cursor};
use crate::store::{Store, StoreError};

/// Executions per page unless `limit` says otherwise, and the most `limit` may ask for.
pub const EXECUTIONS_LIMIT: (u32, u32) = (50, 500);
/// Log chunks per page unless `limit` says otherwise, and the most `limit` may ask for.
pub const LOGS_LIMIT: (u32, u32) = (500, 5000);
/// Reads running at once, per replica: half of the store's pool (16 connections), so
/// durable ingest always has the other half.
const MAX_CONCURRENT_READS: usize = 8;
/// The longest a read may take, waiting for its turn included, before it answers 503.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning per this interval while reads fail.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// What the API needs: the verifier the gateway uses, and the store (`None` without
/// `DATABASE_URL`).
#[derive(Clone)]
pub struct ApiState {
    verifier: Arc<Verifier>,
    store: Option<Store>,
    reads: Arc<Semaphore>,
    warn: Arc<Mutex<RateLimit>>,
    /// Each user's reads per second; `None`: no limit.
    users: Option<Arc<Budgets<(OrgId, UserId)>>>,
}

impl ApiState {
    pub fn new(
        verifier: Arc<Verifier>,
        store: Option<Store>,
        per_user: Option<NonZeroU32>,
    ) -> Self {
        Self {
            verifier,
            store,
            reads: Arc::new(Semaphore::new(MAX_CONCURRENT_READS)),
            warn: Arc::new(Mutex::new(RateLimit::new(WARN_EVERY))),
            users: per_user.map(|rate| Arc::new(Budgets::new(rate))),
        }
    }
}

/// The `/v1/executions` routes. Merge into the public router inside its CORS layer.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/executions", get(list_executions))
        .route("/v1/executions/{task_id}", get(get_execution))
        .route("/v1/executions/{task_id}/logs", get(get_logs))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed.into_response() })
        .route_layer(middleware::from_fn(ops::count_requests))
        .with_state(state)
}

/// A refused or failed API request. The message is the `error` of the JSON answer.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("{}", .0.client_message())]
    Unauthorized(AuthError),
    #[error("{0}")]
    BadRequest(String),
    #[error("execution not found")]
    NotFound,
    #[error("history is not enabled on this deployment (DATABASE_URL is not set)")]
    Disabled,
    #[error("only GET is allowed here")]
    MethodNotAllowed,
    #[error("PostgreSQL is unavailable; retry later")]
    Unavailable,
    #[error(
        "too many requests for this user (FANOUT_REST_RATE_PER_USER: {per_second} per second); retry after {} s",
        retry_after_secs(*.retry_after)
    )]
    RateLimited {
        per_second: u32,
        retry_after: Duration,
    },
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound | Self::Disabled => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (status, Json(ErrorBody::new(&self))).into_response();
        let headers = resp.headers_mut();
        match self {
            Self::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
            }
            Self::MethodNotAllowed => {
                headers.insert(header::ALLOW, "GET,HEAD".parse().unwrap());
            }
            Self::RateLimited { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_after_secs(retry_after).into());
            }
            _ => {}
        }
        resp
    }
}

impl ApiState {
    /// The organization of the request's bearer token, once its user's budget allows one
    /// more read.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<OrgId, ApiError> {
        let verified = match bearer(headers) {
            Ok(token) => {
                let token = serde_json::Value::String(token.to_owned());
                self.verifier.verify_fresh(Some(&token)).await
            }
            Err(e) => Err(e),
        };
        let identity = verified.map_err(|e| {
            ::metrics::counter!(metrics::AUTH_FAILURES, "reason" => e.reason()).increment(1);
            tracing::debug!(reason = e.reason(), error = %e, "REST request refused");
            ApiError::Unauthorized(e)
        })?;
        if let Some(users) = &self.users
            && let Err(retry_after) = users.check(&(identity.org.clone(), identity.user))
        {
            ::metrics::counter!(metrics::REST_RATE_LIMITED).increment(1);
            return Err(ApiError::RateLimited {
                per_second: users.per_second(),
                retry_after,
            });
        }
        Ok(identity.org)
    }

    fn store(&self) -> Result<&Store, ApiError> {
        self.store.as_ref().ok_or(ApiError::Disabled)
    }

    /// Runs `read` when one of the `MAX_CONCURRENT_READS` slots is free, within
    /// `READ_TIMEOUT`.
    async fn guarded<T>(
        &self,
        read: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, ApiError> {
        let run = async {
            let _slot = self
                .reads
                .acquire()
                .await
                .expect("the semaphore is never closed");
            read.await
        };
        let reason = match tokio::time::timeout(READ_TIMEOUT, run).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {READ_TIMEOUT:?}"),
        };
        // The reason stays in the logs: it names hosts the public has no business knowing.
        let warn = self.warn.lock().unwrap().check();
        if let Some(suppressed) = warn {
            tracing::warn!(error = %reason, suppressed, "REST read failed; answering 503");
        } else {
            tracing::debug!(error = %reason, "REST read failed; answering 503");
        }
        Err(ApiError::Unavailable)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(AuthError::Missing);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::Malformed("Authorization header is not ASCII".into()))?;
    match auth::bearer(value) {
        Some(Bearer::Token(token)) => Ok(token),
        Some(Bearer::Empty) => Err(AuthError::Missing),
        None => Err(AuthError::Malformed(
            "Authorization header is not \"Bearer <token>\"".into(),
        )),
    }
}

/// Query parameters, as text: each is checked by hand so that its error names it.
#[derive(Deserialize)]
struct Params {
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    #[serde(rename = "afterSeq")]
    after_seq: Option<String>,
    #[serde(rename = "organizationId")]
    organization_id: Option<String>,
}

impl Params {
    /// The parameters of `uri`'s query string, as the `Query` extractor reads them.
    fn read(uri: &Uri) -> Result<Self, String> {
        let Query(params) = Query::<Params>::try_from_uri(uri)
            .map_err(|e| format!("bad query string: {}", e.body_text()))?;
        if params.organization_id.is_some() {
            // Ignoring it would let a caller believe it had chosen an organization.
            return Err(
                "\"organizationId\" is not a parameter: the organization is always the one of your token"
                    .into(),
            );
        }
        Ok(params)
    }

    fn limit(&self, (default, max): (u32, u32)) -> Result<u32, String> {
        let Some(text) = &self.limit else {
            return Ok(default);
        };
        match text.parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!(
                "\"limit\" must be an integer from 1 to {max} (default {default}); got {text:?}"
            )),
        }
    }
}

// The parsers of the query strings anyone can send, one per route: pure functions of the
// request's URI, public (hidden) so that the fuzz targets in `fuzz/` drive them directly.
// An `Err` is the message of the 400.

/// The checked parameters of `GET /v1/executions`.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct ListQuery {
    pub status: Option<ExecutionStatus>,
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

/// The checked parameters of `GET /v1/executions/{taskId}/logs`.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct LogsQuery {
    pub after_seq: i64,
    pub limit: u32,
}

/// `GET /v1/executions?status=&limit=&cursor=`
#[doc(hidden)]
pub fn list_query(uri: &Uri) -> Result<ListQuery, String> {
    let params = Params::read(uri)?;
    let status = params
        .status
        .as_deref()
        .map(str::parse::<ExecutionStatus>)
        .transpose()
        .map_err(|e| format!("bad \"status\": {e}"))?;
    let limit = params.limit(EXECUTIONS_LIMIT)?;
    let cursor = params
        .cursor
        .as_deref()
        .map(|text| {
            Cursor::decode(text).ok_or_else(|| {
                "\"cursor\" is not one this API returned: pass the \"nextCursor\" of the previous page unchanged, or leave it out for the first page".to_string()
            })
        })
        .transpose()?;
    Ok(ListQuery {
        status,
        limit,
        cursor,
    })
}

/// `GET /v1/executions/{taskId}`: no parameters, but the one that is refused.
#[doc(hidden)]
pub fn execution_query(uri: &Uri) -> Result<(), String> {
    Params::read(uri).map(drop)
}

/// `GET /v1/executions/{taskId}/logs?afterSeq=&limit=`
#[doc(hidden)]
pub fn logs_query(uri: &Uri) -> Result<LogsQuery, String> {
    let params = Params::read(uri)?;
    let after_seq = match params.after_seq.as_deref() {
        None => 0,
        Some(text) => text.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            format!(
                "\"afterSeq\" must be an integer of 0 or more (the \"nextAfterSeq\" of the previous page); got {text:?}"
            )
        })?,
    };
    let limit = params.limit(LOGS_LIMIT)?;
    Ok(LogsQuery { after_seq, limit })
}

/// The `{taskId}` of a path, checked before it reaches PostgreSQL (which refuses a NUL).
/// A segment that is not UTF-8 once percent-decoded is refused here too, as JSON.
fn task(path: Result<Path<String>, PathRejection>) -> Result<TaskId, ApiError> {
    let Path(text) = path.map_err(|e| {
        ApiError::BadRequest(format!("bad \"taskId\" in the path: {}", e.body_text()))
    })?;
    TaskId::parse(&text)
        .map_err(|e| ApiError::BadRequest(format!("bad \"taskId\" in the path: it {e}")))
}

/// A page of executions, most recently updated first.
#[derive(Serialize, ToSchema)]
struct ExecutionList {
    #[schema(value_type = Vec<Execution>)]
    executions: Vec<Box<RawValue>>,
    /// The `cursor` of the next page; `null` on the last one.
    #[serde(rename = "nextCursor")]
    #[schema(required)]
    next_cursor: Option<String>,
}

/// A page of an execution's log chunks, in `seq` order.
#[derive(Serialize, ToSchema)]
struct LogList {
    #[schema(value_type = Vec<LogChunk>)]
    logs: Vec<Box<RawValue>>,
    /// The `afterSeq` of the next page: the last `seq` returned, or the `afterSeq` asked
    /// for when none was.
    #[serde(rename = "nextAfterSeq")]
    next_after_seq: i64,
}

// The rows are rendered to JSON by PostgreSQL (`store::read`), so these two are described,
// never built; `tests/rest.rs` checks the real rows.
/// One execution: the row the history keeps for a task, merged from its updates.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct Execution {
    task_id: String,
    status: ExecutionStatus,
    /// The first update whose status was not `PENDING`; RFC 3339, UTC, milliseconds.
    #[schema(format = DateTime, required)]
    started_at: Option<String>,
    /// The last update with a final status (`PASSED`, `FAILED`, `ERROR`, `CANCELLED`).
    #[schema(format = DateTime, required)]
    finished_at: Option<String>,
    #[schema(format = DateTime)]
    updated_at: String,
    /// The sequence number of the last event applied to it.
    last_seq: u64,
    /// The top-level merge of all its updates' bodies.
    data: serde_json::Map<String, serde_json::Value>,
}

/// One log chunk: one `POST /executions/log` body, as the worker sent it.
#[allow(dead_code)]
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
struct LogChunk {
    seq: u64,
    data: serde_json::Map<String, serde_json::Value>,
    #[schema(format = DateTime)]
    created_at: String,
}

/// The refusals every route of this API may answer; the 404s are each route's own.
#[allow(dead_code)]
#[derive(IntoResponses)]
enum Refusals {
    /// A parameter is invalid (the error names it: `status`, `limit`, `cursor`, `afterSeq`,
    /// the path's `taskId`), or an `organizationId` parameter was sent: the organization is
    /// always the token's.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No token (`Authentication required`), or an invalid, expired or badly signed one,
    /// or not the `Bearer` scheme (`Invalid or expired token`). Checked before anything
    /// else.
    #[response(
        status = 401,
        headers(("WWW-Authenticate" = String, description = "`Bearer`"))
    )]
    Unauthorized(ErrorBody),
    /// A method other than `GET` or `HEAD`.
    #[response(status = 405, headers(("Allow" = String, description = "`GET,HEAD`")))]
    MethodNotAllowed(ErrorBody),
    /// The token's user is over `FANOUT_REST_RATE_PER_USER` requests per second on this
    /// replica.
    #[response(
        status = 429,
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))
    )]
    RateLimited(ErrorBody),
    /// PostgreSQL is unreachable, not migrated yet or too slow (10 s); or the replica's
    /// public listener is at its connection cap (`FANOUT_MAX_CONNECTIONS`; then with
    /// `Retry-After: 1`, and the connection is closed). Retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// List executions
///
/// The token's organization's executions, most recently updated first (ties by `taskId`,
/// descending). Follow `nextCursor` until it is `null`.
#[utoipa::path(
    get,
    path = "/v1/executions",
    tag = "history",
    security(("jwt" = [])),
    params(
        ("status" = Option<ExecutionStatus>, Query, description = "Only executions in this status."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Page size (default 50)."),
        ("cursor" = Option<String>, Query, description = "The `nextCursor` of the previous page, unchanged; absent for the first page."),
    ),
    responses(
        (status = 200, description = "A page of executions.", body = ExecutionList),
        (status = 404, description = "The replica runs without a history (`DATABASE_URL` is not set).", body = ErrorBody),
        Refusals,
    )
)]
async fn list_executions(
    State(s): State<ApiState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Json<ExecutionList>, ApiError> {
    let org = s.authenticate(&headers).await?;
    let store = s.store()?;
    let ListQuery {
        status,
        limit,
        cursor,
    } = list_query(&uri).map_err(ApiError::BadRequest)?;
    let page = s
        .guarded(read::executions(
            store,
            &org,
            status,
            cursor.as_ref(),
            limit,
        ))
        .await?;
    Ok(Json(ExecutionList {
        executions: page.executions,
        next_cursor: page.next.as_ref().map(Cursor::encode),
    }))
}

/// Get one execution
///
/// Another organization's task answers exactly as a task that does not exist.
#[utoipa::path(
    get,
    path = "/v1/executions/{task_id}",
    tag = "history",
    security(("jwt" = [])),
    params(
        ("task_id" = String, Path, description = "The task id, percent-encoded (`suite%2Fa` for `suite/a`)."),
    ),
    responses(
        (status = 200, description = "The execution.", body = Execution),
        (status = 404, description = "The organization has no such task (`execution not found`), or the replica runs without a history.", body = ErrorBody),
        Refusals,
    )
)]
async fn get_execution(
    State(s): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<Box<RawValue>>, ApiError> {
    let org = s.authenticate(&headers).await?;
    let store = s.store()?;
    execution_query(&uri).map_err(ApiError::BadRequest)?;
    let task_id = task(path)?;
    s.guarded(read::execution(store, &org, &task_id))
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

/// List an execution's log chunks
///
/// A task without logs (or unknown to the organization) has an empty list, not a 404: logs
/// may be stored before the execution's first status update. Ask again with `afterSeq` =
/// `nextAfterSeq` until fewer than `limit` come back.
#[utoipa::path(
    get,
    path = "/v1/executions/{task_id}/logs",
    tag = "history",
    security(("jwt" = [])),
    params(
        ("task_id" = String, Path, description = "The task id, percent-encoded."),
        ("afterSeq" = Option<i64>, Query, minimum = 0, description = "Only chunks with a greater `seq` (default 0): the previous `nextAfterSeq`."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 5000, description = "Page size (default 500)."),
    ),
    responses(
        (status = 200, description = "A page of log chunks.", body = LogList),
        (status = 404, description = "The replica runs without a history (`DATABASE_URL` is not set).", body = ErrorBody),
        Refusals,
    )
)]
async fn get_logs(
    State(s): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Json<LogList>, ApiError> {
    let org = s.authenticate(&headers).await?;
    let store = s.store()?;
    let LogsQuery { after_seq, limit } = logs_query(&uri).map_err(ApiError::BadRequest)?;
    let task_id = task(path)?;
    let page = s
        .guarded(read::logs(store, &org, &task_id, after_seq, limit))
        .await?;
    Ok(Json(LogList {
        logs: page.logs,
        next_after_seq: page.last_seq.unwrap_or(after_seq),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(&headers(Some("Bearer abc"))), Ok("abc"));
        assert_eq!(bearer(&headers(Some("bearer  abc "))), Ok("abc"));
        assert_eq!(bearer(&headers(None)), Err(AuthError::Missing));
        assert_eq!(bearer(&headers(Some("Bearer"))), Err(AuthError::Missing));
        assert_eq!(bearer(&headers(Some("Bearer  "))), Err(AuthError::Missing));
        let basic = bearer(&headers(Some("Basic dXNlcjpwdw=="))).unwrap_err();
        assert_eq!(basic.client_message(), "Invalid or expired token");
    }

    fn params(limit: Option<&str>) -> Params {
        Params {
            status: None,
            limit: limit.map(str::to_string),
            cursor: None,
            after_seq: None,
            organization_id: None,
        }
    }

    #[test]
    fn limits() {
        assert_eq!(params(None).limit((50, 500)).unwrap(), 50);
        assert_eq!(params(Some("1")).limit((50, 500)).unwrap(), 1);
        assert_eq!(params(Some("500")).limit((50, 500)).unwrap(), 500);
        for bad in ["0", "501", "-1", "", "ten", "1.5"] {
            let err = params(Some(bad)).limit((50, 500)).unwrap_err();
            assert!(err.contains("from 1 to 500"), "{bad}: {err}");
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        assert_eq!(
            ApiError::Unauthorized(AuthError::Missing).to_string(),
            "Authentication required"
        );
        assert_eq!(
            ApiError::Unauthorized(AuthError::Expired).to_string(),
            "Invalid or expired token"
        );
        let resp = ApiError::Unauthorized(AuthError::Expired).into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(ApiError::Disabled.status(), StatusCode::NOT_FOUND);
        assert!(ApiError::Unavailable.to_string().ends_with("retry later"));
    }
}
