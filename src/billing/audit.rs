//! The auditing service: how an institution-month stands (stored events against its
//! documents), `reconcile` over every institution and the topic's offsets, `verify` of a
//! document against the ledger and the stored events, and "explain this line".

use std::collections::{BTreeSet, HashMap};

use rust_decimal::Decimal;
use serde::Serialize;

use super::issue::Billing;
use super::ledger::{self, Ledger};
use super::{
    evidence, lines, multiplier, outstanding, quantities, usage, BillingError, Customer, Document,
    Kind, Period, Quantities, Unpriced,
};
use crate::config::Config;
use crate::price::PriceBook;
use crate::store::Store;

/// Checks what was issued; reads only (and folds the ledger).
pub struct Audit<'a> {
    billing: Billing<'a>,
}

impl<'a> Audit<'a> {
    pub fn new(cfg: &'a Config, store: &'a Store, book: &'a PriceBook) -> Self {
        Self {
            billing: Billing::new(cfg, store, book),
        }
    }
}

impl<'a> std::ops::Deref for Audit<'a> {
    type Target = Billing<'a>;
    fn deref(&self) -> &Billing<'a> {
        &self.billing
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

impl Audit<'_> {
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
            let (status, problem) = reconcile_status(
                has_docs,
                difference,
                events_amount,
                billed,
                priced_events,
                &unpriced,
                unpriced_listed,
            );
            problems += usize::from(problem);
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

impl Audit<'_> {
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
        let lines = match doc.kind {
            Kind::CreditNote => credit_note_checks(&doc, &ledger),
            Kind::Invoice => self.invoice_line_checks(&doc, &ledger, &c).await?,
        };
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

    /// Every line of an invoice against the stored events: per period, the recorded
    /// events of its lines and the stored events, both streamed in event-id order and
    /// merged (memory: one event at a time).
    async fn invoice_line_checks(
        &self,
        doc: &Document,
        ledger: &Ledger,
        c: &Customer,
    ) -> Result<Vec<evidence::LineCheck>, BillingError> {
        let keys: HashMap<super::LineKey, u32> = doc
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| (l.key(), i as u32))
            .collect();
        let mut accs = vec![evidence::LineAcc::default(); doc.lines.len()];
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
            let mut cursor = self.events_of(&doc.customer.id, c, p)?;
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
        Ok(doc
            .lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let key = l.key();
                let billed_before: Decimal = ledger
                    .of(&doc.customer.id)
                    .filter(|d| d.seq < doc.seq)
                    .flat_map(|d| d.lines.iter())
                    .filter(|x| x.key() == key)
                    .map(|x| x.amount)
                    .sum();
                evidence::check_line(doc, i, &accs[i], billed_before)
            })
            .collect())
    }

    /// Whether line `line` (1-based) of `doc` can be explained: it exists and the
    /// document has stored evidence. Checked before anything is written.
    pub fn explainable(doc: &Document, line: usize) -> Result<(), BillingError> {
        if line.checked_sub(1).and_then(|i| doc.lines.get(i)).is_none() {
            return Err(BillingError::Refused(format!(
                "{} has no line {line} (it has {})",
                doc.number,
                doc.lines.len()
            )));
        }
        if doc.snapshot.is_empty() {
            return Err(BillingError::Refused(format!(
                "{} has no stored evidence (a credit note, or issued before invoices carried it)",
                doc.number
            )));
        }
        Ok(())
    }

    /// "Explain this line": the events behind line `line` (1-based) of an issued
    /// invoice, as CSV written to `out`: each event recorded for it, as stored now, and
    /// events of the same key stored since (which later adjustments bill). The recorded
    /// events and the stored ones both come sorted by event id and are merged as they
    /// arrive, each row written as it is known: memory does not grow with the line.
    /// Returns the number of rows written.
    pub async fn explain_line<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        doc: &Document,
        line: usize,
        out: &mut W,
    ) -> Result<u64, BillingError> {
        use crate::format::csv_field;
        use tokio::io::AsyncWriteExt as _;
        Self::explainable(doc, line)?;
        let l = &doc.lines[line - 1];
        let c = Customer::resolve(self.cfg, &doc.customer.id);
        let key = l.key();
        let description = l.description();
        let mut out = tokio::io::BufWriter::with_capacity(64 * 1024, out);
        out.write_all(
            b"number,line,description,event_id,day,user_id,api_key_id,model,token_class,quantity,status\n",
        )
        .await?;
        let mut rows = 0u64;
        let row = |id: &str,
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
            let mut text = cells
                .iter()
                .map(|c| csv_field(c))
                .collect::<Vec<_>>()
                .join(",");
            text.push('\n');
            text
        };
        // Each event is priced on its own, so one changed event does not hide the others.
        let mut rec = self
            .store
            .snapshot_events(&doc.snapshot, &[(line - 1) as u32])?;
        let mut next_rec = rec.next().await?;
        let mut cursor = self.events_of(&doc.customer.id, &c, l.period)?;
        while let Some(e) = cursor.next().await? {
            while let Some(r) = next_rec.take_if(|r| r.event_id < e.event_id) {
                out.write_all(row(&r.event_id, None, None, "no longer stored").as_bytes())
                    .await?;
                rows += 1;
                next_rec = rec.next().await?;
            }
            let q = evidence::event_quantities(l.period, &e, self.book, c.byok_fee)
                .and_then(|q| q.get(&key).copied());
            let text = match next_rec.take_if(|r| r.event_id == e.event_id) {
                Some(r) => {
                    next_rec = rec.next().await?;
                    let status = if hex::encode(evidence::leaf(&e)) == r.leaf {
                        "as issued"
                    } else {
                        "changed since issue"
                    };
                    row(&e.event_id, Some(&e), q, status)
                }
                None if q.is_some() => row(&e.event_id, Some(&e), q, "stored after issue"),
                None => continue,
            };
            out.write_all(text.as_bytes()).await?;
            rows += 1;
        }
        while let Some(r) = next_rec {
            out.write_all(row(&r.event_id, None, None, "no longer stored").as_bytes())
                .await?;
            rows += 1;
            next_rec = rec.next().await?;
        }
        out.flush().await?;
        Ok(rows)
    }
}

/// A credit note bills the exact negation of the invoice it cancels, line by line.
fn credit_note_checks(doc: &Document, ledger: &Ledger) -> Vec<evidence::LineCheck> {
    let orig = doc
        .references
        .as_deref()
        .and_then(|r| ledger.docs.iter().find(|d| d.number == r));
    doc.lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let negated = orig.and_then(|o| o.lines.get(i)).is_some_and(|o| {
                o.key() == l.key() && o.quantity == -l.quantity && o.amount == -l.amount
            });
            evidence::LineCheck {
                line: i + 1,
                description: l.description(),
                ok: negated,
                problems: if negated {
                    Vec::new()
                } else {
                    vec!["does not cancel the same line of the invoice it references".into()]
                },
                arrived_later: 0,
            }
        })
        .collect()
}

/// One institution-month's line in `reconcile`: its status, and whether it is a problem
/// (stored events that documents did not bill, or unpriced events not listed yet).
fn reconcile_status(
    has_docs: bool,
    difference: Decimal,
    events_amount: Decimal,
    billed: Decimal,
    priced_events: i64,
    unpriced: &Unpriced,
    unpriced_listed: i64,
) -> (String, bool) {
    if !has_docs {
        let status = if priced_events == 0 && unpriced.events == 0 {
            "no usage"
        } else {
            "not invoiced"
        };
        return (status.to_owned(), false);
    }
    let mut findings = Vec::new();
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
    if !findings.is_empty() {
        return (findings.join("; "), true);
    }
    let status = if unpriced.events > 0 {
        format!(
            "ok ({} unpriced event(s) listed on the invoice, not billed: {})",
            unpriced.events,
            unpriced.models.join(", ")
        )
    } else {
        "ok".to_owned()
    };
    (status, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn unpriced(events: i64) -> Unpriced {
        Unpriced {
            events,
            tokens: events * 10,
            models: if events > 0 {
                vec!["acme-chat".into()]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn a_month_is_ok_only_when_its_documents_bill_what_its_events_come_to() {
        let s = |diff, u: &Unpriced, listed| {
            reconcile_status(true, diff, dec!(10.00), dec!(10.00) - diff, 5, u, listed)
        };
        assert_eq!(s(dec!(0), &unpriced(0), 0), ("ok".to_owned(), false));
        let (status, problem) = s(dec!(0.01), &unpriced(0), 0);
        assert!(
            problem && status.starts_with("MISMATCH") && status.contains("+0.01"),
            "{status}"
        );
        let (status, problem) = s(dec!(0), &unpriced(3), 1);
        assert!(
            problem && status.contains("2 unpriced event(s) not on any document"),
            "{status}"
        );
        let (status, problem) = s(dec!(0), &unpriced(3), 3);
        assert!(!problem && status.starts_with("ok (3 unpriced"), "{status}");
        // Not invoiced yet is not a problem.
        assert_eq!(
            reconcile_status(false, dec!(4), dec!(4), dec!(0), 5, &unpriced(0), 0),
            ("not invoiced".to_owned(), false)
        );
        assert_eq!(
            reconcile_status(false, dec!(0), dec!(0), dec!(0), 0, &unpriced(0), 0).0,
            "no usage"
        );
    }

    #[test]
    fn a_credit_note_must_negate_each_line_of_the_invoice_it_cancels() {
        let invoice = super::super::render::tests::sample(2);
        let mut credit = invoice.clone();
        credit.number = "TT-2026-000043".into();
        credit.kind = Kind::CreditNote;
        credit.references = Some(invoice.number.clone());
        for l in &mut credit.lines {
            l.quantity = -l.quantity;
            l.amount = -l.amount;
        }
        // The second line credits a cent too much.
        credit.lines[1].amount -= dec!(0.01);
        let mut ledger = Ledger::default();
        ledger.docs.push(invoice);
        let checks = credit_note_checks(&credit, &ledger);
        assert_eq!(
            checks.iter().map(|c| c.ok).collect::<Vec<_>>(),
            vec![true, false]
        );
        assert!(checks[1].problems[0].contains("does not cancel"));
    }
}
