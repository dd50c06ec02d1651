//! The Redis bus through Sentinel, against a real group (one master, one replica, three
//! sentinels): fan-out across replicas of fanout, a worker's direct PUBLISH at the master,
//! and the master killed during a publish loop.

use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

async fn on(sentinel: &RedisSentinel, name: &str) -> Replica {
    Replica::builder()
        .name(name)
        .redis_sentinel(sentinel)
        .env("FANOUT_BUS_PROBE_INTERVAL", "500ms")
        .start()
        .await
}

async fn numbers_before_marker(client: &mut Client) -> Vec<Value> {
    client
        .events_until("marker", SOON)
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_master_the_sentinels_name() {
    let sentinel = RedisSentinel::start("fanout-master").await;
    let a = on(&sentinel, "a").await;
    let b = on(&sentinel, "b").await;
    let ready = a.get("/readyz").await.unwrap();
    assert_eq!(
        ready.json,
        json!({"status": "ready", "bus": "redis-sentinel"})
    );
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    assert_eq!(sentinel.numsub("fanout:org:acme").await, 2);

    a.publish("acme", "via-ingest", json!(1)).await;
    let envelope = json!({"event": "direct", "data": 2}).to_string();
    assert_eq!(sentinel.publish("fanout:org:acme", envelope).await, 2);
    b.publish("acme", "marker", Value::Null).await;
    for client in [&mut alice, &mut bob] {
        assert_eq!(
            client.events_until("marker", SOON).await,
            vec![
                ("via-ingest".to_string(), json!(1)),
                ("direct".to_string(), json!(2))
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_the_promoted_replica() {
    let mut sentinel = RedisSentinel::start("fanout-master").await;
    let mut a = on(&sentinel, "a").await;
    let mut b = on(&sentinel, "b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;

    let old = sentinel.kill_master().await;
    let killed = Instant::now();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for n in 0u64.. {
        if accepted.len() >= 5 {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "publishes still refused 20 s after the master died"
        );
        let body = json!({"organizationId": "acme", "event": "tick", "data": n});
        match a.post("/v1/publish", &body).await.status {
            200 => accepted.push(json!(n)),
            503 => refused += 1,
            other => panic!("publish answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = killed.elapsed();
    assert_ne!(sentinel.master_port().await, old);
    assert!(refused > 0, "the failover took no time at all?");
    // Both subscribed at the new master (b reconnects on its own backoff), so that the
    // marker reaches both members.
    a.wait_ready().await;
    b.wait_ready().await;
    a.publish("acme", "marker", Value::Null).await;

    // a never answered 200 while its own subscription was down: its member got all of
    // them, once. (A publish answered 503 may have arrived too; its publisher retries.)
    let got = numbers_before_marker(&mut alice).await;
    let missing: Vec<&Value> = accepted.iter().filter(|n| !got.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "accepted but lost: {missing:?} (got {got:?})"
    );
    let mut deduped = got.clone();
    deduped.dedup();
    assert_eq!(deduped, got, "no duplicates");
    // b could not know what a published while b was reconnecting: counted, not asserted.
    let on_b = numbers_before_marker(&mut bob).await;
    let missed_by_b = accepted.iter().filter(|n| !on_b.contains(n)).count();
    eprintln!(
        "deliveries resumed {resumed:?} after the kill; {refused} publishes refused meanwhile; \
         of {} accepted, b's member missed {missed_by_b}",
        accepted.len()
    );
    b.publish("acme", "after", json!(1)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(1));
    assert!(a.metric("fanout_redis_reconnects_total", &[]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_history_every_accepted_event_arrives_once_in_order_across_a_failover() {
    let db = TestDb::create().await;
    let mut sentinel = RedisSentinel::start("fanout-master").await;
    let durable = |name: &str| {
        Replica::builder()
            .name(name)
            .redis_sentinel(&sentinel)
            .database(&db)
            .env("FANOUT_BUS_PROBE_INTERVAL", "500ms")
            .start_with_store()
    };
    let a = durable("a").await;
    let b = durable("b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;

    let mut accepted: Vec<u64> = Vec::new();
    let mut killed = None;
    let started = Instant::now();
    while accepted.len() < 30 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} events accepted in 30 s",
            accepted.len()
        );
        if accepted.len() == 5 && killed.is_none() {
            sentinel.kill_master().await;
            killed = Some(Instant::now());
        }
        let body = json!({"organizationId": "acme", "event": "tick", "data": accepted.len()});
        let reply = a.post("/v1/publish", &body).await;
        match reply.status {
            200 => accepted.push(
                reply.json["seq"]
                    .as_u64()
                    .expect("durable answers have seq"),
            ),
            503 => {}
            other => panic!("publish answered {other}: {reply:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted, (1..=30).collect::<Vec<u64>>());
    for (name, client) in [("alice", &mut alice), ("bob", &mut bob)] {
        let mut seqs = Vec::new();
        while seqs.len() < accepted.len() {
            let (event, _, seq) = client.next_durable(SOON).await;
            assert_eq!(event, "tick", "{name}");
            seqs.push(seq.expect("durable events carry their seq"));
        }
        assert_eq!(seqs, accepted, "{name}: every event once, in order");
    }
    eprintln!(
        "30 durable events, the master killed after the fifth: all delivered to both members \
         {:?} after the kill",
        killed.unwrap().elapsed()
    );
}
