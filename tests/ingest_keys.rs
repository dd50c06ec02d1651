//! Named ingest keys scoped to organizations (`FANOUT_INGEST_KEYS_FILE`), changed while the
//! replica runs.
//!
//! A key publishes only to the organizations of its line (403 elsewhere, naming the key and
//! the organization, never the secret, and delivering nothing); a change of the file is in
//! force within seconds, without a restart and without refusing a request that the keys
//! before and after the change both allow; a file that stops parsing leaves the keys in force
//! and says so in its metrics. The unscoped `FANOUT_INGEST_KEYS` keep working beside it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use fanout_testkit::replica::Reply;
use fanout_testkit::*;
use serde_json::json;

const EU: &str = "eu-0123456789abcdef";
const OPS: &str = "ops-0123456789abcdef";
const NEW: &str = "new-0123456789abcdef";

/// The keys file of one test: replaced whole (written beside it, then renamed), as an
/// orchestrator replaces a mounted secret; deleted at the end.
struct KeysFile(PathBuf);

impl KeysFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "fanout-ingest-keys-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let file = Self(path);
        file.replace(text);
        file
    }

    fn replace(&self, text: &str) {
        let next = self.0.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, &self.0).unwrap();
    }
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

async fn publish(r: &Replica, key: &str, org: &str, data: serde_json::Value) -> Reply {
    let body = json!({ "organizationId": org, "event": "tick", "data": data });
    r.post_raw("/v1/publish", body.to_string(), Some(key)).await
}

/// Waits until `fanout_ingest_keys_reloads_total{result}` reaches `n`.
async fn reloaded(r: &Replica, result: &str, n: f64) {
    r.wait_metric(
        "fanout_ingest_keys_reloads_total",
        &[("result", result)],
        |v| v >= n,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_publishes_only_to_its_organizations_and_is_named_not_shown() {
    let file = KeysFile::new(&format!(
        "# name key organizations\nci-eu {EU} acme,42\nops {OPS} *\n"
    ));
    let r = Replica::builder()
        .env("FANOUT_INGEST_KEYS_FILE", file.0.display())
        .start()
        .await;
    let mut acme = r.login("acme", "alice").await;
    let mut globex = r.login("globex", "bob").await;
    let mut numeric = r.login("42", "carol").await;

    for (org, member) in [("acme", &mut acme), ("42", &mut numeric)] {
        let reply = publish(&r, EU, org, json!("eu")).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(member.expect("tick", QUICK).await, json!("eu"));
    }
    let refused = publish(&r, EU, "globex", json!("leak")).await;
    assert_eq!(refused.status, 403, "{refused:?}");
    let error = refused.json["error"].as_str().unwrap();
    assert!(
        error.contains("\"ci-eu\"") && error.contains("\"globex\"") && !error.contains(EU),
        "{error}"
    );
    assert_eq!(
        r.metric("fanout_ingest_forbidden_total", &[("key", "ci-eu")])
            .await,
        1.0
    );
    // `*` covers every organization, and the unscoped keys of FANOUT_INGEST_KEYS still work,
    // named by their position.
    let reply = publish(&r, OPS, "globex", json!("ops")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = publish(&r, INGEST_KEY, "globex", json!("env")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    // The refused message was not delivered: the next one is the first globex receives.
    assert_eq!(globex.expect("tick", QUICK).await, json!("ops"));
    assert_eq!(globex.expect("tick", QUICK).await, json!("env"));
    for (key, n) in [("ci-eu", 3.0), ("ops", 1.0), ("1", 1.0)] {
        assert_eq!(
            r.metric("fanout_ingest_key_requests_total", &[("key", key)])
                .await,
            n,
            "{key}"
        );
    }
    assert_eq!(r.metric("fanout_ingest_keys", &[]).await, 4.0);
    // An unknown key is still 401.
    let reply = publish(&r, NEW, "acme", json!("x")).await;
    assert_eq!(reply.status, 401, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_in_force_without_a_restart_or_a_refused_request() {
    let file = KeysFile::new(&format!("ci-eu {EU} acme\nops {OPS} *\n"));
    let r = Arc::new(
        Replica::builder()
            .env("FANOUT_INGEST_KEYS_FILE", file.0.display())
            .start()
            .await,
    );
    let mut acme = r.login("acme", "alice").await;

    // A worker publishes to acme with ci-eu throughout: both versions of the file allow it.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let worker = tokio::spawn({
        let (r, stop, sent) = (r.clone(), stop.clone(), sent.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let n = sent.load(Ordering::Relaxed);
                let reply = publish(&r, EU, "acme", json!(n)).await;
                assert_eq!(
                    reply.status, 200,
                    "publish {n} during the reload: {reply:?}"
                );
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    // ci-eu gains globex, ops is retired, new arrives.
    file.replace(&format!("ci-eu {EU} acme,globex\nnew {NEW} globex\n"));
    reloaded(&r, "ok", 1.0).await;
    // The two unscoped keys of FANOUT_INGEST_KEYS, and the file's two.
    assert_eq!(r.metric("fanout_ingest_keys", &[]).await, 4.0);
    assert_eq!(publish(&r, EU, "globex", json!("g")).await.status, 200);
    assert_eq!(publish(&r, NEW, "globex", json!("g")).await.status, 200);
    assert_eq!(publish(&r, NEW, "acme", json!("a")).await.status, 403);
    assert_eq!(publish(&r, OPS, "acme", json!("a")).await.status, 401);

    // A version that does not parse leaves the keys in force, and says so.
    file.replace(&format!("ci-eu {EU} acme\nops short *\n"));
    reloaded(&r, "error", 1.0).await;
    assert_eq!(r.metric("fanout_ingest_keys_file_stale", &[]).await, 1.0);
    assert_eq!(publish(&r, NEW, "globex", json!("g")).await.status, 200);
    file.replace(&format!("ci-eu {EU} acme\n"));
    reloaded(&r, "ok", 2.0).await;
    assert_eq!(r.metric("fanout_ingest_keys_file_stale", &[]).await, 0.0);
    assert_eq!(publish(&r, NEW, "globex", json!("g")).await.status, 401);

    stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent > 0);
    // Every accepted message of the worker arrived, in order, and nothing else.
    let marker = json!({ "organizationId": "acme", "event": "marker", "data": null });
    let reply = r
        .post_raw("/v1/publish", marker.to_string(), Some(INGEST_KEY))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let got: Vec<_> = acme
        .events_until("marker", SOON)
        .await
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let expected: Vec<_> = (0..sent).map(|n| json!(n)).collect();
    assert_eq!(got, expected);
}
