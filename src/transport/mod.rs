//! The public listener's TCP connections: how many there may be, and how fanout closes one
//! on purpose.
//!
//! socketioxide can disconnect a socket only at the Socket.IO level, and a client told "io
//! server disconnect" does not reconnect by itself. A slow consumer must instead lose its
//! *transport*, so that socket.io-client reconnects and resumes. So the public listener
//! keeps, for every TCP stream, a handle that can `shutdown(2)` it, and [`Transports`]
//! remembers which connection currently carries each Engine.IO session (`?sid=` on every
//! poll and on the WebSocket upgrade; the socket.io socket id is the same sid). A shutdown
//! socket wakes its pending reads and fails its writes in the kernel, so the hot path pays
//! nothing for this: the stream wrapper only forwards.
//!
//! Every descriptor is a resource an anonymous client can take, so the public listener has
//! a cap (`FANOUT_MAX_CONNECTIONS`, by default the descriptor limit less a reserve for the
//! internal listener, Redis and PostgreSQL): past it a new connection is answered 503 and
//! closed at once, instead of waiting in the backlog or making `accept` fail in a loop, and
//! readiness says so. The registry holds at most one session per open connection, so no
//! sequence of requests can grow it beyond the connections that exist.

pub mod serve;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::ops::metrics;

/// The file descriptor of an open stream; `None` once the stream is dropped. The stream
/// clears it under the lock *before* closing the descriptor, so a kill can never reach a
/// descriptor number the kernel has since given to another connection.
#[derive(Default)]
struct KillSwitch {
    fd: Mutex<Option<RawFd>>,
    /// The Engine.IO session this connection carried last (guarded by the registry's lock).
    sid: Mutex<Option<Sid>>,
}

impl KillSwitch {
    fn kill(&self) {
        if let Some(fd) = *self.fd.lock().unwrap() {
            // SAFETY: `fd` is open: it is only cleared, under this lock, before it closes.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
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

/// A TCP stream whose kill switch knows its descriptor while it is open.
pub struct Stream {
    tcp: TcpStream,
    switch: Arc<KillSwitch>,
    transports: Transports,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Runs before `tcp` is dropped, i.e. while the descriptor is still open.
        *self.switch.fd.lock().unwrap() = None;
        self.transports.closed(&self.switch);
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

/// What a connection refused at the cap is told before it is closed.
const FULL_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\ncontent-length: 78\r\nretry-after: 1\r\nconnection: close\r\n\r\n\
{\"error\":\"this replica is at its connection limit; retry on another replica\"}";

/// The public listener: accepts TCP with `TCP_NODELAY` (deliveries are small and latency
/// matters more than segment count), refuses connections beyond the cap, and hands each
/// stream a kill switch.
pub struct Listener {
    tcp: TcpListener,
    transports: Transports,
}

impl Listener {
    pub fn new(tcp: TcpListener, transports: Transports) -> Self {
        Self { tcp, transports }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Stream;
    type Addr = Conn;

    async fn accept(&mut self) -> (Stream, Conn) {
        loop {
            match self.tcp.accept().await {
                Ok((tcp, peer)) => {
                    if !self.transports.admit() {
                        // Refused fast: a short answer, then the descriptor is released.
                        ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "reason" => "max_connections")
                            .increment(1);
                        let _ = tcp.try_write(FULL_RESPONSE);
                        continue;
                    }
                    let _ = tcp.set_nodelay(true);
                    let switch = Arc::new(KillSwitch {
                        fd: Mutex::new(Some(tcp.as_raw_fd())),
                        sid: Mutex::new(None),
                    });
                    let conn = Conn {
                        peer,
                        switch: switch.clone(),
                    };
                    let transports = self.transports.clone();
                    return (
                        Stream {
                            tcp,
                            switch,
                            transports,
                        },
                        conn,
                    );
                }
                Err(e) => serve::accept_failed(&e).await,
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

/// How long a session stays refused after [`Transports::end_session`]: longer than its
/// Engine.IO heartbeat can keep it alive.
const ENDED_FOR: Duration = Duration::from_secs(120);
/// Most ended sessions remembered; the oldest are forgotten first.
const ENDED_MAX: usize = 16_384;

/// The public connections: how many are open against the cap, which one last carried each
/// Engine.IO session, and the sessions fanout ended.
#[derive(Clone)]
pub struct Transports {
    inner: Arc<Inner>,
}

struct Inner {
    max_connections: usize,
    open: AtomicUsize,
    by_sid: Mutex<HashMap<Sid, Weak<KillSwitch>>>,
    ended: Mutex<Ended>,
}

#[derive(Default)]
struct Ended {
    sids: HashSet<Sid>,
    order: VecDeque<(Instant, Sid)>,
}

impl Transports {
    /// A registry for a listener that accepts at most `max_connections` at once.
    pub fn new(max_connections: usize) -> Self {
        ::metrics::gauge!(metrics::PUBLIC_CONNECTIONS_LIMIT).set(max_connections as f64);
        Self {
            inner: Arc::new(Inner {
                max_connections,
                open: AtomicUsize::new(0),
                by_sid: Mutex::new(HashMap::new()),
                ended: Mutex::new(Ended::default()),
            }),
        }
    }

    /// Counts a new connection, unless the cap is reached.
    fn admit(&self) -> bool {
        let admitted = self
            .inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.inner.max_connections).then_some(open + 1)
            })
            .is_ok();
        if admitted {
            ::metrics::gauge!(metrics::PUBLIC_CONNECTIONS).increment(1.0);
        }
        admitted
    }

    /// A connection closed: it no longer counts, and no session points at it any more.
    fn closed(&self, switch: &Arc<KillSwitch>) {
        self.inner.open.fetch_sub(1, Ordering::AcqRel);
        ::metrics::gauge!(metrics::PUBLIC_CONNECTIONS).decrement(1.0);
        let mut by_sid = self.inner.by_sid.lock().unwrap();
        if let Some(sid) = switch.sid.lock().unwrap().take() {
            forget_if_carried_by(&mut by_sid, sid, switch);
        }
    }

    /// Open public connections, and the cap.
    pub fn load(&self) -> (usize, usize) {
        (
            self.inner.open.load(Ordering::Acquire),
            self.inner.max_connections,
        )
    }

    /// Whether new connections are being refused.
    pub fn is_full(&self) -> bool {
        let (open, max) = self.load();
        open >= max
    }

    /// Remembers that `conn` carries `sid` now. A connection carries one session at a
    /// time: the one it carried before is forgotten, so the map never holds more entries
    /// than there are open connections, whatever sids requests name.
    pub fn record(&self, sid: Sid, conn: &Conn) {
        let mut by_sid = self.inner.by_sid.lock().unwrap();
        let mut current = conn.switch.sid.lock().unwrap();
        if *current == Some(sid) {
            return;
        }
        if let Some(previous) = current.replace(sid) {
            forget_if_carried_by(&mut by_sid, previous, &conn.switch);
        }
        // The session's previous connection, if any, no longer carries it.
        if let Some(old) = by_sid
            .insert(sid, Arc::downgrade(&conn.switch))
            .and_then(|w| w.upgrade())
            && !Arc::ptr_eq(&old, &conn.switch)
        {
            let mut old_sid = old.sid.lock().unwrap();
            if *old_sid == Some(sid) {
                *old_sid = None;
            }
        }
    }

    /// The session `sid` ended: forget its connection.
    pub fn forget(&self, sid: Sid) {
        let mut by_sid = self.inner.by_sid.lock().unwrap();
        if let Some(switch) = by_sid.remove(&sid).and_then(|w| w.upgrade()) {
            let mut carried = switch.sid.lock().unwrap();
            if *carried == Some(sid) {
                *carried = None;
            }
        }
    }

    /// Sessions remembered (one per open connection at most).
    pub fn sessions(&self) -> usize {
        self.inner.by_sid.lock().unwrap().len()
    }

    /// Closes the transport of `socket` so that its client reconnects. Falls back to the
    /// connection of the handshake request (a WebSocket-only client's only connection).
    pub fn close(&self, socket: &SocketRef) -> bool {
        let recorded = self
            .inner
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

    /// Ends `socket`'s session for good: its connection is closed and every later request
    /// naming it is refused ([`Transports::is_ended`]), so a client that keeps polling or
    /// answering pings cannot keep it open. For sessions fanout refused.
    pub fn end_session(&self, socket: &SocketRef) {
        {
            let mut ended = self.inner.ended.lock().unwrap();
            let now = Instant::now();
            while let Some(&(at, sid)) = ended.order.front() {
                if now.duration_since(at) < ENDED_FOR && ended.order.len() < ENDED_MAX {
                    break;
                }
                ended.order.pop_front();
                ended.sids.remove(&sid);
            }
            if ended.sids.insert(socket.id) {
                ended.order.push_back((now, socket.id));
            }
        }
        self.close(socket);
    }

    /// Whether fanout ended the session `sid` (see [`Transports::end_session`]).
    pub fn is_ended(&self, sid: Sid) -> bool {
        self.inner.ended.lock().unwrap().sids.contains(&sid)
    }
}

fn forget_if_carried_by(
    by_sid: &mut HashMap<Sid, Weak<KillSwitch>>,
    sid: Sid,
    switch: &Arc<KillSwitch>,
) {
    if by_sid
        .get(&sid)
        .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(switch)))
    {
        by_sid.remove(&sid);
    }
}

/// The connection cap when `FANOUT_MAX_CONNECTIONS` is `auto`: the open-file limit less a
/// reserve for everything else the process opens (the internal listener's connections,
/// Redis and PostgreSQL pools, files), so those never find the descriptors used up.
pub fn default_max_connections(descriptor_limit: u64) -> usize {
    let reserve = (descriptor_limit / 10).clamp(256, 4096);
    descriptor_limit.saturating_sub(reserve).max(16) as usize
}

/// Raises the soft open-file limit to the hard one (every connection is a descriptor, and
/// the usual soft default of 1024 would cap a replica at about a thousand clients) and
/// returns the limit in effect.
pub fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn accept(listener: &mut Listener) -> (Stream, Conn) {
        axum::serve::Listener::accept(listener).await
    }

    /// A listener on a free loopback port, capped at `max`.
    async fn listener(max: usize) -> (Listener, SocketAddr, Transports) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let transports = Transports::new(max);
        (Listener::new(tcp, transports.clone()), addr, transports)
    }

    #[tokio::test]
    async fn killing_fails_pending_reads_and_closes_the_peer() {
        let (mut listener, addr, _) = listener(10).await;
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 1];
            c.read(&mut buf).await
        });
        let (mut stream, conn) = accept(&mut listener).await;
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
        let (mut s2, c2) = accept(&mut listener).await;
        c2.kill();
        assert!(s2.write_all(b"x").await.is_err());
        writer.shutdown().await.ok();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_answered_503_and_closed() {
        let (mut listener, addr, transports) = listener(2).await;
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (s1, _) = accept(&mut listener).await;
        let (_s2, _) = accept(&mut listener).await;
        assert!(transports.is_full());
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let acceptor = tokio::spawn(async move {
            let accepted = accept(&mut listener).await;
            (listener, accepted)
        });
        let mut answer = String::new();
        refused.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap()["error"],
            "this replica is at its connection limit; retry on another replica"
        );
        // A closed connection frees its place.
        drop(s1);
        assert_eq!(transports.load(), (1, 2));
        let _c3 = TcpStream::connect(addr).await.unwrap();
        let (_listener, (_s3, _)) = acceptor.await.unwrap();
        assert_eq!(transports.load(), (2, 2));
    }

    #[tokio::test]
    async fn the_session_registry_holds_one_session_per_open_connection() {
        let (mut listener, addr, transports) = listener(10).await;
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (s1, conn1) = accept(&mut listener).await;
        let (s2, conn2) = accept(&mut listener).await;
        // Requests naming ever new sids (unknown ones included) on one connection.
        for _ in 0..1000 {
            transports.record(Sid::new(), &conn1);
        }
        assert_eq!(transports.sessions(), 1);
        // A session moving to another connection is remembered there only.
        let sid = Sid::new();
        transports.record(sid, &conn1);
        transports.record(sid, &conn2);
        assert_eq!(transports.sessions(), 1);
        drop(s1);
        assert_eq!(transports.sessions(), 1, "conn2 still carries it");
        drop(s2);
        assert_eq!(transports.sessions(), 0);
    }

    #[test]
    fn the_default_cap_leaves_a_reserve() {
        assert_eq!(default_max_connections(1100), 844);
        assert_eq!(default_max_connections(1024), 768);
        assert_eq!(default_max_connections(65_536), 65_536 - 4096);
        assert_eq!(default_max_connections(10_000), 9000);
        assert_eq!(default_max_connections(100), 16);
    }
}
