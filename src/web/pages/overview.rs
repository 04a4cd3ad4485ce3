//! `/` and `/overview`: spend in the range, this month vs last, by day, top institutions
//! and models.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::Response;
use chrono::{Duration, Utc};
use rust_decimal::Decimal;

use crate::domain::Scope;
use crate::store::usage::{Agg, GroupKey, Order};
use crate::web::auth::Scoped;
use crate::web::chart::{Chart, Kind, Series};
use crate::web::error::AppError;
use crate::web::page::{respond, Cell, PageData};
use crate::web::query::{selection, Filters};
use crate::web::views::{agg_table, daily, institution_link, month_start, next_month, ts};
use crate::web::AppState;

pub async fn overview(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Query(filters): Query<Filters>,
    uri: Uri,
) -> Result<Response, AppError> {
    let sel = selection(&filters, scoped.scope.clone(), state.cfg.web.max_range_days)?;
    let store = &state.store;
    let today = Utc::now().date_naive();
    let last = month_start(today) - Duration::days(1);
    let (by_day, by_model, this_month, last_month) = tokio::try_join!(
        store.aggregate(&sel, GroupKey::Day, GroupKey::None, Order::Key, 100_000),
        store.aggregate(&sel, GroupKey::Model, GroupKey::None, Order::CostDesc, 20),
        store.spend_between(&sel.scope, ts(month_start(today)), ts(next_month(today))),
        store.spend_between(&sel.scope, ts(month_start(last)), ts(month_start(today))),
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
        let rejected = store.rejected_since(ts(today)).await?;
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
        let by_inst = store
            .aggregate(
                &sel,
                GroupKey::Institution,
                GroupKey::None,
                Order::CostDesc,
                20,
            )
            .await?;
        page.tables.push(agg_table(
            "institutions",
            "Top institutions",
            "institution_id",
            &by_inst,
            |a| Some(institution_link(&filters, &a.key)),
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
