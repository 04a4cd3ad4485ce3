//! `/providers`: the providers' own reports against what tokentally recorded (issue 35),
//! for finance and admin. Per provider the totals and the days both reports cover; per
//! day and model every line with a difference or a cause, over-threshold lines first;
//! "Fetch reports" imports the range from the providers' admin APIs (where admin keys are
//! configured), so the check needs no terminal.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Response};
use chrono::{Duration, NaiveDate, Utc};
use serde::Deserialize;

use super::auth::{after_action, Allowed, CanReconcile, CheckedForm, CsrfField, Flash, Flashed};
use super::error::AppError;
use super::AppState;
use crate::bills::reconcile::{Line, Reconciliation};
use crate::format::money_on_page as money;

#[derive(Debug, Default, Deserialize)]
pub struct RangeQuery {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    /// "1": every line, not only those with a difference or a cause.
    #[serde(default)]
    all: String,
}

/// The range asked for; default the last 30 days before today (UTC).
fn range(from: &str, to: &str) -> Result<(NaiveDate, NaiveDate), AppError> {
    let day = |s: &str, what: &str, default: NaiveDate| -> Result<NaiveDate, AppError> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(default);
        }
        s.parse().map_err(|_| {
            AppError::BadRequest(format!("{what} must be a day (YYYY-MM-DD), not {s:?}"))
        })
    };
    let to = day(to, "to", Utc::now().date_naive() - Duration::days(1))?;
    let from = day(from, "from", to - Duration::days(29))?;
    if from > to {
        return Err(AppError::BadRequest(format!(
            "from ({from}) is after to ({to})"
        )));
    }
    if (to - from).num_days() > 366 {
        return Err(AppError::BadRequest("at most a year at a time".into()));
    }
    Ok((from, to))
}

struct LineView {
    day: String,
    provider: String,
    model: String,
    ours_tokens: u64,
    theirs_tokens: String,
    ours_cost: String,
    charged: String,
    book_difference: String,
    cost_difference: String,
    causes: Vec<String>,
    over: bool,
}

fn signed(d: rust_decimal::Decimal) -> String {
    crate::format::signed(d, money)
}

fn view(l: &Line) -> LineView {
    LineView {
        day: l.day.to_string(),
        provider: l.provider.clone(),
        model: l.model.clone(),
        ours_tokens: l.ours.tokens(),
        theirs_tokens: l
            .theirs
            .as_ref()
            .map_or("—".into(), |t| t.tokens().to_string()),
        ours_cost: money(l.ours.cost),
        charged: match (&l.theirs, l.cost_difference) {
            (Some(t), Some(_)) => money(t.cost),
            (None, Some(d)) => money(d + l.ours.cost),
            _ => "—".into(),
        },
        book_difference: signed(l.book_difference),
        cost_difference: l.cost_difference.map_or("—".into(), signed),
        causes: l.causes.iter().map(|c| c.describe(&l.provider)).collect(),
        over: l.over,
    }
}

#[derive(Template)]
#[template(path = "providers.html")]
struct ProvidersTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    from: String,
    to: String,
    all: bool,
    threshold: String,
    /// (provider, recorded, charged, difference, days covered text, lines over)
    providers: Vec<(String, String, String, String, String, usize)>,
    not_compared: Vec<String>,
    lines: Vec<LineView>,
    fetchable: Vec<&'static str>,
    message: String,
    failed: bool,
}

/// The providers with an admin key, whose reports the page can fetch.
fn fetchable(state: &AppState) -> Vec<(&'static str, &crate::config::BillSourceConfig)> {
    state
        .cfg
        .provider_bills
        .sources()
        .into_iter()
        .filter(|(_, s)| s.key().ok().flatten().is_some())
        .collect()
}

async fn page(
    state: &AppState,
    allowed: &Allowed<CanReconcile>,
    uri: &Uri,
    q: &RangeQuery,
    message: String,
    failed: bool,
) -> Result<Response, AppError> {
    let (from, to) = range(&q.from, &q.to)?;
    let book = state.book.current();
    let r: Reconciliation =
        crate::cli::providers::compare(&state.cfg, &state.store, &book, from, to).await?;
    if uri.path().starts_with("/api/") {
        return Ok(axum::Json(&r).into_response());
    }
    let all = q.all.trim() == "1";
    let mut lines: Vec<&Line> = r
        .lines
        .iter()
        .filter(|l| all || l.over || !l.causes.is_empty())
        .collect();
    lines.sort_by_key(|l| (!l.over, l.day, l.provider.clone(), l.model.clone()));
    let role = allowed.principal.role.as_str().to_owned();
    let t = ProvidersTemplate {
        user: &allowed.principal.name,
        role: &role,
        csrf: &allowed.csrf,
        pipeline: allowed.principal.sees_pipeline(),
        from: from.to_string(),
        to: to.to_string(),
        all,
        threshold: money(r.threshold),
        providers: r
            .providers
            .iter()
            .map(|p| {
                (
                    p.provider.clone(),
                    money(p.ours),
                    money(p.theirs),
                    signed(p.theirs - p.ours),
                    if p.ours_uncovered.is_zero() {
                        format!("{} of {}", p.days_covered, p.days)
                    } else {
                        format!(
                            "{} of {} ({} recorded on days not covered)",
                            p.days_covered,
                            p.days,
                            money(p.ours_uncovered)
                        )
                    },
                    p.lines_over,
                )
            })
            .collect(),
        not_compared: r
            .not_compared
            .iter()
            .map(|n| {
                format!(
                    "{}: {} request(s), {} recorded — no report imported for these days",
                    n.provider,
                    n.requests,
                    money(n.cost)
                )
            })
            .collect(),
        lines: lines.into_iter().map(view).collect(),
        fetchable: fetchable(state).into_iter().map(|(n, _)| n).collect(),
        message,
        failed,
    };
    Ok(Html(t.render()?).into_response())
}

/// `GET /providers` (and `/api/v1/providers`): `from`, `to` (UTC days), `all=1`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanReconcile>,
    uri: Uri,
    Query(q): Query<RangeQuery>,
    Flashed(flash): Flashed,
) -> Result<Response, AppError> {
    let flash = flash.unwrap_or_default();
    page(&state, &allowed, &uri, &q, flash.message, flash.failed).await
}

#[derive(Deserialize)]
pub struct FetchForm {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
    #[serde(default)]
    csrf: String,
}

impl CsrfField for FetchForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /providers/fetch`: import the range's reports from every provider with an
/// admin key, then show the comparison.
pub async fn fetch(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanReconcile>,
    uri: Uri,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm<FetchForm>,
) -> Result<Response, AppError> {
    let (from, to) = range(&form.from, &form.to)?;
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (name, source) in fetchable(&state) {
        match crate::bills::fetch::fetch(name, source, from, to).await {
            Ok(exports) => {
                for e in exports {
                    state
                        .writer
                        .import_bill(&e, &format!("{name} admin API"), &allowed.principal.name)
                        .await?;
                    done.push(format!(
                        "{name} {} ({} days, {} rows)",
                        e.report,
                        e.days.len(),
                        e.rows.len()
                    ));
                }
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    tracing::info!(user = %allowed.principal.name, %from, %to, imported = done.len(), "provider reports fetched from the page");
    let message = match (done.is_empty(), failed.is_empty()) {
        (true, true) => "No provider has an admin key configured ([provider_bills.openai] / [provider_bills.anthropic]); import report files with `tokentally providers import --file`.".to_owned(),
        _ => {
            let mut m = Vec::new();
            if !done.is_empty() {
                m.push(format!("Imported {}.", done.join(", ")));
            }
            if !failed.is_empty() {
                m.push(format!("Not imported: {}.", failed.join("; ")));
            }
            m.join(" ")
        }
    };
    let is_failed = !failed.is_empty() || done.is_empty();
    let q = RangeQuery {
        from: from.to_string(),
        to: to.to_string(),
        all: String::new(),
    };
    if uri.path().starts_with("/api/") {
        return page(&state, &allowed, &uri, &q, message, is_failed).await;
    }
    Ok(after_action(
        &state,
        &headers,
        Flash {
            failed: is_failed,
            ..Flash::done(format!("/providers?from={from}&to={to}"), message)
        },
    ))
}
