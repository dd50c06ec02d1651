//! Where the Redis master is: one fixed URL, or whatever Redis Sentinel says now.
//!
//! With Sentinel the master moves: after a failover a replica is promoted, and the old
//! master (if it comes back) is a replica. A replica still accepts `PUBLISH` and delivers it
//! to its own subscribers only, so a publisher left on it would lose messages silently while
//! every command succeeds. So the subscriber asks the sentinels at every (re)connection,
//! checks with `ROLE` that the node it was given really is the master, and the publishers'
//! pool is rebuilt to follow it: both always use the master the subscriber last connected
//! to. A probe that reaches no subscriber, or a publish that reaches none while this replica
//! holds sockets of the organization, sends the subscriber back to the sentinels.

use std::sync::RwLock;
use std::time::Duration;

use deadpool_redis::{PoolConfig, Runtime, Timeouts};

use super::{BusError, BusSetupError};

const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How to find the master.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// One Redis (`REDIS_URL`).
    Url(String),
    /// The master named `master`, as the sentinels at `sentinels` say.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

pub struct Master {
    target: RedisTarget,
    /// The publishers' pool, and the URL it connects to.
    pool: RwLock<Option<(String, deadpool_redis::Pool)>>,
}

impl Master {
    /// With a fixed URL the pool exists at once; with Sentinel, once the subscriber has
    /// found the master.
    pub fn new(target: RedisTarget) -> Result<Self, BusSetupError> {
        let pool = match &target {
            RedisTarget::Url(url) => {
                redis::Client::open(url.as_str())
                    .map_err(|e| BusSetupError::InvalidUrl(e.to_string()))?;
                Some((url.clone(), pool_for(url)?))
            }
            RedisTarget::Sentinel { .. } => None,
        };
        Ok(Self {
            target,
            pool: RwLock::new(pool),
        })
    }

    /// `redis` or `redis-sentinel`, for `/readyz`.
    pub fn name(&self) -> &'static str {
        match self.target {
            RedisTarget::Url(_) => "redis",
            RedisTarget::Sentinel { .. } => "redis-sentinel",
        }
    }

    /// The URL of the master now.
    pub async fn resolve(&self) -> Result<String, String> {
        match &self.target {
            RedisTarget::Url(url) => Ok(url.clone()),
            RedisTarget::Sentinel { sentinels, master } => ask_sentinels(sentinels, master).await,
        }
    }

    /// Points the publishers at `url` (the subscriber just connected there).
    pub fn use_url(&self, url: &str) -> Result<(), String> {
        let mut pool = self.pool.write().expect("not poisoned");
        if pool.as_ref().is_some_and(|(current, _)| current == url) {
            return Ok(());
        }
        tracing::info!(%url, "publishing to the redis master at {url}");
        *pool = Some((url.to_string(), pool_for(url).map_err(|e| e.to_string())?));
        Ok(())
    }

    /// The publishers' pool.
    pub fn pool(&self) -> Result<deadpool_redis::Pool, BusError> {
        self.pool
            .read()
            .expect("not poisoned")
            .as_ref()
            .map(|(_, pool)| pool.clone())
            .ok_or_else(|| BusError::Unavailable("the Redis master is not found yet".into()))
    }
}

fn pool_for(url: &str) -> Result<deadpool_redis::Pool, BusSetupError> {
    let mut cfg = deadpool_redis::Config::from_url(url);
    cfg.pool = Some(PoolConfig {
        max_size: 32,
        timeouts: Timeouts {
            wait: Some(COMMAND_TIMEOUT),
            create: Some(CONNECT_TIMEOUT),
            recycle: Some(COMMAND_TIMEOUT),
        },
        ..PoolConfig::default()
    });
    cfg.create_pool(Some(Runtime::Tokio1))
        .map_err(|e| BusSetupError::InvalidUrl(e.to_string()))
}

async fn timed<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

/// Asks each sentinel in turn for the master's address, then checks with the master itself
/// that it is one (a sentinel may not have seen the failover yet).
async fn ask_sentinels(sentinels: &[String], name: &str) -> Result<String, String> {
    let mut errors = Vec::new();
    for sentinel in sentinels {
        let answer = async {
            let client = redis::Client::open(sentinel.as_str()).map_err(|e| e.to_string())?;
            let mut conn = timed(
                "connect",
                CONNECT_TIMEOUT,
                client.get_multiplexed_async_connection(),
            )
            .await?;
            let mut ask = redis::cmd("SENTINEL");
            ask.arg("get-master-addr-by-name").arg(name);
            timed(
                "SENTINEL get-master-addr-by-name",
                COMMAND_TIMEOUT,
                ask.query_async::<Option<(String, u16)>>(&mut conn),
            )
            .await
        };
        match answer.await {
            Ok(Some((host, port))) => {
                let url = format!("redis://{host}:{port}");
                match role(&url).await {
                    Ok(role) if role == "master" => return Ok(url),
                    Ok(role) => {
                        errors.push(format!("{sentinel} names {host}:{port}, which is a {role}"))
                    }
                    Err(e) => errors.push(format!("{sentinel} names {host}:{port}: {e}")),
                }
            }
            Ok(None) => errors.push(format!("{sentinel} knows no master named {name:?}")),
            Err(e) => errors.push(format!("{sentinel}: {e}")),
        }
    }
    Err(format!(
        "no sentinel gave a reachable master: {}",
        errors.join("; ")
    ))
}

/// The first element of `ROLE`: `master`, `slave` or `sentinel`.
async fn role(url: &str) -> Result<String, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = timed(
        "connect",
        CONNECT_TIMEOUT,
        client.get_multiplexed_async_connection(),
    )
    .await?;
    let reply: redis::Value = timed(
        "ROLE",
        COMMAND_TIMEOUT,
        redis::cmd("ROLE").query_async(&mut conn),
    )
    .await?;
    match reply {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(role)) => Ok(String::from_utf8_lossy(role).into_owned()),
            Some(redis::Value::SimpleString(role)) => Ok(role.clone()),
            other => Err(format!("ROLE answered {other:?}")),
        },
        other => Err(format!("ROLE answered {other:?}")),
    }
}
