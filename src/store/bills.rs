//! The providers' reports as imported (`provider_bill_imports`, `provider_bill_rows`) and
//! what tokentally recorded per day, provider and model, for `bills::reconcile`.

use std::collections::{BTreeMap, HashMap};

use chrono::{NaiveDate, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::rows::{cost_to_i128, money18};
use super::{Store, StoreError};
use crate::bills::reconcile::Recorded;
use crate::bills::{BillRow, Export, Report, Tokens};

#[derive(Debug, Clone, Row, Serialize)]
struct ImportRow {
    import_id: String,
    provider: String,
    report: String,
    /// Days since 1970-01-01 (`Date`).
    day: u16,
    imported_ms: u64,
    source: String,
    actor: String,
}

#[derive(Debug, Clone, Row, Serialize)]
struct RowOut {
    import_id: String,
    provider: String,
    report: String,
    day: u16,
    model: String,
    item: String,
    api_key_id: String,
    project_id: String,
    requests: u64,
    input_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    cost: i128,
}

#[derive(Debug, Clone, Row, Deserialize)]
struct LatestRow {
    provider: String,
    report: String,
    day: String,
    import_id: String,
}

#[derive(Debug, Clone, Row, Deserialize)]
struct RowIn {
    import_id: String,
    provider: String,
    report: String,
    day: String,
    model: String,
    item: String,
    api_key_id: String,
    project_id: String,
    requests: u64,
    input_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    #[serde(with = "money18")]
    cost: Decimal,
}

#[derive(Debug, Clone, Row, Deserialize)]
struct RecordedRow {
    day: u32,
    provider: String,
    model: String,
    price_model: String,
    requests: i64,
    input: i64,
    cache_read: i64,
    cache_write: i64,
    output: i64,
    #[serde(with = "money18")]
    cost: Decimal,
    estimated: i64,
    #[serde(with = "money18")]
    estimated_cost: Decimal,
    unpriced: i64,
}

fn epoch_day(d: NaiveDate) -> u16 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch");
    u16::try_from((d - epoch).num_days()).unwrap_or(0)
}

fn parse_day(s: &str) -> Result<NaiveDate, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("not a day: {s}")))
}

impl Store {
    /// Stores one report as one import (an id of its own, every day it covers); returns
    /// the import id.
    pub async fn import_bill(
        &self,
        e: &Export,
        source: &str,
        actor: &str,
    ) -> Result<String, StoreError> {
        let now = Utc::now();
        let import_id = format!(
            "{}-{}-{}",
            e.provider,
            e.report,
            now.format("%Y%m%dT%H%M%S%.3f")
        );
        // Rows first: an import whose days are recorded is complete.
        if !e.rows.is_empty() {
            let mut ins = self.client.insert::<RowOut>("provider_bill_rows").await?;
            for r in &e.rows {
                ins.write(&RowOut {
                    import_id: import_id.clone(),
                    provider: e.provider.clone(),
                    report: e.report.as_str().into(),
                    day: epoch_day(r.day),
                    model: r.model.clone(),
                    item: r.item.clone(),
                    api_key_id: r.api_key_id.clone(),
                    project_id: r.project_id.clone(),
                    requests: r.requests,
                    input_tokens: r.tokens.input,
                    cache_read_tokens: r.tokens.cache_read,
                    cache_write_tokens: r.tokens.cache_write,
                    output_tokens: r.tokens.output,
                    cost: cost_to_i128(r.cost),
                })
                .await?;
            }
            ins.end().await?;
        }
        let mut ins = self
            .client
            .insert::<ImportRow>("provider_bill_imports")
            .await?;
        for d in &e.days {
            ins.write(&ImportRow {
                import_id: import_id.clone(),
                provider: e.provider.clone(),
                report: e.report.as_str().into(),
                day: epoch_day(*d),
                imported_ms: now.timestamp_millis() as u64,
                source: source.to_owned(),
                actor: actor.to_owned(),
            })
            .await?;
        }
        ins.end().await?;
        Ok(import_id)
    }

    /// The latest import of every provider, report and day in `from..=to`, as exports
    /// (one per provider and report).
    pub async fn latest_bills(
        &self,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<Export>, StoreError> {
        let latest: Vec<LatestRow> = self
            .client
            .query(
                "SELECT provider, report, toString(day) AS day_, argMax(import_id, imported_ms) AS id_ \
                 FROM provider_bill_imports WHERE day >= toDate(?) AND day <= toDate(?) \
                 GROUP BY provider, report, day ORDER BY provider, report, day_",
            )
            .bind(from.to_string())
            .bind(to.to_string())
            .fetch_all()
            .await?;
        let mut out: BTreeMap<(String, String), Export> = BTreeMap::new();
        let mut chosen: HashMap<(String, String, NaiveDate), String> = HashMap::new();
        for l in latest {
            let Some(report) = Report::parse(&l.report) else {
                continue;
            };
            let day = parse_day(&l.day)?;
            out.entry((l.provider.clone(), l.report.clone()))
                .or_insert_with(|| Export::new(&l.provider, report))
                .days
                .insert(day);
            chosen.insert((l.provider, l.report, day), l.import_id);
        }
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let mut cursor = self
            .client
            .query(
                "SELECT import_id, provider, report, toString(day) AS day_, model, item, api_key_id, \
                 project_id, requests, input_tokens, cache_read_tokens, cache_write_tokens, \
                 output_tokens, cost FROM provider_bill_rows \
                 WHERE day >= toDate(?) AND day <= toDate(?)",
            )
            .bind(from.to_string())
            .bind(to.to_string())
            .fetch::<RowIn>()?;
        while let Some(r) = cursor.next().await? {
            let day = parse_day(&r.day)?;
            let key = (r.provider.clone(), r.report.clone(), day);
            if chosen.get(&key) != Some(&r.import_id) {
                continue;
            }
            if let Some(e) = out.get_mut(&(r.provider, r.report)) {
                e.rows.push(BillRow {
                    day,
                    model: r.model,
                    item: r.item,
                    api_key_id: r.api_key_id,
                    project_id: r.project_id,
                    requests: r.requests,
                    tokens: Tokens {
                        input: r.input_tokens,
                        cache_read: r.cache_read_tokens,
                        cache_write: r.cache_write_tokens,
                        output: r.output_tokens,
                    },
                    cost: r.cost,
                });
            }
        }
        Ok(out.into_values().collect())
    }

    /// What tokentally recorded per UTC day, provider and model in `from..=to`, for
    /// traffic through the platform's provider accounts (not institutions' own keys):
    /// requests that reached the provider, tokens, cost, estimated and unpriced ones.
    pub async fn recorded_for_bills(
        &self,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<Recorded>, StoreError> {
        let start = from
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp();
        let end = (to + chrono::Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp();
        // Aliases differ from column names (18.16 substitutes an alias named like a column).
        let rows: Vec<RecordedRow> = self
            .client
            .query(
                "SELECT toUInt32(intDiv(toUInt32(occurred_at), 86400)) AS d, provider, model, price_model, \
                 sumIf(toInt64(sign), position(status, 'rejected_') != 1 AND position(status, 'blocked_') != 1 \
                   AND status != 'upstream_unreachable') AS requests_, \
                 sum(toInt64(input_tokens) * sign) AS input_, \
                 sum(toInt64(cache_read_tokens) * sign) AS cache_read_, \
                 sum(toInt64(cache_write_tokens) * sign) AS cache_write_, \
                 sum(toInt64(output_tokens) * sign) AS output_, \
                 sum(cost * sign) AS cost_, \
                 sumIf(toInt64(sign), usage_estimated = 1) AS estimated_, \
                 sumIf(cost * sign, usage_estimated = 1) AS estimated_cost_, \
                 sumIf(toInt64(sign), priced = 0) AS unpriced_ \
                 FROM usage_events \
                 WHERE occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?) AND billing != 'byok' \
                 GROUP BY d, provider, model, price_model",
            )
            .bind(start)
            .bind(end)
            .fetch_all()
            .await?;
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch");
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(rows
            .into_iter()
            .map(|r| Recorded {
                day: epoch + chrono::Duration::days(i64::from(r.day)),
                provider: r.provider,
                model: r.model,
                price_model: r.price_model,
                requests: n(r.requests),
                tokens: Tokens {
                    input: n(r.input),
                    cache_read: n(r.cache_read),
                    cache_write: n(r.cache_write),
                    output: n(r.output),
                },
                cost: r.cost,
                estimated: n(r.estimated),
                estimated_cost: r.estimated_cost,
                unpriced: n(r.unpriced),
            })
            .collect())
    }
}
