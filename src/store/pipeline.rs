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

/// Rejected messages of one reason.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    pub n: u64,
}

/// A rejected message, without its payload.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct RejectedSummary {
    pub received_at: u32,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub reason: String,
    pub detail: String,
}

/// A rejected message with its raw payload.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct RejectedMessage {
    pub reason: String,
    pub detail: String,
    pub payload: Vec<u8>,
}

/// Events of one model that had no price.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct UnpricedCount {
    pub name: String,
    pub n: u64,
}

impl Store {
    /// Rejected messages received in `[start, end)`, per reason, most first.
    pub async fn rejected_by_reason(
        &self,
        start: i64,
        end: i64,
    ) -> Result<Vec<ReasonCount>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM (SELECT reason, count() AS n FROM rejected_events \
                 WHERE received_at >= toDateTime(?) AND received_at < toDateTime(?) \
                 GROUP BY reason ORDER BY n DESC)",
            )
            .bind(start)
            .bind(end)
            .fetch_all()
            .await?)
    }

    /// The latest `limit` rejected messages received in `[start, end)`.
    pub async fn recent_rejected(
        &self,
        start: i64,
        end: i64,
        limit: u64,
    ) -> Result<Vec<RejectedSummary>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM rejected_events \
                 WHERE received_at >= toDateTime(?) AND received_at < toDateTime(?) \
                 ORDER BY received_at DESC, kafka_offset DESC LIMIT ?",
            )
            .bind(start)
            .bind(end)
            .bind(limit)
            .fetch_all()
            .await?)
    }

    /// Rejected messages received since `since` (unix seconds).
    pub async fn rejected_since(&self, since: i64) -> Result<u64, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT toUInt64(count()) FROM rejected_events WHERE received_at >= toDateTime(?)",
            )
            .bind(since)
            .fetch_one()
            .await?)
    }

    /// One rejected message with its payload, by Kafka position.
    pub async fn rejected_message(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<RejectedMessage>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM rejected_events WHERE kafka_topic = ? AND kafka_partition = ? \
                 AND kafka_offset = ? LIMIT 1",
            )
            .bind(topic)
            .bind(partition)
            .bind(offset)
            .fetch_optional()
            .await?)
    }

    /// Events stored per second over the last five minutes (first versions only).
    pub async fn stored_per_second(&self) -> Result<f64, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT toFloat64(countIf(ingested_at >= now() - 300)) / 300 FROM usage_events \
                 WHERE version = 0 AND sign = 1 AND ingested_at >= now() - 300",
            )
            .fetch_one()
            .await?)
    }

    /// Unpriced events per model in the hours since `since` (unix seconds).
    pub async fn unpriced_since(&self, since: i64) -> Result<Vec<UnpricedCount>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM (SELECT model AS name, toUInt64(sum(unpriced_events)) AS n \
                 FROM usage_hourly_model WHERE hour >= toStartOfHour(toDateTime(?), 'UTC') \
                 GROUP BY model HAVING n > 0)",
            )
            .bind(since)
            .fetch_all()
            .await?)
    }
}
