//! Every bus over TLS (`rediss://`): one Redis, a Redis Cluster and Sentinel, each with a
//! test CA that replicas trust through `SSL_CERT_FILE`. Workers and the harness use the
//! nodes' plain ports beside the TLS ones, so that what reaches a member over TLS is
//! compared with what went in.

mod failover;

use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

const ORG_CHANNEL: &str = "fanout:org:acme";

fn channel(org: &str) -> String {
    format!("fanout:org:{org}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_over_tls() {
    let redis = RedisServer::start_tls().await;
    let a = Replica::builder().name("a").redis_tls(&redis).start().await;
    let b = Replica::builder().name("b").redis_tls(&redis).start().await;
    let ready = a.get("/readyz").await.unwrap();
    assert_eq!(ready.json, json!({"status": "ready", "bus": "redis"}));
    // Borrowed: the server must outlive the publish.
    let server = &redis;
    failover::both_receive(&a, &b, |envelope| async move {
        redis::cmd("PUBLISH")
            .arg(ORG_CHANNEL)
            .arg(envelope)
            .query_async(&mut server.conn().await)
            .await
            .unwrap()
    })
    .await;
    a.wait_metric("fanout_bus_probe_rtt_seconds_count", &[], |v| v >= 1.0)
        .await;
}

/// A Redis whose certificate the replica does not trust: never ready, and the log says why
/// and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_and_said_so() {
    let redis = RedisServer::start_tls().await;
    // The test CA is not among the system's roots.
    let mut a = Replica::builder()
        .name("a")
        .redis_url(&redis.tls_url())
        .spawn()
        .await;
    let deadline = Instant::now() + SOON;
    while !a.stderr().contains("SSL_CERT_FILE") {
        assert!(
            Instant::now() < deadline,
            "no word of the certificate in the log: {}",
            a.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.wait_readyz(503).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls() {
    let cluster = RedisCluster::start_tls(3, 0).await;
    let start = |name: &'static str| {
        Replica::builder()
            .name(name)
            .redis_cluster_tls(&cluster)
            .env("FANOUT_BUS_PROBE_INTERVAL", "500ms")
            .start()
    };
    let a = start("a").await;
    let b = start("b").await;
    // An organization on every master: each master's subscriber connection is TLS.
    let masters = cluster.masters().await;
    let mut orgs: Vec<String> = Vec::new();
    let mut owners = Vec::new();
    for i in 0.. {
        let org = format!("org-{i}");
        let owner = cluster.owner(RedisCluster::slot(&channel(&org))).await;
        if !owners.contains(&owner) {
            owners.push(owner);
            orgs.push(org);
        }
        if owners.len() == masters.len() {
            break;
        }
    }
    let mut members = Vec::new();
    for org in &orgs {
        members.push((a.login(org, "on-a").await, b.login(org, "on-b").await));
    }
    for org in &orgs {
        a.publish(org, "via-ingest", json!(org)).await;
        let envelope = json!({"event": "direct", "data": org}).to_string();
        assert_eq!(cluster.spublish(&channel(org), envelope).await, 2, "{org}");
        b.publish(org, "marker", Value::Null).await;
    }
    for (org, (on_a, on_b)) in orgs.iter().zip(&mut members) {
        let expected = vec![
            ("via-ingest".to_string(), json!(org)),
            ("direct".to_string(), json!(org)),
        ];
        assert_eq!(on_a.events_until("marker", SOON).await, expected, "{org}");
        assert_eq!(on_b.events_until("marker", SOON).await, expected, "{org}");
    }
    a.wait_metric("fanout_bus_probe_rtt_seconds_count", &[], |v| v >= 3.0)
        .await;
    assert_eq!(a.metric("fanout_bus_probe_failures_total", &[]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_and_their_master_over_tls_through_a_failover() {
    let mut sentinel = RedisSentinel::start_tls("fanout-master").await;
    let start = |name: &'static str| {
        Replica::builder()
            .name(name)
            .redis_sentinel_tls(&sentinel)
            .env("FANOUT_BUS_PROBE_INTERVAL", "500ms")
            .start()
    };
    let mut a = start("a").await;
    let mut b = start("b").await;
    let ready = a.get("/readyz").await.unwrap();
    assert_eq!(
        ready.json,
        json!({"status": "ready", "bus": "redis-sentinel"})
    );
    failover::both_receive(&a, &b, |envelope| async {
        sentinel.publish(ORG_CHANNEL, envelope).await
    })
    .await;
    let old = sentinel.master_port().await;
    failover::ephemeral_across_failover(&mut a, &mut b, || async {
        sentinel.kill_master().await;
    })
    .await;
    assert_ne!(sentinel.master_port().await, old);
}
