//! The people of an institution who sign in with its account: members (students, staff)
//! and the institution's own administrators. Each belongs to one group; membership
//! comes from the claims at every sign-in, unless an administrator set it.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

/// What a person may do on the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    /// Their own keys, usage and quota, nothing of anyone else.
    #[default]
    Member,
    /// Also their institution's people, groups, keys and limits.
    InstitutionAdmin,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Member => "member",
            MemberRole::InstitutionAdmin => "institution_admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(MemberRole::Member),
            "institution_admin" => Some(MemberRole::InstitutionAdmin),
            _ => None,
        }
    }

    pub fn as_role(self) -> super::Role {
        match self {
            MemberRole::Member => super::Role::Member,
            MemberRole::InstitutionAdmin => super::Role::InstitutionAdmin,
        }
    }
}

/// Where a member's group came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GroupSource {
    /// The claims of their last sign-in (moves with them).
    #[default]
    Claims,
    /// An administrator (kept across sign-ins).
    Admin,
}

impl GroupSource {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupSource::Claims => "claims",
            GroupSource::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "admin" {
            GroupSource::Admin
        } else {
            GroupSource::Claims
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub institution_id: String,
    /// The person's id: the provider's claim chosen by `[[sso]] id_claim`.
    pub person_id: String,
    pub name: String,
    pub email: String,
    pub group_id: String,
    pub role: MemberRole,
    pub group_source: GroupSource,
    pub suspended: bool,
    pub last_sign_in: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// Why a member's keys are refused, if they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Active,
    /// An administrator suspended them.
    Suspended,
    /// No sign-in for longer than their group's `max_idle_days`.
    Idle {
        days: u32,
    },
}

impl Member {
    /// Whether their keys work at `now`, given their group's `max_idle_days` (0: never
    /// idle).
    pub fn standing(&self, max_idle_days: u32, now: DateTime<Utc>) -> Standing {
        if self.suspended {
            return Standing::Suspended;
        }
        if max_idle_days > 0 && now - self.last_sign_in > Duration::days(i64::from(max_idle_days)) {
            return Standing::Idle {
                days: max_idle_days,
            };
        }
        Standing::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(last: &str) -> Member {
        Member {
            institution_id: "uni".into(),
            person_id: "kari".into(),
            name: "Kari".into(),
            email: String::new(),
            group_id: "students".into(),
            role: MemberRole::Member,
            group_source: GroupSource::Claims,
            suspended: false,
            last_sign_in: last.parse().unwrap(),
            created_at: last.parse().unwrap(),
        }
    }

    #[test]
    fn keys_stop_working_after_the_groups_idle_days_and_when_suspended() {
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        assert_eq!(
            member("2026-12-01T00:00:00Z").standing(30, now),
            Standing::Active
        );
        assert_eq!(
            member("2026-10-01T00:00:00Z").standing(30, now),
            Standing::Idle { days: 30 }
        );
        assert_eq!(
            member("2020-01-01T00:00:00Z").standing(0, now),
            Standing::Active
        );
        let mut m = member("2026-12-01T00:00:00Z");
        m.suspended = true;
        assert_eq!(m.standing(0, now), Standing::Suspended);
    }
}
