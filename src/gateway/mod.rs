//! The gateway: an HTTP reverse proxy in front of OpenAI, Anthropic and Gemini that
//! holds the real provider keys, hands users proxy keys, limits them per key, and turns
//! every request into a usage event (contract v1) on the usage topic — through a local
//! spool, so that no request it served goes unbilled.
//!
//! - `wire`: the providers' formats (paths, bodies, usage, errors);
//! - `proxy`: one request, end to end (its limits are decided by `crate::limits::gate`);
//! - `keyring`: keys as every instance sees them; `spool`: events on their way to Kafka;
//! - `http_ingest`: `POST /v1/usage-events` for gateways that are not ours.
//!
//! What is kept: the event of each request (ids, model, token counts, latency, status,
//! tags) — never prompt or completion text, never a key. Bodies pass through memory only.

pub mod estimate;
pub mod event;
pub mod http_ingest;
pub mod keyring;
pub mod metrics;
pub mod moderation;
pub mod proxy;
pub mod spool;
pub mod wire;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::config::{Config, Secret};
use crate::keys::crypto::{MasterKey, Pseudonyms};
use crate::keys::KeyKind;
use crate::limits::budget::Budgets;
use crate::limits::estimate::Bounds;
use crate::limits::gate::Gate;
use crate::limits::refresh::Refresher;
use crate::limits::shared::SharedStore;
use crate::shutdown::Shutdown;
use crate::store::Store;
use event::GatewayEvent;
use keyring::Keyring;
use spool::Spool;
use wire::{Api, Provider, Refusal};

/// Settings every request reads.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub idle_timeout: Duration,
    pub drain: Duration,
}

/// The providers' base URLs and the platform's keys.
pub struct Upstreams {
    bases: [(Provider, String); 3],
    keys: [(Provider, Option<Secret>); 3],
}

impl Upstreams {
    pub fn from_config(cfg: &crate::config::GatewayConfig) -> anyhow::Result<Self> {
        let one = |p: Provider, u: &crate::config::UpstreamConfig| -> anyhow::Result<_> {
            let base = u.base_url.trim_end_matches('/').to_owned();
            if base.ends_with("/v1") || base.ends_with("/v1beta") {
                tracing::warn!(provider = p.config_name(), "gateway.{}.base_url ends with an API version; the client's path already has it", p.config_name());
            }
            let key = u
                .key()
                .with_context(|| format!("reading gateway.{}.api_key_file", p.config_name()))?;
            Ok(((p, base), (p, key)))
        };
        let (o, ok) = one(Provider::OpenAi, &cfg.openai)?;
        let (a, ak) = one(Provider::Anthropic, &cfg.anthropic)?;
        let (g, gk) = one(Provider::Gemini, &cfg.gemini)?;
        Ok(Self {
            bases: [o, a, g],
            keys: [ok, ak, gk],
        })
    }

    pub fn base(&self, p: Provider) -> &str {
        &self
            .bases
            .iter()
            .find(|(q, _)| *q == p)
            .expect("all providers")
            .1
    }

    pub fn platform_key(&self, p: Provider) -> Option<&Secret> {
        self.keys
            .iter()
            .find(|(q, _)| *q == p)
            .and_then(|(_, k)| k.as_ref())
    }
}

/// Everything the gateway's handlers share.
pub struct Gateway {
    pub settings: Settings,
    pub keys: Arc<Keyring>,
    /// Rate windows and `block` limits: reserve, then settle.
    pub gate: Gate,
    pub spool: Spool,
    pub upstreams: Upstreams,
    pub client: reqwest::Client,
    pub pseudonyms: Pseudonyms,
    /// Institutions whose requests are moderated first.
    pub moderated: HashSet<String>,
    pub metrics: Arc<metrics::Metrics>,
    /// For `/v1/usage-events`: publishing straight to Kafka.
    pub ingest: http_ingest::Publisher,
    /// The price book (reloaded when its files change): reservations and settlements.
    pub book: crate::price::watch::SharedBook,
    pub bounds: Bounds,
}

impl Gateway {
    pub fn book(&self) -> Arc<crate::price::PriceBook> {
        self.book.current()
    }

    /// Keys and limits have been read: requests can be decided.
    pub fn ready(&self) -> bool {
        self.keys.ready() && self.gate.budgets.ready()
    }

    /// Writes an event to the spool (the sender takes it to Kafka).
    pub fn record(&self, event: &GatewayEvent) {
        self.metrics.recorded(event.status.as_str());
        if let Err(e) = self.spool.append(&event.institution_id, &event.to_json()) {
            // The disk failed under us: say so loudly; the request itself was served.
            tracing::error!(error = %e, event_id = %event.event_id, "an event could not be spooled");
        }
    }

    /// The key a request goes upstream with: the institution's own, else the platform's.
    pub fn upstream_key(
        &self,
        institution: &str,
        provider: Provider,
        own: Option<Secret>,
    ) -> Result<Secret, String> {
        match own {
            Some(k) if k.is_empty() => Err(format!(
                "the {} key stored for this institution cannot be used; ask an administrator to set it again",
                provider.config_name()
            )),
            Some(k) => Ok(k),
            None => self.upstreams.platform_key(provider).cloned().ok_or_else(|| {
                tracing::warn!(institution, provider = provider.config_name(), "no provider key configured");
                format!("the gateway has no {} key configured", provider.config_name())
            }),
        }
    }
}

/// An error of a reqwest call without its URL (which may carry a query), with its cause.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

async fn model_request(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let api = match parts.uri.path() {
        "/v1/chat/completions" => Api::ChatCompletions,
        "/v1/responses" => Api::Responses,
        "/v1/embeddings" => Api::Embeddings,
        "/v1/messages" => Api::Messages,
        p => match wire::gemini_model(p) {
            Some((_, stream)) => Api::Gemini { stream },
            None => {
                return Refusal::BadRequest(format!(
                    "unknown path {}",
                    crate::format::log_safe(p, 100)
                ))
                .respond(Provider::OpenAi, HeaderMap::new())
            }
        },
    };
    proxy::handle(gw, api, parts, body).await
}

/// `GET /v1/models`: the provider's list, cut to the models the key may use.
async fn models(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    let provider = Provider::OpenAi;
    if !gw.ready() {
        return Refusal::Unavailable("the gateway is starting".into())
            .respond(provider, HeaderMap::new());
    }
    let Some(presented) = proxy::presented_key(provider, &parts) else {
        return Refusal::Unauthenticated("no API key was given".into())
            .respond(provider, HeaderMap::new());
    };
    let key = match gw
        .keys
        .authenticate(presented, KeyKind::Proxy, chrono::Utc::now())
    {
        Ok(k) => k,
        Err(r) => {
            return Refusal::Unauthenticated(r.to_string()).respond(provider, HeaderMap::new())
        }
    };
    let own = gw.keys.own_key(&key.institution_id, provider);
    let upstream_key = match gw.upstream_key(&key.institution_id, provider, own) {
        Ok(k) => k,
        Err(m) => return Refusal::Unavailable(m).respond(provider, HeaderMap::new()),
    };
    let url = format!("{}/v1/models", gw.upstreams.base(provider));
    let res = gw
        .client
        .get(url)
        .bearer_auth(upstream_key.expose())
        .timeout(gw.settings.idle_timeout)
        .send()
        .await;
    let list: serde_json::Value = match res {
        Ok(r) if r.status().is_success() => match r.json().await {
            Ok(v) => v,
            Err(e) => return Refusal::Upstream(describe(e)).respond(provider, HeaderMap::new()),
        },
        Ok(r) => {
            return Refusal::Upstream(format!("the provider answered {}", r.status()))
                .respond(provider, HeaderMap::new())
        }
        Err(e) => {
            tracing::warn!(error = %describe(e), "listing models");
            return Refusal::Upstream("the model provider could not be reached".into())
                .respond(provider, HeaderMap::new());
        }
    };
    let data: Vec<serde_json::Value> = list["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|m| m["id"].as_str().is_some_and(|id| key.allows(id)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    if gw.ready() {
        "ok\n".into_response()
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(model_request))
        .route("/v1/responses", post(model_request))
        .route("/v1/embeddings", post(model_request))
        .route("/v1/messages", post(model_request))
        .route("/v1beta/models/{call}", post(model_request))
        .route("/v1/models/{call}", post(model_request))
        .route("/v1/models", get(models))
        .route("/v1/usage-events", post(http_ingest::handle))
        .route("/healthz", get(health))
        .fallback(|req: Request| async move {
            Refusal::BadRequest(format!(
                "unknown path {}",
                crate::format::log_safe(req.uri().path(), 100)
            ))
            .respond(Provider::OpenAi, HeaderMap::new())
            .into_response()
        })
        // Bodies are read (and capped) by the handlers themselves.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(gw)
}

/// `tokentally gateway`: serves until `shutdown`, then lets answers in flight finish
/// (up to 30 s) and sends what the spool holds (up to 10 s more).
pub async fn run(cfg: &Config, mut shutdown: Shutdown) -> anyhow::Result<()> {
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
    });
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
        gw.metrics.events_spooled.set(gw.spool.appended() as i64);
        gw.metrics.events_sent.set(gw.spool.sent() as i64);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.wait() => return,
        }
    }
}
