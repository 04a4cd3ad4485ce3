//! Idempotent writes: what is already stored is looked up first, so a batch that is
//! written again (after a crash, a timeout, a replay) adds nothing twice.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use clickhouse::Row;
use serde::Deserialize;

use super::rows::{DuplicateRow, EventRow, RejectedRow};
use super::{sql_str, sql_str_list, Store, StoreError};

/// Where a message was in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// An event to look up: its id, institution and timestamp (seconds).
pub struct EventKey<'a> {
    pub event_id: &'a str,
    pub institution_id: &'a str,
    pub occurred_at: u32,
}

#[derive(Row, Deserialize)]
struct StoredEvent {
    event_id: String,
    kafka_partition: i32,
    kafka_offset: i64,
}

#[derive(Row, Deserialize)]
struct StoredPosition {
    kafka_partition: i32,
    kafka_offset: i64,
}

/// The batch's event ids are sent as one `IN` list; lift the parser's default 256 KiB cap.
const MAX_QUERY_SIZE: &str = "67108864";

impl Store {
    /// Events among `keys` that are already stored, with the Kafka position they came from.
    pub async fn stored_events(
        &self,
        topic: &str,
        keys: &[EventKey<'_>],
        window_secs: i64,
    ) -> Result<HashMap<String, Position>, StoreError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        // Only the (institution, hour) slots a copy can be in: the sorting key's prefix,
        // so ClickHouse reads a few granules per slot however large the table is.
        let mut slots: BTreeSet<(&str, i64)> = BTreeSet::new();
        for k in keys {
            let t = i64::from(k.occurred_at);
            let mut hour = (t - window_secs).max(0) / 3600 * 3600;
            while hour <= t + window_secs {
                slots.insert((k.institution_id, hour));
                hour += 3600;
            }
        }
        let slot_list: Vec<String> = slots
            .iter()
            .map(|(inst, hour)| format!("({}, {hour})", sql_str(inst)))
            .collect();
        let sql = format!(
            "SELECT event_id, kafka_partition, kafka_offset FROM usage_events \
             WHERE (institution_id, toStartOfHour(occurred_at)) IN ({}) \
             AND event_id IN {} AND sign = 1 AND kafka_topic = {}",
            slot_list.join(", "),
            sql_str_list(keys.iter().map(|k| k.event_id)),
            sql_str(topic),
        );
        let rows: Vec<StoredEvent> = self
            .client
            .query(&sql)
            .with_setting("max_query_size", MAX_QUERY_SIZE)
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.event_id,
                    Position {
                        partition: r.kafka_partition,
                        offset: r.kafka_offset,
                    },
                )
            })
            .collect())
    }

    /// Positions among `positions` that `table` (rejected_events or duplicate_events) holds.
    pub async fn stored_positions(
        &self,
        table: &str,
        topic: &str,
        positions: &[Position],
    ) -> Result<HashSet<Position>, StoreError> {
        if positions.is_empty() {
            return Ok(HashSet::new());
        }
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for p in positions {
            let r = ranges.entry(p.partition).or_insert((p.offset, p.offset));
            r.0 = r.0.min(p.offset);
            r.1 = r.1.max(p.offset);
        }
        let conds: Vec<String> = ranges
            .iter()
            .map(|(p, (lo, hi))| {
                format!("(kafka_partition = {p} AND kafka_offset BETWEEN {lo} AND {hi})")
            })
            .collect();
        let sql = format!(
            "SELECT kafka_partition, kafka_offset FROM {table} WHERE kafka_topic = {} AND ({})",
            sql_str(topic),
            conds.join(" OR ")
        );
        let rows: Vec<StoredPosition> = self.client.query(&sql).fetch_all().await?;
        Ok(rows
            .into_iter()
            .map(|r| Position {
                partition: r.kafka_partition,
                offset: r.kafka_offset,
            })
            .collect())
    }

    pub async fn insert_events(&self, rows: &[EventRow]) -> Result<(), StoreError> {
        insert(&self.client, "usage_events", rows).await
    }

    pub async fn insert_rejected(&self, rows: &[RejectedRow]) -> Result<(), StoreError> {
        insert(&self.client, "rejected_events", rows).await
    }

    pub async fn insert_duplicates(&self, rows: &[DuplicateRow]) -> Result<(), StoreError> {
        insert(&self.client, "duplicate_events", rows).await
    }
}

/// One INSERT per call: ClickHouse writes a block of this size atomically, so a failed
/// insert leaves nothing behind and a repeated one is caught by the look-ups above.
async fn insert<T>(client: &clickhouse::Client, table: &str, rows: &[T]) -> Result<(), StoreError>
where
    T: clickhouse::RowOwned + clickhouse::RowWrite,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<T>(table).await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await?;
    Ok(())
}
