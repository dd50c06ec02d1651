//! The schema, as numbered SQL files compiled into the binary, and the code that applies
//! them.
//!
//! Migrations only ever go forward: a released file is never edited, a change is a new file.
//! `schema_migrations` records each applied version. Every call takes the same
//! transaction-scoped advisory lock first, so replicas that start together (and
//! `fanout migrate` run by hand at the same moment) apply them one caller at a time: the
//! first applies what is missing, the others then find the rows and apply nothing. The lock
//! is released by the commit or rollback, so a caller that dies cannot leave it held.

/// One schema change: a version (its order), a short name, and the SQL to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in the order they are applied. Versions are increasing.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "log_data_and_raw_events",
        sql: include_str!("migrations/0002_log_data_and_raw_events.sql"),
    },
    Migration {
        version: 3,
        name: "read_indexes",
        sql: include_str!("migrations/0003_read_indexes.sql"),
    },
    Migration {
        version: 4,
        name: "bus_key",
        sql: include_str!("migrations/0004_bus_key.sql"),
    },
];

/// The key of the advisory lock that serializes migrations: "fanout" in ASCII, as a number,
/// so that it is recognisable in `pg_locks` and unlikely to collide with another program's.
pub const LOCK_KEY: i64 = i64::from_be_bytes(*b"\0\0fanout");

/// Applies the migrations `client`'s database lacks, in one transaction, under the advisory
/// lock. Returns the ones this call applied (none when the schema was up to date).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
) -> Result<Vec<Migration>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version int PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    // Read after the lock is held: under READ COMMITTED this statement sees every row a
    // previous holder committed.
    let applied: Vec<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut done = Vec::new();
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        tx.batch_execute(migration.sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await?;
        done.push(*migration);
    }
    tx.commit().await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase_and_names_are_set() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version, "{pair:?}");
        }
        assert!(MIGRATIONS.iter().all(|m| !m.name.is_empty()));
        assert_eq!(MIGRATIONS[0].version, 1);
    }

    #[test]
    fn the_schema_defines_the_same_statuses_as_the_wire() {
        let sql = MIGRATIONS[0].sql;
        for status in crate::protocol::ExecutionStatus::ALL {
            assert!(sql.contains(&format!("'{status}'")), "{status} is missing");
        }
    }

    #[test]
    fn lock_key_spells_fanout() {
        assert_eq!(LOCK_KEY, 0x0000_6661_6e6f_7574);
    }
}
