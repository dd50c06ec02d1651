//! `connect`: how fast the servers authenticate connections, and what each one costs them.
//!
//! N connections are opened as fast as the servers accept them, with a bounded number of
//! handshakes in flight (`--concurrency`, so that the listen backlog never overflows and a
//! dropped SYN does not add a one-second retransmit to the latency). Each connection's
//! latency runs from its TCP connect to the server's "ready" (`auth-success`). The kernel's
//! listen-queue overflows are reported too: each one is a SYN dropped and retried a second
//! later, which shows up as a 1 s latency outlier. The servers' memory per connection is the
//! growth of their RSS (sum over the server processes) from before the first connection to
//! after the last, once they are idle again.
//!
//! One process holds as many connections as its open-file limit allows. When that limit
//! cannot be raised far enough (no `CAP_SYS_RESOURCE`), the connections are split into
//! shards, each run by a child generator process (`connect-shard`) that opens its share,
//! reports, holds its connections until told to close them, and reports again. Shards use
//! the same layout (organization, server and source address per connection index) and share
//! the handshake concurrency, so the load is the same as from one process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

use super::{Fleet, Layout, Servers, ms, open_fleet, quantile};
use crate::message::now_us;
use crate::net::FD_RESERVE;
use crate::procs;
use crate::report::{Table, int, num};

pub struct Params {
    pub servers: Servers,
    pub connections: usize,
    pub orgs: usize,
    pub concurrency: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub connections: usize,
    pub ready: usize,
    pub failed: usize,
    /// The most frequent failures, with counts.
    pub errors: Vec<(String, usize)>,
    /// `auth-success` naming another organization than the token's.
    pub isolation_failures: usize,
    /// Ready connections the servers closed while idle.
    pub dropped_while_idle: u64,
    /// SYNs the kernel dropped because a listen queue was full (machine-wide, during the run).
    pub listen_overflows: Option<u64>,
    /// Generator processes the connections were spread over.
    pub generator_processes: usize,
    pub source_addresses: usize,
    pub concurrency: usize,
    pub duration_s: f64,
    pub connections_per_s: f64,
    pub ready_ms_p50: Option<f64>,
    pub ready_ms_p99: Option<f64>,
    pub ready_ms_max: Option<f64>,
    pub server_rss_kib_before: u64,
    pub server_rss_kib_after: u64,
    pub server_kib_per_connection: Option<f64>,
    pub server_cpu_us_per_connection: Option<f64>,
    pub generator_kib_per_connection: Option<f64>,
}

impl Report {
    /// Whether every connection became ready in its own organization and stayed open.
    pub fn passed(&self) -> bool {
        self.problems().is_empty()
    }

    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.isolation_failures > 0 {
            out.push(format!(
                "isolation: {} auth-success for another organization",
                self.isolation_failures
            ));
        }
        if self.failed > 0 {
            out.push(format!(
                "{} of {} connections failed: {:?}",
                self.failed, self.connections, self.errors
            ));
        }
        if self.dropped_while_idle > 0 {
            out.push(format!(
                "{} ready connections were closed by the servers while idle",
                self.dropped_while_idle
            ));
        }
        out
    }
}

/// What one shard (one generator process) reports once its connections are ready.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardReady {
    /// Wall-clock µs of the shard's first connect and last ready.
    started_us: u64,
    last_ready_us: u64,
    latencies_us: Vec<u64>,
    failed: usize,
    errors: Vec<(String, usize)>,
    wrong_org: usize,
    rss_growth_kib: i64,
}

/// What one shard reports when told to close.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShardDone {
    dropped_while_idle: u64,
}

/// A shard run in this process.
struct LocalShard {
    fleet: Fleet,
    dropped: Arc<AtomicU64>,
}

impl LocalShard {
    async fn open(
        servers: &Servers,
        layout: Arc<Layout>,
        range: std::ops::Range<usize>,
        concurrency: usize,
    ) -> (Self, ShardReady) {
        let rss_before = procs::rss_kib(None).unwrap_or(0) as i64;
        let started_us = now_us();
        let dropped = Arc::new(AtomicU64::new(0));
        let fleet = open_fleet(servers, layout, range, concurrency, {
            let dropped = dropped.clone();
            move |_, conn| {
                let dropped = dropped.clone();
                async move {
                    conn.run(|_, _| {}).await;
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .await;
        let ready = ShardReady {
            started_us,
            last_ready_us: started_us + fleet.elapsed.as_micros() as u64,
            latencies_us: fleet
                .ready
                .iter()
                .map(|(_, d)| d.as_micros() as u64)
                .collect(),
            failed: fleet.failed,
            errors: fleet.errors.clone(),
            wrong_org: fleet.wrong_org,
            rss_growth_kib: procs::rss_kib(None).unwrap_or(0) as i64 - rss_before,
        };
        (Self { fleet, dropped }, ready)
    }

    fn close(self) -> ShardDone {
        let done = ShardDone {
            dropped_while_idle: self.dropped.load(Ordering::Relaxed),
        };
        self.fleet.close();
        done
    }
}

/// A shard run by a child generator process.
struct ChildShard {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl ChildShard {
    fn spawn(
        p: &Params,
        range: std::ops::Range<usize>,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the generator's executable")?;
        let urls: Vec<String> = p.servers.urls.iter().map(|u| u.to_string()).collect();
        let mut child = tokio::process::Command::new(exe)
            .arg("connect-shard")
            .args(["--system", p.servers.system.name()])
            .args(["--url", &urls.join(",")])
            .args(["--orgs", &p.orgs.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--total", &p.connections.to_string()])
            .args(["--first", &range.start.to_string()])
            .args(["--count", &range.len().to_string()])
            .args(p.servers.rs256.then_some("--rs256"))
            .env("JWT_SECRET", &p.servers.secret)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a connect-shard generator process")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    async fn read<T: for<'de> Deserialize<'de>>(&mut self) -> anyhow::Result<T> {
        let line = self
            .stdout
            .next_line()
            .await?
            .context("a connect-shard process exited early (its errors are above)")?;
        serde_json::from_str(&line).with_context(|| format!("unreadable shard report {line:?}"))
    }

    async fn close(mut self) -> anyhow::Result<ShardDone> {
        self.stdin.write_all(b"close\n").await?;
        self.stdin.flush().await?;
        let done = self.read().await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(done)
    }
}

/// Splits `n` connections into shards of at most `capacity`, as evenly as possible.
fn plan(n: usize, capacity: usize) -> Vec<std::ops::Range<usize>> {
    let shards = n.div_ceil(capacity.max(1)).max(1);
    let base = n / shards;
    let extra = n % shards;
    let mut out = Vec::with_capacity(shards);
    let mut start = 0;
    for s in 0..shards {
        let len = base + usize::from(s < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

pub async fn run(p: Params) -> anyhow::Result<Report> {
    let limit = fanout_testkit::raise_nofile_limit(p.connections as u64 + FD_RESERVE);
    let capacity = limit.saturating_sub(FD_RESERVE).max(1) as usize;
    let shards = plan(p.connections, capacity);
    if shards.len() > 1 {
        eprintln!(
            "  open-file limit {limit}: {} connections spread over {} generator processes",
            p.connections,
            shards.len()
        );
    }
    let pids = p.servers.pids.clone();
    procs::wait_idle(&pids, Duration::from_secs(10)).await;
    let rss_before = procs::rss_kib_sum(&pids);
    let cpu_before = procs::cpu_seconds_sum(&pids);
    let overflows_before = procs::listen_overflows();
    let layout = Arc::new(Layout::new(p.connections, p.orgs, p.servers.urls.clone()));

    let mut local = None;
    let mut children = Vec::new();
    let mut readies = Vec::new();
    if shards.len() == 1 {
        let (shard, ready) =
            LocalShard::open(&p.servers, layout.clone(), 0..p.connections, p.concurrency).await;
        local = Some(shard);
        readies.push(ready);
    } else {
        let per_shard = p.concurrency.div_ceil(shards.len());
        for range in &shards {
            children.push(ChildShard::spawn(&p, range.clone(), per_shard)?);
        }
        for c in &mut children {
            readies.push(c.read::<ShardReady>().await?);
        }
    }

    // Let the servers finish what the connections started before reading their memory.
    procs::wait_idle(&pids, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = procs::rss_kib_sum(&pids);
    let cpu = procs::cpu_seconds_sum(&pids) - cpu_before;
    let listen_overflows = procs::listen_overflows()
        .zip(overflows_before)
        .map(|(after, before)| after.saturating_sub(before));
    let mut dropped_while_idle = 0;
    if let Some(shard) = local {
        dropped_while_idle += shard.close().dropped_while_idle;
    }
    for c in children {
        dropped_while_idle += c.close().await?.dropped_while_idle;
    }

    let mut latencies: Vec<Duration> = readies
        .iter()
        .flat_map(|r| r.latencies_us.iter().map(|us| Duration::from_micros(*us)))
        .collect();
    latencies.sort_unstable();
    let ready = latencies.len();
    let failed = readies.iter().map(|r| r.failed).sum();
    let mut errors: Vec<(String, usize)> = Vec::new();
    for (e, n) in readies.iter().flat_map(|r| r.errors.iter()) {
        match errors.iter_mut().find(|(k, _)| k == e) {
            Some((_, m)) => *m += n,
            None => errors.push((e.clone(), *n)),
        }
    }
    errors.sort_by_key(|e| std::cmp::Reverse(e.1));
    errors.truncate(5);
    let first = readies.iter().map(|r| r.started_us).min().unwrap_or(0);
    let last = readies.iter().map(|r| r.last_ready_us).max().unwrap_or(0);
    let secs = last.saturating_sub(first) as f64 / 1e6;
    let generator_growth: i64 = readies.iter().map(|r| r.rss_growth_kib).sum();
    let per_conn = |x: f64| (ready > 0).then(|| x / ready as f64);
    Ok(Report {
        connections: p.connections,
        ready,
        failed,
        errors,
        isolation_failures: readies.iter().map(|r| r.wrong_org).sum(),
        dropped_while_idle,
        listen_overflows,
        generator_processes: shards.len(),
        source_addresses: layout.sources.len(),
        concurrency: p.concurrency,
        duration_s: secs,
        connections_per_s: if secs > 0.0 { ready as f64 / secs } else { 0.0 },
        ready_ms_p50: ms(quantile(&latencies, 0.5)),
        ready_ms_p99: ms(quantile(&latencies, 0.99)),
        ready_ms_max: ms(latencies.last().copied()),
        server_rss_kib_before: rss_before,
        server_rss_kib_after: rss_after,
        server_kib_per_connection: per_conn(rss_after as f64 - rss_before as f64),
        server_cpu_us_per_connection: per_conn(cpu * 1e6),
        generator_kib_per_connection: per_conn(generator_growth as f64),
    })
}

/// The child side of a shard: opens connections `first..first + count` of a `total`-sized
/// layout, prints a [`ShardReady`] line, holds the connections until a line (or EOF) on
/// stdin, then prints a [`ShardDone`] line.
pub async fn run_shard(
    servers: Servers,
    orgs: usize,
    concurrency: usize,
    total: usize,
    first: usize,
    count: usize,
) -> anyhow::Result<()> {
    crate::net::open_files(
        count as u64,
        count as u64,
        &format!("a shard of {count} connections"),
    )?;
    let layout = Arc::new(Layout::new(total, orgs, servers.urls.clone()));
    let (shard, ready) =
        LocalShard::open(&servers, layout, first..first + count, concurrency).await;
    println!("{}", serde_json::to_string(&ready)?);
    let mut line = String::new();
    let _ = BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await;
    println!("{}", serde_json::to_string(&shard.close())?);
    Ok(())
}

/// One row per system.
pub fn table(rows: &[(String, &Report)]) -> Table {
    let mut t = Table::new([
        "system",
        "ready/total",
        "time s",
        "conn/s",
        "ready p50 ms",
        "ready p99 ms",
        "ready max ms",
        "server RSS MiB before→after",
        "server KiB/conn",
        "server CPU µs/conn",
        "generator KiB/conn",
        "listen overflows",
    ]);
    for (name, r) in rows {
        t.row([
            name.clone(),
            format!("{}/{}", int(r.ready as u64), int(r.connections as u64)),
            num(Some(r.duration_s), 2),
            int(r.connections_per_s.round() as u64),
            num(r.ready_ms_p50, 1),
            num(r.ready_ms_p99, 1),
            num(r.ready_ms_max, 1),
            format!(
                "{:.0}→{:.0}",
                r.server_rss_kib_before as f64 / 1024.0,
                r.server_rss_kib_after as f64 / 1024.0
            ),
            num(r.server_kib_per_connection, 1),
            num(r.server_cpu_us_per_connection, 0),
            num(r.generator_kib_per_connection, 1),
            r.listen_overflows.map_or("-".into(), int),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_connection_once() {
        assert_eq!(plan(300, 19_500), vec![0..300]);
        let p = plan(50_000, 19_500);
        assert_eq!(p.len(), 3);
        assert_eq!(p.iter().map(|r| r.len()).sum::<usize>(), 50_000);
        assert!(p.iter().all(|r| r.len() <= 19_500));
        assert!(p.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(plan(0, 10), vec![0..0]);
    }
}
