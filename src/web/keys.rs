//! The Keys page: proxy keys of the institutions a principal may see (never a secret),
//! creating and revoking them for those who may manage keys, and the log of key
//! operations for admins. Institution confinement comes from `Scoped` and `auth::confine`
//! (a form's institution goes through the same check as a URL's).

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::json;

use super::auth::{
    after_action, confine, Allowed, CanManageKeys, CheckedForm, CsrfField, Flash, Flashed, Policy,
    Principal, Scoped, SeesKeyLog,
};
use super::error::AppError;
use super::AppState;
use crate::keys::{self, KeyError, KeyKind, KeySpec};
use crate::store::keys::KeyRow;

impl From<KeyError> for AppError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Invalid(m) => AppError::BadRequest(m),
            KeyError::NotFound(_) => AppError::NotFound,
            KeyError::OtherInstitution(_) => AppError::Forbidden,
            KeyError::AlreadyRevoked(_) => AppError::Conflict(e.to_string()),
            KeyError::Store(s) => s.into(),
        }
    }
}

fn date(secs: u32) -> String {
    DateTime::from_timestamp(i64::from(secs), 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_default()
}

fn state_of(k: &KeyRow, now: DateTime<Utc>) -> &'static str {
    if k.revoked != 0 {
        "revoked"
    } else if k.expires_at > 0 && i64::from(k.expires_at) <= now.timestamp() {
        "expired"
    } else if !k.held.is_empty() {
        // Paused by the spend-spike brake until its alert is acknowledged.
        "paused"
    } else {
        "active"
    }
}

struct KeyView {
    key_id: String,
    kind: String,
    institution: String,
    user: String,
    name: String,
    models: String,
    limits: String,
    expires: String,
    state: &'static str,
    created: String,
    revocable: bool,
    /// Paused by the spend-spike brake, and the viewer may resume it.
    resumable: bool,
}

struct LogView {
    at: String,
    actor: String,
    action: String,
    key_id: String,
    institution: String,
    detail: String,
}

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    institution: Option<&'a str>,
    keys: Vec<KeyView>,
    log: Vec<LogView>,
    sees_log: bool,
    can_manage: bool,
    message: String,
    failed: bool,
    /// A key just created: shown once.
    created: Option<(String, String)>,
    /// The gateway's address, for the snippets beside a new key.
    gateway: String,
    /// What the create form held when it was refused (kept, to correct), else empty.
    kept: CreateForm,
}

/// What the page says after an action: a message (an error if `failed`), a key just
/// created (shown once), or a refused form's values.
#[derive(Default)]
struct Said {
    message: String,
    failed: bool,
    created: Option<(String, String)>,
    kept: Option<CreateForm>,
}

impl Said {
    fn refused(message: String, kept: Option<CreateForm>) -> Self {
        Said {
            message,
            failed: true,
            kept,
            ..Said::default()
        }
    }
}

fn view(k: &KeyRow, now: DateTime<Utc>, can_manage: bool) -> KeyView {
    let mut limits = Vec::new();
    if k.rpm > 0 {
        limits.push(format!("{} requests/min", k.rpm));
    }
    if k.tpm > 0 {
        limits.push(format!("{} tokens/min", k.tpm));
    }
    let state = state_of(k, now);
    KeyView {
        key_id: k.key_id.clone(),
        kind: k.kind.clone(),
        institution: if k.institution_id.is_empty() {
            "(any)".into()
        } else {
            k.institution_id.clone()
        },
        user: k.user_id.clone(),
        name: k.name.clone(),
        models: if k.models.is_empty() {
            "all".into()
        } else {
            k.models.join(", ")
        },
        limits: if limits.is_empty() {
            "none".into()
        } else {
            limits.join(", ")
        },
        expires: if k.expires_at == 0 {
            "never".into()
        } else {
            date(k.expires_at)
        },
        state,
        created: format!("{} by {}", date(k.created_at), k.created_by),
        revocable: can_manage && (state == "active" || state == "paused"),
        resumable: can_manage && state == "paused",
    }
}

async fn page(
    state: &AppState,
    principal: &Principal,
    csrf: &str,
    institution: Option<&str>,
    said: Said,
) -> Result<Response, AppError> {
    let now = Utc::now();
    let can_manage = CanManageKeys::allows(principal) && !csrf.is_empty();
    let rows = keys::list(state.keys.as_ref(), institution).await?;
    let sees_log = SeesKeyLog::allows(principal);
    let log = if sees_log {
        state
            .keys
            .key_events(institution, 200)
            .await?
            .into_iter()
            .map(|e| LogView {
                at: date(e.at),
                actor: e.actor,
                action: e.action,
                key_id: e.key_id,
                institution: e.institution_id,
                detail: e.detail,
            })
            .collect()
    } else {
        Vec::new()
    };
    let role = principal.role.as_str();
    Ok(Html(
        KeysTemplate {
            user: &principal.name,
            role,
            csrf,
            pipeline: principal.sees_pipeline(),
            institution,
            keys: rows.iter().map(|k| view(k, now, can_manage)).collect(),
            log,
            sees_log,
            can_manage,
            message: said.message,
            failed: said.failed,
            created: said.created,
            gateway: state.gateway_url(),
            kept: said.kept.unwrap_or_default(),
        }
        .render()?,
    )
    .into_response())
}

/// `GET /keys` (HTML) and `GET /api/v1/keys` (JSON): the keys of the scope, never a secret.
pub async fn list(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    uri: Uri,
    Flashed(flash): Flashed,
) -> Result<Response, AppError> {
    let institution = scoped.scope.institution();
    if uri.path().starts_with("/api/") {
        let now = Utc::now();
        let rows = keys::list(state.keys.as_ref(), institution).await?;
        let items: Vec<_> = rows
            .iter()
            .map(|k| {
                json!({
                    "key_id": k.key_id, "kind": k.kind, "institution": k.institution_id,
                    "user": k.user_id, "name": k.name, "models": k.models,
                    "expires_at": (k.expires_at > 0).then_some(k.expires_at),
                    "rpm": k.rpm, "tpm": k.tpm, "state": state_of(k, now),
                    "created_at": k.created_at, "created_by": k.created_by,
                })
            })
            .collect();
        return Ok(axum::Json(json!({ "keys": items })).into_response());
    }
    page(
        &state,
        &scoped.principal,
        &scoped.csrf,
        institution,
        flash.map_or_else(Said::default, |f| Said {
            message: f.message,
            failed: f.failed,
            created: f.created,
            kept: None,
        }),
    )
    .await
}

#[derive(Deserialize, Default, Clone)]
pub struct CreateForm {
    #[serde(default)]
    institution: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    name: String,
    /// Comma-separated; empty: every model.
    #[serde(default)]
    models: String,
    /// YYYY-MM-DD; empty: never.
    #[serde(default)]
    expires: String,
    #[serde(default)]
    rpm: String,
    #[serde(default)]
    tpm: String,
    #[serde(default)]
    csrf: String,
}

impl CsrfField for CreateForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

fn number<T: std::str::FromStr>(field: &str, v: &str) -> Result<T, AppError> {
    let v = v.trim();
    if v.is_empty() {
        return "0"
            .parse()
            .map_err(|_| AppError::BadRequest(format!("{field}: not a number")));
    }
    v.parse().map_err(|_| {
        AppError::BadRequest(format!(
            "{field} must be a whole number, got `{}`",
            crate::format::log_safe(v, 40)
        ))
    })
}

/// The key a create form describes, its fields checked (the institution against who asks).
fn spec_of(principal: &Principal, form: &CreateForm) -> Result<KeySpec, AppError> {
    let requested = Some(form.institution.trim()).filter(|i| !i.is_empty());
    let institution = confine(principal, requested)?
        .ok_or_else(|| AppError::BadRequest("institution is required".into()))?;
    let expires = match form.expires.trim() {
        "" => None,
        d => Some(
            d.parse::<NaiveDate>()
                .map_err(|_| AppError::BadRequest("expires must be a date (YYYY-MM-DD)".into()))?,
        ),
    };
    Ok(KeySpec {
        institution_id: institution,
        user_id: form.user.trim().into(),
        name: form.name.trim().into(),
        models: form
            .models
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect(),
        expires,
        rpm: number("rpm", &form.rpm)?,
        tpm: number("tpm", &form.tpm)?,
    })
}

/// Who did it, for the audit log.
fn actor(p: &Principal) -> String {
    format!("web:{}", p.name)
}

/// `POST /keys/create` (and `/api/v1/keys/create`): a proxy key, shown once.
pub async fn create(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanManageKeys>,
    uri: Uri,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm<CreateForm>,
) -> Result<Response, AppError> {
    let api = uri.path().starts_with("/api/");
    let scope = allowed.principal.institution.as_deref();
    let spec = match spec_of(&allowed.principal, &form) {
        Ok(spec) => spec,
        // A page keeps what was typed and says what to correct.
        Err(AppError::BadRequest(why)) if !api => {
            return page(
                &state,
                &allowed.principal,
                &allowed.csrf,
                scope,
                Said::refused(format!("Not created: {why}."), Some(form)),
            )
            .await;
        }
        Err(e) => return Err(e),
    };
    let institution = spec.institution_id.clone();
    let result = keys::create(
        state.keys.as_ref(),
        KeyKind::Proxy,
        &spec,
        &actor(&allowed.principal),
    )
    .await;
    match result {
        Ok((row, new)) => {
            tracing::info!(user = %crate::format::log_safe(&allowed.principal.name, 64), key_id = %row.key_id, institution = %crate::format::log_safe(&institution, 64), "key created from the dashboard");
            if api {
                return Ok(axum::Json(
                    json!({"key_id": row.key_id, "key": new.secret, "institution": institution}),
                )
                .into_response());
            }
            Ok(after_action(
                &state,
                &headers,
                Flash {
                    created: Some((row.key_id.clone(), new.secret)),
                    ..Flash::done(
                        "/keys",
                        format!(
                            "Created key {} for {} at {institution}.",
                            row.key_id, row.user_id
                        ),
                    )
                },
            ))
        }
        Err(KeyError::Invalid(m)) if !api => {
            page(
                &state,
                &allowed.principal,
                &allowed.csrf,
                scope,
                Said::refused(format!("Not created: {m}."), Some(form)),
            )
            .await
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize)]
pub struct RevokeForm {
    #[serde(default)]
    csrf: String,
}

impl CsrfField for RevokeForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /keys/{key_id}/revoke`: every gateway refuses the key within seconds. An
/// institution's administrator can only revoke their institution's keys (others' are
/// "not found").
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanManageKeys>,
    uri: Uri,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    CheckedForm(_form): CheckedForm<RevokeForm>,
) -> Result<Response, AppError> {
    let own = confine(&allowed.principal, None)?;
    let row = keys::revoke(
        state.keys.as_ref(),
        &key_id,
        own.as_deref(),
        &actor(&allowed.principal),
    )
    .await?;
    tracing::info!(user = %crate::format::log_safe(&allowed.principal.name, 64), key_id = %row.key_id, "key revoked from the dashboard");
    if uri.path().starts_with("/api/") {
        return Ok(axum::Json(json!({"key_id": row.key_id, "state": "revoked"})).into_response());
    }
    Ok(after_action(
        &state,
        &headers,
        Flash::done(
            "/keys",
            format!(
                "Revoked key {}; every gateway refuses it within seconds.",
                row.key_id
            ),
        ),
    ))
}

/// `POST /keys/{key_id}/resume` (and `/api/v1/keys/{key_id}/resume`): a key the
/// spend-spike brake paused works again — its spend alert is acknowledged in the name of
/// who resumes it (whoever may manage the key; an institution's administrator only their
/// institution's keys, others' are "not found").
pub async fn resume(
    State(state): State<Arc<AppState>>,
    allowed: Allowed<CanManageKeys>,
    uri: Uri,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    CheckedForm(_form): CheckedForm<RevokeForm>,
) -> Result<Response, AppError> {
    let own = confine(&allowed.principal, None)?;
    let row = keys::owned(state.keys.as_ref(), &key_id, own.as_deref()).await?;
    if row.held.is_empty() {
        return Err(AppError::Conflict(format!("key {key_id} is not paused")));
    }
    crate::alerts::evaluator::acknowledge(&state.writer, &row.held, &allowed.principal.name)
        .await?;
    tracing::info!(user = %crate::format::log_safe(&allowed.principal.name, 64), key_id = %row.key_id, alert = %row.held, "paused key resumed from the dashboard");
    if uri.path().starts_with("/api/") {
        return Ok(axum::Json(
            json!({"key_id": row.key_id, "state": "active", "acknowledged": row.held}),
        )
        .into_response());
    }
    Ok(after_action(
        &state,
        &headers,
        Flash::done(
            "/keys",
            format!(
                "Resumed key {}: its spend alert is acknowledged; every gateway admits it again within seconds.",
                row.key_id
            ),
        ),
    ))
}
