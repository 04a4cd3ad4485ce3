//! URL filters → one SQL selection over the hourly rollup (or, with a tag filter, over
//! raw events shaped like the rollup). The scope from `auth::Scoped` is always applied.

use chrono::{Datelike, Duration, NaiveDate, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::auth::Scope;
use super::error::AppError;
use crate::store::{sql_str, Store};

/// Query parameters every page accepts (empty values mean "not set").
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Filters {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub institution: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub user: String,
    /// `name=value`
    #[serde(default)]
    pub tag: String,
    /// `csv` to download one table (with `table`).
    #[serde(default, skip_serializing)]
    pub format: String,
    #[serde(default, skip_serializing)]
    pub table: String,
}

/// A validated selection: date range (UTC days, both inclusive) and filters.
#[derive(Debug, Clone)]
pub struct Selection {
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub scope: Scope,
    pub model: Option<String>,
    pub key: Option<String>,
    pub user: Option<String>,
    pub tag: Option<(String, String)>,
}

fn opt(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

/// A day as `YYYY-MM-DD`, years 2000–2199: exactly what a date picker sends. (chrono
/// alone accepts `+262142-12-31`, whose next day overflows.)
fn date(s: &str, name: &str) -> Result<Option<NaiveDate>, AppError> {
    let bad = || {
        AppError::BadRequest(format!(
            "`{name}` must be a date YYYY-MM-DD between 2000 and 2199"
        ))
    };
    opt(s)
        .map(|d| {
            let shape = d.len() == 10
                && d.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                });
            if !shape {
                return Err(bad());
            }
            let day = NaiveDate::parse_from_str(&d, "%Y-%m-%d").map_err(|_| bad())?;
            if !(2000..=2199).contains(&day.year()) {
                return Err(bad());
            }
            Ok(day)
        })
        .transpose()
}

/// The longest range a page accepts unless configured otherwise (`web.max_range_days`).
pub const DEFAULT_MAX_RANGE_DAYS: i64 = 400;

impl Selection {
    /// Defaults: this calendar month (UTC) so far; at most `DEFAULT_MAX_RANGE_DAYS`.
    pub fn new(f: &Filters, scope: Scope) -> Result<Self, AppError> {
        Self::new_capped(f, scope, DEFAULT_MAX_RANGE_DAYS)
    }

    /// As `new`, refusing ranges longer than `max_days`.
    pub fn new_capped(f: &Filters, scope: Scope, max_days: i64) -> Result<Self, AppError> {
        let today = Utc::now().date_naive();
        let to = date(&f.to, "to")?.unwrap_or(today);
        let from = date(&f.from, "from")?.unwrap_or_else(|| to.with_day(1).expect("day 1"));
        if from > to {
            return Err(AppError::BadRequest("`from` is after `to`".into()));
        }
        if (to - from).num_days() + 1 > max_days {
            return Err(AppError::BadRequest(format!(
                "the range {from} – {to} is {} days; pages show at most {max_days} days (narrow the range)",
                (to - from).num_days() + 1
            )));
        }
        for (name, v) in [
            ("model", &f.model),
            ("key", &f.key),
            ("user", &f.user),
            ("tag", &f.tag),
            ("institution", &f.institution),
        ] {
            if v.len() > crate::domain::MAX_ID_LEN * 2 {
                return Err(AppError::BadRequest(format!("`{name}` is too long")));
            }
        }
        let tag = match opt(&f.tag) {
            None => None,
            Some(t) => Some(
                t.split_once(['=', ':'])
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| AppError::BadRequest("`tag` must be name=value".into()))?,
            ),
        };
        Ok(Self {
            from,
            to,
            scope,
            model: opt(&f.model),
            key: opt(&f.key),
            user: opt(&f.user),
            tag,
        })
    }

    pub fn start_ts(&self) -> i64 {
        self.from
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp()
    }

    pub fn end_ts(&self) -> i64 {
        (self.to + Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp()
    }

    /// Days in the range (for time series).
    pub fn days(&self) -> Vec<NaiveDate> {
        self.from
            .iter_days()
            .take_while(|d| *d <= self.to)
            .collect()
    }

    /// The table (or subquery) to read for a query that uses the SQL expressions `used`:
    /// the coarse rollup when neither they nor the filters need user, key or tier; the
    /// fine rollup otherwise; raw events when a tag is filtered.
    pub fn source(&self, used: &[&str]) -> String {
        let fine = self.key.is_some()
            || self.user.is_some()
            || used.iter().any(|u| {
                ["user_id", "api_key_id", "service_tier"]
                    .iter()
                    .any(|c| u.contains(c))
            });
        match &self.tag {
            None if fine && self.scope.institution().is_some() => "usage_hourly_institution".to_owned(),
            None if fine => "usage_hourly".to_owned(),
            None => "usage_hourly_model".to_owned(),
            Some(_) => format!(
                "(SELECT toStartOfHour(occurred_at) AS hour, institution_id, provider, model, price_model, api_key_id, \
                 user_id, service_tier, toInt64(sign) AS events, toInt64(sign) * toInt64(1 - priced) AS unpriced_events, \
                 toInt64(input_tokens) * sign AS input_tokens, toInt64(cache_read_tokens) * sign AS cache_read_tokens, \
                 toInt64(cache_write_tokens) * sign AS cache_write_tokens, toInt64(output_tokens) * sign AS output_tokens, \
                 toInt64(reasoning_tokens) * sign AS reasoning_tokens, cost * sign AS cost FROM usage_events \
                 WHERE 1{}{})",
                self.raw_conditions(),
                self.tag_filter(),
            ),
        }
    }

    /// Conditions on raw events (institution and time), for the tag subquery and raw reads.
    pub fn raw_conditions(&self) -> String {
        let mut c = format!(
            " AND occurred_at >= toDateTime({}) AND occurred_at < toDateTime({})",
            self.start_ts(),
            self.end_ts()
        );
        if let Some(i) = self.scope.institution() {
            c.push_str(&format!(" AND institution_id = {}", sql_str(i)));
        }
        c
    }

    /// Model, key and user conditions (columns both rollups and raw events have).
    fn dimension_filters(&self) -> String {
        let mut c = String::new();
        for (col, v) in [
            ("model", &self.model),
            ("api_key_id", &self.key),
            ("user_id", &self.user),
        ] {
            if let Some(v) = v {
                c.push_str(&format!(" AND {col} = {}", sql_str(v)));
            }
        }
        c
    }

    /// The tag condition on raw events (empty without a tag filter).
    fn tag_filter(&self) -> String {
        self.tag.as_ref().map_or(String::new(), |(k, v)| {
            format!(
                " AND arrayExists((k, v) -> k = {} AND v = {}, tag_keys, tag_values)",
                sql_str(k),
                sql_str(v)
            )
        })
    }

    /// Model, key, user and tag filters on raw events (beyond `raw_conditions`).
    pub fn raw_filters(&self) -> String {
        self.dimension_filters() + &self.tag_filter()
    }

    /// WHERE clause over the source's columns.
    pub fn conditions(&self) -> String {
        let mut c = format!(
            "hour >= toDateTime({}) AND hour < toDateTime({})",
            self.start_ts(),
            self.end_ts()
        );
        if let Some(i) = self.scope.institution() {
            c.push_str(&format!(" AND institution_id = {}", sql_str(i)));
        }
        c.push_str(&self.dimension_filters());
        c
    }
}

/// Sums over one grouping.
#[derive(Debug, Clone, Row, Deserialize)]
pub struct Agg {
    pub key: String,
    pub key2: String,
    pub events: i64,
    pub unpriced_events: i64,
    pub input_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: String,
}

impl Agg {
    pub fn cost(&self) -> Decimal {
        self.cost_usd
            .parse::<Decimal>()
            .unwrap_or_default()
            .normalize()
    }
}

/// Group by `key` (and `key2`, an SQL expression or `''`), ordered by `order`.
pub async fn aggregate(
    store: &Store,
    sel: &Selection,
    key: &str,
    key2: &str,
    order: &str,
    limit: usize,
) -> Result<Vec<Agg>, AppError> {
    let sql = format!(
        "SELECT toString({key}) AS key, toString({key2}) AS key2, sum(events) AS events, \
         sum(unpriced_events) AS unpriced_events, sum(input_tokens) AS input_tokens, \
         sum(cache_read_tokens) AS cache_read_tokens, sum(cache_write_tokens) AS cache_write_tokens, \
         sum(output_tokens) AS output_tokens, sum(reasoning_tokens) AS reasoning_tokens, \
         toString(sum(cost)) AS cost_usd FROM {} WHERE {} GROUP BY key, key2 HAVING events != 0 \
         ORDER BY {order} LIMIT {limit}",
        sel.source(&[key, key2]),
        sel.conditions()
    );
    Ok(store.client().query(&sql).fetch_all().await?)
}

/// Total spend of one scope between two instants (ignores model/key/user/tag filters).
pub async fn spend_between(
    store: &Store,
    scope: &Scope,
    start: i64,
    end: i64,
) -> Result<Decimal, AppError> {
    let mut sql = format!(
        "SELECT toString(sum(cost)) FROM usage_hourly_model WHERE hour >= toDateTime({start}) AND hour < toDateTime({end})"
    );
    if let Some(i) = scope.institution() {
        sql.push_str(&format!(" AND institution_id = {}", sql_str(i)));
    }
    let s: String = store.client().query(&sql).fetch_one().await?;
    Ok(s.parse::<Decimal>().unwrap_or_default().normalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_and_filters_become_conditions() {
        let f = Filters {
            from: "2026-10-01".into(),
            to: "2026-10-31".into(),
            model: "gpt-4o".into(),
            user: "a'b".into(),
            ..Default::default()
        };
        let s = Selection::new(&f, Scope::One("uni-oslo".into())).unwrap();
        let c = s.conditions();
        assert!(c.contains("institution_id = 'uni-oslo'"));
        assert!(c.contains("model = 'gpt-4o'"));
        assert!(c.contains("user_id = 'a\\'b'"));
        assert_eq!(s.days().len(), 31);
        assert_eq!(s.end_ts() - s.start_ts(), 31 * 86400);
        // A user filter needs a fine rollup (institution-first for one institution);
        // a model breakdown alone does not.
        assert_eq!(s.source(&["model"]), "usage_hourly_institution");
        let plain = Selection::new(&Filters::default(), Scope::All).unwrap();
        assert_eq!(plain.source(&["model", "''"]), "usage_hourly_model");
        assert_eq!(plain.source(&["api_key_id"]), "usage_hourly");
        let t = Selection::new(
            &Filters {
                tag: "project=x".into(),
                ..Default::default()
            },
            Scope::All,
        )
        .unwrap();
        assert!(t.source(&["model"]).contains("k = 'project' AND v = 'x'"));
        assert!(Selection::new(
            &Filters {
                from: "2026-10-05".into(),
                to: "2026-10-01".into(),
                ..Default::default()
            },
            Scope::All
        )
        .is_err());
        assert!(Selection::new(
            &Filters {
                from: "yesterday".into(),
                ..Default::default()
            },
            Scope::All
        )
        .is_err());
    }
}
