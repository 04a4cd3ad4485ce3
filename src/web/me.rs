//! "My usage": a person's own spend this month by day and by model, each limit that
//! applies to them (used, remaining, when it renews), their keys, and creating and
//! revoking their own keys within their group's policy. The only pages a member reaches.
//!
//! `Me` is the one place the person is taken from the request: a session of someone
//! who signed in with their institution's account, or (for scripts, `GET /api/v1/me*`
//! only) one of their own proxy keys as the bearer token. Every read below is confined
//! to that (institution, person); nothing here takes an institution or person from the
//! URL or a form.

use std::sync::Arc;

use askama::Template;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;

use super::auth::{after_action, Authed, CheckedForm, CsrfField, Flash, Flashed, Principal, Role};
use super::chart::{Chart, Kind, Series};
use super::error::AppError;
use super::AppState;
use crate::domain::{Scope, Selection};
use crate::format::{money, unsigned_zero};
use crate::keys::{self, KeyKind};
use crate::limits::{Limit, LimitScope, Metric, Standing};
use crate::people::groups::Group;
use crate::people::members::{Member, Standing as MemberStanding};
use crate::people::own_keys::{self, KeyRequest, OwnKeyError};
use crate::store::keys::KeyRow;
use crate::store::usage::{Agg, GroupKey, Order};

/// The person a request is about, and nothing else.
pub struct Me {
    pub principal: Principal,
    /// The session's CSRF token (empty with a key as bearer: no forms then).
    pub csrf: String,
    pub institution: String,
    pub person: String,
}

impl FromRequestParts<Arc<AppState>> for Me {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, AppError> {
        let api = parts.uri.path().starts_with("/api/");
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if let Some(presented) = bearer.filter(|b| keys::key_id_of(b).is_some()) {
            if !api || parts.method != axum::http::Method::GET {
                return Err(AppError::Forbidden);
            }
            return by_own_key(state, presented).await;
        }
        let Authed { principal, csrf } = Authed::from_request_parts(parts, state).await?;
        match (principal.institution.clone(), principal.person.clone()) {
            (Some(institution), Some(person)) => Ok(Me {
                principal,
                csrf,
                institution,
                person,
            }),
            _ => Err(AppError::Refused(
                "“My usage” is for people who sign in with their institution's account".into(),
            )),
        }
    }
}

/// A proxy key presented to `/api/v1/me*`: the person it bills to. Revoked, expired
/// and unknown keys are refused as at the gateway; a suspended owner still reads their
/// own standing.
async fn by_own_key(state: &AppState, presented: &str) -> Result<Me, AppError> {
    let refused = || AppError::Unauthenticated {
        api: true,
        next: String::new(),
    };
    let id = keys::key_id_of(presented).ok_or_else(refused)?;
    let row = state.keys.key(id).await?.ok_or_else(refused)?;
    let key = keys::Key::from_row(&row).ok_or_else(refused)?;
    if key.kind != KeyKind::Proxy || key.admit(presented, Utc::now()).is_err() {
        return Err(refused());
    }
    Ok(Me {
        principal: Principal {
            name: key.user_id.clone(),
            role: Role::Member,
            institution: Some(key.institution_id.clone()),
            person: Some(key.user_id.clone()),
        },
        csrf: String::new(),
        institution: key.institution_id,
        person: key.user_id,
    })
}

/// Whether limit `l` applies to this person: their institution's, their group's, their
/// own, or one of their keys'.
fn applies(l: &Limit, me: &Me, group: Option<&str>, key_ids: &[String]) -> bool {
    l.institution_id == me.institution
        && match l.scope {
            LimitScope::Institution => true,
            LimitScope::User => l.subject == me.person,
            LimitScope::Group => group == Some(l.subject.as_str()),
            LimitScope::Key => key_ids.contains(&l.subject),
        }
}

/// Everything "My usage" shows, read once per request.
struct Usage {
    member: Option<Member>,
    policy: Option<Group>,
    from: NaiveDate,
    to: NaiveDate,
    by_day: Vec<Agg>,
    by_model: Vec<Agg>,
    limits: Vec<Standing>,
    keys: Vec<KeyRow>,
    tz: chrono_tz::Tz,
}

async fn read(state: &AppState, me: &Me, now: DateTime<Utc>) -> Result<Usage, AppError> {
    let (directory, derived) = state
        .roster
        .current()
        .await
        .map_err(|e| AppError::Internal(e.into()))?;
    let member = directory.member(&me.institution, &me.person).cloned();
    let policy = member.as_ref().map(|m| directory.policy_of(m));
    let today = now.date_naive();
    let from = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).expect("a month");
    let mut sel = Selection::whole(from, today, Scope::One(me.institution.clone()));
    sel.user = Some(me.person.clone());
    let mut keys = state.keys.keys_of_user(&me.institution, &me.person).await?;
    keys.retain(|k| k.kind == KeyKind::Proxy.as_str());
    keys.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then(a.key_id.cmp(&b.key_id))
    });
    let key_ids: Vec<String> = keys.iter().map(|k| k.key_id.clone()).collect();
    let group = member.as_ref().map(|m| m.group_id.clone());
    let keep = |l: &Limit| applies(l, me, group.as_deref(), &key_ids);
    let (by_day, by_model, limits) = tokio::try_join!(
        async {
            Ok::<_, AppError>(
                state
                    .store
                    .aggregate(&sel, GroupKey::Day, GroupKey::None, Order::Key, 62)
                    .await?,
            )
        },
        async {
            Ok(state
                .store
                .aggregate(&sel, GroupKey::Model, GroupKey::None, Order::CostDesc, 100)
                .await?)
        },
        async {
            crate::limits::service::standings_of(
                &state.store,
                &state.limits,
                &derived,
                &|i| state.cfg.institution_tz(i),
                Some(&me.institution),
                now,
                &keep,
                Some(&me.person),
            )
            .await
            .map_err(AppError::Internal)
        },
    )?;
    Ok(Usage {
        member,
        policy,
        from,
        to: today,
        by_day,
        by_model,
        limits,
        keys,
        tz: state.cfg.institution_tz(&me.institution),
    })
}

fn exact(d: Decimal) -> String {
    // Never "-0": a sum of +x and −x is zero.
    unsigned_zero(d.normalize()).to_string()
}

fn amount(metric: Metric, d: Decimal) -> String {
    match metric {
        Metric::Usd => money(d),
        _ => exact(d),
    }
}

fn local(t: DateTime<Utc>, tz: chrono_tz::Tz) -> String {
    t.with_timezone(&tz).format("%Y-%m-%d %H:%M %Z").to_string()
}

fn date(secs: u32) -> String {
    DateTime::from_timestamp(i64::from(secs), 0)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

fn key_state(k: &KeyRow, now: DateTime<Utc>) -> &'static str {
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

fn standing_text(u: &Usage, now: DateTime<Utc>) -> (String, &'static str) {
    match (&u.member, &u.policy) {
        (Some(m), Some(p)) => match m.standing(p.max_idle_days, now) {
            MemberStanding::Active => (String::new(), "active"),
            MemberStanding::Suspended => (
                "Your access has been suspended by your institution's administrator: \
                 every key of yours is refused."
                    .into(),
                "suspended",
            ),
            MemberStanding::Idle { days } => (
                format!(
                    "You had not signed in for more than {days} days, so your keys stopped \
                     working; they work again from your next sign-in."
                ),
                "idle",
            ),
        },
        _ => (String::new(), "active"),
    }
}

fn policy_text(p: &Group) -> Vec<String> {
    let mut out = vec![if p.models.is_empty() {
        "Every model.".to_owned()
    } else {
        format!("Models: {}.", p.models.join(", "))
    }];
    if p.keys_per_member > 0 {
        out.push(format!("Up to {} key(s) at once.", p.keys_per_member));
    }
    if p.max_key_days > 0 {
        out.push(format!("A key works for at most {} days.", p.max_key_days));
    }
    if p.default_rpm > 0 || p.default_tpm > 0 {
        out.push(format!(
            "Per key: {} requests and {} tokens per minute.",
            if p.default_rpm > 0 {
                p.default_rpm.to_string()
            } else {
                "any".into()
            },
            if p.default_tpm > 0 {
                p.default_tpm.to_string()
            } else {
                "any".into()
            },
        ));
    }
    if p.max_idle_days > 0 {
        out.push(format!(
            "Keys stop working after {} days without a sign-in (until the next one).",
            p.max_idle_days
        ));
    }
    out
}

struct DayView {
    day: String,
    requests: i64,
    cost: String,
}

struct ModelView {
    model: String,
    requests: i64,
    tokens: i64,
    cost: String,
}

struct LimitView {
    label: String,
    applies: String,
    used: String,
    remaining: String,
    share: u32,
    renews: String,
}

struct KeyView {
    key_id: String,
    name: String,
    expires: String,
    state: &'static str,
    created: String,
}

#[derive(Template)]
#[template(path = "me.html")]
struct MeTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    person: &'a str,
    name: String,
    group: String,
    standing: String,
    period: String,
    total: String,
    requests: i64,
    chart: String,
    days: Vec<DayView>,
    models: Vec<ModelView>,
    limits: Vec<LimitView>,
    keys: Vec<KeyView>,
    policy: Vec<String>,
    can_create: bool,
    max_days: u32,
    message: String,
    failed: bool,
    /// A key just created: (id, secret), shown once.
    created: Option<(String, String)>,
    gateway: String,
}

fn limit_subject(s: &Standing) -> String {
    match s.scope {
        LimitScope::Institution => "your institution (shared)".into(),
        LimitScope::Group => format!("your group `{}` (shared)", s.subject),
        LimitScope::User => "you".into(),
        LimitScope::Key => format!("key {}", s.subject),
    }
}

fn share(s: &Standing) -> u32 {
    if s.limit.is_zero() {
        return 100;
    }
    ((s.used + s.reserved) * Decimal::ONE_HUNDRED / s.limit)
        .round()
        .min(Decimal::ONE_HUNDRED)
        .max(Decimal::ZERO)
        .try_into()
        .unwrap_or(100)
}

async fn page(
    state: &AppState,
    me: &Me,
    message: String,
    failed: bool,
    created: Option<(String, String)>,
) -> Result<Response, AppError> {
    let now = Utc::now();
    let u = read(state, me, now).await?;
    let (standing, standing_kind) = standing_text(&u, now);
    let mut days = Vec::new();
    let mut labels = Vec::new();
    let mut values = Vec::new();
    let mut by_day = u.by_day.iter().peekable();
    let mut d = u.from;
    while d <= u.to {
        let label = d.format("%Y-%m-%d").to_string();
        let a = by_day.next_if(|a| a.key == label);
        labels.push(d.format("%d").to_string());
        values.push(a.map_or(Decimal::ZERO, Agg::cost));
        if let Some(a) = a {
            days.push(DayView {
                day: label,
                requests: a.events,
                cost: money(a.cost()),
            });
        }
        d += chrono::Duration::days(1);
    }
    let total: Decimal = u.by_day.iter().map(Agg::cost).sum();
    let requests: i64 = u.by_day.iter().map(|a| a.events).sum();
    let chart = Chart {
        title: "Spend per day (USD)".into(),
        kind: Kind::Bar,
        labels,
        series: vec![Series {
            name: "USD".into(),
            values,
        }],
    };
    let can_create = !me.csrf.is_empty() && u.member.is_some() && standing_kind == "active";
    let role = me.principal.role.as_str();
    let t = MeTemplate {
        user: &me.principal.name,
        role,
        csrf: &me.csrf,
        pipeline: me.principal.sees_pipeline(),
        person: &me.person,
        name: u
            .member
            .as_ref()
            .map(|m| m.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| me.person.clone()),
        group: u
            .policy
            .as_ref()
            .map(|p| p.label().to_owned())
            .unwrap_or_default(),
        standing,
        period: format!("{} – {} (UTC days)", u.from, u.to),
        total: money(total),
        requests,
        chart: chart.svg(),
        days,
        models: u
            .by_model
            .iter()
            .map(|a| ModelView {
                model: a.key.clone(),
                requests: a.events,
                tokens: a.input_tokens
                    + a.cache_read_tokens
                    + a.cache_write_tokens
                    + a.output_tokens,
                cost: money(a.cost()),
            })
            .collect(),
        limits: u
            .limits
            .iter()
            .map(|s| LimitView {
                label: s.label.clone(),
                applies: limit_subject(s),
                used: amount(s.metric, s.used + s.reserved),
                remaining: amount(s.metric, s.remaining),
                share: share(s),
                renews: local(s.period_end, u.tz),
            })
            .collect(),
        keys: u
            .keys
            .iter()
            .map(|k| KeyView {
                key_id: k.key_id.clone(),
                name: k.name.clone(),
                expires: if k.expires_at == 0 {
                    "never".into()
                } else {
                    date(k.expires_at)
                },
                state: key_state(k, now),
                created: date(k.created_at),
            })
            .collect(),
        policy: u.policy.as_ref().map(policy_text).unwrap_or_default(),
        can_create,
        max_days: u.policy.as_ref().map_or(0, |p| p.max_key_days),
        message,
        failed,
        created,
        gateway: state.gateway_url(),
    };
    Ok(Html(t.render()?).into_response())
}

fn limit_json(s: &Standing, tz: chrono_tz::Tz) -> serde_json::Value {
    json!({
        "id": s.limit_id, "label": s.label, "applies_to": limit_subject(s),
        "scope": s.scope.to_string(), "metric": s.metric, "period": s.period, "mode": s.mode,
        "limit": exact(s.limit), "used": exact(s.used), "reserved": exact(s.reserved),
        "remaining": exact(s.remaining),
        "period_start": s.period_start.to_rfc3339(), "renews_at": s.period_end.to_rfc3339(),
        "renews_at_local": local(s.period_end, tz),
    })
}

fn key_json(k: &KeyRow, now: DateTime<Utc>) -> serde_json::Value {
    json!({
        "key_id": k.key_id, "name": k.name, "state": key_state(k, now),
        "expires_at": (k.expires_at > 0).then(|| date(k.expires_at)),
        "created_at": date(k.created_at),
    })
}

fn agg_json(a: &Agg) -> serde_json::Value {
    json!({
        "key": a.key, "requests": a.events,
        "input_tokens": a.input_tokens, "cache_read_tokens": a.cache_read_tokens,
        "cache_write_tokens": a.cache_write_tokens, "output_tokens": a.output_tokens,
        "cost_usd": exact(a.cost()),
    })
}

/// `GET /me` (the page) and `GET /api/v1/me` (the same as JSON).
pub async fn show(
    State(state): State<Arc<AppState>>,
    me: Me,
    uri: Uri,
    Flashed(flash): Flashed,
) -> Result<Response, AppError> {
    if !uri.path().starts_with("/api/") {
        let f = flash.unwrap_or_default();
        return page(&state, &me, f.message, f.failed, f.created).await;
    }
    let now = Utc::now();
    let u = read(&state, &me, now).await?;
    let (_, standing) = standing_text(&u, now);
    let total: Decimal = u.by_day.iter().map(Agg::cost).sum();
    Ok(axum::Json(json!({
        "person": me.person,
        "institution": me.institution,
        "name": u.member.as_ref().map(|m| m.name.clone()),
        "group": u.policy.as_ref().map(|p| json!({
            "id": p.id, "name": p.label(), "models": p.models,
            "keys_per_member": p.keys_per_member, "max_key_days": p.max_key_days,
            "default_rpm": p.default_rpm, "default_tpm": p.default_tpm,
            "max_idle_days": p.max_idle_days,
        })),
        "standing": standing,
        "period": {"from": u.from.to_string(), "to": u.to.to_string()},
        "spend": {
            "cost_usd": exact(total),
            "requests": u.by_day.iter().map(|a| a.events).sum::<i64>(),
            "by_day": u.by_day.iter().map(agg_json).collect::<Vec<_>>(),
            "by_model": u.by_model.iter().map(agg_json).collect::<Vec<_>>(),
        },
        "limits": u.limits.iter().map(|s| limit_json(s, u.tz)).collect::<Vec<_>>(),
        "keys": u.keys.iter().map(|k| key_json(k, now)).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// `GET /api/v1/me/keys` (and `/me/keys`, which is the page's keys section).
pub async fn keys(
    State(state): State<Arc<AppState>>,
    me: Me,
    uri: Uri,
) -> Result<Response, AppError> {
    if !uri.path().starts_with("/api/") {
        return Ok(Redirect::to("/me#keys").into_response());
    }
    let now = Utc::now();
    let rows = state.keys.keys_of_user(&me.institution, &me.person).await?;
    let mut rows: Vec<_> = rows
        .into_iter()
        .filter(|k| k.kind == KeyKind::Proxy.as_str())
        .collect();
    rows.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then(a.key_id.cmp(&b.key_id))
    });
    Ok(
        axum::Json(json!({"keys": rows.iter().map(|k| key_json(k, now)).collect::<Vec<_>>()}))
            .into_response(),
    )
}

/// `GET /api/v1/me/limits` (and `/me/limits`, the page's limits section).
pub async fn limits(
    State(state): State<Arc<AppState>>,
    me: Me,
    uri: Uri,
) -> Result<Response, AppError> {
    if !uri.path().starts_with("/api/") {
        return Ok(Redirect::to("/me#limits").into_response());
    }
    let u = read(&state, &me, Utc::now()).await?;
    Ok(axum::Json(
        json!({"limits": u.limits.iter().map(|s| limit_json(s, u.tz)).collect::<Vec<_>>()}),
    )
    .into_response())
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    /// Days; empty: as long as the group allows.
    #[serde(default)]
    days: String,
}

impl CsrfField for CreateForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /me/keys/create`: a key of one's own, shown once. Refusals (the group's
/// policy, a suspension) are said on the page.
pub async fn create(
    State(state): State<Arc<AppState>>,
    me: Me,
    headers: HeaderMap,
    CheckedForm(form): CheckedForm<CreateForm>,
) -> Result<Response, AppError> {
    let days = match form.days.trim() {
        "" => None,
        d => match d.parse::<u32>() {
            Ok(d) => Some(d),
            Err(_) => {
                return page(
                    &state,
                    &me,
                    "Days must be a whole number.".into(),
                    true,
                    None,
                )
                .await
            }
        },
    };
    let (directory, _) = state
        .roster
        .current()
        .await
        .map_err(|e| AppError::Internal(e.into()))?;
    // The member as stored now (a suspension a second ago counts).
    let Some(member) = state
        .writer
        .member(&me.institution, &me.person)
        .await?
        .map(|r| crate::people::directory::member_of_row(&r))
    else {
        return page(
            &state,
            &me,
            "Sign in again to create keys.".into(),
            true,
            None,
        )
        .await;
    };
    let policy = directory.policy_of(&member);
    let req = KeyRequest {
        name: form.name,
        days,
    };
    match own_keys::create(state.keys.as_ref(), &member, &policy, &req).await {
        Ok((row, secret)) => {
            tracing::info!(institution = %me.institution, key_id = %row.key_id, "member created a key");
            Ok(after_action(
                &state,
                &headers,
                Flash {
                    created: Some((row.key_id.clone(), secret.secret)),
                    ..Flash::done("/me", format!("Key {} created.", row.key_id))
                },
            ))
        }
        Err(OwnKeyError::Refused(r)) => page(&state, &me, format!("{r}."), true, None).await,
        Err(OwnKeyError::Key(e)) => Err(e.into()),
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

/// `POST /me/keys/{key_id}/revoke`: one of one's own keys (another's is "not found").
pub async fn revoke(
    State(state): State<Arc<AppState>>,
    me: Me,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    CheckedForm(_): CheckedForm<RevokeForm>,
) -> Result<Response, AppError> {
    match keys::revoke_own(
        state.keys.as_ref(),
        &key_id,
        &me.institution,
        &me.person,
        &me.person,
    )
    .await
    {
        Ok(_) => Ok(after_action(
            &state,
            &headers,
            Flash::done("/me", format!("Key {key_id} revoked.")),
        )),
        Err(keys::KeyError::AlreadyRevoked(_)) => {
            page(
                &state,
                &me,
                format!("Key {key_id} was already revoked."),
                true,
                None,
            )
            .await
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST /me/keys/{key_id}/resume`: one of one's own keys that the spend-spike brake
/// paused works again — its spend alert is acknowledged in the owner's name (another's
/// key is "not found").
pub async fn resume(
    State(state): State<Arc<AppState>>,
    me: Me,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    CheckedForm(_): CheckedForm<RevokeForm>,
) -> Result<Response, AppError> {
    let row = keys::owned_by(state.keys.as_ref(), &key_id, &me.institution, &me.person).await?;
    if row.held.is_empty() {
        return Err(AppError::Conflict(format!("key {key_id} is not paused")));
    }
    crate::alerts::evaluator::acknowledge(&state.writer, &row.held, &me.person).await?;
    tracing::info!(institution = %me.institution, key_id = %row.key_id, "member resumed their paused key");
    Ok(after_action(
        &state,
        &headers,
        Flash::done(
            "/me",
            format!("Key {key_id} resumed: its spend alert is acknowledged in your name; it works again within seconds."),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{LimitMode, LimitPeriod};
    use rust_decimal_macros::dec;

    #[test]
    fn money_reads_as_dollars_once() {
        assert_eq!(money(dec!(1234.5)), "$1,234.50");
        assert_eq!(money(dec!(0.004)), "$0.00");
        assert_eq!(money(dec!(-2.005)), "-$2.01");
    }

    fn me() -> Me {
        Me {
            principal: Principal {
                name: "a".into(),
                role: Role::Member,
                institution: Some("uni".into()),
                person: Some("a".into()),
            },
            csrf: String::new(),
            institution: "uni".into(),
            person: "a".into(),
        }
    }

    fn limit(inst: &str, scope: LimitScope, subject: &str) -> Limit {
        Limit {
            institution_id: inst.into(),
            scope,
            subject: subject.into(),
            metric: Metric::Usd,
            period: LimitPeriod::Month,
            amount: dec!(5),
            mode: LimitMode::Block,
        }
    }

    #[test]
    fn a_person_sees_the_limits_that_apply_to_them_and_no_one_elses() {
        let keys = vec!["k1".to_owned()];
        let me = me();
        let yes = [
            limit("uni", LimitScope::Institution, ""),
            limit("uni", LimitScope::User, "a"),
            limit("uni", LimitScope::Group, "students"),
            limit("uni", LimitScope::Key, "k1"),
        ];
        let no = [
            limit("other", LimitScope::Institution, ""),
            limit("other", LimitScope::User, "a"),
            limit("uni", LimitScope::User, "b"),
            limit("uni", LimitScope::Group, "staff"),
            limit("uni", LimitScope::Key, "k2"),
        ];
        for l in &yes {
            assert!(applies(l, &me, Some("students"), &keys), "{}", l.id());
        }
        for l in &no {
            assert!(!applies(l, &me, Some("students"), &keys), "{}", l.id());
        }
        assert!(
            !applies(&yes[2], &me, None, &keys),
            "no group, no group limit"
        );
    }
}
