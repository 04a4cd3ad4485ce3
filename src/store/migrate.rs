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

/// How a schema statement runs on a cluster (`migrate` with `clickhouse.cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnCluster {
    /// DDL for every replica: `ON CLUSTER`, names qualified with the database (a
    /// distributed DDL runs in each host's default database), engines replicated.
    Everywhere(String),
    /// Run once, on this replica: inserts and `TRUNCATE` of replicated tables reach the
    /// other replicas through replication.
    Once(String),
}

const REPLICABLE: [&str; 6] = [
    "MergeTree",
    "ReplacingMergeTree",
    "SummingMergeTree",
    "CollapsingMergeTree",
    "AggregatingMergeTree",
    "VersionedCollapsingMergeTree",
];

/// `stmt` as it runs on `cluster`: tables as their `Replicated*` counterparts (replicated
/// through ZooKeeper under `/clickhouse/tables/{shard}/<database>/<table>`, replica
/// `{replica}`: the servers' macros), every DDL `ON CLUSTER`, table names qualified.
pub fn on_cluster(stmt: &str, cluster: &str, database: &str) -> OnCluster {
    let words: Vec<&str> = stmt.split_whitespace().collect();
    let upper: Vec<String> = words
        .iter()
        .take(6)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let up: Vec<&str> = upper.iter().map(String::as_str).collect();
    let qualify = |name: &str| {
        if name.contains('.') {
            name.to_owned()
        } else {
            format!("{database}.{name}")
        }
    };
    // The statement with its first `n` words replaced by `head`.
    let rest = |n: usize| -> String {
        let mut s = stmt.trim_start();
        for _ in 0..n {
            s = s.trim_start();
            let end = s.find(char::is_whitespace).unwrap_or(s.len());
            s = &s[end..];
        }
        s.to_owned()
    };
    match up.as_slice() {
        ["CREATE", "TABLE", "IF", "NOT", "EXISTS", ..] => {
            let name = words[5].trim_end_matches('(');
            let body = replicated_engine(
                &rest(6),
                &format!("/clickhouse/tables/{{shard}}/{database}/{name}"),
            );
            OnCluster::Everywhere(format!(
                "CREATE TABLE IF NOT EXISTS {} ON CLUSTER {cluster}{}{body}",
                qualify(name),
                if words[5].ends_with('(') { " (" } else { "" },
            ))
        }
        ["CREATE", "MATERIALIZED", "VIEW", "IF", "NOT", ..] => {
            // CREATE MATERIALIZED VIEW IF NOT EXISTS name TO target AS SELECT … FROM t …
            let name = words[6];
            let body = rest(7);
            let from = regex::Regex::new(r"(?i)\b(FROM|TO)\s+([A-Za-z_][A-Za-z0-9_]*)\b([^.]|$)")
                .expect("regex");
            let body = from.replace_all(&body, |c: &regex::Captures| {
                format!("{} {}{}", &c[1], qualify(&c[2]), &c[3])
            });
            OnCluster::Everywhere(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {} ON CLUSTER {cluster} {}",
                qualify(name),
                body.trim_start()
            ))
        }
        ["DROP", "TABLE", "IF", "EXISTS", ..] => OnCluster::Everywhere(format!(
            "DROP TABLE IF EXISTS {} ON CLUSTER {cluster}{}",
            qualify(words[4]),
            rest(5)
        )),
        ["ALTER", "TABLE", ..] => OnCluster::Everywhere(format!(
            "ALTER TABLE {} ON CLUSTER {cluster}{}",
            qualify(words[2]),
            rest(3)
        )),
        _ => OnCluster::Once(stmt.to_owned()),
    }
}

/// `ENGINE = X[(args)]` → `ENGINE = ReplicatedX('path', '{replica}'[, args])`.
fn replicated_engine(body: &str, path: &str) -> String {
    let re = regex::Regex::new(r"ENGINE\s*=\s*([A-Za-z]+)(\(([^)]*)\))?").expect("regex");
    re.replace(body, |c: &regex::Captures| {
        let engine = &c[1];
        if !REPLICABLE.contains(&engine) {
            return c[0].to_owned();
        }
        let args = c
            .get(3)
            .map(|a| a.as_str().trim())
            .filter(|a| !a.is_empty());
        format!(
            "ENGINE = Replicated{engine}('{path}', '{{replica}}'{})",
            args.map(|a| format!(", {a}")).unwrap_or_default()
        )
    })
    .into_owned()
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
    migrate_on(store, None).await
}

/// `migrate`, on one server or (`cluster`: a cluster of the server's `remote_servers`)
/// on every replica of a cluster: the database and every table `ON CLUSTER`, tables as
/// their `Replicated*` counterparts (see `on_cluster`).
pub async fn migrate_on(store: &Store, cluster: Option<&str>) -> Result<Vec<String>, StoreError> {
    let db = store.database.clone();
    let run = |stmt: &str| {
        let stmt = match cluster {
            Some(c) => match on_cluster(stmt, c, &db) {
                OnCluster::Everywhere(s) | OnCluster::Once(s) => s,
            },
            None => stmt.to_owned(),
        };
        async move { store.execute(&stmt).await }
    };
    match cluster {
        Some(c) => {
            store
                .server
                .query(&format!(
                    "CREATE DATABASE IF NOT EXISTS {db} ON CLUSTER {c}"
                ))
                .execute()
                .await?
        }
        None => {
            store
                .server
                .query("CREATE DATABASE IF NOT EXISTS ?")
                .bind(clickhouse::sql::Identifier(&store.database))
                .execute()
                .await?
        }
    }
    run("CREATE TABLE IF NOT EXISTS schema_migrations \
         (name String, checksum String, applied_at DateTime) \
         ENGINE = MergeTree ORDER BY name")
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
            run(&stmt).await.map_err(|e| {
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
    fn statements_run_on_a_cluster_replicated_and_qualified() {
        let c = |s: &str| on_cluster(s, "tt", "db");
        assert_eq!(
            c("CREATE TABLE IF NOT EXISTS usage_events\n(\n    a String,\n    sign Int8\n)\nENGINE = CollapsingMergeTree(sign)\nORDER BY a"),
            OnCluster::Everywhere("CREATE TABLE IF NOT EXISTS db.usage_events ON CLUSTER tt\n(\n    a String,\n    sign Int8\n)\nENGINE = ReplicatedCollapsingMergeTree('/clickhouse/tables/{shard}/db/usage_events', '{replica}', sign)\nORDER BY a".into())
        );
        assert_eq!(
            c("CREATE TABLE IF NOT EXISTS x (a UInt8) ENGINE = MergeTree ORDER BY a"),
            OnCluster::Everywhere("CREATE TABLE IF NOT EXISTS db.x ON CLUSTER tt (a UInt8) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/db/x', '{replica}') ORDER BY a".into())
        );
        assert_eq!(
            c("CREATE MATERIALIZED VIEW IF NOT EXISTS v_mv TO v AS\nSELECT a, sum(toInt64(sign)) AS n\nFROM usage_events\nGROUP BY a"),
            OnCluster::Everywhere("CREATE MATERIALIZED VIEW IF NOT EXISTS db.v_mv ON CLUSTER tt TO db.v AS\nSELECT a, sum(toInt64(sign)) AS n\nFROM db.usage_events\nGROUP BY a".into())
        );
        assert_eq!(
            c("DROP TABLE IF EXISTS usage_hourly_mv"),
            OnCluster::Everywhere("DROP TABLE IF EXISTS db.usage_hourly_mv ON CLUSTER tt".into())
        );
        assert_eq!(
            c("ALTER TABLE usage_events ADD COLUMN billing String DEFAULT ''"),
            OnCluster::Everywhere(
                "ALTER TABLE db.usage_events ON CLUSTER tt ADD COLUMN billing String DEFAULT ''"
                    .into()
            )
        );
        for once in [
            "TRUNCATE TABLE v",
            "INSERT INTO v SELECT a FROM usage_events",
        ] {
            assert_eq!(c(once), OnCluster::Once(once.into()));
        }
        // Every table of the schema is replicated, every view reads qualified tables.
        for (name, sql) in MIGRATIONS {
            for stmt in statements(sql) {
                match c(&stmt) {
                    OnCluster::Everywhere(s) if s.starts_with("CREATE TABLE") => {
                        assert!(s.contains("ENGINE = Replicated"), "{name}: {s}");
                    }
                    OnCluster::Everywhere(s) if s.starts_with("CREATE MATERIALIZED") => {
                        assert!(
                            s.contains("FROM db.") && s.contains(" TO db."),
                            "{name}: {s}"
                        );
                    }
                    OnCluster::Once(s) => assert!(
                        s.starts_with("INSERT") || s.starts_with("TRUNCATE"),
                        "{name}: runs once: {s}"
                    ),
                    OnCluster::Everywhere(_) => {}
                }
            }
        }
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
