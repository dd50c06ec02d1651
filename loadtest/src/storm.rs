//! `storm`: one organization's reconnect storm, and what it costs the other organizations.
//!
//! After a deploy, every dashboard of a large organization comes back at once with
//! `lastSeq: 0` (or far behind) and asks the replica to replay up to `FANOUT_REPLAY_MAX`
//! events from PostgreSQL, through the pool durable ingest commits through too. This command
//! measures that storm against a quiet organization on the same replica, for each setting of
//! `FANOUT_REPLAY_CONCURRENCY` given (`0`: unbounded, as before the bound existed), side by
//! side in alternating rounds, on one database, one Redis and one binary:
//!
//! - the storm: `--sockets` clients of organization `storm` connect at once with
//!   `lastSeq: 0`, each must receive all `--events` events in order (a `resync-required`
//!   or a gap is a failure); its duration is from the first connect to the last event;
//! - the quiet organization's durable ingest: `--rate` events/s, paced, answered latency
//!   before the storm and during it;
//! - its live delivery to a connected member, during the storm;
//! - its own replay: a quiet client reconnecting `--quiet-behind` events behind, during the
//!   storm: how long until it has caught up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fanout_testkit::{Client, RedisServer, Replica, TestDb, valid_token};
use serde_json::json;
use tokio::time::Instant;

use crate::report::{Table, num};

#[derive(Debug, Clone)]
pub struct Options {
    pub settings: Vec<usize>,
    pub rounds: usize,
    pub sockets: usize,
    pub events: u64,
    pub rate: u64,
    pub quiet_behind: u64,
    pub baseline_seconds: f64,
    pub database_url: String,
    pub fanout_bin: std::path::PathBuf,
}

/// One round of one setting.
#[derive(Debug, Clone)]
pub struct Round {
    pub setting: usize,
    pub storm_s: f64,
    pub replayed: u64,
    pub failures: Vec<String>,
    /// Quiet ingest latency, ms: (p50, p99, max), before and during the storm.
    pub ingest_before: (f64, f64, f64),
    pub ingest_during: (f64, f64, f64),
    /// Quiet live delivery during the storm, ms: (p50, p99).
    pub delivery_during: (f64, f64),
    /// The quiet client's replay during the storm, ms.
    pub quiet_replay_ms: f64,
}

pub async fn run(opts: Options) -> anyhow::Result<Vec<Round>> {
    anyhow::ensure!(
        !opts.settings.is_empty(),
        "--settings needs at least one value"
    );
    if cfg!(debug_assertions) {
        eprintln!(
            "note: this is a debug build of the generator; use --release for numbers worth reading"
        );
    }
    let sockets = opts.sockets as u64;
    crate::net::open_files(
        4 * sockets,
        2 * sockets,
        &format!("{sockets} storm sockets"),
    )?;
    let redis = RedisServer::start().await;
    let db = TestDb::try_create_on(&opts.database_url, "fanout_storm")
        .await
        .context("the run's database (pass --database-url)")?;
    let mut replicas = Vec::new();
    for &setting in &opts.settings {
        let r = Replica::builder()
            .name(&format!("replay-concurrency-{setting}"))
            .bin(&opts.fanout_bin)
            .redis(&redis)
            .database(&db)
            .env("FANOUT_REPLAY_CONCURRENCY", setting)
            .env("FANOUT_MAX_CONNECTIONS_PER_USER", 0)
            .start_with_store()
            .await;
        replicas.push((setting, Arc::new(r)));
    }
    // The storm's history, committed once through the first replica.
    let first = replicas[0].1.clone();
    preload(&first, opts.events).await?;
    eprintln!("storm: {} events of `storm` committed", opts.events);

    let mut rounds = Vec::new();
    for round in 0..opts.rounds {
        for (setting, r) in &replicas {
            eprintln!("round {}: FANOUT_REPLAY_CONCURRENCY={setting}", round + 1);
            rounds.push(one_round(&opts, *setting, r.clone()).await?);
        }
    }
    drop(replicas);
    drop(redis);
    let _ = db.drop_database().await;
    Ok(rounds)
}

async fn preload(r: &Arc<Replica>, events: u64) -> anyhow::Result<()> {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publishers = (0..16).map(|_| {
        let (r, next) = (r.clone(), next.clone());
        async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= events {
                    return Ok::<_, anyhow::Error>(());
                }
                let body =
                    json!({ "organizationId": "storm", "event": "tick", "data": { "i": i } });
                let reply = r.post("/v1/publish", &body).await;
                anyhow::ensure!(reply.status == 200, "preload answered {reply:?}");
            }
        }
    });
    for result in futures_util::future::join_all(publishers).await {
        result?;
    }
    Ok(())
}

fn quantiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    (q(0.5), q(0.99), *v.last().unwrap())
}

async fn one_round(opts: &Options, setting: usize, r: Arc<Replica>) -> anyhow::Result<Round> {
    let mut failures = Vec::new();
    let mut member = r.login("quiet", "member").await;
    // The quiet publisher: paced, each request timed; its bodies carry their send time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let publisher = tokio::spawn({
        let (r, stop) = (r.clone(), stop.clone());
        let every = Duration::from_secs_f64(1.0 / opts.rate.max(1) as f64);
        async move {
            let mut tick = tokio::time::interval(every);
            let mut sent = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let r = r.clone();
                let at = started.elapsed().as_secs_f64();
                sent.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let body =
                        json!({ "organizationId": "quiet", "event": "tick", "data": { "at": at } });
                    let reply = r.post("/v1/publish", &body).await;
                    (at, t.elapsed().as_secs_f64() * 1000.0, reply.status)
                }));
            }
            let mut out = Vec::new();
            for s in sent {
                out.push(s.await.expect("publish task"));
            }
            out
        }
    });
    // Live delivery to the quiet member, by the send time the body carries.
    let receiver = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(packet) = member.next(Duration::from_secs(5)).await {
            if let fanout_testkit::Packet::Durable(_, data, _) = packet
                && let Some(at) = data["at"].as_f64()
            {
                seen.push((at, started.elapsed().as_secs_f64() - at));
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_secs_f64(opts.baseline_seconds)).await;

    // The storm.
    let storm_at = started.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let storm = (0..opts.sockets).map(|i| {
        let (addr, events) = (r.public, opts.events);
        async move {
            let auth = json!({ "token": valid_token("storm", &format!("u{i}")), "lastSeq": 0 });
            let mut client = Client::connect(addr, Some(auth)).await;
            client.expect("auth-success", Duration::from_secs(30)).await;
            for want in 1..=events {
                let (name, _, seq) = client.next_durable(Duration::from_secs(60)).await;
                if seq != Some(want) {
                    return (
                        client,
                        Err(format!("u{i}: expected seq {want}, got {name} {seq:?}")),
                    );
                }
            }
            (client, Ok(events))
        }
    });
    let storm = tokio::spawn(futures_util::future::join_all(storm));
    // The quiet organization's own reconnect, once the storm is under way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let quiet_last = quiet_last_seq(&r).await;
    let quiet_from = quiet_last.saturating_sub(opts.quiet_behind);
    let q0 = Instant::now();
    let auth = json!({ "token": valid_token("quiet", "returning"), "lastSeq": quiet_from });
    let mut quiet = Client::connect(r.public, Some(auth)).await;
    quiet.expect("auth-success", Duration::from_secs(30)).await;
    let mut caught_up = f64::NAN;
    loop {
        match quiet.next(Duration::from_secs(60)).await {
            Some(fanout_testkit::Packet::Durable(_, _, seq)) if seq >= quiet_last => {
                caught_up = q0.elapsed().as_secs_f64() * 1000.0;
                break;
            }
            Some(fanout_testkit::Packet::Durable(..)) => {}
            other => {
                failures.push(format!("quiet replay: {other:?}"));
                break;
            }
        }
    }
    let done = storm.await?;
    let storm_s = t0.elapsed().as_secs_f64();
    let storm_end = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = publisher.await?;
    let mut replayed = 0;
    let mut clients = Vec::new();
    for (client, result) in done {
        match result {
            Ok(n) => replayed += n,
            Err(e) if failures.len() < 10 => failures.push(e),
            Err(_) => {}
        }
        clients.push(client);
    }
    for (at, _, status) in &answers {
        if *status != 200 {
            failures.push(format!("quiet ingest at {at:.2} s answered {status}"));
        }
    }
    let before: Vec<f64> = answers
        .iter()
        .filter(|a| a.0 < storm_at)
        .map(|a| a.1)
        .collect();
    let during: Vec<f64> = answers
        .iter()
        .filter(|a| a.0 >= storm_at && a.0 <= storm_end)
        .map(|a| a.1)
        .collect();
    drop(clients);
    drop(quiet);
    let seen = receiver.await?;
    let delivered: Vec<f64> = seen
        .iter()
        .filter(|(at, _)| *at >= storm_at && *at <= storm_end)
        .map(|(_, d)| d * 1000.0)
        .collect();
    let (d50, d99, _) = quantiles(delivered);
    // Let the replica see every socket leave before the next round.
    r.wait_metric("fanout_connections", &[], |n| n == 0.0).await;
    Ok(Round {
        setting,
        storm_s,
        replayed,
        failures,
        ingest_before: quantiles(before),
        ingest_during: quantiles(during),
        delivery_during: (d50, d99),
        quiet_replay_ms: caught_up,
    })
}

/// The quiet organization's last committed `seq`, by a publish and its answer.
async fn quiet_last_seq(r: &Replica) -> u64 {
    let body = json!({ "organizationId": "quiet", "event": "marker", "data": null });
    let reply = r.post("/v1/publish", &body).await;
    reply.json["seq"].as_u64().unwrap_or(0)
}

pub fn table(rounds: &[Round], opts: &Options) -> Table {
    let mut t = Table::new(vec![
        "FANOUT_REPLAY_CONCURRENCY".to_string(),
        "round".into(),
        format!(
            "storm: {} sockets × {} events (s)",
            opts.sockets, opts.events
        ),
        "replayed events/s".into(),
        "quiet ingest p50 / p99 / max before (ms)".into(),
        "quiet ingest p50 / p99 / max during (ms)".into(),
        "quiet delivery p50 / p99 during (ms)".into(),
        format!("quiet replay of {} events during (ms)", opts.quiet_behind),
        "failures".into(),
    ]);
    for (i, r) in rounds.iter().enumerate() {
        let three = |(a, b, c): (f64, f64, f64)| {
            format!(
                "{} / {} / {}",
                num(Some(a), 1),
                num(Some(b), 1),
                num(Some(c), 0)
            )
        };
        t.row(vec![
            if r.setting == 0 {
                "0 (unbounded)".to_string()
            } else {
                r.setting.to_string()
            },
            (i / opts.settings.len() + 1).to_string(),
            num(Some(r.storm_s), 2),
            num(Some(r.replayed as f64 / r.storm_s), 0),
            three(r.ingest_before),
            three(r.ingest_during),
            format!(
                "{} / {}",
                num(Some(r.delivery_during.0), 1),
                num(Some(r.delivery_during.1), 1)
            ),
            num(Some(r.quiet_replay_ms), 0),
            r.failures.len().to_string(),
        ]);
    }
    t
}
