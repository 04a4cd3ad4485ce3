//! The people and groups of every institution as one value, read from the store (and
//! the config's `[[groups]]`), and the operations on them: a sign-in, an administrator
//! moving or suspending a member, a group's policy changed. Every change is a new row
//! and an entry in the key log (who, when, what).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::groups::{Group, MemberLimit};
use super::members::{GroupSource, Member, MemberRole};
use super::sso::Mapped;
use crate::limits::{Derived, DerivedSource, LimitPeriod};
use crate::store::keys::KeyEventRow;
use crate::store::people::{GroupRow, MemberRow};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PeopleError {
    #[error("{0}")]
    Invalid(String),
    #[error("no member `{person}` in {institution}")]
    NoMember { institution: String, person: String },
    #[error("no group `{group}` in {institution}")]
    NoGroup { institution: String, group: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Groups and members as last read.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    groups: BTreeMap<(String, String), Group>,
    members: BTreeMap<(String, String), Member>,
}

fn at(t: u32) -> DateTime<Utc> {
    DateTime::from_timestamp(i64::from(t), 0).unwrap_or_default()
}

fn secs(t: DateTime<Utc>) -> u32 {
    u32::try_from(t.timestamp().max(0)).unwrap_or(u32::MAX)
}

fn version_now() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0)
}

impl Group {
    fn from_row(r: &GroupRow) -> Result<Self, String> {
        let member_limits: Vec<MemberLimit> = if r.member_limits.is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&r.member_limits).map_err(|e| e.to_string())?
        };
        let g = Group {
            institution: r.institution_id.clone(),
            id: r.group_id.clone(),
            name: r.name.clone(),
            models: r.models.clone(),
            member_limits,
            budget_usd: (!r.budget_usd.is_empty())
                .then(|| r.budget_usd.parse())
                .transpose()
                .map_err(|_| format!("budget {:?} is not a number", r.budget_usd))?,
            budget_period: r.budget_period.parse().unwrap_or(LimitPeriod::Month),
            keys_per_member: r.keys_per_member,
            max_key_days: r.max_key_days,
            default_rpm: r.default_rpm,
            default_tpm: r.default_tpm,
            max_idle_days: r.max_idle_days,
        };
        g.validate()?;
        Ok(g)
    }

    fn row(&self, removed: bool, actor: &str) -> GroupRow {
        GroupRow {
            institution_id: self.institution.clone(),
            group_id: self.id.clone(),
            version: version_now(),
            name: self.name.clone(),
            models: self.models.clone(),
            member_limits: serde_json::to_string(&self.member_limits).expect("limits serialize"),
            budget_usd: self
                .budget_usd
                .map(|b| b.normalize().to_string())
                .unwrap_or_default(),
            budget_period: self.budget_period.as_str().into(),
            keys_per_member: self.keys_per_member,
            max_key_days: self.max_key_days,
            default_rpm: self.default_rpm,
            default_tpm: self.default_tpm,
            max_idle_days: self.max_idle_days,
            removed: u8::from(removed),
            updated_at: secs(Utc::now()),
            updated_by: actor.to_owned(),
        }
    }
}

impl Member {
    fn from_row(r: &MemberRow) -> Self {
        Member {
            institution_id: r.institution_id.clone(),
            person_id: r.person_id.clone(),
            name: r.name.clone(),
            email: r.email.clone(),
            group_id: r.group_id.clone(),
            role: MemberRole::parse(&r.role).unwrap_or_default(),
            group_source: GroupSource::parse(&r.group_source),
            suspended: r.suspended == 1,
            last_sign_in: at(r.last_sign_in),
            created_at: at(r.created_at),
        }
    }

    fn row(&self, actor: &str) -> MemberRow {
        MemberRow {
            institution_id: self.institution_id.clone(),
            person_id: self.person_id.clone(),
            version: version_now(),
            name: self.name.clone(),
            email: self.email.clone(),
            group_id: self.group_id.clone(),
            role: self.role.as_str().into(),
            group_source: self.group_source.as_str().into(),
            suspended: u8::from(self.suspended),
            last_sign_in: secs(self.last_sign_in),
            created_at: secs(self.created_at),
            updated_at: secs(Utc::now()),
            updated_by: actor.to_owned(),
        }
    }
}

async fn log(
    store: &Store,
    actor: &str,
    action: &str,
    institution: &str,
    detail: String,
) -> Result<(), StoreError> {
    let now = Utc::now();
    store
        .record_key_event(&KeyEventRow {
            at: secs(now),
            at_ms: now.timestamp_subsec_millis().min(999) as u16,
            actor: actor.to_owned(),
            action: action.to_owned(),
            key_id: String::new(),
            institution_id: institution.to_owned(),
            detail,
        })
        .await
}

impl Directory {
    /// Reads every group (the config's, replaced by those set on the dashboard) and every
    /// member.
    pub async fn load(store: &Store, configured: &[Group]) -> Result<Self, StoreError> {
        let (groups, members) =
            tokio::try_join!(store.current_groups(), store.current_members(None))?;
        let mut d = Directory::default();
        for g in configured {
            d.groups
                .insert((g.institution.clone(), g.id.clone()), g.clone());
        }
        for r in &groups {
            let key = (r.institution_id.clone(), r.group_id.clone());
            if r.removed == 1 {
                d.groups.remove(&key);
                continue;
            }
            match Group::from_row(r) {
                Ok(g) => {
                    d.groups.insert(key, g);
                }
                Err(e) => {
                    tracing::warn!(group = %crate::format::log_safe(&r.group_id, 80), error = %e, "ignoring an unreadable group")
                }
            }
        }
        for r in &members {
            d.members.insert(
                (r.institution_id.clone(), r.person_id.clone()),
                Member::from_row(r),
            );
        }
        Ok(d)
    }

    pub fn group(&self, institution: &str, id: &str) -> Option<&Group> {
        self.groups.get(&(institution.to_owned(), id.to_owned()))
    }

    pub fn groups_of<'a>(&'a self, institution: &'a str) -> impl Iterator<Item = &'a Group> + 'a {
        self.groups
            .values()
            .filter(move |g| g.institution == institution)
    }

    pub fn member(&self, institution: &str, person: &str) -> Option<&Member> {
        self.members
            .get(&(institution.to_owned(), person.to_owned()))
    }

    pub fn members_of<'a>(&'a self, institution: &'a str) -> impl Iterator<Item = &'a Member> + 'a {
        self.members
            .values()
            .filter(move |m| m.institution_id == institution)
    }

    /// A member's group policy (an open one if the group is not defined).
    pub fn policy_of(&self, m: &Member) -> Group {
        self.group(&m.institution_id, &m.group_id)
            .cloned()
            .unwrap_or_else(|| Group::open(&m.institution_id, &m.group_id))
    }

    /// The limits people imply — each member's group defaults and each group's shared
    /// budget (a limit set for one member with the same id replaces its default: see
    /// `limits::current`) — and who belongs to which group.
    pub fn derived(&self) -> Derived {
        let mut out = Vec::new();
        let mut membership = HashMap::new();
        for g in self.groups.values() {
            if let Some(b) = g.budget_usd {
                out.push(g.budget_limit(b));
            }
        }
        for m in self.members.values() {
            membership.insert(
                (m.institution_id.clone(), m.person_id.clone()),
                m.group_id.clone(),
            );
            let Some(g) = self.group(&m.institution_id, &m.group_id) else {
                continue;
            };
            for ml in &g.member_limits {
                out.push(g.member_limit(ml, &m.person_id));
            }
        }
        Derived {
            limits: out,
            groups: membership,
        }
    }
}

/// The directory kept current for a process (the gateway's keys and limits, the
/// dashboard): read again only when the groups or members tables change.
pub struct Roster {
    store: Store,
    configured: Vec<Group>,
    state: tokio::sync::Mutex<Option<Snapshot>>,
}

type Fingerprint = (u64, u64, u64, u64);

struct Snapshot {
    fingerprint: Fingerprint,
    directory: Arc<Directory>,
    derived: Arc<Derived>,
}

impl Roster {
    pub fn new(store: Store, configured: Vec<Group>) -> Arc<Self> {
        Arc::new(Self {
            store,
            configured,
            state: tokio::sync::Mutex::new(None),
        })
    }

    /// The directory and the limits it implies, as of now (the same `Arc`s while nothing
    /// changed).
    pub async fn current(&self) -> Result<(Arc<Directory>, Arc<Derived>), StoreError> {
        let fingerprint = self.store.people_fingerprint().await?;
        let mut state = self.state.lock().await;
        if let Some(s) = state.as_ref().filter(|s| s.fingerprint == fingerprint) {
            return Ok((s.directory.clone(), s.derived.clone()));
        }
        let directory = Arc::new(Directory::load(&self.store, &self.configured).await?);
        let derived = Arc::new(directory.derived());
        *state = Some(Snapshot {
            fingerprint,
            directory: directory.clone(),
            derived: derived.clone(),
        });
        Ok((directory, derived))
    }

    pub fn configured(&self) -> &[Group] {
        &self.configured
    }
}

impl DerivedSource for Roster {
    fn derived(&self) -> futures::future::BoxFuture<'_, anyhow::Result<Arc<Derived>>> {
        Box::pin(async move { Ok(self.current().await?.1) })
    }
}

/// A person signed in: their state after it. Their group follows the claims unless an
/// administrator set it; a suspension stays.
pub async fn sign_in(
    store: &Store,
    mapped: &Mapped,
    now: DateTime<Utc>,
) -> Result<Member, PeopleError> {
    let before = store
        .member(&mapped.institution, &mapped.person_id)
        .await?
        .map(|r| Member::from_row(&r));
    let member = match before {
        Some(mut m) => {
            m.name = mapped.name.clone();
            m.email = mapped.email.clone();
            m.role = mapped.role;
            if m.group_source == GroupSource::Claims {
                m.group_id = mapped.group.clone();
            }
            m.last_sign_in = now;
            m
        }
        None => Member {
            institution_id: mapped.institution.clone(),
            person_id: mapped.person_id.clone(),
            name: mapped.name.clone(),
            email: mapped.email.clone(),
            group_id: mapped.group.clone(),
            role: mapped.role,
            group_source: GroupSource::Claims,
            suspended: false,
            last_sign_in: now,
            created_at: now,
        },
    };
    store.write_member(&member.row(&member.person_id)).await?;
    Ok(member)
}

/// A member as stored in `r`.
pub fn member_of_row(r: &MemberRow) -> Member {
    Member::from_row(r)
}

async fn current_member(
    store: &Store,
    institution: &str,
    person: &str,
) -> Result<Member, PeopleError> {
    store
        .member(institution, person)
        .await?
        .map(|r| Member::from_row(&r))
        .ok_or_else(|| PeopleError::NoMember {
            institution: institution.to_owned(),
            person: person.to_owned(),
        })
}

/// Suspends (or restores) a member: every key of theirs is refused on every gateway
/// within the keys' refresh.
pub async fn set_suspended(
    store: &Store,
    institution: &str,
    person: &str,
    suspended: bool,
    actor: &str,
) -> Result<Member, PeopleError> {
    let mut m = current_member(store, institution, person).await?;
    m.suspended = suspended;
    store.write_member(&m.row(actor)).await?;
    let action = if suspended {
        "member.suspend"
    } else {
        "member.restore"
    };
    log(
        store,
        actor,
        action,
        institution,
        format!("member `{person}`"),
    )
    .await?;
    Ok(m)
}

/// Moves a member to `group` (set by an administrator: kept across sign-ins), or back to
/// the group their claims give (`None`: from their next sign-in).
pub async fn set_group(
    store: &Store,
    directory: &Directory,
    institution: &str,
    person: &str,
    group: Option<&str>,
    actor: &str,
) -> Result<Member, PeopleError> {
    let mut m = current_member(store, institution, person).await?;
    match group {
        Some(g) => {
            if directory.group(institution, g).is_none() {
                return Err(PeopleError::NoGroup {
                    institution: institution.to_owned(),
                    group: g.to_owned(),
                });
            }
            m.group_id = g.to_owned();
            m.group_source = GroupSource::Admin;
        }
        None => m.group_source = GroupSource::Claims,
    }
    store.write_member(&m.row(actor)).await?;
    log(
        store,
        actor,
        "member.group",
        institution,
        format!(
            "member `{person}` to group `{}` ({})",
            m.group_id,
            m.group_source.as_str()
        ),
    )
    .await?;
    Ok(m)
}

/// Sets a group's policy (adds it if new).
pub async fn set_group_policy(
    store: &Store,
    group: &Group,
    actor: &str,
) -> Result<(), PeopleError> {
    group.validate().map_err(PeopleError::Invalid)?;
    store.write_group(&group.row(false, actor)).await?;
    log(
        store,
        actor,
        "group.policy",
        &group.institution,
        format!(
            "group `{}`: models {}, {} member limit(s), budget {}, {} key(s) per member, keys up to {} day(s), idle after {} day(s)",
            group.id,
            if group.models.is_empty() { "any".to_owned() } else { group.models.join(",") },
            group.member_limits.len(),
            group.budget_usd.map_or("none".to_owned(), |b| format!("${b} per {}", group.budget_period)),
            group.keys_per_member,
            group.max_key_days,
            group.max_idle_days
        ),
    )
    .await?;
    Ok(())
}
