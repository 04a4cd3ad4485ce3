//! Limits as operators see them: set and removed from the CLI and the dashboard, merged
//! with the config's `[[limits]]`, and their standing (limit, spend, reserved,
//! remaining) read from ClickHouse and the gateways' reports.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::rows::{hold_of, limit_of, limit_row, usage_of};
use super::types::{Amounts, Derived, Limit, LimitScope, Metric, UsageIndex};
use crate::store::Store;

/// The config's `[[limits]]`, checked: each valid, none twice.
pub fn configured(values: &[toml::Value]) -> anyhow::Result<Vec<Limit>> {
    let mut out: Vec<Limit> = Vec::with_capacity(values.len());
    let mut ids = std::collections::BTreeSet::new();
    for v in values {
        let l: Limit = v
            .clone()
            .try_into()
            .map_err(|e| anyhow::anyhow!("[[limits]]: {e}"))?;
        l.validate()
            .map_err(|e| anyhow::anyhow!("limit {}: {e}", l.id()))?;
        if !ids.insert(l.id()) {
            anyhow::bail!("limit {} is configured twice", l.id());
        }
        out.push(l);
    }
    Ok(out)
}

/// The limits in force: the config's `[[limits]]`, overridden (or removed) by those set
/// with the CLI or dashboard (same id); then those people imply (`derived`: a member's
/// group defaults, a group's shared budget) where no limit with the same id is set (an
/// administrator changed that one member's limit, or removed it).
pub async fn current(
    store: &Store,
    configured: &[Limit],
    derived: &Derived,
) -> anyhow::Result<Vec<Limit>> {
    let rows = store.current_limits().await?;
    let mut by_id: HashMap<String, Limit> =
        configured.iter().map(|l| (l.id(), l.clone())).collect();
    let mut removed = std::collections::HashSet::new();
    for r in rows {
        if r.removed == 1 {
            by_id.remove(&r.limit_id);
            removed.insert(r.limit_id.clone());
            continue;
        }
        match limit_of(&r) {
            Ok(l) => {
                by_id.insert(l.id(), l);
            }
            Err(e) => tracing::warn!(
                limit = %crate::format::log_safe(&r.limit_id, 200),
                error = %e,
                "ignoring an unreadable limit"
            ),
        }
    }
    for l in &derived.limits {
        let id = l.id();
        if !by_id.contains_key(&id) && !removed.contains(&id) {
            by_id.insert(id, l.clone());
        }
    }
    let mut out: Vec<Limit> = by_id.into_values().collect();
    out.sort_by_key(Limit::id);
    Ok(out)
}

fn version_now() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0)
}

/// Sets (adds or changes) a limit; every gateway applies it within
/// `gateway.limits_refresh_ms`.
pub async fn set(store: &Store, limit: &Limit, actor: &str) -> anyhow::Result<()> {
    limit.validate().map_err(anyhow::Error::msg)?;
    let at = u32::try_from(Utc::now().timestamp()).unwrap_or(0);
    store
        .write_limit(&limit_row(limit, version_now(), false, at, actor))
        .await?;
    Ok(())
}

/// Removes a limit (also one from the config file, until it is set again).
pub async fn remove(
    store: &Store,
    configured: &[Limit],
    derived: &Derived,
    limit_id: &str,
    actor: &str,
) -> anyhow::Result<Limit> {
    let limit = current(store, configured, derived)
        .await?
        .into_iter()
        .find(|l| l.id() == limit_id)
        .ok_or_else(|| {
            anyhow::anyhow!("no limit {limit_id}; `tokentally limits list` shows them")
        })?;
    let at = u32::try_from(Utc::now().timestamp()).unwrap_or(0);
    store
        .write_limit(&limit_row(&limit, version_now(), true, at, actor))
        .await?;
    Ok(limit)
}

/// One limit's standing in its current period.
#[derive(Debug, Clone, Serialize)]
pub struct Standing {
    pub limit_id: String,
    /// `$5.00 per month`, `15 requests per day`.
    pub label: String,
    pub institution_id: String,
    pub scope: LimitScope,
    pub subject: String,
    pub metric: Metric,
    pub period: String,
    pub mode: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub limit: Decimal,
    /// Stored in ClickHouse, plus what gateways priced and have not stored yet.
    pub used: Decimal,
    /// Held by requests still running on the gateways.
    pub reserved: Decimal,
    pub remaining: Decimal,
    /// Requests this limit refused this period (over every gateway instance).
    pub blocked: u64,
}

/// The standing of every limit (of `institution`, or all) at `now`.
/// `zone`: an institution's time zone.
pub async fn standings(
    store: &Store,
    configured: &[Limit],
    derived: &Derived,
    zone: &(dyn Fn(&str) -> chrono_tz::Tz + Sync),
    institution: Option<&str>,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Standing>> {
    standings_of(
        store,
        configured,
        derived,
        zone,
        institution,
        now,
        &|_| true,
        None,
    )
    .await
}

/// The standing of the limits of `institution` (or all) that `keep` keeps. With
/// `person` (one person's view, "My usage": `keep` keeps only limits on them, their
/// keys, their group and their institution), usage is read for that person and their
/// group's members only, from the per-person rollup, and the institution's total from
/// the billing rollup — not everyone's raw events.
#[allow(clippy::too_many_arguments)]
pub async fn standings_of(
    store: &Store,
    configured: &[Limit],
    derived: &Derived,
    zone: &(dyn Fn(&str) -> chrono_tz::Tz + Sync),
    institution: Option<&str>,
    now: DateTime<Utc>,
    keep: &(dyn Fn(&Limit) -> bool + Sync),
    person: Option<&str>,
) -> anyhow::Result<Vec<Standing>> {
    let limits: Vec<Limit> = current(store, configured, derived)
        .await?
        .into_iter()
        .filter(|l| institution.is_none_or(|i| l.institution_id == i) && keep(l))
        .collect();
    let holds: Vec<_> = store
        .live_holds(now.timestamp() - 10)
        .await?
        .into_iter()
        .map(hold_of)
        .collect();
    // Per (institution, period): one query, indexed by user and key.
    let mut cache: HashMap<(String, i64, i64), UsageIndex> = HashMap::new();
    let refused = store.limit_refused_counts().await?;
    let mut out = Vec::new();
    for l in &limits {
        let tz = zone(&l.institution_id);
        let (start, end) = l.period.bounds(now, tz);
        let key = (l.institution_id.clone(), start.timestamp(), end.timestamp());
        if !cache.contains_key(&key) {
            let inst = l.institution_id.clone();
            let (from, to) = (start.timestamp(), end.timestamp());
            let ix = match person.filter(|_| from % 900 == 0 && to % 900 == 0) {
                Some(me) => {
                    let same = |m: &Limit| {
                        m.institution_id == inst && m.period.bounds(now, tz) == (start, end)
                    };
                    let here: Vec<&Limit> = limits.iter().filter(|m| same(m)).collect();
                    // The person, and everyone in a group whose shared limit applies.
                    let mut users = vec![me.to_owned()];
                    for g in here.iter().filter(|m| m.scope == LimitScope::Group) {
                        users.extend(
                            derived
                                .groups
                                .iter()
                                .filter(|((i, u), group)| {
                                    *i == inst && **group == g.subject && u != me
                                })
                                .map(|((_, u), _)| u.clone()),
                        );
                    }
                    let rows: Vec<_> = store
                        .person_usage(&inst, from, to, users)
                        .await?
                        .into_iter()
                        .map(usage_of)
                        .collect();
                    let ix = UsageIndex::of_rows_in_groups(
                        rows.iter().map(|r| (&r.user_id, &r.api_key_id, r.amounts)),
                        |user| derived.group_of(&inst, user),
                    );
                    if here.iter().any(|m| m.scope == LimitScope::Institution) {
                        let (usd, requests, tokens) =
                            store.institution_usage(&inst, from, to).await?;
                        ix.with_total(Amounts {
                            usd,
                            requests: u64::try_from(requests).unwrap_or(0),
                            tokens: u64::try_from(tokens).unwrap_or(0),
                        })
                    } else {
                        ix
                    }
                }
                None => {
                    let rows: Vec<_> = store
                        .limit_usage(&inst, from, to, vec![String::new()])
                        .await?
                        .into_iter()
                        .map(usage_of)
                        .collect();
                    UsageIndex::of_rows_in_groups(
                        rows.iter().map(|r| (&r.user_id, &r.api_key_id, r.amounts)),
                        |user| derived.group_of(&inst, user),
                    )
                }
            };
            cache.insert(key.clone(), ix);
        }
        let mut used = cache[&key].of(l);
        let mut reserved = Amounts::default();
        for h in holds
            .iter()
            .filter(|h| h.limit_id == l.id() && h.period_start == start.timestamp())
        {
            reserved.add(&h.reserved);
            used.add(&h.pending);
        }
        let (used, reserved) = (used.of(l.metric), reserved.of(l.metric));
        let blocked = refused
            .get(&(l.id(), u32::try_from(start.timestamp()).unwrap_or(0)))
            .copied()
            .unwrap_or(0);
        out.push(Standing {
            limit_id: l.id(),
            label: l.amount_label(),
            institution_id: l.institution_id.clone(),
            scope: l.scope,
            subject: l.subject.clone(),
            metric: l.metric,
            period: l.period.to_string(),
            mode: l.mode.to_string(),
            period_start: start,
            period_end: end,
            limit: l.amount,
            used: used.normalize(),
            reserved: reserved.normalize(),
            remaining: (l.amount - used - reserved).max(Decimal::ZERO).normalize(),
            blocked,
        });
    }
    Ok(out)
}
