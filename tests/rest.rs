//! The REST read API of the public listener: `/v1/executions`, one execution, its logs.
//!
//! Rows are seeded with plain SQL into the database the replica migrated, then read back
//! through HTTP with the dashboards' JWT. What matters most: the organization is the
//! token's, and nothing (route, parameter, cursor) reaches another organization's rows.

use std::str::FromStr;

use fanout_testkit::replica::{Reply, reply};
use fanout_testkit::*;
use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

const STATUSES: &str = "PENDING, RUNNING, PASSED, FAILED, ERROR, CANCELLED";

/// A replica with a database, and HTTP on its public listener.
struct Api {
    replica: Replica,
    db: TestDb,
    http: reqwest::Client,
}

impl Api {
    /// A replica on a fresh database whose sessions default to a time zone other than UTC
    /// (answers must be UTC anyway); returns once the API answers 200.
    async fn start() -> Self {
        let db = TestDb::create().await;
        db.connect()
            .await
            .batch_execute(
                "DO $$ BEGIN
                     EXECUTE format('ALTER DATABASE %I SET timezone = %L',
                                    current_database(), 'Asia/Kolkata');
                 END $$",
            )
            .await
            .expect("setting the database's time zone");
        let replica = Replica::builder().database(&db).start().await;
        let api = Self::on(replica, db);
        // The store migrates in the background: synchronise on its answer.
        let token = valid_token("acme", "alice");
        eventually("the history API to answer 200", SOON, || async {
            (api.get("/v1/executions", Some(&token)).await.status == 200).then_some(())
        })
        .await;
        api
    }

    fn on(replica: Replica, db: TestDb) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(SOON)
            .build()
            .unwrap();
        Self { replica, db, http }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.replica.public)
    }

    /// `GET path` with `Authorization: Bearer <token>` when a token is given.
    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.http.get(self.url(path));
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        reply(req.send().await.expect("GET on the public listener")).await
    }

    /// `GET path` as `org`, expecting 200; returns the body.
    async fn ok(&self, org: &str, path: &str) -> Value {
        let r = self.get(path, Some(&valid_token(org, "alice"))).await;
        assert_eq!(r.status, 200, "GET {path} as {org}: {r:?}");
        r.json
    }

    /// `GET path` as `org`; returns the status and the body.
    async fn answer(&self, org: &str, path: &str) -> (u16, Value) {
        let r = self.get(path, Some(&valid_token(org, "alice"))).await;
        (r.status, r.json)
    }

    async fn sql(&self) -> tokio_postgres::Client {
        self.db.connect().await
    }
}

/// Inserts one execution. Times are PostgreSQL `timestamptz` literals; the start is a
/// minute before the update, and a final status finishes at the update.
async fn execution(
    db: &tokio_postgres::Client,
    org: &str,
    task: &str,
    status: &str,
    updated: &str,
    data: Value,
    last_seq: i64,
) {
    let status = fanout::protocol::ExecutionStatus::from_str(status).unwrap();
    db.execute(
        "INSERT INTO executions
             (organization_id, task_id, status, started_at, finished_at, updated_at, data, last_seq)
         VALUES ($1, $2, $3, $4::text::timestamptz - interval '1 minute',
                 CASE WHEN $5 THEN $4::text::timestamptz END,
                 $4::text::timestamptz, $6::text::jsonb, $7)",
        &[
            &org,
            &task,
            &status,
            &updated,
            &status.is_final(),
            &data.to_string(),
            &last_seq,
        ],
    )
    .await
    .expect("inserting an execution");
}

/// Inserts one log chunk (`seq` < 60), created at 12:00:{seq}.5 on 2026-03-01 UTC.
async fn log(db: &tokio_postgres::Client, org: &str, task: &str, seq: i64, data: Value) {
    db.execute(
        "INSERT INTO execution_logs (organization_id, task_id, seq, data, created_at)
         VALUES ($1, $2, $3, $4::text::jsonb, $5::text::timestamptz)",
        &[
            &org,
            &task,
            &seq,
            &data.to_string(),
            &format!("2026-03-01T12:00:{seq:02}.5Z"),
        ],
    )
    .await
    .expect("inserting a log chunk");
}

fn task_ids(page: &Value) -> Vec<String> {
    page["executions"]
        .as_array()
        .unwrap_or_else(|| panic!("no executions in {page}"))
        .iter()
        .map(|e| e["taskId"].as_str().unwrap().to_string())
        .collect()
}

/// Seven executions of `acme` (three of them updated at the same microsecond) and two of
/// `globex` (older than all of acme's; one has acme's task id t4). Newest first, ties by
/// task id descending: t7 t6 t5 t4 t3 t2 t1.
async fn seed_acme(api: &Api) {
    let db = api.sql().await;
    let rows = [
        ("t1", "PASSED", "2026-01-01T10:00:00.000001Z"),
        ("t2", "RUNNING", "2026-01-01T10:00:01Z"),
        ("t3", "RUNNING", "2026-01-01T10:00:02.5Z"),
        ("t4", "FAILED", "2026-01-01T10:00:02.5Z"),
        ("t5", "RUNNING", "2026-01-01T10:00:02.5Z"),
        ("t6", "PENDING", "2026-01-01T12:00:03.123456+02"),
        ("t7", "CANCELLED", "2026-01-01T10:00:04Z"),
    ];
    for (i, (task, status, updated)) in rows.into_iter().enumerate() {
        let data = json!({"organizationId": "acme", "taskId": task, "status": status, "n": i});
        execution(&db, "acme", task, status, updated, data, i as i64 + 1).await;
    }
    for task in ["g1", "t4"] {
        let data = json!({"organizationId": "globex", "taskId": task, "secret": "globex"});
        execution(
            &db,
            "globex",
            task,
            "RUNNING",
            "2026-01-01T09:00:00Z",
            data,
            1,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_newest_first_filters_by_status_and_pages_without_gaps() {
    let api = Api::start().await;
    seed_acme(&api).await;

    let all = api.ok("acme", "/v1/executions").await;
    assert_eq!(
        task_ids(&all),
        ["t7", "t6", "t5", "t4", "t3", "t2", "t1"],
        "{all}"
    );
    assert_eq!(all["nextCursor"], Value::Null);
    // One object in full: UTC with milliseconds (the database's time zone is not UTC),
    // `data` as JSON, not a string.
    assert_eq!(
        all["executions"][1],
        json!({
            "taskId": "t6",
            "status": "PENDING",
            "startedAt": "2026-01-01T09:59:03.123Z",
            "finishedAt": null,
            "updatedAt": "2026-01-01T10:00:03.123Z",
            "lastSeq": 6,
            "data": {"organizationId": "acme", "taskId": "t6", "status": "PENDING", "n": 5},
        })
    );
    assert_eq!(
        all["executions"][3]["finishedAt"],
        "2026-01-01T10:00:02.500Z"
    );
    assert_eq!(
        all["executions"][6]["updatedAt"],
        "2026-01-01T10:00:00.000Z"
    );

    // Pages of 3: 3 + 3 + 1, each row once, in the same order; the tie at 10:00:02.5 spans
    // the first page boundary.
    let mut seen = Vec::new();
    let mut path = "/v1/executions?limit=3".to_string();
    let mut pages = 0;
    loop {
        let page = api.ok("acme", &path).await;
        pages += 1;
        seen.extend(task_ids(&page));
        match &page["nextCursor"] {
            Value::Null => break,
            Value::String(cursor) => path = format!("/v1/executions?limit=3&cursor={cursor}"),
            other => panic!("nextCursor is {other}"),
        }
        assert!(pages < 10, "pages never end: {seen:?}");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, task_ids(&all));

    // Exactly a page's worth: the last full page says there is no next one.
    let page = api.ok("acme", "/v1/executions?limit=7").await;
    assert_eq!(page["nextCursor"], Value::Null);

    let running = api.ok("acme", "/v1/executions?status=RUNNING").await;
    assert_eq!(task_ids(&running), ["t5", "t3", "t2"]);
    let first = api
        .ok("acme", "/v1/executions?status=RUNNING&limit=2")
        .await;
    assert_eq!(task_ids(&first), ["t5", "t3"]);
    let cursor = first["nextCursor"].as_str().expect("a next page");
    let rest = api
        .ok(
            "acme",
            &format!("/v1/executions?status=RUNNING&limit=2&cursor={cursor}"),
        )
        .await;
    assert_eq!(task_ids(&rest), ["t2"]);
    assert_eq!(rest["nextCursor"], Value::Null);
    let none = api.ok("acme", "/v1/executions?status=ERROR").await;
    assert_eq!(none, json!({"executions": [], "nextCursor": null}));

    // An organization without executions has an empty list.
    let empty = api.ok("initech", "/v1/executions").await;
    assert_eq!(empty, json!({"executions": [], "nextCursor": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400_saying_what_to_fix() {
    let api = Api::start().await;
    seed_acme(&api).await;

    let (status, body) = api.answer("acme", "/v1/executions?status=DONE").await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("\"DONE\"") && error.contains(STATUSES),
        "{error}"
    );
    // Exact names only, as on the wire.
    let (status, _) = api.answer("acme", "/v1/executions?status=running").await;
    assert_eq!(status, 400);

    for limit in ["0", "501", "-1", "abc", ""] {
        let (status, body) = api
            .answer("acme", &format!("/v1/executions?limit={limit}"))
            .await;
        assert_eq!(status, 400, "limit={limit}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("from 1 to 500"),
            "{body}"
        );
    }
    let (status, body) = api
        .answer("acme", "/v1/executions/t1/logs?limit=5001")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("from 1 to 5000"));
    for after in ["-1", "x", "1.5"] {
        let (status, body) = api
            .answer("acme", &format!("/v1/executions/t1/logs?afterSeq={after}"))
            .await;
        assert_eq!(status, 400, "afterSeq={after}: {body}");
        assert!(body["error"].as_str().unwrap().contains("afterSeq"));
    }

    // Garbage, and well-formed hex that is not a cursor.
    let valid = api.ok("acme", "/v1/executions?limit=1").await["nextCursor"]
        .as_str()
        .unwrap()
        .to_string();
    let other_version: String = "2:1:t".bytes().map(|b| format!("{b:02x}")).collect();
    for cursor in ["garbage", "00", "%FF", &other_version, &format!("{valid}0")] {
        let (status, body) = api
            .answer("acme", &format!("/v1/executions?cursor={cursor}"))
            .await;
        assert_eq!(status, 400, "cursor={cursor}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("nextCursor"),
            "{body}"
        );
    }

    // There is no way to name an organization.
    let (status, body) = api
        .answer("acme", "/v1/executions?organizationId=globex")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("your token"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_any_text_is_400_naming_it_not_a_store_outage() {
    let api = Api::start().await;
    seed_acme(&api).await;
    let nul_cursor: String = "1:1700000000000000:t\0"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    let cases = [
        ("/v1/executions/%00".to_string(), "taskId"),
        ("/v1/executions/t%001".to_string(), "taskId"),
        ("/v1/executions/%00/logs".to_string(), "taskId"),
        ("/v1/executions/%01/logs?afterSeq=0".to_string(), "taskId"),
        (format!("/v1/executions?cursor={nul_cursor}"), "cursor"),
    ];
    let server_errors_before = server_errors(&api.replica).await;
    for (path, parameter) in &cases {
        let (status, body) = api.answer("acme", path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(parameter),
            "{path}: {body}"
        );
    }
    // None of them counts as a server error (which alerts page on).
    assert_eq!(server_errors(&api.replica).await, server_errors_before);
}

/// Requests answered 5xx so far.
async fn server_errors(replica: &Replica) -> f64 {
    let metrics = replica.metrics().await;
    metrics
        .samples("fanout_http_requests_total")
        .filter(|(labels, _)| {
            labels
                .iter()
                .any(|(k, v)| k == "status" && v.starts_with('5'))
        })
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_execution_and_its_logs() {
    let api = Api::start().await;
    seed_acme(&api).await;
    let db = api.sql().await;
    for seq in 1..=5 {
        log(
            &db,
            "acme",
            "t2",
            seq,
            json!({"taskId": "t2", "log": format!("line {seq}"), "stream": "stdout"}),
        )
        .await;
    }
    // Logs that arrived before any status update of their task.
    log(&db, "acme", "early", 9, json!({"log": "booting"})).await;

    let all = api.ok("acme", "/v1/executions").await;
    let one = api.ok("acme", "/v1/executions/t2").await;
    assert_eq!(one, all["executions"][5]);
    assert_eq!(one["taskId"], "t2");
    let (status, body) = api.answer("acme", "/v1/executions/nope").await;
    assert_eq!(
        (status, body),
        (404, json!({"error": "execution not found"}))
    );

    let logs = api.ok("acme", "/v1/executions/t2/logs").await;
    let seqs = |page: &Value| -> Vec<i64> {
        page["logs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["seq"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&logs), [1, 2, 3, 4, 5]);
    assert_eq!(logs["nextAfterSeq"], 5);
    assert_eq!(
        logs["logs"][0],
        json!({
            "seq": 1,
            "data": {"taskId": "t2", "log": "line 1", "stream": "stdout"},
            "createdAt": "2026-03-01T12:00:01.500Z",
        })
    );
    let after = api
        .ok("acme", "/v1/executions/t2/logs?afterSeq=2&limit=2")
        .await;
    assert_eq!(seqs(&after), [3, 4]);
    assert_eq!(after["nextAfterSeq"], 4);
    let after = api.ok("acme", "/v1/executions/t2/logs?afterSeq=4").await;
    assert_eq!(seqs(&after), [5]);
    let after = api.ok("acme", "/v1/executions/t2/logs?afterSeq=5").await;
    assert_eq!(after, json!({"logs": [], "nextAfterSeq": 5}));

    let early = api.ok("acme", "/v1/executions/early/logs").await;
    assert_eq!(seqs(&early), [9]);
    let (status, _) = api.answer("acme", "/v1/executions/early").await;
    assert_eq!(status, 404, "no execution row yet");
    let unknown = api.ok("acme", "/v1/executions/nope/logs").await;
    assert_eq!(unknown, json!({"logs": [], "nextAfterSeq": 0}));

    // A task id with characters that need escaping in a path.
    let odd = "suite/a b?c#d";
    execution(
        &db,
        "acme",
        odd,
        "RUNNING",
        "2026-01-02T00:00:00Z",
        json!({}),
        1,
    )
    .await;
    let escaped = "suite%2Fa%20b%3Fc%23d";
    let got = api.ok("acme", &format!("/v1/executions/{escaped}")).await;
    assert_eq!(got["taskId"], odd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_organizations_rows_are_unreachable() {
    let api = Api::start().await;
    seed_acme(&api).await;
    let db = api.sql().await;
    // The same task id in both organizations, each with its own logs.
    log(&db, "acme", "t4", 1, json!({"log": "acme's secret"})).await;
    log(&db, "acme", "t1", 1, json!({"log": "acme only"})).await;
    log(&db, "globex", "t4", 7, json!({"log": "globex's own"})).await;

    let globex = api.ok("globex", "/v1/executions").await;
    assert_eq!(task_ids(&globex), ["t4", "g1"]);
    assert!(!globex.to_string().contains("\"acme\""), "{globex}");
    let t4 = api.ok("globex", "/v1/executions/t4").await;
    assert_eq!(t4["data"]["secret"], "globex");
    let acme_t4 = api.ok("acme", "/v1/executions/t4").await;
    assert_eq!(acme_t4["status"], "FAILED");

    // acme's task, asked for by globex: as absent as a task that never existed.
    let (status, body) = api.answer("globex", "/v1/executions/t1").await;
    assert_eq!(
        (status, body),
        (404, json!({"error": "execution not found"}))
    );
    let logs = api.ok("globex", "/v1/executions/t1/logs").await;
    assert_eq!(logs, json!({"logs": [], "nextAfterSeq": 0}));
    let logs = api.ok("globex", "/v1/executions/t4/logs").await;
    assert_eq!(
        logs,
        json!({"logs": [{"seq": 7, "data": {"log": "globex's own"}, "createdAt": "2026-03-01T12:00:07.500Z"}], "nextAfterSeq": 7})
    );
    let filtered = api.ok("globex", "/v1/executions?status=FAILED").await;
    assert_eq!(task_ids(&filtered), Vec::<String>::new());

    // A cursor is a position, not a permission: acme's cursor, used by globex, lists globex's
    // rows after that position and nothing else.
    let acme_page = api.ok("acme", "/v1/executions?limit=1").await;
    let cursor = acme_page["nextCursor"].as_str().unwrap();
    let page = api
        .ok("globex", &format!("/v1/executions?cursor={cursor}"))
        .await;
    assert_eq!(task_ids(&page), ["t4", "g1"]);

    // Numeric organization ids name the organization of their decimal text, nothing more.
    let numeric = token_with(&json!({
        "organizationId": 42, "userId": 7, "role": "member", "exp": now_secs() + 60
    }));
    let r = api.get("/v1/executions", Some(&numeric)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json, json!({"executions": [], "nextCursor": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_required_and_checked() {
    let api = Api::start().await;
    seed_acme(&api).await;
    let expired = token("acme", "alice", now_secs() - 10);
    let forged = sign(
        &json!({"organizationId": "acme", "userId": "alice", "role": "member", "exp": now_secs() + 60}),
        "not-the-secret-0123456789abcdef0123",
    );
    let no_role =
        token_with(&json!({"organizationId": "acme", "userId": "alice", "exp": now_secs() + 60}));
    for path in [
        "/v1/executions",
        "/v1/executions/t1",
        "/v1/executions/t1/logs",
    ] {
        let r = api.get(path, None).await;
        assert_eq!(r.status, 401, "{path}: {r:?}");
        assert_eq!(r.json, json!({"error": "Authentication required"}));
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        for token in [&expired, &forged, &no_role, &"not.a.jwt".to_string()] {
            let r = api.get(path, Some(token)).await;
            assert_eq!(r.status, 401, "{path}: {r:?}");
            assert_eq!(r.json, json!({"error": "Invalid or expired token"}));
            assert_eq!(r.headers["www-authenticate"], "Bearer");
        }
        // Only the Bearer scheme.
        let r = reply(
            api.http
                .get(api.url(path))
                .header(
                    "authorization",
                    format!("Basic {}", valid_token("acme", "alice")),
                )
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.json, json!({"error": "Invalid or expired token"}));
    }
    // Only GET.
    let r = reply(
        api.http
            .delete(api.url("/v1/executions/t1"))
            .header(
                "authorization",
                format!("Bearer {}", valid_token("acme", "alice")),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 405, "{r:?}");
    assert!(r.json["error"].is_string(), "{r:?}");
    let failures = api
        .replica
        .metric("fanout_auth_failures_total", &[("reason", "expired")])
        .await;
    assert_eq!(failures, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_database_url_history_is_404_saying_why() {
    let replica = Replica::builder().start().await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for path in [
        "/v1/executions",
        "/v1/executions/t1",
        "/v1/executions/t1/logs",
    ] {
        let resp = http
            .get(format!("http://{}{path}", replica.public))
            .bearer_auth(valid_token("acme", "alice"))
            .send()
            .await
            .unwrap();
        let r = reply(resp).await;
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert_eq!(
            r.json,
            json!({"error": "history is not enabled on this deployment (DATABASE_URL is not set)"})
        );
        // Tokens are still checked first.
        let r = reply(
            http.get(format!("http://{}{path}", replica.public))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, 401, "{path}: {r:?}");
    }
    // Other paths are still the plain fallback.
    let r = replica.get_public("/v1/nothing").await;
    assert_eq!((r.status, r.json), (404, json!({"error": "not found"})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_is_503_retry_later() {
    let url = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/postgres",
        free_port()
    );
    let replica = Replica::builder().env("DATABASE_URL", &url).start().await;
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}/v1/executions", replica.public))
        .bearer_auth(valid_token("acme", "alice"))
        .send()
        .await
        .unwrap();
    let r = reply(resp).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(
        r.json,
        json!({"error": "PostgreSQL is unavailable; retry later"})
    );
    assert!(
        !r.text.contains("127.0.0.1"),
        "no internals in answers: {r:?}"
    );
}

/// A browser's preflight for `fetch(url, { headers: { Authorization } })`, then the request.
async fn preflight(replica: &Replica, origin: &str) -> (HeaderMap, HeaderMap) {
    preflight_to(replica, "/v1/executions", origin).await
}

async fn preflight_to(replica: &Replica, path: &str, origin: &str) -> (HeaderMap, HeaderMap) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{}{path}", replica.public);
    let pre = http
        .request(Method::OPTIONS, &url)
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "preflight: {pre:?}");
    let get = http
        .get(&url)
        .header("origin", origin)
        .bearer_auth(valid_token("acme", "alice"))
        .send()
        .await
        .unwrap();
    (pre.headers().clone(), get.headers().clone())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .map(HeaderValue::to_str)
        .and_then(Result::ok)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_allows_the_authorization_header() {
    let any = Replica::builder().start().await;
    let (pre, get) = preflight(&any, "https://dash.example.com").await;
    assert_eq!(header(&pre, "access-control-allow-origin"), "*");
    assert!(
        header(&pre, "access-control-allow-headers")
            .to_ascii_lowercase()
            .contains("authorization"),
        "{pre:?}"
    );
    // GET only: the API is read-only (Socket.IO's polling POSTs need no preflight).
    assert_eq!(
        header(&pre, "access-control-allow-methods"),
        "GET",
        "{pre:?}"
    );
    assert_eq!(header(&get, "access-control-allow-origin"), "*");

    let listed = Replica::builder()
        .env("FANOUT_CORS_ORIGINS", "https://dash.example.com")
        .start()
        .await;
    let (pre, get) = preflight(&listed, "https://dash.example.com").await;
    assert_eq!(
        header(&pre, "access-control-allow-origin"),
        "https://dash.example.com"
    );
    assert!(
        header(&pre, "access-control-allow-headers")
            .to_ascii_lowercase()
            .contains("authorization")
    );
    assert_eq!(
        header(&get, "access-control-allow-origin"),
        "https://dash.example.com"
    );
    let (pre, get) = preflight(&listed, "https://evil.example.com").await;
    assert_eq!(header(&pre, "access-control-allow-origin"), "");
    assert_eq!(header(&get, "access-control-allow-origin"), "");
}

/// A Socket.IO client with `extraHeaders` makes the browser preflight the Engine.IO
/// handshake: the gateway must leave the preflight's headers to the CORS layer (a session's
/// request head is trimmed only for the request that opens it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_of_the_socket_io_handshake_is_answered() {
    let replica = Replica::builder().start().await;
    let (pre, _) = preflight_to(
        &replica,
        "/socket.io/?EIO=4&transport=polling",
        "https://dash.example.com",
    )
    .await;
    assert_eq!(header(&pre, "access-control-allow-origin"), "*", "{pre:?}");
    assert!(
        header(&pre, "access-control-allow-headers")
            .to_ascii_lowercase()
            .contains("authorization"),
        "{pre:?}"
    );
}
