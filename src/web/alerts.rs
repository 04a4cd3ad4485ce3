//! The alerts page: open and recently resolved incidents; ops and admins acknowledge.
//! Institution users see only their institution's alerts (through `Scoped`).

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::Uri;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{Duration, Utc};
use serde::Deserialize;

use super::auth::{Allowed, CanAcknowledge, CheckedForm, CsrfField, Policy, Scoped};
use super::error::AppError;
use super::AppState;
use crate::alerts::evaluator::{acknowledge as ack, incidents};

struct Row {
    id: String,
    state: String,
    severity: String,
    kind: String,
    entity: String,
    fired: String,
    changed: String,
    observed: String,
    baseline: String,
    message: String,
    acknowledged_by: String,
}

#[derive(Template)]
#[template(path = "alerts.html")]
struct AlertsTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    can_ack: bool,
    rows: Vec<Row>,
}

/// A time with its zone; a time never recorded (0) says so instead of 1970.
fn when(ts: u32) -> String {
    if ts == 0 {
        return "not recorded".into();
    }
    chrono::DateTime::from_timestamp(i64::from(ts), 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

/// An observed value or baseline as people write numbers: "2", "0.25", "1,234.5" — not
/// the column's fixed six decimals.
fn number(d: rust_decimal::Decimal) -> String {
    let s = d.normalize().to_string();
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let grouped = crate::format::group_thousands(digits);
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    uri: Uri,
) -> Result<Response, AppError> {
    let all = incidents(
        &state.store,
        scoped.scope.institution(),
        Utc::now() - Duration::days(30),
    )
    .await?;
    if uri.path().starts_with("/api/") {
        return Ok(axum::Json(serde_json::json!({ "alerts": all })).into_response());
    }
    let role = scoped.principal.role.as_str().to_owned();
    let page = AlertsTemplate {
        user: &scoped.principal.name,
        role: &role,
        csrf: &scoped.csrf,
        pipeline: scoped.principal.sees_pipeline(),
        can_ack: CanAcknowledge::allows(&scoped.principal),
        rows: all
            .into_iter()
            .map(|i| Row {
                id: i.alert_id,
                state: i.state,
                severity: i.severity,
                kind: i.kind.replace('_', " "),
                entity: i.entity,
                fired: when(i.fired_at),
                changed: when(i.changed_at),
                observed: number(i.observed),
                baseline: number(i.baseline),
                message: i.message,
                acknowledged_by: i.acknowledged_by,
            })
            .collect(),
    }
    .render()?;
    Ok(Html(page).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn figures_and_times_read_as_people_write_them() {
        assert_eq!(number(dec!(2.000000)), "2");
        assert_eq!(number(dec!(0.250000)), "0.25");
        assert_eq!(number(dec!(-1234.500000)), "-1,234.5");
        assert_eq!(when(0), "not recorded");
        assert_eq!(when(1_790_000_000), "2026-09-21 14:13 UTC");
    }
}

#[derive(Deserialize)]
pub struct AckForm {
    #[serde(default)]
    csrf: String,
}

impl CsrfField for AckForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /alerts/{id}/ack` (ops and admin; a session needs its CSRF token).
pub async fn acknowledge(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanAcknowledge>,
    Path(id): Path<String>,
    uri: Uri,
    CheckedForm(_): CheckedForm<AckForm>,
) -> Result<Response, AppError> {
    if !id.chars().all(|c| c.is_ascii_hexdigit()) || id.len() > 64 {
        return Err(AppError::NotFound);
    }
    if !state.store.alert_exists(&id).await? {
        return Err(AppError::NotFound);
    }
    ack(&state.writer, &id, &allowed.principal.name).await?;
    if uri.path().starts_with("/api/") {
        return Ok(axum::Json(serde_json::json!({"acknowledged": id})).into_response());
    }
    Ok(Redirect::to("/alerts").into_response())
}
