//! Invoices: periods, lines, contract multipliers and rounding (pure), the numbered
//! ledger that freezes them, and their renderings (JSON, CSV, PDF).
//!
//! Money rule (DESIGN.md): a line's amount is the exact sum of its events' costs times
//! the institution's contract multiplier, rounded once to cents, half away from zero.
//! The total is the sum of the rounded lines. Nothing else rounds.

pub mod audit;
pub mod evidence;
pub mod format;
pub mod issue;
pub mod ledger;
pub mod render;
pub mod usage;

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::config::{Config, InstitutionConfig, PartyConfig};
use crate::format::unsigned_zero;
use crate::price::{PriceBook, Rates};

pub use crate::domain::Period;

/// What a line counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Input,
    CacheRead,
    CacheWrite,
    Output,
    Reasoning,
    /// Per-request fees: quantity is requests, the unit price is per request.
    Requests,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Input => "input",
            Class::CacheRead => "cache_read",
            Class::CacheWrite => "cache_write",
            Class::Output => "output",
            Class::Reasoning => "reasoning",
            Class::Requests => "requests",
        }
    }

    /// Unit prices are per million tokens, except request fees.
    pub fn per_million(self) -> bool {
        self != Class::Requests
    }
}

/// Sums over stored events that share one price entry and rate tier.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupSums {
    pub price_id: String,
    pub price_model: String,
    /// Long-context threshold whose rates applied (0: base rates).
    pub price_tier: u64,
    /// Served with the institution's own provider key: shown, not charged (only the
    /// contract's per-request platform fee is).
    pub byok: bool,
    /// The gateway estimated the usage (the provider reported none): shown as such.
    pub estimated: bool,
    pub events: i64,
    /// Events that reached the provider: what per-request fees apply to.
    pub served: i64,
    pub input: i64,
    pub cache_read: i64,
    pub cache_write: i64,
    pub output: i64,
    /// Sum over events of min(reasoning, output): what a reasoning rate applies to.
    pub reasoning: i64,
    /// Exact sum of the events' stored costs.
    pub cost: Decimal,
}

/// The identity of an invoice line: equal keys merge.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LineKey {
    pub period: Period,
    pub model: String,
    /// e.g. "batch" or "prompts > 200000 tokens"; empty for standard rates.
    pub variant: String,
    pub class: Class,
    pub unit_price: Decimal,
}

/// Exact quantities per line key, before the contract and rounding.
pub type Quantities = BTreeMap<LineKey, i64>;

/// What can go wrong in billing. The first group is the caller's to fix (the web layer
/// answers 4xx with the message); the rest are faults (opaque 500, logged).
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    #[error(
        "events priced by entry `{0}` which the price book no longer has; run `tokentally reprice`"
    )]
    MissingEntry(String),
    #[error("events priced by `{price_id}` cost {stored} in store but {computed} at the current price book; run `tokentally reprice` first")]
    BookChanged {
        price_id: String,
        stored: Decimal,
        computed: Decimal,
    },
    #[error("{period} has not ended yet for {institution} (it ends {}); issue it after that", ends_at(.end, .tz))]
    PeriodNotEnded {
        institution: String,
        period: Period,
        end: DateTime<Utc>,
        tz: chrono_tz::Tz,
    },
    #[error("{institution} {period} is already invoiced as {number}; `invoice void` it to issue a new one")]
    AlreadyInvoiced {
        institution: String,
        period: Period,
        number: String,
    },
    #[error("{institution} {period} has {events} unpriced events (models: {}); add prices and run `tokentally reprice`, or issue with --allow-unpriced to leave them off this invoice", .models.join(", "))]
    UnpricedUsage {
        institution: String,
        period: Period,
        events: i64,
        models: Vec<String>,
    },
    #[error("{0}")]
    Refused(String),
    #[error(
        "gave up after {attempts} attempts: other issuers kept changing {institution}'s invoices"
    )]
    Contended { attempts: u32, institution: String },
    #[error("the invoice ledger has not decided on the request yet; try again")]
    Undecided,
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("stored data is not what it should be: {0}")]
    Corrupt(String),
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("rendering: {0}")]
    Render(String),
    #[error("writing: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0} has no usage frozen at issue (a draft, a credit note, or issued before snapshots); use the usage-csv format for the live usage")]
    NoFrozenUsage(String),
}

impl BillingError {
    /// Whether the caller can act on the message (a state of the data, not a fault).
    pub fn is_refusal(&self) -> bool {
        match self {
            BillingError::MissingEntry(_)
            | BillingError::BookChanged { .. }
            | BillingError::PeriodNotEnded { .. }
            | BillingError::AlreadyInvoiced { .. }
            | BillingError::UnpricedUsage { .. }
            | BillingError::Refused(_)
            | BillingError::Contended { .. }
            | BillingError::Undecided
            | BillingError::NoFrozenUsage(_) => true,
            BillingError::Ledger(e) => e.is_refusal(),
            BillingError::Store(_)
            | BillingError::Corrupt(_)
            | BillingError::Kafka(_)
            | BillingError::Render(_)
            | BillingError::Io(_) => false,
        }
    }
}

/// "2026-12-01 00:00 Europe/Berlin (2026-11-30 23:00 UTC)", or one UTC time in UTC.
pub fn ends_at(end: &DateTime<Utc>, tz: &chrono_tz::Tz) -> String {
    let utc = end.format("%Y-%m-%d %H:%M UTC").to_string();
    if *tz == chrono_tz::UTC {
        return utc;
    }
    format!(
        "{} {} ({utc})",
        end.with_timezone(tz).format("%Y-%m-%d %H:%M"),
        tz.name()
    )
}

fn rates_for(book: &PriceBook, g: &GroupSums) -> Result<(String, Rates, Decimal), BillingError> {
    let entry = book
        .entry(&g.price_id)
        .ok_or_else(|| BillingError::MissingEntry(g.price_id.clone()))?;
    let rates = if g.price_tier == 0 {
        entry.rates.clone()
    } else {
        entry
            .tiers
            .iter()
            .find(|t| t.above_input_tokens == g.price_tier)
            .map(|t| t.rates.clone())
            .ok_or_else(|| BillingError::MissingEntry(g.price_id.clone()))?
    };
    let mut variant = Vec::new();
    if let Some(t) = &entry.service_tier {
        variant.push(t.clone());
    }
    if g.price_tier > 0 {
        variant.push(format!("prompts > {} tokens", g.price_tier));
    }
    Ok((variant.join(", "), rates, entry.per_request))
}

/// How usage served with an institution's own provider key appears on its invoices.
pub const BYOK_VARIANT: &str = "own provider key, not charged";
/// The per-request platform fee on that usage.
pub const BYOK_FEE_VARIANT: &str = "own provider key, platform fee";
/// How usage the gateway had to estimate appears.
pub const ESTIMATED_VARIANT: &str = "estimated usage";

/// The days each line key's unit price applied, where that is less than the period.
pub type Windows = BTreeMap<LineKey, DateRange>;

/// Splits grouped sums into line quantities, and checks that the current price book
/// reproduces the stored costs exactly (it does unless prices were edited without
/// `reprice`). Usage served with the institution's own provider key (`byok`) gets lines
/// of its own at a zero unit price, plus `byok_fee` per served request if the contract
/// has one; estimated usage gets lines of its own, marked.
pub fn quantities(
    period: Period,
    groups: &[GroupSums],
    book: &PriceBook,
    byok_fee: Decimal,
) -> Result<Quantities, BillingError> {
    Ok(priced(period, groups, book, byok_fee)?.0)
}

/// `quantities`, with the days each price applied (from the price book's effective
/// dates, clipped to the period) where a price covered only part of it.
pub fn priced(
    period: Period,
    groups: &[GroupSums],
    book: &PriceBook,
    byok_fee: Decimal,
) -> Result<(Quantities, Windows), BillingError> {
    let mut out = Quantities::new();
    let mut windows = Windows::new();
    let first = period.first_day();
    let last = period.next().first_day().pred_opt().unwrap_or(first);
    for g in groups {
        let (mut variant, rates, per_request) = rates_for(book, g)?;
        let window = book.entry(&g.price_id).map(|e| DateRange {
            from: e.effective_from.max(first),
            until: book
                .superseded_on(&g.price_id)
                .and_then(|d| d.pred_opt())
                .map_or(last, |d| d.min(last)),
        });
        let window = window.filter(|w| (w.from, w.until) != (first, last));
        let mut marks: Vec<&str> = Vec::new();
        if !variant.is_empty() {
            marks.push(&variant);
        }
        if g.estimated {
            marks.push(ESTIMATED_VARIANT);
        }
        if g.byok {
            marks.push(BYOK_VARIANT);
        }
        variant = marks.join(", ");
        let (output, reasoning) = match rates.reasoning_per_mtok {
            Some(r) => (g.output - g.reasoning, Some((g.reasoning, r))),
            None => (g.output, None),
        };
        let mut parts = vec![
            (Class::Input, g.input, rates.input_per_mtok),
            (Class::CacheRead, g.cache_read, rates.cache_read_per_mtok),
            (Class::CacheWrite, g.cache_write, rates.cache_write_per_mtok),
            (Class::Output, output, rates.output_per_mtok),
        ];
        if let Some((q, r)) = reasoning {
            parts.push((Class::Reasoning, q, r));
        }
        if !per_request.is_zero() {
            parts.push((Class::Requests, g.served, per_request));
        }
        let mut computed = Decimal::ZERO;
        for (class, qty, unit) in parts {
            if qty == 0 {
                continue;
            }
            let key = LineKey {
                period,
                model: g.price_model.clone(),
                variant: variant.clone(),
                class,
                unit_price: if g.byok {
                    Decimal::ZERO
                } else {
                    unit.normalize()
                },
            };
            computed += exact_amount(class, qty, unit);
            if let Some(w) = window {
                windows
                    .entry(key.clone())
                    .and_modify(|x| {
                        x.from = x.from.min(w.from);
                        x.until = x.until.max(w.until);
                    })
                    .or_insert(w);
            }
            *out.entry(key).or_default() += qty;
        }
        if g.byok && !byok_fee.is_zero() && g.served != 0 {
            let key = LineKey {
                period,
                model: g.price_model.clone(),
                variant: BYOK_FEE_VARIANT.into(),
                class: Class::Requests,
                unit_price: byok_fee.normalize(),
            };
            *out.entry(key).or_default() += g.served;
        }
        if computed != g.cost {
            return Err(BillingError::BookChanged {
                price_id: g.price_id.clone(),
                stored: g.cost,
                computed,
            });
        }
    }
    out.retain(|_, q| *q != 0);
    windows.retain(|k, _| out.contains_key(k));
    Ok((out, windows))
}

/// The exact (unrounded, pre-contract) amount of `qty` units at `unit`.
pub fn exact_amount(class: Class, qty: i64, unit: Decimal) -> Decimal {
    let v = Decimal::from(qty) * unit;
    if class.per_million() {
        v * Decimal::new(1, 6)
    } else {
        v
    }
}

/// 1 + percent/100.
pub fn multiplier(contract_percent: Decimal) -> Decimal {
    Decimal::ONE + contract_percent / Decimal::ONE_HUNDRED
}

/// Rounds once, to cents, half away from zero.
pub fn round_cents(d: Decimal) -> Decimal {
    let mut r = d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
    r.rescale(2);
    unsigned_zero(r)
}

/// What is still to bill: `live − billed` quantities, per key (nonzero only).
pub fn outstanding(live: &Quantities, billed: &Quantities) -> Quantities {
    let mut out = live.clone();
    for (k, q) in billed {
        *out.entry(k.clone()).or_default() -= q;
    }
    out.retain(|_, q| *q != 0);
    out
}

/// What documents have billed for one line key, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Billed {
    pub quantity: i64,
    pub exact: Decimal,
    pub amount: Decimal,
}

/// What documents billed per line key.
pub type BilledLines = BTreeMap<LineKey, Billed>;

/// The rule for every line, on a first invoice and on adjustments alike: a line bills
/// what the stored events of its key come to now under the contract (their exact sum ×
/// multiplier, rounded once to cents) minus what earlier documents billed for the key.
/// So all documents of a period together bill exactly what its events come to, line by
/// line, whatever order the events arrived in. Lines of the invoice's own period are
/// kept when their quantity is not zero (a $0.00 line still shows the usage);
/// adjustment lines only when they move money.
pub fn due_lines(
    live: &Quantities,
    windows: &Windows,
    billed: &BilledLines,
    invoice_period: Period,
    mult: Decimal,
) -> Vec<Line> {
    let keys: std::collections::BTreeSet<&LineKey> = live.keys().chain(billed.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        let now_q = live.get(k).copied().unwrap_or(0);
        let now_exact = exact_amount(k.class, now_q, k.unit_price);
        let now_amount = round_cents(now_exact * mult);
        let before = billed.get(k).copied().unwrap_or_default();
        let quantity = now_q - before.quantity;
        let mut amount = now_amount - before.amount;
        amount.rescale(2);
        let amount = unsigned_zero(amount);
        let adjustment = k.period != invoice_period;
        let keep = if adjustment {
            !amount.is_zero()
        } else {
            quantity != 0 || !amount.is_zero()
        };
        if !keep {
            continue;
        }
        let explained = adjustment || before != Billed::default();
        out.push(Line {
            period: k.period,
            adjustment,
            model: k.model.clone(),
            variant: k.variant.clone(),
            class: k.class,
            quantity,
            unit_price: k.unit_price,
            exact: unsigned_zero((now_exact - before.exact).normalize()),
            amount,
            contract_unit_price: Some((k.unit_price * mult).normalize()),
            applies: windows.get(k).copied(),
            now_amount: explained.then_some(now_amount),
            billed_before: explained.then_some(before.amount),
        });
    }
    out
}

/// Turns quantities into priced, rounded lines (nothing billed before).
pub fn lines(q: &Quantities, invoice_period: Period, mult: Decimal) -> Vec<Line> {
    due_lines(
        q,
        &Windows::new(),
        &BilledLines::new(),
        invoice_period,
        mult,
    )
}

/// One invoice line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The month the usage belongs to.
    pub period: Period,
    /// True for a correction to an earlier, already invoiced period.
    pub adjustment: bool,
    pub model: String,
    pub variant: String,
    pub class: Class,
    /// Tokens (or requests); negative on corrections and credit notes.
    pub quantity: i64,
    /// Per million tokens, or per request.
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    /// quantity × unit price, exact, before the contract.
    #[serde(with = "rust_decimal::serde::str")]
    pub exact: Decimal,
    /// exact × contract multiplier, rounded to cents.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// The unit price with the contract applied (list price × multiplier): quantity ×
    /// this is the amount before rounding. Absent on documents issued before it existed.
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub contract_unit_price: Option<Decimal>,
    /// The days of the usage period this unit price applied (set when it did not apply
    /// to the whole period, e.g. a price change mid-month).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applies: Option<DateRange>,
    /// On an adjustment: what the stored events of this line come to now (rounded) …
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub now_amount: Option<Decimal>,
    /// … and what earlier documents billed for it; amount = now_amount − billed_before.
    #[serde(
        default,
        with = "rust_decimal::serde::str_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub billed_before: Option<Decimal>,
}

/// Inclusive dates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateRange {
    pub from: NaiveDate,
    pub until: NaiveDate,
}

impl std::fmt::Display for DateRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} – {}", self.from, self.until)
    }
}

impl Line {
    pub fn description(&self) -> String {
        let mut d = format!("{} {}", self.model, self.class.as_str().replace('_', " "));
        let mut marks = Vec::new();
        if !self.variant.is_empty() {
            marks.push(self.variant.clone());
        }
        if let Some(r) = self.applies {
            marks.push(format!("price of {r}"));
        }
        if !marks.is_empty() {
            d.push_str(&format!(" ({})", marks.join("; ")));
        }
        d
    }

    /// The unit price as billed (with the contract).
    pub fn billed_unit_price(&self, contract_percent: Decimal) -> Decimal {
        self.contract_unit_price
            .unwrap_or_else(|| (self.unit_price * multiplier(contract_percent)).normalize())
    }

    pub fn key(&self) -> LineKey {
        LineKey {
            period: self.period,
            model: self.model.clone(),
            variant: self.variant.clone(),
            class: self.class,
            unit_price: self.unit_price,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Invoice,
    CreditNote,
}

/// Name and address block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Party {
    pub id: String,
    pub name: String,
    pub address: Vec<String>,
    pub email: String,
    pub tax_id: String,
    /// How to pay (the issuer's, as configured when the document was issued). Absent
    /// from documents issued before it existed, so their bytes are unchanged.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub payment_instructions: String,
}

impl Party {
    pub fn from_config(id: &str, name: &str, p: &PartyConfig) -> Self {
        Self {
            id: id.into(),
            name: if p.name.is_empty() {
                name.into()
            } else {
                p.name.clone()
            },
            address: p.address.clone(),
            email: p.email.clone(),
            tax_id: p.tax_id.clone(),
            payment_instructions: p.payment_instructions.clone(),
        }
    }
}

/// Unpriced usage of the period: listed, never billed as $0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unpriced {
    pub events: i64,
    pub tokens: i64,
    pub models: Vec<String>,
}

/// Unpriced usage of an earlier, already invoiced period that no document has listed
/// yet (it arrived late): listed with the adjustments, not billed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpricedEarlier {
    pub period: Period,
    pub events: i64,
    pub tokens: i64,
    pub models: Vec<String>,
}

/// What one line of an issued document was computed from, so that anyone can check it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineManifest {
    /// Stored events of the line's key in its period when the document was issued
    /// (for an adjustment: all of them, not only the late ones).
    pub events: u64,
    /// Merkle root (SHA-256, see `verify::merkle_root`) over those events' ids, sorted.
    pub merkle_root: String,
    /// The price entries that priced them.
    pub price_ids: Vec<String>,
}

/// An invoice or credit note: a draft until the ledger gives it a number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// `TT-2026-000123`; "DRAFT" until issued.
    pub number: String,
    /// Position in the gap-free sequence (0 for drafts).
    pub seq: u64,
    pub kind: Kind,
    /// For a credit note: the invoice it cancels.
    pub references: Option<String>,
    pub issuer: Party,
    pub customer: Party,
    pub customer_reference: String,
    pub period: Period,
    pub time_zone: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub issued_at: Option<DateTime<Utc>>,
    pub issue_date: Option<NaiveDate>,
    pub due_date: Option<NaiveDate>,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub contract_percent: Decimal,
    /// Content hash of the price book the lines were computed with.
    pub price_book_version: String,
    pub lines: Vec<Line>,
    /// Sum of this period's rounded lines.
    #[serde(with = "rust_decimal::serde::str")]
    pub subtotal: Decimal,
    /// Sum of the rounded adjustment lines for earlier periods.
    #[serde(with = "rust_decimal::serde::str")]
    pub adjustments: Decimal,
    /// subtotal + adjustments.
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
    pub unpriced: Unpriced,
    /// Late unpriced usage of earlier invoiced periods, listed with the adjustments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unpriced_earlier: Vec<UnpricedEarlier>,
    /// One entry per line (issued invoices; empty on drafts and credit notes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifest: Vec<LineManifest>,
    /// The snapshot the issuer stored with the lines' event ids and the frozen usage.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub snapshot: String,
    /// SHA-256 of the issuer's previous document (the hash chain), set when numbered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous_sha256: String,
    /// SHA-256 of this document (its JSON with this field empty), set when numbered.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
}

impl Document {
    /// The document's content hash: SHA-256 of its JSON with `sha256` left empty.
    pub fn content_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut d = self.clone();
        d.sha256.clear();
        let json = serde_json::to_vec(&d).expect("documents serialize");
        hex::encode(Sha256::digest(&json))
    }

    /// Recomputes subtotal, adjustments and total from the lines.
    pub fn totals(&mut self) {
        self.subtotal = self
            .lines
            .iter()
            .filter(|l| !l.adjustment)
            .map(|l| l.amount)
            .sum();
        self.adjustments = self
            .lines
            .iter()
            .filter(|l| l.adjustment)
            .map(|l| l.amount)
            .sum();
        self.total = self.subtotal + self.adjustments;
        // Money has two decimals on every document, an empty one too ("0.00", not "0").
        for d in [&mut self.subtotal, &mut self.adjustments, &mut self.total] {
            d.rescale(2);
            *d = unsigned_zero(*d);
        }
    }

    /// What this document bills per line key (credit notes count negative already).
    pub fn billed(&self) -> impl Iterator<Item = (LineKey, i64)> + '_ {
        self.lines.iter().map(|l| (l.key(), l.quantity))
    }

    /// The credit note that cancels this invoice.
    pub fn credit_note(&self) -> Document {
        let mut c = self.clone();
        c.kind = Kind::CreditNote;
        c.references = Some(self.number.clone());
        c.number = "DRAFT".into();
        c.seq = 0;
        // A credit note cancels what was billed; what was listed as not billed is not
        // repeated, and its lines are checked through the invoice it cancels.
        c.unpriced = Unpriced::default();
        c.unpriced_earlier.clear();
        c.manifest.clear();
        c.snapshot.clear();
        c.previous_sha256.clear();
        c.sha256.clear();
        for l in &mut c.lines {
            l.quantity = -l.quantity;
            l.exact = unsigned_zero(-l.exact);
            l.amount = unsigned_zero(-l.amount);
            l.now_amount = None;
            l.billed_before = None;
        }
        c.totals();
        c
    }

    /// A draft (numbered "DRAFT" until issued): its documents say so on every page.
    pub fn is_draft(&self) -> bool {
        self.number == "DRAFT"
    }

    pub fn title(&self) -> &'static str {
        match self.kind {
            Kind::Invoice => "Invoice",
            Kind::CreditNote => "Credit note",
        }
    }
}

/// An institution's billing settings, resolved.
#[derive(Debug, Clone)]
pub struct Customer {
    pub party: Party,
    pub reference: String,
    pub tz: chrono_tz::Tz,
    pub contract_percent: Decimal,
    /// Per request served with the institution's own provider key.
    pub byok_fee: Decimal,
}

impl Customer {
    /// From config; an unconfigured institution bills in UTC at list price.
    pub fn resolve(cfg: &Config, institution: &str) -> Self {
        let default = InstitutionConfig {
            id: institution.into(),
            name: String::new(),
            monthly_budget_usd: None,
            time_zone: "UTC".into(),
            contract_percent: Decimal::ZERO,
            billing: PartyConfig::default(),
            reference: String::new(),
            moderation: false,
            byok_fee_per_request_usd: Decimal::ZERO,
            on_spike: crate::config::OnSpike::Alert,
        };
        let i = cfg.institution(institution).unwrap_or(&default);
        let name = if i.name.is_empty() { &i.id } else { &i.name };
        Self {
            // Payment instructions are the issuer's, never a customer's.
            party: Party {
                payment_instructions: String::new(),
                ..Party::from_config(&i.id, name, &i.billing)
            },
            reference: i.reference.clone(),
            tz: i.time_zone.parse().unwrap_or(chrono_tz::UTC),
            contract_percent: i.contract_percent,
            byok_fee: i.byok_fee_per_request_usd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    #[test]
    fn periods_parse_step_and_bound_in_a_time_zone() {
        let p: Period = "2026-10".parse().unwrap();
        assert_eq!(p.to_string(), "2026-10");
        assert_eq!(p.next().to_string(), "2026-11");
        assert_eq!(
            "2026-01".parse::<Period>().unwrap().prev().to_string(),
            "2025-12"
        );
        for bad in ["2026-13", "2026-1", "26-10", "2026/10", ""] {
            assert!(bad.parse::<Period>().is_err(), "{bad}");
        }
        let (s, e) = p.bounds(chrono_tz::UTC);
        assert_eq!(s.to_rfc3339(), "2026-10-01T00:00:00+00:00");
        assert_eq!(e.to_rfc3339(), "2026-11-01T00:00:00+00:00");
        // Berlin: CEST (+2) on Oct 1st, CET (+1) on Nov 1st.
        let (s, e) = p.bounds(chrono_tz::Europe::Berlin);
        assert_eq!(s.to_rfc3339(), "2026-09-30T22:00:00+00:00");
        assert_eq!(e.to_rfc3339(), "2026-10-31T23:00:00+00:00");
    }

    #[test]
    fn a_period_not_ended_says_when_it_ends_once_per_zone() {
        let p: Period = "2026-11".parse().unwrap();
        let tz = chrono_tz::Europe::Berlin;
        let e = BillingError::PeriodNotEnded {
            institution: "uni-a".into(),
            period: p,
            end: p.bounds(tz).1,
            tz,
        };
        let m = e.to_string();
        assert!(
            m.contains("2026-12-01 00:00 Europe/Berlin (2026-11-30 23:00 UTC)"),
            "{m}"
        );
        assert_eq!(m.matches("UTC").count(), 1, "{m}");
        let e = BillingError::PeriodNotEnded {
            institution: "uni-a".into(),
            period: p,
            end: p.bounds(chrono_tz::UTC).1,
            tz: chrono_tz::UTC,
        };
        assert!(
            e.to_string().contains("(it ends 2026-12-01 00:00 UTC)"),
            "{e}"
        );
    }

    #[test]
    fn rounding_is_half_away_from_zero_once() {
        assert_eq!(round_cents(dec!(0.005)), dec!(0.01));
        assert_eq!(round_cents(dec!(0.015)), dec!(0.02));
        assert_eq!(round_cents(dec!(0.0049999)), dec!(0.00));
        assert_eq!(round_cents(dec!(-0.005)), dec!(-0.01));
        assert_eq!(round_cents(dec!(2.675)), dec!(2.68));
        assert_eq!(multiplier(dec!(-12.5)), dec!(0.875));
        assert_eq!(multiplier(dec!(15)), dec!(1.15));
    }

    fn key(model: &str, class: Class, unit: Decimal) -> LineKey {
        LineKey {
            period: Period {
                year: 2026,
                month: 10,
            },
            model: model.into(),
            variant: String::new(),
            class,
            unit_price: unit,
        }
    }

    /// Every money field of `d`, with a name for the message.
    fn money_fields(d: &Document) -> Vec<(String, Decimal)> {
        let mut out = vec![
            ("subtotal".to_owned(), d.subtotal),
            ("adjustments".to_owned(), d.adjustments),
            ("total".to_owned(), d.total),
        ];
        for (i, l) in d.lines.iter().enumerate() {
            out.push((format!("line {i} amount"), l.amount));
            out.push((format!("line {i} exact"), l.exact));
            out.extend(l.now_amount.map(|v| (format!("line {i} now_amount"), v)));
            out.extend(
                l.billed_before
                    .map(|v| (format!("line {i} billed_before"), v)),
            );
        }
        out
    }

    #[test]
    fn money_is_never_a_negative_zero_after_a_void_and_a_reissue() {
        // Usage that rounds to $0.00 (a line with quantity, kept), and one of a few cents.
        let p = Period {
            year: 2026,
            month: 10,
        };
        let tiny = key("a", Class::Input, dec!(0.15));
        let some = key("b", Class::Output, dec!(10));
        let mut q = Quantities::new();
        q.insert(tiny.clone(), 3);
        q.insert(some.clone(), 2_000);
        let mut invoice = render::tests::sample(1);
        invoice.lines = lines(&q, p, multiplier(dec!(-10)));
        invoice.totals();
        let credit = invoice.credit_note();
        // The reissue: what both documents billed, against the same usage (and a late
        // event that lowers the tiny line's exact amount by a re-rating: one token less).
        let mut billed = BilledLines::new();
        for d in [&invoice, &credit] {
            for l in &d.lines {
                let b = billed.entry(l.key()).or_default();
                b.quantity += l.quantity;
                b.exact += l.exact;
                b.amount += l.amount;
            }
        }
        let mut reissue = invoice.clone();
        reissue.lines = due_lines(&q, &Windows::new(), &billed, p, multiplier(dec!(-10)));
        reissue.totals();
        let mut lowered = q.clone();
        lowered.insert(tiny, 2);
        let mut after_void = invoice.clone();
        after_void.lines = due_lines(&lowered, &Windows::new(), &billed, p, multiplier(dec!(-10)));
        after_void.totals();
        for d in [&invoice, &credit, &reissue, &after_void] {
            for (name, v) in money_fields(d) {
                assert!(
                    !(v.is_zero() && v.is_sign_negative()),
                    "{name} of {:?} is {v}",
                    d.kind
                );
            }
            for line in render::lines_csv(d).lines() {
                assert!(
                    !line.contains(",-0.00,") && !line.contains(",-0,"),
                    "{line}"
                );
            }
            let json = serde_json::to_string(d).unwrap();
            for (at, _) in json.match_indices("\"-0") {
                let number: String = json[at + 1..].chars().take_while(|c| *c != '"').collect();
                assert!(
                    number.chars().any(|c| ('1'..='9').contains(&c)),
                    "{number} in {json}"
                );
            }
        }
    }

    #[test]
    fn each_line_is_rounded_on_its_own_and_the_total_sums_rounded_lines() {
        // Three lines of exactly half a cent each: 0.01 each, total 0.03 (not 0.02 as
        // rounding the exact sum 0.015 would give).
        let mut q = Quantities::new();
        q.insert(key("a", Class::Input, dec!(5)), 1000);
        q.insert(key("b", Class::Input, dec!(5)), 1000);
        q.insert(key("c", Class::Output, dec!(5)), 1000);
        let p = Period {
            year: 2026,
            month: 10,
        };
        let ls = lines(&q, p, Decimal::ONE);
        assert!(ls
            .iter()
            .all(|l| l.exact == dec!(0.005) && l.amount == dec!(0.01)));
        let total: Decimal = ls.iter().map(|l| l.amount).sum();
        assert_eq!(total, dec!(0.03));
        // A 10% discount applies to the exact amount before rounding: 0.0045 → 0.00.
        let ls = lines(&q, p, multiplier(dec!(-10)));
        assert!(ls.iter().all(|l| l.amount == dec!(0.00)));
    }

    #[test]
    fn byok_usage_is_shown_at_zero_with_a_platform_fee_and_estimates_are_marked() {
        let book = PriceBook::from_sources(&[(
            "t.toml".into(),
            r#"
[[price]]
provider = "openai"
model = "m"
id = "m-1"
match = "m"
effective_from = "2024-01-01"
input_per_mtok = "2"
output_per_mtok = "8"
per_request = "0.001"
"#
            .into(),
        )])
        .unwrap();
        let g = |byok: bool, estimated: bool, events: i64, served: i64, input: i64, output: i64| {
            // The stored cost as ingest prices it: tokens, plus the fee per served request.
            let cost = Decimal::from(input) * dec!(0.000002)
                + Decimal::from(output) * dec!(0.000008)
                + Decimal::from(served) * dec!(0.001);
            GroupSums {
                price_id: "m-1".into(),
                price_model: "m".into(),
                price_tier: 0,
                byok,
                estimated,
                events,
                served,
                input,
                cache_read: 0,
                cache_write: 0,
                output,
                reasoning: 0,
                cost: cost.normalize(),
            }
        };
        let p: Period = "2026-10".parse().unwrap();
        let groups = [
            g(false, false, 10, 8, 1_000_000, 500_000),
            g(false, true, 2, 2, 1_000, 300),
            g(true, false, 5, 5, 2_000_000, 100_000),
        ];
        let q = quantities(p, &groups, &book, dec!(0.002)).unwrap();
        let ls = lines(&q, p, Decimal::ONE);
        let find = |variant: &str, class: Class| {
            ls.iter()
                .find(|l| l.variant == variant && l.class == class)
                .unwrap_or_else(|| panic!("no {variant} {class:?} line in {ls:?}"))
        };
        // Platform usage: per-request fees only on the 8 served requests.
        assert_eq!(find("", Class::Requests).quantity, 8);
        assert_eq!(find("", Class::Input).amount, dec!(2.00));
        assert_eq!(find("", Class::Output).amount, dec!(4.00));
        // Estimated usage is charged, on lines of its own.
        assert_eq!(find(ESTIMATED_VARIANT, Class::Output).quantity, 300);
        assert_eq!(find(ESTIMATED_VARIANT, Class::Input).exact, dec!(0.002));
        // Own-key usage is listed with its quantities and charged nothing, except the
        // platform fee per request.
        let own = find(BYOK_VARIANT, Class::Input);
        assert_eq!(
            (own.quantity, own.unit_price, own.amount),
            (2_000_000, Decimal::ZERO, dec!(0.00))
        );
        assert_eq!(find(BYOK_VARIANT, Class::Requests).amount, dec!(0.00));
        let fee = find(BYOK_FEE_VARIANT, Class::Requests);
        assert_eq!((fee.quantity, fee.amount), (5, dec!(0.01)));
        let total: Decimal = ls.iter().map(|l| l.amount).sum();
        // 2.00 + 4.00 + 0.01 (8 requests) + three estimated lines that each round to
        // 0.00 + 0.01 (the fee on 5 requests)
        assert_eq!(total, dec!(6.02));
        // Without a fee in the contract, own-key usage costs nothing at all.
        let q = quantities(p, &groups[2..], &book, Decimal::ZERO).unwrap();
        assert!(lines(&q, p, Decimal::ONE)
            .iter()
            .all(|l| l.amount.is_zero()));
    }

    #[test]
    fn outstanding_is_live_minus_billed() {
        let mut live = Quantities::new();
        live.insert(key("a", Class::Input, dec!(1)), 100);
        live.insert(key("a", Class::Output, dec!(2)), 50);
        let mut billed = Quantities::new();
        billed.insert(key("a", Class::Input, dec!(1)), 100);
        billed.insert(key("a", Class::Output, dec!(3)), 10);
        let o = outstanding(&live, &billed);
        assert_eq!(o.len(), 2);
        assert_eq!(o[&key("a", Class::Output, dec!(2))], 50);
        assert_eq!(o[&key("a", Class::Output, dec!(3))], -10);
    }

    proptest! {
        // Rounding each line moves it by at most half a cent, so the invoice total is
        // within n × 0.005 of the exact contract amount, and a credit note cancels it.
        #[test]
        fn totals_stay_within_half_a_cent_per_line(
            qs in proptest::collection::vec((1i64..5_000_000, 0u32..4, 1i64..200_000), 1..20),
            pct in -9000i64..9000,
        ) {
            let units = [dec!(0.15), dec!(2.5), dec!(0.075), dec!(10)];
            let mut q = Quantities::new();
            for (i, (qty, u, _)) in qs.iter().enumerate() {
                q.insert(key(&format!("m{i}"), Class::Input, units[*u as usize]), *qty);
            }
            let p = Period { year: 2026, month: 10 };
            let mult = multiplier(Decimal::new(pct, 2));
            let ls = lines(&q, p, mult);
            let exact: Decimal = ls.iter().map(|l| l.exact * mult).sum();
            let total: Decimal = ls.iter().map(|l| l.amount).sum();
            prop_assert!((total - exact).abs() <= Decimal::new(5, 3) * Decimal::from(ls.len()));
            for l in &ls {
                prop_assert_eq!(l.amount.scale(), 2);
                prop_assert!((l.amount - l.exact * mult).abs() <= dec!(0.005));
            }
        }
    }
}
