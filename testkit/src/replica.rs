//! A `fanout` replica: the real binary as a child process ([`crate::process`]), on free
//! ports or on the ones the caller chose.
//!
//! The binary is the one `cargo test` built for the tests (`CARGO_BIN_EXE_fanout`, which
//! Cargo sets when it runs an integration test), unless `FANOUT_BIN` names another build,
//! such as one without a fix, to see its regression test fail; the load generator passes its
//! own ([`ReplicaBuilder::bin`]).
//!
//! The environment is cleared and set from the builder only, so a developer's shell
//! (a `JWT_SECRET`, a `REDIS_URL` pointing at the shared Redis, a `DATABASE_URL`) never
//! leaks into a test or a measurement.
//!
//! On free ports, another process may bind a port between the check and the child's bind:
//! a replica counts as started once its log says it listens (so it needs `RUST_LOG` at
//! `info`, the default) and `/healthz` answers, and is tried again on other ports if it
//! could not listen. On ports the caller chose, the caller made sure they are free.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

use crate::client::Client;
use crate::metrics::Metrics;
use crate::process::{Logs, Proc};
use crate::redis_server::RedisServer;
use crate::{INGEST_KEY, INGEST_KEY_NEXT, SECRET, SOON, free_port, valid_token};

/// Path of the binary under test: `FANOUT_BIN` when set, else the one Cargo built for the
/// integration test running (`CARGO_BIN_EXE_fanout`, set at run time since Cargo 1.94).
pub fn bin() -> PathBuf {
    std::env::var_os("FANOUT_BIN")
        .or_else(|| std::env::var_os("CARGO_BIN_EXE_fanout"))
        .map(PathBuf::from)
        .expect(
            "no fanout binary: run the tests with `cargo test`, which sets \
             CARGO_BIN_EXE_fanout, or name one with FANOUT_BIN",
        )
}

/// Settings of a replica before it starts. Defaults: `JWT_SECRET` = [`SECRET`], two ingest
/// keys, `RUST_LOG=info`, the in-process bus (`FANOUT_BUS=memory`), free ports, output in
/// memory.
pub struct ReplicaBuilder {
    name: String,
    bin: Option<PathBuf>,
    env: BTreeMap<String, String>,
    /// The open-file limit (soft and hard) the process starts with, if set.
    nofile: Option<u64>,
    /// `(public, internal)` chosen by the caller.
    listen: Option<(SocketAddr, SocketAddr)>,
    logs: Logs,
}

pub struct Replica {
    pub name: String,
    /// The public (Socket.IO) listener.
    pub public: SocketAddr,
    /// The internal (ingest, ops) listener.
    pub internal: SocketAddr,
    proc: Proc,
    http: reqwest::Client,
}

/// An HTTP answer of the internal listener.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub json: Value,
    pub text: String,
    pub headers: reqwest::header::HeaderMap,
}

impl ReplicaBuilder {
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// Runs this binary instead of [`bin`].
    pub fn bin(mut self, path: &Path) -> Self {
        self.bin = Some(path.to_path_buf());
        self
    }

    /// Listens on these addresses, which the caller made sure are free, instead of free
    /// ports of its own.
    pub fn listen(mut self, public: SocketAddr, internal: SocketAddr) -> Self {
        self.listen = Some((public, internal));
        self
    }

    /// Where the output goes (default: [`Logs::Memory`]).
    pub fn logs(mut self, logs: Logs) -> Self {
        self.logs = logs;
        self
    }

    /// Uses `redis` as the bus (fleet mode).
    pub fn redis(self, redis: &RedisServer) -> Self {
        self.redis_url(&redis.url())
    }

    /// Uses `cluster` as the bus (`REDIS_CLUSTER_URLS`: sharded pub/sub).
    pub fn redis_cluster(self, cluster: &crate::RedisCluster) -> Self {
        self.unset("FANOUT_BUS")
            .env("REDIS_CLUSTER_URLS", cluster.seed_urls())
    }

    /// Uses the master `sentinel` names as the bus (`REDIS_SENTINEL_URLS`).
    pub fn redis_sentinel(self, sentinel: &crate::RedisSentinel) -> Self {
        self.unset("FANOUT_BUS")
            .env("REDIS_SENTINEL_URLS", sentinel.sentinel_urls())
            .env("REDIS_SENTINEL_MASTER", sentinel.master_name())
    }

    /// [`redis`](Self::redis) over TLS: `redis`'s [`tls_url`](RedisServer::tls_url), and the
    /// [test CA](crate::tls) as the one root the replica trusts (`SSL_CERT_FILE`).
    pub fn redis_tls(self, redis: &RedisServer) -> Self {
        self.redis_url(&redis.tls_url()).trust_test_ca()
    }

    /// [`redis_cluster`](Self::redis_cluster) over TLS: `cluster`'s
    /// [`tls_seed_urls`](crate::RedisCluster::tls_seed_urls), and the test CA as the one root
    /// the replica trusts.
    pub fn redis_cluster_tls(self, cluster: &crate::RedisCluster) -> Self {
        self.unset("FANOUT_BUS")
            .env("REDIS_CLUSTER_URLS", cluster.tls_seed_urls())
            .trust_test_ca()
    }

    /// [`redis_sentinel`](Self::redis_sentinel) over TLS: `sentinel`'s
    /// [`tls_sentinel_urls`](crate::RedisSentinel::tls_sentinel_urls), and the test CA as the
    /// one root the replica trusts.
    pub fn redis_sentinel_tls(self, sentinel: &crate::RedisSentinel) -> Self {
        self.unset("FANOUT_BUS")
            .env("REDIS_SENTINEL_URLS", sentinel.tls_sentinel_urls())
            .env("REDIS_SENTINEL_MASTER", sentinel.master_name())
            .trust_test_ca()
    }

    /// `SSL_CERT_FILE` = the test CA's certificate: the roots the replica trusts, in place of
    /// the system's.
    fn trust_test_ca(self) -> Self {
        self.env("SSL_CERT_FILE", crate::tls::test_ca().ca_file.display())
    }

    /// Uses the Redis at `url` as the bus, instead of the in-process one.
    pub fn redis_url(self, url: &str) -> Self {
        self.unset("FANOUT_BUS").env("REDIS_URL", url)
    }

    /// Stores events in `db` (`DATABASE_URL`).
    pub fn database(self, db: &crate::TestDb) -> Self {
        self.env("DATABASE_URL", db.url())
    }

    /// Stores events in the database at `url` (e.g. a [`crate::PgServer`]'s).
    pub fn database_url(self, url: &str) -> Self {
        self.env("DATABASE_URL", url)
    }

    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.insert(key.to_string(), value.to_string());
        self
    }

    /// Starts the process with this open-file limit, soft and hard (as `prlimit --nofile`).
    pub fn descriptor_limit(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    /// Removes a default setting (e.g. `JWT_SECRET`, for dev mode).
    pub fn unset(mut self, key: &str) -> Self {
        self.env.remove(key);
        self
    }

    /// Starts the replica and waits until `/readyz` answers 200 and says its store is up
    /// (migrated and reachable): for replicas with a database.
    pub async fn start_with_store(self) -> Replica {
        let replica = self.start().await;
        replica.wait_store_up().await;
        replica
    }

    /// Starts the replica and waits until `/readyz` answers 200.
    pub async fn start(self) -> Replica {
        let mut replica = self.spawn().await;
        replica.wait_ready().await;
        replica
    }

    /// Starts the replica and waits until its internal listener answers `/healthz`, ready or
    /// not (e.g. while its Redis is down).
    pub async fn spawn(self) -> Replica {
        self.try_spawn().await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`ReplicaBuilder::start`] for callers that go on after a failure.
    pub async fn try_start(self) -> anyhow::Result<Replica> {
        let mut replica = self.try_spawn().await?;
        let url = replica.url("/readyz");
        replica.proc.wait_http(&url, 200, SOON).await?;
        Ok(replica)
    }

    async fn try_spawn(self) -> anyhow::Result<Replica> {
        let attempts = if self.listen.is_some() { 1 } else { 3 };
        for _ in 0..attempts {
            let mut replica = self.launch()?;
            let deadline = Instant::now() + SOON;
            loop {
                // On free ports, the log line (after both binds) says the ports are ours.
                if (self.listen.is_some() || replica.stderr().contains("fanout is listening"))
                    && replica
                        .get("/healthz")
                        .await
                        .is_some_and(|r| r.status == 200)
                {
                    return Ok(replica);
                }
                if let Some(status) = replica.exited() {
                    if self.listen.is_none() && replica.stderr().contains("cannot listen") {
                        break; // A port was taken after all: try others.
                    }
                    anyhow::bail!(
                        "{} exited with {status} before it served /healthz:\n{}",
                        replica.name,
                        replica.proc.log_tail(50)
                    );
                }
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "{} did not serve /healthz within {SOON:?}\n{}",
                        replica.name,
                        replica.proc.log_tail(20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        anyhow::bail!("{}: could not find free ports", self.name)
    }

    fn launch(&self) -> anyhow::Result<Replica> {
        let (public, internal) = self.listen.unwrap_or_else(|| {
            let port = || SocketAddr::from(([127, 0, 0, 1], free_port()));
            (port(), port())
        });
        let mut command = Command::new(self.bin.clone().unwrap_or_else(bin));
        if let Some(limit) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only an async-signal-safe system call between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        command
            .env_clear()
            .envs(&self.env)
            .env("FANOUT_LISTEN", public.to_string())
            .env("FANOUT_INTERNAL_LISTEN", internal.to_string());
        Ok(Replica {
            name: self.name.clone(),
            public,
            internal,
            proc: Proc::spawn(&self.name, command, self.logs.clone())
                .context("spawning the fanout binary")?,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(SOON)
                .build()
                .unwrap(),
        })
    }
}

impl Replica {
    pub fn builder() -> ReplicaBuilder {
        let env = [
            ("JWT_SECRET", SECRET.to_string()),
            (
                "FANOUT_INGEST_KEYS",
                format!("{INGEST_KEY},{INGEST_KEY_NEXT}"),
            ),
            ("FANOUT_BUS", "memory".to_string()),
            ("RUST_LOG", "info".to_string()),
            ("NO_COLOR", "1".to_string()),
        ];
        ReplicaBuilder {
            name: "replica".into(),
            bin: None,
            env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            nofile: None,
            listen: None,
            logs: Logs::Memory,
        }
    }

    /// Starts a replica with the default settings on `redis`.
    pub async fn on(redis: &RedisServer, name: &str) -> Self {
        Self::builder().name(name).redis(redis).start().await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        self.wait_readyz(200).await;
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_readyz(&mut self, status: u16) {
        let url = self.url("/readyz");
        if let Err(e) = self.proc.wait_http(&url, status, SOON).await {
            panic!("{e:#}");
        }
    }

    /// The status of `/readyz`, or `None` if the internal listener does not answer.
    pub async fn readyz(&self) -> Option<u16> {
        self.get("/readyz").await.map(|r| r.status)
    }

    /// `GET` on the internal listener; `None` if it does not answer.
    pub async fn get(&self, path: &str) -> Option<Reply> {
        let resp = self.http.get(self.url(path)).send().await.ok()?;
        Some(reply(resp).await)
    }

    /// `GET` on the public listener.
    pub async fn get_public(&self, path: &str) -> Reply {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.public))
            .send()
            .await
            .expect("GET on the public listener");
        reply(resp).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal)
    }

    /// `POST path` with a JSON body and the default ingest key.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, body.to_string(), Some(INGEST_KEY))
            .await
    }

    /// `POST path` with `body` as is, and `Authorization: Bearer <key>` if a key is given.
    pub async fn post_raw(&self, path: &str, body: impl Into<String>, key: Option<&str>) -> Reply {
        let mut req = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.into());
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        reply(req.send().await.expect("POST to the internal listener")).await
    }

    /// `POST /v1/publish` and checks that it was accepted.
    pub async fn publish(&self, org: &str, event: &str, data: Value) {
        let body = json!({ "organizationId": org, "event": event, "data": data });
        let r = self.post("/v1/publish", &body).await;
        assert_eq!(
            r.status, 200,
            "{}: publish {body} answered {r:?}",
            self.name
        );
        assert_eq!(r.json["status"], "published", "{r:?}");
    }

    /// Waits until `/readyz` says the store is up (migrated and reachable).
    pub async fn wait_store_up(&self) {
        self.try_wait_store_up()
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// [`Replica::wait_store_up`] for callers that go on after a failure.
    pub async fn try_wait_store_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + SOON;
        loop {
            let reply = self.get("/readyz").await;
            if reply.as_ref().is_some_and(|r| r.json["store"] == "up") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{}: the store is not up after {SOON:?}: {reply:?}\n{}",
                    self.name,
                    self.proc.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `POST /v1/publish` to one user of `org`, and checks that it was accepted.
    pub async fn publish_to_user(&self, org: &str, user: &str, event: &str, data: Value) {
        let body = json!({ "organizationId": org, "userId": user, "event": event, "data": data });
        let r = self.post("/v1/publish", &body).await;
        assert_eq!(
            r.status, 200,
            "{}: publish {body} answered {r:?}",
            self.name
        );
    }

    /// One scrape of `/metrics`.
    pub async fn metrics(&self) -> Metrics {
        let r = self.get("/metrics").await.expect("/metrics answers");
        assert_eq!(r.status, 200);
        Metrics::new(r.text)
    }

    /// The value of one metric (see [`Metrics::get`]).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics().await.get(name, labels)
    }

    /// Waits until `check` holds for the metric's value; returns that value.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        check: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + SOON;
        loop {
            let value = self.metric(name, labels).await;
            if check(value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: {name}{labels:?} is still {value} after {SOON:?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A client of `org`/`user` with a valid token, once authenticated.
    pub async fn login(&self, org: &str, user: &str) -> Client {
        Client::authenticated(self.public, &valid_token(org, user))
            .await
            .0
    }

    /// Sends SIGTERM.
    pub fn sigterm(&mut self) {
        self.proc.signal(libc::SIGTERM);
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(timeout).await
    }

    /// How the process exited, or `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.exited()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn stdout(&self) -> String {
        self.proc.stdout()
    }

    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// The process alone, for a caller that runs it next to other programs' processes.
    pub fn into_proc(self) -> Proc {
        self.proc
    }
}

/// Reads an HTTP answer into a [`Reply`].
pub async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        json,
        text,
        headers,
    }
}

/// Runs the binary to completion with `args` and exactly the environment `env`; panics if
/// it is still running after 10 s (an invalid setting that was accepted, say).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let child = Command::new(bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the fanout binary");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(SOON) {
        Ok(output) => output.expect("waiting for fanout"),
        Err(_) => {
            // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet
            // (its waiting thread is still waiting).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!(
                "`fanout {}` with {env:?} still running after {SOON:?}",
                args.join(" ")
            );
        }
    }
}
