//! The Redis Cluster bus against a real cluster (3 masters, with replicas where a test
//! kills one): organizations whose channels live on every master, a worker's direct
//! `SPUBLISH`, a slot migrated under connected members, a master killed during a publish
//! loop, and members leaving.

use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

mod failover;

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
        let got = failover::before_marker(client).await;
        if name == "alice" {
            // a's own member: nothing a answered 200 for is missing or doubled.
            failover::all_once(&got, &accepted, name);
        } else {
            let mut sorted = got.clone();
            sorted.dedup();
            assert_eq!(sorted, got, "{name}: no duplicates");
            let missed = accepted.iter().filter(|n| !got.contains(n)).count();
            eprintln!(
                "slot migrated under a publish loop: {} publishes taken, all reached a's member \
                 once; b's member missed {missed}, b counted {}",
                accepted.len(),
                b.metric("fanout_bus_missed_total", &[]).await
            );
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
    let slot = RedisCluster::slot(&channel("acme"));
    let master = cluster.owner(slot).await;
    failover::ephemeral_across_failover(&mut a, &mut b, || cluster.kill_master(master)).await;
    assert_ne!(cluster.owner(slot).await, master);
}

/// A master's failure stops only the organizations whose slots it owns: while acme's master
/// is down and replaced, publishes for an organization on another master are all taken and
/// delivered on both replicas, though the replicas are unready meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_stops_only_its_own_organizations() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let a = on(&cluster, "a").await;
    let b = on(&cluster, "b").await;
    let master = cluster.owner(RedisCluster::slot(&channel("acme"))).await;
    let mut other = None;
    for i in 0.. {
        let org = format!("org-{i}");
        if cluster.owner(RedisCluster::slot(&channel(&org))).await != master {
            other = Some(org);
            break;
        }
    }
    let other = other.unwrap();
    let _carol = a.login("acme", "carol").await;
    let mut alice = a.login(&other, "alice").await;
    let mut bob = b.login(&other, "bob").await;

    cluster.kill_master(master).await;
    let killed = Instant::now();
    let (mut sent, mut acme_refused, mut unready) = (0u64, 0, false);
    loop {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "acme's publishes still refused 20 s after its master died"
        );
        let body = json!({"organizationId": other, "event": "tick", "data": sent});
        let reply = a.post("/v1/publish", &body).await;
        assert_eq!(
            reply.status, 200,
            "{other} while acme's master is down: {reply:?}"
        );
        sent += 1;
        unready |= a.readyz().await == Some(503);
        let body = json!({"organizationId": "acme", "event": "tick", "data": 0});
        match a.post("/v1/publish", &body).await.status {
            200 if acme_refused > 0 => break,
            200 => {}
            503 => acme_refused += 1,
            other => panic!("acme's publish answered {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        acme_refused > 0,
        "acme's master died, yet no publish was refused"
    );
    assert!(
        unready,
        "/readyz said ready while acme's subscription was down"
    );
    a.publish(&other, "marker", Value::Null).await;
    let expected: Vec<(String, Value)> =
        (0..sent).map(|n| ("tick".to_string(), json!(n))).collect();
    assert_eq!(before_marker(&mut alice).await, expected, "alice");
    assert_eq!(before_marker(&mut bob).await, expected, "bob");
    eprintln!(
        "{sent} publishes for {other} taken and delivered while acme's master was down and \
         {acme_refused} of acme's refused, for {:?}",
        killed.elapsed()
    );
}

/// A subscription connection to a master that stays open but carries nothing any more (a
/// proxy or a NAT that stopped forwarding; here a proxy the master announces as its
/// address): the probe through that master finds it, the replica says it is unready and
/// refuses acme's publishes, and subscribes again once the path works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_to_a_master_is_found_by_the_probe_and_made_again() {
    let cluster = RedisCluster::start(3, 0).await;
    let master = cluster.owner(RedisCluster::slot(&channel("acme"))).await;
    let proxy = Proxy::start(([127, 0, 0, 1], master).into()).await;
    cluster.announce(master, proxy.port()).await;
    let mut a = on(&cluster, "a").await;
    let mut b = on(&cluster, "b").await;
    let mut alice = a.login("acme", "alice").await;
    b.publish("acme", "before", json!(1)).await;
    assert_eq!(alice.expect("before", QUICK).await, json!(1));
    a.wait_metric("fanout_bus_probe_rtt_seconds_count", &[], |v| v >= 3.0)
        .await;

    proxy.silence_subscribers();
    a.wait_metric(
        "fanout_bus_probe_failures_total",
        &[("reason", "lost")],
        |v| v >= 1.0,
    )
    .await;
    a.wait_readyz(503).await;
    let body = json!({"organizationId": "acme", "event": "during", "data": 2});
    let refused = a.post("/v1/publish", &body).await;
    assert_eq!(refused.status, 503, "{refused:?}");

    proxy.resume();
    a.wait_ready().await;
    b.wait_ready().await;
    b.publish("acme", "after", json!(3)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(3));
    assert_eq!(cluster.shard_numsub(&channel("acme")).await, 1);
}

/// A master that died comes back (empty, with its old `nodes.conf`) and rejoins as a
/// replica of the node that took its slots, while publishes go on: every one taken reaches
/// the publishing replica's member once, and the replicas' subscriptions stay where the slot
/// is. Now and then the rejoin costs the other replica its shard subscriptions at the new
/// master (Redis drops them; b's probe finds it and subscribes again): what b's member missed
/// then is exactly what b counts as missed, as in every failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_master_rejoins_while_publishes_go_on() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let mut a = on(&cluster, "a").await;
    let mut b = on(&cluster, "b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    let slot = RedisCluster::slot(&channel("acme"));
    let old = cluster.owner(slot).await;
    cluster.kill_master(old).await;
    let new = cluster.wait_failover(slot, old).await;
    a.wait_ready().await;
    b.wait_ready().await;

    let restarted = std::sync::atomic::AtomicBool::new(false);
    let publishing = async {
        let (mut accepted, mut refused, mut after) = (Vec::new(), Vec::new(), 0);
        for n in 0u64.. {
            if restarted.load(std::sync::atomic::Ordering::Acquire) {
                after += 1;
                if after > 20 {
                    break;
                }
            }
            let body = json!({"organizationId": "acme", "event": "tick", "data": n});
            match a.post("/v1/publish", &body).await.status {
                200 => accepted.push(json!(n)),
                503 => refused.push(n),
                other => panic!("publish answered {other}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (accepted, refused)
    };
    let restart = async {
        cluster.restart(old).await;
        restarted.store(true, std::sync::atomic::Ordering::Release);
    };
    let ((accepted, refused), ()) = tokio::join!(publishing, restart);
    assert_eq!(
        cluster.owner(slot).await,
        new,
        "the old master is a replica now"
    );
    b.wait_ready().await;
    a.publish("acme", "marker", Value::Null).await;
    failover::all_once(
        &failover::before_marker(&mut alice).await,
        &accepted,
        "alice",
    );
    let on_b = failover::before_marker(&mut bob).await;
    let mut deduped = on_b.clone();
    deduped.dedup();
    assert_eq!(deduped, on_b, "bob: no duplicates");
    let missed_by_b = accepted.iter().filter(|n| !on_b.contains(n)).count() as f64;
    let counted = b
        .wait_metric("fanout_bus_missed_total", &[], |v| v >= missed_by_b)
        .await;
    assert_eq!(
        counted, missed_by_b,
        "b's member missed {missed_by_b}, b counted {counted}"
    );
    eprintln!(
        "{} publishes taken while the old master restarted and rejoined, {} refused: {refused:?}; \
         b's member missed {missed_by_b}, b counted {counted}",
        accepted.len(),
        refused.len()
    );
    assert_eq!(a.metric("fanout_bus_missed_total", &[]).await, 0.0);
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
    let master = cluster.owner(RedisCluster::slot(&channel("acme"))).await;
    failover::durable_across_failover(&a, &b, || cluster.kill_master(master)).await;
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

/// Masters added and removed: a new master that is given acme's slot gets a connection, its
/// probe and acme's subscription; once the slot moves back and the master is removed, the
/// replica lets go of it without a probe failure or a moment unready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_added_then_removed_gets_then_loses_its_connection_and_channels() {
    let mut cluster = RedisCluster::start(3, 0).await;
    let mut a = on(&cluster, "a").await;
    let mut alice = a.login("acme", "alice").await;
    let slot = RedisCluster::slot(&channel("acme"));
    let home = cluster.owner(slot).await;
    let new = cluster.add_master().await;
    // The new master owns acme's slot: the replica follows the slot there (its
    // `sunsubscribe`), connects to the master it did not know, and probes it.
    cluster.migrate_slot(slot, new).await;
    eventually("acme subscribed at the new master", SOON, || async {
        (cluster.shard_numsub(&channel("acme")).await == 1).then_some(())
    })
    .await;
    a.wait_ready().await;
    let probes = a.metric("fanout_bus_probe_rtt_seconds_count", &[]).await;
    a.wait_metric("fanout_bus_probe_rtt_seconds_count", &[], |v| {
        v >= probes + 4.0
    })
    .await;
    a.publish("acme", "after", json!(1)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(1));

    // Emptied: acme goes home, and the master without slots is no master of the cluster
    // any more (CLUSTER SLOTS leaves it out): its connection is closed.
    cluster.migrate_slot(slot, home).await;
    eventually(
        "no subscriber connection left on the emptied master",
        SOON,
        || async {
            let mut conn = cluster.node_conn(new).await;
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query_async(&mut conn)
                .await
                .unwrap();
            clients.trim().is_empty().then_some(())
        },
    )
    .await;
    assert_eq!(cluster.shard_numsub(&channel("acme")).await, 1);
    cluster.remove_master(new).await;
    let probes = a.metric("fanout_bus_probe_rtt_seconds_count", &[]).await;
    a.wait_metric("fanout_bus_probe_rtt_seconds_count", &[], |v| {
        v >= probes + 6.0
    })
    .await;
    assert_eq!(a.readyz().await, Some(200));
    a.publish("acme", "removed", json!(2)).await;
    assert_eq!(alice.expect("removed", QUICK).await, json!(2));
    assert_eq!(a.metric("fanout_bus_probe_failures_total", &[]).await, 0.0);
    assert_eq!(a.metric("fanout_bus_missed_total", &[]).await, 0.0);
}

/// A member who joins while its organization's slot is half-migrated (`MIGRATING` at the
/// owner, `IMPORTING` at the target): Redis 7.0 answers no `ASK` for shard channels, the
/// owner keeps serving them until the slot is handed over, so the subscription is made there;
/// then the handover's `sunsubscribe` moves it to the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_during_a_slot_migration_is_subscribed_then_follows_the_slot() {
    let cluster = RedisCluster::start(3, 0).await;
    let a = on(&cluster, "a").await;
    let mut b = on(&cluster, "b").await;
    let slot = RedisCluster::slot(&channel("acme"));
    let masters = cluster.masters().await;
    let from = cluster.owner(slot).await;
    let to = *masters.iter().find(|m| **m != from).unwrap();
    assert_eq!(cluster.begin_migration(slot, to).await, Some(from));

    let mut alice = a.login("acme", "alice").await;
    assert_eq!(cluster.shard_numsub(&channel("acme")).await, 1);
    b.publish("acme", "during", json!(1)).await;
    assert_eq!(alice.expect("during", QUICK).await, json!(1));
    let envelope = json!({"event": "direct", "data": 2}).to_string();
    assert_eq!(cluster.spublish(&channel("acme"), envelope).await, 1);
    assert_eq!(alice.expect("direct", QUICK).await, json!(2));

    cluster.finish_migration(slot, from, to).await;
    eventually("acme subscribed at its new owner", SOON, || async {
        (cluster.owner(slot).await == to && cluster.shard_numsub(&channel("acme")).await == 1)
            .then_some(())
    })
    .await;
    b.wait_ready().await;
    b.publish("acme", "after", json!(3)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(3));
    assert_eq!(a.metric("fanout_bus_duplicates_total", &[]).await, 0.0);
}
