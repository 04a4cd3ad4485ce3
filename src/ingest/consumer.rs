//! The consumer loop: poll → batch (by size and time) → write → commit offsets.
//!
//! Offsets are committed only after ClickHouse has the batch, and every write is
//! idempotent, so a crash anywhere replays at most one batch and counts nothing twice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::decode::DecodeOptions;
use super::metrics::{Metrics, PartitionLabel};
use super::pipeline::{decode_batch, store_batch, Message, Outcome};
use crate::config::Config;
use crate::price::PriceBook;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Counts rebalances and publishes lag from librdkafka's statistics.
struct IngestContext {
    generation: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    topic: String,
}

impl ClientContext for IngestContext {
    fn stats(&self, stats: Statistics) {
        if let Some(t) = stats.topics.get(&self.topic) {
            for (p, s) in &t.partitions {
                if *p >= 0 && s.consumer_lag >= 0 {
                    self.metrics
                        .lag
                        .get_or_create(&PartitionLabel {
                            partition: p.to_string(),
                        })
                        .set(s.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // Any change of assignment invalidates the batch being collected: with the
        // eager protocol every partition restarts from its committed offset.
        self.generation.fetch_add(1, Ordering::SeqCst);
        match rebalance {
            Rebalance::Assign(tpl) => info!(partitions = tpl.count(), "partitions assigned"),
            Rebalance::Revoke(tpl) => info!(partitions = tpl.count(), "partitions revoked"),
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

fn kafka_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

/// Runs the consumer until `shutdown` resolves; then writes the batch in hand and returns.
pub async fn run(cfg: &Config, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let book = PriceBook::load(&cfg.prices.path)
        .with_context(|| format!("loading price book {}", cfg.prices.path.display()))?;
    info!(
        entries = book.entries().len(),
        version = book.version(),
        "price book loaded"
    );
    let store = Store::new(&cfg.clickhouse);
    let metrics = Metrics::new();
    if !cfg.ingest.metrics_listen.is_empty() {
        let (listen, m) = (cfg.ingest.metrics_listen.clone(), metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = super::metrics::serve(listen, m).await {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
    }

    let generation = Arc::new(AtomicU64::new(0));
    let context = IngestContext {
        generation: generation.clone(),
        metrics: metrics.clone(),
        topic: cfg.kafka.topic.clone(),
    };
    let consumer: StreamConsumer<IngestContext> = kafka_config(cfg)
        .set("group.id", &cfg.kafka.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        .set(
            "queued.max.messages.kbytes",
            cfg.kafka.queued_max_kbytes.to_string(),
        )
        .set("fetch.max.bytes", "16777216")
        .set("max.poll.interval.ms", "600000")
        .set(
            "session.timeout.ms",
            cfg.kafka.session_timeout_ms.to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (cfg.kafka.session_timeout_ms / 5).max(500).to_string(),
        )
        .create_with_context(context)
        .context("creating Kafka consumer")?;
    consumer
        .subscribe(&[&cfg.kafka.topic])
        .context("subscribing")?;
    let dead_letters: Option<FutureProducer> = if cfg.kafka.dead_letter_topic.is_empty() {
        None
    } else {
        Some(
            kafka_config(cfg)
                .create()
                .context("creating dead-letter producer")?,
        )
    };
    info!(topic = %cfg.kafka.topic, group = %cfg.kafka.group, brokers = %cfg.kafka.brokers, "ingest started");

    let sink = Sink {
        consumer: &consumer,
        store: &store,
        book: &book,
        cfg,
        metrics: &metrics,
        dead_letters: dead_letters.as_ref(),
    };
    let max_wait = Duration::from_millis(cfg.ingest.batch_max_wait_ms);
    let max_messages = cfg.ingest.batch_max_messages;
    let mut batch: Vec<Message> = Vec::with_capacity(max_messages);
    let mut batch_started = Instant::now();
    let mut seen_generation = generation.load(Ordering::SeqCst);

    loop {
        let deadline = tokio::time::Instant::from_std(batch_started + max_wait);
        tokio::select! {
            biased;
            () = shutdown.wait() => {
                info!(pending = batch.len(), "shutting down: writing the batch in hand");
                break;
            }
            () = tokio::time::sleep_until(deadline), if !batch.is_empty() => {}
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let g = generation.load(Ordering::SeqCst);
                    if g != seen_generation {
                        if !batch.is_empty() {
                            debug!(dropped = batch.len(), "assignment changed: batch will be re-read");
                        }
                        batch.clear();
                        seen_generation = g;
                    }
                    if batch.is_empty() {
                        batch_started = Instant::now();
                    }
                    batch.push(Message {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    });
                    if batch.len() < max_messages {
                        continue;
                    }
                }
                Err(e) => {
                    // Broker trouble: librdkafka reconnects by itself; keep polling.
                    warn!(error = %e, "Kafka error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        }
        if generation.load(Ordering::SeqCst) != seen_generation {
            batch.clear();
            seen_generation = generation.load(Ordering::SeqCst);
            continue;
        }
        if !batch.is_empty() {
            sink.flush(&batch, &mut shutdown).await?;
            batch.clear();
        }
    }
    if !batch.is_empty() && generation.load(Ordering::SeqCst) == seen_generation {
        sink.flush(&batch, &mut shutdown).await?;
    }
    info!("ingest stopped");
    Ok(())
}

/// Where a batch goes: ClickHouse, the dead-letter topic, then the offset commit.
struct Sink<'a> {
    consumer: &'a StreamConsumer<IngestContext>,
    store: &'a Store,
    book: &'a PriceBook,
    cfg: &'a Config,
    metrics: &'a Metrics,
    dead_letters: Option<&'a FutureProducer>,
}

impl Sink<'_> {
    /// Writes a batch (retrying with backoff until it is stored), then commits its offsets.
    async fn flush(&self, batch: &[Message], shutdown: &mut Shutdown) -> anyhow::Result<()> {
        let started = Instant::now();
        let opts = DecodeOptions {
            now: chrono::Utc::now(),
            max_future_skew: chrono::Duration::seconds(self.cfg.ingest.max_future_skew_secs),
        };
        let decoded = decode_batch(batch, &opts);
        let mut backoff = Duration::from_millis(100);
        let outcome: Outcome = loop {
            match store_batch(
                self.store,
                self.book,
                &self.cfg.kafka.topic,
                &decoded,
                self.cfg.ingest.dedupe_window_secs,
            )
            .await
            {
                Ok(o) => break o,
                Err(e) => {
                    self.metrics.store_errors.inc();
                    warn!(error = %e, retryable = e.is_retryable(), retry_in_ms = backoff.as_millis() as u64,
                      messages = batch.len(), "writing batch failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.wait() => {
                            // Nothing was committed: the batch is re-read on restart.
                            warn!("shutdown while the store is unavailable: batch left uncommitted");
                            return Ok(());
                        }
                    }
                    backoff =
                        (backoff * 2).min(Duration::from_millis(self.cfg.ingest.max_backoff_ms));
                }
            }
        };

        if let Some(producer) = self.dead_letters {
            for (reason, i) in &outcome.new_rejections {
                let (_, m) = &decoded.rejected[*i];
                let headers = OwnedHeaders::new()
                    .insert(Header {
                        key: "tokentally-reason",
                        value: Some(reason.as_str()),
                    })
                    .insert(Header {
                        key: "tokentally-source-offset",
                        value: Some(&format!("{}:{}", m.partition, m.offset)),
                    });
                let record = FutureRecord::to(&self.cfg.kafka.dead_letter_topic)
                    .payload(&m.payload)
                    .key(&m.key)
                    .headers(headers);
                if let Err((e, _)) = producer.send(record, Duration::from_secs(5)).await {
                    warn!(error = %e, "dead-letter publish failed (the rejection is stored in ClickHouse)");
                }
            }
        }

        let mut tpl = TopicPartitionList::new();
        let mut next: std::collections::BTreeMap<i32, i64> = Default::default();
        for m in batch {
            let e = next.entry(m.partition).or_insert(m.offset + 1);
            *e = (*e).max(m.offset + 1);
        }
        for (p, o) in next {
            tpl.add_partition_offset(&self.cfg.kafka.topic, p, Offset::Offset(o))?;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
            // Stored rows are the truth; a lost commit only means a harmless replay.
            warn!(error = %e, "offset commit failed; the batch may be re-read and skipped");
        }

        self.metrics.consumed.inc_by(batch.len() as u64);
        self.metrics.priced.inc_by(outcome.priced);
        self.metrics.unpriced.inc_by(outcome.unpriced);
        self.metrics.duplicates.inc_by(outcome.duplicates);
        self.metrics.replayed.inc_by(outcome.already_stored);
        for (reason, n) in &outcome.rejected {
            self.metrics
                .rejected
                .get_or_create(&super::metrics::ReasonLabel {
                    reason: (*reason).into(),
                })
                .inc_by(*n);
        }
        self.metrics.batches.inc();
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        debug!(
            messages = batch.len(),
            priced = outcome.priced,
            unpriced = outcome.unpriced,
            rejected = outcome.rejected_total(),
            duplicates = outcome.duplicates,
            replayed = outcome.already_stored,
            ms = started.elapsed().as_millis() as u64,
            "batch stored"
        );
        Ok(())
    }
}
