//! The Limits page: per institution, user and key, each limit with what its period has
//! used, what running requests hold, what remains, and who was refused when. Admin and
//! finance set and remove any limit; an institution's administrator those of its own
//! users and keys (not the institution's own budget, which it buys). Confinement comes
//! from `Scoped` and `auth::confine`.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;

use super::auth::{
    after_action, confine, Allowed, CanManageKeys, CheckedForm, CsrfField, Flash, Flashed, Policy,
    Principal, Scoped,
};
use super::error::AppError;
use super::AppState;
use crate::limits::{Limit, LimitMode, LimitPeriod, LimitScope, Metric};

struct LimitView {
    id: String,
    subject: String,
    amount: String,
    mode: String,
    used: String,
    reserved: String,
    remaining: String,
    share: u32,
    period: String,
    blocked: u64,
    removable: bool,
}

struct RefusalView {
    at: String,
    institution: String,
    user: String,
    key: String,
    model: String,
}

#[derive(Template)]
#[template(path = "limits.html")]
struct LimitsTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    institution: Option<&'a str>,
    limits: Vec<LimitView>,
    refusals: Vec<RefusalView>,
    can_manage: bool,
    message: String,
    failed: bool,
    /// What the set form held when it was refused (kept, to correct), else empty.
    kept: SetForm,
}

fn amount(metric: Metric, d: Decimal) -> String {
    match metric {
        // `money` has its own dollar sign (this page printed "$$1.50").
        Metric::Usd => crate::format::money_on_page(d),
        _ => d.normalize().to_string(),
    }
}

/// A period's bound in the institution's zone, named ("2026-12-01 00:00 CET"), as the
/// gateway's refusal says when a limit renews.
fn at(t: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z").to_string()
}

/// Whether `p` may set or remove limits of this scope: an institution's administrator
/// not its institution's own.
fn may_manage(p: &Principal, scope: LimitScope) -> bool {
    CanManageKeys::allows(p) && !(p.role.is_institution() && scope == LimitScope::Institution)
}

async fn page(
    state: &AppState,
    principal: &Principal,
    csrf: &str,
    institution: Option<&str>,
    message: String,
    failed: bool,
    kept: Option<SetForm>,
) -> Result<Response, AppError> {
    let now = Utc::now();
    let standings = crate::limits::standings(
        &state.store,
        &state.limits,
        &state
            .roster
            .current()
            .await
            .map_err(|e| AppError::Internal(e.into()))?
            .1,
        &|i| state.cfg.institution_tz(i),
        institution,
        now,
    )
    .await
    .map_err(AppError::Internal)?;
    let can_manage = CanManageKeys::allows(principal) && !csrf.is_empty();
    let limits = standings
        .iter()
        .map(|s| {
            let share = if s.limit.is_zero() {
                100
            } else {
                ((s.used + s.reserved) * Decimal::ONE_HUNDRED / s.limit)
                    .round()
                    .min(Decimal::ONE_HUNDRED)
                    .try_into()
                    .unwrap_or(100)
            };
            LimitView {
                id: s.limit_id.clone(),
                subject: match s.scope {
                    LimitScope::Institution => s.institution_id.clone(),
                    sc => format!("{} · {sc} {}", s.institution_id, s.subject),
                },
                amount: s.label.clone(),
                mode: s.mode.clone(),
                used: amount(s.metric, s.used),
                reserved: amount(s.metric, s.reserved),
                remaining: amount(s.metric, s.remaining),
                share,
                period: {
                    let tz = state.cfg.institution_tz(&s.institution_id);
                    format!("{} – {}", at(s.period_start, tz), at(s.period_end, tz))
                },
                blocked: s.blocked,
                removable: can_manage && may_manage(principal, s.scope),
            }
        })
        .collect();
    let since = now - chrono::Duration::days(31);
    let refusals = state
        .store
        .limit_refusals(institution, since.timestamp(), 200)
        .await?
        .into_iter()
        .map(|r| RefusalView {
            at: DateTime::from_timestamp(i64::from(r.at), 0)
                .map(|t| at(t, state.cfg.institution_tz(&r.institution_id)))
                .unwrap_or_default(),
            institution: r.institution_id,
            user: r.user_id,
            key: r.api_key_id,
            model: r.model,
        })
        .collect();
    Ok(Html(
        LimitsTemplate {
            user: &principal.name,
            role: principal.role.as_str(),
            csrf,
            pipeline: principal.sees_pipeline(),
            institution,
            limits,
            refusals,
            can_manage,
            message,
            failed,
            kept: kept.unwrap_or_default(),
        }
        .render()?,
    )
    .into_response())
}

/// `GET /limits` (HTML) and `GET /api/v1/limits` (JSON): limits of the scope with their
/// standing, and the requests limits refused in the last 31 days.
pub async fn list(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    uri: Uri,
    Flashed(flash): Flashed,
) -> Result<Response, AppError> {
    let institution = scoped.scope.institution();
    if uri.path().starts_with("/api/") {
        let now = Utc::now();
        let standings = crate::limits::standings(
            &state.store,
            &state.limits,
            &state
                .roster
                .current()
                .await
                .map_err(|e| AppError::Internal(e.into()))?
                .1,
            &|i| state.cfg.institution_tz(i),
            institution,
            now,
        )
        .await
        .map_err(AppError::Internal)?;
        let refusals = state
            .store
            .limit_refusals(
                institution,
                (now - chrono::Duration::days(31)).timestamp(),
                1000,
            )
            .await?;
        return Ok(axum::Json(json!({ "limits": standings, "refused": refusals })).into_response());
    }
    page(
        &state,
        &scoped.principal,
        &scoped.csrf,
        institution,
        flash
            .as_ref()
            .map(|f| f.message.clone())
            .unwrap_or_default(),
        flash.is_some_and(|f| f.failed),
        None,
    )
    .await
}

#[derive(Deserialize, Default, Clone)]
pub struct SetForm {
    #[serde(default)]
    institution: String,
    /// `institution`, `user` or `key`.
    #[serde(default)]
    scope: String,
    #[serde(default)]
    subject: String,
    #[serde(default)]
    metric: String,
    #[serde(default)]
    amount: String,
    #[serde(default)]
    period: String,
    #[serde(default = "block")]
    mode: String,
    #[serde(default)]
    csrf: String,
}

fn block() -> String {
    "block".into()
}

impl CsrfField for SetForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

fn bad(e: String) -> AppError {
    AppError::BadRequest(e)
}

/// `POST /limits/set` (and `/api/v1/limits/set`): sets a limit; gateways apply it within
/// a second or two.
pub async fn set(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanManageKeys>,
    uri: Uri,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm<SetForm>,
) -> Result<Response, AppError> {
    let api = uri.path().starts_with("/api/");
    let limit = match limit_of(&allowed.principal, &form) {
        Ok(l) => l,
        // A page keeps what was typed and says what to correct, beside the form.
        Err(AppError::BadRequest(why)) if !api => {
            let own = allowed.principal.institution.as_deref();
            return page(
                &state,
                &allowed.principal,
                &allowed.csrf,
                own,
                format!("Not set: {why}."),
                true,
                Some(form),
            )
            .await;
        }
        Err(e) => return Err(e),
    };
    let actor = format!("web:{}", allowed.principal.name);
    crate::limits::set(&state.writer, &limit, &actor)
        .await
        .map_err(AppError::Internal)?;
    tracing::info!(user = %crate::format::log_safe(&allowed.principal.name, 64), limit = %crate::format::log_safe(&limit.id(), 200), "limit set from the dashboard");
    if api {
        return Ok(axum::Json(json!({"limit_id": limit.id()})).into_response());
    }
    // A user nobody has seen may be a typo: set as asked, and said.
    let unseen = limit.scope == LimitScope::User
        && !state
            .store
            .user_has_usage(&limit.institution_id, &limit.subject)
            .await?
        && state
            .roster
            .current()
            .await
            .map_err(|e| AppError::Internal(e.into()))?
            .0
            .member(&limit.institution_id, &limit.subject)
            .is_none();
    let mut message = format!(
        "Set {}: {}. Gateways apply it within seconds.",
        limit.subject_label(),
        limit.amount_label()
    );
    if unseen {
        message.push_str(&format!(
            " Note: {} has no usage and has never signed in at {} — check the spelling if that is unexpected.",
            limit.subject, limit.institution_id
        ));
    }
    Ok(after_action(
        &state,
        &headers,
        Flash::done("/limits", message),
    ))
}

/// The limit a set form describes, checked: who may set it, and every field.
fn limit_of(principal: &Principal, form: &SetForm) -> Result<Limit, AppError> {
    let requested = Some(form.institution.trim()).filter(|i| !i.is_empty());
    let institution = confine(principal, requested)?
        .ok_or_else(|| AppError::BadRequest("institution is required".into()))?;
    let scope: LimitScope = form.scope.trim().parse().map_err(bad)?;
    if !may_manage(principal, scope) {
        return Err(AppError::Forbidden);
    }
    let limit = Limit {
        institution_id: institution,
        scope,
        subject: if scope == LimitScope::Institution {
            String::new()
        } else {
            form.subject.trim().into()
        },
        metric: form.metric.trim().parse::<Metric>().map_err(bad)?,
        period: form.period.trim().parse::<LimitPeriod>().map_err(bad)?,
        amount: form
            .amount
            .trim()
            .trim_start_matches('$')
            .parse()
            .map_err(|_| {
                bad(format!(
                    "amount `{}` is not a number",
                    crate::format::log_safe(&form.amount, 40)
                ))
            })?,
        mode: form.mode.trim().parse::<LimitMode>().map_err(bad)?,
    };
    limit.validate().map_err(bad)?;
    Ok(limit)
}

#[derive(Deserialize)]
pub struct RemoveForm {
    limit_id: String,
    #[serde(default)]
    csrf: String,
}

impl CsrfField for RemoveForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /limits/remove`: removes a limit of the scope (others' are "not found").
pub async fn remove(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanManageKeys>,
    uri: Uri,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm<RemoveForm>,
) -> Result<Response, AppError> {
    let own = confine(&allowed.principal, None)?;
    let (_, derived) = state
        .roster
        .current()
        .await
        .map_err(|e| AppError::Internal(e.into()))?;
    let current = crate::limits::current(&state.store, &state.limits, &derived)
        .await
        .map_err(AppError::Internal)?;
    let limit = current
        .into_iter()
        .find(|l| l.id() == form.limit_id && own.as_deref().is_none_or(|i| l.institution_id == i))
        .ok_or(AppError::NotFound)?;
    if !may_manage(&allowed.principal, limit.scope) {
        return Err(AppError::Forbidden);
    }
    let actor = format!("web:{}", allowed.principal.name);
    crate::limits::remove(&state.writer, &state.limits, &derived, &limit.id(), &actor)
        .await
        .map_err(AppError::Internal)?;
    if uri.path().starts_with("/api/") {
        return Ok(axum::Json(json!({"limit_id": limit.id(), "state": "removed"})).into_response());
    }
    Ok(after_action(
        &state,
        &headers,
        Flash::done("/limits", format!("Removed {}.", limit.id())),
    ))
}
