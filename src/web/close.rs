//! `/close`: the month-end close for finance. A matrix of institutions × the last three
//! billing months, each cell saying where it stands — open, ended and not invoiced,
//! blocked by unpriced usage (models named), issued, issued with adjustments pending —
//! with its amount as billed, totals per month, and the actions: download the draft,
//! issue one, issue every ended month that is clean. Finance and admin only; every
//! action goes through the same policy and CSRF checks as the invoices page.

use std::collections::BTreeSet;
use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::auth::{after_action, Allowed, CanIssue, CheckedForm, CsrfField, Flash, Flashed};
use super::error::AppError;
use super::AppState;
use crate::billing::issue::Billing;
use crate::billing::{Customer, Period};
use crate::format::{money, urlencode};

/// Where one institution-month stands.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The month has not ended in the institution's time zone.
    Open,
    /// Ended, usage, no invoice, nothing blocking: ready to issue.
    Ready,
    /// Ended, not invoiced, unpriced usage: issuing is refused until it is priced.
    Blocked,
    /// Ended without usage.
    NoUsage,
    /// Invoiced; the stored events and the documents agree.
    Issued,
    /// Invoiced, but events arrived since: the difference goes on the next invoice.
    AdjustmentsPending,
}

#[derive(Debug, Clone, Serialize)]
pub struct CellView {
    pub institution: String,
    pub period: String,
    pub status: Status,
    /// The invoice's total, or the draft's (as billed: contract, local month).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub invoice: Option<String>,
    /// Still to bill on the next invoice (adjustments pending).
    #[serde(with = "rust_decimal::serde::str")]
    pub pending: Decimal,
    pub unpriced_events: i64,
    pub unpriced_models: Vec<String>,
    /// What to show.
    pub text: String,
    pub draft_href: String,
    /// The issued document (PDF), for an issued month.
    pub invoice_href: Option<String>,
}

#[derive(Template)]
#[template(path = "close.html")]
struct CloseTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    periods: Vec<String>,
    /// (institution id, name, cells)
    rows: Vec<(String, String, Vec<CellView>)>,
    totals: Vec<String>,
    ready: usize,
    message: String,
    failed: bool,
}

/// The last three billing months, oldest first (UTC calendar; each cell is computed in
/// its institution's zone).
fn periods() -> Vec<Period> {
    let this = Period::of(Utc::now().date_naive());
    vec![this.prev().prev(), this.prev(), this]
}

async fn institutions(state: &AppState) -> Result<Vec<(String, String)>, AppError> {
    let mut ids: BTreeSet<String> = state
        .cfg
        .institutions
        .iter()
        .map(|i| i.id.clone())
        .collect();
    let ps = periods();
    let (from, _) = ps[0].bounds(chrono_tz::Etc::GMTMinus14);
    ids.extend(
        state
            .store
            .institutions_with_usage(Some((from.timestamp(), Utc::now().timestamp() + 86_400)))
            .await?,
    );
    Ok(ids
        .into_iter()
        .map(|id| {
            let name = state.institution_name(&id);
            (id, name)
        })
        .collect())
}

/// Every cell of the matrix.
pub async fn matrix(state: &AppState) -> Result<Vec<(String, String, Vec<CellView>)>, AppError> {
    let book = state.book.current();
    let billing = Billing::new(&state.cfg, &state.store, &book);
    let audit = crate::billing::audit::Audit::new(&state.cfg, &state.store, &book);
    let ledger = state.ledger.current(&state.writer).await?;
    let now = Utc::now();
    let mut rows = Vec::new();
    for (inst, name) in institutions(state).await? {
        let c = Customer::resolve(&state.cfg, &inst);
        let mut cells = Vec::new();
        for p in periods() {
            let ended = p.bounds(c.tz).1 <= now;
            let draft_href = format!(
                "/invoices/draft?institution={}&period={p}&format=pdf",
                urlencode(&inst)
            );
            let invoice = ledger.live_invoice(&inst, p).cloned();
            // An invoiced month: its events against its documents; otherwise its draft.
            let (status, amount, pending, unpriced, late) = match &invoice {
                Some(d) => {
                    let st = audit.standing(&ledger, &inst, p).await?;
                    let (pending, late) = (st.difference(), st.late_unpriced());
                    let status = if pending.is_zero() && late == 0 {
                        Status::Issued
                    } else {
                        Status::AdjustmentsPending
                    };
                    (status, d.total, pending, st.unpriced, late)
                }
                None => {
                    let draft = billing.draft(&ledger, &inst, p).await?;
                    let status = if !ended {
                        Status::Open
                    } else if draft.unpriced.events > 0 {
                        Status::Blocked
                    } else if draft.lines.is_empty() {
                        Status::NoUsage
                    } else {
                        Status::Ready
                    };
                    (status, draft.total, Decimal::ZERO, draft.unpriced, 0)
                }
            };
            let text = match status {
                Status::Open => format!("open · {} so far", money(amount)),
                Status::Ready => format!("ended, not invoiced · {}", money(amount)),
                Status::NoUsage => "no usage".to_owned(),
                Status::Blocked => format!(
                    "blocked · {} priced; {} request(s) of {} have no price yet — ready once ops price and reprice them, or issue it now without them",
                    money(amount),
                    unpriced.events,
                    unpriced.models.join(", ")
                ),
                Status::Issued => format!("issued · {}", money(amount)),
                Status::AdjustmentsPending => format!(
                    "issued · {}; adjustments pending {}{}",
                    money(amount),
                    money(pending),
                    if late > 0 {
                        format!(" and {late} late unpriced request(s)")
                    } else {
                        String::new()
                    }
                ),
            };
            cells.push(CellView {
                institution: inst.clone(),
                period: p.to_string(),
                status,
                amount,
                pending,
                unpriced_events: unpriced.events,
                unpriced_models: unpriced.models,
                text,
                draft_href,
                invoice_href: invoice
                    .as_ref()
                    .map(|d| super::invoices::href(&inst, &d.number, "pdf")),
                invoice: invoice.map(|d| d.number),
            });
        }
        rows.push((inst, name, cells));
    }
    Ok(rows)
}

async fn page(
    state: &AppState,
    allowed: &Allowed<CanIssue>,
    uri: &Uri,
    message: String,
    failed: bool,
) -> Result<Response, AppError> {
    let rows = matrix(state).await?;
    if uri.path().starts_with("/api/") {
        let cells: Vec<&CellView> = rows.iter().flat_map(|(_, _, c)| c.iter()).collect();
        return Ok(
            axum::Json(serde_json::json!({ "cells": cells, "message": message })).into_response(),
        );
    }
    let periods: Vec<String> = periods().iter().map(ToString::to_string).collect();
    let totals = (0..periods.len())
        .map(|i| money(rows.iter().map(|(_, _, c)| c[i].amount).sum()))
        .collect();
    let ready = rows
        .iter()
        .flat_map(|(_, _, c)| c.iter())
        .filter(|c| c.status == Status::Ready)
        .count();
    let role = allowed.principal.role.as_str().to_owned();
    let t = CloseTemplate {
        user: &allowed.principal.name,
        role: &role,
        csrf: &allowed.csrf,
        pipeline: allowed.principal.sees_pipeline(),
        periods,
        rows,
        totals,
        ready,
        message,
        failed,
    };
    Ok(Html(t.render()?).into_response())
}

/// `GET /close` (and `/api/v1/close`).
pub async fn show(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanIssue>,
    uri: Uri,
    Flashed(flash): Flashed,
) -> Result<Response, AppError> {
    let flash = flash.unwrap_or_default();
    page(&state, &allowed, &uri, flash.message, flash.failed).await
}

#[derive(Deserialize)]
pub struct IssueForm {
    /// Empty for "every ended month that is clean".
    #[serde(default)]
    institution: String,
    #[serde(default)]
    period: String,
    /// "1": issue a blocked month without its unpriced usage (listed on the invoice, not
    /// billed; billed on a later invoice once priced and repriced).
    #[serde(default)]
    allow_unpriced: String,
    #[serde(default)]
    csrf: String,
}

impl CsrfField for IssueForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /close/issue`: one institution-month (`institution`, `period`), or with both
/// empty every cell that is ended, not invoiced and not blocked.
pub async fn issue(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanIssue>,
    uri: Uri,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm<IssueForm>,
) -> Result<Response, AppError> {
    let book = state.book.current();
    let billing = Billing::new(&state.cfg, &state.writer, &book);
    let allow_unpriced = form.allow_unpriced.trim() == "1";
    let targets: Vec<(String, Period)> =
        if form.institution.trim().is_empty() && form.period.trim().is_empty() {
            matrix(&state)
                .await?
                .into_iter()
                .flat_map(|(_, _, cells)| cells)
                .filter(|c| c.status == Status::Ready)
                .filter_map(|c| Some((c.institution, c.period.parse().ok()?)))
                .collect()
        } else {
            let p: Period = form.period.trim().parse().map_err(AppError::BadRequest)?;
            vec![(form.institution.trim().to_owned(), p)]
        };
    let mut issued = Vec::new();
    let mut refused = Vec::new();
    for (inst, p) in targets {
        // Only a single month, named, may go without its unpriced usage.
        let allow = allow_unpriced && !form.institution.trim().is_empty();
        match billing.issue(&inst, p, allow).await {
            Ok(d) => {
                tracing::info!(user = %allowed.principal.name, number = %d.number, "invoice issued from the close page");
                issued.push(format!("{} ({inst} {p}, {})", d.number, money(d.total)));
            }
            Err(e) if e.is_refusal() => refused.push(format!("{inst} {p}: {e}")),
            Err(e) => return Err(e.into()),
        }
    }
    state.ledger.invalidate().await;
    let failed = !refused.is_empty();
    let message = match (issued.is_empty(), refused.is_empty()) {
        (true, true) => "Nothing to issue.".to_owned(),
        _ => {
            let mut m = Vec::new();
            if !issued.is_empty() {
                m.push(format!("Issued {}.", issued.join(", ")));
            }
            if !refused.is_empty() {
                m.push(format!("Not issued: {}.", refused.join("; ")));
            }
            m.join(" ")
        }
    };
    if uri.path().starts_with("/api/") {
        return page(&state, &allowed, &uri, message, failed).await;
    }
    Ok(after_action(
        &state,
        &headers,
        Flash {
            failed,
            ..Flash::done("/close", message)
        },
    ))
}
