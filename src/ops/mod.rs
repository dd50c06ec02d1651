//! Operational leaves used by every layer: metric names and the recorder, the shutdown
//! signal, request counting, handing freed memory back to the OS, and one HTTP request to a
//! peer. Nothing here depends
//! on the rest of the crate, so everything may depend on it; the routes operators call
//! (`/healthz`, `/readyz`, `/metrics`) are in [`crate::admin`].

pub mod http;
pub mod memory;
pub mod metrics;
pub mod shutdown;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Counts every request of the router it wraps (the internal one, the REST API) by matched
/// route (never the raw path: bounded labels).
pub async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    ::metrics::counter!(
        metrics::HTTP_REQUESTS,
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    response
}
