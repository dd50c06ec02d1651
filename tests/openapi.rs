//! The OpenAPI document (`GET /openapi.json`, `fanout openapi`) against the code and the
//! real answers:
//! - every `.route(...)` of the routers in `src/` is in the document, with its method, and
//!   every path and method of the document is routed on a real replica;
//! - real bad requests to real replicas (one with a history, one with limits and scoped
//!   keys, one whose PostgreSQL is down) are answered with a status the document lists for
//!   that route, the documented `{ "error": string }` body and the documented headers;
//! - the documented request examples are accepted, and the answers have the documented
//!   fields.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use fanout_testkit::replica::{Reply, reply, run_to_end};
use fanout_testkit::*;
use reqwest::Method;
use serde_json::{Value, json};

/// The files whose routers the document covers. `POST /faults/{task}` (test builds only,
/// `fault-injection`) is left out: it is no API.
const ROUTERS: [&str; 4] = [
    "src/ingest/mod.rs",
    "src/api.rs",
    "src/admin.rs",
    "src/openapi.rs",
];

/// `(path, method)` of every `.route("path", method(...))` in `code`, the method lowercase.
fn routes_in(code: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let after = rest.trim_start();
        let Some(literal) = after.strip_prefix('"') else {
            continue; // `.route(` in a comment or a string
        };
        let path = &literal[..literal.find('"').unwrap()];
        let after = literal[path.len() + 1..].trim_start();
        let Some(handler) = after.strip_prefix(',') else {
            continue;
        };
        let call: String = handler
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let method = call.rsplit("::").next().unwrap().to_string();
        found.push((path.to_string(), method));
    }
    found
}

fn source_routes() -> BTreeSet<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut routes = BTreeSet::new();
    for file in ROUTERS {
        let code = std::fs::read_to_string(root.join(file)).unwrap();
        let found = routes_in(&code);
        assert!(
            !found.is_empty(),
            "{file}: no `.route(\"...\", method(...))` found"
        );
        routes.extend(
            found
                .into_iter()
                .filter(|(p, _)| !p.starts_with("/faults/")),
        );
    }
    routes
}

fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("the document has paths") {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "put", "patch", "delete", "head", "options"]
                .contains(&method.as_str())
            {
                routes.insert((path.clone(), method.clone()));
            }
        }
    }
    routes
}

#[test]
fn routes_are_found_in_router_code() {
    let code = r#"Router::new()
        .route("/a", get(list))
        .route( "/b/{id}",  axum::routing::post(
            |x| async {}))
        // .route("/commented", get(x)) is still code to this reader
        .route_layer(x)"#;
    assert_eq!(
        routes_in(code),
        [
            ("/a".to_string(), "get".to_string()),
            ("/b/{id}".to_string(), "post".to_string()),
            ("/commented".to_string(), "get".to_string()),
        ]
    );
}

/// HTTP to a replica's listeners, any method.
struct Http {
    client: reqwest::Client,
}

impl Http {
    fn new() -> Self {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(SOON)
            .build()
            .unwrap();
        Self { client }
    }

    async fn send(
        &self,
        method: Method,
        url: String,
        bearer: Option<&str>,
        body: Option<String>,
    ) -> Reply {
        let mut req = self.client.request(method.clone(), &url);
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        reply(resp).await
    }
}

fn public(r: &Replica, path: &str) -> String {
    format!("http://{}{path}", r.public)
}

/// `$ref` resolved in the document's components.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.strip_prefix("#/components/schemas/").unwrap();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Asserts that `reply` is an answer the document lists for `method path`: its status, its
/// body (a refusal: exactly `{ "error": string }`; a success: the schema's required fields),
/// and the headers documented for that status.
fn assert_documented(doc: &Value, method: &str, path: &str, reply: &Reply, what: &str) {
    let op = &doc["paths"][path][method];
    assert!(
        op.is_object(),
        "{what}: {method} {path} is not in the document"
    );
    let status = reply.status.to_string();
    let answer = &op["responses"][&status];
    assert!(
        answer.is_object(),
        "{what}: {method} {path} answered {status}, which the document does not list \
         (it lists {:?}): {reply:?}",
        op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>()
    );
    let schema = resolve(doc, &answer["content"]["application/json"]["schema"]);
    // `/readyz`'s 503 is its not-ready state, described by its own schema.
    if reply.status >= 400 && !(path == "/readyz" && reply.status == 503) {
        assert_eq!(
            answer["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
            "{what}: {method} {path} {status} is not documented as the error body"
        );
        let fields = reply.json.as_object().unwrap_or_else(|| {
            panic!("{what}: {method} {path} {status} is not a JSON object: {reply:?}")
        });
        assert!(
            fields.len() == 1 && fields["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {method} {path} {status} is not {{\"error\": string}}: {}",
            reply.text
        );
    } else {
        for field in schema["required"].as_array().into_iter().flatten() {
            let field = field.as_str().unwrap();
            assert!(
                reply.json.get(field).is_some(),
                "{what}: {method} {path} {status} lacks the required {field:?}: {}",
                reply.text
            );
        }
    }
    for header in answer["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|h| h.0)
    {
        assert!(
            reply.headers.contains_key(header.as_str()),
            "{what}: {method} {path} {status} lacks the documented {header} header: {reply:?}"
        );
    }
}

/// Every route of the code is documented, and every documented route is routed: a path
/// the routers do not know answers the fallback's 404 `not found`, with or without
/// credentials, which no documented route does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_documented_and_every_documented_route_is_routed() {
    let db = TestDb::create().await;
    let r = Replica::builder().database(&db).start_with_store().await;
    let served = r.get("/openapi.json").await.expect("GET /openapi.json");
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!(served.headers["content-type"], "application/json");
    let doc = served.json;
    assert_eq!(doc["openapi"], "3.1.0");

    let documented = documented_routes(&doc);
    let routed = source_routes();
    let missing: Vec<_> = routed.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes of the code missing from the OpenAPI document (add #[utoipa::path] to the \
         handler and its name to `paths(...)` in src/openapi.rs): {missing:?}"
    );
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        unrouted.is_empty(),
        "documented routes that no router of {ROUTERS:?} has: {unrouted:?}"
    );

    let http = Http::new();
    let unknown = http
        .send(Method::GET, r.url("/no-such-route"), None, None)
        .await;
    assert_eq!(
        (unknown.status, unknown.json.clone()),
        (404, json!({"error": "not found"}))
    );
    for (path, method) in &documented {
        // Each path on the listener its `servers` names: the port's default says which.
        let server = &doc["paths"][path]["servers"][0];
        let url = match server["variables"]["port"]["default"].as_str() {
            Some("3000") => public(&r, &path.replace("{task_id}", "t-1")),
            Some("3001") => r.url(&path.replace("{task_id}", "t-1")),
            other => panic!("{path}: no listener in its servers: {other:?}"),
        };
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let answer = http.send(method.clone(), url, None, None).await;
        assert!(
            answer.json != json!({"error": "not found"}),
            "{method} {path} is documented but not routed: {answer:?}"
        );
        assert_documented(
            &doc,
            &method.as_str().to_lowercase(),
            path,
            &answer,
            "no credentials",
        );
    }

    // `fanout openapi` prints the document the replica serves.
    let printed = run_to_end(&["openapi"], &[]);
    assert!(printed.status.success(), "{printed:?}");
    let printed: Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(printed, doc);
}

/// Real answers of a replica with a history: the documented examples accepted, with `seq`;
/// every kind of bad request refused with a documented status and the error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_replica_answers_as_documented() {
    let db = TestDb::create().await;
    let r = Replica::builder()
        .database(&db)
        .env("FANOUT_MAX_PAYLOAD_BYTES", 4096)
        .start_with_store()
        .await;
    let doc = r.get("/openapi.json").await.unwrap().json;
    let http = Http::new();
    let key = Some(INGEST_KEY);
    let post = |path: &'static str, body: String, key: Option<&'static str>| {
        let http = &http;
        let url = r.url(path);
        async move { http.send(Method::POST, url, key, Some(body)).await }
    };

    // The documented examples are accepted, and the answers carry `seq`.
    for (path, schema) in [
        ("/executions/update", "ExecutionUpdate"),
        ("/executions/log", "ExecutionLog"),
        ("/v1/publish", "Publish"),
    ] {
        let example = &doc["components"]["schemas"][schema]["example"];
        assert!(example.is_object(), "{schema} has no example");
        let answer = post(path, example.to_string(), key).await;
        assert_eq!(answer.status, 200, "{path} refused its example: {answer:?}");
        assert!(answer.json["seq"].is_u64(), "{answer:?}");
        assert_documented(&doc, "post", path, &answer, "its example");
    }

    let update = |fields: Value| {
        let mut body = json!({"organizationId": "acme", "taskId": "t-42", "status": "RUNNING"});
        for (k, v) in fields.as_object().unwrap() {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        body.to_string()
    };
    // 126 levels: read by serde_json, but one too many for the bus envelope; 200: not read.
    let nested = |depth: usize| {
        format!(
            r#"{{"organizationId":"acme","taskId":"t","status":"RUNNING","x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        )
    };
    let bad: Vec<(&str, String, u16, &str)> = vec![
        ("/executions/update", "not json".into(), 400, "JSON"),
        ("/executions/update", "[1]".into(), 400, "object"),
        (
            "/executions/update",
            update(json!({"organizationId": null})),
            400,
            "\"organizationId\"",
        ),
        (
            "/executions/update",
            update(json!({"organizationId": "a:b"})),
            400,
            "\"organizationId\"",
        ),
        (
            "/executions/update",
            update(json!({"taskId": ""})),
            400,
            "\"taskId\"",
        ),
        (
            "/executions/update",
            update(json!({"status": "DONE"})),
            400,
            "\"status\"",
        ),
        ("/executions/update", nested(126), 400, "nests deeper"),
        ("/executions/update", nested(200), 400, "JSON"),
        (
            "/executions/log",
            json!({"organizationId": "acme", "taskId": "t"}).to_string(),
            400,
            "\"log\"",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "data": 1}).to_string(),
            400,
            "\"event\"",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "auth-x", "data": 1}).to_string(),
            400,
            "\"event\"",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "e"}).to_string(),
            400,
            "\"data\"",
        ),
        (
            "/v1/publish",
            json!({"organizationId": "acme", "event": "e", "data": 1, "userId": ""}).to_string(),
            400,
            "\"userId\"",
        ),
        (
            "/v1/publish",
            "x".repeat(5000),
            413,
            "FANOUT_MAX_PAYLOAD_BYTES",
        ),
    ];
    for (path, body, status, names) in bad {
        let answer = post(path, body.clone(), key).await;
        assert_eq!(answer.status, status, "{path} {body:.80}: {answer:?}");
        let error = answer.json["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(names),
            "{path}: {error:?} should name {names}"
        );
        assert_documented(&doc, "post", path, &answer, "a bad body");
    }
    for path in ["/executions/update", "/executions/log", "/v1/publish"] {
        for key in [None, Some("not-a-key")] {
            let answer = post(path, update(json!({})), key).await;
            assert_eq!(answer.status, 401, "{answer:?}");
            assert_documented(&doc, "post", path, &answer, "no key");
        }
        // Was axum's empty 405: now the error body, with Allow.
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            let answer = http.send(method.clone(), r.url(path), key, None).await;
            assert_eq!(answer.status, 405, "{method} {path}: {answer:?}");
            assert_eq!(answer.headers["allow"], "POST");
            assert_documented(&doc, "post", path, &answer, "another method");
        }
    }
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let answer = http.send(Method::POST, r.url(path), None, None).await;
        assert_eq!(answer.status, 405, "POST {path}: {answer:?}");
        assert_documented(&doc, "get", path, &answer, "another method");
        let answer = http.send(Method::GET, r.url(path), None, None).await;
        assert_eq!(answer.status, 200, "GET {path}: {answer:?}");
    }

    // REST.
    let token = valid_token("acme", "alice");
    let get = |path: String, token: Option<&str>| {
        let http = &http;
        let url = public(&r, &path);
        let token = token.map(str::to_owned);
        async move { http.send(Method::GET, url, token.as_deref(), None).await }
    };
    let list = "/v1/executions";
    let one = "/v1/executions/{task_id}";
    let logs = "/v1/executions/{task_id}/logs";
    let answers: Vec<(&str, String, Option<&str>, u16)> = vec![
        (list, "/v1/executions".into(), Some(&token), 200),
        (
            list,
            "/v1/executions?status=RUNNING&limit=1".into(),
            Some(&token),
            200,
        ),
        (one, "/v1/executions/t-42".into(), Some(&token), 200),
        (
            logs,
            "/v1/executions/t-42/logs?afterSeq=0".into(),
            Some(&token),
            200,
        ),
        (list, "/v1/executions".into(), None, 401),
        (list, "/v1/executions".into(), Some("not.a.jwt"), 401),
        (one, "/v1/executions/t-42".into(), None, 401),
        (logs, "/v1/executions/t-42/logs".into(), None, 401),
        (list, "/v1/executions?status=DONE".into(), Some(&token), 400),
        (list, "/v1/executions?limit=0".into(), Some(&token), 400),
        (list, "/v1/executions?cursor=nope".into(), Some(&token), 400),
        (
            list,
            "/v1/executions?organizationId=globex".into(),
            Some(&token),
            400,
        ),
        (
            list,
            "/v1/executions?limit=1&limit=2".into(),
            Some(&token),
            400,
        ),
        (
            logs,
            "/v1/executions/t-42/logs?afterSeq=-1".into(),
            Some(&token),
            400,
        ),
        (
            logs,
            "/v1/executions/t-42/logs?limit=5001".into(),
            Some(&token),
            400,
        ),
        (one, "/v1/executions/a%00b".into(), Some(&token), 400),
        // Was axum's plain-text rejection: not UTF-8 once percent-decoded.
        (one, "/v1/executions/%FF".into(), Some(&token), 400),
        (logs, "/v1/executions/%FF/logs".into(), Some(&token), 400),
        (one, "/v1/executions/no-such-task".into(), Some(&token), 404),
    ];
    for (route, path, token, status) in answers {
        let answer = get(path.clone(), token).await;
        assert_eq!(answer.status, status, "GET {path}: {answer:?}");
        assert_documented(&doc, "get", route, &answer, &path);
    }
    let answer = http
        .send(Method::POST, public(&r, list), Some(&token), None)
        .await;
    assert_eq!(answer.status, 405, "{answer:?}");
    assert_documented(&doc, "get", list, &answer, "POST");
}

/// Real answers of a replica without a history, with rate limits and a scoped key: 403,
/// 429 with `Retry-After`, and the REST API's 404 "history is not enabled".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_scopes_and_no_history_are_answered_as_documented() {
    const SCOPED: &str = "scoped-0123456789abcdef";
    let keys = std::env::temp_dir().join(format!("fanout-openapi-keys-{}", std::process::id()));
    std::fs::write(&keys, format!("ci-acme {SCOPED} acme\n")).unwrap();
    let _cleanup = Remove(keys.clone());
    let r = Replica::builder()
        .env("FANOUT_INGEST_KEYS_FILE", keys.display())
        .env("FANOUT_INGEST_RATE", 1)
        .env("FANOUT_REST_RATE_PER_USER", 1)
        .start()
        .await;
    let doc = r.get("/openapi.json").await.unwrap().json;
    let http = Http::new();
    let body = json!({"organizationId": "globex", "event": "e", "data": 1}).to_string();

    let answer = http
        .send(
            Method::POST,
            r.url("/v1/publish"),
            Some(SCOPED),
            Some(body.clone()),
        )
        .await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_documented(
        &doc,
        "post",
        "/v1/publish",
        &answer,
        "outside the key's scope",
    );

    // One message per second per key: a few at once are over it.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let answer = http
            .send(
                Method::POST,
                r.url("/v1/publish"),
                Some(INGEST_KEY),
                Some(body.clone()),
            )
            .await;
        assert_documented(&doc, "post", "/v1/publish", &answer, "the key's rate");
        statuses.push(answer.status);
        if answer.status == 429 {
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&200), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");

    let token = valid_token("acme", "alice");
    let first = http
        .send(
            Method::GET,
            public(&r, "/v1/executions"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(first.status, 404, "{first:?}");
    assert!(
        first.json["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("history is not enabled")),
        "{first:?}"
    );
    assert_documented(&doc, "get", "/v1/executions", &first, "no history");
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let answer = http
            .send(
                Method::GET,
                public(&r, "/v1/executions/t/logs"),
                Some(&token),
                None,
            )
            .await;
        assert_documented(
            &doc,
            "get",
            "/v1/executions/{task_id}/logs",
            &answer,
            "the user's rate",
        );
        statuses.push(answer.status);
        if answer.status == 429 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
}

/// A `sid` parameter of a REST request is no Engine.IO session: even the id of an ended
/// session (which Engine.IO's requests get refused with its own `{code, message}`) leaves
/// the API's answer as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sid_parameter_does_not_reach_the_engine() {
    let r = Replica::builder().start().await;
    let doc = r.get("/openapi.json").await.unwrap().json;
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(SOON)
        .build()
        .unwrap();
    // A long-polling session refused with auth-error: its id is ended.
    let open = http
        .get(public(&r, "/socket.io/?EIO=4&transport=polling"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sid = serde_json::from_str::<Value>(&open[1..]).unwrap()["sid"]
        .as_str()
        .unwrap()
        .to_string();
    let session = public(
        &r,
        &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
    );
    let post = http
        .post(&session)
        .body("40{\"token\":\"bad\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    eventually("the session to be ended", SOON, || async {
        let resp = http.get(&session).send().await.ok()?;
        (resp.status() == 400).then_some(())
    })
    .await;

    let token = valid_token("acme", "alice");
    let answer = Http::new()
        .send(
            Method::GET,
            public(&r, &format!("/v1/executions?sid={sid}")),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert_documented(&doc, "get", "/v1/executions", &answer, "a sid parameter");
}

/// Real answers of a replica whose PostgreSQL is unreachable: ingest and REST answer 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_history_is_answered_as_documented() {
    let closed = free_port();
    let r = Replica::builder()
        .database_url(&format!("postgres://postgres@127.0.0.1:{closed}/fanout"))
        .start()
        .await;
    let doc = r.get("/openapi.json").await.unwrap().json;
    let http = Http::new();
    let body = json!({"organizationId": "acme", "taskId": "t", "status": "RUNNING"});
    let answer = http
        .send(
            Method::POST,
            r.url("/executions/update"),
            Some(INGEST_KEY),
            Some(body.to_string()),
        )
        .await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_documented(
        &doc,
        "post",
        "/executions/update",
        &answer,
        "PostgreSQL down",
    );
    let token = valid_token("acme", "alice");
    let answer = http
        .send(
            Method::GET,
            public(&r, "/v1/executions/t"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_documented(
        &doc,
        "get",
        "/v1/executions/{task_id}",
        &answer,
        "PostgreSQL down",
    );
}

/// Removes a file when dropped.
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
