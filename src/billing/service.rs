//! Drafting, issuing, voiding and reconciling, over the store and the ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{Datelike, Duration, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::ledger::{self, Ledger, LedgerLog, Outcome, Record, Request};
use super::{
    due_lines, evidence, lines, multiplier, outstanding, priced, quantities, usage, BilledLines,
    BillingError, Customer, Document, GroupSums, Kind, Party, Period, Quantities, Unpriced,
    UnpricedEarlier, Windows,
};
use crate::config::Config;
use crate::price::PriceBook;
use crate::store::Store;

pub struct Billing<'a> {
    pub cfg: &'a Config,
    pub store: &'a Store,
    pub book: &'a PriceBook,
    pub log: LedgerLog,
}

/// How many times an issuer redrafts after losing a race before giving up.
const MAX_ATTEMPTS: u32 = 20;

impl<'a> Billing<'a> {
    pub fn new(cfg: &'a Config, store: &'a Store, book: &'a PriceBook) -> Self {
        Self {
            cfg,
            store,
            book,
            log: LedgerLog::new(cfg),
        }
    }

    /// The periods a draft of `period` covers: it, and every earlier period of the
    /// institution that already has a document (corrections go on this invoice).
    fn periods(ledger: &Ledger, institution: &str, period: Period) -> BTreeSet<Period> {
        let mut periods: BTreeSet<Period> = ledger
            .of(institution)
            .map(|d| d.period)
            .filter(|p| *p < period)
            .collect();
        periods.insert(period);
        periods
    }

    /// The invoice `period` would get if issued now against `ledger`: this period's usage
    /// not yet billed, plus corrections for earlier periods that already have documents.
    pub async fn draft(
        &self,
        ledger: &Ledger,
        institution: &str,
        period: Period,
    ) -> Result<Document, BillingError> {
        let c = Customer::resolve(self.cfg, institution);
        // Every period's sums at once: the draft costs one round trip, not two per period.
        let sums = Self::periods(ledger, institution, period)
            .into_iter()
            .map(|p| {
                let (start, end) = p.bounds(c.tz);
                async move {
                    let (groups, unpriced) = tokio::try_join!(
                        usage::groups(self.store, institution, start, end),
                        usage::unpriced(self.store, institution, start, end),
                    )?;
                    Ok::<_, BillingError>((p, (groups, unpriced)))
                }
            });
        let usage: BTreeMap<_, _> = futures::future::try_join_all(sums)
            .await?
            .into_iter()
            .collect();
        self.compose(ledger, &c, period, &usage)
    }

    /// The current state of `institution`'s events of its billing month `p`, streamed in
    /// event-id order.
    fn events_of(
        &self,
        institution: &str,
        c: &Customer,
        p: Period,
    ) -> Result<crate::store::billing::Rows<crate::store::billing::EventState>, BillingError> {
        let (start, end) = p.bounds(c.tz);
        Ok(self
            .store
            .event_states(institution, c.tz.name(), start.timestamp(), end.timestamp())?)
    }

    /// The document for `period` from the usage of every period it covers. Pure.
    pub fn compose(
        &self,
        ledger: &Ledger,
        c: &Customer,
        period: Period,
        usage: &BTreeMap<Period, (Vec<GroupSums>, Unpriced)>,
    ) -> Result<Document, BillingError> {
        let institution = c.party.id.as_str();
        let mut billed = BilledLines::new();
        for d in ledger.of(institution) {
            for l in &d.lines {
                let b = billed.entry(l.key()).or_default();
                b.quantity += l.quantity;
                b.exact += l.exact;
                b.amount += l.amount;
            }
        }
        let mut live = Quantities::new();
        let mut windows = Windows::new();
        for (p, (groups, _)) in usage {
            let (q, w) = priced(*p, groups, self.book, c.byok_fee)?;
            live.extend(q);
            windows.extend(w);
        }
        // Billed keys of periods outside `usage` (later periods) are not this draft's.
        billed.retain(|k, _| usage.contains_key(&k.period));
        let mut ls = due_lines(
            &live,
            &windows,
            &billed,
            period,
            multiplier(c.contract_percent),
        );
        // This period first, then corrections oldest first.
        ls.sort_by(|a, b| {
            (a.adjustment, a.period, &a.model, &a.variant, a.class)
                .cmp(&(b.adjustment, b.period, &b.model, &b.variant, b.class))
                .then(a.unit_price.cmp(&b.unit_price))
        });
        let (start, end) = period.bounds(c.tz);
        let unpriced = usage.get(&period).map(|u| u.1.clone()).unwrap_or_default();
        // Unpriced usage of earlier invoiced periods that no live invoice has listed yet.
        let mut unpriced_earlier = Vec::new();
        for (p, (_, now)) in usage.range(..period) {
            let (mut events, mut tokens) = (0, 0);
            for d in ledger
                .of(institution)
                .filter(|d| d.kind == Kind::Invoice && ledger.voided_by(&d.number).is_none())
            {
                if d.period == *p {
                    events += d.unpriced.events;
                    tokens += d.unpriced.tokens;
                }
                for e in d.unpriced_earlier.iter().filter(|e| e.period == *p) {
                    events += e.events;
                    tokens += e.tokens;
                }
            }
            if now.events > events {
                unpriced_earlier.push(UnpricedEarlier {
                    period: *p,
                    events: now.events - events,
                    tokens: now.tokens - tokens,
                    models: now.models.clone(),
                });
            }
        }
        let issuer = &self.cfg.billing.issuer;
        let mut doc = Document {
            number: "DRAFT".into(),
            seq: 0,
            kind: Kind::Invoice,
            references: None,
            issuer: Party::from_config("", &issuer.name, issuer),
            customer: c.party.clone(),
            customer_reference: c.reference.clone(),
            period,
            time_zone: c.tz.name().to_owned(),
            period_start: start,
            period_end: end,
            issued_at: None,
            issue_date: None,
            due_date: None,
            currency: "USD".into(),
            contract_percent: c.contract_percent,
            price_book_version: self.book.version().to_owned(),
            lines: ls,
            subtotal: Decimal::ZERO,
            adjustments: Decimal::ZERO,
            total: Decimal::ZERO,
            unpriced,
            unpriced_earlier,
            manifest: Vec::new(),
            snapshot: String::new(),
            previous_sha256: String::new(),
            sha256: String::new(),
        };
        doc.totals();
        Ok(doc)
    }

    /// The document to request for `period`, computed from one snapshot of the stored
    /// events (one row per event, streamed once), with each line's evidence; the evidence
    /// and the frozen usage export are stored under a new snapshot id the document names.
    /// Memory: an event id and a 32-byte leaf per priced event, not the events.
    async fn draft_with_evidence(
        &self,
        ledger: &Ledger,
        institution: &str,
        period: Period,
    ) -> Result<Document, BillingError> {
        let c = Customer::resolve(self.cfg, institution);
        let mut usage = BTreeMap::new();
        let mut events = evidence::KeyEvents::default();
        let mut details = evidence::DetailsAcc::default();
        for p in Self::periods(ledger, institution, period) {
            let mut cursor = self.events_of(institution, &c, p)?;
            let mut acc = evidence::UsageAcc::default();
            while let Some(e) = cursor.next().await? {
                acc.add(&e);
                events.add(p, &e, self.book, c.byok_fee)?;
                if p == period {
                    details.add(&e);
                }
            }
            usage.insert(p, acc.finish());
        }
        let mut doc = self.compose(ledger, &c, period, &usage)?;
        let (manifest, stored) = evidence::manifest(&doc, &events);
        let csv = super::render::usage_csv(period, &details.finish()?, self.book, c.byok_fee)?;
        let id = uuid::Uuid::new_v4().to_string();
        self.store
            .insert_snapshot(&id, institution, &stored, &csv)
            .await?;
        doc.manifest = manifest;
        doc.snapshot = id;
        Ok(doc)
    }

    /// The detailed usage CSV of a document's period as the events are stored now, by
    /// local day in the zone the document was computed in ("live": it includes events
    /// that arrived after the document was issued).
    pub async fn usage_csv(&self, doc: &Document) -> Result<String, BillingError> {
        let details = usage::details(
            self.store,
            &doc.customer.id,
            &doc.time_zone,
            doc.period_start,
            doc.period_end,
        )
        .await?;
        let fee = Customer::resolve(self.cfg, &doc.customer.id).byok_fee;
        super::render::usage_csv(doc.period, &details, self.book, fee)
    }

    /// The usage CSV frozen when the document was issued: the rows its lines were
    /// computed from (adds up to the invoice's own-period lines). `None` for documents
    /// without a snapshot (drafts, credit notes, documents issued before snapshots).
    pub async fn usage_csv_as_issued(
        &self,
        doc: &Document,
    ) -> Result<Option<String>, BillingError> {
        if doc.snapshot.is_empty() {
            return Ok(None);
        }
        Ok(self.store.snapshot_usage_csv(&doc.snapshot).await?)
    }

    /// Folds the ledger, checks it against ClickHouse's copy (refusing a ledger that lacks
    /// issued documents) and copies any document ClickHouse lacks.
    pub async fn sync(&self) -> Result<Ledger, BillingError> {
        let ledger = self.log.open(self.store).await?;
        let written = ledger::materialize(self.store, &ledger).await?;
        if written > 0 {
            tracing::info!(written, "invoices copied from the ledger");
        }
        Ok(ledger)
    }

    /// Issues the invoice of `period`: numbered, frozen, stored.
    pub async fn issue(
        &self,
        institution: &str,
        period: Period,
        allow_unpriced: bool,
    ) -> Result<Document, BillingError> {
        let c = Customer::resolve(self.cfg, institution);
        let (_, end) = period.bounds(c.tz);
        let now = Utc::now();
        if end > now {
            return Err(BillingError::PeriodNotEnded {
                institution: institution.to_owned(),
                period,
                end,
                tz: c.tz,
            });
        }
        let mut ledger = self.log.open(self.store).await?;
        for attempt in 1..=MAX_ATTEMPTS {
            if let Some(d) = ledger.live_invoice(institution, period) {
                return Err(BillingError::AlreadyInvoiced {
                    institution: institution.to_owned(),
                    period,
                    number: d.number.clone(),
                });
            }
            let mut doc = self
                .draft_with_evidence(&ledger, institution, period)
                .await?;
            if doc.unpriced.events != 0 && !allow_unpriced {
                return Err(BillingError::UnpricedUsage {
                    institution: institution.to_owned(),
                    period,
                    events: doc.unpriced.events,
                    models: doc.unpriced.models.clone(),
                });
            }
            let created_at = Utc::now();
            let issue_date = created_at.with_timezone(&c.tz).date_naive();
            doc.issue_date = Some(issue_date);
            doc.due_date =
                Some(issue_date + Duration::days(i64::from(self.cfg.billing.payment_terms_days)));
            let record = Record {
                v: 1,
                request_id: uuid::Uuid::new_v4().to_string(),
                based_on: ledger.next_offset - 1,
                created_at,
                prefix: self.cfg.billing.number_prefix.clone(),
                zone: self.cfg.billing.time_zone.clone(),
                request: Request::Issue {
                    document: Box::new(doc),
                },
            };
            self.log.append(&record).await?;
            self.log.catch_up(&mut ledger).await?;
            match ledger.outcomes.get(&record.request_id) {
                Some(Outcome::Accepted(number)) => {
                    ledger::materialize(self.store, &ledger).await?;
                    let doc = ledger
                        .docs
                        .iter()
                        .find(|d| &d.number == number)
                        .cloned()
                        .ok_or_else(|| {
                            BillingError::Corrupt(format!(
                                "accepted {number} is missing from the fold"
                            ))
                        })?;
                    return Ok(doc);
                }
                Some(Outcome::Refused(why)) => return Err(BillingError::Refused(why.clone())),
                Some(Outcome::Stale) => {
                    tracing::info!(attempt, %institution, %period, "another document was issued meanwhile; drafting again");
                    let pause = 50 + rand::random::<u64>() % 200;
                    tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                }
                None => return Err(BillingError::Undecided),
            }
        }
        Err(BillingError::Contended {
            attempts: MAX_ATTEMPTS,
            institution: institution.to_owned(),
        })
    }

    /// Voids an issued invoice with a credit note.
    pub async fn void(&self, number: &str, reason: &str) -> Result<Document, BillingError> {
        let mut ledger = self.log.open(self.store).await?;
        let record = Record {
            v: 1,
            request_id: uuid::Uuid::new_v4().to_string(),
            based_on: ledger.next_offset - 1,
            created_at: Utc::now(),
            prefix: self.cfg.billing.number_prefix.clone(),
            zone: self.cfg.billing.time_zone.clone(),
            request: Request::Void {
                number: number.to_owned(),
                reason: reason.to_owned(),
            },
        };
        self.log.append(&record).await?;
        self.log.catch_up(&mut ledger).await?;
        match ledger.outcomes.get(&record.request_id) {
            Some(Outcome::Accepted(n)) => {
                ledger::materialize(self.store, &ledger).await?;
                ledger
                    .docs
                    .iter()
                    .find(|d| &d.number == n)
                    .cloned()
                    .ok_or_else(|| {
                        BillingError::Corrupt(format!("credit note {n} is missing from the fold"))
                    })
            }
            Some(Outcome::Refused(why)) => Err(BillingError::Refused(why.clone())),
            _ => Err(BillingError::Undecided),
        }
    }

    /// `serve`'s monthly job: on the configured day, issue last month's invoice of every
    /// institution that has usage or corrections and no invoice yet.
    /// `ledger` is the current fold (from `sync`): an institution's draft depends only on
    /// its own documents, so issuing for one does not change another's.
    pub async fn auto_issue(&self, ledger: &Ledger) -> Result<Vec<String>, BillingError> {
        let mut issued = Vec::new();
        let mut institutions: BTreeSet<String> =
            self.cfg.institutions.iter().map(|i| i.id.clone()).collect();
        let known = self.store.institutions_with_usage(None).await?;
        institutions.extend(known);
        for inst in institutions {
            let c = Customer::resolve(self.cfg, &inst);
            let today = Utc::now().with_timezone(&c.tz).date_naive();
            if today.day() < self.cfg.billing.auto_issue_day {
                continue;
            }
            let period = Period::of(today).prev();
            if ledger.of(&inst).any(|d| d.period == period) {
                continue;
            }
            let draft = self.draft(ledger, &inst, period).await?;
            if draft.lines.is_empty() {
                continue;
            }
            match self
                .issue(&inst, period, self.cfg.billing.auto_issue_allow_unpriced)
                .await
            {
                Ok(d) => {
                    tracing::info!(institution = %inst, %period, number = %d.number, total = %d.total, "invoice issued");
                    issued.push(d.number);
                }
                Err(e) => {
                    tracing::warn!(institution = %inst, %period, "automatic invoice not issued: {e:#}")
                }
            }
        }
        Ok(issued)
    }
}

/// One institution's row of `reconcile`: the period's stored events against what its
/// documents billed, in the institution's billing month.
#[derive(Debug, Serialize)]
pub struct ReconcileRow {
    pub institution: String,
    /// The period's live invoice, if any.
    pub invoice: Option<String>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub invoice_total: Option<Decimal>,
    /// Everything billed for this period on any document (invoice, adjustments on later
    /// invoices, credit notes).
    #[serde(with = "rust_decimal::serde::str")]
    pub billed: Decimal,
    /// What the stored events come to now under the contract, each line rounded once:
    /// by the billing rule, what all documents of the period must add up to.
    #[serde(with = "rust_decimal::serde::str")]
    pub events_amount: Decimal,
    /// events_amount − billed: still to bill (positive) or to credit (negative) on the
    /// next invoice's adjustments. Any cent here is flagged.
    #[serde(with = "rust_decimal::serde::str")]
    pub difference: Decimal,
    /// Exact sum of what the stored events are charged before the contract.
    #[serde(with = "rust_decimal::serde::str")]
    pub events_exact: Decimal,
    /// Stored events with a price, in the period (institution's time zone).
    pub priced_events: i64,
    /// Stored events without a price: listed on documents, never billed.
    pub unpriced_events: i64,
    /// Of those, how many some live invoice has listed (the rest arrived late).
    pub unpriced_listed: i64,
    /// Rejected messages about this institution whose usage happened in the period
    /// (institution and time as the payload names them; the Kafka key and the time
    /// received where the payload does not say).
    pub rejected_events: u64,
    /// Tokens (or requests) stored but not billed (positive) or billed but no longer
    /// stored (negative), summed over lines. Informational: a line whose difference
    /// rounds to $0.00 is not billed.
    pub unbilled_quantity: i64,
    pub status: String,
}

#[derive(Debug, Serialize)]
pub struct PartitionCheck {
    pub partition: i32,
    /// Messages the consumer group has committed (from the log start).
    pub consumed: i64,
    /// Distinct positions below the committed offset with a priced, unpriced, rejected or
    /// duplicate row.
    pub stored: u64,
    pub status: String,
}

#[derive(Debug, Serialize)]
pub struct Reconciliation {
    pub period: Period,
    pub institutions: Vec<ReconcileRow>,
    /// Rejected messages of the period (UTC month, by the time the payload names, else
    /// the time received) that name no institution at all.
    pub rejected_unattributed: u64,
    pub partitions: Vec<PartitionCheck>,
    pub problems: usize,
}

/// One institution-month as the stored events and the documents have it.
pub struct Standing {
    /// What the stored events come to now, by the billing rule.
    pub events_amount: Decimal,
    pub events_exact: Decimal,
    pub priced_events: i64,
    pub unpriced: Unpriced,
    /// Unpriced events some live invoice has listed.
    pub unpriced_listed: i64,
    /// Everything documents billed for the period.
    pub billed: Decimal,
    pub billed_quantities: Quantities,
    pub live: Quantities,
    /// Whether any document covers the period.
    pub has_documents: bool,
}

impl Standing {
    /// Still to bill (or credit) on the next invoice's adjustments.
    pub fn difference(&self) -> Decimal {
        self.events_amount - self.billed
    }

    /// Unpriced events no document has listed yet.
    pub fn late_unpriced(&self) -> i64 {
        (self.unpriced.events - self.unpriced_listed).max(0)
    }
}

impl Billing<'_> {
    /// How `institution`'s `period` stands: its stored events against its documents.
    pub async fn standing(
        &self,
        ledger: &Ledger,
        institution: &str,
        period: Period,
    ) -> Result<Standing, BillingError> {
        let c = Customer::resolve(self.cfg, institution);
        let (start, end) = period.bounds(c.tz);
        let groups = usage::groups(self.store, institution, start, end).await?;
        let live = quantities(period, &groups, self.book, c.byok_fee)?;
        let now = lines(&live, period, multiplier(c.contract_percent));
        let unpriced = usage::unpriced(self.store, institution, start, end).await?;
        let mut billed_quantities = Quantities::new();
        let mut billed = Decimal::ZERO;
        let mut unpriced_listed = 0;
        for d in ledger.of(institution) {
            for l in d.lines.iter().filter(|l| l.period == period) {
                *billed_quantities.entry(l.key()).or_default() += l.quantity;
                billed += l.amount;
            }
            if d.kind == Kind::Invoice && ledger.voided_by(&d.number).is_none() {
                if d.period == period {
                    unpriced_listed += d.unpriced.events;
                }
                unpriced_listed += d
                    .unpriced_earlier
                    .iter()
                    .filter(|e| e.period == period)
                    .map(|e| e.events)
                    .sum::<i64>();
            }
        }
        Ok(Standing {
            events_amount: now.iter().map(|l| l.amount).sum(),
            events_exact: now.iter().map(|l| l.exact).sum(),
            priced_events: groups.iter().map(|g| g.events).sum(),
            unpriced,
            unpriced_listed,
            billed,
            billed_quantities,
            live,
            has_documents: ledger.of(institution).any(|d| d.period == period),
        })
    }

    pub async fn reconcile(&self, period: Period) -> Result<Reconciliation, BillingError> {
        let ledger = self.sync().await?;
        // Institutions: configured, with documents, or with events near the period.
        let mut institutions: BTreeSet<String> =
            self.cfg.institutions.iter().map(|i| i.id.clone()).collect();
        institutions.extend(ledger.docs.iter().map(|d| d.customer.id.clone()));
        let (wide_start, _) = period.bounds(chrono_tz::Etc::GMTMinus14);
        let (_, wide_end) = period.bounds(chrono_tz::Etc::GMTPlus12);
        let active = self
            .store
            .institutions_with_usage(Some((
                wide_start.timestamp() - 3600,
                wide_end.timestamp() + 3600,
            )))
            .await?;
        institutions.extend(active);

        let mut rows = Vec::new();
        let mut problems = 0;
        for inst in institutions {
            let st = self.standing(&ledger, &inst, period).await?;
            let (difference, has_docs) = (st.difference(), st.has_documents);
            let Standing {
                events_amount,
                events_exact,
                priced_events,
                unpriced,
                unpriced_listed,
                billed,
                billed_quantities: billed_q,
                live,
                ..
            } = st;
            let c = Customer::resolve(self.cfg, &inst);
            let (start, end) = period.bounds(c.tz);
            let rejected = self
                .store
                .rejected_about(&inst, start.timestamp(), end.timestamp())
                .await?;
            let invoice = ledger.live_invoice(&inst, period);
            let diff = outstanding(&live, &billed_q);
            let unbilled: i64 = diff.values().sum();
            let mut findings = Vec::new();
            if has_docs {
                if !difference.is_zero() {
                    findings.push(format!(
                        "MISMATCH: the stored events come to {events_amount}, documents billed {billed} ({difference:+} goes on the next invoice as adjustments)"
                    ));
                }
                if unpriced.events > unpriced_listed {
                    findings.push(format!(
                        "UNPRICED: {} unpriced event(s) not on any document yet (models: {}; listed on the next invoice)",
                        unpriced.events - unpriced_listed,
                        unpriced.models.join(", ")
                    ));
                }
            }
            let status = if !has_docs {
                if priced_events == 0 && unpriced.events == 0 {
                    "no usage".to_owned()
                } else {
                    "not invoiced".to_owned()
                }
            } else if findings.is_empty() {
                if unpriced.events > 0 {
                    format!(
                        "ok ({} unpriced event(s) listed on the invoice, not billed: {})",
                        unpriced.events,
                        unpriced.models.join(", ")
                    )
                } else {
                    "ok".to_owned()
                }
            } else {
                problems += 1;
                findings.join("; ")
            };
            rows.push(ReconcileRow {
                institution: inst,
                invoice: invoice.map(|d| d.number.clone()),
                invoice_total: invoice.map(|d| d.total),
                billed,
                events_amount,
                difference,
                events_exact: events_exact.normalize(),
                priced_events,
                unpriced_events: unpriced.events,
                unpriced_listed,
                rejected_events: rejected,
                unbilled_quantity: unbilled,
                status,
            });
        }
        let (utc_start, utc_end) = period.bounds(chrono_tz::UTC);
        let rejected_unattributed = self
            .store
            .rejected_unattributed(utc_start.timestamp(), utc_end.timestamp())
            .await?;
        let partitions = self.check_offsets().await?;
        problems += partitions.iter().filter(|p| p.status != "ok").count();
        Ok(Reconciliation {
            period,
            institutions: rows,
            rejected_unattributed,
            partitions,
            problems,
        })
    }

    /// Every message below the group's committed offset must have left exactly one row.
    async fn check_offsets(&self) -> Result<Vec<PartitionCheck>, BillingError> {
        let lags = crate::kafka::consumer_lag(
            &self.cfg.kafka,
            &self.cfg.kafka.topic,
            &self.cfg.kafka.group,
        )
        .await
        .map_err(|e| BillingError::Kafka(format!("reading consumer offsets: {e}")))?;
        let topic = &self.cfg.kafka.topic;
        let mut out = Vec::new();
        for l in lags {
            let stored = self
                .store
                .positions_with_rows(topic, l.partition, l.low, l.committed)
                .await?;
            let consumed = (l.committed - l.low).max(0);
            let status = if stored as i64 == consumed {
                "ok".to_owned()
            } else {
                format!(
                    "MISMATCH: {} message(s) consumed without a stored row",
                    consumed - stored as i64
                )
            };
            out.push(PartitionCheck {
                partition: l.partition,
                consumed,
                stored,
                status,
            });
        }
        Ok(out)
    }
}

/// What `invoice verify` found.
#[derive(Debug, Serialize)]
pub struct InvoiceVerification {
    pub document: evidence::DocumentCheck,
    pub lines: Vec<evidence::LineCheck>,
    /// Set when the price book is not the version the document was computed with (lines
    /// are still checked against it: an unchanged entry prices the same).
    pub price_book_note: Option<String>,
    pub ok: bool,
}

impl Billing<'_> {
    /// Verifies a document given as its JSON rendering (a downloaded file, or the stored
    /// copy): its bytes and hash chain against the ledger, and every line against the
    /// stored events and the price book.
    pub async fn verify(&self, bytes: &[u8]) -> Result<InvoiceVerification, BillingError> {
        // The register is the ledger topic as folded, not ClickHouse's copy (which is
        // what may have been altered); only without a topic do the stored copies stand in.
        let ledger = match self.log.fold().await {
            Ok(l) if !l.docs.is_empty() => l,
            _ => {
                let mut l = ledger::Ledger::default();
                for d in ledger::stored_documents(self.store).await? {
                    l.docs.push(d);
                }
                l
            }
        };
        let (doc, document) =
            evidence::check_document(bytes, &ledger.docs).map_err(BillingError::Refused)?;
        let c = Customer::resolve(self.cfg, &doc.customer.id);
        let mut lines = Vec::new();
        match doc.kind {
            Kind::CreditNote => {
                // A credit note bills the exact negation of the invoice it cancels.
                let orig = doc
                    .references
                    .as_deref()
                    .and_then(|r| ledger.docs.iter().find(|d| d.number == r));
                for (i, l) in doc.lines.iter().enumerate() {
                    let negated = orig.and_then(|o| o.lines.get(i)).is_some_and(|o| {
                        o.key() == l.key() && o.quantity == -l.quantity && o.amount == -l.amount
                    });
                    lines.push(evidence::LineCheck {
                        line: i + 1,
                        description: l.description(),
                        ok: negated,
                        problems: if negated {
                            Vec::new()
                        } else {
                            vec!["does not cancel the same line of the invoice it references".into()]
                        },
                        arrived_later: 0,
                    });
                }
            }
            Kind::Invoice => {
                let keys: HashMap<super::LineKey, u32> = doc
                    .lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (l.key(), i as u32))
                    .collect();
                let mut accs = vec![evidence::LineAcc::default(); doc.lines.len()];
                // Per period: the recorded events of its lines and the stored events,
                // both streamed in event-id order and merged (memory: one event at a time).
                let periods: BTreeSet<Period> = doc.lines.iter().map(|l| l.period).collect();
                for p in periods {
                    let line_ids: Vec<u32> = doc
                        .lines
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.period == p)
                        .map(|(i, _)| i as u32)
                        .collect();
                    // (A document without a snapshot records nothing: no rows.)
                    let mut rec = self.store.snapshot_events(&doc.snapshot, &line_ids)?;
                    let mut next_rec = rec.next().await?;
                    let mut cursor = self.events_of(&doc.customer.id, &c, p)?;
                    while let Some(e) = cursor.next().await? {
                        let mut mine = Vec::new();
                        while let Some(r) = next_rec.take_if(|r| r.event_id <= e.event_id) {
                            if r.event_id == e.event_id {
                                mine.push((r.line, r.leaf));
                            } else if let Some(a) = accs.get_mut(r.line as usize) {
                                a.missing(&r.event_id, &r.leaf);
                            }
                            next_rec = rec.next().await?;
                        }
                        let f = evidence::facts(p, &e, self.book, c.byok_fee, &keys);
                        evidence::merge_event(&mut accs, &e.event_id, &f, &mine);
                    }
                    while let Some(r) = next_rec {
                        if let Some(a) = accs.get_mut(r.line as usize) {
                            a.missing(&r.event_id, &r.leaf);
                        }
                        next_rec = rec.next().await?;
                    }
                }
                for (i, l) in doc.lines.iter().enumerate() {
                    let key = l.key();
                    let billed_before: Decimal = ledger
                        .of(&doc.customer.id)
                        .filter(|d| d.seq < doc.seq)
                        .flat_map(|d| d.lines.iter())
                        .filter(|x| x.key() == key)
                        .map(|x| x.amount)
                        .sum();
                    lines.push(evidence::check_line(&doc, i, &accs[i], billed_before));
                }
            }
        }
        let price_book_note = (doc.price_book_version != self.book.version()).then(|| {
            format!(
                "the document was computed with price book {}, the current one is {}",
                doc.price_book_version,
                self.book.version()
            )
        });
        let ok = document.ok && lines.iter().all(|l| l.ok);
        Ok(InvoiceVerification {
            document,
            lines,
            price_book_note,
            ok,
        })
    }

    /// "Explain this line": the events behind line `line` (1-based) of an issued
    /// invoice, as CSV: each event recorded for it, as stored now, and events of the same
    /// key stored since (which later adjustments bill).
    pub async fn explain_line(&self, doc: &Document, line: usize) -> Result<String, BillingError> {
        use crate::format::csv_field;
        use std::fmt::Write as _;
        let Some(l) = line.checked_sub(1).and_then(|i| doc.lines.get(i)) else {
            return Err(BillingError::Refused(format!(
                "{} has no line {line} (it has {})",
                doc.number,
                doc.lines.len()
            )));
        };
        if doc.snapshot.is_empty() {
            return Err(BillingError::Refused(format!(
                "{} has no stored evidence (a credit note, or issued before invoices carried it)",
                doc.number
            )));
        }
        let c = Customer::resolve(self.cfg, &doc.customer.id);
        let recorded = self
            .store
            .snapshot_line_events(&doc.snapshot, (line - 1) as u32)
            .await?;
        let key = l.key();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "number,line,description,event_id,day,user_id,api_key_id,model,token_class,quantity,status"
        );
        let description = l.description();
        let mut row = |id: &str,
                       e: Option<&crate::store::billing::EventState>,
                       q: Option<i64>,
                       status: &str| {
            let cells = [
                doc.number.as_str(),
                &line.to_string(),
                &description,
                id,
                e.map_or("", |e| &e.day),
                e.map_or("", |e| &e.user_id),
                e.map_or("", |e| &e.api_key_id),
                e.map_or("", |e| &e.model),
                l.class.as_str(),
                &q.map(|q| q.to_string()).unwrap_or_default(),
                status,
            ];
            let cells: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
            let _ = writeln!(out, "{}", cells.join(","));
        };
        // Both sides come sorted by event id: a merge, written as it goes, so that a line
        // of a million events needs no more than its recorded ids in memory. Each event is
        // priced on its own, so one changed event does not hide the others.
        let mut rec = recorded.iter().peekable();
        let mut cursor = self.events_of(&doc.customer.id, &c, l.period)?;
        while let Some(e) = cursor.next().await? {
            while let Some((id, _)) = rec.next_if(|(id, _)| id.as_str() < e.event_id.as_str()) {
                row(id, None, None, "no longer stored");
            }
            let q = evidence::event_quantities(l.period, &e, self.book, c.byok_fee)
                .and_then(|q| q.get(&key).copied());
            match rec.next_if(|(id, _)| *id == e.event_id) {
                Some((_, leaf)) => {
                    let status = if &hex::encode(evidence::leaf(&e)) == leaf {
                        "as issued"
                    } else {
                        "changed since issue"
                    };
                    row(&e.event_id, Some(&e), q, status);
                }
                None if q.is_some() => row(&e.event_id, Some(&e), q, "stored after issue"),
                None => {}
            }
        }
        for (id, _) in rec {
            row(id, None, None, "no longer stored");
        }
        Ok(out)
    }
}
