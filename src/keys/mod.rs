//! Proxy keys and ingest tokens: their format, what a key allows, and the operations on
//! them (create, revoke, rotate) that the CLI and the dashboard share. Every operation
//! appends the key's next state and an audit row (`store::keys`).
//!
//! A key looks like `tt-k1a2b3c4d5e6-<64 hex>`: the middle part is its public id (in
//! events, dashboards and the audit log), the rest is 256 random bits. Only the SHA-256
//! of the whole key is stored; the key is printed once.

pub mod crypto;
pub mod store;

use chrono::{DateTime, NaiveDate, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::store::keys::{KeyEventRow, KeyRow};
use crate::store::StoreError;
pub use store::KeyStore;

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Calls models through the gateway.
    Proxy,
    /// Posts usage events to `/v1/usage-events`.
    Ingest,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Proxy => "proxy",
            KeyKind::Ingest => "ingest",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "proxy" => Some(KeyKind::Proxy),
            "ingest" => Some(KeyKind::Ingest),
            _ => None,
        }
    }
}

const ID_ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
const ID_LEN: usize = 12;
const SECRET_HEX_LEN: usize = 64;
const PREFIX: &str = "tt-";

/// A new key: its public id and the secret the caller gets once.
pub struct NewSecret {
    pub key_id: String,
    pub secret: String,
}

impl std::fmt::Debug for NewSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewSecret")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn random_id() -> String {
    let mut bytes = [0u8; ID_LEN];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let mut id = String::from("k");
    id.extend(
        bytes
            .iter()
            .take(ID_LEN - 1)
            .map(|b| ID_ALPHABET[usize::from(*b) % ID_ALPHABET.len()] as char),
    );
    id
}

fn random_secret(key_id: &str) -> String {
    let mut bytes = [0u8; SECRET_HEX_LEN / 2];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{PREFIX}{key_id}-{}", hex::encode(bytes))
}

/// A fresh id and secret.
pub fn generate() -> NewSecret {
    let key_id = random_id();
    let secret = random_secret(&key_id);
    NewSecret { key_id, secret }
}

/// The public id inside a presented key, if it has our shape at all.
pub fn key_id_of(presented: &str) -> Option<&str> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('-')?;
    (id.len() == ID_LEN
        && id.bytes().all(|b| ID_ALPHABET.contains(&b))
        && secret.len() == SECRET_HEX_LEN
        && secret.bytes().all(|b| b.is_ascii_hexdigit()))
    .then_some(id)
}

/// SHA-256 (hex) of a key: what is stored and compared.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `model` is allowed by a key's list: exact ids, or prefixes ending in `*`
/// (`gpt-4o*`). An empty list allows every model.
pub fn model_allowed(models: &[String], model: &str) -> bool {
    models.is_empty()
        || models.iter().any(|m| match m.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => m == model,
        })
}

/// Why a presented key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error("unknown API key")]
    Unknown,
    #[error("this API key has been revoked")]
    Revoked,
    #[error("this API key has expired")]
    Expired,
    #[error("the owner of this API key has been suspended by their institution")]
    Suspended,
    #[error(
        "the owner of this API key has not signed in for more than {days} days; \
         signing in to the dashboard makes their keys work again"
    )]
    Idle { days: u32 },
    #[error(
        "this API key is paused: its spending jumped far above its usual rate and its \
         institution pauses keys when that happens; it works again once an administrator \
         acknowledges the spend alert on the dashboard's Alerts page"
    )]
    Held,
}

/// What a key owner's membership adds to a key (a person who signs in with their
/// institution's account): their group's models, and whether they may use keys at all.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Owner {
    pub group: String,
    /// The group's models (empty: every model).
    pub models: Vec<String>,
    pub suspended: bool,
    /// Keys stop working after this instant (the last sign-in plus the group's
    /// `max_idle_days`), until the owner signs in again.
    pub idle_after: Option<DateTime<Utc>>,
    pub idle_days: u32,
}

/// A key's current state as the gateway uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub key_id: String,
    pub kind: KeyKind,
    pub secret_hash: [u8; 32],
    pub institution_id: String,
    pub user_id: String,
    pub name: String,
    pub models: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub rpm: u32,
    pub tpm: u64,
    pub revoked: bool,
    /// Paused by the spend-spike brake until its alert is acknowledged.
    pub held: bool,
    /// Set when the key's user is a member (someone who signs in through `[[sso]]`).
    pub owner: Option<Owner>,
}

impl Key {
    pub fn from_row(row: &KeyRow) -> Option<Self> {
        let mut hash = [0u8; 32];
        hex::decode_to_slice(&row.secret_hash, &mut hash).ok()?;
        Some(Self {
            key_id: row.key_id.clone(),
            kind: KeyKind::parse(&row.kind)?,
            secret_hash: hash,
            institution_id: row.institution_id.clone(),
            user_id: row.user_id.clone(),
            name: row.name.clone(),
            models: row.models.clone(),
            expires_at: (row.expires_at > 0)
                .then(|| DateTime::from_timestamp(i64::from(row.expires_at), 0))
                .flatten(),
            rpm: row.rpm,
            tpm: row.tpm,
            revoked: row.revoked != 0,
            held: !row.held.is_empty(),
            owner: None,
        })
    }

    /// Whether the key may call `model`: its own list and its owner's group's.
    pub fn allows(&self, model: &str) -> bool {
        model_allowed(&self.models, model)
            && self
                .owner
                .as_ref()
                .is_none_or(|o| model_allowed(&o.models, model))
    }

    /// Checks a presented secret against this key (constant time) and its state at `now`.
    pub fn admit(&self, presented: &str, now: DateTime<Utc>) -> Result<(), KeyRefusal> {
        self.admit_unless_held(presented, now)?;
        if self.held {
            return Err(KeyRefusal::Held);
        }
        Ok(())
    }

    /// `admit` without the spend-spike brake: whether the key would be admitted if it
    /// were not paused (the gateway records a paused key's refused request as an event).
    pub fn admit_unless_held(&self, presented: &str, now: DateTime<Utc>) -> Result<(), KeyRefusal> {
        let digest = Sha256::digest(presented.as_bytes());
        let same = digest
            .iter()
            .zip(self.secret_hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        if !same {
            return Err(KeyRefusal::Unknown);
        }
        if self.revoked {
            return Err(KeyRefusal::Revoked);
        }
        if self.expires_at.is_some_and(|t| t <= now) {
            return Err(KeyRefusal::Expired);
        }
        if let Some(o) = &self.owner {
            if o.suspended {
                return Err(KeyRefusal::Suspended);
            }
            if o.idle_after.is_some_and(|t| t <= now) {
                return Err(KeyRefusal::Idle { days: o.idle_days });
            }
        }
        Ok(())
    }
}

/// What `keys create` asks for.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub institution_id: String,
    pub user_id: String,
    pub name: String,
    pub models: Vec<String>,
    /// The key works until the start of this day (UTC).
    pub expires: Option<NaiveDate>,
    pub rpm: u32,
    pub tpm: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error("no key `{0}`")]
    NotFound(String),
    #[error("key `{0}` belongs to another institution")]
    OtherInstitution(String),
    #[error("key `{0}` is already revoked")]
    AlreadyRevoked(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn check_text(field: &str, s: &str, required: bool) -> Result<(), KeyError> {
    if required && s.trim().is_empty() {
        return Err(KeyError::Invalid(format!("{field} is required")));
    }
    if s.len() > crate::domain::MAX_ID_LEN || s.chars().any(char::is_control) {
        return Err(KeyError::Invalid(format!(
            "{field} must be at most {} bytes without control characters",
            crate::domain::MAX_ID_LEN
        )));
    }
    Ok(())
}

impl KeySpec {
    pub fn validate(&self, kind: KeyKind, today: NaiveDate) -> Result<(), KeyError> {
        check_text("institution", &self.institution_id, kind == KeyKind::Proxy)?;
        check_text("user", &self.user_id, kind == KeyKind::Proxy)?;
        check_text("name", &self.name, false)?;
        if self.models.len() > 100 {
            return Err(KeyError::Invalid("at most 100 models per key".into()));
        }
        for m in &self.models {
            check_text("model", m, true)?;
        }
        if self.expires.is_some_and(|d| d <= today) {
            return Err(KeyError::Invalid(
                "the expiry date must be in the future".into(),
            ));
        }
        Ok(())
    }
}

fn now_secs() -> u32 {
    u32::try_from(Utc::now().timestamp()).unwrap_or(u32::MAX)
}

/// The next version for a key: above its current one, and the clock in ms otherwise, so
/// that versions written by different processes still order by time.
fn next_version(current: Option<u64>) -> u64 {
    let now = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
    current.map_or(now, |v| now.max(v + 1))
}

async fn audit(
    store: &dyn KeyStore,
    actor: &str,
    action: &str,
    key_id: &str,
    institution: &str,
    detail: String,
) -> Result<(), StoreError> {
    let now = Utc::now();
    store
        .record_key_event(&KeyEventRow {
            at: u32::try_from(now.timestamp()).unwrap_or(u32::MAX),
            at_ms: now.timestamp_subsec_millis().min(999) as u16,
            actor: actor.to_owned(),
            action: action.to_owned(),
            key_id: key_id.to_owned(),
            institution_id: institution.to_owned(),
            detail,
        })
        .await
}

/// Stores `row` (already changed) as the key's next state by `actor`, and the change in
/// the key log.
async fn write_change(
    store: &dyn KeyStore,
    row: &mut KeyRow,
    actor: &str,
    action: &str,
    detail: String,
) -> Result<(), KeyError> {
    row.version = next_version(Some(row.version));
    row.updated_at = now_secs();
    row.updated_by = actor.into();
    store.write_key(row).await?;
    audit(
        store,
        actor,
        action,
        &row.key_id,
        &row.institution_id,
        detail,
    )
    .await?;
    Ok(())
}

/// Creates a key; returns its stored state and the secret (shown once, never stored).
pub async fn create(
    store: &dyn KeyStore,
    kind: KeyKind,
    spec: &KeySpec,
    actor: &str,
) -> Result<(KeyRow, NewSecret), KeyError> {
    spec.validate(kind, Utc::now().date_naive())?;
    let new = generate();
    let now = now_secs();
    let row = KeyRow {
        key_id: new.key_id.clone(),
        version: next_version(None),
        kind: kind.as_str().into(),
        secret_hash: secret_hash(&new.secret),
        institution_id: spec.institution_id.clone(),
        user_id: spec.user_id.clone(),
        name: spec.name.clone(),
        models: spec.models.clone(),
        expires_at: spec
            .expires
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map_or(0, |t| {
                u32::try_from(t.and_utc().timestamp()).unwrap_or(u32::MAX)
            }),
        rpm: spec.rpm,
        tpm: spec.tpm,
        revoked: 0,
        created_at: now,
        created_by: actor.into(),
        updated_at: now,
        updated_by: actor.into(),
        held: String::new(),
    };
    store.write_key(&row).await?;
    audit(
        store,
        actor,
        "create",
        &row.key_id,
        &row.institution_id,
        describe(&row),
    )
    .await?;
    Ok((row, new))
}

fn describe(row: &KeyRow) -> String {
    let mut d = format!("{} key for user `{}`", row.kind, row.user_id);
    if !row.name.is_empty() {
        d.push_str(&format!(", name `{}`", row.name));
    }
    if !row.models.is_empty() {
        d.push_str(&format!(", models {}", row.models.join(",")));
    }
    if row.expires_at > 0 {
        if let Some(t) = DateTime::from_timestamp(i64::from(row.expires_at), 0) {
            d.push_str(&format!(", expires {}", t.date_naive()));
        }
    }
    if row.rpm > 0 {
        d.push_str(&format!(", rpm {}", row.rpm));
    }
    if row.tpm > 0 {
        d.push_str(&format!(", tpm {}", row.tpm));
    }
    d
}

/// A key's current state, if `institution` (when given) owns it.
pub async fn owned(
    store: &dyn KeyStore,
    key_id: &str,
    institution: Option<&str>,
) -> Result<KeyRow, KeyError> {
    let row = store
        .key(key_id)
        .await?
        .ok_or_else(|| KeyError::NotFound(key_id.into()))?;
    if let Some(i) = institution {
        if row.institution_id != i {
            // Not "forbidden": another institution's key ids are not theirs to probe.
            return Err(KeyError::NotFound(key_id.into()));
        }
    }
    Ok(row)
}

/// Revokes a key (every gateway refuses it within one refresh interval). `institution`
/// confines the operation to that institution's keys.
pub async fn revoke(
    store: &dyn KeyStore,
    key_id: &str,
    institution: Option<&str>,
    actor: &str,
) -> Result<KeyRow, KeyError> {
    let row = owned(store, key_id, institution).await?;
    revoke_row(store, row, actor).await
}

/// Revokes one of `user`'s own keys: another person's key is "not found", as an unknown
/// id is (their ids are not for others to probe).
pub async fn revoke_own(
    store: &dyn KeyStore,
    key_id: &str,
    institution: &str,
    user: &str,
    actor: &str,
) -> Result<KeyRow, KeyError> {
    revoke_row(
        store,
        owned_by(store, key_id, institution, user).await?,
        actor,
    )
    .await
}

/// One of `user`'s own proxy keys; another person's key is "not found", as an unknown id
/// is (their ids are not for others to probe).
pub async fn owned_by(
    store: &dyn KeyStore,
    key_id: &str,
    institution: &str,
    user: &str,
) -> Result<KeyRow, KeyError> {
    let row = owned(store, key_id, Some(institution)).await?;
    if row.user_id != user || row.kind != KeyKind::Proxy.as_str() {
        return Err(KeyError::NotFound(key_id.into()));
    }
    Ok(row)
}

async fn revoke_row(
    store: &dyn KeyStore,
    mut row: KeyRow,
    actor: &str,
) -> Result<KeyRow, KeyError> {
    if row.revoked != 0 {
        return Err(KeyError::AlreadyRevoked(row.key_id));
    }
    row.revoked = 1;
    write_change(store, &mut row, actor, "revoke", String::new()).await?;
    Ok(row)
}

/// Pauses a key for the spend-spike brake: `alert` names the incident. Every gateway
/// refuses it within one key refresh, saying why and how to get it back. A key already
/// held, revoked or not found is left as it is (`None`).
pub async fn hold(
    store: &dyn KeyStore,
    key_id: &str,
    institution: &str,
    alert: &str,
    actor: &str,
) -> Result<Option<KeyRow>, KeyError> {
    let Ok(mut row) = owned(store, key_id, Some(institution)).await else {
        return Ok(None);
    };
    if row.revoked != 0 || !row.held.is_empty() {
        return Ok(None);
    }
    row.held = alert.into();
    let detail = format!("spend spike, alert {alert}");
    write_change(store, &mut row, actor, "hold", detail).await?;
    Ok(Some(row))
}

/// Restores every key the incident `alert` paused (its acknowledgement); the keys it
/// restored.
pub async fn release(
    store: &dyn KeyStore,
    alert: &str,
    actor: &str,
) -> Result<Vec<KeyRow>, KeyError> {
    let mut out = Vec::new();
    for mut row in store.current_keys().await? {
        if row.held != alert || alert.is_empty() {
            continue;
        }
        row.held = String::new();
        let detail = format!("alert {alert} acknowledged");
        write_change(store, &mut row, actor, "release", detail).await?;
        out.push(row);
    }
    Ok(out)
}

/// Gives a key a new secret, same id and settings; the old secret stops working within
/// one refresh interval.
pub async fn rotate(
    store: &dyn KeyStore,
    key_id: &str,
    institution: Option<&str>,
    actor: &str,
) -> Result<(KeyRow, NewSecret), KeyError> {
    let mut row = owned(store, key_id, institution).await?;
    if row.revoked != 0 {
        return Err(KeyError::AlreadyRevoked(key_id.into()));
    }
    let secret = random_secret(&row.key_id);
    row.secret_hash = secret_hash(&secret);
    write_change(store, &mut row, actor, "rotate", String::new()).await?;
    Ok((
        row,
        NewSecret {
            key_id: key_id.into(),
            secret,
        },
    ))
}

/// Keys of one institution (or all), current state, newest first.
pub async fn list(
    store: &dyn KeyStore,
    institution: Option<&str>,
) -> Result<Vec<KeyRow>, KeyError> {
    let mut rows: Vec<KeyRow> = store
        .current_keys()
        .await?
        .into_iter()
        .filter(|k| institution.is_none_or(|i| k.institution_id == i))
        .collect();
    rows.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then(a.key_id.cmp(&b.key_id))
    });
    Ok(rows)
}

/// Records an upstream-key change in the audit log (the key itself never).
pub async fn audit_upstream(
    store: &dyn KeyStore,
    actor: &str,
    action: &str,
    institution: &str,
    provider: &str,
    fingerprint: &str,
) -> Result<(), StoreError> {
    audit(
        store,
        actor,
        action,
        "",
        institution,
        format!("provider {provider}, fingerprint {fingerprint}"),
    )
    .await
}

/// Who runs a CLI command, for the audit log.
pub fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_one_shape_and_their_id_is_found() {
        let k = generate();
        assert!(k.secret.starts_with("tt-k"));
        assert_eq!(key_id_of(&k.secret), Some(k.key_id.as_str()));
        assert_eq!(k.secret.len(), 3 + ID_LEN + 1 + SECRET_HEX_LEN);
        assert_ne!(generate().secret, k.secret);
        for bad in [
            "",
            "sk-abc",
            "tt-k123-abc",
            &k.secret[..k.secret.len() - 1],
            &format!("{}0", k.secret),
            &k.secret.replace("tt-", "tx-"),
        ] {
            assert_eq!(key_id_of(bad), None, "{bad}");
        }
        // Debug never shows the secret.
        assert!(!format!("{k:?}").contains(&k.secret[20..]));
    }

    #[test]
    fn admission_checks_secret_revocation_and_expiry() {
        let k = generate();
        let now = Utc::now();
        let row = KeyRow {
            key_id: k.key_id.clone(),
            version: 1,
            kind: "proxy".into(),
            secret_hash: secret_hash(&k.secret),
            institution_id: "i".into(),
            user_id: "u".into(),
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
        let key = Key::from_row(&row).unwrap();
        assert_eq!(key.admit(&k.secret, now), Ok(()));
        let other = generate();
        assert_eq!(key.admit(&other.secret, now), Err(KeyRefusal::Unknown));
        let expired = Key::from_row(&KeyRow {
            expires_at: u32::try_from(now.timestamp()).unwrap() - 1,
            ..row.clone()
        })
        .unwrap();
        assert_eq!(expired.admit(&k.secret, now), Err(KeyRefusal::Expired));
        let revoked = Key::from_row(&KeyRow {
            revoked: 1,
            ..row.clone()
        })
        .unwrap();
        assert_eq!(revoked.admit(&k.secret, now), Err(KeyRefusal::Revoked));
        let held = Key::from_row(&KeyRow {
            held: "a1b2".into(),
            ..row.clone()
        })
        .unwrap();
        assert_eq!(held.admit(&k.secret, now), Err(KeyRefusal::Held));
        assert!(KeyRefusal::Held
            .to_string()
            .contains("acknowledges the spend alert"));
        // A revoked key with a wrong secret says nothing about the key.
        assert_eq!(revoked.admit(&other.secret, now), Err(KeyRefusal::Unknown));
    }

    #[test]
    fn an_owners_suspension_idleness_and_group_models_apply_to_their_keys() {
        let k = generate();
        let now: DateTime<Utc> = "2026-12-07T12:00:00Z".parse().unwrap();
        let mut key = Key {
            key_id: k.key_id.clone(),
            kind: KeyKind::Proxy,
            secret_hash: [0; 32],
            institution_id: "uni".into(),
            user_id: "kari".into(),
            name: String::new(),
            models: vec!["gpt-4o*".into()],
            expires_at: None,
            rpm: 0,
            tpm: 0,
            revoked: false,
            held: false,
            owner: None,
        };
        hex::decode_to_slice(secret_hash(&k.secret), &mut key.secret_hash).unwrap();
        assert!(key.allows("gpt-4o") && key.allows("gpt-4o-mini"));
        let owner = Owner {
            group: "students".into(),
            models: vec!["gpt-4o-mini".into(), "claude-haiku*".into()],
            suspended: false,
            idle_after: Some("2026-12-08T00:00:00Z".parse().unwrap()),
            idle_days: 30,
        };
        key.owner = Some(owner.clone());
        // Both lists must allow a model.
        assert!(key.allows("gpt-4o-mini"));
        assert!(
            !key.allows("gpt-4o"),
            "the key allows it, the group does not"
        );
        assert!(
            !key.allows("claude-haiku-4-5"),
            "the group allows it, the key does not"
        );
        assert_eq!(key.admit(&k.secret, now), Ok(()));
        let later: DateTime<Utc> = "2026-12-08T00:00:00Z".parse().unwrap();
        assert_eq!(
            key.admit(&k.secret, later),
            Err(KeyRefusal::Idle { days: 30 })
        );
        key.owner = Some(Owner {
            suspended: true,
            ..owner
        });
        assert_eq!(key.admit(&k.secret, now), Err(KeyRefusal::Suspended));
        // A wrong secret still says nothing about the owner.
        assert_eq!(key.admit(&generate().secret, now), Err(KeyRefusal::Unknown));
    }

    #[test]
    fn model_lists_allow_exact_ids_and_prefixes() {
        assert!(model_allowed(&[], "anything"));
        let list = vec!["gpt-4o-mini".to_string(), "claude-*".to_string()];
        assert!(model_allowed(&list, "gpt-4o-mini"));
        assert!(!model_allowed(&list, "gpt-4o-mini-2024-07-18"));
        assert!(model_allowed(&list, "claude-haiku-4-5"));
        assert!(!model_allowed(&list, "gpt-5"));
    }

    #[test]
    fn specs_are_validated() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 23).unwrap();
        let ok = KeySpec {
            institution_id: "uni".into(),
            user_id: "alice".into(),
            ..Default::default()
        };
        assert!(ok.validate(KeyKind::Proxy, today).is_ok());
        assert!(KeySpec {
            user_id: String::new(),
            ..ok.clone()
        }
        .validate(KeyKind::Proxy, today)
        .is_err());
        assert!(KeySpec {
            expires: Some(today),
            ..ok.clone()
        }
        .validate(KeyKind::Proxy, today)
        .is_err());
        assert!(KeySpec {
            name: "a\nb".into(),
            ..ok.clone()
        }
        .validate(KeyKind::Proxy, today)
        .is_err());
        // An ingest token may be bound to no institution (any).
        assert!(KeySpec::default().validate(KeyKind::Ingest, today).is_ok());
    }
}
