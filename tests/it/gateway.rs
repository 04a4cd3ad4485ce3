//! The gateway (issue 12), driven with the official OpenAI and Anthropic Python SDKs
//! against the provider simulator, with real Kafka, ClickHouse and ingest behind it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::harness::{
    list_price, sdk_calls, spawn_gateway, spawn_simulator, tokentally, Gateway, TestEnv,
    PLATFORM_KEYS,
};

fn platform_key(provider: &str) -> &'static str {
    PLATFORM_KEYS
        .iter()
        .find(|(p, _)| *p == provider)
        .unwrap()
        .1
}

/// Creates a proxy key with the CLI; returns (key id, secret).
pub(crate) fn create_key(
    env: &TestEnv,
    institution: &str,
    user: &str,
    extra: &[&str],
) -> (String, String) {
    let mut args = vec![
        "keys",
        "create",
        "--institution",
        institution,
        "--user",
        user,
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out: Value = serde_json::from_str(&tokentally(&args, &env.cli_vars(), None)).unwrap();
    (
        out["key_id"].as_str().unwrap().to_owned(),
        out["key"].as_str().unwrap().to_owned(),
    )
}

/// Waits until `gw` accepts `key` (keys are re-read every 2 s); returns how long it took.
pub(crate) async fn until_accepted(gw: &Gateway, key: &str) -> Duration {
    let http = crate::web::client();
    let start = Instant::now();
    loop {
        let s = http
            .get(format!("{}/v1/models", gw.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status();
        if s == 200 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "key not accepted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stored events by id: (model, endpoint, status, input, cache_read, cache_write,
/// output, reasoning, cost, usage_estimated, billing, user_id, api_key_id).
#[derive(Debug, Clone, PartialEq, clickhouse::Row, serde::Deserialize)]
struct Stored {
    event_id: String,
    institution_id: String,
    user_id: String,
    api_key_id: String,
    provider: String,
    model: String,
    endpoint: String,
    status: String,
    input_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    cost: String,
    usage_estimated: u8,
    billing: String,
    tag_keys: Vec<String>,
    tag_values: Vec<String>,
}

async fn stored(env: &TestEnv) -> BTreeMap<String, Stored> {
    env.ch()
        .query(
            "SELECT event_id, institution_id, user_id, api_key_id, provider, model, endpoint, status, \
             input_tokens, cache_read_tokens, cache_write_tokens, output_tokens, reasoning_tokens, \
             toString(cost) AS cost, usage_estimated, billing, tag_keys, tag_values \
             FROM usage_events WHERE sign = 1",
        )
        .fetch_all::<Stored>()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.event_id.clone(), s))
        .collect()
}

async fn wait_events(env: &TestEnv, n: usize, timeout: Duration) -> BTreeMap<String, Stored> {
    let start = Instant::now();
    loop {
        let s = stored(env).await;
        if s.len() >= n {
            return s;
        }
        assert!(
            start.elapsed() < timeout,
            "only {} of {n} events stored after {timeout:?}",
            s.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Canonical (input, cache_read, cache_write, output, reasoning) of a usage object the
/// simulator reported, by the providers' documented rules (not tokentally's code).
fn canonical(api: &str, u: &Value) -> (u64, u64, u64, u64, u64) {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    match api {
        "chat" | "embeddings" => {
            let cached = n(&u["prompt_tokens_details"]["cached_tokens"]);
            (
                n(&u["prompt_tokens"]) - cached,
                cached,
                0,
                n(&u["completion_tokens"]),
                n(&u["completion_tokens_details"]["reasoning_tokens"]),
            )
        }
        "responses" => {
            let cached = n(&u["input_tokens_details"]["cached_tokens"]);
            (
                n(&u["input_tokens"]) - cached,
                cached,
                0,
                n(&u["output_tokens"]),
                n(&u["output_tokens_details"]["reasoning_tokens"]),
            )
        }
        "messages" => (
            n(&u["input_tokens"]),
            n(&u["cache_read_input_tokens"]),
            n(&u["cache_creation_input_tokens"]),
            n(&u["output_tokens"]),
            0,
        ),
        other => panic!("{other}"),
    }
}

pub(crate) fn dec(s: &str) -> Decimal {
    s.parse::<Decimal>().unwrap().normalize()
}

/// Issue 12: the official SDKs work through the gateway by changing base URL and key;
/// each client gets exactly what the simulator sends; each request is one stored event,
/// priced exactly as this test computes it from the price book's TOML.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_get_what_the_provider_sent_and_each_request_is_one_exact_event() {
    let env = TestEnv::new("gwsdk", 2).await;
    let sim = spawn_simulator(&env, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(&env, "a", env.gateway_vars(&sim, dir.path())).await;
    let _ingest = env.spawn_ingest();
    let (key_id, key) = create_key(&env, "uni-oslo", "alice@uni-oslo.no", &[]);
    until_accepted(&gw, &key).await;

    let user = |text: &str| json!([{"role": "user", "content": text}]);
    let openai_calls = json!([
        {"sdk": "openai", "api": "chat", "model": "gpt-4o-mini", "messages": user("what is two plus two"),
         "headers": {"x-simulator": "words=7,cached=2", "x-tokentally-tags": "course=inf100"}},
        {"sdk": "openai", "api": "chat", "stream": true, "model": "gpt-4o-mini",
         "messages": user("stream me a short answer please"), "headers": {"x-simulator": "words=9"}},
        {"sdk": "openai", "api": "chat", "stream": true, "include_usage": true, "model": "gpt-4o-mini",
         "messages": user("and this one with usage"), "headers": {"x-simulator": "words=5,cached=1"}},
        {"sdk": "openai", "api": "responses", "model": "gpt-5-mini", "input": "explain lifetimes briefly",
         "headers": {"x-simulator": "words=11,reasoning=6,cached=2"}},
        {"sdk": "openai", "api": "responses", "stream": true, "model": "gpt-5-mini", "input": "stream the explanation",
         "headers": {"x-simulator": "words=8,reasoning=3"}},
        {"sdk": "openai", "api": "embeddings", "model": "text-embedding-3-small",
         "input": ["one two three", "four five"]},
    ]);
    let anthropic_calls = json!([
        {"sdk": "anthropic", "api": "messages", "model": "claude-haiku-4-5", "max_tokens": 100,
         "messages": user("hello claude how are you"), "headers": {"x-simulator": "words=6,cached=3"}},
        {"sdk": "anthropic", "api": "messages", "stream": true, "model": "claude-haiku-4-5", "max_tokens": 100,
         "messages": user("stream hello"), "headers": {"x-simulator": "words=10"}},
    ]);
    let via: Vec<Value> = sdk_calls(&gw.base, &key, &openai_calls)
        .into_iter()
        .chain(sdk_calls(&gw.base, &key, &anthropic_calls))
        .collect();
    let direct: Vec<Value> = sdk_calls(&sim.base, platform_key("OPENAI"), &openai_calls)
        .into_iter()
        .chain(sdk_calls(
            &sim.base,
            platform_key("ANTHROPIC"),
            &anthropic_calls,
        ))
        .collect();
    let calls: Vec<Value> = openai_calls
        .as_array()
        .unwrap()
        .iter()
        .chain(anthropic_calls.as_array().unwrap())
        .cloned()
        .collect();
    // The usage the simulator reports for each request: its non-stream twin, direct.
    let twins = |calls: &Value| -> Value {
        Value::Array(
            calls
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    c["stream"] = json!(false);
                    c
                })
                .collect(),
        )
    };
    let usage: Vec<Value> = sdk_calls(&sim.base, platform_key("OPENAI"), &twins(&openai_calls))
        .into_iter()
        .chain(sdk_calls(
            &sim.base,
            platform_key("ANTHROPIC"),
            &twins(&anthropic_calls),
        ))
        .map(|r| r["response"]["usage"].clone())
        .collect();

    for (i, (v, d)) in via.iter().zip(&direct).enumerate() {
        assert_eq!(v["ok"], true, "call {i} through the gateway: {v}");
        assert_eq!(d["ok"], true, "call {i} direct: {d}");
        assert_eq!(
            v["response"], d["response"],
            "call {i}: the client got something else"
        );
        assert_eq!(v["chunks"], d["chunks"], "call {i}: the stream differs");
        assert!(v["request_id"].is_string(), "call {i} has no request id");
    }
    // The stream without include_usage had no usage chunk; the one that asked got it.
    let chunks = via[1]["chunks"].as_array().unwrap();
    assert!(chunks.iter().all(|c| c["usage"].is_null()), "{chunks:?}");
    let with_usage = via[2]["chunks"].as_array().unwrap();
    assert!(with_usage.last().unwrap()["usage"]["prompt_tokens"].is_u64());

    // The provider saw a pseudonymous end user, the platform's key, no client key.
    let seen: Vec<Value> = crate::web::client()
        .get(format!("{}/_sim/requests", sim.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let via_gateway: Vec<&Value> = seen
        .iter()
        .filter(|r| r["end_user"].as_str().is_some_and(|u| u.starts_with("tt_")))
        .collect();
    assert_eq!(via_gateway.len(), 8, "{seen:?}");
    let pseudonym = via_gateway[0]["end_user"].as_str().unwrap();
    assert!(via_gateway.iter().all(|r| r["end_user"] == pseudonym));
    assert!(!pseudonym.contains("alice"));
    let who = tokentally(
        &["keys", "whois", pseudonym],
        &{
            let mut v = env.cli_vars();
            v.push((
                "TOKENTALLY_GATEWAY_MASTER_KEY",
                crate::harness::TEST_MASTER_KEY.into(),
            ));
            v
        },
        None,
    );
    assert_eq!(who, "institution uni-oslo, user alice@uni-oslo.no");
    let sha = |k: &str| {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(k.as_bytes())[..8])
    };
    for r in &via_gateway {
        let expected = if r["path"] == "/v1/messages" {
            sha(platform_key("ANTHROPIC"))
        } else {
            sha(platform_key("OPENAI"))
        };
        assert_eq!(r["key_sha256"], expected);
        let headers: Vec<&str> = r["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        assert!(!headers.contains(&"x-tokentally-tags"), "{headers:?}");
    }
    assert!(
        via_gateway[1]["include_usage"] == true,
        "the gateway asks for stream usage"
    );

    // One event per request, priced as computed here.
    let events = wait_events(&env, 8, Duration::from_secs(60)).await;
    assert_eq!(events.len(), 8);
    for (i, call) in calls.iter().enumerate() {
        let id = via[i]["request_id"].as_str().unwrap();
        let e = events
            .get(id)
            .unwrap_or_else(|| panic!("no event for call {i} ({id})"));
        let api = call["api"].as_str().unwrap();
        let (input, cache_read, cache_write, output, reasoning) = canonical(api, &usage[i]);
        assert_eq!(
            (
                e.input_tokens,
                e.cache_read_tokens,
                e.cache_write_tokens,
                e.output_tokens,
                e.reasoning_tokens
            ),
            (input, cache_read, cache_write, output, reasoning),
            "call {i} ({api})"
        );
        let price = list_price(&env.prices, call["model"].as_str().unwrap());
        assert_eq!(
            dec(&e.cost),
            price
                .cost(input, cache_read, cache_write, output)
                .normalize(),
            "call {i} ({api}) cost"
        );
        assert_eq!(e.status, "ok", "call {i}");
        assert_eq!(e.usage_estimated, 0);
        assert_eq!(e.billing, "");
        assert_eq!(
            (e.institution_id.as_str(), e.user_id.as_str()),
            ("uni-oslo", "alice@uni-oslo.no")
        );
        assert_eq!(e.api_key_id, key_id);
        assert_eq!(e.model, call["model"].as_str().unwrap());
        let provider = if api == "messages" {
            "anthropic"
        } else {
            "openai"
        };
        assert_eq!(e.provider, provider);
    }
    let first = &events[via[0]["request_id"].as_str().unwrap()];
    assert_eq!(
        (first.tag_keys.clone(), first.tag_values.clone()),
        (vec!["course".to_string()], vec!["inf100".to_string()])
    );
    assert_eq!(
        events[via[3]["request_id"].as_str().unwrap()].endpoint,
        "responses"
    );

    // Gemini (no official SDK here): generateContent, and a stream with and without SSE.
    let http = crate::web::client();
    let gem_body =
        json!({"contents": [{"role": "user", "parts": [{"text": "hello gemini friend"}]}]});
    let mut gem_ids = Vec::new();
    for (path, sse) in [
        ("models/gemini-2.0-flash:generateContent", false),
        (
            "models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            true,
        ),
        ("models/gemini-2.0-flash:streamGenerateContent", false),
    ] {
        let via = http
            .post(format!("{}/v1beta/{path}", gw.base))
            .header("x-goog-api-key", &key)
            .header("x-simulator", "words=4")
            .json(&gem_body)
            .send()
            .await
            .unwrap();
        assert_eq!(via.status(), 200, "{path}");
        gem_ids.push(
            via.headers()["x-tokentally-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
        let via_text = via.text().await.unwrap();
        let direct = http
            .post(format!("{}/v1beta/{path}", sim.base))
            .header("x-goog-api-key", platform_key("GEMINI"))
            .header("x-simulator", "words=4")
            .json(&gem_body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(via_text, direct, "{path}");
        assert_eq!(via_text.contains("data: "), sse);
    }
    let events = wait_events(&env, 11, Duration::from_secs(30)).await;
    let gemini = list_price(&env.prices, "gemini-2.0-flash");
    for id in &gem_ids {
        let e = &events[id];
        // 3 words + 3 for the one content; 4 answer words.
        assert_eq!(
            (e.input_tokens, e.output_tokens, e.provider.as_str()),
            (6, 4, "google")
        );
        assert_eq!(dec(&e.cost), gemini.cost(6, 0, 0, 4).normalize());
        // Issue 29: the `alt=sse` stream (the google-genai SDK's only form) is `ok` too.
        assert_eq!(e.status, "ok", "{id}: {}", e.endpoint);
    }

    // The official google-genai SDK: generate_content, and generate_content_stream
    // (always `?alt=sse`); what it reads equals what it reads from the simulator direct.
    let genai_calls = json!([
        {"sdk": "genai", "api": "generate", "model": "gemini-2.0-flash",
         "contents": "hello gemini friend", "headers": {"x-simulator": "words=5"}},
        {"sdk": "genai", "api": "generate", "stream": true, "model": "gemini-2.0-flash",
         "contents": "stream hello gemini", "headers": {"x-simulator": "words=7"}},
    ]);
    let via = sdk_calls(&gw.base, &key, &genai_calls);
    let direct = sdk_calls(&sim.base, platform_key("GEMINI"), &genai_calls);
    for (i, (v, d)) in via.iter().zip(&direct).enumerate() {
        assert_eq!(v["ok"], true, "genai call {i} through the gateway: {v}");
        assert_eq!(v["response"], d["response"], "genai call {i}");
        assert_eq!(v["chunks"], d["chunks"], "genai call {i}");
    }
    let chunks = via[1]["chunks"].as_array().unwrap();
    assert!(chunks.len() > 1, "the stream came in pieces: {chunks:?}");
    assert_eq!(
        chunks.last().unwrap()["candidates"][0]["finish_reason"],
        "STOP"
    );
    let events = wait_events(&env, 13, Duration::from_secs(30)).await;
    let sdk_events: Vec<&Stored> = events
        .iter()
        .filter(|(id, e)| e.provider == "google" && !gem_ids.contains(id))
        .map(|(_, e)| e)
        .collect();
    assert_eq!(sdk_events.len(), 2, "{sdk_events:?}");
    let mut seen: Vec<(&str, &str, u64, u64)> = sdk_events
        .iter()
        .map(|e| {
            assert_eq!(
                dec(&e.cost),
                gemini
                    .cost(e.input_tokens, 0, 0, e.output_tokens)
                    .normalize()
            );
            (
                e.endpoint.as_str(),
                e.status.as_str(),
                e.input_tokens,
                e.output_tokens,
            )
        })
        .collect();
    seen.sort();
    // 3 prompt words + 3 for the one content each; 5 and 7 answer words.
    assert_eq!(
        seen,
        vec![
            ("generateContent", "ok", 6, 5),
            ("streamGenerateContent", "ok", 6, 7)
        ]
    );
    env.drop_database().await;
}

async fn status_of(gw: &Gateway, key: &str) -> u16 {
    crate::web::client()
        .get(format!("{}/v1/models", gw.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Polls both gateways until `key` gets `status` from each; returns the slower time.
async fn until_status_on_both(a: &Gateway, b: &Gateway, key: &str, status: u16) -> Duration {
    let start = Instant::now();
    let mut done = [false, false];
    let mut slowest = Duration::ZERO;
    while !(done[0] && done[1]) {
        for (i, gw) in [a, b].into_iter().enumerate() {
            if !done[i] && status_of(gw, key).await == status {
                done[i] = true;
                slowest = start.elapsed();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not {status} on both"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    slowest
}

pub(crate) fn chat(text: &str) -> Value {
    json!({"sdk": "openai", "api": "chat", "model": "gpt-4o-mini",
           "messages": [{"role": "user", "content": text}], "headers": {"x-simulator": "words=12"}})
}

/// Issue 12: keys are shared by every gateway instance; revocation and expiry apply on
/// each within 5 s; a model outside the key's list is 403; per-key rate limits answer
/// 429 with `retry-after` and OpenAI's `x-ratelimit-*` headers — in each SDK's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_apply_on_every_gateway_within_five_seconds_with_model_lists_and_rate_limits() {
    let env = TestEnv::new("gwkeys", 1).await;
    let sim = spawn_simulator(&env, &[]).await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = spawn_gateway(&env, "a", env.gateway_vars(&sim, da.path())).await;
    let b = spawn_gateway(&env, "b", env.gateway_vars(&sim, db.path())).await;
    let _ingest = env.spawn_ingest();

    // Created once, usable on both; revoked once, refused by both within 5 s.
    let (key_id, key) = create_key(&env, "uni-a", "carol", &[]);
    let accepted = until_status_on_both(&a, &b, &key, 200).await;
    for gw in [&a, &b] {
        let r = sdk_calls(&gw.base, &key, &json!([chat("hello")]));
        assert_eq!(r[0]["ok"], true, "{r:?}");
    }
    tokentally(&["keys", "revoke", &key_id], &env.cli_vars(), None);
    let revoked = until_status_on_both(&a, &b, &key, 401).await;
    assert!(
        revoked < Duration::from_secs(5),
        "revocation took {revoked:?}"
    );
    for gw in [&a, &b] {
        let r = sdk_calls(&gw.base, &key, &json!([chat("after revocation")]));
        assert_eq!(
            (r[0]["status"].as_u64(), r[0]["error_type"].as_str()),
            (Some(401), Some("AuthenticationError"))
        );
        assert_eq!(r[0]["body"]["error"]["code"], "invalid_api_key");
        assert!(r[0]["body"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"));
        let m = sdk_calls(
            &gw.base,
            &key,
            &json!([{"sdk": "anthropic", "api": "messages", "model": "claude-haiku-4-5",
            "messages": [{"role": "user", "content": "hi"}]}]),
        );
        assert_eq!(
            (m[0]["status"].as_u64(), m[0]["error_type"].as_str()),
            (Some(401), Some("AuthenticationError"))
        );
        assert_eq!(m[0]["body"]["error"]["type"], "authentication_error");
    }
    // The key stays revoked across a restart (the state is in ClickHouse).
    let a = {
        let vars = a.vars.clone();
        drop(a);
        spawn_gateway(&env, "a2", vars).await
    };
    assert_eq!(status_of(&a, &key).await, 401);

    // Expiry: a key whose time runs out is refused by both within 5 s of it.
    let store = &env.store;
    let fresh = tokentally::keys::generate();
    let expires_at = chrono::Utc::now().timestamp() as u32 + 10;
    store
        .write_key(&tokentally::store::keys::KeyRow {
            key_id: fresh.key_id.clone(),
            version: 1,
            kind: "proxy".into(),
            secret_hash: tokentally::keys::secret_hash(&fresh.secret),
            institution_id: "uni-a".into(),
            user_id: "dave".into(),
            name: String::new(),
            models: vec![],
            expires_at,
            rpm: 0,
            tpm: 0,
            revoked: 0,
            created_at: 0,
            created_by: "test".into(),
            updated_at: 0,
            updated_by: "test".into(),
            held: String::new(),
        })
        .await
        .unwrap();
    until_status_on_both(&a, &b, &fresh.secret, 200).await;
    let r = sdk_calls(&a.base, &fresh.secret, &json!([chat("before expiry")]));
    assert_eq!(r[0]["ok"], true);
    let expired_after = until_status_on_both(&a, &b, &fresh.secret, 401).await;
    let late = chrono::Utc::now().timestamp() - i64::from(expires_at);
    assert!(
        late <= 5,
        "refused on both only {late} s after the key expired"
    );
    let r = sdk_calls(&b.base, &fresh.secret, &json!([chat("after expiry")]));
    assert_eq!(r[0]["status"], 401);
    assert!(r[0]["body"]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    assert!(late >= 0, "refused before its expiry");

    // Models: only those on the key's list; /v1/models shows only them.
    let (_, limited) = create_key(&env, "uni-a", "erin", &["--models", "gpt-4o-mini,claude-*"]);
    until_status_on_both(&a, &b, &limited, 200).await;
    let r = sdk_calls(
        &a.base,
        &limited,
        &json!([
            chat("allowed"),
            {"sdk": "openai", "api": "chat", "model": "gpt-5", "messages": [{"role": "user", "content": "no"}]},
            {"sdk": "openai", "api": "models"},
            {"sdk": "anthropic", "api": "messages", "model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "yes"}]},
        ]),
    );
    assert_eq!(r[0]["ok"], true);
    assert_eq!(
        (r[1]["status"].as_u64(), r[1]["error_type"].as_str()),
        (Some(403), Some("PermissionDeniedError"))
    );
    assert_eq!(r[1]["body"]["error"]["code"], "model_not_allowed");
    assert_eq!(r[2]["response"], json!(["gpt-4o-mini"]));
    assert_eq!(r[3]["ok"], true, "{:?}", r[3]);

    // Requests per minute: the fourth within a minute is refused, with retry-after.
    let (_, slow) = create_key(&env, "uni-a", "frank", &["--rpm", "3"]);
    until_status_on_both(&a, &b, &slow, 200).await;
    // (/v1/models is not rate limited; the model calls are.)
    let r = sdk_calls(
        &a.base,
        &slow,
        &json!([chat("1"), chat("2"), chat("3"), chat("4")]),
    );
    let remaining: Vec<&str> = r[..3]
        .iter()
        .map(|x| {
            x["headers"]["x-ratelimit-remaining-requests"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(remaining, ["2", "1", "0"]);
    assert_eq!(
        (r[3]["status"].as_u64(), r[3]["error_type"].as_str()),
        (Some(429), Some("RateLimitError"))
    );
    assert_eq!(r[3]["body"]["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r[3]["headers"]["x-ratelimit-limit-requests"], "3");
    let retry: u64 = r[3]["headers"]["retry-after"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    // Tokens per minute: counted from finished requests (each here is 6 + 12 tokens).
    let (_, tokens) = create_key(&env, "uni-a", "gina", &["--tpm", "30"]);
    until_status_on_both(&a, &b, &tokens, 200).await;
    let r = sdk_calls(
        &a.base,
        &tokens,
        &json!([chat("one"), chat("two"), chat("three")]),
    );
    assert_eq!(
        (r[0]["ok"].as_bool(), r[1]["ok"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(r[2]["status"], 429);
    assert_eq!(r[2]["body"]["error"]["type"], "tokens");

    // Every refusal after authentication is an event too (zero tokens, never charged).
    let events = wait_events(&env, 12, Duration::from_secs(60)).await;
    let count = |status: &str| events.values().filter(|e| e.status == status).count();
    assert_eq!(count("rejected_model"), 1);
    assert_eq!(count("rejected_rate_limit"), 2);
    for e in events
        .values()
        .filter(|e| e.status.starts_with("rejected_"))
    {
        assert_eq!(
            (e.input_tokens, e.output_tokens, dec(&e.cost)),
            (0, 0, Decimal::ZERO)
        );
    }
    println!(
        "keys: accepted on both after {accepted:?}, revoked on both after {revoked:?}, expired on both {expired_after:?} after the first check"
    );
    env.drop_database().await;
}

/// Sends `n` chat completions to `base` with `key`, `concurrency` at a time; returns each
/// answer's (HTTP status, request id, whether the body arrived whole).
async fn fire(
    base: &str,
    key: &str,
    n: usize,
    concurrency: usize,
    sim: &str,
) -> Vec<(u16, String, bool)> {
    use futures::StreamExt;
    let http = crate::web::client();
    futures::stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            async move {
                let res = http
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(key)
                    .header("x-simulator", sim)
                    .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": format!("request {i}")}]}))
                    .send()
                    .await;
                let Ok(res) = res else {
                    return (0, String::new(), false);
                };
                let status = res.status().as_u16();
                let id = res
                    .headers()
                    .get("x-tokentally-request-id")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let whole = match res.bytes().await {
                    Ok(b) => serde_json::from_slice::<Value>(&b).is_ok(),
                    Err(_) => false,
                };
                (status, id, whole)
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Starts the broker again when a test that stopped it ends, passed or failed.
struct BrokerStopped;

impl BrokerStopped {
    fn now() -> Self {
        let pidfile = crate::harness::repo().join(".data/tansu/tansu.pid");
        assert!(
            pidfile.exists(),
            "this test stops the broker that scripts/services started ({} is missing)",
            pidfile.display()
        );
        crate::harness::services("stop-kafka");
        BrokerStopped
    }
}

impl Drop for BrokerStopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new(crate::harness::repo().join("scripts/services"))
            .arg("start-kafka")
            .status();
    }
}

/// Issue 12: no served request goes unbilled. With the broker down, 500 requests are
/// answered (spooled), the gateway is killed -9, restarted on the same spool, serves 500
/// more, the broker comes back: exactly those 1,000 events are stored, once each. Then a
/// kill -9 under concurrent load: every answered request is stored; what else is stored
/// is bounded by the requests in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_a_kill_lose_no_answered_request_and_count_none_twice() {
    let env = TestEnv::new("gwspool", 2).await;
    let sim = spawn_simulator(&env, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = spawn_gateway(&env, "a", env.gateway_vars(&sim, dir.path())).await;
    let (_, key) = create_key(&env, "uni-spool", "ida", &[]);
    until_accepted(&gw, &key).await;

    let broker = BrokerStopped::now();
    let mut answered: Vec<String> = Vec::new();
    for round in 0..2 {
        let results = fire(&gw.base, &key, 500, 8, "words=5").await;
        for (status, id, whole) in &results {
            assert_eq!(
                (*status, *whole),
                (200, true),
                "round {round}: every request is served while the broker is down"
            );
            answered.push(id.clone());
        }
        if round == 0 {
            let spooled: u64 = std::fs::read_dir(dir.path().join("spool"))
                .unwrap()
                .map(|e| e.unwrap().metadata().unwrap().len())
                .sum();
            assert!(spooled > 0, "nothing in the spool");
            crate::harness::kill9(&mut gw.proc);
            let vars = gw.vars.clone();
            gw = spawn_gateway(&env, "a-restarted", vars).await;
            until_accepted(&gw, &key).await;
        }
    }
    drop(broker);
    let ingest = env.spawn_ingest();
    let events = wait_events(&env, 1000, Duration::from_secs(180)).await;
    let want: std::collections::BTreeSet<&str> = answered.iter().map(String::as_str).collect();
    assert_eq!(want.len(), 1000, "request ids are unique");
    let got: std::collections::BTreeSet<&str> = events.keys().map(String::as_str).collect();
    assert_eq!(got, want, "exactly the answered requests are stored");
    // Stored once: a replayed spool segment is a duplicate, never a second row.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rows = env
        .scalar("SELECT count() FROM usage_events WHERE sign = 1")
        .await;
    assert_eq!(rows, 1000);

    // A crash under load: 16 requests in flight, slow answers, kill -9 in the middle.
    let load = {
        let base = gw.base.clone();
        let key = key.clone();
        tokio::spawn(async move { fire(&base, &key, 400, 16, "words=6,slow=20").await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    crate::harness::kill9(&mut gw.proc);
    let results = load.await.unwrap();
    let served: Vec<&str> = results
        .iter()
        .filter(|(s, _, whole)| *s == 200 && *whole)
        .map(|(_, id, _)| id.as_str())
        .collect();
    assert!(
        !served.is_empty() && served.len() < 400,
        "the kill came mid-load: {} served",
        served.len()
    );
    let vars = gw.vars.clone();
    let _gw = spawn_gateway(&env, "a-after-crash", vars).await;
    let events = wait_events(&env, 1000 + served.len(), Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events_now = stored(&env).await;
    assert_eq!(events_now.len(), events.len().max(events_now.len()));
    for id in &served {
        assert!(
            events_now.contains_key(*id),
            "answered request {id} was lost"
        );
    }
    let extra = events_now.len() - 1000 - served.len();
    assert!(
        extra <= 16,
        "{extra} events of unanswered requests (at most 16 were in flight)"
    );
    println!(
        "spool: 1000 of 1000 answered requests stored once; crash under load: {} answered, all stored, {extra} in-flight requests also recorded",
        served.len()
    );
    drop(ingest);
    env.drop_database().await;
}

/// Every file under `dir` (recursively), as bytes.
fn files_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Issue 12: provider keys (the platform's and an institution's own), proxy keys and the
/// content of prompts and answers never appear in logs (trace level), events, ClickHouse
/// (every table of the test's database, and its files), Kafka, the spool or responses; a
/// marker inside a prompt reaches the provider (the simulator echoes it) and nothing else.
/// On the way: bring-your-own-key requests go upstream with the institution's key and
/// are billed `byok`; moderation refuses flagged input in each SDK's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_content_never_leave_the_request_byok_and_moderation() {
    const BYOK: &str = "sk-byok-uni-b-9f3e77c1d2";
    const MARKER: &str = "zebraquokka7731";
    let env = TestEnv::new("gwsecret", 1).await;
    let sim = spawn_simulator(&env, &[BYOK]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[[institutions]]\nid = \"uni-a\"\n\n[[institutions]]\nid = \"uni-b\"\nbyok_fee_per_request_usd = \"0.01\"\n\n\
         [[institutions]]\nid = \"uni-mod\"\nmoderation = true\n",
    )
    .unwrap();
    let mut vars = env.gateway_vars(&sim, dir.path());
    vars.push(("TOKENTALLY_CONFIG", config.display().to_string()));
    vars.push(("TOKENTALLY_LOG", "trace".to_owned()));
    let mut cli = env.cli_vars();
    cli.push((
        "TOKENTALLY_GATEWAY_MASTER_KEY",
        crate::harness::TEST_MASTER_KEY.into(),
    ));
    cli.push(("TOKENTALLY_LOG", "trace".into()));
    let set = tokentally(
        &[
            "keys",
            "upstream",
            "set",
            "--institution",
            "uni-b",
            "--provider",
            "openai",
        ],
        &cli,
        Some(&format!("{BYOK}\n")),
    );
    assert!(!set.contains(BYOK), "{set}");
    let gw = spawn_gateway(&env, "a", vars).await;
    let _ingest = env.spawn_ingest();
    let (_, key_a) = create_key(&env, "uni-a", "alice", &[]);
    let (_, key_b) = create_key(&env, "uni-b", "bob", &[]);
    let (_, key_m) = create_key(&env, "uni-mod", "mia", &[]);
    for k in [&key_a, &key_b, &key_m] {
        until_accepted(&gw, k).await;
    }

    let prompt = format!("please repeat {MARKER} back");
    let echo = |sdk: &str, api: &str, stream: bool| {
        let mut c = json!({"sdk": sdk, "api": api, "stream": stream, "headers": {"x-simulator": "echo"},
                           "messages": [{"role": "user", "content": prompt}], "input": prompt});
        c["model"] = json!(if sdk == "anthropic" {
            "claude-haiku-4-5"
        } else if api == "responses" {
            "gpt-5-mini"
        } else {
            "gpt-4o-mini"
        });
        c
    };
    let a = sdk_calls(
        &gw.base,
        &key_a,
        &json!([
            echo("openai", "chat", false),
            echo("openai", "chat", true),
            echo("openai", "responses", false),
            echo("anthropic", "messages", false),
            echo("anthropic", "messages", true),
        ]),
    );
    let b = sdk_calls(
        &gw.base,
        &key_b,
        &json!([echo("openai", "chat", false), echo("openai", "chat", true)]),
    );
    let m = sdk_calls(
        &gw.base,
        &key_m,
        &json!([
            chat("a harmless question"),
            {"sdk": "openai", "api": "chat", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "FLAG-ME please"}]},
            {"sdk": "anthropic", "api": "messages", "model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "FLAG-ME too"}]},
        ]),
    );
    let answers = serde_json::to_string(&(&a, &b, &m)).unwrap();
    for (i, r) in a.iter().chain(&b).enumerate() {
        assert_eq!(r["ok"], true, "call {i}: {r}");
        assert!(
            r.to_string().contains(MARKER),
            "call {i}: the provider did not get the prompt: {r}"
        );
    }
    assert_eq!(m[0]["ok"], true);
    assert_eq!(
        (m[1]["status"].as_u64(), m[1]["error_type"].as_str()),
        (Some(400), Some("BadRequestError"))
    );
    assert_eq!(m[1]["body"]["error"]["code"], "content_policy_violation");
    assert_eq!(
        (m[2]["status"].as_u64(), m[2]["error_type"].as_str()),
        (Some(400), Some("BadRequestError"))
    );
    assert_eq!(m[2]["body"]["error"]["type"], "invalid_request_error");

    // BYOK: uni-b's requests went upstream with uni-b's key, the others with the platform's.
    let seen: Vec<Value> = crate::web::client()
        .get(format!("{}/_sim/requests", sim.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sha = |k: &str| {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(k.as_bytes())[..8])
    };
    let with_byok = seen.iter().filter(|r| r["key_sha256"] == sha(BYOK)).count();
    assert_eq!(with_byok, 2, "{seen:?}");
    // The flagged input never reached the model (only the moderation endpoint).
    assert_eq!(
        seen.iter()
            .filter(|r| r["path"] != "/v1/moderations")
            .count(),
        5 + 2 + 1,
        "{seen:?}"
    );

    let events = wait_events(&env, 5 + 2 + 3, Duration::from_secs(60)).await;
    let of = |inst: &str| {
        events
            .values()
            .filter(|e| e.institution_id == inst)
            .collect::<Vec<_>>()
    };
    assert!(of("uni-b")
        .iter()
        .all(|e| e.billing == "byok" && e.status == "ok"));
    assert!(of("uni-a").iter().all(|e| e.billing.is_empty()));
    let blocked: Vec<_> = of("uni-mod")
        .into_iter()
        .filter(|e| e.status == "blocked_moderation")
        .collect();
    assert_eq!(blocked.len(), 2);
    assert!(blocked
        .iter()
        .all(|e| e.input_tokens + e.output_tokens == 0 && dec(&e.cost).is_zero()));

    // uni-b's invoice lists its own-key usage, charges only the contract's fee per request.
    let mut with_config = env.cli_vars();
    with_config.push(("TOKENTALLY_CONFIG", config.display().to_string()));
    let period = chrono::Utc::now().format("%Y-%m").to_string();
    let draft: Value = serde_json::from_str(&tokentally(
        &[
            "invoice",
            "draft",
            "--institution",
            "uni-b",
            "--period",
            &period,
            "--format",
            "json",
        ],
        &with_config,
        None,
    ))
    .unwrap();
    let lines = draft["lines"].as_array().unwrap();
    let own: Vec<&Value> = lines
        .iter()
        .filter(|l| l["variant"] == "own provider key, not charged")
        .collect();
    assert!(!own.is_empty(), "{draft}");
    assert!(
        own.iter()
            .all(|l| dec(l["amount"].as_str().unwrap()).is_zero()),
        "{draft}"
    );
    let tokens: i64 = own.iter().map(|l| l["quantity"].as_i64().unwrap()).sum();
    let stored: u64 = of("uni-b")
        .iter()
        .map(|e| e.input_tokens + e.cache_read_tokens + e.output_tokens)
        .sum();
    assert_eq!(tokens as u64, stored, "every own-key token is listed");
    let fee: Vec<&Value> = lines
        .iter()
        .filter(|l| l["variant"] == "own provider key, platform fee")
        .collect();
    assert_eq!(
        (fee.len(), fee[0]["quantity"].as_i64()),
        (1, Some(2)),
        "{draft}"
    );
    assert_eq!(dec(draft["total"].as_str().unwrap()), dec("0.02"));

    // Now look everywhere.
    let mut secrets: Vec<(&str, String)> = vec![
        ("the BYOK key", BYOK.into()),
        ("the marker", MARKER.into()),
        ("the master key", crate::harness::TEST_MASTER_KEY.into()),
        ("uni-a's proxy key", key_a.clone()),
        ("uni-b's proxy key", key_b.clone()),
        ("uni-mod's proxy key", key_m.clone()),
    ];
    // A proxy key's secret part alone (after its id) must not appear either.
    secrets.push((
        "a proxy key's secret part",
        key_a.rsplit('-').next().unwrap().to_owned(),
    ));
    for (p, k) in PLATFORM_KEYS {
        secrets.push((p, k.to_owned()));
    }
    let mut places: Vec<(String, Vec<u8>)> = Vec::new();
    places.push(("gateway log".into(), std::fs::read(&gw.log).unwrap()));
    places.push((
        "ingest log".into(),
        std::fs::read(env.log_path("ingest")).unwrap_or_default(),
    ));
    for (p, b) in files_under(dir.path()) {
        if p != config {
            places.push((p.display().to_string(), b));
        }
    }
    let tables: Vec<String> = env
        .ch()
        .query("SELECT name FROM system.tables WHERE database = currentDatabase()")
        .fetch_all::<String>()
        .await
        .unwrap();
    assert!(tables.len() > 5, "{tables:?}");
    let http = crate::web::client();
    for t in &tables {
        let dump = http
            .post(format!(
                "{}/?database={}",
                crate::harness::clickhouse_url(),
                env.cfg.clickhouse.database
            ))
            .body(format!("SELECT * FROM `{t}` FORMAT TabSeparated"))
            .send()
            .await
            .unwrap();
        assert!(dump.status().is_success(), "{t}");
        places.push((
            format!("ClickHouse table {t}"),
            dump.bytes().await.unwrap().to_vec(),
        ));
    }
    let data_dir = crate::harness::repo()
        .join(".data/clickhouse/data/data")
        .join(&env.cfg.clickhouse.database);
    for (p, b) in files_under(&data_dir) {
        places.push((p.display().to_string(), b));
    }
    for (payload, _) in env
        .consume_all(&env.cfg.kafka.topic, 10, Duration::from_secs(30))
        .await
    {
        places.push(("Kafka usage topic".into(), payload));
    }
    places.push(("responses".into(), {
        // The client's own prompt and answer come back to it, and nothing else.
        let mut s = answers.clone();
        s = s.replace(MARKER, "");
        s.into_bytes()
    }));
    for (what, bytes) in &places {
        for (name, secret) in &secrets {
            assert!(!contains(bytes, secret), "{name} appears in {what}");
        }
    }
    let log = std::fs::read_to_string(&gw.log).unwrap();
    assert!(
        log.lines().count() > 50,
        "trace logging was on: {} lines",
        log.lines().count()
    );
    println!(
        "secrets: {} places checked ({} ClickHouse tables, {} data files), {} log lines at trace",
        places.len(),
        tables.len(),
        files_under(&data_dir).len(),
        log.lines().count()
    );
    env.drop_database().await;
}

/// Issue 12: a client that leaves mid-stream. When the provider finishes, its usage is
/// recorded (status `client_cancelled`); when the provider breaks off without usage, the
/// streamed output is counted with a tokenizer and the event is marked `usage_estimated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_is_billed_for_what_the_provider_did() {
    let env = TestEnv::new("gwleave", 1).await;
    let sim = spawn_simulator(&env, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(&env, "a", env.gateway_vars(&sim, dir.path())).await;
    let _ingest = env.spawn_ingest();
    let (_, key) = create_key(&env, "uni-l", "leo", &[]);
    until_accepted(&gw, &key).await;
    let msg = json!([{"role": "user", "content": "tell me a long story about rivers"}]);
    let calls = json!([
        {"sdk": "openai", "api": "chat", "stream": true, "model": "gpt-4o-mini", "messages": msg,
         "headers": {"x-simulator": "words=40,slow=25"}, "leave_after": 3},
        {"sdk": "anthropic", "api": "messages", "stream": true, "model": "claude-haiku-4-5", "messages": msg,
         "max_tokens": 200, "headers": {"x-simulator": "words=40,slow=25"}, "leave_after": 3},
        {"sdk": "openai", "api": "chat", "stream": true, "model": "gpt-4o-mini", "messages": msg,
         "headers": {"x-simulator": "words=40,slow=25,truncate=8"}, "leave_after": 4},
    ]);
    let r = sdk_calls(&gw.base, &key, &calls);
    for (i, x) in r.iter().enumerate() {
        assert_eq!(x["ok"], true, "call {i}: {x}");
        assert!(
            x["chunks"].as_array().unwrap().len() <= 4,
            "call {i} left early"
        );
    }
    // What the provider reports for these requests when nobody leaves.
    let twins = sdk_calls(
        &sim.base,
        platform_key("OPENAI"),
        &json!([
        {"sdk": "openai", "api": "chat", "model": "gpt-4o-mini", "messages": msg, "headers": {"x-simulator": "words=40"}}]),
    );
    let twin_a = sdk_calls(
        &sim.base,
        platform_key("ANTHROPIC"),
        &json!([
        {"sdk": "anthropic", "api": "messages", "model": "claude-haiku-4-5", "messages": msg, "max_tokens": 200,
         "headers": {"x-simulator": "words=40"}}]),
    );
    let events = wait_events(&env, 3, Duration::from_secs(60)).await;
    let e: Vec<&Stored> = r
        .iter()
        .map(|x| &events[x["request_id"].as_str().unwrap()])
        .collect();
    let (i, cr, cw, o, re) = canonical("chat", &twins[0]["response"]["usage"]);
    assert_eq!(
        (
            e[0].status.as_str(),
            e[0].usage_estimated,
            e[0].input_tokens,
            e[0].cache_read_tokens,
            e[0].cache_write_tokens,
            e[0].output_tokens,
            e[0].reasoning_tokens
        ),
        ("client_cancelled", 0, i, cr, cw, o, re)
    );
    let (i, cr, cw, o, _) = canonical("messages", &twin_a[0]["response"]["usage"]);
    assert_eq!(
        (
            e[1].status.as_str(),
            e[1].usage_estimated,
            e[1].input_tokens,
            e[1].cache_read_tokens,
            e[1].cache_write_tokens,
            e[1].output_tokens
        ),
        ("client_cancelled", 0, i, cr, cw, o)
    );
    assert_eq!(
        o, 40,
        "the whole answer was billed, not the 3 chunks the client read"
    );
    // Broken off after 8 chunks (7 words after the role chunk), no usage: estimated.
    assert_eq!(
        (e[2].status.as_str(), e[2].usage_estimated),
        ("client_cancelled", 1),
        "{:?}",
        e[2]
    );
    assert!((5..=12).contains(&e[2].output_tokens), "{:?}", e[2]);
    assert!(e[2].input_tokens > 0);
    let price = list_price(&env.prices, "gpt-4o-mini");
    assert_eq!(
        dec(&e[2].cost),
        price
            .cost(e[2].input_tokens, 0, 0, e[2].output_tokens)
            .normalize()
    );
    env.drop_database().await;
}

/// Issue 12: gateways that are not ours post usage to `POST /v1/usage-events`: contract-v1
/// arrays, CloudEvents batches and LiteLLM's logger payload land as events; bad items get
/// per-item errors; a token bound to an institution cannot send another's events; no
/// token, a proxy key, or a revoked token → 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_ingest_takes_contract_cloudevents_and_litellm_batches_with_per_item_errors() {
    let env = TestEnv::new("gwhttp", 2).await;
    let sim = spawn_simulator(&env, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(&env, "a", env.gateway_vars(&sim, dir.path())).await;
    let _ingest = env.spawn_ingest();
    let created = |args: &[&str]| -> (String, String) {
        let out: Value = serde_json::from_str(&tokentally(args, &env.cli_vars(), None)).unwrap();
        (
            out["key_id"].as_str().unwrap().to_owned(),
            out["key"].as_str().unwrap().to_owned(),
        )
    };
    let (_, bound) = created(&[
        "keys",
        "create-ingest",
        "--institution",
        "uni-h",
        "--format",
        "json",
    ]);
    let (any_id, any) = created(&[
        "keys",
        "create-ingest",
        "--name",
        "litellm",
        "--format",
        "json",
    ]);
    let (_, proxy) = create_key(&env, "uni-h", "hal", &[]);
    until_accepted(&gw, &proxy).await;
    let url = format!("{}/v1/usage-events", gw.base);
    let http = crate::web::client();
    let post = |token: Option<&str>, ct: &str, body: String| {
        let mut r = http.post(&url).header("content-type", ct).body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move {
            let res = r.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let now = chrono::Utc::now().to_rfc3339();
    let usage = json!({"input_tokens": 1000, "cache_read_tokens": 200, "output_tokens": 300});
    let batch = json!([
        {"schema_version": 1, "event_id": "h-1", "occurred_at": now, "provider": "openai", "model": "gpt-4o-mini", "usage": usage},
        {"schema_version": 1, "event_id": "h-2", "occurred_at": now, "institution_id": "uni-other", "provider": "openai", "model": "gpt-4o-mini", "usage": usage},
        {"schema_version": 1, "event_id": "h-3", "occurred_at": now, "provider": "openai", "usage": usage},
        {"schema_version": 1, "event_id": "h-4", "occurred_at": now, "institution_id": "uni-h", "provider": "anthropic",
         "model": "claude-haiku-4-5", "provider_usage": {"input_tokens": 50, "output_tokens": 20, "cache_read_input_tokens": 10}}
    ]);
    // Who may post.
    assert_eq!(
        post(None, "application/json", batch.to_string()).await.0,
        401
    );
    assert_eq!(
        post(Some(&proxy), "application/json", batch.to_string())
            .await
            .0,
        401
    );
    assert_eq!(
        post(
            Some("tt-knotakey00000-00"),
            "application/json",
            batch.to_string()
        )
        .await
        .0,
        401
    );
    // A contract batch with a bound token: per-item results.
    let (s, r) = post(Some(&bound), "application/json", batch.to_string()).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(
        (r["accepted"].as_u64(), r["rejected"].as_u64()),
        (Some(2), Some(2)),
        "{r}"
    );
    let st: Vec<&str> = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_str().unwrap())
        .collect();
    assert_eq!(st, ["accepted", "rejected", "rejected", "accepted"]);
    assert!(
        r["results"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("uni-h"),
        "{r}"
    );
    assert_eq!(r["results"][2]["error"], "missing_field");
    assert!(
        r["results"][2]["detail"]
            .as_str()
            .unwrap()
            .contains("model"),
        "{r}"
    );
    // Nothing valid at all: 400; not JSON: 400.
    let (s, _) = post(
        Some(&bound),
        "application/json",
        json!([batch[2]]).to_string(),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        post(Some(&bound), "application/json", "{nope".into())
            .await
            .0,
        400
    );
    // A CloudEvents batch with an any-institution token.
    let ce = json!([
        {"specversion": "1.0", "id": "ce-1", "source": "/other-gateway", "type": "io.tokentally.usage.v1", "time": now,
         "data": {"institution_id": "uni-c", "provider": "openai", "model": "gpt-4o-mini", "usage": {"input_tokens": 400, "output_tokens": 100}}},
        {"specversion": "1.0", "id": "ce-2", "source": "/other-gateway", "type": "io.tokentally.usage.v1", "time": now,
         "data": {"institution_id": "uni-c", "provider": "openai", "model": "gpt-4o", "usage": {"input_tokens": 10, "output_tokens": 5}}},
        {"specversion": "0.3", "id": "ce-3", "data": {}}
    ]);
    let (s, r) = post(
        Some(&any),
        "application/cloudevents-batch+json",
        ce.to_string(),
    )
    .await;
    assert_eq!(
        (s, r["accepted"].as_u64(), r["rejected"].as_u64()),
        (202, Some(2), Some(1)),
        "{r}"
    );
    // LiteLLM's generic logger (StandardLoggingPayload), as a JSON array and as NDJSON.
    let start = chrono::Utc::now().timestamp() as f64;
    let litellm = |id: &str, team: &str| {
        json!({
            "id": id, "trace_id": "t", "call_type": "acompletion", "stream": false, "response_cost": 0.0001,
            "status": "success", "custom_llm_provider": "openai", "total_tokens": 130, "prompt_tokens": 100,
            "completion_tokens": 30, "startTime": start, "endTime": start + 1.25, "model": "gpt-4o-mini",
            "metadata": {"user_api_key_alias": "course-key", "user_api_key_team_id": team, "user_api_key_user_id": "lisa",
                         "usage_object": {"prompt_tokens": 100, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 20}}},
            "request_tags": ["course:inf100"], "messages": [{"role": "user", "content": "secret prompt text"}],
            "response": {"choices": [{"message": {"content": "secret answer"}}]}
        })
    };
    let (s, r) = post(
        Some(&any),
        "application/json",
        json!([litellm("ll-1", "uni-l"), litellm("ll-2", "uni-l")]).to_string(),
    )
    .await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(2)), "{r}");
    let nd = format!(
        "{}\n{}\n",
        litellm("ll-3", "uni-l"),
        litellm("ll-4", "uni-l")
    );
    let (s, r) = post(Some(&any), "application/x-ndjson", nd).await;
    assert_eq!((s, r["accepted"].as_u64()), (202, Some(2)), "{r}");
    // A revoked ingest token is refused (within the keyring's refresh).
    tokentally(&["keys", "revoke", &any_id], &env.cli_vars(), None);
    let started = Instant::now();
    while post(Some(&any), "application/json", "[]".into()).await.0 != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "revoked ingest token still accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let events = wait_events(&env, 8, Duration::from_secs(60)).await;
    let mini = list_price(&env.prices, "gpt-4o-mini");
    let check = |id: &str, inst: &str, t: (u64, u64, u64, u64), cost: Decimal| {
        let e = events
            .get(id)
            .unwrap_or_else(|| panic!("{id} not stored: {events:?}"));
        assert_eq!(e.institution_id, inst, "{id}");
        assert_eq!(
            (
                e.input_tokens,
                e.cache_read_tokens,
                e.cache_write_tokens,
                e.output_tokens
            ),
            t,
            "{id}"
        );
        assert_eq!(dec(&e.cost), cost.normalize(), "{id}");
    };
    check(
        "h-1",
        "uni-h",
        (1000, 200, 0, 300),
        mini.cost(1000, 200, 0, 300),
    );
    check(
        "h-4",
        "uni-h",
        (50, 10, 0, 20),
        list_price(&env.prices, "claude-haiku-4-5").cost(50, 10, 0, 20),
    );
    check("ce-1", "uni-c", (400, 0, 0, 100), mini.cost(400, 0, 0, 100));
    check(
        "ce-2",
        "uni-c",
        (10, 0, 0, 5),
        list_price(&env.prices, "gpt-4o").cost(10, 0, 0, 5),
    );
    for id in ["ll-1", "ll-2", "ll-3", "ll-4"] {
        check(id, "uni-l", (80, 20, 0, 30), mini.cost(80, 20, 0, 30));
        assert_eq!(
            (events[id].user_id.as_str(), events[id].tag_keys.clone()),
            ("lisa", vec!["course".to_string()])
        );
    }
    assert_eq!(events.len(), 8, "{:?}", events.keys().collect::<Vec<_>>());
    env.drop_database().await;
}
