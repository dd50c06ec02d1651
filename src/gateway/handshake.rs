//! In front of Socket.IO: the middleware of the public router, and the sessions that have
//! not authenticated yet.
//!
//! Opening an Engine.IO session costs one anonymous request, and each session costs the
//! replica memory until it ends; unchecked, a flood of handshakes grows a replica by
//! hundreds of megabytes. So a session that has not yet presented a valid token is
//! *pending*, and pending sessions are bounded in number (`FANOUT_MAX_PENDING_SESSIONS`:
//! past it a handshake is answered 503, and clients retry) and in lifetime
//! (`FANOUT_HANDSHAKE_TIMEOUT`, socketioxide's connect timeout). A pending session is
//! counted by a [`PendingSlot`] put in the extensions of the request that opens it:
//! socketioxide keeps that request's head for the session's whole life, so the slot is freed
//! when the session is dropped, however it ends, or earlier, when its token is verified.
//!
//! A session also gets its budget of packets (`FANOUT_MAX_PACKETS_PER_SECOND`), which the
//! engine enforces: it reads it from the request that opened the session.
//!
//! The middleware also remembers which connection carries each session (see
//! [`crate::transport`]), refuses sessions fanout has ended, and detaches the head of
//! every request that may open a session from hyper's read buffer.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use engineioxide::InboundLimit;
use serde_json::json;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;

use super::hosts::{HostRates, TrustedProxies};
use crate::ops::metrics;
use crate::retry::retry_after_secs;
use crate::transport::{Conn, Transports};

/// What the middleware needs: the connections, the count of pending sessions, each client
/// host's budget of new ones, and the budget of packets each session gets.
#[derive(Clone)]
pub struct Handshakes {
    transports: Transports,
    pending: Arc<Pending>,
    hosts: Option<Arc<HostRates>>,
    trusted: Arc<TrustedProxies>,
    packets: Option<InboundLimit>,
}

struct Pending {
    count: AtomicUsize,
    max: usize,
}

/// One pending session's place in the count, held by the request head the session keeps.
#[derive(Clone)]
pub struct PendingSlot(Arc<Slot>);

struct Slot {
    pending: Arc<Pending>,
    freed: AtomicBool,
}

impl Slot {
    fn free(&self) {
        if !self.freed.swap(true, Ordering::AcqRel) {
            self.pending.count.fetch_sub(1, Ordering::AcqRel);
            ::metrics::gauge!(metrics::PENDING_SESSIONS).decrement(1.0);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.free();
    }
}

impl Handshakes {
    pub fn new(transports: Transports, max_pending: usize) -> Self {
        Self {
            transports,
            pending: Arc::new(Pending {
                count: AtomicUsize::new(0),
                max: max_pending,
            }),
            hosts: None,
            trusted: Arc::default(),
            packets: None,
        }
    }

    /// Each session may send `per_second` packets (none: no limit); one over it is closed by
    /// the engine, and counted here.
    pub fn packets_per_second(mut self, per_second: Option<NonZeroU32>) -> Self {
        self.packets = per_second.map(|per_second| InboundLimit {
            per_second,
            on_exceeded: Some(Arc::new(|sid| {
                ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "reason" => "packet_rate")
                    .increment(1);
                tracing::debug!(%sid, "closed: over its packet budget");
            })),
        });
        self
    }

    /// Each client host may open `per_second` sessions (none: no limit); the host is told by
    /// `X-Forwarded-For` when the peer is one of `trusted`.
    pub fn per_host(mut self, per_second: Option<NonZeroU32>, trusted: TrustedProxies) -> Self {
        self.hosts = per_second.map(|rate| Arc::new(HostRates::new(rate)));
        self.trusted = Arc::new(trusted);
        self
    }

    /// Takes one session from the budget of the host `req` comes from; over it, the 429
    /// to answer.
    fn refuse_host(&self, req: &Request) -> Option<Response> {
        let (Some(hosts), Some(ConnectInfo(conn))) =
            (&self.hosts, req.extensions().get::<ConnectInfo<Conn>>())
        else {
            return None;
        };
        let host = self.trusted.client_host(conn.peer.ip(), req.headers());
        let wait = hosts.check(host).err()?;
        ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "reason" => "host_rate").increment(1);
        let secs = retry_after_secs(wait);
        let error = format!(
            "too many new connections from this host (FANOUT_HANDSHAKE_RATE_PER_HOST: {} per second); retry after {secs} s",
            hosts.per_second()
        );
        Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Json(json!({ "error": error })),
            )
                .into_response(),
        )
    }

    /// Sessions opened and not yet authenticated.
    pub fn pending(&self) -> usize {
        self.pending.count.load(Ordering::Acquire)
    }

    fn take_slot(&self) -> Option<PendingSlot> {
        let pending = &self.pending;
        pending
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < pending.max).then_some(n + 1)
            })
            .ok()?;
        ::metrics::gauge!(metrics::PENDING_SESSIONS).increment(1.0);
        Some(PendingSlot(Arc::new(Slot {
            pending: pending.clone(),
            freed: AtomicBool::new(false),
        })))
    }
}

/// `socket` presented a valid token: its session no longer counts as pending.
pub fn authenticated(socket: &SocketRef) {
    if let Some(PendingSlot(slot)) = socket.req_parts().extensions.get::<PendingSlot>() {
        slot.free();
    }
}

/// Middleware on the public router.
pub async fn middleware(
    State(handshakes): State<Handshakes>,
    mut req: Request,
    next: Next,
) -> Response {
    // Only Engine.IO's requests name a session: a `sid` parameter of a REST request is not one
    // (an ended session's would have been answered with Engine.IO's error, not the API's).
    let engine = req.uri().path().starts_with("/socket.io");
    match session_id(req.uri().query()).filter(|_| engine) {
        Some(sid) => {
            if handshakes.transports.is_ended(sid) {
                // What Engine.IO answers for a session it does not know.
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"code": 1, "message": "Session ID unknown"})),
                )
                    .into_response();
            }
            if let Some(ConnectInfo(conn)) = req.extensions().get::<ConnectInfo<Conn>>() {
                handshakes.transports.record(sid, conn);
            }
        }
        None => {
            let opens = opens_session(&req);
            // Before the head is trimmed: the host may be in X-Forwarded-For.
            if opens && let Some(refusal) = handshakes.refuse_host(&req) {
                return refusal;
            }
            detach_head(&mut req, opens);
            if opens {
                let Some(slot) = handshakes.take_slot() else {
                    ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "reason" => "max_pending")
                        .increment(1);
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1")],
                        Json(json!({
                            "error": "too many connections are authenticating on this replica; retry shortly"
                        })),
                    )
                        .into_response();
                };
                req.extensions_mut().insert(slot);
                if let Some(packets) = &handshakes.packets {
                    req.extensions_mut().insert(packets.clone());
                }
            }
        }
    }
    next.run(req).await
}

/// An Engine.IO handshake: a GET to the Socket.IO path that names no session (a browser's
/// CORS preflight of it is an OPTIONS, which opens nothing and keeps its headers).
fn opens_session(req: &Request) -> bool {
    req.method() == axum::http::Method::GET
        && req.uri().path().starts_with("/socket.io")
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("EIO=")))
}

/// The headers a session's request head keeps: those read after this middleware, by the
/// CORS layer (`origin`) and the engine (`sec-websocket-key` to accept the upgrade,
/// `content-type` of a polling body). fanout reads none: the token comes in the Socket.IO
/// CONNECT packet.
const SESSION_HEADERS: [header::HeaderName; 4] = [
    header::ORIGIN,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::CONTENT_TYPE,
];

/// Copies the URI and headers of a request into allocations of their own; for a request
/// that opens a session (`opens`), only the [`SESSION_HEADERS`].
///
/// hyper parses them as slices of its 8-16 KiB connection read buffer, and socketioxide
/// keeps the request head of the request that opened a session for the session's whole
/// life; without the copy, every idle connection pins a read buffer (measured: 16 KiB of
/// its ~30 KiB, see BENCHMARKS.md). The headers nothing reads (a browser's user agent,
/// cookies, languages, a dozen more) would still cost every session ~100 bytes each,
/// for as long as it lives.
fn detach_head(req: &mut Request, opens: bool) {
    use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
    let headers = std::mem::take(req.headers_mut());
    let kept = |name: &HeaderName| !opens || SESSION_HEADERS.contains(name);
    let mut fresh = HeaderMap::with_capacity(headers.keys().filter(|n| kept(n)).count());
    for (name, value) in headers.iter().filter(|(n, _)| kept(n)) {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) else {
            continue;
        };
        fresh.append(name, value);
    }
    *req.headers_mut() = fresh;
    if let Ok(uri) = Uri::try_from(req.uri().to_string()) {
        *req.uri_mut() = uri;
    }
}

fn session_id(query: Option<&str>) -> Option<Sid> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("sid="))
        .and_then(|s| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_heads_keep_their_content_but_not_the_read_buffer() {
        let buffer = bytes::Bytes::from(
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nx-custom: v\r\n".repeat(100),
        );
        let uri = axum::http::Uri::from_maybe_shared(buffer.slice(4..41)).unwrap();
        let mut req = Request::builder()
            .uri(uri)
            .header(
                "x-custom",
                axum::http::HeaderValue::from_maybe_shared(buffer.slice(62..63)).unwrap(),
            )
            .body(axum::body::Body::empty())
            .unwrap();
        detach_head(&mut req, false);
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(req.headers()["x-custom"], "v");
        // The request no longer holds a reference to the buffer: it is uniquely owned again.
        assert!(buffer.is_unique(), "the read buffer is still referenced");
    }

    #[test]
    fn a_session_keeps_only_the_headers_read_after_the_gateway() {
        let mut req = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket")
            .header("origin", "https://dashboard.example")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .header("user-agent", "Mozilla/5.0")
            .header("cookie", "a=b")
            .body(axum::body::Body::empty())
            .unwrap();
        detach_head(&mut req, true);
        let mut names: Vec<_> = req.headers().keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["origin", "sec-websocket-key", "sec-websocket-version"]
        );
    }

    #[test]
    fn finds_the_session_id() {
        let sid = Sid::new();
        let q = format!("EIO=4&transport=websocket&sid={sid}");
        assert_eq!(session_id(Some(&q)), Some(sid));
        assert_eq!(session_id(Some("EIO=4&transport=polling")), None);
        assert_eq!(session_id(Some("sid=bad")), None);
        assert_eq!(session_id(None), None);
    }

    #[test]
    fn handshakes_are_engine_io_requests_without_a_session() {
        let req = |uri: &str| {
            Request::builder()
                .uri(uri)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        assert!(opens_session(&req("/socket.io/?EIO=4&transport=polling")));
        assert!(opens_session(&req("/socket.io/?transport=websocket&EIO=4")));
        assert!(!opens_session(&req("/v1/executions")));
        assert!(!opens_session(&req("/socket.io/")));
        let preflight = Request::builder()
            .method("OPTIONS")
            .uri("/socket.io/?EIO=4&transport=polling")
            .body(axum::body::Body::empty())
            .unwrap();
        assert!(!opens_session(&preflight));
    }

    #[test]
    fn pending_slots_are_bounded_and_freed_once() {
        let handshakes = Handshakes::new(Transports::new(10), 2);
        let a = handshakes.take_slot().unwrap();
        let b = handshakes.take_slot().unwrap();
        assert!(handshakes.take_slot().is_none(), "the cap is 2");
        // Freed by authentication, then dropped: counted once.
        a.0.free();
        let a_copy = a.clone();
        drop(a);
        drop(a_copy);
        assert_eq!(handshakes.pending(), 1);
        // Freed when the session (the last holder of its request head) is dropped.
        drop(b);
        assert_eq!(handshakes.pending(), 0);
        assert!(handshakes.take_slot().is_some());
    }
}
