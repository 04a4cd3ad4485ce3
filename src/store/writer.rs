//! Idempotent writes: what is already stored is looked up first, so a batch that is
//! written again (after a crash, a timeout, a replay) adds nothing twice.
//!
//! Two rules keep the look-ups exact:
//! - the hour buckets they read are computed by the server, for the wanted instants as
//!   for the stored rows, so its time zone cannot make a stored copy invisible (a
//!   half-hour zone such as +05:30 shifts every bucket); whether a row found lies
//!   within the dedupe window is decided on its exact `occurred_at`, in Rust;
//! - an insert whose outcome is unknown (lost response, timeout) is remembered by its
//!   `query_id`, and no look-up runs until ClickHouse no longer lists that query as
//!   running *and* `SETTLE_GRACE` has passed since the failure: only then does a look-up
//!   see everything the first attempt wrote. (ClickHouse 18.16 starts an HTTP insert only
//!   once it has the whole body, so a request still in transit — a proxy that timed out
//!   but forwards late — is not listed yet; the grace period covers that. A request held
//!   longer than the grace could still land twice; `reconcile` would show it.)

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use clickhouse::sql::Identifier;
use clickhouse::Row;
use serde::Deserialize;

use super::rows::{DuplicateRow, EventRow, RejectedRow, RekeyedRow};
use super::{Store, StoreError};

/// One institution's stored copy of an event id (`identity_holders`).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct Holder {
    pub event_id: String,
    pub institution_id: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub ingested_at: u32,
    pub live: i64,
}

impl Holder {
    /// The order in which copies under different institutions win: the first stored
    /// (then by position and institution, so every instance picks the same one).
    pub fn precedence(&self) -> (u32, &str, i32, i64, &str) {
        (
            self.ingested_at,
            &self.kafka_topic,
            self.kafka_partition,
            self.kafka_offset,
            &self.institution_id,
        )
    }
}

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
    occurred_at: u32,
    kafka_partition: i32,
    kafka_offset: i64,
}

#[derive(Row, Deserialize)]
struct StoredPosition {
    kafka_partition: i32,
    kafka_offset: i64,
}

/// Events per look-up query: a default batch (10,000) is looked up with one query. Ids
/// travel as one array literal (a single AST node).
pub const LOOKUP_CHUNK: usize = 10_000;

/// Ranges per look-up query. Each becomes a few instants in two number arrays (see
/// `hour_points`), so this only bounds the size of one query.
const MAX_RANGES: usize = 1000;

/// Ids in a look-up are one array literal; lift the parser's default 256 KiB cap.
const MAX_QUERY_SIZE: &str = "67108864";

/// How long to wait for an insert with an unknown outcome to finish on the server.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Least time between a failed insert and the look-ups of its retry.
pub const SETTLE_GRACE: Duration = Duration::from_secs(5);

/// Part of what a look-up reads: one institution's events in `[from, to]` (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LookupRange<'a> {
    institution_id: &'a str,
    from: i64,
    to: i64,
}

/// Ranges closer than this are read as one: the hour buckets between them are few.
const RANGE_MERGE_GAP_SECS: i64 = 3600;

/// Keys looked up together (consecutive in the sorted keys) and the ranges covering them.
type LookupChunk<'k, 'a> = (&'k [&'k EventKey<'a>], Vec<LookupRange<'a>>);

/// Where the stored copies of `keys` (sorted by institution, then time) can be: each
/// key's `occurred_at ± window`, merged per institution where they overlap or nearly
/// do. One rectangle (all institutions × earliest to latest) would read a month of every
/// institution as soon as one republished copy is a month old.
///
/// Split into look-ups of at most `LOOKUP_CHUNK` keys and `MAX_RANGES` ranges.
fn lookup_chunks<'k, 'a>(
    keys: &'k [&'k EventKey<'a>],
    window_secs: i64,
) -> Vec<LookupChunk<'k, 'a>> {
    let mut chunks = Vec::new();
    let (mut start, mut ranges): (usize, Vec<LookupRange<'a>>) = (0, Vec::new());
    for (i, k) in keys.iter().enumerate() {
        let at = i64::from(k.occurred_at);
        let from = (at - window_secs).max(0);
        let to = (at + window_secs).min(i64::from(u32::MAX));
        let merges = ranges.last().is_some_and(|r| {
            r.institution_id == k.institution_id && from <= r.to + RANGE_MERGE_GAP_SECS
        });
        if i - start == LOOKUP_CHUNK || (!merges && ranges.len() == MAX_RANGES) {
            chunks.push((&keys[start..i], std::mem::take(&mut ranges)));
            start = i;
        }
        match ranges.last_mut() {
            Some(r) if merges => r.to = r.to.max(to),
            _ => ranges.push(LookupRange {
                institution_id: k.institution_id,
                from,
                to,
            }),
        }
    }
    if start < keys.len() {
        chunks.push((&keys[start..], ranges));
    }
    chunks
}

/// Step between the instants a range is sampled at (see `hour_points`).
const POINT_STEP_SECS: i64 = 900;

/// The ranges as instants for the server to turn into hour buckets: every range's start,
/// every `POINT_STEP_SECS` after it and its end, each with its institution as an index
/// into the returned institutions (1-based, as ClickHouse arrays are).
///
/// The look-up selects rows by `(institution_id, toStartOfHour(occurred_at))`, the
/// table's sorting key, so the index is used and each row costs one hash look-up — an OR
/// of ranges cost every row one comparison per range (0.6 s for a batch with 237 ranges,
/// 15 s with 1,000). The server buckets the instants in its own time zone, as it buckets
/// the stored rows. Every bucket that meets a range holds one of its instants as long as
/// buckets are at least `POINT_STEP_SECS` long (hours, and the shortened hours of time
/// zone changes, which move clocks by multiples of 15 minutes).
fn hour_points<'a>(ranges: &[LookupRange<'a>]) -> (Vec<&'a str>, Vec<u32>, Vec<u32>) {
    let mut institutions: Vec<&'a str> = Vec::new();
    let (mut index, mut instants) = (Vec::new(), Vec::new());
    for r in ranges {
        if institutions.last() != Some(&r.institution_id) {
            institutions.push(r.institution_id);
        }
        let i = institutions.len() as u32;
        let mut t = r.from;
        while t < r.to {
            index.push(i);
            instants.push(t as u32);
            t += POINT_STEP_SECS;
        }
        index.push(i);
        instants.push(r.to as u32);
    }
    (institutions, index, instants)
}

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
        // Institution first, then time: a chunk covers few institutions, and its ranges
        // are what the sorting key (institution, hour, event_id) reads fast.
        sorted.sort_by_key(|k| (k.institution_id, k.occurred_at));
        // What counts is a stored row within the window of a key with its identity;
        // the buckets read are wider (whole hours).
        let mut windows: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
        for k in keys {
            windows
                .entry((k.institution_id, k.event_id))
                .or_default()
                .push(i64::from(k.occurred_at));
        }
        let mut out = HashMap::new();
        for (chunk, ranges) in lookup_chunks(&sorted, window_secs) {
            let ids: BTreeSet<&str> = chunk.iter().map(|k| k.event_id).collect();
            let (institutions, index, instants) = hour_points(&ranges);
            let rows: Vec<StoredEvent> = self
                .client
                // PREWHERE: only `event_id` is read from every granule the key ranges
                // select; the other columns only where an id matches (rare: a replay or
                // a copy). A 10k-id look-up in 300k events spread over 30 days (every
                // granule selected) read 13 MB in 24 ms this way, 28 MB in 39 ms without.
                .query(
                    "SELECT ?fields FROM usage_events \
                     PREWHERE event_id IN (SELECT arrayJoin(?)) \
                     WHERE (institution_id, toStartOfHour(occurred_at)) IN \
                       (SELECT arrayElement(?, i), toStartOfHour(toDateTime(t)) \
                        FROM system.one ARRAY JOIN ? AS i, ? AS t) \
                     AND sign = 1 AND kafka_topic = ?",
                )
                .bind(ids)
                .bind(institutions)
                .bind(index)
                .bind(instants)
                .bind(topic)
                .with_setting("max_query_size", MAX_QUERY_SIZE)
                .fetch_all()
                .await?;
            for r in rows {
                let at = i64::from(r.occurred_at);
                let within = windows
                    .get(&(r.institution_id.as_str(), r.event_id.as_str()))
                    .is_some_and(|ts| ts.iter().any(|t| (at - t).abs() <= window_secs));
                if within {
                    out.insert(
                        (r.institution_id, r.event_id),
                        Position {
                            partition: r.kafka_partition,
                            offset: r.kafka_offset,
                        },
                    );
                }
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
        // One offset range per partition, all partitions in one query.
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for p in positions {
            let r = ranges.entry(p.partition).or_insert((p.offset, p.offset));
            *r = (r.0.min(p.offset), r.1.max(p.offset));
        }
        let ranges: Vec<(i32, (i64, i64))> = ranges.into_iter().collect();
        let mut out = HashSet::new();
        for chunk in ranges.chunks(MAX_RANGES) {
            let terms = vec!["(kafka_partition = ? AND kafka_offset BETWEEN ? AND ?)"; chunk.len()];
            let mut query = self
                .client
                .query(&format!(
                    "SELECT ?fields FROM ? WHERE kafka_topic = ? AND ({})",
                    terms.join(" OR ")
                ))
                .bind(Identifier(table))
                .bind(topic);
            for (partition, (lo, hi)) in chunk {
                query = query.bind(partition).bind(lo).bind(hi);
            }
            let rows: Vec<StoredPosition> = query.fetch_all().await?;
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

    pub async fn insert_rekeyed(&self, rows: &[RekeyedRow]) -> Result<(), StoreError> {
        self.insert_settled("rekeyed_events", rows).await
    }

    /// Who holds each of `ids` (stored and not cancelled), whatever the institution or
    /// topic, among events that happened in `[from, to]` (unix seconds): by id, each
    /// institution's first stored copy.
    pub async fn identity_holders(
        &self,
        ids: &[&str],
        from: i64,
        to: i64,
    ) -> Result<HashMap<String, Vec<Holder>>, StoreError> {
        let mut out: HashMap<String, Vec<Holder>> = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        self.settle_pending().await?;
        for chunk in ids.chunks(LOOKUP_CHUNK) {
            let unique: BTreeSet<&str> = chunk.iter().copied().collect();
            let rows: Vec<Holder> = self
                .client
                .query(
                    // 18.16 refuses an aggregate aliased with the name of a column it
                    // reads ("Cyclic aliases"): the inner names differ.
                    "SELECT event_id, institution_id, h_topic AS kafka_topic, \
                       h_partition AS kafka_partition, h_offset AS kafka_offset, \
                       h_at AS ingested_at, h_live AS live FROM (SELECT event_id, institution_id, \
                       argMin(kafka_topic, (ingested_at, kafka_partition, kafka_offset)) AS h_topic, \
                       argMin(kafka_partition, (ingested_at, kafka_partition, kafka_offset)) AS h_partition, \
                       argMin(kafka_offset, (ingested_at, kafka_partition, kafka_offset)) AS h_offset, \
                       toUInt32(min(ingested_at)) AS h_at, sum(sign) AS h_live \
                     FROM event_identity WHERE event_id IN (SELECT arrayJoin(?)) \
                       AND occurred_at >= toDateTime(?) AND occurred_at <= toDateTime(?) \
                     GROUP BY event_id, institution_id) WHERE h_live > 0",
                )
                .bind(unique)
                .bind(from.max(0))
                .bind(to.clamp(0, i64::from(u32::MAX)))
                .with_setting("max_query_size", MAX_QUERY_SIZE)
                .fetch_all()
                .await?;
            for r in rows {
                out.entry(r.event_id.clone()).or_default().push(r);
            }
        }
        Ok(out)
    }

    /// The stored state (sign 1, latest version) of each (institution, event id) of
    /// `pairs`, with how many times it counts now (the sum of its signs: 0 once cancelled).
    pub async fn stored_event_rows(
        &self,
        pairs: &[(&str, &str)],
    ) -> Result<HashMap<(String, String), (EventRow, i64)>, StoreError> {
        #[derive(Row, Deserialize)]
        struct Live {
            institution_id: String,
            event_id: String,
            live: i64,
        }
        let mut out = HashMap::new();
        for chunk in pairs.chunks(LOOKUP_CHUNK) {
            let insts: Vec<&str> = chunk.iter().map(|p| p.0).collect();
            let ids: Vec<&str> = chunk.iter().map(|p| p.1).collect();
            let wanted =
                "(institution_id, event_id) IN (SELECT arrayElement(?, i), arrayElement(?, i) \
                 FROM system.one ARRAY JOIN arrayEnumerate(?) AS i)";
            let (rows, lives) = tokio::try_join!(
                self.client
                    .query(&format!(
                        "SELECT ?fields FROM usage_events WHERE {wanted} AND sign = 1 \
                         ORDER BY version DESC LIMIT 1 BY institution_id, event_id"
                    ))
                    .bind(&insts)
                    .bind(&ids)
                    .bind(&ids)
                    .with_setting("max_query_size", MAX_QUERY_SIZE)
                    .fetch_all::<EventRow>(),
                self.client
                    .query(&format!(
                        "SELECT institution_id, event_id, toInt64(sum(sign)) AS live FROM usage_events \
                         WHERE {wanted} GROUP BY institution_id, event_id"
                    ))
                    .bind(&insts)
                    .bind(&ids)
                    .bind(&ids)
                    .with_setting("max_query_size", MAX_QUERY_SIZE)
                    .fetch_all::<Live>(),
            )?;
            let lives: HashMap<(String, String), i64> = lives
                .into_iter()
                .map(|l| ((l.institution_id, l.event_id), l.live))
                .collect();
            for r in rows {
                let key = (r.institution_id.clone(), r.event_id.clone());
                let live = lives.get(&key).copied().unwrap_or(0);
                out.insert(key, (r, live));
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(institution_id: &'a str, occurred_at: u32) -> EventKey<'a> {
        EventKey {
            event_id: "e",
            institution_id,
            occurred_at,
        }
    }

    fn ranges(keys: &[EventKey<'_>], window: i64) -> Vec<(String, i64, i64)> {
        let refs: Vec<&EventKey<'_>> = keys.iter().collect();
        let chunks = lookup_chunks(&refs, window);
        assert_eq!(chunks.len(), 1);
        chunks[0]
            .1
            .iter()
            .map(|r| (r.institution_id.to_owned(), r.from, r.to))
            .collect()
    }

    #[test]
    fn a_month_old_copy_adds_its_own_range_instead_of_widening_every_institution() {
        let day: u32 = 86_400;
        let keys = [
            key("a", 100 * day),
            key("a", 100 * day + 60),
            key("b", 70 * day),
            key("b", 100 * day),
            key("b", 100 * day + 30),
        ];
        let day = i64::from(day);
        assert_eq!(
            ranges(&keys, 3600),
            vec![
                ("a".into(), 100 * day - 3600, 100 * day + 60 + 3600),
                ("b".into(), 70 * day - 3600, 70 * day + 3600),
                ("b".into(), 100 * day - 3600, 100 * day + 30 + 3600),
            ]
        );
    }

    #[test]
    fn ranges_closer_than_the_merge_gap_are_read_as_one() {
        // 10,000 ± 3,600 and 20,000 ± 3,600 are 2,800 s apart (merged); 40,000 ± 3,600
        // starts 12,800 s after them (its own range).
        let keys = [key("a", 10_000), key("a", 20_000), key("a", 40_000)];
        assert_eq!(
            ranges(&keys, 3600),
            vec![("a".into(), 6_400, 23_600), ("a".into(), 36_400, 43_600)]
        );
    }

    #[test]
    fn ranges_stay_within_what_a_datetime_holds() {
        let keys = [key("a", 5), key("b", u32::MAX - 5)];
        assert_eq!(
            ranges(&keys, 3600),
            vec![
                ("a".into(), 0, 3605),
                ("b".into(), i64::from(u32::MAX) - 3605, i64::from(u32::MAX)),
            ]
        );
    }

    #[test]
    fn a_default_batch_is_one_look_up_and_a_wide_one_is_split() {
        // 10,000 keys of one institution within three hours: one look-up, one range.
        let keys: Vec<EventKey<'_>> = (0..10_000).map(|i| key("a", 1_000_000 + i)).collect();
        let refs: Vec<&EventKey<'_>> = keys.iter().collect();
        let chunks = lookup_chunks(&refs, 3600);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].0.len(), 10_000);
        assert_eq!(chunks[0].1.len(), 1);
        // 25,000 keys: split by count.
        let keys: Vec<EventKey<'_>> = (0..25_000).map(|i| key("a", 1_000_000 + i)).collect();
        let refs: Vec<&EventKey<'_>> = keys.iter().collect();
        let sizes: Vec<usize> = lookup_chunks(&refs, 60).iter().map(|c| c.0.len()).collect();
        assert_eq!(sizes, vec![10_000, 10_000, 5000]);
        // 2,500 institutions: split by ranges, every key in exactly one chunk.
        let names: Vec<String> = (0..2500).map(|i| format!("i{i:05}")).collect();
        let keys: Vec<EventKey<'_>> = names.iter().map(|n| key(n, 1_000_000)).collect();
        let refs: Vec<&EventKey<'_>> = keys.iter().collect();
        let chunks = lookup_chunks(&refs, 3600);
        let sizes: Vec<(usize, usize)> = chunks.iter().map(|c| (c.0.len(), c.1.len())).collect();
        assert_eq!(sizes, vec![(1000, 1000), (1000, 1000), (500, 500)]);
    }

    proptest::proptest! {
        /// Each key's whole window is covered by a range of its institution, and ranges
        /// of one institution do not overlap (each row is read once).
        #[test]
        fn every_key_lies_in_a_range_of_its_institution(
            spread in proptest::collection::vec((0usize..3, 0u32..10_000_000), 1..500)
        ) {
            let institutions = ["a", "b", "c"];
            let mut keys: Vec<EventKey<'_>> =
                spread.iter().map(|&(i, at)| key(institutions[i], at)).collect();
            keys.sort_by_key(|k| (k.institution_id, k.occurred_at));
            let found = ranges(&keys, 3600);
            for k in &keys {
                let at = i64::from(k.occurred_at);
                proptest::prop_assert!(
                    found.iter().any(|(i, from, to)| i == k.institution_id
                        && *from <= (at - 3600).max(0)
                        && at + 3600 <= *to),
                    "key {} {} not covered",
                    k.institution_id,
                    k.occurred_at
                );
            }
            for w in found.windows(2) {
                if w[0].0 == w[1].0 {
                    proptest::prop_assert!(w[0].2 < w[1].1);
                }
            }
        }
    }

    proptest::proptest! {
        /// Whatever the server's time zone (offsets in steps of 15 minutes, half-hour
        /// zones such as +05:30 included), every hour bucket that meets a range holds one
        /// of the range's instants, so the look-up reads every bucket it must.
        #[test]
        fn every_hour_bucket_meeting_a_range_holds_an_instant(
            from in 0i64..1_000_000,
            len in 0i64..30_000,
            quarter_hours in -48i64..56,
        ) {
            let offset = quarter_hours * 900;
            let r = LookupRange { institution_id: "a", from, to: from + len };
            let (institutions, index, instants) = hour_points(&[r]);
            proptest::prop_assert_eq!(institutions, vec!["a"]);
            proptest::prop_assert!(index.iter().all(|&i| i == 1));
            let bucket = |t: i64| (t + offset).div_euclid(3600);
            let wanted: BTreeSet<i64> = (bucket(r.from)..=bucket(r.to)).collect();
            let found: BTreeSet<i64> = instants.iter().map(|&t| bucket(i64::from(t))).collect();
            proptest::prop_assert_eq!(found, wanted);
        }
    }

    #[test]
    fn instants_name_their_institution_by_position() {
        let ranges = [
            LookupRange {
                institution_id: "a",
                from: 0,
                to: 1000,
            },
            LookupRange {
                institution_id: "a",
                from: 90_000,
                to: 90_000,
            },
            LookupRange {
                institution_id: "b",
                from: 5000,
                to: 6800,
            },
        ];
        let (institutions, index, instants) = hour_points(&ranges);
        assert_eq!(institutions, ["a", "b"]);
        assert_eq!(index, [1, 1, 1, 1, 2, 2, 2]);
        assert_eq!(instants, [0, 900, 1000, 90_000, 5000, 5900, 6800]);
    }
}
