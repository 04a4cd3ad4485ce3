//! Proxy keys, ingest tokens, institutions' own provider keys and the audit log of every
//! change to them (tables `proxy_keys`, `upstream_keys`, `key_events`).
//!
//! Keys are versioned rows: a change appends the key's next state with a higher
//! `version`, and readers take each key's highest version (`LIMIT 1 BY`), so every
//! gateway instance sees the same state without locks. ClickHouse is where the gateway
//! instances already read usage from; a key store there survives restarts, is shared by
//! every instance, and is queried every couple of seconds (10,000 keys: one small read).

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// One state of a proxy key or ingest token.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct KeyRow {
    pub key_id: String,
    pub version: u64,
    /// `proxy` (calls models) or `ingest` (posts usage events).
    pub kind: String,
    /// SHA-256 (hex) of the whole secret key.
    pub secret_hash: String,
    /// The billed institution; for an ingest token `''` means any institution.
    pub institution_id: String,
    pub user_id: String,
    pub name: String,
    /// Models the key may use (exact ids, or prefixes ending in `*`); empty: any.
    pub models: Vec<String>,
    /// Unix seconds; 0: never.
    pub expires_at: u32,
    /// Requests per minute; 0: unlimited.
    pub rpm: u32,
    /// Tokens per minute; 0: unlimited.
    pub tpm: u64,
    pub revoked: u8,
    pub created_at: u32,
    pub created_by: String,
    pub updated_at: u32,
    pub updated_by: String,
    /// The alert whose spend-spike brake paused the key (`on_spike = "suspend_key"`);
    /// empty: not held.
    #[serde(default)]
    pub held: String,
}

/// One change to a key, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct KeyEventRow {
    pub at: u32,
    pub at_ms: u16,
    /// Who: a dashboard user, an API token's name, or `cli:<os user>`.
    pub actor: String,
    /// `create`, `revoke`, `rotate`, `upstream_set`, `upstream_remove`.
    pub action: String,
    pub key_id: String,
    pub institution_id: String,
    /// What changed, without secrets.
    pub detail: String,
}

/// One state of an institution's own provider key, encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct UpstreamKeyRow {
    pub institution_id: String,
    pub provider: String,
    pub version: u64,
    /// AES-GCM nonce and ciphertext (with tag), hex.
    pub nonce: String,
    pub ciphertext: String,
    pub fingerprint: String,
    pub removed: u8,
    pub set_at: u32,
    pub set_by: String,
}

impl Store {
    /// Every key's current state.
    pub async fn current_keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        Ok(self
            .client
            .query("SELECT ?fields FROM proxy_keys ORDER BY key_id, version DESC LIMIT 1 BY key_id")
            .fetch_all()
            .await?)
    }

    /// The current state of every key of one user of one institution.
    pub async fn keys_of_user(
        &self,
        institution: &str,
        user: &str,
    ) -> Result<Vec<KeyRow>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM proxy_keys WHERE institution_id = ? AND user_id = ? \
                 ORDER BY key_id, version DESC LIMIT 1 BY key_id",
            )
            .bind(institution)
            .bind(user)
            .fetch_all()
            .await?)
    }

    /// One key's current state.
    pub async fn key(&self, key_id: &str) -> Result<Option<KeyRow>, StoreError> {
        Ok(self
            .client
            .query("SELECT ?fields FROM proxy_keys WHERE key_id = ? ORDER BY version DESC LIMIT 1")
            .bind(key_id)
            .fetch_optional()
            .await?)
    }

    /// Appends a key's new state (its `version` must be above the current one).
    pub async fn write_key(&self, row: &KeyRow) -> Result<(), StoreError> {
        let mut insert = self.client.insert::<KeyRow>("proxy_keys").await?;
        insert.write(row).await?;
        insert.end().await?;
        Ok(())
    }

    pub async fn record_key_event(&self, row: &KeyEventRow) -> Result<(), StoreError> {
        let mut insert = self.client.insert::<KeyEventRow>("key_events").await?;
        insert.write(row).await?;
        insert.end().await?;
        Ok(())
    }

    /// The latest `limit` key changes, of one institution or of all.
    pub async fn key_events(
        &self,
        institution: Option<&str>,
        limit: u64,
    ) -> Result<Vec<KeyEventRow>, StoreError> {
        use super::sql::{s, Arg, Sql};
        let mut q = Sql::new("SELECT ?fields FROM key_events");
        if let Some(i) = institution {
            q.bind(" WHERE institution_id = ?", [s(i)]);
        }
        q.bind(
            " ORDER BY at DESC, at_ms DESC LIMIT ?",
            [Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX))],
        );
        Ok(q.query(&self.client).fetch_all().await?)
    }

    /// Every institution's current own provider key (removed ones included, flagged).
    pub async fn current_upstream_keys(&self) -> Result<Vec<UpstreamKeyRow>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT ?fields FROM upstream_keys ORDER BY institution_id, provider, version DESC \
                 LIMIT 1 BY institution_id, provider",
            )
            .fetch_all()
            .await?)
    }

    pub async fn write_upstream_key(&self, row: &UpstreamKeyRow) -> Result<(), StoreError> {
        let mut insert = self
            .client
            .insert::<UpstreamKeyRow>("upstream_keys")
            .await?;
        insert.write(row).await?;
        insert.end().await?;
        Ok(())
    }
}
