//! `/models`: spend and tokens by model and token class, and the price entries in effect.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::Uri;
use axum::response::Response;
use rust_decimal::Decimal;

use crate::store::usage::{Agg, GroupKey, Order};
use crate::web::auth::Scoped;
use crate::web::chart::{Chart, Kind, Series};
use crate::web::error::AppError;
use crate::web::page::{respond, Cell, PageData, Table};
use crate::web::query::{selection, Filters};
use crate::web::views::agg_table;
use crate::web::AppState;

pub async fn models(
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
            GroupKey::Model,
            GroupKey::Provider,
            Order::CostDesc,
            1000,
        )
        .await?;
    let mut page = PageData::about("Models", &sel);
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
    let book = state.book.current();
    for a in &rows {
        let Some(e) = book.lookup(&a.key2, &a.key, "", sel.to) else {
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
            book.version()
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
