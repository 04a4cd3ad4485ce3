//! The invoice portal: institutions list and download their own invoices (frozen bytes),
//! finance sees and issues all. Reads go through `Scoped`, like every dashboard page.

use crate::billing::format::Format;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::{
    after_action, Allowed, CanIssue, CheckedForm, CsrfField, Flash, Flashed, Policy, Scoped,
};
use super::error::AppError;
use super::AppState;
use crate::billing::issue::Billing;
use crate::billing::{ledger, Document, Period};
use crate::format::{money, urlencode};

struct Row {
    number: String,
    kind: String,
    institution: String,
    period: String,
    issued: String,
    total: String,
    status: String,
    downloads: Vec<(&'static str, String)>,
}

#[derive(Template)]
#[template(path = "invoices.html")]
struct InvoicesTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    institution: Option<&'a str>,
    rows: Vec<Row>,
    can_issue: bool,
    message: String,
    failed: bool,
    api_href: String,
    /// (id, name) for the institution pickers.
    institutions: Vec<(String, String)>,
}

/// What each issued document offers: its frozen renderings and the usage behind it as
/// frozen at issue and as stored now (`Format::DOWNLOADS`), a verification against the
/// stored events, and its lines with the events behind each.
const DOWNLOADS: [&str; 7] = [
    Format::DOWNLOADS[0].name(),
    Format::DOWNLOADS[1].name(),
    Format::DOWNLOADS[2].name(),
    Format::DOWNLOADS[3].name(),
    Format::DOWNLOADS[4].name(),
    "verify",
    "lines",
];

/// An issued document in `format` (or its `verify`/`lines` page).
pub(super) fn href(inst: &str, number: &str, format: &str) -> String {
    format!(
        "/institutions/{}/invoices/{}/{format}",
        urlencode(inst),
        urlencode(number)
    )
}

async fn listing(
    state: &AppState,
    scoped: &Scoped,
    message: String,
    failed: bool,
) -> Result<Response, AppError> {
    let rows = state
        .store
        .stored_invoices(scoped.scope.institution())
        .await?;
    let voids = ledger::voids(&rows);
    let view: Vec<Row> = rows
        .iter()
        .map(|r| Row {
            number: r.number.clone(),
            kind: r.kind.replace('_', " "),
            // The name people know, with the id beside it.
            institution: match state.institution_name(&r.institution_id) {
                name if name == r.institution_id => name,
                name => format!("{name} ({})", r.institution_id),
            },
            period: r.period.clone(),
            issued: chrono::DateTime::from_timestamp(i64::from(r.issued_at), 0)
                .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_default(),
            total: money(r.total),
            status: match (r.references_number.as_str(), voids.get(&r.number)) {
                ("", Some(c)) => format!("voided by {c}"),
                ("", None) => "issued".into(),
                (inv, _) => format!("cancels {inv}"),
            },
            downloads: DOWNLOADS
                .into_iter()
                .map(|f| (f, href(&r.institution_id, &r.number, f)))
                .collect(),
        })
        .collect();
    let role = scoped.principal.role.as_str().to_owned();
    let page = InvoicesTemplate {
        user: &scoped.principal.name,
        role: &role,
        csrf: &scoped.csrf,
        pipeline: scoped.principal.sees_pipeline(),
        institution: scoped.scope.institution(),
        rows: view,
        can_issue: CanIssue::allows(&scoped.principal) && !scoped.csrf.is_empty(),
        message,
        failed,
        institutions: {
            // Every institution with usage or in the config, and any with an invoice.
            let mut choices = state.institution_choices("").await?;
            for r in &rows {
                if !choices.iter().any(|(id, _)| *id == r.institution_id) {
                    choices.push((r.institution_id.clone(), r.institution_id.clone()));
                }
            }
            choices.sort();
            choices
        },
        api_href: match scoped.scope.institution() {
            Some(i) => format!("/api/v1/invoices?institution={}", urlencode(i)),
            None => "/api/v1/invoices".into(),
        },
    }
    .render()?;
    Ok(Html(page).into_response())
}

/// `GET /invoices` (HTML) and `GET /api/v1/invoices` (JSON).
pub async fn list(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    uri: Uri,
    Flashed(flash): Flashed,
) -> Result<Response, AppError> {
    if uri.path().starts_with("/api/") {
        let rows = state
            .store
            .stored_invoices(scoped.scope.institution())
            .await?;
        let voids = ledger::voids(&rows);
        let items: Vec<_> = rows
            .iter()
            .map(|r| {
                let downloads: std::collections::BTreeMap<String, String> = DOWNLOADS
                    .iter()
                    .map(|f| (f.to_string(), href(&r.institution_id, &r.number, f)))
                    .collect();
                json!({
                    "number": r.number,
                    "seq": r.seq,
                    "kind": r.kind,
                    "institution": r.institution_id,
                    "period": r.period,
                    "issued_at": r.issued_at,
                    "total": r.total.to_string(),
                    "references": (!r.references_number.is_empty()).then_some(&r.references_number),
                    "voided_by": voids.get(&r.number),
                    "downloads": downloads,
                })
            })
            .collect();
        return Ok(axum::Json(json!({ "invoices": items })).into_response());
    }
    let flash = flash.unwrap_or_default();
    listing(&state, &scoped, flash.message, flash.failed).await
}

fn file(bytes: Vec<u8>, name: &str, content_type: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}\"", name.replace('"', "")),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// An issued document's checks or lines as a page (an accountant's view; the JSON twin is
/// under `/api/v1`).
#[derive(Template)]
#[template(path = "invoice_detail.html")]
struct DetailTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    title: String,
    /// (passed, in words)
    verdict: Option<(bool, String)>,
    notes: Vec<String>,
    columns: Vec<&'static str>,
    /// Cells: (text, link).
    rows: Vec<Vec<(String, Option<String>)>>,
    json_href: String,
    pdf_href: String,
}

/// `GET /institutions/{institution}/invoices/{number}/{format}`: the frozen bytes, or
/// (`verify`, `lines`) a page, JSON under `/api/v1`.
pub async fn download(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    uri: Uri,
    Path((inst, number, format)): Path<(String, String, String)>,
) -> Result<Response, AppError> {
    let api = uri.path().starts_with("/api/");
    let detail = |title: String,
                  verdict: Option<(bool, String)>,
                  notes: Vec<String>,
                  columns: Vec<&'static str>,
                  rows: Vec<Vec<(String, Option<String>)>>| {
        let role = scoped.principal.role.as_str();
        DetailTemplate {
            user: &scoped.principal.name,
            role,
            csrf: &scoped.csrf,
            pipeline: scoped.principal.sees_pipeline(),
            title,
            verdict,
            notes,
            columns,
            rows,
            json_href: format!("/api/v1{}", uri.path()),
            pdf_href: href(&inst, &number, "pdf"),
        }
        .render()
        .map(|h| Html(h).into_response())
    };
    debug_assert_eq!(scoped.scope.institution(), Some(inst.as_str()));
    let row = state
        .store
        .stored_invoice(&number)
        .await?
        .filter(|r| r.institution_id == inst)
        .ok_or(AppError::NotFound)?;
    let frozen = state
        .store
        .frozen_invoice(&row.number)
        .await?
        .ok_or(AppError::NotFound)?;
    if let Some(f) = Format::parse(&format).filter(|f| Format::DOWNLOADS.contains(f)) {
        let doc: Document =
            serde_json::from_str(&frozen.document).map_err(|e| AppError::Internal(e.into()))?;
        let book = state.book.current();
        let billing = Billing::new(&state.cfg, &state.store, &book);
        if f == Format::UsageCsvAsIssued {
            // Streamed part by part: a large month is never held whole.
            let parts = billing
                .usage_csv_as_issued(&doc)
                .await?
                .ok_or(AppError::NotFound)?;
            return Ok((
                [
                    (header::CONTENT_TYPE, f.content_type().to_owned()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!(
                            "attachment; filename=\"{}.{}\"",
                            number.replace('"', ""),
                            f.extension()
                        ),
                    ),
                ],
                axum::body::Body::from_stream(parts.into_stream()),
            )
                .into_response());
        }
        let r = match f.render(&billing, &doc, Some(&frozen)).await {
            Err(crate::billing::BillingError::NoFrozenUsage(_)) => return Err(AppError::NotFound),
            other => other?,
        };
        return Ok(file(
            r.bytes,
            &format!("{number}.{}", r.extension),
            r.content_type,
        ));
    }
    match format.as_str() {
        "verify" => {
            let book = state.book.current();
            let audit = crate::billing::audit::Audit::new(&state.cfg, &state.store, &book);
            let v = audit.verify(frozen.document.as_bytes()).await?;
            if api {
                return Ok(axum::Json(v).into_response());
            }
            let verdict = if v.ok {
                format!("Verified: {number} is the document the ledger holds, and every line matches the stored events and the price book.")
            } else {
                format!("Not verified: {}", v.document.problems.join("; "))
                    .trim_end_matches(": ")
                    .to_owned()
            };
            let rows = v
                .lines
                .iter()
                .map(|l| {
                    vec![
                        (l.line.to_string(), None),
                        (l.description.clone(), None),
                        (
                            if l.ok {
                                "matches".into()
                            } else {
                                l.problems.join("; ")
                            },
                            None,
                        ),
                        (
                            if l.arrived_later > 0 {
                                format!("{} (on a later invoice)", l.arrived_later)
                            } else {
                                "none".into()
                            },
                            None,
                        ),
                    ]
                })
                .collect();
            let mut notes = Vec::new();
            if let Some(n) = &v.price_book_note {
                notes.push(n.clone());
            }
            Ok(detail(
                format!("Verification of {number}"),
                Some((v.ok, verdict)),
                notes,
                vec!["Line", "Description", "Check", "Events arrived since"],
                rows,
            )?)
        }
        "lines" => {
            // The lines with a link to the events behind each ("explain this line").
            let doc: Document =
                serde_json::from_str(&frozen.document).map_err(|e| AppError::Internal(e.into()))?;
            let lines: Vec<_> = doc
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    json!({
                        "line": i + 1,
                        "description": l.description(),
                        "period": l.period.to_string(),
                        "quantity": l.quantity,
                        "unit_price": l.billed_unit_price(doc.contract_percent).to_string(),
                        "amount": l.amount.to_string(),
                        "events": doc.manifest.get(i).map(|m| m.events),
                        "merkle_root": doc.manifest.get(i).map(|m| m.merkle_root.clone()),
                        "explain": format!("{}/{}", href(&inst, &number, "lines"), i + 1),
                    })
                })
                .collect();
            if api {
                return Ok(axum::Json(json!({"number": number, "lines": lines})).into_response());
            }
            let rows = doc
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    vec![
                        ((i + 1).to_string(), None),
                        (l.description(), None),
                        (l.period.to_string(), None),
                        (
                            crate::format::group_thousands(&l.quantity.to_string()),
                            None,
                        ),
                        (
                            l.billed_unit_price(doc.contract_percent)
                                .normalize()
                                .to_string(),
                            None,
                        ),
                        (money(l.amount), None),
                        (
                            doc.manifest
                                .get(i)
                                .map_or_else(String::new, |m| m.events.to_string()),
                            None,
                        ),
                        (
                            "events (CSV)".into(),
                            Some(format!("{}/{}", href(&inst, &number, "lines"), i + 1)),
                        ),
                    ]
                })
                .collect();
            Ok(detail(
                format!("Lines of {number}"),
                None,
                vec![format!(
                    "Each line's events, as billed, download as CSV; the invoice's total is {}.",
                    money(doc.total)
                )],
                vec![
                    "Line",
                    "Description",
                    "Period",
                    "Quantity",
                    "Unit price (USD)",
                    "Amount",
                    "Events",
                    "Explain",
                ],
                rows,
            )?)
        }
        _ => Err(AppError::NotFound),
    }
}

/// `GET /institutions/{institution}/invoices/{number}/lines/{line}`: the events behind
/// one line of an issued invoice, as CSV, for that institution only.
pub async fn explain(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Path((inst, number, line)): Path<(String, String, usize)>,
) -> Result<Response, AppError> {
    debug_assert_eq!(scoped.scope.institution(), Some(inst.as_str()));
    let frozen = state
        .store
        .stored_invoice(&number)
        .await?
        .filter(|r| r.institution_id == inst)
        .ok_or(AppError::NotFound)?;
    let doc: Document =
        serde_json::from_str(&frozen.document).map_err(|e| AppError::Internal(e.into()))?;
    // Refusals (no such line, no evidence) answer before the download starts.
    crate::billing::audit::Audit::explainable(&doc, line)?;
    // The rows are sent as the merge finds them (a line of millions of events is never
    // held): the merge writes into one end of a pipe, the response reads the other. A
    // failure after the first bytes is logged and breaks the download (the response ends
    // with an error, not with what looks like a complete file).
    let (mut writer, reader) = tokio::io::duplex(64 * 1024);
    let (done, finished) = tokio::sync::oneshot::channel::<bool>();
    let task_state = state.clone();
    tokio::spawn(async move {
        let book = task_state.book.current();
        let audit = crate::billing::audit::Audit::new(&task_state.cfg, &task_state.store, &book);
        let result = audit.explain_line(&doc, line, &mut writer).await;
        if let Err(e) = &result {
            tracing::error!(error = %e, number = %doc.number, line, "explaining a line failed mid-download");
        }
        drop(writer);
        let _ = done.send(result.is_ok());
    });
    let chunks = futures::stream::unfold(Some((reader, finished)), |state| async move {
        use tokio::io::AsyncReadExt as _;
        let (mut r, finished) = state?;
        let mut buf = vec![0u8; 64 * 1024];
        match r.read(&mut buf).await {
            Ok(0) => match finished.await {
                Ok(true) => None,
                _ => Some((
                    Err(std::io::Error::other("explaining the line failed")),
                    None,
                )),
            },
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some((r, finished))))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let body = axum::body::Body::from_stream(chunks);
    Ok((
        [
            (header::CONTENT_TYPE, Format::Csv.content_type().to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"{}\"",
                    format!("{number}-line-{line}.csv").replace('"', "")
                ),
            ),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct DraftQuery {
    period: String,
    #[serde(default = "pdf")]
    format: String,
}

fn pdf() -> String {
    "pdf".into()
}

/// `GET /invoices/draft?institution=&period=&format=`: computed live, never stored.
pub async fn draft(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    Query(q): Query<DraftQuery>,
) -> Result<Response, AppError> {
    let inst = scoped
        .scope
        .institution()
        .ok_or_else(|| AppError::BadRequest("choose an institution".into()))?;
    let period: Period = q.period.parse().map_err(AppError::BadRequest)?;
    // Each draft computes an invoice: a person gets `web.drafts_per_minute` of them.
    let who = format!(
        "{}\0{}",
        scoped.principal.name,
        scoped.principal.institution.as_deref().unwrap_or("")
    );
    if state.drafts.count(&who) >= state.cfg.web.drafts_per_minute.max(1) {
        return Err(AppError::TooManyRequests);
    }
    state.drafts.record(&who);
    let book = state.book.current();
    let billing = Billing::new(&state.cfg, &state.store, &book);
    let ledger = state.ledger.current(&state.writer).await?;
    let doc = billing.draft(&ledger, inst, period).await?;
    let name = format!("draft-{inst}-{period}");
    let format = Format::parse(&q.format)
        .filter(|f| [Format::Pdf, Format::Csv, Format::Json, Format::UsageCsv].contains(f))
        .ok_or_else(|| AppError::BadRequest("format: pdf, csv, json or usage-csv".into()))?;
    let r = format.render(&billing, &doc, None).await?;
    Ok(file(
        r.bytes,
        &format!("{name}.{}", r.extension),
        r.content_type,
    ))
}

#[derive(Deserialize)]
pub struct IssueForm {
    institution: String,
    period: String,
    #[serde(default)]
    allow_unpriced: Option<String>,
    #[serde(default)]
    csrf: String,
}

impl CsrfField for IssueForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /invoices/issue` (finance and admin; a session needs its CSRF token).
pub async fn issue(
    State(state): State<Arc<AppState>>,
    authed: Allowed<CanIssue>,
    uri: Uri,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm<IssueForm>,
) -> Result<Response, AppError> {
    let period: Period = form.period.trim().parse().map_err(AppError::BadRequest)?;
    let inst = form.institution.trim();
    let book = state.book.current();
    let billing = Billing::new(&state.cfg, &state.writer, &book);
    let result = billing
        .issue(inst, period, form.allow_unpriced.is_some())
        .await;
    if uri.path().starts_with("/api/") {
        return match result {
            Ok(d) => Ok(axum::Json(json!({"number": d.number, "total": d.total.to_string(), "institution": inst, "period": period.to_string()})).into_response()),
            Err(e) => Err(e.into()),
        };
    }
    let scoped = Scoped {
        principal: authed.principal,
        csrf: authed.csrf,
        scope: super::auth::Scope::All,
    };
    match result {
        Ok(d) => {
            tracing::info!(user = %scoped.principal.name, number = %d.number, "invoice issued from the portal");
            Ok(after_action(
                &state,
                &headers,
                Flash::done(
                    "/invoices",
                    format!(
                        "Issued {} for {inst} {period}: {}",
                        d.number,
                        money(d.total)
                    ),
                ),
            ))
        }
        Err(e) if e.is_refusal() => {
            listing(&state, &scoped, format!("Not issued: {e}"), true).await
        }
        Err(e) => {
            tracing::error!(error = %e, "issuing from the portal failed");
            listing(
                &state,
                &scoped,
                "Not issued: an internal error occurred (it is logged); try again later.".into(),
                true,
            )
            .await
        }
    }
}
