//! `soak`: hours of ordinary use, compressed, to find what a replica keeps that it should
//! have let go.
//!
//! A benchmark of minutes finds what is slow; a leak only shows as a line that keeps rising.
//! So the soak runs a moderate load with everything that creates and destroys per-connection
//! and per-organization state, over and over, and watches what such state holds:
//! - each replica's resident memory, open descriptors (`/proc/PID/fd`) and tokio tasks
//!   (`fanout_runtime_tasks`);
//! - Redis subscriptions: each replica's `fanout_redis_subscriptions`, and what the private
//!   redis-server says (`PUBSUB CHANNELS`, the sum of `PUBSUB NUMSUB`).
//!
//! The load (its own redis-server, a fresh database, two durable replicas):
//! - a steady ingest rate (`POST /executions/update`) over the organizations present;
//! - steady organizations whose members keep connecting to a random replica, staying a few
//!   seconds, leaving (half politely, half by dropping the TCP connection) and coming back
//!   with `lastSeq`, so each return is a replay;
//! - transient organizations that come and go entirely: a fresh organization, its members,
//!   its events for a while, then all of them leave and it is never seen again (so Redis
//!   subscriptions are made and dropped, and per-organization state must be freed).
//!
//! Every member checks what it receives: after `lastSeq` L the next durable event must be
//! L + 1 (or `resync-required`, then `latestSeq` + 1), and so on without gap or repeat.
//!
//! The verdict. A warm-up round of the same load runs first and ends with every client gone;
//! the replicas' idle state then is the *baseline* (pools and caches have had their first
//! use). After the measured run, every client leaves again, and the soak waits (polling,
//! with a timeout) until each replica is back at the baseline *exactly*: the same
//! descriptors and tasks, and Redis the same channels and subscriptions. Descriptors and
//! tasks are compared net of the pools' connections (PostgreSQL's and the Redis publishers',
//! one socket and one task each, counted from `/proc/PID/net/tcp`), because a pool keeps what
//! it opened, up to its size (16 and 32), and that is not a leak. Memory cannot be held to a baseline (the allocator
//! keeps freed pages), so it is held to a slope: the least-squares fit of RSS over the
//! measured run's samples must stay under `--max-rss-slope` KiB per minute.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use fanout_testkit::process::{Logs, Proc};
use fanout_testkit::socketio::{self, Frame};
use fanout_testkit::token::Minter;
use fanout_testkit::{Metrics, Replica, TestDb};
use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::compare::{ensure_free, loopback, start_redis};
use crate::http::HttpClient;
use crate::message::{BodyWriter, now_us, socketio_event};
use crate::procs;
use crate::report::{Table, num};

/// The PostgreSQL pool's size in fanout (`store::POOL_SIZE`): what the pool may keep open.
const PG_POOL_SIZE: usize = 16;
/// The Redis publishers' pool's size (`bus::master`), plus the subscriber's connection.
const REDIS_POOL_SIZE: usize = 32 + 1;
const PUBLISHERS: usize = 4;
/// How often the idle state is polled while waiting for it.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub minutes: f64,
    pub warmup_seconds: f64,
    pub replicas: u16,
    /// Steady organizations and their members (spread over them).
    pub orgs: usize,
    pub clients: usize,
    /// Transient organizations alive at once, members each, and how long each lives.
    pub transient_orgs: usize,
    pub transient_clients: usize,
    pub transient_seconds: f64,
    /// Ingest events per second, over every organization present.
    pub rate: u64,
    pub sample_seconds: f64,
    /// The leak threshold for memory: KiB per minute of the RSS fit.
    pub max_rss_slope_kib_per_min: f64,
    /// How long the replicas may take to return to the baseline once the load stops.
    pub settle_seconds: f64,
    pub base_port: u16,
    #[serde(skip)]
    pub database_url: String,
    #[serde(skip)]
    pub fanout_bin: PathBuf,
    #[serde(skip)]
    pub redis_server: PathBuf,
}

/// What one replica holds at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ReplicaState {
    pub rss_kib: u64,
    pub fds: usize,
    /// Of `fds`, connections to PostgreSQL (the pool's).
    pub pg_conns: usize,
    /// Of `fds`, connections to Redis (the publishers' pool's, and the subscriber's).
    pub redis_conns: usize,
    pub tasks: u64,
    /// Open TCP connections on the public listener.
    pub sockets: u64,
    /// Organization channels it subscribes to (`fanout_redis_subscriptions`).
    pub subscriptions: u64,
}

impl ReplicaState {
    /// Descriptors and tasks net of the pools' connections (one socket and one task each):
    /// what must return to the baseline.
    fn held(&self) -> (i64, i64) {
        let pools = (self.pg_conns + self.redis_conns) as i64;
        (self.fds as i64 - pools, self.tasks as i64 - pools)
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Seconds since the measured run began (negative: before it).
    pub t_s: f64,
    pub replicas: Vec<ReplicaState>,
    /// `PUBSUB CHANNELS *` on the private Redis, and the sum of their `PUBSUB NUMSUB`.
    pub redis_channels: usize,
    pub redis_subscriptions: i64,
}

impl Snapshot {
    /// What must equal the baseline once idle.
    fn held(&self) -> (Vec<(i64, i64, u64)>, usize, i64) {
        (
            self.replicas
                .iter()
                .map(|r| {
                    let (fds, tasks) = r.held();
                    (fds, tasks, r.subscriptions)
                })
                .collect(),
            self.redis_channels,
            self.redis_subscriptions,
        )
    }
}

#[derive(Debug, Default, Serialize)]
pub struct LoadStats {
    pub seconds: f64,
    pub sessions: u64,
    pub failed_sessions: u64,
    pub events_received: u64,
    /// A durable event that was not the one after the previous (a gap, repeat or reorder).
    pub order_violations: u64,
    pub resyncs_received: u64,
    pub published: u64,
    pub publish_failures: u64,
    pub transient_orgs: u64,
    /// The first few failures, for the report.
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub options: Options,
    pub database: String,
    pub warmup: LoadStats,
    pub run: LoadStats,
    pub baseline: Snapshot,
    pub samples: Vec<Snapshot>,
    /// The idle state after the run, and how long it took to reach it (or the timeout).
    pub after: Snapshot,
    pub settle_seconds: f64,
    pub settled: bool,
    pub rss_slope_kib_per_min: Vec<f64>,
    /// Server counters over the whole soak, summed over replicas.
    pub replays: f64,
    pub replayed_events: f64,
    pub resyncs: f64,
    pub failures: Vec<String>,
}

pub async fn run(opts: Options) -> anyhow::Result<SoakReport> {
    anyhow::ensure!(opts.minutes > 0.0, "--minutes must be positive");
    anyhow::ensure!(
        opts.orgs > 0 && opts.clients > 0,
        "--orgs and --clients must be positive"
    );
    anyhow::ensure!(
        (1..=20).contains(&opts.replicas),
        "--replicas must be 1..=20"
    );
    crate::procs::require_fanout(&opts.fanout_bin)?;
    if cfg!(debug_assertions) {
        eprintln!("note: this is a debug build of the generator; use --release for long runs");
    }
    let clients = opts.clients + opts.transient_orgs * opts.transient_clients;
    crate::net::open_files(
        4 * clients as u64,
        2 * clients as u64,
        &format!("{clients} clients"),
    )?;
    let redis_addr = loopback(opts.base_port + 200);
    let mut addrs = vec![redis_addr];
    for i in 0..opts.replicas {
        addrs.push(loopback(opts.base_port + i));
        addrs.push(loopback(opts.base_port + 100 + i));
    }
    ensure_free(&addrs)?;
    let redis = start_redis(&opts.redis_server, redis_addr).await?;
    let db = TestDb::try_create_on(&opts.database_url, "fanout_soak")
        .await
        .context("the soak's database (pass --database-url)")?;
    let database = db.name().to_string();
    eprintln!(
        "soak: {} replicas, database {database}, logs in {}",
        opts.replicas,
        procs::log_dir().display()
    );
    let result = tokio::select! {
        r = soak(&opts, &db, redis_addr) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(redis);
    if let Err(e) = db.drop_database().await {
        eprintln!("warning: could not drop database {database}: {e:#}");
    }
    let mut report = result?;
    report.database = database;
    if report.failures.is_empty() {
        let _ = std::fs::remove_dir_all(procs::log_dir());
    } else {
        report
            .failures
            .push(format!("server logs: {}", procs::log_dir().display()));
    }
    Ok(report)
}

/// The replicas as the load sees them.
struct Fleet {
    public: Vec<SocketAddr>,
    internal: Vec<SocketAddr>,
    secret: String,
    key: String,
}

async fn soak(opts: &Options, db: &TestDb, redis: SocketAddr) -> anyhow::Result<SoakReport> {
    let secret = format!("soak-secret-{}-0123456789abcdef", std::process::id());
    let key = format!("soak-key-{}", std::process::id());
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..opts.replicas {
        let replica = Replica::builder()
            .name(&format!("soak-{}", i + 1))
            .bin(&opts.fanout_bin)
            .listen(
                loopback(opts.base_port + i),
                loopback(opts.base_port + 100 + i),
            )
            .logs(Logs::File(procs::log_dir()))
            .env("JWT_SECRET", &secret)
            .env("FANOUT_INGEST_KEYS", &key)
            .redis_url(&format!("redis://{redis}"))
            .database(db)
            .env("FANOUT_SHUTDOWN_TIMEOUT", "5s")
            .env("RUST_LOG", "warn")
            .try_start()
            .await?;
        replica.try_wait_store_up().await?;
        procs.push(replica.into_proc());
    }
    let fleet = Arc::new(Fleet {
        public: (0..opts.replicas)
            .map(|i| loopback(opts.base_port + i))
            .collect(),
        internal: (0..opts.replicas)
            .map(|i| loopback(opts.base_port + 100 + i))
            .collect(),
        secret,
        key,
    });
    let ports = [pg_port(db.url()), redis.port()];
    let mut probe = Probe::new(&procs, &fleet.internal, redis, ports).await?;
    let started = Instant::now();
    let names = Arc::new(AtomicU64::new(0));

    eprintln!("soak: warm-up, {} s", opts.warmup_seconds);
    let warmup = load(
        opts,
        &fleet,
        &names,
        Duration::from_secs_f64(opts.warmup_seconds),
    )
    .await;
    let baseline = probe
        .quiet(Duration::from_secs_f64(opts.settle_seconds), started)
        .await
        .context("the replicas did not become idle after the warm-up")?;
    let baseline_kinds: Vec<_> = probe.pids.iter().map(|&p| descriptor_kinds(p)).collect();
    anyhow::ensure!(
        baseline.replicas.iter().all(|r| r.tasks > 0),
        "the replicas export no fanout_runtime_tasks (a build older than the metric?): tasks cannot be watched"
    );

    eprintln!("soak: {} minutes", opts.minutes);
    let run_started = Instant::now();
    let run_duration = Duration::from_secs_f64(opts.minutes * 60.0);
    let run_end = run_started + run_duration;
    let period = Duration::from_secs_f64(opts.sample_seconds);
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The last sample is one under load: at the run's end the clients are leaving.
            if Instant::now() + period / 2 >= run_end {
                break;
            }
            samples.push(probe.snapshot(run_started).await);
            if samples.len() % 12 == 1 {
                eprintln!("  {}", sample_line(samples.last().expect("pushed")));
            }
        }
        (probe, samples)
    });
    let run = load(opts, &fleet, &names, run_duration).await;
    let (mut probe, samples) = sampler.await.context("the sampler")?;

    // Every client has left: wait for the replicas to let go of what they held.
    let settle_from = Instant::now();
    let timeout = Duration::from_secs_f64(opts.settle_seconds);
    let want = baseline.held();
    let mut after = probe.snapshot(run_started).await;
    while after.held() != want && settle_from.elapsed() < timeout {
        tokio::time::sleep(POLL).await;
        after = probe.snapshot(run_started).await;
    }
    let settled = after.held() == want;
    let kinds_after: Vec<String> = probe
        .pids
        .iter()
        .zip(&baseline_kinds)
        .enumerate()
        .map(|(i, (&p, before))| {
            format!(
                "replica {}: {}",
                i + 1,
                kinds_diff(before, &descriptor_kinds(p))
            )
        })
        .collect();
    let settle_seconds = settle_from.elapsed().as_secs_f64();

    let mut totals = Metrics::new(String::new());
    for m in probe.scrape_all().await {
        totals.add(&m);
    }
    for p in &mut procs {
        if let Some(status) = p.exited() {
            anyhow::bail!("{} died ({status})\n{}", p.name, p.log_tail(20));
        }
    }
    for p in procs {
        p.stop(Duration::from_secs(5)).await;
    }

    let slopes: Vec<f64> = (0..opts.replicas as usize)
        .map(|i| {
            let points: Vec<(f64, f64)> = samples
                .iter()
                .filter_map(|s| Some((s.t_s / 60.0, s.replicas.get(i)?.rss_kib as f64)))
                .collect();
            slope(&points)
        })
        .collect();
    let mut failures = Vec::new();
    for (i, s) in slopes.iter().enumerate() {
        if *s > opts.max_rss_slope_kib_per_min {
            failures.push(format!(
                "replica {}: RSS grew {s:.0} KiB/min over the run (threshold {} KiB/min)",
                i + 1,
                opts.max_rss_slope_kib_per_min
            ));
        }
    }
    if !settled {
        failures.push(format!(
            "not back at the idle baseline {:.0} s after the load stopped: held (descriptors and tasks net of the pools' connections, subscriptions) {:?}, Redis channels {} and subscriptions {}; baseline {:?}, {} and {}",
            timeout.as_secs_f64(),
            after.held().0,
            after.redis_channels,
            after.redis_subscriptions,
            want.0,
            want.1,
            want.2
        ));
        failures.push(format!(
            "descriptors against the baseline: {}",
            kinds_after.join("; ")
        ));
    }
    for s in samples.iter().chain([&baseline, &after]) {
        if let Some(r) = s
            .replicas
            .iter()
            .find(|r| r.pg_conns > PG_POOL_SIZE || r.redis_conns > REDIS_POOL_SIZE)
        {
            failures.push(format!(
                "{} connections to PostgreSQL and {} to Redis, more than the pools' {PG_POOL_SIZE} and {REDIS_POOL_SIZE}",
                r.pg_conns, r.redis_conns
            ));
            break;
        }
    }
    for (name, stats) in [("warm-up", &warmup), ("run", &run)] {
        if stats.order_violations > 0 {
            failures.push(format!(
                "{name}: {} durable events out of sequence (gap, repeat or reorder); first: {:?}",
                stats.order_violations, stats.errors
            ));
        }
        if stats.failed_sessions * 100 > stats.sessions.max(1) {
            failures.push(format!(
                "{name}: {} of {} sessions failed; first: {:?}",
                stats.failed_sessions, stats.sessions, stats.errors
            ));
        }
        if stats.publish_failures * 100 > stats.published.max(1) {
            failures.push(format!(
                "{name}: {} of {} publishes failed",
                stats.publish_failures,
                stats.published + stats.publish_failures
            ));
        }
    }
    Ok(SoakReport {
        options: opts.clone(),
        database: String::new(),
        warmup,
        run,
        baseline,
        samples,
        after,
        settle_seconds,
        settled,
        rss_slope_kib_per_min: slopes,
        replays: totals.get("fanout_replays_total", &[]),
        replayed_events: totals.get("fanout_replayed_events_total", &[]),
        resyncs: totals.get("fanout_resyncs_total", &[]),
        failures,
    })
}

/// The port of the PostgreSQL server in a `postgres://` URL (5432 if none is given).
fn pg_port(url: &str) -> u16 {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split(['/', '?']).next().unwrap_or(host);
    host.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(5432)
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den > 0.0 { num / den } else { 0.0 }
}

/// Reads the replicas' state: /proc, their `/metrics`, and the private Redis.
struct Probe {
    pids: Vec<u32>,
    scrapers: Vec<HttpClient>,
    redis: redis::aio::MultiplexedConnection,
    /// The ports of PostgreSQL and Redis, whose pools' connections are counted apart.
    pools: [u16; 2],
}

impl Probe {
    async fn new(
        procs: &[Proc],
        internal: &[SocketAddr],
        redis: SocketAddr,
        pools: [u16; 2],
    ) -> anyhow::Result<Self> {
        let redis = redis::Client::open(format!("redis://{redis}"))?
            .get_multiplexed_async_connection()
            .await
            .context("connecting to the soak's Redis")?;
        Ok(Self {
            pids: procs.iter().map(Proc::pid).collect(),
            scrapers: internal.iter().map(|a| HttpClient::new(*a)).collect(),
            redis,
            pools,
        })
    }

    async fn scrape_all(&mut self) -> Vec<Metrics> {
        let mut out = Vec::new();
        for s in &mut self.scrapers {
            let text = match s.request(Method::GET, "/metrics", Bytes::new(), None).await {
                Ok((StatusCode::OK, body)) => String::from_utf8_lossy(&body).into_owned(),
                _ => String::new(),
            };
            out.push(Metrics::new(text));
        }
        out
    }

    async fn snapshot(&mut self, origin: Instant) -> Snapshot {
        let t_s = Instant::now()
            .saturating_duration_since(origin)
            .as_secs_f64();
        // Scrape first: the scrape's own keep-alive connection is then open in every sample.
        let metrics = self.scrape_all().await;
        let replicas = self
            .pids
            .iter()
            .zip(&metrics)
            .map(|(&pid, m)| {
                let kinds = descriptor_kinds(pid);
                let to = |port: u16| {
                    kinds
                        .get(&format!("tcp to port {port}"))
                        .copied()
                        .unwrap_or(0)
                };
                ReplicaState {
                    rss_kib: procs::rss_kib(Some(pid)).unwrap_or(0),
                    fds: kinds.values().sum(),
                    pg_conns: to(self.pools[0]),
                    redis_conns: to(self.pools[1]),
                    tasks: m.get("fanout_runtime_tasks", &[]) as u64,
                    sockets: m.get("fanout_public_connections", &[]) as u64,
                    subscriptions: m.get("fanout_redis_subscriptions", &[]) as u64,
                }
            })
            .collect();
        let (redis_channels, redis_subscriptions) = self.redis_subscriptions().await;
        Snapshot {
            t_s,
            replicas,
            redis_channels,
            redis_subscriptions,
        }
    }

    async fn redis_subscriptions(&mut self) -> (usize, i64) {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        if channels.is_empty() {
            return (0, 0);
        }
        let pairs: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channels)
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        (channels.len(), pairs.iter().map(|(_, n)| n).sum())
    }

    /// Waits until no replica has a public connection and what they hold stays the same for
    /// three polls in a row; returns that state.
    async fn quiet(&mut self, timeout: Duration, origin: Instant) -> anyhow::Result<Snapshot> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<Snapshot> = None;
        let mut same = 0;
        loop {
            let s = self.snapshot(origin).await;
            let idle = s.replicas.iter().all(|r| r.sockets == 0);
            if idle && last.as_ref().is_some_and(|l| l.held() == s.held()) {
                same += 1;
                if same >= 2 {
                    return Ok(s);
                }
            } else {
                same = 0;
            }
            if Instant::now() >= deadline {
                anyhow::bail!("still changing after {timeout:?}: {}", sample_line(&s));
            }
            last = Some(s);
            tokio::time::sleep(POLL).await;
        }
    }
}

/// A process's open descriptors by kind: TCP connections by their remote port (or `from
/// port P` for accepted ones, P a listening port of the process), other sockets, pipes,
/// epoll instances, files.
fn descriptor_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut targets = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                targets.push(target.to_string_lossy().into_owned());
            }
        }
    }
    // inode -> (local port, remote port, state) of every TCP socket in the namespace.
    let mut tcp = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |i: usize| {
                f.get(i)
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if let (Some(local), Some(remote), Some(state), Some(inode)) = (
                port(1),
                port(2),
                f.get(3),
                f.get(9).and_then(|i| i.parse::<u64>().ok()),
            ) {
                tcp.insert(inode, (local, remote, *state == "0A"));
            }
        }
    }
    let inode = |t: &str| {
        t.strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
    };
    let listening: HashSet<u16> = targets
        .iter()
        .filter_map(|t| tcp.get(&inode(t)?))
        .filter(|(_, _, listen)| *listen)
        .map(|(local, _, _)| *local)
        .collect();
    let mut kinds = BTreeMap::new();
    for t in &targets {
        let kind = match inode(t).map(|i| tcp.get(&i)) {
            Some(Some((_, _, true))) => "tcp listener".to_string(),
            Some(Some((local, _, _))) if listening.contains(local) => {
                format!("tcp from port {local}")
            }
            Some(Some((_, remote, _))) => format!("tcp to port {remote}"),
            Some(None) => "other socket".to_string(),
            None => t
                .split(['[', ':'])
                .next()
                .filter(|k| !k.is_empty())
                .unwrap_or("file")
                .to_string(),
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// What differs between two descriptor censuses, e.g. `tcp to port 6379 +1`.
fn kinds_diff(before: &BTreeMap<String, usize>, after: &BTreeMap<String, usize>) -> String {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let diff: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let d = *after.get(k).unwrap_or(&0) as i64 - *before.get(k).unwrap_or(&0) as i64;
            (d != 0).then(|| format!("{k} {d:+}"))
        })
        .collect();
    if diff.is_empty() {
        "same descriptors".to_string()
    } else {
        diff.join(", ")
    }
}

fn sample_line(s: &Snapshot) -> String {
    let replicas: Vec<String> = s
        .replicas
        .iter()
        .map(|r| {
            format!(
                "RSS {:.1} MiB, {} fds ({} PG, {} Redis), {} tasks, {} sockets, {} subs",
                r.rss_kib as f64 / 1024.0,
                r.fds,
                r.pg_conns,
                r.redis_conns,
                r.tasks,
                r.sockets,
                r.subscriptions
            )
        })
        .collect();
    format!(
        "t={:.0}s {} | Redis {} channels, {} subscriptions",
        s.t_s,
        replicas.join(" | "),
        s.redis_channels,
        s.redis_subscriptions
    )
}

/// Shared by the load's tasks.
struct Load {
    fleet: Arc<Fleet>,
    minter: Minter,
    end: Instant,
    /// The organizations events are published to now: steady ones, and transient ones while
    /// they live.
    present: Mutex<Vec<String>>,
    turn: AtomicUsize,
    sessions: AtomicU64,
    failed_sessions: AtomicU64,
    events: AtomicU64,
    violations: AtomicU64,
    resyncs: AtomicU64,
    published: AtomicU64,
    publish_failures: AtomicU64,
    transient: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Load {
    fn error(&self, e: String) {
        let mut errors = self.errors.lock().expect("not poisoned");
        if errors.len() < 5 {
            errors.push(e);
        }
    }

    fn token(&self, org: &str, user: &str) -> String {
        self.minter
            .mint(org, user, fanout_testkit::now_secs() + 3600)
    }
}

/// Runs the load for `duration`; every client has left when it returns.
async fn load(
    opts: &Options,
    fleet: &Arc<Fleet>,
    names: &Arc<AtomicU64>,
    duration: Duration,
) -> LoadStats {
    let started = Instant::now();
    let steady: Vec<String> = (0..opts.orgs).map(|o| format!("soak-org-{o}")).collect();
    let load = Arc::new(Load {
        fleet: fleet.clone(),
        minter: Minter::new(&fleet.secret),
        end: started + duration,
        present: Mutex::new(steady.clone()),
        turn: AtomicUsize::new(0),
        sessions: AtomicU64::new(0),
        failed_sessions: AtomicU64::new(0),
        events: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        resyncs: AtomicU64::new(0),
        published: AtomicU64::new(0),
        publish_failures: AtomicU64::new(0),
        transient: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
    });
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let rate = opts.rate as f64 / PUBLISHERS as f64;
        tasks.push(tokio::spawn(publisher(load.clone(), p, rate)));
    }
    for c in 0..opts.clients {
        let org = steady[c % steady.len()].clone();
        tasks.push(tokio::spawn(member(
            load.clone(),
            org,
            format!("u{c}"),
            c as u64,
        )));
    }
    for slot in 0..opts.transient_orgs {
        tasks.push(tokio::spawn(transient(
            load.clone(),
            names.clone(),
            slot,
            opts.transient_clients,
            Duration::from_secs_f64(opts.transient_seconds),
        )));
    }
    for t in tasks {
        if let Err(e) = t.await {
            load.error(format!("a load task failed: {e}"));
        }
    }
    let errors = load.errors.lock().expect("not poisoned").clone();
    LoadStats {
        seconds: started.elapsed().as_secs_f64(),
        sessions: load.sessions.load(Ordering::Relaxed),
        failed_sessions: load.failed_sessions.load(Ordering::Relaxed),
        events_received: load.events.load(Ordering::Relaxed),
        order_violations: load.violations.load(Ordering::Relaxed),
        resyncs_received: load.resyncs.load(Ordering::Relaxed),
        published: load.published.load(Ordering::Relaxed),
        publish_failures: load.publish_failures.load(Ordering::Relaxed),
        transient_orgs: load.transient.load(Ordering::Relaxed),
        errors,
    }
}

/// Publishes `rate` events/s, each to the next organization present, through replica
/// `p % replicas`.
async fn publisher(load: Arc<Load>, p: usize, rate: f64) {
    let fleet = &load.fleet;
    let mut client = HttpClient::new(fleet.internal[p % fleet.internal.len()]);
    let mut body = BodyWriter::new(200);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n = 0u64;
    while Instant::now() < load.end {
        tick.tick().await;
        let org = {
            let present = load.present.lock().expect("not poisoned");
            present[load.turn.fetch_add(1, Ordering::Relaxed) % present.len()].clone()
        };
        n += 1;
        let text = body.write(&org, p, 0, n, now_us());
        let request = Bytes::copy_from_slice(text.as_bytes());
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(
                Method::POST,
                "/executions/update",
                request,
                Some(&fleet.key),
            ),
        )
        .await;
        match answer {
            Ok(Ok((StatusCode::OK, _))) => load.published.fetch_add(1, Ordering::Relaxed),
            other => {
                load.error(format!("publish to {org}: {other:?}"));
                load.publish_failures.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// A member of a steady organization: connects to a random replica, stays 1-8 s, leaves
/// (politely or by dropping the connection), stays away 0.5-3 s, comes back with `lastSeq`.
async fn member(load: Arc<Load>, org: String, user: String, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed ^ now_us());
    // Spread the first connections over the first seconds.
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
    let token = load.token(&org, &user);
    let mut last = None;
    while Instant::now() < load.end {
        let replica = rng.random_range(0..load.fleet.public.len());
        let stay = Duration::from_millis(rng.random_range(1000..8000))
            .min(load.end.saturating_duration_since(Instant::now()));
        let polite = rng.random_bool(0.5);
        last = session(&load, replica, &token, last, stay, polite).await;
        let away = Duration::from_millis(rng.random_range(500..3000));
        tokio::time::sleep_until((Instant::now() + away).min(load.end)).await;
    }
}

/// One transient organization after another in this slot, until the load ends: its members
/// connect (half with `lastSeq: 0`, the whole history), events are published to it for
/// `lifetime`, then it leaves the published set and its members disconnect.
async fn transient(
    load: Arc<Load>,
    names: Arc<AtomicU64>,
    slot: usize,
    members: usize,
    lifetime: Duration,
) {
    let mut rng = SmallRng::seed_from_u64(slot as u64 ^ now_us());
    // Stagger the slots so that organizations come and go all the time.
    let offset = lifetime.mul_f64(slot as f64 / 4.0);
    tokio::time::sleep_until((Instant::now() + offset).min(load.end)).await;
    while Instant::now() + Duration::from_secs(1) < load.end {
        let org = format!("soak-transient-{}", names.fetch_add(1, Ordering::Relaxed));
        load.transient.fetch_add(1, Ordering::Relaxed);
        load.present.lock().expect("not poisoned").push(org.clone());
        let until = (Instant::now() + lifetime).min(load.end);
        let mut tasks = Vec::new();
        for m in 0..members {
            let load = load.clone();
            let token = load.token(&org, &format!("t{m}"));
            let replica = rng.random_range(0..load.fleet.public.len());
            let from = (m % 2 == 0).then_some(0);
            tasks.push(tokio::spawn(async move {
                let stay = until.saturating_duration_since(Instant::now());
                session(&load, replica, &token, from, stay, true).await;
            }));
        }
        tokio::time::sleep_until(until).await;
        load.present
            .lock()
            .expect("not poisoned")
            .retain(|o| *o != org);
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// One connection: authenticate with `lastSeq` (if any), receive for `stay` checking the
/// durable sequence, leave. Returns the last sequence number seen (or `last` unchanged).
async fn session(
    load: &Load,
    replica: usize,
    token: &str,
    last: Option<u64>,
    stay: Duration,
    polite: bool,
) -> Option<u64> {
    load.sessions.fetch_add(1, Ordering::Relaxed);
    let addr = load.fleet.public[replica];
    let mut tracker = Tracker {
        last,
        expect: last.map(|l| l + 1),
        authenticated: false,
    };
    let result = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut ws = socketio::upgrade(tcp, addr, Some(ws_config())).await?;
        socketio::read_open(&mut ws).await?;
        let auth = match last {
            Some(l) => serde_json::json!({ "token": token, "lastSeq": l }),
            None => serde_json::json!({ "token": token }),
        };
        ws.send(Message::text(socketio::connect(Some(&auth))))
            .await?;
        let until = Instant::now() + stay;
        loop {
            let frame = match tokio::time::timeout_at(until, ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Close(f)))) => anyhow::bail!("closed by the server: {f:?}"),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => anyhow::bail!("read: {e}"),
                Ok(None) => anyhow::bail!("end of stream"),
            };
            let text = frame.as_str();
            if let Some((_, seq)) = socketio_event(text) {
                load.events.fetch_add(1, Ordering::Relaxed);
                if let Some(seq) = seq
                    && let Err(e) = tracker.durable(seq)
                {
                    load.violations.fetch_add(1, Ordering::Relaxed);
                    load.error(e);
                }
                continue;
            }
            match socketio::decode(text) {
                Frame::Ping => ws.send(Message::text(socketio::PONG)).await?,
                Frame::Event { args, .. } if args.starts_with("[\"auth-success\",") => {
                    tracker.authenticated = true;
                }
                Frame::Event { args, .. } if args.starts_with("[\"resync-required\",") => {
                    load.resyncs.fetch_add(1, Ordering::Relaxed);
                    let latest = serde_json::from_str::<serde_json::Value>(args)
                        .ok()
                        .and_then(|v| v[1]["latestSeq"].as_u64());
                    tracker.last = latest.or(tracker.last);
                    tracker.expect = latest.map(|l| l + 1);
                }
                Frame::Event { args, .. } if args.starts_with("[\"auth-error\",") => {
                    anyhow::bail!("refused: {args}")
                }
                Frame::Disconnect | Frame::Close => anyhow::bail!("disconnected by the server"),
                _ => {}
            }
        }
        anyhow::ensure!(tracker.authenticated, "no auth-success within {stay:?}");
        if polite {
            ws.send(Message::text(socketio::DISCONNECT)).await?;
            ws.close(None).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        load.failed_sessions.fetch_add(1, Ordering::Relaxed);
        load.error(format!("session on replica {}: {e:#}", replica + 1));
    }
    tracker.last
}

/// The durable sequence a member must see: after L comes L + 1.
struct Tracker {
    last: Option<u64>,
    expect: Option<u64>,
    authenticated: bool,
}

impl Tracker {
    fn durable(&mut self, seq: u64) -> Result<(), String> {
        let expected = self.expect;
        self.last = Some(seq);
        self.expect = Some(seq + 1);
        match expected {
            Some(e) if e != seq => Err(format!("expected seq {e}, received {seq}")),
            _ => Ok(()),
        }
    }
}

/// The samples the table shows: the start, the quartiles, the end, and every 10 minutes.
fn shown(samples: &[Snapshot]) -> Vec<&Snapshot> {
    let Some(end) = samples.last() else {
        return Vec::new();
    };
    let mut marks: Vec<f64> = [0.0, 0.25, 0.5, 0.75].iter().map(|q| q * end.t_s).collect();
    let mut m = 600.0;
    while m < end.t_s {
        marks.push(m);
        m += 600.0;
    }
    marks.sort_by(f64::total_cmp);
    let mut out: Vec<&Snapshot> = marks
        .iter()
        .filter_map(|&t| {
            samples
                .iter()
                .min_by(|a, b| (a.t_s - t).abs().total_cmp(&(b.t_s - t).abs()))
        })
        .collect();
    out.push(end);
    out.dedup_by(|a, b| std::ptr::eq(*a, *b));
    out
}

pub fn table(report: &SoakReport) -> Table {
    let replicas = report.baseline.replicas.len();
    let mut headers = vec!["when".to_string()];
    for i in 1..=replicas {
        for h in ["RSS MiB", "fds (PG/Redis)", "tasks", "sockets", "subs"] {
            headers.push(format!("r{i} {h}"));
        }
    }
    headers.push("Redis channels/subs".into());
    let mut t = Table::new(headers);
    let mut row = |label: String, s: &Snapshot| {
        let mut cells = vec![label];
        for r in &s.replicas {
            cells.push(num(Some(r.rss_kib as f64 / 1024.0), 1));
            cells.push(format!("{} ({}/{})", r.fds, r.pg_conns, r.redis_conns));
            cells.push(r.tasks.to_string());
            cells.push(r.sockets.to_string());
            cells.push(r.subscriptions.to_string());
        }
        cells.push(format!("{}/{}", s.redis_channels, s.redis_subscriptions));
        t.row(cells);
    };
    row("idle baseline".into(), &report.baseline);
    for s in shown(&report.samples) {
        row(format!("{:.1} min", s.t_s / 60.0), s);
    }
    row(
        format!("idle after (+{:.1} s)", report.settle_seconds),
        &report.after,
    );
    t
}

pub fn finish(report: &SoakReport, out: Option<&std::path::Path>) -> anyhow::Result<bool> {
    println!("{}", table(report).render());
    let r = &report.run;
    println!(
        "load: {} sessions ({} failed), {} events published ({} failed), {} received, {} resync-required, {} transient organizations; server: {} replays, {} replayed events, {} resyncs",
        r.sessions,
        r.failed_sessions,
        r.published,
        r.publish_failures,
        r.events_received,
        r.resyncs_received,
        r.transient_orgs,
        report.replays,
        report.replayed_events,
        report.resyncs
    );
    let slopes: Vec<String> = report
        .rss_slope_kib_per_min
        .iter()
        .map(|s| format!("{s:.0}"))
        .collect();
    println!(
        "RSS slope (least squares over the run): {} KiB/min (threshold {}); back at the idle baseline (descriptors and tasks net of the pools' connections, subscriptions): {}",
        slopes.join(", "),
        report.options.max_rss_slope_kib_per_min,
        if report.settled {
            format!("yes, after {:.1} s", report.settle_seconds)
        } else {
            "NO".to_string()
        }
    );
    if let Some(path) = out {
        crate::report::write_json(path, report)?;
    }
    for f in &report.failures {
        eprintln!("FAILED: {f}");
    }
    println!(
        "verdict: {}",
        if report.failures.is_empty() {
            "flat"
        } else {
            "LEAK or failure (above)"
        }
    );
    Ok(report.failures.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let points: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&points) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
    }

    #[test]
    fn pg_port_from_url() {
        assert_eq!(pg_port("postgres://postgres@127.0.0.1:5433/db"), 5433);
        assert_eq!(pg_port("postgres://u:p@localhost/db?x=1"), 5432);
        assert_eq!(pg_port("postgres://127.0.0.1:6000"), 6000);
    }

    #[test]
    fn sequence_after_last_seq() {
        let mut t = Tracker {
            last: Some(4),
            expect: Some(5),
            authenticated: true,
        };
        assert!(t.durable(5).is_ok());
        assert!(t.durable(7).is_err());
        assert!(t.durable(8).is_ok());
        assert_eq!(t.last, Some(8));
    }
}
