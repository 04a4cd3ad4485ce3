//! The ledger's fold: a deterministic function of the records in log order, which
//! assigns gap-free numbers and decides every request. Pure: no Kafka, no ClickHouse.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};

use crate::billing::{Document, Kind, Period};

/// One appended request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    pub request_id: String,
    /// The ledger end the request was drafted against.
    pub based_on: i64,
    pub created_at: DateTime<Utc>,
    /// Number prefix in force when the request was made.
    pub prefix: String,
    /// The issuer's time zone when the request was made: its calendar year is the year
    /// in the number. Records from before it existed were numbered in UTC.
    #[serde(default = "utc_zone")]
    pub zone: String,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Request {
    Issue {
        document: Box<Document>,
    },
    Void {
        number: String,
        reason: String,
    },
    /// A document issued earlier, re-appended from ClickHouse's copy after the ledger was
    /// lost: accepted only as the next number, with its number and dates unchanged.
    Restore {
        document: Box<Document>,
    },
}

fn utc_zone() -> String {
    "UTC".into()
}

/// What the fold decided about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted(String),
    /// The draft was made against an older state; draft again.
    Stale,
    Refused(String),
}

/// The state after folding the log.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Accepted documents in number order (`docs[i].seq == i + 1`).
    pub docs: Vec<Document>,
    /// Offset of the next record to fold.
    pub next_offset: i64,
    live: HashMap<(String, Period), String>,
    voided: HashMap<String, String>,
    by_number: HashMap<String, usize>,
    last_change: HashMap<String, i64>,
    pub outcomes: HashMap<String, Outcome>,
}

impl Ledger {
    pub fn apply(&mut self, offset: i64, record: &Record) -> Outcome {
        self.next_offset = offset + 1;
        let outcome = self.decide(offset, record);
        self.outcomes
            .insert(record.request_id.clone(), outcome.clone());
        outcome
    }

    fn decide(&mut self, offset: i64, record: &Record) -> Outcome {
        match &record.request {
            Request::Issue { document } => {
                let inst = document.customer.id.clone();
                if let Some(n) = self.live.get(&(inst.clone(), document.period)) {
                    return Outcome::Refused(format!(
                        "{} {} is already invoiced as {n}; void it first",
                        inst, document.period
                    ));
                }
                if self
                    .last_change
                    .get(&inst)
                    .is_some_and(|&o| o > record.based_on)
                {
                    return Outcome::Stale;
                }
                let mut doc = (**document).clone();
                self.number(&mut doc, record);
                self.live
                    .insert((inst.clone(), doc.period), doc.number.clone());
                self.last_change.insert(inst, offset);
                let n = doc.number.clone();
                self.push(doc);
                Outcome::Accepted(n)
            }
            Request::Restore { document } => {
                let expected = self.docs.len() as u64 + 1;
                if document.seq != expected {
                    return Outcome::Refused(format!(
                        "restore of {} (seq {}) out of order: the ledger expects seq {expected}",
                        document.number, document.seq
                    ));
                }
                let doc = (**document).clone();
                let inst = doc.customer.id.clone();
                match (&doc.kind, &doc.references) {
                    (Kind::CreditNote, Some(r)) => {
                        self.voided.insert(r.clone(), doc.number.clone());
                        if self.live.get(&(inst.clone(), doc.period)) == Some(r) {
                            self.live.remove(&(inst.clone(), doc.period));
                        }
                    }
                    _ => {
                        self.live
                            .insert((inst.clone(), doc.period), doc.number.clone());
                    }
                }
                self.last_change.insert(inst, offset);
                let n = doc.number.clone();
                self.push(doc);
                Outcome::Accepted(n)
            }
            Request::Void { number, .. } => {
                let Some(&i) = self.by_number.get(number) else {
                    return Outcome::Refused(format!("no document numbered {number}"));
                };
                let target = &self.docs[i];
                if target.kind != Kind::Invoice {
                    return Outcome::Refused(format!("{number} is a credit note"));
                }
                if let Some(c) = self.voided.get(number) {
                    return Outcome::Refused(format!("{number} is already voided by {c}"));
                }
                let inst = target.customer.id.clone();
                let period = target.period;
                let mut credit = target.credit_note();
                credit.issue_date = Some(
                    record
                        .created_at
                        .with_timezone(&target.time_zone.parse().unwrap_or(chrono_tz::UTC))
                        .date_naive(),
                );
                credit.due_date = credit.issue_date;
                self.number(&mut credit, record);
                self.voided.insert(number.clone(), credit.number.clone());
                self.live.remove(&(inst.clone(), period));
                self.last_change.insert(inst, offset);
                let n = credit.number.clone();
                self.push(credit);
                Outcome::Accepted(n)
            }
        }
    }

    fn number(&self, doc: &mut Document, record: &Record) {
        let seq = self.docs.len() as u64 + 1;
        doc.seq = seq;
        let zone: chrono_tz::Tz = record.zone.parse().unwrap_or(chrono_tz::UTC);
        let year = record.created_at.with_timezone(&zone).year();
        doc.number = format!("{}-{year}-{seq:06}", record.prefix);
        doc.issued_at = Some(record.created_at);
        // The hash chain: each document names its predecessor's hash, then hashes itself.
        doc.previous_sha256 = self.docs.last().map_or_else(String::new, |p| {
            if p.sha256.is_empty() {
                p.content_hash()
            } else {
                p.sha256.clone()
            }
        });
        doc.sha256 = doc.content_hash();
    }

    fn push(&mut self, doc: Document) {
        self.by_number.insert(doc.number.clone(), self.docs.len());
        self.docs.push(doc);
    }

    pub fn voided_by(&self, number: &str) -> Option<&str> {
        self.voided.get(number).map(String::as_str)
    }

    pub fn live_invoice(&self, institution: &str, period: Period) -> Option<&Document> {
        self.live
            .get(&(institution.to_owned(), period))
            .and_then(|n| self.by_number.get(n))
            .map(|&i| &self.docs[i])
    }

    /// Every document of one institution, in number order.
    pub fn of(&self, institution: &str) -> impl Iterator<Item = &Document> + '_ {
        let inst = institution.to_owned();
        self.docs.iter().filter(move |d| d.customer.id == inst)
    }
}

/// What `ledger verify` found.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Verification {
    pub topic_exists: bool,
    pub in_ledger: usize,
    pub in_clickhouse: usize,
    /// Issued documents ClickHouse holds that the ledger lacks: issuing is refused until
    /// they are restored.
    pub missing_from_ledger: Vec<String>,
    /// Accepted documents not copied to ClickHouse yet (the copy runs with every issue and
    /// every minute in `serve`; a few seconds' lag is normal).
    pub not_copied: Vec<String>,
    /// Same sequence number, different document.
    pub conflicts: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.missing_from_ledger.is_empty() && self.conflicts.is_empty()
    }
}

/// How the ledger's documents and ClickHouse's copies relate.
pub struct Comparison<'a> {
    /// In ClickHouse, not in the ledger, by seq.
    pub missing_from_ledger: Vec<&'a Document>,
    pub not_copied: Vec<String>,
    pub conflicts: Vec<String>,
}

/// Pure comparison of a fold with ClickHouse's documents (`stored` sorted by seq).
pub fn compare<'a>(ledger: &Ledger, stored: &'a [Document]) -> Comparison<'a> {
    let mut out = Comparison {
        missing_from_ledger: Vec::new(),
        not_copied: Vec::new(),
        conflicts: Vec::new(),
    };
    let by_seq: HashMap<u64, &Document> = stored.iter().map(|d| (d.seq, d)).collect();
    for d in stored {
        match ledger.docs.get((d.seq as usize).wrapping_sub(1)) {
            None => out.missing_from_ledger.push(d),
            Some(l) if l != d => out.conflicts.push(format!(
                "seq {} is {} in the ledger but {} in ClickHouse",
                d.seq, l.number, d.number
            )),
            Some(_) => {}
        }
    }
    for l in &ledger.docs {
        if !by_seq.contains_key(&l.seq) {
            out.not_copied.push(l.number.clone());
        }
    }
    out
}

/// Which invoices are voided, by which credit note.
pub fn voids(rows: &[crate::store::invoices::InvoiceRow]) -> BTreeMap<String, String> {
    rows.iter()
        .filter(|r| r.kind == "credit_note" && !r.references_number.is_empty())
        .map(|r| (r.references_number.clone(), r.number.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{Party, Unpriced};
    use chrono::TimeZone;
    use rust_decimal::Decimal;

    fn doc(inst: &str, period: &str) -> Document {
        let p: Period = period.parse().unwrap();
        let (s, e) = p.bounds(chrono_tz::UTC);
        Document {
            number: "DRAFT".into(),
            seq: 0,
            kind: Kind::Invoice,
            references: None,
            issuer: Party::default(),
            customer: Party {
                id: inst.into(),
                ..Default::default()
            },
            customer_reference: String::new(),
            period: p,
            time_zone: "UTC".into(),
            period_start: s,
            period_end: e,
            issued_at: None,
            issue_date: None,
            due_date: None,
            currency: "USD".into(),
            contract_percent: Decimal::ZERO,
            price_book_version: "v".into(),
            lines: vec![],
            subtotal: Decimal::ZERO,
            adjustments: Decimal::ZERO,
            total: Decimal::ZERO,
            unpriced: Unpriced::default(),
            unpriced_earlier: Vec::new(),
            manifest: Vec::new(),
            snapshot: String::new(),
            previous_sha256: String::new(),
            sha256: String::new(),
        }
    }

    fn issue(id: &str, based_on: i64, d: Document) -> Record {
        Record {
            v: 1,
            request_id: id.into(),
            based_on,
            created_at: Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap(),
            prefix: "TT".into(),
            zone: "UTC".into(),
            request: Request::Issue {
                document: Box::new(d),
            },
        }
    }

    #[test]
    fn numbers_are_gap_free_and_conflicts_are_decided_by_log_order() {
        let mut l = Ledger::default();
        // Two issuers drafted against the empty ledger (based_on = -1): different
        // institutions do not conflict.
        assert_eq!(
            l.apply(0, &issue("a", -1, doc("uni-a", "2026-10"))),
            Outcome::Accepted("TT-2026-000001".into())
        );
        assert_eq!(
            l.apply(1, &issue("b", -1, doc("uni-b", "2026-10"))),
            Outcome::Accepted("TT-2026-000002".into())
        );
        // Same institution and period again: refused, and it takes no number.
        assert!(matches!(
            l.apply(2, &issue("c", 1, doc("uni-a", "2026-10"))),
            Outcome::Refused(_)
        ));
        // Another period of uni-a drafted before uni-a's first invoice was accepted: stale.
        assert_eq!(
            l.apply(3, &issue("d", -1, doc("uni-a", "2026-09"))),
            Outcome::Stale
        );
        // Redrafted against the current end: accepted with the next number, no gap.
        assert_eq!(
            l.apply(4, &issue("e", 3, doc("uni-a", "2026-09"))),
            Outcome::Accepted("TT-2026-000003".into())
        );
        let seqs: Vec<u64> = l.docs.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }

    #[test]
    fn the_year_in_a_number_is_the_issuers_and_documents_are_hash_chained() {
        let mut l = Ledger::default();
        // 2026-12-31 12:00 UTC is already 2027 in Kiritimati (UTC+14), still 2026 in UTC.
        let mut r = issue("a", -1, doc("uni-a", "2026-11"));
        r.created_at = Utc.with_ymd_and_hms(2026, 12, 31, 12, 0, 0).unwrap();
        r.zone = "Pacific/Kiritimati".into();
        assert_eq!(l.apply(0, &r), Outcome::Accepted("TT-2027-000001".into()));
        let mut r = issue("b", -1, doc("uni-b", "2026-11"));
        r.created_at = Utc.with_ymd_and_hms(2026, 12, 31, 12, 0, 0).unwrap();
        assert_eq!(l.apply(1, &r), Outcome::Accepted("TT-2026-000002".into()));
        // Records from before the zone existed read as UTC.
        let old: Record = serde_json::from_str(
            &serde_json::to_string(&r)
                .unwrap()
                .replace(",\"zone\":\"UTC\"", ""),
        )
        .unwrap();
        assert_eq!(old.zone, "UTC");
        // Each names its predecessor's hash and hashes to what it says.
        let (a, b) = (&l.docs[0], &l.docs[1]);
        assert!(a.previous_sha256.is_empty());
        assert_eq!(b.previous_sha256, a.sha256);
        assert_eq!(a.sha256, a.content_hash());
        assert_eq!(b.sha256, b.content_hash());
    }

    #[test]
    fn voiding_issues_a_credit_note_and_frees_the_period() {
        let mut l = Ledger::default();
        let mut d = doc("uni-a", "2026-10");
        d.total = Decimal::new(1234, 2);
        l.apply(0, &issue("a", -1, d));
        let void = Record {
            request: Request::Void {
                number: "TT-2026-000001".into(),
                reason: "wrong contract".into(),
            },
            ..issue("v", 0, doc("x", "2026-10"))
        };
        assert_eq!(
            l.apply(1, &void),
            Outcome::Accepted("TT-2026-000002".into())
        );
        let credit = &l.docs[1];
        assert_eq!(credit.kind, Kind::CreditNote);
        assert_eq!(credit.references.as_deref(), Some("TT-2026-000001"));
        assert_eq!(l.voided_by("TT-2026-000001"), Some("TT-2026-000002"));
        // Voiding twice is refused; the period can be invoiced again.
        assert!(matches!(l.apply(2, &void), Outcome::Refused(_)));
        assert_eq!(
            l.apply(3, &issue("b", 2, doc("uni-a", "2026-10"))),
            Outcome::Accepted("TT-2026-000003".into())
        );
    }
}
