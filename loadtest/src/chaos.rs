//! `chaos`: three faults during one run of durable ingest and reconnecting clients, and the
//! proof that no event answered 200 was lost, repeated, reordered or misdelivered.
//!
//! Like `ingest`, it owns the whole setup, because it kills parts of it: three durable
//! replicas of the same binary, their own redis-server (on a port of the run's range, so it
//! can come back on the same one) and their own PostgreSQL server (testkit's private one, in
//! a temporary directory). The load (`scenario/chaos.rs`) runs throughout; the faults come
//! one after the other, each only once the previous one's recovery was seen and a calm
//! period has passed, so that each recovery is measured on its own:
//!
//! 1. `kill -9` of replica 2, restarted on the same ports after `--down` seconds;
//! 2. Redis killed (SIGKILL), a fresh empty one started on the same port after `--down`;
//! 3. PostgreSQL stopped (fast shutdown), started again on the same data after `--down`.
//!
//! Recovery of a fault, measured from the moment it was injected:
//! - *ingest*: until every replica has answered 200 to a request sent after its last
//!   failed one (503, connection error, timeout) of the fault's window;
//! - *members, events before the fault*: until every member has received every event
//!   answered 200 before the fault (the highest such `seq` of its organization);
//! - *members, events up to the repair*: until every member has received every event
//!   answered 200 before the part came back (which includes, for Redis, the events committed
//!   while the bus was down and read back from the history).
//!
//! The members count from their first `auth-success`, which comes before the first event:
//! every event of their organization is theirs. A run passes when every member received
//! every event answered 200 exactly once, in `seq` order, with the body that was answered
//! that `seq`, and no other organization's; when no member was told to resync, except with
//! `history_unavailable` while PostgreSQL was down or coming back (the documented answer
//! when the history cannot be read; the member then waits for its replay instead); and when
//! every fault was recovered from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use fanout_testkit::process::{Logs, Proc};
use fanout_testkit::{PgServer, RedisServer, Replica};
use serde::Serialize;
use tokio::time::Instant;

use crate::compare::{ensure_free, loopback, start_redis};
use crate::net::open_files;
use crate::procs;
use crate::report::{self, Table, int, num};
use crate::scenario::chaos::{Answer, Class, Load, Outcome, Params};

/// Longest wait for a fault's recovery before the run goes on without it (and fails).
const RECOVERY_MAX: Duration = Duration::from_secs(60);
/// How long after PostgreSQL is back a `history_unavailable` resync is still its doing:
/// a replica retries the store with a backoff of up to a second, and a replay waits for a
/// cursor for up to 5 s.
const PG_GRACE: Duration = Duration::from_secs(10);
/// The replica that is killed.
const VICTIM: usize = 1;
const REPLICAS: usize = 3;

#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub smoke: bool,
    pub orgs: usize,
    pub members: usize,
    pub events_per_s: u64,
    pub publishers: usize,
    pub payload_bytes: usize,
    /// A member's sessions last a random time between these, in seconds.
    pub session_s: (f64, f64),
    /// Load before the first fault.
    pub warm_s: f64,
    /// How long each part stays down.
    pub down_s: f64,
    /// Load after a recovery before the next fault.
    pub calm_s: f64,
    pub base_port: u16,
    #[serde(skip)]
    pub out: Option<PathBuf>,
    #[serde(skip)]
    pub fanout_bin: PathBuf,
    #[serde(skip)]
    pub redis_server: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    KillReplica,
    RestartRedis,
    RestartPostgres,
}

impl FaultKind {
    fn label(self) -> &'static str {
        match self {
            Self::KillReplica => "kill -9 of replica 2, restarted",
            Self::RestartRedis => "Redis killed, restarted empty on the same port",
            Self::RestartPostgres => "PostgreSQL stopped, started again",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kind: FaultKind,
    /// Seconds since the load started.
    pub at_s: f64,
    /// From the fault until the part was back (serving again).
    pub down_s: f64,
    /// Requests that failed (not 200) during the fault's window (by answer time), by class.
    pub failed_answers: u64,
    pub failed_503: u64,
    pub failed_connection: u64,
    pub failed_other: u64,
    /// The first and the last of them, with when (seconds since the load started).
    pub first_failure: Option<(f64, String)>,
    pub last_failure: Option<(f64, String)>,
    /// From the fault: every replica's ingest answering 200 again (0 if it never stopped).
    pub ingest_recovered_s: Option<f64>,
    /// From the fault: every member has every event answered 200 before the fault.
    pub members_before_fault_s: Option<f64>,
    /// From the repair: every member has every event answered 200 before the repair.
    pub members_to_repair_s: Option<f64>,
    /// Connections the servers ended during the window.
    pub forced_reconnects: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub answered_200: u64,
    pub answered_200_unpublished: u64,
    pub answered_503: u64,
    pub answered_other: u64,
    pub connection_errors: u64,
    pub timeouts: u64,
    pub answers_200_without_seq: u64,
    pub answered_seq_duplicates: u64,
    pub achieved_events_per_s: f64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub missing: u64,
    pub mismatched: u64,
    pub holes: u64,
    pub foreign: u64,
    pub malformed: u64,
    pub deliveries_without_seq: u64,
    /// Distinct `seq`s delivered whose request was not answered 200 (its outcome unknown
    /// to the publisher: the replica died, or the answer timed out, after the commit).
    pub delivered_unanswered: u64,
    /// Those, by what their request got instead, with one example each.
    pub delivered_unanswered_by_answer: Vec<(String, u64, String)>,
    /// Sends the publishers skipped because they ran more than 50 ms late.
    pub skipped_sends: u64,
    pub requests_per_s: f64,
    /// Events answered 200 per second before the first fault.
    pub steady_events_per_s: Option<f64>,
    pub resyncs: Vec<(String, u64)>,
    pub resyncs_unexplained: u64,
    pub sessions: u64,
    pub voluntary_reconnects: u64,
    pub forced_reconnects: u64,
    pub connect_failures: u64,
    pub first_connect_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ChaosReport {
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub cores: usize,
    pub load_before: Option<String>,
    pub options: Options,
    pub load_s: f64,
    pub faults: Vec<FaultReport>,
    pub totals: Totals,
    pub failures: Vec<String>,
}

struct Ports {
    base: u16,
}

impl Ports {
    fn public(&self, i: usize) -> SocketAddr {
        loopback(self.base + i as u16)
    }
    fn internal(&self, i: usize) -> SocketAddr {
        loopback(self.base + 100 + i as u16)
    }
    fn redis(&self) -> SocketAddr {
        loopback(self.base + 200)
    }
}

/// What every replica is started with.
struct Fleet<'a> {
    opts: &'a Options,
    ports: &'a Ports,
    redis_url: String,
    database_url: String,
    secret: String,
    key: String,
}

impl Fleet<'_> {
    async fn start(&self, i: usize) -> anyhow::Result<Proc> {
        let replica = Replica::builder()
            .name(&format!("replica-{}", i + 1))
            .bin(&self.opts.fanout_bin)
            .listen(self.ports.public(i), self.ports.internal(i))
            .logs(Logs::File(procs::log_dir()))
            .env("JWT_SECRET", &self.secret)
            .env("FANOUT_INGEST_KEYS", &self.key)
            .redis_url(&self.redis_url)
            .database_url(&self.database_url)
            .env("FANOUT_SHUTDOWN_TIMEOUT", "5s")
            .env("RUST_LOG", "warn")
            .try_start()
            .await?;
        replica.try_wait_store_up().await?;
        Ok(replica.into_proc())
    }
}

pub async fn run(opts: Options) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    let (started_unix_s, load_before) = crate::report::run_start();
    let members = opts.members as u64;
    open_files(4 * members, 2 * members, &format!("{members} members"))?;
    crate::procs::require_fanout(&opts.fanout_bin)?;
    let ports = Ports {
        base: opts.base_port,
    };
    let mut addrs = vec![ports.redis()];
    for i in 0..REPLICAS {
        addrs.push(ports.public(i));
        addrs.push(ports.internal(i));
    }
    ensure_free(&addrs)?;
    eprintln!(
        "chaos: {REPLICAS} durable replicas, {} members in {} orgs, {} events/s from {} publishers, logs in {}",
        opts.members,
        opts.orgs,
        opts.events_per_s,
        opts.publishers,
        procs::log_dir().display()
    );
    let mut redis = start_redis(&opts.redis_server, ports.redis()).await?;
    // The kit's server panics with what to install when it cannot start: an error here.
    let mut pg = tokio::spawn(PgServer::start())
        .await
        .map_err(|e| anyhow::anyhow!("the private PostgreSQL server did not start: {e}"))?;
    let run = tokio::select! {
        r = drive(&opts, &ports, &mut redis, &mut pg) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(redis);
    drop(pg);
    let (load_s, faults, totals, mut failures) = match run {
        Ok(r) => r,
        Err(e) => (0.0, Vec::new(), Totals::default(), vec![format!("{e:#}")]),
    };
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(procs::log_dir());
    } else {
        failures.push(format!("server logs: {}", procs::log_dir().display()));
    }
    Ok(ChaosReport {
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before,
        options: opts,
        load_s,
        faults,
        totals,
        failures,
    })
}

/// A fault as it happened, before its recovery is read from the answers.
struct Injected {
    kind: FaultKind,
    at: Instant,
    repaired: Instant,
    before_fault: Option<Instant>,
    to_repair: Option<Instant>,
}

type Driven = (f64, Vec<FaultReport>, Totals, Vec<String>);

async fn drive(
    opts: &Options,
    ports: &Ports,
    redis: &mut RedisServer,
    pg: &mut PgServer,
) -> anyhow::Result<Driven> {
    let fleet = Fleet {
        opts,
        ports,
        redis_url: redis.url(),
        database_url: pg.url(),
        secret: format!("chaos-secret-{}", std::process::id()),
        key: format!("chaos-key-{}", std::process::id()),
    };
    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        replicas.push(fleet.start(i).await?);
    }
    let secs = Duration::from_secs_f64;
    let mut load = Load::start(Params {
        public: (0..REPLICAS).map(|i| ports.public(i)).collect(),
        ingest: (0..REPLICAS).map(|i| ports.internal(i)).collect(),
        secret: fleet.secret.clone(),
        ingest_key: fleet.key.clone(),
        orgs: opts.orgs,
        members: opts.members,
        events_per_s: opts.events_per_s,
        publishers: opts.publishers,
        payload_bytes: opts.payload_bytes,
        session: (secs(opts.session_s.0), secs(opts.session_s.1)),
    })
    .await?;
    let t0 = load.t0();
    eprintln!("  every member authenticated; ingest started");
    let mut failures = Vec::new();
    let mut injected = Vec::new();
    tokio::time::sleep(secs(opts.warm_s)).await;
    for kind in [
        FaultKind::KillReplica,
        FaultKind::RestartRedis,
        FaultKind::RestartPostgres,
    ] {
        let before = load.answered();
        let at = Instant::now();
        eprintln!("  {:6.1} s: {}", (at - t0).as_secs_f64(), kind.label());
        match kind {
            FaultKind::KillReplica => {
                replicas[VICTIM].signal(libc::SIGKILL);
                replicas[VICTIM].wait_exit(Duration::from_secs(5)).await;
            }
            FaultKind::RestartRedis => redis.stop(),
            FaultKind::RestartPostgres => pg.stop().await,
        }
        let watch_before = load.wait_caught_up(&before, RECOVERY_MAX);
        let repair = async {
            tokio::time::sleep(secs(opts.down_s)).await;
            match kind {
                FaultKind::KillReplica => {
                    replicas[VICTIM] = fleet.start(VICTIM).await?;
                }
                FaultKind::RestartRedis => redis.restart().await,
                FaultKind::RestartPostgres => pg.start_again().await,
            }
            anyhow::Ok(Instant::now())
        };
        let (before_fault, repaired) = tokio::join!(watch_before, repair);
        let repaired = repaired.with_context(|| format!("repairing after {}", kind.label()))?;
        let to_repair_target = load.answered();
        eprintln!(
            "  {:6.1} s: back after {:.1} s",
            (repaired - t0).as_secs_f64(),
            (repaired - at).as_secs_f64()
        );
        let (to_repair, ingest) = tokio::join!(
            load.wait_caught_up(&to_repair_target, RECOVERY_MAX),
            load.wait_ingest_ok(repaired, RECOVERY_MAX)
        );
        if ingest.is_none() {
            failures.push(format!(
                "{}: some replica's ingest did not answer 200 within {RECOVERY_MAX:?} of the repair",
                kind.label()
            ));
        }
        if to_repair.is_none() || before_fault.is_none() {
            failures.push(format!(
                "{}: the members did not catch up within {RECOVERY_MAX:?}",
                kind.label()
            ));
        }
        injected.push(Injected {
            kind,
            at,
            repaired,
            before_fault,
            to_repair,
        });
        tokio::time::sleep(secs(opts.calm_s)).await;
    }
    let (answers_tail, lost_publishers, skipped) = load.stop_ingest().await;
    let last = answered_max(&answers_tail, opts.orgs);
    eprintln!(
        "  {:6.1} s: ingest stopped; waiting for every member to have every event",
        t0.elapsed().as_secs_f64()
    );
    if load.wait_caught_up(&last, RECOVERY_MAX).await.is_none() {
        failures.push(format!(
            "after the ingest stopped, the members did not catch up within {RECOVERY_MAX:?}"
        ));
    }
    let load_s = t0.elapsed().as_secs_f64();
    let mut outcome = load.finish().await;
    outcome.answers = answers_tail;
    outcome.lost_publishers = lost_publishers;
    outcome.skipped = skipped;
    for (i, p) in replicas.iter_mut().enumerate() {
        if let Some(status) = p.exited() {
            failures.push(format!("replica {} died ({status})", i + 1));
        }
    }
    for p in replicas {
        p.stop(Duration::from_secs(5)).await;
    }
    let pg_windows: Vec<(u32, u32)> = injected
        .iter()
        .filter(|f| f.kind == FaultKind::RestartPostgres)
        .map(|f| {
            (
                ms_since(t0, f.at),
                ms_since(t0, f.repaired) + PG_GRACE.as_millis() as u32,
            )
        })
        .collect();
    let mut totals = totals(&outcome, opts.orgs, load_s, &pg_windows);
    if let Some(first) = injected.first() {
        let until = ms_since(t0, first.at);
        let ok = outcome
            .answers
            .iter()
            .filter(|a| a.class == Class::Ok && a.done_ms < until)
            .count();
        totals.steady_events_per_s = Some(ok as f64 * 1000.0 / until.max(1) as f64);
    }
    let faults = fault_reports(&injected, &outcome, t0, load_s);
    failures.extend(problems(&totals, &outcome));
    Ok((load_s, faults, totals, failures))
}

fn ms_since(t0: Instant, t: Instant) -> u32 {
    t.saturating_duration_since(t0).as_millis() as u32
}

/// Per organization, the highest `seq` answered 200.
fn answered_max(answers: &[Answer], orgs: usize) -> Vec<u64> {
    let mut max = vec![0u64; orgs];
    for a in answers {
        if let Some(seq) = a.seq {
            max[a.org as usize] = max[a.org as usize].max(seq);
        }
    }
    max
}

fn fault_reports(
    injected: &[Injected],
    outcome: &Outcome,
    t0: Instant,
    load_s: f64,
) -> Vec<FaultReport> {
    let end_ms = (load_s * 1000.0) as u32;
    injected
        .iter()
        .enumerate()
        .map(|(k, f)| {
            let from = ms_since(t0, f.at);
            let until = injected.get(k + 1).map_or(end_ms, |n| ms_since(t0, n.at));
            let window: Vec<&Answer> = outcome
                .answers
                .iter()
                // By answer time: a request in flight when a part failed belongs to its fault.
                .filter(|a| (from..until).contains(&a.done_ms))
                .collect();
            let failures: Vec<&&Answer> = window.iter().filter(|a| a.class != Class::Ok).collect();
            let count =
                |c: &[Class]| failures.iter().filter(|a| c.contains(&a.class)).count() as u64;
            let described = |a: &&&Answer| {
                (
                    a.sent_ms as f64 / 1000.0,
                    format!(
                        "replica {}: {}",
                        a.replica + 1,
                        a.detail.as_deref().unwrap_or("timed out")
                    ),
                )
            };
            // Per replica: the first 200 to a request sent after its last failure.
            let mut recovered = Some(from);
            for r in 0..REPLICAS as u8 {
                let last_failure = window
                    .iter()
                    .filter(|a| a.replica == r && a.class != Class::Ok)
                    .map(|a| a.sent_ms)
                    .max();
                let Some(last_failure) = last_failure else {
                    continue;
                };
                let ok = window
                    .iter()
                    .filter(|a| a.replica == r && a.class == Class::Ok && a.sent_ms > last_failure)
                    .map(|a| a.done_ms)
                    .min();
                recovered = match (recovered, ok) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    _ => None,
                };
            }
            let since = |t: Option<Instant>| t.map(|t| (t - f.at).as_secs_f64());
            FaultReport {
                kind: f.kind,
                at_s: from as f64 / 1000.0,
                down_s: (f.repaired - f.at).as_secs_f64(),
                failed_answers: failures.len() as u64,
                failed_503: count(&[Class::Unavailable]),
                failed_connection: count(&[Class::ConnectionError, Class::Timeout]),
                failed_other: count(&[Class::OtherStatus]),
                first_failure: failures.first().map(described),
                last_failure: failures.last().map(described),
                ingest_recovered_s: recovered.map(|r| (r - from) as f64 / 1000.0),
                members_before_fault_s: since(f.before_fault),
                members_to_repair_s: f.to_repair.map(|t| (t - f.repaired).as_secs_f64()),
                forced_reconnects: outcome
                    .members
                    .iter()
                    .flat_map(|m| &m.forced)
                    .filter(|t| (from..until).contains(*t))
                    .count() as u64,
            }
        })
        .collect()
}

fn totals(outcome: &Outcome, orgs: usize, load_s: f64, pg_windows: &[(u32, u32)]) -> Totals {
    let mut t = Totals::default();
    // Per organization: seq → body number answered with it.
    let mut answered: Vec<std::collections::HashMap<u64, u64>> = vec![Default::default(); orgs];
    for a in &outcome.answers {
        t.requests += 1;
        match a.class {
            Class::Ok => {
                t.answered_200 += 1;
                t.answered_200_unpublished += a.unpublished as u64;
                match a.seq {
                    Some(seq) => {
                        if answered[a.org as usize].insert(seq, a.s).is_some() {
                            t.answered_seq_duplicates += 1;
                        }
                    }
                    None => t.answers_200_without_seq += 1,
                }
            }
            Class::Unavailable => t.answered_503 += 1,
            Class::OtherStatus => t.answered_other += 1,
            Class::ConnectionError => t.connection_errors += 1,
            Class::Timeout => t.timeouts += 1,
        }
    }
    t.achieved_events_per_s = t.answered_200 as f64 / load_s.max(1e-9);
    let mut resyncs: std::collections::BTreeMap<String, u64> = Default::default();
    // Per organization: seq → body number, of the seqs delivered without a 200.
    let mut unanswered: Vec<std::collections::HashMap<u64, u64>> = vec![Default::default(); orgs];
    for m in &outcome.members {
        let owed = &answered[m.org];
        t.expected_deliveries += owed.len() as u64;
        for (&seq, &s) in owed {
            match m.got.get(seq as usize).copied().unwrap_or(0) {
                0 => t.missing += 1,
                got if got != s + 1 => t.mismatched += 1,
                _ => {}
            }
        }
        let highest = m.got.iter().rposition(|g| *g != 0).unwrap_or(0);
        for (seq, g) in m.got.iter().enumerate().take(highest + 1).skip(1) {
            if *g == 0 {
                // An answered seq never received is counted as missing above.
                if !owed.contains_key(&(seq as u64)) {
                    t.holes += 1;
                }
            } else {
                t.delivered += 1;
                if !owed.contains_key(&(seq as u64)) {
                    unanswered[m.org].insert(seq as u64, g - 1);
                }
            }
        }
        t.duplicates += m.duplicates;
        t.out_of_order += m.out_of_order;
        t.foreign += m.foreign;
        t.malformed += m.malformed;
        t.deliveries_without_seq += m.without_seq;
        for (reason, at) in &m.resyncs {
            *resyncs.entry(reason.clone()).or_default() += 1;
            let explained = reason == "history_unavailable"
                && pg_windows.iter().any(|(a, b)| (*a..=*b).contains(at));
            if !explained {
                t.resyncs_unexplained += 1;
            }
        }
        t.sessions += m.sessions;
        t.voluntary_reconnects += m.voluntary;
        t.forced_reconnects += m.forced.len() as u64;
        t.connect_failures += m.connect_failures;
        if t.first_connect_error.is_none() {
            t.first_connect_error = m.first_connect_error.clone();
        }
    }
    t.delivered_unanswered = unanswered.iter().map(|s| s.len() as u64).sum();
    // What the request of each such event got instead (found by its body number).
    let failed: std::collections::HashMap<(u32, u64), &Answer> = outcome
        .answers
        .iter()
        .filter(|a| a.class != Class::Ok)
        .map(|a| ((a.org, a.s), a))
        .collect();
    let mut by: std::collections::BTreeMap<String, (u64, String)> = Default::default();
    for (org, events) in unanswered.iter().enumerate() {
        for s in events.values() {
            let (class, detail) = match failed.get(&(org as u32, *s)) {
                Some(a) => (
                    format!("{:?}", a.class),
                    format!(
                        "replica {} at {:.1} s: {}",
                        a.replica + 1,
                        a.sent_ms as f64 / 1000.0,
                        a.detail.as_deref().unwrap_or("timed out")
                    ),
                ),
                None => ("no request found".into(), format!("org-{org} body {s}")),
            };
            let e = by.entry(class).or_insert((0, detail));
            e.0 += 1;
        }
    }
    t.delivered_unanswered_by_answer = by.into_iter().map(|(k, (n, d))| (k, n, d)).collect();
    t.skipped_sends = outcome.skipped;
    t.requests_per_s = t.requests as f64 / load_s.max(1e-9);
    t.resyncs = resyncs.into_iter().collect();
    t
}

fn problems(t: &Totals, outcome: &Outcome) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |n: u64, what: &str| {
        if n > 0 {
            out.push(format!("{} {what}", int(n)));
        }
    };
    check(t.missing, "deliveries of events answered 200 missing");
    check(t.duplicates, "duplicate deliveries");
    check(t.out_of_order, "deliveries out of seq order");
    check(
        t.mismatched,
        "deliveries whose body is not the one answered with their seq",
    );
    check(
        t.holes,
        "seqs never delivered below a member's highest (unanswered events lost)",
    );
    check(t.foreign, "deliveries of another organization's event");
    check(t.malformed, "deliveries that could not be parsed");
    check(t.deliveries_without_seq, "durable deliveries without a seq");
    check(t.answers_200_without_seq, "200 answers without a seq");
    check(
        t.answered_seq_duplicates,
        "seqs answered 200 twice in one organization",
    );
    check(
        t.resyncs_unexplained,
        "resync-required not explained by the PostgreSQL outage",
    );
    check(outcome.lost_members as u64, "member tasks failed");
    check(outcome.lost_publishers as u64, "publisher tasks failed");
    if t.answered_200 == 0 {
        out.push("no event was answered 200".into());
    }
    out
}

/// Faults and recovery, one row per fault.
pub fn faults_table(r: &ChaosReport) -> Table {
    let mut t = Table::new([
        "fault",
        "at s",
        "down s",
        "failed answers: 503 / conn. / other",
        "ingest 200 on every replica, s after fault",
        "members have every event accepted before the fault, s after fault",
        "... accepted until the part was back, s after it was back",
        "forced reconnects",
    ]);
    let never = |v: Option<f64>| v.map_or("never".to_string(), |v| num(Some(v), 2));
    for f in &r.faults {
        t.row([
            f.kind.label().to_string(),
            num(Some(f.at_s), 1),
            num(Some(f.down_s), 1),
            format!(
                "{} / {} / {}",
                int(f.failed_503),
                int(f.failed_connection),
                int(f.failed_other)
            ),
            never(f.ingest_recovered_s),
            never(f.members_before_fault_s),
            never(f.members_to_repair_s),
            int(f.forced_reconnects),
        ]);
    }
    t
}

/// The run's exactness and traffic, one row per count.
pub fn totals_table(r: &ChaosReport) -> Table {
    let t = &r.totals;
    let mut table = Table::new(["", "count"]);
    let mut row = |k: &str, v: String| table.row([k.to_string(), v]);
    row("ingest requests", int(t.requests));
    row(
        "answered 200 (of them \"published\": false)",
        format!(
            "{} ({})",
            int(t.answered_200),
            int(t.answered_200_unpublished)
        ),
    );
    row("answered 503", int(t.answered_503));
    row("answered another status", int(t.answered_other));
    row("connection errors", int(t.connection_errors));
    row("timeouts (10 s)", int(t.timeouts));
    row(
        "requests/s sent, events/s answered 200 (whole run, outages included)",
        format!(
            "{} / {}",
            num(Some(t.requests_per_s), 0),
            num(Some(t.achieved_events_per_s), 0)
        ),
    );
    row(
        "events/s answered 200 before the first fault",
        num(t.steady_events_per_s, 0),
    );
    row(
        "sends skipped (a publisher more than 50 ms late)",
        int(t.skipped_sends),
    );
    row(
        "deliveries owed (200s × members)",
        int(t.expected_deliveries),
    );
    row("deliveries received (distinct)", int(t.delivered));
    row("missing", int(t.missing));
    row("duplicates", int(t.duplicates));
    row("out of order", int(t.out_of_order));
    row("wrong body for the seq", int(t.mismatched));
    row("holes (unanswered seqs lost)", int(t.holes));
    row("foreign (another organization's)", int(t.foreign));
    row(
        "seqs delivered whose request got no 200 (outcome unknown to the publisher)",
        if t.delivered_unanswered_by_answer.is_empty() {
            int(t.delivered_unanswered)
        } else {
            let by: Vec<String> = t
                .delivered_unanswered_by_answer
                .iter()
                .map(|(class, n, _)| format!("{n} {class}"))
                .collect();
            format!("{} ({})", int(t.delivered_unanswered), by.join(", "))
        },
    );
    let resyncs = if t.resyncs.is_empty() {
        "0".to_string()
    } else {
        t.resyncs
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    row(
        "resync-required (unexplained)",
        format!("{resyncs} ({})", int(t.resyncs_unexplained)),
    );
    row("member sessions", int(t.sessions));
    row(
        "reconnects: voluntary / forced",
        format!(
            "{} / {}",
            int(t.voluntary_reconnects),
            int(t.forced_reconnects)
        ),
    );
    row("connection attempts that failed", int(t.connect_failures));
    table
}

/// Prints the tables and writes the JSON; returns whether the run passed.
pub fn finish(r: &ChaosReport) -> anyhow::Result<bool> {
    let o = &r.options;
    println!(
        "\n## Chaos under load ({REPLICAS} durable replicas, {} members in {} orgs, {} events/s target, {} cores, {:.0} s)\n",
        o.members, o.orgs, o.events_per_s, r.cores, r.duration_s
    );
    if !r.faults.is_empty() {
        println!("{}", faults_table(r).render());
        println!(
            "Recovery is timed from the fault. Ingest: until every replica answered 200 to a request sent after its last failed one. Members: until every member had received every event answered 200 before the fault (timed from the fault), and every event answered 200 before the part was back (timed from then: for Redis, the events committed while the bus was down, read back from the history).\n"
        );
        println!("{}", totals_table(r).render());
    }
    println!(
        "chaos: {}",
        if r.failures.is_empty() {
            "pass: every event answered 200 reached every member of its organization exactly once, in seq order, and no other"
        } else {
            "FAIL"
        }
    );
    report::finish(r.options.out.as_deref(), r, &r.failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::chaos::MemberOut;

    fn answer(org: u32, s: u64, seq: Option<u64>, class: Class) -> Answer {
        Answer {
            sent_ms: 1000,
            done_ms: 1001,
            replica: 0,
            class,
            org,
            s,
            seq,
            unpublished: false,
            detail: (class != Class::Ok).then(|| "connection closed".to_string()),
        }
    }

    #[test]
    fn every_answered_event_is_owed_to_every_member() {
        // org 0 answered seqs 1, 2, 4 (bodies 0, 1, 3); body 2 was committed as seq 3, but
        // its request failed.
        let answers = vec![
            answer(0, 0, Some(1), Class::Ok),
            answer(0, 1, Some(2), Class::Ok),
            answer(0, 2, None, Class::ConnectionError),
            answer(0, 3, Some(4), Class::Ok),
        ];
        let member = |got: Vec<u64>, resyncs: Vec<(String, u32)>| MemberOut {
            org: 0,
            got,
            resyncs,
            ..Default::default()
        };
        let outcome = Outcome {
            members: vec![
                // Everything, the unanswered seq 3 included.
                member(vec![0, 1, 2, 3, 4], vec![]),
                // Seq 2 never came, seq 3 (unanswered) neither, and seq 4 has another body.
                member(
                    vec![0, 1, 0, 0, 9],
                    vec![
                        ("history_unavailable".into(), 5_000),
                        ("history_unavailable".into(), 50_000),
                        ("too_far_behind".into(), 5_000),
                    ],
                ),
                // Nothing after seq 1.
                member(vec![0, 1], vec![]),
            ],
            answers,
            lost_publishers: 0,
            lost_members: 0,
            skipped: 0,
        };
        let t = totals(&outcome, 1, 10.0, &[(4_000, 20_000)]);
        assert_eq!(t.answered_200, 3);
        assert_eq!(t.connection_errors, 1);
        assert_eq!(t.expected_deliveries, 9);
        assert_eq!(
            t.missing, 3,
            "seq 2 of the second member, seqs 2 and 4 of the third"
        );
        assert_eq!(t.mismatched, 1);
        assert_eq!(
            t.holes, 1,
            "the unanswered seq 3 below the second member's highest"
        );
        assert_eq!(t.delivered_unanswered, 1);
        assert_eq!(t.delivered_unanswered_by_answer[0].0, "ConnectionError");
        assert_eq!(
            t.resyncs_unexplained, 2,
            "only history_unavailable during the PostgreSQL window is explained"
        );
        assert_eq!(problems(&t, &outcome).len(), 4);
    }
}
