//! `report spend`: exact, deduplicated totals from the hourly rollup.

use std::fmt::Write as _;

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Serialize;

use crate::domain::{Scope, Selection};
use crate::format::csv_field;
use crate::store::usage::{GroupKey, Order};
use crate::store::{Store, StoreError};
use clap::ValueEnum;

/// What `report spend` groups by.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Institution,
    Model,
    #[value(name = "api_key", alias = "api-key")]
    ApiKey,
    User,
}

/// How `report spend` prints.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Table,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpendRow {
    pub key: String,
    pub events: i64,
    pub unpriced_events: i64,
    pub input_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    /// Exact; serialized as a decimal string.
    #[serde(with = "rust_decimal::serde::str")]
    pub cost_usd: Decimal,
}

impl GroupBy {
    fn key(self) -> GroupKey {
        match self {
            GroupBy::Institution => GroupKey::Institution,
            GroupBy::Model => GroupKey::Model,
            GroupBy::ApiKey => GroupKey::ApiKey,
            GroupBy::User => GroupKey::User,
        }
    }

    /// The column name the JSON and CSV outputs use for the group key.
    pub fn column(self) -> &'static str {
        match self {
            GroupBy::Institution => "institution_id",
            GroupBy::Model => "model",
            GroupBy::ApiKey => "api_key_id",
            GroupBy::User => "user_id",
        }
    }
}

/// Spend from `from` to `to`, both days inclusive (UTC): the dashboard's aggregation
/// over the rollups, for all institutions.
pub async fn spend(
    store: &Store,
    from: NaiveDate,
    to: NaiveDate,
    group_by: GroupBy,
) -> Result<Vec<SpendRow>, StoreError> {
    let sel = Selection::whole(from, to, Scope::All);
    let rows = store
        .aggregate(
            &sel,
            group_by.key(),
            GroupKey::None,
            Order::Key,
            u32::MAX as usize,
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|a| SpendRow {
            cost_usd: a.cost(),
            key: a.key,
            events: a.events,
            unpriced_events: a.unpriced_events,
            input_tokens: a.input_tokens,
            cache_read_tokens: a.cache_read_tokens,
            cache_write_tokens: a.cache_write_tokens,
            output_tokens: a.output_tokens,
            reasoning_tokens: a.reasoning_tokens,
        })
        .collect())
}

use crate::store::usage::METRIC_COLUMNS as COLUMNS;

fn cells(r: &SpendRow) -> Vec<String> {
    vec![
        r.key.clone(),
        r.events.to_string(),
        r.unpriced_events.to_string(),
        r.input_tokens.to_string(),
        r.cache_read_tokens.to_string(),
        r.cache_write_tokens.to_string(),
        r.output_tokens.to_string(),
        r.reasoning_tokens.to_string(),
        r.cost_usd.to_string(),
    ]
}

pub fn render(rows: &[SpendRow], group_by: GroupBy, format: Format) -> anyhow::Result<String> {
    let key = group_by.column();
    let mut out = String::new();
    match format {
        Format::Json => {
            let values: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    let mut v = serde_json::to_value(r)?;
                    let obj = v.as_object_mut().expect("row is an object");
                    let k = obj.remove("key").unwrap_or_default();
                    obj.insert(key.to_owned(), k);
                    Ok(v)
                })
                .collect::<Result<_, serde_json::Error>>()?;
            out = serde_json::to_string_pretty(&values)?;
            out.push('\n');
        }
        Format::Csv => {
            let _ = writeln!(out, "{key},{}", COLUMNS.join(","));
            for r in rows {
                let c: Vec<String> = cells(r).iter().map(|s| csv_field(s)).collect();
                let _ = writeln!(out, "{}", c.join(","));
            }
        }
        Format::Table => {
            let header: Vec<String> = std::iter::once(key)
                .chain(COLUMNS)
                .map(str::to_owned)
                .collect();
            let mut table = vec![header];
            table.extend(rows.iter().map(cells));
            let total_cost: Decimal = rows.iter().map(|r| r.cost_usd).sum::<Decimal>().normalize();
            let total_events: i64 = rows.iter().map(|r| r.events).sum();
            let widths: Vec<usize> = (0..table[0].len())
                .map(|i| table.iter().map(|r| r[i].len()).max().unwrap_or(0))
                .collect();
            for row in &table {
                let line: Vec<String> = row
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if i == 0 {
                            format!("{c:<w$}", w = widths[i])
                        } else {
                            format!("{c:>w$}", w = widths[i])
                        }
                    })
                    .collect();
                let _ = writeln!(out, "{}", line.join("  ").trim_end());
            }
            let _ = writeln!(out, "total: {total_events} events, {total_cost} USD");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn row(key: &str, cost: Decimal) -> SpendRow {
        SpendRow {
            key: key.into(),
            events: 2,
            unpriced_events: 1,
            input_tokens: 3,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 4,
            reasoning_tokens: 0,
            cost_usd: cost,
        }
    }

    #[test]
    fn json_has_group_key_and_decimal_string() {
        let out = render(
            &[row("uni-oslo", dec!(0.000375))],
            GroupBy::Institution,
            Format::Json,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["institution_id"], "uni-oslo");
        assert_eq!(v[0]["cost_usd"], "0.000375");
        assert_eq!(v[0]["unpriced_events"], 1);
    }

    #[test]
    fn csv_quotes_and_table_totals() {
        let out = render(&[row("a,b", dec!(1.5))], GroupBy::User, Format::Csv).unwrap();
        assert!(out.starts_with("user_id,events,"));
        assert!(out.contains("\"a,b\",2,1,3,0,0,4,0,1.5"));
        let t = render(
            &[row("x", dec!(1.5)), row("y", dec!(2))],
            GroupBy::Model,
            Format::Table,
        )
        .unwrap();
        assert!(t.contains("total: 4 events, 3.5 USD"), "{t}");
    }
}
