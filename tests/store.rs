//! The PostgreSQL store: the schema is applied exactly once however many replicas and
//! `fanout migrate` runs start together, a bad `DATABASE_URL` stops the start without
//! showing its password, and `ExecutionStatus` maps to the `execution_status` enum.
//!
//! Each test gets its own database on the server of `FANOUT_TEST_DATABASE_URL`.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fanout::protocol::ExecutionStatus;
use fanout::store::MIGRATIONS;
use support::replica::{BIN, run_to_end};
use support::*;

/// Every migration, once, as `(version, name)`.
fn all_migrations() -> Vec<(i32, String)> {
    MIGRATIONS
        .iter()
        .map(|m| (m.version, m.name.to_string()))
        .collect()
}

fn migrate(db: &TestDb) -> std::process::Output {
    run_to_end(&["migrate"], &[("DATABASE_URL", db.url())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_then_migrate_is_a_no_op() {
    let db = TestDb::create().await;

    let first = migrate(&db);
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    assert_eq!(
        String::from_utf8_lossy(&first.stdout).trim(),
        format!("applied migrations: {}", fanout::store::summary(MIGRATIONS))
    );
    assert_eq!(db.migrations().await, all_migrations());

    let second = migrate(&db);
    assert_eq!(second.status.code(), Some(0), "{second:?}");
    assert_eq!(
        String::from_utf8_lossy(&second.stdout).trim(),
        "database is up to date"
    );
    assert_eq!(db.migrations().await, all_migrations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrate_runs_apply_each_migration_once() {
    let db = TestDb::create().await;
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(BIN)
                .arg("migrate")
                .env_clear()
                .env("DATABASE_URL", db.url())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning fanout migrate")
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("waiting for fanout migrate"))
        .collect();
    for out in &outputs {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    let applied = outputs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stdout).starts_with("applied migrations: "))
        .count();
    assert_eq!(
        applied, 1,
        "exactly one run applies the schema: {outputs:?}"
    );
    assert_eq!(db.migrations().await, all_migrations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_migrate_once() {
    let db = TestDb::create().await;
    let replicas = futures_util::future::join_all((0..3).map(|i| {
        Replica::builder()
            .name(&format!("r{i}"))
            .database(&db)
            .start()
    }))
    .await;
    let deadline = Instant::now() + SOON;
    let logs = loop {
        let logs: Vec<String> = replicas.iter().map(|r| r.stderr()).collect();
        let done = logs
            .iter()
            .filter(|l| l.contains("database migrated") || l.contains("database is up to date"))
            .count();
        if done == replicas.len() {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of 3 replicas migrated within {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let migrated = logs
        .iter()
        .filter(|l| l.contains("database migrated"))
        .count();
    assert_eq!(migrated, 1, "exactly one replica applies the schema");
    assert_eq!(db.migrations().await, all_migrations());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_while_postgres_is_unreachable() {
    let url = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/postgres",
        free_port()
    );
    let replica = Replica::builder().env("DATABASE_URL", &url).start().await;
    let deadline = Instant::now() + SOON;
    while !replica
        .stderr()
        .contains("cannot migrate the database; retrying")
    {
        assert!(Instant::now() < deadline, "no warning within {SOON:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!replica.stderr().contains("hunter2"));
    let mut alice = replica.login("acme", "alice").await;
    replica
        .publish("acme", "hello", serde_json::json!({"n": 1}))
        .await;
    let data = alice.expect("hello", QUICK).await;
    assert_eq!(data["n"], 1, "{data}");
}

#[test]
fn migrate_with_a_bad_url_names_database_url_and_hides_the_password() {
    let out = run_to_end(
        &["migrate"],
        &[(
            "DATABASE_URL",
            "postgres://fanout:hunter2@db:notaport/events",
        )],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("fanout: invalid DATABASE_URL: ")
            && stderr.trim_end().lines().count() == 1,
        "{stderr:?}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr:?}");

    let out = run_to_end(&["migrate"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("fanout: invalid DATABASE_URL: is not set"),
        "{stderr:?}"
    );
}

#[test]
fn migrate_without_a_server_exits_1_with_one_line() {
    let url = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/postgres",
        free_port()
    );
    let out = run_to_end(&["migrate"], &[("DATABASE_URL", &url)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("fanout: cannot connect to PostgreSQL at 127.0.0.1:")
            && stderr.trim_end().lines().count() == 1,
        "{stderr:?}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_status_round_trips_through_postgres() {
    let db = TestDb::create().await;
    let mut client = db.connect().await;
    let applied = fanout::store::migrate(&mut client).await.expect("migrate");
    assert_eq!(applied.len(), MIGRATIONS.len());
    for status in ExecutionStatus::ALL {
        let row = client
            .query_one(
                "INSERT INTO executions
                     (organization_id, task_id, status, updated_at, data, last_seq)
                 VALUES ('acme', $1, $2, now(), '{}', 1)
                 RETURNING status, status::text",
                &[&status.as_str(), &status],
            )
            .await
            .expect("insert");
        let back: ExecutionStatus = row.get(0);
        let text: String = row.get(1);
        assert_eq!(back, status);
        assert_eq!(text, status.as_str());
    }
    // The database refuses a status the enum does not have.
    let err = client
        .execute("SELECT 'DONE'::execution_status", &[])
        .await
        .unwrap_err();
    assert!(
        fanout::store::describe(&err).contains("invalid input value for enum"),
        "{err:?}"
    );
    assert!(
        fanout::store::migrate(&mut client)
            .await
            .unwrap()
            .is_empty()
    );
}
