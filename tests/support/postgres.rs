//! A fresh PostgreSQL database per test, on the server named by `FANOUT_TEST_DATABASE_URL`
//! (default: trust auth for `postgres` on 127.0.0.1:5432; `scripts/test` provides one).
//!
//! Tests share the server but never a database: each creates `fanout_test_<random>`, so
//! they run in parallel and a failed run leaves nothing another test could trip on. The
//! database is dropped (with its connections) when the value is dropped.

use std::str::FromStr;

use tokio_postgres::{Client, NoTls};

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
}

/// The URL of the test server's maintenance database.
pub fn server_url() -> String {
    std::env::var("FANOUT_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_SERVER.to_string())
}

/// Connects to `url`; the connection's I/O runs on a spawned task.
pub async fn connect(url: &str) -> Client {
    let config = tokio_postgres::Config::from_str(url).expect("a PostgreSQL URL");
    let (client, connection) = config.connect(NoTls).await.unwrap_or_else(|e| {
        panic!("cannot connect to the test PostgreSQL (set FANOUT_TEST_DATABASE_URL): {e:?}")
    });
    tokio::spawn(connection);
    client
}

/// `url` with its database replaced by `name` (query parameters kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}

impl TestDb {
    /// Creates an empty database on the test server.
    pub async fn create() -> Self {
        let admin_url = server_url();
        let name = format!("fanout_test_{:016x}", rand::random::<u64>());
        connect(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        Self {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
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
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with
        // its own.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let admin_url = self.admin_url.clone();
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async { connect(&admin_url).await.batch_execute(&sql).await })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}
