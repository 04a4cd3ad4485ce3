//! Leases in ClickHouse, for jobs that must not run twice at once (two `reprice` runs
//! would both cancel the same rows and leave the rollups wrong).
//!
//! ClickHouse has no locks, so a lease is decided from an append-only log (table
//! `leases`): a candidate appends a `claim`, waits until concurrent claims are visible,
//! and reads every holder's latest row. An unexpired `active` holder keeps the lease;
//! otherwise the earliest unexpired claim wins. Every candidate computes the same winner
//! from the same rows, so at most one proceeds; the winner renews its lease while it
//! works and a crashed holder's lease expires after `ttl`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

#[derive(Row, Serialize)]
struct LeaseRow<'a> {
    name: &'a str,
    holder: &'a str,
    at: u64,
    state: &'a str,
    expires_at: u64,
}

#[derive(Row, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HolderState {
    pub holder: String,
    pub first_at: u64,
    pub last_state: String,
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("`{name}` is running elsewhere (holder {holder}); try again when it has finished")]
    Held { name: String, holder: String },
    #[error("the `{0}` lease could not be renewed in time; stopped so as not to run twice")]
    Lost(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who holds the lease, given every holder's latest state at `now` (pure, so the rule
/// can be tested without a server).
pub fn winner(states: &[HolderState], now: u64) -> Option<&HolderState> {
    let live = states
        .iter()
        .filter(|s| s.last_state != "released" && s.expires_at > now);
    let active = live
        .clone()
        .filter(|s| s.last_state == "active")
        .min_by_key(|s| (s.first_at, s.holder.clone()));
    active.or_else(|| live.min_by_key(|s| (s.first_at, s.holder.clone())))
}

fn now_ms() -> u64 {
    chrono::Utc::now().timestamp_millis().max(0) as u64
}

/// A held lease. Renewed in the background; `check` fails once it may have expired.
pub struct Lease {
    store: Store,
    name: String,
    holder: String,
    valid_until: Arc<AtomicI64>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Store {
    async fn write_lease(
        &self,
        name: &str,
        holder: &str,
        state: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let at = now_ms();
        let mut insert = self.client.insert::<LeaseRow<'_>>("leases").await?;
        insert
            .write(&LeaseRow {
                name,
                holder,
                at,
                state,
                expires_at: at + ttl.as_millis() as u64,
            })
            .await?;
        insert.end().await?;
        Ok(())
    }

    async fn lease_states(&self, name: &str) -> Result<Vec<HolderState>, StoreError> {
        Ok(self
            .client
            .query(
                "SELECT holder, min(at) AS first_at, argMax(state, at) AS last_state, \
                 argMax(expires_at, at) AS expires_at_ FROM leases WHERE name = ? GROUP BY holder",
            )
            .bind(name)
            .fetch_all::<HolderState>()
            .await?)
    }

    /// Takes the lease `name` for `ttl` (renewed every `ttl / 4` until dropped or
    /// released), or fails naming the current holder.
    pub async fn acquire_lease(&self, name: &str, ttl: Duration) -> Result<Lease, LeaseError> {
        let holder = format!(
            "{}:{}:{}",
            hostname(),
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        self.write_lease(name, &holder, "claim", ttl).await?;
        // Claims made at the same moment must be visible to each other before anyone
        // decides; an insert is visible once acknowledged, so a short pause suffices.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let states = self.lease_states(name).await?;
        let now = now_ms();
        match winner(&states, now) {
            Some(w) if w.holder == holder => {}
            other => {
                let _ = self.write_lease(name, &holder, "released", ttl).await;
                return Err(LeaseError::Held {
                    name: name.into(),
                    holder: other.map(|w| w.holder.clone()).unwrap_or_default(),
                });
            }
        }
        self.write_lease(name, &holder, "active", ttl).await?;
        let valid_until = Arc::new(AtomicI64::new((now + ttl.as_millis() as u64) as i64));
        let renewer = {
            let (store, name, holder, valid_until) = (
                self.clone(),
                name.to_owned(),
                holder.clone(),
                valid_until.clone(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 4).await;
                    let at = now_ms();
                    match store.write_lease(&name, &holder, "active", ttl).await {
                        Ok(()) => valid_until
                            .store((at + ttl.as_millis() as u64) as i64, Ordering::SeqCst),
                        Err(e) => {
                            tracing::warn!(error = %e, lease = %name, "renewing lease failed")
                        }
                    }
                }
            })
        };
        Ok(Lease {
            store: self.clone(),
            name: name.into(),
            holder,
            valid_until,
            renewer,
        })
    }
}

impl Lease {
    /// Fails if the lease might have expired (renewals failing): stop before writing.
    pub fn check(&self) -> Result<(), LeaseError> {
        // Keep a margin for clock reads and the time a write takes.
        if (now_ms() as i64) + 5_000 < self.valid_until.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(LeaseError::Lost(self.name.clone()))
        }
    }

    /// Gives the lease up at once (otherwise it expires after its ttl).
    pub async fn release(self) {
        self.renewer.abort();
        let _ = self
            .store
            .write_lease(&self.name, &self.holder, "released", Duration::ZERO)
            .await;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(holder: &str, first_at: u64, state: &str, expires_at: u64) -> HolderState {
        HolderState {
            holder: holder.into(),
            first_at,
            last_state: state.into(),
            expires_at,
        }
    }

    #[test]
    fn the_earliest_live_claim_wins_and_an_active_holder_keeps_it() {
        let now = 1_000;
        // Two claims at once: the earlier one wins, whoever reads.
        let states = [s("b", 20, "claim", 2_000), s("a", 10, "claim", 2_000)];
        assert_eq!(winner(&states, now).unwrap().holder, "a");
        // An active holder keeps the lease against a newcomer with an earlier clock.
        let states = [s("a", 50, "active", 2_000), s("b", 10, "claim", 2_000)];
        assert_eq!(winner(&states, now).unwrap().holder, "a");
        // Expired and released holders do not count.
        let states = [
            s("a", 10, "active", 900),
            s("b", 20, "released", 2_000),
            s("c", 30, "claim", 2_000),
        ];
        assert_eq!(winner(&states, now).unwrap().holder, "c");
        assert!(winner(&[s("a", 10, "released", 2_000)], now).is_none());
    }
}
