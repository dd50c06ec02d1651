//! `--demo` (`FANOUT_DEMO=1`, dev mode only): a simulated worker inside the replica, so that
//! the dashboard the banner links to shows executions changing with the first command alone.
//!
//! It is a client like any worker: it POSTs to this replica's own ingest API with the dev
//! ingest key, so what a newcomer watches went through the real path (the key check, the
//! body's validation, the bus, and with `DATABASE_URL` the history and its `seq`), and a
//! refusal shows in the log as a worker would see it. Its executions look like a test
//! platform's (the compose demo's simulator, `examples/compose/worker-sim/`, does the same
//! for several organizations): `PENDING`, then `RUNNING` with a log line per test case and
//! its progress, then `PASSED`, `FAILED` or `ERROR`. A few run at once, at a few events per
//! second in all: a modest rate, readable on the page.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use rand::Rng;
use rand::seq::IndexedRandom;
use serde::Serialize;
use serde_json::{Value, json};

use crate::ops::http::Peer;
use crate::retry::RateLimit;
use crate::tasks::{Policy, Tasks};

/// The organization the demo publishes to: the dev token's.
pub const ORG: &str = "demo";
/// Executions running at once.
const CONCURRENCY: usize = 3;
/// How long one request may take before it counts as failed.
const TIMEOUT: Duration = Duration::from_secs(10);

const SUITES: &[(&str, &[&str])] = &[
    (
        "checkout-e2e",
        &[
            "adds item to cart",
            "applies coupon",
            "pays by card",
            "pays by invoice",
            "shows receipt",
            "sends confirmation mail",
            "handles declined card",
        ],
    ),
    (
        "search-api",
        &[
            "empty query",
            "exact match",
            "fuzzy match",
            "facets",
            "pagination",
            "sort by price",
            "unicode terms",
        ],
    ),
    (
        "mobile-smoke",
        &[
            "cold start",
            "login",
            "push registration",
            "offline banner",
            "logout",
        ],
    ),
    (
        "billing-integration",
        &[
            "creates invoice",
            "prorates upgrade",
            "refunds",
            "tax by region",
            "currency rounding",
        ],
    ),
];
const BRANCHES: &[&str] = &["main", "main", "release/2.4", "feat/faster-search"];

/// Starts the simulated worker, publishing to the ingest API at `internal` with `key`.
pub fn start(internal: SocketAddr, key: String, tasks: &Tasks) {
    // The internal listener may listen on every address: reach it on loopback.
    let host = match internal {
        SocketAddr::V4(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        SocketAddr::V6(a) if a.ip().is_unspecified() => format!("[::1]:{}", a.port()),
        addr => addr.to_string(),
    };
    let peer = Peer::new(&format!("http://{host}")).expect("a socket address is a valid URL");
    tracing::info!(
        organization = ORG,
        "demo worker: publishing simulated executions through the ingest API"
    );
    // Restarted if it fails: it keeps no state the next execution needs.
    tasks.spawn("demo-worker", Policy::Restart, move |shutdown| {
        let worker = Worker {
            peer: peer.clone(),
            authorization: format!("Bearer {key}"),
            warn: Mutex::new(RateLimit::new(Duration::from_secs(10))),
        };
        async move {
            tokio::select! {
                _ = worker.run() => {}
                _ = shutdown.wait() => {}
            }
        }
    });
}

struct Worker {
    peer: Peer,
    authorization: String,
    /// At most one warning per interval while ingest refuses the demo's requests.
    warn: Mutex<RateLimit>,
}

/// An execution's `progress`, as the compose simulator sends it.
#[derive(Serialize, Default)]
struct Progress {
    done: usize,
    passed: usize,
    failed: usize,
    total: usize,
}

impl Worker {
    /// [`CONCURRENCY`] slots, each running executions one after the other, the first ones
    /// staggered.
    async fn run(&self) {
        let slot = |slot: usize| async move {
            pause(slot as f64 * 1.5, slot as f64 * 1.5 + 0.5).await;
            loop {
                // Drawn before the await: the thread's generator is not `Send`.
                let plan = Plan::new(&mut rand::rng());
                self.execution(plan).await;
                pause(1.0, 3.0).await;
            }
        };
        futures_util::future::join_all((0..CONCURRENCY).map(slot)).await;
    }

    /// One execution, from `PENDING` to its final status.
    async fn execution(&self, plan: Plan) {
        let mut progress = Progress {
            total: plan.cases.len(),
            ..Progress::default()
        };
        self.update(&plan, "PENDING", &progress, None).await;
        pause(0.5, 2.0).await;
        let started = tokio::time::Instant::now();
        self.update(&plan, "RUNNING", &progress, None).await;
        let checkout = format!(
            "{}: checked out {}@{}, running {} tests",
            plan.worker,
            plan.branch,
            plan.commit,
            plan.cases.len()
        );
        self.log(&plan, checkout).await;
        let mut last = "PASSED";
        for (i, case) in plan.cases.iter().enumerate() {
            pause(0.4, 1.5).await;
            if plan.errors_at == Some(i) {
                let line = "runner lost connection to the browser farm: giving up";
                self.log(&plan, line.into()).await;
                last = "ERROR";
                break;
            }
            let ms = rand::rng().random_range(40..2500);
            if plan.fails_at == Some(i) {
                progress.failed += 1;
                last = "FAILED";
                self.log(&plan, format!("✗ {case} ({ms} ms): expected 200, got 500"))
                    .await;
            } else {
                progress.passed += 1;
                self.log(&plan, format!("✓ {case} ({ms} ms)")).await;
            }
            progress.done = i + 1;
            self.update(&plan, "RUNNING", &progress, None).await;
        }
        let took = started.elapsed().as_millis() as u64;
        self.update(&plan, last, &progress, Some(took)).await;
    }

    async fn update(&self, plan: &Plan, status: &str, progress: &Progress, took_ms: Option<u64>) {
        let mut body = json!({
            "organizationId": ORG,
            "taskId": plan.task_id,
            "status": status,
            "suite": plan.suite,
            "branch": plan.branch,
            "commit": plan.commit,
            "worker": plan.worker,
            "progress": progress,
        });
        if let Some(ms) = took_ms {
            body["durationMs"] = json!(ms);
        }
        self.post("/executions/update", body).await;
    }

    async fn log(&self, plan: &Plan, line: String) {
        let body = json!({"organizationId": ORG, "taskId": plan.task_id, "log": line});
        self.post("/executions/log", body).await;
    }

    /// POSTs one body; a refusal or no answer is logged (at most every 10 s) and the
    /// execution goes on, as a worker's would.
    async fn post(&self, route: &'static str, body: Value) {
        let answer = self
            .peer
            .send(
                Method::POST,
                Some(route),
                &[
                    ("authorization", &self.authorization),
                    ("content-type", "application/json"),
                ],
                Bytes::from(body.to_string()),
                64 * 1024,
                TIMEOUT,
            )
            .await;
        let problem = match answer {
            Ok(a) if a.status.is_success() => return,
            Ok(a) => format!("{} {}", a.status, String::from_utf8_lossy(&a.body)),
            Err(e) => e,
        };
        if let Some(suppressed) = self.warn.lock().unwrap().check() {
            tracing::warn!(
                route,
                suppressed_since_last = suppressed,
                "demo worker: not accepted: {problem}"
            );
        }
    }
}

async fn pause(low: f64, high: f64) {
    let secs = rand::rng().random_range(low..=high.max(low));
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

/// What one execution will do, drawn at its start.
struct Plan {
    task_id: String,
    suite: &'static str,
    branch: &'static str,
    commit: String,
    worker: String,
    cases: Vec<&'static str>,
    fails_at: Option<usize>,
    errors_at: Option<usize>,
}

impl Plan {
    fn new(rng: &mut impl Rng) -> Self {
        let (suite, all) = *SUITES.choose(rng).expect("suites are listed");
        let count = rng.random_range(3..=all.len());
        let cases: Vec<&'static str> = all.choose_multiple(rng, count).copied().collect();
        let fails = rng.random_bool(0.2);
        let errors = !fails && rng.random_bool(0.05);
        Self {
            task_id: format!("{suite}-{:08x}", rng.random::<u32>()),
            suite,
            branch: BRANCHES.choose(rng).expect("branches are listed"),
            commit: format!("{:07x}", rng.random::<u32>() >> 4),
            worker: format!("runner-{}", rng.random_range(1..=8)),
            fails_at: fails.then(|| rng.random_range(0..cases.len())),
            errors_at: errors.then_some(cases.len() / 2),
            cases,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_valid_executions() {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let p = Plan::new(&mut rng);
            assert!(p.cases.len() >= 3);
            assert!(p.fails_at.is_none_or(|i| i < p.cases.len()));
            assert!(!(p.fails_at.is_some() && p.errors_at.is_some()));
            assert!(crate::protocol::TaskId::parse(&p.task_id).is_ok());
        }
    }
}
