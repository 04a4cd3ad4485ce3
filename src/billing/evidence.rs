//! Invoices anyone can verify. An issued invoice is computed from one snapshot of the
//! institution's stored events (their current state, one row per event id, streamed);
//! the same pass gives each line its evidence: the ids of the events behind it, a leaf
//! hash per event (its id and every field the invoice depends on) and the Merkle root
//! over those leaves, printed on the document. The ids and leaves are stored beside the
//! document, so that later anyone can recompute a line from the stored events and the
//! price book and learn which events, prices or bytes changed. Pure: no I/O here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::usage::Detail;
use super::{
    exact_amount, multiplier, quantities, round_cents, BillingError, Document, GroupSums, LineKey,
    LineManifest, Period, Quantities, Unpriced,
};
use crate::price::PriceBook;
use crate::store::billing::EventState;

/// The leaf hash of one event: SHA-256 over its id and the fields its invoice lines
/// depend on, NUL-separated. Anything else (user, key, latency) does not move money.
pub fn leaf(e: &EventState) -> [u8; 32] {
    let fields = [
        e.event_id.clone(),
        e.priced.to_string(),
        e.price_id.clone(),
        e.price_model.clone(),
        e.price_tier.to_string(),
        e.billing.clone(),
        e.estimated.to_string(),
        e.served().to_string(),
        e.input.to_string(),
        e.cache_read.to_string(),
        e.cache_write.to_string(),
        e.output.to_string(),
        e.reasoning.to_string(),
        e.cost.normalize().to_string(),
    ];
    let mut h = Sha256::new();
    for f in fields {
        h.update(f.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

/// A stored hex leaf as bytes (anything that is not 32 bytes of hex hashes to itself, so
/// it can never match a real leaf).
fn leaf_bytes(hex_leaf: &str) -> [u8; 32] {
    match hex::decode(hex_leaf) {
        Ok(b) if b.len() == 32 => b.try_into().expect("32 bytes"),
        _ => Sha256::digest(hex_leaf.as_bytes()).into(),
    }
}

/// The Merkle root over leaf hashes, in the order given (events sorted by id): parents
/// are SHA-256(0x01 ‖ left ‖ right), an odd last node is carried up unchanged; no leaves
/// gives SHA-256 of nothing.
pub fn merkle_root(leaves: &[[u8; 32]]) -> String {
    if leaves.is_empty() {
        return hex::encode(Sha256::digest(b""));
    }
    let mut level: Vec<[u8; 32]> = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => {
                    let mut h = Sha256::new();
                    h.update([1u8]);
                    h.update(l);
                    h.update(r);
                    h.finalize().into()
                }
                [one] => *one,
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    hex::encode(level[0])
}

/// One event as the sums invoices are computed from.
fn group_of(e: &EventState) -> GroupSums {
    GroupSums {
        price_id: e.price_id.clone(),
        price_model: e.price_model.clone(),
        price_tier: e.price_tier,
        byok: e.billing == "byok",
        estimated: e.estimated == 1,
        events: e.events,
        served: if e.served() { e.events } else { 0 },
        input: e.input,
        cache_read: e.cache_read,
        cache_write: e.cache_write,
        output: e.output,
        reasoning: e.reasoning,
        cost: e.cost.normalize(),
    }
}

fn add(g: &mut GroupSums, e: &GroupSums) {
    g.events += e.events;
    g.served += e.served;
    g.input += e.input;
    g.cache_read += e.cache_read;
    g.cache_write += e.cache_write;
    g.output += e.output;
    g.reasoning += e.reasoning;
    g.cost += e.cost;
}

/// Grouped sums and unpriced usage, one event at a time: exactly what the SQL sums of
/// `store::billing` give for the same rows.
#[derive(Default)]
pub struct UsageAcc {
    groups: BTreeMap<(String, String, u64, String, u8), GroupSums>,
    unpriced: Unpriced,
    models: BTreeSet<String>,
}

impl UsageAcc {
    pub fn add(&mut self, e: &EventState) {
        if e.priced == 0 {
            self.unpriced.events += e.events;
            self.unpriced.tokens += e.input + e.cache_read + e.cache_write + e.output;
            self.models.insert(e.model.clone());
            return;
        }
        let key = (
            e.price_id.clone(),
            e.price_model.clone(),
            e.price_tier,
            e.billing.clone(),
            e.estimated,
        );
        let g = self.groups.entry(key).or_insert_with(|| GroupSums {
            price_id: e.price_id.clone(),
            price_model: e.price_model.clone(),
            price_tier: e.price_tier,
            byok: e.billing == "byok",
            estimated: e.estimated == 1,
            ..Default::default()
        });
        add(g, &group_of(e));
    }

    pub fn finish(mut self) -> (Vec<GroupSums>, Unpriced) {
        self.unpriced.models = self.models.into_iter().collect();
        let groups = self
            .groups
            .into_values()
            .filter(|g| g.events != 0)
            .map(|mut g| {
                g.cost = g.cost.normalize();
                g
            })
            .collect();
        (groups, self.unpriced)
    }
}

/// What one row of the detailed usage export is about: day, user, group, key, model,
/// price entry, tier, billing, estimated, priced — the order rows are written in.
type DetailKey = (
    String,
    String,
    String,
    String,
    String,
    String,
    u64,
    String,
    u8,
    u8,
);

fn detail_key(e: &EventState) -> DetailKey {
    (
        e.day.clone(),
        e.user_id.clone(),
        e.group_id.clone(),
        e.api_key_id.clone(),
        e.model.clone(),
        e.price_id.clone(),
        e.price_tier,
        e.billing.clone(),
        e.estimated,
        e.priced,
    )
}

/// The detailed usage export's rows (day × user × group × key × model × entry), one event
/// at a time, from events sorted as `Store::event_states_by_detail` sorts them: a row is
/// complete when an event of the next one arrives, so one row is held, not the month.
/// The same rows as `store::usage_details` gives for the same events.
#[derive(Default)]
pub struct DetailsStream {
    current: Option<(DetailKey, GroupSums, bool)>,
}

impl DetailsStream {
    /// Folds in `e`; returns the row before it when `e` starts the next one. Events out
    /// of order are an error (a row would be split in two).
    pub fn add(&mut self, e: &EventState) -> Result<Option<Detail>, BillingError> {
        let key = detail_key(e);
        let done = match &self.current {
            Some((k, ..)) if *k == key => None,
            Some((k, ..)) if *k > key => {
                return Err(BillingError::Corrupt(format!(
                    "events for the usage export arrived out of order (event {})",
                    e.event_id
                )))
            }
            _ => self.current.take(),
        };
        let (_, g, _) = self.current.get_or_insert_with(|| {
            (
                key,
                GroupSums {
                    price_id: e.price_id.clone(),
                    price_model: e.price_model.clone(),
                    price_tier: e.price_tier,
                    byok: e.billing == "byok",
                    estimated: e.estimated == 1,
                    ..Default::default()
                },
                e.priced != 0,
            )
        });
        add(g, &group_of(e));
        done.map(detail_of).transpose()
    }

    /// The last row.
    pub fn finish(self) -> Result<Option<Detail>, BillingError> {
        self.current.map(detail_of).transpose()
    }
}

fn detail_of(
    ((day, user_id, group, api_key_id, model, ..), mut sums, priced): (DetailKey, GroupSums, bool),
) -> Result<Detail, BillingError> {
    sums.cost = sums.cost.normalize();
    Ok(Detail {
        day: day
            .parse()
            .map_err(|_| BillingError::Corrupt(format!("ClickHouse returned the day {day:?}")))?,
        user_id,
        group,
        api_key_id,
        model,
        priced,
        sums,
    })
}

/// One event's quantities per line key, or `None` when it is unpriced or the price book
/// cannot reproduce its stored cost (a changed event or price).
pub fn event_quantities(
    period: Period,
    e: &EventState,
    book: &PriceBook,
    byok_fee: Decimal,
) -> Option<Quantities> {
    if e.priced == 0 {
        return None;
    }
    quantities(period, std::slice::from_ref(&group_of(e)), book, byok_fee).ok()
}

/// Each line's evidence, folded one event at a time (events in id order, as the snapshot
/// streams them): which lines an event is on (its id and leaf are stored for each, as
/// they come) and per line the count, the Merkle root and the price entries. Memory: a
/// few hashes per line, whatever the number of events — nothing per event is kept.
pub struct LinesEvidence {
    keys: HashMap<LineKey, u32>,
    lines: Vec<LineEvidence>,
}

#[derive(Default, Clone)]
struct LineEvidence {
    events: u64,
    merkle: MerkleStream,
    price_ids: BTreeSet<String>,
}

impl LinesEvidence {
    pub fn new(doc: &Document) -> Self {
        LinesEvidence {
            keys: doc
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| (l.key(), i as u32))
                .collect(),
            lines: vec![LineEvidence::default(); doc.lines.len()],
        }
    }

    /// Folds in event `e` of `period`: the lines it is on (indices) and its leaf, to
    /// store. An unpriced event is on no line; one the price book cannot price is an
    /// error (as computing the document would have been).
    pub fn add(
        &mut self,
        period: Period,
        e: &EventState,
        book: &PriceBook,
        byok_fee: Decimal,
    ) -> Result<(Vec<u32>, [u8; 32]), BillingError> {
        if e.priced == 0 {
            return Ok((Vec::new(), [0; 32]));
        }
        let q = quantities(period, std::slice::from_ref(&group_of(e)), book, byok_fee)?;
        let on: Vec<u32> = q.keys().filter_map(|k| self.keys.get(k).copied()).collect();
        if on.is_empty() {
            return Ok((on, [0; 32]));
        }
        let leaf = leaf(e);
        for &i in &on {
            let l = &mut self.lines[i as usize];
            l.events += 1;
            l.merkle.push(leaf);
            if !l.price_ids.contains(&e.price_id) {
                l.price_ids.insert(e.price_id.clone());
            }
        }
        Ok((on, leaf))
    }

    /// Every line's manifest, in the document's order.
    pub fn manifest(&self) -> Vec<LineManifest> {
        self.lines
            .iter()
            .map(|l| LineManifest {
                events: l.events,
                merkle_root: l.merkle.root(),
                price_ids: l.price_ids.iter().cloned().collect(),
            })
            .collect()
    }
}

/// What one stored event contributes, now, to the lines of a document being verified.
#[derive(Debug, Clone)]
pub struct Facts {
    pub leaf: [u8; 32],
    /// (line index, quantity) for each line of the document it is on.
    pub lines: Vec<(u32, i64)>,
    /// Why the price book does not reproduce its stored cost, if it does not.
    pub problem: Option<String>,
}

/// An event's facts for a document whose line keys are `keys`.
pub fn facts(
    period: Period,
    e: &EventState,
    book: &PriceBook,
    byok_fee: Decimal,
    keys: &HashMap<LineKey, u32>,
) -> Facts {
    let mut f = Facts {
        leaf: leaf(e),
        lines: Vec::new(),
        problem: None,
    };
    if e.priced == 0 {
        return f;
    }
    match quantities(period, std::slice::from_ref(&group_of(e)), book, byok_fee) {
        Ok(q) => {
            f.lines = q
                .into_iter()
                .filter_map(|(k, n)| keys.get(&k).map(|&i| (i, n)))
                .collect();
        }
        Err(BillingError::BookChanged {
            price_id,
            stored,
            computed,
        }) => {
            f.problem = Some(format!(
                "at the price book, event {}'s token counts cost {computed} by `{price_id}` but its stored cost is {stored}: the event or the price changed",
                e.event_id
            ))
        }
        Err(err) => {
            f.problem = Some(format!(
                "the price book cannot price event {}: {err}",
                e.event_id
            ))
        }
    }
    f
}

/// What `verify` found about one line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LineCheck {
    /// 1-based, as printed.
    pub line: usize,
    pub description: String,
    pub ok: bool,
    pub problems: Vec<String>,
    /// Events of the line's key stored since the document was issued (they go on a later
    /// invoice as adjustments; not a problem of this document).
    pub arrived_later: u64,
}

/// A Merkle root computed one leaf at a time (the same root as `merkle_root`), in
/// O(log n) memory.
#[derive(Debug, Default, Clone)]
pub struct MerkleStream {
    stack: Vec<(u32, [u8; 32])>,
}

impl MerkleStream {
    fn parent(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([1u8]);
        h.update(l);
        h.update(r);
        h.finalize().into()
    }

    pub fn push(&mut self, leaf: [u8; 32]) {
        let mut node = (0u32, leaf);
        while let Some(top) = self.stack.last().filter(|t| t.0 == node.0) {
            node = (node.0 + 1, Self::parent(&top.1, &node.1));
            self.stack.pop();
        }
        self.stack.push(node);
    }

    pub fn root(&self) -> String {
        let mut it = self.stack.iter().rev();
        let Some(last) = it.next() else {
            return hex::encode(Sha256::digest(b""));
        };
        let mut right = last.1;
        for (_, left) in it {
            right = Self::parent(left, &right);
        }
        hex::encode(right)
    }
}

/// Most events a line check names; the rest are counted.
const NAMED: usize = 20;

/// One line's check, built while the recorded events and the stored ones are merged in
/// event-id order (both sorted), so that a line of a million events needs no more than
/// this.
#[derive(Debug, Default, Clone)]
pub struct LineAcc {
    merkle: MerkleStream,
    recorded: u64,
    qty: i64,
    problems: Vec<String>,
    unnamed: u64,
    arrived_later: u64,
}

impl LineAcc {
    fn problem(&mut self, p: String) {
        if self.problems.len() < NAMED {
            self.problems.push(p);
        } else {
            self.unnamed += 1;
        }
    }

    /// A recorded event that is no longer stored in the period.
    pub fn missing(&mut self, id: &str, hex_leaf: &str) {
        self.merkle.push(leaf_bytes(hex_leaf));
        self.recorded += 1;
        self.problem(format!("event {id} is no longer stored in the period"));
    }

    /// A recorded event, as stored now, on line `line`.
    pub fn recorded(&mut self, id: &str, hex_leaf: &str, f: &Facts, line: u32) {
        self.merkle.push(leaf_bytes(hex_leaf));
        self.recorded += 1;
        if f.leaf != leaf_bytes(hex_leaf) {
            self.problem(format!("event {id} changed since the document was issued"));
        }
        if let Some(p) = &f.problem {
            self.problem(p.clone());
        }
        self.qty += f
            .lines
            .iter()
            .filter(|(j, _)| *j == line)
            .map(|(_, n)| n)
            .sum::<i64>();
    }
}

/// Feeds one stored event and the lines that recorded it (`recorded`: (line, hex leaf))
/// into the checks; lines it is on now without having been recorded count it as stored
/// since.
pub fn merge_event(accs: &mut [LineAcc], id: &str, f: &Facts, recorded: &[(u32, String)]) {
    for (line, leaf) in recorded {
        if let Some(a) = accs.get_mut(*line as usize) {
            a.recorded(id, leaf, f, *line);
        }
    }
    for (line, _) in &f.lines {
        if !recorded.iter().any(|(l, _)| l == line) {
            if let Some(a) = accs.get_mut(*line as usize) {
                a.arrived_later += 1;
            }
        }
    }
}

/// Line `i` of `doc` against what its recorded events come to now.
pub fn check_line(doc: &Document, i: usize, acc: &LineAcc, billed_before: Decimal) -> LineCheck {
    let l = &doc.lines[i];
    let mut problems = acc.problems.clone();
    if acc.unnamed > 0 {
        problems.push(format!("and {} more event(s) like these", acc.unnamed));
    }
    let Some(m) = doc.manifest.get(i) else {
        return LineCheck {
            line: i + 1,
            description: l.description(),
            ok: false,
            problems: vec!["the document has no manifest for this line".into()],
            arrived_later: 0,
        };
    };
    if acc.recorded != m.events || acc.merkle.root() != m.merkle_root {
        problems.insert(
            0,
            format!(
                "the stored event list does not match the document's Merkle root ({} events stored, {} on the document)",
                acc.recorded, m.events
            ),
        );
    }
    let key = l.key();
    let mult = multiplier(doc.contract_percent);
    let now_amount = round_cents(exact_amount(key.class, acc.qty, key.unit_price) * mult);
    match (l.now_amount, l.billed_before) {
        (Some(n), Some(b)) => {
            if n != now_amount {
                problems.push(format!(
                    "its events come to {now_amount}, the document says {n}"
                ));
            }
            if b != billed_before {
                problems.push(format!(
                    "earlier documents billed {billed_before}, the document says {b}"
                ));
            }
            if l.amount != n - b {
                problems.push(format!("amount {} is not {n} − {b}", l.amount));
            }
        }
        _ => {
            if acc.qty != l.quantity {
                problems.push(format!(
                    "its events come to {} units, the document says {}",
                    acc.qty, l.quantity
                ));
            }
            if now_amount != l.amount {
                problems.push(format!(
                    "its events come to {now_amount}, the document says {}",
                    l.amount
                ));
            }
        }
    }
    LineCheck {
        line: i + 1,
        description: l.description(),
        ok: problems.is_empty(),
        problems,
        arrived_later: acc.arrived_later,
    }
}

/// What `verify` found about the document itself.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DocumentCheck {
    pub number: String,
    pub ok: bool,
    pub problems: Vec<String>,
}

/// Checks a document's bytes: that they are the canonical rendering of a document, that
/// its SHA-256 is the one it records, that the ledger's copy is the same document, and
/// that it names its predecessor's hash.
pub fn check_document(
    bytes: &[u8],
    ledger: &[Document],
) -> Result<(Document, DocumentCheck), String> {
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| {
        format!("not a tokentally document (the JSON rendering of an invoice or credit note): {e}")
    })?;
    let mut problems = Vec::new();
    if super::render::json(&doc).as_bytes() != bytes {
        let pos = super::render::json(&doc)
            .as_bytes()
            .iter()
            .zip(bytes)
            .position(|(a, b)| a != b)
            .unwrap_or(bytes.len().min(super::render::json(&doc).len()));
        problems.push(format!(
            "the file is not the document as issued: it differs from its canonical rendering at byte {pos}"
        ));
    }
    let hash = doc.content_hash();
    if doc.sha256.is_empty() {
        problems.push("the document carries no SHA-256 (issued before documents were hash-chained, or a draft)".into());
    } else if hash != doc.sha256 {
        problems.push(format!(
            "its content hashes to {hash}, but it says {}: it was altered",
            doc.sha256
        ));
    }
    match ledger.iter().find(|d| d.number == doc.number) {
        None => problems.push(format!(
            "the ledger has no document numbered {}",
            doc.number
        )),
        Some(orig) => {
            if orig != &doc {
                problems.extend(differences(orig, &doc));
            }
            if let Some(prev) = ledger.iter().find(|d| d.seq + 1 == orig.seq) {
                let prev_hash = if prev.sha256.is_empty() {
                    prev.content_hash()
                } else {
                    prev.sha256.clone()
                };
                if !doc.sha256.is_empty() && doc.previous_sha256 != prev_hash {
                    problems.push(format!(
                        "it names {} as its predecessor's hash, but {} hashes to {prev_hash}",
                        doc.previous_sha256, prev.number
                    ));
                }
            }
        }
    }
    let check = DocumentCheck {
        number: doc.number.clone(),
        ok: problems.is_empty(),
        problems,
    };
    Ok((doc, check))
}

/// Where a document differs from the ledger's copy, named for a reader.
fn differences(orig: &Document, doc: &Document) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (a, b)) in orig.lines.iter().zip(&doc.lines).enumerate() {
        if a != b {
            out.push(format!(
                "line {} ({}) differs from the ledger's copy: {} {} {} there, {} {} {} here",
                i + 1,
                a.description(),
                a.quantity,
                a.unit_price,
                a.amount,
                b.quantity,
                b.unit_price,
                b.amount
            ));
        }
    }
    if orig.lines.len() != doc.lines.len() {
        out.push(format!(
            "the ledger's copy has {} lines, this one {}",
            orig.lines.len(),
            doc.lines.len()
        ));
    }
    for (what, a, b) in [
        ("total", orig.total, doc.total),
        ("subtotal", orig.subtotal, doc.subtotal),
        ("adjustments", orig.adjustments, doc.adjustments),
    ] {
        if a != b {
            out.push(format!("{what} is {a} in the ledger's copy, {b} here"));
        }
    }
    if out.is_empty() {
        out.push("it differs from the ledger's copy of the same number".into());
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `UsageAcc` over a slice.
    fn usage_of(states: &[EventState]) -> (Vec<GroupSums>, Unpriced) {
        let mut acc = UsageAcc::default();
        states.iter().for_each(|e| acc.add(e));
        acc.finish()
    }
    use crate::billing::{due_lines, priced, BilledLines};
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    /// One entry: $3 input, $15 output, $0.30 cached input per 1M tokens.
    const BOOK: &str = r#"
[[price]]
provider = "openai"
model = "m"
id = "m-1"
match = "m"
effective_from = "2024-01-01"
input_per_mtok = "3"
output_per_mtok = "15"
cache_read_per_mtok = "0.3"
"#;

    pub(crate) fn book() -> PriceBook {
        PriceBook::from_sources(&[("t.toml".into(), BOOK.into())]).unwrap()
    }

    pub(crate) fn event(id: &str, input: i64, cache_read: i64, output: i64) -> EventState {
        let cost = (Decimal::from(input) * dec!(3)
            + Decimal::from(cache_read) * dec!(0.3)
            + Decimal::from(output) * dec!(15))
            / dec!(1000000);
        EventState {
            event_id: id.into(),
            day: "2026-10-05".into(),
            user_id: "u".into(),
            group_id: String::new(),
            api_key_id: "k".into(),
            model: "m".into(),
            priced: 1,
            status: "ok".into(),
            price_id: "m-1".into(),
            price_model: "m".into(),
            price_tier: 0,
            billing: String::new(),
            estimated: 0,
            events: 1,
            input,
            cache_read,
            cache_write: 0,
            output,
            reasoning: 0,
            cost: cost.normalize(),
        }
    }

    type Stored = Vec<(u32, Vec<(String, String)>)>;

    /// The export's rows as the issuer streams them: events sorted as ClickHouse sorts
    /// them for it, one row held at a time.
    fn details_of(events: &[EventState]) -> Vec<Detail> {
        let mut sorted: Vec<&EventState> = events.iter().collect();
        sorted.sort_by_key(|e| (detail_key(e), e.event_id.clone()));
        let mut stream = DetailsStream::default();
        let mut out: Vec<Detail> = sorted
            .into_iter()
            .filter_map(|e| stream.add(e).unwrap())
            .collect();
        out.extend(stream.finish().unwrap());
        out
    }

    #[test]
    fn the_usage_export_sums_each_row_once_and_refuses_events_out_of_order() {
        // Two keys of one person on one day, their events interleaved by id.
        let mut events: Vec<EventState> = (0..6)
            .map(|i| {
                let mut e = event(&format!("e{i}"), 100 * (i + 1), 0, 10);
                e.api_key_id = if i % 2 == 0 { "k-a" } else { "k-b" }.into();
                e
            })
            .collect();
        let rows = details_of(&events);
        let per_key: Vec<(&str, i64)> = rows
            .iter()
            .map(|d| (d.api_key_id.as_str(), d.sums.input))
            .collect();
        // k-a: e0, e2, e4 (100 + 300 + 500); k-b: e1, e3, e5 (200 + 400 + 600).
        assert_eq!(per_key, [("k-a", 900), ("k-b", 1200)]);
        assert_eq!(rows[0].sums.events, 3);
        // In id order (as evidence reads them) the rows would split: refused instead.
        events.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        let mut stream = DetailsStream::default();
        let results: Vec<_> = events.iter().map(|e| stream.add(e)).collect();
        assert!(
            results.iter().any(Result::is_err),
            "out of order is an error"
        );
    }

    #[test]
    fn the_usage_export_keeps_each_group_on_its_own_rows() {
        // One person, one key, one model: before and after moving from students to staff.
        let mut a = event("a", 1000, 0, 100);
        a.group_id = "students".into();
        let mut b = event("b", 2000, 0, 200);
        b.group_id = "staff".into();
        let c = event("c", 10, 0, 1); // a key without a member: no group
        let details = details_of(&[a, b, c]);
        let groups: Vec<&str> = details.iter().map(|d| d.group.as_str()).collect();
        assert_eq!(groups, ["", "staff", "students"]);
        let p: Period = "2026-10".parse().unwrap();
        let csv = crate::billing::render::usage_csv(p, &details, &book(), Decimal::ZERO).unwrap();
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap().split(',').collect();
        let at = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let mut per_group: BTreeMap<String, Decimal> = BTreeMap::new();
        for l in lines {
            let cells: Vec<&str> = l.split(',').collect();
            assert_eq!(cells.len(), header.len(), "{l}");
            *per_group.entry(cells[at("group")].to_owned()).or_default() +=
                cells[at("exact_amount")].parse::<Decimal>().unwrap();
        }
        // Each group's rows add up to its own events' cost (3 and 15 USD per million).
        assert_eq!(per_group["students"], dec!(0.0045));
        assert_eq!(per_group["staff"], dec!(0.009));
        assert_eq!(per_group[""], dec!(0.000045));
    }

    /// An issued-looking invoice of `states` (one period) with its manifest.
    fn issued(states: &[EventState], book: &PriceBook) -> (Document, Stored) {
        let p: Period = "2026-10".parse().unwrap();
        let (groups, _) = usage_of(states);
        let (q, w) = priced(p, &groups, book, Decimal::ZERO).unwrap();
        let mut doc = crate::billing::render::tests::sample(0);
        doc.contract_percent = dec!(-12.5);
        doc.lines = due_lines(
            &q,
            &w,
            &BilledLines::new(),
            p,
            multiplier(doc.contract_percent),
        );
        doc.totals();
        let mut lines = LinesEvidence::new(&doc);
        let mut by_line: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
        let mut sorted: Vec<&EventState> = states.iter().collect();
        sorted.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        for e in sorted {
            let (on, leaf) = lines.add(p, e, book, Decimal::ZERO).unwrap();
            for i in on {
                by_line
                    .entry(i)
                    .or_default()
                    .push((e.event_id.clone(), hex::encode(leaf)));
            }
        }
        let m = lines.manifest();
        let stored: Stored = (0..doc.lines.len() as u32)
            .map(|i| (i, by_line.remove(&i).unwrap_or_default()))
            .collect();
        doc.manifest = m;
        doc.sha256 = doc.content_hash();
        (doc, stored)
    }

    fn checks(
        doc: &Document,
        stored: &Stored,
        now: &[EventState],
        book: &PriceBook,
    ) -> Vec<LineCheck> {
        let p: Period = "2026-10".parse().unwrap();
        let keys: HashMap<LineKey, u32> = doc
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| (l.key(), i as u32))
            .collect();
        // The merge the service does over its two sorted streams, here over vectors.
        let mut recorded: Vec<(String, u32, String)> = stored
            .iter()
            .flat_map(|(i, v)| v.iter().map(move |(id, l)| (id.clone(), *i, l.clone())))
            .collect();
        recorded.sort();
        let mut events: Vec<&EventState> = now.iter().collect();
        events.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        let mut accs = vec![LineAcc::default(); doc.lines.len()];
        let mut r = recorded.iter().peekable();
        for e in events {
            while let Some((id, line, leaf)) =
                r.next_if(|(id, _, _)| id.as_str() < e.event_id.as_str())
            {
                accs[*line as usize].missing(id, leaf);
            }
            let mut mine = Vec::new();
            while let Some((_, line, leaf)) = r.next_if(|(id, _, _)| *id == e.event_id) {
                mine.push((*line, leaf.clone()));
            }
            let f = facts(p, e, book, Decimal::ZERO, &keys);
            merge_event(&mut accs, &e.event_id, &f, &mine);
        }
        for (id, line, leaf) in r {
            accs[*line as usize].missing(id, leaf);
        }
        (0..doc.lines.len())
            .map(|i| check_line(doc, i, &accs[i], Decimal::ZERO))
            .collect()
    }

    proptest! {
        // The streamed root is the root.
        #[test]
        fn the_streamed_merkle_root_equals_the_root(n in 0usize..70) {
            let leaves: Vec<[u8; 32]> =
                (0..n).map(|i| Sha256::digest(i.to_string().as_bytes()).into()).collect();
            let mut m = MerkleStream::default();
            leaves.iter().for_each(|l| m.push(*l));
            prop_assert_eq!(m.root(), merkle_root(&leaves));
        }
    }

    #[test]
    fn merkle_root_is_order_sensitive_and_covers_every_leaf() {
        let l: Vec<[u8; 32]> = ["a", "b", "c"]
            .iter()
            .map(|s| Sha256::digest(s.as_bytes()).into())
            .collect();
        let r = merkle_root(&l);
        assert_ne!(r, merkle_root(&l[..2]));
        assert_ne!(r, merkle_root(&[l[1], l[0], l[2]]));
        assert_eq!(r.len(), 64);
        assert_eq!(merkle_root(&l[..1]), hex::encode(l[0]));
    }

    #[test]
    fn snapshot_sums_equal_the_sum_of_its_events() {
        let states = vec![event("a", 100, 0, 10), event("b", 50, 20, 0)];
        let (g, u) = usage_of(&states);
        assert_eq!(g.len(), 1);
        assert_eq!(
            (g[0].events, g[0].input, g[0].cache_read, g[0].output),
            (2, 150, 20, 10)
        );
        assert_eq!(g[0].cost, (states[0].cost + states[1].cost).normalize());
        assert_eq!(u.events, 0);
    }

    #[test]
    fn an_untouched_invoice_verifies() {
        let b = book();
        let states = vec![event("a", 1_804_169, 0, 10), event("b", 50, 20, 999)];
        let (doc, stored) = issued(&states, &b);
        let c = checks(&doc, &stored, &states, &b);
        assert!(c.iter().all(|c| c.ok), "{c:?}");
        let bytes = super::super::render::json(&doc);
        let (_, dc) = check_document(bytes.as_bytes(), std::slice::from_ref(&doc)).unwrap();
        assert!(dc.ok, "{dc:?}");
    }

    proptest! {
        // Any single change to a stored event — any billed field, its id, or its removal —
        // is named by the check of a line it was on.
        #[test]
        fn any_change_to_one_event_is_detected(
            tokens in proptest::collection::vec((1i64..3_000_000, 0i64..50_000, 0i64..400_000), 1..12),
            which in any::<proptest::sample::Index>(),
            field in 0usize..7,
            delta in 1i64..1000,
        ) {
            let b = book();
            let states: Vec<EventState> = tokens.iter().enumerate()
                .map(|(i, (a, c, o))| event(&format!("e{i:03}"), *a, *c, *o)).collect();
            let (doc, stored) = issued(&states, &b);
            let mut now = states.clone();
            let i = which.index(now.len());
            let id = now[i].event_id.clone();
            match field {
                0 => now[i].input += delta,
                1 => now[i].output += delta,
                2 => now[i].cache_read += delta,
                3 => now[i].event_id = format!("{id}x"),
                4 => { now.remove(i); }
                5 => now[i].price_tier = 200_000,
                _ => now[i].estimated = 1,
            }
            let c = checks(&doc, &stored, &now, &b);
            let named = c.iter().any(|c| !c.ok && c.problems.iter().any(|p| p.contains(&id)));
            prop_assert!(named, "change {} to {} not named: {:?}", field, id, c);
        }

        // Any change to a rate that priced a line is detected on that line.
        #[test]
        fn any_change_to_a_price_used_is_detected(
            tokens in proptest::collection::vec((1i64..3_000_000, 1i64..50_000, 1i64..400_000), 1..8),
            which in 0usize..3,
            cents in 1i64..500,
        ) {
            let b = book();
            let states: Vec<EventState> = tokens.iter().enumerate()
                .map(|(i, (a, c, o))| event(&format!("e{i}"), *a, *c, *o)).collect();
            let (doc, stored) = issued(&states, &b);
            let rate = ["input_per_mtok", "output_per_mtok", "cache_read_per_mtok"][which];
            let old = ["3", "15", "0.3"][which];
            let new = (old.parse::<Decimal>().unwrap() + Decimal::new(cents, 2)).to_string();
            let src = BOOK.replace(&format!("{rate} = \"{old}\""), &format!("{rate} = \"{new}\""));
            let changed = PriceBook::from_sources(&[("t.toml".into(), src)]).unwrap();
            prop_assert_ne!(changed.version(), b.version());
            let c = checks(&doc, &stored, &states, &changed);
            prop_assert!(c.iter().any(|c| !c.ok && c.problems.iter().any(|p| p.contains("at the price book"))), "{:?}", c);
        }

        // Any single changed byte of an issued document is detected.
        #[test]
        fn any_changed_byte_of_a_document_is_detected(
            pos in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let b = book();
            let states = vec![event("a", 1_804_169, 10, 10), event("b", 50, 20, 999)];
            let (mut doc, _) = issued(&states, &b);
            doc.number = "TT-2026-000001".into();
            doc.seq = 1;
            doc.sha256 = doc.content_hash();
            let good = super::super::render::json(&doc).into_bytes();
            let mut bad = good.clone();
            let i = pos.index(bad.len());
            prop_assume!(bad[i] != byte);
            bad[i] = byte;
            match check_document(&bad, std::slice::from_ref(&doc)) {
                Err(_) => {}
                Ok((_, c)) => prop_assert!(!c.ok, "byte {} → {:?} went unnoticed", i, byte as char),
            }
        }
    }
}
