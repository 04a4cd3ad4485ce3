//! `POST /v1/usage-events`: usage from gateways that are not ours, over HTTP.
//!
//! Accepted bodies:
//! - a JSON array (or one object) of contract-v1 events (`application/json`);
//! - a CloudEvents 1.0 batch (`application/cloudevents-batch+json`) or one structured
//!   CloudEvent (`application/cloudevents+json`) whose `data` is a contract-v1 event
//!   (`id` and `time` fill `event_id` and `occurred_at` when `data` lacks them);
//! - LiteLLM's generic logger payload: `StandardLoggingPayload` objects, as a JSON array
//!   (`log_format: json_array`, its default), one per line (`ndjson`) or one (`single`).
//!
//! Authenticated by an ingest token (`tokentally keys create-ingest`), bound to one
//! institution (every event must be that institution's; LiteLLM payloads without a team
//! are attributed to it) or to any. Every item is validated as ingest would validate it;
//! the valid ones are produced to the usage topic and the answer is `202` only once Kafka
//! has acknowledged all of them. The body lists every item's outcome.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Map, Value};

use super::Gateway;
use crate::config::Config;
use crate::contract::decode::{decode, DecodeOptions};
use crate::keys::KeyKind;

/// Most items one request may carry.
pub const MAX_ITEMS: usize = 10_000;

/// Produces accepted events straight to Kafka.
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    max_future_skew: chrono::Duration,
}

impl Publisher {
    pub fn new(cfg: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            producer: crate::kafka::client_config(&cfg.kafka)
                .set("message.timeout.ms", "10000")
                .set("linger.ms", "5")
                .set("acks", "all")
                .create()?,
            topic: cfg.kafka.topic.clone(),
            max_future_skew: chrono::Duration::seconds(cfg.ingest.max_future_skew_secs),
        })
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": "invalid_request_error"}})),
    )
        .into_response()
}

/// The body's items, by its content type.
pub fn items(content_type: &str, body: &[u8]) -> Result<Vec<Item>, String> {
    let ct = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let values: Vec<Value> = if ct == "application/x-ndjson" {
        ndjson(body)?
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(a)) => a,
            Ok(v @ Value::Object(_)) => vec![v],
            Ok(_) => return Err("the body must be a JSON array or object".into()),
            // LiteLLM's `ndjson` log format, sent as application/json.
            Err(_) if body.contains(&b'\n') => ndjson(body)?,
            Err(e) => return Err(format!("the body is not JSON: {e}")),
        }
    };
    if values.len() > MAX_ITEMS {
        return Err(format!("at most {MAX_ITEMS} events per request"));
    }
    let cloud = ct.starts_with("application/cloudevents");
    Ok(values
        .into_iter()
        .map(|v| {
            if cloud {
                Item::Cloud(v)
            } else if is_litellm(&v) {
                Item::LiteLlm(v)
            } else {
                Item::Contract(v)
            }
        })
        .collect())
}

fn ndjson(body: &[u8]) -> Result<Vec<Value>, String> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
        .enumerate()
        .map(|(i, l)| serde_json::from_slice(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

/// One item of a body, by its kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Contract(Value),
    Cloud(Value),
    LiteLlm(Value),
}

/// A LiteLLM `StandardLoggingPayload`: it has no `event_id` and carries LiteLLM's own
/// fields.
fn is_litellm(v: &Value) -> bool {
    v.get("event_id").is_none()
        && (v.get("call_type").is_some() || v.get("startTime").is_some())
        && v.get("model").is_some()
}

/// An item as a contract-v1 event (not yet validated).
pub fn to_contract(item: Item, token_institution: Option<&str>) -> Result<Value, String> {
    let mut v = match item {
        Item::Contract(v) => v,
        Item::Cloud(v) => from_cloud_event(v)?,
        Item::LiteLlm(v) => from_litellm(&v)?,
    };
    let Value::Object(obj) = &mut v else {
        return Err("an event must be a JSON object".into());
    };
    match (token_institution, obj.get("institution_id")) {
        (Some(own), None) => {
            obj.insert("institution_id".into(), Value::String(own.into()));
        }
        (Some(own), Some(Value::String(i))) if i != own => {
            return Err(format!(
                "this token may only send events of institution `{own}`"
            ))
        }
        _ => {}
    }
    Ok(v)
}

fn from_cloud_event(v: Value) -> Result<Value, String> {
    let Value::Object(ce) = v else {
        return Err("a CloudEvent must be a JSON object".into());
    };
    if ce.get("specversion").and_then(Value::as_str) != Some("1.0") {
        return Err("CloudEvents `specversion` must be \"1.0\"".into());
    }
    let mut data = match ce.get("data") {
        Some(Value::Object(d)) => d.clone(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(d)) => d,
            _ => return Err("CloudEvent `data` must be a contract-v1 event object".into()),
        },
        _ => return Err("CloudEvent `data` must be a contract-v1 event object".into()),
    };
    if !data.contains_key("event_id") {
        if let Some(id) = ce.get("id") {
            data.insert("event_id".into(), id.clone());
        }
    }
    if !data.contains_key("occurred_at") {
        if let Some(t) = ce.get("time") {
            data.insert("occurred_at".into(), t.clone());
        }
    }
    Ok(Value::Object(data))
}

fn epoch_to_rfc3339(v: &Value) -> Option<String> {
    let secs = v.as_f64()?;
    if !(0.0..4.0e9).contains(&secs) {
        return None;
    }
    let ms = (secs * 1000.0).round() as i64;
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

/// LiteLLM's `StandardLoggingPayload` → contract v1. Team → institution, user → user,
/// key alias (or its hash) → api_key_id, `custom_llm_provider` (or the model's prefix)
/// → provider, `metadata.usage_object` (or the prompt/completion totals) → usage;
/// `request_tags` → tags. Messages and responses are never read.
pub fn from_litellm(v: &Value) -> Result<Value, String> {
    let id = str_at(v, &["id"]).ok_or("LiteLLM payload without `id`")?;
    let start = v
        .get("startTime")
        .and_then(epoch_to_rfc3339)
        .ok_or("LiteLLM payload without a valid `startTime`")?;
    let raw_model = str_at(v, &["model"]).ok_or("LiteLLM payload without `model`")?;
    let (prefix, model) = match raw_model.split_once('/') {
        Some((p, m)) => (Some(p), m),
        None => (None, raw_model),
    };
    let provider = str_at(v, &["custom_llm_provider"])
        .or(prefix)
        .ok_or("LiteLLM payload without `custom_llm_provider`")?;
    let mut e = Map::new();
    e.insert("schema_version".into(), json!(1));
    e.insert("event_id".into(), json!(id));
    e.insert("occurred_at".into(), json!(start));
    if let Some(team) = str_at(v, &["metadata", "user_api_key_team_id"]) {
        e.insert("institution_id".into(), json!(team));
    }
    if let Some(u) = str_at(v, &["metadata", "user_api_key_user_id"]).or(str_at(v, &["end_user"])) {
        e.insert("user_id".into(), json!(u));
    }
    if let Some(k) = str_at(v, &["metadata", "user_api_key_alias"])
        .or_else(|| str_at(v, &["metadata", "user_api_key_hash"]).map(|h| &h[..h.len().min(16)]))
    {
        e.insert("api_key_id".into(), json!(k));
    }
    e.insert("provider".into(), json!(provider));
    e.insert("model".into(), json!(model));
    let endpoint = match str_at(v, &["call_type"]).unwrap_or_default() {
        "completion" | "acompletion" => "chat.completions",
        "embedding" | "aembedding" => "embeddings",
        "responses" | "aresponses" => "responses",
        "anthropic_messages" => "messages",
        other => other,
    };
    if !endpoint.is_empty() {
        e.insert("endpoint".into(), json!(endpoint));
    }
    e.insert(
        "status".into(),
        json!(if str_at(v, &["status"]) == Some("failure") {
            "upstream_error"
        } else {
            "ok"
        }),
    );
    if let (Some(s), Some(t)) = (
        v.get("startTime").and_then(Value::as_f64),
        v.get("endTime").and_then(Value::as_f64),
    ) {
        if t >= s && t - s < 86_400.0 {
            e.insert(
                "latency_ms".into(),
                json!(((t - s) * 1000.0).round() as u64),
            );
        }
    }
    e.insert("usage".into(), litellm_usage(v)?);
    if let Some(tags) = v.get("request_tags").and_then(Value::as_array) {
        let mut t = Map::new();
        for tag in tags.iter().filter_map(Value::as_str) {
            let (k, val) = tag
                .split_once(['=', ':'])
                .map_or((tag, "true"), |(k, val)| (k, val));
            t.insert(k.trim().into(), json!(val.trim()));
        }
        if !t.is_empty() {
            e.insert("tags".into(), Value::Object(t));
        }
    }
    Ok(Value::Object(e))
}

/// Canonical usage from LiteLLM's OpenAI-shaped `usage_object`, whose prompt total
/// includes cache reads (`prompt_tokens_details.cached_tokens`) and, for Anthropic,
/// cache writes (`cache_creation_input_tokens`).
fn litellm_usage(v: &Value) -> Result<Value, String> {
    let n = |u: &Value, path: &[&str]| -> Result<u64, String> {
        let mut cur = u;
        for p in path {
            match cur.get(p) {
                Some(c) => cur = c,
                None => return Ok(0),
            }
        }
        if cur.is_null() {
            return Ok(0);
        }
        cur.as_u64()
            .ok_or_else(|| format!("LiteLLM usage `{}` is not a token count", path.join(".")))
    };
    let u = v
        .get("metadata")
        .and_then(|m| m.get("usage_object"))
        .filter(|u| u.is_object())
        .unwrap_or(v);
    let prompt = n(u, &["prompt_tokens"])?;
    let completion = n(u, &["completion_tokens"])?;
    let cached =
        n(u, &["prompt_tokens_details", "cached_tokens"])?.max(n(u, &["cache_read_input_tokens"])?);
    let created = n(u, &["cache_creation_input_tokens"])?;
    let reasoning = n(u, &["completion_tokens_details", "reasoning_tokens"])?;
    let input = prompt
        .checked_sub(cached + created)
        .ok_or("LiteLLM usage: cached tokens exceed prompt tokens")?;
    Ok(json!({
        "input_tokens": input,
        "cache_read_tokens": cached,
        "cache_write_tokens": created,
        "output_tokens": completion,
        "reasoning_tokens": reasoning.min(completion),
    }))
}

/// The handler.
pub async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if !gw.keys.ready() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the gateway is starting");
    }
    let token = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return error(
            StatusCode::UNAUTHORIZED,
            "an ingest token is required (Authorization: Bearer …)",
        );
    };
    let key = match gw.keys.authenticate(token, KeyKind::Ingest, Utc::now()) {
        Ok(k) => k,
        Err(r) => return error(StatusCode::UNAUTHORIZED, &r.to_string()),
    };
    let bytes = match axum::body::to_bytes(body, gw.settings.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large"),
    };
    let ct = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let items = match items(ct, &bytes) {
        Ok(i) => i,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    let bound = (!key.institution_id.is_empty()).then_some(key.institution_id.as_str());
    let opts = DecodeOptions {
        now: Utc::now(),
        max_future_skew: gw.ingest.max_future_skew,
    };
    let mut results: Vec<Value> = Vec::with_capacity(items.len());
    let mut valid: Vec<(usize, String, String, Vec<u8>)> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let checked = to_contract(item, bound).and_then(|v| {
            let bytes = serde_json::to_vec(&v).map_err(|e| e.to_string())?;
            decode(&bytes, &opts)
                .map(|e| (e, bytes))
                .map_err(|r| format!("{}: {}", r.reason.as_str(), r.detail))
        });
        match checked {
            Ok((event, bytes)) => {
                results.push(
                    json!({"index": i, "status": "accepted", "event_id": event.event_id.as_str()}),
                );
                valid.push((
                    i,
                    event.institution_id.as_str().to_owned(),
                    event.event_id.as_str().to_owned(),
                    bytes,
                ));
            }
            Err(m) => {
                let (code, detail) = m.split_once(": ").unwrap_or(("invalid_field", &m));
                results.push(
                    json!({"index": i, "status": "rejected", "error": code, "detail": detail}),
                );
            }
        }
    }
    let mut deliveries = Vec::with_capacity(valid.len());
    for (i, inst, _, bytes) in &valid {
        let record = FutureRecord::to(&gw.ingest.topic).key(inst).payload(bytes);
        deliveries.push((*i, gw.ingest.producer.send(record, Duration::from_secs(10))));
    }
    let mut failed = 0;
    for (i, d) in deliveries {
        if let Err((e, _)) = d.await {
            failed += 1;
            tracing::warn!(error = %e, "HTTP ingest: Kafka did not take an event");
            results[i] = json!({"index": i, "status": "failed", "error": "kafka_unavailable",
                                "detail": "not stored; send it again (the same event_id never counts twice)"});
        }
    }
    let accepted = valid.len() - failed;
    let rejected = results.len() - valid.len();
    let status = if failed > 0 {
        StatusCode::SERVICE_UNAVAILABLE
    } else if accepted == 0 && rejected > 0 {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::ACCEPTED
    };
    (
        status,
        axum::Json(json!({"accepted": accepted, "rejected": rejected, "failed": failed, "results": results})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn litellm() -> Value {
        json!({
            "id": "chatcmpl-123", "trace_id": "t", "call_type": "acompletion", "stream": false,
            "response_cost": 0.0001, "status": "success", "custom_llm_provider": "anthropic",
            "total_tokens": 130, "prompt_tokens": 100, "completion_tokens": 30,
            "startTime": 1_790_000_000.25, "endTime": 1_790_000_001.5, "completionStartTime": 1_790_000_000.5,
            "model": "claude-haiku-4-5", "model_id": "x", "model_group": "claude", "api_base": "https://api.anthropic.com",
            "metadata": {"user_api_key_hash": "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b",
                         "user_api_key_alias": "course-key", "user_api_key_team_id": "uni-oslo",
                         "user_api_key_user_id": "alice",
                         "usage_object": {"prompt_tokens": 100, "completion_tokens": 30,
                                          "prompt_tokens_details": {"cached_tokens": 20},
                                          "cache_creation_input_tokens": 10}},
            "cache_hit": null, "request_tags": ["course:inf100", "pilot"], "end_user": "bob",
            "messages": [{"role": "user", "content": "SECRET PROMPT"}], "response": {"choices": []}
        })
    }

    #[test]
    fn litellm_payloads_map_to_the_contract() {
        let e = from_litellm(&litellm()).unwrap();
        assert_eq!(e["event_id"], "chatcmpl-123");
        assert_eq!(e["institution_id"], "uni-oslo");
        assert_eq!(e["user_id"], "alice");
        assert_eq!(e["api_key_id"], "course-key");
        assert_eq!(e["provider"], "anthropic");
        assert_eq!(e["model"], "claude-haiku-4-5");
        assert_eq!(e["endpoint"], "chat.completions");
        assert_eq!(e["latency_ms"], 1250);
        assert_eq!(e["occurred_at"], "2026-09-21T14:13:20.250Z");
        assert_eq!(
            e["usage"],
            json!({"input_tokens": 70, "cache_read_tokens": 20, "cache_write_tokens": 10,
                   "output_tokens": 30, "reasoning_tokens": 0})
        );
        assert_eq!(e["tags"], json!({"course": "inf100", "pilot": "true"}));
        // Content is never carried over.
        assert!(!e.to_string().contains("SECRET PROMPT"));
        // A model with a provider prefix and no custom_llm_provider.
        let mut v = litellm();
        v.as_object_mut().unwrap().remove("custom_llm_provider");
        v["model"] = json!("openai/gpt-4o-mini");
        v["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("usage_object");
        let e = from_litellm(&v).unwrap();
        assert_eq!(
            (e["provider"].as_str(), e["model"].as_str()),
            (Some("openai"), Some("gpt-4o-mini"))
        );
        assert_eq!(e["usage"]["input_tokens"], 100);
    }

    #[test]
    fn bodies_are_recognised_by_type_and_shape() {
        let body =
            serde_json::to_vec(&json!([litellm(), {"event_id": "e", "model": "m"}])).unwrap();
        let it = items("application/json", &body).unwrap();
        assert!(matches!(it[0], Item::LiteLlm(_)));
        assert!(matches!(it[1], Item::Contract(_)));
        let nd = format!("{}\n{}\n", litellm(), litellm());
        assert_eq!(items("application/json", nd.as_bytes()).unwrap().len(), 2);
        assert_eq!(
            items("application/x-ndjson", nd.as_bytes()).unwrap().len(),
            2
        );
        let ce = serde_json::to_vec(&json!([{"specversion": "1.0", "id": "c1", "source": "/gw", "type": "io.tokentally.usage.v1",
            "time": "2026-11-01T00:00:00Z", "data": {"institution_id": "i", "provider": "openai", "model": "gpt-4o-mini",
            "usage": {"input_tokens": 1}}}])).unwrap();
        let it = items("application/cloudevents-batch+json; charset=utf-8", &ce).unwrap();
        let v = to_contract(it[0].clone(), None).unwrap();
        assert_eq!(v["event_id"], "c1");
        assert_eq!(v["occurred_at"], "2026-11-01T00:00:00Z");
        assert!(items("application/json", b"3").is_err());
    }

    #[test]
    fn a_bound_token_fills_in_and_enforces_its_institution() {
        let v = json!({"event_id": "e", "model": "m"});
        assert_eq!(
            to_contract(Item::Contract(v.clone()), Some("uni")).unwrap()["institution_id"],
            "uni"
        );
        let other = json!({"event_id": "e", "institution_id": "other"});
        assert!(to_contract(Item::Contract(other.clone()), Some("uni")).is_err());
        assert_eq!(
            to_contract(Item::Contract(other), None).unwrap()["institution_id"],
            "other"
        );
    }
}
