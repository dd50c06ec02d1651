//! The supervised tasks: a task that fails is shown by readiness, counted, and restarted,
//! or, when the replica cannot do without its state, the replica exits non-zero. Faults
//! are injected through `POST /faults/{task}`, which only a build with the
//! `fault-injection` feature has (scripts/test builds with it).

use std::time::Duration;

use fanout_testkit::*;
use serde_json::json;

async fn inject(r: &Replica, task: &str) {
    let reply = r.post_raw(&format!("/faults/{task}"), "", None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_subscriber_makes_the_replica_unready_until_it_is_back() {
    let redis = RedisServer::start().await;
    let mut r = Replica::on(&redis, "a").await;
    let mut alice = r.login("acme", "alice").await;
    r.publish("acme", "before", json!(1)).await;
    assert_eq!(alice.expect("before", QUICK).await, json!(1));

    inject(&r, "redis-subscriber").await;
    let unready = eventually("/readyz to name the failed task", SOON, || async {
        let reply = r.get("/readyz").await?;
        (reply.status == 503).then_some(reply)
    })
    .await;
    let reason = unready.json["reason"].as_str().unwrap();
    assert!(reason.contains("redis-subscriber"), "{reason}");
    assert_eq!(
        r.metric(
            "fanout_task_failures_total",
            &[("task", "redis-subscriber")]
        )
        .await,
        1.0
    );
    assert_eq!(r.metric("fanout_ready", &[]).await, 0.0);

    // Restarted: ready again, subscribed again, and the dead one's reader gone (no
    // message twice).
    r.wait_ready().await;
    r.publish("acme", "after", json!(2)).await;
    assert_eq!(alice.expect("after", QUICK).await, json!(2));
    r.publish("acme", "marker", json!(3)).await;
    assert_eq!(alice.expect("marker", QUICK).await, json!(3));
    assert!(alice.next(Duration::from_millis(300)).await.is_none());
    assert_eq!(
        r.metric("fanout_redis_reconnects_total", &[]).await,
        1.0,
        "the new subscriber counts as a reconnect (events meanwhile are read back)"
    );
    assert!(
        r.stderr()
            .contains("task failed (panicked: fault injected); restarting")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_replica_cannot_do_without_stops_it_with_a_non_zero_exit() {
    let mut r = Replica::builder().start().await;
    let _alice = r.login("acme", "alice").await;
    inject(&r, "session-expiry").await;
    let status = r
        .wait_exit(SOON)
        .await
        .expect("the replica exits after a fatal task failure");
    assert_eq!(status.code(), Some(1), "{}", r.stderr());
    let stderr = r.stderr();
    assert!(
        stderr.contains("task session-expiry failed (see the log above); the replica stopped"),
        "{stderr}"
    );
    assert!(stderr.contains("shutdown complete"), "{stderr}");
}
