//! Fair use: what one user or one organization may hold on a replica. A socket over a cap
//! is refused the way a bad token is (`auth-error` `Too many connections`, then a
//! DISCONNECT), is counted in `fanout_connections_refused_total{reason}`, and holds nothing
//! afterwards: the sockets already admitted go on receiving, and a socket that leaves makes
//! room for the next.

use fanout_testkit::*;
use serde_json::json;

const TOO_MANY: &str = "Too many connections";

fn auth(org: &str, user: &str) -> Option<serde_json::Value> {
    Some(json!({ "token": valid_token(org, user) }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_connection_cap_is_refused_and_counted() {
    let r = Replica::builder()
        .env("FANOUT_MAX_CONNECTIONS_PER_USER", 2)
        .start()
        .await;
    let first = r.login("acme", "alice").await;
    let mut second = r.login("acme", "alice").await;
    Client::refused(r.public, auth("acme", "alice"), TOO_MANY).await;
    assert_eq!(
        r.metric(
            "fanout_connections_refused_total",
            &[("reason", "user_limit")]
        )
        .await,
        1.0
    );
    // Other users of the organization, and the same user id in another organization, are
    // other users.
    let mut bob = r.login("acme", "bob").await;
    let _alice_of_globex = r.login("globex", "alice").await;
    assert_eq!(r.metric("fanout_connections", &[]).await, 4.0);

    // The admitted sockets go on receiving.
    r.publish("acme", "tick", json!(1)).await;
    assert_eq!(second.expect("tick", QUICK).await, json!(1));
    assert_eq!(bob.expect("tick", QUICK).await, json!(1));

    // One of alice's sockets leaves: her next one is admitted.
    first.disconnect();
    r.wait_metric("fanout_connections", &[], |n| n == 3.0).await;
    let mut third = r.login("acme", "alice").await;
    r.publish("acme", "tick", json!(2)).await;
    assert_eq!(third.expect("tick", QUICK).await, json!(2));
    assert_eq!(
        r.metric(
            "fanout_connections_refused_total",
            &[("reason", "user_limit")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_over_its_connection_cap_is_refused_and_counted() {
    let r = Replica::builder()
        .env("FANOUT_MAX_CONNECTIONS_PER_ORG", 3)
        .start()
        .await;
    let mut members = Vec::new();
    for user in ["alice", "bob", "carol"] {
        members.push(r.login("acme", user).await);
    }
    Client::refused(r.public, auth("acme", "dave"), TOO_MANY).await;
    Client::refused(r.public, auth("acme", "alice"), TOO_MANY).await;
    assert_eq!(
        r.metric(
            "fanout_connections_refused_total",
            &[("reason", "org_limit")]
        )
        .await,
        2.0
    );
    // Another organization has a cap of its own.
    let mut globex = r.login("globex", "dave").await;
    r.publish("globex", "tick", json!("g")).await;
    assert_eq!(globex.expect("tick", QUICK).await, json!("g"));

    // The default cap per user (100) is not what refused them.
    assert_eq!(
        r.metric(
            "fanout_connections_refused_total",
            &[("reason", "user_limit")]
        )
        .await,
        0.0
    );
    members.pop().unwrap().disconnect();
    r.wait_metric("fanout_connections", &[], |n| n == 3.0).await;
    let mut dave = r.login("acme", "dave").await;
    r.publish("acme", "tick", json!("a")).await;
    assert_eq!(dave.expect("tick", QUICK).await, json!("a"));
    for member in &mut members {
        assert_eq!(member.expect("tick", QUICK).await, json!("a"));
    }
}
