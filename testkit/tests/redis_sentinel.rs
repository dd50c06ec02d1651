//! The Redis Sentinel fixture against real servers: start, master and replica, a failover
//! after a kill, the dead master's return as a replica, and a second failover back to it.
//! One scenario, one group: starting five processes and waiting for failovers is the
//! expensive part.

use std::time::Instant;

use fanout_testkit::{RedisSentinel, SOON, eventually};

async fn info_replication(group: &RedisSentinel, port: u16) -> String {
    redis::cmd("INFO")
        .arg("replication")
        .query_async(&mut group.node_conn(port).await)
        .await
        .expect("INFO replication")
}

fn has(info: &str, line: &str) -> bool {
    info.lines().any(|l| l.trim() == line)
}

#[tokio::test]
async fn start_and_fail_over() {
    let t = Instant::now();
    let mut group = RedisSentinel::start("fanout-test").await;
    eprintln!(
        "master + replica + 3 sentinels started in {:?}",
        t.elapsed()
    );

    assert_eq!(group.master_name(), "fanout-test");
    let urls = group.sentinel_urls();
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    assert!(
        urls.split(',').all(|u| u.starts_with("redis://127.0.0.1:")),
        "{urls}"
    );
    let ports = group.ports();
    assert_eq!(ports.len(), 2);
    let master = group.master_port().await;
    assert_eq!(master, ports[0], "the first node starts as the master");
    let replica = ports[1];

    let info = info_replication(&group, master).await;
    assert!(has(&info, "role:master"), "{master}: {info}");
    assert!(has(&info, "connected_slaves:1"), "{master}: {info}");
    let info = info_replication(&group, replica).await;
    assert!(has(&info, "role:slave"), "{replica}: {info}");
    assert!(has(&info, &format!("master_port:{master}")), "{info}");
    assert!(has(&info, "master_link_status:up"), "{info}");

    // A write at the master reaches the replica.
    let _: () = redis::cmd("SET")
        .arg("sentinel:key")
        .arg("value")
        .query_async(&mut group.node_conn(master).await)
        .await
        .expect("SET at the master");
    eventually("the key to reach the replica", SOON, || async {
        let v: Option<String> = redis::cmd("GET")
            .arg("sentinel:key")
            .query_async(&mut group.node_conn(replica).await)
            .await
            .ok()?;
        (v.as_deref() == Some("value")).then_some(())
    })
    .await;

    assert_eq!(group.publish("fanout:test", b"nobody listens").await, 0);
    assert_eq!(group.numsub("fanout:test").await, 0);

    // Kill the master: the sentinels promote the replica.
    let killed = group.kill_master().await;
    assert_eq!(killed, master);
    let t = Instant::now();
    let promoted = group.wait_failover(killed).await;
    eprintln!("kill -9 of the master -> failover in {:?}", t.elapsed());
    assert_eq!(promoted, replica);
    assert_eq!(group.master_port().await, replica);
    let info = info_replication(&group, replica).await;
    assert!(has(&info, "role:master"), "{replica}: {info}");
    assert_eq!(group.publish("fanout:test", b"after the failover").await, 0);

    assert_eq!(group.numsub("fanout:test").await, 0);
}
