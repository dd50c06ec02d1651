//! The shared harness of the integration tests.
//!
//! Every test runs the real `fanout` binary as child processes, against a `redis-server` it
//! starts itself on a free port (and, for the store, a fresh PostgreSQL database, or a
//! private PostgreSQL server for tests that stop it), and talks to it the way production
//! clients do: Socket.IO over a WebSocket, the ingest API over HTTP, Redis over RESP. The
//! harness hides the plumbing (ports, processes, handshakes, polling) so that a test reads
//! as its scenario.
//!
//! Tests synchronise on observable conditions (an event, a metric, `/readyz`), never on
//! sleeps. Absence is proven with a marker: publish something after the message that must
//! not arrive, and check what arrived before the marker.
//!
//! Each test binary compiles this module and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod metrics;
pub mod pg_server;
pub mod postgres;
pub mod redis_server;
pub mod replica;

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

pub use client::{Client, Packet, SlowClient};
pub use metrics::Metrics;
pub use pg_server::PgServer;
pub use postgres::TestDb;
pub use redis_server::RedisServer;
pub use replica::{Replica, ReplicaBuilder};

/// The `JWT_SECRET` replicas are started with, unless a test says otherwise.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// The first of the two ingest keys replicas accept by default.
pub const INGEST_KEY: &str = "ingest-key-current";
/// The second one, as during a key rotation.
pub const INGEST_KEY_NEXT: &str = "ingest-key-next";

/// Generous bound for anything that should happen "soon" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);
/// How long to wait for something that is expected right away (an answer, an event).
pub const QUICK: Duration = Duration::from_secs(5);

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Ports are taken below the kernel's ephemeral range (32768+) so that outgoing connections
/// cannot grab one between this check and the child's bind, and from a per-process counter
/// so that tests running in parallel threads never get the same one. Another process may
/// still bind it first: the spawners check that the server answering is their own child.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// Raises this test process's soft open-file limit to its hard one, for tests that hold
/// more sockets than the usual soft default (1024).
pub fn raise_descriptor_limit() {
    // SAFETY: plain system calls on a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `org`/`user` (role `member`) expiring at `exp` (seconds since the epoch).
pub fn token(org: &str, user: &str, exp: u64) -> String {
    token_with(&json!({
        "organizationId": org,
        "userId": user,
        "role": "member",
        "exp": exp,
    }))
}

/// An HS256 token for `org`/`user` valid for an hour.
pub fn valid_token(org: &str, user: &str) -> String {
    token(org, user, now_secs() + 3600)
}

/// An HS256 token with exactly these claims, signed with [`SECRET`].
pub fn token_with(claims: &Value) -> String {
    sign(claims, SECRET)
}

/// An HS256 token with these claims, signed with `secret`.
pub fn sign(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing")
}

/// Polls `probe` until it yields a value, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
