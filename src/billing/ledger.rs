//! The invoice ledger: a single-partition Kafka topic that orders every request to issue
//! or void a document. Numbers are assigned by folding the log in order, so they are
//! gap-free and never reused whoever issues, from however many processes at once:
//!
//! 1. An issuer folds the log up to its end `E`, drafts the document from that state
//!    (including adjustments for what earlier documents billed) and appends a request
//!    that says `based_on = E`.
//! 2. Folding is deterministic. A request is accepted unless the period already has a
//!    live invoice, or another document for the same institution was accepted after
//!    `based_on` (the draft would be stale: the issuer drafts again and retries).
//! 3. Each accepted request takes the next number. The request is durable in Kafka
//!    before anyone learns its number, so a crash never leaves a gap: the next fold
//!    (any issuer, `serve`) materialises it into ClickHouse.
//!
//! ClickHouse's `invoices` table is a copy, keyed by sequence number, written as part of
//! every issue. The two check each other: a topic can vanish (retention misconfigured,
//! cluster migrated, deleted by mistake), and a register that restarted empty would hand
//! out used numbers. So a ledger that lacks a document ClickHouse holds is never used for
//! issuing (`LedgerError::Incomplete`), and `restore` re-appends the missing documents
//! with their numbers, after which numbering continues above the highest ever used.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, Datelike, Utc};
use clickhouse::Row;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::{Document, Kind, Period};
use crate::config::Config;
use crate::store::{sql_str, Store};

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

/// Why the ledger cannot be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the invoice ledger (topic `{topic}`) lacks {} document(s) that ClickHouse holds ({}); issuing now could reuse their numbers. Run `tokentally ledger verify`, then `tokentally ledger restore`", .missing.len(), .missing.join(", "))]
    Incomplete { topic: String, missing: Vec<String> },
    #[error("the invoice ledger (topic `{topic}`) and ClickHouse disagree on {}: {}; restore cannot reconcile this by itself — compare both and repair by hand", .conflicts.len(), .conflicts.join("; "))]
    Conflict {
        topic: String,
        conflicts: Vec<String>,
    },
    #[error("ClickHouse holds documents up to seq {highest} but not seq {gap}: the register has a gap and cannot be restored gap-free")]
    Gap { highest: u64, gap: u64 },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
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
        doc.number = format!("{}-{}-{seq:06}", record.prefix, record.created_at.year());
        doc.issued_at = Some(record.created_at);
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

/// Access to the ledger topic.
#[derive(Clone)]
pub struct LedgerLog {
    brokers: ClientConfig,
    kafka: crate::config::KafkaConfig,
    topic: String,
    /// One reader, created on first use and kept: folding again only reads what was
    /// appended since (a dashboard drafting invoices must not open a client per request).
    reader: std::sync::Arc<std::sync::Mutex<Option<BaseConsumer>>>,
}

/// A fold kept between requests: brought up to date (only what was appended since) and
/// checked against ClickHouse at most every `REFRESH`, so pages that draft invoices cost
/// neither a Kafka client nor a full read of the ledger each.
pub struct LedgerCache {
    log: LedgerLog,
    state: tokio::sync::Mutex<Option<(Ledger, std::time::Instant)>>,
}

impl LedgerCache {
    const REFRESH: Duration = Duration::from_secs(10);

    pub fn new(log: LedgerLog) -> Self {
        Self {
            log,
            state: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn current(&self, store: &Store) -> Result<Ledger, LedgerError> {
        let mut state = self.state.lock().await;
        match state.as_mut() {
            Some((ledger, at)) if at.elapsed() < Self::REFRESH => Ok(ledger.clone()),
            Some((ledger, at)) => {
                self.log.catch_up(ledger).await?;
                self.log
                    .check_against(ledger, &stored_documents(store).await?)?;
                *at = std::time::Instant::now();
                Ok(ledger.clone())
            }
            None => {
                let ledger = self.log.open(store).await?;
                *state = Some((ledger.clone(), std::time::Instant::now()));
                Ok(ledger)
            }
        }
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

/// Every document ClickHouse holds, parsed, by seq.
pub async fn stored_documents(store: &Store) -> anyhow::Result<Vec<Document>> {
    let mut docs = Vec::new();
    for row in stored(store, None).await? {
        let d: Document = serde_json::from_str(&row.document)
            .with_context(|| format!("stored document {} is not valid JSON", row.number))?;
        docs.push(d);
    }
    docs.sort_by_key(|d| d.seq);
    Ok(docs)
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl LedgerLog {
    pub fn new(cfg: &Config) -> Self {
        Self {
            brokers: crate::kafka::client_config(&cfg.kafka),
            kafka: cfg.kafka.clone(),
            reader: Default::default(),
            topic: cfg.billing.ledger_topic.clone(),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Folds the ledger and checks it against ClickHouse's copy. The topic (one
    /// partition, no retention limit) is created only while ClickHouse holds no document:
    /// a missing ledger is never silently replaced by an empty one.
    pub async fn open(&self, store: &Store) -> Result<Ledger, LedgerError> {
        let stored = stored_documents(store).await?;
        let exists = crate::kafka::partitions(&self.kafka, &self.topic)
            .await
            .map_err(anyhow::Error::from)?
            .is_some();
        if !exists {
            if !stored.is_empty() {
                return Err(LedgerError::Incomplete {
                    topic: self.topic.clone(),
                    missing: stored.iter().map(|d| d.number.clone()).collect(),
                });
            }
            crate::kafka::ensure_topic(
                &self.kafka,
                &self.topic,
                1,
                &[("retention.ms", "-1"), ("retention.bytes", "-1")],
            )
            .await
            .map_err(anyhow::Error::from)?;
        }
        let ledger = self.fold().await?;
        self.check_against(&ledger, &stored)?;
        Ok(ledger)
    }

    /// Refuses a fold that lacks a document ClickHouse holds, or disagrees with one.
    fn check_against(&self, ledger: &Ledger, stored: &[Document]) -> Result<(), LedgerError> {
        let c = compare(ledger, stored);
        if !c.conflicts.is_empty() {
            return Err(LedgerError::Conflict {
                topic: self.topic.clone(),
                conflicts: c.conflicts,
            });
        }
        if !c.missing_from_ledger.is_empty() {
            return Err(LedgerError::Incomplete {
                topic: self.topic.clone(),
                missing: c
                    .missing_from_ledger
                    .iter()
                    .map(|d| d.number.clone())
                    .collect(),
            });
        }
        Ok(())
    }

    /// Compares the ledger with ClickHouse's copy without changing either.
    pub async fn verify(&self, store: &Store) -> Result<Verification, LedgerError> {
        let stored = stored_documents(store).await?;
        let exists = crate::kafka::partitions(&self.kafka, &self.topic)
            .await
            .map_err(anyhow::Error::from)?
            .is_some();
        let ledger = if exists {
            self.fold().await?
        } else {
            Ledger::default()
        };
        let c = compare(&ledger, &stored);
        Ok(Verification {
            topic_exists: exists,
            in_ledger: ledger.docs.len(),
            in_clickhouse: stored.len(),
            missing_from_ledger: c
                .missing_from_ledger
                .iter()
                .map(|d| d.number.clone())
                .collect(),
            not_copied: c.not_copied,
            conflicts: c.conflicts,
        })
    }

    /// Re-appends the documents ClickHouse holds and the ledger lacks, in number order
    /// and with their numbers, so the register is whole again and numbering continues
    /// above the highest number ever used. Returns the numbers restored.
    pub async fn restore(&self, store: &Store) -> Result<Vec<String>, LedgerError> {
        let stored = stored_documents(store).await?;
        crate::kafka::ensure_topic(
            &self.kafka,
            &self.topic,
            1,
            &[("retention.ms", "-1"), ("retention.bytes", "-1")],
        )
        .await
        .map_err(anyhow::Error::from)?;
        let mut ledger = self.fold().await?;
        let c = compare(&ledger, &stored);
        if !c.conflicts.is_empty() {
            return Err(LedgerError::Conflict {
                topic: self.topic.clone(),
                conflicts: c.conflicts,
            });
        }
        let mut restored = Vec::new();
        for doc in c.missing_from_ledger {
            let expected = ledger.docs.len() as u64 + 1;
            if doc.seq != expected {
                return Err(LedgerError::Gap {
                    highest: stored.iter().map(|d| d.seq).max().unwrap_or(0),
                    gap: expected,
                });
            }
            let record = Record {
                v: 1,
                request_id: uuid::Uuid::new_v4().to_string(),
                based_on: ledger.next_offset - 1,
                created_at: doc.issued_at.unwrap_or_else(Utc::now),
                prefix: String::new(),
                request: Request::Restore {
                    document: Box::new(doc.clone()),
                },
            };
            self.append(&record).await?;
            self.catch_up(&mut ledger).await?;
            match ledger.outcomes.get(&record.request_id) {
                Some(Outcome::Accepted(n)) => restored.push(n.clone()),
                other => {
                    return Err(LedgerError::Other(anyhow::anyhow!(
                        "restoring {} was not accepted: {other:?}",
                        doc.number
                    )))
                }
            }
        }
        Ok(restored)
    }

    /// Reads records from `from` up to the current end (blocking; call off the runtime).
    fn read_blocking(&self, from: i64) -> anyhow::Result<Vec<(i64, Record)>> {
        let mut guard = self.reader.lock().expect("ledger reader lock");
        if guard.is_none() {
            tracing::debug!(topic = %self.topic, "opening the invoice ledger reader");
            *guard = Some(
                self.brokers
                    .clone()
                    .set("group.id", "tokentally-ledger-reader")
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false")
                    .create()
                    .context("creating ledger reader")?,
            );
        }
        let consumer = guard.as_ref().expect("created above");
        let result = Self::read_with(consumer, &self.topic, from);
        if result.is_err() {
            // A broken reader (topic gone, broker replaced) is rebuilt next time.
            *guard = None;
        }
        result
    }

    fn read_with(
        consumer: &BaseConsumer,
        topic: &str,
        from: i64,
    ) -> anyhow::Result<Vec<(i64, Record)>> {
        let (_, high) = consumer
            .fetch_watermarks(topic, 0, TIMEOUT)
            .with_context(|| format!("reading the end of ledger topic {}", topic))?;
        let mut out = Vec::new();
        if from >= high {
            return Ok(out);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut next = from;
        while next < high {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "timed out reading ledger topic {} at offset {next} of {high}",
                topic
            );
            let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let msg = msg.context("reading the ledger")?;
            let offset = msg.offset();
            if offset < next {
                continue;
            }
            let record: Record = serde_json::from_slice(msg.payload().unwrap_or_default())
                .with_context(|| format!("ledger record at offset {offset} is not valid"))?;
            out.push((offset, record));
            next = offset + 1;
        }
        Ok(out)
    }

    /// Folds the whole log.
    pub async fn fold(&self) -> anyhow::Result<Ledger> {
        let mut ledger = Ledger::default();
        self.catch_up(&mut ledger).await?;
        Ok(ledger)
    }

    /// Folds what was appended since `ledger` was last brought up to date.
    pub async fn catch_up(&self, ledger: &mut Ledger) -> anyhow::Result<()> {
        let from = ledger.next_offset;
        let this = self.clone();
        let records = tokio::task::spawn_blocking(move || this.read_blocking(from)).await??;
        for (offset, record) in records {
            ledger.apply(offset, &record);
        }
        Ok(())
    }

    /// Appends a record and returns its offset once the broker has it.
    pub async fn append(&self, record: &Record) -> anyhow::Result<i64> {
        let producer: FutureProducer = self
            .brokers
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "30000")
            .create()
            .context("creating ledger producer")?;
        let payload = serde_json::to_vec(record)?;
        let delivery = producer
            .send(
                FutureRecord::to(&self.topic)
                    .partition(0)
                    .key(&record.request_id)
                    .payload(&payload),
                TIMEOUT,
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("appending to ledger topic {}: {e}", self.topic))?;
        Ok(delivery.offset)
    }
}

#[derive(Row, Serialize)]
struct NewInvoiceRow {
    seq: u64,
    number: String,
    kind: String,
    institution_id: String,
    period: String,
    issued_at: u32,
    /// Decimal(38, 2) travels as cents.
    total: i128,
    references_number: String,
    document: String,
    csv: String,
    #[serde(with = "serde_bytes")]
    pdf: Vec<u8>,
}

/// A stored document.
#[derive(Debug, Row, Deserialize)]
pub struct InvoiceRow {
    pub seq: u64,
    pub number: String,
    pub kind: String,
    pub institution_id: String,
    pub period: String,
    pub issued_at: u32,
    pub total: String,
    pub references_number: String,
    pub document: String,
}

/// Writes accepted documents the `invoices` table lacks (idempotent: rows are keyed by
/// sequence number and identical whoever writes them).
pub async fn materialize(store: &Store, ledger: &Ledger) -> anyhow::Result<usize> {
    let present: Vec<u64> = store
        .client()
        .query("SELECT DISTINCT seq FROM invoices")
        .fetch_all()
        .await?;
    let present: std::collections::HashSet<u64> = present.into_iter().collect();
    let missing: Vec<&Document> = ledger
        .docs
        .iter()
        .filter(|d| !present.contains(&d.seq))
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let mut insert = store.client().insert::<NewInvoiceRow>("invoices").await?;
    for d in &missing {
        let mut cents = d.total;
        cents.rescale(2);
        insert
            .write(&NewInvoiceRow {
                seq: d.seq,
                number: d.number.clone(),
                kind: match d.kind {
                    Kind::Invoice => "invoice".into(),
                    Kind::CreditNote => "credit_note".into(),
                },
                institution_id: d.customer.id.clone(),
                period: d.period.to_string(),
                issued_at: d.issued_at.map_or(0, |t| t.timestamp() as u32),
                total: cents.mantissa(),
                references_number: d.references.clone().unwrap_or_default(),
                document: super::render::json(d),
                csv: super::render::lines_csv(d),
                pdf: super::render::pdf(d)?,
            })
            .await?;
    }
    insert.end().await?;
    Ok(missing.len())
}

/// Stored documents (one per number), optionally of one institution, newest first.
pub async fn stored(store: &Store, institution: Option<&str>) -> anyhow::Result<Vec<InvoiceRow>> {
    let filter = institution
        .map(|i| format!("WHERE institution_id = {}", sql_str(i)))
        .unwrap_or_default();
    let sql = format!(
        "SELECT seq, any(number), any(kind), any(institution_id), any(period), any(issued_at), \
         toString(any(total)), any(references_number), any(document) FROM invoices {filter} \
         GROUP BY seq ORDER BY seq DESC"
    );
    Ok(store.client().query(&sql).fetch_all().await?)
}

/// One stored document by number, with the institution it belongs to.
pub async fn stored_one(store: &Store, number: &str) -> anyhow::Result<Option<InvoiceRow>> {
    let sql = format!(
        "SELECT seq, number, kind, institution_id, period, issued_at, toString(total), references_number, document \
         FROM invoices WHERE number = {} LIMIT 1",
        sql_str(number)
    );
    Ok(store.client().query(&sql).fetch_optional().await?)
}

/// The frozen renderings of one stored document.
#[derive(Row, Deserialize)]
pub struct Frozen {
    pub document: String,
    pub csv: String,
    #[serde(with = "serde_bytes")]
    pub pdf: Vec<u8>,
}

pub async fn frozen(store: &Store, number: &str) -> anyhow::Result<Option<Frozen>> {
    let sql = format!(
        "SELECT document, csv, pdf FROM invoices WHERE number = {} LIMIT 1",
        sql_str(number)
    );
    Ok(store.client().query(&sql).fetch_optional().await?)
}

/// Which invoices are voided, by which credit note.
pub fn voids(rows: &[InvoiceRow]) -> BTreeMap<String, String> {
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
        }
    }

    fn issue(id: &str, based_on: i64, d: Document) -> Record {
        Record {
            v: 1,
            request_id: id.into(),
            based_on,
            created_at: Utc.with_ymd_and_hms(2026, 11, 2, 9, 0, 0).unwrap(),
            prefix: "TT".into(),
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
