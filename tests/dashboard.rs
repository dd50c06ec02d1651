//! The embedded dashboard and the demo worker: dev mode serves the repository's page under
//! `/dashboard/` and its banner links to it with a token that works; production serves it
//! only when asked; `--demo` publishes executions through the real ingest path, which a
//! member of the dev organization sees changing status (and, with a history, reads back
//! over REST with their `seq`). The page itself, in Chromium, is `tests/node/quickstart.test.mjs`.

use std::path::Path;
use std::time::Duration;

use fanout_testkit::*;
use serde_json::Value;

/// Long enough for a demo execution to run from `PENDING` to its final status (at most 7
/// test cases, 1.5 s each), on a loaded machine.
const EXECUTION: Duration = Duration::from_secs(40);

/// A dev-mode replica (no JWT key, no ingest key), with `env` added.
async fn dev(env: &[(&str, &str)]) -> Replica {
    let mut builder = Replica::builder()
        .unset("JWT_SECRET")
        .unset("FANOUT_INGEST_KEYS");
    for (k, v) in env {
        builder = builder.env(k, v);
    }
    builder.start().await
}

/// The banner's dashboard link: `http://HOST:PORT/dashboard/#token=JWT`.
async fn banner_link(r: &Replica) -> String {
    eventually("the dev banner's dashboard link", QUICK, || async {
        r.stdout()
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("http://") && l.contains("/dashboard/#token="))
            .map(String::from)
    })
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(QUICK)
        .build()
        .unwrap()
}

fn repository_file(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/dashboard")
            .join(name),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_the_repositorys_page_and_links_to_it_with_a_working_token() {
    let r = dev(&[]).await;
    let link = banner_link(&r).await;
    let (page, token) = link.split_once('#').unwrap();
    assert_eq!(page, format!("http://{}/dashboard/", r.public), "{link}");
    let token = token.strip_prefix("token=").unwrap();
    assert!(
        !page.contains('?'),
        "the token is never in a query string: {link}"
    );
    let (_, hello) = Client::authenticated(r.public, token).await;
    assert_eq!(hello["organizationId"], "demo");
    assert!(
        r.stdout().contains("add --demo"),
        "without --demo the banner says how to get the simulated worker"
    );
    // The banner's publish line, pasted into a shell as it is printed, publishes.
    let banner = r.stdout();
    let (_, after) = banner.split_once("Publish an update:\n").unwrap();
    let line = after.split("\nor:").next().unwrap();
    assert!(line.contains(" publish --url "), "{line}");
    let mut member = Client::authenticated(r.public, token).await.0;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(line)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"status":"published"}"#
    );
    let update = member.expect("execution-updated", QUICK).await;
    assert_eq!(update["taskId"], "task-1");
    // And where the HTTP APIs are described.
    let openapi = r
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("HTTP APIs:"))
        .and_then(|l| l.split_whitespace().next())
        .map(String::from)
        .expect("the banner's OpenAPI line");
    let doc: serde_json::Value = http()
        .get(&openapi)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0", "{openapi}");

    let http = http();
    let base = format!("http://{}", r.public);
    for (path, file, kind) in [
        ("/dashboard/", "index.html", "text/html"),
        ("/dashboard/index.html", "index.html", "text/html"),
        ("/dashboard/app.js", "app.js", "text/javascript"),
        ("/dashboard/style.css", "style.css", "text/css"),
        (
            "/dashboard/vendor/socket.io.min.js",
            "vendor/socket.io.min.js",
            "text/javascript",
        ),
    ] {
        let res = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let headers = res.headers().clone();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}: {headers:?}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        let etag = headers["etag"].clone();
        assert_eq!(
            res.bytes().await.unwrap().as_ref(),
            repository_file(file).as_slice(),
            "{path} is examples/dashboard/{file}, byte for byte"
        );
        let again = http
            .get(format!("{base}{path}"))
            .header("if-none-match", etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path} with its ETag");
    }
    let bare = http.get(format!("{base}/dashboard")).send().await.unwrap();
    assert_eq!(bare.status(), 308);
    assert_eq!(bare.headers()["location"], "/dashboard/");
    for path in [
        "/dashboard/README.md",
        "/dashboard/../Cargo.toml",
        "/dashboard/vendor/",
    ] {
        let res = r.get_public(path).await;
        assert_eq!(res.status, 404, "{path}: {}", res.text);
        assert!(res.json["error"].is_string(), "{path}: {}", res.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_serves_the_page_only_when_asked() {
    let r = Replica::builder().start().await;
    let res = r.get_public("/dashboard/").await;
    assert_eq!(res.status, 404, "{}", res.text);
    assert!(!r.stdout().contains("/dashboard/"), "no banner, no link");

    let r = Replica::builder()
        .env("FANOUT_SERVE_DASHBOARD", "1")
        .start()
        .await;
    let res = r.get_public("/dashboard/").await;
    assert_eq!(res.status, 200);
    assert_eq!(
        res.text.as_bytes(),
        repository_file("index.html").as_slice()
    );

    // And dev mode can be told not to.
    let r = dev(&[("FANOUT_SERVE_DASHBOARD", "0")]).await;
    eventually("the dev banner", QUICK, || async {
        r.stdout().contains("Ingest key: ").then_some(())
    })
    .await;
    assert!(!r.stdout().contains("/dashboard/"));
    assert_eq!(r.get_public("/dashboard/").await.status, 404);
}

/// Events of `client` until one execution was seen `RUNNING` and then final; returns that
/// execution's id and the statuses seen for it, in order.
async fn one_execution_to_its_end(client: &mut Client) -> (String, Vec<String>) {
    let mut statuses: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut logged = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + EXECUTION;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (event, data) = client.next_event(left).await;
        let task = data["taskId"].as_str().unwrap().to_owned();
        match event.as_str() {
            "execution-log" => {
                assert!(data["log"].is_string(), "{data}");
                logged.insert(task);
            }
            "execution-updated" => {
                let status = data["status"].as_str().unwrap().to_owned();
                let seen = statuses.entry(task.clone()).or_default();
                seen.push(status.clone());
                let ran = seen.iter().any(|s| s == "RUNNING");
                if ran && ["PASSED", "FAILED", "ERROR"].contains(&status.as_str()) {
                    assert!(logged.contains(&task), "{task} logged its test cases");
                    return (task, seen.clone());
                }
            }
            other => panic!("unexpected event {other}: {data}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_worker_publishes_executions_a_member_sees_change() {
    let r = dev(&[("FANOUT_DEMO", "1")]).await;
    let link = banner_link(&r).await;
    assert!(
        r.stdout().contains("demo worker is publishing"),
        "{}",
        r.stdout()
    );
    let token = link.split_once("#token=").unwrap().1;
    let (mut client, _) = Client::authenticated(r.public, token).await;
    let (task, statuses) = one_execution_to_its_end(&mut client).await;
    assert!(task.contains('-'), "{task}");
    assert!(
        statuses.windows(2).all(|w| w[0] != "PASSED"),
        "{statuses:?}"
    );
    // Through the ingest API: counted there like any worker's requests.
    let accepted = r
        .metric(
            "fanout_http_requests_total",
            &[("route", "/executions/update"), ("status", "200")],
        )
        .await;
    assert!(accepted >= 2.0, "{accepted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_history_the_demos_events_are_durable_and_read_back() {
    let db = TestDb::create().await;
    let r = Replica::builder()
        .unset("JWT_SECRET")
        .unset("FANOUT_INGEST_KEYS")
        .env("FANOUT_DEMO", "1")
        .database(&db)
        .start_with_store()
        .await;
    let link = banner_link(&r).await;
    let token = link.split_once("#token=").unwrap().1.to_owned();
    let (mut client, _) = Client::authenticated(r.public, &token).await;
    let (_, _, seq) = client.next_durable(EXECUTION).await;
    assert!(seq.is_some(), "the demo's events carry their seq");
    let (task, statuses) = one_execution_to_its_end(&mut client).await;
    let last = statuses.last().unwrap().clone();
    let row: Value = eventually("the execution over REST", QUICK, || async {
        let res = http()
            .get(format!("http://{}/v1/executions/{task}", r.public))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        let body: Value = res.json().await.ok()?;
        (body["status"] == last.as_str()).then_some(body)
    })
    .await;
    assert_eq!(row["taskId"], task.as_str());
}
