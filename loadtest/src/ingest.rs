//! `ingest`: durable ingest against ephemeral ingest, side by side, in one run.
//!
//! Like `compare`, it owns the whole setup, so that a measurement is one command: its own
//! redis-server (never the shared 6379), a fresh database on the PostgreSQL server of
//! `--database-url` (dropped at the end, also on Ctrl-C), and two fleets of fanout replicas
//! started together from the same binary with the same settings: *ephemeral* (no
//! `DATABASE_URL`) and *durable* (with it), each on its own Redis channel prefix so that
//! they never see each other's messages. It then runs the `ingest` scenario (see
//! `scenario/ingest.rs`): every phase on the ephemeral fleet, then on the durable one, while
//! the other fleet idles; and prints the two side by side.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use fanout_testkit::process::{Logs, Proc};
use fanout_testkit::{Replica, TestDb};
use serde::Serialize;
use tokio::time::Instant;

use crate::client::System;
use crate::compare::{ensure_free, loopback, start_redis};
use crate::net::open_files;
use crate::pg;
use crate::procs;
use crate::report::{self, Table, int, num};
use crate::scenario::Servers;
use crate::scenario::ingest::{self as scenario, Phase, PhaseReport, Side, bound};

#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub smoke: bool,
    pub orgs: usize,
    pub connections: usize,
    /// Closed-loop phases: publishers in each.
    pub publishers: Vec<usize>,
    /// Open-loop phases: events/s in each.
    pub rates: Vec<u64>,
    pub open_publishers: usize,
    pub phase_seconds: f64,
    pub payload_bytes: usize,
    pub concurrency: usize,
    pub replicas: u16,
    pub base_port: u16,
    #[serde(skip)]
    pub database_url: String,
    #[serde(skip)]
    pub out: Option<PathBuf>,
    #[serde(skip)]
    pub fanout_bin: PathBuf,
    #[serde(skip)]
    pub redis_server: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct IngestReport {
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub cores: usize,
    /// `/proc/loadavg` before the run: what else the machine was doing.
    pub load_before: Option<String>,
    pub options: Options,
    pub database: Option<String>,
    /// The PostgreSQL settings that decide what a commit costs.
    pub postgres: Vec<(String, String)>,
    pub result: Option<scenario::Report>,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    /// The summary tables as rows of cells (first row: headers).
    pub closed_loop: Vec<Vec<String>>,
    pub open_loop: Vec<Vec<String>>,
}

/// Ports: ephemeral replica `i` public `base+i`, internal `base+100+i`; durable replica `i`
/// public `base+50+i`, internal `base+150+i`; Redis `base+200`.
struct Ports {
    base: u16,
}

impl Ports {
    fn public(&self, durable: bool, i: u16) -> SocketAddr {
        loopback(self.base + if durable { 50 } else { 0 } + i)
    }
    fn internal(&self, durable: bool, i: u16) -> SocketAddr {
        loopback(self.base + if durable { 150 } else { 100 } + i)
    }
    fn redis(&self) -> SocketAddr {
        loopback(self.base + 200)
    }
}

/// The phases: the closed-loop sweep, then the open-loop rates.
pub fn phases(opts: &Options) -> Vec<Phase> {
    let closed = opts
        .publishers
        .iter()
        .map(|&publishers| Phase::Closed { publishers });
    let open = opts.rates.iter().map(|&events_per_s| Phase::Open {
        events_per_s,
        publishers: opts.open_publishers,
    });
    closed.chain(open).collect()
}

pub async fn run(opts: Options) -> anyhow::Result<IngestReport> {
    anyhow::ensure!(
        opts.replicas >= 1 && opts.replicas <= 50,
        "--replicas must be 1..=50"
    );
    let started = Instant::now();
    let (started_unix_s, load_before) = crate::report::run_start();
    // Both sides' clients live in this process; children inherit the limit.
    let both = 2 * opts.connections as u64;
    open_files(both, both, &format!("2 × {} connections", opts.connections))?;
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build of the generator; use --release for numbers worth reading"
        );
    }
    crate::procs::require_fanout(&opts.fanout_bin)?;
    let ports = Ports {
        base: opts.base_port,
    };
    let mut addrs = vec![ports.redis()];
    for durable in [false, true] {
        for i in 0..opts.replicas {
            addrs.push(ports.public(durable, i));
            addrs.push(ports.internal(durable, i));
        }
    }
    ensure_free(&addrs)?;
    let phases = phases(&opts);
    eprintln!(
        "ingest: {} replicas per side, {} clients in {} orgs per side, {} phases of {} s, logs in {}",
        opts.replicas,
        opts.connections,
        opts.orgs,
        phases.len(),
        opts.phase_seconds,
        procs::log_dir().display()
    );

    let redis = start_redis(&opts.redis_server, ports.redis()).await?;
    let db = TestDb::try_create_on(&opts.database_url, "fanout_bench")
        .await
        .context("the run's database (pass --database-url)")?;
    let db_name = db.name().to_string();
    eprintln!("database {db_name} created");
    let postgres = pg::settings(&db).await;
    let mut notes = Vec::new();
    if pg::cpu(&db_name).is_none() {
        notes.push(
            "PostgreSQL CPU is not attributed: no `postgres` process is visible in /proc (the server runs elsewhere)"
                .to_string(),
        );
    }

    let measured = tokio::select! {
        r = measure(&opts, &ports, &db, redis.pid(), phases) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(redis);
    if let Err(e) = db.drop_database().await {
        let msg = format!("could not drop database {db_name}: {e:#}");
        eprintln!("warning: {msg}");
        notes.push(msg);
    }
    let (result, mut failures) = match measured {
        Ok(r) => {
            let problems = r.problems();
            (Some(r), problems)
        }
        Err(e) => (None, vec![format!("{e:#}")]),
    };
    if failures.is_empty() {
        // The children's logs are only worth keeping when something went wrong.
        let _ = std::fs::remove_dir_all(procs::log_dir());
    } else {
        failures.push(format!("server logs: {}", procs::log_dir().display()));
    }
    let (closed_loop, open_loop) = match &result {
        Some(r) => (closed_table(r).cells(), open_table(r).cells()),
        None => (Vec::new(), Vec::new()),
    };
    Ok(IngestReport {
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before,
        options: opts,
        database: Some(db_name),
        postgres,
        result,
        failures,
        notes,
        closed_loop,
        open_loop,
    })
}

/// Starts both fleets, runs the scenario, stops them (they are killed if this is dropped).
async fn measure(
    opts: &Options,
    ports: &Ports,
    db: &TestDb,
    redis_pid: Option<u32>,
    phases: Vec<Phase>,
) -> anyhow::Result<scenario::Report> {
    let secret = format!("loadtest-secret-{}", std::process::id());
    let ingest_key = format!("loadtest-key-{}", std::process::id());
    let mut fleets: Vec<Vec<Proc>> = Vec::new();
    let result: anyhow::Result<scenario::Report> = async {
        for durable in [false, true] {
            let mut procs = Vec::new();
            for i in 0..opts.replicas {
                let mut builder = Replica::builder()
                    .name(&format!("{}-{}", side_name(durable), i + 1))
                    .bin(&opts.fanout_bin)
                    .listen(ports.public(durable, i), ports.internal(durable, i))
                    .logs(Logs::File(procs::log_dir()))
                    .env("JWT_SECRET", &secret)
                    .env("FANOUT_INGEST_KEYS", &ingest_key)
                    .redis_url(&format!("redis://{}", ports.redis()))
                    .env(
                        "FANOUT_REDIS_PREFIX",
                        if durable {
                            "bench-durable:"
                        } else {
                            "bench-ephemeral:"
                        },
                    )
                    .env("FANOUT_SHUTDOWN_TIMEOUT", "5s")
                    .env("RUST_LOG", "warn");
                if durable {
                    builder = builder.database(db);
                }
                let replica = builder.try_start().await?;
                if durable {
                    replica.try_wait_store_up().await?;
                }
                procs.push(replica.into_proc());
            }
            fleets.push(procs);
        }
        let sides = fleets
            .iter()
            .enumerate()
            .map(|(side, procs)| {
                let durable = side == 1;
                Side {
                    name: side_name(durable),
                    durable,
                    servers: Servers {
                        system: System::Socketio,
                        urls: (0..opts.replicas)
                            .map(|i| ports.public(durable, i))
                            .collect(),
                        pids: procs.iter().map(Proc::pid).collect(),
                        secret: secret.clone(),
                        rs256: false,
                    },
                    ingest: (0..opts.replicas)
                        .map(|i| ports.internal(durable, i))
                        .collect(),
                }
            })
            .collect();
        let report = scenario::run(scenario::Params {
            sides,
            ingest_key: ingest_key.clone(),
            phases,
            connections: opts.connections,
            orgs: opts.orgs,
            phase_seconds: opts.phase_seconds,
            payload_bytes: opts.payload_bytes,
            concurrency: opts.concurrency,
            redis_pid,
            pg_database: Some(db.name().to_string()),
        })
        .await?;
        for p in fleets.iter_mut().flatten() {
            if let Some(status) = p.exited() {
                anyhow::bail!("{} died ({status})\n{}", p.name, p.log_tail(20));
            }
        }
        Ok(report)
    }
    .await;
    for p in fleets.into_iter().flatten() {
        p.stop(Duration::from_secs(5)).await;
    }
    result
}

fn side_name(durable: bool) -> &'static str {
    if durable { "durable" } else { "ephemeral" }
}

/// The ephemeral and durable reports of phase `k`.
fn pair(r: &scenario::Report, k: usize) -> (Option<&PhaseReport>, Option<&PhaseReport>) {
    let side = |durable: bool| {
        r.sides
            .iter()
            .find(|s| s.durable == durable)
            .and_then(|s| s.phase(k))
    };
    (side(false), side(true))
}

/// `a → b` with the difference and ratio.
fn versus(a: Option<f64>, b: Option<f64>, decimals: usize) -> String {
    match (a, b) {
        (Some(a), Some(b)) => {
            let ratio = if a > 0.0 {
                format!(", ×{:.1}", b / a)
            } else {
                String::new()
            };
            format!(
                "{} → {} ({:+.*}{ratio})",
                num(Some(a), decimals),
                num(Some(b), decimals),
                decimals,
                b - a
            )
        }
        (a, b) => format!("{} → {}", num(a, decimals), num(b, decimals)),
    }
}

fn commit_cells(d: Option<&PhaseReport>) -> [String; 3] {
    match d.and_then(|d| d.commits.as_ref()) {
        Some(c) => [
            num(Some(c.commits_per_s), 0),
            format!(
                "{} ({} / {})",
                num(c.batch_mean, 1),
                bound(c.batch_p50_at_most, 0),
                bound(c.batch_p99_at_most, 0)
            ),
            format!(
                "{} ({} / {})",
                num(c.commit_ms_mean, 2),
                bound(c.commit_ms_p50_at_most, 1),
                bound(c.commit_ms_p99_at_most, 1)
            ),
        ],
        None => ["-".into(), "-".into(), "-".into()],
    }
}

/// The columns both tables share, ephemeral side `e` against durable side `d`: HTTP and
/// delivery latency, group commit, server and PostgreSQL CPU.
fn compared(e: Option<&PhaseReport>, d: Option<&PhaseReport>) -> [String; 9] {
    let get = |p: Option<&PhaseReport>, f: fn(&PhaseReport) -> Option<f64>| p.and_then(f);
    let [commits, batch, commit_ms] = commit_cells(d);
    [
        versus(get(e, |p| p.http_ms_p50), get(d, |p| p.http_ms_p50), 2),
        versus(get(e, |p| p.http_ms_p99), get(d, |p| p.http_ms_p99), 2),
        versus(
            get(e, |p| p.delivery_ms_p50),
            get(d, |p| p.delivery_ms_p50),
            2,
        ),
        versus(
            get(e, |p| p.delivery_ms_p99),
            get(d, |p| p.delivery_ms_p99),
            2,
        ),
        commits,
        batch,
        commit_ms,
        format!(
            "{} → {}",
            num(get(e, |p| p.server_cpu_us_per_event), 1),
            num(get(d, |p| p.server_cpu_us_per_event), 1)
        ),
        num(get(d, |p| p.pg_cpu_us_per_event), 1),
    ]
}

/// Closed-loop phases: throughput and latency by number of publishers, both sides.
pub fn closed_table(r: &scenario::Report) -> Table {
    let mut t = Table::new([
        "publishers",
        "events/s ephemeral",
        "events/s durable",
        "durable/ephemeral",
        "HTTP p50 ms (eph → dur)",
        "HTTP p99 ms (eph → dur)",
        "delivery p50 ms (eph → dur)",
        "delivery p99 ms (eph → dur)",
        "commits/s",
        "events per commit: mean (p50 / p99 ≤)",
        "commit ms: mean (p50 / p99 ≤)",
        "server µs/event (eph → dur)",
        "PostgreSQL µs/event",
    ]);
    for (k, phase) in r.phases.iter().enumerate() {
        let Phase::Closed { publishers } = *phase else {
            continue;
        };
        let (e, d) = pair(r, k);
        let cells = [
            int(publishers as u64),
            e.map_or("-".into(), |p| int(p.events_per_s.round() as u64)),
            d.map_or("-".into(), |p| int(p.events_per_s.round() as u64)),
            match (e, d) {
                (Some(e), Some(d)) if e.events_per_s > 0.0 => {
                    format!("×{:.2}", d.events_per_s / e.events_per_s)
                }
                _ => "-".into(),
            },
        ]
        .into_iter()
        .chain(compared(e, d));
        t.row(cells);
    }
    t
}

/// Open-loop phases: the latency durable ingest adds at the same rate.
pub fn open_table(r: &scenario::Report) -> Table {
    let mut t = Table::new([
        "target events/s",
        "achieved (eph / dur)",
        "HTTP p50 ms (eph → dur)",
        "HTTP p99 ms (eph → dur)",
        "delivery p50 ms (eph → dur)",
        "delivery p99 ms (eph → dur)",
        "commits/s",
        "events per commit: mean (p50 / p99 ≤)",
        "commit ms: mean (p50 / p99 ≤)",
        "server µs/event (eph → dur)",
        "PostgreSQL µs/event",
    ]);
    for (k, phase) in r.phases.iter().enumerate() {
        let Phase::Open { events_per_s, .. } = *phase else {
            continue;
        };
        let (e, d) = pair(r, k);
        let achieved = |p: Option<&PhaseReport>| {
            p.map_or("-".into(), |p| {
                let pct = format!("{:.0}%", p.achieved_ratio.unwrap_or(0.0) * 100.0);
                if p.overloaded() {
                    format!("{pct} overload")
                } else {
                    pct
                }
            })
        };
        let cells = [
            int(events_per_s),
            format!("{} / {}", achieved(e), achieved(d)),
        ]
        .into_iter()
        .chain(compared(e, d));
        t.row(cells);
    }
    t
}

/// The best closed-loop throughput of a side, with its number of publishers.
fn best(r: &scenario::Report, durable: bool) -> Option<(f64, usize)> {
    r.sides
        .iter()
        .find(|s| s.durable == durable)?
        .phases
        .iter()
        .filter_map(|p| match p.mode {
            Phase::Closed { publishers } if p.problems().is_empty() => {
                Some((p.events_per_s, publishers))
            }
            _ => None,
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// Prints the tables and writes the JSON; returns whether every check passed.
pub fn finish(report: &IngestReport) -> anyhow::Result<bool> {
    if let Some(r) = &report.result {
        for side in &r.sides {
            println!(
                "\n### {} ({} connections in {} orgs, {} B bodies, {} s phases)\n\n{}",
                side.system,
                side.ready,
                r.orgs,
                r.payload_bytes,
                r.phase_seconds,
                scenario::table(side).render()
            );
        }
        println!(
            "\n## Durable vs ephemeral ingest ({} cores shared by replicas, Redis, PostgreSQL and generator; {:.0} s)\n",
            report.cores, report.duration_s
        );
        if !report.postgres.is_empty() {
            let settings: Vec<String> = report
                .postgres
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("PostgreSQL: {}\n", settings.join(", "));
        }
        if r.phases.iter().any(|p| matches!(p, Phase::Closed { .. })) {
            println!(
                "Closed loop (each publisher sends its next event when the previous is answered):\n\n{}",
                closed_table(r).render()
            );
        }
        if r.phases.iter().any(|p| matches!(p, Phase::Open { .. })) {
            println!(
                "Open loop (fixed rates, the same on both sides):\n\n{}",
                open_table(r).render()
            );
        }
        if let (Some((d, dn)), Some((e, en))) = (best(r, true), best(r, false)) {
            println!(
                "highest closed-loop throughput: durable {} events/s ({dn} publishers), ephemeral {} events/s ({en} publishers): ×{:.2}",
                int(d.round() as u64),
                int(e.round() as u64),
                d / e
            );
        }
        for side in &r.sides {
            let events: u64 = side.phases.iter().map(|p| p.events_ok).sum();
            let deliveries: u64 = side.phases.iter().map(|p| p.received).sum();
            let ok = side.problems().is_empty();
            println!(
                "{}: {} events, {} deliveries{}: {}",
                side.system,
                int(events),
                int(deliveries),
                if side.durable {
                    ", each exactly once and in seq order, answered seqs 1..n per org"
                } else {
                    ", each exactly once"
                },
                if ok { "pass" } else { "FAIL" }
            );
        }
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    report::finish(report.options.out.as_deref(), report, &report.failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versus_shows_difference_and_ratio() {
        assert_eq!(versus(Some(1.0), Some(3.5), 2), "1.00 → 3.50 (+2.50, ×3.5)");
        assert_eq!(versus(None, Some(1.0), 1), "- → 1.0");
    }

    #[test]
    fn sides_never_share_ports() {
        let p = Ports { base: 17500 };
        let mut all = vec![p.redis()];
        for d in [false, true] {
            for i in 0..50 {
                all.push(p.public(d, i));
                all.push(p.internal(d, i));
            }
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
