//! Page handlers. Each builds a `PageData` from the rollup under the request's scope;
//! `page::respond` renders it as HTML, CSV or JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::Uri;
use axum::response::Response;
use chrono::{Datelike, Duration, NaiveDate, Utc};
use clickhouse::Row;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::auth::{Authed, Scope, Scoped};
use super::chart::{Chart, Kind, Series};
use super::error::AppError;
use super::page::{respond, Cell, PageData, Table};
use super::query::{aggregate, spend_between, Agg, Filters, Selection};
use super::AppState;
use crate::store::sql_str;

fn month_start(d: NaiveDate) -> NaiveDate {
    d.with_day(1).expect("day 1")
}

fn ts(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp()
}

fn next_month(d: NaiveDate) -> NaiveDate {
    let m = month_start(d);
    (m + Duration::days(32)).with_day(1).expect("day 1")
}

const TOKEN_COLUMNS: [&str; 8] = [
    "events",
    "unpriced_events",
    "input_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
];

fn metric_cells(a: &Agg) -> Vec<Cell> {
    vec![
        Cell::Int(a.events),
        Cell::Int(a.unpriced_events),
        Cell::Int(a.input_tokens),
        Cell::Int(a.cache_read_tokens),
        Cell::Int(a.cache_write_tokens),
        Cell::Int(a.output_tokens),
        Cell::Int(a.reasoning_tokens),
        Cell::Money(a.cost()),
    ]
}

/// A table: one key column (optionally linked) plus all metrics.
fn agg_table(
    name: &'static str,
    title: &str,
    key: &'static str,
    rows: &[Agg],
    link: impl Fn(&Agg) -> Option<String>,
) -> Table {
    let mut columns = vec![key];
    columns.extend(TOKEN_COLUMNS);
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

fn inst_link(f: &Filters, inst: &str) -> String {
    let q = super::page::query_string(
        &Filters {
            institution: String::new(),
            ..f.clone()
        },
        &[],
    );
    format!("/institutions/{}?{q}", crate::format::urlencode(inst))
}

/// Daily spend series over the whole range (days without spend are 0).
fn daily(sel: &Selection, rows: &[Agg]) -> (Vec<String>, Vec<Decimal>) {
    let by_day: BTreeMap<&str, Decimal> = rows.iter().map(|a| (a.key.as_str(), a.cost())).collect();
    let days = sel.days();
    let labels: Vec<String> = days.iter().map(|d| d.to_string()).collect();
    let values = labels
        .iter()
        .map(|l| by_day.get(l.as_str()).copied().unwrap_or_default())
        .collect();
    (labels, values)
}

pub async fn overview(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = Selection::new_capped(&filters, scoped.scope.clone(), state.cfg.web.max_range_days)?;
    let store = &state.store;
    let today = Utc::now().date_naive();
    let last = month_start(today) - Duration::days(1);
    let (by_day, by_model, this_month, last_month) = tokio::try_join!(
        aggregate(store, &sel, "toDate(hour)", "''", "key", 100_000),
        aggregate(store, &sel, "model", "''", "sum(cost) DESC", 20),
        spend_between(
            store,
            &sel.scope,
            ts(month_start(today)),
            ts(next_month(today))
        ),
        spend_between(
            store,
            &sel.scope,
            ts(month_start(last)),
            ts(month_start(today))
        ),
    )?;

    let mut page = PageData::new(match &sel.scope {
        Scope::All => "Overview".to_owned(),
        Scope::One(i) => format!("Overview — {i}"),
    });
    let total: Decimal = by_day.iter().map(Agg::cost).sum();
    page.figure(
        format!("Spend {} – {}", sel.from, sel.to),
        Cell::Money(total.normalize()),
    );
    page.figure("Events", Cell::Int(by_day.iter().map(|a| a.events).sum()));
    page.figure(
        "Unpriced events",
        Cell::Int(by_day.iter().map(|a| a.unpriced_events).sum()),
    );
    page.figure("Spend this month", Cell::Money(this_month));
    page.figure("Spend last month", Cell::Money(last_month));
    if scoped.principal.sees_pipeline() {
        let rejected: u64 = store
            .client()
            .query(&format!(
                "SELECT count() FROM rejected_events WHERE received_at >= toDateTime({})",
                ts(today)
            ))
            .fetch_one()
            .await?;
        page.figure("Rejected events today", Cell::Int(rejected as i64));
    }
    let (labels, values) = daily(&sel, &by_day);
    page.charts.push(Chart {
        title: "Spend by day (USD)".into(),
        kind: Kind::Line,
        labels,
        series: vec![Series {
            name: "spend".into(),
            values,
        }],
    });
    if sel.scope == Scope::All {
        let by_inst = aggregate(store, &sel, "institution_id", "''", "sum(cost) DESC", 20).await?;
        page.tables.push(agg_table(
            "institutions",
            "Top institutions",
            "institution_id",
            &by_inst,
            |a| Some(inst_link(&filters, &a.key)),
        ));
    }
    page.tables.push(agg_table(
        "models",
        "Top models",
        "model",
        &by_model,
        |_| None,
    ));
    page.tables
        .push(agg_table("days", "Spend by day", "day", &by_day, |_| None));
    respond(&page, &filters, uri.path(), &scoped.principal, &scoped.csrf)
}

pub async fn institutions(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = Selection::new_capped(&filters, scoped.scope.clone(), state.cfg.web.max_range_days)?;
    let rows = aggregate(
        &state.store,
        &sel,
        "institution_id",
        "''",
        "sum(cost) DESC",
        10_000,
    )
    .await?;
    let mut page = PageData::new("Institutions");
    page.figure("Institutions with usage", Cell::Int(rows.len() as i64));
    page.tables.push(agg_table(
        "institutions",
        "Spend per institution",
        "institution_id",
        &rows,
        |a| Some(inst_link(&filters, &a.key)),
    ));
    respond(&page, &filters, uri.path(), &scoped.principal, &scoped.csrf)
}

#[derive(Row, Deserialize)]
struct TagRow {
    tag: String,
    events: i64,
    cost_usd: String,
}

pub async fn institution(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Path(inst): Path<String>,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = Selection::new_capped(&filters, scoped.scope.clone(), state.cfg.web.max_range_days)?;
    debug_assert_eq!(sel.scope, Scope::One(inst.clone()));
    let store = &state.store;
    let config = state.cfg.institutions.iter().find(|i| i.id == inst);
    let hourly = (sel.to - sel.from).num_days() < 3;
    let time_key = if hourly { "hour" } else { "toDate(hour)" };
    // Tags come from their own rollup, unless a filter the tag rollup lacks is set.
    let tags_sql = if sel.model.is_none()
        && sel.key.is_none()
        && sel.user.is_none()
        && sel.tag.is_none()
    {
        format!(
            "SELECT concat(tag_key, '=', tag_value) AS tag, sum(events) AS events, toString(sum(cost)) AS cost_usd \
             FROM usage_tags_hourly WHERE {} GROUP BY tag HAVING events != 0 ORDER BY sum(cost) DESC LIMIT 20",
            sel.conditions()
        )
    } else {
        format!(
            "SELECT concat(k, '=', v) AS tag, toInt64(sum(sign)) AS events, toString(sum(cost * sign)) AS cost_usd \
             FROM usage_events ARRAY JOIN tag_keys AS k, tag_values AS v WHERE 1 {}{} GROUP BY tag \
             HAVING events != 0 ORDER BY sum(cost * sign) DESC LIMIT 20",
            sel.raw_conditions(),
            sel.raw_filters()
        )
    };
    // Independent queries, run concurrently: the page costs the slowest, not the sum.
    let (by_model, users, keys, series_rows, tags) = tokio::try_join!(
        aggregate(store, &sel, "model", "''", "sum(cost) DESC", 100),
        aggregate(store, &sel, "user_id", "''", "sum(cost) DESC", 20),
        aggregate(store, &sel, "api_key_id", "''", "sum(cost) DESC", 20),
        aggregate(store, &sel, time_key, "model", "key", 1_000_000),
        async {
            store
                .client()
                .query(&tags_sql)
                .fetch_all::<TagRow>()
                .await
                .map_err(AppError::from)
        },
    )?;
    if config.is_none() && by_model.is_empty() {
        let any: u64 = store
            .client()
            .query(&format!(
                "SELECT count() FROM usage_hourly_model WHERE institution_id = {}",
                sql_str(&inst)
            ))
            .fetch_one()
            .await?;
        if any == 0 {
            return Err(AppError::NotFound);
        }
    }

    let mut page = PageData::new(
        match config.map(|c| c.name.as_str()).filter(|n| !n.is_empty()) {
            Some(name) => format!("{name} ({inst})"),
            None => format!("Institution {inst}"),
        },
    );
    let total: Decimal = by_model.iter().map(Agg::cost).sum();
    page.figure(
        format!("Spend {} – {}", sel.from, sel.to),
        Cell::Money(total.normalize()),
    );
    page.figure("Events", Cell::Int(by_model.iter().map(|a| a.events).sum()));
    page.figure(
        "Unpriced events",
        Cell::Int(by_model.iter().map(|a| a.unpriced_events).sum()),
    );

    // Over time, by model (top 6 models by spend; the rest as "other").
    let top: Vec<&str> = by_model.iter().take(6).map(|a| a.key.as_str()).collect();
    let labels: Vec<String> = if hourly {
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
    } else {
        sel.days().iter().map(|d| d.to_string()).collect()
    };
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
    for a in &series_rows {
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
    page.charts.push(Chart {
        title: format!(
            "Spend per {} by model (USD)",
            if hourly { "hour" } else { "day" }
        ),
        kind: Kind::Line,
        labels: labels.clone(),
        series,
    });

    // Budget burn-down for the current month.
    let today = Utc::now().date_naive();
    if let Some(budget) = config.and_then(|c| c.monthly_budget_usd) {
        let month = Selection {
            from: month_start(today),
            to: today,
            scope: Scope::One(inst.clone()),
            model: None,
            key: None,
            user: None,
            tag: None,
        };
        let days = aggregate(store, &month, "toDate(hour)", "''", "key", 100).await?;
        let (labels, daily_values) = daily(&month, &days);
        let mut cum = Decimal::ZERO;
        let cumulative: Vec<Decimal> = daily_values
            .iter()
            .map(|v| {
                cum += v;
                cum
            })
            .collect();
        let used = cum;
        page.figure("Monthly budget", Cell::Money(budget));
        page.figure(
            "Budget used this month",
            Cell::Text(if budget.is_zero() {
                "-".into()
            } else {
                format!("{}%", (used * Decimal::from(100) / budget).round_dp(1))
            }),
        );
        page.figure("Budget remaining", Cell::Money((budget - used).normalize()));
        let days_in_month = (next_month(today) - month_start(today)).num_days();
        let projected = used * Decimal::from(days_in_month) / Decimal::from(today.day());
        page.figure(
            "Projected month-end spend",
            Cell::Money(projected.round_dp(2)),
        );
        page.charts.push(Chart {
            title: "Budget burn-down this month (cumulative USD)".into(),
            kind: Kind::Line,
            labels: labels.clone(),
            series: vec![
                Series {
                    name: "spent".into(),
                    values: cumulative,
                },
                Series {
                    name: "budget".into(),
                    values: vec![budget; labels.len()],
                },
            ],
        });
    } else {
        page.notes.push("No monthly budget is configured for this institution ([[institutions]] in the config).".into());
    }
    page.tables
        .push(agg_table("models", "By model", "model", &by_model, |_| {
            None
        }));
    page.tables
        .push(agg_table("users", "Top users", "user_id", &users, |_| None));
    page.tables.push(agg_table(
        "keys",
        "Top API keys",
        "api_key_id",
        &keys,
        |_| None,
    ));
    page.tables.push(Table {
        name: "tags",
        title: "Tags".into(),
        columns: vec!["tag", "events", "cost_usd"],
        rows: tags
            .iter()
            .map(|t| {
                vec![
                    Cell::Text(t.tag.clone()),
                    Cell::Int(t.events),
                    Cell::Money(
                        t.cost_usd
                            .parse::<Decimal>()
                            .unwrap_or_default()
                            .normalize(),
                    ),
                ]
            })
            .collect(),
    });
    respond(&page, &filters, uri.path(), &scoped.principal, &scoped.csrf)
}

pub async fn models(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = Selection::new_capped(&filters, scoped.scope.clone(), state.cfg.web.max_range_days)?;
    let rows = aggregate(
        &state.store,
        &sel,
        "model",
        "provider",
        "sum(cost) DESC",
        1000,
    )
    .await?;
    let mut page = PageData::new("Models");
    page.figure("Models used", Cell::Int(rows.len() as i64));
    page.figure(
        "Spend",
        Cell::Money(rows.iter().map(Agg::cost).sum::<Decimal>().normalize()),
    );
    let top: Vec<&Agg> = rows.iter().take(15).collect();
    page.charts.push(Chart {
        title: "Spend by model (USD)".into(),
        kind: Kind::Bar,
        labels: top.iter().map(|a| a.key.clone()).collect(),
        series: vec![Series {
            name: "spend".into(),
            values: top.iter().map(|a| a.cost()).collect(),
        }],
    });
    let mut t = agg_table(
        "models",
        "Spend and tokens by model and token class",
        "model",
        &rows,
        |_| None,
    );
    t.columns.insert(1, "provider");
    for (r, a) in t.rows.iter_mut().zip(&rows) {
        r.insert(1, Cell::Text(a.key2.clone()));
    }
    page.tables.push(t);
    // The entries that price these models on the last day of the range.
    let mut seen = BTreeSet::new();
    let mut prices = Vec::new();
    for a in &rows {
        let Some(e) = state.book.lookup(&a.key2, &a.key, "", sel.to) else {
            continue;
        };
        if !seen.insert(e.id.clone()) {
            continue;
        }
        let rate = |d: Option<Decimal>| {
            d.map_or(Cell::Text("-".into()), |d| {
                Cell::Text(d.normalize().to_string())
            })
        };
        prices.push(vec![
            Cell::Text(e.id.clone()),
            Cell::Text(e.model.clone()),
            Cell::Text(e.effective_from.to_string()),
            rate(Some(e.rates.input_per_mtok)),
            rate(Some(e.rates.cache_read_per_mtok)),
            rate(Some(e.rates.cache_write_per_mtok)),
            rate(Some(e.rates.output_per_mtok)),
            rate(e.rates.reasoning_per_mtok),
            Cell::Text(e.per_request.normalize().to_string()),
            Cell::Text(
                e.tiers
                    .iter()
                    .map(|t| format!(">{}", t.above_input_tokens))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ]);
    }
    page.tables.push(Table {
        name: "prices",
        title: format!(
            "Price entries in effect on {} (USD per 1M tokens; price book {})",
            sel.to,
            state.book.version()
        ),
        columns: vec![
            "price_id",
            "model",
            "effective_from",
            "input",
            "cache_read",
            "cache_write",
            "output",
            "reasoning",
            "per_request",
            "long_context_tiers",
        ],
        rows: prices,
    });
    respond(&page, &filters, uri.path(), &scoped.principal, &scoped.csrf)
}

#[derive(Row, Deserialize)]
struct ReasonRow {
    reason: String,
    n: u64,
}

#[derive(Row, Deserialize)]
struct RejectedRow {
    received_at: u32,
    kafka_partition: i32,
    kafka_offset: i64,
    reason: String,
    detail: String,
}

#[derive(Row, Deserialize)]
struct UnpricedRow {
    provider: String,
    model: String,
    events: i64,
}

pub async fn pipeline(
    State(state): State<Arc<AppState>>,
    authed: Authed,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    if !authed.principal.sees_pipeline() {
        return Err(AppError::Forbidden);
    }
    let sel = Selection::new_capped(&filters, Scope::All, state.cfg.web.max_range_days)?;
    let store = &state.store;
    let range = format!(
        "received_at >= toDateTime({}) AND received_at < toDateTime({})",
        sel.start_ts(),
        sel.end_ts()
    );
    let reasons: Vec<ReasonRow> = store.client().query(&format!("SELECT reason, count() AS n FROM rejected_events WHERE {range} GROUP BY reason ORDER BY n DESC")).fetch_all().await?;
    let recent: Vec<RejectedRow> = store
        .client()
        .query(&format!("SELECT received_at, kafka_partition, kafka_offset, reason, detail FROM rejected_events WHERE {range} ORDER BY received_at DESC, kafka_offset DESC LIMIT 50"))
        .fetch_all()
        .await?;
    let unpriced: Vec<UnpricedRow> = store
        .client()
        .query(&format!("SELECT provider, model, sum(unpriced_events) AS events FROM {} WHERE {} GROUP BY provider, model HAVING events != 0 ORDER BY events DESC", sel.source(&["provider", "model"]), sel.conditions()))
        .fetch_all()
        .await?;
    let rate: f64 = store
        .client()
        .query("SELECT toFloat64(countIf(ingested_at >= now() - 300)) / 300 FROM usage_events WHERE version = 0 AND sign = 1 AND ingested_at >= now() - 300")
        .fetch_one()
        .await?;
    let lag = crate::kafka::consumer_lag(
        &state.cfg.kafka,
        &state.cfg.kafka.topic,
        &state.cfg.kafka.group,
    )
    .await;

    let instances = state
        .store
        .ingest_instances(
            &state.cfg.kafka.topic,
            &state.cfg.kafka.group,
            (Utc::now() - Duration::days(1)).timestamp(),
        )
        .await?;
    let mut page = PageData::new("Pipeline health");
    page.figure(
        "Events/s stored (last 5 min)",
        Cell::Text(format!("{rate:.1}")),
    );
    page.figure(
        "Rejected in range",
        Cell::Int(reasons.iter().map(|r| r.n as i64).sum()),
    );
    page.figure(
        "Unpriced events in range",
        Cell::Int(unpriced.iter().map(|u| u.events).sum()),
    );
    match &lag {
        Ok(parts) => page.figure(
            "Consumer lag (messages)",
            Cell::Int(parts.iter().map(|p| p.lag).sum()),
        ),
        Err(e) => page.notes.push(format!("Consumer lag unavailable: {e}")),
    }
    page.tables.push(Table {
        name: "lag",
        title: format!(
            "Consumer lag of group {} on {}",
            state.cfg.kafka.group, state.cfg.kafka.topic
        ),
        columns: vec!["partition", "committed_offset", "end_offset", "lag"],
        rows: lag
            .unwrap_or_default()
            .iter()
            .map(|p| {
                vec![
                    Cell::Int(p.partition.into()),
                    Cell::Int(p.committed),
                    Cell::Int(p.high),
                    Cell::Int(p.lag),
                ]
            })
            .collect(),
    });
    let when = |t: u32| {
        chrono::DateTime::from_timestamp(i64::from(t), 0)
            .filter(|_| t > 0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into())
    };
    for i in instances.iter().filter(|i| i.state != "stopped") {
        if i.price_book_version != state.book.version() {
            page.notes.push(format!(
                "Ingest instance {} prices with price book {}, the dashboard reads {}: one of them has not reloaded a change yet (ingest checks every 10 s).",
                i.instance_id, i.price_book_version, state.book.version()
            ));
        }
    }
    page.tables.push(Table {
        name: "instances",
        title: "Ingest instances heard from in the last day (UTC)".into(),
        columns: vec![
            "instance",
            "host",
            "pid",
            "state",
            "partitions",
            "last_commit",
            "last_heard",
            "lag",
            "price_book",
            "detail",
        ],
        rows: instances
            .iter()
            .map(|i| {
                vec![
                    Cell::Text(i.instance_id.clone()),
                    Cell::Text(i.host.clone()),
                    Cell::Int(i.pid.into()),
                    Cell::Text(i.state.clone()),
                    Cell::Text(
                        i.partitions
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    Cell::Text(when(i.last_commit_at)),
                    Cell::Text(when(i.at)),
                    Cell::Int(i.lag),
                    Cell::Text(i.price_book_version.clone()),
                    Cell::Text(i.detail.clone()),
                ]
            })
            .collect(),
    });
    page.tables.push(Table {
        name: "rejected_reasons",
        title: "Rejected events by reason".into(),
        columns: vec!["reason", "events"],
        rows: reasons
            .iter()
            .map(|r| vec![Cell::Text(r.reason.clone()), Cell::Int(r.n as i64)])
            .collect(),
    });
    page.tables.push(Table {
        name: "rejected_recent",
        title: "Latest rejected events".into(),
        columns: vec!["received_at", "partition", "offset", "reason", "detail"],
        rows: recent
            .iter()
            .map(|r| {
                vec![
                    Cell::Text(
                        chrono::DateTime::from_timestamp(r.received_at.into(), 0)
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default(),
                    ),
                    Cell::Int(r.kafka_partition.into()),
                    Cell::Link {
                        text: r.kafka_offset.to_string(),
                        href: format!(
                            "/pipeline/rejected/{}/{}",
                            r.kafka_partition, r.kafka_offset
                        ),
                    },
                    Cell::Text(r.reason.clone()),
                    Cell::Text(r.detail.clone()),
                ]
            })
            .collect(),
    });
    page.tables.push(Table {
        name: "unpriced_models",
        title: "Unpriced models".into(),
        columns: vec!["provider", "model", "events"],
        rows: unpriced
            .iter()
            .map(|u| {
                vec![
                    Cell::Text(u.provider.clone()),
                    Cell::Text(u.model.clone()),
                    Cell::Int(u.events),
                ]
            })
            .collect(),
    });
    respond(&page, &filters, uri.path(), &authed.principal, &authed.csrf)
}

#[derive(Row, Deserialize)]
struct Payload {
    reason: String,
    detail: String,
    payload: Vec<u8>,
}

pub async fn rejected(
    State(state): State<Arc<AppState>>,
    authed: Authed,
    Path((partition, offset)): Path<(i32, i64)>,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    if !authed.principal.sees_pipeline() {
        return Err(AppError::Forbidden);
    }
    let rows: Vec<Payload> = state
        .store
        .client()
        .query(&format!(
            "SELECT reason, detail, payload FROM rejected_events WHERE kafka_topic = {} AND kafka_partition = {partition} AND kafka_offset = {offset} LIMIT 1",
            sql_str(&state.cfg.kafka.topic)
        ))
        .fetch_all()
        .await?;
    let r = rows.into_iter().next().ok_or(AppError::NotFound)?;
    let mut page = PageData::new(format!("Rejected message {partition}:{offset}"));
    page.figure("Reason", Cell::Text(r.reason));
    page.tables.push(Table {
        name: "message",
        title: "Message".into(),
        columns: vec!["detail", "payload"],
        rows: vec![vec![
            Cell::Text(r.detail),
            Cell::Text(String::from_utf8_lossy(&r.payload).into_owned()),
        ]],
    });
    respond(&page, &filters, uri.path(), &authed.principal, &authed.csrf)
}
