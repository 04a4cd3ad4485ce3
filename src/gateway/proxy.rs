//! One forwarded request, from the client's key to the usage event: authenticate, check
//! the model, the rate limits, the spool and (optionally) moderation; rewrite the body;
//! call the provider; stream its answer back while watching it for usage; write the
//! event before the answer ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use chrono::Utc;
use futures::StreamExt as _;

use super::event::{GatewayEvent, Origin, Status, Usage};
use super::wire::body::{self, Prepared};
use super::wire::sse::{Piece, Splitter};
use super::wire::usage::{Seen, Tracker, Verdict};
use super::wire::{self, Api, Provider, Refusal};
use super::Gateway;
use crate::domain::Billing;
use crate::keys::{Key, KeyKind, KeyRefusal};
use crate::limits::budget::{Reservation, Who};
use crate::limits::gate::{Decision, Quota, QuotaLine, Subject};
use crate::limits::rate::{openai_duration, Exceeded};
use crate::limits::Amounts;

/// The key the client presented, where its SDK puts it.
pub fn presented_key(provider: Provider, parts: &Parts) -> Option<&str> {
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let bearer = header("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match provider {
        Provider::OpenAi => bearer,
        Provider::Anthropic => header("x-api-key").or(bearer),
        Provider::Gemini => header("x-goog-api-key").or_else(|| {
            parts
                .uri
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("key=")))
        }),
    }
    .filter(|k| !k.is_empty())
}

/// Tags from `x-tokentally-tags: name=value, name=value` (contract bounds).
pub fn parse_tags(headers: &HeaderMap) -> Result<BTreeMap<String, String>, String> {
    use crate::contract::decode::{MAX_TAGS, MAX_TAG_KEY_LEN};
    let mut tags = BTreeMap::new();
    for v in headers.get_all("x-tokentally-tags") {
        let v = v
            .to_str()
            .map_err(|_| "x-tokentally-tags must be ASCII text".to_string())?;
        for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, val) = pair.split_once('=').ok_or_else(|| {
                format!(
                    "x-tokentally-tags: `{}` is not name=value",
                    crate::format::log_safe(pair, 40)
                )
            })?;
            let (k, val) = (k.trim(), val.trim());
            if k.is_empty() || k.len() > MAX_TAG_KEY_LEN || val.len() > crate::domain::MAX_ID_LEN {
                return Err(format!(
                    "x-tokentally-tags: names are 1-{MAX_TAG_KEY_LEN} bytes, values at most {} bytes",
                    crate::domain::MAX_ID_LEN
                ));
            }
            tags.insert(k.to_owned(), val.to_owned());
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(format!("x-tokentally-tags: at most {MAX_TAGS} tags"));
    }
    Ok(tags)
}

/// The tag `group` names the group of a member's key at the time of the request (what
/// dashboards, the People page and the usage CSV group spend by — the cost centre an
/// institution charges back): set by the gateway, over whatever the client sent. Other
/// keys keep a client's `group` tag as sent.
pub fn with_group(
    mut tags: BTreeMap<String, String>,
    group: Option<&str>,
) -> Result<BTreeMap<String, String>, String> {
    use crate::contract::{GROUP_TAG, MAX_TAGS};
    let Some(group) = group.filter(|g| !g.is_empty()) else {
        return Ok(tags);
    };
    tags.insert(GROUP_TAG.to_owned(), group.to_owned());
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "x-tokentally-tags: at most {} tags with a member's key (the gateway adds `{GROUP_TAG}`)",
            MAX_TAGS - 1
        ));
    }
    Ok(tags)
}

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the tightest limit of
/// each kind (a key's per-minute limit, or a requests/tokens limit's period), as
/// OpenAI names them; and `x-tokentally-budget-remaining` for USD.
fn quota_headers(q: &Quota, h: &mut HeaderMap) {
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    let lines: [(Option<QuotaLine>, [&'static str; 3]); 2] = [
        (
            q.requests,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        ),
        (
            q.tokens,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ),
    ];
    for (line, [limit, remaining, reset]) in lines {
        if let Some(l) = line {
            put(limit, l.limit.to_string());
            put(remaining, l.remaining.to_string());
            put(reset, openai_duration(l.reset));
        }
    }
    budget_header(q.usd, h);
}

fn retry_headers(e: &Exceeded, h: &mut HeaderMap) {
    let s = &e.standing;
    let mut q = Quota::default();
    if s.rpm > 0 {
        q.requests = Some(QuotaLine {
            limit: u64::from(s.rpm),
            remaining: s.requests_left,
            reset: s.requests_reset,
        });
    }
    if s.tpm > 0 {
        q.tokens = Some(QuotaLine {
            limit: s.tpm,
            remaining: s.tokens_left,
            reset: s.tokens_reset,
        });
    }
    quota_headers(&q, h);
    let secs = e.retry_after.as_secs().max(1);
    h.insert("retry-after", HeaderValue::from(secs));
    h.insert("retry-after-ms", HeaderValue::from(secs * 1000));
}

/// Everything about a request that its event and its relay need.
struct Request {
    api: Api,
    origin: Origin,
    key: Arc<Key>,
    model: String,
    started: Instant,
    /// The request's hold on its limits (released if dropped unsettled).
    reservation: Option<Reservation>,
}

impl Request {
    fn event(
        &self,
        model: &str,
        tier: Option<&str>,
        status: Status,
        usage: Usage,
        upstream_status: u16,
    ) -> GatewayEvent {
        GatewayEvent::new(
            &self.origin,
            model,
            tier,
            status,
            self.started.elapsed().as_millis() as u64,
            usage,
            upstream_status,
        )
    }
}

/// Handles one model request of `api`.
pub async fn handle(gw: Arc<Gateway>, api: Api, parts: Parts, body: Body) -> Response {
    let started = Instant::now();
    let request_id = uuid::Uuid::now_v7().to_string();
    let provider = api.provider();
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("x-tokentally-request-id", v);
    }
    if !gw.ready() {
        return Refusal::Unavailable("the gateway is starting; try again in a moment".into())
            .respond(provider, headers);
    }
    let Some(presented) = presented_key(provider, &parts) else {
        return Refusal::Unauthenticated("no API key was given".into()).respond(provider, headers);
    };
    let now = Utc::now();
    // A paused key (spend-spike brake) goes on until its model is known: its refusal is
    // recorded as an event of that key, so the institution sees what the brake stopped.
    let (key, paused) = match gw.keys.authenticate(presented, KeyKind::Proxy, now) {
        Ok(k) => (k, false),
        Err(KeyRefusal::Held) => match gw.keys.paused(presented, KeyKind::Proxy, now) {
            Some(k) => (k, true),
            None => {
                gw.metrics.refused(KeyRefusal::Held.as_label());
                return Refusal::Unauthenticated(KeyRefusal::Held.to_string())
                    .respond(provider, headers);
            }
        },
        Err(r) => {
            gw.metrics.refused(r.as_label());
            return Refusal::Unauthenticated(r.to_string()).respond(provider, headers);
        }
    };
    let bytes = match axum::body::to_bytes(body, gw.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return Refusal::TooLarge(gw.settings.max_body_bytes).respond(provider, headers);
        }
    };
    let tags = match parse_tags(&parts.headers)
        .and_then(|t| with_group(t, key.owner.as_ref().map(|o| o.group.as_str())))
    {
        Ok(t) => t,
        Err(m) => return Refusal::BadRequest(m).respond(provider, headers),
    };
    let end_user = gw.pseudonyms.id(&key.institution_id, &key.user_id);
    let prepared = match body::prepare(api, &bytes, &end_user) {
        Ok(p) => p,
        Err(m) => return Refusal::BadRequest(m).respond(provider, headers),
    };
    let model = match (&prepared.model, api) {
        (Some(m), _) => m.clone(),
        (None, Api::Gemini { .. }) => match wire::gemini_model(parts.uri.path()) {
            Some((m, _)) => m.to_owned(),
            None => {
                return Refusal::BadRequest("no model in the path".into())
                    .respond(provider, headers)
            }
        },
        (None, _) => unreachable!("prepare requires a model for every other API"),
    };
    let own_key = gw.keys.own_key(&key.institution_id, provider);
    let mut req = Request {
        api,
        origin: Origin {
            request_id,
            occurred_at: now,
            institution_id: key.institution_id.clone(),
            user_id: key.user_id.clone(),
            api_key_id: key.key_id.clone(),
            provider: provider.event_name(),
            endpoint: api.endpoint(),
            tags,
            billing: if own_key.is_some() {
                Billing::Byok
            } else {
                Billing::Platform
            },
        },
        key,
        model,
        started,
        reservation: None,
    };

    if paused {
        gw.metrics.refused(KeyRefusal::Held.as_label());
        gw.record(&req.event(&req.model, None, Status::RejectedPaused, Usage::None, 0));
        return Refusal::Unauthenticated(KeyRefusal::Held.to_string()).respond(provider, headers);
    }
    if !req.key.allows(&req.model) {
        gw.record(&req.event(&req.model, None, Status::RejectedModel, Usage::None, 0));
        return Refusal::ModelNotAllowed(req.model.clone()).respond(provider, headers);
    }
    match admit(&gw, &req, api, &bytes, &prepared, now).await {
        Decision::Admitted { reservation, quota } => {
            quota_headers(&quota, &mut headers);
            req.reservation = reservation;
        }
        Decision::RateLimited(e) => {
            retry_headers(&e, &mut headers);
            gw.record(&req.event(&req.model, None, Status::RejectedRateLimit, Usage::None, 0));
            let message = format!(
                "Rate limit reached for this API key on {} per minute: limit {}. Try again in {} s.",
                e.what,
                e.limit,
                e.retry_after.as_secs().max(1)
            );
            let kind = if e.what == "requests" {
                "requests"
            } else {
                "tokens"
            };
            return Refusal::RateLimited { message, kind }.respond(provider, headers);
        }
        Decision::Refused(b) => {
            budget_header(b.remaining_usd, &mut headers);
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
            if let Ok(v) = HeaderValue::from_str(&b.limit.id()) {
                headers.insert("x-tokentally-limit", v);
            }
            gw.metrics.refused("limit");
            gw.record(&req.event(&req.model, None, Status::RejectedBudget, Usage::None, 0));
            let message = b.message(gw.gate.budgets.zone(&req.key.institution_id));
            return Refusal::OverLimit(message).respond(provider, headers);
        }
    }
    if let Err(e) = gw.spool.has_room() {
        tracing::error!(error = %e, "refusing requests: the spool is full (is Kafka reachable?)");
        return Refusal::Unavailable(
            "usage cannot be recorded right now; the request was not sent".into(),
        )
        .respond(provider, headers);
    }
    let upstream_key = match gw.upstream_key(&req.key.institution_id, provider, own_key) {
        Ok(k) => k,
        Err(m) => return Refusal::Unavailable(m).respond(provider, headers),
    };
    if gw.moderated.contains(&req.key.institution_id) {
        match super::moderation::check(&gw, api, &bytes).await {
            Ok(false) => {}
            Ok(true) => {
                gw.record(&req.event(&req.model, None, Status::BlockedModeration, Usage::None, 0));
                return Refusal::Flagged.respond(provider, headers);
            }
            Err(m) => {
                tracing::warn!(error = %m, "moderation check failed; refusing (fail closed)");
                return Refusal::Unavailable(
                    "the moderation check is unavailable; the request was not sent".into(),
                )
                .respond(provider, headers);
            }
        }
    }
    forward(gw, req, parts, bytes, prepared, upstream_key, headers).await
}

/// Decides `req` against its key's rate limits and its `block` limits: reserves its
/// worst case, or refuses it.
async fn admit(
    gw: &Gateway,
    req: &Request,
    api: Api,
    body: &[u8],
    prepared: &Prepared,
    now: chrono::DateTime<Utc>,
) -> Decision {
    let subject = Subject {
        who: Who {
            institution: &req.key.institution_id,
            user: &req.key.user_id,
            key: &req.key.key_id,
        },
        rpm: req.key.rpm,
        tpm: req.key.tpm,
    };
    let started = Instant::now();
    let book = gw.book();
    let ask = || {
        crate::limits::estimate::worst_case(
            &book,
            &gw.bounds,
            &crate::limits::estimate::Request {
                provider: api.provider().event_name(),
                model: &req.model,
                body,
                max_output_tokens: prepared.max_output_tokens,
                choices: prepared.choices,
                writes_output: !matches!(api, Api::Embeddings),
            },
            now,
        )
    };
    let decided = gw.gate.admit(&subject, ask, now).await;
    gw.metrics
        .admission_seconds
        .observe(started.elapsed().as_secs_f64());
    decided
}

/// `x-tokentally-budget-remaining`: USD left of the tightest USD limit.
fn budget_header(remaining: Option<rust_decimal::Decimal>, h: &mut HeaderMap) {
    if let Some(r) = remaining {
        let r = r
            .round_dp_with_strategy(6, rust_decimal::RoundingStrategy::ToZero)
            .normalize();
        if let Ok(v) = HeaderValue::from_str(&r.to_string()) {
            h.insert("x-tokentally-budget-remaining", v);
        }
    }
}

/// The upstream URL: the provider's base, the client's path and query (minus a Gemini
/// `key=`).
fn upstream_url(base: &str, parts: &Parts) -> String {
    let mut url = format!("{base}{}", parts.uri.path());
    if let Some(q) = parts.uri.query() {
        let kept: Vec<&str> = q.split('&').filter(|kv| !kv.starts_with("key=")).collect();
        if !kept.is_empty() {
            url.push('?');
            url.push_str(&kept.join("&"));
        }
    }
    url
}

/// Calls the provider and relays its answer. The call runs in a task of its own: a
/// client that hangs up while waiting does not cancel a request the provider may already
/// be working (and billing) on; its event is still written.
async fn forward(
    gw: Arc<Gateway>,
    req: Request,
    parts: Parts,
    original: Bytes,
    prepared: Prepared,
    upstream_key: crate::config::Secret,
    headers: HeaderMap,
) -> Response {
    let provider = req.api.provider();
    let (head_tx, head_rx) = tokio::sync::oneshot::channel::<Response>();
    tokio::spawn(call(
        gw,
        req,
        parts,
        original,
        prepared,
        upstream_key,
        headers,
        head_tx,
    ));
    head_rx.await.unwrap_or_else(|_| {
        Refusal::Upstream("the gateway failed while calling the provider".into())
            .respond(provider, HeaderMap::new())
    })
}

#[allow(clippy::too_many_arguments)]
async fn call(
    gw: Arc<Gateway>,
    req: Request,
    parts: Parts,
    original: Bytes,
    prepared: Prepared,
    upstream_key: crate::config::Secret,
    mut headers: HeaderMap,
    head: tokio::sync::oneshot::Sender<Response>,
) {
    let provider = req.api.provider();
    let base = gw.upstreams.base(provider);
    let mut up = gw
        .client
        .request(parts.method.clone(), upstream_url(base, &parts));
    for (name, value) in &parts.headers {
        if !wire::is_request_header_dropped(name.as_str()) {
            up = up.header(name, value);
        }
    }
    up = match provider {
        Provider::OpenAi => up.bearer_auth(upstream_key.expose()),
        Provider::Anthropic => up.header("x-api-key", upstream_key.expose()),
        Provider::Gemini => up.header("x-goog-api-key", upstream_key.expose()),
    };
    up = up
        .header("accept-encoding", "identity")
        .header("content-type", "application/json")
        .body(prepared.body);
    let res = match tokio::time::timeout(gw.settings.idle_timeout, up.send()).await {
        Ok(Ok(r)) => r,
        failed => {
            let message = match failed {
                Ok(Err(e)) => {
                    tracing::warn!(provider = provider.config_name(), error = %crate::format::log_safe(&super::describe(e), 200), "upstream unreachable");
                    "the model provider could not be reached"
                }
                _ => "the model provider did not answer in time",
            };
            gw.record(&req.event(
                &req.model,
                None,
                Status::UpstreamUnreachable,
                Usage::None,
                0,
            ));
            let _ = head.send(Refusal::Upstream(message.into()).respond(provider, headers));
            return;
        }
    };
    let status = res.status();
    let is_sse = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    let content_length = res.content_length();
    for (name, value) in res.headers() {
        let n = name.as_str();
        if wire::is_response_header_dropped(n)
            || n.starts_with("x-ratelimit-")
            || (is_sse && n == "content-length")
        {
            continue;
        }
        if !headers.contains_key(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let mut response = Response::new(Body::from_stream(stream_of(rx)));
    *response.status_mut() =
        StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    *response.headers_mut() = headers;
    // A client that has gone shows up as a failed send in the relay.
    let _ = head.send(response);
    let strip = req.api == Api::ChatCompletions && prepared.stream && !prepared.client_wants_usage;
    let relay = Relay {
        gw,
        tracker: Tracker::new(req.api, strip),
        req,
        request_body: original,
        status,
        is_sse,
        content_length: if is_sse { None } else { content_length },
    };
    relay.run(res, tx).await;
}

fn stream_of(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

struct Relay {
    gw: Arc<Gateway>,
    tracker: Tracker,
    req: Request,
    request_body: Bytes,
    status: reqwest::StatusCode,
    is_sse: bool,
    content_length: Option<u64>,
}

impl Relay {
    /// Passes the provider's answer on, watching it for usage; keeps reading (for at
    /// most `drain`) after the client has gone; writes the event; ends the answer.
    async fn run(
        mut self,
        res: reqwest::Response,
        tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) {
        let idle = self.gw.settings.idle_timeout;
        let drain = self.gw.settings.drain;
        let mut stream = res.bytes_stream();
        let mut splitter = Splitter::default();
        let mut client_gone_at: Option<Instant> = None;
        let mut broken = false;
        let mut received: u64 = 0;
        // A plain body's last bytes wait until the event is written: a client holding
        // the whole answer always has its event.
        let mut held: Option<Bytes> = None;
        loop {
            let wait = match client_gone_at {
                Some(t) => drain.saturating_sub(t.elapsed()).min(idle),
                None => idle,
            };
            if wait.is_zero() {
                break;
            }
            let chunk = match tokio::time::timeout(wait, stream.next()).await {
                Ok(Some(Ok(c))) => c,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %crate::format::log_safe(&super::describe(e), 200), "upstream answer broke off");
                    broken = true;
                    break;
                }
                Err(_) => {
                    broken = client_gone_at.is_none();
                    break;
                }
            };
            received += chunk.len() as u64;
            let out: Vec<Bytes> = if self.is_sse {
                splitter
                    .push(&chunk)
                    .into_iter()
                    .filter_map(|p| match p {
                        Piece::Event(e) => match self.tracker.event(&e) {
                            Verdict::Forward => Some(Bytes::from(e)),
                            Verdict::Replace(b) => Some(Bytes::from(b)),
                            Verdict::Drop => None,
                        },
                        Piece::Raw(b) => Some(Bytes::from(b)),
                    })
                    .collect()
            } else {
                self.tracker.body(&chunk);
                vec![chunk]
            };
            if client_gone_at.is_some() {
                continue;
            }
            for b in out {
                if !self.is_sse && self.content_length == Some(received) {
                    held = Some(b);
                    continue;
                }
                if tx.send(Ok(b)).await.is_err() {
                    client_gone_at = Some(Instant::now());
                    break;
                }
            }
        }
        if let Some(rest) = splitter.finish() {
            if client_gone_at.is_none() && tx.send(Ok(Bytes::from(rest))).await.is_err() {
                client_gone_at = Some(Instant::now());
            }
        }
        let seen = std::mem::replace(&mut self.tracker, Tracker::new(self.req.api, false)).finish();
        let event = self.event(&seen, client_gone_at.is_some(), broken);
        self.settle(&event, &seen);
        self.gw.record(&event);
        if let Some(b) = held {
            let _ = tx.send(Ok(b)).await;
        }
        if broken && client_gone_at.is_none() {
            // The provider's answer broke off: break the client's too, rather than end it
            // as if it were complete.
            let _ = tx
                .send(Err(std::io::Error::other(
                    "the provider's answer broke off",
                )))
                .await;
        }
    }

    /// Replaces the request's reservation by its priced usage, and adds its cost to its
    /// key's spend rate.
    fn settle(&mut self, event: &GatewayEvent, seen: &Seen) {
        let reservation = self.req.reservation.take();
        if reservation.is_none() && self.gw.spend_watch.is_none() {
            return;
        }
        let counts = event.token_counts();
        let priced = crate::price::price_usage(
            &self.gw.book(),
            self.req.origin.provider,
            &event.model,
            seen.service_tier.as_deref().unwrap_or(""),
            self.req.origin.occurred_at.date_naive(),
            &counts,
            true,
        );
        let usd = match (priced, &reservation) {
            (crate::price::Pricing::Priced(p), _) => p.cost,
            // The provider answered with a model the book does not price: count what
            // was reserved rather than nothing.
            (crate::price::Pricing::Unpriced, Some(r)) => r.reserved().usd,
            (crate::price::Pricing::Unpriced, None) => rust_decimal::Decimal::ZERO,
        };
        if let Some(w) = &self.gw.spend_watch {
            w.add(
                &self.req.key.institution_id,
                &self.req.key.key_id,
                usd,
                Utc::now(),
            );
        }
        let Some(r) = reservation else {
            return;
        };
        r.settle(
            &event.event_id,
            Amounts {
                usd,
                requests: 1,
                tokens: counts.prompt_total() + counts.output,
            },
        );
    }

    fn event(&self, seen: &Seen, client_gone: bool, broken: bool) -> GatewayEvent {
        let req = &self.req;
        let model = seen.model.clone().unwrap_or_else(|| req.model.clone());
        let ok_status = self.status.is_success();
        let streamed = self.is_sse || matches!(req.api, Api::Gemini { stream: true });
        let complete = seen.complete && !broken;
        let status = if !ok_status {
            Status::UpstreamError
        } else if client_gone {
            // The provider's usage (when it finished) is still recorded.
            Status::ClientCancelled
        } else if complete || (!streamed && !broken && seen.usage.is_some()) {
            Status::Ok
        } else {
            // The answer broke off or a stream never reached its end.
            Status::UpstreamError
        };
        let usage = match &seen.usage {
            Some(u) => Usage::Provider(u.clone()),
            None if ok_status => Usage::Estimated(super::estimate::usage(
                req.api,
                &model,
                &self.request_body,
                &seen.text,
                seen.text_overflow,
            )),
            None => Usage::None,
        };
        let event = req.event(
            &model,
            seen.service_tier.as_deref(),
            status,
            usage,
            self.status.as_u16(),
        );
        let counts = event.token_counts();
        let tokens = counts.prompt_total() + counts.output;
        self.gw
            .gate
            .add_tokens(&req.key.key_id, req.key.tpm, tokens, Utc::now());
        self.gw.metrics.add_tokens(tokens);
        event
    }
}

impl KeyRefusal {
    fn as_label(self) -> &'static str {
        match self {
            KeyRefusal::Unknown => "unknown_key",
            KeyRefusal::Revoked => "revoked_key",
            KeyRefusal::Expired => "expired_key",
            KeyRefusal::Suspended => "suspended_owner",
            KeyRefusal::Idle { .. } => "idle_owner",
            KeyRefusal::Held => "held_key",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::decode::MAX_TAGS;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-tokentally-tags", HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_members_key_carries_its_group_over_what_the_client_says() {
        let sent = parse_tags(&headers("course=inf100, group=staff")).unwrap();
        let t = with_group(sent.clone(), Some("students")).unwrap();
        assert_eq!(t.get("group").map(String::as_str), Some("students"));
        assert_eq!(t.get("course").map(String::as_str), Some("inf100"));
        // Other keys keep the client's tag; a member without a group adds nothing.
        assert_eq!(with_group(sent.clone(), None).unwrap(), sent);
        assert_eq!(with_group(sent.clone(), Some("")).unwrap(), sent);
    }

    #[test]
    fn the_group_tag_never_takes_a_message_past_the_contracts_bound() {
        let full: Vec<String> = (0..MAX_TAGS).map(|i| format!("t{i}=v")).collect();
        let full = parse_tags(&headers(&full.join(","))).unwrap();
        assert_eq!(full.len(), MAX_TAGS);
        let err = with_group(full.clone(), Some("students")).unwrap_err();
        assert!(err.contains(&format!("at most {}", MAX_TAGS - 1)), "{err}");
        // One fewer fits, with the group.
        let mut fewer = full;
        fewer.pop_first();
        assert_eq!(with_group(fewer, Some("students")).unwrap().len(), MAX_TAGS);
    }
}
