//! The PostgreSQL store: the schema is applied exactly once however many replicas and
//! `fanout migrate` runs start together, a bad `DATABASE_URL` stops the start without
//! showing its password, `ExecutionStatus` maps to the `execution_status` enum, a replica
//! outlives a PostgreSQL restart, and retention deletes expired events only.
//!
//! Each test gets its own database on the server of `FANOUT_TEST_DATABASE_URL`, or its own
//! server ([`PgServer`]) when it stops PostgreSQL.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fanout::protocol::ExecutionStatus;
use fanout::store::MIGRATIONS;
use fanout_testkit::replica::{bin, run_to_end};
use fanout_testkit::*;

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
            Command::new(bin())
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
    let redis = RedisServer::start().await;
    let replica = Replica::builder()
        .redis(&redis)
        .env("DATABASE_URL", &url)
        .start()
        .await;
    let deadline = Instant::now() + SOON;
    while !replica
        .stderr()
        .contains("cannot migrate the database (ephemeral fan-out still works)")
    {
        assert!(Instant::now() < deadline, "no warning within {SOON:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(!replica.stderr().contains("hunter2"));
    // Ready (sockets are served), and saying what is wrong.
    let ready = replica.get("/readyz").await.unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.json["store"], "down", "{ready:?}");
    assert_eq!(replica.metric("fanout_store_up", &[]).await, 0.0);

    let mut alice = replica.login("acme", "alice").await;
    // Durable ingest cannot commit: a definite 503, nothing delivered.
    let refused = replica
        .post(
            "/executions/update",
            &serde_json::json!({"organizationId": "acme", "taskId": "t1", "status": "RUNNING"}),
        )
        .await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        refused.json["error"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL"),
        "{refused:?}"
    );
    // Ephemeral fan-out (a worker publishing straight into Redis) still works.
    redis
        .publish("fanout:org:acme", r#"{"event":"hello","data":{"n":1}}"#)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_outlives_a_postgres_restart() {
    let mut pg = PgServer::start().await;
    let replica = Replica::builder().database_url(&pg.url()).start().await;
    replica
        .wait_metric("fanout_store_up", &[], |up| up == 1.0)
        .await;

    pg.stop().await;
    let health = replica.get("/healthz").await.expect("/healthz answers");
    assert_eq!(health.status, 200, "{health:?}");

    pg.start_again().await;
    let out = run_to_end(&["migrate"], &[("DATABASE_URL", &pg.url())]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "database is up to date",
        "the restarted server kept the schema"
    );
    let health = replica.get("/healthz").await.expect("/healthz answers");
    assert_eq!(health.status, 200, "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_events_and_keeps_sequences() {
    const EXPIRED: i64 = 12_000; // more than one batch
    let db = TestDb::create().await;
    let out = migrate(&db);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let client = db.connect().await;
    client
        .batch_execute(&format!(
            "INSERT INTO org_sequences VALUES ('acme', {last}), ('globex', 1);
             INSERT INTO events (organization_id, seq, event, data, created_at)
                 SELECT 'acme', n, 'execution-updated', '{{}}', now() - interval '2 hours'
                 FROM generate_series(1, {EXPIRED}) AS n;
             INSERT INTO events (organization_id, seq, event, data) VALUES
                 ('acme', {EXPIRED} + 1, 'execution-updated', '{{}}'),
                 ('acme', {EXPIRED} + 2, 'execution-updated', '{{}}'),
                 ('globex', 1, 'execution-updated', '{{}}');",
            last = EXPIRED + 2
        ))
        .await
        .expect("inserting events");

    let replica = Replica::builder()
        .database(&db)
        .env("FANOUT_EVENT_RETENTION", "1h")
        .start()
        .await;
    eventually("the expired events to be deleted", SOON, || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM events WHERE created_at < now() - interval '1 hour'",
                &[],
            )
            .await
            .expect("counting events");
        (row.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    replica
        .wait_metric("fanout_events_deleted_total", &[], |n| n == EXPIRED as f64)
        .await;

    let kept: Vec<(String, i64)> = client
        .query(
            "SELECT organization_id, seq FROM events ORDER BY organization_id, seq",
            &[],
        )
        .await
        .expect("reading events")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let acme = |seq: i64| ("acme".to_string(), seq);
    assert_eq!(
        kept,
        [acme(EXPIRED + 1), acme(EXPIRED + 2), ("globex".into(), 1)]
    );
    let sequences: Vec<(String, i64)> = client
        .query(
            "SELECT organization_id, last_seq FROM org_sequences ORDER BY 1",
            &[],
        )
        .await
        .expect("reading org_sequences")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(sequences, [acme(EXPIRED + 2), ("globex".into(), 1)]);
    let passes = replica
        .stderr()
        .lines()
        .filter(|l| l.contains("deleted expired events"))
        .count();
    assert_eq!(
        passes,
        1,
        "one log line for the pass:\n{}",
        replica.stderr()
    );
}
