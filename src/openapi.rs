//! The OpenAPI 3.1 document of the HTTP APIs: the workers' ingest API and the operators'
//! routes (internal listener), and the dashboards' REST history API (public listener).
//!
//! It is generated from the code, never written beside it: each handler carries its
//! `#[utoipa::path]` (route, parameters, every status it answers), and the bodies are the
//! types the handlers serialize (`protocol::ErrorBody` for every refusal). This module only
//! assembles the document: the two listeners as per-path servers, the two bearer schemes,
//! the tags. `tests/openapi.rs` keeps it true: every route of the routers is in it, every
//! path in it is routed, and the answers of real bad requests are the documented ones.
//!
//! Served at `GET /openapi.json` on the internal listener (clients are generated from it,
//! and it names the internal routes: not for the internet), and printed by
//! `fanout openapi` without a running replica.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::server::{ServerBuilder, ServerVariableBuilder};
use utoipa::openapi::{OpenApi as Document, Server};
use utoipa::{Modify, OpenApi};

use crate::protocol::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fanout",
        description = "The HTTP APIs of a fanout replica. Each path names its listener in `servers`: \
            the ingest API and the operators' routes are on the internal listener \
            (`FANOUT_INTERNAL_LISTEN`, port 3001 by default), never exposed to the internet; \
            the REST history API is on the public listener (`FANOUT_LISTEN`, port 3000 by \
            default) beside Socket.IO (whose protocol is in docs/protocol.md). Every refusal \
            is JSON `{\"error\": \"...\"}` saying what to do; unknown paths answer 404 \
            `{\"error\": \"not found\"}` on both listeners. A request head over 32 KiB is \
            answered 431 by the HTTP server itself, before any route, without a body."
    ),
    paths(
        crate::ingest::execution_update,
        crate::ingest::execution_log,
        crate::ingest::publish,
        crate::api::list_executions,
        crate::api::get_execution,
        crate::api::get_logs,
        crate::admin::healthz,
        crate::admin::readyz,
        crate::admin::render_metrics,
        openapi_json,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Listeners),
    tags(
        (name = "ingest", description = "Workers publish events (internal listener; bearer ingest key)."),
        (name = "history", description = "Dashboards read the execution history (public listener; bearer JWT; needs `DATABASE_URL`)."),
        (name = "operations", description = "Health, readiness, metrics and this document (internal listener; no authentication)."),
    )
)]
struct Api;

/// The document, as served.
pub fn document() -> Document {
    Api::openapi()
}

/// The document as pretty JSON.
pub fn json() -> String {
    document()
        .to_pretty_json()
        .expect("an OpenAPI document serializes")
}

/// `GET /openapi.json`, to merge into the internal listener's router.
pub fn router() -> Router {
    let body = json();
    Router::new()
        .route(
            "/openapi.json",
            get(move || {
                let body = body.clone();
                async move { openapi_json(body).await }
            }),
        )
        .method_not_allowed_fallback(crate::admin::method_not_allowed)
}

/// This document
///
/// The OpenAPI 3.1 document of both listeners' HTTP APIs.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "This document.", body = serde_json::Value, content_type = "application/json"),
        (status = 405, description = "A method other than `GET` or `HEAD`.", body = ErrorBody,
            headers(("Allow" = String, description = "`GET,HEAD`"))),
    )
)]
async fn openapi_json(body: String) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// The security schemes, and each path's listener as its `servers`.
struct Listeners;

impl Modify for Listeners {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "ingestKey",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A key of FANOUT_INGEST_KEYS (any organization) or of \
                         FANOUT_INGEST_KEYS_FILE (its organizations only).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "The dashboard's token, the one it sends as Socket.IO's `auth.token`: \
                         its `organizationId` claim is the only organization it reads.",
                    ))
                    .build(),
            ),
        );
        let public = listener("public", "FANOUT_LISTEN", "3000");
        let internal = listener("internal", "FANOUT_INTERNAL_LISTEN", "3001");
        for (path, item) in doc.paths.paths.iter_mut() {
            let server = if path.starts_with("/v1/executions") {
                &public
            } else {
                &internal
            };
            item.servers = Some(vec![server.clone()]);
        }
    }
}

/// A listener as a server: `http://{host}:{port}`, the port `setting`'s by default.
fn listener(name: &str, setting: &str, port: &str) -> Server {
    ServerBuilder::new()
        .url("http://{host}:{port}")
        .description(Some(format!(
            "The {name} listener ({setting}; port {port} unless it says otherwise)."
        )))
        .parameter(
            "host",
            ServerVariableBuilder::new()
                .default_value("localhost")
                .description(Some("The replica's host.")),
        )
        .parameter(
            "port",
            ServerVariableBuilder::new()
                .default_value(port)
                .description(Some(format!("The port of {setting}."))),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_refusal_as_the_error_body() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, item) in doc["paths"].as_object().unwrap() {
            let server = item["servers"][0]["variables"]["port"]["default"].clone();
            let expected = if path.starts_with("/v1/") && !path.starts_with("/v1/publish") {
                "3000"
            } else {
                "3001"
            };
            assert_eq!(server, expected, "{path}");
            for (method, op) in item.as_object().unwrap() {
                if method == "servers" {
                    continue;
                }
                for (status, answer) in op["responses"].as_object().unwrap() {
                    // `/readyz` answers its not-ready state, not a refusal.
                    if status.starts_with('2') || (path == "/readyz" && status == "503") {
                        continue;
                    }
                    assert_eq!(
                        answer["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/Error",
                        "{method} {path} {status}"
                    );
                }
            }
        }
    }
}
