//! TCP connections that fanout can close on purpose.
//!
//! socketioxide can disconnect a socket only at the Socket.IO level, and a client told "io
//! server disconnect" does not reconnect by itself. A slow consumer must instead lose its
//! *transport*, so that socket.io-client reconnects and resumes. So the public listener
//! keeps, for every TCP stream, a handle that can `shutdown(2)` it, and a middleware
//! remembers which connection currently carries each Engine.IO session (`?sid=` on every
//! poll and on the WebSocket upgrade; the socket.io socket id is the same sid). A shutdown
//! socket wakes its pending reads and fails its writes in the kernel, so the hot path pays
//! nothing for this: the stream wrapper only forwards.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The file descriptor of an open stream; `None` once the stream is dropped. The stream
/// clears it under the lock *before* closing the descriptor, so a kill can never reach a
/// descriptor number the kernel has since given to another connection.
#[derive(Default)]
struct KillSwitch {
    fd: Mutex<Option<RawFd>>,
}

impl KillSwitch {
    fn kill(&self) {
        if let Some(fd) = *self.fd.lock().unwrap() {
            // SAFETY: `fd` is open: it is only cleared, under this lock, before it closes.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    fn is_open(&self) -> bool {
        self.fd.lock().unwrap().is_some()
    }
}

/// The connect info of a public connection: its peer and its kill switch.
#[derive(Clone)]
pub struct Conn {
    pub peer: SocketAddr,
    switch: Arc<KillSwitch>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Conn({})", self.peer)
    }
}

impl Conn {
    pub fn kill(&self) {
        self.switch.kill();
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, Listener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TCP stream whose kill switch knows its descriptor while it is open.
pub struct Stream {
    tcp: TcpStream,
    switch: Arc<KillSwitch>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Runs before `tcp` is dropped, i.e. while the descriptor is still open.
        *self.switch.fd.lock().unwrap() = None;
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The public listener: accepts TCP with `TCP_NODELAY` (deliveries are small and latency
/// matters more than segment count) and hands each stream a kill switch.
pub struct Listener {
    tcp: TcpListener,
}

impl Listener {
    pub fn new(tcp: TcpListener) -> Self {
        Self { tcp }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = Conn;

    async fn accept(&mut self) -> (Stream, Conn) {
        loop {
            match self.tcp.accept().await {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let switch = Arc::new(KillSwitch {
                        fd: Mutex::new(Some(tcp.as_raw_fd())),
                    });
                    let conn = Conn {
                        peer,
                        switch: switch.clone(),
                    };
                    return (Stream { tcp, switch }, conn);
                }
                Err(e) if is_per_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to be released.
                    tracing::error!("accept failed: {e}; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Conn> {
        Ok(Conn {
            peer: self.tcp.local_addr()?,
            switch: Arc::default(),
        })
    }
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Which connection last carried each Engine.IO session.
#[derive(Clone, Default)]
pub struct Transports {
    by_sid: Arc<Mutex<HashMap<Sid, Weak<KillSwitch>>>>,
}

impl Transports {
    fn record(&self, sid: Sid, conn: &Conn) {
        self.by_sid
            .lock()
            .unwrap()
            .insert(sid, Arc::downgrade(&conn.switch));
    }

    pub fn forget(&self, sid: Sid) {
        self.by_sid.lock().unwrap().remove(&sid);
    }

    /// Drops entries whose connection is gone (sessions that never authenticated).
    pub fn sweep(&self) {
        self.by_sid
            .lock()
            .unwrap()
            .retain(|_, w| w.upgrade().is_some_and(|s| s.is_open()));
    }

    /// Closes the transport of `socket` so that its client reconnects. Falls back to the
    /// connection of the handshake request (a WebSocket-only client's only connection).
    pub fn close(&self, socket: &SocketRef) -> bool {
        let recorded = self
            .by_sid
            .lock()
            .unwrap()
            .get(&socket.id)
            .and_then(Weak::upgrade);
        let switch = recorded.or_else(|| {
            socket
                .req_parts()
                .extensions
                .get::<ConnectInfo<Conn>>()
                .map(|c| c.0.switch.clone())
        });
        match switch {
            Some(s) => {
                s.kill();
                true
            }
            None => false,
        }
    }
}

/// Middleware on the public router: remembers the connection of every request that names
/// an Engine.IO session, and detaches the head of every request that opens one.
pub async fn track(State(transports): State<Transports>, mut req: Request, next: Next) -> Response {
    match session_id(req.uri().query()) {
        Some(sid) => {
            if let Some(ConnectInfo(conn)) = req.extensions().get::<ConnectInfo<Conn>>() {
                transports.record(sid, conn);
            }
        }
        None => detach_head(&mut req),
    }
    next.run(req).await
}

/// Copies the URI and headers of a request into allocations of their own.
///
/// hyper parses them as slices of its 8-16 KiB connection read buffer, and socketioxide
/// keeps the request head of the request that opened a session for the session's whole
/// life; without the copy, every idle connection pins a read buffer (measured: 16 KiB of
/// its ~30 KiB, see BENCHMARKS.md). The copy costs a few hundred bytes once per session.
fn detach_head(req: &mut Request) {
    use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri};
    let headers = std::mem::take(req.headers_mut());
    let mut fresh = HeaderMap::with_capacity(headers.len());
    for (name, value) in &headers {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
        detach_head(&mut req);
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(req.headers()["x-custom"], "v");
        // The request no longer holds a reference to the buffer: it is uniquely owned again.
        assert!(buffer.is_unique(), "the read buffer is still referenced");
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

    #[tokio::test]
    async fn killing_fails_pending_reads_and_closes_the_peer() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Listener::new(tcp);
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 1];
            c.read(&mut buf).await
        });
        let (mut stream, conn) = axum::serve::Listener::accept(&mut listener).await;
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let res = stream.read(&mut buf).await;
            drop(stream);
            res
        });
        tokio::task::yield_now().await;
        conn.kill();
        // The pending read wakes up and ends: end of stream (0 bytes) or an error.
        let read = server.await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // The peer sees the connection end.
        assert!(matches!(client.await.unwrap(), Ok(0) | Err(_)));
        let mut writer = TcpStream::connect(addr).await.unwrap();
        let (mut s2, c2) = axum::serve::Listener::accept(&mut listener).await;
        c2.kill();
        assert!(s2.write_all(b"x").await.is_err());
        writer.shutdown().await.ok();
    }
}
