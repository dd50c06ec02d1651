//! The example dashboard (`examples/dashboard/`), embedded in the binary and served under
//! `/dashboard/` on the public listener.
//!
//! Why it is here at all: the first command (`cargo run`, or the image) should show updates
//! arriving, not a token to paste into a client one has yet to write. So in dev mode the
//! replica serves the page and the banner links to it; in production it serves it only when
//! asked (`FANOUT_SERVE_DASHBOARD=1`), because a deployment's dashboards are its own.
//!
//! Why embedded (`include_bytes!` of the repository's files, byte for byte): the binary is
//! all a newcomer has; files beside it would be one more thing to find, and could drift from
//! the build. Why on the public listener: the page then shares fanout's origin, so it needs
//! no CORS, and a balancer's affinity cookie goes with its requests by itself.
//!
//! The banner's link carries the token in the URL's fragment, which browsers never send: it
//! lands in no access log, and the page takes it out of the address bar. Responses carry the
//! page's Content-Security-Policy as a header (its own scripts only), `nosniff`, and
//! `no-referrer`; `no-cache` with an `ETag`, so a new binary's page is never stale.

use std::sync::LazyLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Redirect, Response};
use axum::routing::get;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Where the page is served.
pub const PATH: &str = "/dashboard/";

/// One embedded file: its name under [`PATH`], its type, its bytes.
struct File {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! file {
    ($name:literal, $type:literal) => {
        File {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../examples/dashboard/", $name)),
        }
    };
}

/// Everything the page loads, and nothing else of its folder.
const FILES: &[File] = &[
    file!("index.html", "text/html; charset=utf-8"),
    file!("app.js", "text/javascript; charset=utf-8"),
    file!("style.css", "text/css; charset=utf-8"),
    file!("vendor/socket.io.min.js", "text/javascript; charset=utf-8"),
    file!("vendor/LICENSE", "text/plain; charset=utf-8"),
];

/// The page's own policy (as in its `<meta>`): only its files run; it talks to fanout.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     connect-src 'self' http: https: ws: wss:; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Each file's `ETag`: the hash of its bytes, computed once.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|f| {
            let hash = Sha256::digest(f.body);
            let hex: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header")
        })
        .collect()
});

/// The page's routes: `/dashboard` (redirected to `/dashboard/`), `/dashboard/` and its files.
pub fn router() -> Router {
    Router::new()
        .route("/dashboard", get(|| async { Redirect::permanent(PATH) }))
        .route(PATH, get(|headers: HeaderMap| async move { serve("", &headers) }))
        .route(
            "/dashboard/{*file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move { serve(&file, &headers) }),
        )
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let name = if name.is_empty() { "index.html" } else { name };
    let Some(i) = FILES.iter().position(|f| f.name == name) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no file {name:?} in the dashboard")})),
        )
            .into_response();
    };
    let file = &FILES[i];
    let etag = ETAGS[i].clone();
    let fresh = headers.get(header::IF_NONE_MATCH).is_some_and(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii() == etag.as_bytes())
    });
    let common = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        common,
        [(header::CONTENT_TYPE, file.content_type)],
        file.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_embedded_files() {
        // Every local script and stylesheet the page names is embedded (a file added to
        // the page but not here would be a 404 in dev mode only).
        let html = std::str::from_utf8(FILES[0].body).unwrap();
        for attr in ["src=\"", "href=\""] {
            for part in html.split(attr).skip(1) {
                let target = &part[..part.find('"').unwrap()];
                assert!(
                    FILES.iter().any(|f| f.name == target),
                    "index.html loads {target}, which is not embedded"
                );
            }
        }
    }

    #[test]
    fn etags_differ_per_file() {
        let set: std::collections::HashSet<_> = ETAGS.iter().collect();
        assert_eq!(set.len(), FILES.len());
    }
}
