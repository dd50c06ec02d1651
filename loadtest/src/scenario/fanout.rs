//! `fanout`: deliveries per second, end-to-end latency, exact loss, and what each delivery
//! costs the servers, at a publish rate that steps up until the servers cannot keep up.
//!
//! Accounting is exact by construction: each organization is owned by one publisher that
//! numbers its messages, so after a step (and a drain window) the expected deliveries are
//! `Σ messages sent to org × members of org`, and each client remembers which numbers it has
//! seen (a bitset: duplicates are caught when they arrive). Every body carries its step, so
//! a late delivery is charged to the step that sent it. Latency is receive time minus the
//! send time in the body, for messages sent after the step's warm-up, in HDR histograms
//! sharded by connection so that recording stays cheap on many threads.
//!
//! Cost is measured, not inferred from throughput: the servers' CPU time (from /proc) over
//! the step's measurement window divided by the deliveries in that window, and likewise for
//! Redis and for the generator itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use super::{Layout, Servers, open_fleet};
use crate::message::{now_us, org_name, parse_body};
use crate::procs;
use crate::publish::{Publisher, StepSent, Target};
use crate::report::{Table, int, num};

/// A step is overloaded when its p99 reaches this...
pub const P99_LIMIT_MS: f64 = 50.0;
/// ...or when it delivers less than this share of its target rate.
pub const MIN_ACHIEVED: f64 = 0.9;
pub(crate) const SHARDS: usize = 8;
/// Longest wait for a step's last deliveries after its publishers stop.
const DRAIN_MAX: Duration = Duration::from_secs(10);
/// Wait ended early when nothing arrives for this long.
const DRAIN_IDLE: Duration = Duration::from_secs(2);

pub struct Params {
    pub servers: Servers,
    pub publish: Target,
    /// The Redis processes (one, or a cluster's masters), for their CPU.
    pub redis_pids: Vec<u32>,
    pub connections: usize,
    pub orgs: usize,
    /// Target deliveries per second, one per step, increasing.
    pub steps: Vec<u64>,
    pub step_seconds: f64,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub concurrency: usize,
    /// Steps still run after the first overloaded one.
    pub steps_after_overload: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub target_deliveries_per_s: u64,
    pub target_messages_per_s: f64,
    pub published_messages_per_s: f64,
    pub publish_errors: u64,
    pub first_publish_error: Option<String>,
    pub publish_skipped: u64,
    pub publish_no_receivers: u64,
    pub expected_deliveries: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Deliveries received during the measurement window, per second.
    pub delivered_per_s: f64,
    pub achieved_ratio: f64,
    pub latency_samples: u64,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
    pub latency_ms_p999: Option<f64>,
    pub latency_ms_max: Option<f64>,
    /// Cores used by the servers during the window (CPU seconds per second).
    pub server_cpu_cores: f64,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub redis_cpu_us_per_delivery: Option<f64>,
    /// Cores used by each Redis process (a cluster's masters, in order): how the load
    /// spreads over them.
    pub redis_cpu_cores_each: Vec<f64>,
    pub generator_cpu_cores: f64,
    pub generator_cpu_us_per_delivery: Option<f64>,
    pub drain_s: f64,
    pub overload: bool,
}

impl StepReport {
    /// No loss, no duplicates, no refused publish, under the latency limit, on rate.
    pub fn sustainable(&self) -> bool {
        !self.overload && self.exact_on_rate()
    }

    /// Every message delivered once, none refused, at (nearly) the target rate, however
    /// slowly: what a working system does whatever the machine's load.
    pub fn exact_on_rate(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.publish_errors == 0
            && self.achieved_ratio >= MIN_ACHIEVED
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub publish_via: &'static str,
    pub connections: usize,
    pub ready: usize,
    pub failed: usize,
    pub errors: Vec<(String, usize)>,
    pub orgs: usize,
    pub publishers: usize,
    pub payload_bytes: usize,
    pub step_seconds: f64,
    pub steps: Vec<StepReport>,
    /// The highest step target that was sustainable.
    pub highest_sustainable_deliveries_per_s: Option<u64>,
    /// What that step actually delivered per second.
    pub highest_sustainable_measured_per_s: Option<f64>,
    /// Deliveries of another organization's message (plus `auth-success` for another one).
    pub isolation_failures: u64,
    pub malformed: u64,
    pub disconnected: u64,
    pub first_disconnect: Option<String>,
}

impl Report {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.isolation_failures > 0 {
            out.push(format!(
                "isolation: {} deliveries to a client of another organization",
                self.isolation_failures
            ));
        }
        if self.failed > 0 {
            out.push(format!(
                "{} of {} connections failed: {:?}",
                self.failed, self.connections, self.errors
            ));
        }
        if self.malformed > 0 {
            out.push(format!("{} deliveries could not be parsed", self.malformed));
        }
        for s in &self.steps {
            let target = s.target_deliveries_per_s;
            if s.duplicated > 0 {
                out.push(format!(
                    "step {target}/s: {} duplicated deliveries",
                    s.duplicated
                ));
            }
            if !s.overload && s.lost > 0 {
                out.push(format!(
                    "step {target}/s (not overloaded): {} of {} deliveries lost{}",
                    s.lost,
                    s.expected_deliveries,
                    self.first_disconnect
                        .as_ref()
                        .map(|d| format!(
                            " ({} clients disconnected, first: {d})",
                            self.disconnected
                        ))
                        .unwrap_or_default()
                ));
            }
            if !s.overload && s.publish_errors > 0 {
                out.push(format!(
                    "step {target}/s (not overloaded): {} publishes refused: {}",
                    s.publish_errors,
                    s.first_publish_error.as_deref().unwrap_or("")
                ));
            }
        }
        if self.steps.is_empty() {
            out.push("no step ran".into());
        } else if !self.steps.iter().any(StepReport::exact_on_rate) {
            // Otherwise a system that delivers nothing would pass: every step "overloaded".
            // Latency alone does not fail the run: it measures the machine as much as the
            // system (a busy CI machine, a JIT warming up).
            out.push(format!(
                "no step delivered every message on rate: even {} deliveries/s was lossy or behind",
                self.steps[0].target_deliveries_per_s
            ));
        }
        out
    }

    /// The step whose target is nearest to `rate` deliveries/s.
    pub fn at_rate(&self, rate: u64) -> Option<&StepReport> {
        self.steps
            .iter()
            .min_by_key(|s| s.target_deliveries_per_s.abs_diff(rate))
    }
}

/// Which sequence numbers a client has seen.
#[derive(Default)]
pub(crate) struct Seen {
    words: Vec<u64>,
}

impl Seen {
    /// Records `seq`; false if it was already there.
    pub(crate) fn insert(&mut self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        let bit = 1u64 << (seq % 64);
        let fresh = self.words[word] & bit == 0;
        self.words[word] |= bit;
        fresh
    }
}

struct StepCounters {
    from_us: AtomicU64,
    until_us: AtomicU64,
    latency: Vec<Mutex<Histogram<u64>>>,
    in_window: AtomicU64,
    unique: AtomicU64,
    duplicates: AtomicU64,
}

impl StepCounters {
    fn new() -> Self {
        Self {
            from_us: AtomicU64::new(u64::MAX),
            until_us: AtomicU64::new(0),
            latency: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            in_window: AtomicU64::new(0),
            unique: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
        }
    }
}

/// µs from 1 to 60 s, 3 significant digits.
/// Waits for the last deliveries of a step: until `unique` reaches `expected`, nothing new
/// arrives for `idle`, or `max` has passed; then leaves room for duplicates to show up.
/// Returns the seconds it took.
pub(crate) async fn drain(unique: &AtomicU64, expected: u64, max: Duration, idle: Duration) -> f64 {
    let start = Instant::now();
    let mut last = (unique.load(Ordering::Relaxed), Instant::now());
    loop {
        let got = unique.load(Ordering::Relaxed);
        if got >= expected || start.elapsed() > max {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    start.elapsed().as_secs_f64()
}

/// The latency histograms of the shards, merged.
pub(crate) fn merged(shards: &[Mutex<Histogram<u64>>]) -> Histogram<u64> {
    let mut all = histogram();
    for shard in shards {
        if let Ok(h) = shard.lock() {
            let _ = all.add(&*h);
        }
    }
    all
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// What all clients share: the per-step counters and the run's failure counts.
struct Shared {
    steps: Vec<StepCounters>,
    isolation: AtomicU64,
    malformed: AtomicU64,
    disconnected: AtomicU64,
    first_disconnect: Mutex<Option<String>>,
}

/// Highest sequence number a client accepts: a guard against a corrupt body allocating a
/// huge bitset.
pub(crate) const MAX_SEQ: u64 = 1 << 32;

impl Shared {
    fn on_body(&self, bytes: &[u8], org: &str, seen: &mut Seen, shard: usize) {
        let Some(body) = parse_body(bytes) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if body.org != org {
            self.isolation.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(step) = self.steps.get(body.k as usize).filter(|_| body.s < MAX_SEQ) else {
            self.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !seen.insert(body.s) {
            step.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        step.unique.fetch_add(1, Ordering::Relaxed);
        let now = now_us();
        let from = step.from_us.load(Ordering::Acquire);
        let until = step.until_us.load(Ordering::Acquire);
        if (from..until).contains(&now) {
            step.in_window.fetch_add(1, Ordering::Relaxed);
        }
        if (from..until).contains(&body.t) {
            let latency = now.saturating_sub(body.t).max(1);
            if let Ok(mut h) = step.latency[shard].lock() {
                h.saturating_record(latency);
            }
        }
    }
}

/// CPU seconds of the servers, Redis and the generator at one instant.
struct CpuSample {
    at: Instant,
    servers: f64,
    redis: f64,
    /// Each Redis process's CPU seconds (a cluster's masters, in order).
    redis_each: Vec<f64>,
    generator: f64,
}

impl CpuSample {
    fn take(pids: &[u32], redis: &[u32]) -> Self {
        let redis_each: Vec<f64> = redis
            .iter()
            .map(|p| procs::cpu_seconds(Some(*p)).unwrap_or(0.0))
            .collect();
        Self {
            at: Instant::now(),
            servers: procs::cpu_seconds_sum(pids),
            redis: redis_each.iter().sum(),
            redis_each,
            generator: procs::cpu_seconds(None).unwrap_or(0.0),
        }
    }
}

pub async fn run(p: Params) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !p.steps.is_empty(),
        "no steps: pass --steps, e.g. --steps 10000,20000"
    );
    anyhow::ensure!(p.step_seconds > 0.0, "--step-seconds must be positive");
    let limit = fanout_testkit::raise_nofile_limit(p.connections as u64 + crate::net::FD_RESERVE);
    anyhow::ensure!(
        limit >= p.connections as u64 + crate::net::FD_RESERVE,
        "the fanout scenario holds its {} connections in one process, and the open-file limit \
         is {limit} (the hard limit cannot be raised here); use at most {} connections",
        p.connections,
        limit.saturating_sub(crate::net::FD_RESERVE)
    );
    let pids = p.servers.pids.clone();
    let layout = Arc::new(Layout::new(p.connections, p.orgs, p.servers.urls.clone()));
    let orgs = layout.orgs;
    let shared = Arc::new(Shared {
        steps: p.steps.iter().map(|_| StepCounters::new()).collect(),
        isolation: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        disconnected: AtomicU64::new(0),
        first_disconnect: Mutex::new(None),
    });

    let fleet = open_fleet(
        &p.servers,
        layout.clone(),
        0..p.connections,
        p.concurrency,
        {
            let (shared, layout) = (shared.clone(), layout.clone());
            move |i, conn| {
                let shared = shared.clone();
                let org = org_name(layout.org_of(i));
                async move {
                    let mut seen = Seen::default();
                    let why = conn
                        .run(|bytes, _seq| shared.on_body(bytes, &org, &mut seen, i % SHARDS))
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
    let ready = fleet.ready.len();
    if ready == 0 {
        fleet.close();
        anyhow::bail!(
            "no connection became ready ({} failed: {:?})",
            fleet.failed,
            fleet.errors
        );
    }
    // Servers whose "ready" does not wait for the subscription (the Node peer) need a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    procs::wait_idle(&pids, Duration::from_secs(10)).await;

    let n_pub = p.publishers.clamp(1, orgs);
    let mut publishers = Vec::with_capacity(n_pub);
    for id in 0..n_pub {
        let owned: Vec<usize> = (0..orgs).filter(|o| o % n_pub == id).collect();
        publishers.push(Publisher::connect(id, owned, &p.publish, p.payload_bytes).await?);
    }

    let members_per_org = ready as f64 / orgs as f64;
    let step_len = Duration::from_secs_f64(p.step_seconds);
    let warm_up = Duration::from_secs(1).min(step_len / 5);
    let mut steps = Vec::new();
    let mut overloads = 0;
    for (k, &target) in p.steps.iter().enumerate() {
        let counters = &shared.steps[k];
        let msg_rate = target as f64 / members_per_org;
        let lead = Duration::from_millis(100);
        let (base, base_us) = (Instant::now(), now_us());
        let start = base + lead;
        let end = start + step_len;
        let from_us = base_us + (lead + warm_up).as_micros() as u64;
        let until_us = base_us + (lead + step_len).as_micros() as u64;
        counters.from_us.store(from_us, Ordering::Release);
        counters.until_us.store(until_us, Ordering::Release);

        let tasks: Vec<_> = publishers
            .drain(..)
            .map(|publisher| {
                let rate = msg_rate * publisher.owned() as f64 / orgs as f64;
                let phase = publisher.id() as f64 / n_pub as f64;
                tokio::spawn(publisher.run_step(k as u32, rate, phase, start, end))
            })
            .collect();
        tokio::time::sleep_until(start + warm_up).await;
        let cpu_from = CpuSample::take(&pids, &p.redis_pids);
        tokio::time::sleep_until(end).await;
        let cpu_until = CpuSample::take(&pids, &p.redis_pids);
        let mut sent = StepSent::default();
        let mut sent_per_org = vec![0u64; orgs];
        for t in tasks {
            let (publisher, s) = t.await?;
            publishers.push(publisher);
            for (o, n) in &s.per_org {
                sent_per_org[*o] += n;
            }
            sent.sent += s.sent;
            sent.errors += s.errors;
            sent.skipped += s.skipped;
            sent.no_receivers += s.no_receivers;
            if sent.first_error.is_none() {
                sent.first_error = s.first_error;
            }
        }
        publishers.sort_by_key(Publisher::id);
        let expected: u64 = sent_per_org.iter().zip(&members).map(|(s, m)| s * m).sum();

        let drain_s = drain(&counters.unique, expected, DRAIN_MAX, DRAIN_IDLE).await;
        let hist = merged(&counters.latency);
        let received = counters.unique.load(Ordering::Relaxed);
        let window_s = (until_us - from_us) as f64 / 1e6;
        let in_window = counters.in_window.load(Ordering::Relaxed) as f64;
        let delivered_per_s = in_window / window_s;
        let cpu_s = (cpu_until.at - cpu_from.at).as_secs_f64();
        let rate = |used: f64| used / cpu_s;
        let per_delivery =
            |cores: f64| (delivered_per_s > 0.0).then(|| cores / delivered_per_s * 1e6);
        let server_cores = rate(cpu_until.servers - cpu_from.servers);
        let redis_cores = rate(cpu_until.redis - cpu_from.redis);
        let generator_cores = rate(cpu_until.generator - cpu_from.generator);
        let q = |x: f64| (!hist.is_empty()).then(|| hist.value_at_quantile(x) as f64 / 1000.0);
        let p99 = q(0.99);
        let achieved_ratio = delivered_per_s / target as f64;
        let overload = p99.is_none_or(|v| v >= P99_LIMIT_MS) || achieved_ratio < MIN_ACHIEVED;
        let report = StepReport {
            step: k,
            target_deliveries_per_s: target,
            target_messages_per_s: msg_rate,
            published_messages_per_s: sent.sent as f64 / p.step_seconds,
            publish_errors: sent.errors,
            first_publish_error: sent.first_error,
            publish_skipped: sent.skipped,
            publish_no_receivers: sent.no_receivers,
            expected_deliveries: expected,
            received,
            lost: expected.saturating_sub(received),
            duplicated: counters.duplicates.load(Ordering::Relaxed),
            delivered_per_s,
            achieved_ratio,
            latency_samples: hist.len(),
            latency_ms_p50: q(0.5),
            latency_ms_p99: p99,
            latency_ms_p999: q(0.999),
            latency_ms_max: (!hist.is_empty()).then(|| hist.max() as f64 / 1000.0),
            server_cpu_cores: server_cores,
            server_cpu_us_per_delivery: per_delivery(server_cores),
            redis_cpu_us_per_delivery: (!p.redis_pids.is_empty())
                .then_some(per_delivery(redis_cores))
                .flatten(),
            redis_cpu_cores_each: cpu_until
                .redis_each
                .iter()
                .zip(&cpu_from.redis_each)
                .map(|(until, from)| rate(until - from))
                .collect(),
            generator_cpu_cores: generator_cores,
            generator_cpu_us_per_delivery: per_delivery(generator_cores),
            drain_s,
            overload,
        };
        eprintln!("  {}", step_line(&report));
        steps.push(report);
        if overload {
            overloads += 1;
            if overloads > p.steps_after_overload {
                break;
            }
        }
    }
    fleet.close();

    let best = steps
        .iter()
        .filter(|s| s.sustainable())
        .max_by_key(|s| s.target_deliveries_per_s);
    Ok(Report {
        publish_via: p.publish.describe(),
        connections: p.connections,
        ready,
        failed: fleet.failed,
        errors: fleet.errors.clone(),
        orgs,
        publishers: n_pub,
        payload_bytes: p.payload_bytes,
        step_seconds: p.step_seconds,
        highest_sustainable_deliveries_per_s: best.map(|s| s.target_deliveries_per_s),
        highest_sustainable_measured_per_s: best.map(|s| s.delivered_per_s),
        steps,
        isolation_failures: shared.isolation.load(Ordering::Relaxed),
        malformed: shared.malformed.load(Ordering::Relaxed),
        disconnected: shared.disconnected.load(Ordering::Relaxed),
        first_disconnect: shared.first_disconnect.lock().ok().and_then(|f| f.clone()),
    })
}

/// One line of progress per step, on stderr.
fn step_line(s: &StepReport) -> String {
    format!(
        "step {}/s: delivered {:.0}/s, p99 {} ms, lost {}, dup {}, server {} µs/delivery{}",
        s.target_deliveries_per_s,
        s.delivered_per_s,
        num(s.latency_ms_p99, 1),
        s.lost,
        s.duplicated,
        num(s.server_cpu_us_per_delivery, 2),
        if s.overload { " (overload)" } else { "" }
    )
}

/// One row per step.
pub fn table(r: &Report) -> Table {
    let mut t = Table::new([
        "target deliv/s",
        "msgs/s target→sent",
        "delivered/s",
        "% of target",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "expected",
        "lost",
        "dup",
        "server cores",
        "server µs/deliv",
        "redis µs/deliv",
        "generator µs/deliv",
        "verdict",
    ]);
    for s in &r.steps {
        let verdict = if s.sustainable() {
            "ok".to_string()
        } else if s.overload {
            "overload".to_string()
        } else {
            "FAIL".to_string()
        };
        t.row([
            int(s.target_deliveries_per_s),
            format!(
                "{:.0}→{:.0}",
                s.target_messages_per_s, s.published_messages_per_s
            ),
            int(s.delivered_per_s.round() as u64),
            format!("{:.0}%", s.achieved_ratio * 100.0),
            num(s.latency_ms_p50, 2),
            num(s.latency_ms_p99, 2),
            num(s.latency_ms_p999, 2),
            num(s.latency_ms_max, 1),
            int(s.expected_deliveries),
            int(s.lost),
            int(s.duplicated),
            num(Some(s.server_cpu_cores), 2),
            num(s.server_cpu_us_per_delivery, 2),
            num(s.redis_cpu_us_per_delivery, 2),
            num(s.generator_cpu_us_per_delivery, 2),
            verdict,
        ]);
    }
    t
}

/// How the Redis load spread over several Redis processes (a cluster's masters) at each
/// step: the cores each used, and its share. `None` with a single Redis.
pub fn spread_table(r: &Report) -> Option<Table> {
    let nodes = r.steps.first()?.redis_cpu_cores_each.len();
    if nodes < 2 {
        return None;
    }
    let mut headers = vec!["target deliv/s".to_string()];
    headers.extend((1..=nodes).map(|i| format!("master {i} cores (share)")));
    let mut t = Table::new(headers);
    for s in &r.steps {
        let total: f64 = s.redis_cpu_cores_each.iter().sum();
        let mut row = vec![int(s.target_deliveries_per_s)];
        row.extend(s.redis_cpu_cores_each.iter().map(|c| {
            format!(
                "{c:.3} ({:.0}%)",
                if total > 0.0 { c / total * 100.0 } else { 0.0 }
            )
        }));
        t.row(row);
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_catches_repeats_in_any_order() {
        let mut s = Seen::default();
        assert!(s.insert(5));
        assert!(s.insert(200));
        assert!(s.insert(0));
        assert!(!s.insert(5));
        assert!(!s.insert(200));
        assert!(s.insert(63));
        assert!(s.insert(64));
    }

    #[test]
    fn bodies_are_charged_to_their_step_and_org() {
        let shared = Shared {
            steps: vec![StepCounters::new()],
            isolation: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            first_disconnect: Mutex::new(None),
        };
        let now = now_us();
        shared.steps[0]
            .from_us
            .store(now - 1_000_000, Ordering::Relaxed);
        shared.steps[0]
            .until_us
            .store(now + 1_000_000, Ordering::Relaxed);
        let mut w = crate::message::BodyWriter::new(200);
        let mut seen = Seen::default();
        let body = w.write("org-1", 0, 0, 7, now - 500).to_string();
        shared.on_body(body.as_bytes(), "org-1", &mut seen, 0);
        shared.on_body(body.as_bytes(), "org-1", &mut seen, 1);
        shared.on_body(body.as_bytes(), "org-2", &mut Seen::default(), 0);
        let late_step = w.write("org-1", 0, 3, 8, now).to_string();
        shared.on_body(late_step.as_bytes(), "org-1", &mut seen, 0);
        shared.on_body(b"not json", "org-1", &mut seen, 0);
        let st = &shared.steps[0];
        assert_eq!(st.unique.load(Ordering::Relaxed), 1);
        assert_eq!(st.duplicates.load(Ordering::Relaxed), 1);
        assert_eq!(st.in_window.load(Ordering::Relaxed), 1);
        assert_eq!(st.latency[0].lock().unwrap().len(), 1);
        assert_eq!(shared.isolation.load(Ordering::Relaxed), 1);
        assert_eq!(shared.malformed.load(Ordering::Relaxed), 2);
    }
}
