//! `tokentally gateway`: keys, limits, spool and upstreams from the configuration, the
//! tasks that keep them fresh, and the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::routing::get;
use axum::Router;

use crate::config::Config;
use crate::gateway::keyring::Keyring;
use crate::gateway::spool::Spool;
use crate::gateway::{http_ingest, metrics, router, Gateway, Settings, Upstreams};
use crate::keys::crypto::MasterKey;
use crate::limits::budget::Budgets;
use crate::limits::estimate::Bounds;
use crate::limits::gate::Gate;
use crate::limits::refresh::Refresher;
use crate::limits::shared::SharedStore;
use crate::shutdown::Shutdown;
use crate::store::Store;

use super::Running;

/// Serves until `shutdown`, then lets answers in flight finish (up to 30 s) and sends
/// what the spool holds (up to 10 s more).
pub async fn run(cfg: &Config, shutdown: Shutdown) -> anyhow::Result<()> {
    spawn(cfg, shutdown).await?.task.await?
}

/// Starts the gateway on `gateway.listen` (port 0: the system picks one) and returns once
/// it listens; the task ends after `shutdown`, the answers in flight and the spool.
pub async fn spawn(cfg: &Config, shutdown: Shutdown) -> anyhow::Result<Running> {
    let g = &cfg.gateway;
    let master = MasterKey::load(g, true).context("loading the gateway master key")?;
    let store = Store::new(&cfg.clickhouse);
    let spool = Spool::open(&g.spool_dir, g.spool_max_bytes, g.spool_fsync_ms)
        .context("opening the spool")?;
    // Checked in the background: with the broker down the gateway still serves (the
    // events wait in the spool).
    {
        let kafka = cfg.kafka.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::kafka::ensure_topic(&kafka, &kafka.topic, 4, &[]).await {
                tracing::warn!(error = %e, topic = %kafka.topic, "cannot check the usage topic now; events wait in the spool");
            }
        });
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(g.connect_timeout_secs.max(1)))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()
        .context("building the upstream HTTP client")?;
    let roster = crate::people::directory::Roster::new(
        store.clone(),
        crate::people::groups::configured(&cfg.groups)?,
    );
    let keys = Arc::new(Keyring::default());
    if let Err(e) = keys.refresh(&store, &master, &roster).await {
        tracing::warn!(error = %e, "cannot read keys yet; answering 503 until they are read");
    }
    tokio::spawn(keys.clone().keep_fresh(
        store.clone(),
        master.clone(),
        roster.clone(),
        Duration::from_millis(g.keys_refresh_ms.max(100)),
        shutdown.clone(),
    ));
    let metrics = metrics::Metrics::new();
    let watcher = crate::price::watch::BookWatcher::load(&cfg.prices.path)?;
    let current_book = crate::price::watch::SharedBook::new(watcher.current());
    current_book.keep_fresh(watcher, shutdown.clone());
    let instance = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into()),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let budgets = Budgets::new(
        cfg.institutions
            .iter()
            .map(|i| (i.id.clone(), cfg.institution_tz(&i.id)))
            .collect(),
        instance.clone(),
    );
    let shared = shared_store(cfg)?;
    let mut refresher = Refresher::new(
        budgets.clone(),
        store.clone(),
        crate::limits::configured(&cfg.limits)?,
        shared.clone(),
    )
    .with_derived(roster.clone());
    if let Err(e) = refresher.refresh(chrono::Utc::now()).await {
        tracing::warn!(error = %e, "cannot read limits yet; answering 503 until they are read");
    }
    {
        let metrics = metrics.clone();
        tokio::spawn(crate::limits::refresh::keep_fresh(
            refresher,
            Duration::from_millis(g.limits_refresh_ms.max(100)),
            shutdown.clone(),
            move |r| {
                metrics.limits.set(r.budgets.limit_count() as i64);
                metrics.reservations_open.set(r.budgets.open().0 as i64);
                metrics.limits_mode.set(match r.mode() {
                    crate::limits::types::DecisionMode::Shares => 0,
                    crate::limits::types::DecisionMode::Exact => 1,
                    crate::limits::types::DecisionMode::Fallback => 2,
                });
            },
        ));
    }
    let gw = Arc::new(Gateway {
        settings: Settings {
            max_body_bytes: g.max_body_bytes,
            idle_timeout: Duration::from_secs(g.idle_timeout_secs.max(1)),
            drain: Duration::from_secs(g.drain_secs),
        },
        keys: keys.clone(),
        gate: Gate::new(budgets, shared),
        spool: spool.clone(),
        upstreams: Upstreams::from_config(g)?,
        client,
        pseudonyms: master.pseudonyms(),
        moderated: cfg
            .institutions
            .iter()
            .filter(|i| i.moderation)
            .map(|i| i.id.clone())
            .collect(),
        metrics: metrics.clone(),
        ingest: http_ingest::Publisher::new(cfg)?,
        book: current_book,
        bounds: Bounds {
            overhead_tokens: g.reserve_overhead_tokens,
            image_tokens: g.reserve_image_tokens,
            default_output_tokens: g.reserve_default_output_tokens,
        },
        spend_watch: g.spend_watch.then(|| {
            Arc::new(crate::gateway::spend_watch::SpendWatch::new(
                cfg.alerts.spike.clone(),
            ))
        }),
    });
    if let Some(watch) = gw.spend_watch.clone() {
        let raiser = crate::gateway::spend_watch::Raiser {
            cfg: cfg.clone(),
            store: store.clone(),
            shared: gw.gate.shared.clone(),
            notifier: crate::alerts::deliver::Notifier::start(cfg),
            keys: keys.clone(),
            instance: instance.clone(),
            raised: metrics.clone(),
        };
        tokio::spawn(crate::gateway::spend_watch::run(
            watch,
            raiser,
            shutdown.clone(),
        ));
    }
    let (stop_spool, spool_stop_rx) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(spool.clone().run(
        cfg.kafka.clone(),
        cfg.kafka.topic.clone(),
        g.spool_fsync_ms,
        spool_stop_rx,
        Duration::from_secs(10),
    ));
    tokio::spawn(housekeeping(gw.clone(), shutdown.clone()));
    if !g.metrics_listen.is_empty() {
        let listen = g.metrics_listen.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let app = Router::new().route(
                "/metrics",
                get(move || {
                    let m = m.clone();
                    async move { m.encode() }
                }),
            );
            match tokio::net::TcpListener::bind(&listen).await {
                Ok(l) => {
                    let _ = axum::serve(l, app).await;
                }
                Err(e) => tracing::warn!(error = %e, %listen, "gateway metrics not served"),
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(&g.listen)
        .await
        .with_context(|| format!("binding {}", g.listen))?;
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, keys = keys.len(), limits = gw.gate.budgets.limit_count(), %instance, limits_mode = gw.gate.mode().as_str(), "gateway listening");
    let mut shutdown = shutdown;
    let task = tokio::spawn(async move {
        let mut stopping = shutdown.clone();
        // TCP_NODELAY on every client connection: hyper writes a response's head and body
        // separately, and with Nagle's algorithm the second write waited for the client's
        // delayed ACK (measured: +43 ms per request at 200 req/s).
        use axum::serve::ListenerExt as _;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let server = axum::serve(
            listener,
            router(gw.clone()).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stopping.wait().await });
        tokio::select! {
            r = server => r?,
            _ = async {
                shutdown.wait().await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            } => tracing::warn!("answers still in flight after 30 s; stopping anyway"),
        }
        spool.sync();
        let _ = stop_spool.send(true);
        let _ = sender.await;
        tracing::info!(
            spooled = spool.appended(),
            sent = spool.sent(),
            pending_bytes = spool.pending_bytes(),
            "gateway stopped"
        );
        Ok(())
    });
    Ok(Running { addr: bound, task })
}

/// The shared limit store of `[gateway.shared_limits]`, if one is configured.
fn shared_store(cfg: &Config) -> anyhow::Result<Option<Arc<SharedStore>>> {
    let s = &cfg.gateway.shared_limits;
    if s.redis_url.is_empty() {
        return Ok(None);
    }
    let namespace = if s.namespace.is_empty() {
        format!("tokentally:{}", cfg.clickhouse.database)
    } else {
        s.namespace.clone()
    };
    let timeout = Duration::from_millis(s.timeout_ms.max(1));
    let store = SharedStore::new(crate::limits::shared::Settings {
        url: s.redis_url.expose().to_owned(),
        namespace,
        timeout,
        reservation_ttl: Duration::from_secs(s.reservation_ttl_secs.max(2)),
        pending_ttl: Duration::from_secs(s.pending_ttl_secs.max(10)),
        leader_ttl: Duration::from_millis((cfg.gateway.limits_refresh_ms * 3).max(3000)),
    })
    .context("gateway.shared_limits.redis_url")?;
    Ok(Some(store))
}

/// Every 10 s: forget idle rate-limit windows, update gauges.
async fn housekeeping(gw: Arc<Gateway>, mut shutdown: Shutdown) {
    loop {
        gw.gate
            .rate
            .sweep(chrono::Utc::now().timestamp().max(0) as u64);
        gw.metrics
            .spool_pending_bytes
            .set(gw.spool.pending_bytes() as i64);
        gw.metrics.keys.set(gw.keys.len() as i64);
        if let Some(w) = &gw.spend_watch {
            gw.metrics.spend_watched.set(w.len() as i64);
        }
        gw.metrics.events_spooled.set(gw.spool.appended() as i64);
        gw.metrics.events_sent.set(gw.spool.sent() as i64);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.wait() => return,
        }
    }
}
