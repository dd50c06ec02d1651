//! The durable history: sequence numbers, projections, delivery in order, replay on
//! reconnect and `resync-required`, against a real PostgreSQL (a database per test) and,
//! for fleets, a real redis-server.

use std::collections::BTreeMap;
use std::time::Duration;

use fanout_testkit::*;
use serde_json::{Value, json};

async fn durable_replica(db: &TestDb) -> Replica {
    Replica::builder().database(db).start_with_store().await
}

/// Replicas `a` and `b` on one Redis and one database, their stores up.
async fn durable_pair(redis: &RedisServer, db: &TestDb) -> (Replica, Replica) {
    let mut pair = Vec::new();
    for name in ["a", "b"] {
        let r = Replica::builder()
            .name(name)
            .redis(redis)
            .database(db)
            .start_with_store()
            .await;
        pair.push(r);
    }
    let b = pair.pop().unwrap();
    (pair.pop().unwrap(), b)
}

fn update(org: &str, task: &str, status: &str, extra: Value) -> Value {
    let mut body = json!({"organizationId": org, "taskId": task, "status": status});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    body
}

/// Posts an update and returns its sequence number.
async fn post_update(r: &Replica, body: &Value) -> u64 {
    let reply = r.post("/executions/update", body).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json["status"], "broadcasted", "{reply:?}");
    reply.json["seq"]
        .as_u64()
        .expect("a durable answer has seq")
}

/// Connects with `auth.lastSeq` and waits for `auth-success`.
async fn resume(r: &Replica, org: &str, user: &str, last_seq: Value) -> Client {
    let auth = json!({"token": valid_token(org, user), "lastSeq": last_seq});
    let mut client = Client::connect(r.public, Some(auth)).await;
    client.expect("auth-success", QUICK).await;
    client
}

/// The next `n` durable events as `(seq, data)`; panics on anything else.
async fn durable_events(client: &mut Client, n: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (name, data, seq) = client.next_durable(QUICK).await;
        let seq = seq.unwrap_or_else(|| panic!("{name} {data} has no seq; got so far {out:?}"));
        out.push((seq, data));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_events_are_numbered_per_organization_and_carry_their_seq() {
    let db = TestDb::create().await;
    let r = durable_replica(&db).await;
    let mut alice = r.login("acme", "alice").await;
    let mut bob = r.login("globex", "bob").await;

    let first = update("acme", "t1", "RUNNING", json!({"runner": "r1"}));
    assert_eq!(post_update(&r, &first).await, 1);
    let log =
        json!({"organizationId": "acme", "taskId": "t1", "log": "step 1", "stream": "stdout"});
    let reply = r.post("/executions/log", &log).await;
    assert_eq!(reply.json, json!({"status": "broadcasted", "seq": 2}));
    assert_eq!(
        post_update(&r, &update("globex", "g1", "PENDING", json!({}))).await,
        1,
        "each organization has its own sequence"
    );
    let done = update("acme", "t1", "PASSED", json!({"durationMs": 1234}));
    assert_eq!(post_update(&r, &done).await, 3);
    let reply = r
        .post(
            "/v1/publish",
            &json!({"organizationId": "acme", "event": "report.ready", "data": [1, 2]}),
        )
        .await;
    assert_eq!(reply.json, json!({"status": "published", "seq": 4}));

    // The first argument is the body, unchanged; the second carries the seq.
    assert_eq!(
        durable_events(&mut alice, 4).await,
        vec![(1, first), (2, log.clone()), (3, done), (4, json!([1, 2]))]
    );
    assert_eq!(
        bob.next_durable(QUICK).await,
        (
            "execution-updated".to_string(),
            update("globex", "g1", "PENDING", json!({})),
            Some(1)
        )
    );

    // The projections follow the events.
    let pg = db.connect().await;
    let row = pg
        .query_one(
            "SELECT status::text, started_at IS NOT NULL, finished_at IS NOT NULL, data, last_seq
             FROM executions WHERE organization_id = 'acme' AND task_id = 't1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "PASSED");
    assert!(row.get::<_, bool>(1), "started_at is set by RUNNING");
    assert!(
        row.get::<_, bool>(2),
        "finished_at is set by a final status"
    );
    let data: String = pg
        .query_one(
            "SELECT data::text FROM executions WHERE organization_id = 'acme' AND task_id = 't1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let data: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        data,
        json!({"organizationId": "acme", "taskId": "t1", "status": "PASSED", "runner": "r1", "durationMs": 1234}),
        "updates are merged"
    );
    assert_eq!(row.get::<_, i64>(4), 3);
    let logs: Vec<(i64, String)> = pg
        .query(
            "SELECT seq, data::text FROM execution_logs WHERE organization_id = 'acme' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].0, 2);
    assert_eq!(serde_json::from_str::<Value>(&logs[0].1).unwrap(), log);
    let last: i64 = pg
        .query_one(
            "SELECT last_seq FROM org_sequences WHERE organization_id = 'acme'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, 4);
    r.wait_metric("fanout_durable_events_total", &[], |v| v == 5.0)
        .await;

    // What the REST API serves is what ingest wrote.
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("http://{}{path}", r.public))
            .bearer_auth(valid_token("acme", "alice"))
            .send()
    };
    let one: Value = get("/v1/executions/t1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["status"], "PASSED");
    assert_eq!(one["lastSeq"], 3);
    assert_eq!(one["data"]["runner"], "r1");
    let logs: Value = get("/v1/executions/t1/logs")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(logs["logs"][0]["seq"], 2);
    assert_eq!(logs["logs"][0]["data"], log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_updates_need_a_known_status_and_a_task() {
    let db = TestDb::create().await;
    let r = durable_replica(&db).await;
    let mut client = r.login("acme", "alice").await;

    let reply = r
        .post(
            "/executions/update",
            &update("acme", "t1", "COMPLETED", json!({})),
        )
        .await;
    assert_eq!(reply.status, 400, "{reply:?}");
    let error = reply.json["error"].as_str().unwrap();
    for allowed in [
        "PENDING",
        "RUNNING",
        "PASSED",
        "FAILED",
        "ERROR",
        "CANCELLED",
    ] {
        assert!(error.contains(allowed), "{error}");
    }
    assert!(error.contains("COMPLETED"), "{error}");
    let lowercase = r
        .post(
            "/executions/update",
            &update("acme", "t1", "running", json!({})),
        )
        .await;
    assert_eq!(lowercase.status, 400, "{lowercase:?}");
    let no_task = r
        .post(
            "/v1/publish",
            &json!({"organizationId": "acme", "event": "execution-updated", "data": {"status": "RUNNING"}}),
        )
        .await;
    assert_eq!(no_task.status, 400, "{no_task:?}");
    assert!(no_task.json["error"].as_str().unwrap().contains("taskId"));
    let nul = r
        .post(
            "/executions/log",
            &json!({"organizationId": "acme", "taskId": "t1", "log": "a\u{0}b"}),
        )
        .await;
    assert_eq!(nul.status, 400, "{nul:?}");

    // Nothing refused was numbered or delivered: the next event is seq 1.
    assert_eq!(
        post_update(&r, &update("acme", "t1", "RUNNING", json!({}))).await,
        1
    );
    let (_, _, seq) = client.next_durable(QUICK).await;
    assert_eq!(seq, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_gets_what_it_missed_then_live_events() {
    let db = TestDb::create().await;
    let r = durable_replica(&db).await;
    let mut before = r.login("acme", "alice").await;
    for i in 1..=5 {
        post_update(&r, &update("acme", &format!("t{i}"), "RUNNING", json!({}))).await;
    }
    let seen = durable_events(&mut before, 5).await;
    assert_eq!(
        seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    before.disconnect();

    // While it is away: 5 more, one of them for another user only.
    for i in 6..=9 {
        post_update(&r, &update("acme", &format!("t{i}"), "PASSED", json!({}))).await;
    }
    r.publish_to_user("acme", "bob", "note", json!({"for": "bob"}))
        .await;

    let mut back = resume(&r, "acme", "alice", json!(3)).await;
    let replayed = durable_events(&mut back, 6).await;
    assert_eq!(
        replayed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [4, 5, 6, 7, 8, 9],
        "in order, exactly once, without bob's event 10"
    );
    assert_eq!(replayed[0].1, update("acme", "t4", "RUNNING", json!({})));
    // Then live.
    let live = post_update(&r, &update("acme", "t11", "RUNNING", json!({}))).await;
    assert_eq!(live, 11);
    assert_eq!(durable_events(&mut back, 1).await[0].0, 11);
    assert!(back.next(Duration::from_millis(200)).await.is_none());

    // Bob gets his own event on replay; a client that is up to date gets nothing.
    let mut bob = resume(&r, "acme", "bob", json!(9)).await;
    assert_eq!(
        bob.next_durable(QUICK).await,
        ("note".to_string(), json!({"for": "bob"}), Some(10))
    );
    assert_eq!(durable_events(&mut bob, 1).await[0].0, 11);
    let mut current = resume(&r, "acme", "carol", json!("11")).await;
    assert!(current.next(Duration::from_millis(200)).await.is_none());

    r.wait_metric("fanout_replayed_events_total", &[], |v| v == 8.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_live_meet_without_gap_or_duplicate() {
    let db = TestDb::create().await;
    let r = durable_replica(&db).await;
    for i in 1..=200 {
        post_update(&r, &update("acme", &format!("t{i}"), "RUNNING", json!({}))).await;
    }
    // Publish continuously while clients reconnect from various points.
    let publisher = {
        let url = r.url("/executions/update");
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 201..=400 {
                let body = update("acme", &format!("t{i}"), "RUNNING", json!({}));
                let resp = http
                    .post(&url)
                    .bearer_auth(INGEST_KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
            }
        })
    };
    let mut clients = Vec::new();
    for from in [0u64, 50, 150, 199] {
        clients.push((
            from,
            resume(&r, "acme", &format!("u{from}"), json!(from)).await,
        ));
    }
    publisher.await.unwrap();
    for (from, mut client) in clients {
        let got = durable_events(&mut client, (400 - from) as usize).await;
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, ((from + 1)..=400).collect::<Vec<_>>(), "from {from}");
        assert!(client.next(Duration::from_millis(100)).await.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_far_behind_or_invalid_last_seq_gets_resync_required() {
    let db = TestDb::create().await;
    let r = Replica::builder()
        .database(&db)
        .env("FANOUT_REPLAY_MAX", 5)
        .start_with_store()
        .await;
    for i in 1..=8 {
        post_update(&r, &update("acme", &format!("t{i}"), "RUNNING", json!({}))).await;
    }
    let mut far = resume(&r, "acme", "alice", json!(2)).await;
    assert_eq!(
        far.expect("resync-required", QUICK).await,
        json!({"reason": "too_far_behind", "lastSeq": 2, "latestSeq": 8})
    );
    let mut near = resume(&r, "acme", "bob", json!(3)).await;
    assert_eq!(durable_events(&mut near, 5).await.len(), 5);

    let mut ahead = resume(&r, "acme", "carol", json!(50)).await;
    assert_eq!(
        ahead.expect("resync-required", QUICK).await["reason"],
        "unknown_seq"
    );
    // Also as the first socket of its organization here (the stream's cursor is not read
    // from the store yet when the replay starts).
    post_update(&r, &update("globex", "g1", "RUNNING", json!({}))).await;
    let mut first = resume(&r, "globex", "erin", json!(50)).await;
    assert_eq!(
        first.expect("resync-required", QUICK).await,
        json!({"reason": "unknown_seq", "lastSeq": 50, "latestSeq": 1})
    );
    let mut garbage = resume(&r, "acme", "dave", json!(-1)).await;
    assert_eq!(
        garbage.expect("resync-required", QUICK).await["reason"],
        "invalid_last_seq"
    );

    // All of them carry on with live events.
    post_update(&r, &update("acme", "t9", "RUNNING", json!({}))).await;
    for client in [&mut far, &mut near, &mut ahead, &mut garbage] {
        assert_eq!(durable_events(client, 1).await[0].0, 9);
    }
    r.wait_metric(
        "fanout_resyncs_total",
        &[("reason", "too_far_behind")],
        |v| v == 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_from_two_replicas_arrive_in_sequence_order_on_both() {
    let redis = RedisServer::start().await;
    let db = TestDb::create().await;
    let (a, b) = durable_pair(&redis, &db).await;
    let mut on_a = a.login("acme", "alice").await;
    let mut on_b = b.login("acme", "bob").await;

    // Two publishers per replica, concurrently: commits interleave across replicas.
    let mut publishers = Vec::new();
    for (replica, name) in [(&a, "a"), (&b, "b")] {
        for p in 0..2 {
            let url = replica.url("/executions/log");
            publishers.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                for i in 0..100 {
                    let body =
                        json!({"organizationId": "acme", "taskId": format!("{name}{p}"), "log": i});
                    let resp = http
                        .post(&url)
                        .bearer_auth(INGEST_KEY)
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                }
            }));
        }
    }
    for p in publishers {
        p.await.unwrap();
    }
    for client in [&mut on_a, &mut on_b] {
        let got = durable_events(client, 400).await;
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
        // Each publisher's own events stay in its order.
        let mut per_task: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (_, data) in got {
            per_task
                .entry(data["taskId"].as_str().unwrap().to_string())
                .or_default()
                .push(data["log"].as_i64().unwrap());
        }
        for logs in per_task.values() {
            assert_eq!(logs, &(0..100).collect::<Vec<_>>());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_while_redis_is_down_are_delivered_when_it_is_back() {
    let mut redis = RedisServer::start().await;
    let db = TestDb::create().await;
    let (mut a, b) = durable_pair(&redis, &db).await;
    let mut on_a = a.login("acme", "alice").await;
    let mut on_b = b.login("acme", "bob").await;
    post_update(&a, &update("acme", "t1", "RUNNING", json!({}))).await;
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(durable_events(client, 1).await[0].0, 1);
    }

    redis.stop();
    // Committed, numbered, not published: the worker is told not to retry.
    let reply = a
        .post(
            "/executions/update",
            &update("acme", "t1", "PASSED", json!({})),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.json,
        json!({"status": "stored", "seq": 2, "published": false})
    );
    a.wait_metric("fanout_durable_unpublished_total", &[], |v| v == 1.0)
        .await;

    redis.restart().await;
    // Both replicas read it back from the history once their subscription is back.
    for client in [&mut on_a, &mut on_b] {
        let got = durable_events(client, 1).await;
        assert_eq!(got[0].0, 2);
        assert_eq!(got[0].1["status"], "PASSED");
    }
    a.wait_readyz(200).await;
    post_update(&a, &update("acme", "t2", "RUNNING", json!({}))).await;
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(durable_events(client, 1).await[0].0, 3);
        assert!(client.next(Duration::from_millis(100)).await.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_mid_run() {
    let mut pg = PgServer::start().await;
    let redis = RedisServer::start().await;
    let r = Replica::builder()
        .redis(&redis)
        .database_url(&pg.url())
        .start_with_store()
        .await;
    let mut alice = r.login("acme", "alice").await;
    for i in 1..=5 {
        post_update(&r, &update("acme", &format!("t{i}"), "RUNNING", json!({}))).await;
    }
    assert_eq!(durable_events(&mut alice, 5).await.len(), 5);

    pg.stop().await;
    // Durable ingest: a definite 503, never a silent drop.
    let refused = r
        .post(
            "/executions/update",
            &update("acme", "t6", "RUNNING", json!({})),
        )
        .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused.json["error"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL is unavailable"),
        "{refused:?}"
    );
    // The replica stays ready and says what is wrong.
    r.wait_metric("fanout_store_up", &[], |v| v == 0.0).await;
    let ready = r.get("/readyz").await.unwrap();
    assert_eq!((ready.status, &ready.json["store"]), (200, &json!("down")));
    // Ephemeral fan-out goes on.
    redis
        .publish("fanout:org:acme", r#"{"event":"ping","data":1}"#)
        .await;
    assert_eq!(alice.expect("ping", QUICK).await, json!(1));
    // A client that wants a replay is told to resync, then gets live messages.
    let mut late = resume(&r, "acme", "bob", json!(2)).await;
    assert_eq!(
        late.expect("resync-required", QUICK).await["reason"],
        "history_unavailable"
    );

    pg.start_again().await;
    // Recovers by itself: the next commit succeeds and is delivered in order.
    let seq = eventually("ingest to succeed again", SOON, || async {
        let reply = r
            .post(
                "/executions/update",
                &update("acme", "t6", "RUNNING", json!({})),
            )
            .await;
        (reply.status == 200).then(|| reply.json["seq"].as_u64().unwrap())
    })
    .await;
    assert_eq!(seq, 6, "nothing refused was numbered");
    r.wait_metric("fanout_store_up", &[], |v| v == 1.0).await;
    for client in [&mut alice, &mut late] {
        assert_eq!(durable_events(client, 1).await[0].0, 6);
    }
    let mut again = resume(&r, "acme", "carol", json!(3)).await;
    let seqs: Vec<u64> = durable_events(&mut again, 3)
        .await
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(seqs, [4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_longer_than_the_socket_queue_is_sent_whole() {
    let db = TestDb::create().await;
    let r = Replica::builder()
        .database(&db)
        .env("FANOUT_SOCKET_BUFFER", 16)
        .start_with_store()
        .await;
    for i in 1..=300 {
        post_update(&r, &update("acme", &format!("t{i}"), "RUNNING", json!({}))).await;
    }
    let mut client = resume(&r, "acme", "alice", json!(0)).await;
    let seqs: Vec<u64> = durable_events(&mut client, 300)
        .await
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    assert_eq!(
        r.metric("fanout_slow_consumer_disconnects_total", &[])
            .await,
        0.0
    );
}

/// With one replay read at a time (`FANOUT_REPLAY_CONCURRENCY=1`), reconnect storms of two
/// organizations at once still give every client exactly what it missed, then live events;
/// nobody is left waiting for a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replays_share_bounded_slots_and_miss_nothing() {
    const EVENTS: u64 = 120;
    const CLIENTS: usize = 10;
    let db = TestDb::create().await;
    let r = Replica::builder()
        .database(&db)
        .env("FANOUT_REPLAY_CONCURRENCY", 1)
        .start_with_store()
        .await;
    for org in ["acme", "globex"] {
        for i in 1..=EVENTS {
            post_update(&r, &update(org, &format!("t{i}"), "RUNNING", json!({}))).await;
        }
    }
    let storm = ["acme", "globex"].into_iter().flat_map(|org| {
        let r = &r;
        (0..CLIENTS).map(move |i| async move {
            let mut client = resume(r, org, &format!("u{i}"), json!(0)).await;
            let seqs: Vec<u64> = durable_events(&mut client, EVENTS as usize)
                .await
                .iter()
                .map(|(s, _)| *s)
                .collect();
            assert_eq!(seqs, (1..=EVENTS).collect::<Vec<_>>(), "{org} u{i}");
            (org, client)
        })
    });
    let mut clients = futures_util::future::join_all(storm).await;
    for org in ["acme", "globex"] {
        post_update(&r, &update(org, "live", "PASSED", json!({}))).await;
    }
    for (org, client) in &mut clients {
        let (seq, data) = durable_events(client, 1).await.remove(0);
        assert_eq!(
            (seq, &data["taskId"]),
            (EVENTS + 1, &json!("live")),
            "{org}"
        );
    }
    assert_eq!(
        r.metric("fanout_replayed_events_total", &[]).await,
        (2 * CLIENTS as u64 * EVENTS) as f64
    );
    assert_eq!(r.metric("fanout_replays_waiting", &[]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_data_is_stored_as_written() {
    let db = TestDb::create().await;
    let r = durable_replica(&db).await;
    let data = r#"{"zeta":1,"alpha":[2, 3],"mid":{"b":1,"a":2}}"#;
    let body = format!(r#"{{"organizationId":"acme","event":"e","data":{data}}}"#);
    let reply = r.post_raw("/v1/publish", body, Some(INGEST_KEY)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let update = r#"{"taskId":"t1","status":"RUNNING","organizationId":"acme","b":1,"a":2}"#;
    let reply = r
        .post_raw("/executions/update", update, Some(INGEST_KEY))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    // What is stored is what replay sends: the text the worker wrote, key order included.
    let stored: Vec<String> = db
        .connect()
        .await
        .query("SELECT data::text FROM events ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(stored, [data, update]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_but_never_published_events_are_read_back_in_order() {
    let redis = RedisServer::start().await;
    let db = TestDb::create().await;
    let r = Replica::builder()
        .redis(&redis)
        .database(&db)
        .start_with_store()
        .await;
    let mut alice = r.login("acme", "alice").await;
    post_update(&r, &update("acme", "t1", "RUNNING", json!({}))).await;
    assert_eq!(durable_events(&mut alice, 1).await[0].0, 1);

    // A replica that died between its commit and its publish leaves this behind.
    let pg = db.connect().await;
    pg.batch_execute(
        r#"UPDATE org_sequences SET last_seq = 3 WHERE organization_id = 'acme';
           INSERT INTO events (organization_id, seq, event, data)
           VALUES ('acme', 2, 'execution-log', '{"taskId":"t1","log":"lost 2"}'),
                  ('acme', 3, 'execution-log', '{"taskId":"t1","log":"lost 3"}');"#,
    )
    .await
    .unwrap();
    // The periodic tail check finds them without any new event.
    let (_, data, seq) = alice.next_durable(SOON).await;
    assert_eq!((seq, data["log"].clone()), (Some(2), json!("lost 2")));
    assert_eq!(durable_events(&mut alice, 1).await[0].0, 3);

    // Again, now with a live event right behind the lost one: it waits for it.
    pg.batch_execute(
        r#"UPDATE org_sequences SET last_seq = 4 WHERE organization_id = 'acme';
           INSERT INTO events (organization_id, seq, event, data)
           VALUES ('acme', 4, 'execution-log', '{"taskId":"t1","log":"lost 4"}');"#,
    )
    .await
    .unwrap();
    assert_eq!(
        post_update(&r, &update("acme", "t1", "PASSED", json!({}))).await,
        5
    );
    let seqs: Vec<u64> = durable_events(&mut alice, 2)
        .await
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(seqs, [4, 5]);
    assert!(r.metric("fanout_gap_fills_total", &[]).await >= 3.0);

    // A sequence number no replica signed (a worker copying an envelope into Redis) is
    // dropped, and holds nothing up.
    redis
        .publish(
            "fanout:org:acme",
            r#"{"event":"execution-log","data":{"forged":true},"seq":100}"#,
        )
        .await;
    r.wait_metric(
        "fanout_malformed_messages_total",
        &[("reason", "unsigned_seq")],
        |v| v == 1.0,
    )
    .await;
    assert_eq!(
        post_update(&r, &update("acme", "t2", "RUNNING", json!({}))).await,
        6
    );
    let (_, data, seq) = alice.next_durable(QUICK).await;
    assert_eq!(seq, Some(6), "{data}");
    assert!(alice.next(Duration::from_millis(200)).await.is_none());
}
