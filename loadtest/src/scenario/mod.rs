//! Scenarios: what the generator does to the servers, and what it measures.
//!
//! Both scenarios place their connections the same way (this module), so that every system
//! sees the same load shape: connection `i` belongs to organization `i % orgs` and connects to
//! server `(i / orgs) % servers`, so each organization has members on every replica (a message
//! must cross the fleet), and to source address `i % sources`.

pub mod chaos;
pub mod connect;
pub mod fanout;
pub mod ingest;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fanout_testkit::token::Minter;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{Conn, OPEN_TIMEOUT, OpenError, System};
use crate::message::org_name;
use crate::net::Sources;

/// The servers under test, as the scenarios see them.
#[derive(Debug, Clone)]
pub struct Servers {
    pub system: System,
    /// Public listeners, one per replica.
    pub urls: Vec<SocketAddr>,
    /// Processes whose CPU and memory are measured.
    pub pids: Vec<u32>,
    /// Secret the servers verify tokens with.
    pub secret: String,
    /// Tokens are RS256, signed with the test key pair (`fanout_testkit::token::RSA_PUBLIC_KEY`
    /// verifies them), instead of HS256 with `secret`.
    pub rs256: bool,
}

/// Where each connection goes.
pub struct Layout {
    pub orgs: usize,
    pub urls: Vec<SocketAddr>,
    pub sources: Sources,
}

impl Layout {
    pub fn new(connections: usize, orgs: usize, urls: Vec<SocketAddr>) -> Self {
        let sources = Sources::for_connections(connections, &urls);
        Self {
            orgs: orgs.max(1),
            urls,
            sources,
        }
    }

    pub fn org_of(&self, i: usize) -> usize {
        i % self.orgs
    }

    pub fn url_of(&self, i: usize) -> SocketAddr {
        self.urls[(i / self.orgs) % self.urls.len()]
    }
}

/// The outcome of opening a fleet of connections.
pub struct Fleet {
    /// Ready connection indices with their handshake-to-ready time.
    pub ready: Vec<(usize, Duration)>,
    pub failed: usize,
    /// A few failure messages with their counts, most frequent first.
    pub errors: Vec<(String, usize)>,
    /// Connections whose `auth-success` named another organization.
    pub wrong_org: usize,
    /// From the first connect to the last ready.
    pub elapsed: Duration,
    /// The connections' tasks (aborting one closes its connection).
    pub tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    pub fn close(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Opens the connections `range` of `layout`, at most `concurrency` handshakes at a time,
/// and once one is ready hands it to `then(i, conn)` in its own task. Returns when every
/// connection is ready or has failed.
pub async fn open_fleet<F, Fut>(
    servers: &Servers,
    layout: Arc<Layout>,
    range: std::ops::Range<usize>,
    concurrency: usize,
    then: F,
) -> Fleet
where
    F: Fn(usize, Conn) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Valid for longer than any run. Minted before the clock starts: an RS256 signature
    // costs the generator far more than its verification costs the server, and would
    // otherwise be measured as the server's connect rate.
    let exp = fanout_testkit::now_secs() + 24 * 3600;
    let mut tokens: Vec<String> = match servers.system {
        System::Socketio => {
            let minter = if servers.rs256 {
                Minter::rs256()
            } else {
                Minter::new(&servers.secret)
            };
            let (layout, range) = (layout.clone(), range.clone());
            tokio::task::spawn_blocking(move || {
                range
                    .map(|i| minter.mint(&org_name(layout.org_of(i)), &format!("u-{i}"), exp))
                    .collect()
            })
            .await
            .expect("minting tokens")
        }
        System::Raw => Vec::new(),
    };
    tokens.reverse();
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<Duration, OpenError>)>();
    let started = Instant::now();
    let system = servers.system;
    let n = range.len();
    let mut tasks = Vec::with_capacity(n);
    for i in range {
        let (layout, permits, tx, then) =
            (layout.clone(), permits.clone(), tx.clone(), then.clone());
        let token = tokens.pop().unwrap_or_default();
        tasks.push(tokio::spawn(async move {
            let permit = permits.acquire_owned().await.expect("never closed");
            let org = org_name(layout.org_of(i));
            let t0 = Instant::now();
            let opened = tokio::time::timeout(
                OPEN_TIMEOUT,
                Conn::open(
                    system,
                    layout.sources.pick(i),
                    layout.url_of(i),
                    &org,
                    &token,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(OpenError::Closed(format!(
                    "not ready within {OPEN_TIMEOUT:?}"
                )))
            });
            let elapsed = t0.elapsed();
            drop(permit);
            drop(token);
            match opened {
                Ok(conn) => {
                    let _ = tx.send((i, Ok(elapsed)));
                    drop(tx);
                    then(i, conn).await;
                }
                Err(e) => {
                    let _ = tx.send((i, Err(e)));
                }
            }
        }));
    }
    drop(tx);

    let mut fleet = Fleet {
        ready: Vec::with_capacity(n),
        failed: 0,
        errors: Vec::new(),
        wrong_org: 0,
        elapsed: Duration::ZERO,
        tasks,
    };
    let mut errors: std::collections::HashMap<String, usize> = Default::default();
    let mut progress = Instant::now();
    let mut last_ready = started;
    while fleet.ready.len() + fleet.failed < n {
        let Some((i, result)) = rx.recv().await else {
            break;
        };
        match result {
            Ok(d) => {
                fleet.ready.push((i, d));
                last_ready = Instant::now();
            }
            Err(e) => {
                fleet.failed += 1;
                if matches!(e, OpenError::WrongOrg { .. }) {
                    fleet.wrong_org += 1;
                }
                *errors.entry(error_kind(&e)).or_default() += 1;
            }
        }
        if n >= 5000 && progress.elapsed() > Duration::from_secs(5) {
            progress = Instant::now();
            eprintln!(
                "  ... {} of {n} connections ready, {} failed ({:.0} s)",
                fleet.ready.len(),
                fleet.failed,
                started.elapsed().as_secs_f64()
            );
        }
    }
    fleet.elapsed = last_ready - started;
    let mut errors: Vec<(String, usize)> = errors.into_iter().collect();
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    errors.truncate(5);
    fleet.errors = errors;
    fleet
}

/// An error message without the parts that differ between connections.
fn error_kind(e: &OpenError) -> String {
    let text = e.to_string();
    let cut = text.char_indices().nth(160).map_or(text.len(), |(i, _)| i);
    text[..cut].to_string()
}

/// `p` (0..=1) quantile of sorted values.
pub fn quantile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

pub fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_spreads_every_org_over_every_server() {
        let urls: Vec<SocketAddr> = vec![
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        ];
        let layout = Layout::new(4000, 40, urls.clone());
        let mut seen = std::collections::HashSet::new();
        for i in 0..4000 {
            seen.insert((layout.org_of(i), layout.url_of(i)));
        }
        assert_eq!(seen.len(), 80, "each of 40 orgs on both servers");
        let members = (0..4000).filter(|&i| layout.org_of(i) == 7).count();
        assert_eq!(members, 100);
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&v, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
