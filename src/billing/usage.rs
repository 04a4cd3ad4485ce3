//! Reads what invoices are computed from: stored events of one institution in one
//! period, summed per price entry and rate tier (every sum weighs rows by `sign`, so
//! re-rated events count once at their current price).

use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::{GroupSums, Unpriced};
use crate::store::{sql_str, Store, StoreError};

#[derive(Row, Deserialize)]
struct GroupRow {
    price_id: String,
    price_model: String,
    price_tier: u64,
    events: i64,
    input: i64,
    cache_read: i64,
    cache_write: i64,
    output: i64,
    reasoning: i64,
    cost: String,
}

impl From<GroupRow> for GroupSums {
    fn from(r: GroupRow) -> Self {
        GroupSums {
            price_id: r.price_id,
            price_model: r.price_model,
            price_tier: r.price_tier,
            events: r.events,
            input: r.input,
            cache_read: r.cache_read,
            cache_write: r.cache_write,
            output: r.output,
            reasoning: r.reasoning,
            cost: r.cost.parse::<Decimal>().unwrap_or_default().normalize(),
        }
    }
}

const SUMS: &str = "price_id, price_model, price_tier, \
    sum(toInt64(sign)) AS events, \
    sum(toInt64(input_tokens) * sign) AS input, \
    sum(toInt64(cache_read_tokens) * sign) AS cache_read, \
    sum(toInt64(cache_write_tokens) * sign) AS cache_write, \
    sum(toInt64(output_tokens) * sign) AS output, \
    sum(toInt64(least(reasoning_tokens, output_tokens)) * sign) AS reasoning, \
    toString(sum(cost * sign)) AS cost";

fn range(institution: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> String {
    format!(
        "institution_id = {} AND occurred_at >= toDateTime({}) AND occurred_at < toDateTime({})",
        sql_str(institution),
        start.timestamp(),
        end.timestamp()
    )
}

/// Priced usage of `[start, end)`, per price entry and tier.
pub async fn groups(
    store: &Store,
    institution: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<GroupSums>, StoreError> {
    let sql = format!(
        "SELECT {SUMS} FROM usage_events WHERE {} AND priced = 1 \
         GROUP BY price_id, price_model, price_tier HAVING events != 0 \
         ORDER BY price_id, price_tier",
        range(institution, start, end)
    );
    let rows: Vec<GroupRow> = store.client().query(&sql).fetch_all().await?;
    Ok(rows.into_iter().map(Into::into).collect())
}

#[derive(Row, Deserialize)]
struct UnpricedRow {
    events: i64,
    tokens: i64,
    models: Vec<String>,
}

/// Unpriced usage of `[start, end)`.
pub async fn unpriced(
    store: &Store,
    institution: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Unpriced, StoreError> {
    let sql = format!(
        "SELECT sum(toInt64(sign)) AS events, \
         sum(toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens) * sign) AS tokens, \
         arraySort(groupUniqArray(model)) AS models \
         FROM usage_events WHERE {} AND priced = 0",
        range(institution, start, end)
    );
    let r: UnpricedRow = store.client().query(&sql).fetch_one().await?;
    Ok(Unpriced {
        events: r.events,
        tokens: r.tokens,
        models: if r.events == 0 { Vec::new() } else { r.models },
    })
}

#[derive(Row, Deserialize)]
struct DetailRow {
    day: String,
    user_id: String,
    api_key_id: String,
    priced: u8,
    model: String,
    /// The `SUMS` columns, which follow in the same order (RowBinary is positional).
    sums: GroupRow,
}

/// One row of the detailed usage export, before it is split into token classes.
pub struct Detail {
    pub day: NaiveDate,
    pub user_id: String,
    pub api_key_id: String,
    /// The model as the gateway named it (for unpriced rows).
    pub model: String,
    pub priced: bool,
    pub sums: GroupSums,
}

/// Usage of `[start, end)` per local day (in `tz`) × user × key × price entry.
pub async fn details(
    store: &Store,
    institution: &str,
    tz: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Vec<Detail>, StoreError> {
    let sql = format!(
        "SELECT toString(toDate(occurred_at, {tz})) AS day, user_id, api_key_id, priced, model, {SUMS} \
         FROM usage_events WHERE {} \
         GROUP BY day, user_id, api_key_id, priced, model, price_id, price_model, price_tier \
         HAVING events != 0 \
         ORDER BY day, user_id, api_key_id, model, price_id, price_tier",
        range(institution, start, end),
        tz = sql_str(tz)
    );
    let rows: Vec<DetailRow> = store.client().query(&sql).fetch_all().await?;
    Ok(rows
        .into_iter()
        .map(|r| Detail {
            day: r.day.parse().unwrap_or_default(),
            user_id: r.user_id,
            api_key_id: r.api_key_id,
            model: r.model,
            priced: r.priced == 1,
            sums: r.sums.into(),
        })
        .collect())
}
