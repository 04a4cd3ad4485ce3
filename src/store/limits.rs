//! Limits (`limits`), what gateway instances hold against them (`limit_holds`), and the
//! usage a limit counts, read from `usage_events`.

use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::rows::money18;
use super::sql::{s, Arg, Sql};
use super::{Store, StoreError};
use crate::limits::types::{Amounts, DecisionMode, Hold, SubjectUsage};
use crate::limits::Limit;

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

impl LimitRow {
    /// The limit this row sets, or why it cannot be read (a row written by hand).
    pub fn limit(&self) -> Result<Limit, String> {
        let l = Limit {
            institution_id: self.institution_id.clone(),
            scope: self.scope.parse()?,
            subject: self.subject.clone(),
            metric: self.metric.parse()?,
            period: self.period.parse()?,
            amount: self
                .amount
                .parse()
                .map_err(|_| format!("amount {:?} is not a number", self.amount))?,
            mode: self.mode.parse()?,
        };
        l.validate()?;
        Ok(l)
    }

    pub fn of(limit: &Limit, version: u64, removed: bool, at: u32, by: &str) -> Self {
        Self {
            limit_id: limit.id(),
            version,
            institution_id: limit.institution_id.clone(),
            scope: limit.scope.as_str().into(),
            subject: limit.subject.clone(),
            metric: limit.metric.as_str().into(),
            period: limit.period.as_str().into(),
            amount: limit.amount.normalize().to_string(),
            mode: limit.mode.as_str().into(),
            removed: u8::from(removed),
            updated_at: at,
            updated_by: by.into(),
        }
    }
}

/// One gateway instance's holds on one limit (`Hold` as stored).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
struct HoldRow {
    instance: String,
    limit_id: String,
    period_start: u32,
    reserved_usd: String,
    reserved_requests: u64,
    reserved_tokens: u64,
    open_reservations: u64,
    pending_usd: String,
    pending_requests: u64,
    pending_tokens: u64,
    /// Requests this limit refused on this instance in this period (cumulative).
    refused: u64,
    reported_at: u32,
    active: u8,
    unit_usd: String,
    unit_requests: u64,
    unit_tokens: u64,
    cap: String,
    mode: String,
}

fn stamp(t: i64) -> u32 {
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

impl HoldRow {
    fn of(h: &Hold) -> Self {
        Self {
            instance: h.instance.clone(),
            limit_id: h.limit_id.clone(),
            period_start: stamp(h.period_start),
            reserved_usd: h.reserved.usd.normalize().to_string(),
            reserved_requests: h.reserved.requests,
            reserved_tokens: h.reserved.tokens,
            open_reservations: h.open,
            pending_usd: h.pending.usd.normalize().to_string(),
            pending_requests: h.pending.requests,
            pending_tokens: h.pending.tokens,
            refused: h.refused,
            reported_at: stamp(h.reported_at),
            active: u8::from(h.active),
            unit_usd: h.unit.usd.normalize().to_string(),
            unit_requests: h.unit.requests,
            unit_tokens: h.unit.tokens,
            cap: h.cap.normalize().to_string(),
            mode: h.mode.as_str().to_owned(),
        }
    }

    fn hold(self) -> Hold {
        let usd = |s: &str| s.parse::<Decimal>().unwrap_or_default();
        Hold {
            reserved: Amounts {
                usd: usd(&self.reserved_usd),
                requests: self.reserved_requests,
                tokens: self.reserved_tokens,
            },
            open: self.open_reservations,
            pending: Amounts {
                usd: usd(&self.pending_usd),
                requests: self.pending_requests,
                tokens: self.pending_tokens,
            },
            refused: self.refused,
            period_start: i64::from(self.period_start),
            reported_at: i64::from(self.reported_at),
            active: self.active == 1,
            unit: Amounts {
                usd: usd(&self.unit_usd),
                requests: self.unit_requests,
                tokens: self.unit_tokens,
            },
            cap: usd(&self.cap),
            mode: self.mode.parse().unwrap_or(DecisionMode::Shares),
            instance: self.instance,
            limit_id: self.limit_id,
        }
    }
}

/// `SubjectUsage` as read.
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
struct SubjectUsageRow {
    user_id: String,
    api_key_id: String,
    #[serde(with = "money18")]
    usd: Decimal,
    requests: i64,
    tokens: i64,
    stored: Vec<String>,
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
    ) -> Result<Vec<SubjectUsage>, StoreError> {
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
        let rows: Vec<SubjectUsageRow> = q.query(&self.client).fetch_all().await?;
        Ok(rows
            .into_iter()
            .map(|r| SubjectUsage {
                amounts: Amounts {
                    usd: r.usd,
                    requests: u64::try_from(r.requests).unwrap_or(0),
                    tokens: u64::try_from(r.tokens).unwrap_or(0),
                },
                user_id: r.user_id,
                api_key_id: r.api_key_id,
                stored: r.stored,
            })
            .collect())
    }

    pub async fn write_holds(&self, holds: &[Hold]) -> Result<(), StoreError> {
        if holds.is_empty() {
            return Ok(());
        }
        let mut insert = self.client.insert::<HoldRow>("limit_holds").await?;
        for h in holds {
            insert.write(&HoldRow::of(h)).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Each instance's latest holds reported since `since` (unix seconds).
    pub async fn live_holds(&self, since: i64) -> Result<Vec<Hold>, StoreError> {
        let mut q = Sql::new(
            "SELECT ?fields FROM (SELECT * FROM limit_holds ORDER BY instance, limit_id, reported_at DESC \
             LIMIT 1 BY instance, limit_id)",
        );
        q.bind(" WHERE reported_at >= toDateTime(?)", [Arg::Int(since)]);
        let rows: Vec<HoldRow> = q.query(&self.client).fetch_all().await?;
        Ok(rows.into_iter().map(HoldRow::hold).collect())
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
