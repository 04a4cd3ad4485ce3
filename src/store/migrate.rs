//! Applies `schema/*.sql` in order, once each, recorded in `schema_migrations`.

use clickhouse::Row;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Store, StoreError};

/// The migrations, embedded so the binary carries its schema. A unit test checks this
/// list against the files in `schema/`.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_usage.sql",
        include_str!("../../schema/0001_usage.sql"),
    ),
    (
        "0002_usage_hourly_model.sql",
        include_str!("../../schema/0002_usage_hourly_model.sql"),
    ),
    (
        "0003_usage_tags_hourly.sql",
        include_str!("../../schema/0003_usage_tags_hourly.sql"),
    ),
    (
        "0004_usage_hourly_institution.sql",
        include_str!("../../schema/0004_usage_hourly_institution.sql"),
    ),
    (
        "0005_invoices.sql",
        include_str!("../../schema/0005_invoices.sql"),
    ),
    (
        "0006_alerts.sql",
        include_str!("../../schema/0006_alerts.sql"),
    ),
    (
        "0007_utc_heartbeats_locks.sql",
        include_str!("../../schema/0007_utc_heartbeats_locks.sql"),
    ),
    (
        "0008_gateway.sql",
        include_str!("../../schema/0008_gateway.sql"),
    ),
    (
        "0009_limits.sql",
        include_str!("../../schema/0009_limits.sql"),
    ),
    (
        "0010_invoice_evidence.sql",
        include_str!("../../schema/0010_invoice_evidence.sql"),
    ),
    (
        "0011_rollup_views_aggregate.sql",
        include_str!("../../schema/0011_rollup_views_aggregate.sql"),
    ),
    (
        "0012_daily_rollups.sql",
        include_str!("../../schema/0012_daily_rollups.sql"),
    ),
    (
        "0013_billing_rollup.sql",
        include_str!("../../schema/0013_billing_rollup.sql"),
    ),
    (
        "0014_drop_hour_first_rollup.sql",
        include_str!("../../schema/0014_drop_hour_first_rollup.sql"),
    ),
    (
        "0015_limit_holds_shares.sql",
        include_str!("../../schema/0015_limit_holds_shares.sql"),
    ),
    (
        "0016_event_identity_rekeyed.sql",
        include_str!("../../schema/0016_event_identity_rekeyed.sql"),
    ),
    (
        "0017_people.sql",
        include_str!("../../schema/0017_people.sql"),
    ),
    (
        "0018_daily_user_model.sql",
        include_str!("../../schema/0018_daily_user_model.sql"),
    ),
    (
        "0019_person_usage_rollup.sql",
        include_str!("../../schema/0019_person_usage_rollup.sql"),
    ),
    (
        "0020_snapshot_usage_parts.sql",
        include_str!("../../schema/0020_snapshot_usage_parts.sql"),
    ),
    (
        "0021_key_holds.sql",
        include_str!("../../schema/0021_key_holds.sql"),
    ),
    (
        "0022_provider_bills.sql",
        include_str!("../../schema/0022_provider_bills.sql"),
    ),
];

/// `ALTER TABLE t ADD COLUMN c …` → (t, c). 18.16 has no `ADD COLUMN IF NOT EXISTS`, so
/// the runner asks `system.columns` first: a migration cut off after such a statement
/// can be run again.
fn added_column(stmt: &str) -> Option<(String, String)> {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    match words.as_slice() {
        [alter, table, t, add, column, c, ..]
            if alter.eq_ignore_ascii_case("alter")
                && table.eq_ignore_ascii_case("table")
                && add.eq_ignore_ascii_case("add")
                && column.eq_ignore_ascii_case("column")
                && !c.eq_ignore_ascii_case("if") =>
        {
            Some(((*t).to_owned(), (*c).to_owned()))
        }
        _ => None,
    }
}

/// Splits a migration file into statements (`;` at the end of a line ends one).
pub fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("--") || trimmed.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if trimmed.ends_with(';') {
            let stmt = cur.trim().trim_end_matches(';').trim().to_owned();
            if !stmt.is_empty() {
                out.push(stmt);
            }
            cur.clear();
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_owned());
    }
    out
}

fn checksum(sql: &str) -> String {
    format!("{:x}", Sha256::digest(sql.as_bytes()))
}

#[derive(Row, Deserialize)]
struct Applied {
    name: String,
    checksum: String,
}

/// Creates the database if needed and applies pending migrations. Returns the names
/// of the migrations applied now (empty when the schema was current).
pub async fn migrate(store: &Store) -> Result<Vec<String>, StoreError> {
    store
        .server
        .query("CREATE DATABASE IF NOT EXISTS ?")
        .bind(clickhouse::sql::Identifier(&store.database))
        .execute()
        .await?;
    store
        .execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (name String, checksum String, applied_at DateTime) \
             ENGINE = MergeTree ORDER BY name",
        )
        .await?;
    let applied: Vec<Applied> = store
        .client
        .query("SELECT name, any(checksum) AS checksum FROM schema_migrations GROUP BY name")
        .fetch_all()
        .await?;
    let mut done = Vec::new();
    for (name, sql) in MIGRATIONS {
        let sum = checksum(sql);
        if let Some(a) = applied.iter().find(|a| a.name == *name) {
            if a.checksum != sum {
                return Err(StoreError::Migration(format!(
                    "migration {name} was changed after it was applied; add a new migration instead"
                )));
            }
            continue;
        }
        for stmt in statements(sql) {
            if let Some((table, column)) = added_column(&stmt) {
                let exists: u64 = store
                    .client
                    .query(
                        "SELECT count() FROM system.columns \
                         WHERE database = currentDatabase() AND table = ? AND name = ?",
                    )
                    .bind(table.as_str())
                    .bind(column.as_str())
                    .fetch_one()
                    .await?;
                if exists > 0 {
                    continue;
                }
            }
            store.execute(&stmt).await.map_err(|e| {
                StoreError::Migration(format!("migration {name} failed: {e}\nstatement: {stmt}"))
            })?;
        }
        store
            .client
            .query(
                "INSERT INTO schema_migrations (name, checksum, applied_at) VALUES (?, ?, now())",
            )
            .bind(*name)
            .bind(sum.as_str())
            .execute()
            .await?;
        done.push((*name).to_owned());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_file_is_embedded_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schema");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<&str> = MIGRATIONS.iter().map(|(n, _)| *n).collect();
        assert_eq!(files, embedded);
    }

    #[test]
    fn splits_statements_and_drops_comments() {
        let s = statements("-- c\nCREATE TABLE a (x UInt8)\nENGINE = Log;\n\nSELECT 1;\n");
        assert_eq!(
            s,
            vec!["CREATE TABLE a (x UInt8)\nENGINE = Log", "SELECT 1"]
        );
        assert_eq!(statements(MIGRATIONS[0].1).len(), 5);
        assert_eq!(statements(MIGRATIONS[1].1).len(), 3);
        assert_eq!(statements(MIGRATIONS[2].1).len(), 3);
        assert_eq!(statements(MIGRATIONS[3].1).len(), 3);
    }

    #[test]
    fn added_columns_are_recognised() {
        assert_eq!(
            added_column("ALTER TABLE usage_events ADD COLUMN billing String DEFAULT ''"),
            Some(("usage_events".into(), "billing".into()))
        );
        assert_eq!(added_column("ALTER TABLE t DROP COLUMN c"), None);
        assert_eq!(added_column("CREATE TABLE t (a UInt8) ENGINE = Log"), None);
    }
}
