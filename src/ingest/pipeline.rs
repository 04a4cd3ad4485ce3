//! One batch: decode → validate → dedupe → price → write. The write step is idempotent
//! and is simply run again after any failure.

use std::collections::{BTreeMap, HashMap};

use std::time::{Duration, Instant};

use chrono::Utc;

use super::decode::{decode, excerpt, DecodeOptions, RejectReason, Rejection};
use crate::domain::UsageEvent;
use crate::price::{price, PriceBook, Pricing};
use crate::store::rows::{DuplicateRow, EventRow, RejectedRow};
use crate::store::writer::{EventKey, Position};
use crate::store::{Store, StoreError};

/// A Kafka message as the pipeline sees it (owned: batches outlive the poll).
#[derive(Debug, Clone)]
pub struct Message {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Message {
    fn position(&self) -> Position {
        Position {
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// A decoded batch: valid events (first copy of each identity), in-batch copies, rejections.
pub struct Decoded<'a> {
    pub events: Vec<(UsageEvent, Position)>,
    /// (event, its position, position of the first copy in this batch)
    pub copies: Vec<(UsageEvent, Position, Position)>,
    pub rejected: Vec<(Rejection, &'a Message)>,
}

/// Decodes a batch and finds the copies within it. The identity of an event is its id
/// within its institution. With the Kafka key bound to the institution (`key_mismatch`
/// otherwise), all copies of an event are on one partition, so deduplication never needs
/// to look beyond the partition's own consumer.
pub fn decode_batch<'a>(messages: &'a [Message], opts: &DecodeOptions) -> Decoded<'a> {
    let results: Vec<(Result<UsageEvent, Rejection>, &Message)> = messages
        .iter()
        .map(|m| {
            (
                decode(&m.payload, opts).and_then(|e| check_key(&m.key, e)),
                m,
            )
        })
        .collect();
    // The first copy of each identity in the batch, found without copying the ids.
    let mut first: HashMap<(&str, &str), Position> = HashMap::with_capacity(results.len());
    let originals: Vec<Option<Position>> = results
        .iter()
        .map(|(r, m)| {
            let e = r.as_ref().ok()?;
            let id = (e.institution_id.as_str(), e.event_id.as_str());
            match first.get(&id) {
                Some(&original) => Some(original),
                None => {
                    first.insert(id, m.position());
                    None
                }
            }
        })
        .collect();
    drop(first);
    let mut out = Decoded {
        events: Vec::with_capacity(results.len()),
        copies: Vec::new(),
        rejected: Vec::new(),
    };
    for ((r, m), original) in results.into_iter().zip(originals) {
        match (r, original) {
            (Ok(event), Some(original)) => out.copies.push((event, m.position(), original)),
            (Ok(event), None) => out.events.push((event, m.position())),
            (Err(r), _) => out.rejected.push((r, m)),
        }
    }
    out
}

/// The contract keys every message by its event's `institution_id`.
fn check_key(key: &[u8], event: UsageEvent) -> Result<UsageEvent, Rejection> {
    if key == event.institution_id.as_str().as_bytes() {
        return Ok(event);
    }
    let shown = if key.is_empty() {
        "no key".to_owned()
    } else {
        format!("key `{}`", excerpt(&String::from_utf8_lossy(key)))
    };
    Err(Rejection::new(
        RejectReason::KeyMismatch,
        format!(
            "the message has {shown} but institution_id `{}`; publish every event (and every copy) with key = institution_id",
            excerpt(event.institution_id.as_str())
        ),
    ))
}

/// What a batch added to the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub priced: u64,
    pub unpriced: u64,
    pub duplicates: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    /// Messages whose result was already stored (a replay after a crash or retry).
    pub already_stored: u64,
    /// Newly stored rejections, for the dead-letter topic.
    pub new_rejections: Vec<(RejectReason, usize)>,
    /// Where the write's time went.
    pub stages: Stages,
}

/// Time spent per stage of the pipeline (summed over batches): what `scripts/bench`
/// prints as the breakdown and `/metrics` exports as `stage_seconds`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    /// JSON → validated event, in-batch copies.
    pub decode: Duration,
    /// Looking up what is already stored (events, copies, rejections).
    pub lookup: Duration,
    /// Pricing and building rows.
    pub price: Duration,
    /// The inserts into ClickHouse.
    pub insert: Duration,
}

impl Stages {
    pub fn add(&mut self, other: Stages) {
        self.decode += other.decode;
        self.lookup += other.lookup;
        self.price += other.price;
        self.insert += other.insert;
    }
}

impl Outcome {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Adds another part's counts (its dead-letter indexes refer to its own part and are
    /// not kept).
    pub fn merge(&mut self, other: Outcome) {
        self.priced += other.priced;
        self.unpriced += other.unpriced;
        self.duplicates += other.duplicates;
        self.already_stored += other.already_stored;
        self.stages.add(other.stages);
        for (reason, n) in other.rejected {
            *self.rejected.entry(reason).or_default() += n;
        }
    }
}

pub fn event_row(
    e: &UsageEvent,
    pricing: &Pricing,
    topic: &str,
    pos: Position,
    now: u32,
) -> EventRow {
    let (priced, cost, price_id, price_model, price_tier) = match pricing {
        Pricing::Priced(p) => (
            1,
            p.cost,
            p.price_id.clone(),
            p.price_model.clone(),
            p.tier_threshold,
        ),
        Pricing::Unpriced => (0, Default::default(), String::new(), String::new(), 0),
    };
    EventRow {
        event_id: e.event_id.as_str().to_owned(),
        occurred_at: e.occurred_at.timestamp() as u32,
        occurred_ms: e.occurred_at.timestamp_subsec_millis().min(999) as u16,
        institution_id: e.institution_id.as_str().to_owned(),
        user_id: e.user_id.clone(),
        api_key_id: e.api_key_id.clone(),
        provider: e.provider.clone(),
        model: e.model.clone(),
        endpoint: e.endpoint.clone(),
        service_tier: e.service_tier.clone(),
        status: e.status.clone(),
        latency_ms: e.latency_ms,
        tag_keys: e.tags.keys().cloned().collect(),
        tag_values: e.tags.values().cloned().collect(),
        input_tokens: e.usage.input,
        cache_read_tokens: e.usage.cache_read,
        cache_write_tokens: e.usage.cache_write,
        output_tokens: e.usage.output,
        reasoning_tokens: e.usage.reasoning,
        priced,
        cost,
        price_id,
        price_model,
        price_tier,
        kafka_topic: topic.to_owned(),
        kafka_partition: pos.partition,
        kafka_offset: pos.offset,
        ingested_at: now,
        version: 0,
        sign: 1,
        usage_estimated: u8::from(e.usage_estimated),
        billing: e.billing.as_str().to_owned(),
    }
}

/// Writes a decoded batch. Safe to call again with the same batch after any failure:
/// every row is looked up before it is written.
pub async fn store_batch(
    store: &Store,
    book: &PriceBook,
    topic: &str,
    decoded: &Decoded<'_>,
    dedupe_window_secs: i64,
) -> Result<Outcome, StoreError> {
    let now = Utc::now().timestamp() as u32;
    let mut outcome = Outcome::default();

    // Events: already stored at this very position means a replay; elsewhere, a copy.
    let all: Vec<EventKey> = decoded
        .events
        .iter()
        .map(|(e, _)| e)
        .chain(decoded.copies.iter().map(|(e, _, _)| e))
        .map(|e| EventKey {
            event_id: e.event_id.as_str(),
            institution_id: e.institution_id.as_str(),
            occurred_at: e.occurred_at.timestamp() as u32,
        })
        .collect();
    // Positions of the batch's valid messages: a copy's position may already be in
    // `duplicate_events` (a replay). Asking for all of them lets the three look-ups run
    // at once; only the copies' answers are used.
    let valid_positions: Vec<Position> = decoded
        .events
        .iter()
        .map(|(_, p)| *p)
        .chain(decoded.copies.iter().map(|(_, p, _)| *p))
        .collect();
    let rej_positions: Vec<Position> = decoded.rejected.iter().map(|(_, m)| m.position()).collect();
    let clock = Instant::now();
    let (stored, stored_dups, stored_rej) = tokio::try_join!(
        store.stored_events(topic, &all, dedupe_window_secs),
        store.stored_positions("duplicate_events", topic, &valid_positions),
        store.stored_positions("rejected_events", topic, &rej_positions),
    )?;
    outcome.stages.lookup += clock.elapsed();
    let clock = Instant::now();

    // Looked up by borrowed ids: no copies of the ids per event.
    let stored: HashMap<(&str, &str), Position> = stored
        .iter()
        .map(|((i, e), p)| ((i.as_str(), e.as_str()), *p))
        .collect();
    let stored_at = |e: &UsageEvent| {
        stored
            .get(&(e.institution_id.as_str(), e.event_id.as_str()))
            .copied()
    };
    let mut new_events = Vec::with_capacity(decoded.events.len());
    let mut dup_candidates: Vec<(&UsageEvent, Position, Position)> = Vec::new();
    for (e, pos) in &decoded.events {
        match stored_at(e).as_ref() {
            Some(p) if p == pos => outcome.already_stored += 1,
            Some(p) => dup_candidates.push((e, *pos, *p)),
            None => {
                let pricing = price(e, book);
                match pricing {
                    Pricing::Priced(_) => outcome.priced += 1,
                    Pricing::Unpriced => outcome.unpriced += 1,
                }
                new_events.push(event_row(e, &pricing, topic, *pos, now));
            }
        }
    }
    for (e, pos, first) in &decoded.copies {
        let original = stored_at(e).unwrap_or(*first);
        dup_candidates.push((e, *pos, original));
    }

    let duplicates: Vec<DuplicateRow> = dup_candidates
        .into_iter()
        .filter(|(_, p, _)| {
            let seen = stored_dups.contains(p);
            outcome.already_stored += u64::from(seen);
            !seen
        })
        .map(|(e, p, original)| DuplicateRow {
            received_at: now,
            event_id: e.event_id.as_str().to_owned(),
            institution_id: e.institution_id.as_str().to_owned(),
            kafka_topic: topic.to_owned(),
            kafka_partition: p.partition,
            kafka_offset: p.offset,
            original_partition: original.partition,
            original_offset: original.offset,
        })
        .collect();
    outcome.duplicates = duplicates.len() as u64;

    let mut rejected = Vec::new();
    for (i, (r, m)) in decoded.rejected.iter().enumerate() {
        if stored_rej.contains(&m.position()) {
            outcome.already_stored += 1;
            continue;
        }
        *outcome.rejected.entry(r.reason.as_str()).or_default() += 1;
        outcome.new_rejections.push((r.reason, i));
        let (institution_id, occurred_at) = super::decode::rejected_about(&m.payload, &m.key);
        rejected.push(RejectedRow {
            institution_id,
            occurred_at,
            received_at: now,
            kafka_topic: topic.to_owned(),
            kafka_partition: m.partition,
            kafka_offset: m.offset,
            kafka_key: m.key.clone(),
            reason: r.reason.as_str().to_owned(),
            detail: r.detail.clone(),
            payload: m.payload.clone(),
        });
    }
    outcome.stages.price += clock.elapsed();

    // Each insert is one atomic block; the order does not matter for correctness, so they
    // run at once. All three are awaited to the end even if one fails: an insert cut off
    // mid-request would not be remembered as one whose outcome is unknown.
    let clock = Instant::now();
    let (rejected, duplicates, events) = tokio::join!(
        store.insert_rejected(&rejected),
        store.insert_duplicates(&duplicates),
        store.insert_events(&new_events),
    );
    outcome.stages.insert += clock.elapsed();
    rejected.and(duplicates).and(events)?;
    Ok(outcome)
}
