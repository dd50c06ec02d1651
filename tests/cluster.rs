//! The Redis Cluster bus against a real cluster (3 masters, with replicas where a test
//! kills one): organizations whose channels live on every master, a worker's direct
//! `SPUBLISH`, a slot migrated under connected members, a master killed during a publish
//! loop, and members leaving.

use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

/// A replica on `cluster`, probing each master connection twice a second.
async fn on(cluster: &RedisCluster, name: &str) -> Replica {
    Replica::builder()
        .name(name)
        .redis_cluster(cluster)
        .env("FANOUT_BUS_PROBE_INTERVAL", "500ms")
        .start()
        .await
}

fn channel(org: &str) -> String {
    format!("fanout:org:{org}")
}

/// Organization ids whose channels are owned by each master in turn, `per_master` each.
async fn orgs_on_every_master(cluster: &RedisCluster, per_master: usize) -> Vec<(String, u16)> {
    let masters = cluster.masters().await;
    let mut found: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        let org = format!("org-{i}");
        let owner = cluster.owner(RedisCluster::slot(&channel(&org))).await;
        if found.iter().filter(|(_, m)| *m == owner).count() < per_master {
            found.push((org, owner));
        }
        if found.len() == masters.len() * per_master {
            return found;
        }
    }
    unreachable!()
}

/// Checks that `got` holds every one of `accepted`, and nothing twice. (A publish answered
/// 503 may have arrived too: one that raced a lost subscription is refused even when it
/// made it, and its publisher retries.)
fn all_once(got: &[Value], accepted: &[Value], who: &str) {
    let missing: Vec<&Value> = accepted.iter().filter(|n| !got.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "{who}: accepted but lost: {missing:?} (got {got:?})"
    );
    let mut deduped = got.to_vec();
    deduped.dedup();
    assert_eq!(deduped, got, "{who}: no duplicates");
}

/// What `client` received before `marker`, as (event, data).
async fn before_marker(client: &mut Client) -> Vec<(String, Value)> {
    client.events_until("marker", SOON).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organizations_on_every_master_reach_every_replica_once_and_no_one_else() {
    let cluster = RedisCluster::start(3, 0).await;
    let a = on(&cluster, "a").await;
    let b = on(&cluster, "b").await;
    let ready = a.get("/readyz").await.unwrap();
    assert_eq!(
        ready.json,
        json!({"status": "ready", "bus": "redis-cluster"})
    );

    let orgs = orgs_on_every_master(&cluster, 2).await;
    let mut members = Vec::new();
    for (org, _) in &orgs {
        members.push((
            org.clone(),
            a.login(org, "on-a").await,
            b.login(org, "on-b").await,
        ));
    }
    for (org, _) in &orgs {
        // Subscribed once per replica, at the master that owns the channel.
        assert_eq!(cluster.shard_numsub(&channel(org)).await, 2, "{org}");
    }

    // Through each replica's ingest, and straight into the cluster by a worker.
    for (i, (org, _)) in orgs.iter().enumerate() {
        let publisher = if i % 2 == 0 { &a } else { &b };
        publisher.publish(org, "via-ingest", json!(org)).await;
        let envelope = json!({"event": "direct", "data": org}).to_string();
        assert_eq!(cluster.spublish(&channel(org), envelope).await, 2, "{org}");
    }
    for (org, _) in &orgs {
        a.publish(org, "marker", Value::Null).await;
    }
    for (org, on_a, on_b) in &mut members {
        let expected = vec![
            ("via-ingest".to_string(), json!(org)),
            ("direct".to_string(), json!(org)),
        ];
        assert_eq!(before_marker(on_a).await, expected, "{org} on a");
        assert_eq!(before_marker(on_b).await, expected, "{org} on b");
    }
    // A probe on each of the three masters came back, and none failed.
    a.wait_metric("fanout_bus_probe_rtt_seconds_count", &[], |v| v >= 3.0)
        .await;
    assert_eq!(a.metric("fanout_bus_probe_failures_total", &[]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_under_connected_members_keeps_delivering() {
    let cluster = RedisCluster::start(3, 0).await;
    let mut a = on(&cluster, "a").await;
    let b = on(&cluster, "b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    let slot = RedisCluster::slot(&channel("acme"));
    let from = cluster.owner(slot).await;
    let to = *cluster
        .masters()
        .await
        .iter()
        .find(|m| **m != from)
        .unwrap();

    // A publish loop through a's ingest across the migration: everything answered 200
    // reaches both members exactly once.
    let migrate = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.migrate_slot(slot, to).await;
    };
    let publish = async {
        let mut accepted = Vec::new();
        let started = Instant::now();
        for n in 0u64.. {
            if started.elapsed() > Duration::from_secs(2) {
                break;
            }
            let body = json!({"organizationId": "acme", "event": "tick", "data": n});
            if a.post("/v1/publish", &body).await.status == 200 {
                accepted.push(json!(n));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        accepted
    };
    let ((), accepted) = tokio::join!(migrate, publish);
    assert_eq!(cluster.owner(slot).await, to);
    eventually(
        "both replicas subscribed at the new owner",
        SOON,
        || async { (cluster.shard_numsub(&channel("acme")).await == 2).then_some(()) },
    )
    .await;
    a.wait_ready().await;
    a.publish("acme", "marker", Value::Null).await;
    for (name, client) in [("alice", &mut alice), ("bob", &mut bob)] {
        let got: Vec<Value> = before_marker(client)
            .await
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        if name == "alice" {
            // a's own member: nothing a answered 200 for is missing or doubled.
            all_once(&got, &accepted, name);
        } else {
            let mut sorted = got.clone();
            sorted.dedup();
            assert_eq!(sorted, got, "{name}: no duplicates");
        }
    }
    b.publish("acme", "after", json!(1)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(1));
    assert_eq!(bob.expect("after", QUICK).await, json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_followed_to_its_replica() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let mut a = on(&cluster, "a").await;
    let mut b = on(&cluster, "b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    let slot = RedisCluster::slot(&channel("acme"));
    let master = cluster.owner(slot).await;

    cluster.kill_master(master).await;
    let killed = Instant::now();
    // Never 200 while a's own subscription is down; 503 meanwhile.
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut n = 0u64;
    while accepted.len() < 5 {
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
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = killed.elapsed();
    let new_owner = cluster.owner(slot).await;
    assert_ne!(new_owner, master);
    // Both subscribed at the new master (b reconnects on its own), so that the marker
    // reaches both members.
    a.wait_ready().await;
    b.wait_ready().await;
    a.publish("acme", "marker", Value::Null).await;
    let got: Vec<Value> = before_marker(&mut alice)
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    all_once(&got, &accepted, "a's member");
    assert!(refused > 0, "the failover took no time at all?");
    // b cannot know what a published while b's own subscription was being made again:
    // what it missed is counted here (and by Redis' numbers, not by fanout).
    let on_b: Vec<Value> = before_marker(&mut bob)
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let mut deduped = on_b.clone();
    deduped.dedup();
    assert_eq!(deduped, on_b, "no duplicates on b");
    let missed_by_b = accepted.iter().filter(|n| !on_b.contains(n)).count();
    eprintln!(
        "deliveries resumed {resumed:?} after the kill; {refused} publishes refused meanwhile; \
         of {} accepted, a's member got all, b's missed {missed_by_b}",
        accepted.len()
    );
    b.publish("acme", "after", json!(1)).await;
    assert_eq!(bob.expect("after", QUICK).await, json!(1));
    assert!(a.metric("fanout_redis_reconnects_total", &[]).await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_member_leaving_unsubscribes_the_shard_channel() {
    let cluster = RedisCluster::start(3, 0).await;
    let a = on(&cluster, "a").await;
    let first = a.login("acme", "u1").await;
    let second = a.login("acme", "u2").await;
    assert_eq!(cluster.shard_numsub(&channel("acme")).await, 1);
    first.disconnect();
    a.wait_metric("fanout_connections", &[], |v| v == 1.0).await;
    assert_eq!(cluster.shard_numsub(&channel("acme")).await, 1);
    second.disconnect();
    eventually("acme unsubscribed", SOON, || async {
        (cluster.shard_numsub(&channel("acme")).await == 0).then_some(())
    })
    .await;
    a.wait_metric("fanout_redis_subscriptions", &[], |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_history_every_accepted_event_arrives_once_in_order_across_a_failover() {
    let db = TestDb::create().await;
    let mut cluster = RedisCluster::start(3, 1).await;
    let durable = |name: &str| {
        Replica::builder()
            .name(name)
            .redis_cluster(&cluster)
            .database(&db)
            .env("FANOUT_BUS_PROBE_INTERVAL", "500ms")
            .start_with_store()
    };
    let a = durable("a").await;
    let b = durable("b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    let master = cluster.owner(RedisCluster::slot(&channel("acme"))).await;

    // Publishes through a, and the master of acme's slot killed after the fifth: every one
    // answered 200 has its sequence number, and reaches both members (live, or read back
    // from the history once the bus is back).
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
            cluster.kill_master(master).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_connections_killed_by_the_masters_are_made_again() {
    let cluster = RedisCluster::start(3, 0).await;
    let mut a = on(&cluster, "a").await;
    let orgs = orgs_on_every_master(&cluster, 1).await;
    let mut members = Vec::new();
    for (org, _) in &orgs {
        members.push((org.clone(), a.login(org, "u").await));
    }
    let mut killed = 0;
    for port in cluster.masters().await {
        let mut conn = cluster.node_conn(port).await;
        let n: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        killed += n;
    }
    assert_eq!(killed, 3, "one subscriber connection per master");
    a.wait_metric("fanout_redis_reconnects_total", &[], |v| v >= 1.0)
        .await;
    a.wait_ready().await;
    for (org, client) in &mut members {
        assert_eq!(cluster.shard_numsub(&channel(org)).await, 1, "{org}");
        a.publish(org, "after", json!(org)).await;
        assert_eq!(client.expect("after", QUICK).await, json!(org));
    }
}
