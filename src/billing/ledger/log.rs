//! The ledger's log: the Kafka topic the requests are appended to and folded from, the
//! cache the dashboard drafts against, and ClickHouse's copy of the accepted documents.

use crate::billing::format::Format;
use std::time::Duration;

use chrono::Utc;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::fold::{compare, Ledger, Outcome, Record, Request, Verification};
use crate::billing::{Document, Kind};
use crate::config::Config;
use crate::store::invoices::NewInvoiceRow;
use crate::store::{Store, StoreError};

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
    #[error("invoice ledger topic `{topic}`: {message}")]
    Kafka { topic: String, message: String },
    #[error("invoice ledger topic `{topic}`, offset {offset}: the record is not valid: {message}")]
    BadRecord {
        topic: String,
        offset: i64,
        message: String,
    },
    #[error("stored document {number} is not valid JSON: {message}")]
    BadDocument { number: String, message: String },
    #[error("rendering document {number}: {message}")]
    Render { number: String, message: String },
    #[error("restoring {number}: the ledger did not accept it ({outcome})")]
    NotRestored { number: String, outcome: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl LedgerError {
    /// A register that must be restored or repaired before issuing (the operator's to fix),
    /// as opposed to an outage.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            LedgerError::Incomplete { .. } | LedgerError::Conflict { .. } | LedgerError::Gap { .. }
        )
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

    /// Forgets the kept fold: the next `current` reads the ledger again (after this
    /// process issued documents that its next page must show).
    pub async fn invalidate(&self) {
        *self.state.lock().await = None;
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

/// Every document ClickHouse holds, parsed, by seq.
pub async fn stored_documents(store: &Store) -> Result<Vec<Document>, LedgerError> {
    let mut docs = Vec::new();
    for row in store.stored_invoices(None).await? {
        let d: Document =
            serde_json::from_str(&row.document).map_err(|e| LedgerError::BadDocument {
                number: row.number.clone(),
                message: e.to_string(),
            })?;
        docs.push(d);
    }
    docs.sort_by_key(|d| d.seq);
    Ok(docs)
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl LedgerLog {
    fn kafka_error(&self, e: impl std::fmt::Display) -> LedgerError {
        LedgerError::Kafka {
            topic: self.topic.clone(),
            message: e.to_string(),
        }
    }

    /// Creates the topic if it is missing: one partition (one order), kept forever.
    async fn create_topic(&self) -> Result<(), LedgerError> {
        crate::kafka::ensure_topic(
            &self.kafka,
            &self.topic,
            1,
            &[("retention.ms", "-1"), ("retention.bytes", "-1")],
        )
        .await
        .map(|_| ())
        .map_err(|e| self.kafka_error(e))
    }

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
            .map_err(|e| self.kafka_error(e))?
            .is_some();
        if !exists {
            if !stored.is_empty() {
                return Err(LedgerError::Incomplete {
                    topic: self.topic.clone(),
                    missing: stored.iter().map(|d| d.number.clone()).collect(),
                });
            }
            self.create_topic().await?;
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
            .map_err(|e| self.kafka_error(e))?
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
        self.create_topic().await?;
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
                zone: "UTC".into(),
                request: Request::Restore {
                    document: Box::new(doc.clone()),
                },
            };
            self.append(&record).await?;
            self.catch_up(&mut ledger).await?;
            match ledger.outcomes.get(&record.request_id) {
                Some(Outcome::Accepted(n)) => restored.push(n.clone()),
                other => {
                    return Err(LedgerError::NotRestored {
                        number: doc.number.clone(),
                        outcome: format!("{other:?}"),
                    })
                }
            }
        }
        Ok(restored)
    }

    /// Reads records from `from` up to the current end (blocking; call off the runtime).
    fn read_blocking(&self, from: i64) -> Result<Vec<(i64, Record)>, LedgerError> {
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
                    .map_err(|e| self.kafka_error(format!("creating the reader: {e}")))?,
            );
        }
        let consumer = guard.as_ref().expect("created above");
        let result = self.read_with(consumer, from);
        if result.is_err() {
            // A broken reader (topic gone, broker replaced) is rebuilt next time.
            *guard = None;
        }
        result
    }

    fn read_with(
        &self,
        consumer: &BaseConsumer,
        from: i64,
    ) -> Result<Vec<(i64, Record)>, LedgerError> {
        let topic = &self.topic;
        let (_, high) = consumer
            .fetch_watermarks(topic, 0, TIMEOUT)
            .map_err(|e| self.kafka_error(format!("reading its end: {e}")))?;
        let mut out = Vec::new();
        if from >= high {
            return Ok(out);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(from))
            .and_then(|()| consumer.assign(&tpl))
            .map_err(|e| self.kafka_error(e))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut next = from;
        while next < high {
            if std::time::Instant::now() >= deadline {
                return Err(self.kafka_error(format!("timed out at offset {next} of {high}")));
            }
            let Some(msg) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let msg = msg.map_err(|e| self.kafka_error(e))?;
            let offset = msg.offset();
            if offset < next {
                continue;
            }
            let record: Record = serde_json::from_slice(msg.payload().unwrap_or_default())
                .map_err(|e| LedgerError::BadRecord {
                    topic: topic.clone(),
                    offset,
                    message: e.to_string(),
                })?;
            out.push((offset, record));
            next = offset + 1;
        }
        Ok(out)
    }

    /// Folds the whole log.
    pub async fn fold(&self) -> Result<Ledger, LedgerError> {
        let mut ledger = Ledger::default();
        self.catch_up(&mut ledger).await?;
        Ok(ledger)
    }

    /// Folds what was appended since `ledger` was last brought up to date.
    pub async fn catch_up(&self, ledger: &mut Ledger) -> Result<(), LedgerError> {
        let from = ledger.next_offset;
        let this = self.clone();
        let records = tokio::task::spawn_blocking(move || this.read_blocking(from))
            .await
            .map_err(|e| self.kafka_error(e))??;
        for (offset, record) in records {
            ledger.apply(offset, &record);
        }
        Ok(())
    }

    /// Appends a record and returns its offset once the broker has it.
    pub async fn append(&self, record: &Record) -> Result<i64, LedgerError> {
        let producer: FutureProducer = self
            .brokers
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|e| self.kafka_error(format!("creating the producer: {e}")))?;
        let payload = serde_json::to_vec(record).expect("records serialize");
        let delivery = producer
            .send(
                FutureRecord::to(&self.topic)
                    .partition(0)
                    .key(&record.request_id)
                    .payload(&payload),
                TIMEOUT,
            )
            .await
            .map_err(|(e, _)| self.kafka_error(format!("appending: {e}")))?;
        Ok(delivery.offset)
    }
}

/// Writes accepted documents the `invoices` table lacks (idempotent: rows are keyed by
/// sequence number and identical whoever writes them).
pub async fn materialize(store: &Store, ledger: &Ledger) -> Result<usize, LedgerError> {
    let present: std::collections::HashSet<u64> = store.invoice_seqs().await?.into_iter().collect();
    let mut rows = Vec::new();
    for d in ledger.docs.iter().filter(|d| !present.contains(&d.seq)) {
        let mut cents = d.total;
        cents.rescale(2);
        rows.push(NewInvoiceRow {
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
            document: crate::billing::render::json(d),
            csv: crate::billing::render::lines_csv(d),
            pdf: Format::Pdf
                .render_document(d)
                .expect("a document format")
                .map_err(|e| LedgerError::Render {
                    number: d.number.clone(),
                    message: e.to_string(),
                })?,
        });
    }
    store.insert_invoices(&rows).await?;
    Ok(rows.len())
}
