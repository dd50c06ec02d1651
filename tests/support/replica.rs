//! A `fanout` replica: the real binary as a child process, on free ports.
//!
//! The environment is cleared and set from the builder only, so a developer's shell
//! (a `JWT_SECRET`, a `REDIS_URL` pointing at the shared Redis) never leaks into a test.
//! stdout and stderr are collected; a replica dropped while its test is panicking prints
//! them, which is usually all that is needed to see why.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::client::Client;
use super::metrics::Metrics;
use super::redis_server::RedisServer;
use super::{INGEST_KEY, INGEST_KEY_NEXT, SECRET, SOON, free_port, valid_token};

/// Path of the binary under test: `FANOUT_BIN` when set (to run the suite against another
/// build, such as one without a fix, to see its regression test fail), else this crate's.
pub fn bin() -> String {
    std::env::var("FANOUT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_fanout").to_string())
}

/// Settings of a replica before it starts. Defaults: `JWT_SECRET` = [`SECRET`], two ingest
/// keys, `RUST_LOG=info`, in-process bus.
pub struct ReplicaBuilder {
    name: String,
    env: BTreeMap<String, String>,
    /// The open-file limit (soft and hard) the process starts with, if set.
    nofile: Option<u64>,
}

pub struct Replica {
    pub name: String,
    /// The public (Socket.IO) listener.
    pub public: SocketAddr,
    /// The internal (ingest, ops) listener.
    pub internal: SocketAddr,
    child: Child,
    exit: Option<ExitStatus>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
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

    /// Uses `redis` as the bus (fleet mode).
    pub fn redis(self, redis: &RedisServer) -> Self {
        self.env("REDIS_URL", redis.url())
    }

    /// Stores events in `db` (`DATABASE_URL`).
    pub fn database(self, db: &super::TestDb) -> Self {
        self.env("DATABASE_URL", db.url())
    }

    /// Stores events in the database at `url` (e.g. a [`super::PgServer`]'s).
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
    /// not (e.g. while its Redis is down). Needs `RUST_LOG` to keep fanout's info lines.
    pub async fn spawn(self) -> Replica {
        for _ in 0..3 {
            let mut replica = Replica::launch(&self.name, &self.env, self.nofile);
            let deadline = Instant::now() + SOON;
            loop {
                // The log line comes after both binds: from then on, the ports are ours.
                if replica.stderr().contains("fanout is listening")
                    && replica
                        .get("/healthz")
                        .await
                        .is_some_and(|r| r.status == 200)
                {
                    return replica;
                }
                if let Some(status) = replica.try_exit() {
                    if replica.stderr().contains("cannot listen") {
                        break; // A port was taken after all: try others.
                    }
                    panic!(
                        "{} exited with {status} before it served /healthz:\n{}",
                        replica.name,
                        replica.stderr()
                    );
                }
                if Instant::now() >= deadline {
                    panic!("{} did not serve /healthz within {SOON:?}", replica.name);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        panic!("{}: could not find free ports", self.name);
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
            ("RUST_LOG", "info".to_string()),
            ("NO_COLOR", "1".to_string()),
        ];
        ReplicaBuilder {
            name: "replica".into(),
            env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            nofile: None,
        }
    }

    /// Starts a replica with the default settings on `redis`.
    pub async fn on(redis: &RedisServer, name: &str) -> Self {
        Self::builder().name(name).redis(redis).start().await
    }

    fn launch(name: &str, env: &BTreeMap<String, String>, nofile: Option<u64>) -> Self {
        let public: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let internal: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = Command::new(bin());
        if let Some(limit) = nofile {
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
        let mut child = command
            .env_clear()
            .envs(env)
            .env("FANOUT_LISTEN", public.to_string())
            .env("FANOUT_INTERNAL_LISTEN", internal.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the fanout binary");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            name: name.to_string(),
            public,
            internal,
            child,
            exit: None,
            stdout,
            stderr,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(SOON)
                .build()
                .unwrap(),
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self) {
        self.wait_readyz(200).await;
    }

    /// Waits until `/readyz` answers `status`.
    pub async fn wait_readyz(&mut self, status: u16) {
        let deadline = Instant::now() + SOON;
        loop {
            if self.readyz().await == Some(status) {
                return;
            }
            if let Some(exit) = self.try_exit() {
                panic!(
                    "{} exited with {exit} while waiting for /readyz {status}",
                    self.name
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: /readyz is {:?}, not {status}, after {SOON:?}",
                    self.name,
                    self.readyz().await
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
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
        let deadline = Instant::now() + SOON;
        loop {
            let reply = self.get("/readyz").await;
            if reply.as_ref().is_some_and(|r| r.json["store"] == "up") {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: the store is not up after {SOON:?}: {reply:?}",
                    self.name
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
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
        }
        self.exit
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} ({}) stderr -----\n{}----- {} stdout -----\n{}",
                self.name,
                self.public,
                self.stderr(),
                self.name,
                self.stdout()
            );
        }
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

/// Collects a child's output on a thread, line by line.
fn collect(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut b = sink.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
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
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "`fanout {}` with {env:?} still running after {SOON:?}",
                args.join(" ")
            );
        }
    }
}
