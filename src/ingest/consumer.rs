//! The consumer loop: poll → batch (by count, bytes and time) → write → commit offsets.
//! The last batch of a backlog does not wait for the timer (see `EndOfBacklog`).
//!
//! Offsets are committed only after ClickHouse has the batch, and every write is
//! idempotent, so a crash anywhere replays at most the uncommitted batches and counts
//! nothing twice.
//!
//! A batch is written by a task of its own while the next ones are collected. When the
//! writer is several batches behind, the loop stops reading for a while (librdkafka stops
//! fetching once its queue is full, and keeps what it prefetched); if the write is still
//! not done after a quarter of `max.poll.interval.ms` (ClickHouse away, retries), the loop
//! pauses fetching and polls again, so the group never thinks this instance died and
//! rebalances are served. One write runs at a time:
//! the next batch waits until the previous one is stored, so a message read twice (after
//! a rebalance) is always looked up after its first write finished.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::metrics::{Metrics, PartitionLabel};
use super::pipeline::{decode_batch, store_batch, Message, Outcome, Republish, Republished};
use super::watch::Heartbeat;
use crate::config::Config;
use crate::contract::DecodeOptions;
use crate::price::watch::BookWatcher;
use crate::price::PriceBook;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Counts rebalances and publishes lag from librdkafka's statistics.
struct IngestContext {
    generation: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    topic: String,
    /// Sum of the assigned partitions' lag at the last statistics callback.
    lag: Arc<AtomicI64>,
}

impl ClientContext for IngestContext {
    /// librdkafka reports every partition end (`enable.partition.eof`) here as well as to
    /// the consumer; only the consumer needs it, so it is not logged as an error.
    fn error(&self, error: KafkaError, reason: &str) {
        if let KafkaError::Global(RDKafkaErrorCode::PartitionEOF) = error {
            return;
        }
        error!("librdkafka: {error}: {reason}");
    }

    fn stats(&self, stats: Statistics) {
        let mut total = 0;
        if let Some(t) = stats.topics.get(&self.topic) {
            for (p, s) in &t.partitions {
                if *p >= 0 && s.consumer_lag >= 0 {
                    total += s.consumer_lag;
                    self.metrics
                        .lag
                        .get_or_create(&PartitionLabel {
                            partition: p.to_string(),
                        })
                        .set(s.consumer_lag);
                }
            }
        }
        self.lag.store(total, Ordering::SeqCst);
    }
}

impl ConsumerContext for IngestContext {
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            // Stored rows are the truth; a lost commit only means a harmless replay.
            warn!(error = %e, "offset commit failed; those messages may be re-read and skipped");
        }
    }

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

type Kafka = StreamConsumer<IngestContext>;

fn create_consumer(
    cfg: &Config,
    generation: &Arc<AtomicU64>,
    metrics: &Arc<Metrics>,
    lag: &Arc<AtomicI64>,
) -> anyhow::Result<Kafka> {
    let context = IngestContext {
        generation: generation.clone(),
        metrics: metrics.clone(),
        topic: cfg.kafka.topic.clone(),
        lag: lag.clone(),
    };
    let mut config = crate::kafka::client_config(&cfg.kafka);
    crate::kafka::fetch_settings(&mut config, &cfg.kafka);
    let consumer: Kafka = config
        .set("group.id", &cfg.kafka.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000")
        // Tells the loop when it has read everything there is (see `EndOfBacklog`).
        .set("enable.partition.eof", "true")
        .set(
            "max.poll.interval.ms",
            cfg.kafka.max_poll_interval_ms.to_string(),
        )
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
    Ok(consumer)
}

/// Publishes to the usage topic itself: re-keyed events and re-check copies. The
/// producer is created on first use (most deployments key correctly and never need it).
struct Publisher {
    config: rdkafka::ClientConfig,
    producer: std::sync::OnceLock<FutureProducer>,
    topic: String,
}

impl Publisher {
    fn producer(&self) -> Result<&FutureProducer, String> {
        if let Some(p) = self.producer.get() {
            return Ok(p);
        }
        let p: FutureProducer = self.config.create().map_err(|e| e.to_string())?;
        Ok(self.producer.get_or_init(|| p))
    }
}

impl Republish for Publisher {
    fn publish<'a>(
        &'a self,
        messages: Vec<Republished<'a>>,
    ) -> futures::future::BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if messages.is_empty() {
                return Ok(());
            }
            let producer = self.producer()?;
            // No headers: the local broker (tansu 0.6.0) looks a record's headers up
            // without an index, so every header it holds slows every fetch of every
            // topic (README). Where a copy came from is in `rekeyed_events`.
            let sends = messages.iter().map(|m| {
                let record = FutureRecord::to(&self.topic)
                    .payload(m.payload.as_ref())
                    .key(m.key);
                producer.send(record, Duration::from_secs(30))
            });
            for r in futures::future::join_all(sends).await {
                r.map_err(|(e, _)| e.to_string())?;
            }
            Ok(())
        })
    }
}

/// What a batch write needs; shared with the write task.
struct Writer {
    store: Store,
    topic: String,
    publisher: Publisher,
    dead_letter_topic: String,
    dead_letters: Option<FutureProducer>,
    metrics: Arc<Metrics>,
    dedupe_window_secs: i64,
    max_future_skew: chrono::Duration,
    max_backoff: Duration,
}

/// A batch handed to the write task.
struct Job {
    messages: Vec<Message>,
    generation: u64,
    book: Arc<PriceBook>,
}

/// The write task's answer.
struct Done {
    messages: Vec<Message>,
    generation: u64,
    started: Instant,
    /// `None`: given up (shutdown or rebalance while retrying); nothing is committed.
    outcome: Option<Outcome>,
}

impl Writer {
    /// Stores a batch, retrying until it is stored, the assignment changes or shutdown is
    /// requested. A batch ClickHouse refuses for good (not a passing outage) is written in
    /// halves, down to one message at a time: what fails because of its size then goes
    /// through, and whatever still fails is retried, loudly, never dropped.
    async fn write(
        self: Arc<Self>,
        job: Job,
        generation: Arc<AtomicU64>,
        mut shutdown: Shutdown,
    ) -> Done {
        let started = Instant::now();
        let mut outcome = Outcome::default();
        let mut chunk = job.messages.len().max(1);
        let mut pos = 0;
        let mut backoff = Duration::from_millis(100);
        let give_up = |outcome| Done {
            messages: Vec::new(),
            generation: job.generation,
            started,
            outcome,
        };
        while pos < job.messages.len() {
            let part = &job.messages[pos..(pos + chunk).min(job.messages.len())];
            let opts = DecodeOptions {
                now: chrono::Utc::now(),
                max_future_skew: self.max_future_skew,
            };
            let clock = Instant::now();
            let decoded = decode_batch(part, &opts);
            self.metrics.stage("decode", clock.elapsed());
            match store_batch(
                &self.store,
                &job.book,
                &self.topic,
                &decoded,
                self.dedupe_window_secs,
                &self.publisher,
            )
            .await
            {
                Ok(o) => {
                    let clock = Instant::now();
                    self.dead_letter(&decoded, &o).await;
                    self.metrics.stage("dead_letter", clock.elapsed());
                    self.metrics.stage("lookup", o.stages.lookup);
                    self.metrics.stage("price", o.stages.price);
                    self.metrics.stage("insert", o.stages.insert);
                    outcome.merge(o);
                    pos += part.len();
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Err(e) if e.is_retryable() => {
                    self.metrics.store_errors.inc();
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, messages = part.len(),
                          "writing batch failed; retrying");
                }
                Err(e) => {
                    self.metrics.store_errors.inc();
                    if chunk > 1 {
                        chunk = chunk.div_ceil(2);
                        error!(error = %e, messages = part.len(), next_chunk = chunk,
                               "ClickHouse refused the batch; writing it in smaller parts");
                        continue;
                    }
                    error!(error = %e, partition = part[0].partition, offset = part[0].offset,
                           "ClickHouse refuses this message; retrying (the partition is stalled until it is stored)");
                    backoff = self.max_backoff;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = shutdown.wait() => {
                    warn!("shutdown while the store refuses writes: batch left uncommitted (re-read on restart)");
                    return give_up(None);
                }
            }
            if generation.load(Ordering::SeqCst) != job.generation {
                info!("partitions reassigned while retrying: the batch is left to their new owner");
                return give_up(None);
            }
            backoff = (backoff * 2).min(self.max_backoff);
        }
        Done {
            messages: job.messages,
            generation: job.generation,
            started,
            outcome: Some(outcome),
        }
    }

    async fn dead_letter(&self, decoded: &super::pipeline::Decoded<'_>, outcome: &Outcome) {
        let Some(producer) = &self.dead_letters else {
            return;
        };
        for (reason, pos) in &outcome.new_rejections {
            let Some(m) = decoded
                .messages
                .iter()
                .find(|m| m.partition == pos.partition && m.offset == pos.offset)
            else {
                continue;
            };
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "tokentally-reason",
                    value: Some(reason.as_str()),
                })
                .insert(Header {
                    key: "tokentally-source-offset",
                    value: Some(&format!("{}:{}", m.partition, m.offset)),
                });
            let record = FutureRecord::to(&self.dead_letter_topic)
                .payload(&m.payload)
                .key(&m.key)
                .headers(headers);
            if let Err((e, _)) = producer.send(record, Duration::from_secs(5)).await {
                warn!(error = %e, "dead-letter publish failed (the rejection is stored in ClickHouse)");
            }
        }
    }
}

/// How many batches the consumer reads ahead while one is written, before it holds.
const BUFFERED_BATCHES: usize = 4;

/// How large a batch may grow: messages and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limit {
    messages: usize,
    bytes: usize,
}

/// Messages read but not yet handed to the writer. Reading goes on while a batch is
/// written, up to `BUFFERED_BATCHES` batches (or one backlog batch, whichever is more);
/// then the loop holds (stops reading without pausing). A pause makes librdkafka discard
/// the messages it prefetched and fetch them again, which costs the broker as much as the
/// fetch itself: at a 2M backlog, pausing whenever the buffer was full made the broker use
/// 36% more CPU than for a bare consumer.
struct Buffer {
    messages: std::collections::VecDeque<Message>,
    bytes: usize,
    /// A batch of live traffic and of the end of a backlog (`batch_max_*`).
    batch: Limit,
    /// A batch while a backlog is read (`backlog_batch_max_messages`; `batch` if that is
    /// not larger).
    backlog_batch: Limit,
    /// When the oldest message still buffered was read (at most; see `take_batch`).
    started: Instant,
}

impl Buffer {
    /// Batches of `batch`; while a backlog lasts, of `backlog_messages` messages and
    /// proportionally more bytes (if that is more than `batch.messages`; else never).
    fn new(batch: Limit, backlog_messages: usize) -> Self {
        let batch = Limit {
            messages: batch.messages.max(1),
            bytes: batch.bytes.max(1),
        };
        let backlog_batch = if backlog_messages > batch.messages {
            Limit {
                messages: backlog_messages,
                bytes: batch
                    .bytes
                    .saturating_mul(backlog_messages.div_ceil(batch.messages)),
            }
        } else {
            batch
        };
        Self {
            messages: Default::default(),
            bytes: 0,
            batch,
            backlog_batch,
            started: Instant::now(),
        }
    }

    fn size(m: &Message) -> usize {
        m.key.len() + m.payload.len() + 64
    }

    fn push(&mut self, m: Message) {
        if self.messages.is_empty() {
            self.started = Instant::now();
        }
        self.bytes += Self::size(&m);
        self.messages.push_back(m);
    }

    fn len(&self) -> usize {
        self.messages.len()
    }

    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    fn clear(&mut self) {
        self.messages.clear();
        self.bytes = 0;
    }

    fn reaches(&self, limit: Limit) -> bool {
        self.messages.len() >= limit.messages || self.bytes >= limit.bytes
    }

    /// The batch to collect now: a backlog batch while at least one more is buffered or
    /// still to be read (`unread`: messages after the last one read, in the partitions
    /// read from; asked only when it matters), else a normal one. So batches are large
    /// while a backlog lasts and normal again for its last messages, which are then
    /// stored as soon as with normal batches.
    fn limit(&self, unread: impl FnOnce() -> u64) -> Limit {
        if self.backlog_batch == self.batch || !self.reaches(self.batch) {
            return self.batch;
        }
        if self.reaches(self.backlog_batch)
            || self.messages.len() as u64 + unread() >= self.backlog_batch.messages as u64
        {
            self.backlog_batch
        } else {
            self.batch
        }
    }

    /// The writer is `BUFFERED_BATCHES` batches (or one backlog batch) behind.
    fn is_full(&self) -> bool {
        self.messages.len()
            >= (BUFFERED_BATCHES * self.batch.messages).max(self.backlog_batch.messages)
            || self.bytes >= (BUFFERED_BATCHES * self.batch.bytes).max(self.backlog_batch.bytes)
    }

    /// The oldest messages, up to `limit` (at least one message). What is left keeps the
    /// older `started`, so it is written no later than its own deadline.
    fn take_batch(&mut self, limit: Limit) -> Vec<Message> {
        let mut out = Vec::with_capacity(limit.messages.min(self.messages.len()));
        let mut bytes = 0;
        while let Some(m) = self.messages.front() {
            let size = Self::size(m);
            if !out.is_empty() && (out.len() >= limit.messages || bytes + size > limit.bytes) {
                break;
            }
            bytes += size;
            out.push(self.messages.pop_front().expect("front exists"));
        }
        self.bytes -= bytes;
        out
    }
}

/// Where reading stands in each partition read from under the current assignment, for
/// the size of the backlog still unread (`Buffer::limit`).
#[derive(Debug, Default)]
struct ReadPositions {
    next: BTreeMap<i32, i64>,
}

impl ReadPositions {
    fn read(&mut self, partition: i32, offset: i64) {
        self.next.insert(partition, offset + 1);
    }

    /// Messages after the last one read, by the high watermarks librdkafka last fetched
    /// (a partition not read from yet, or without a known watermark, counts none).
    fn unread(&self, consumer: &Kafka, topic: &std::ffi::CStr) -> u64 {
        self.next
            .iter()
            .filter_map(|(&p, &next)| {
                let high = crate::kafka::cached_high_watermark(consumer.client(), topic, p)?;
                u64::try_from(high - next).ok()
            })
            .sum()
    }
}

/// What the consumer loop gets from its composition root (`app::ingest`).
pub struct Parts {
    pub books: BookWatcher,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

/// Runs the consumer until `shutdown` resolves; then writes the batch in hand and returns.
pub async fn run(cfg: &Config, parts: Parts, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let Parts {
        mut books,
        store,
        metrics,
    } = parts;
    let generation = Arc::new(AtomicU64::new(0));
    let lag = Arc::new(AtomicI64::new(0));
    let mut consumer = create_consumer(cfg, &generation, &metrics, &lag)?;
    let writer = Arc::new(Writer {
        store: store.clone(),
        topic: cfg.kafka.topic.clone(),
        publisher: Publisher {
            config: crate::kafka::client_config(&cfg.kafka),
            producer: std::sync::OnceLock::new(),
            topic: cfg.kafka.topic.clone(),
        },
        dead_letter_topic: cfg.kafka.dead_letter_topic.clone(),
        dead_letters: if cfg.kafka.dead_letter_topic.is_empty() {
            None
        } else {
            Some(
                crate::kafka::client_config(&cfg.kafka)
                    .create()
                    .context("creating dead-letter producer")?,
            )
        },
        metrics: metrics.clone(),
        dedupe_window_secs: cfg.ingest.dedupe_window_secs,
        max_future_skew: chrono::Duration::seconds(cfg.ingest.max_future_skew_secs),
        max_backoff: Duration::from_millis(cfg.ingest.max_backoff_ms),
    });
    let mut heartbeat = Heartbeat::new(cfg, store.clone());
    info!(topic = %cfg.kafka.topic, group = %cfg.kafka.group, brokers = %cfg.kafka.brokers,
          instance = %heartbeat.instance_id(), "ingest started");

    let max_wait = Duration::from_millis(cfg.ingest.batch_max_wait_ms);
    let stall_after = Duration::from_secs(cfg.ingest.stall_secs);
    let mut batch = Buffer::new(
        Limit {
            messages: cfg.ingest.batch_max_messages,
            bytes: cfg.ingest.batch_max_bytes,
        },
        cfg.ingest.backlog_batch_max_messages,
    );
    let topic_c = std::ffi::CString::new(cfg.kafka.topic.as_str())
        .context("the Kafka topic name contains a NUL byte")?;
    let mut positions = ReadPositions::default();
    let mut commits = Commits::new(Duration::from_millis(cfg.ingest.commit_interval_ms));
    let mut batch_generation = generation.load(Ordering::SeqCst);
    let mut in_flight: Option<tokio::task::JoinHandle<Done>> = None;
    let mut paused: Option<(TopicPartitionList, Instant)> = None;
    // Since when the loop holds (does not read: the writer is behind, see `Buffer`).
    let mut holding: Option<Instant> = None;
    let pause_after = Duration::from_millis(cfg.kafka.max_poll_interval_ms / 4);
    // Since when no batch is being written (for the `writer_idle` stage).
    let mut writer_idle_since = Some(Instant::now());
    let mut stopping = false;
    let mut end = EndOfBacklog::default();
    let mut last_progress = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        // The limit matters only when a batch can be handed over.
        let limit = if in_flight.is_none() {
            batch.limit(|| positions.unread(&consumer, &topic_c))
        } else {
            batch.batch
        };
        let due = !batch.is_empty()
            && (batch.reaches(limit)
                || stopping
                || batch.started.elapsed() >= max_wait
                || end.write_now());
        if in_flight.is_none() && due {
            if generation.load(Ordering::SeqCst) != batch_generation {
                debug!(
                    dropped = batch.len(),
                    "assignment changed: batch will be re-read"
                );
                batch.clear();
            } else {
                end.taking(batch.reaches(limit));
                let job = Job {
                    messages: batch.take_batch(limit),
                    generation: batch_generation,
                    book: books.current(),
                };
                in_flight = Some(tokio::spawn(writer.clone().write(
                    job,
                    generation.clone(),
                    shutdown.clone(),
                )));
                if let Some(idle) = writer_idle_since.take() {
                    metrics.stage("writer_idle", idle.elapsed());
                }
                if let Some((tpl, since)) = paused.take() {
                    let _ = consumer.resume(&tpl);
                    metrics.stage("fetch_paused", since.elapsed());
                }
                if let Some(since) = holding.take() {
                    metrics.stage("fetch_held", since.elapsed());
                }
            }
        }
        if holding.is_none() && paused.is_none() && in_flight.is_some() && batch.is_full() {
            holding = Some(Instant::now());
        }
        if stopping && in_flight.is_none() && batch.is_empty() {
            break;
        }
        let deadline = tokio::time::Instant::from_std(batch.started + max_wait);
        tokio::select! {
            biased;
            () = shutdown.wait(), if !stopping => {
                info!(pending = batch.len(), "shutting down: writing the batch in hand");
                stopping = true;
            }
            done = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                in_flight = None;
                writer_idle_since = Some(Instant::now());
                // Holding waits for the writer only. Once it is done, reading resumes
                // even if no batch is handed over next (the assignment changed and the
                // buffer is dropped), instead of waiting for the pause fallback.
                if let Some(since) = holding.take() {
                    metrics.stage("fetch_held", since.elapsed());
                }
                match done {
                    Ok(done) => {
                        if finish(&mut commits, &metrics, &generation, done) {
                            last_progress = Instant::now();
                            heartbeat.committed();
                        }
                        commits.flush(&consumer, &cfg.kafka.topic, generation.load(Ordering::SeqCst), CommitMode::Async, &metrics);
                    }
                    Err(e) => return Err(anyhow::anyhow!("the batch writer failed: {e}")),
                }
            }
            () = tokio::time::sleep_until(deadline), if !batch.is_empty() && in_flight.is_none() => {}
            _ = tick.tick() => {
                commits.flush(&consumer, &cfg.kafka.topic, generation.load(Ordering::SeqCst), CommitMode::Async, &metrics);
                books.maybe_reload();
                metrics.price_book_reloads.set(books.reloads() as i64);
                if holding.is_some_and(|since| since.elapsed() >= pause_after) {
                    // The write takes long (ClickHouse away?): pause fetching and poll
                    // again, for rebalances and `max.poll.interval.ms`.
                    if let Ok(tpl) = consumer.assignment() {
                        if consumer.pause(&tpl).is_ok() {
                            metrics.stage("fetch_held", holding.take().expect("checked").elapsed());
                            paused = Some((tpl, Instant::now()));
                        }
                    }
                }
                let assigned = consumer.assignment().map(|t| t.elements().iter().map(|e| e.partition()).collect()).unwrap_or_default();
                let own_lag = lag.load(Ordering::SeqCst);
                if own_lag == 0 && batch.is_empty() && in_flight.is_none() {
                    // Caught up and idle: nothing is waiting for this instance.
                    last_progress = Instant::now();
                }
                heartbeat.observe_group();
                // Stalled: this instance has work it does not get done, or nobody in the
                // group commits while messages wait.
                let stalled = (own_lag > 0 && last_progress.elapsed() > stall_after)
                    || heartbeat.group_stuck_for() > stall_after;
                metrics.stalled.set(i64::from(stalled));
                heartbeat.beat(assigned, own_lag, books.version(), stalled, in_flight.is_some()).await;
                let rejoin_after = stall_after.min(super::watch::REJOIN_AFTER);
                if in_flight.is_none() && heartbeat.should_rejoin(rejoin_after) {
                    warn!(group_stuck_for_s = heartbeat.group_stuck_for().as_secs(),
                          "no partitions while the group makes no progress: rejoining the consumer group");
                    batch.clear();
                    positions = ReadPositions::default();
                    paused = None;
                    holding = None;
                    drop(consumer);
                    consumer = create_consumer(cfg, &generation, &metrics, &lag)?;
                    generation.fetch_add(1, Ordering::SeqCst);
                }
            }
            msg = consumer.recv(), if !stopping && holding.is_none() => match msg {
                Ok(m) => {
                    let g = generation.load(Ordering::SeqCst);
                    if g != batch_generation {
                        if !batch.is_empty() {
                            debug!(dropped = batch.len(), "assignment changed: batch will be re-read");
                        }
                        batch.clear();
                        positions = ReadPositions::default();
                        batch_generation = g;
                        paused = None;
                        holding = None;
                        end = EndOfBacklog::default();
                    }
                    end.read(m.partition());
                    positions.read(m.partition(), m.offset());
                    metrics.read.inc();
                    let key = m.key().map(<[u8]>::to_vec).unwrap_or_default();
                    let payload = m.payload().map(<[u8]>::to_vec).unwrap_or_default();
                    batch.push(Message { partition: m.partition(), offset: m.offset(), key, payload });
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    if generation.load(Ordering::SeqCst) == batch_generation {
                        let assigned = consumer.assignment().map(|t| t.elements().iter().map(|e| e.partition()).collect::<Vec<_>>()).unwrap_or_default();
                        end.reached(p, &assigned);
                    }
                }
                Err(e) => {
                    // Broker trouble: librdkafka reconnects by itself; keep polling.
                    warn!(error = %e, "Kafka error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    commits.flush(
        &consumer,
        &cfg.kafka.topic,
        generation.load(Ordering::SeqCst),
        CommitMode::Sync,
        &metrics,
    );
    heartbeat.stopped().await;
    let stages: Vec<String> = metrics
        .stage_totals()
        .iter()
        .map(|(stage, secs)| format!("{stage}={secs:.3}"))
        .collect();
    info!(batches = metrics.batches.get(), stage_seconds = %stages.join(" "), "ingest stopped");
    Ok(())
}

/// Whether the loop has read every message there is, right after draining a backlog.
///
/// The last, partial batch of a backlog would otherwise wait out `batch_max_wait_ms`
/// although nothing more is coming. It is written at once when every assigned partition
/// has reported its end (librdkafka's partition EOF) — but only if the batch before it was
/// full: a trickle of messages reaches the end after every message, and writing at each
/// would turn it into many small inserts (and parts in ClickHouse). So there is at most
/// one early write per full batch.
#[derive(Debug, Default)]
struct EndOfBacklog {
    /// Partitions whose end was reached with no message read from them since.
    at_end: std::collections::BTreeSet<i32>,
    /// Every assigned partition is in `at_end`.
    all: bool,
    /// The last batch handed to the writer was full.
    after_full_batch: bool,
}

impl EndOfBacklog {
    /// A message from `partition` was read: there was more than its end said.
    fn read(&mut self, partition: i32) {
        if self.at_end.remove(&partition) {
            self.all = false;
        }
    }

    /// `partition` reported its end; `assigned` are the partitions this instance owns.
    fn reached(&mut self, partition: i32, assigned: &[i32]) {
        self.at_end.insert(partition);
        self.all = !assigned.is_empty() && assigned.iter().all(|p| self.at_end.contains(p));
    }

    /// A batch is handed to the writer; `full` says whether it met a batch limit.
    fn taking(&mut self, full: bool) {
        self.after_full_batch = full;
    }

    /// Write what is buffered now instead of waiting out the batch timer.
    fn write_now(&self) -> bool {
        self.all && self.after_full_batch
    }
}

/// Offsets of stored batches, committed to Kafka asynchronously and at most once per
/// `interval`. An offset commit is a write on the broker (the local one took 0.8 s per
/// commit under load, blocking the loop while it ran); a commit left pending only means
/// a crash replays those messages, which the idempotent writes store once.
struct Commits {
    next: BTreeMap<i32, i64>,
    generation: u64,
    last: Instant,
    interval: Duration,
}

impl Commits {
    fn new(interval: Duration) -> Self {
        Self {
            next: BTreeMap::new(),
            generation: 0,
            last: Instant::now(),
            interval,
        }
    }

    /// Offsets of a batch stored under assignment `generation`; offsets of an earlier
    /// assignment are forgotten (their partitions' new owner re-reads and skips them).
    fn add(&mut self, generation: u64, messages: &[Message]) {
        if generation != self.generation {
            self.next.clear();
            self.generation = generation;
        }
        for m in messages {
            let e = self.next.entry(m.partition).or_insert(m.offset + 1);
            *e = (*e).max(m.offset + 1);
        }
    }

    /// Commits what is pending if the interval has passed (`Async`) or at once (`Sync`,
    /// when stopping). Nothing is committed for an assignment that has since changed.
    fn flush(
        &mut self,
        consumer: &Kafka,
        topic: &str,
        current: u64,
        mode: CommitMode,
        metrics: &Metrics,
    ) {
        if self.next.is_empty() {
            return;
        }
        if current != self.generation {
            debug!("assignment changed since the batch was stored: not committing its offsets");
            self.next.clear();
            return;
        }
        if matches!(mode, CommitMode::Async) && self.last.elapsed() < self.interval {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in &self.next {
            if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*o)) {
                warn!(error = %e, "cannot build the offset commit");
                return;
            }
        }
        let clock = Instant::now();
        if let Err(e) = consumer.commit(&tpl, mode) {
            // Stored rows are the truth; a lost commit only means a harmless replay.
            warn!(error = %e, "offset commit failed; the batch may be re-read and skipped");
        }
        metrics.stage("commit", clock.elapsed());
        self.next.clear();
        self.last = Instant::now();
    }
}

/// Takes a written batch's offsets for committing (unless the assignment changed
/// meanwhile: then the new owner re-reads it and finds it stored) and records its
/// metrics. True if the batch was stored under the current assignment.
fn finish(commits: &mut Commits, metrics: &Metrics, generation: &AtomicU64, done: Done) -> bool {
    let Some(outcome) = done.outcome else {
        return false;
    };
    if generation.load(Ordering::SeqCst) != done.generation {
        debug!(
            messages = done.messages.len(),
            "assignment changed while writing: not committing"
        );
        return false;
    }
    commits.add(done.generation, &done.messages);
    metrics.consumed.inc_by(done.messages.len() as u64);
    metrics.priced.inc_by(outcome.priced);
    metrics.unpriced.inc_by(outcome.unpriced);
    metrics.duplicates.inc_by(outcome.duplicates);
    metrics.replayed.inc_by(outcome.already_stored);
    metrics.rekeyed.inc_by(outcome.rekeyed);
    metrics.cancelled.inc_by(outcome.cancelled);
    metrics.rechecks.inc_by(outcome.rechecks);
    for (reason, n) in &outcome.rejected {
        metrics
            .rejected
            .get_or_create(&super::metrics::ReasonLabel {
                reason: (*reason).into(),
            })
            .inc_by(*n);
    }
    metrics.batches.inc();
    metrics
        .batch_seconds
        .observe(done.started.elapsed().as_secs_f64());
    debug!(
        messages = done.messages.len(),
        priced = outcome.priced,
        unpriced = outcome.unpriced,
        rejected = outcome.rejected_total(),
        duplicates = outcome.duplicates,
        replayed = outcome.already_stored,
        rekeyed = outcome.rekeyed,
        cancelled = outcome.cancelled,
        ms = done.started.elapsed().as_millis() as u64,
        lookup_ms = outcome.stages.lookup.as_millis() as u64,
        insert_ms = outcome.stages.insert.as_millis() as u64,
        "batch stored"
    );
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(partition: i32, offset: i64, payload_len: usize) -> Message {
        Message {
            partition,
            offset,
            key: b"uni".to_vec(),
            payload: vec![b'x'; payload_len],
        }
    }

    fn limit(messages: usize, bytes: usize) -> Limit {
        Limit { messages, bytes }
    }

    /// A buffer without backlog batches.
    fn buffer(messages: usize, bytes: usize) -> Buffer {
        Buffer::new(limit(messages, bytes), 0)
    }

    #[test]
    fn a_batch_is_taken_oldest_first_within_both_limits() {
        let mut b = buffer(3, 10_000);
        for o in 0..7 {
            b.push(msg(0, o, 100));
        }
        let l = b.limit(|| unreachable!("no backlog batches"));
        assert!(b.reaches(l));
        let first: Vec<i64> = b.take_batch(l).iter().map(|m| m.offset).collect();
        assert_eq!(first, [0, 1, 2]);
        assert_eq!(b.len(), 4);
        assert_eq!(b.bytes, 4 * (3 + 100 + 64));
        // By bytes: 167 bytes per message, at most 400 per batch → two.
        let mut b = buffer(100, 400);
        for o in 0..5 {
            b.push(msg(1, o, 100));
        }
        let l = b.batch;
        assert_eq!(b.take_batch(l).len(), 2);
        assert_eq!(b.take_batch(l).len(), 2);
        assert_eq!(b.take_batch(l).len(), 1);
        assert!(b.is_empty());
        assert_eq!(b.bytes, 0);
    }

    #[test]
    fn a_message_larger_than_a_batch_still_goes_alone() {
        let mut b = buffer(10, 100);
        b.push(msg(0, 0, 1_000));
        b.push(msg(0, 1, 10));
        let l = b.batch;
        assert_eq!(b.take_batch(l).len(), 1);
        assert_eq!(b.take_batch(l).len(), 1);
    }

    #[test]
    fn the_buffer_is_full_at_several_batches_not_at_one() {
        let mut b = buffer(2, 1 << 20);
        for o in 0..(2 * BUFFERED_BATCHES as i64 - 1) {
            b.push(msg(0, o, 10));
            assert!(!b.is_full(), "full after {} messages", o + 1);
        }
        b.push(msg(0, 99, 10));
        assert!(b.is_full());
    }

    #[test]
    fn batches_grow_while_a_backlog_lasts_and_shrink_for_its_end() {
        // Normal batches of 2, backlog batches of 6.
        let mut b = Buffer::new(limit(2, 1 << 20), 6);
        b.push(msg(0, 0, 10));
        assert_eq!(
            b.limit(|| panic!("asked before a normal batch is buffered")),
            b.batch
        );
        b.push(msg(0, 1, 10));
        // 2 buffered + 4 unread make a backlog batch: wait for it.
        assert_eq!(b.limit(|| 4), b.backlog_batch);
        assert!(!b.reaches(b.backlog_batch));
        // 2 buffered + 3 unread do not: the normal batch goes now.
        assert_eq!(b.limit(|| 3), b.batch);
        for o in 2..6 {
            b.push(msg(0, o, 10));
        }
        // A whole backlog batch buffered: taken whole, whatever is unread.
        let l = b.limit(|| 0);
        assert_eq!(l, b.backlog_batch);
        assert_eq!(b.take_batch(l).len(), 6);
    }

    #[test]
    fn the_buffer_holds_a_backlog_batch_before_it_is_full() {
        // Four normal batches (8) are fewer than one backlog batch (10).
        let mut b = Buffer::new(limit(2, 1 << 20), 10);
        for o in 0..9 {
            b.push(msg(0, o, 10));
            assert!(!b.is_full(), "full after {} messages", o + 1);
        }
        b.push(msg(0, 9, 10));
        assert!(b.is_full());
    }

    #[test]
    fn backlog_batches_are_off_unless_larger_and_grow_bytes_in_proportion() {
        for off in [0, 2, 5] {
            let b = Buffer::new(limit(5, 1000), off);
            assert_eq!(b.backlog_batch, b.batch, "backlog_batch_max_messages {off}");
        }
        let b = Buffer::new(limit(5, 1000), 12);
        assert_eq!(b.backlog_batch, limit(12, 3000));
    }

    #[test]
    fn commits_keep_the_highest_offset_per_partition_of_the_current_assignment() {
        let mut c = Commits::new(Duration::from_secs(1));
        c.add(1, &[msg(0, 5, 1), msg(1, 9, 1), msg(0, 7, 1)]);
        c.add(1, &[msg(0, 6, 1)]);
        assert_eq!(c.next, BTreeMap::from([(0, 8), (1, 10)]));
        // A batch of a newer assignment: the older offsets are not committed.
        c.add(2, &[msg(1, 20, 1)]);
        assert_eq!(c.next, BTreeMap::from([(1, 21)]));
    }

    #[test]
    fn the_end_of_a_backlog_writes_at_once_only_after_a_full_batch() {
        let assigned = [0, 1, 2];
        let mut e = EndOfBacklog::default();
        e.taking(true);
        e.reached(0, &assigned);
        e.reached(1, &assigned);
        assert!(!e.write_now(), "partition 2 may still have messages");
        e.reached(2, &assigned);
        assert!(e.write_now());
        // A message from a partition at its end: there is more to read.
        e.read(1);
        assert!(!e.write_now());
        e.reached(1, &assigned);
        assert!(e.write_now());
        // The early write took a partial batch: a trickle then waits for the timer.
        e.taking(false);
        assert!(!e.write_now());
        e.read(0);
        e.reached(0, &assigned);
        assert!(!e.write_now());
    }

    #[test]
    fn no_assignment_is_never_the_end() {
        let mut e = EndOfBacklog::default();
        e.taking(true);
        e.reached(0, &[]);
        assert!(!e.write_now());
    }
}
