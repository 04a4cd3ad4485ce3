//! The issuing service: drafting, issuing and voiding documents over the store and the
//! ledger, and the usage exports behind them. Checking them is `audit`.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Datelike, Duration, Utc};
use rust_decimal::Decimal;

use super::ledger::{self, Ledger, LedgerLog, Outcome, Record, Request};
use super::{
    due_lines, evidence, multiplier, priced, usage, BilledLines, BillingError, Customer, Document,
    GroupSums, Kind, Party, Period, Quantities, Unpriced, UnpricedEarlier, Windows,
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
    pub(super) fn events_of(
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

    /// The document to request for `period`, with each line's evidence and the frozen
    /// usage export stored under a new snapshot id the document names. Two reads of the
    /// stored events (one row per event, streamed): the first, sorted as the usage
    /// export's rows are, gives the sums the lines are computed from and the export (each
    /// row written when complete); the second, in id order, the evidence — each event's
    /// id and leaf stored as it comes, folded into its lines' Merkle roots. If an event
    /// was stored or changed between the two, their sums differ and both are read again.
    /// Memory: the sums, one export row and part, a few hashes per line — nothing that
    /// grows with the month.
    async fn draft_with_evidence(
        &self,
        ledger: &Ledger,
        institution: &str,
        period: Period,
    ) -> Result<Document, BillingError> {
        const READS: u32 = 5;
        let c = Customer::resolve(self.cfg, institution);
        let periods = Self::periods(ledger, institution, period);
        let (tz, fee) = (c.tz.name(), c.byok_fee);
        for _ in 0..READS {
            let id = uuid::Uuid::new_v4().to_string();
            let mut writer = self.store.snapshot_writer(&id, institution).await?;
            writer.write_usage(super::render::USAGE_CSV_HEADER).await?;
            let mut usage = BTreeMap::new();
            for &p in &periods {
                let (start, end) = p.bounds(c.tz);
                let (start, end) = (start.timestamp(), end.timestamp());
                let mut acc = evidence::UsageAcc::default();
                if p != period {
                    let mut cursor = self.store.event_states(institution, tz, start, end)?;
                    while let Some(e) = cursor.next().await? {
                        acc.add(&e);
                    }
                } else {
                    let mut cursor =
                        self.store
                            .event_states_by_detail(institution, tz, start, end)?;
                    let mut rows = evidence::DetailsStream::default();
                    let mut text = String::new();
                    while let Some(e) = cursor.next().await? {
                        acc.add(&e);
                        if let Some(d) = rows.add(&e)? {
                            text.clear();
                            super::render::usage_csv_rows(p, &d, self.book, fee, &mut text)?;
                            writer.write_usage(&text).await?;
                        }
                    }
                    if let Some(d) = rows.finish()? {
                        text.clear();
                        super::render::usage_csv_rows(p, &d, self.book, fee, &mut text)?;
                        writer.write_usage(&text).await?;
                    }
                }
                usage.insert(p, acc.finish());
            }
            let mut doc = self.compose(ledger, &c, period, &usage)?;

            let mut lines = evidence::LinesEvidence::new(&doc);
            let mut again = BTreeMap::new();
            for &p in &periods {
                let mut cursor = self.events_of(institution, &c, p)?;
                let mut acc = evidence::UsageAcc::default();
                while let Some(e) = cursor.next().await? {
                    acc.add(&e);
                    let (on, leaf) = lines.add(p, &e, self.book, fee)?;
                    for line in on {
                        writer.write(line, &e.event_id, &leaf).await?;
                    }
                }
                again.insert(p, acc.finish());
            }
            if again != usage {
                // The rows written so far name a snapshot no document will.
                tracing::info!(
                    institution,
                    %period,
                    "events were stored while issuing; reading them again"
                );
                continue;
            }
            writer.finish().await?;
            doc.manifest = lines.manifest();
            doc.snapshot = id;
            return Ok(doc);
        }
        Err(BillingError::Refused(format!(
            "{institution}'s events of {period} kept changing while the invoice was computed ({READS} reads); try again when ingest has caught up"
        )))
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
    ) -> Result<Option<crate::store::billing::UsageParts>, BillingError> {
        if doc.snapshot.is_empty() {
            return Ok(None);
        }
        Ok(self.store.snapshot_usage_parts(&doc.snapshot).await?)
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
