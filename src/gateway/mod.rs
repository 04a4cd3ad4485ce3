//! The gateway: an HTTP reverse proxy in front of OpenAI, Anthropic and Gemini that
//! holds the real provider keys, hands users proxy keys, limits them per key, and turns
//! every request into a usage event (contract v1) on the usage topic — through a local
//! spool, so that no request it served goes unbilled.
//!
//! - `wire`: the providers' formats (paths, bodies, usage, errors);
//! - `proxy`: one request, end to end (its limits are decided by `crate::limits::gate`);
//! - `keyring`: keys as every instance sees them; `spool`: events on their way to Kafka;
//! - `http_ingest`: `POST /v1/usage-events` for gateways that are not ours;
//! - `spend_watch`: each key's spend rate from what this instance settles (fast alerts).
//!
//! Assembled and started by `app::gateway` (the process's composition root).
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
pub mod spend_watch;
pub mod spool;
pub mod wire;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::config::Secret;
use crate::keys::crypto::Pseudonyms;
use crate::keys::KeyKind;
use crate::limits::estimate::Bounds;
use crate::limits::gate::Gate;
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
    /// Per-key spend rates of what this instance settles (`None`: `spend_watch` off).
    pub spend_watch: Option<Arc<spend_watch::SpendWatch>>,
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
