//! Limits (`limits`), what gateway instances hold against them (`limit_holds`), and the
//! usage a limit counts, read from `usage_events`.

use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::rows::money18;
use super::sql::{s, Arg, Sql};
use super::{Store, StoreError};

/// One state of a limit.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct LimitRow {
    pub limit_id: String,
    pub version: u64,
    pub institution_id: String,
    pub scope: String,
    pub subject: String,
    pub metric: String,
    pub period: String,
    pub amount: String,
    pub mode: String,
    pub removed: u8,
    pub updated_at: u32,
    pub updated_by: String,
}

/// One gateway instance's holds on one limit, as stored (what it means: `limits::Hold`).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct HoldRow {
    pub instance: String,
    pub limit_id: String,
    pub period_start: u32,
    pub reserved_usd: String,
    pub reserved_requests: u64,
    pub reserved_tokens: u64,
    pub open_reservations: u64,
    pub pending_usd: String,
    pub pending_requests: u64,
    pub pending_tokens: u64,
    /// Requests this limit refused on this instance in this period (cumulative).
    pub refused: u64,
    pub reported_at: u32,
    pub active: u8,
    pub unit_usd: String,
    pub unit_requests: u64,
    pub unit_tokens: u64,
    pub cap: String,
    pub mode: String,
}

/// One (user, key)'s usage in a period, as read (`limits::SubjectUsage`).
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct SubjectUsageRow {
    pub user_id: String,
    pub api_key_id: String,
    #[serde(with = "money18")]
    pub usd: Decimal,
    pub requests: i64,
    pub tokens: i64,
    pub stored: Vec<String>,
}

/// Requests that count against a `requests` limit: those the provider served.
pub const SERVED: &str =
    "(substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_' \
    AND status != 'upstream_unreachable')";

impl Store {
    /// Every limit's current state (removed ones included, flagged).
    pub async fn current_limits(&self) -> Result<Vec<LimitRow>, StoreError> {
        Ok(self
            .client
            .query("SELECT ?fields FROM limits ORDER BY limit_id, version DESC LIMIT 1 BY limit_id")
            .fetch_all()
            .await?)
    }

    /// (rows, highest version) of `limits`: changes whenever a limit is set or removed.
    pub async fn limits_fingerprint(&self) -> Result<(u64, u64), StoreError> {
        Ok(self
            .client
            .query("SELECT count() AS n, max(version) AS v FROM limits")
            .fetch_one::<(u64, u64)>()
            .await?)
    }

    pub async fn write_limit(&self, row: &LimitRow) -> Result<(), StoreError> {
        let mut insert = self.client.insert::<LimitRow>("limits").await?;
        insert.write(row).await?;
        insert.end().await?;
        Ok(())
    }

    /// What an institution's users and keys used in `[from, to)` (unix seconds), one row
    /// per (user, key), each with those of `pending` that are stored — read in one query,
    /// so an event is either in the sums and listed, or in neither.
    pub async fn limit_usage(
        &self,
        institution: &str,
        from: i64,
        to: i64,
        pending: Vec<String>,
    ) -> Result<Vec<SubjectUsageRow>, StoreError> {
        let mut q = Sql::new("SELECT user_id, api_key_id, sum(cost * sign) AS usd, ");
        q.push(&format!("sum(toInt64(sign) * {SERVED}) AS requests, "));
        q.push(
            "sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens, ",
        );
        q.bind(
            "groupUniqArrayIf(event_id, sign = 1 AND has(?, event_id)) AS stored \
             FROM usage_events WHERE institution_id = ? \
             AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) \
             GROUP BY user_id, api_key_id",
            [
                Arg::Strs(pending),
                s(institution),
                Arg::Int(from),
                Arg::Int(to),
            ],
        );
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// What `users` of `institution` used in `[from, to)` per (user, key), from the
    /// per-person rollup (`usage_person_15m`): the same sums as `limit_usage` gives for
    /// them (without stored ids). The bounds must be whole quarter hours.
    pub async fn person_usage(
        &self,
        institution: &str,
        from: i64,
        to: i64,
        users: Vec<String>,
    ) -> Result<Vec<SubjectUsageRow>, StoreError> {
        debug_assert!(from % 900 == 0 && to % 900 == 0, "quarter hours");
        let mut q = Sql::default();
        q.bind(
            "SELECT user_id, api_key_id, sum(cost) AS usd, sum(requests) AS requests, \
             sum(tokens) AS tokens, emptyArrayString() AS stored FROM usage_person_15m \
             WHERE institution_id = ? AND user_id IN (SELECT arrayJoin(?)) \
             AND slot >= toDateTime(?) AND slot < toDateTime(?) \
             GROUP BY user_id, api_key_id",
            [
                s(institution),
                Arg::Strs(users),
                Arg::Int(from),
                Arg::Int(to),
            ],
        );
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// What `institution` used in `[from, to)` as a whole, from the billing rollup
    /// (`usage_billing_15m`): (USD, served requests, tokens). Whole quarter hours only.
    pub async fn institution_usage(
        &self,
        institution: &str,
        from: i64,
        to: i64,
    ) -> Result<(Decimal, i64, i64), StoreError> {
        debug_assert!(from % 900 == 0 && to % 900 == 0, "quarter hours");
        #[derive(Row, Deserialize)]
        struct Total {
            #[serde(with = "money18")]
            usd: Decimal,
            requests: i64,
            tokens: i64,
        }
        let t: Total = self
            .client
            .query(
                "SELECT sum(cost) AS usd, sum(served) AS requests, \
                 sum(input + cache_read + cache_write + output) AS tokens \
                 FROM usage_billing_15m WHERE institution_id = ? \
                 AND slot >= toDateTime(?) AND slot < toDateTime(?)",
            )
            .bind(institution)
            .bind(from)
            .bind(to)
            .fetch_one()
            .await?;
        Ok((t.usd, t.requests, t.tokens))
    }

    pub async fn write_holds(&self, rows: &[HoldRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<HoldRow>("limit_holds").await?;
        for r in rows {
            insert.write(r).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Each instance's latest holds reported since `since` (unix seconds).
    pub async fn live_holds(&self, since: i64) -> Result<Vec<HoldRow>, StoreError> {
        let mut q = Sql::new(
            "SELECT ?fields FROM (SELECT * FROM limit_holds ORDER BY instance, limit_id, reported_at DESC \
             LIMIT 1 BY instance, limit_id)",
        );
        q.bind(" WHERE reported_at >= toDateTime(?)", [Arg::Int(since)]);
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// Requests each limit refused per period, over every instance: (limit id, period
    /// start) → count.
    pub async fn limit_refused_counts(
        &self,
    ) -> Result<std::collections::HashMap<(String, u32), u64>, StoreError> {
        #[derive(Row, Deserialize)]
        struct R {
            limit_id: String,
            period_start: u32,
            refused: u64,
        }
        let rows: Vec<R> = self
            .client
            .query(
                "SELECT limit_id, period_start, toUInt64(sum(m)) AS refused FROM \
                 (SELECT instance, limit_id, toUInt32(period_start) AS period_start, max(refused) AS m \
                  FROM limit_holds WHERE refused > 0 GROUP BY instance, limit_id, period_start) \
                 GROUP BY limit_id, period_start",
            )
            .fetch_all()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| ((r.limit_id, r.period_start), r.refused))
            .collect())
    }

    /// Requests refused by limits in `[from, to)`, newest first: (when, user, key,
    /// message-free: the model).
    pub async fn limit_refusals(
        &self,
        institution: Option<&str>,
        from: i64,
        limit: u64,
    ) -> Result<Vec<Refusal>, StoreError> {
        let mut q = Sql::new(
            "SELECT toUInt32(occurred_at) AS at, institution_id, user_id, api_key_id, model \
             FROM usage_events WHERE status = 'rejected_budget' AND sign = 1",
        );
        if let Some(i) = institution {
            q.bind(" AND institution_id = ?", [s(i)]);
        }
        q.bind(
            " AND occurred_at >= toDateTime(?) ORDER BY occurred_at DESC LIMIT ?",
            [
                Arg::Int(from),
                Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)),
            ],
        );
        Ok(q.query(&self.client).fetch_all().await?)
    }
}

/// A request a limit refused.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize, Serialize)]
pub struct Refusal {
    pub at: u32,
    pub institution_id: String,
    pub user_id: String,
    pub api_key_id: String,
    pub model: String,
}
