//! The Redis bus through Sentinel, against a real group (one master, one replica, three
//! sentinels): fan-out across replicas of fanout, a worker's direct PUBLISH at the master,
//! and the master killed during a publish loop.

use fanout_testkit::*;
use serde_json::json;

mod failover;

async fn on(sentinel: &RedisSentinel, name: &str) -> Replica {
    Replica::builder()
        .name(name)
        .redis_sentinel(sentinel)
        .env("FANOUT_BUS_PROBE_INTERVAL", "500ms")
        .start()
        .await
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
    failover::both_receive(&a, &b, |envelope| async {
        sentinel.publish("fanout:org:acme", envelope).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_the_promoted_replica() {
    let mut sentinel = RedisSentinel::start("fanout-master").await;
    let mut a = on(&sentinel, "a").await;
    let mut b = on(&sentinel, "b").await;
    let old = sentinel.master_port().await;
    failover::ephemeral_across_failover(&mut a, &mut b, || async {
        sentinel.kill_master().await;
    })
    .await;
    assert_ne!(sentinel.master_port().await, old);
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
    failover::durable_across_failover(&a, &b, || async {
        sentinel.kill_master().await;
    })
    .await;
}
