//! PostgreSQL for the durable side of `ingest`: a fresh database per run, the server
//! settings that decide what a commit costs, and the server's CPU time from /proc.
//!
//! The database is created on the server of `--database-url` (any database the user can
//! connect to; only the server matters) under a unique name and dropped at the end, so a
//! run starts from empty tables and never touches anyone else's data.
//!
//! CPU attribution: when the server runs on this machine, its processes are visible in
//! /proc as `postgres`, and each backend's title names its database
//! (`postgres: 15/main: postgres fanout_bench_… 127.0.0.1(5432) idle`). The backends of
//! the run's database are counted apart from the rest of the server (WAL writer,
//! checkpointer, background writer, and sessions of other databases on a shared server).

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::procs;

/// The run's database.
pub struct BenchDb {
    admin_url: String,
    pub name: String,
    /// `--database-url` with the run's database instead of its own.
    pub url: String,
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) =
        tokio::time::timeout(Duration::from_secs(10), tokio_postgres::connect(url, NoTls))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))?
            .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
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

impl BenchDb {
    /// Creates `fanout_bench_<pid>_<random>` on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "fanout_bench_{}_{:06x}",
            std::process::id(),
            nanos & 0xff_ffff
        );
        let client = connect(admin_url).await.with_context(|| {
            format!(
                "connecting to PostgreSQL at {} (pass --database-url)",
                redact(admin_url)
            )
        })?;
        client
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| anyhow::anyhow!("CREATE DATABASE {name}: {}", describe(&e)))?;
        Ok(Self {
            url: with_dbname(admin_url, &name)?,
            admin_url: admin_url.to_string(),
            name,
        })
    }

    /// Drops the database, ending its remaining sessions.
    pub async fn drop_database(&self) -> anyhow::Result<()> {
        let client = connect(&self.admin_url).await?;
        let name = &self.name;
        // WITH (FORCE) needs PostgreSQL 13; without it, the replicas are stopped already.
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

    /// The settings that decide what a commit costs, as the server reports them.
    pub async fn settings(&self) -> Vec<(String, String)> {
        let Ok(client) = connect(&self.url).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for name in [
            "server_version",
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "commit_delay",
            "full_page_writes",
            "shared_buffers",
            "max_wal_size",
            "checkpoint_timeout",
        ] {
            if let Ok(row) = client.query_one(&format!("SHOW {name}"), &[]).await {
                out.push((name.to_string(), row.get::<_, String>(0)));
            }
        }
        out
    }
}

/// `url` with its database replaced by `db`; URLs (`postgres://…/db?…`) and key=value
/// strings (`host=… dbname=…`) both work.
pub fn with_dbname(url: &str, db: &str) -> anyhow::Result<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Key=value: a later key wins.
        return Ok(format!("{url} dbname={db}"));
    };
    anyhow::ensure!(
        scheme == "postgres" || scheme == "postgresql",
        "--database-url must be postgres://USER@HOST:PORT/DB or key=value, not {:?}",
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
pub fn redact(url: &str) -> String {
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

/// CPU seconds of the PostgreSQL server's processes at one instant.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PgCpu {
    /// Backends connected to the run's database.
    pub bench: f64,
    /// Every other `postgres` process: WAL writer, checkpointer, background writer,
    /// sessions of other databases.
    pub other: f64,
    pub bench_backends: usize,
}

/// `None` when no `postgres` process is visible (the server runs elsewhere).
pub fn cpu(dbname: &str) -> Option<PgCpu> {
    let needle = format!(" {dbname} ");
    let mut out = PgCpu::default();
    let mut seen = false;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if comm.trim_end() != "postgres" {
            continue;
        }
        let Some(secs) = procs::cpu_seconds(Some(pid)) else {
            continue;
        };
        seen = true;
        let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let title = String::from_utf8_lossy(&title).replace('\0', " ");
        if title.contains(&needle) {
            out.bench += secs;
            out.bench_backends += 1;
        } else {
            out.other += secs;
        }
    }
    seen.then_some(out)
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
