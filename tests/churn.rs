//! Subscription churn: dashboards of many organizations connecting and leaving at once,
//! on two replicas, so that an organization's last socket leaving races its next socket
//! joining, on the same replica and across replicas.
//!
//! Whatever the interleaving, once the churn stops every replica must be subscribed to
//! exactly the organizations it still holds sockets of (a missed subscription silently
//! starves dashboards; a leaked one wastes Redis), and every remaining socket must get
//! its organization's next message once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use fanout_testkit::*;
use serde_json::{Value, json};

const ORGS: usize = 30;
const WORKERS_PER_ORG: usize = 3;
const CYCLES: usize = 6;

fn org(i: usize) -> String {
    format!("churn-{i:02}")
}

/// How one connection of a worker ends.
#[derive(Clone, Copy)]
enum Leave {
    /// Socket.IO DISCONNECT and WebSocket close, after auth-success.
    Polite,
    /// TCP connection dropped after auth-success.
    Abrupt,
    /// TCP connection dropped right after CONNECT, racing the server's join.
    BeforeAuth,
    /// A socket on the other replica authenticates before this one is dropped.
    Handover,
}

/// Connects and leaves `CYCLES` times, alternating replicas; keeps the last socket when
/// `keep`. Returns the replica index and client of the kept socket.
async fn worker(addrs: [SocketAddr; 2], i: usize, w: usize, keep: bool) -> Option<(usize, Client)> {
    let org = org(i);
    let user = format!("user-{w}");
    let token = valid_token(&org, &user);
    for cycle in 0..CYCLES {
        let r = (i + w + cycle) % 2;
        let mode = [
            Leave::Polite,
            Leave::Abrupt,
            Leave::BeforeAuth,
            Leave::Handover,
        ][(i * 3 + w * 2 + cycle) % 4];
        match mode {
            Leave::BeforeAuth => drop(Client::with_token(addrs[r], &token).await),
            Leave::Polite => {
                let (client, _) = Client::authenticated(addrs[r], &token).await;
                client.disconnect();
            }
            Leave::Abrupt => drop(Client::authenticated(addrs[r], &token).await),
            Leave::Handover => {
                let (old, _) = Client::authenticated(addrs[r], &token).await;
                let (new, _) = Client::authenticated(addrs[1 - r], &token).await;
                drop(old);
                new.disconnect();
            }
        }
    }
    if !keep {
        return None;
    }
    let r = (i + w) % 2;
    Some((r, Client::authenticated(addrs[r], &token).await.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_converge_to_presence_after_churn() {
    let redis = RedisServer::start().await;
    let replicas = [
        Replica::on(&redis, "a").await,
        Replica::on(&redis, "b").await,
    ];
    let addrs = [replicas[0].public, replicas[1].public];

    // Every third organization ends with no socket at all; the others keep one or two
    // sockets, on one replica or both.
    let keep =
        |i: usize, w: usize| !i.is_multiple_of(3) && (w == 0 || (i.is_multiple_of(2) && w == 1));
    let workers: Vec<_> = (0..ORGS)
        .flat_map(|i| (0..WORKERS_PER_ORG).map(move |w| (i, w)))
        .map(|(i, w)| tokio::spawn(worker(addrs, i, w, keep(i, w))))
        .collect();
    let mut kept: Vec<(usize, usize, Client)> = Vec::new();
    for (n, handle) in workers.into_iter().enumerate() {
        if let Some((r, client)) = handle.await.expect("worker panicked") {
            kept.push((n / WORKERS_PER_ORG, r, client));
        }
    }

    // Which replicas hold each organization now.
    let mut holders: BTreeMap<usize, BTreeSet<usize>> = BTreeMap::new();
    for (i, r, _) in &kept {
        holders.entry(*i).or_default().insert(*r);
    }
    let channels: Vec<String> = (0..ORGS)
        .map(|i| format!("fanout:org:{}", org(i)))
        .collect();
    let expected_numsub: Vec<i64> = (0..ORGS)
        .map(|i| holders.get(&i).map_or(0, |h| h.len() as i64))
        .collect();
    let expected_subscriptions =
        |r: usize| holders.values().filter(|h| h.contains(&r)).count() as f64;
    let expected_connections = |r: usize| kept.iter().filter(|(_, kr, _)| *kr == r).count() as f64;

    let mut last = Vec::new();
    let converged = tokio::time::timeout(SOON, async {
        loop {
            let numsub = redis.numsub(&channels).await;
            let mut settled = numsub == expected_numsub;
            last = vec![format!("numsub {numsub:?}")];
            for (r, replica) in replicas.iter().enumerate() {
                let m = replica.metrics().await;
                let subscriptions = m.get("fanout_redis_subscriptions", &[]);
                let connections = m.get("fanout_connections", &[]);
                settled &= subscriptions == expected_subscriptions(r)
                    && connections == expected_connections(r);
                last.push(format!(
                    "{}: fanout_redis_subscriptions {subscriptions} (expected {}), \
                     fanout_connections {connections} (expected {})",
                    replica.name,
                    expected_subscriptions(r),
                    expected_connections(r)
                ));
            }
            if settled {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        converged.is_ok(),
        "subscriptions did not converge to presence.\nexpected numsub {expected_numsub:?}\nlast seen: {last:#?}"
    );

    // Every remaining socket gets its organization's next message, once.
    for i in 0..ORGS {
        let via = &replicas[i % 2];
        via.publish(&org(i), "after-churn", json!({"org": org(i)}))
            .await;
        via.publish(&org(i), "marker", Value::Null).await;
    }
    for (i, r, client) in &mut kept {
        assert_eq!(
            client.events_until("marker", QUICK).await,
            vec![("after-churn".to_string(), json!({"org": org(*i)}))],
            "socket of {} on replica {r}",
            org(*i)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_gone_before_their_authentication_completes_are_forgotten() {
    let redis = RedisServer::start().await;
    let a = Replica::on(&redis, "a").await;
    let token = valid_token("hasty", "u");

    // Browsers closing a tab right after it connected: CONNECT sent, connection dropped.
    for _ in 0..40 {
        drop(Client::with_token(a.public, &token).await);
    }
    // A socket that completes its login afterwards, and leaves, is the marker: once the
    // replica processed its leave, it has processed the earlier connections too.
    let (last, _) = Client::authenticated(a.public, &token).await;
    last.disconnect();

    let mut seen = (f64::NAN, Vec::new());
    let settled = tokio::time::timeout(SOON, async {
        loop {
            seen = (
                a.metric("fanout_connections", &[]).await,
                redis.channels("fanout:org:*").await,
            );
            if seen.0 == 0.0 && seen.1.is_empty() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "no socket is left, yet the replica still counts {} connection(s) and subscribes to {:?}",
        seen.0,
        seen.1
    );
}
