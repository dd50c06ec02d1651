//! `fanout publish`: one event through a replica's ingest API from the command line. Flags
//! are checked as the replica checks them (exit 2, naming the flag); the replica's answer is
//! printed as it came (exit 0 with `status`, and `seq` with a history; exit 1 with the
//! refusal); and the event reaches the organization's members like any other.

use fanout_testkit::replica::run_to_end;
use fanout_testkit::*;
use serde_json::{Value, json};

/// Runs `fanout publish ARGS` against `r` with `env` added; returns (exit code, stdout,
/// stderr).
async fn publish(r: &Replica, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let url = format!("http://{}", r.internal);
    publish_to(&url, args, env).await
}

async fn publish_to(url: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut argv: Vec<String> = vec!["publish".into()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut envs: Vec<(String, String)> = vec![("FANOUT_INGEST_URL".into(), url.to_string())];
    envs.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let out = tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_to_end(&argv, &envs)
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const DATA: &str = r#"{"taskId":"t1","status":"PASSED","z":[1,2]}"#;

/// Publishes `DATA` as `execution-updated` to acme with the ingest key; checks the exit
/// code and returns the answer printed.
async fn publish_update(r: &Replica) -> Value {
    let key = [("FANOUT_INGEST_KEY", INGEST_KEY)];
    let args = [
        "--org",
        "acme",
        "--event",
        "execution-updated",
        "--data",
        DATA,
    ];
    let (code, stdout, stderr) = publish(r, &args, &key).await;
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_from_the_command_line_reaches_the_members() {
    let r = Replica::builder().start().await;
    let mut alice = r.login("acme", "alice").await;
    let mut other = r.login("globex", "bob").await;
    let answer = publish_update(&r).await;
    assert_eq!(answer, json!({ "status": "published" }));
    let data = alice.expect("execution-updated", QUICK).await;
    assert_eq!(data, serde_json::from_str::<Value>(DATA).unwrap());

    // The key may also come from FANOUT_INGEST_KEYS (its first), as on a replica's host;
    // --user narrows the audience to one user.
    let keys = [("FANOUT_INGEST_KEYS", format!(" ,{INGEST_KEY},other"))];
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, _, stderr) = publish(
        &r,
        &[
            "--org", "globex", "--user", "bob", "--event", "note", "--data", "\"hi\"",
        ],
        &keys,
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(other.expect("note", QUICK).await, json!("hi"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_history_the_answer_carries_the_seq() {
    let db = TestDb::create().await;
    let r = Replica::builder().database(&db).start_with_store().await;
    let mut alice = r.login("acme", "alice").await;
    for seq in 1..=2 {
        let answer = publish_update(&r).await;
        assert_eq!(answer, json!({ "status": "published", "seq": seq }));
        let (_, _, got) = alice.next_durable(QUICK).await;
        assert_eq!(got, Some(seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_refused_before_anything_is_sent_and_refusals_are_shown() {
    let r = Replica::builder().start().await;
    let key = [("FANOUT_INGEST_KEY", INGEST_KEY)];
    let base = ["--org", "acme", "--event", "tick", "--data", "1"];
    let with = |flag: &'static str, value: &'static str| {
        let mut args = base.to_vec();
        match args.iter().position(|a| *a == flag) {
            Some(i) => args[i + 1] = value,
            None => args.extend([flag, value]),
        }
        args
    };
    for (args, flag) in [
        (with("--org", "ac:me"), "--org"),
        (with("--event", "auth-success"), "--event"),
        (with("--data", "{\"taskId\":"), "--data"),
        (with("--user", ""), "--user"),
        (with("--url", "ftp://127.0.0.1:1"), "--url"),
        (with("--timeout", "soon"), "--timeout"),
    ] {
        let (code, stdout, stderr) = publish(&r, &args, &key).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("fanout: invalid {flag}: ")),
            "{args:?}: {stderr}"
        );
        assert!(stdout.is_empty());
    }
    let (code, _, stderr) = publish(&r, &base, &[]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("invalid --key") && stderr.contains("FANOUT_INGEST_KEY"),
        "{stderr}"
    );

    // The replica's refusal, as it answered it.
    let (code, stdout, stderr) = publish(&r, &base, &[("FANOUT_INGEST_KEY", "wrong")]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("refused with 401") && stderr.contains("missing or unknown ingest key"),
        "{stderr}"
    );
    // No replica there: said so.
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let (code, _, stderr) = publish_to(&nobody, &base, &key).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no answer from") && stderr.contains("cannot connect"),
        "{stderr}"
    );
}
