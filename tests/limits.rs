//! Fair use: what one user or one organization may hold on a replica, and what one ingest
//! key may publish to it.
//!
//! A socket over a cap is refused the way a bad token is (`auth-error` `Too many
//! connections`, then a DISCONNECT), is counted in `fanout_connections_refused_total{reason}`,
//! and holds nothing afterwards: the sockets already admitted go on receiving, and a socket
//! that leaves makes room for the next. A key over its rate gets 429 with `Retry-After`, and
//! nothing of the refused request is delivered.

use fanout_testkit::replica::reply;
use fanout_testkit::*;
use serde_json::json;

const TOO_MANY: &str = "Too many connections";

fn auth(org: &str, user: &str) -> Option<serde_json::Value> {
    Some(json!({ "token": valid_token(org, user) }))
}

/// A replica with `setting` set to `value`.
async fn replica_with(setting: &str, value: impl ToString) -> Replica {
    Replica::builder().env(setting, value).start().await
}

/// `fanout_connections_refused_total{reason}` on `r`.
async fn refused(r: &Replica, reason: &str) -> f64 {
    r.metric("fanout_connections_refused_total", &[("reason", reason)])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_connection_cap_is_refused_and_counted() {
    let r = replica_with("FANOUT_MAX_CONNECTIONS_PER_USER", 2).await;
    let first = r.login("acme", "alice").await;
    let mut second = r.login("acme", "alice").await;
    Client::refused(r.public, auth("acme", "alice"), TOO_MANY).await;
    assert_eq!(refused(&r, "user_limit").await, 1.0);
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
    assert_eq!(refused(&r, "user_limit").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organization_over_its_connection_cap_is_refused_and_counted() {
    let r = replica_with("FANOUT_MAX_CONNECTIONS_PER_ORG", 3).await;
    let mut members = Vec::new();
    for user in ["alice", "bob", "carol"] {
        members.push(r.login("acme", user).await);
    }
    Client::refused(r.public, auth("acme", "dave"), TOO_MANY).await;
    Client::refused(r.public, auth("acme", "alice"), TOO_MANY).await;
    assert_eq!(refused(&r, "org_limit").await, 2.0);
    // Another organization has a cap of its own.
    let mut globex = r.login("globex", "dave").await;
    r.publish("globex", "tick", json!("g")).await;
    assert_eq!(globex.expect("tick", QUICK).await, json!("g"));

    // The default cap per user (100) is not what refused them.
    assert_eq!(refused(&r, "user_limit").await, 0.0);
    members.pop().unwrap().disconnect();
    r.wait_metric("fanout_connections", &[], |n| n == 3.0).await;
    let mut dave = r.login("acme", "dave").await;
    r.publish("acme", "tick", json!("a")).await;
    assert_eq!(dave.expect("tick", QUICK).await, json!("a"));
    for member in &mut members {
        assert_eq!(member.expect("tick", QUICK).await, json!("a"));
    }
}

/// One key's messages over `FANOUT_INGEST_RATE` are refused with 429 and `Retry-After`,
/// counted under the key's position, never delivered; another key's budget is its own, and
/// the refused key is accepted again once its budget refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_key_over_its_rate_is_told_when_to_retry() {
    const RATE: usize = 5;
    let r = replica_with("FANOUT_INGEST_RATE", RATE).await;
    let mut member = r.login("acme", "alice").await;
    let publish = |key: &'static str, n: usize| {
        let body = json!({ "organizationId": "acme", "event": "tick", "data": n });
        let r = &r;
        async move { r.post_raw("/v1/publish", body.to_string(), Some(key)).await }
    };
    // A burst of one second's worth is taken at once.
    for n in 0..RATE {
        let reply = publish(INGEST_KEY, n).await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let refused = publish(INGEST_KEY, 99).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    let error = refused.json["error"].as_str().unwrap();
    assert!(
        error.contains("ingest key 1")
            && error.contains("FANOUT_INGEST_RATE")
            && !error.contains(INGEST_KEY),
        "{error}"
    );
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        retry_after, 1,
        "a budget of {RATE}/s refills within a second"
    );
    assert_eq!(
        r.metric("fanout_ingest_rate_limited_total", &[("key", "1")])
            .await,
        1.0
    );

    // The second key has a budget of its own.
    let reply = publish(INGEST_KEY_NEXT, RATE).await;
    assert_eq!(reply.status, 200, "{reply:?}");

    // The refused message was never delivered.
    let marker = json!({ "organizationId": "acme", "event": "marker", "data": null });
    let reply = r
        .post_raw("/v1/publish", marker.to_string(), Some(INGEST_KEY_NEXT))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got: Vec<_> = member
        .events_until("marker", QUICK)
        .await
        .into_iter()
        .map(|(_, data)| data)
        .collect();
    let expected: Vec<_> = (0..=RATE).map(|n| json!(n)).collect();
    assert_eq!(got, expected);

    // Within Retry-After, the first key's budget has refilled.
    let again = tokio::time::timeout(QUICK, async {
        loop {
            if publish(INGEST_KEY, 100).await.status == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(again.is_ok(), "ingest key 1 still refused after {QUICK:?}");
}

/// Opens an Engine.IO session by long-polling, as a browser's first request does, with
/// `X-Forwarded-For: forwarded_for`; answers the status and the reply's `Retry-After`.
async fn handshake(r: &Replica, forwarded_for: &str) -> (u16, Option<String>, String) {
    let resp = reqwest::Client::new()
        .get(format!(
            "http://{}/socket.io/?EIO=4&transport=polling",
            r.public
        ))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .expect("handshake request");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, resp.text().await.unwrap())
}

/// Each client host may open `FANOUT_HANDSHAKE_RATE_PER_HOST` sessions per second: the next
/// gets 429 with `Retry-After`. Behind a trusted proxy the host is the one its
/// `X-Forwarded-For` names; from anyone else that header changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_over_its_handshake_rate_is_told_when_to_retry() {
    const RATE: usize = 3;
    let behind_proxy = Replica::builder()
        .env("FANOUT_HANDSHAKE_RATE_PER_HOST", RATE)
        .env("FANOUT_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8")
        .start()
        .await;
    for _ in 0..RATE {
        assert_eq!(handshake(&behind_proxy, "203.0.113.7").await.0, 200);
    }
    let (status, retry_after, body) = handshake(&behind_proxy, "203.0.113.7").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"), "{body}");
    assert!(body.contains("FANOUT_HANDSHAKE_RATE_PER_HOST"), "{body}");
    // Another client behind the same proxy has a budget of its own; a client that claims an
    // address in front of the proxy's own hop is still the host the proxy saw.
    assert_eq!(handshake(&behind_proxy, "203.0.113.8").await.0, 200);
    assert_eq!(
        handshake(&behind_proxy, "198.51.100.1, 203.0.113.7")
            .await
            .0,
        429
    );
    assert_eq!(refused(&behind_proxy, "host_rate").await, 2.0);

    // Without trusted proxies, the header is the client's own word: every handshake here
    // comes from 127.0.0.1, whatever it claims.
    let direct = replica_with("FANOUT_HANDSHAKE_RATE_PER_HOST", RATE).await;
    for n in 0..RATE {
        assert_eq!(handshake(&direct, &format!("203.0.113.{n}")).await.0, 200);
    }
    assert_eq!(handshake(&direct, "203.0.113.99").await.0, 429);
}

/// A user's REST reads over `FANOUT_REST_RATE_PER_USER` are answered 429 with
/// `Retry-After`, before any read is made (here the replica has no history: the reads within
/// the budget are answered 404, saying so); another user's budget is its own, and a token
/// that is not valid is refused as before, from no one's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_over_its_rest_rate_is_told_when_to_retry() {
    const RATE: usize = 3;
    let r = replica_with("FANOUT_REST_RATE_PER_USER", RATE).await;
    let http = reqwest::Client::new();
    let get = |token: String| {
        let req = http
            .get(format!("http://{}/v1/executions", r.public))
            .bearer_auth(token);
        async move { reply(req.send().await.expect("GET /v1/executions")).await }
    };
    for _ in 0..RATE {
        let answer = get(valid_token("acme", "alice")).await;
        assert_eq!(answer.status, 404, "{answer:?}");
    }
    let refused = get(valid_token("acme", "alice")).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.headers["retry-after"], "1");
    let error = refused.json["error"].as_str().unwrap();
    assert!(error.contains("FANOUT_REST_RATE_PER_USER"), "{error}");
    assert_eq!(r.metric("fanout_rest_rate_limited_total", &[]).await, 1.0);

    assert_eq!(get(valid_token("acme", "bob")).await.status, 404);
    assert_eq!(get("not-a-token".into()).await.status, 401);
    assert_eq!(r.metric("fanout_rest_rate_limited_total", &[]).await, 1.0);
}

/// A client sending more than `FANOUT_MAX_PACKETS_PER_SECOND` is disconnected and counted;
/// another member of its organization goes on receiving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_packet_rate_is_disconnected() {
    const RATE: usize = 50;
    let r = replica_with("FANOUT_MAX_PACKETS_PER_SECOND", RATE).await;
    let mut calm = r.login("acme", "alice").await;
    let mut noisy = r.login("acme", "mallory").await;
    // A dashboard's few packets are far inside the budget: an auth-refresh is answered.
    let ack = noisy
        .emit_with_ack(
            "auth-refresh",
            json!({ "token": valid_token("acme", "mallory") }),
            QUICK,
        )
        .await;
    assert_eq!(ack[0]["ok"], json!(true), "{ack}");
    for n in 0..RATE * 4 {
        noisy.emit("noise", json!(n));
    }
    noisy.expect_closed(QUICK).await;
    r.wait_metric(
        "fanout_connections_refused_total",
        &[("reason", "packet_rate")],
        |n| n == 1.0,
    )
    .await;
    r.wait_metric("fanout_connections", &[], |n| n == 1.0).await;
    r.publish("acme", "tick", json!(1)).await;
    assert_eq!(calm.expect("tick", QUICK).await, json!(1));
}
