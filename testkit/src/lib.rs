//! The one harness of fanout's Rust integration tests (`tests/`) and of its load generator
//! (`loadtest/`): what both need to run the real thing and talk to it.
//!
//! - [`process`]: child processes that die with their parent, their output in memory or in
//!   a log file;
//! - [`redis_server`]: a private `redis-server`, and [`proxy`] a proxy in front of it that
//!   can silence pub/sub connections;
//! - [`redis_cluster`]: a private Redis Cluster (masters, replicas), with slot migrations and
//!   failovers on demand;
//! - [`redis_sentinel`]: a private Redis Sentinel group (master, replica, three sentinels),
//!   with failovers on demand;
//! - [`tls`]: the test CA of the TLS variants of those three (`rediss://`);
//! - [`postgres`]: a throwaway database on a shared PostgreSQL server, and [`pg_server`] a
//!   private server, for tests that stop it;
//! - [`replica`]: the `fanout` binary on its ports, with the HTTP calls a test makes to it;
//! - [`metrics`]: Prometheus text;
//! - [`mod@token`]: HS256 tokens;
//! - [`socketio`]: the Socket.IO v5 wire protocol as a client speaks it, and [`client`] the
//!   tests' client on top of it.
//!
//! It is a crate of its own (dev-only, never published) so that the tests and the load
//! generator cannot drift apart: one way to find a free port, to know that a server is
//! ours, to mint a token, to read a metric. What only one of them needs stays with it:
//! the load generator's lean connections, publishers and measurements from `/proc`; the
//! tests' scenarios.
//!
//! Two callers, two styles. A test wants a panic that says what went wrong, so the functions
//! it calls panic. The load generator wants an error it can report before going on with the
//! next system, so the few functions it calls return `anyhow::Result` (their names start
//! with `try_`, or they are used by it only).
//!
//! Tests synchronise on observable conditions (an event, a metric, `/readyz`), never on
//! sleeps. Absence is proven with a marker: publish something after the message that must
//! not arrive, and check what arrived before the marker.

pub mod client;
pub mod metrics;
pub mod pg_server;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis_cluster;
pub mod redis_sentinel;
pub mod redis_server;
pub mod replica;
pub mod socketio;
pub mod tls;
pub mod token;

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use client::{Client, Packet, SlowClient};
pub use metrics::Metrics;
pub use pg_server::PgServer;
pub use postgres::TestDb;
pub use proxy::Proxy;
pub use redis_cluster::RedisCluster;
pub use redis_sentinel::RedisSentinel;
pub use redis_server::RedisServer;
pub use replica::{Replica, ReplicaBuilder};
pub use tls::{TestCa, test_ca};
pub use token::{now_secs, sign, token, token_with, valid_token};

/// The `JWT_SECRET` replicas are started with, unless the caller says otherwise.
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

/// Raises this process's open-file limit towards `wanted` (children spawned afterwards
/// inherit it) and returns the soft limit in force afterwards.
///
/// The soft limit is often 1,024, too few for a test holding a thousand sockets or a load
/// generator holding 50,000. Root with `CAP_SYS_RESOURCE` may raise the hard limit too, up to
/// `fs.nr_open`; where it cannot move (root lacks the capability in some containers), the
/// soft limit goes as far as the hard one, and the result is lower than `wanted`: callers
/// decide what that means for them.
pub fn raise_nofile_limit(wanted: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur >= wanted {
        return lim.rlim_cur;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let target = wanted.min(nr_open.max(lim.rlim_max));
    let raised = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max.max(target),
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return target;
    }
    // The hard limit stays: go as far as it allows.
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
        lim.rlim_max
    } else {
        lim.rlim_cur
    }
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

/// A random number for unique names (of databases, directories), from the standard
/// library's randomly keyed hasher: no random-number crate needed for that.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}
