//! What every gateway instance knows of the keys: proxy keys and ingest tokens, and the
//! institutions' own provider keys (decrypted in memory only), re-read from ClickHouse
//! every `gateway.keys_refresh_ms`. A revocation or expiry therefore applies on every
//! instance within one refresh (2 s by default) plus one query; if ClickHouse cannot be
//! reached the last state read stays in force (and the failure is logged).
//!
//! A key whose user is a member (someone who signs in through `[[sso]]`) also carries
//! what their membership says (`keys::Owner`): suspended, idle past their group's
//! `max_idle_days`, their group's models, and the group's default rpm/tpm where the key
//! sets none. A suspension therefore reaches every instance within the same refresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};

use super::wire::Provider;
use crate::config::Secret;
use crate::keys::crypto::MasterKey;
use crate::keys::{key_id_of, Key, KeyKind, KeyRefusal, Owner};
use crate::people::directory::{Directory, Roster};
use crate::store::{Store, StoreError};

#[derive(Default)]
struct Snapshot {
    keys: HashMap<String, Arc<Key>>,
    byok: HashMap<(String, Provider), Secret>,
}

#[derive(Default)]
pub struct Keyring {
    snapshot: RwLock<Arc<Snapshot>>,
    loaded: AtomicBool,
    /// Unix ms of the last successful refresh.
    refreshed_at: AtomicI64,
}

impl Keyring {
    /// Whether keys have been read at least once (until then every request gets 503).
    pub fn ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn refreshed_at_ms(&self) -> i64 {
        self.refreshed_at.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.snapshot.read().expect("keyring lock").keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key a presented secret names, if any (not yet checked).
    fn presented(&self, presented: &str) -> Option<Arc<Key>> {
        let id = key_id_of(presented)?;
        self.snapshot
            .read()
            .expect("keyring lock")
            .keys
            .get(id)
            .cloned()
    }

    /// The key a presented secret belongs to, if it is valid for `kind` at `now`.
    pub fn authenticate(
        &self,
        presented: &str,
        kind: KeyKind,
        now: DateTime<Utc>,
    ) -> Result<Arc<Key>, KeyRefusal> {
        let key = self.presented(presented).ok_or(KeyRefusal::Unknown)?;
        if key.kind != kind {
            return Err(KeyRefusal::Unknown);
        }
        key.admit(presented, now)?;
        Ok(key)
    }

    /// The key a presented secret belongs to when its only refusal is the spend-spike
    /// brake: its refused requests are recorded as events of that key.
    pub fn paused(&self, presented: &str, kind: KeyKind, now: DateTime<Utc>) -> Option<Arc<Key>> {
        let key = self.presented(presented)?;
        (key.kind == kind && key.held && key.admit_unless_held(presented, now).is_ok())
            .then_some(key)
    }

    /// Pauses a key on this instance at once (the spend-spike brake has written its
    /// hold to the store; every instance, this one included, reads it at its next
    /// refresh, which also ends this pause once the alert is acknowledged).
    pub fn hold_now(&self, key_id: &str) {
        let mut slot = self.snapshot.write().expect("keyring lock");
        let Some(key) = slot.keys.get(key_id) else {
            return;
        };
        let mut held = Key::clone(key);
        held.held = true;
        let mut next = Snapshot {
            keys: slot.keys.clone(),
            byok: slot.byok.clone(),
        };
        next.keys.insert(key_id.to_owned(), Arc::new(held));
        *slot = Arc::new(next);
    }

    /// The institution's own key for `provider`, if it stored one.
    pub fn own_key(&self, institution: &str, provider: Provider) -> Option<Secret> {
        self.snapshot
            .read()
            .expect("keyring lock")
            .byok
            .get(&(institution.to_owned(), provider))
            .cloned()
    }

    /// Re-reads every key. An institution's provider key that does not decrypt (wrong
    /// master key, altered row) is logged and kept as unusable: that institution's
    /// requests to that provider are refused rather than sent with, and billed to, the
    /// platform's key.
    pub async fn refresh(
        &self,
        store: &Store,
        master: &MasterKey,
        people: &Roster,
    ) -> Result<(), StoreError> {
        let rows = store.current_keys().await?;
        let upstream = store.current_upstream_keys().await?;
        let (directory, _) = people.current().await?;
        let mut keys = HashMap::with_capacity(rows.len());
        for row in &rows {
            match Key::from_row(row) {
                Some(mut k) => {
                    with_owner(&mut k, &directory);
                    keys.insert(k.key_id.clone(), Arc::new(k));
                }
                None => tracing::warn!(key_id = %row.key_id, "a stored key is malformed; ignored"),
            }
        }
        let mut byok = HashMap::new();
        for u in upstream.iter().filter(|u| u.removed == 0) {
            let Some(provider) = Provider::parse(&u.provider) else {
                continue;
            };
            match master.open(&u.institution_id, &u.provider, &u.nonce, &u.ciphertext) {
                Ok(secret) => {
                    byok.insert((u.institution_id.clone(), provider), Secret::new(secret));
                }
                Err(e) => {
                    tracing::error!(institution = %u.institution_id, provider = %u.provider, "{e}");
                    // Marked unusable: requests of this institution to this provider are
                    // refused rather than sent with (and billed to) the platform key.
                    byok.insert((u.institution_id.clone(), provider), Secret::default());
                }
            }
        }
        *self.snapshot.write().expect("keyring lock") = Arc::new(Snapshot { keys, byok });
        self.loaded.store(true, Ordering::Release);
        self.refreshed_at
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        Ok(())
    }

    /// Refreshes every `every` until `stop`; failures are logged at most once a minute.
    pub async fn keep_fresh(
        self: Arc<Self>,
        store: Store,
        master: MasterKey,
        people: Arc<Roster>,
        every: std::time::Duration,
        mut stop: crate::shutdown::Shutdown,
    ) {
        let mut last_warned: Option<std::time::Instant> = None;
        loop {
            if let Err(e) = self.refresh(&store, &master, &people).await {
                if last_warned.is_none_or(|t| t.elapsed().as_secs() >= 60) {
                    tracing::warn!(error = %e, "cannot re-read keys; the last keys read stay in force");
                    last_warned = Some(std::time::Instant::now());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait() => return,
            }
        }
    }
}

/// Adds what the key's user's membership says, if they are a member: their standing,
/// their group's models, and the group's default rates where the key sets none.
fn with_owner(key: &mut Key, directory: &Directory) {
    let Some(m) = directory.member(&key.institution_id, &key.user_id) else {
        return;
    };
    let policy = directory.policy_of(m);
    if key.rpm == 0 {
        key.rpm = policy.default_rpm;
    }
    if key.tpm == 0 {
        key.tpm = policy.default_tpm;
    }
    key.owner = Some(Owner {
        group: m.group_id.clone(),
        models: policy.models.clone(),
        suspended: m.suspended,
        idle_after: (policy.max_idle_days > 0)
            .then(|| m.last_sign_in + chrono::Duration::days(i64::from(policy.max_idle_days))),
        idle_days: policy.max_idle_days,
    });
}
