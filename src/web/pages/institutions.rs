//! `/institutions` (spend per institution) and `/institutions/{id}` (one institution:
//! over time by model, users, keys, groups, tags, budget burn-down).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::Uri;
use axum::response::Response;
use chrono::Utc;
use rust_decimal::Decimal;

use crate::contract::GROUP_TAG;
use crate::domain::{Scope, Selection};
use crate::store::usage::{Agg, GroupKey, Order, TagTotal};
use crate::web::auth::Scoped;
use crate::web::chart::{Chart, Kind, Series};
use crate::web::error::AppError;
use crate::web::page::{respond, Cell, PageData, Table};
use crate::web::query::{selection, Filters};
use crate::web::views::{
    agg_table, burn_down, daily, hour_labels, institution_link, month_start, next_month,
    series_by_model,
};
use crate::web::AppState;

pub async fn list(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = selection(&filters, scoped.scope.clone(), state.cfg.web.max_range_days)?;
    let rows = state
        .store
        .aggregate(
            &sel,
            GroupKey::Institution,
            GroupKey::None,
            Order::CostDesc,
            10_000,
        )
        .await?;
    let mut page = PageData::about("Institutions", &sel);
    page.figure("Institutions with usage", Cell::Int(rows.len() as i64));
    page.tables.push(agg_table(
        "institutions",
        "Spend per institution",
        "institution_id",
        &rows,
        |a| Some(institution_link(&filters, &a.key)),
    ));
    respond(
        &page,
        &filters,
        uri.path(),
        &scoped.principal,
        &scoped.csrf,
        &state,
    )
    .await
}

/// How many users and keys the institution page lists (the rest by filtering).
const TOP: usize = 20;

pub async fn one(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Path(inst): Path<String>,
    Query(mut filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = selection(&filters, scoped.scope.clone(), state.cfg.web.max_range_days)?;
    debug_assert_eq!(sel.scope, Scope::One(inst.clone()));
    // The picker shows the institution this page is about.
    filters.institution = inst.clone();
    let store = &state.store;
    let config = state.cfg.institution(&inst);
    let hourly = (sel.to - sel.from).num_days() < 3;
    let time_key = if hourly {
        GroupKey::Hour
    } else {
        GroupKey::Day
    };
    // Independent queries, run concurrently: the page costs the slowest, not the sum.
    let (sums, billed) = tokio::join!(
        async {
            tokio::try_join!(
                store.aggregate(&sel, GroupKey::Model, GroupKey::None, Order::CostDesc, 100),
                store.aggregate(&sel, GroupKey::User, GroupKey::None, Order::CostDesc, TOP),
                store.aggregate(&sel, GroupKey::ApiKey, GroupKey::None, Order::CostDesc, TOP),
                store.aggregate(&sel, time_key, GroupKey::Model, Order::Key, 1_000_000),
                store.tag_totals(&sel, None, 20),
                store.tag_totals(&sel, Some(GROUP_TAG), 100),
            )
        },
        super::overview::as_billed_or_why(&state, &inst),
    );
    let (by_model, users, keys, series_rows, tags, groups) = sums?;
    if config.is_none() && by_model.is_empty() && !store.institution_has_usage(&inst).await? {
        return Err(AppError::NotFound);
    }

    let mut page = PageData::about(
        match config.map(|c| c.name.as_str()).filter(|n| !n.is_empty()) {
            Some(name) => format!("{name} ({inst})"),
            None => format!("Institution {inst}"),
        },
        &sel,
    );
    let total: Decimal = by_model.iter().map(Agg::cost).sum();
    page.figure(
        format!("Spend {} – {}", sel.from, sel.to),
        Cell::Money(total.normalize()),
    );
    page.figure(
        "Requests",
        Cell::Int(by_model.iter().map(|a| a.events).sum()),
    );
    page.figure(
        "Unpriced requests",
        Cell::Int(by_model.iter().map(|a| a.unpriced_events).sum()),
    );
    // Where finance lands: the contract's figures beside the list prices.
    super::overview::push_billed(&mut page, billed);

    // Over time, by model (top 6 models by spend; the rest as "other").
    let top: Vec<&str> = by_model.iter().take(6).map(|a| a.key.as_str()).collect();
    let labels: Vec<String> = if hourly {
        hour_labels(&sel)
    } else {
        sel.days().iter().map(|d| d.to_string()).collect()
    };
    page.charts.push(Chart {
        title: format!(
            "Spend per {} by model (USD)",
            if hourly { "hour" } else { "day" }
        ),
        kind: Kind::Line,
        series: series_by_model(&labels, &top, &series_rows),
        labels,
    });

    // Budget burn-down for the month the view ends in (so far, if it is this month): one
    // period per view. The budget is the institution's: a view narrowed to a user, key,
    // model or tag does not put it beside that part's spend.
    let today = Utc::now().date_naive();
    let narrowed = [&filters.user, &filters.key, &filters.model, &filters.tag]
        .iter()
        .any(|f| !f.trim().is_empty());
    let budget = config.and_then(|c| c.monthly_budget_usd);
    if let (Some(_), true) = (budget, narrowed) {
        page.notes.push(
            "The monthly budget is the whole institution's: clear the user, key, model and tag filters to see it."
                .into(),
        );
    }
    if let Some(budget) = budget.filter(|_| !narrowed) {
        let month = month_start(sel.to.min(today));
        let current = month == month_start(today);
        let as_of = if current {
            today
        } else {
            next_month(month) - chrono::Duration::days(1)
        };
        let name = month.format("%B %Y").to_string();
        let whole = Selection::whole(month, as_of, Scope::One(inst.clone()));
        let days = store
            .aggregate(&whole, GroupKey::Day, GroupKey::None, Order::Key, 100)
            .await?;
        let (labels, daily_values) = daily(&whole, &days);
        let b = burn_down(budget, as_of, labels, &daily_values);
        page.figure("Monthly budget", Cell::Money(budget));
        page.figure(
            format!("Budget used {name}"),
            Cell::Text(b.used_percent.clone()),
        );
        page.figure(format!("Budget remaining {name}"), Cell::Money(b.remaining));
        if current {
            page.figure("Projected month-end spend", Cell::Money(b.projected));
        } else {
            page.figure(format!("Spend {name}"), Cell::Money(b.used));
        }
        page.charts.push(Chart {
            title: format!("Budget burn-down {name} (cumulative USD)"),
            kind: Kind::Line,
            series: vec![
                Series {
                    name: "spent".into(),
                    values: b.cumulative,
                },
                Series {
                    name: "budget".into(),
                    values: vec![budget; b.labels.len()],
                },
            ],
            labels: b.labels,
        });
    } else if budget.is_none() {
        page.notes.push("No monthly budget is configured for this institution ([[institutions]] in the config).".into());
    }
    page.tables
        .push(agg_table("models", "By model", "model", &by_model, |_| {
            None
        }));
    // Each user and key opens this page narrowed to it (the other filters kept).
    page.tables.push(agg_table(
        "users",
        &format!("Top {TOP} users by spend"),
        "user_id",
        &users,
        |a| {
            let f = Filters {
                user: a.key.clone(),
                ..filters.clone()
            };
            Some(institution_link(&f, &inst))
        },
    ));
    page.tables.push(agg_table(
        "keys",
        &format!("Top {TOP} API keys by spend"),
        "api_key_id",
        &keys,
        |a| {
            let f = Filters {
                key: a.key.clone(),
                ..filters.clone()
            };
            Some(institution_link(&f, &inst))
        },
    ));
    page.tables.push(groups_table(&filters, &inst, &groups));
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
                    Cell::Money(t.cost_usd),
                ]
            })
            .collect(),
    });
    respond(
        &page,
        &filters,
        uri.path(),
        &scoped.principal,
        &scoped.csrf,
        &state,
    )
    .await
}

/// Spend by group (the `group` tag the gateway puts on a member's requests: the group at
/// the time of the request); each row filters the page to that group.
fn groups_table(filters: &Filters, inst: &str, groups: &[TagTotal]) -> Table {
    let prefix = format!("{GROUP_TAG}=");
    Table {
        name: "groups",
        title: "By group (members' requests)".into(),
        columns: vec!["group", "events", "cost_usd"],
        rows: groups
            .iter()
            .filter_map(|t| {
                let group = t.tag.strip_prefix(&prefix)?;
                let href = institution_link(
                    &Filters {
                        tag: t.tag.clone(),
                        ..filters.clone()
                    },
                    inst,
                );
                Some(vec![
                    Cell::Link {
                        text: group.to_owned(),
                        href,
                    },
                    Cell::Int(t.events),
                    Cell::Money(t.cost_usd),
                ])
            })
            .collect(),
    }
}
