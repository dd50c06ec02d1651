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
//!
//! The master is reached as the sentinel that named it was: over TLS for a `rediss://`
//! sentinel, with the sentinel URL's username and password (Helm charts for Sentinel give
//! both one password).

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
        Ok(Err(e)) => Err(explain(format!("{what}: {e}"))),
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
                let url = master_url(sentinel, &host, port);
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

/// The URL of the master at `host:port`, reached as `sentinel` is: the same scheme and
/// credentials.
fn master_url(sentinel: &str, host: &str, port: u16) -> String {
    let scheme = if sentinel.starts_with("rediss://") {
        "rediss"
    } else {
        "redis"
    };
    let info = redis::IntoConnectionInfo::into_connection_info(sentinel).ok();
    let settings = info.as_ref().map(redis::ConnectionInfo::redis_settings);
    let user = settings.and_then(|s| s.username()).map(encode);
    let password = settings.and_then(|s| s.password()).map(encode);
    let credentials = match (user, password) {
        (Some(user), Some(password)) => format!("{user}:{password}@"),
        (None, Some(password)) => format!(":{password}@"),
        (Some(user), None) => format!("{user}@"),
        (None, None) => String::new(),
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("{scheme}://{credentials}{host}:{port}")
}

/// A connection error, with what to do about it when it is a certificate the replica does
/// not trust.
pub fn explain(error: String) -> String {
    if error.contains("certificate") {
        format!(
            "{error} (with rediss://, Redis' certificate must chain to a CA in SSL_CERT_FILE, or in the system's store, and name the host connected to)"
        )
    } else {
        error
    }
}

/// Percent-encodes `text` for a URL's user information.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_is_reached_as_its_sentinel_is() {
        assert_eq!(
            master_url("redis://10.0.0.1:26379", "10.0.0.2", 6379),
            "redis://10.0.0.2:6379"
        );
        let url = master_url("rediss://:p%40ss%3Aw@s1:26379", "10.0.0.2", 6380);
        assert_eq!(url, "rediss://:p%40ss%3Aw@10.0.0.2:6380");
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
        assert_eq!(info.redis_settings().password(), Some("p@ss:w"));
        assert_eq!(
            master_url("redis://app:secret@s1:26379", "fd00::2", 6379),
            "redis://app:secret@[fd00::2]:6379"
        );
    }
}
