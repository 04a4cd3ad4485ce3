//! Questions about spend, answered from the rollups (or, with a tag filter, from raw
//! events shaped like them): the dashboard's tables and charts and `report spend`.

use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::rows::money18;
use super::sql::{i, s, Sql};
use super::{Store, StoreError};
use crate::domain::{Scope, Selection};

/// Raw events as rollup rows: every sum weighed by `sign`, hours in UTC. The one place
/// (besides the materialized views in `schema/`) that defines what a rollup row is.
const RAW_AS_ROLLUP: &str = "toStartOfHour(occurred_at, 'UTC') AS hour, institution_id, provider, model, \
     price_model, api_key_id, user_id, service_tier, toInt64(sign) AS events, \
     toInt64(sign) * toInt64(1 - priced) AS unpriced_events, \
     toInt64(input_tokens) * sign AS input_tokens, toInt64(cache_read_tokens) * sign AS cache_read_tokens, \
     toInt64(cache_write_tokens) * sign AS cache_write_tokens, toInt64(output_tokens) * sign AS output_tokens, \
     toInt64(reasoning_tokens) * sign AS reasoning_tokens, cost * sign AS cost";

/// What a view groups by: fixed expressions, never text from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKey {
    /// Nothing (a second key that is not used).
    None,
    /// The UTC hour, as `YYYY-MM-DD HH:MM:SS`.
    Hour,
    /// The UTC day, as `YYYY-MM-DD`.
    Day,
    Institution,
    Provider,
    Model,
    ApiKey,
    User,
}

impl GroupKey {
    /// The expression, over a source whose time column is `time`.
    fn expr(self, time: &str) -> String {
        match (self, self.column()) {
            (GroupKey::Hour, _) => format!("toString({time}, 'UTC')"),
            (GroupKey::Day, _) => format!("toString(toDate({time}, 'UTC'))"),
            (_, Some(column)) => column.into(),
            (_, None) => "''".into(),
        }
    }

    /// The column the key needs besides time (None for no key and the time keys).
    fn column(self) -> Option<&'static str> {
        match self {
            GroupKey::None | GroupKey::Hour | GroupKey::Day => None,
            GroupKey::Institution => Some("institution_id"),
            GroupKey::Provider => Some("provider"),
            GroupKey::Model => Some("model"),
            GroupKey::ApiKey => Some("api_key_id"),
            GroupKey::User => Some("user_id"),
        }
    }
}

/// A rollup table: the columns it keeps besides time and the sums, and its step.
struct Rollup {
    table: &'static str,
    /// Its time column: `hour` (start of the UTC hour) or `day` (of the UTC day).
    time: &'static str,
    columns: &'static [&'static str],
}

const MODEL_COLUMNS: &[&str] = &["institution_id", "provider", "model", "price_model"];
const ALL_COLUMNS: &[&str] = &[
    "institution_id",
    "provider",
    "model",
    "price_model",
    "api_key_id",
    "user_id",
    "service_tier",
];

/// Every rollup (`schema/`), smallest first: a selection reads the first that answers.
const ROLLUPS: [Rollup; 6] = [
    Rollup {
        table: "usage_daily_model",
        time: "day",
        columns: MODEL_COLUMNS,
    },
    Rollup {
        table: "usage_hourly_model",
        time: "hour",
        columns: MODEL_COLUMNS,
    },
    Rollup {
        table: "usage_daily_user",
        time: "day",
        columns: &["institution_id", "user_id"],
    },
    Rollup {
        table: "usage_daily_key",
        time: "day",
        columns: &["institution_id", "api_key_id"],
    },
    Rollup {
        table: "usage_daily_user_model",
        time: "day",
        columns: &[
            "institution_id",
            "user_id",
            "provider",
            "model",
            "price_model",
        ],
    },
    Rollup {
        table: "usage_hourly_institution",
        time: "hour",
        columns: ALL_COLUMNS,
    },
];

impl Rollup {
    fn hourly(&self) -> bool {
        self.time == "hour"
    }
}

/// The model, key and user filters of `sel`, by the column each one constrains.
fn filters(sel: &Selection) -> [(&'static str, &Option<String>); 3] {
    [
        ("model", &sel.model),
        ("api_key_id", &sel.key),
        ("user_id", &sel.user),
    ]
}

/// The smallest rollup with `columns` (and hours, if `hourly`) for `sel`.
fn rollup_for(sel: &Selection, columns: &[&str], hourly: bool) -> &'static Rollup {
    let mut needed: Vec<&str> = columns.to_vec();
    needed.extend(
        filters(sel)
            .into_iter()
            .filter(|(_, f)| f.is_some())
            .map(|(col, _)| col),
    );
    ROLLUPS
        .iter()
        .find(|r| (r.hourly() || !hourly) && needed.iter().all(|c| r.columns.contains(c)))
        .expect("usage_hourly_institution has every column")
}

/// Row order of an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// By the group key (time series).
    Key,
    /// Most spend first.
    CostDesc,
}

/// The names of `Agg`'s sums, in order: the columns of every export of them.
pub const METRIC_COLUMNS: [&str; 8] = [
    "events",
    "unpriced_events",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
];

/// Sums over one grouping.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
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
    /// Exact USD.
    #[serde(with = "money18")]
    pub cost_usd: Decimal,
}

impl Agg {
    pub fn cost(&self) -> Decimal {
        self.cost_usd
    }
}

/// The table a selection reads (the smallest rollup with `columns`, and hours if
/// `hourly`; raw events shaped like a rollup with a tag filter) with its WHERE clause,
/// and the name of its time column.
fn source_and_conditions(sel: &Selection, columns: &[&str], hourly: bool) -> (Sql, &'static str) {
    let mut q = Sql::default();
    let time = match &sel.tag {
        None => {
            let rollup = rollup_for(sel, columns, hourly);
            q.push(rollup.table);
            rollup.time
        }
        Some(_) => {
            q.push(&format!(
                "(SELECT {RAW_AS_ROLLUP} FROM usage_events WHERE 1"
            ))
            .append(raw_conditions(sel))
            .append(tag_condition(sel))
            .push(")");
            "hour"
        }
    };
    q.bind(
        &format!(" WHERE {time} >= toDateTime(?) AND {time} < toDateTime(?)"),
        [i(sel.start_ts()), i(sel.end_ts())],
    );
    if let Some(inst) = sel.scope.institution() {
        q.bind(" AND institution_id = ?", [s(inst)]);
    }
    q.append(dimension_conditions(sel));
    (q, time)
}

/// Institution and time conditions on raw events.
fn raw_conditions(sel: &Selection) -> Sql {
    let mut q = Sql::default();
    q.bind(
        " AND occurred_at >= toDateTime(?) AND occurred_at < toDateTime(?)",
        [i(sel.start_ts()), i(sel.end_ts())],
    );
    if let Some(inst) = sel.scope.institution() {
        q.bind(" AND institution_id = ?", [s(inst)]);
    }
    q
}

/// Model, key and user conditions (columns the rollups and raw events share).
fn dimension_conditions(sel: &Selection) -> Sql {
    let mut q = Sql::default();
    for (col, v) in filters(sel) {
        if let Some(v) = v {
            q.bind(&format!(" AND {col} = ?"), [s(v)]);
        }
    }
    q
}

fn tag_condition(sel: &Selection) -> Sql {
    let mut q = Sql::default();
    if let Some((k, v)) = &sel.tag {
        q.bind(
            " AND arrayExists((k, v) -> k = ? AND v = ?, tag_keys, tag_values)",
            [s(k), s(v)],
        );
    }
    q
}

/// The query of `aggregate` (separate so that tests can look at it).
pub fn aggregate_sql(
    sel: &Selection,
    key: GroupKey,
    key2: GroupKey,
    order: Order,
    limit: usize,
) -> Sql {
    let columns: Vec<&str> = [key, key2].iter().filter_map(|k| k.column()).collect();
    let hourly = key == GroupKey::Hour || key2 == GroupKey::Hour;
    let (source, time) = source_and_conditions(sel, &columns, hourly);
    let mut q = Sql::new(&format!(
        "SELECT ?fields FROM (SELECT {} AS key, toString({}) AS key2, sum(events) AS events, \
         sum(unpriced_events) AS unpriced_events, sum(input_tokens) AS input_tokens, \
         sum(cache_read_tokens) AS cache_read_tokens, sum(cache_write_tokens) AS cache_write_tokens, \
         sum(output_tokens) AS output_tokens, sum(reasoning_tokens) AS reasoning_tokens, \
         sum(cost) AS cost_usd FROM ",
        to_string(&key.expr(time)),
        key2.expr(time)
    ));
    q.append(source);
    q.push(match order {
        Order::Key => " GROUP BY key, key2 HAVING events != 0 ORDER BY key",
        Order::CostDesc => " GROUP BY key, key2 HAVING events != 0 ORDER BY sum(cost) DESC",
    });
    q.bind(" LIMIT ?)", [i(limit.min(i64::MAX as usize) as i64)]);
    q
}

fn to_string(expr: &str) -> String {
    if expr.starts_with("toString(") {
        expr.to_owned()
    } else {
        format!("toString({expr})")
    }
}

impl Store {
    /// Spend and tokens of `sel` grouped by `key` (and `key2`), ordered by `order`.
    pub async fn aggregate(
        &self,
        sel: &Selection,
        key: GroupKey,
        key2: GroupKey,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Agg>, StoreError> {
        Ok(aggregate_sql(sel, key, key2, order, limit)
            .query(&self.client)
            .fetch_all()
            .await?)
    }

    /// Total spend of one scope between two instants.
    pub async fn spend_between(
        &self,
        scope: &Scope,
        start: i64,
        end: i64,
    ) -> Result<Decimal, StoreError> {
        #[derive(Row, Deserialize)]
        struct Total {
            #[serde(with = "money18")]
            total: Decimal,
        }
        let mut q =
            Sql::new("SELECT ?fields FROM (SELECT sum(cost) AS total FROM usage_hourly_model");
        q.bind(
            " WHERE hour >= toDateTime(?) AND hour < toDateTime(?)",
            [i(start), i(end)],
        );
        if let Some(inst) = scope.institution() {
            q.bind(" AND institution_id = ?", [s(inst)]);
        }
        q.push(")");
        let t: Total = q.query(&self.client).fetch_one().await?;
        Ok(t.total)
    }

    /// Spend per tag (`name=value`), most first, at most `limit`; only tags named `only`
    /// if given: from the tag rollup, or from raw events when a filter the tag rollup
    /// lacks is set.
    pub async fn tag_totals(
        &self,
        sel: &Selection,
        only: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TagTotal>, StoreError> {
        let plain =
            sel.model.is_none() && sel.key.is_none() && sel.user.is_none() && sel.tag.is_none();
        let mut q = Sql::default();
        if plain {
            q.push(
                "SELECT ?fields FROM (SELECT concat(tag_key, '=', tag_value) AS tag, sum(events) AS events, \
                 sum(cost) AS cost_usd FROM usage_tags_hourly",
            );
            q.bind(
                " WHERE hour >= toDateTime(?) AND hour < toDateTime(?)",
                [i(sel.start_ts()), i(sel.end_ts())],
            );
            if let Some(inst) = sel.scope.institution() {
                q.bind(" AND institution_id = ?", [s(inst)]);
            }
            if let Some(name) = only {
                q.bind(" AND tag_key = ?", [s(name)]);
            }
            q.bind(
                " GROUP BY tag HAVING events != 0 ORDER BY sum(cost) DESC LIMIT ?)",
                [i(limit as i64)],
            );
        } else {
            q.push(
                "SELECT ?fields FROM (SELECT concat(k, '=', v) AS tag, toInt64(sum(sign)) AS events, \
                 sum(cost * sign) AS cost_usd FROM usage_events ARRAY JOIN tag_keys AS k, tag_values AS v WHERE 1",
            )
            .append(raw_conditions(sel))
            .append(dimension_conditions(sel))
            .append(tag_condition(sel));
            if let Some(name) = only {
                q.bind(" AND k = ?", [s(name)]);
            }
            q.bind(
                " GROUP BY tag HAVING events != 0 ORDER BY sum(cost * sign) DESC LIMIT ?)",
                [i(limit as i64)],
            );
        }
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// Whether an institution has ever had usage (a page for an unknown one is a 404).
    pub async fn institution_has_usage(&self, institution: &str) -> Result<bool, StoreError> {
        let n: u64 = self
            .client
            .query("SELECT count() FROM usage_hourly_model WHERE institution_id = ?")
            .bind(institution)
            .fetch_one()
            .await?;
        Ok(n > 0)
    }

    /// Whether a user of an institution has ever had usage (a limit set for a user
    /// never seen may be a typo).
    pub async fn user_has_usage(&self, institution: &str, user: &str) -> Result<bool, StoreError> {
        let n: u64 = self
            .client
            .query(
                "SELECT count() FROM usage_daily_user_model WHERE institution_id = ? AND user_id = ?",
            )
            .bind(institution)
            .bind(user)
            .fetch_one()
            .await?;
        Ok(n > 0)
    }

    /// Institutions with usage in `[start, end)` (all time without bounds).
    pub async fn institutions_with_usage(
        &self,
        between: Option<(i64, i64)>,
    ) -> Result<Vec<String>, StoreError> {
        let mut q = Sql::new("SELECT DISTINCT institution_id FROM usage_hourly_institution");
        if let Some((start, end)) = between {
            q.bind(
                " WHERE hour >= toDateTime(?) AND hour < toDateTime(?)",
                [i(start), i(end)],
            );
        }
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// Unpriced events per (provider, model) in the selection, most first.
    pub async fn unpriced_models(&self, sel: &Selection) -> Result<Vec<UnpricedModel>, StoreError> {
        let mut q = Sql::new(
            "SELECT ?fields FROM (SELECT provider, model, sum(unpriced_events) AS events FROM ",
        );
        q.append(source_and_conditions(sel, &["provider", "model"], false).0);
        q.push(" GROUP BY provider, model HAVING events != 0 ORDER BY events DESC)");
        Ok(q.query(&self.client).fetch_all().await?)
    }
}

/// Spend of one tag.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct TagTotal {
    pub tag: String,
    pub events: i64,
    #[serde(with = "money18")]
    pub cost_usd: Decimal,
}

/// Unpriced events of one model.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct UnpricedModel {
    pub provider: String,
    pub model: String,
    pub events: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::Arg;
    use chrono::NaiveDate;

    fn sel(scope: Scope) -> Selection {
        Selection::whole(
            NaiveDate::from_ymd_opt(2026, 10, 1).unwrap(),
            NaiveDate::from_ymd_opt(2026, 10, 31).unwrap(),
            scope,
        )
    }

    #[test]
    fn values_are_bound_never_written_into_the_text() {
        let mut s1 = sel(Scope::One("uni'?fields".into()));
        s1.model = Some("a?b".into());
        s1.user = Some("x\\y".into());
        let q = aggregate_sql(&s1, GroupKey::Model, GroupKey::None, Order::CostDesc, 20);
        assert!(
            !q.text().contains("uni'") && !q.text().contains("a?b") && !q.text().contains("x\\y")
        );
        assert!(q.args().contains(&Arg::Str("uni'?fields".into())));
        assert!(q.args().contains(&Arg::Str("a?b".into())));
        // One placeholder per argument (plus `?fields`), the limit bound too.
        assert_eq!(q.text().matches('?').count() - 1, q.args().len());
        assert!(!q.text().contains("20"));
    }

    #[test]
    fn the_smallest_rollup_that_answers_is_chosen() {
        let text = |s: &Selection, k, k2| aggregate_sql(s, k, k2, Order::Key, 10).text().to_owned();
        let from = |s: &Selection, k, k2| {
            let t = text(s, k, k2);
            let table = t.split(" FROM ").nth(2).expect("inner FROM");
            table.split_whitespace().next().unwrap().to_owned()
        };
        let all = sel(Scope::All);
        let one = sel(Scope::One("u".into()));
        use GroupKey::*;
        // Whole days: daily rollups, per dimension.
        assert_eq!(from(&all, Day, Model), "usage_daily_model");
        assert_eq!(from(&all, Institution, None), "usage_daily_model");
        assert_eq!(from(&one, User, None), "usage_daily_user");
        assert_eq!(from(&all, ApiKey, None), "usage_daily_key");
        // Hours: hourly rollups.
        assert_eq!(from(&all, Hour, Model), "usage_hourly_model");
        assert_eq!(from(&one, Hour, None), "usage_hourly_model");
        // Two fine dimensions, or a fine filter on another dimension: the fine rollup
        // (institution first, also for all institutions since 0014).
        assert_eq!(from(&all, User, ApiKey), "usage_hourly_institution");
        assert_eq!(from(&one, User, ApiKey), "usage_hourly_institution");
        let mut by_user = one.clone();
        by_user.user = Some("x".into());
        assert_eq!(from(&by_user, User, None), "usage_daily_user");
        assert_eq!(from(&by_user, Day, None), "usage_daily_user");
        assert_eq!(from(&by_user, Model, None), "usage_daily_user_model");
        assert_eq!(from(&by_user, Hour, None), "usage_hourly_institution");
        let mut by_model = all.clone();
        by_model.model = Some("m".into());
        assert_eq!(from(&by_model, Day, None), "usage_daily_model");
        assert_eq!(from(&by_model, User, None), "usage_daily_user_model");
        // A daily rollup is filtered and grouped by its own time column.
        let t = text(&one, Day, None);
        assert!(
            t.contains("WHERE day >= toDateTime(?) AND day < toDateTime(?)"),
            "{t}"
        );
        assert!(t.contains("toDate(day, 'UTC')"), "{t}");
        // A tag filter: raw events.
        let mut tagged = sel(Scope::All);
        tagged.tag = Some(("project".into(), "x".into()));
        let t = text(&tagged, Model, None);
        assert!(t.contains("FROM usage_events") && t.contains("arrayExists"));
        assert_eq!(
            RAW_AS_ROLLUP.matches("sign").count(),
            8,
            "every sum is weighed by sign"
        );
    }
}
