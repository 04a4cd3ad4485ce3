//! `tokentally simulate`: a stand-in for OpenAI, Anthropic and Gemini, for the demo, the
//! tests and the benchmarks. It speaks the three wire formats (streaming included) with
//! realistic usage objects (cached and reasoning tokens), and misbehaves on request.
//!
//! Answers are deterministic: the same request body gets the same answer, so a test can
//! compare what a client got through the gateway with what the simulator sends directly.
//! Token counts are simple and documented: a prompt costs one token per
//! whitespace-separated word of its text plus 3 per message; the answer is `words` words,
//! one token each.
//!
//! Behaviour is chosen per request with the header `x-simulator` (comma-separated):
//! `words=N` (answer length, default 12), `cached=N` (cached prompt tokens),
//! `reasoning=N` (reasoning tokens, for any model), `slow=MS` (pause before each chunk),
//! `truncate=N` (break the connection after N chunks, no usage), `error=STATUS` (answer
//! with that error in the provider's format), `hang` (never answer), `echo` (answer with the prompt's own words).
//!
//! The providers' admin reports of what the simulator served (issue 35), in their API
//! shapes, one bucket per UTC day: OpenAI `GET /v1/organization/usage/completions` and
//! `/usage/embeddings` and `/v1/organization/costs`, Anthropic `GET /v1/organizations/usage_report/messages` and
//! `/v1/organizations/cost_report`. Usage is grouped by model and key (`key_`/`apikey_`
//! and a SHA-256 prefix of the key the request carried); costs are the price book's base
//! rates (`--prices`), per model and token type.
//!
//! `GET /_sim/requests` lists what the last requests carried (path, model, end-user
//! field, which key: a SHA-256 prefix, never the key) — no prompt text;
//! `GET /_sim/stats` counts requests started and answers completed.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8091")]
    pub listen: String,
    /// Keys the simulator accepts (comma-separated); empty accepts any non-empty key.
    #[arg(long, env = "TOKENTALLY_SIMULATOR_KEYS", default_value = "")]
    pub keys: String,
    /// Price book the cost reports are priced with (without it they answer 501).
    #[arg(long, env = "TOKENTALLY_PRICES")]
    pub prices: Option<std::path::PathBuf>,
    /// Most day buckets on one page of a usage or cost report (a client must follow
    /// `next_page` past it).
    #[arg(
        long,
        env = "TOKENTALLY_SIMULATOR_REPORT_PAGE_DAYS",
        default_value_t = 31
    )]
    pub report_page_days: usize,
}

const WORDS: [&str; 16] = [
    "the", "model", "answers", "with", "plain", "words", "so", "that", "tokens", "are", "easy",
    "to", "count", "and", "check", "exactly",
];

/// What one request asked of the simulator.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    words: u64,
    cached: u64,
    reasoning: u64,
    slow_ms: u64,
    truncate: Option<u64>,
    error: Option<u16>,
    hang: bool,
    echo: bool,
}

fn behaviour(headers: &HeaderMap) -> Behaviour {
    let mut b = Behaviour {
        words: 12,
        ..Default::default()
    };
    let spec = headers
        .get("x-simulator")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    for part in spec.split(',').map(str::trim) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let n = v.parse::<u64>().ok();
        match k {
            "words" => b.words = n.unwrap_or(12),
            "cached" => b.cached = n.unwrap_or(0),
            "reasoning" => b.reasoning = n.unwrap_or(0),
            "slow" => b.slow_ms = n.unwrap_or(0),
            "truncate" => b.truncate = n,
            "error" => b.error = n.and_then(|s| u16::try_from(s).ok()),
            "hang" => b.hang = true,
            "echo" => b.echo = true,
            _ => {}
        }
    }
    b
}

/// A record of one request (no content).
#[derive(Debug, Clone, serde::Serialize)]
struct Seen {
    path: String,
    model: String,
    stream: bool,
    include_usage: bool,
    end_user: Option<String>,
    key_sha256: String,
    headers: Vec<String>,
}

/// What the simulator served per day, usage endpoint (`completions`, `embeddings`,
/// `messages`), model and key: tokens and requests, its bill.
type Served =
    BTreeMap<(chrono::NaiveDate, &'static str, String, String), (crate::domain::TokenCounts, u64)>;

#[derive(Default)]
struct Sim {
    keys: Vec<String>,
    book: Option<crate::price::PriceBook>,
    served: Mutex<Served>,
    /// Most day buckets on one report page (`--report-page-days`).
    report_page_days: usize,
    seen: Mutex<VecDeque<Seen>>,
    started: AtomicU64,
    completed: AtomicU64,
}

/// Tokens of the request's input text: words, plus 3 per message.
fn prompt_tokens(body: &Value) -> u64 {
    fn words(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.split_whitespace().count() as u64,
            Value::Array(a) => a.iter().map(words).sum(),
            Value::Object(o) => o
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "role" | "type"))
                .map(|(_, v)| words(v))
                .sum(),
            _ => 0,
        }
    }
    let mut n = 0;
    for f in ["messages", "input", "system", "instructions", "contents"] {
        if let Some(v) = body.get(f) {
            n += words(v);
            n += 3 * v.as_array().map_or(1, |a| a.len() as u64);
        }
    }
    n
}

fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// The request's own words, as the answer (`x-simulator: echo`).
fn echo_words(body: &Value) -> Vec<String> {
    fn collect(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.extend(s.split_whitespace().map(str::to_owned)),
            Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
            Value::Object(o) => o
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "role" | "type"))
                .for_each(|(_, x)| collect(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for f in ["messages", "input", "contents"] {
        collect(&body[f], &mut out);
    }
    out
}

/// The answer's words, chosen by the request.
fn answer(seed: &str, n: u64) -> Vec<String> {
    let h = Sha256::digest(seed.as_bytes());
    (0..n as usize)
        .map(|i| WORDS[(h[i % 32] as usize + i) % WORDS.len()].to_owned())
        .collect()
}

fn is_reasoning_model(model: &str) -> bool {
    model.starts_with('o') || model.starts_with("gpt-5")
}

struct Call {
    model: String,
    id: String,
    words: Vec<String>,
    prompt: u64,
    cached: u64,
    reasoning: u64,
    b: Behaviour,
}

impl Call {
    fn completion(&self) -> u64 {
        self.words.len() as u64 + self.reasoning
    }
}

/// A body whose chunks come with pauses and that may break off.
fn chunked(chunks: Vec<String>, b: &Behaviour, sim: Arc<Sim>) -> Body {
    let slow = Duration::from_millis(b.slow_ms);
    let truncate = b.truncate;
    let stream = futures::stream::unfold(
        (chunks.into_iter().enumerate(), false),
        move |(mut it, done)| {
            let sim = sim.clone();
            async move {
                if done {
                    return None;
                }
                match it.next() {
                    Some((i, c)) => {
                        if truncate.is_some_and(|t| i as u64 >= t) {
                            return Some((
                                Err(std::io::Error::other("simulated truncation")),
                                (it, true),
                            ));
                        }
                        if !slow.is_zero() {
                            tokio::time::sleep(slow).await;
                        }
                        Some((Ok::<_, std::io::Error>(Bytes::from(c)), (it, false)))
                    }
                    None => {
                        sim.completed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
        },
    );
    Body::from_stream(stream)
}

fn sse_response(chunks: Vec<String>, b: &Behaviour, sim: Arc<Sim>) -> Response {
    let mut res = Response::new(chunked(chunks, b, sim));
    res.headers_mut()
        .insert("content-type", "text/event-stream".parse().expect("static"));
    res.headers_mut()
        .insert("cache-control", "no-cache".parse().expect("static"));
    res
}

fn json_response(v: Value, b: &Behaviour, sim: Arc<Sim>) -> Response {
    if b.truncate.is_some() || b.slow_ms > 0 {
        // Sent in pieces so that slowness and truncation apply to plain bodies too.
        let text = v.to_string();
        let pieces: Vec<String> = text
            .as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let mut res = Response::new(chunked(pieces, b, sim));
        res.headers_mut()
            .insert("content-type", "application/json".parse().expect("static"));
        return res;
    }
    sim.completed.fetch_add(1, Ordering::Relaxed);
    (StatusCode::OK, axum::Json(v)).into_response()
}

fn provider_error(path: &str, status: u16) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = if path.starts_with("/v1/messages") {
        json!({"type": "error", "error": {"type": "api_error", "message": format!("simulated error {status}")}})
    } else if path.contains(":generateContent") || path.contains(":streamGenerateContent") {
        json!({"error": {"code": status, "message": format!("simulated error {status}"), "status": "INTERNAL"}})
    } else {
        json!({"error": {"message": format!("simulated error {status}"), "type": "server_error", "param": null, "code": null}})
    };
    (code, axum::Json(body)).into_response()
}

fn unauthorized(path: &str) -> Response {
    let body = if path.starts_with("/v1/messages") {
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
    } else {
        json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
    };
    (StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
}

async fn handle(State(sim): State<Arc<Sim>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let key = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| {
            parts
                .headers
                .get("x-goog-api-key")
                .and_then(|v| v.to_str().ok())
        })
        .unwrap_or("")
        .to_owned();
    if key.is_empty() || (!sim.keys.is_empty() && !sim.keys.contains(&key)) {
        return unauthorized(&path);
    }
    let bytes = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let b = behaviour(&parts.headers);
    let gemini = path.contains("/models/") && path.contains(':');
    let model = if gemini {
        path.rsplit_once("/models/")
            .and_then(|(_, r)| r.split_once(':'))
            .map(|(m, _)| m.to_owned())
            .unwrap_or_default()
    } else {
        body["model"].as_str().unwrap_or_default().to_owned()
    };
    let stream = if gemini {
        path.ends_with(":streamGenerateContent")
    } else {
        body["stream"].as_bool() == Some(true)
    };
    let end_user = body["safety_identifier"]
        .as_str()
        .or(body["user"].as_str())
        .or(body["metadata"]["user_id"].as_str())
        .map(str::to_owned);
    {
        let mut seen = sim.seen.lock().expect("sim lock");
        if seen.len() >= 10_000 {
            seen.pop_front();
        }
        seen.push_back(Seen {
            path: path.clone(),
            model: model.clone(),
            stream,
            include_usage: body["stream_options"]["include_usage"].as_bool() == Some(true),
            end_user,
            key_sha256: digest(key.as_bytes()),
            headers: parts
                .headers
                .keys()
                .map(|k| k.as_str().to_owned())
                .collect(),
        });
    }
    sim.started.fetch_add(1, Ordering::Relaxed);
    if b.hang {
        std::future::pending::<()>().await;
    }
    if let Some(status) = b.error {
        sim.completed.fetch_add(1, Ordering::Relaxed);
        return provider_error(&path, status);
    }
    let prompt = prompt_tokens(&body);
    // Seeded by what the model is asked, not by framing a gateway may add (end-user
    // fields, stream options): the same question gets the same answer either way.
    let seed = json!([
        model,
        body["messages"],
        body["input"],
        body["contents"],
        body["system"],
        body["instructions"]
    ])
    .to_string();
    let call = Call {
        id: digest(seed.as_bytes()),
        words: if b.echo {
            echo_words(&body)
        } else {
            answer(&seed, b.words)
        },
        prompt,
        cached: b.cached.min(prompt),
        reasoning: if b.reasoning > 0 || is_reasoning_model(&model) {
            b.reasoning
        } else {
            0
        },
        model,
        b,
    };
    // The provider's own report of it (issue 35): which usage endpoint lists it.
    let kind = match path.as_str() {
        "/v1/chat/completions" | "/v1/responses" => Some("completions"),
        "/v1/embeddings" => Some("embeddings"),
        "/v1/messages" => Some("messages"),
        _ => None,
    };
    if let Some(kind) = kind {
        let counts = if kind == "embeddings" {
            crate::domain::TokenCounts::new(prompt_tokens(&body).saturating_sub(3), 0, 0, 0, 0)
        } else {
            crate::domain::TokenCounts::new(
                call.prompt - call.cached,
                call.cached,
                0,
                call.completion(),
                call.reasoning,
            )
        };
        let key_id = format!(
            "{}{}",
            if kind == "messages" {
                "apikey_"
            } else {
                "key_"
            },
            digest(key.as_bytes())
        );
        let at = (
            chrono::Utc::now().date_naive(),
            kind,
            call.model.clone(),
            key_id,
        );
        let mut served = sim.served.lock().expect("sim lock");
        let (t, n) = served.entry(at).or_default();
        t.input += counts.input;
        t.cache_read += counts.cache_read;
        t.output += counts.output;
        t.reasoning += counts.reasoning;
        *n += 1;
    }
    match path.as_str() {
        "/v1/chat/completions" => chat(&call, stream, &body, sim),
        "/v1/responses" => responses(&call, stream, sim),
        "/v1/embeddings" => embeddings(&call, &body, sim),
        "/v1/moderations" => moderations(&body, sim),
        "/v1/messages" => messages(&call, stream, sim),
        _ if gemini => generate(&call, stream, parts.uri.query().unwrap_or(""), sim),
        _ => (StatusCode::NOT_FOUND, "no such path").into_response(),
    }
}

fn chat_usage(c: &Call) -> Value {
    json!({
        "prompt_tokens": c.prompt,
        "completion_tokens": c.completion(),
        "total_tokens": c.prompt + c.completion(),
        "prompt_tokens_details": {"cached_tokens": c.cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": c.reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

const CREATED: u64 = 1_760_000_000;

fn chat(c: &Call, stream: bool, body: &Value, sim: Arc<Sim>) -> Response {
    let id = format!("chatcmpl-{}", c.id);
    if !stream {
        let v = json!({
            "id": id, "object": "chat.completion", "created": CREATED, "model": c.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.words.join(" "), "refusal": null},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": chat_usage(c), "service_tier": "default", "system_fingerprint": "fp_sim"
        });
        return json_response(v, &c.b, sim);
    }
    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let chunk = |delta: Value, finish: Value| {
        let mut v = json!({"id": id, "object": "chat.completion.chunk", "created": CREATED, "model": c.model,
                           "service_tier": "default", "system_fingerprint": "fp_sim",
                           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            v["usage"] = Value::Null;
        }
        format!("data: {}\n\n", serde_json::to_string(&v).expect("json"))
    };
    let mut chunks = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        Value::Null,
    )];
    for (i, w) in c.words.iter().enumerate() {
        let text = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        chunks.push(chunk(json!({"content": text}), Value::Null));
    }
    chunks.push(chunk(json!({}), json!("stop")));
    if include_usage {
        let v = json!({"id": id, "object": "chat.completion.chunk", "created": CREATED, "model": c.model,
                       "service_tier": "default", "system_fingerprint": "fp_sim", "choices": [], "usage": chat_usage(c)});
        chunks.push(format!(
            "data: {}\n\n",
            serde_json::to_string(&v).expect("json")
        ));
    }
    chunks.push("data: [DONE]\n\n".into());
    sse_response(chunks, &c.b, sim)
}

fn responses(c: &Call, stream: bool, sim: Arc<Sim>) -> Response {
    let id = format!("resp_{}", c.id);
    let text = c.words.join(" ");
    let usage = json!({
        "input_tokens": c.prompt, "input_tokens_details": {"cached_tokens": c.cached},
        "output_tokens": c.completion(), "output_tokens_details": {"reasoning_tokens": c.reasoning},
        "total_tokens": c.prompt + c.completion()
    });
    let message = json!({"id": format!("msg_{}", c.id), "type": "message", "status": "completed", "role": "assistant",
                         "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": CREATED, "status": status, "model": c.model,
               "output": output, "usage": usage, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
               "text": {"format": {"type": "text"}}, "error": null, "incomplete_details": null,
               "instructions": null, "metadata": {}, "temperature": 1.0, "top_p": 1.0, "service_tier": "default"})
    };
    if !stream {
        return json_response(response("completed", json!([message]), usage), &c.b, sim);
    }
    let ev = |seq: usize, kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        format!(
            "event: {kind}\ndata: {}\n\n",
            serde_json::to_string(&data).expect("json")
        )
    };
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq - 1
    };
    let mut chunks = vec![
        ev(
            next(),
            "response.created",
            json!({"response": response("in_progress", json!([]), Value::Null)}),
        ),
        ev(
            next(),
            "response.output_item.added",
            json!({"output_index": 0,
            "item": {"id": format!("msg_{}", c.id), "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        ),
    ];
    for (i, w) in c.words.iter().enumerate() {
        let delta = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        chunks.push(ev(
            next(),
            "response.output_text.delta",
            json!({"item_id": format!("msg_{}", c.id),
            "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
        ));
    }
    chunks.push(ev(
        next(),
        "response.output_item.done",
        json!({"output_index": 0, "item": message}),
    ));
    chunks.push(ev(
        next(),
        "response.completed",
        json!({"response": response("completed", json!([message]), usage)}),
    ));
    sse_response(chunks, &c.b, sim)
}

fn embeddings(c: &Call, body: &Value, sim: Arc<Sim>) -> Response {
    let inputs = match &body["input"] {
        Value::Array(a) => a.len(),
        _ => 1,
    };
    let tokens = prompt_tokens(body).saturating_sub(3);
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.0125, -0.25, 0.5, (i as f64) / 8.0]}))
        .collect();
    let v = json!({"object": "list", "data": data, "model": c.model,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    json_response(v, &c.b, sim)
}

fn moderations(body: &Value, sim: Arc<Sim>) -> Response {
    sim.completed.fetch_add(1, Ordering::Relaxed);
    let text = body["input"].to_string();
    let flagged = text.contains("FLAG-ME");
    axum::Json(json!({"id": "modr-sim", "model": "omni-moderation-latest",
        "results": [{"flagged": flagged, "categories": {"violence": flagged}, "category_scores": {"violence": if flagged {0.99} else {0.01}}}]}))
        .into_response()
}

fn messages(c: &Call, stream: bool, sim: Arc<Sim>) -> Response {
    let id = format!("msg_{}", c.id);
    // Anthropic's input_tokens excludes cache reads and writes.
    let input = c.prompt - c.cached;
    let text = c.words.join(" ");
    if !stream {
        let v = json!({
            "id": id, "type": "message", "role": "assistant", "model": c.model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": c.cached,
                      "output_tokens": c.completion(), "service_tier": "standard"}
        });
        return json_response(v, &c.b, sim);
    }
    let ev = |kind: &str, data: Value| {
        format!(
            "event: {kind}\ndata: {}\n\n",
            serde_json::to_string(&data).expect("json")
        )
    };
    let mut chunks = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
            "model": c.model, "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": c.cached,
                      "output_tokens": 1, "service_tier": "standard"}}}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", json!({"type": "ping"})),
    ];
    for (i, w) in c.words.iter().enumerate() {
        let t = if i == 0 {
            (*w).to_owned()
        } else {
            format!(" {w}")
        };
        chunks.push(ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": t}}),
        ));
    }
    chunks.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    chunks.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": c.completion()}}),
    ));
    chunks.push(ev("message_stop", json!({"type": "message_stop"})));
    sse_response(chunks, &c.b, sim)
}

fn generate(c: &Call, stream: bool, query: &str, sim: Arc<Sim>) -> Response {
    let usage = |candidates: u64| {
        let mut u = json!({"promptTokenCount": c.prompt, "candidatesTokenCount": candidates,
                           "totalTokenCount": c.prompt + candidates + c.reasoning});
        if c.cached > 0 {
            u["cachedContentTokenCount"] = json!(c.cached);
        }
        if c.reasoning > 0 {
            u["thoughtsTokenCount"] = json!(c.reasoning);
        }
        u
    };
    let piece = |text: String, finish: Option<&str>, n: u64| {
        let mut cand = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
        if let Some(f) = finish {
            cand["finishReason"] = json!(f);
        }
        json!({"candidates": [cand], "usageMetadata": usage(n), "modelVersion": c.model, "responseId": c.id})
    };
    let n = c.words.len() as u64;
    if !stream {
        return json_response(piece(c.words.join(" "), Some("STOP"), n), &c.b, sim);
    }
    let parts: Vec<Value> = c
        .words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let t = if i == 0 {
                (*w).to_owned()
            } else {
                format!(" {w}")
            };
            let last = i + 1 == c.words.len();
            piece(t, last.then_some("STOP"), (i + 1) as u64)
        })
        .collect();
    if query.split('&').any(|kv| kv == "alt=sse") {
        let chunks = parts
            .iter()
            .map(|p| format!("data: {}\r\n\r\n", serde_json::to_string(p).expect("json")))
            .collect();
        return sse_response(chunks, &c.b, sim);
    }
    // Without alt=sse: one JSON array, streamed element by element.
    let mut chunks = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let sep = if i == 0 { "[" } else { ",\r\n" };
        chunks.push(format!("{sep}{}", serde_json::to_string(p).expect("json")));
    }
    chunks.push("]".into());
    let mut res = Response::new(chunked(chunks, &c.b, sim));
    res.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    res
}

async fn models(State(sim): State<Arc<Sim>>, headers: HeaderMap) -> Response {
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| !k.is_empty() && (sim.keys.is_empty() || sim.keys.iter().any(|x| x == k)));
    if !ok {
        return unauthorized("/v1/models");
    }
    let ids = [
        "gpt-4o-mini",
        "gpt-4o",
        "gpt-4.1-mini",
        "gpt-5",
        "gpt-5-mini",
        "o4-mini",
        "text-embedding-3-small",
        "omni-moderation-latest",
    ];
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": CREATED, "owned_by": "simulator"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The four report endpoints: what was served from `start` to `end` (exclusive), one
/// bucket per UTC day.
async fn bill(State(sim): State<Arc<Sim>>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    use chrono::{DateTime, NaiveDate, Utc};
    let path = uri.path();
    let anthropic = path.starts_with("/v1/organizations/");
    let cost = path.ends_with("/costs") || path.ends_with("/cost_report");
    let has_key = if anthropic {
        headers.get("x-api-key").is_some_and(|v| !v.is_empty())
    } else {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| !k.is_empty())
    };
    if !has_key {
        return unauthorized(path);
    }
    let query: Vec<(String, String)> = uri
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let day_of = |v: Option<String>| -> Option<NaiveDate> {
        let v = v?;
        if let Ok(secs) = v.parse::<i64>() {
            return DateTime::<Utc>::from_timestamp(secs, 0).map(|t| t.date_naive());
        }
        DateTime::parse_from_rfc3339(&v)
            .ok()
            .map(|t| t.with_timezone(&Utc).date_naive())
    };
    let (start, end) = if anthropic {
        (day_of(param("starting_at")), day_of(param("ending_at")))
    } else {
        (day_of(param("start_time")), day_of(param("end_time")))
    };
    let Some(start) = start else {
        return (
            StatusCode::BAD_REQUEST,
            "start_time / starting_at is required",
        )
            .into_response();
    };
    let end = end.unwrap_or_else(|| Utc::now().date_naive() + chrono::Duration::days(1));
    if cost && sim.book.is_none() {
        return (
            StatusCode::NOT_IMPLEMENTED,
            "start the simulator with --prices to serve cost reports",
        )
            .into_response();
    }
    let provider = if anthropic { "anthropic" } else { "openai" };
    // Which usage endpoint's rows a report lists (every OpenAI kind for its costs).
    let kinds: &[&str] = match path.rsplit('/').next().unwrap_or("") {
        "completions" => &["completions"],
        "embeddings" => &["embeddings"],
        "costs" => &["completions", "embeddings"],
        _ => &["messages"],
    };
    let served = sim.served.lock().expect("sim lock").clone();
    // Pages of at most `limit` buckets (and the simulator's own cap); `page` is the day
    // the next page starts.
    let limit = param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(7)
        .clamp(1, sim.report_page_days.max(1));
    let start = param("page")
        .and_then(|p| p.parse::<NaiveDate>().ok())
        .unwrap_or(start);
    let mut buckets = Vec::new();
    let mut day = start;
    while day < end && buckets.len() < limit {
        let rows = served
            .iter()
            .filter(|((d, k, _, _), _)| *d == day && kinds.contains(k));
        let results: Vec<Value> = if cost {
            // Per model and token type, every key together.
            let mut per_model: BTreeMap<&str, crate::domain::TokenCounts> = BTreeMap::new();
            for ((_, _, model, _), (t, _)) in rows {
                let m = per_model.entry(model.as_str()).or_default();
                m.input += t.input;
                m.cache_read += t.cache_read;
                m.output += t.output;
                m.reasoning += t.reasoning;
            }
            let book = sim.book.as_ref().expect("checked above");
            let mut out = Vec::new();
            for (model, t) in per_model {
                let Some(e) = book.lookup(provider, model, "", day) else {
                    continue;
                };
                let part = |counts: crate::domain::TokenCounts| {
                    crate::price::cost(&e.rates, &counts, rust_decimal::Decimal::ZERO)
                };
                use crate::domain::TokenCounts as C;
                let items = [
                    (
                        "input",
                        "uncached_input_tokens",
                        part(C::new(t.input, 0, 0, 0, 0)),
                    ),
                    (
                        "cached input",
                        "cache_read_input_tokens",
                        part(C::new(0, t.cache_read, 0, 0, 0)),
                    ),
                    (
                        "output",
                        "output_tokens",
                        part(C::new(0, 0, 0, t.output, t.reasoning)),
                    ),
                ];
                for (item, token_type, usd) in items {
                    if usd.is_zero() {
                        continue;
                    }
                    out.push(if anthropic {
                        json!({"currency": "USD", "amount": (usd * rust_decimal::Decimal::ONE_HUNDRED).normalize().to_string(),
                               "workspace_id": null, "description": format!("{model} Usage - {token_type}"),
                               "cost_type": "tokens", "context_window": "0-200k", "model": model,
                               "service_tier": "standard", "token_type": token_type})
                    } else {
                        use rust_decimal::prelude::ToPrimitive;
                        json!({"object": "organization.costs.result",
                               "amount": {"value": usd.to_f64().unwrap_or(0.0), "currency": "usd"},
                               "line_item": format!("{model}, {item}"), "project_id": "proj_simulator"})
                    });
                }
            }
            out
        } else {
            rows.map(|((_, kind, model, key), (t, n))| {
                if anthropic {
                    json!({"uncached_input_tokens": t.input, "cache_creation": {"ephemeral_1h_input_tokens": 0,
                           "ephemeral_5m_input_tokens": 0}, "cache_read_input_tokens": t.cache_read,
                           "output_tokens": t.output, "server_tool_use": {"web_search_requests": 0},
                           "api_key_id": key, "workspace_id": null, "model": model,
                           "service_tier": "standard", "context_window": "0-200k"})
                } else if *kind == "embeddings" {
                    json!({"object": "organization.usage.embeddings.result", "input_tokens": t.input,
                           "num_model_requests": n, "project_id": "proj_simulator", "user_id": null,
                           "api_key_id": key, "model": model})
                } else {
                    json!({"object": "organization.usage.completions.result",
                           "input_tokens": t.input + t.cache_read, "output_tokens": t.output,
                           "input_cached_tokens": t.cache_read, "input_audio_tokens": 0, "output_audio_tokens": 0,
                           "num_model_requests": n,
                           "project_id": "proj_simulator", "user_id": null, "api_key_id": key,
                           "model": model, "batch": null})
                }
            })
            .collect()
        };
        let next = day + chrono::Duration::days(1);
        let at = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
        buckets.push(if anthropic {
            json!({"starting_at": at(day).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                   "ending_at": at(next).to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "results": results})
        } else {
            json!({"object": "bucket", "start_time": at(day).timestamp(), "end_time": at(next).timestamp(), "results": results})
        });
        day = next;
    }
    let next_page = (day < end).then(|| day.to_string());
    let page = if anthropic {
        json!({"data": buckets, "has_more": next_page.is_some(), "next_page": next_page})
    } else {
        json!({"object": "page", "data": buckets, "has_more": next_page.is_some(), "next_page": next_page})
    };
    axum::Json(page).into_response()
}

async fn requests(State(sim): State<Arc<Sim>>) -> Response {
    let seen: Vec<Seen> = sim.seen.lock().expect("sim lock").iter().cloned().collect();
    axum::Json(seen).into_response()
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    axum::Json(json!({
        "started": sim.started.load(Ordering::Relaxed),
        "completed": sim.completed.load(Ordering::Relaxed),
    }))
    .into_response()
}

pub fn router(
    keys: Vec<String>,
    book: Option<crate::price::PriceBook>,
    report_page_days: usize,
) -> Router {
    let sim = Arc::new(Sim {
        keys,
        book,
        report_page_days,
        ..Default::default()
    });
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/organization/usage/completions", get(bill))
        .route("/v1/organization/usage/embeddings", get(bill))
        .route("/v1/organization/costs", get(bill))
        .route("/v1/organizations/usage_report/messages", get(bill))
        .route("/v1/organizations/cost_report", get(bill))
        .route("/_sim/requests", get(requests))
        .route("/_sim/stats", get(stats))
        .fallback(post(handle))
        .with_state(sim)
}

/// Serves until `shutdown`.
pub async fn run(
    args: SimulateArgs,
    mut shutdown: crate::shutdown::Shutdown,
) -> anyhow::Result<()> {
    let keys: Vec<String> = args
        .keys
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let bound: SocketAddr = listener.local_addr()?;
    tracing::info!(listen = %bound, "provider simulator listening");
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let book = match &args.prices {
        Some(p) => Some(crate::price::PriceBook::load(p)?),
        None => None,
    };
    axum::serve(listener, router(keys, book, args.report_page_days))
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_tokens_are_words_plus_three_per_message() {
        let body = json!({"messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": "hello there world"}]});
        assert_eq!(prompt_tokens(&body), 2 + 3 + 3 + 3);
        assert_eq!(prompt_tokens(&json!({"input": "a b c"})), 3 + 3);
    }

    #[test]
    fn answers_are_deterministic() {
        assert_eq!(answer("x", 5), answer("x", 5));
        assert_eq!(answer("x", 5).len(), 5);
    }
}
