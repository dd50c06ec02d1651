//! Durable state in PostgreSQL, enabled by `DATABASE_URL`.
//!
//! Why PostgreSQL: the history needs transactions (an event and its sequence number are
//! committed together, so sequences have no gaps), ordered range reads by organization and
//! sequence (replay), and ad-hoc queries over projections; every deployment that runs the
//! backend already operates one. Redis stays the fan-out bus: the store is what survives.
//!
//! Why the advisory lock: replicas are started together by the orchestrator, and each one
//! applies the schema at start. A transaction-scoped advisory lock makes those callers take
//! turns without any coordinator (see [`migrations`]).
//!
//! A replica must keep serving ephemeral fan-out while PostgreSQL is down, so `serve` never
//! waits for the database: [`Store::start`] builds the pool (which connects lazily) and
//! migrates in a background task that retries until it succeeds.

pub mod events;
pub mod migrations;
pub mod read;
pub mod retention;
pub mod write;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::Notify;
use tokio_postgres::NoTls;

pub use migrations::{MIGRATIONS, Migration, migrate};

use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::protocol::BusKey;
use crate::retry::Retry;
use crate::tasks::{Policy, Tasks};

/// Used when `DATABASE_URL` sets no `connect_timeout`, so an unreachable server is reported
/// in seconds rather than after the operating system's TCP timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const POOL_SIZE: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// At most one warning per this interval while the database stays unreachable.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Why the store could not do something. Messages say which server and what failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("cannot migrate the database at {target}: {reason}")]
    Migrate { target: String, reason: String },
    #[error("cannot build the PostgreSQL pool: {0}")]
    Pool(String),
    #[error("PostgreSQL is unavailable ({0}); nothing was stored, retry later")]
    Unavailable(String),
    #[error("PostgreSQL refused the event: {0}")]
    Rejected(String),
}

/// The error and its causes on one line: tokio-postgres puts the useful part (the server's
/// message, the OS error) in the source. A cause the text already shows is not repeated:
/// tokio-postgres's and deadpool's errors print their source themselves.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `host:port/dbname` of a configuration, for messages (never the user or password).
pub fn target(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    // PostgreSQL's default database is the user's name.
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default();
    format!("{host}:{port}/{dbname}")
}

fn with_timeout(config: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    config
}

/// One connection, outside any pool (for `fanout migrate`). Its I/O runs on a spawned task.
pub async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, StoreError> {
    let (client, connection) =
        with_timeout(config)
            .connect(NoTls)
            .await
            .map_err(|e| StoreError::Connect {
                target: target(config),
                reason: describe(&e),
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %describe(&e), "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Connects and applies the missing migrations; returns the ones applied.
pub async fn migrate_once(config: &tokio_postgres::Config) -> Result<Vec<Migration>, StoreError> {
    let mut client = connect(config).await?;
    migrate(&mut client).await.map_err(|e| StoreError::Migrate {
        target: target(config),
        reason: describe(&e),
    })
}

/// The database of a replica: a connection pool, and whether the schema is known to be
/// current.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    migrated: Arc<AtomicBool>,
    health: Arc<Health>,
    /// The key of signed envelopes, read once the schema is current.
    bus_key: Arc<OnceLock<BusKey>>,
}

/// Whether PostgreSQL answers, as last seen. Any caller that sees a connection fail marks it
/// down; the watch task then probes with backoff and marks it up again.
struct Health {
    up: AtomicBool,
    down: Notify,
}

impl Store {
    /// Builds the pool (no connection is made yet) and starts migrating in the background.
    pub fn start(config: &tokio_postgres::Config, tasks: &Tasks) -> Result<Self, StoreError> {
        let manager = Manager::from_config(
            with_timeout(config),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(describe(&e)))?;
        let store = Self {
            pool,
            migrated: Arc::new(AtomicBool::new(false)),
            health: Arc::new(Health {
                up: AtomicBool::new(false),
                down: Notify::new(),
            }),
            bus_key: Arc::new(OnceLock::new()),
        };
        ::metrics::gauge!(metrics::STORE_UP).set(0.0);
        // Restarted if it fails: migrating again is a no-op, and the probe starts over.
        let (watched, target) = (store.clone(), target(config));
        tasks.spawn("store-watch", Policy::Restart, move |shutdown| {
            watched.clone().watch(target.clone(), shutdown)
        });
        Ok(store)
    }

    /// The key durable envelopes are signed with; `None` until the database was reached.
    pub fn bus_key(&self) -> Option<&BusKey> {
        self.bus_key.get()
    }

    /// Whether the background migration has succeeded.
    pub fn is_migrated(&self) -> bool {
        self.migrated.load(Ordering::Acquire)
    }

    /// Whether the schema is current and PostgreSQL answered the last time it was used.
    pub fn is_up(&self) -> bool {
        self.is_migrated() && self.health.up.load(Ordering::Acquire)
    }

    /// A pooled connection to a migrated database, or `Unavailable` saying why not.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if !self.is_migrated() {
            return Err(StoreError::Unavailable(
                "the schema is not migrated yet".into(),
            ));
        }
        self.pool.get().await.map_err(|e| {
            self.mark_down();
            StoreError::Unavailable(describe(&e))
        })
    }

    /// Turns a query error into `Unavailable`, and marks the store down when the error says
    /// the connection (not the statement) failed.
    pub fn failed(&self, error: &tokio_postgres::Error) -> StoreError {
        if error.code().is_none() || error.is_closed() {
            self.mark_down();
        }
        StoreError::Unavailable(describe(error))
    }

    fn mark_down(&self) {
        if self.health.up.swap(false, Ordering::AcqRel) {
            ::metrics::gauge!(metrics::STORE_UP).set(0.0);
            tracing::warn!(
                "PostgreSQL is unreachable; durable ingest answers 503 until it is back"
            );
            self.health.down.notify_one();
        }
    }

    fn mark_up(&self) {
        if !self.health.up.swap(true, Ordering::AcqRel) {
            ::metrics::gauge!(metrics::STORE_UP).set(1.0);
        }
    }

    /// Migrates, then watches: each time a caller marks the store down, probes it with
    /// backoff until it answers again.
    async fn watch(self, target: String, shutdown: Shutdown) {
        if !self
            .clone()
            .migrate_until_done(target.clone(), shutdown.clone())
            .await
        {
            return;
        }
        self.mark_up();
        loop {
            tokio::select! {
                _ = self.health.down.notified() => {}
                _ = shutdown.wait() => return,
            }
            let mut retry = Retry::new("reach PostgreSQL", BACKOFF_MIN, BACKOFF_MAX, WARN_EVERY);
            while !self.health.up.load(Ordering::Acquire) {
                let probe = match self.pool.get().await {
                    Ok(client) => client
                        .simple_query("SELECT 1")
                        .await
                        .map(|_| ())
                        .map_err(|e| describe(&e)),
                    Err(e) => Err(describe(&e)),
                };
                match probe {
                    Ok(()) => {
                        let failures = retry.succeeded();
                        tracing::info!(database = %target, failures, "PostgreSQL is reachable again");
                        self.mark_up();
                    }
                    Err(e) => {
                        if !retry.failed(format!("{target}: {e}"), &shutdown).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Retries with capped exponential backoff until the schema is current or the replica
    /// shuts down. Warnings are rate-limited: a database down for an hour is a few lines.
    async fn migrate_until_done(self, target: String, shutdown: Shutdown) -> bool {
        let mut retry = Retry::new(
            "migrate the database (ephemeral fan-out still works)",
            BACKOFF_MIN,
            BACKOFF_MAX,
            WARN_EVERY,
        );
        loop {
            let result = match self.pool.get().await {
                Ok(mut client) => match migrate(&mut client).await {
                    Ok(applied) => read_bus_key(&client).await.map(|key| (applied, key)),
                    Err(e) => Err(e),
                }
                .map_err(|e| describe(&e)),
                Err(e) => Err(describe(&e)),
            };
            match result {
                Ok((applied, key)) => {
                    let _ = self.bus_key.set(key);
                    self.migrated.store(true, Ordering::Release);
                    if applied.is_empty() {
                        tracing::info!(database = %target, "database is up to date");
                    } else {
                        tracing::info!(
                            database = %target,
                            applied = %summary(&applied),
                            "database migrated"
                        );
                    }
                    return true;
                }
                Err(reason) => {
                    if !retry.failed(format!("{target}: {reason}"), &shutdown).await {
                        return false;
                    }
                }
            }
        }
    }
}

/// The history's envelope key (migration 4 made it).
async fn read_bus_key(client: &tokio_postgres::Client) -> Result<BusKey, tokio_postgres::Error> {
    let row = client.query_one("SELECT key FROM bus_key", &[]).await?;
    let bytes: Vec<u8> = row.get(0);
    Ok(BusKey::new(&bytes).expect("the bus_key table holds keys of 32 bytes or more"))
}

/// `1 (init), 2 (...)`: the migrations applied, for messages.
pub fn summary(applied: &[Migration]) -> String {
    applied
        .iter()
        .map(|m| format!("{} ({})", m.version, m.name))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that prints its cause itself, as tokio-postgres's does, or not.
    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>, bool);

    impl std::fmt::Display for Chain {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)?;
            match &self.1 {
                Some(cause) if self.2 => write!(f, ": {cause}"),
                _ => Ok(()),
            }
        }
    }

    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn causes_are_described_once() {
        let fatal = Chain("FATAL: the database system is starting up", None, false);
        let db = Chain("db error", Some(Box::new(fatal)), true);
        let pool = Chain(
            "Error occurred while creating a new object",
            Some(Box::new(db)),
            true,
        );
        assert_eq!(
            describe(&pool),
            "Error occurred while creating a new object: db error: FATAL: the database system is starting up"
        );
        let io = Chain("connection refused", None, false);
        let quiet = Chain("error connecting to server", Some(Box::new(io)), false);
        assert_eq!(
            describe(&quiet),
            "error connecting to server: connection refused"
        );
    }
}
