//! What invoices and reconciliation are computed from: one institution's stored events
//! of one period, summed per price entry and rate tier (every sum weighs rows by `sign`,
//! so re-rated events count once at their current price), and the counts reconcile checks.

use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::rows::money18;
use super::{Store, StoreError};

/// Sums over the stored events of one price entry and rate tier.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct PriceGroup {
    pub price_id: String,
    pub price_model: String,
    pub price_tier: u64,
    /// `byok` when the institution's own provider key served the events, else empty.
    pub billing: String,
    /// 1 for events whose usage the gateway estimated (the provider sent none).
    pub estimated: u8,
    pub events: i64,
    /// Events that reached the provider (not `rejected_*`, `blocked_*` or
    /// `upstream_unreachable`): what per-request fees apply to.
    pub served: i64,
    pub input: i64,
    pub cache_read: i64,
    pub cache_write: i64,
    pub output: i64,
    /// Sum over events of min(reasoning, output).
    pub reasoning: i64,
    #[serde(with = "money18")]
    pub cost: Decimal,
}

/// The `PriceGroup` sums, in its field order.
const SUMS: &str = "price_id, price_model, price_tier, billing, usage_estimated AS estimated, \
    sum(toInt64(sign)) AS events, \
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_' \
        AND status != 'upstream_unreachable')) AS served, \
    sum(toInt64(input_tokens) * sign) AS input, \
    sum(toInt64(cache_read_tokens) * sign) AS cache_read, \
    sum(toInt64(cache_write_tokens) * sign) AS cache_write, \
    sum(toInt64(output_tokens) * sign) AS output, \
    sum(toInt64(least(reasoning_tokens, output_tokens)) * sign) AS reasoning, \
    sum(cost * sign) AS cost_sum";

const RANGE: &str =
    "institution_id = ? AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?)";

/// One event's current state (sign-weighted over its stored rows).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct EventState {
    pub event_id: String,
    /// `YYYY-MM-DD` in the zone asked for.
    pub day: String,
    pub user_id: String,
    /// The `group` tag (a member's group when the request was made); empty if none.
    pub group_id: String,
    pub api_key_id: String,
    pub model: String,
    pub priced: u8,
    pub status: String,
    pub price_id: String,
    pub price_model: String,
    pub price_tier: u64,
    pub billing: String,
    pub estimated: u8,
    pub events: i64,
    pub input: i64,
    pub cache_read: i64,
    pub cache_write: i64,
    pub output: i64,
    pub reasoning: i64,
    #[serde(with = "money18")]
    pub cost: Decimal,
}

impl EventState {
    /// Whether the request reached the provider (what per-request fees apply to); the
    /// same rule as the `served` sum.
    pub fn served(&self) -> bool {
        !self.status.starts_with("rejected_")
            && !self.status.starts_with("blocked_")
            && self.status != "upstream_unreachable"
    }
}

/// Rows streamed from ClickHouse, one at a time, with the store's errors.
pub struct Rows<T>(clickhouse::query::RowCursor<T>);

impl<T: clickhouse::RowOwned + clickhouse::RowRead> Rows<T> {
    pub async fn next(&mut self) -> Result<Option<T>, StoreError> {
        Ok(self.0.next().await?)
    }
}

/// A frozen usage export, read part by part.
pub enum UsageParts {
    Stored(Rows<String>),
    /// A snapshot from before 0020: one string (taken by the first `next`).
    Whole(Option<String>),
}

impl UsageParts {
    pub async fn next(&mut self) -> Result<Option<String>, StoreError> {
        match self {
            UsageParts::Stored(rows) => rows.next().await,
            UsageParts::Whole(w) => Ok(w.take()),
        }
    }

    /// Every part as one stream of bytes (an HTTP body).
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Vec<u8>, StoreError>> + Send {
        futures::stream::try_unfold(self, |mut parts| async move {
            Ok(parts.next().await?.map(|p| (p.into_bytes(), parts)))
        })
    }
}

/// An event a snapshot recorded for one line.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct RecordedEvent {
    pub event_id: String,
    pub line: u32,
    /// Hex SHA-256.
    pub leaf: String,
}

#[derive(Debug, Clone, Row, Serialize)]
struct LineEventRow {
    snapshot: String,
    institution_id: String,
    line: u32,
    event_id: String,
    leaf: String,
}

/// The evidence of one snapshot being stored (`Store::snapshot_writer`). Its line events
/// count only once `finish` has stored the snapshot's own row, which the document names;
/// rows of a writer dropped before that name a snapshot nothing refers to.
pub struct SnapshotWriter {
    insert: clickhouse::insert::Insert<LineEventRow>,
    usage: clickhouse::insert::Insert<UsagePartRow>,
    /// The usage export's part being filled, and how many were sent.
    part: String,
    parts: u32,
    snapshot: String,
    institution: String,
    client: clickhouse::Client,
}

#[derive(Debug, Clone, Row, Serialize)]
struct UsagePartRow {
    snapshot: String,
    part: u32,
    text: String,
}

/// About how large a part of a frozen usage export is.
const USAGE_PART_BYTES: usize = 1 << 20;

impl SnapshotWriter {
    /// One event of line `line` (0-based).
    pub async fn write(
        &mut self,
        line: u32,
        event_id: &str,
        leaf: &[u8; 32],
    ) -> Result<(), StoreError> {
        self.insert
            .write(&LineEventRow {
                snapshot: self.snapshot.clone(),
                institution_id: self.institution.clone(),
                line,
                event_id: event_id.to_owned(),
                leaf: hex::encode(leaf),
            })
            .await?;
        Ok(())
    }

    /// Appends text to the frozen usage export (sent in parts of about 1 MB).
    pub async fn write_usage(&mut self, text: &str) -> Result<(), StoreError> {
        self.part.push_str(text);
        if self.part.len() >= USAGE_PART_BYTES {
            self.send_part().await?;
        }
        Ok(())
    }

    async fn send_part(&mut self) -> Result<(), StoreError> {
        let text = std::mem::take(&mut self.part);
        self.usage
            .write(&UsagePartRow {
                snapshot: self.snapshot.clone(),
                part: self.parts,
                text,
            })
            .await?;
        self.parts += 1;
        Ok(())
    }

    /// Ends the line events and the usage export and stores the snapshot's own row,
    /// which makes it one.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        if !self.part.is_empty() || self.parts == 0 {
            self.send_part().await?;
        }
        self.usage.end().await?;
        self.insert.end().await?;
        let mut insert = self
            .client
            .insert::<SnapshotRow>("invoice_snapshots")
            .await?;
        insert
            .write(&SnapshotRow {
                snapshot: self.snapshot,
                institution_id: self.institution,
                created_at: chrono::Utc::now().timestamp() as u32,
                usage_csv: String::new(),
            })
            .await?;
        insert.end().await?;
        Ok(())
    }
}

#[derive(Debug, Clone, Row, Serialize)]
struct SnapshotRow {
    snapshot: String,
    institution_id: String,
    created_at: u32,
    usage_csv: String,
}

/// Unpriced usage of a period.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct UnpricedUsage {
    pub events: i64,
    pub tokens: i64,
    pub models: Vec<String>,
}

/// One row of the detailed usage export: local day × user × key × model × price entry.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct UsageDetail {
    /// `YYYY-MM-DD` in the zone asked for.
    pub day: String,
    pub user_id: String,
    /// The `group` tag (a member's group when the request was made); empty if none.
    pub group_id: String,
    pub api_key_id: String,
    pub priced: u8,
    /// The model as the gateway named it (for unpriced rows).
    pub model: String,
    pub group: PriceGroup,
}

/// The billing rollup's slot (`schema/0013_billing_rollup.sql`): a range whose bounds
/// are whole slots is summed from it, any other from raw events.
const SLOT_SECS: i64 = 900;

/// The `PriceGroup` sums over the billing rollup.
const ROLLUP_SUMS: &str =
    "price_id, price_model, price_tier, billing, usage_estimated AS estimated, \
    sum(events) AS events, sum(served) AS served, sum(input) AS input, \
    sum(cache_read) AS cache_read, sum(cache_write) AS cache_write, \
    sum(output) AS output, sum(reasoning) AS reasoning, sum(cost) AS cost_sum";

const ROLLUP_RANGE: &str = "institution_id = ? AND slot >= toDateTime(?) AND slot < toDateTime(?)";

/// Where the sums of `[start, end)` come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The billing rollup (bounds on whole quarter hours: every zone's month).
    Rollup,
    /// Raw events (any other bounds; and tests that compare the two).
    Events,
}

impl Source {
    pub fn for_range(start: i64, end: i64) -> Self {
        if start % SLOT_SECS == 0 && end % SLOT_SECS == 0 {
            Source::Rollup
        } else {
            Source::Events
        }
    }
}

impl Store {
    /// Priced usage of `institution` in `[start, end)` (unix seconds), per entry and tier.
    pub async fn price_groups(
        &self,
        institution: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<PriceGroup>, StoreError> {
        self.price_groups_from(Source::for_range(start, end), institution, start, end)
            .await
    }

    /// `price_groups` from a given source.
    pub async fn price_groups_from(
        &self,
        source: Source,
        institution: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<PriceGroup>, StoreError> {
        let (sums, table, range) = match source {
            Source::Rollup => (ROLLUP_SUMS, "usage_billing_15m", ROLLUP_RANGE),
            Source::Events => (SUMS, "usage_events", RANGE),
        };
        Ok(self
            .client
            .query(&format!(
                "SELECT {sums} FROM {table} WHERE {range} AND priced = 1 \
                 GROUP BY price_id, price_model, price_tier, billing, usage_estimated HAVING events != 0 \
                 ORDER BY price_id, price_tier, billing, estimated"
            ))
            .bind(institution)
            .bind(start)
            .bind(end)
            .fetch_all()
            .await?)
    }

    /// Unpriced usage of `institution` in `[start, end)`.
    pub async fn unpriced_usage(
        &self,
        institution: &str,
        start: i64,
        end: i64,
    ) -> Result<UnpricedUsage, StoreError> {
        self.unpriced_usage_from(Source::for_range(start, end), institution, start, end)
            .await
    }

    /// `unpriced_usage` from a given source: events and tokens, and the models (as the
    /// gateway named them) with unpriced events left.
    pub async fn unpriced_usage_from(
        &self,
        source: Source,
        institution: &str,
        start: i64,
        end: i64,
    ) -> Result<UnpricedUsage, StoreError> {
        let per_model = match source {
            Source::Rollup => format!(
                "SELECT model, sum(events) AS e, \
                 sum(input + cache_read + cache_write + output) AS t \
                 FROM usage_billing_15m WHERE {ROLLUP_RANGE} AND priced = 0 GROUP BY model"
            ),
            Source::Events => format!(
                "SELECT model, sum(toInt64(sign)) AS e, \
                 sum(toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens) * sign) AS t \
                 FROM usage_events WHERE {RANGE} AND priced = 0 GROUP BY model"
            ),
        };
        let r: UnpricedUsage = self
            .client
            .query(&format!(
                "SELECT sum(e) AS events, sum(t) AS tokens, arraySort(groupArrayIf(model, e != 0)) AS models \
                 FROM ({per_model})"
            ))
            .bind(institution)
            .bind(start)
            .bind(end)
            .fetch_one()
            .await?;
        Ok(r)
    }

    /// Usage of `institution` in `[start, end)` per local day (in `tz`) × user × key ×
    /// model × price entry.
    pub async fn usage_details(
        &self,
        institution: &str,
        tz: &str,
        start: i64,
        end: i64,
    ) -> Result<Vec<UsageDetail>, StoreError> {
        Ok(self
            .client
            .query(&format!(
                "SELECT toString(toDate(occurred_at, ?)) AS day, user_id, \
                 tag_values[indexOf(tag_keys, ?)] AS grp, api_key_id, priced, model, {SUMS} \
                 FROM usage_events WHERE {RANGE} \
                 GROUP BY day, user_id, grp, api_key_id, priced, model, price_id, price_model, price_tier, \
                 billing, usage_estimated HAVING events != 0 \
                 ORDER BY day, user_id, grp, api_key_id, model, price_id, price_tier, billing, estimated"
            ))
            .bind(tz)
            .bind(crate::contract::GROUP_TAG)
            .bind(institution)
            .bind(start)
            .bind(end)
            .fetch_all()
            .await?)
    }

    /// Rejected messages about `institution` whose usage happened in `[start, end)`: the
    /// institution and time named in the payload; for rows whose payload gave no time
    /// (0), the time they were received.
    pub async fn rejected_about(
        &self,
        institution: &str,
        start: i64,
        end: i64,
    ) -> Result<u64, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT toUInt64(count()) FROM rejected_events \
                 WHERE if(institution_id = '', kafka_key, institution_id) = ? \
                 AND if(occurred_at = toDateTime(0), received_at, occurred_at) >= toDateTime(?) \
                 AND if(occurred_at = toDateTime(0), received_at, occurred_at) < toDateTime(?)",
            )
            .bind(institution)
            .bind(start)
            .bind(end)
            .fetch_one()
            .await?)
    }

    /// Rejected messages in `[start, end)` (as above) that name no institution at all
    /// (rows stored before the payload was read count by their Kafka key, as they did).
    pub async fn rejected_unattributed(&self, start: i64, end: i64) -> Result<u64, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT toUInt64(count()) FROM rejected_events WHERE institution_id = '' AND kafka_key = '' \
                 AND if(occurred_at = toDateTime(0), received_at, occurred_at) >= toDateTime(?) \
                 AND if(occurred_at = toDateTime(0), received_at, occurred_at) < toDateTime(?)",
            )
            .bind(start)
            .bind(end)
            .fetch_one()
            .await?)
    }

    /// The current state of every stored event of `institution` in `[start, end)`, one
    /// row per event id (sorted by id), streamed: what an issued invoice is computed
    /// from, so that its sums and its manifest describe the same events.
    pub fn event_states(
        &self,
        institution: &str,
        tz: &str,
        start: i64,
        end: i64,
    ) -> Result<Rows<EventState>, StoreError> {
        self.event_states_ordered(institution, tz, start, end, "event_id")
    }

    /// The same rows as `event_states`, sorted by what a row of the detailed usage export
    /// is about (day, user, group, key, model, price entry, tier, billing, estimated,
    /// priced; then id), so that its rows can be written one at a time.
    pub fn event_states_by_detail(
        &self,
        institution: &str,
        tz: &str,
        start: i64,
        end: i64,
    ) -> Result<Rows<EventState>, StoreError> {
        self.event_states_ordered(
            institution,
            tz,
            start,
            end,
            "day, user_, group_, key_, model_, price_id_, price_tier_, billing_, estimated_, priced_, event_id",
        )
    }

    fn event_states_ordered(
        &self,
        institution: &str,
        tz: &str,
        start: i64,
        end: i64,
        order: &str,
    ) -> Result<Rows<EventState>, StoreError> {
        Ok(self
            .client
            .query(&format!(
                "SELECT event_id, toString(toDate(min(occurred_at), ?)) AS day, \
                 any(user_id) AS user_, any(tag_values[indexOf(tag_keys, ?)]) AS group_, \
                 any(api_key_id) AS key_, any(model) AS model_, \
                 argMaxIf(priced, version, sign = 1) AS priced_, \
                 argMaxIf(status, version, sign = 1) AS status_, \
                 argMaxIf(price_id, version, sign = 1) AS price_id_, \
                 argMaxIf(price_model, version, sign = 1) AS price_model_, \
                 argMaxIf(price_tier, version, sign = 1) AS price_tier_, \
                 argMaxIf(billing, version, sign = 1) AS billing_, \
                 argMaxIf(usage_estimated, version, sign = 1) AS estimated_, \
                 sum(toInt64(sign)) AS events, \
                 sum(toInt64(input_tokens) * sign) AS input, \
                 sum(toInt64(cache_read_tokens) * sign) AS cache_read, \
                 sum(toInt64(cache_write_tokens) * sign) AS cache_write, \
                 sum(toInt64(output_tokens) * sign) AS output, \
                 sum(toInt64(least(reasoning_tokens, output_tokens)) * sign) AS reasoning, \
                 sum(cost * sign) AS cost_sum \
                 FROM usage_events WHERE {RANGE} GROUP BY event_id HAVING events > 0 \
                 ORDER BY {order}"
            ))
            .bind(tz)
            .bind(crate::contract::GROUP_TAG)
            .bind(institution)
            .bind(start)
            .bind(end)
            .fetch::<EventState>()
            .map(Rows)?)
    }

    /// Starts storing the evidence behind an invoice about to be requested: (line, event
    /// id, leaf) rows are sent as they are written, in blocks, not held.
    pub async fn snapshot_writer(
        &self,
        snapshot: &str,
        institution: &str,
    ) -> Result<SnapshotWriter, StoreError> {
        Ok(SnapshotWriter {
            insert: self
                .client
                .insert::<LineEventRow>("invoice_line_events")
                .await?,
            usage: self
                .client
                .insert::<UsagePartRow>("invoice_snapshot_usage")
                .await?,
            part: String::new(),
            parts: 0,
            snapshot: snapshot.to_owned(),
            institution: institution.to_owned(),
            client: self.client.clone(),
        })
    }

    /// The (event id, leaf hash) pairs a snapshot recorded for one line, by event id.
    pub async fn snapshot_line_events(
        &self,
        snapshot: &str,
        line: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT DISTINCT event_id, leaf FROM invoice_line_events \
                 WHERE snapshot = ? AND line = ? ORDER BY event_id, leaf",
            )
            .bind(snapshot)
            .bind(line)
            .fetch_all()
            .await?)
    }

    /// The recorded events of some lines of a snapshot, streamed in event-id order.
    pub fn snapshot_events(
        &self,
        snapshot: &str,
        lines: &[u32],
    ) -> Result<Rows<RecordedEvent>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT DISTINCT event_id, line, leaf FROM invoice_line_events \
                 WHERE snapshot = ? AND line IN (SELECT toUInt32(arrayJoin(?))) ORDER BY event_id, line",
            )
            .bind(snapshot)
            .bind(lines)
            .fetch::<RecordedEvent>()
            .map(Rows)?)
    }

    /// The frozen usage export of a snapshot, part by part as stored (since 0020; the
    /// one string older snapshots kept is its only part): a download holds one part at a
    /// time, whatever the month's size. `None`: the snapshot kept no usage export.
    pub async fn snapshot_usage_parts(
        &self,
        snapshot: &str,
    ) -> Result<Option<UsageParts>, StoreError> {
        let parts: u64 = self
            .client
            .query("SELECT count() FROM invoice_snapshot_usage WHERE snapshot = ?")
            .bind(snapshot)
            .fetch_one()
            .await?;
        if parts > 0 {
            let rows = self
                .client
                .query("SELECT text FROM invoice_snapshot_usage WHERE snapshot = ? ORDER BY part")
                .bind(snapshot)
                .fetch::<String>()?;
            return Ok(Some(UsageParts::Stored(Rows(rows))));
        }
        Ok(self
            .client
            .query("SELECT usage_csv FROM invoice_snapshots WHERE snapshot = ? LIMIT 1")
            .bind(snapshot)
            .fetch_optional::<String>()
            .await?
            .map(|whole| UsageParts::Whole(Some(whole))))
    }

    /// Distinct Kafka positions in `[low, below)` of one partition that left a row
    /// (event, rejection, duplicate or re-keyed message).
    pub async fn positions_with_rows(
        &self,
        topic: &str,
        partition: i32,
        low: i64,
        below: i64,
    ) -> Result<u64, StoreError> {
        let cond =
            "kafka_topic = ? AND kafka_partition = ? AND kafka_offset >= ? AND kafka_offset < ?";
        let mut q = self.client.query(&format!(
            "SELECT toUInt64(uniqExact(kafka_offset)) FROM (\
             SELECT kafka_offset FROM usage_events WHERE {cond} \
             UNION ALL SELECT kafka_offset FROM rejected_events WHERE {cond} \
             UNION ALL SELECT kafka_offset FROM duplicate_events WHERE {cond} \
             UNION ALL SELECT kafka_offset FROM rekeyed_events WHERE {cond})"
        ));
        for _ in 0..4 {
            q = q.bind(topic).bind(partition).bind(low).bind(below);
        }
        Ok(q.fetch_one().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_of_every_zone_read_the_rollup_other_bounds_raw_events() {
        use chrono::TimeZone;
        for tz in [
            "UTC",
            "Europe/Berlin",
            "Asia/Kolkata",
            "Asia/Kathmandu",
            "Pacific/Chatham",
            "America/St_Johns",
        ] {
            let tz: chrono_tz::Tz = tz.parse().unwrap();
            let start = tz
                .with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
                .unwrap()
                .timestamp();
            let end = tz
                .with_ymd_and_hms(2026, 4, 1, 0, 0, 0)
                .unwrap()
                .timestamp();
            assert_eq!(Source::for_range(start, end), Source::Rollup, "{tz}");
        }
        assert_eq!(Source::for_range(0, 901), Source::Events);
        assert_eq!(Source::for_range(450, 900), Source::Events);
    }
}
