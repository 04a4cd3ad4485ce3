//! Pure projections from query results to what pages show: tables of sums, daily series,
//! the per-model time series, the budget burn-down. No I/O, so each is unit-tested.

use std::collections::BTreeMap;

use chrono::{Datelike, Duration, NaiveDate};
use rust_decimal::Decimal;

use super::chart::Series;
use super::page::{Cell, Table};
use super::query::Filters;
use crate::domain::Selection;
use crate::store::usage::Agg;

pub fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).expect("day 1")
}

pub fn next_month(d: NaiveDate) -> NaiveDate {
    (month_start(d) + Duration::days(32))
        .with_day(1)
        .expect("day 1")
}

/// Midnight UTC of `d`, in unix seconds.
pub fn ts(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp()
}

pub use crate::store::usage::METRIC_COLUMNS;

fn metric_cells(a: &Agg) -> Vec<Cell> {
    vec![
        Cell::Int(a.events),
        Cell::Int(a.unpriced_events),
        Cell::Int(a.input_tokens),
        Cell::Int(a.cache_read_tokens),
        Cell::Int(a.cache_write_tokens),
        Cell::Int(a.output_tokens),
        Cell::Int(a.reasoning_tokens),
        if a.events > 0 && a.unpriced_events == a.events && a.cost().is_zero() {
            Cell::Unpriced
        } else {
            Cell::Money(a.cost())
        },
    ]
}

/// A table: one key column (optionally linked) plus all metrics.
pub fn agg_table(
    name: &'static str,
    title: &str,
    key: &'static str,
    rows: &[Agg],
    link: impl Fn(&Agg) -> Option<String>,
) -> Table {
    let mut columns = vec![key];
    columns.extend(METRIC_COLUMNS);
    Table {
        name,
        title: title.into(),
        columns,
        rows: rows
            .iter()
            .map(|a| {
                let k = match link(a) {
                    Some(href) => Cell::Link {
                        text: a.key.clone(),
                        href,
                    },
                    None => Cell::Text(a.key.clone()),
                };
                std::iter::once(k).chain(metric_cells(a)).collect()
            })
            .collect(),
    }
}

/// The institution page for `inst`, keeping the other filters.
pub fn institution_link(f: &Filters, inst: &str) -> String {
    let q = super::page::query_string(
        &Filters {
            institution: String::new(),
            ..f.clone()
        },
        &[],
    );
    format!("/institutions/{}?{q}", crate::format::urlencode(inst))
}

/// Daily spend over every day of the range (days without spend are 0).
pub fn daily(sel: &Selection, rows: &[Agg]) -> (Vec<String>, Vec<Decimal>) {
    let by_day: BTreeMap<&str, Decimal> = rows.iter().map(|a| (a.key.as_str(), a.cost())).collect();
    let labels: Vec<String> = sel.days().iter().map(|d| d.to_string()).collect();
    let values = labels
        .iter()
        .map(|l| by_day.get(l.as_str()).copied().unwrap_or_default())
        .collect();
    (labels, values)
}

/// Hour labels of the range (`YYYY-MM-DD HH:00:00`), for hourly charts.
pub fn hour_labels(sel: &Selection) -> Vec<String> {
    let mut v = Vec::new();
    let mut t = sel.start_ts();
    while t < sel.end_ts() {
        v.push(
            chrono::DateTime::from_timestamp(t, 0)
                .expect("valid")
                .format("%Y-%m-%d %H:00:00")
                .to_string(),
        );
        t += 3600;
    }
    v
}

/// Spend over time per model: one series for each of the `top` models, the rest summed as
/// "other" (shown only if it is not all zero). `rows` are (time label, model) sums.
pub fn series_by_model(labels: &[String], top: &[&str], rows: &[Agg]) -> Vec<Series> {
    let index: BTreeMap<&str, usize> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let mut series: Vec<Series> = top
        .iter()
        .map(|m| Series {
            name: (*m).to_owned(),
            values: vec![Decimal::ZERO; labels.len()],
        })
        .collect();
    let mut other = Series {
        name: "other".into(),
        values: vec![Decimal::ZERO; labels.len()],
    };
    for a in rows {
        let Some(&i) = index.get(a.key.as_str()) else {
            continue;
        };
        match top.iter().position(|m| *m == a.key2) {
            Some(s) => series[s].values[i] += a.cost(),
            None => other.values[i] += a.cost(),
        }
    }
    if other.values.iter().any(|v| !v.is_zero()) {
        series.push(other);
    }
    series
}

/// Where the month's budget stands on `today`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BurnDown {
    pub labels: Vec<String>,
    /// Spend so far, cumulative per day.
    pub cumulative: Vec<Decimal>,
    pub used: Decimal,
    /// Share of the budget used, as text (`-` for a zero budget).
    pub used_percent: String,
    pub remaining: Decimal,
    /// Spend at month end at today's average daily rate, to cents.
    pub projected: Decimal,
}

/// The burn-down of `budget` over the month of `today`, from `daily` spend (labels and
/// values of the month's days so far).
pub fn burn_down(
    budget: Decimal,
    today: NaiveDate,
    labels: Vec<String>,
    daily: &[Decimal],
) -> BurnDown {
    let mut cum = Decimal::ZERO;
    let cumulative: Vec<Decimal> = daily
        .iter()
        .map(|v| {
            cum += v;
            cum
        })
        .collect();
    let used = cum;
    let days_in_month = (next_month(today) - month_start(today)).num_days();
    BurnDown {
        labels,
        cumulative,
        used,
        used_percent: if budget.is_zero() {
            "-".into()
        } else {
            format!("{}%", (used * Decimal::from(100) / budget).round_dp(1))
        },
        remaining: (budget - used).normalize(),
        projected: (used * Decimal::from(days_in_month) / Decimal::from(today.day())).round_dp(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Scope;
    use rust_decimal_macros::dec;

    fn agg(key: &str, key2: &str, cost: Decimal) -> Agg {
        Agg {
            key: key.into(),
            key2: key2.into(),
            events: 1,
            unpriced_events: 0,
            input_tokens: 0,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            output_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: cost,
        }
    }

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 10, d).unwrap()
    }

    #[test]
    fn daily_series_fill_every_day_of_the_range() {
        let sel = Selection::whole(day(1), day(4), Scope::All);
        let (labels, values) = daily(&sel, &[agg("2026-10-02", "", dec!(1.5))]);
        assert_eq!(
            labels,
            ["2026-10-01", "2026-10-02", "2026-10-03", "2026-10-04"]
        );
        assert_eq!(values, [dec!(0), dec!(1.5), dec!(0), dec!(0)]);
        assert_eq!(
            hour_labels(&Selection::whole(day(1), day(1), Scope::All)).len(),
            24
        );
    }

    #[test]
    fn models_outside_the_top_are_summed_as_other() {
        let labels = vec!["d1".to_owned(), "d2".to_owned()];
        let rows = [
            agg("d1", "a", dec!(1)),
            agg("d2", "b", dec!(2)),
            agg("d2", "c", dec!(3)),
            agg("dX", "a", dec!(9)),
        ];
        let s = series_by_model(&labels, &["a"], &rows);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].name.as_str(), s[0].values.clone()),
            ("a", vec![dec!(1), dec!(0)])
        );
        assert_eq!(
            (s[1].name.as_str(), s[1].values.clone()),
            ("other", vec![dec!(0), dec!(5)])
        );
        // No "other" when the top covers everything.
        assert_eq!(series_by_model(&labels, &["a", "b", "c"], &rows).len(), 3);
    }

    #[test]
    fn burn_down_projects_the_month_from_the_daily_average() {
        // Oct 10th: $30 spent over 10 days of a 31-day month → $93 projected.
        let b = burn_down(dec!(100), day(10), vec!["x".into(); 10], &[dec!(3); 10]);
        assert_eq!(b.used, dec!(30));
        assert_eq!(b.cumulative.last(), Some(&dec!(30)));
        assert_eq!(b.used_percent, "30%");
        assert_eq!(b.remaining, dec!(70));
        assert_eq!(b.projected, dec!(93.00));
        assert_eq!(burn_down(dec!(0), day(10), vec![], &[]).used_percent, "-");
    }
}
