//! `compare`: fanout, the Node peer and the raw baseline, one after the other, on the same
//! machine, ports and workload, summed up in one table.
//!
//! It owns the whole setup so that a comparison is one command and nothing else differs
//! between systems: it starts its own redis-server (never the shared 6379), then for each
//! system starts its processes (`--replicas`, two by default, or the one baseline process), waits for
//! `/readyz`, runs `connect` then `fanout`, and stops them. fanout's `fanout` scenario runs
//! twice, publishing through Redis and through its HTTP ingest; the peer and the baseline
//! publish over HTTP only. The summary's ratio columns use fanout's HTTP run, the same
//! publish path as the systems it is compared with.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use fanout_testkit::process::{Logs, Proc};
use fanout_testkit::{RedisCluster, RedisServer, Replica};
use serde::Serialize;
use tokio::time::Instant;

use crate::client::System;
use crate::net::FD_RESERVE;
use crate::procs;
use crate::publish::Target;
use crate::report::{self, Table, int, num};
use crate::scenario::{Servers, connect, fanout};

/// The systems `compare` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SystemKind {
    /// fanout replicas with Redis (published through Redis and through HTTP).
    Fanout,
    /// fanout replicas on a 3-master Redis Cluster, sharded pub/sub (published with
    /// SPUBLISH at each channel's master, and through HTTP).
    #[serde(rename = "fanout-cluster")]
    FanoutCluster,
    /// fanout replicas with Redis whose tokens are RS256 (JWT_PUBLIC_KEY): the connect
    /// scenario only, to compare an asymmetric connect storm with the HS256 one.
    #[serde(rename = "fanout-rs256")]
    FanoutRs256,
    /// Replicas of the Node socket.io peer with its Redis adapter (HTTP publishing).
    Node,
    /// The raw WebSocket baseline, one process (HTTP publishing).
    Baseline,
}

impl SystemKind {
    fn name(self) -> &'static str {
        match self {
            Self::Fanout => "fanout",
            Self::FanoutCluster => "fanout-cluster",
            Self::FanoutRs256 => "fanout-rs256",
            Self::Node => "node",
            Self::Baseline => "baseline",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub smoke: bool,
    pub systems: Vec<SystemKind>,
    pub connections: usize,
    pub fanout_connections: usize,
    pub orgs: usize,
    pub steps: Vec<u64>,
    pub step_seconds: f64,
    pub payload_bytes: usize,
    pub publishers: usize,
    pub concurrency: usize,
    pub steps_after_overload: usize,
    pub reference_rate: u64,
    pub base_port: u16,
    pub replicas: u16,
    #[serde(skip)]
    pub out: Option<PathBuf>,
    #[serde(skip)]
    pub fanout_bin: PathBuf,
    #[serde(skip)]
    pub node_peer: PathBuf,
    #[serde(skip)]
    pub redis_server: PathBuf,
}

/// One system's results.
#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    pub system: SystemKind,
    pub processes: usize,
    pub connect: Option<connect::Report>,
    pub fanout: Vec<fanout::Report>,
    /// Why the system (or one of its scenarios) could not run.
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CompareReport {
    pub started_unix_s: u64,
    pub duration_s: f64,
    pub cores: usize,
    pub options: Options,
    pub systems: Vec<SystemResult>,
    pub skipped: Vec<String>,
    /// Adjustments made to the requested sizes, with the reason.
    pub notes: Vec<String>,
    pub failures: Vec<String>,
    /// The summary table as rows of cells (first row: headers).
    pub summary: Vec<Vec<String>>,
}

/// Ports scheme: public `base+i`, internal `base+100+i`, Redis `base+200`.
struct Ports {
    base: u16,
}

impl Ports {
    fn public(&self, i: u16) -> SocketAddr {
        loopback(self.base + i)
    }
    fn internal(&self, i: u16) -> SocketAddr {
        loopback(self.base + 100 + i)
    }
    fn redis(&self) -> SocketAddr {
        loopback(self.base + 200)
    }
}

pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

pub(crate) fn ensure_free(addrs: &[SocketAddr]) -> anyhow::Result<()> {
    for a in addrs {
        std::net::TcpListener::bind(a).map_err(|e| {
            anyhow::anyhow!(
                "port {} is not free ({e}); pass another --base-port",
                a.port()
            )
        })?;
    }
    Ok(())
}

/// Runs the comparison; returns the report (whose `failures` decide the exit code).
pub async fn run(mut opts: Options) -> anyhow::Result<CompareReport> {
    let started = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let largest = opts.connections.max(opts.fanout_connections) as u64;
    // Children inherit the limit: each server process must hold its share of connections.
    let limit = fanout_testkit::raise_nofile_limit(largest + FD_RESERVE);
    let notes = fit_open_file_limit(&mut opts, limit);
    for n in &notes {
        eprintln!("note: {n}");
    }
    let ports = Ports {
        base: opts.base_port,
    };
    let secret = format!("loadtest-secret-{started_unix_s}-{}", std::process::id());
    let ingest_key = format!("loadtest-key-{}", std::process::id());
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build of the generator; use --release for numbers worth reading"
        );
    }
    eprintln!(
        "compare: systems {:?}, connect {} connections, fanout {} connections in {} orgs, steps {:?} of {} s, open-file limit {limit}, logs in {}",
        opts.systems.iter().map(|s| s.name()).collect::<Vec<_>>(),
        opts.connections,
        opts.fanout_connections,
        opts.orgs,
        opts.steps,
        opts.step_seconds,
        procs::log_dir().display()
    );

    let mut skipped = Vec::new();
    let mut systems = opts.systems.clone();
    if systems.contains(&SystemKind::Node) && !node_installed().await {
        let msg = "node: `node` is not installed; the Node peer is skipped (install Node.js >= 20 to include it)".to_string();
        eprintln!("{msg}");
        skipped.push(msg);
        systems.retain(|s| *s != SystemKind::Node);
    }

    let needs_redis = systems.iter().any(|s| {
        matches!(
            s,
            SystemKind::Fanout | SystemKind::FanoutRs256 | SystemKind::Node
        )
    });
    let mut redis = None;
    let mut failures = Vec::new();
    if needs_redis {
        match start_redis(&opts.redis_server, ports.redis()).await {
            Ok(r) => redis = Some(r),
            Err(e) => failures.push(format!("redis-server: {e:#}")),
        }
    }

    let mut cluster = None;
    if systems.contains(&SystemKind::FanoutCluster) {
        match start_cluster().await {
            Ok(c) => cluster = Some(c),
            Err(e) => failures.push(format!("redis cluster: {e:#}")),
        }
    }

    let mut results = Vec::new();
    for &kind in &systems {
        if needs_redis && redis.is_none() {
            break;
        }
        if kind == SystemKind::FanoutCluster && cluster.is_none() {
            continue;
        }
        eprintln!("\n== {} ==", kind.name());
        let ctx = Ctx {
            opts: &opts,
            ports: &ports,
            secret: &secret,
            ingest_key: &ingest_key,
            redis_pids: match (kind, &cluster) {
                (SystemKind::Baseline, _) => Vec::new(),
                (SystemKind::FanoutCluster, Some(c)) => c.pids.clone(),
                _ => redis
                    .as_ref()
                    .and_then(RedisServer::pid)
                    .into_iter()
                    .collect(),
            },
            cluster: cluster.as_ref(),
        };
        let result = run_system(kind, &ctx).await;
        for e in &result.errors {
            failures.push(format!("{}: {e}", kind.name()));
        }
        if let Some(c) = &result.connect {
            for p in c.problems() {
                failures.push(format!("{} connect: {p}", kind.name()));
            }
        }
        for f in &result.fanout {
            for p in f.problems() {
                failures.push(format!("{} fanout via {}: {p}", kind.name(), f.publish_via));
            }
        }
        results.push(result);
    }
    drop(redis);
    drop(cluster);

    if failures.is_empty() {
        // The children's logs are only worth keeping when something went wrong.
        let _ = std::fs::remove_dir_all(procs::log_dir());
    }
    let summary = summary_table(&results, opts.reference_rate);
    Ok(CompareReport {
        started_unix_s,
        duration_s: started.elapsed().as_secs_f64(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        options: opts,
        systems: results,
        skipped,
        notes,
        failures,
        summary: summary.cells(),
    })
}

/// Caps the sizes to what every process can hold when the open-file limit is lower than
/// the run needs (it cannot be raised without `CAP_SYS_RESOURCE`), so that all systems are
/// measured at the same size. Returns what was changed, and why.
fn fit_open_file_limit(opts: &mut Options, limit: u64) -> Vec<String> {
    let per_process = limit.saturating_sub(FD_RESERVE) as usize;
    let fewest = opts
        .systems
        .iter()
        .map(|s| match s {
            SystemKind::Baseline => 1,
            _ => opts.replicas as usize,
        })
        .min()
        .unwrap_or(1);
    let mut notes = Vec::new();
    let connect_max = per_process * fewest;
    if opts.connections > connect_max {
        notes.push(format!(
            "connect scenario capped at {connect_max} connections (not {}): the open-file limit \
             is {limit} and cannot be raised here, and a system runs as {fewest} process(es)",
            opts.connections
        ));
        opts.connections = connect_max;
    }
    // The fanout scenario's clients live in one generator process.
    let fanout_max = per_process.min(connect_max);
    if opts.fanout_connections > fanout_max {
        notes.push(format!(
            "fanout scenario capped at {fanout_max} connections (not {}): open-file limit {limit}",
            opts.fanout_connections
        ));
        opts.fanout_connections = fanout_max;
    }
    notes
}

struct Ctx<'a> {
    opts: &'a Options,
    ports: &'a Ports,
    secret: &'a str,
    ingest_key: &'a str,
    /// The Redis processes of this system (one, or the cluster's masters).
    redis_pids: Vec<u32>,
    cluster: Option<&'a Cluster>,
}

/// A 3-master Redis Cluster, with what the scenarios need of it.
struct Cluster {
    cluster: RedisCluster,
    /// The masters' processes, in the order of `ranges`'s masters.
    pids: Vec<u32>,
    /// Slot ranges and their masters.
    ranges: Vec<(u16, u16, SocketAddr)>,
}

/// Starts a private 3-master Redis Cluster (no replicas) on free ports.
async fn start_cluster() -> anyhow::Result<Cluster> {
    // The harness panics on failure, as the tests want; here that is an error to report.
    let cluster = tokio::spawn(RedisCluster::start(3, 0))
        .await
        .map_err(|e| anyhow::anyhow!("could not start: {e}"))?;
    let masters = cluster.masters().await;
    let mut conn = cluster.node_conn(masters[0]).await;
    let slots: Vec<(u16, u16, Vec<redis::Value>)> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async::<Vec<Vec<redis::Value>>>(&mut conn)
        .await?
        .into_iter()
        .map(|mut range| {
            let master = match range.get(2) {
                Some(redis::Value::Array(m)) => m.clone(),
                _ => Vec::new(),
            };
            let int = |v: &redis::Value| match v {
                redis::Value::Int(i) => *i as u16,
                _ => 0,
            };
            let (first, last) = (int(&range[0]), int(&range[1]));
            range.clear();
            (first, last, master)
        })
        .collect();
    let mut ranges = Vec::new();
    let mut pids = Vec::new();
    let mut seen = Vec::new();
    for (first, last, master) in slots {
        let Some(redis::Value::Int(port)) = master.get(1) else {
            anyhow::bail!("CLUSTER SLOTS: a master without a port: {master:?}");
        };
        let port = *port as u16;
        ranges.push((first, last, loopback(port)));
        if !seen.contains(&port) {
            seen.push(port);
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut cluster.node_conn(port).await)
                .await?;
            let pid = info
                .lines()
                .find_map(|l| l.trim().strip_prefix("process_id:"))
                .and_then(|p| p.parse().ok())
                .context("INFO server has no process_id")?;
            pids.push(pid);
        }
    }
    eprintln!("redis cluster: masters {seen:?}, processes {pids:?}");
    Ok(Cluster {
        cluster,
        pids,
        ranges,
    })
}

/// Starts a private redis-server on `addr` (loopback, no persistence) and waits until it
/// answers.
pub(crate) async fn start_redis(program: &Path, addr: SocketAddr) -> anyhow::Result<RedisServer> {
    ensure_free(&[addr])?;
    RedisServer::try_start_on(program, addr.port(), Logs::File(procs::log_dir()))
        .await
        .context("pass --redis-server PATH if redis-server is not on PATH")
}

async fn node_installed() -> bool {
    tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

/// Starts `kind`, runs both scenarios against it, stops it. Never fails: what went wrong is
/// in `errors`.
async fn run_system(kind: SystemKind, ctx: &Ctx<'_>) -> SystemResult {
    let mut result = SystemResult {
        system: kind,
        processes: 0,
        connect: None,
        fanout: Vec::new(),
        errors: Vec::new(),
    };
    let mut procs = Vec::new();
    match start_system(kind, ctx, &mut procs).await {
        Ok(()) => {
            result.processes = procs.len();
            if let Err(e) = run_scenarios(kind, ctx, &mut procs, &mut result).await {
                result.errors.push(format!("{e:#}"));
            }
        }
        Err(e) => result.errors.push(format!("did not start: {e:#}")),
    }
    for p in procs {
        p.stop(Duration::from_secs(5)).await;
    }
    result
}

async fn start_system(
    kind: SystemKind,
    ctx: &Ctx<'_>,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<()> {
    let (opts, ports) = (ctx.opts, ctx.ports);
    let exe = std::env::current_exe()
        .context("cannot find the generator's own executable to run the baseline")?;
    let replicas: u16 = if kind == SystemKind::Baseline {
        1
    } else {
        opts.replicas
    };
    let mut addrs = Vec::new();
    for i in 0..replicas {
        addrs.push(ports.public(i));
        addrs.push(ports.internal(i));
    }
    ensure_free(&addrs)?;
    let redis_url = format!("redis://{}", ports.redis());
    let logs = Logs::File(procs::log_dir());
    for i in 0..replicas {
        let (public, internal) = (ports.public(i), ports.internal(i));
        let (name, command) = match kind {
            SystemKind::Fanout | SystemKind::FanoutCluster | SystemKind::FanoutRs256 => {
                crate::procs::require_fanout(&opts.fanout_bin)?;
                let builder = Replica::builder()
                    .name(&format!("{}-{}", kind.name(), i + 1))
                    .bin(&opts.fanout_bin)
                    .listen(public, internal)
                    .logs(logs.clone())
                    .env("FANOUT_INGEST_KEYS", ctx.ingest_key)
                    .env("FANOUT_SHUTDOWN_TIMEOUT", "5s")
                    .env("RUST_LOG", "warn");
                let builder = if kind == SystemKind::FanoutRs256 {
                    builder
                        .unset("JWT_SECRET")
                        .env("JWT_PUBLIC_KEY", fanout_testkit::token::RSA_PUBLIC_KEY)
                } else {
                    builder.env("JWT_SECRET", ctx.secret)
                };
                let builder = match ctx.cluster.filter(|_| kind == SystemKind::FanoutCluster) {
                    Some(c) => builder.redis_cluster(&c.cluster),
                    None => builder.redis_url(&redis_url),
                };
                let replica = builder.try_start().await?;
                procs.push(replica.into_proc());
                continue;
            }
            SystemKind::Node => {
                let dir = &opts.node_peer;
                if !dir.join("server.js").is_file() {
                    anyhow::bail!(
                        "no Node peer at {} (expected server.js); pass --node-peer DIR",
                        dir.display()
                    );
                }
                if !dir.join("node_modules").is_dir() {
                    anyhow::bail!(
                        "the Node peer's packages are not installed: run `npm ci` in {}",
                        dir.display()
                    );
                }
                let mut command = Command::new("node");
                command.arg("server.js").current_dir(dir).envs([
                    ("PORT", public.port().to_string()),
                    ("INTERNAL_PORT", internal.port().to_string()),
                    ("JWT_SECRET", ctx.secret.to_string()),
                    ("INGEST_KEYS", ctx.ingest_key.to_string()),
                    ("REDIS_URL", redis_url.clone()),
                    ("NODE_ENV", "production".into()),
                ]);
                (format!("node-{}", i + 1), command)
            }
            SystemKind::Baseline => {
                let mut command = Command::new(&exe);
                command.arg("baseline");
                command.args(["--listen".into(), public.to_string()]);
                command.args(["--internal-listen".into(), internal.to_string()]);
                command.args(["--ingest-key", ctx.ingest_key]);
                ("baseline".to_string(), command)
            }
        };
        let mut proc = Proc::spawn(&name, command, logs.clone())?;
        let ready = proc
            .wait_http(
                &format!("http://{internal}/readyz"),
                200,
                Duration::from_secs(30),
            )
            .await;
        procs.push(proc);
        ready?;
    }
    Ok(())
}

async fn run_scenarios(
    kind: SystemKind,
    ctx: &Ctx<'_>,
    procs: &mut [Proc],
    result: &mut SystemResult,
) -> anyhow::Result<()> {
    let opts = ctx.opts;
    let servers = Servers {
        system: if kind == SystemKind::Baseline {
            System::Raw
        } else {
            System::Socketio
        },
        urls: (0..procs.len() as u16)
            .map(|i| ctx.ports.public(i))
            .collect(),
        pids: procs.iter().map(Proc::pid).collect(),
        secret: ctx.secret.to_string(),
        rs256: kind == SystemKind::FanoutRs256,
    };
    eprintln!("connect: {} connections", opts.connections);
    let c = connect::run(connect::Params {
        servers: servers.clone(),
        connections: opts.connections,
        orgs: opts.orgs,
        concurrency: opts.concurrency,
    })
    .await?;
    eprint!(
        "{}",
        connect::table(&[(kind.name().to_string(), &c)]).render()
    );
    result.connect = Some(c);
    alive(procs)?;
    procs::wait_idle(&servers.pids, Duration::from_secs(15)).await;

    let http = Target::Http {
        urls: (0..procs.len() as u16)
            .map(|i| ctx.ports.internal(i))
            .collect(),
        key: ctx.ingest_key.to_string(),
    };
    let targets = match kind {
        // The RS256 system differs only at connect.
        SystemKind::FanoutRs256 => vec![],
        SystemKind::Fanout => vec![Target::Redis(ctx.ports.redis()), http],
        SystemKind::FanoutCluster => vec![
            Target::Cluster(ctx.cluster.map(|c| c.ranges.clone()).unwrap_or_default()),
            http,
        ],
        _ => vec![http],
    };
    for target in targets {
        eprintln!(
            "fanout via {}: {} connections in {} orgs",
            target.describe(),
            opts.fanout_connections,
            opts.orgs
        );
        let f = fanout::run(fanout::Params {
            servers: servers.clone(),
            publish: target,
            redis_pids: ctx.redis_pids.clone(),
            connections: opts.fanout_connections,
            orgs: opts.orgs,
            steps: opts.steps.clone(),
            step_seconds: opts.step_seconds,
            payload_bytes: opts.payload_bytes,
            publishers: opts.publishers,
            concurrency: opts.concurrency,
            steps_after_overload: opts.steps_after_overload,
        })
        .await?;
        println!(
            "\n### {} — fanout via {} ({} connections, {} orgs, {} B payload)\n\n{}",
            kind.name(),
            f.publish_via,
            f.ready,
            f.orgs,
            f.payload_bytes,
            fanout::table(&f).render()
        );
        if let Some(spread) = fanout::spread_table(&f) {
            println!("\nRedis CPU by master:\n\n{}", spread.render());
        }
        result.fanout.push(f);
        alive(procs)?;
        procs::wait_idle(&servers.pids, Duration::from_secs(15)).await;
    }
    Ok(())
}

/// Fails if a server process died during a scenario.
fn alive(procs: &mut [Proc]) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        if let Some(status) = p.exited() {
            anyhow::bail!("{} died ({status})\n{}", p.name, p.log_tail(20));
        }
    }
    Ok(())
}

/// A summary column: one system and publish path.
struct Column<'a> {
    name: String,
    connect: Option<&'a connect::Report>,
    fanout: Option<&'a fanout::Report>,
}

/// The one table: metrics as rows, systems as columns, then fanout/node and
/// fanout/baseline ratios (from fanout's HTTP column).
pub fn summary_table(results: &[SystemResult], reference: u64) -> Table {
    let mut cols: Vec<Column> = Vec::new();
    for r in results {
        if r.fanout.is_empty() {
            cols.push(Column {
                name: format!("{} (-)", r.system.name()),
                connect: r.connect.as_ref(),
                fanout: None,
            });
        }
        for f in &r.fanout {
            cols.push(Column {
                name: format!("{} ({})", r.system.name(), f.publish_via),
                connect: r.connect.as_ref(),
                fanout: Some(f),
            });
        }
    }
    let find = |name: &str| cols.iter().position(|c| c.name == name);
    let fanout_col = find("fanout (HTTP)");
    let ratio_cols: Vec<(String, Option<usize>)> = vec![
        ("fanout/node".into(), find("node (HTTP)")),
        ("fanout/baseline".into(), find("baseline (HTTP)")),
    ];

    type Metric<'m> = Box<dyn Fn(&Column) -> Option<f64> + 'm>;
    let rows: Vec<(String, usize, Metric)> = vec![
        (
            "connect: connections/s".into(),
            0,
            Box::new(|c: &Column| c.connect.map(|r| r.connections_per_s)),
        ),
        (
            "connect: ready latency p50 (ms)".into(),
            1,
            Box::new(|c: &Column| c.connect.and_then(|r| r.ready_ms_p50)),
        ),
        (
            "connect: ready latency p99 (ms)".into(),
            1,
            Box::new(|c: &Column| c.connect.and_then(|r| r.ready_ms_p99)),
        ),
        (
            "connect: server RSS per connection (KiB)".into(),
            1,
            Box::new(|c: &Column| c.connect.and_then(|r| r.server_kib_per_connection)),
        ),
        (
            "fanout: highest sustainable deliveries/s (step target)".into(),
            0,
            Box::new(|c: &Column| {
                c.fanout
                    .and_then(|f| f.highest_sustainable_deliveries_per_s)
                    .map(|v| v as f64)
            }),
        ),
        (
            "fanout: measured deliveries/s at that step".into(),
            0,
            Box::new(|c: &Column| c.fanout.and_then(|f| f.highest_sustainable_measured_per_s)),
        ),
        (
            format!(
                "fanout: p99 latency at {} deliveries/s (ms)",
                int(reference)
            ),
            2,
            Box::new(move |c: &Column| at_rate(c, reference).and_then(|s| s.latency_ms_p99)),
        ),
        (
            format!("fanout: server CPU µs per delivery at {}/s", int(reference)),
            2,
            Box::new(move |c: &Column| {
                at_rate(c, reference).and_then(|s| s.server_cpu_us_per_delivery)
            }),
        ),
        (
            format!("fanout: Redis CPU µs per delivery at {}/s", int(reference)),
            2,
            Box::new(move |c: &Column| {
                at_rate(c, reference).and_then(|s| s.redis_cpu_us_per_delivery)
            }),
        ),
        (
            format!(
                "fanout: generator CPU µs per delivery at {}/s",
                int(reference)
            ),
            2,
            Box::new(move |c: &Column| {
                at_rate(c, reference).and_then(|s| s.generator_cpu_us_per_delivery)
            }),
        ),
    ];

    let mut headers = vec!["metric".to_string()];
    headers.extend(cols.iter().map(|c| c.name.clone()));
    headers.extend(ratio_cols.iter().map(|(n, _)| n.clone()));
    let mut t = Table::new(headers);
    for (label, decimals, metric) in &rows {
        let mut cells = vec![label.clone()];
        for c in &cols {
            let v = metric(c);
            let mut cell = match (v, *decimals) {
                (Some(v), 0) => int(v.round() as u64),
                (v, d) => num(v, d),
            };
            // Say so when the nearest step is not the reference rate.
            if label.contains(&format!(" at {}", int(reference)))
                && let Some(s) = at_rate(c, reference)
                && s.target_deliveries_per_s != reference
                && v.is_some()
            {
                cell.push_str(&format!(" (@{})", int(s.target_deliveries_per_s)));
            }
            cells.push(cell);
        }
        for (_, other) in &ratio_cols {
            let ratio = match (fanout_col, other) {
                (Some(a), Some(b)) => match (metric(&cols[a]), metric(&cols[*b])) {
                    (Some(x), Some(y)) if y != 0.0 => Some(x / y),
                    _ => None,
                },
                _ => None,
            };
            cells.push(ratio.map_or("-".into(), |r| format!("×{r:.2}")));
        }
        t.row(cells);
    }
    let mut checks = vec!["checks (isolation, loss, connections)".to_string()];
    for c in &cols {
        // A connect-only column (fanout-rs256) has no fanout to check.
        let ok = c.connect.is_some_and(|r| r.passed())
            && c.fanout.is_none_or(|f| f.problems().is_empty());
        checks.push(if ok { "pass" } else { "FAIL" }.into());
    }
    checks.extend(ratio_cols.iter().map(|_| String::new()));
    t.row(checks);
    t
}

fn at_rate<'a>(c: &Column<'a>, rate: u64) -> Option<&'a fanout::StepReport> {
    c.fanout.and_then(|f| f.at_rate(rate))
}

/// Prints the final tables and writes the JSON; returns whether every check passed.
pub fn finish(report: &CompareReport) -> anyhow::Result<bool> {
    let connects: Vec<(String, &connect::Report)> = report
        .systems
        .iter()
        .filter_map(|s| s.connect.as_ref().map(|c| (s.system.name().to_string(), c)))
        .collect();
    if !connects.is_empty() {
        println!(
            "\n### connect ({} connections)\n\n{}",
            int(report.options.connections as u64),
            connect::table(&connects).render()
        );
    }
    let summary = summary_table(&report.systems, report.options.reference_rate);
    println!(
        "\n## Summary ({} cores shared by servers, Redis and generator; {:.0} s)\n\n{}",
        report.cores,
        report.duration_s,
        summary.render()
    );
    println!(
        "Ratios use fanout's HTTP column. Server CPU is the sum over the system's processes (Redis \
         shown apart); the baseline is one process without Redis, so the fleet dimension does not \
         apply to it."
    );
    for s in &report.skipped {
        println!("skipped: {s}");
    }
    report::finish(report.options.out.as_deref(), report, &report.failures)
}
