//! `ingest`: what durable ingest costs, measured against the same workload without it.
//!
//! Two *sides* run side by side: fanout replicas without a history (ephemeral: an HTTP
//! ingest request is answered once Redis has the message) and replicas with one (durable:
//! answered once the event is committed, then published). Each side has its own
//! subscribed clients, which stay connected for the whole run, and every *phase* runs on
//! one side and then on the other with the same publishers, bodies and clients' layout,
//! so that what the machine is doing meanwhile affects both alike.
//!
//! A phase is either *closed-loop* (`n` publishers, each sending its next event as soon as
//! the previous one is answered: the throughput a fleet of workers gets) or *open-loop*
//! (events at a fixed total rate from paced publishers, as in the `fanout` scenario: the
//! latency each side adds at the same rate). Publishers POST `execution-updated` bodies to
//! the replicas' internal listeners over keep-alive connections; publisher `j` owns
//! organizations `o` with `o % n == j`, or organization `j % orgs` when there are more
//! publishers than organizations, in which case an organization's publishers are spread
//! over the replicas, as behind a load balancer, and its events are committed by several
//! replicas.
//!
//! What is measured, per phase and side:
//! - events/s: 200 answers received during the measurement window ÷ the window;
//! - HTTP latency: request sent → answer read, for requests sent in the window;
//! - delivery latency: send time in the body → Socket.IO delivery, as in `fanout`;
//! - CPU of the side's replicas, Redis, PostgreSQL (from /proc) and the generator;
//! - for the durable side, the group commits made in the window, from the replicas'
//!   `fanout_commit_batch_size` and `fanout_commit_duration_seconds` histograms.
//!
//! Exactness, checked on every delivery and answer: each client sees each body once (its
//! organization's publishers draw sequence numbers from one counter, so a body is unique per
//! organization), never another organization's; on the durable side every delivery carries
//! the event's `seq`, and each client receives `seq` 1, 2, 3, … of its organization without
//! a gap, a repeat or a reordering; the `seq`s of the 200 answers of an organization are
//! exactly 1..n; every answer is 200.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fanout_testkit::Metrics;
use hdrhistogram::Histogram;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::fanout::{MAX_SEQ, MIN_ACHIEVED, P99_LIMIT_MS, SHARDS, Seen, drain, histogram, merged};
use super::{Fleet, Layout, Servers, open_fleet};
use crate::http::HttpClient;
use crate::message::{BodyWriter, now_us, org_name, parse_body};
use crate::publish::keep_pace;
use crate::report::{Table, int, num};
use crate::{pg, procs};

/// Longest wait for a phase's last deliveries after its publishers stop.
const DRAIN_MAX: Duration = Duration::from_secs(20);
/// Wait ended early when nothing arrives for this long: longer than fanout's 5-second tail
/// check, which delivers from the history whatever the bus lost.
const DRAIN_IDLE: Duration = Duration::from_secs(6);
/// A request unanswered for this long counts as an error (and its connection is dropped).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Between the publishers' start and the phase's start: time to spawn them.
const LEAD: Duration = Duration::from_millis(200);

/// One system under test.
pub struct Side {
    pub name: &'static str,
    pub durable: bool,
    pub servers: Servers,
    /// Internal listeners: ingest and `/metrics`.
    pub ingest: Vec<SocketAddr>,
}

/// What the publishers do during a phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Phase {
    /// `publishers` publishers, each sending as soon as its previous request is answered.
    Closed { publishers: usize },
    /// `events_per_s` in total, evenly paced over `publishers`.
    Open {
        events_per_s: u64,
        publishers: usize,
    },
}

impl Phase {
    pub fn publishers(&self) -> usize {
        match *self {
            Self::Closed { publishers } | Self::Open { publishers, .. } => publishers.max(1),
        }
    }

    pub fn label(&self) -> String {
        match *self {
            Self::Closed { publishers } => format!("closed loop, {publishers} publishers"),
            Self::Open {
                events_per_s,
                publishers,
            } => format!("{} events/s, {publishers} publishers", int(events_per_s)),
        }
    }
}

pub struct Params {
    pub sides: Vec<Side>,
    pub ingest_key: String,
    pub phases: Vec<Phase>,
    pub connections: usize,
    pub orgs: usize,
    pub phase_seconds: f64,
    pub payload_bytes: usize,
    /// Handshakes in flight at most.
    pub concurrency: usize,
    pub redis_pid: Option<u32>,
    /// The run's database, to tell its PostgreSQL backends from the rest of the server.
    pub pg_database: Option<String>,
}

/// The durable side's group commits during a phase's window, summed over its replicas.
#[derive(Debug, Clone, Serialize)]
pub struct CommitStats {
    pub commits: u64,
    pub commits_per_s: f64,
    pub events_committed: u64,
    pub batch_mean: Option<f64>,
    /// Upper bounds of the histogram buckets holding the quantile ("at most").
    pub batch_p50_at_most: Option<f64>,
    pub batch_p99_at_most: Option<f64>,
    pub commit_ms_mean: Option<f64>,
    pub commit_ms_p50_at_most: Option<f64>,
    pub commit_ms_p99_at_most: Option<f64>,
    /// Events read back from the history because they arrived out of order or not at all.
    pub gap_fills: u64,
    pub resyncs: u64,
    pub unpublished: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub phase: usize,
    pub system: &'static str,
    #[serde(flatten)]
    pub mode: Phase,
    pub events_ok: u64,
    /// 200 answers received during the measurement window, per second.
    pub events_per_s: f64,
    /// Open loop: `events_per_s` ÷ target.
    pub achieved_ratio: Option<f64>,
    pub non_200: u64,
    pub request_errors: u64,
    pub first_error: Option<String>,
    /// Open loop: scheduled sends dropped because a publisher ran more than 50 ms late.
    pub skipped: u64,
    /// Durable answers `{"status":"stored","published":false}`: committed, not published.
    pub unpublished: u64,
    /// Durable 200 answers without a `seq`.
    pub answers_without_seq: u64,
    pub http_samples: u64,
    pub http_ms_p50: Option<f64>,
    pub http_ms_p99: Option<f64>,
    pub http_ms_p999: Option<f64>,
    pub http_ms_max: Option<f64>,
    pub expected_deliveries: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Durable deliveries whose `seq` skipped ahead of the client's last one + 1.
    pub seq_gaps: u64,
    /// Durable deliveries whose `seq` was not above the client's last one.
    pub seq_repeats: u64,
    /// Durable deliveries without a `seq`.
    pub missing_seq: u64,
    /// Ephemeral deliveries with a `seq`.
    pub unexpected_seq: u64,
    pub delivery_samples: u64,
    pub delivery_ms_p50: Option<f64>,
    pub delivery_ms_p99: Option<f64>,
    pub delivery_ms_p999: Option<f64>,
    pub delivery_ms_max: Option<f64>,
    pub server_cpu_cores: f64,
    pub server_cpu_us_per_event: Option<f64>,
    pub redis_cpu_us_per_event: Option<f64>,
    /// Backends of the run's database.
    pub pg_cpu_cores: Option<f64>,
    pub pg_cpu_us_per_event: Option<f64>,
    /// The rest of the PostgreSQL server (WAL writer, checkpointer, other databases).
    pub pg_other_cpu_cores: Option<f64>,
    pub generator_cpu_cores: f64,
    pub generator_cpu_us_per_event: Option<f64>,
    /// The whole machine's busy cores during the window, and what of it is none of the
    /// above (the other side's idle replicas, and whatever else runs on the machine).
    pub machine_cpu_cores: f64,
    pub unattributed_cpu_cores: f64,
    pub commits: Option<CommitStats>,
    pub drain_s: f64,
}

impl PhaseReport {
    /// Open loop only: fell short of its rate, or its delivery p99 reached the limit.
    pub fn overloaded(&self) -> bool {
        self.achieved_ratio.is_some_and(|r| r < MIN_ACHIEVED)
            || (self.achieved_ratio.is_some()
                && self.delivery_ms_p99.is_none_or(|p| p >= P99_LIMIT_MS))
    }

    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut say = |what: String| {
            out.push(format!(
                "{} phase {} ({}): {what}",
                self.system,
                self.phase + 1,
                self.mode.label()
            ))
        };
        if self.events_ok == 0 {
            say("no event was accepted".into());
        }
        if self.non_200 + self.request_errors > 0 {
            say(format!(
                "{} non-200 answers and {} failed requests (first: {})",
                self.non_200,
                self.request_errors,
                self.first_error.as_deref().unwrap_or("")
            ));
        }
        if self.lost > 0 {
            say(format!(
                "{} of {} deliveries lost",
                self.lost, self.expected_deliveries
            ));
        }
        if self.duplicated > 0 {
            say(format!("{} duplicated deliveries", self.duplicated));
        }
        if self.seq_gaps + self.seq_repeats > 0 {
            say(format!(
                "deliveries out of seq order: {} gaps, {} repeats",
                self.seq_gaps, self.seq_repeats
            ));
        }
        if self.missing_seq > 0 {
            say(format!(
                "{} durable deliveries without seq",
                self.missing_seq
            ));
        }
        if self.unexpected_seq > 0 {
            say(format!(
                "{} ephemeral deliveries with a seq",
                self.unexpected_seq
            ));
        }
        if self.answers_without_seq > 0 {
            say(format!(
                "{} durable answers without seq",
                self.answers_without_seq
            ));
        }
        out
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SideReport {
    pub system: &'static str,
    pub durable: bool,
    pub connections: usize,
    pub ready: usize,
    pub failed: usize,
    pub errors: Vec<(String, usize)>,
    pub isolation_failures: u64,
    pub malformed: u64,
    pub disconnected: u64,
    pub first_disconnect: Option<String>,
    /// Durable: `seq`s answered twice within an organization, and numbers missing from
    /// 1..=highest (all phases together).
    pub answer_seq_duplicates: u64,
    pub answer_seq_missing: u64,
    pub phases: Vec<PhaseReport>,
}

impl SideReport {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let name = self.system;
        if self.failed > 0 {
            out.push(format!(
                "{name}: {} of {} connections failed: {:?}",
                self.failed, self.connections, self.errors
            ));
        }
        if self.isolation_failures > 0 {
            out.push(format!(
                "{name}: isolation: {} deliveries to a client of another organization",
                self.isolation_failures
            ));
        }
        if self.malformed > 0 {
            out.push(format!(
                "{name}: {} deliveries could not be parsed",
                self.malformed
            ));
        }
        if self.disconnected > 0 {
            out.push(format!(
                "{name}: {} clients disconnected (first: {})",
                self.disconnected,
                self.first_disconnect.as_deref().unwrap_or("")
            ));
        }
        if self.answer_seq_duplicates + self.answer_seq_missing > 0 {
            out.push(format!(
                "{name}: answered seqs are not 1..n per organization: {} duplicates, {} missing",
                self.answer_seq_duplicates, self.answer_seq_missing
            ));
        }
        for p in &self.phases {
            out.extend(p.problems());
        }
        out
    }

    /// The report of phase `k`, if it ran.
    pub fn phase(&self, k: usize) -> Option<&PhaseReport> {
        self.phases.iter().find(|p| p.phase == k)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub connections: usize,
    pub orgs: usize,
    pub phase_seconds: f64,
    pub payload_bytes: usize,
    pub phases: Vec<Phase>,
    pub sides: Vec<SideReport>,
}

impl Report {
    pub fn problems(&self) -> Vec<String> {
        self.sides.iter().flat_map(SideReport::problems).collect()
    }
}

struct PhaseCounters {
    from_us: AtomicU64,
    until_us: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
    unique: AtomicU64,
    duplicates: AtomicU64,
    seq_gaps: AtomicU64,
    seq_repeats: AtomicU64,
    missing_seq: AtomicU64,
    unexpected_seq: AtomicU64,
}

impl PhaseCounters {
    fn new() -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            from_us: AtomicU64::new(u64::MAX),
            until_us: zero(),
            latency: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            unique: zero(),
            duplicates: zero(),
            seq_gaps: zero(),
            seq_repeats: zero(),
            missing_seq: zero(),
            unexpected_seq: zero(),
        }
    }
}

/// What one side's clients share.
struct Shared {
    durable: bool,
    phases: Vec<PhaseCounters>,
    isolation: AtomicU64,
    malformed: AtomicU64,
    disconnected: AtomicU64,
    first_disconnect: Mutex<Option<String>>,
}

/// One client's memory: the bodies it has seen and the last `seq` it was given.
#[derive(Default)]
struct ClientState {
    seen: Seen,
    last_seq: u64,
}

impl Shared {
    fn new(durable: bool, phases: usize) -> Self {
        Self {
            durable,
            phases: (0..phases).map(|_| PhaseCounters::new()).collect(),
            isolation: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            first_disconnect: Mutex::new(None),
        }
    }

    fn on_body(
        &self,
        bytes: &[u8],
        seq: Option<u64>,
        org: &str,
        state: &mut ClientState,
        shard: usize,
    ) {
        let Some(body) = parse_body(bytes) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if body.org != org {
            self.isolation.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(phase) = self
            .phases
            .get(body.k as usize)
            .filter(|_| body.s < MAX_SEQ)
        else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        // Order is a property of the stream: checked on every delivery, repeats included.
        match (self.durable, seq) {
            (true, Some(n)) => {
                if n <= state.last_seq {
                    phase.seq_repeats.fetch_add(1, Ordering::Relaxed);
                } else if n != state.last_seq + 1 {
                    phase.seq_gaps.fetch_add(1, Ordering::Relaxed);
                }
                state.last_seq = state.last_seq.max(n);
            }
            (true, None) => {
                phase.missing_seq.fetch_add(1, Ordering::Relaxed);
            }
            (false, Some(_)) => {
                phase.unexpected_seq.fetch_add(1, Ordering::Relaxed);
            }
            (false, None) => {}
        }
        if !state.seen.insert(body.s) {
            phase.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        phase.unique.fetch_add(1, Ordering::Relaxed);
        let from = phase.from_us.load(Ordering::Acquire);
        let until = phase.until_us.load(Ordering::Acquire);
        if (from..until).contains(&body.t) {
            let latency = now_us().saturating_sub(body.t).max(1);
            if let Ok(mut h) = phase.latency[shard].lock() {
                h.saturating_record(latency);
            }
        }
    }
}

/// A side with its clients connected.
struct SideRun {
    side: Side,
    shared: Arc<Shared>,
    fleet: Fleet,
    members: Vec<u64>,
    /// The next body number of each organization, shared by its publishers.
    next_s: Arc<Vec<AtomicU64>>,
    /// Durable: the `seq` of every 200 answer, per organization.
    answered: Vec<Vec<u64>>,
    phases: Vec<PhaseReport>,
}

/// The organizations publisher `j` of `n` owns.
fn owned(j: usize, n: usize, orgs: usize) -> Vec<usize> {
    if n <= orgs {
        (0..orgs).filter(|o| o % n == j).collect()
    } else {
        vec![j % orgs]
    }
}

/// The replica publisher `j` sends to: `j % replicas`, shifted by one for each further
/// round of publishers over the organizations, so that an organization's publishers are
/// spread over the replicas.
fn replica_of(j: usize, orgs: usize, replicas: usize) -> usize {
    (j + j / orgs.max(1)) % replicas.max(1)
}

struct Work {
    key: String,
    durable: bool,
    next_s: Arc<Vec<AtomicU64>>,
    names: Vec<String>,
    payload_bytes: usize,
    phase: u32,
    start: Instant,
    end: Instant,
    from: Instant,
    until: Instant,
}

#[derive(Default)]
struct WorkerOut {
    /// 200 answers per organization index.
    ok_per_org: Vec<(usize, u64)>,
    ok_in_window: u64,
    non_200: u64,
    errors: u64,
    first_error: Option<String>,
    skipped: u64,
    unpublished: u64,
    without_seq: u64,
    http: Option<Histogram<u64>>,
    seqs: Vec<(usize, u64)>,
}

#[derive(Deserialize)]
struct Answer {
    seq: Option<u64>,
    published: Option<bool>,
}

/// One publisher for one phase: closed loop when `interval` is `None`, else paced.
async fn publisher(
    id: usize,
    orgs: Vec<usize>,
    addr: SocketAddr,
    interval: Option<Duration>,
    offset: f64,
    work: Arc<Work>,
) -> WorkerOut {
    let mut out = WorkerOut {
        ok_per_org: orgs.iter().map(|o| (*o, 0)).collect(),
        ..Default::default()
    };
    let mut http = histogram();
    let mut client = HttpClient::new(addr);
    let mut body = BodyWriter::new(work.payload_bytes);
    let mut due = work.start + interval.map_or(Duration::ZERO, |i| i.mul_f64(offset));
    let mut turn = 0usize;
    let mut failing = 0u32;
    tokio::time::sleep_until(work.start).await;
    loop {
        match interval {
            None => {
                if Instant::now() >= work.end {
                    break;
                }
            }
            Some(interval) => {
                if due >= work.end {
                    break;
                }
                if !keep_pace(&mut due, interval, &mut out.skipped).await {
                    continue;
                }
                due += interval;
            }
        }
        let slot = turn % orgs.len();
        turn += 1;
        let org = orgs[slot];
        let s = work.next_s[org].fetch_add(1, Ordering::Relaxed);
        let text = body.write(&work.names[org], id, work.phase, s, now_us());
        let request = Bytes::copy_from_slice(text.as_bytes());
        let sent = Instant::now();
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            client.request(Method::POST, "/executions/update", request, Some(&work.key)),
        )
        .await;
        let done = Instant::now();
        match result {
            Ok(Ok((status, answer))) if status == StatusCode::OK => {
                failing = 0;
                out.ok_per_org[slot].1 += 1;
                if (work.from..work.until).contains(&sent) {
                    http.saturating_record(((done - sent).as_micros() as u64).max(1));
                }
                if (work.from..work.until).contains(&done) {
                    out.ok_in_window += 1;
                }
                if work.durable {
                    match serde_json::from_slice::<Answer>(&answer) {
                        Ok(a) => {
                            match a.seq {
                                Some(seq) => out.seqs.push((org, seq)),
                                None => out.without_seq += 1,
                            }
                            if a.published == Some(false) {
                                out.unpublished += 1;
                            }
                        }
                        Err(_) => out.without_seq += 1,
                    }
                }
            }
            Ok(Ok((status, answer))) => {
                failing += 1;
                out.non_200 += 1;
                out.first_error.get_or_insert_with(|| {
                    format!(
                        "POST /executions/update answered {status}: {}",
                        String::from_utf8_lossy(&answer)
                    )
                });
            }
            Ok(Err(e)) => {
                failing += 1;
                out.errors += 1;
                out.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(_) => {
                failing += 1;
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("no answer within {REQUEST_TIMEOUT:?}"));
                client = HttpClient::new(addr);
            }
        }
        if failing > 10 {
            // The server is down or refusing: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    out.http = Some(http);
    out
}

/// CPU seconds at one instant.
struct CpuSample {
    at: Instant,
    servers: f64,
    redis: f64,
    generator: f64,
    pg: Option<pg::PgCpu>,
    machine: f64,
}

impl CpuSample {
    fn take(pids: &[u32], redis: Option<u32>, pg_db: Option<&str>) -> Self {
        Self {
            at: Instant::now(),
            servers: procs::cpu_seconds_sum(pids),
            redis: redis
                .and_then(|p| procs::cpu_seconds(Some(p)))
                .unwrap_or(0.0),
            generator: procs::cpu_seconds(None).unwrap_or(0.0),
            pg: pg_db.and_then(pg::cpu),
            machine: procs::machine_busy_seconds().unwrap_or(0.0),
        }
    }
}

/// The replicas' metrics, summed; `None` if one did not answer.
async fn scrape(addrs: &[SocketAddr]) -> Option<Metrics> {
    let mut total = Metrics::default();
    for addr in addrs {
        let mut client = HttpClient::new(*addr);
        let (status, body) = client
            .request(Method::GET, "/metrics", Bytes::new(), None)
            .await
            .ok()?;
        if !status.is_success() {
            return None;
        }
        total.add(&Metrics::new(String::from_utf8_lossy(&body).into_owned()));
    }
    Some(total)
}

fn commit_stats(d: &Metrics, window_s: f64) -> CommitStats {
    let batch = d.histogram("fanout_commit_batch_size");
    let duration = d.histogram("fanout_commit_duration_seconds");
    let ms = |v: Option<f64>| v.map(|s| s * 1000.0);
    CommitStats {
        commits: batch.count.round() as u64,
        commits_per_s: batch.count / window_s,
        events_committed: batch.sum.round() as u64,
        batch_mean: batch.mean(),
        batch_p50_at_most: batch.quantile_bound(0.5),
        batch_p99_at_most: batch.quantile_bound(0.99),
        commit_ms_mean: ms(duration.mean()),
        commit_ms_p50_at_most: ms(duration.quantile_bound(0.5)),
        commit_ms_p99_at_most: ms(duration.quantile_bound(0.99)),
        gap_fills: d.get("fanout_gap_fills_total", &[]).round() as u64,
        resyncs: d.get("fanout_resyncs_total", &[]).round() as u64,
        unpublished: d.get("fanout_durable_unpublished_total", &[]).round() as u64,
    }
}

pub async fn run(p: Params) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !p.phases.is_empty(),
        "no phases: pass --publishers or --rates"
    );
    anyhow::ensure!(p.phase_seconds > 0.0, "--phase-seconds must be positive");
    anyhow::ensure!(p.orgs > 0, "--orgs must be positive");
    let orgs = p.orgs;
    let common = Common {
        orgs,
        phase_seconds: p.phase_seconds,
        payload_bytes: p.payload_bytes,
        redis_pid: p.redis_pid,
        pg_database: p.pg_database.clone(),
    };
    let mut runs = Vec::new();
    for side in p.sides {
        eprintln!(
            "{}: connecting {} clients in {} orgs",
            side.name, p.connections, orgs
        );
        let shared = Arc::new(Shared::new(side.durable, p.phases.len()));
        let layout = Arc::new(Layout::new(p.connections, orgs, side.servers.urls.clone()));
        let fleet = open_fleet(
            &side.servers,
            layout.clone(),
            0..p.connections,
            p.concurrency,
            {
                let (shared, layout) = (shared.clone(), layout.clone());
                move |i, conn| {
                    let shared = shared.clone();
                    let org = org_name(layout.org_of(i));
                    async move {
                        let mut state = ClientState::default();
                        let why = conn
                            .run(|bytes, seq| {
                                shared.on_body(bytes, seq, &org, &mut state, i % SHARDS)
                            })
                            .await;
                        shared.disconnected.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = shared.first_disconnect.lock() {
                            first.get_or_insert(why);
                        }
                    }
                }
            },
        )
        .await;
        shared
            .isolation
            .fetch_add(fleet.wrong_org as u64, Ordering::Relaxed);
        let mut members = vec![0u64; orgs];
        for (i, _) in &fleet.ready {
            members[layout.org_of(*i)] += 1;
        }
        if fleet.ready.is_empty() {
            fleet.close();
            anyhow::bail!(
                "{}: no connection became ready ({} failed: {:?})",
                side.name,
                fleet.failed,
                fleet.errors
            );
        }
        runs.push(SideRun {
            side,
            shared,
            fleet,
            members,
            next_s: Arc::new((0..orgs).map(|_| AtomicU64::new(0)).collect()),
            answered: vec![Vec::new(); orgs],
            phases: Vec::new(),
        });
    }
    // Every replica subscribes to its organizations' channels and reads its streams' first
    // cursors from the history.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all_pids: Vec<u32> = runs
        .iter()
        .flat_map(|r| r.side.servers.pids.clone())
        .collect();
    procs::wait_idle(&all_pids, Duration::from_secs(10)).await;

    for (k, phase) in p.phases.iter().enumerate() {
        eprintln!("phase {}/{}: {}", k + 1, p.phases.len(), phase.label());
        for run in runs.iter_mut() {
            let report = run_phase(run, k, *phase, &p.ingest_key, &common).await;
            eprintln!("  {}", phase_line(&report));
            run.phases.push(report);
            procs::wait_idle(&all_pids, Duration::from_secs(10)).await;
        }
    }

    let mut sides = Vec::new();
    for run in runs {
        run.fleet.close();
        let (mut duplicates, mut missing) = (0u64, 0u64);
        if run.side.durable {
            for mut seqs in run.answered {
                seqs.sort_unstable();
                let before = seqs.len() as u64;
                seqs.dedup();
                duplicates += before - seqs.len() as u64;
                missing += seqs
                    .last()
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(seqs.len() as u64);
            }
        }
        let shared = &run.shared;
        sides.push(SideReport {
            system: run.side.name,
            durable: run.side.durable,
            connections: p.connections,
            ready: run.fleet.ready.len(),
            failed: run.fleet.failed,
            errors: run.fleet.errors.clone(),
            isolation_failures: shared.isolation.load(Ordering::Relaxed),
            malformed: shared.malformed.load(Ordering::Relaxed),
            // Aborted client tasks (closed by the generator) do not count themselves.
            disconnected: shared.disconnected.load(Ordering::Relaxed),
            first_disconnect: shared.first_disconnect.lock().ok().and_then(|f| f.clone()),
            answer_seq_duplicates: duplicates,
            answer_seq_missing: missing,
            phases: run.phases,
        });
    }
    Ok(Report {
        connections: p.connections,
        orgs,
        phase_seconds: p.phase_seconds,
        payload_bytes: p.payload_bytes,
        phases: p.phases,
        sides,
    })
}

/// The parameters a phase needs, apart from the sides.
struct Common {
    orgs: usize,
    phase_seconds: f64,
    payload_bytes: usize,
    redis_pid: Option<u32>,
    pg_database: Option<String>,
}

async fn run_phase(
    run: &mut SideRun,
    k: usize,
    phase: Phase,
    key: &str,
    c: &Common,
) -> PhaseReport {
    let counters = &run.shared.phases[k];
    let phase_len = Duration::from_secs_f64(c.phase_seconds);
    let warm_up = Duration::from_secs(1).min(phase_len / 5);
    let (base, base_us) = (Instant::now(), now_us());
    let start = base + LEAD;
    let end = start + phase_len;
    let from_us = base_us + (LEAD + warm_up).as_micros() as u64;
    let until_us = base_us + (LEAD + phase_len).as_micros() as u64;
    counters.from_us.store(from_us, Ordering::Release);
    counters.until_us.store(until_us, Ordering::Release);
    let work = Arc::new(Work {
        key: key.to_string(),
        durable: run.side.durable,
        next_s: run.next_s.clone(),
        names: (0..c.orgs).map(org_name).collect(),
        payload_bytes: c.payload_bytes,
        phase: k as u32,
        start,
        end,
        from: start + warm_up,
        until: end,
    });
    let n = phase.publishers();
    let replicas = run.side.ingest.len();
    let interval = match phase {
        Phase::Closed { .. } => None,
        Phase::Open { events_per_s, .. } => Some(Duration::from_secs_f64(
            n as f64 / events_per_s.max(1) as f64,
        )),
    };
    let tasks: Vec<_> = (0..n)
        .map(|j| {
            tokio::spawn(publisher(
                j,
                owned(j, n, c.orgs),
                run.side.ingest[replica_of(j, c.orgs, replicas)],
                interval,
                j as f64 / n as f64,
                work.clone(),
            ))
        })
        .collect();

    let pids = run.side.servers.pids.clone();
    let pg_db = c.pg_database.as_deref();
    tokio::time::sleep_until(work.from).await;
    let cpu_from = CpuSample::take(&pids, c.redis_pid, pg_db);
    let metrics_from = if run.side.durable {
        scrape(&run.side.ingest).await
    } else {
        None
    };
    tokio::time::sleep_until(end).await;
    let cpu_until = CpuSample::take(&pids, c.redis_pid, pg_db);
    let metrics_until = if run.side.durable {
        scrape(&run.side.ingest).await
    } else {
        None
    };

    let mut sent_per_org = vec![0u64; c.orgs];
    let mut http = histogram();
    let mut total = WorkerOut::default();
    for t in tasks {
        let Ok(out) = t.await else {
            total.errors += 1;
            total
                .first_error
                .get_or_insert_with(|| "a publisher task panicked".into());
            continue;
        };
        for (o, count) in &out.ok_per_org {
            sent_per_org[*o] += count;
        }
        if let Some(h) = &out.http {
            let _ = http.add(h);
        }
        total.ok_in_window += out.ok_in_window;
        total.non_200 += out.non_200;
        total.errors += out.errors;
        total.skipped += out.skipped;
        total.unpublished += out.unpublished;
        total.without_seq += out.without_seq;
        if total.first_error.is_none() {
            total.first_error = out.first_error;
        }
        for (o, seq) in out.seqs {
            run.answered[o].push(seq);
        }
    }
    let events_ok: u64 = sent_per_org.iter().sum();
    let expected: u64 = sent_per_org
        .iter()
        .zip(&run.members)
        .map(|(s, m)| s * m)
        .sum();

    let drain_s = drain(&counters.unique, expected, DRAIN_MAX, DRAIN_IDLE).await;
    let delivery = merged(&counters.latency);
    let window_s = (until_us - from_us) as f64 / 1e6;
    let events_per_s = total.ok_in_window as f64 / window_s;
    let cpu_s = (cpu_until.at - cpu_from.at).as_secs_f64();
    let cores = |used: f64| used / cpu_s;
    let per_event = |c: f64| (events_per_s > 0.0).then(|| c / events_per_s * 1e6);
    let server_cores = cores(cpu_until.servers - cpu_from.servers);
    let redis_cores = cores(cpu_until.redis - cpu_from.redis);
    let generator_cores = cores(cpu_until.generator - cpu_from.generator);
    let machine_cores = cores(cpu_until.machine - cpu_from.machine);
    let (pg_cores, pg_other) = match (&cpu_from.pg, &cpu_until.pg) {
        (Some(a), Some(b)) => (
            Some(cores((b.bench - a.bench).max(0.0))),
            Some(cores((b.other - a.other).max(0.0))),
        ),
        _ => (None, None),
    };
    let ms = |h: &Histogram<u64>, q: f64| {
        (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
    };
    let max = |h: &Histogram<u64>| (!h.is_empty()).then(|| h.max() as f64 / 1000.0);
    let commits = match (metrics_from, metrics_until) {
        (Some(a), Some(b)) => Some(commit_stats(&b.since(&a), cpu_s)),
        _ => None,
    };
    let received = counters.unique.load(Ordering::Relaxed);
    PhaseReport {
        phase: k,
        system: run.side.name,
        mode: phase,
        events_ok,
        events_per_s,
        achieved_ratio: match phase {
            Phase::Open {
                events_per_s: t, ..
            } => Some(events_per_s / t.max(1) as f64),
            Phase::Closed { .. } => None,
        },
        non_200: total.non_200,
        request_errors: total.errors,
        first_error: total.first_error,
        skipped: total.skipped,
        unpublished: total.unpublished,
        answers_without_seq: total.without_seq,
        http_samples: http.len(),
        http_ms_p50: ms(&http, 0.5),
        http_ms_p99: ms(&http, 0.99),
        http_ms_p999: ms(&http, 0.999),
        http_ms_max: max(&http),
        expected_deliveries: expected,
        received,
        lost: expected.saturating_sub(received),
        duplicated: counters.duplicates.load(Ordering::Relaxed),
        seq_gaps: counters.seq_gaps.load(Ordering::Relaxed),
        seq_repeats: counters.seq_repeats.load(Ordering::Relaxed),
        missing_seq: counters.missing_seq.load(Ordering::Relaxed),
        unexpected_seq: counters.unexpected_seq.load(Ordering::Relaxed),
        delivery_samples: delivery.len(),
        delivery_ms_p50: ms(&delivery, 0.5),
        delivery_ms_p99: ms(&delivery, 0.99),
        delivery_ms_p999: ms(&delivery, 0.999),
        delivery_ms_max: max(&delivery),
        server_cpu_cores: server_cores,
        server_cpu_us_per_event: per_event(server_cores),
        redis_cpu_us_per_event: c.redis_pid.and(per_event(redis_cores)),
        pg_cpu_cores: pg_cores,
        pg_cpu_us_per_event: pg_cores.and_then(per_event),
        pg_other_cpu_cores: pg_other,
        generator_cpu_cores: generator_cores,
        generator_cpu_us_per_event: per_event(generator_cores),
        machine_cpu_cores: machine_cores,
        unattributed_cpu_cores: (machine_cores
            - server_cores
            - redis_cores
            - generator_cores
            - pg_cores.unwrap_or(0.0)
            - pg_other.unwrap_or(0.0))
        .max(0.0),
        commits,
        drain_s,
    }
}

/// One line of progress per phase and side, on stderr.
fn phase_line(r: &PhaseReport) -> String {
    let commits = r.commits.as_ref().map_or(String::new(), |c| {
        format!(
            ", {} commits/s of {} events, commit {} ms",
            num(Some(c.commits_per_s), 0),
            num(c.batch_mean, 1),
            num(c.commit_ms_mean, 2)
        )
    });
    format!(
        "{:9} {:>6} events/s, HTTP p50/p99 {}/{} ms, delivery p50/p99 {}/{} ms, lost {}, dup {}, order {}, errors {}{commits}",
        r.system,
        num(Some(r.events_per_s), 0),
        num(r.http_ms_p50, 2),
        num(r.http_ms_p99, 2),
        num(r.delivery_ms_p50, 2),
        num(r.delivery_ms_p99, 2),
        r.lost,
        r.duplicated,
        r.seq_gaps + r.seq_repeats,
        r.non_200 + r.request_errors,
    )
}

/// One row per phase of one side, everything measured.
pub fn table(side: &SideReport) -> Table {
    let mut t = Table::new([
        "phase",
        "events/s",
        "HTTP p50 ms",
        "HTTP p99 ms",
        "HTTP p99.9 ms",
        "delivery p50 ms",
        "delivery p99 ms",
        "delivery p99.9 ms",
        "expected",
        "lost",
        "dup",
        "seq order",
        "non-200",
        "server cores",
        "server µs/event",
        "PG cores",
        "PG µs/event",
        "PG other cores",
        "generator cores",
        "machine cores (other)",
        "commits/s",
        "batch mean (p99 ≤)",
        "commit ms mean (p99 ≤)",
        "gap fills",
    ]);
    for r in &side.phases {
        let c = r.commits.as_ref();
        t.row([
            r.mode.label(),
            int(r.events_per_s.round() as u64),
            num(r.http_ms_p50, 2),
            num(r.http_ms_p99, 2),
            num(r.http_ms_p999, 2),
            num(r.delivery_ms_p50, 2),
            num(r.delivery_ms_p99, 2),
            num(r.delivery_ms_p999, 2),
            int(r.expected_deliveries),
            int(r.lost),
            int(r.duplicated),
            int(r.seq_gaps + r.seq_repeats + r.missing_seq + r.unexpected_seq),
            int(r.non_200 + r.request_errors),
            num(Some(r.server_cpu_cores), 2),
            num(r.server_cpu_us_per_event, 1),
            num(r.pg_cpu_cores, 2),
            num(r.pg_cpu_us_per_event, 1),
            num(r.pg_other_cpu_cores, 2),
            num(Some(r.generator_cpu_cores), 2),
            format!(
                "{} ({})",
                num(Some(r.machine_cpu_cores), 2),
                num(Some(r.unattributed_cpu_cores), 2)
            ),
            c.map_or("-".into(), |c| num(Some(c.commits_per_s), 0)),
            c.map_or("-".into(), |c| {
                format!(
                    "{} ({})",
                    num(c.batch_mean, 1),
                    bound(c.batch_p99_at_most, 0)
                )
            }),
            c.map_or("-".into(), |c| {
                format!(
                    "{} ({})",
                    num(c.commit_ms_mean, 2),
                    bound(c.commit_ms_p99_at_most, 1)
                )
            }),
            c.map_or("-".into(), |c| int(c.gap_fills)),
        ]);
    }
    t
}

/// A histogram bucket bound: `∞` past the last one.
pub fn bound(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_infinite() => "∞".into(),
        v => num(v, decimals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_cover_every_org_and_spread_shared_orgs_over_replicas() {
        // Fewer publishers than organizations: each organization has exactly one.
        let mut all: Vec<usize> = (0..8).flat_map(|j| owned(j, 8, 32)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..32).collect::<Vec<_>>());
        assert_eq!(owned(0, 1, 4), vec![0, 1, 2, 3]);
        // More: each has one organization, and an organization's publishers use both replicas.
        let of_org_3: Vec<usize> = (0..128)
            .filter(|&j| owned(j, 128, 32) == vec![3])
            .map(|j| replica_of(j, 32, 2))
            .collect();
        assert_eq!(of_org_3, vec![1, 0, 1, 0]);
        assert_eq!(replica_of(5, 32, 2), 1);
    }

    #[test]
    fn durable_deliveries_must_follow_seq() {
        let shared = Shared::new(true, 1);
        let now = now_us();
        shared.phases[0]
            .from_us
            .store(now - 1_000_000, Ordering::Relaxed);
        shared.phases[0]
            .until_us
            .store(now + 1_000_000, Ordering::Relaxed);
        let mut w = BodyWriter::new(200);
        let mut st = ClientState::default();
        for (s, seq) in [(0, 1), (1, 2), (3, 4), (2, 3), (2, 3)] {
            let body = w.write("org-1", 0, 0, s, now).to_string();
            shared.on_body(body.as_bytes(), Some(seq), "org-1", &mut st, 0);
        }
        let body = w.write("org-1", 0, 0, 9, now).to_string();
        shared.on_body(body.as_bytes(), None, "org-1", &mut st, 0);
        let p = &shared.phases[0];
        assert_eq!(p.unique.load(Ordering::Relaxed), 5);
        assert_eq!(p.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(p.seq_gaps.load(Ordering::Relaxed), 1, "4 after 2");
        assert_eq!(p.seq_repeats.load(Ordering::Relaxed), 2, "3 after 4, twice");
        assert_eq!(p.missing_seq.load(Ordering::Relaxed), 1);

        let ephemeral = Shared::new(false, 1);
        let body = w.write("org-1", 0, 0, 0, now).to_string();
        ephemeral.on_body(
            body.as_bytes(),
            Some(1),
            "org-1",
            &mut ClientState::default(),
            0,
        );
        ephemeral.on_body(
            body.as_bytes(),
            None,
            "org-2",
            &mut ClientState::default(),
            0,
        );
        assert_eq!(
            ephemeral.phases[0].unexpected_seq.load(Ordering::Relaxed),
            1
        );
        assert_eq!(ephemeral.isolation.load(Ordering::Relaxed), 1);
    }
}
