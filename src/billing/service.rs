//! Drafting, issuing, voiding and reconciling, over the store and the ledger.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Datelike, Duration, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::ledger::{self, Ledger, LedgerLog, Outcome, Record, Request};
use super::{
    lines, multiplier, outstanding, quantities, usage, BillingError, Customer, Document, Kind,
    Party, Period, Quantities,
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

    /// Live quantities of one usage period.
    async fn live(
        &self,
        institution: &str,
        c: &Customer,
        p: Period,
    ) -> Result<Quantities, BillingError> {
        let (start, end) = p.bounds(c.tz);
        let groups = usage::groups(self.store, institution, start, end).await?;
        quantities(p, &groups, self.book, c.byok_fee)
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
        let mut periods: BTreeSet<Period> = ledger
            .of(institution)
            .map(|d| d.period)
            .filter(|p| *p < period)
            .collect();
        periods.insert(period);
        let mut billed: BTreeMap<Period, Quantities> = BTreeMap::new();
        for d in ledger.of(institution) {
            for (k, q) in d.billed() {
                *billed.entry(k.period).or_default().entry(k).or_default() += q;
            }
        }
        let mut due = Quantities::new();
        for p in periods {
            let live = self.live(institution, &c, p).await?;
            let empty = Quantities::new();
            due.extend(outstanding(&live, billed.get(&p).unwrap_or(&empty)));
        }
        let mut ls = lines(&due, period, multiplier(c.contract_percent));
        // This period first, then corrections oldest first.
        ls.sort_by(|a, b| {
            (a.adjustment, a.period, &a.model, &a.variant, a.class)
                .cmp(&(b.adjustment, b.period, &b.model, &b.variant, b.class))
                .then(a.unit_price.cmp(&b.unit_price))
        });
        let (start, end) = period.bounds(c.tz);
        let unpriced = usage::unpriced(self.store, institution, start, end).await?;
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
        };
        doc.totals();
        Ok(doc)
    }

    /// The detailed usage CSV of a document's period (live, from stored events), by
    /// local day in the zone the document was computed in.
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
            let mut doc = self.draft(&ledger, institution, period).await?;
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

/// One institution's row of `reconcile`.
#[derive(Debug, Serialize)]
pub struct ReconcileRow {
    pub institution: String,
    /// The period's live invoice, if any.
    pub invoice: Option<String>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub invoice_total: Option<Decimal>,
    /// Everything billed for this period on any document (invoice, later corrections,
    /// credit notes).
    #[serde(with = "rust_decimal::serde::str")]
    pub billed: Decimal,
    /// What the stored events come to under the contract, rounded per line now.
    #[serde(with = "rust_decimal::serde::str")]
    pub events_amount: Decimal,
    /// Exact sum of the stored events' costs, before the contract.
    #[serde(with = "rust_decimal::serde::str")]
    pub events_exact: Decimal,
    pub events: i64,
    pub unpriced_events: i64,
    pub rejected_events: u64,
    /// Tokens (or requests) stored but not billed (positive) or billed but no longer
    /// stored (negative), summed over lines.
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
    pub partitions: Vec<PartitionCheck>,
    pub problems: usize,
}

impl Billing<'_> {
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
            let c = Customer::resolve(self.cfg, &inst);
            let (start, end) = period.bounds(c.tz);
            let groups = usage::groups(self.store, &inst, start, end).await?;
            let live = quantities(period, &groups, self.book, c.byok_fee)?;
            let mult = multiplier(c.contract_percent);
            let events_amount: Decimal = lines(&live, period, mult).iter().map(|l| l.amount).sum();
            // What is charged before the contract: the stored costs, except usage on the
            // institution's own provider key (its platform fee instead).
            let events_exact: Decimal = lines(&live, period, mult).iter().map(|l| l.exact).sum();
            let events: i64 = groups.iter().map(|g| g.events).sum();
            let unpriced = usage::unpriced(self.store, &inst, start, end).await?;
            let rejected = self
                .store
                .rejected_for_key(&inst, start.timestamp(), end.timestamp())
                .await?;
            let mut billed_q = Quantities::new();
            let mut billed = Decimal::ZERO;
            for d in ledger.of(&inst) {
                for l in d.lines.iter().filter(|l| l.period == period) {
                    *billed_q.entry(l.key()).or_default() += l.quantity;
                    billed += l.amount;
                }
            }
            let invoice = ledger.live_invoice(&inst, period);
            let diff = outstanding(&live, &billed_q);
            let unbilled: i64 = diff.values().sum();
            let has_docs = ledger.of(&inst).any(|d| d.period == period);
            let status = if !has_docs {
                if events == 0 && unpriced.events == 0 {
                    "no usage".to_owned()
                } else {
                    "not invoiced".to_owned()
                }
            } else if diff.is_empty() {
                "ok".to_owned()
            } else {
                problems += 1;
                format!(
                    "MISMATCH: {} line(s) differ between stored events and billed documents (goes on the next invoice as adjustments)",
                    diff.len()
                )
            };
            rows.push(ReconcileRow {
                institution: inst,
                invoice: invoice.map(|d| d.number.clone()),
                invoice_total: invoice.map(|d| d.total),
                billed,
                events_amount,
                events_exact: events_exact.normalize(),
                events,
                unpriced_events: unpriced.events,
                rejected_events: rejected,
                unbilled_quantity: unbilled,
                status,
            });
        }
        let partitions = self.check_offsets().await?;
        problems += partitions.iter().filter(|p| p.status != "ok").count();
        Ok(Reconciliation {
            period,
            institutions: rows,
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
