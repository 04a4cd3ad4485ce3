//! `reprice --since DATE`: re-rate stored events whose price changed or was missing.
//!
//! An event's current state is its `sign = 1` row with the highest `version`. A change
//! is written as a pair in one insert: the old state with `sign = -1` (cancelling it in
//! every sum, the rollup included) and the new state with `version + 1`. Running it
//! again changes nothing. Two runs at once would both cancel the same rows, so a run
//! holds the `reprice` lease (see `store::leases`) and a second one is refused.

use std::fmt;

use chrono::{NaiveDate, TimeZone, Utc};

use crate::domain::{EventId, InstitutionId, TokenCounts, UsageEvent};
use crate::price::{price, PriceBook, Pricing};
use crate::store::leases::LeaseError;
use crate::store::rows::EventRow;
use crate::store::{Store, StoreError};

/// How long a `reprice` lease lives without renewal (a crashed run blocks others this long).
const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RepriceSummary {
    pub examined: u64,
    pub changed: u64,
    pub newly_priced: u64,
    pub now_unpriced: u64,
    pub cost_delta: rust_decimal::Decimal,
    pub dry_run: bool,
}

impl fmt::Display for RepriceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}examined {} events: {} re-rated ({} newly priced, {} now unpriced), cost change {} USD",
            if self.dry_run { "dry run: " } else { "" },
            self.examined,
            self.changed,
            self.newly_priced,
            self.now_unpriced,
            self.cost_delta
        )
    }
}

/// Rebuilds what pricing needs from a stored row.
fn event_of(row: &EventRow) -> Option<UsageEvent> {
    Some(UsageEvent {
        event_id: EventId::parse(&row.event_id).ok()?,
        occurred_at: Utc
            .timestamp_opt(
                i64::from(row.occurred_at),
                u32::from(row.occurred_ms) * 1_000_000,
            )
            .single()?,
        institution_id: InstitutionId::parse(&row.institution_id).ok()?,
        user_id: String::new(),
        api_key_id: String::new(),
        provider: row.provider.clone(),
        model: row.model.clone(),
        endpoint: String::new(),
        service_tier: row.service_tier.clone(),
        status: crate::domain::Status::parse(&row.status),
        latency_ms: 0,
        usage: TokenCounts {
            input: row.input_tokens,
            cache_read: row.cache_read_tokens,
            cache_write: row.cache_write_tokens,
            output: row.output_tokens,
            reasoning: row.reasoning_tokens,
        },
        tags: Default::default(),
        usage_estimated: row.usage_estimated != 0,
        billing: crate::domain::Billing::parse(&row.billing).unwrap_or_default(),
    })
}

/// The re-rated state of `row`, or `None` when its price is unchanged.
pub fn rerate(row: &EventRow, book: &PriceBook) -> Option<EventRow> {
    let event = event_of(row)?;
    let mut next = row.clone();
    match price(&event, book) {
        Pricing::Priced(p) => {
            next.priced = 1;
            next.cost = p.cost;
            next.price_id = p.price_id;
            next.price_model = p.price_model;
            next.price_tier = p.tier_threshold;
        }
        Pricing::Unpriced => {
            next.priced = 0;
            next.cost = Default::default();
            next.price_id.clear();
            next.price_model.clear();
            next.price_tier = 0;
        }
    }
    let same = next.priced == row.priced
        && next.cost == row.cost
        && next.price_id == row.price_id
        && next.price_model == row.price_model
        && next.price_tier == row.price_tier;
    if same {
        return None;
    }
    next.version = row.version + 1;
    next.ingested_at = Utc::now().timestamp() as u32;
    Some(next)
}

const CHUNK: usize = 20_000;

pub async fn reprice(
    store: &Store,
    book: &PriceBook,
    since: NaiveDate,
    dry_run: bool,
) -> Result<RepriceSummary, LeaseError> {
    let lease = if dry_run {
        None
    } else {
        Some(store.acquire_lease("reprice", LEASE_TTL).await?)
    };
    let result = rerate_since(store, book, since, dry_run, lease.as_ref()).await;
    if let Some(l) = lease {
        l.release().await;
    }
    result
}

async fn rerate_since(
    store: &Store,
    book: &PriceBook,
    since: NaiveDate,
    dry_run: bool,
    lease: Option<&crate::store::leases::Lease>,
) -> Result<RepriceSummary, LeaseError> {
    let check = || lease.map_or(Ok(()), |l| l.check());
    let start = since
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
        .timestamp();
    let mut cursor = store.current_events_since(start)?;
    let mut summary = RepriceSummary {
        dry_run,
        ..Default::default()
    };
    let mut pending: Vec<EventRow> = Vec::new();
    while let Some(row) = cursor.next().await.map_err(StoreError::from)? {
        summary.examined += 1;
        let Some(next) = rerate(&row, book) else {
            continue;
        };
        summary.changed += 1;
        summary.newly_priced += u64::from(row.priced == 0 && next.priced == 1);
        summary.now_unpriced += u64::from(row.priced == 1 && next.priced == 0);
        summary.cost_delta += next.cost - row.cost;
        let mut cancel = row;
        cancel.sign = -1;
        pending.push(cancel);
        pending.push(next);
        if pending.len() >= CHUNK && !dry_run {
            check()?;
            store.insert_events(&pending).await?;
            pending.clear();
        }
    }
    if !dry_run {
        check()?;
        store.insert_events(&pending).await?;
    }
    summary.cost_delta = summary.cost_delta.normalize();
    tracing::info!(
        examined = summary.examined,
        changed = summary.changed,
        "reprice finished"
    );
    Ok(summary)
}
