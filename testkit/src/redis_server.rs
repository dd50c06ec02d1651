//! A private `redis-server` on a port of 127.0.0.1, with no persistence.
//!
//! Never the shared Redis on 6379: a test or a benchmark run starts its own, on a free port
//! ([`RedisServer::start`], the program named by `REDIS_SERVER`, else `redis-server` from
//! PATH) or on the port the caller chose ([`RedisServer::try_start_on`]). It is ready when it
//! answers `INFO` with its own process id, so a server that another process started on the
//! same port first is never mistaken for ours.
//!
//! `stop` kills it with SIGKILL, like a crash: replicas see their connections drop, not a
//! polite shutdown. `restart` brings a fresh (empty) server back on the same port, which is
//! what a replica's reconnect loop must cope with.
//!
//! [`RedisServer::start_tls`] serves TLS too, on a second port, with the certificate of the
//! [test CA](crate::tls): replicas get [`RedisServer::tls_url`], while every method here
//! (and [`RedisServer::url`]) keeps to the plain port, so a test sees what went through TLS
//! with the same tools as without.

use std::ffi::OsString;
use std::process::Command;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::free_port;
use crate::process::{Logs, Proc};

pub struct RedisServer {
    port: u16,
    /// The TLS port, if the server serves TLS too.
    tls_port: Option<u16>,
    program: OsString,
    logs: Logs,
    proc: Option<Proc>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers; panics if it cannot.
    pub async fn start() -> Self {
        Self::start_on_free_ports(false).await
    }

    /// [`start`](Self::start), serving TLS too on a port of its own: see
    /// [`tls_url`](Self::tls_url).
    pub async fn start_tls() -> Self {
        Self::start_on_free_ports(true).await
    }

    async fn start_on_free_ports(tls: bool) -> Self {
        let program = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let mut failures = Vec::new();
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                tls_port: tls.then(free_port),
                program: program.clone(),
                logs: Logs::Memory,
                proc: None,
            };
            match server.spawn().await {
                Ok(()) => return server,
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        panic!(
            "redis-server did not start (is it installed and on PATH, or named by \
             REDIS_SERVER?):\n{}",
            failures.join("\n")
        );
    }

    /// Starts `program` on `port` (which the caller made sure is free) and waits until it
    /// answers.
    pub async fn try_start_on(
        program: impl Into<OsString>,
        port: u16,
        logs: Logs,
    ) -> anyhow::Result<Self> {
        let mut server = Self {
            port,
            tls_port: None,
            program: program.into(),
            logs,
            proc: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while the server runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// `redis://127.0.0.1:<port>`, the `REDIS_URL` of replicas.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `rediss://127.0.0.1:<TLS port>`, the `REDIS_URL` of replicas on TLS; panics unless
    /// the server was started with [`start_tls`](Self::start_tls).
    pub fn tls_url(&self) -> String {
        crate::tls::url(
            self.tls_port
                .expect("tls_url: the server was not started with RedisServer::start_tls"),
        )
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Starts a fresh server on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self.spawn().await {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}: {e:#}",
                self.port
            );
        }
    }

    /// Spawns the server and waits until it answers; fails if it exited first (the port was
    /// taken), never answered, or cannot be run at all.
    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.program);
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--loglevel", "warning"]);
        if let Some(tls_port) = self.tls_port {
            command.args(crate::tls::server_args(tls_port));
        }
        let mut proc = Proc::spawn("redis", command, self.logs.clone()).map_err(|e| {
            e.context("install redis-server (apt-get install redis-server), or name it")
        })?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            // A TLS port that was taken makes it exit too.
            if let Some(status) = proc.exited() {
                anyhow::bail!(
                    "redis-server on port {} exited ({status})\n{}",
                    self.port,
                    proc.log_tail(20)
                );
            }
            if self.served_by(proc.pid()).await {
                self.proc = Some(proc);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!(
            "redis-server on port {} did not answer within 5 s\n{}",
            self.port,
            proc.log_tail(20)
        )
    }

    /// Whether the server on our port answers and is the process `pid` (not another
    /// process's server that took the port first).
    async fn served_by(&self, pid: u32) -> bool {
        served_by(&self.url(), pid).await
    }

    /// A new connection to the server.
    pub async fn conn(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connecting to the test redis")
    }

    /// `PUBLISH channel payload`; returns how many subscribers (replicas) received it.
    pub async fn publish(&self, channel: &str, payload: impl AsRef<[u8]>) -> i64 {
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload.as_ref())
            .query_async(&mut self.conn().await)
            .await
            .expect("PUBLISH")
    }

    /// `PUBSUB CHANNELS pattern`, sorted.
    pub async fn channels(&self, pattern: &str) -> Vec<String> {
        let mut chans: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query_async(&mut self.conn().await)
            .await
            .expect("PUBSUB CHANNELS");
        chans.sort();
        chans
    }

    /// `PUBSUB NUMSUB` of each channel: how many connections (replicas) subscribe to it.
    pub async fn numsub(&self, channels: &[String]) -> Vec<i64> {
        if channels.is_empty() {
            return Vec::new();
        }
        let pairs: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channels)
            .query_async(&mut self.conn().await)
            .await
            .expect("PUBSUB NUMSUB");
        pairs.into_iter().map(|(_, n)| n).collect()
    }
}

/// Whether the Redis server at `url` answers and is the process `pid`: its `INFO server`
/// names that process id, so a server that another process started on the port first is
/// never mistaken for our child. Shared with [`crate::redis_cluster`].
pub(crate) async fn served_by(url: &str, pid: u32) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(Ok(mut conn)) = tokio::time::timeout(
        Duration::from_secs(1),
        client.get_multiplexed_async_connection(),
    )
    .await
    else {
        return false;
    };
    let Ok(info) = redis::cmd("INFO")
        .arg("server")
        .query_async::<String>(&mut conn)
        .await
    else {
        return false;
    };
    info.lines()
        .any(|line| line.trim() == format!("process_id:{pid}"))
}
