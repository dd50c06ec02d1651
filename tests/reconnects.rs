//! The durability promise end to end: two replicas, concurrent publishers on both, and
//! dashboards that keep losing their connection and coming back, each time to a replica
//! picked at random, with `auth.lastSeq` set to the last sequence number they saw. At the
//! end every client must have seen every event of its organization exactly once, in
//! order, and nothing of any other organization.
//!
//! The random choices come from a seeded generator; a failure prints the seed, and
//! `FANOUT_TEST_SEED=<seed>` replays the same choices.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

const ORGS: [&str; 3] = ["acme", "globex", "initech"];
const CLIENTS_PER_ORG: usize = 3;
const PUBLISHERS_PER_REPLICA: usize = 2;
const EVENTS_PER_PUBLISHER: usize = 150;

/// xorshift64*: small, seedable, good enough to pick replicas and counts.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one client saw, over all its connections.
#[derive(Default)]
struct Seen {
    seqs: Vec<u64>,
    foreign: Vec<Value>,
    connections: usize,
    resyncs: Vec<Value>,
    log: Vec<Connection>,
}

/// One connection of a client: the replica, the lastSeq sent, the first and last seq
/// received (for failure messages).
type Connection = (usize, u64, Option<(u64, u64)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_sees_every_event_once_in_order_across_random_reconnects() {
    let seed = std::env::var("FANOUT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fanout_testkit::now_secs() ^ 0x9E37_79B9_7F4A_7C15);
    eprintln!("seed: {seed} (FANOUT_TEST_SEED={seed} replays these choices)");

    let redis = RedisServer::start().await;
    let db = TestDb::create().await;
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let r = Replica::builder()
            .name(name)
            .redis(&redis)
            .database(&db)
            .env(
                "RUST_LOG",
                "info,fanout::delivery=debug,fanout::gateway=debug",
            )
            .start_with_store()
            .await;
        replicas.push(r);
    }
    let publics: Arc<Vec<_>> = Arc::new(replicas.iter().map(|r| r.public).collect());
    // The highest sequence number accepted so far, per organization.
    let progress: Arc<Vec<AtomicU64>> = Arc::new(ORGS.iter().map(|_| AtomicU64::new(0)).collect());
    let started = Instant::now();

    // Publishers: each posts to its replica, cycling through the organizations.
    let mut publishers = Vec::new();
    for (i, replica) in replicas.iter().enumerate() {
        for p in 0..PUBLISHERS_PER_REPLICA {
            let update_url = replica.url("/executions/update");
            let log_url = replica.url("/executions/log");
            let name = format!("{i}-{p}");
            let progress = progress.clone();
            publishers.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut last: HashMap<&str, u64> = HashMap::new();
                for n in 0..EVENTS_PER_PUBLISHER {
                    let org = ORGS[(n + p) % ORGS.len()];
                    let task = format!("task-{name}-{}", n / 10);
                    let (url, body) = if n % 3 == 0 {
                        (&log_url, json!({"organizationId": org, "taskId": task, "log": n, "by": name}))
                    } else {
                        let status = if n % 10 == 9 { "PASSED" } else { "RUNNING" };
                        (&update_url, json!({"organizationId": org, "taskId": task, "status": status, "n": n, "by": name}))
                    };
                    let resp = http
                        .post(url)
                        .bearer_auth(INGEST_KEY)
                        .json(&body)
                        .send()
                        .await
                        .expect("ingest answers");
                    assert_eq!(resp.status(), 200, "publisher {name}");
                    let answer: Value = resp.json().await.unwrap();
                    let seq = answer["seq"].as_u64().expect("durable answers carry seq");
                    progress[(n + p) % ORGS.len()].fetch_max(seq, Ordering::AcqRel);
                    let previous = last.insert(org, seq).unwrap_or(0);
                    assert!(seq > previous, "one publisher's events are numbered in order");
                }
                last
            }));
        }
    }

    // Clients: connect to a random replica, take a random number of events, drop the
    // connection (no goodbye, like a network blip), and come back with lastSeq.
    let done = Arc::new(tokio::sync::watch::channel(None::<HashMap<String, u64>>));
    let mut clients = Vec::new();
    for (o, org) in ORGS.iter().enumerate() {
        for c in 0..CLIENTS_PER_ORG {
            let publics = publics.clone();
            let progress = progress.clone();
            let mut finished = done.0.subscribe();
            let mut rng = Rng(seed ^ ((o * 31 + c + 1) as u64).wrapping_mul(0x9E37_79B9));
            let user = format!("user-{c}");
            clients.push(tokio::spawn(async move {
                let mut seen = Seen::default();
                loop {
                    let last = seen.seqs.last().copied().unwrap_or(0);
                    // The final totals, once every publisher is done.
                    let total = finished.borrow_and_update().as_ref().map(|t| t[*org]);
                    if total.is_some_and(|t| last >= t) {
                        return seen;
                    }
                    let replica = rng.below(publics.len() as u64) as usize;
                    let target = publics[replica];
                    let first_of_connection = seen.seqs.len();
                    let auth = json!({"token": valid_token(org, &user), "lastSeq": last});
                    let mut client = Client::connect(target, Some(auth)).await;
                    client.expect("auth-success", QUICK).await;
                    seen.connections += 1;
                    // After the publishers are done, stay until caught up.
                    let take = match total {
                        Some(_) => u64::MAX,
                        None => 1 + rng.below(40),
                    };
                    let mut taken = 0;
                    while taken < take {
                        let packet = tokio::select! {
                            p = client.next(Duration::from_millis(200)) => p,
                            _ = finished.changed(), if total.is_none() => break,
                        };
                        match packet {
                            Some(fanout_testkit::client::Packet::Durable(_, data, seq)) => {
                                if data["organizationId"] != *org {
                                    seen.foreign.push(data);
                                }
                                seen.seqs.push(seq);
                                taken += 1;
                            }
                            Some(fanout_testkit::client::Packet::Event(name, data))
                                if name == "resync-required" =>
                            {
                                seen.resyncs.push(data);
                            }
                            Some(other) => panic!("{org}/{user}: unexpected {other:?}"),
                            None => {
                                let now_total = finished.borrow().as_ref().map(|t| t[*org]);
                                let last = seen.seqs.last().copied().unwrap_or(0);
                                if now_total.is_some_and(|t| last >= t) {
                                    return seen;
                                }
                                if now_total.is_some() {
                                    // Quiet while events are missing: let the next
                                    // connection (with lastSeq) fetch them.
                                    break;
                                }
                            }
                        }
                    }
                    drop(client);
                    let got = &seen.seqs[first_of_connection..];
                    let range = got.first().map(|f| (*f, *got.last().unwrap()));
                    seen.log.push((replica, last, range));
                    // Stay away until a few more events were accepted (or all were).
                    let away = 1 + rng.below(30);
                    let back_at = seen.seqs.last().copied().unwrap_or(0) + away;
                    let deadline = Instant::now() + SOON;
                    while progress[o].load(Ordering::Acquire) < back_at
                        && finished.borrow().is_none()
                        && Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }));
        }
    }

    let mut totals: HashMap<String, u64> = HashMap::new();
    for p in publishers {
        for (org, seq) in p.await.unwrap() {
            let t = totals.entry(org.to_string()).or_default();
            *t = (*t).max(seq);
        }
    }
    let published: u64 = totals.values().sum();
    assert_eq!(
        published as usize,
        2 * PUBLISHERS_PER_REPLICA * EVENTS_PER_PUBLISHER,
        "sequence numbers have no gaps: the last ones add up to the events accepted"
    );
    done.0.send_replace(Some(totals.clone()));

    let mut connections = 0;
    for (i, client) in clients.into_iter().enumerate() {
        let org = ORGS[i / CLIENTS_PER_ORG];
        let seen = tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .unwrap_or_else(|_| panic!("client {i} of {org} did not catch up (seed {seed})"))
            .unwrap();
        assert!(seen.foreign.is_empty(), "{org} got {:?}", seen.foreign);
        assert!(
            seen.resyncs.is_empty(),
            "{org} was told to resync: {:?}",
            seen.resyncs
        );
        let expected: Vec<u64> = (1..=totals[org]).collect();
        assert_eq!(
            seen.seqs, expected,
            "client {i} of {org}: every event once and in order (seed {seed}); \
             connections (replica, lastSeq, first..last received): {:?}",
            seen.log
        );
        connections += seen.connections;
    }
    let mut replayed = 0.0;
    let mut gap_fills = 0.0;
    for r in &replicas {
        replayed += r.metric("fanout_replayed_events_total", &[]).await;
        gap_fills += r.metric("fanout_gap_fills_total", &[]).await;
    }
    eprintln!(
        "{published} events from {} publishers on 2 replicas; {} clients made {connections} connections; \
         {replayed} events replayed, {gap_fills} read back to restore order; {:.1?}",
        2 * PUBLISHERS_PER_REPLICA,
        ORGS.len() * CLIENTS_PER_ORG,
        started.elapsed()
    );
}
