//! The operators' routes on the internal listener: `/healthz`, `/readyz`, `/metrics`.
//!
//! They live on the internal listener with the ingest API, never on the public one:
//! dashboards on the internet must not reach `/metrics` or the publish endpoints.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde_json::json;

use crate::auth::jwks::Jwks;
use crate::bus::Bus;
use crate::ops::metrics;
use crate::protocol::ErrorBody;
use crate::store::Store;
use crate::tasks::Tasks;
use crate::transport::Transports;

/// What `/readyz` and `/metrics` need to answer.
#[derive(Clone)]
pub struct AdminState {
    pub bus: Arc<Bus>,
    /// The history, when configured: its state is reported, but does not make the
    /// replica unready (see `readyz`).
    pub store: Option<Store>,
    /// `JWT_JWKS_URL`'s keys: none yet makes the replica unready; failing fetches are
    /// reported (the keys in force stay).
    pub jwks: Option<Arc<Jwks>>,
    /// The public connections, against their cap.
    pub transports: Transports,
    /// The replica's tasks: one that failed makes it unready; their shutdown signal.
    pub tasks: Tasks,
    pub metrics: PrometheusHandle,
}

pub fn router(state: AdminState) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .method_not_allowed_fallback(method_not_allowed);
    #[cfg(feature = "fault-injection")]
    let router = router.route(
        "/faults/{task}",
        axum::routing::post(
            |axum::extract::Path(task): axum::extract::Path<String>| async move {
                crate::tasks::faults::inject(&task);
                Json(json!({"injected": task}))
            },
        ),
    );
    router.with_state(state)
}

/// The answer of every operators' route to a method other than `GET` or `HEAD`: JSON, as
/// every other refusal of the internal listener.
pub async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET,HEAD")],
        Json(ErrorBody::new("only GET is allowed here")),
    )
        .into_response()
}

/// The answer of `/readyz`, built and documented from this one type: fields that do not
/// apply are left out, never `null`.
#[derive(Serialize, utoipa::ToSchema)]
struct Readiness {
    /// `ready` or `not ready`.
    status: &'static str,
    /// The bus in use: `redis`, `redis-sentinel`, `redis-cluster` or `memory`.
    bus: &'static str,
    /// With a history: `up` or `down` (still ready: live messages still flow).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    store: Option<&'static str>,
    /// With `JWT_JWKS_URL`: `ok`, or `stale` (fetches fail; the keys in force stay).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    jwks: Option<&'static str>,
    /// Why not ready, or what is degraded.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    reason: Option<String>,
    /// Why the JWKS is stale.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    jwks_reason: Option<String>,
}

/// Liveness
///
/// The process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "Alive.", body = serde_json::Value, example = json!({"status": "ok"})),
        (status = 405, description = "A method other than `GET` or `HEAD`.", body = ErrorBody,
            headers(("Allow" = String, description = "`GET,HEAD`"))),
    )
)]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Why the replica should get no new connections, if it should not.
fn unready(s: &AdminState) -> Option<String> {
    let failed = s.tasks.failed();
    if s.tasks.shutdown().is_triggered() {
        Some("shutting down".into())
    } else if !failed.is_empty() {
        Some(format!(
            "task failed: {}; restarting (or exiting, for a task the replica cannot do without)",
            failed.join(", ")
        ))
    } else if let Some(health) = s.jwks.as_ref().map(|j| j.health())
        && health.loaded_at.is_none()
    {
        Some(format!(
            "no key fetched from JWT_JWKS_URL yet ({}); every token is refused until one is",
            health.failing.as_deref().unwrap_or("fetching")
        ))
    } else if !s.bus.is_up() {
        Some("redis subscriber is down; reconnecting".into())
    } else if s.transports.is_full() {
        let (open, max) = s.transports.load();
        Some(format!(
            "public connection limit reached ({open} of FANOUT_MAX_CONNECTIONS={max}); new connections are refused"
        ))
    } else {
        None
    }
}

/// Readiness
///
/// Ready means "send me connections": shutting down or cut off from the bus is not.
/// PostgreSQL being down is reported (`"store": "down"`) but keeps the replica ready:
/// sockets still get every live message, only durable ingest and replay wait for it, and
/// taking every replica out of the load balancer would stop fan-out too. Every answer
/// names the bus, so an SRE sees at once a replica left on the in-process one.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready.", body = Readiness,
            example = json!({"status": "ready", "bus": "redis", "store": "up"})),
        (status = 503, description = "Not ready: shutting down, a task failed, no JWKS key fetched yet, the bus down, or the public connection cap reached (`reason` says which).", body = Readiness,
            example = json!({"status": "not ready", "bus": "redis", "reason": "redis subscriber is down; reconnecting"})),
        (status = 405, description = "A method other than `GET` or `HEAD`.", body = ErrorBody,
            headers(("Allow" = String, description = "`GET,HEAD`"))),
    )
)]
async fn readyz(State(s): State<AdminState>) -> Response {
    let mut body = Readiness {
        status: "ready",
        bus: s.bus.name(),
        store: None,
        jwks: None,
        reason: None,
        jwks_reason: None,
    };
    if let Some(reason) = unready(&s) {
        body.status = "not ready";
        body.reason = Some(reason);
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    if let Some(store) = &s.store {
        if store.is_up() {
            body.store = Some("up");
        } else {
            body.store = Some("down");
            body.reason = Some(if store.is_migrated() {
                "PostgreSQL is unreachable: durable ingest answers 503 and replay sends resync-required until it is back".into()
            } else {
                "the database is not migrated yet (PostgreSQL unreachable?): durable ingest answers 503".into()
            });
        }
    }
    // A JWKS that cannot be fetched any more keeps its keys in force: reported, still ready.
    if let Some(jwks) = &s.jwks {
        let health = jwks.health();
        body.jwks = Some(if health.failing.is_some() {
            "stale"
        } else {
            "ok"
        });
        if let (Some(error), Some(at)) = (health.failing, health.loaded_at) {
            let age = at.elapsed().unwrap_or_default().as_secs();
            body.jwks_reason = Some(format!(
                "JWT_JWKS_URL cannot be fetched ({error}); the keys fetched {age} s ago stay in force"
            ));
        }
    }
    Json(body).into_response()
}

/// Prometheus metrics
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The Prometheus text format.", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 405, description = "A method other than `GET` or `HEAD`.", body = ErrorBody,
            headers(("Allow" = String, description = "`GET,HEAD`"))),
    )
)]
async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    // Set from the same condition as /readyz at each scrape, so the two cannot disagree.
    let ready = if unready(&s).is_none() { 1.0 } else { 0.0 };
    ::metrics::gauge!(metrics::READY).set(ready);
    // The runtime counts its tasks anyway; reading the count costs one atomic load.
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    ::metrics::gauge!(metrics::RUNTIME_TASKS).set(tasks as f64);
    s.metrics.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}
