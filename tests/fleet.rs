//! Fleet mode: several replicas on one Redis, as behind a load balancer.
//!
//! What a dashboard must be able to count on: a message reaches every socket of its
//! organization exactly once whichever replica took it in and whichever replica holds the
//! socket; nothing crosses organizations (or users, for targeted messages); workers may
//! PUBLISH to Redis directly, and a malformed PUBLISH is dropped, counted, and harmless.
//! And the invariant of the Redis bus: a replica is subscribed to an organization's channel
//! exactly while it holds a socket of that organization.

use fanout_testkit::*;
use futures_util::future::join_all;
use serde_json::{Value, json};

fn channel(org: &str) -> String {
    format!("fanout:org:{org}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_every_replica_exactly_once() {
    let redis = RedisServer::start().await;
    let a = Replica::on(&redis, "a").await;
    let b = Replica::on(&redis, "b").await;
    let mut on_a = a.login("acme", "alice").await;
    let mut on_b = b.login("acme", "bob").await;

    let mut expected = Vec::new();
    for i in 0..6 {
        let via = if i % 2 == 0 { &a } else { &b };
        let (path, event, body) = if i % 3 == 2 {
            let body = json!({"organizationId": "acme", "taskId": format!("t{i}"), "log": format!("line {i}")});
            ("/executions/log", "execution-log", body)
        } else {
            let body = json!({"organizationId": "acme", "taskId": format!("t{i}"), "status": "RUNNING", "progress": i, "extra": {"nested": [1, 2]}});
            ("/executions/update", "execution-updated", body)
        };
        let r = via.post(path, &body).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json, json!({"status": "broadcasted"}));
        expected.push((event.to_string(), body));
    }
    b.publish("acme", "marker", Value::Null).await;

    assert_eq!(on_a.events_until("marker", QUICK).await, expected);
    assert_eq!(on_b.events_until("marker", QUICK).await, expected);
    assert_eq!(
        a.metric("fanout_messages_published_total", &[("source", "http")])
            .await,
        3.0
    );
    assert_eq!(
        b.metric("fanout_messages_published_total", &[("source", "http")])
            .await,
        4.0
    );
    // Counted just after the hand-off, so possibly a moment after the client saw it.
    a.wait_metric("fanout_messages_delivered_total", &[], |v| v == 7.0)
        .await;
    b.wait_metric("fanout_messages_delivered_total", &[], |v| v == 7.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_never_leak_across_organizations() {
    const ORGS: usize = 20;
    const CLIENTS_PER_ORG: usize = 3;
    const MESSAGES: usize = 5;
    let redis = RedisServer::start().await;
    let replicas = [
        Replica::on(&redis, "r0").await,
        Replica::on(&redis, "r1").await,
        Replica::on(&redis, "r2").await,
    ];
    let org = |i: usize| format!("org-{i:02}");

    // Every organization has a socket on every replica.
    let logins = (0..ORGS).flat_map(|i| {
        let replicas = &replicas;
        (0..CLIENTS_PER_ORG).map(move |j| async move {
            let client = replicas[(i + j) % 3]
                .login(&org(i), &format!("user-{j}"))
                .await;
            (i, client)
        })
    });
    let mut clients = join_all(logins).await;

    // Every organization publishes at the same time, through all replicas in turn.
    let publishers = (0..ORGS).map(|i| {
        let replicas = &replicas;
        async move {
            for seq in 0..MESSAGES {
                let body = json!({"organizationId": org(i), "taskId": format!("task-{seq}"), "log": format!("{}#{seq}", org(i))});
                let r = replicas[(i + seq) % 3].post("/executions/log", &body).await;
                assert_eq!(r.status, 200, "{r:?}");
            }
            replicas[i % 3].publish(&org(i), "done", Value::Null).await;
        }
    });
    join_all(publishers).await;

    for (i, client) in &mut clients {
        let got = client.events_until("done", SOON).await;
        let logs: Vec<Value> = got
            .iter()
            .map(|(event, data)| {
                assert_eq!(event, "execution-log");
                assert_eq!(
                    data["organizationId"],
                    json!(org(*i)),
                    "foreign message {data}"
                );
                data["log"].clone()
            })
            .collect();
        let expected: Vec<Value> = (0..MESSAGES)
            .map(|seq| json!(format!("{}#{seq}", org(*i))))
            .collect();
        assert_eq!(logs, expected, "messages of {}", org(*i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_targeted_message_reaches_only_that_user_of_that_organization() {
    let redis = RedisServer::start().await;
    let a = Replica::on(&redis, "a").await;
    let b = Replica::on(&redis, "b").await;
    let mut alice_a = a.login("acme", "alice").await;
    let mut alice_b = b.login("acme", "alice").await;
    let mut bob = a.login("acme", "bob").await;
    let mut other_alice = b.login("globex", "alice").await;
    let numeric =
        json!({"organizationId": "acme", "userId": 7, "role": "member", "exp": now_secs() + 600});
    let (mut seven, hello) = Client::authenticated(b.public, &token_with(&numeric)).await;
    assert_eq!(
        hello["userId"],
        json!(7),
        "numeric ids are echoed as the token has them"
    );

    a.publish_to_user("acme", "alice", "notice", json!({"n": 1}))
        .await;
    b.publish_to_user("acme", "alice", "notice", json!({"n": 2}))
        .await;
    let r = a
        .post(
            "/v1/publish",
            &json!({"organizationId": "acme", "userId": 7, "event": "notice", "data": {"n": 3}}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    a.publish("acme", "marker", Value::Null).await;
    a.publish("globex", "marker", Value::Null).await;

    let to_alice = vec![
        ("notice".to_string(), json!({"n": 1})),
        ("notice".to_string(), json!({"n": 2})),
    ];
    assert_eq!(alice_a.events_until("marker", QUICK).await, to_alice);
    assert_eq!(alice_b.events_until("marker", QUICK).await, to_alice);
    assert_eq!(
        seven.events_until("marker", QUICK).await,
        vec![("notice".to_string(), json!({"n": 3}))]
    );
    assert_eq!(bob.events_until("marker", QUICK).await, vec![]);
    assert_eq!(other_alice.events_until("marker", QUICK).await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_redis_publish_is_delivered() {
    let redis = RedisServer::start().await;
    let a = Replica::on(&redis, "a").await;
    let b = Replica::on(&redis, "b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;

    let ts = now_secs() * 1000;
    let build = format!(r#"{{"event":"build-finished","data":{{"id":1,"ok":true}},"ts":{ts}}}"#);
    assert_eq!(
        redis.publish(&channel("acme"), build).await,
        2,
        "both replicas subscribe"
    );
    let dm = r#"{"event":"direct","data":"for bob","userId":"bob"}"#;
    assert_eq!(redis.publish(&channel("acme"), dm).await, 2);
    assert_eq!(
        redis.publish(&channel("nobody"), dm).await,
        0,
        "no replica holds that org"
    );
    redis
        .publish(&channel("acme"), r#"{"event":"marker","data":null}"#)
        .await;

    let build = ("build-finished".to_string(), json!({"id": 1, "ok": true}));
    assert_eq!(
        alice.events_until("marker", QUICK).await,
        vec![build.clone()]
    );
    assert_eq!(
        bob.events_until("marker", QUICK).await,
        vec![build, ("direct".to_string(), json!("for bob"))]
    );
    for replica in [&a, &b] {
        assert_eq!(
            replica
                .metric("fanout_messages_published_total", &[("source", "redis")])
                .await,
            3.0,
            "{}",
            replica.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_redis_messages_are_dropped_and_counted() {
    let redis = RedisServer::start().await;
    let a = Replica::builder()
        .redis(&redis)
        .env("FANOUT_MAX_PAYLOAD_BYTES", 1024)
        .start()
        .await;
    let mut client = a.login("acme", "alice").await;

    let oversized = json!({"event": "big", "data": "x".repeat(2000)}).to_string();
    let malformed: Vec<(&[u8], &str)> = vec![
        (b"not json", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        (br#"{"data":1}"#, "invalid_json"),
        (br#"{"event":"no-data"}"#, "invalid_json"),
        (br#"[1,2,3]"#, "invalid_json"),
        (br#"{"event":"bad name","data":1}"#, "bad_event"),
        (br#"{"event":42,"data":1}"#, "bad_event"),
        (br#"{"event":"connect","data":1}"#, "bad_event"),
        (
            br#"{"event":"auth-success","data":{"organizationId":"evil"}}"#,
            "bad_event",
        ),
        (br#"{"event":"e","data":1,"userId":""}"#, "bad_user_id"),
        (oversized.as_bytes(), "too_large"),
    ];
    for (payload, _) in &malformed {
        assert_eq!(redis.publish(&channel("acme"), payload).await, 1);
    }
    redis
        .publish(
            &channel("acme"),
            r#"{"event":"marker","data":"still working"}"#,
        )
        .await;

    assert_eq!(client.events_until("marker", QUICK).await, vec![]);
    let metrics = a.metrics().await;
    for reason in ["invalid_json", "bad_event", "bad_user_id", "too_large"] {
        let expected = malformed.iter().filter(|(_, r)| *r == reason).count() as f64;
        assert_eq!(
            metrics.get("fanout_malformed_messages_total", &[("reason", reason)]),
            expected,
            "reason {reason}"
        );
    }
    assert_eq!(a.readyz().await, Some(200));
    a.publish("acme", "after", json!(1)).await;
    assert_eq!(client.expect("after", QUICK).await, json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_follow_presence() {
    let redis = RedisServer::start().await;
    let a = Replica::on(&redis, "a").await;
    let b = Replica::on(&redis, "b").await;
    let acme = vec![channel("acme")];
    assert_eq!(redis.channels("fanout:org:*").await, Vec::<String>::new());

    // auth-success means subscribed: no waiting.
    let first = a.login("acme", "u1").await;
    assert_eq!(redis.channels("fanout:org:*").await, acme);
    assert_eq!(redis.numsub(&acme).await, [1]);
    assert_eq!(a.metric("fanout_redis_subscriptions", &[]).await, 1.0);
    let second = a.login("acme", "u2").await;
    let third = b.login("acme", "u3").await;
    assert_eq!(
        redis.numsub(&acme).await,
        [2],
        "one subscription per replica"
    );

    // A rejected socket subscribes to nothing.
    let forged = sign(
        &json!({"organizationId": "ghost", "userId": "u", "role": "member", "exp": now_secs() + 60}),
        "not-the-secret",
    );
    let mut rejected = Client::with_token(a.public, &forged).await;
    rejected.expect("auth-error", QUICK).await;
    rejected.expect_disconnect(QUICK).await;
    let globex = b.login("globex", "u1").await;
    assert_eq!(
        redis.channels("fanout:org:*").await,
        vec![channel("acme"), channel("globex")]
    );

    // Leaving: a polite disconnect, then a dropped connection.
    first.disconnect();
    a.wait_metric("fanout_connections", &[], |v| v == 1.0).await;
    assert_eq!(
        redis.numsub(&acme).await,
        [2],
        "a still holds a socket of acme"
    );
    drop(second);
    eventually("a to unsubscribe from acme", SOON, || async {
        (redis.numsub(&acme).await == [1]).then_some(())
    })
    .await;
    a.wait_metric("fanout_redis_subscriptions", &[], |v| v == 0.0)
        .await;
    drop(third);
    eventually("b to unsubscribe from acme", SOON, || async {
        (redis.channels("fanout:org:*").await == [channel("globex")]).then_some(())
    })
    .await;
    globex.disconnect();
    eventually("no subscription left", SOON, || async {
        redis
            .channels("fanout:org:*")
            .await
            .is_empty()
            .then_some(())
    })
    .await;
    b.wait_metric("fanout_redis_subscriptions", &[], |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_auth_success_is_delivered() {
    let redis = RedisServer::start().await;
    let a = Replica::on(&redis, "a").await;
    let b = Replica::on(&redis, "b").await;
    for i in 0..15 {
        let org = format!("fresh-{i}");
        let (holder, publisher) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let mut client = holder.login(&org, "u").await;
        publisher.publish(&org, "first", json!(i)).await;
        assert_eq!(client.expect("first", QUICK).await, json!(i), "org {org}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_with_different_prefixes_share_a_redis_without_mixing() {
    let redis = RedisServer::start().await;
    let blue = Replica::builder()
        .name("blue")
        .redis(&redis)
        .env("FANOUT_REDIS_PREFIX", "blue:")
        .start()
        .await;
    let green = Replica::builder()
        .name("green")
        .redis(&redis)
        .env("FANOUT_REDIS_PREFIX", "green:")
        .start()
        .await;
    let mut on_blue = blue.login("acme", "u").await;
    let mut on_green = green.login("acme", "u").await;
    assert_eq!(
        redis.channels("*:org:*").await,
        vec!["blue:org:acme".to_string(), "green:org:acme".to_string()]
    );
    // Each replica probes its subscription on a channel of its own, under its prefix.
    let probes = redis.channels("*:probe:*").await;
    assert_eq!(probes.len(), 2, "{probes:?}");
    assert!(probes[0].starts_with("blue:probe:") && probes[1].starts_with("green:probe:"));

    blue.publish("acme", "blue-only", json!(1)).await;
    green.publish("acme", "marker", Value::Null).await;
    blue.publish("acme", "marker", Value::Null).await;
    assert_eq!(on_green.events_until("marker", QUICK).await, vec![]);
    assert_eq!(
        on_blue.events_until("marker", QUICK).await,
        vec![("blue-only".to_string(), json!(1))]
    );
}
