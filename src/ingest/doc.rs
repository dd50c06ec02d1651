//! The ingest API as the OpenAPI document describes it (`crate::openapi` assembles it): the
//! bodies [`super::decode`] accepts, and the refusals [`super::IngestError`] answers.
//!
//! The bodies are parsed by hand (each error names its field, and a body's bytes become the
//! event's data unchanged), so their schemas cannot be derived from the parser: they are
//! described here, beside it, and `tests/openapi.rs` sends each one's example to a real
//! replica, which must accept it. Everything else in the document (the routes, the answers,
//! the error body) is derived from the types the handlers really use.

#![allow(dead_code)] // Described, never built: these types exist for their schemas.

use serde_json::Value;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{IntoResponses, PartialSchema, ToSchema};

use crate::protocol::ErrorBody;

/// An organization id (`protocol::OrgId`).
pub struct OrganizationId;

impl PartialSchema for OrganizationId {
    fn schema() -> RefOr<Schema> {
        id_schema(
            "An organization id: 1-128 characters of `[A-Za-z0-9._-]`, or a non-negative integer (used as its decimal text).",
            ObjectBuilder::new().pattern(Some("^[A-Za-z0-9._-]{1,128}$")),
        )
    }
}

impl ToSchema for OrganizationId {}

/// A task id or a user id (`protocol::TaskId`, `protocol::UserId`).
pub struct TaskId;

impl PartialSchema for TaskId {
    fn schema() -> RefOr<Schema> {
        id_schema(
            "A task id (or user id): 1-256 characters without control characters, or a non-negative integer (used as its decimal text).",
            ObjectBuilder::new()
                .min_length(Some(1))
                .max_length(Some(256))
                .pattern(Some("^[^\\u0000-\\u001F\\u007F]+$")),
        )
    }
}

impl ToSchema for TaskId {}

/// A string as `text` says, or a non-negative integer.
fn id_schema(description: &str, text: ObjectBuilder) -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(text.schema_type(Type::String))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0)),
        )
        .description(Some(description))
        .into()
}

/// `POST /executions/update`: any JSON object with these fields; the body itself, byte for
/// byte, is the data of the `execution-updated` event. At most `FANOUT_MAX_PAYLOAD_BYTES`
/// (64 KiB by default), nesting at most 126 levels of arrays and objects.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(
    example = json!({"organizationId": "acme", "taskId": "t-42", "status": "RUNNING", "progress": 40})
)]
pub struct ExecutionUpdate {
    organization_id: OrganizationId,
    task_id: TaskId,
    /// Not `null` nor an empty string. With a history (`DATABASE_URL`), one of `PENDING`,
    /// `RUNNING`, `PASSED`, `FAILED`, `ERROR`, `CANCELLED` (exactly; the `ExecutionStatus`
    /// schema): the last one wins in the execution the REST API reads.
    status: Value,
}

/// `POST /executions/log`: any JSON object with these fields; the body itself, byte for
/// byte, is the data of the `execution-log` event (one log chunk of the history). At most
/// `FANOUT_MAX_PAYLOAD_BYTES`, nesting at most 126 levels.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(
    example = json!({"organizationId": "acme", "taskId": "t-42", "log": "step 3 ok"})
)]
pub struct ExecutionLog {
    organization_id: OrganizationId,
    task_id: TaskId,
    /// Any value but `null` or an empty string.
    log: Value,
}

/// `POST /v1/publish`: any event to one organization's dashboards, or to one user of it.
/// At most `FANOUT_MAX_PAYLOAD_BYTES`, nesting at most 127 levels (the body object
/// included). Other fields are ignored.
#[derive(ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(
    example = json!({"organizationId": "acme", "event": "deploy-finished", "data": {"id": "d-7", "ok": true}})
)]
pub struct Publish {
    organization_id: OrganizationId,
    /// 1-64 characters of `[A-Za-z0-9._:-]`; not a Socket.IO reserved name, not starting
    /// with `auth-`. With a history, `execution-updated` and `execution-log` data are
    /// checked as the bodies of the two `/executions/*` routes are.
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,64}$")]
    event: String,
    /// The event's data, passed on as written (any JSON value, `null` included).
    data: Value,
    /// Only this user's sockets (of the organization) receive it; stored and replayed to
    /// that user only. Absent or `null`: every socket of the organization.
    user_id: Option<TaskId>,
}

/// Every refusal of an ingest route. A 4xx accepted nothing: fix the request. A 503
/// accepted nothing: retry.
#[derive(IntoResponses)]
pub enum Refusals {
    /// The body is not a JSON object, nests too deep, or a field is missing or invalid;
    /// with a history, an unknown `status` or a `\u0000` in a string. The error names the
    /// field.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No `Authorization: Bearer <key>`, or a key that is not in force. Checked before
    /// anything else, on every method.
    #[response(
        status = 401,
        headers(("WWW-Authenticate" = String, description = "`Bearer`"))
    )]
    Unauthorized(ErrorBody),
    /// The key's scope in `FANOUT_INGEST_KEYS_FILE` does not cover the body's
    /// organization (checked after the body).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// A method other than `POST`.
    #[response(status = 405, headers(("Allow" = String, description = "`POST`")))]
    MethodNotAllowed(ErrorBody),
    /// The body is larger than `FANOUT_MAX_PAYLOAD_BYTES`.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The key is over its `FANOUT_INGEST_RATE` messages per second on this replica.
    #[response(
        status = 429,
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))
    )]
    RateLimited(ErrorBody),
    /// The bus is unreachable or re-subscribing (no history), or PostgreSQL is unreachable
    /// or not migrated yet (with one). Nothing was accepted: retry.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}
