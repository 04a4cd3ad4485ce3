//! A member's own proxy keys: created by them within their group's key policy (how many
//! at once, how long they live), named, revoked. The key's models and rates are left to
//! the group (the gateway applies the group's current policy to every key of a member,
//! so a policy change reaches keys already handed out). `keys::create` and
//! `keys::revoke` write each action to the key log with who and when.

use chrono::{DateTime, Duration, NaiveDate, Utc};

use super::groups::Group;
use super::members::{Member, Standing};
use crate::keys::{self, KeyError, KeyKind, KeySpec, KeyStore, NewSecret};
use crate::store::keys::KeyRow;

/// What a member asks for.
#[derive(Debug, Clone, Default)]
pub struct KeyRequest {
    pub name: String,
    /// How many days the key works; `None`: as long as the group allows (no expiry if
    /// the group sets no limit).
    pub days: Option<u32>,
}

/// Why a member may not create a key now: said to them as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("your access has been suspended by your institution's administrator")]
    Suspended,
    #[error("you have not signed in for more than {0} days")]
    Idle(u32),
    #[error("your group allows {0} key(s) at once: revoke one before creating another")]
    TooMany(u32),
    #[error("keys of your group work for at most {0} days")]
    TooLong(u32),
    #[error("a key must work for at least one day")]
    TooShort,
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum OwnKeyError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Whether `key` counts against the group's keys-at-once: a proxy key not revoked and
/// not expired at `now`.
pub fn is_active(key: &KeyRow, now: DateTime<Utc>) -> bool {
    key.kind == KeyKind::Proxy.as_str()
        && key.revoked == 0
        && (key.expires_at == 0 || i64::from(key.expires_at) > now.timestamp())
}

/// Checks a request against the member's standing and their group's policy; the day
/// the key stops working (`None`: never), if allowed.
pub fn check(
    member: &Member,
    policy: &Group,
    active_keys: usize,
    req: &KeyRequest,
    now: DateTime<Utc>,
) -> Result<Option<NaiveDate>, Refused> {
    match member.standing(policy.max_idle_days, now) {
        Standing::Active => {}
        Standing::Suspended => return Err(Refused::Suspended),
        Standing::Idle { days } => return Err(Refused::Idle(days)),
    }
    if policy.keys_per_member > 0 && active_keys >= policy.keys_per_member as usize {
        return Err(Refused::TooMany(policy.keys_per_member));
    }
    if req.name.chars().count() > 100 || req.name.chars().any(char::is_control) {
        return Err(Refused::Invalid(
            "a key's name is at most 100 characters, without control characters".into(),
        ));
    }
    let days = match (req.days, policy.max_key_days) {
        (Some(0), _) => return Err(Refused::TooShort),
        (Some(d), max) if max > 0 && d > max => return Err(Refused::TooLong(max)),
        (Some(d), _) => Some(d),
        (None, 0) => None,
        (None, max) => Some(max),
    };
    // A key of `d` days works until the start of the UTC day `d` days after today.
    Ok(days.map(|d| now.date_naive() + Duration::days(i64::from(d))))
}

/// Creates a key for `member` (who is `actor`), if their standing and group allow it.
pub async fn create(
    store: &dyn KeyStore,
    member: &Member,
    policy: &Group,
    req: &KeyRequest,
) -> Result<(KeyRow, NewSecret), OwnKeyError> {
    let now = Utc::now();
    let active = store
        .keys_of_user(&member.institution_id, &member.person_id)
        .await
        .map_err(KeyError::from)?
        .iter()
        .filter(|k| is_active(k, now))
        .count();
    let expires = check(member, policy, active, req, now)?;
    let spec = KeySpec {
        institution_id: member.institution_id.clone(),
        user_id: member.person_id.clone(),
        name: req.name.trim().to_owned(),
        models: Vec::new(),
        expires,
        rpm: 0,
        tpm: 0,
    };
    Ok(keys::create(store, KeyKind::Proxy, &spec, &member.person_id).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::people::members::{GroupSource, MemberRole};

    fn member() -> Member {
        Member {
            institution_id: "uni".into(),
            person_id: "kari@uni.no".into(),
            name: "Kari".into(),
            email: "kari@uni.no".into(),
            group_id: "students".into(),
            role: MemberRole::Member,
            group_source: GroupSource::Claims,
            suspended: false,
            last_sign_in: "2026-12-07T08:00:00Z".parse().unwrap(),
            created_at: "2026-12-01T08:00:00Z".parse().unwrap(),
        }
    }

    fn policy() -> Group {
        Group {
            keys_per_member: 2,
            max_key_days: 90,
            max_idle_days: 30,
            ..Group::open("uni", "students")
        }
    }

    fn req(days: Option<u32>) -> KeyRequest {
        KeyRequest {
            name: "laptop".into(),
            days,
        }
    }

    #[test]
    fn a_key_lives_as_long_as_asked_within_the_groups_limit() {
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        let day = |s: &str| Some(s.parse::<NaiveDate>().unwrap());
        assert_eq!(
            check(&member(), &policy(), 0, &req(None), now),
            Ok(day("2027-03-07"))
        );
        assert_eq!(
            check(&member(), &policy(), 1, &req(Some(7)), now),
            Ok(day("2026-12-14"))
        );
        assert_eq!(
            check(&member(), &policy(), 0, &req(Some(91)), now),
            Err(Refused::TooLong(90))
        );
        assert_eq!(
            check(&member(), &policy(), 0, &req(Some(0)), now),
            Err(Refused::TooShort)
        );
        let open = Group::open("uni", "staff");
        assert_eq!(check(&member(), &open, 50, &req(None), now), Ok(None));
        // 3650 days: ten years less the three leap days of 2028, 2032 and 2036.
        assert_eq!(
            check(&member(), &open, 0, &req(Some(3650)), now),
            Ok(day("2036-12-04"))
        );
    }

    #[test]
    fn keys_at_once_suspension_and_idleness_refuse_a_new_key() {
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        assert_eq!(
            check(&member(), &policy(), 2, &req(None), now),
            Err(Refused::TooMany(2))
        );
        let mut m = member();
        m.suspended = true;
        assert_eq!(
            check(&m, &policy(), 0, &req(None), now),
            Err(Refused::Suspended)
        );
        let later: DateTime<Utc> = "2027-02-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            check(&member(), &policy(), 0, &req(None), later),
            Err(Refused::Idle(30))
        );
        let long = KeyRequest {
            name: "x".repeat(101),
            days: None,
        };
        assert!(matches!(
            check(&member(), &policy(), 0, &long, now),
            Err(Refused::Invalid(_))
        ));
    }

    #[test]
    fn only_live_proxy_keys_count() {
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        let row = KeyRow {
            key_id: "k".into(),
            version: 1,
            kind: "proxy".into(),
            secret_hash: String::new(),
            institution_id: "uni".into(),
            user_id: "kari@uni.no".into(),
            name: String::new(),
            models: vec![],
            expires_at: 0,
            rpm: 0,
            tpm: 0,
            revoked: 0,
            created_at: 0,
            created_by: String::new(),
            updated_at: 0,
            updated_by: String::new(),
            held: String::new(),
        };
        assert!(is_active(&row, now));
        assert!(!is_active(
            &KeyRow {
                revoked: 1,
                ..row.clone()
            },
            now
        ));
        let past = u32::try_from(now.timestamp()).unwrap();
        assert!(!is_active(
            &KeyRow {
                expires_at: past,
                ..row.clone()
            },
            now
        ));
        assert!(!is_active(
            &KeyRow {
                kind: "ingest".into(),
                ..row
            },
            now
        ));
    }
}
