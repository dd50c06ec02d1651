//! A private `redis-server` per test, on its own port, with no persistence.
//!
//! `stop` kills it with SIGKILL, like a crash: replicas see their connections drop, not a
//! polite shutdown. `restart` brings a fresh (empty) server back on the same port, which is
//! what a replica's reconnect loop must cope with.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use super::free_port;

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> Self {
        for _ in 0..5 {
            let mut server = Self {
                port: free_port(),
                child: None,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!(
            "redis-server did not start (is it installed and on PATH, or named by REDIS_SERVER?)"
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, the `REDIS_URL` of replicas.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh server on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.spawn().await {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
        }
    }

    /// Spawns the server and waits until it answers. False if it exited (port taken) or never
    /// answered.
    async fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let program = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let mut child = Command::new(program)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            if self.served_by(child.id()).await {
                self.child = Some(child);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Whether the server on our port answers and is the process `pid` (not another test
    /// process's server that took the port first).
    async fn served_by(&self, pid: u32) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
