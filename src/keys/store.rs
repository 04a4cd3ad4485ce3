//! Where keys and the key log are kept, as the key operations see it: ClickHouse in
//! production (`store::Store`, or `Tables` for a process that reads and writes through
//! different users), memory in handler tests (`Memory`), so a test about who may create
//! or revoke which key needs no server.

#[cfg(test)]
use std::sync::Mutex;

use async_trait::async_trait;

use crate::store::keys::{KeyEventRow, KeyRow};
use crate::store::{Store, StoreError};

/// Keys are versioned: `write_key` appends a key's next state and readers see each key's
/// highest version; the key log only grows.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Every key's current state.
    async fn current_keys(&self) -> Result<Vec<KeyRow>, StoreError>;
    /// The current state of every key of one user of one institution.
    async fn keys_of_user(&self, institution: &str, user: &str) -> Result<Vec<KeyRow>, StoreError>;
    /// One key's current state.
    async fn key(&self, key_id: &str) -> Result<Option<KeyRow>, StoreError>;
    /// Appends a key's new state (its `version` above the current one).
    async fn write_key(&self, row: &KeyRow) -> Result<(), StoreError>;
    async fn record_key_event(&self, row: &KeyEventRow) -> Result<(), StoreError>;
    /// The latest `limit` key changes, of one institution or of all, newest first.
    async fn key_events(
        &self,
        institution: Option<&str>,
        limit: u64,
    ) -> Result<Vec<KeyEventRow>, StoreError>;
}

#[async_trait]
impl KeyStore for Store {
    async fn current_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        Store::current_keys(self).await
    }
    async fn keys_of_user(&self, institution: &str, user: &str) -> Result<Vec<KeyRow>, StoreError> {
        Store::keys_of_user(self, institution, user).await
    }
    async fn key(&self, key_id: &str) -> Result<Option<KeyRow>, StoreError> {
        Store::key(self, key_id).await
    }
    async fn write_key(&self, row: &KeyRow) -> Result<(), StoreError> {
        Store::write_key(self, row).await
    }
    async fn record_key_event(&self, row: &KeyEventRow) -> Result<(), StoreError> {
        Store::record_key_event(self, row).await
    }
    async fn key_events(
        &self,
        institution: Option<&str>,
        limit: u64,
    ) -> Result<Vec<KeyEventRow>, StoreError> {
        Store::key_events(self, institution, limit).await
    }
}

/// The dashboard's ClickHouse: lists through its reading user (with its row and time
/// limits), changes through its writing user.
pub struct Tables {
    pub read: Store,
    pub write: Store,
}

#[async_trait]
impl KeyStore for Tables {
    async fn current_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.read.current_keys().await
    }
    async fn keys_of_user(&self, institution: &str, user: &str) -> Result<Vec<KeyRow>, StoreError> {
        self.read.keys_of_user(institution, user).await
    }
    /// Read by the writer: an operation reads the state it is about to change, and must see
    /// what the writer last wrote.
    async fn key(&self, key_id: &str) -> Result<Option<KeyRow>, StoreError> {
        self.write.key(key_id).await
    }
    async fn write_key(&self, row: &KeyRow) -> Result<(), StoreError> {
        self.write.write_key(row).await
    }
    async fn record_key_event(&self, row: &KeyEventRow) -> Result<(), StoreError> {
        self.write.record_key_event(row).await
    }
    async fn key_events(
        &self,
        institution: Option<&str>,
        limit: u64,
    ) -> Result<Vec<KeyEventRow>, StoreError> {
        self.read.key_events(institution, limit).await
    }
}

/// Keys in memory, with the tables' semantics (highest version wins, log newest first).
#[cfg(test)]
#[derive(Default)]
pub struct Memory {
    rows: Mutex<Vec<KeyRow>>,
    events: Mutex<Vec<KeyEventRow>>,
}

#[cfg(test)]
impl Memory {
    fn current(&self) -> Vec<KeyRow> {
        let rows = self.rows.lock().unwrap();
        let mut latest: std::collections::BTreeMap<&str, &KeyRow> = Default::default();
        for r in rows.iter() {
            let e = latest.entry(r.key_id.as_str()).or_insert(r);
            if r.version > e.version {
                *e = r;
            }
        }
        latest.into_values().cloned().collect()
    }
}

#[cfg(test)]
#[async_trait]
impl KeyStore for Memory {
    async fn current_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        Ok(self.current())
    }
    async fn keys_of_user(&self, institution: &str, user: &str) -> Result<Vec<KeyRow>, StoreError> {
        Ok(self
            .current()
            .into_iter()
            .filter(|k| k.institution_id == institution && k.user_id == user)
            .collect())
    }
    async fn key(&self, key_id: &str) -> Result<Option<KeyRow>, StoreError> {
        Ok(self.current().into_iter().find(|k| k.key_id == key_id))
    }
    async fn write_key(&self, row: &KeyRow) -> Result<(), StoreError> {
        self.rows.lock().unwrap().push(row.clone());
        Ok(())
    }
    async fn record_key_event(&self, row: &KeyEventRow) -> Result<(), StoreError> {
        self.events.lock().unwrap().push(row.clone());
        Ok(())
    }
    async fn key_events(
        &self,
        institution: Option<&str>,
        limit: u64,
    ) -> Result<Vec<KeyEventRow>, StoreError> {
        let mut events: Vec<KeyEventRow> = self
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| institution.is_none_or(|i| e.institution_id == i))
            .cloned()
            .collect();
        // Pushed in order: the newest last.
        events.reverse();
        events.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(events)
    }
}
