//! The Redis Cluster fixture against real servers: start, slots, sharded pub/sub, a slot
//! migration with a key in it, a failover and the dead master's return as a replica. One
//! scenario, one cluster: starting six nodes is the expensive part.

use std::time::Instant;

use fanout_testkit::RedisCluster;
use fanout_testkit::redis_cluster::SLOTS;

async fn cluster_info(cluster: &RedisCluster, port: u16) -> String {
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut cluster.node_conn(port).await)
        .await
        .expect("CLUSTER INFO")
}

#[tokio::test]
async fn start_migrate_fail_over_and_rejoin() {
    let t = Instant::now();
    let mut cluster = RedisCluster::start(3, 1).await;
    eprintln!(
        "cluster of 3 masters + 3 replicas started in {:?}",
        t.elapsed()
    );

    assert_eq!(cluster.urls().len(), 6);
    assert_eq!(cluster.seed_urls().split(',').count(), 6);
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    for port in cluster.ports() {
        let info = cluster_info(&cluster, port).await;
        assert!(info.contains("cluster_state:ok"), "{port}: {info}");
        assert!(
            info.contains("cluster_slots_assigned:16384"),
            "{port}: {info}"
        );
        assert!(info.contains("cluster_slots_ok:16384"), "{port}: {info}");
    }
    let mut owners: Vec<u16> = Vec::new();
    for slot in [0, 5460, 5461, 10922, 10923, SLOTS - 1] {
        owners.push(cluster.owner(slot).await);
    }
    owners.sort_unstable();
    owners.dedup();
    assert_eq!(owners, masters, "the slots are spread over the masters");

    // Our hash slots are the server's.
    let mut conn = cluster.node_conn(masters[0]).await;
    for key in [
        "foo",
        "bar",
        "",
        "{user1000}.following",
        "foo{}{bar}",
        "room:42",
        "é",
    ] {
        let server: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("CLUSTER KEYSLOT");
        assert_eq!(RedisCluster::slot(key), server, "slot of {key:?}");
    }

    let channel = "fanout:test:{room}";
    let slot = RedisCluster::slot(channel);
    assert_eq!(cluster.spublish(channel, b"nobody listens").await, 0);
    assert_eq!(cluster.shard_numsub(channel).await, 0);

    // A key in the channel's slot goes along with the slot.
    let from = cluster.owner(slot).await;
    let _: () = redis::cmd("SET")
        .arg("{room}:key")
        .arg("value")
        .query_async(&mut cluster.node_conn(from).await)
        .await
        .expect("SET at the slot's owner");
    let to = *masters.iter().find(|&&p| p != from).unwrap();
    let t = Instant::now();
    cluster.migrate_slot(slot, to).await;
    eprintln!(
        "slot {slot} migrated from {from} to {to} in {:?}",
        t.elapsed()
    );
    assert_eq!(cluster.owner(slot).await, to);
    let value: Option<String> = redis::cmd("GET")
        .arg("{room}:key")
        .query_async(&mut cluster.node_conn(to).await)
        .await
        .expect("GET at the new owner");
    assert_eq!(value.as_deref(), Some("value"));
    assert_eq!(cluster.spublish(channel, b"still nobody").await, 0);

    let t = Instant::now();
    cluster.kill_master(to).await;
    let new_owner = cluster.wait_failover(slot, to).await;
    eprintln!(
        "master {to} killed, slot {slot} failed over to {new_owner} in {:?}",
        t.elapsed()
    );
    assert_ne!(new_owner, to);
    assert_eq!(cluster.owner(slot).await, new_owner);
    let masters_after = cluster.masters().await;
    assert_eq!(masters_after.len(), 3, "masters: {masters_after:?}");
    assert!(masters_after.contains(&new_owner) && !masters_after.contains(&to));
    assert_eq!(cluster.spublish(channel, b"after the failover").await, 0);

    let t = Instant::now();
    cluster.restart(to).await;
    eprintln!("{to} restarted and rejoined in {:?}", t.elapsed());
    assert_eq!(
        cluster.masters().await,
        masters_after,
        "{to} came back as a replica"
    );
    assert_eq!(cluster.owner(slot).await, new_owner);
}
