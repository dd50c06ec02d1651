//! HTTP/1 serving for both listeners.
//!
//! `axum::serve` sets no timer, so hyper's header-read timeout never runs: a client that
//! sends half a request line keeps its descriptor forever. This loop is `axum::serve` with
//! the limits an internet-facing server needs:
//! - a header-read timeout (`FANOUT_HEADER_READ_TIMEOUT`), which also ends idle keep-alive
//!   connections, since hyper arms it whenever it waits for the next request's head;
//! - a bounded read buffer, so request heads are at most [`MAX_HEAD`] bytes (431 beyond);
//! - a graceful drain: on shutdown, in-flight requests finish, then connections close.
//!
//! Upgraded connections (WebSocket) leave hyper once upgraded; Engine.IO's heartbeat and
//! the Socket.IO connect timeout bound them from there.

use std::convert::Infallible;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::retry::RateLimit;

/// Largest request head (request line and headers) accepted: Node's default is 16 KiB.
pub const MAX_HEAD: usize = 32 * 1024;

/// Serves `app` on `listener` until `stop`, then drains: in-flight requests finish, idle
/// connections close, and this returns once every connection is gone. Each request carries
/// `ConnectInfo<L::Addr>`.
pub async fn serve<L>(mut listener: L, app: Router, header_read_timeout: Duration, stop: Shutdown)
where
    L: Listener,
    L::Addr: Clone + Send + Sync + 'static,
{
    // Turns every handler into a ready service once, as `into_make_service` does: called
    // before that, the router would rebuild each handler, and apply its layers again, on
    // every request (giving the Socket.IO layer a fresh engine each time).
    let app = app.with_state::<()>(());
    let connections = TaskTracker::new();
    loop {
        let (io, addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait() => break,
        };
        let app = app.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(ConnectInfo(addr.clone()));
                let mut app = app.clone();
                async move { Ok::<_, Infallible>(app.call(req).await.unwrap_or_else(|e| match e {})) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .max_buf_size(MAX_HEAD);
            let conn = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.wait() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result
                && e.is_timeout()
            {
                ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "reason" => "header_timeout")
                    .increment(1);
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// What the accept loops do when `accept` fails: a connection that failed before it was
/// accepted is skipped; anything else (out of descriptors, most likely) is logged, at most
/// once a second, and retried after a pause, so a full table does not spin the CPU.
pub(crate) async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    static WARN: LazyLock<Mutex<RateLimit>> =
        LazyLock::new(|| Mutex::new(RateLimit::new(Duration::from_secs(1))));
    ::metrics::counter!(metrics::ACCEPT_ERRORS).increment(1);
    if let Some(suppressed) = WARN.lock().unwrap().check() {
        tracing::error!(suppressed, "accept failed: {e}; retrying in 100ms");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The internal listener: plain TCP, with the accept errors handled as on the public one.
pub struct Internal(pub tokio::net::TcpListener);

impl Listener for Internal {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                Err(e) => accept_failed(&e).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}
