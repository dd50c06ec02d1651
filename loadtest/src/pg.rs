//! PostgreSQL for the durable side of `ingest`: the server settings that decide what a
//! commit costs, and the server's CPU time from /proc. The run's database itself is a
//! `fanout_testkit::TestDb`, created on the server of `--database-url` and dropped at the end.
//!
//! CPU attribution: when the server runs on this machine, its processes are visible in
//! /proc as `postgres`, and each backend's title names its database
//! (`postgres: 15/main: postgres fanout_bench_… 127.0.0.1(5432) idle`). The backends of
//! the run's database are counted apart from the rest of the server (WAL writer,
//! checkpointer, background writer, and sessions of other databases on a shared server).

use fanout_testkit::TestDb;
use serde::Serialize;

use crate::procs;

/// The settings that decide what a commit costs, as the server reports them.
pub async fn settings(db: &TestDb) -> Vec<(String, String)> {
    let Ok(client) = fanout_testkit::postgres::try_connect(db.url()).await else {
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
