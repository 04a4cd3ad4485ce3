//! The loop that keeps one gateway instance's limits current: the limits in force (when
//! they changed), the usage they count from ClickHouse, the other instances' holds; with
//! a shared store, the stored bases (written by the leader) and this instance's entries
//! kept alive there; then this instance's holds reported to the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::budget::{Budgets, CounterKey, LimitSet, Peers};
use super::shared::SharedStore;
use super::types::{DecisionMode, Derived, DerivedSource, Hold, Limit};
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Reports older than this are of instances that are gone.
const LIVE_SECS: i64 = 10;

/// A leader keeps counters of an ended period this long (requests admitted just before
/// the end still settle into them).
const ENDED_GRACE_SECS: i64 = 120;

/// One instance's refresher: what it needs between two refreshes.
pub struct Refresher {
    pub budgets: Arc<Budgets>,
    pub store: Store,
    /// The config's `[[limits]]` (overridden by those set with the CLI or dashboard).
    pub configured: Vec<Limit>,
    pub shared: Option<Arc<SharedStore>>,
    /// The limits people imply (group defaults, group budgets), if the process has people.
    pub derived: Option<Arc<dyn DerivedSource>>,
    /// The limits table's fingerprint (row count, highest version) and the derived
    /// limits when last read: the limits are read again only when one changes.
    fingerprint: Option<(u64, u64)>,
    last_derived: Option<Arc<Derived>>,
    failing: bool,
}

impl Refresher {
    pub fn new(
        budgets: Arc<Budgets>,
        store: Store,
        configured: Vec<Limit>,
        shared: Option<Arc<SharedStore>>,
    ) -> Self {
        Self {
            budgets,
            store,
            configured,
            shared,
            derived: None,
            fingerprint: None,
            last_derived: None,
            failing: false,
        }
    }

    /// Adds the limits people imply.
    pub fn with_derived(mut self, source: Arc<dyn DerivedSource>) -> Self {
        self.derived = Some(source);
        self
    }

    /// How this instance decides now.
    pub fn mode(&self) -> DecisionMode {
        self.shared
            .as_ref()
            .map_or(DecisionMode::Shares, |s| s.mode())
    }

    /// One refresh.
    pub async fn refresh(&mut self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let fingerprint = self.store.limits_fingerprint().await?;
        let derived = match &self.derived {
            Some(d) => d.derived().await?,
            None => Arc::new(Derived::default()),
        };
        let same_derived = self
            .last_derived
            .as_ref()
            .is_some_and(|d| Arc::ptr_eq(d, &derived));
        let set = if self.fingerprint == Some(fingerprint) && same_derived {
            self.budgets.limit_set()
        } else {
            LimitSet::with_groups(
                super::current(&self.store, &self.configured, &derived).await?,
                derived.groups.clone(),
            )
        };
        self.last_derived = Some(derived);
        // The leader stamps its read before it starts and lists the pending ids of every
        // counter in use first, so that the read tells which of them it holds.
        let lead = self.lead(&set).await;
        let mut extra: HashMap<(String, i64), Vec<String>> = HashMap::new();
        if let Some((_, in_use)) = &lead {
            for (key, _, ids) in in_use {
                if let Some(l) = set.get(&key.0) {
                    extra
                        .entry((l.institution_id.clone(), key.1))
                        .or_default()
                        .extend(ids.iter().cloned());
                }
            }
        }
        let reads = self.budgets.plan_set(&set, now, &extra);
        let mut results = Vec::with_capacity(reads.len());
        for r in reads {
            // The empty id never matches: it keeps the list's type known to ClickHouse.
            let mut pending = r.pending.clone();
            pending.push(String::new());
            let rows = self
                .store
                .limit_usage(
                    &r.institution,
                    r.start.timestamp(),
                    r.end.timestamp(),
                    pending,
                )
                .await?
                .into_iter()
                .map(super::rows::usage_of)
                .collect();
            results.push((r, rows));
        }
        let holds: Vec<Hold> = if set.is_empty() {
            Vec::new()
        } else {
            self.store
                .live_holds(now.timestamp() - LIVE_SECS)
                .await?
                .into_iter()
                .map(super::rows::hold_of)
                .collect()
        };
        let others = Peers::from_holds(&holds, self.budgets.instance());
        let limits_empty = set.is_empty();
        self.budgets.apply_set(set.clone(), &results, &others, now);
        self.fingerprint = Some(fingerprint);
        if let (Some(shared), Some((stamp, in_use))) = (&self.shared, lead) {
            self.write_bases(shared, &set, stamp, in_use, now).await;
        }
        if let Some(shared) = &self.shared {
            let (_, _, ends) = self.budgets.held();
            if let Err(e) = shared.sync(&self.budgets, &ends, now).await {
                tracing::debug!(error = %e, "cannot sync with the shared limit store");
            }
        }
        let mut rows = self.budgets.holds(now, self.mode());
        if !limits_empty {
            // A row of its own tells the others (and the dashboard) this instance is live
            // and how it decides.
            rows.push(Hold {
                instance: self.budgets.instance().to_owned(),
                reported_at: now.timestamp(),
                mode: self.mode(),
                ..Hold::default()
            });
        }
        let rows: Vec<_> = rows.iter().map(super::rows::hold_row).collect();
        self.store.write_holds(&rows).await?;
        Ok(())
    }

    /// With a shared store: takes or renews the leader's lease; as the leader, the read's
    /// stamp and the counters in use with their pending ids.
    async fn lead(&self, set: &LimitSet) -> Option<(i64, Vec<(CounterKey, i64, Vec<String>)>)> {
        let shared = self.shared.as_ref()?;
        if set.is_empty() {
            return None;
        }
        let result = async {
            if !shared.lead(self.budgets.instance()).await? {
                return Ok(None);
            }
            let stamp = shared.time_ms().await?;
            let in_use = shared.in_use().await?;
            Ok::<_, super::shared::SharedError>(Some((stamp, in_use)))
        }
        .await;
        result.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot lead the shared limit store");
            None
        })
    }

    /// As the leader: writes each counter's stored base and drops the pending ids the
    /// read found stored; forgets counters of ended periods and removed limits.
    async fn write_bases(
        &self,
        shared: &SharedStore,
        set: &LimitSet,
        stamp: i64,
        in_use: Vec<(CounterKey, i64, Vec<String>)>,
        now: DateTime<Utc>,
    ) {
        let mut bases = Vec::new();
        let mut gone = Vec::new();
        for (key, end, ids) in in_use {
            let Some(limit) = set.get(&key.0) else {
                gone.push((key, end));
                continue;
            };
            if end + ENDED_GRACE_SECS < now.timestamp() {
                gone.push((key, end));
                continue;
            }
            let Some((base, stored)) = self.budgets.stored_of(limit, key.1, end) else {
                continue;
            };
            let ids: Vec<String> = ids.into_iter().filter(|id| stored.contains(id)).collect();
            bases.push((key, base, ids));
        }
        if let Err(e) = shared.apply(self.budgets.instance(), stamp, bases).await {
            tracing::debug!(error = %e, "cannot write stored bases to the shared limit store");
        }
        if let Err(e) = shared.forget(&gone).await {
            tracing::debug!(error = %e, "cannot forget ended counters in the shared limit store");
        }
    }

    /// Refreshes, logging a failure once (the instance decides on its last known state).
    pub async fn tick(&mut self) {
        match self.refresh(Utc::now()).await {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("limits and usage read again");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::warn!(error = %e, "cannot refresh limits and usage; deciding on the last known state");
            }
            Err(_) => {}
        }
    }
}

/// Refreshes every `every` until `shutdown`, calling `after` after each refresh.
pub async fn keep_fresh(
    mut refresher: Refresher,
    every: Duration,
    mut shutdown: Shutdown,
    mut after: impl FnMut(&Refresher) + Send,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        refresher.tick().await;
        after(&refresher);
    }
}
