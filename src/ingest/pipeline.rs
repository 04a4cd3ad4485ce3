//! One batch: decode → validate → repair keys → dedupe → check identity → price →
//! write. The write step is idempotent and is simply run again after any failure.
//!
//! Identity is global: an event id bills once, whatever institution a copy names. A copy
//! whose id another institution already holds is rejected (`id_conflict`) before it is
//! stored. Two copies under different institutions stored at the same moment by two
//! instances (each looked before the other wrote) are caught after the write: the copy
//! that was stored later (by ingest time, then Kafka position) is cancelled by the owner
//! of its partition — at once if that owner sees the other copy, else on a copy of the
//! later event that the other owner publishes to it. Only the owner of a partition ever
//! cancels its rows, so a cancellation is never written twice.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use std::time::{Duration, Instant};

use chrono::Utc;

use crate::contract::decode::{decode, excerpt, DecodeOptions, RejectReason, Rejection};
use crate::domain::UsageEvent;
use crate::price::{price, PriceBook, Pricing};
use crate::store::rows::{DuplicateRow, EventRow, RejectedRow, RekeyedRow};
use crate::store::writer::{EventKey, Holder, Position};
use crate::store::{Store, StoreError};

/// Why a batch could not be written (it is written again).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka did not take a message that had to be published again first.
    #[error("publishing to Kafka: {0}")]
    Publish(String),
}

impl WriteError {
    pub fn is_retryable(&self) -> bool {
        match self {
            WriteError::Store(e) => e.is_retryable(),
            WriteError::Publish(_) => true,
        }
    }
}

/// A message ingest publishes to its own topic (where it came from is recorded in
/// `rekeyed_events`, or is the stored row it copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Republished<'a> {
    pub key: &'a str,
    pub payload: Cow<'a, [u8]>,
}

/// Publishes messages to the usage topic and waits until Kafka has them all.
pub trait Republish: Send + Sync {
    fn publish<'a>(
        &'a self,
        messages: Vec<Republished<'a>>,
    ) -> futures::future::BoxFuture<'a, Result<(), String>>;
}

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

/// A decoded batch: valid events (first copy of each identity), in-batch copies,
/// rejections, and valid events published under another Kafka key (to publish again).
pub struct Decoded<'a> {
    pub events: Vec<(UsageEvent, Position)>,
    /// (event, its position, position of the first copy in this batch)
    pub copies: Vec<(UsageEvent, Position, Position)>,
    pub rejected: Vec<(Rejection, &'a Message)>,
    pub rekey: Vec<(UsageEvent, &'a Message)>,
    pub messages: &'a [Message],
}

/// Decodes a batch and finds the copies within it. The contract keys every message by
/// its event's institution, so that every copy of an event lands on one partition, where
/// one consumer at a time deduplicates them: a valid event under another key (none, or a
/// random one) is set aside to be published again with the right key, where its copies
/// meet.
pub fn decode_batch<'a>(messages: &'a [Message], opts: &DecodeOptions) -> Decoded<'a> {
    let mut out = Decoded {
        events: Vec::with_capacity(messages.len()),
        copies: Vec::new(),
        rejected: Vec::new(),
        rekey: Vec::new(),
        messages,
    };
    let mut keyed: Vec<(UsageEvent, &Message)> = Vec::with_capacity(messages.len());
    for m in messages {
        match decode(&m.payload, opts) {
            Ok(e) if m.key == e.institution_id.as_str().as_bytes() => keyed.push((e, m)),
            Ok(e) => out.rekey.push((e, m)),
            Err(r) => out.rejected.push((r, m)),
        }
    }
    // The first copy of each identity in the batch, found without copying the ids.
    let mut first: HashMap<(&str, &str), Position> = HashMap::with_capacity(keyed.len());
    let originals: Vec<Option<Position>> = keyed
        .iter()
        .map(|(e, m)| {
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
    for ((event, m), original) in keyed.into_iter().zip(originals) {
        match original {
            Some(original) => out.copies.push((event, m.position(), original)),
            None => out.events.push((event, m.position())),
        }
    }
    out
}

impl Decoded<'_> {
    fn message_at(&self, pos: Position) -> Option<&Message> {
        self.messages.iter().find(|m| m.position() == pos)
    }
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
    /// Messages under a wrong or missing key, published again with the right one.
    pub rekeyed: u64,
    /// Stored copies cancelled because another institution's copy of the id came first.
    pub cancelled: u64,
    /// Copies published to another partition's owner to re-check an id there.
    pub rechecks: u64,
    /// Newly stored rejections (by position in the batch), for the dead-letter topic.
    pub new_rejections: Vec<(RejectReason, Position)>,
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
        self.rekeyed += other.rekeyed;
        self.cancelled += other.cancelled;
        self.rechecks += other.rechecks;
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
        status: e.status.as_str().to_owned(),
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

/// An event as contract v1 JSON, from its stored row (the copy a re-check publishes).
pub fn contract_json(r: &EventRow) -> Vec<u8> {
    let at = chrono::DateTime::from_timestamp(
        i64::from(r.occurred_at),
        u32::from(r.occurred_ms) * 1_000_000,
    )
    .unwrap_or_default();
    let mut v = serde_json::json!({
        "schema_version": 1,
        "event_id": r.event_id,
        "occurred_at": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "institution_id": r.institution_id,
        "user_id": r.user_id,
        "api_key_id": r.api_key_id,
        "provider": r.provider,
        "model": r.model,
        "endpoint": r.endpoint,
        "service_tier": r.service_tier,
        "status": r.status,
        "latency_ms": r.latency_ms,
        "usage": {
            "input_tokens": r.input_tokens,
            "cache_read_tokens": r.cache_read_tokens,
            "cache_write_tokens": r.cache_write_tokens,
            "output_tokens": r.output_tokens,
            "reasoning_tokens": r.reasoning_tokens,
        },
        "tags": r.tag_keys.iter().zip(&r.tag_values).collect::<BTreeMap<_, _>>(),
        "usage_estimated": r.usage_estimated == 1,
    });
    if !r.billing.is_empty() {
        v["billing"] = serde_json::Value::String(r.billing.clone());
    }
    serde_json::to_vec(&v).expect("json")
}

/// The copy of an event id that wins among copies under different institutions.
fn winner(holders: &[Holder]) -> Option<&Holder> {
    holders
        .iter()
        .min_by(|a, b| a.precedence().cmp(&b.precedence()))
}

fn id_conflict(event_id: &str, holder: &str, copy: &str) -> Rejection {
    Rejection::new(
        RejectReason::IdConflict,
        format!(
            "event id `{}` is already billed to institution `{}`; this copy names `{}` and is not billed (an event id bills once, whatever institution it names)",
            excerpt(event_id),
            excerpt(holder),
            excerpt(copy)
        ),
    )
}

fn rejected_row(r: &Rejection, m: &Message, topic: &str, now: u32) -> RejectedRow {
    let (institution_id, occurred_at) = crate::contract::decode::rejected_about(&m.payload, &m.key);
    RejectedRow {
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
    }
}

/// What one batch writes, gathered before the inserts.
#[derive(Default)]
struct Rows {
    events: Vec<EventRow>,
    rejected: Vec<RejectedRow>,
    duplicates: Vec<DuplicateRow>,
    rekeyed: Vec<RekeyedRow>,
    /// Cancellations (`sign = -1`) of stored copies that lost to another institution's.
    cancels: Vec<EventRow>,
}

impl Rows {
    fn reject(&mut self, outcome: &mut Outcome, r: &Rejection, m: &Message, topic: &str, now: u32) {
        *outcome.rejected.entry(r.reason.as_str()).or_default() += 1;
        outcome.new_rejections.push((r.reason, m.position()));
        self.rejected.push(rejected_row(r, m, topic, now));
    }

    /// Inserts everything at once. Each insert is one atomic block; the order does not
    /// matter for correctness. All are awaited to the end even if one fails: an insert
    /// cut off mid-request would not be remembered as one whose outcome is unknown.
    async fn insert(&self, store: &Store) -> Result<(), StoreError> {
        let (rejected, duplicates, events, rekeyed, cancels) = tokio::join!(
            store.insert_rejected(&self.rejected),
            store.insert_duplicates(&self.duplicates),
            store.insert_events(&self.events),
            store.insert_rekeyed(&self.rekeyed),
            store.insert_events(&self.cancels),
        );
        rejected
            .and(duplicates)
            .and(events)
            .and(rekeyed)
            .and(cancels)
    }
}

fn cancel_of(row: &EventRow) -> EventRow {
    EventRow {
        sign: -1,
        ..row.clone()
    }
}

/// Writes a decoded batch. Safe to call again with the same batch after any failure:
/// every row is looked up before it is written, and messages published again (re-keyed
/// events) are deduplicated where they land.
pub async fn store_batch(
    store: &Store,
    book: &PriceBook,
    topic: &str,
    decoded: &Decoded<'_>,
    dedupe_window_secs: i64,
    republish: &dyn Republish,
) -> Result<Outcome, WriteError> {
    let now = Utc::now().timestamp() as u32;
    let mut outcome = Outcome::default();

    // Events: already stored at this very position means a replay; elsewhere, a copy.
    let valid: Vec<&UsageEvent> = decoded
        .events
        .iter()
        .map(|(e, _)| e)
        .chain(decoded.copies.iter().map(|(e, _, _)| e))
        .collect();
    let all: Vec<EventKey> = valid
        .iter()
        .map(|e| EventKey {
            event_id: e.event_id.as_str(),
            institution_id: e.institution_id.as_str(),
            occurred_at: e.occurred_at.timestamp() as u32,
        })
        .collect();
    // Positions of the batch's valid messages: a copy's position may already be in
    // `duplicate_events`, and any event's in `rejected_events` (an id another institution
    // holds), after a replay. Asking for all of them lets the look-ups run at once.
    let valid_positions: Vec<Position> = decoded
        .events
        .iter()
        .map(|(_, p)| *p)
        .chain(decoded.copies.iter().map(|(_, p, _)| *p))
        .collect();
    let rej_positions: Vec<Position> = decoded
        .rejected
        .iter()
        .map(|(_, m)| m.position())
        .chain(valid_positions.iter().copied())
        .collect();
    let rekey_positions: Vec<Position> = decoded.rekey.iter().map(|(_, m)| m.position()).collect();
    let ids: Vec<&str> = valid.iter().map(|e| e.event_id.as_str()).collect();
    let (lo, hi) = valid.iter().fold((i64::MAX, i64::MIN), |(lo, hi), e| {
        let t = e.occurred_at.timestamp();
        (lo.min(t), hi.max(t))
    });
    let clock = Instant::now();
    let (stored, stored_dups, stored_rej, stored_rekeyed, holders) = tokio::try_join!(
        store.stored_events(topic, &all, dedupe_window_secs),
        store.stored_positions("duplicate_events", topic, &valid_positions),
        store.stored_positions("rejected_events", topic, &rej_positions),
        store.stored_positions("rekeyed_events", topic, &rekey_positions),
        store.identity_holders(&ids, lo - dedupe_window_secs, hi + dedupe_window_secs),
    )?;
    outcome.stages.lookup += clock.elapsed();

    // Messages under a wrong key: published again with the right one first, then
    // recorded (a crash in between publishes them once more; the copies are deduplicated).
    let mut rows = Rows::default();
    let rekey: Vec<&(UsageEvent, &Message)> = decoded
        .rekey
        .iter()
        .filter(|(_, m)| {
            let done = stored_rekeyed.contains(&m.position());
            outcome.already_stored += u64::from(done);
            !done
        })
        .collect();
    republish
        .publish(
            rekey
                .iter()
                .map(|(e, m)| Republished {
                    key: e.institution_id.as_str(),
                    payload: Cow::Borrowed(&m.payload),
                })
                .collect(),
        )
        .await
        .map_err(WriteError::Publish)?;
    for (e, m) in &rekey {
        rows.rekeyed.push(RekeyedRow {
            received_at: now,
            event_id: e.event_id.as_str().to_owned(),
            institution_id: e.institution_id.as_str().to_owned(),
            kafka_topic: topic.to_owned(),
            kafka_partition: m.partition,
            kafka_offset: m.offset,
            kafka_key: m.key.clone(),
        });
    }
    outcome.rekeyed = rows.rekeyed.len() as u64;
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
    let other_holder = |e: &UsageEvent| {
        holders.get(e.event_id.as_str()).and_then(|hs| {
            hs.iter()
                .find(|h| h.institution_id != e.institution_id.as_str())
        })
    };
    // The institution each id is given to in this batch (the first copy by position).
    let mut taken: HashMap<&str, &str> = HashMap::new();
    let mut dup_candidates: Vec<(&UsageEvent, Position, Position)> = Vec::new();
    for (e, pos) in &decoded.events {
        match stored_at(e).as_ref() {
            Some(p) if p == pos => outcome.already_stored += 1,
            Some(p) => dup_candidates.push((e, *pos, *p)),
            None if stored_rej.contains(pos) => outcome.already_stored += 1,
            None => {
                let inst = e.institution_id.as_str();
                let holder = other_holder(e)
                    .map(|h| h.institution_id.as_str())
                    .or_else(|| {
                        taken
                            .get(e.event_id.as_str())
                            .copied()
                            .filter(|i| *i != inst)
                    });
                if let Some(holder) = holder {
                    let m = decoded.message_at(*pos).expect("the batch's own message");
                    rows.reject(
                        &mut outcome,
                        &id_conflict(e.event_id.as_str(), holder, inst),
                        m,
                        topic,
                        now,
                    );
                    continue;
                }
                taken.insert(e.event_id.as_str(), inst);
                let pricing = price(e, book);
                match pricing {
                    Pricing::Priced(_) => outcome.priced += 1,
                    Pricing::Unpriced => outcome.unpriced += 1,
                }
                rows.events.push(event_row(e, &pricing, topic, *pos, now));
            }
        }
    }
    for (e, pos, first) in &decoded.copies {
        let original = stored_at(e).unwrap_or(*first);
        dup_candidates.push((e, *pos, original));
    }
    rows.duplicates = dup_candidates
        .iter()
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
    outcome.duplicates = rows.duplicates.len() as u64;
    // A copy of a stored event whose id another institution holds too: if the other copy
    // came first, the stored one is cancelled here (this instance owns its partition).
    let contested: Vec<&UsageEvent> = dup_candidates
        .iter()
        .filter(|(e, _, _)| other_holder(e).is_some())
        .map(|(e, _, _)| *e)
        .collect();
    cancel_losers(
        store,
        topic,
        None,
        &holders,
        &contested,
        &mut rows,
        &mut outcome,
        now,
    )
    .await?;

    for (r, m) in &decoded.rejected {
        if stored_rej.contains(&m.position()) {
            outcome.already_stored += 1;
            continue;
        }
        rows.reject(&mut outcome, r, m, topic, now);
    }
    outcome.stages.price += clock.elapsed();

    let clock = Instant::now();
    rows.insert(store).await?;
    outcome.stages.insert += clock.elapsed();

    // Copies under other institutions stored at the same moment by another instance.
    // This batch's events whose copy is stored at their own position: written now, or
    // before (a replay).
    let mine: Vec<&UsageEvent> = decoded
        .events
        .iter()
        .filter(|(e, pos)| match stored_at(e) {
            Some(p) => p == *pos,
            None => taken.get(e.event_id.as_str()) == Some(&e.institution_id.as_str()),
        })
        .map(|(e, _)| e)
        .collect();
    after_write(store, topic, decoded, &mine, republish, &mut outcome, now).await?;
    Ok(outcome)
}

/// Cancels the stored copies of `contested` events (ids another institution holds too)
/// that lost: another institution's copy was stored first. Each cancellation is a
/// `sign = -1` row and an `id_conflict` rejection at the copy's position, written once
/// (only while the copy still counts). Only the owner of the copies' partition calls it.
#[allow(clippy::too_many_arguments)]
async fn cancel_losers(
    store: &Store,
    topic: &str,
    batch: Option<&Decoded<'_>>,
    holders: &HashMap<String, Vec<Holder>>,
    contested: &[&UsageEvent],
    rows: &mut Rows,
    outcome: &mut Outcome,
    now: u32,
) -> Result<(), StoreError> {
    let mut losers: Vec<(&str, &str, &str)> = Vec::new();
    let mut seen = HashSet::new();
    for e in contested {
        let (id, inst) = (e.event_id.as_str(), e.institution_id.as_str());
        let Some(w) = holders.get(id).and_then(|hs| winner(hs)) else {
            continue;
        };
        if w.institution_id != inst && seen.insert((id, inst)) {
            losers.push((id, inst, w.institution_id.as_str()));
        }
    }
    if losers.is_empty() {
        return Ok(());
    }
    let pairs: Vec<(&str, &str)> = losers.iter().map(|(id, inst, _)| (*inst, *id)).collect();
    let stored = store.stored_event_rows(&pairs).await?;
    let live: Vec<(&(&str, &str, &str), &EventRow)> = losers
        .iter()
        .filter_map(|l| {
            let (row, n) = stored.get(&(l.1.to_owned(), l.0.to_owned()))?;
            (*n > 0).then_some((l, row))
        })
        .collect();
    let positions: Vec<Position> = live
        .iter()
        .filter(|(_, r)| r.kafka_topic == topic)
        .map(|(_, r)| Position {
            partition: r.kafka_partition,
            offset: r.kafka_offset,
        })
        .collect();
    let rejected = store
        .stored_positions("rejected_events", topic, &positions)
        .await?;
    for ((id, inst, holder), row) in live {
        let pos = Position {
            partition: row.kafka_partition,
            offset: row.kafka_offset,
        };
        if row.kafka_topic == topic && !rejected.contains(&pos) {
            // The original message when it is in this batch; else the event as stored.
            let m = batch
                .and_then(|b| b.message_at(pos))
                .cloned()
                .unwrap_or_else(|| Message {
                    partition: row.kafka_partition,
                    offset: row.kafka_offset,
                    key: inst.as_bytes().to_vec(),
                    payload: contract_json(row),
                });
            rows.reject(outcome, &id_conflict(id, holder, inst), &m, topic, now);
        }
        rows.cancels.push(cancel_of(row));
        outcome.cancelled += 1;
    }
    Ok(())
}

/// After a write: are the ids this batch stored (`mine`) held by another institution
/// too, stored by another instance while this one looked? The copy stored later loses:
/// if it is this batch's, it is cancelled now; if it is the other's, a copy of the other
/// event is published to its partition, whose owner cancels it there.
#[allow(clippy::too_many_arguments)]
async fn after_write(
    store: &Store,
    topic: &str,
    decoded: &Decoded<'_>,
    mine: &[&UsageEvent],
    republish: &dyn Republish,
    outcome: &mut Outcome,
    now: u32,
) -> Result<(), WriteError> {
    if mine.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = mine.iter().map(|e| e.event_id.as_str()).collect();
    let (lo, hi) = mine.iter().fold((i64::MAX, i64::MIN), |(lo, hi), e| {
        let t = e.occurred_at.timestamp();
        (lo.min(t), hi.max(t))
    });
    let holders = store.identity_holders(&ids, lo, hi).await?;
    let mut rows = Rows::default();
    let mut lost: Vec<&UsageEvent> = Vec::new();
    let mut others: Vec<(&str, &str)> = Vec::new();
    for e in mine {
        let Some(hs) = holders.get(e.event_id.as_str()).filter(|hs| hs.len() > 1) else {
            continue;
        };
        let Some(w) = winner(hs) else { continue };
        if w.institution_id != e.institution_id.as_str() {
            // This copy lost: cancelled here (this instance owns its partition).
            lost.push(e);
            continue;
        }
        for loser in hs.iter().filter(|h| h.institution_id != w.institution_id) {
            others.push((loser.institution_id.as_str(), loser.event_id.as_str()));
        }
    }
    cancel_losers(
        store,
        topic,
        Some(decoded),
        &holders,
        &lost,
        &mut rows,
        outcome,
        now,
    )
    .await?;
    // The other copies lost: their owner cancels them on a copy of each, published to
    // their partition (where the owner may have cancelled them already; then the copy
    // is a duplicate).
    let rechecks: Vec<(String, Vec<u8>)> = if others.is_empty() {
        Vec::new()
    } else {
        store
            .stored_event_rows(&others)
            .await?
            .into_values()
            .filter(|(_, live)| *live > 0)
            .map(|(row, _)| (row.institution_id.clone(), contract_json(&row)))
            .collect()
    };
    republish
        .publish(
            rechecks
                .iter()
                .map(|(inst, payload)| Republished {
                    key: inst,
                    payload: Cow::Borrowed(payload),
                })
                .collect(),
        )
        .await
        .map_err(WriteError::Publish)?;
    outcome.rechecks += rechecks.len() as u64;
    rows.insert(store).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> DecodeOptions {
        DecodeOptions {
            now: "2026-12-01T00:00:00Z".parse().unwrap(),
            max_future_skew: chrono::Duration::minutes(5),
        }
    }

    fn msg(offset: i64, key: &str, payload: &str) -> Message {
        Message {
            partition: 0,
            offset,
            key: key.as_bytes().to_vec(),
            payload: payload.as_bytes().to_vec(),
        }
    }

    fn event(id: &str, inst: &str) -> String {
        format!(
            r#"{{"schema_version":1,"event_id":"{id}","occurred_at":"2026-11-02T10:00:00.250Z","institution_id":"{inst}","provider":"openai","model":"gpt-4o-mini","usage":{{"input_tokens":10,"output_tokens":2}}}}"#
        )
    }

    #[test]
    fn events_under_another_key_are_set_aside_to_publish_again_not_rejected() {
        let messages = vec![
            msg(0, "uni-a", &event("e1", "uni-a")),
            msg(1, "", &event("e2", "uni-a")),
            msg(2, "random-17", &event("e3", "uni-b")),
            msg(3, "uni-a", &event("e1", "uni-a")),
            msg(4, "", "not json"),
        ];
        let d = decode_batch(&messages, &opts());
        assert_eq!(d.events.len(), 1);
        assert_eq!(
            d.copies.len(),
            1,
            "the same id and institution again is a copy"
        );
        let rekey: Vec<(&str, i64)> = d
            .rekey
            .iter()
            .map(|(e, m)| (e.event_id.as_str(), m.offset))
            .collect();
        assert_eq!(rekey, vec![("e2", 1), ("e3", 2)]);
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].0.reason, RejectReason::InvalidJson);
    }

    #[test]
    fn a_stored_row_becomes_the_same_event_again() {
        let messages = vec![msg(0, "uni-a", &event("e1", "uni-a"))];
        let d = decode_batch(&messages, &opts());
        let (e, pos) = &d.events[0];
        let mut e = e.clone();
        e.tags.insert("course".into(), "inf100".into());
        let row = event_row(&e, &Pricing::Unpriced, "t", *pos, 0);
        let again = decode(&contract_json(&row), &opts()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn the_first_stored_copy_wins() {
        let h = |inst: &str, at: u32, partition: i32, offset: i64| Holder {
            event_id: "x".into(),
            institution_id: inst.into(),
            kafka_topic: "t".into(),
            kafka_partition: partition,
            kafka_offset: offset,
            ingested_at: at,
            live: 1,
        };
        assert_eq!(
            winner(&[h("b", 100, 0, 5), h("a", 101, 0, 1)])
                .unwrap()
                .institution_id,
            "b"
        );
        // Stored in the same second: the lower partition, then offset.
        assert_eq!(
            winner(&[h("b", 100, 2, 0), h("a", 100, 1, 9)])
                .unwrap()
                .institution_id,
            "a"
        );
    }
}
