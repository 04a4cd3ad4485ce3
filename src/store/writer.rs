//! Idempotent writes: what is already stored is looked up first, so a batch that is
//! written again (after a crash, a timeout, a replay) adds nothing twice.
//!
//! Two rules keep the look-ups exact:
//! - they read plain `occurred_at` ranges, never `toStartOfHour` buckets, so the
//!   server's time zone cannot make a stored copy invisible (a half-hour zone such as
//!   +05:30 shifts every bucket);
//! - an insert whose outcome is unknown (lost response, timeout) is remembered by its
//!   `query_id`, and no look-up runs until ClickHouse no longer lists that query as
//!   running *and* `SETTLE_GRACE` has passed since the failure: only then does a look-up
//!   see everything the first attempt wrote. (ClickHouse 18.16 starts an HTTP insert only
//!   once it has the whole body, so a request still in transit — a proxy that timed out
//!   but forwards late — is not listed yet; the grace period covers that. A request held
//!   longer than the grace could still land twice; `reconcile` would show it.)

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use clickhouse::sql::Identifier;
use clickhouse::Row;
use serde::Deserialize;

use super::rows::{DuplicateRow, EventRow, RejectedRow};
use super::{Store, StoreError};

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
    institution_id: String,
    event_id: String,
    kafka_partition: i32,
    kafka_offset: i64,
}

#[derive(Row, Deserialize)]
struct StoredPosition {
    kafka_partition: i32,
    kafka_offset: i64,
}

/// Events per look-up query. Ids travel as one array literal (a single AST node), so
/// the limit is about query size, not ClickHouse's `max_ast_elements`; a batch touching
/// thousands of institutions is split, never refused.
pub const LOOKUP_CHUNK: usize = 2000;

/// Ids in a look-up are one array literal; lift the parser's default 256 KiB cap.
const MAX_QUERY_SIZE: &str = "67108864";

/// How long to wait for an insert with an unknown outcome to finish on the server.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Least time between a failed insert and the look-ups of its retry.
pub const SETTLE_GRACE: Duration = Duration::from_secs(5);

impl Store {
    /// Events among `keys` that are already stored, by (institution, event id), with the
    /// Kafka position they came from.
    pub async fn stored_events(
        &self,
        topic: &str,
        keys: &[EventKey<'_>],
        window_secs: i64,
    ) -> Result<HashMap<(String, String), Position>, StoreError> {
        self.settle_pending().await?;
        let mut sorted: Vec<&EventKey<'_>> = keys.iter().collect();
        // Institution first, then time: a chunk covers few institutions and a short time
        // range, which is what the sorting key (institution, hour, event_id) reads fast.
        sorted.sort_by_key(|k| (k.institution_id, k.occurred_at));
        let mut out = HashMap::new();
        for chunk in sorted.chunks(LOOKUP_CHUNK) {
            let institutions: BTreeSet<&str> = chunk.iter().map(|k| k.institution_id).collect();
            let ids: BTreeSet<&str> = chunk.iter().map(|k| k.event_id).collect();
            let lo = chunk
                .iter()
                .map(|k| i64::from(k.occurred_at))
                .min()
                .unwrap_or(0);
            let hi = chunk
                .iter()
                .map(|k| i64::from(k.occurred_at))
                .max()
                .unwrap_or(0);
            let rows: Vec<StoredEvent> = self
                .client
                .query(
                    "SELECT ?fields FROM usage_events \
                     WHERE institution_id IN (SELECT arrayJoin(?)) \
                     AND occurred_at >= toDateTime(?) AND occurred_at <= toDateTime(?) \
                     AND event_id IN (SELECT arrayJoin(?)) AND sign = 1 AND kafka_topic = ?",
                )
                .bind(institutions)
                .bind((lo - window_secs).max(0))
                .bind((hi + window_secs).min(i64::from(u32::MAX)))
                .bind(ids)
                .bind(topic)
                .with_setting("max_query_size", MAX_QUERY_SIZE)
                .fetch_all()
                .await?;
            for r in rows {
                out.insert(
                    (r.institution_id, r.event_id),
                    Position {
                        partition: r.kafka_partition,
                        offset: r.kafka_offset,
                    },
                );
            }
        }
        Ok(out)
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
        self.settle_pending().await?;
        let wanted: HashSet<Position> = positions.iter().copied().collect();
        let partitions: BTreeSet<i32> = positions.iter().map(|p| p.partition).collect();
        let mut out = HashSet::new();
        for partition in partitions {
            let offsets = positions
                .iter()
                .filter(|p| p.partition == partition)
                .map(|p| p.offset);
            let (lo, hi) = offsets.fold((i64::MAX, i64::MIN), |(lo, hi), o| (lo.min(o), hi.max(o)));
            let rows: Vec<StoredPosition> = self
                .client
                .query(
                    "SELECT ?fields FROM ? WHERE kafka_topic = ? AND kafka_partition = ? \
                     AND kafka_offset BETWEEN ? AND ?",
                )
                .bind(Identifier(table))
                .bind(topic)
                .bind(partition)
                .bind(lo)
                .bind(hi)
                .fetch_all()
                .await?;
            out.extend(
                rows.into_iter()
                    .map(|r| Position {
                        partition: r.kafka_partition,
                        offset: r.kafka_offset,
                    })
                    .filter(|p| wanted.contains(p)),
            );
        }
        Ok(out)
    }

    /// The current state (latest version) of every event since `start` (unix seconds),
    /// as a stream: what `reprice` re-rates.
    pub fn current_events_since(
        &self,
        start: i64,
    ) -> Result<clickhouse::query::RowCursor<EventRow>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM usage_events WHERE sign = 1 AND occurred_at >= toDateTime(?) \
                 ORDER BY institution_id, event_id, version DESC LIMIT 1 BY institution_id, event_id",
            )
            .bind(start)
            .fetch::<EventRow>()?)
    }

    pub async fn insert_events(&self, rows: &[EventRow]) -> Result<(), StoreError> {
        self.insert_settled("usage_events", rows).await
    }

    pub async fn insert_rejected(&self, rows: &[RejectedRow]) -> Result<(), StoreError> {
        self.insert_settled("rejected_events", rows).await
    }

    pub async fn insert_duplicates(&self, rows: &[DuplicateRow]) -> Result<(), StoreError> {
        self.insert_settled("duplicate_events", rows).await
    }

    /// One INSERT, one block: ClickHouse writes it atomically, so it is either wholly
    /// there or not at all. If the call fails we cannot know which (the server may have
    /// applied it and the response been lost), so the query id is kept until the server
    /// no longer runs it; the look-ups of the retry wait for that.
    async fn insert_settled<T>(&self, table: &str, rows: &[T]) -> Result<(), StoreError>
    where
        T: clickhouse::RowOwned + clickhouse::RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        let query_id = uuid::Uuid::new_v4().to_string();
        let attempt = async {
            let mut insert = self
                .client
                .insert::<T>(table)
                .await?
                .with_setting("query_id", query_id.clone());
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        match attempt.await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.pending_inserts
                    .lock()
                    .expect("pending inserts lock")
                    .push((query_id, std::time::Instant::now()));
                Err(e.into())
            }
        }
    }

    /// Waits until no insert whose outcome is unknown still runs on the server.
    pub async fn settle_pending(&self) -> Result<(), StoreError> {
        let pending: Vec<(String, std::time::Instant)> = self
            .pending_inserts
            .lock()
            .expect("pending inserts lock")
            .clone();
        if pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = pending.iter().map(|(q, _)| q.as_str()).collect();
        let started = std::time::Instant::now();
        loop {
            let running: u64 = self
                .server
                .query("SELECT toUInt64(count()) FROM system.processes WHERE query_id IN (SELECT arrayJoin(?))")
                .bind(&ids)
                .fetch_one()
                .await?;
            let young = pending.iter().any(|(_, at)| at.elapsed() < SETTLE_GRACE);
            if running == 0 && !young {
                break;
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                return Err(StoreError::Unsettled(running));
            }
            tracing::info!(
                running,
                "waiting for an earlier insert attempt to finish before retrying"
            );
            tokio::time::sleep(Duration::from_millis(if running > 0 { 200 } else { 1000 })).await;
        }
        self.pending_inserts
            .lock()
            .expect("pending inserts lock")
            .retain(|q| !pending.contains(q));
        Ok(())
    }
}
