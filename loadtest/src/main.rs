//! `fanout-loadtest`: the load generator and side-by-side benchmark of fanout.
//!
//! This file only parses arguments and calls the modules; see each module's documentation
//! for how a measurement is made. Exit codes: 0 when every check passed, 1 when an isolation,
//! loss or connection check failed (or a system did not start), 2 for bad arguments or a
//! run that could not take place.

mod baseline;
mod chaos;
mod client;
mod compare;
mod hostile;
mod http;
mod ingest;
mod message;
mod net;
mod pg;
mod procs;
mod publish;
mod report;
mod scenario;
mod soak;
mod storm;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::System;
use crate::compare::SystemKind;
use crate::scenario::{Servers, connect, fanout};

/// Full-size default steps, in deliveries per second.
const DEFAULT_STEPS: &str = "10000,20000,40000,80000,120000,160000,240000";
const SMOKE_STEPS: &str = "1500,3000";
/// `ingest` closed-loop publishers and open-loop rates (events/s), full size and smoke.
const INGEST_PUBLISHERS: &str = "1,8,32,128";
const INGEST_RATES: &str = "250,1000,2500,5000";
const SMOKE_INGEST_PUBLISHERS: &str = "1,8";
const SMOKE_INGEST_RATES: &str = "200";

#[derive(Parser)]
#[command(
    name = "fanout-loadtest",
    version,
    about = "Load generator and side-by-side benchmark of fanout, the Node socket.io peer and a raw WebSocket baseline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N connections as fast as the servers accept them: connections/s, handshake-to-ready
    /// latency, server memory per connection.
    Connect(ConnectArgs),
    /// Fan messages out at stepped rates: deliveries/s, latency, loss, server CPU per delivery.
    Fanout(FanoutArgs),
    /// Run the raw WebSocket broadcast baseline server.
    Baseline(BaselineArgs),
    /// Start Redis and each system in turn, run `connect` and `fanout` against each, and print
    /// one comparison table.
    Compare(CompareArgs),
    /// Durable ingest (DATABASE_URL: commit, then publish) against ephemeral ingest, side by
    /// side: events/s by number of publishers, the HTTP and delivery latency it adds at the
    /// same rate, group-commit batches, exactness. Starts its own Redis, fanout replicas and
    /// database.
    Ingest(IngestArgs),
    /// What hostile clients can make a replica spend: oversized WebSocket messages, a
    /// handshake flood, descriptor exhaustion, unknown session ids, a frame flood; for one or
    /// several builds side by side.
    Hostile(HostileArgs),
    /// One organization's reconnect storm (every socket replaying from `lastSeq: 0`) against
    /// a quiet organization's ingest, delivery and replay on the same replica, for each
    /// `FANOUT_REPLAY_CONCURRENCY` given, side by side.
    Storm(StormArgs),
    /// Three durable replicas under ingest and reconnecting clients while a replica is
    /// killed (-9), Redis restarted and PostgreSQL restarted: every event answered 200
    /// delivered to every member exactly once and in order, and the time each fault takes
    /// to recover from. Starts its own Redis, PostgreSQL and replicas.
    Chaos(ChaosArgs),
    /// Moderate load with connection churn, replays and organizations that come and go, for
    /// minutes or hours: each replica's memory, descriptors, tasks and Redis subscriptions must
    /// stay flat and return to their idle baseline. Starts its own Redis, replicas and database.
    Soak(SoakArgs),
    /// One process's share of a `connect` run too large for one open-file limit.
    #[command(hide = true)]
    ConnectShard(ShardArgs),
}

#[derive(Args)]
struct ShardArgs {
    #[arg(long, value_enum)]
    system: System,
    #[arg(long)]
    url: String,
    #[arg(long, env = "JWT_SECRET", default_value = "")]
    secret: String,
    #[arg(long)]
    rs256: bool,
    #[arg(long)]
    orgs: usize,
    #[arg(long)]
    concurrency: usize,
    #[arg(long)]
    total: usize,
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
}

#[derive(Args)]
struct ServerArgs {
    /// Protocol the servers speak.
    #[arg(long, value_enum, default_value = "socketio")]
    system: System,
    /// Public listeners, comma-separated (ws://IP:PORT); connections are spread over them.
    #[arg(long, required = true)]
    url: String,
    /// Server process ids, comma-separated, whose CPU and memory are measured.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// HS256 secret the servers verify tokens with (socketio only).
    #[arg(long, env = "JWT_SECRET", default_value = "")]
    secret: String,
    /// Sign RS256 tokens with the repository's test key pair instead (the servers verify
    /// with `tests/keys/rsa_public.pem` as JWT_PUBLIC_KEY).
    #[arg(long)]
    rs256: bool,
    /// Organizations the connections are spread over.
    #[arg(long, default_value_t = 40)]
    orgs: usize,
    /// Handshakes in flight at most (below the servers' listen backlog, 128 for tokio's
    /// default, so that dropped SYNs do not turn into 1 s retransmits).
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Write the report as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl ServerArgs {
    fn servers(&self) -> anyhow::Result<Servers> {
        if self.system == System::Socketio && self.secret.is_empty() && !self.rs256 {
            anyhow::bail!(
                "--secret (or JWT_SECRET) is required with --system socketio: the servers' HS256 secret"
            );
        }
        if self.server_pid.is_empty() {
            eprintln!("note: no --server-pid given; server CPU and memory are not measured");
        }
        Ok(Servers {
            system: self.system,
            urls: net::parse_addrs(&self.url)?,
            pids: self.server_pid.clone(),
            secret: self.secret.clone(),
            rs256: self.rs256,
        })
    }
}

#[derive(Args)]
struct ConnectArgs {
    #[command(flatten)]
    servers: ServerArgs,
    /// Connections to open.
    #[arg(short = 'n', long = "connections", default_value_t = 20_000)]
    connections: usize,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    servers: ServerArgs,
    /// Where to publish: redis://IP:PORT, or http://IP:PORT[,http://IP:PORT] (internal listeners).
    #[arg(long)]
    publish: String,
    /// Bearer key of the HTTP ingest.
    #[arg(long, env = "INGEST_KEY")]
    ingest_key: Option<String>,
    /// Redis process id, for Redis CPU per delivery.
    #[arg(long)]
    redis_pid: Option<u32>,
    #[command(flatten)]
    workload: Workload,
}

#[derive(Args, Clone)]
struct Workload {
    /// Connections receiving messages.
    #[arg(long = "connections", default_value_t = 4000)]
    connections: usize,
    /// Target deliveries per second, one per step, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_STEPS)]
    steps: Vec<u64>,
    /// Length of each step (the first second or fifth is warm-up).
    #[arg(long, default_value_t = 10.0)]
    step_seconds: f64,
    /// Size of each message body in bytes.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Publisher tasks (each owns a share of the organizations, one connection each).
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// Steps still run after the first overloaded one.
    #[arg(long, default_value_t = 0)]
    steps_after_overload: usize,
}

#[derive(Args)]
struct BaselineArgs {
    /// Public WebSocket listener.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: std::net::SocketAddr,
    /// Internal listener: POST /executions/update, GET /readyz.
    #[arg(long, default_value = "127.0.0.1:3001")]
    internal_listen: std::net::SocketAddr,
    /// Bearer key required by the ingest endpoint (none: open).
    #[arg(long)]
    ingest_key: Option<String>,
}

#[derive(Args)]
struct CompareArgs {
    /// CI size: ~300 connections, 6 orgs, two 2-second steps, every system; non-zero exit if a
    /// check fails.
    #[arg(long)]
    smoke: bool,
    /// Systems to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fanout,fanout-rs256,fanout-cluster,node,baseline"
    )]
    systems: Vec<SystemKind>,
    /// Connections of the connect scenario [default: 20000; smoke: 300].
    #[arg(long)]
    connections: Option<usize>,
    /// Connections of the fanout scenario [default: 4000; smoke: 300].
    #[arg(long)]
    fanout_connections: Option<usize>,
    /// Organizations [default: 40; smoke: 6].
    #[arg(long)]
    orgs: Option<usize>,
    /// Target deliveries/s per step [default: 10000,...,240000; smoke: 1500,3000].
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<u64>>,
    /// Seconds per step [default: 10; smoke: 2].
    #[arg(long)]
    step_seconds: Option<f64>,
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// Handshakes in flight at most.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    #[arg(long, default_value_t = 0)]
    steps_after_overload: usize,
    /// The rate (deliveries/s) the summary reports latency and CPU at (nearest step).
    #[arg(long, default_value_t = 40_000)]
    reference_rate: u64,
    /// Write everything as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// fanout binary [default: `fanout` next to this executable].
    #[arg(long)]
    fanout_bin: Option<PathBuf>,
    /// Directory of the Node peer [default: loadtest/peers/socketio-node].
    #[arg(long)]
    node_peer: Option<PathBuf>,
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Ports: public base, base+1; internal base+100, base+101; Redis base+200.
    #[arg(long, default_value_t = 17_000)]
    base_port: u16,
    /// Replicas of fanout and of the Node peer (the baseline is always one process).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..100))]
    replicas: u16,
}

#[derive(Args)]
struct IngestArgs {
    /// CI size: 8 clients in 4 orgs, closed loop with 1 and 8 publishers, 200 events/s, 1.5 s
    /// phases; non-zero exit if a check fails.
    #[arg(long)]
    smoke: bool,
    /// PostgreSQL server for the durable side: a fresh database is created there and
    /// dropped at the end (this URL's own database is not used).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Organizations [default: 32; smoke: 4].
    #[arg(long)]
    orgs: Option<usize>,
    /// Subscribed Socket.IO clients per side, spread over the orgs and replicas [default:
    /// 2 per org].
    #[arg(long)]
    connections: Option<usize>,
    /// Closed-loop phases: concurrent publishers in each, or `none` [default: 1,8,32,128;
    /// smoke: 1,8].
    #[arg(long)]
    publishers: Option<String>,
    /// Open-loop phases: events/s in each, or `none` [default: 250,1000,2500,5000; smoke: 200].
    #[arg(long)]
    rates: Option<String>,
    /// Paced publishers of the open-loop phases [default: 64; smoke: 4].
    #[arg(long)]
    open_publishers: Option<usize>,
    /// Seconds per phase and side (the first second or fifth is warm-up) [default: 10;
    /// smoke: 1.5].
    #[arg(long)]
    phase_seconds: Option<f64>,
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Handshakes in flight at most.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Replicas per side.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=50))]
    replicas: u16,
    /// Ports: ephemeral replicas base, base+1 (internal base+100, ...); durable base+50, ...
    /// (internal base+150, ...); Redis base+200.
    #[arg(long, default_value_t = 17_500)]
    base_port: u16,
    /// Write everything as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// fanout binary [default: `fanout` next to this executable].
    #[arg(long)]
    fanout_bin: Option<PathBuf>,
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
}

#[derive(Args)]
struct ChaosArgs {
    /// CI size: 60 members in 12 orgs, 300 events/s, 3-second outages, every fault;
    /// non-zero exit if a check fails.
    #[arg(long)]
    smoke: bool,
    /// Organizations [default: 60; smoke: 12].
    #[arg(long)]
    orgs: Option<usize>,
    /// Members (Socket.IO clients), spread over the organizations [default: 300; smoke: 60].
    #[arg(long)]
    members: Option<usize>,
    /// Ingest rate, events/s in total [default: 1200; smoke: 300].
    #[arg(long)]
    rate: Option<u64>,
    /// Paced publishers, each owning some organizations [default: 24; smoke: 6].
    #[arg(long)]
    publishers: Option<usize>,
    /// A member's sessions last a random time in MIN,MAX seconds before it reconnects
    /// [default: 2,10; smoke: 1,4].
    #[arg(long, value_delimiter = ',', num_args = 2)]
    session: Option<Vec<f64>>,
    /// Seconds of load before the first fault [default: 20; smoke: 5].
    #[arg(long)]
    warm: Option<f64>,
    /// Seconds each part stays down [default: 5; smoke: 3].
    #[arg(long)]
    down: Option<f64>,
    /// Seconds of load after a recovery before the next fault [default: 30; smoke: 8].
    #[arg(long)]
    calm: Option<f64>,
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Ports: replicas base, base+1, base+2 (internal base+100, ...); Redis base+200.
    /// PostgreSQL takes a free port of its own.
    #[arg(long, default_value_t = 18_600)]
    base_port: u16,
    /// Write everything as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// fanout binary [default: `fanout` next to this executable].
    #[arg(long)]
    fanout_bin: Option<PathBuf>,
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
}

#[derive(Args)]
struct HostileArgs {
    /// A build to measure, as LABEL=PATH (repeat to compare builds side by side) [default:
    /// `fanout` next to this executable].
    #[arg(long = "build")]
    builds: Vec<String>,
    /// Scenarios, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "oversize,flood,descriptors,sids,frames"
    )]
    scenarios: Vec<hostile::Scenario>,
    /// Rounds of `frames`, each with the packet budget on and off (alternating which first).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Handshakes of the flood.
    #[arg(long, default_value_t = 40_000)]
    handshakes: u64,
    /// Ports: the first build's replica listens on base (public) and base+1 (internal), the
    /// next one on base+10, ...
    #[arg(long, default_value_t = 17_800)]
    base_port: u16,
    /// Write everything as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct StormArgs {
    /// Values of FANOUT_REPLAY_CONCURRENCY to compare, comma-separated (0: unbounded).
    #[arg(long, value_delimiter = ',', default_value = "0,4")]
    settings: Vec<usize>,
    /// Rounds; each runs every setting once, in turn.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Sockets of the storming organization.
    #[arg(long, default_value_t = 500)]
    sockets: usize,
    /// Events each of them is replayed (at most FANOUT_REPLAY_MAX, 1000 by default).
    #[arg(long, default_value_t = 1000)]
    events: u64,
    /// The quiet organization's ingest, events/s.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// How far behind the quiet organization's reconnecting client is.
    #[arg(long, default_value_t = 100)]
    quiet_behind: u64,
    /// Seconds of quiet ingest before the storm.
    #[arg(long, default_value_t = 3.0)]
    baseline_seconds: f64,
    /// PostgreSQL server on which the run creates (and drops) its database.
    #[arg(
        long,
        env = "FANOUT_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The fanout binary [default: next to this executable].
    #[arg(long)]
    fanout_bin: Option<PathBuf>,
}

#[derive(Args)]
struct SoakArgs {
    /// Length of the measured run, after the warm-up.
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// The warm-up round of the same load, after which the idle baseline is taken.
    #[arg(long, default_value_t = 60.0)]
    warmup_seconds: f64,
    /// Steady organizations.
    #[arg(long, default_value_t = 8)]
    orgs: usize,
    /// Members of the steady organizations, each connecting, leaving and coming back with
    /// lastSeq.
    #[arg(long, default_value_t = 160)]
    clients: usize,
    /// Transient organizations alive at once (each replaced by a new one when it ends).
    #[arg(long, default_value_t = 4)]
    transient_orgs: usize,
    /// Members of each transient organization.
    #[arg(long, default_value_t = 5)]
    transient_clients: usize,
    /// Lifetime of a transient organization.
    #[arg(long, default_value_t = 20.0)]
    transient_seconds: f64,
    /// Ingest events per second, over the organizations present.
    #[arg(long, default_value_t = 100)]
    rate: u64,
    #[arg(long, default_value_t = 5.0)]
    sample_seconds: f64,
    /// The leak threshold for memory: the least-squares slope of each replica's RSS over
    /// the run, in KiB per minute (256: about 300 bytes per session at this load).
    #[arg(long, default_value_t = 256.0)]
    max_rss_slope: f64,
    /// How long the replicas may take to return to their idle baseline after the load.
    #[arg(long, default_value_t = 60.0)]
    settle_seconds: f64,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=20))]
    replicas: u16,
    /// Ports: replicas base, base+1, ... (internal base+100, ...); Redis base+200.
    #[arg(long, default_value_t = 18_100)]
    base_port: u16,
    /// PostgreSQL server: a fresh database is created there and dropped at the end.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// fanout binary [default: `fanout` next to this executable].
    #[arg(long)]
    fanout_bin: Option<PathBuf>,
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Write everything (every sample) as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fanout-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a command; `Ok(false)` when a check failed.
async fn run(command: Command) -> anyhow::Result<bool> {
    match command {
        Command::Connect(a) => {
            let r = connect::run(connect::Params {
                servers: a.servers.servers()?,
                connections: a.connections,
                orgs: a.servers.orgs,
                concurrency: a.servers.concurrency,
            })
            .await?;
            println!("{}", connect::table(&[("servers".into(), &r)]).render());
            finish_scenario(a.servers.out.as_deref(), &r, r.problems())
        }
        Command::Fanout(a) => {
            let target = publish::Target::parse(&a.publish, a.ingest_key.as_deref())?;
            let w = a.workload;
            let r = fanout::run(fanout::Params {
                servers: a.servers.servers()?,
                publish: target,
                redis_pids: a.redis_pid.into_iter().collect(),
                connections: w.connections,
                orgs: a.servers.orgs,
                steps: w.steps,
                step_seconds: w.step_seconds,
                payload_bytes: w.payload_bytes,
                publishers: w.publishers,
                concurrency: a.servers.concurrency,
                steps_after_overload: w.steps_after_overload,
            })
            .await?;
            println!("{}", fanout::table(&r).render());
            match r.highest_sustainable_deliveries_per_s {
                Some(v) => println!("highest sustainable step: {v} deliveries/s"),
                None => println!("no sustainable step"),
            }
            finish_scenario(a.servers.out.as_deref(), &r, r.problems())
        }
        Command::Baseline(a) => {
            baseline::run(baseline::Options {
                listen: a.listen,
                internal_listen: a.internal_listen,
                ingest_key: a.ingest_key,
            })
            .await?;
            Ok(true)
        }
        Command::ConnectShard(a) => {
            let servers = Servers {
                system: a.system,
                urls: net::parse_addrs(&a.url)?,
                pids: vec![],
                secret: a.secret,
                rs256: a.rs256,
            };
            connect::run_shard(servers, a.orgs, a.concurrency, a.total, a.first, a.count).await?;
            Ok(true)
        }
        Command::Compare(a) => {
            let opts = compare_options(a)?;
            let report = compare::run(opts).await?;
            compare::finish(&report)
        }
        Command::Ingest(a) => {
            let report = ingest::run(ingest_options(a)?).await?;
            ingest::finish(&report)
        }
        Command::Storm(a) => {
            let opts = storm::Options {
                settings: a.settings,
                rounds: a.rounds,
                sockets: a.sockets,
                events: a.events,
                rate: a.rate,
                quiet_behind: a.quiet_behind,
                baseline_seconds: a.baseline_seconds,
                database_url: a.database_url,
                fanout_bin: fanout_bin(a.fanout_bin)?,
            };
            let rounds = storm::run(opts.clone()).await?;
            println!("{}", storm::table(&rounds, &opts).render());
            let problems: Vec<String> = rounds.iter().flat_map(|r| r.failures.clone()).collect();
            finish_scenario(None, &(), problems)
        }
        Command::Chaos(a) => {
            let report = chaos::run(chaos_options(a)?).await?;
            chaos::finish(&report)
        }
        Command::Soak(a) => {
            let report = soak::run(soak::Options {
                minutes: a.minutes,
                warmup_seconds: a.warmup_seconds,
                replicas: a.replicas,
                orgs: a.orgs,
                clients: a.clients,
                transient_orgs: a.transient_orgs,
                transient_clients: a.transient_clients,
                transient_seconds: a.transient_seconds,
                rate: a.rate,
                sample_seconds: a.sample_seconds,
                max_rss_slope_kib_per_min: a.max_rss_slope,
                settle_seconds: a.settle_seconds,
                base_port: a.base_port,
                database_url: a.database_url,
                fanout_bin: fanout_bin(a.fanout_bin)?,
                redis_server: a.redis_server,
            })
            .await?;
            soak::finish(&report, a.out.as_deref())
        }
        Command::Hostile(a) => {
            let builds = if a.builds.is_empty() {
                vec![("fanout".to_string(), fanout_bin(None)?)]
            } else {
                a.builds
                    .iter()
                    .map(|b| match b.split_once('=') {
                        Some((label, path)) if !label.is_empty() => {
                            Ok((label.to_string(), PathBuf::from(path)))
                        }
                        _ => Err(anyhow::anyhow!("--build {b:?}: expected LABEL=PATH")),
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let report = hostile::run(hostile::Options {
                builds,
                scenarios: a.scenarios,
                handshakes: a.handshakes,
                base_port: a.base_port,
                rounds: a.rounds,
            })
            .await?;
            for (title, table) in hostile::tables(&report) {
                println!("\n{title}\n{}", table.render());
            }
            finish_scenario(a.out.as_deref(), &report, Vec::new())
        }
    }
}

fn finish_scenario(
    out: Option<&Path>,
    report: &impl serde::Serialize,
    problems: Vec<String>,
) -> anyhow::Result<bool> {
    if let Some(path) = out {
        report::write_json(path, report)?;
    }
    for p in &problems {
        eprintln!("FAILED: {p}");
    }
    Ok(problems.is_empty())
}

fn compare_options(a: CompareArgs) -> anyhow::Result<compare::Options> {
    let smoke = a.smoke;
    let pick = |full: usize, small: usize| if smoke { small } else { full };
    let steps = match a.steps {
        Some(s) => s,
        None => parse_steps(if smoke { SMOKE_STEPS } else { DEFAULT_STEPS }),
    };
    let fanout_bin = fanout_bin(a.fanout_bin)?;
    Ok(compare::Options {
        smoke,
        systems: a.systems,
        connections: a.connections.unwrap_or(pick(20_000, 300)),
        fanout_connections: a.fanout_connections.unwrap_or(pick(4000, 300)),
        orgs: a.orgs.unwrap_or(pick(40, 6)),
        steps,
        step_seconds: a.step_seconds.unwrap_or(if smoke { 2.0 } else { 10.0 }),
        payload_bytes: a.payload_bytes,
        publishers: a.publishers,
        concurrency: a.concurrency,
        steps_after_overload: a.steps_after_overload,
        reference_rate: a.reference_rate,
        base_port: a.base_port,
        replicas: a.replicas,
        out: a.out,
        fanout_bin,
        node_peer: a.node_peer.unwrap_or_else(default_node_peer),
        redis_server: a.redis_server,
    })
}

fn ingest_options(a: IngestArgs) -> anyhow::Result<ingest::Options> {
    let smoke = a.smoke;
    let orgs = a.orgs.unwrap_or(if smoke { 4 } else { 32 });
    anyhow::ensure!(orgs > 0, "--orgs must be positive");
    let pick = |given: Option<String>, full: &str, small: &str| {
        given.unwrap_or_else(|| if smoke { small } else { full }.to_string())
    };
    let publishers = positive_list(
        "--publishers",
        &pick(a.publishers, INGEST_PUBLISHERS, SMOKE_INGEST_PUBLISHERS),
    )?;
    let rates = positive_list("--rates", &pick(a.rates, INGEST_RATES, SMOKE_INGEST_RATES))?;
    anyhow::ensure!(
        !publishers.is_empty() || !rates.is_empty(),
        "no phases: --publishers and --rates are both none"
    );
    Ok(ingest::Options {
        smoke,
        orgs,
        connections: a.connections.unwrap_or(2 * orgs),
        publishers: publishers.into_iter().map(|n| n as usize).collect(),
        rates,
        open_publishers: a.open_publishers.unwrap_or(if smoke { 4 } else { 64 }),
        phase_seconds: a.phase_seconds.unwrap_or(if smoke { 1.5 } else { 10.0 }),
        payload_bytes: a.payload_bytes,
        concurrency: a.concurrency,
        replicas: a.replicas,
        base_port: a.base_port,
        database_url: a.database_url,
        out: a.out,
        fanout_bin: fanout_bin(a.fanout_bin)?,
        redis_server: a.redis_server,
    })
}

fn chaos_options(a: ChaosArgs) -> anyhow::Result<chaos::Options> {
    let smoke = a.smoke;
    let pick = |full: f64, small: f64| if smoke { small } else { full };
    let orgs = a.orgs.unwrap_or(if smoke { 12 } else { 60 });
    let members = a.members.unwrap_or(if smoke { 60 } else { 300 });
    let publishers = a.publishers.unwrap_or(if smoke { 6 } else { 24 });
    anyhow::ensure!(orgs > 0, "--orgs must be positive");
    anyhow::ensure!(members >= orgs, "--members must be at least --orgs");
    anyhow::ensure!(
        (1..=orgs).contains(&publishers),
        "--publishers must be 1..=--orgs (each publisher owns its organizations)"
    );
    let session = match a.session.as_deref() {
        Some(&[lo, hi]) => (lo, hi),
        _ => (pick(2.0, 1.0), pick(10.0, 4.0)),
    };
    anyhow::ensure!(
        0.1 <= session.0 && session.0 <= session.1,
        "--session MIN,MAX: 0.1 <= MIN <= MAX seconds"
    );
    Ok(chaos::Options {
        smoke,
        orgs,
        members,
        events_per_s: a.rate.unwrap_or(if smoke { 300 } else { 1200 }),
        publishers,
        payload_bytes: a.payload_bytes,
        session_s: session,
        warm_s: a.warm.unwrap_or(pick(20.0, 5.0)),
        down_s: a.down.unwrap_or(pick(5.0, 3.0)),
        calm_s: a.calm.unwrap_or(pick(30.0, 8.0)),
        base_port: a.base_port,
        out: a.out,
        fanout_bin: fanout_bin(a.fanout_bin)?,
        redis_server: a.redis_server,
    })
}

/// A comma-separated list of positive integers; `none` (or nothing) for an empty one.
fn positive_list(flag: &str, text: &str) -> anyhow::Result<Vec<u64>> {
    let text = text.trim();
    if text.is_empty() || text == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|s| match s.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(anyhow::anyhow!(
                "{flag}: {s:?} is not a positive integer (a comma-separated list, or none)"
            )),
        })
        .collect()
}

/// `--fanout-bin`, else `fanout` next to this executable.
fn fanout_bin(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    Ok(match given {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("fanout"))
            .unwrap_or_else(|| PathBuf::from("fanout")),
    })
}

fn parse_steps(list: &str) -> Vec<u64> {
    list.split(',').filter_map(|s| s.parse().ok()).collect()
}

/// The Node peer next to this crate's sources, else relative to the working directory.
fn default_node_peer() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/socketio-node");
    if built.is_dir() {
        return built;
    }
    ["loadtest/peers/socketio-node", "peers/socketio-node"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(|| PathBuf::from("loadtest/peers/socketio-node"))
}
