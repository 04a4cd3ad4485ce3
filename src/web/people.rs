//! The People page: an institution's members (from their sign-ins), their groups, their
//! spend this month and each group's; suspending and restoring a member, moving one to
//! another group, and editing a group's policy. Admins and an institution's
//! administrators manage; finance reads. Institution confinement comes from `Scoped`
//! (the institution is in the path or the query, checked there).

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{Html, IntoResponse, Response};
use chrono::{Datelike, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::json;

use super::auth::{
    after_action, Allowed, CheckedForm, CsrfField, Flash, Flashed, Policy, Principal, Role, Scoped,
};
use super::error::AppError;
use super::AppState;
use crate::domain::{Scope, Selection};
use crate::format::money;
use crate::limits::LimitPeriod;
use crate::people::directory::{self, PeopleError};
use crate::people::groups::{Group, MemberLimit};
use crate::people::members::Standing;
use crate::store::usage::{GroupKey, Order};

/// Admin, finance and an institution's administrator: see members and groups.
pub struct SeesPeople;
impl Policy for SeesPeople {
    const WHAT: &'static str = "see people";
    fn allows(p: &Principal) -> bool {
        matches!(p.role, Role::Admin | Role::Finance | Role::InstitutionAdmin)
    }
}

/// Admin and an institution's administrator: suspend, move, edit group policies.
pub struct ManagesPeople;
impl Policy for ManagesPeople {
    const WHAT: &'static str = "manage people";
    fn allows(p: &Principal) -> bool {
        matches!(p.role, Role::Admin | Role::InstitutionAdmin)
    }
}

impl From<PeopleError> for AppError {
    fn from(e: PeopleError) -> Self {
        match e {
            PeopleError::Invalid(m) => AppError::BadRequest(m),
            PeopleError::NoMember { .. } | PeopleError::NoGroup { .. } => AppError::NotFound,
            PeopleError::Store(s) => s.into(),
        }
    }
}

struct MemberView {
    person: String,
    name: String,
    email: String,
    group: String,
    source: &'static str,
    role: &'static str,
    standing: String,
    suspended: bool,
    last_sign_in: String,
    spend: String,
}

struct GroupView {
    id: String,
    name: String,
    members: usize,
    spend: String,
    models: String,
    member_limits: String,
    budget: String,
    budget_period: &'static str,
    keys_per_member: u32,
    max_key_days: u32,
    default_rpm: u32,
    default_tpm: u64,
    max_idle_days: u32,
}

#[derive(Template)]
#[template(path = "people.html")]
struct PeopleTemplate<'a> {
    user: &'a str,
    role: &'a str,
    csrf: &'a str,
    pipeline: bool,
    institution: String,
    institutions: Vec<String>,
    members: Vec<MemberView>,
    shown: usize,
    total: usize,
    groups: Vec<GroupView>,
    group_ids: Vec<String>,
    can_manage: bool,
    /// Admins set a group's shared budget; an institution's administrator does not (the
    /// institution buys it).
    can_budget: bool,
    query: String,
    month: String,
    message: String,
    failed: bool,
}

#[derive(Deserialize, Default)]
pub struct ListQuery {
    #[serde(default)]
    q: String,
}

/// Most members listed on one page (the JSON has them all).
const PAGE_MEMBERS: usize = 500;

struct Listing {
    members: Vec<(crate::people::members::Member, Decimal, u32)>,
    groups: Vec<(Group, usize, Decimal)>,
    month: NaiveDate,
}

/// The members and groups of `institution`, with this month's spend (UTC days) of each
/// member and of each group (its members' spend, under the group they are in now).
async fn listing(state: &AppState, institution: &str) -> Result<Listing, AppError> {
    let (dir, _) = state
        .roster
        .current()
        .await
        .map_err(|e| AppError::Internal(e.into()))?;
    let today = Utc::now().date_naive();
    let month = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).expect("a month");
    let sel = Selection::whole(month, today, Scope::One(institution.to_owned()));
    let spend: BTreeMap<String, Decimal> = state
        .store
        .aggregate(&sel, GroupKey::User, GroupKey::None, Order::Key, 1_000_000)
        .await?
        .into_iter()
        .map(|a| (a.key.clone(), a.cost()))
        .collect();
    let now = Utc::now();
    let mut groups: BTreeMap<String, (Group, usize, Decimal)> = dir
        .groups_of(institution)
        .map(|g| (g.id.clone(), (g.clone(), 0, Decimal::ZERO)))
        .collect();
    let mut members = Vec::new();
    for m in dir.members_of(institution) {
        let policy = dir.policy_of(m);
        let s = spend.get(&m.person_id).copied().unwrap_or_default();
        let g = groups
            .entry(m.group_id.clone())
            .or_insert_with(|| (policy.clone(), 0, Decimal::ZERO));
        g.1 += 1;
        g.2 += s;
        let idle = match m.standing(policy.max_idle_days, now) {
            Standing::Idle { days } => days,
            _ => 0,
        };
        members.push((m.clone(), s, idle));
    }
    members.sort_by(|a, b| a.0.person_id.cmp(&b.0.person_id));
    Ok(Listing {
        members,
        groups: groups.into_values().collect(),
        month,
    })
}

#[allow(clippy::too_many_arguments)]
async fn page(
    state: &AppState,
    principal: &Principal,
    csrf: &str,
    scope: &Scope,
    query: &str,
    message: String,
    failed: bool,
) -> Result<Response, AppError> {
    let institution = match scope {
        Scope::One(i) => i.clone(),
        Scope::All => String::new(),
    };
    let institutions: Vec<String> = if institution.is_empty() {
        state
            .institution_choices("")
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    } else {
        Vec::new()
    };
    let (members, groups, total, month) = if institution.is_empty() {
        (Vec::new(), Vec::new(), 0, String::new())
    } else {
        let l = listing(state, &institution).await?;
        let needle = query.to_lowercase();
        let matching: Vec<_> = l
            .members
            .iter()
            .filter(|(m, _, _)| {
                needle.is_empty()
                    || m.person_id.to_lowercase().contains(&needle)
                    || m.name.to_lowercase().contains(&needle)
                    || m.email.to_lowercase().contains(&needle)
                    || m.group_id.to_lowercase().contains(&needle)
            })
            .collect();
        let total = matching.len();
        let members = matching
            .into_iter()
            .take(PAGE_MEMBERS)
            .map(|(m, s, idle)| MemberView {
                person: m.person_id.clone(),
                name: m.name.clone(),
                email: m.email.clone(),
                group: m.group_id.clone(),
                source: m.group_source.as_str(),
                role: m.role.as_str(),
                standing: if m.suspended {
                    "suspended".into()
                } else if *idle > 0 {
                    format!("idle (no sign-in for {idle}+ days: keys refused)")
                } else {
                    "active".into()
                },
                suspended: m.suspended,
                last_sign_in: m.last_sign_in.format("%Y-%m-%d %H:%M UTC").to_string(),
                spend: money(*s),
            })
            .collect();
        let groups = l
            .groups
            .iter()
            .map(|(g, n, s)| GroupView {
                id: g.id.clone(),
                name: g.name.clone(),
                members: *n,
                spend: money(*s),
                models: g.models.join(", "),
                member_limits: g
                    .member_limits
                    .iter()
                    .map(MemberLimit::label)
                    .collect::<Vec<_>>()
                    .join("\n"),
                budget: g
                    .budget_usd
                    .map(|b| b.normalize().to_string())
                    .unwrap_or_default(),
                budget_period: g.budget_period.as_str(),
                keys_per_member: g.keys_per_member,
                max_key_days: g.max_key_days,
                default_rpm: g.default_rpm,
                default_tpm: g.default_tpm,
                max_idle_days: g.max_idle_days,
            })
            .collect();
        (members, groups, total, l.month.format("%B %Y").to_string())
    };
    let group_ids = groups.iter().map(|g: &GroupView| g.id.clone()).collect();
    let shown = members.len();
    let can_manage = ManagesPeople::allows(principal) && !csrf.is_empty();
    Ok(Html(
        PeopleTemplate {
            user: &principal.name,
            role: principal.role.as_str(),
            csrf,
            pipeline: principal.sees_pipeline(),
            institution,
            institutions,
            members,
            shown,
            total,
            groups,
            group_ids,
            can_manage,
            can_budget: can_manage && principal.role == Role::Admin,
            query: query.to_owned(),
            month,
            message,
            failed,
        }
        .render()?,
    )
    .into_response())
}

/// `GET /people` (HTML) and `GET /api/v1/people` (JSON): the members and groups of the
/// institution in scope.
pub async fn list(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    _: Allowed<SeesPeople>,
    Query(q): Query<ListQuery>,
    uri: Uri,
    Flashed(flash): Flashed,
) -> Result<Response, AppError> {
    if !uri.path().starts_with("/api/") {
        let flash = flash.unwrap_or_default();
        return page(
            &state,
            &scoped.principal,
            &scoped.csrf,
            &scoped.scope,
            &q.q,
            flash.message,
            flash.failed,
        )
        .await;
    }
    let Some(institution) = scoped.scope.institution() else {
        return Err(AppError::BadRequest(
            "name an institution: ?institution=…".into(),
        ));
    };
    let l = listing(&state, institution).await?;
    Ok(axum::Json(json!({
        "institution": institution,
        "month": l.month.to_string(),
        "members": l.members.iter().map(|(m, s, idle)| json!({
            "person": m.person_id, "name": m.name, "email": m.email, "group": m.group_id,
            "group_source": m.group_source.as_str(), "role": m.role.as_str(),
            "suspended": m.suspended, "idle": *idle > 0,
            "last_sign_in": m.last_sign_in.to_rfc3339(), "spend_usd": s.normalize().to_string(),
        })).collect::<Vec<_>>(),
        "groups": l.groups.iter().map(|(g, n, s)| json!({
            "id": g.id, "name": g.name, "members": n, "spend_usd": s.normalize().to_string(),
            "policy": g,
        })).collect::<Vec<_>>(),
    }))
    .into_response())
}

#[derive(Deserialize)]
pub struct SuspendForm {
    #[serde(default)]
    csrf: String,
    /// "1": suspend; "0": restore.
    suspend: String,
}

impl CsrfField for SuspendForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /institutions/{institution}/people/{person}/suspend`.
pub async fn suspend(
    State(state): State<Arc<AppState>>,
    // Confines the institution in the path to the principal's own.
    _scoped: Scoped,
    allowed: Allowed<ManagesPeople>,
    uri: Uri,
    headers: HeaderMap,
    Path((institution, person)): Path<(String, String)>,
    CheckedForm(form): CheckedForm<SuspendForm>,
) -> Result<Response, AppError> {
    let suspend = form.suspend == "1";
    directory::set_suspended(
        &state.writer,
        &institution,
        &person,
        suspend,
        &allowed.principal.name,
    )
    .await?;
    let message = if suspend {
        format!("{person} is suspended: every key of theirs is refused on every gateway within seconds.")
    } else {
        format!("{person} is restored.")
    };
    Ok(done(&state, &uri, &headers, &institution, message))
}

/// What a successful action answers: the API its message as JSON; a page is sent to the
/// People page of `institution`, which says it (post/redirect/get).
fn done(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    institution: &str,
    message: String,
) -> Response {
    if uri.path().starts_with("/api/") {
        return axum::Json(json!({ "message": message })).into_response();
    }
    let to = format!(
        "/people?institution={}",
        crate::format::urlencode(institution)
    );
    after_action(state, headers, Flash::done(to, message))
}

#[derive(Deserialize)]
pub struct GroupForm {
    #[serde(default)]
    csrf: String,
    /// A group id; empty: the group the person's claims give, from their next sign-in.
    #[serde(default)]
    group: String,
}

impl CsrfField for GroupForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

/// `POST /institutions/{institution}/people/{person}/group`.
pub async fn move_member(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    allowed: Allowed<ManagesPeople>,
    uri: Uri,
    headers: HeaderMap,
    Path((institution, person)): Path<(String, String)>,
    CheckedForm(form): CheckedForm<GroupForm>,
) -> Result<Response, AppError> {
    let (dir, _) = state
        .roster
        .current()
        .await
        .map_err(|e| AppError::Internal(e.into()))?;
    let group = Some(form.group.trim()).filter(|g| !g.is_empty());
    let result = directory::set_group(
        &state.writer,
        &dir,
        &institution,
        &person,
        group,
        &allowed.principal.name,
    )
    .await;
    let (message, failed) = match result {
        Ok(m) => match group {
            Some(_) => (
                format!(
                    "{person} is now in group {} (kept across sign-ins).",
                    m.group_id
                ),
                false,
            ),
            None => (
                format!("{person}'s group follows their sign-in claims again."),
                false,
            ),
        },
        Err(PeopleError::NoGroup { group, .. }) => (format!("There is no group `{group}`."), true),
        Err(e) => return Err(e.into()),
    };
    if !failed {
        return Ok(done(&state, &uri, &headers, &institution, message));
    }
    if uri.path().starts_with("/api/") {
        return Err(AppError::BadRequest(message));
    }
    page(
        &state,
        &scoped.principal,
        &allowed.csrf,
        &scoped.scope,
        "",
        message,
        failed,
    )
    .await
}

#[derive(Deserialize)]
pub struct PolicyForm {
    #[serde(default)]
    csrf: String,
    /// The new group's id (adding a group; the path names an existing one).
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    models: String,
    /// One per line: `15 requests per day`, `$5 per month`.
    #[serde(default)]
    member_limits: String,
    #[serde(default)]
    budget_usd: String,
    #[serde(default)]
    budget_period: String,
    #[serde(default)]
    keys_per_member: String,
    #[serde(default)]
    max_key_days: String,
    #[serde(default)]
    default_rpm: String,
    #[serde(default)]
    default_tpm: String,
    #[serde(default)]
    max_idle_days: String,
}

impl CsrfField for PolicyForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

fn whole<T: std::str::FromStr + Default>(field: &str, v: &str) -> Result<T, String> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(T::default());
    }
    v.parse()
        .map_err(|_| format!("{field} must be a whole number (0 or empty: no limit)"))
}

/// The policy a form describes, starting from `before` (the group's budget stays as it
/// was unless `may_budget`).
fn policy_of_form(before: &Group, f: &PolicyForm, may_budget: bool) -> Result<Group, String> {
    let mut g = before.clone();
    g.name = f.name.trim().to_owned();
    g.models = f
        .models
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    g.member_limits = f
        .member_limits
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(MemberLimit::parse)
        .collect::<Result<_, _>>()?;
    g.keys_per_member = whole("keys per member", &f.keys_per_member)?;
    g.max_key_days = whole("longest key lifetime", &f.max_key_days)?;
    g.default_rpm = whole("requests per minute", &f.default_rpm)?;
    g.default_tpm = whole("tokens per minute", &f.default_tpm)?;
    g.max_idle_days = whole("idle days", &f.max_idle_days)?;
    if may_budget {
        let b = f.budget_usd.trim().trim_start_matches('$');
        g.budget_usd = if b.is_empty() {
            None
        } else {
            Some(
                b.parse::<Decimal>()
                    .map_err(|_| "the group budget must be an amount of USD".to_owned())?,
            )
        };
        if !f.budget_period.is_empty() {
            g.budget_period = f.budget_period.parse::<LimitPeriod>()?;
        }
    }
    g.validate()?;
    Ok(g)
}

/// `POST /institutions/{institution}/groups/{group}/policy`: sets a group's policy. The
/// group's shared budget is the platform's to set (admin).
pub async fn set_policy(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    allowed: Allowed<ManagesPeople>,
    uri: Uri,
    headers: HeaderMap,
    Path((institution, group)): Path<(String, String)>,
    CheckedForm(form): CheckedForm<PolicyForm>,
) -> Result<Response, AppError> {
    save_policy(
        &state,
        scoped,
        allowed,
        (&uri, &headers),
        institution,
        group,
        form,
    )
    .await
}

/// `POST /institutions/{institution}/groups`: adds a group (its id in the form).
pub async fn add_group(
    State(state): State<Arc<AppState>>,
    scoped: Scoped,
    allowed: Allowed<ManagesPeople>,
    uri: Uri,
    headers: HeaderMap,
    Path(institution): Path<String>,
    CheckedForm(form): CheckedForm<PolicyForm>,
) -> Result<Response, AppError> {
    let group = form.id.trim().to_owned();
    save_policy(
        &state,
        scoped,
        allowed,
        (&uri, &headers),
        institution,
        group,
        form,
    )
    .await
}

async fn save_policy(
    state: &AppState,
    scoped: Scoped,
    allowed: Allowed<ManagesPeople>,
    (uri, headers): (&Uri, &HeaderMap),
    institution: String,
    group: String,
    form: PolicyForm,
) -> Result<Response, AppError> {
    let (dir, _) = state
        .roster
        .current()
        .await
        .map_err(|e| AppError::Internal(e.into()))?;
    let before = dir
        .group(&institution, &group)
        .cloned()
        .unwrap_or_else(|| Group::open(&institution, &group));
    let may_budget = allowed.principal.role == Role::Admin;
    let (message, failed) = match policy_of_form(&before, &form, may_budget) {
        Ok(g) => {
            directory::set_group_policy(&state.writer, &g, &allowed.principal.name).await?;
            (
                format!(
                    "Group {} saved: it applies on every gateway within seconds.",
                    g.id
                ),
                false,
            )
        }
        Err(e) => (format!("Group {group} not saved: {e}."), true),
    };
    if !failed {
        return Ok(done(state, uri, headers, &institution, message));
    }
    if uri.path().starts_with("/api/") {
        return Err(AppError::BadRequest(message));
    }
    page(
        state,
        &scoped.principal,
        &allowed.csrf,
        &scoped.scope,
        "",
        message,
        failed,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn form() -> PolicyForm {
        PolicyForm {
            csrf: String::new(),
            id: String::new(),
            name: "Students".into(),
            models: "gpt-4o-mini, claude-haiku*".into(),
            member_limits: "15 requests per day\n$5 per month\n".into(),
            budget_usd: "900".into(),
            budget_period: "month".into(),
            keys_per_member: "2".into(),
            max_key_days: "".into(),
            default_rpm: "20".into(),
            default_tpm: "".into(),
            max_idle_days: "120".into(),
        }
    }

    #[test]
    fn a_policy_form_becomes_a_group_and_only_admins_set_its_budget() {
        let mut before = Group::open("uni", "students");
        before.budget_usd = Some(dec!(500));
        let g = policy_of_form(&before, &form(), false).unwrap();
        assert_eq!(g.models, vec!["gpt-4o-mini", "claude-haiku*"]);
        assert_eq!(g.member_limits.len(), 2);
        assert_eq!(g.keys_per_member, 2);
        assert_eq!(g.max_key_days, 0);
        assert_eq!(g.default_rpm, 20);
        assert_eq!(
            g.budget_usd,
            Some(dec!(500)),
            "an institution admin keeps the budget"
        );
        let g = policy_of_form(&before, &form(), true).unwrap();
        assert_eq!(g.budget_usd, Some(dec!(900)));
        let mut bad = form();
        bad.member_limits = "lots per day".into();
        assert!(policy_of_form(&before, &bad, true).is_err());
        let mut bad = form();
        bad.keys_per_member = "-1".into();
        assert!(policy_of_form(&before, &bad, true).is_err());
    }
}
