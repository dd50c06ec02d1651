//! The ingest API and the ops endpoints of the internal listener.
//!
//! Every answer must be definite for a worker: 200 only when the message was handed to the
//! bus, 4xx with a JSON `error` that says what to fix, 503 when the bus is unreachable.
//! Refused requests deliver nothing (checked with a marker message after them).

use fanout_testkit::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_delivers_its_event() {
    // In-process bus: a single replica needs no Redis.
    let r = Replica::builder().start().await;
    let mut client = r.login("acme", "alice").await;
    let (mut numeric, _) = Client::authenticated(r.public, &valid_token("42", "bob")).await;

    let update = json!({"organizationId": "acme", "taskId": "t1", "status": "COMPLETED", "result": {"rows": 3}, "at": "2024-01-01T00:00:00Z"});
    let reply = r.post("/executions/update", &update).await;
    assert_eq!(
        (reply.status, reply.json),
        (200, json!({"status": "broadcasted"}))
    );
    let log =
        json!({"organizationId": "acme", "taskId": "t1", "log": "step 2/3 done", "level": "info"});
    let reply = r.post("/executions/log", &log).await;
    assert_eq!(
        (reply.status, reply.json),
        (200, json!({"status": "broadcasted"}))
    );
    r.publish("acme", "report.ready", json!({"url": "/r/1"}))
        .await;
    // A numeric organizationId names the same organization as its decimal string.
    let reply = r
        .post(
            "/executions/update",
            &json!({"organizationId": 42, "taskId": 7, "status": "RUNNING"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    assert_eq!(client.expect("execution-updated", QUICK).await, update);
    assert_eq!(client.expect("execution-log", QUICK).await, log);
    assert_eq!(
        client.expect("report.ready", QUICK).await,
        json!({"url": "/r/1"})
    );
    assert_eq!(
        numeric.expect("execution-updated", QUICK).await,
        json!({"organizationId": 42, "taskId": 7, "status": "RUNNING"})
    );
    let published = r
        .metric("fanout_messages_published_total", &[("source", "http")])
        .await;
    assert_eq!(published, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_requires_one_of_the_configured_keys() {
    let r = Replica::builder().start().await;
    let mut client = r.login("acme", "alice").await;
    let body = json!({"organizationId": "acme", "taskId": "t", "status": "S"}).to_string();

    for key in [
        None,
        Some("wrong-key"),
        Some(""),
        Some(&format!("{INGEST_KEY}x")[..]),
    ] {
        let reply = r.post_raw("/executions/update", body.clone(), key).await;
        assert_eq!(reply.status, 401, "key {key:?}: {reply:?}");
        assert!(
            reply.json["error"]
                .as_str()
                .unwrap()
                .contains("Authorization"),
            "{reply:?}"
        );
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
    }
    let basic = reqwest::Client::new()
        .post(r.url("/v1/publish"))
        .header("authorization", format!("Basic {INGEST_KEY}"))
        .body(json!({"organizationId": "acme", "event": "e", "data": 1}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);

    // Both keys of a rotation are accepted.
    for key in [INGEST_KEY, INGEST_KEY_NEXT] {
        let reply = r
            .post_raw("/executions/update", body.clone(), Some(key))
            .await;
        assert_eq!(reply.status, 200, "key {key}: {reply:?}");
    }
    r.publish("acme", "marker", Value::Null).await;
    let got = client.events_until("marker", QUICK).await;
    assert_eq!(
        got.len(),
        2,
        "only the two authorised requests deliver: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_are_refused_with_the_field_named() {
    let r = Replica::builder().start().await;
    let mut client = r.login("acme", "alice").await;
    let long_org = "o".repeat(129);
    let cases: Vec<(&str, String, &str)> = vec![
        ("/executions/update", "{not json".into(), "JSON"),
        ("/executions/update", "".into(), "JSON"),
        ("/executions/update", "[1,2]".into(), "object"),
        ("/executions/update", "\"acme\"".into(), "object"),
        (
            "/executions/update",
            json!({"taskId": "t", "status": "S"}).to_string(),
            "organizationId",
        ),
        (
            "/executions/update",
            json!({"organizationId": null, "taskId": "t", "status": "S"}).to_string(),
            "organizationId",
        ),
        (
            "/executions/update",
            json!({"organizationId": "", "taskId": "t", "status": "S"}).to_string(),
            "organizationId",
        ),
        (
            "/executions/update",
            json!({"organizationId": "a:b", "taskId": "t", "status": "S"}).to_string(),
            "organizationId",
        ),
        (
            "/executions/update",
            json!({"organizationId": long_org, "taskId": "t", "status": "S"}).to_string(),
            "organizationId",
        ),
        (
            "/executions/update",
            json!({"organizationId": 1.5, "taskId": "t", "status": "S"}).to_string(),
            "organizationId",
        ),
        (
            "/executions/update",
            json!({"organizationId": ["acme"], "taskId": "t", "status": "S"}).to_string(),
            "organizationId",
        ),
        (
            "/executions/update",
            json!({"organizationId": "acme", "status": "S"}).to_string(),
            "taskId",
        ),
        (
            "/executions/update",
            json!({"organizationId": "acme", "taskId": "", "status": "S"}).to_string(),
            "taskId",
        ),
        (
            "/executions/update",
            json!({"organizationId": "acme", "taskId": "t"}).to_string(),
            "status",
        ),
        (
            "/executions/log",
            json!({"organizationId": "acme", "taskId": "t"}).to_string(),
            "log",
        ),
        (
            "/executions/log",
            json!({"organizationId": "acme", "log": "x"}).to_string(),
            "taskId",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "data": 1}).to_string(),
            "event",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": 5, "data": 1}).to_string(),
            "event",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "", "data": 1}).to_string(),
            "event",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "bad name", "data": 1}).to_string(),
            "event",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "e".repeat(65), "data": 1}).to_string(),
            "event",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "connect", "data": 1}).to_string(),
            "event",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "auth-success", "data": {}}).to_string(),
            "event",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "e"}).to_string(),
            "data",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "e", "data": 1, "userId": ""}).to_string(),
            "userId",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "e", "data": 1, "userId": {"id": 1}})
                .to_string(),
            "userId",
        ),
        (
            "/v1/publish",
            json!({"event": "e", "data": 1}).to_string(),
            "organizationId",
        ),
    ];
    for (path, body, field) in &cases {
        let reply = r.post_raw(path, body.clone(), Some(INGEST_KEY)).await;
        assert_eq!(reply.status, 400, "{path} {body}: {reply:?}");
        let error = reply.json["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} {body}: no JSON error in {reply:?}"));
        assert!(
            error.contains(field),
            "{path} {body}: error {error:?} should name {field:?}"
        );
    }
    r.publish("acme", "marker", Value::Null).await;
    assert_eq!(client.events_until("marker", QUICK).await, vec![]);
    let refused = r
        .metric("fanout_http_requests_total", &[("status", "400")])
        .await;
    assert_eq!(refused, cases.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_are_413() {
    let r = Replica::builder()
        .env("FANOUT_MAX_PAYLOAD_BYTES", 1024)
        .start()
        .await;
    let mut client = r.login("acme", "alice").await;
    let body = |pad: usize| {
        json!({"organizationId": "acme", "taskId": "t", "status": "S", "pad": "x".repeat(pad)})
            .to_string()
    };
    let small = body(900);
    let big = body(2000);
    assert!(small.len() <= 1024 && big.len() > 1024);

    let reply = r
        .post_raw("/executions/update", big.clone(), Some(INGEST_KEY))
        .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(
        reply.json["error"].as_str().unwrap().contains("1024"),
        "{reply:?}"
    );
    let reply = r
        .post_raw(
            "/v1/publish",
            json!({"organizationId": "acme", "event": "e", "data": "x".repeat(5000)}).to_string(),
            Some(INGEST_KEY),
        )
        .await;
    assert_eq!(reply.status, 413, "{reply:?}");
    let reply = r
        .post_raw("/executions/update", small.clone(), Some(INGEST_KEY))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");

    let got = client.expect("execution-updated", QUICK).await;
    assert_eq!(
        got["pad"].as_str().unwrap().len(),
        900,
        "the body under the limit, not the refused one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_is_503_while_redis_is_down_and_recovers() {
    let mut redis = RedisServer::start().await;
    let mut r = Replica::on(&redis, "a").await;
    let mut client = r.login("acme", "alice").await;
    let update = |n: u32| json!({"organizationId": "acme", "taskId": "t", "status": "S", "n": n});

    let reply = r.post("/executions/update", &update(0)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        client.expect("execution-updated", QUICK).await["n"],
        json!(0)
    );

    // The publishing pool now holds a connection that Redis is about to drop.
    redis.stop();
    for n in 1..4 {
        let reply = r.post("/executions/update", &update(n)).await;
        assert_eq!(reply.status, 503, "{reply:?}");
        assert!(
            reply.json["error"]
                .as_str()
                .unwrap()
                .contains("not published"),
            "{reply:?}"
        );
    }
    let reply = r
        .post(
            "/v1/publish",
            &json!({"organizationId": "acme", "event": "e", "data": 1}),
        )
        .await;
    assert_eq!(reply.status, 503, "{reply:?}");

    redis.restart().await;
    r.wait_ready().await;
    let reply = r.post("/executions/update", &update(99)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        client.expect("execution-updated", QUICK).await["n"],
        json!(99)
    );
    let m = r.metrics().await;
    let refused = |route| {
        m.get(
            "fanout_http_requests_total",
            &[("route", route), ("status", "503")],
        )
    };
    assert_eq!(
        (refused("/executions/update"), refused("/v1/publish")),
        (3.0, 1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_and_request_metrics() {
    let r = Replica::builder().start().await;

    let health = r.get("/healthz").await.unwrap();
    assert_eq!((health.status, health.json), (200, json!({"status": "ok"})));
    let ready = r.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.json, json!({"status": "ready", "bus": "memory"}));
    let missing = r.get("/no/such/route").await.unwrap();
    assert_eq!(
        (missing.status, missing.json),
        (404, json!({"error": "not found"}))
    );

    // The public listener serves Socket.IO only: no ingest, no metrics.
    for path in ["/metrics", "/healthz", "/executions/update", "/v1/publish"] {
        let reply = r.get_public(path).await;
        assert_eq!(reply.status, 404, "public {path}: {reply:?}");
    }

    let before = r.metrics().await;
    let body = json!({"organizationId": "acme", "taskId": "t", "status": "S"});
    for _ in 0..3 {
        assert_eq!(r.post("/executions/update", &body).await.status, 200);
    }
    r.post_raw("/executions/update", body.to_string(), None)
        .await;
    r.post_raw("/executions/log", "{}", Some(INGEST_KEY)).await;
    r.get("/healthz").await;
    r.get("/nope").await;

    let after = r.metrics().await;
    let requests = |route: &str, status: &str| {
        let labels = [("route", route), ("status", status)];
        after.get("fanout_http_requests_total", &labels)
            - before.get("fanout_http_requests_total", &labels)
    };
    assert_eq!(requests("/executions/update", "200"), 3.0);
    assert_eq!(requests("/executions/update", "401"), 1.0);
    assert_eq!(requests("/executions/log", "400"), 1.0);
    assert_eq!(requests("/healthz", "200"), 1.0);
    assert_eq!(
        requests("unmatched", "404"),
        1.0,
        "unknown paths share one label value"
    );
    assert!(
        after
            .text
            .contains("# TYPE fanout_http_requests_total counter")
    );
    assert!(
        after
            .samples("fanout_http_requests_total")
            .all(|(labels, _)| labels.iter().all(|(k, _)| k == "route" || k == "status")),
        "only bounded labels"
    );
}
