//! The scenarios every bus that fails over must pass (`tests/cluster.rs`,
//! `tests/sentinel.rs`, `tests/tls.rs`): one test file per bus says how to publish straight
//! into it and how to kill its master, these say what the replicas must do about it.

// Each test file that includes this module uses only the scenarios it needs.
#![allow(dead_code)]

use std::future::Future;
use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

/// Checks that `got` holds every one of `accepted`, and nothing twice. (A publish answered
/// 503 may have arrived too: one that raced a lost subscription is refused even when it
/// made it, and its publisher retries.)
pub fn all_once(got: &[Value], accepted: &[Value], who: &str) {
    let missing: Vec<&Value> = accepted.iter().filter(|n| !got.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{who}: accepted but lost: {missing:?} (got {got:?})"
    );
    let mut deduped = got.to_vec();
    deduped.dedup();
    assert_eq!(deduped, got, "{who}: no duplicates");
}

/// The data of what `client` received before `marker`.
pub async fn before_marker(client: &mut Client) -> Vec<Value> {
    client
        .events_until("marker", SOON)
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect()
}

/// Fan-out on a bus, before any failure: what `a` and `b`'s members of acme receive: an ingest publish through `a`, a worker's
/// direct publish (`direct`, answering how many subscribers it reached), then a marker.
pub async fn both_receive<F, Fut>(a: &Replica, b: &Replica, direct: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = i64>,
{
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    a.publish("acme", "via-ingest", json!(1)).await;
    let envelope = json!({"event": "direct", "data": 2}).to_string();
    assert_eq!(direct(envelope).await, 2, "both replicas subscribed");
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

/// Ephemeral messages: `kill` takes the master of acme's channel away; publishes through
/// `a` are refused (503) while a's own subscription is down and accepted again after the
/// failover, and every one accepted reaches a's member once. b cannot know what a published
/// while b's own subscription was being made again: what b's member missed is counted in
/// b's `fanout_bus_missed_total` (exactly, when a's accepted publishes were not interleaved
/// with refused ones, whose fate a cannot know), and reported.
pub async fn ephemeral_across_failover<F, Fut>(a: &mut Replica, b: &mut Replica, kill: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    // b has heard from a before: a gap in a's numbering can be seen.
    a.publish("acme", "warm", json!(0)).await;
    assert_eq!(bob.expect("warm", QUICK).await, json!(0));
    kill().await;
    let killed = Instant::now();
    let mut accepted = Vec::new();
    let (mut refused, mut interleaved) = (0, false);
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
            503 => {
                refused += 1;
                interleaved |= !accepted.is_empty();
            }
            other => panic!("publish answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = killed.elapsed();
    assert!(refused > 0, "the failover took no time at all?");
    // Both subscribed at the new master (b reconnects on its own backoff), so that the
    // marker reaches both members.
    a.wait_ready().await;
    b.wait_ready().await;
    a.publish("acme", "marker", Value::Null).await;
    all_once(&before_marker(&mut alice).await, &accepted, "a's member");
    let on_b = before_marker(&mut bob).await;
    let mut deduped = on_b.clone();
    deduped.dedup();
    assert_eq!(deduped, on_b, "no duplicates on b");
    let missed_by_b = accepted.iter().filter(|n| !on_b.contains(n)).count() as f64;
    let counted = if interleaved {
        b.metric("fanout_bus_missed_total", &[]).await
    } else {
        b.wait_metric("fanout_bus_missed_total", &[], |v| v >= missed_by_b)
            .await
    };
    assert!(
        counted == missed_by_b || interleaved && counted < missed_by_b,
        "b's member missed {missed_by_b}, b counted {counted} (interleaved: {interleaved})"
    );
    // A publish the Redis client retried across the failover may arrive twice at a
    // subscriber: counted in fanout_bus_duplicates_total and dropped, so neither member saw
    // a message twice (checked above).
    eprintln!(
        "deliveries resumed {resumed:?} after the kill; {refused} publishes refused meanwhile; \
         of {} accepted, a's member got all, b's missed {missed_by_b} and counted {counted}",
        accepted.len()
    );
    b.publish("acme", "after", json!(1)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(1));
    assert_eq!(bob.expect("after", QUICK).await, json!(1));
    assert!(a.metric("fanout_redis_reconnects_total", &[]).await >= 1.0);
}

/// Durable events (both replicas have the history): the master dies after the fifth of 30
/// publishes through `a`; every one answered 200 has its sequence number and reaches both
/// members once, in order, live or read back from the history once the bus is back.
pub async fn durable_across_failover<F, Fut>(a: &Replica, b: &Replica, kill: F)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    let mut kill = Some(kill);
    let mut accepted: Vec<u64> = Vec::new();
    let mut killed = None;
    let started = Instant::now();
    while accepted.len() < 30 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "only {} events accepted in 30 s",
            accepted.len()
        );
        if accepted.len() == 5
            && let Some(kill) = kill.take()
        {
            kill().await;
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
        killed.expect("killed").elapsed()
    );
}
