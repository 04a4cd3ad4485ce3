//! Prometheus metrics of the ingest pipeline, updated per batch (not per event).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::{routing::get, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: String,
}

/// The stages `stage_seconds` reports, in pipeline order. The last three are the consumer
/// loop's: not reading because the writer is several batches behind (held, then paused
/// after a quarter of `max.poll.interval.ms`: the store is the bottleneck), and the writer
/// idle with no batch ready (the broker is).
pub const STAGES: [&str; 9] = [
    "decode",
    "lookup",
    "price",
    "insert",
    "dead_letter",
    "commit",
    "fetch_held",
    "fetch_paused",
    "writer_idle",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

pub struct Metrics {
    registry: Registry,
    pub consumed: Counter,
    /// Read from Kafka, whether stored yet or still buffered.
    pub read: Counter,
    pub priced: Counter,
    pub unpriced: Counter,
    pub duplicates: Counter,
    pub replayed: Counter,
    pub rekeyed: Counter,
    pub cancelled: Counter,
    pub rechecks: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    pub batches: Counter,
    pub store_errors: Counter,
    pub batch_seconds: Histogram,
    stage_seconds: Family<StageLabel, Counter<f64, AtomicU64>>,
    pub lag: Family<PartitionLabel, Gauge>,
    /// 1 while the instance considers itself stalled (see `ingest::watch`).
    pub stalled: Gauge,
    pub price_book_reloads: Gauge,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("tokentally_ingest");
        let m = Metrics {
            consumed: Counter::default(),
            read: Counter::default(),
            priced: Counter::default(),
            unpriced: Counter::default(),
            duplicates: Counter::default(),
            replayed: Counter::default(),
            rekeyed: Counter::default(),
            cancelled: Counter::default(),
            rechecks: Counter::default(),
            rejected: Family::default(),
            batches: Counter::default(),
            store_errors: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            stage_seconds: Family::default(),
            lag: Family::default(),
            stalled: Gauge::default(),
            price_book_reloads: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "messages_consumed",
            "Kafka messages consumed",
            m.consumed.clone(),
        );
        registry.register(
            "messages_read",
            "Kafka messages read, stored or not yet (read minus consumed is what is buffered)",
            m.read.clone(),
        );
        registry.register(
            "events_priced",
            "Events stored with a price",
            m.priced.clone(),
        );
        registry.register(
            "events_unpriced",
            "Events stored without a matching price",
            m.unpriced.clone(),
        );
        registry.register(
            "events_duplicate",
            "Republished copies of stored events",
            m.duplicates.clone(),
        );
        registry.register(
            "messages_replayed",
            "Messages whose result was already stored",
            m.replayed.clone(),
        );
        registry.register(
            "messages_rekeyed",
            "Messages under a wrong or missing Kafka key, published again with key = institution_id",
            m.rekeyed.clone(),
        );
        registry.register(
            "events_cancelled",
            "Stored copies cancelled because another institution's copy of the event id was stored first",
            m.cancelled.clone(),
        );
        registry.register(
            "identity_rechecks",
            "Copies published to another partition's owner to cancel a later copy of an event id there",
            m.rechecks.clone(),
        );
        registry.register(
            "events_rejected",
            "Messages rejected, by reason",
            m.rejected.clone(),
        );
        registry.register("batches", "Batches written", m.batches.clone());
        registry.register(
            "store_errors",
            "Failed ClickHouse writes (retried)",
            m.store_errors.clone(),
        );
        registry.register(
            "batch_seconds",
            "Time to decode, price and write a batch",
            m.batch_seconds.clone(),
        );
        registry.register(
            "stage_seconds",
            "Time spent per pipeline stage (decode, lookup, price, insert, dead_letter, commit; fetch_held, fetch_paused, writer_idle)",
            m.stage_seconds.clone(),
        );
        registry.register(
            "consumer_lag",
            "Messages behind the partition's end",
            m.lag.clone(),
        );
        registry.register(
            "stalled",
            "1 while the group has uncommitted messages and this instance has not committed for ingest.stall_secs",
            m.stalled.clone(),
        );
        registry.register(
            "price_book_reloads",
            "Times the price book was reloaded after a change on disk",
            m.price_book_reloads.clone(),
        );
        for stage in STAGES {
            let _ = m.stage_seconds.get_or_create(&StageLabel {
                stage: stage.into(),
            });
        }
        for reason in crate::contract::RejectReason::ALL {
            let _ = m.rejected.get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            });
        }
        Arc::new(Metrics { registry, ..m })
    }

    /// Adds time to a stage (one of `STAGES`).
    pub fn stage(&self, stage: &str, d: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabel {
                stage: stage.into(),
            })
            .inc_by(d.as_secs_f64());
    }

    /// Seconds per stage so far, in `STAGES` order.
    pub fn stage_totals(&self) -> Vec<(&'static str, f64)> {
        STAGES
            .iter()
            .map(|s| {
                let v = self
                    .stage_seconds
                    .get_or_create(&StageLabel { stage: (*s).into() })
                    .get();
                (*s, v)
            })
            .collect()
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` and `/healthz` until the process ends.
pub async fn serve(listen: String, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(move || async move { metrics.encode() }))
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!(%listen, "metrics listening");
    axum::serve(listener, app).await?;
    Ok(())
}
