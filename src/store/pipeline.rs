//! The pipeline's own state in ClickHouse: what every ingest instance last reported.

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// One ingest instance's report (table `ingest_instances`).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct InstanceRow {
    pub instance_id: String,
    pub host: String,
    pub pid: u32,
    pub kafka_topic: String,
    pub kafka_group: String,
    pub started_at: u32,
    pub at: u32,
    pub partitions: Vec<i32>,
    pub last_commit_at: u32,
    pub lag: i64,
    pub price_book_version: String,
    /// `running`, `stalled` or `stopped`.
    pub state: String,
    pub detail: String,
}

impl Store {
    pub async fn record_instance(&self, row: &InstanceRow) -> Result<(), StoreError> {
        let mut insert = self
            .client
            .insert::<InstanceRow>("ingest_instances")
            .await?;
        insert.write(row).await?;
        insert.end().await?;
        Ok(())
    }

    /// The latest report of every instance of `group` on `topic` heard from since `since`
    /// (unix seconds), oldest instance first.
    pub async fn ingest_instances(
        &self,
        topic: &str,
        group: &str,
        since: i64,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        Ok(self
            .client
            .query(
                // 18.16: an alias equal to a column name leaks into the other aggregates
                // of its query, so the inner aliases carry a `_` (schema/README.md).
                "SELECT instance_id, host_ AS host, pid_ AS pid, kafka_topic_ AS kafka_topic, \
                 kafka_group_ AS kafka_group, started_at_ AS started_at, at_ AS at, \
                 partitions_ AS partitions, last_commit_at_ AS last_commit_at, lag_ AS lag, \
                 price_book_version_ AS price_book_version, state_ AS state, detail_ AS detail \
                 FROM (SELECT instance_id, argMax(host, at) AS host_, argMax(pid, at) AS pid_, \
                 any(kafka_topic) AS kafka_topic_, any(kafka_group) AS kafka_group_, \
                 argMax(started_at, at) AS started_at_, max(at) AS at_, \
                 argMax(partitions, at) AS partitions_, argMax(last_commit_at, at) AS last_commit_at_, \
                 argMax(lag, at) AS lag_, argMax(price_book_version, at) AS price_book_version_, \
                 argMax(state, at) AS state_, argMax(detail, at) AS detail_ \
                 FROM ingest_instances WHERE kafka_topic = ? AND kafka_group = ? \
                 GROUP BY instance_id) WHERE at >= toDateTime(?) ORDER BY started_at, instance_id",
            )
            .bind(topic)
            .bind(group)
            .bind(since)
            .fetch_all()
            .await?)
    }
}
