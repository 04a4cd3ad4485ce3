//! `tokentally ingest`: the price book, the store and the metrics endpoint from the
//! configuration, the usage topic made sure of, and the consumer loop.

use tracing::{info, warn};

use crate::config::Config;
use crate::ingest::consumer::{self, Parts};
use crate::ingest::metrics::{self, Metrics};
use crate::price::watch::BookWatcher;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Consumes until `shutdown`, then writes the batch in hand and returns.
pub async fn run(cfg: &Config, shutdown: Shutdown) -> anyhow::Result<()> {
    spawn(cfg, shutdown).await?.await?
}

/// Starts the consumer; the task ends after `shutdown` and the batch in hand.
pub async fn spawn(
    cfg: &Config,
    shutdown: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let parts = Parts {
        books: BookWatcher::load(&cfg.prices.path)?,
        store: Store::new(&cfg.clickhouse),
        metrics: Metrics::new(),
    };
    if !cfg.ingest.metrics_listen.is_empty() {
        let (listen, m) = (cfg.ingest.metrics_listen.clone(), parts.metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listen, m).await {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
    }
    // The topic may not exist yet (no gateway has published): created as the gateway
    // creates it, so that ingest can start first. Checked once; an unreachable broker is
    // the consumer's to report.
    match crate::kafka::ensure_topic(&cfg.kafka, &cfg.kafka.topic, 4, &[]).await {
        Ok(true) => info!(topic = %cfg.kafka.topic, "created the usage topic (4 partitions)"),
        Ok(false) => {}
        Err(e) => warn!(error = %e, topic = %cfg.kafka.topic, "cannot check the usage topic now"),
    }
    let cfg = cfg.clone();
    Ok(tokio::spawn(async move {
        consumer::run(&cfg, parts, shutdown).await
    }))
}
