//! Failures a replica must live through: Redis going away and coming back, a dashboard
//! that stops reading, and being stopped for a deploy.

use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_is_survived() {
    let mut redis = RedisServer::start().await;
    let mut a = Replica::on(&redis, "a").await;
    let mut b = Replica::on(&redis, "b").await;
    let mut alice = a.login("acme", "alice").await;
    let mut bob = b.login("acme", "bob").await;
    assert_eq!(a.metric("fanout_ready", &[]).await, 1.0);
    a.publish("acme", "before", json!(1)).await;
    assert_eq!(alice.expect("before", QUICK).await, json!(1));
    assert_eq!(bob.expect("before", QUICK).await, json!(1));

    redis.stop();
    // Gauges are set just after the readiness flag flips: wait for them rather than read once.
    for replica in [&mut a, &mut b] {
        replica.wait_readyz(503).await;
        replica
            .wait_metric("fanout_redis_up", &[], |v| v == 0.0)
            .await;
        // Set from the same condition as /readyz at each scrape.
        assert_eq!(replica.metric("fanout_ready", &[]).await, 0.0);
    }
    // A dashboard connecting during the outage is served once Redis is back.
    let mut carol = Client::with_token(a.public, &valid_token("globex", "carol")).await;

    redis.restart().await;
    for replica in [&mut a, &mut b] {
        replica.wait_ready().await;
        replica
            .wait_metric("fanout_redis_up", &[], |v| v == 1.0)
            .await;
        replica
            .wait_metric("fanout_redis_reconnects_total", &[], |v| v >= 1.0)
            .await;
        replica.wait_metric("fanout_ready", &[], |v| v == 1.0).await;
    }
    carol.expect("auth-success", SOON).await;
    assert_eq!(
        redis.channels("fanout:org:*").await,
        ["fanout:org:acme", "fanout:org:globex"]
    );
    assert_eq!(redis.numsub(&["fanout:org:acme".to_string()]).await, [2]);
    a.wait_metric("fanout_redis_subscriptions", &[], |v| v == 2.0)
        .await;
    b.wait_metric("fanout_redis_subscriptions", &[], |v| v == 1.0)
        .await;

    b.publish("acme", "after", json!(2)).await;
    b.publish("globex", "after", json!(3)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(2));
    assert_eq!(bob.expect("after", QUICK).await, json!(2));
    assert_eq!(carol.expect("after", QUICK).await, json!(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_redis_becomes_ready_when_redis_appears() {
    let mut redis = RedisServer::start().await;
    redis.stop();
    let mut r = Replica::builder().redis(&redis).spawn().await;
    assert_eq!(r.readyz().await, Some(503));
    let reply = r.get("/readyz").await.unwrap();
    assert_eq!(reply.json["status"], json!("not ready"), "{reply:?}");
    assert_eq!(reply.json["bus"], json!("redis"), "{reply:?}");
    assert_eq!(r.metric("fanout_redis_up", &[]).await, 0.0);

    redis.restart().await;
    r.wait_ready().await;
    let mut client = r.login("acme", "alice").await;
    r.publish("acme", "hello", json!(1)).await;
    assert_eq!(client.expect("hello", QUICK).await, json!(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_redis_link_stays_up_and_loses_nothing() {
    // Long enough for one of the default 5 s liveness probes of b, and for a score of a's.
    const RUN: Duration = Duration::from_secs(7);
    let redis = RedisServer::start().await;
    let a = Replica::builder()
        .name("a")
        .redis(&redis)
        .env("FANOUT_BUS_PROBE_INTERVAL", "300ms")
        .start()
        .await;
    let b = Replica::on(&redis, "b").await;
    let mut client = a.login("acme", "alice").await;

    let started = Instant::now();
    let mut sent = 0u64;
    let mut not_ready = Vec::new();
    while started.elapsed() < RUN {
        b.publish("acme", "tick", json!(sent)).await;
        sent += 1;
        if a.readyz().await != Some(200) {
            not_ready.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.publish("acme", "marker", Value::Null).await;

    let got: Vec<u64> = client
        .events_until("marker", QUICK)
        .await
        .into_iter()
        .map(|(_, n)| n.as_u64().unwrap())
        .collect();
    let missing: Vec<u64> = (0..sent).filter(|n| !got.contains(n)).collect();
    let reconnects = a.metric("fanout_redis_reconnects_total", &[]).await;
    let probe_failures = a.metric("fanout_bus_probe_failures_total", &[]).await;
    assert!(
        missing.is_empty() && not_ready.is_empty() && reconnects == 0.0 && probe_failures == 0.0,
        "Redis never failed, yet: {} of {sent} messages lost ({missing:?}), /readyz not 200 at {not_ready:?}, \
         {reconnects} reconnects, {probe_failures} probe failures",
        missing.len()
    );
    assert_eq!(got, (0..sent).collect::<Vec<_>>());
    let probes = a.metric("fanout_bus_probe_rtt_seconds_count", &[]).await;
    assert!(probes >= 10.0, "only {probes} probes came back in {RUN:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_connection_killed_by_the_server_is_made_again() {
    let redis = RedisServer::start().await;
    let mut a = Replica::on(&redis, "a").await;
    let mut b = Replica::on(&redis, "b").await;
    let mut alice = a.login("acme", "alice").await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    assert_eq!(killed, 2, "one subscriber connection per replica");
    for replica in [&mut a, &mut b] {
        replica
            .wait_metric("fanout_redis_reconnects_total", &[], |v| v >= 1.0)
            .await;
        replica.wait_ready().await;
    }
    assert_eq!(redis.numsub(&["fanout:org:acme".to_string()]).await, [1]);
    b.publish("acme", "after", json!(1)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(1));
}

/// A subscription connection that stays open but carries nothing any more (a proxy or a
/// NAT that stopped forwarding): the probe finds it, the replica says it is unready, and
/// it subscribes again on a new connection once the path works. What another replica
/// published meanwhile (and was answered 200 for: its own subscription was fine) never
/// reached this one's member, and this one counts exactly that in `fanout_bus_missed_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_found_by_the_probe_and_made_again() {
    let redis = RedisServer::start().await;
    let proxy = Proxy::start(([127, 0, 0, 1], redis.port()).into()).await;
    let mut a = Replica::builder()
        .name("a")
        .redis_url(&proxy.url())
        .env("FANOUT_BUS_PROBE_INTERVAL", "300ms")
        .start()
        .await;
    let b = Replica::on(&redis, "b").await;
    let mut alice = a.login("acme", "alice").await;
    b.publish("acme", "before", json!(1)).await;
    assert_eq!(alice.expect("before", QUICK).await, json!(1));
    a.wait_metric("fanout_bus_probe_rtt_seconds_count", &[], |v| v >= 1.0)
        .await;

    proxy.silence_subscribers();
    // b's publishes go on, answered 200 while a's subscription is silent, until a has
    // found it out. Each publish is finished before the loop looks again (one dropped in
    // flight could be published yet not counted).
    let found = std::sync::atomic::AtomicBool::new(false);
    let publishing = async {
        let mut sent = 0u64;
        while !found.load(std::sync::atomic::Ordering::Acquire) {
            b.publish("acme", "tick", json!(sent)).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    };
    let finding = async {
        // Found by the probe within two intervals, well before the PING's 3 s timeout.
        a.wait_metric(
            "fanout_bus_probe_failures_total",
            &[("reason", "lost")],
            |v| v >= 1.0,
        )
        .await;
        a.wait_readyz(503).await;
        found.store(true, std::sync::atomic::Ordering::Release);
    };
    let (sent, ()) = tokio::join!(publishing, finding);
    let reply = a.get("/readyz").await.unwrap();
    assert_eq!(reply.json["bus"], json!("redis"), "{reply:?}");
    // Refused while this replica cannot receive: a publish through it would reach no one
    // here, and its publisher must be told.
    let body = json!({"organizationId": "acme", "event": "during", "data": 2});
    let refused = a.post("/v1/publish", &body).await;
    assert_eq!(refused.status, 503, "{refused:?}");

    proxy.resume();
    a.wait_ready().await;
    a.wait_metric("fanout_redis_reconnects_total", &[], |v| v >= 1.0)
        .await;
    b.publish("acme", "after", json!(3)).await;
    let got: Vec<Value> = alice
        .events_until("after", QUICK)
        .await
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let missed = (0..sent).filter(|n| !got.contains(&json!(n))).count() as f64;
    assert!(
        missed > 0.0,
        "{sent} published while silent, all of them arrived?"
    );
    let counted = a
        .wait_metric("fanout_bus_missed_total", &[], |v| v >= missed)
        .await;
    assert_eq!(
        counted, missed,
        "a's member missed {missed} of b's {sent}: the metric must say so"
    );
    eprintln!("a's member missed {missed} of {sent} published through b; a counted {counted}");
    assert_eq!(a.metric("fanout_bus_duplicates_total", &[]).await, 0.0);
    assert_eq!(b.metric("fanout_bus_missed_total", &[]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_without_hurting_others() {
    const BUFFER: usize = 16;
    const BATCH: usize = BUFFER / 2;
    const MAX_MESSAGES: usize = 20_000;
    let redis = RedisServer::start().await;
    let r = Replica::builder()
        .redis(&redis)
        .env("FANOUT_SOCKET_BUFFER", BUFFER)
        .start()
        .await;
    let mut fast = r.login("acme", "fast").await;
    let slow = SlowClient::connect(r.public, &valid_token("acme", "slow"), 4096).await;

    // Flood the organization until the replica gives up on the slow socket. Batches are
    // smaller than the socket buffer and the fast client reads each one before the next is
    // sent, so the fast client is never a slow consumer itself.
    let pad = "x".repeat(1500);
    let mut conn = redis.conn().await;
    let mut sent = 0;
    while r
        .metric("fanout_slow_consumer_disconnects_total", &[])
        .await
        < 1.0
    {
        assert!(
            sent < MAX_MESSAGES,
            "no slow-consumer disconnect after {sent} messages"
        );
        let mut pipe = redis::pipe();
        for seq in sent..sent + BATCH {
            let envelope = json!({"event": "flood", "data": {"seq": seq, "pad": pad}});
            pipe.cmd("PUBLISH")
                .arg("fanout:org:acme")
                .arg(envelope.to_string())
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
        for seq in sent..sent + BATCH {
            let data = fast.expect("flood", QUICK).await;
            assert_eq!(
                data["seq"],
                json!(seq),
                "the fast socket gets every message in order"
            );
        }
        sent += BATCH;
    }

    let drained = slow.drain(SOON).await;
    assert!(
        drained.closed.is_some(),
        "the slow socket is still open: {drained:?}"
    );
    assert!(
        !drained.disconnect_packet,
        "its transport is cut, not a Socket.IO disconnect (after which a client does not reconnect)"
    );
    assert!(
        drained.events < sent,
        "it cannot have received everything: {drained:?}"
    );
    let m = r.metrics().await;
    assert_eq!(m.get("fanout_slow_consumer_disconnects_total", &[]), 1.0);
    assert!(
        m.get(
            "fanout_messages_dropped_total",
            &[("reason", "slow_consumer")]
        ) >= 1.0
    );
    r.wait_metric("fanout_connections", &[], |v| v == 1.0).await;
    r.publish("acme", "after", json!(sent)).await;
    assert_eq!(fast.expect("after", QUICK).await, json!(sent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_connection_and_exits_cleanly() {
    let redis = RedisServer::start().await;
    let mut r = Replica::builder()
        .redis(&redis)
        .env("FANOUT_SHUTDOWN_TIMEOUT", "5s")
        .start()
        .await;
    let mut clients = vec![r.login("acme", "a").await, r.login("globex", "b").await];

    let sent = Instant::now();
    r.sigterm();
    for client in &mut clients {
        let before = client.expect_closed(SOON).await;
        assert!(
            before.iter().all(|p| matches!(p, Packet::Disconnect)),
            "only a disconnect may precede the close: {before:?}"
        );
    }
    // Clients were closed, so shutdown has begun: the replica must not look ready again.
    assert_ne!(r.readyz().await, Some(200), "ready while shutting down");
    let status = r
        .wait_exit(Duration::from_secs(7))
        .await
        .expect("still running 7 s after SIGTERM with a 5 s shutdown timeout");
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        sent.elapsed() < Duration::from_secs(6),
        "took {:?}",
        sent.elapsed()
    );
    assert!(r.stderr().contains("shutdown complete"));
}
