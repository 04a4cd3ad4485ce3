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
    let billed = async {
        match &sel.scope {
            Scope::One(inst) => Some(as_billed_or_why(&state, inst).await),
            Scope::All => None,
        }
    };
    let (sums, billed) = tokio::join!(
        async {
            tokio::try_join!(
                store.aggregate(&sel, GroupKey::Day, GroupKey::None, Order::Key, 100_000),
                store.aggregate(&sel, GroupKey::Model, GroupKey::None, Order::CostDesc, 20),
                store.spend_between(&sel.scope, ts(month_start(today)), ts(next_month(today))),
                store.spend_between(&sel.scope, ts(month_start(last)), ts(month_start(today))),
            )
        },
        billed,
    );
    let (by_day, by_model, this_month, last_month) = sums?;

    let mut page = PageData::about(
        match &sel.scope {
            Scope::All => "Overview".to_owned(),
            Scope::One(i) => match state
                .cfg
                .institution(i)
                .map(|c| c.name.as_str())
                .filter(|n| !n.is_empty())
            {
                Some(name) => format!("Overview — {name} ({i})"),
                None => format!("Overview — {i}"),
            },
        },
        &sel,
    );
    let total: Decimal = by_day.iter().map(Agg::cost).sum();
    page.figure(
        format!("Spend {} – {}", sel.from, sel.to),
        Cell::Money(total.normalize()),
    );
    page.figure("Requests", Cell::Int(by_day.iter().map(|a| a.events).sum()));
    page.figure(
        "Unpriced requests",
        Cell::Int(by_day.iter().map(|a| a.unpriced_events).sum()),
    );
    page.figure("Spend this month", Cell::Money(this_month));
    page.figure("Spend last month", Cell::Money(last_month));
    if scoped.principal.sees_pipeline() {
        let rejected = store.rejected_since(ts(today)).await?;
        page.figure("Rejected events today", Cell::Int(rejected as i64));
    }
    if let Some(billed) = billed {
        push_billed(&mut page, billed);
    }
    page.notes.push(
        "Spend figures are list prices, by UTC day. \"As billed\" applies the institution's contract in its billing month (its time zone), exactly as its invoice does."
            .into(),
    );
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

/// One "as billed" figure: its label, amount, and the invoice it comes from (number,
/// document) if issued.
pub(super) type BilledFigure = (String, Decimal, Option<(String, String)>);

/// "As billed" for one institution, or why it cannot be shown: billing figures need the
/// invoice ledger; when it cannot be read (a document is missing, ClickHouse refuses),
/// spend still renders and the page says what is wrong.
pub(super) async fn as_billed_or_why(
    state: &AppState,
    inst: &str,
) -> Result<Vec<BilledFigure>, String> {
    match as_billed(state, inst).await {
        Ok(b) => Ok(b),
        Err(AppError::Conflict(why)) => Err(why),
        Err(e) => {
            tracing::warn!(error = %e, "as-billed figures unavailable");
            Err(
                "the invoice ledger could not be read just now; spend figures are unaffected"
                    .into(),
            )
        }
    }
}

/// Adds the "as billed" figures (the invoice number links to its document), or a note
/// saying why they are missing.
pub(super) fn push_billed(page: &mut PageData, billed: Result<Vec<BilledFigure>, String>) {
    match billed {
        Ok(figures) => {
            for (label, amount, link) in figures {
                page.figure_linked(label, Cell::Money(amount), link);
            }
        }
        Err(why) => page.notes.push(format!(
            "\"As billed\" is not shown: {why} (the pipeline page and `tokentally ledger` show the ledger's state and how to restore it)."
        )),
    }
}

/// "As billed": last billing month and this one, with the contract, in the institution's
/// time zone — the issued invoice's total where there is one, else the live draft's (both
/// at once).
async fn as_billed(state: &AppState, inst: &str) -> Result<Vec<BilledFigure>, AppError> {
    use crate::billing::issue::Billing;
    use crate::billing::{Customer, Period};
    let c = Customer::resolve(&state.cfg, inst);
    let this = Period::of(Utc::now().with_timezone(&c.tz).date_naive());
    let book = state.book.current();
    let billing = Billing::new(&state.cfg, &state.store, &book);
    let ledger = state.ledger.current(&state.writer).await?;
    let contract = if c.contract_percent.is_zero() {
        "list prices".to_owned()
    } else {
        format!("contract {:+}%", c.contract_percent.normalize())
    };
    let figure = |label: &'static str, period: Period| {
        let (billing, ledger, contract, tz) = (&billing, &ledger, &contract, c.tz.name());
        async move {
            let (total, source, link) = match ledger.live_invoice(inst, period) {
                Some(d) => {
                    let href = crate::web::invoices::href(inst, &d.number, "pdf");
                    (
                        d.total,
                        format!("invoice {}", d.number),
                        Some((d.number.clone(), href)),
                    )
                }
                None => {
                    let d = billing.draft(ledger, inst, period).await?;
                    (d.total, "draft".to_owned(), None)
                }
            };
            Ok::<_, AppError>((
                format!("{label} ({period}, {tz}, {contract}; {source})"),
                total,
                link,
            ))
        }
    };
    let (last, now) = tokio::try_join!(
        figure("Last month as billed", this.prev()),
        figure("This month so far as billed", this),
    )?;
    Ok(vec![last, now])
}
