//! A fresh PostgreSQL database per test or benchmark run, on a shared server: the one named
//! by `FANOUT_TEST_DATABASE_URL` for tests (default: trust auth for `postgres` on
//! 127.0.0.1:5432; `scripts/test` provides one), the one of `--database-url` for the load
//! generator.
//!
//! Users share the server but never a database: each creates `<prefix>_<pid>_<random>`, so
//! they run in parallel, start from empty tables and never touch anyone else's data. The
//! database is dropped, with its sessions, by [`TestDb::drop_database`] (which says whether
//! it worked) or else when the value is dropped.

use std::time::Duration;

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of its own on a shared server.
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    dropped: bool,
}

/// The URL of the test server's maintenance database.
fn server_url() -> String {
    std::env::var("FANOUT_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER.to_string())
}

/// Connects to `url` within 10 s; the connection's I/O runs on a spawned task.
pub async fn try_connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
    tokio::spawn(connection);
    Ok(client)
}

/// [`try_connect`] for tests: panics if it fails.
pub(crate) async fn connect(url: &str) -> Client {
    try_connect(url).await.unwrap_or_else(|e| {
        panic!("cannot connect to the test PostgreSQL (set FANOUT_TEST_DATABASE_URL): {e:#}")
    })
}

impl TestDb {
    /// Creates an empty database on the test server; panics if it cannot.
    pub async fn create() -> Self {
        Self::try_create_on(&server_url(), "fanout_test")
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Creates `<prefix>_<pid>_<random>` on the server of `admin_url` (any database the user
    /// can connect to: only the server matters).
    pub async fn try_create_on(admin_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let name = format!(
            "{prefix}_{}_{:08x}",
            std::process::id(),
            crate::random_u64() as u32
        );
        let url = with_dbname(admin_url, &name)?;
        let client = try_connect(admin_url)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", redact(admin_url)))?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| anyhow::anyhow!("CREATE DATABASE {name}: {}", describe(&e)))?;
        Ok(Self {
            name,
            url,
            admin_url: admin_url.to_string(),
            dropped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `DATABASE_URL` of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn connect(&self) -> Client {
        connect(&self.url).await
    }

    /// `(version, name)` of every row of `schema_migrations`, in version order.
    pub async fn migrations(&self) -> Vec<(i32, String)> {
        self.connect()
            .await
            .query(
                "SELECT version, name FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .expect("reading schema_migrations")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// Drops the database now, ending its remaining sessions.
    pub async fn drop_database(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        drop_database(&self.admin_url, &self.name).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop runs inside the caller's runtime, which cannot be blocked on: use a thread
        // with its own.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(drop_database(&admin_url, &name))
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

async fn drop_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let client = try_connect(admin_url).await?;
    // WITH (FORCE) ends the sessions left; it needs PostgreSQL 13, and without it the
    // database can only be dropped once they are gone.
    if client
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .is_err()
    {
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
            .await
            .map_err(|e| anyhow::anyhow!("DROP DATABASE {name}: {}", describe(&e)))?;
    }
    Ok(())
}

/// The error and its causes on one line (tokio-postgres keeps the useful part in the source).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `url` with its database replaced by `db`; URLs (`postgres://…/db?…`) and key=value
/// strings (`host=… dbname=…`) both work.
fn with_dbname(url: &str, db: &str) -> anyhow::Result<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Key=value: a later key wins.
        return Ok(format!("{url} dbname={db}"));
    };
    anyhow::ensure!(
        scheme == "postgres" || scheme == "postgresql",
        "a PostgreSQL URL is postgres://USER@HOST:PORT/DB or key=value, not {:?}",
        redact(url)
    );
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = path.split('/').next().unwrap_or(path);
    Ok(format!("{scheme}://{authority}/{db}{query}"))
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=…"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:…@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_replaced() {
        assert_eq!(
            with_dbname("postgres://postgres@127.0.0.1:5432/postgres", "b").unwrap(),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_dbname("postgresql://u:p@h/x?sslmode=disable", "b").unwrap(),
            "postgresql://u:p@h/b?sslmode=disable"
        );
        assert_eq!(
            with_dbname("postgres://u@h:1", "b").unwrap(),
            "postgres://u@h:1/b"
        );
        assert_eq!(
            with_dbname("host=h user=u", "b").unwrap(),
            "host=h user=u dbname=b"
        );
        assert!(with_dbname("mysql://h/x", "b").is_err());
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:…@h/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h password=secret"), "host=h password=…");
    }
}
