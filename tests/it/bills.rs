//! Issue 35, item 1: the providers' reports against recorded usage.
//!
//! A month of recorded traffic is written as stored events whose costs the test computes
//! from the price book's TOML itself; the providers' reports are written by the test from
//! the same generated traffic, with 200 requests on a key that is not the gateway's, one
//! model charged 1 % above the book, and one day missing. The expected amounts are the
//! test's own arithmetic.

use std::collections::BTreeMap;

use chrono::{NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};

use crate::harness::*;

/// One generated request.
#[derive(Clone, Copy)]
struct Req {
    input: u64,
    cached: u64,
    written: u64,
    output: u64,
}

/// (provider, model as clients send it, the provider's dated name in its reports)
const MODELS: [(&str, &str, &str); 3] = [
    ("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ("openai", "gpt-4o", "gpt-4o-2024-08-06"),
    ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5-20251001"),
];

/// The requests of a day and model (deterministic; gpt-4o's large enough that 1 % of a
/// day is over the test's $0.01 threshold).
fn traffic(day: u32, m: usize) -> Vec<Req> {
    let n = 12 + (day as usize * 7 + m * 3) % 9;
    (0..n)
        .map(|j| {
            let j = j as u64;
            let d = u64::from(day);
            let big = if m == 1 { 40 } else { 1 };
            Req {
                input: big * (500 + (d * 37 + j * 13) % 700),
                cached: if m != 1 && j.is_multiple_of(3) {
                    100
                } else {
                    0
                },
                written: if m == 2 && j.is_multiple_of(4) {
                    200
                } else {
                    0
                },
                output: big * (50 + (j * 17 + d) % 200),
            }
        })
        .collect()
}

fn rates(env: &TestEnv, model: &str) -> ListPrice {
    list_price(&env.prices, model)
}

/// A decimal as a bare JSON number in the report text (the providers send numbers).
fn number(d: Decimal) -> Value {
    Value::String(format!("__NUM__{d}"))
}

fn json_text(v: &Value) -> String {
    let s = serde_json::to_string_pretty(v).unwrap();
    let re = regex::Regex::new(r#""__NUM__([-0-9.]+)""#).unwrap();
    re.replace_all(&s, "$1").into_owned()
}

/// OpenAI's costs are floats: the test sends each amount rounded to 10 decimals, which a
/// double carries exactly as text.
fn openai_amount(d: Decimal) -> Decimal {
    d.round_dp(10).normalize()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_of_provider_reports_names_the_bypass_the_price_and_the_missing_day() {
    let env = TestEnv::new("bills", 1).await;
    let days: Vec<u32> = (1..=30).collect();
    let date = |d: u32| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
    let (bypass_day, missing_day, dearer) = (10u32, 20u32, 1usize);

    // Recorded: every generated request as a stored event, priced by the test.
    let mut rows = Vec::new();
    let mut recorded_cost: BTreeMap<(u32, usize), Decimal> = BTreeMap::new();
    for &d in &days {
        for (m, (provider, model, _)) in MODELS.iter().enumerate() {
            let p = rates(&env, model);
            for (j, r) in traffic(d, m).iter().enumerate() {
                let at = Utc
                    .with_ymd_and_hms(2026, 11, d, 8 + (j % 10) as u32, 0, 0)
                    .unwrap();
                let cost = p.cost(r.input, r.cached, r.written, r.output);
                *recorded_cost.entry((d, m)).or_default() += cost;
                rows.push(tokentally::store::rows::EventRow {
                    provider: (*provider).into(),
                    input_tokens: r.input,
                    cache_read_tokens: r.cached,
                    cache_write_tokens: r.written,
                    output_tokens: r.output,
                    cost,
                    institution_id: ["uni-a", "uni-b"][j % 2].into(),
                    ..event_row(format!("e-{d}-{m}-{j}"), "x", at, model)
                });
            }
        }
    }
    env.store.insert_events(&rows).await.unwrap();

    // The providers' reports. OpenAI: usage on the gateway's key, costs per line item.
    let bypass = Req {
        input: 1000,
        cached: 0,
        written: 0,
        output: 100,
    };
    let mut usage_buckets = Vec::new();
    let mut cost_buckets = Vec::new();
    let mut charged: BTreeMap<(u32, usize), Decimal> = BTreeMap::new();
    for &d in days.iter().filter(|d| **d != missing_day) {
        let start = Utc
            .with_ymd_and_hms(2026, 11, d, 0, 0, 0)
            .unwrap()
            .timestamp();
        let mut usage = Vec::new();
        let mut costs = Vec::new();
        for (m, (provider, model, dated)) in MODELS.iter().enumerate() {
            if *provider != "openai" {
                continue;
            }
            let p = rates(&env, model);
            let mut reqs = traffic(d, m);
            let (mut input, mut cached, mut output) = (0u64, 0u64, 0u64);
            for r in &reqs {
                input += r.input;
                cached += r.cached;
                output += r.output;
            }
            usage.push(json!({"object": "organization.usage.completions.result",
                "input_tokens": input + cached, "input_cached_tokens": cached, "output_tokens": output,
                "input_audio_tokens": 0, "output_audio_tokens": 0, "num_model_requests": reqs.len(),
                "project_id": "proj_gw", "api_key_id": "key_gateway", "model": dated, "user_id": null, "batch": null}));
            if d == bypass_day && m == 0 {
                usage.push(json!({"object": "organization.usage.completions.result",
                    "input_tokens": 200 * bypass.input, "input_cached_tokens": 0, "output_tokens": 200 * bypass.output,
                    "num_model_requests": 200, "project_id": "proj_personal", "api_key_id": "key_laptop",
                    "model": dated, "user_id": null, "batch": null}));
                reqs.extend(std::iter::repeat_n(bypass, 200));
                input += 200 * bypass.input;
                output += 200 * bypass.output;
            }
            let factor = if m == dearer {
                dec!(1.01)
            } else {
                Decimal::ONE
            };
            for (item, usd) in [
                ("input", p.cost(input, 0, 0, 0)),
                ("cached input", p.cost(0, cached, 0, 0)),
                ("output", p.cost(0, 0, 0, output)),
            ] {
                let amount = openai_amount(usd * factor);
                *charged.entry((d, m)).or_default() += amount;
                costs.push(json!({"object": "organization.costs.result",
                    "amount": {"value": number(amount), "currency": "usd"},
                    "line_item": format!("{dated}, {item}"), "project_id": "proj_gw"}));
            }
        }
        usage_buckets.push(json!({"object": "bucket", "start_time": start, "end_time": start + 86_400, "results": usage}));
        cost_buckets.push(json!({"object": "bucket", "start_time": start, "end_time": start + 86_400, "results": costs}));
    }
    // Anthropic: every day, cents as decimal strings, cache writes in `cache_creation`.
    let mut a_usage = Vec::new();
    let mut a_cost = Vec::new();
    for &d in &days {
        let (m, (_, model, dated)) = (2, MODELS[2]);
        let p = rates(&env, model);
        let reqs = traffic(d, m);
        let sum = |f: fn(&Req) -> u64| reqs.iter().map(f).sum::<u64>();
        let (input, cached, written, output) = (
            sum(|r| r.input),
            sum(|r| r.cached),
            sum(|r| r.written),
            sum(|r| r.output),
        );
        let at = |d: u32| {
            Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        };
        let end = date(d)
            .succ_opt()
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        a_usage.push(json!({"starting_at": at(d), "ending_at": end, "results": [{
            "uncached_input_tokens": input, "cache_read_input_tokens": cached,
            "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output, "server_tool_use": {"web_search_requests": 0},
            "api_key_id": "apikey_gw", "workspace_id": null, "model": dated, "service_tier": "standard", "context_window": "0-200k"}]}));
        let mut results = Vec::new();
        for (token_type, usd) in [
            ("uncached_input_tokens", p.cost(input, 0, 0, 0)),
            ("cache_read_input_tokens", p.cost(0, cached, 0, 0)),
            (
                "cache_creation.ephemeral_5m_input_tokens",
                p.cost(0, 0, written, 0),
            ),
            ("output_tokens", p.cost(0, 0, 0, output)),
        ] {
            *charged.entry((d, m)).or_default() += usd;
            results.push(json!({"currency": "USD", "amount": (usd * Decimal::ONE_HUNDRED).normalize().to_string(),
                "workspace_id": null, "description": "usage", "cost_type": "tokens", "context_window": "0-200k",
                "model": dated, "service_tier": "standard", "token_type": token_type}));
        }
        a_cost.push(json!({"starting_at": at(d), "ending_at": end, "results": results}));
    }
    let dir = std::env::temp_dir().join(format!("{}.reports", env.name));
    std::fs::create_dir_all(&dir).unwrap();
    let page = |data: Vec<Value>| json!({"object": "page", "data": data, "has_more": false, "next_page": null});
    let files = [
        ("openai-usage.json", json_text(&page(usage_buckets))),
        ("openai-costs.json", json_text(&page(cost_buckets))),
        // Anthropic's two reports as one file of two pages.
        (
            "anthropic.json",
            json_text(&json!([
            {"data": a_usage, "has_more": false, "next_page": null},
            {"data": a_cost, "has_more": false, "next_page": null}])),
        ),
    ];
    let mut vars = env.cli_vars();
    vars.push(("TOKENTALLY_PROVIDER_BILLS_THRESHOLD_USD", "0.01".into()));
    vars.push((
        "TOKENTALLY_PROVIDER_BILLS_OPENAI_GATEWAY_KEY_IDS",
        "key_gateway".into(),
    ));
    for (name, text) in &files {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = tokentally(
            &["providers", "import", "--file", path.to_str().unwrap()],
            &vars,
            None,
        );
        assert!(out.contains("imported"), "{out}");
    }

    // Reconcile the month.
    let started = std::time::Instant::now();
    let out = tokentally_output(
        &[
            "providers",
            "reconcile",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-30",
            "--format",
            "json",
        ],
        &vars,
        None,
    );
    let elapsed = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "differences over the threshold exit 1: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!(
        "reconciled a month of exports (3 models, 2 providers) in {} ms",
        elapsed.as_millis()
    );
    let lines = report["lines"].as_array().unwrap();
    let line = |d: u32, model: &str| {
        lines
            .iter()
            .find(|l| l["day"] == date(d).to_string() && l["model"] == model)
            .unwrap_or_else(|| panic!("no line for {d} {model}"))
            .clone()
    };
    let dec_of = |v: &Value| -> Decimal { v.as_str().unwrap().parse().unwrap() };
    let causes = |l: &Value| -> Vec<String> {
        l["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["cause"].as_str().unwrap().to_owned())
            .collect()
    };

    // 1. The bypass: 200 requests, their tokens and their worth at the book's prices.
    let mini = rates(&env, "gpt-4o-mini");
    let l = line(bypass_day, "gpt-4o-mini");
    let outside = l["causes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cause"] == "outside_gateway")
        .expect("outside_gateway named");
    assert_eq!(outside["requests"], 200);
    assert_eq!(outside["tokens"], 200 * (bypass.input + bypass.output));
    let bypass_cost = mini.cost(200 * bypass.input, 0, 0, 200 * bypass.output);
    assert_eq!(dec_of(&outside["book_cost"]), bypass_cost);
    assert_eq!(outside["keys"], json!(["key_laptop / proj_personal"]));
    assert_eq!(
        causes(&l),
        vec!["outside_gateway"],
        "nothing else on that line: {l}"
    );
    assert_eq!(l["token_difference"], 200 * (bypass.input + bypass.output));
    assert_eq!(dec_of(&l["book_difference"]), bypass_cost);
    assert_eq!(
        dec_of(&l["cost_difference"]),
        charged[&(bypass_day, 0)] - recorded_cost[&(bypass_day, 0)],
        "the provider's charge minus what was recorded"
    );
    assert!(l["over"].as_bool().unwrap());

    // 2. gpt-4o charged 1 % above the book on every day the reports cover.
    let p4o = rates(&env, "gpt-4o");
    for &d in days.iter().filter(|d| **d != missing_day) {
        let l = line(d, "gpt-4o");
        assert_eq!(causes(&l), vec!["price_mismatch"], "{d}: {l}");
        let mismatch = &l["causes"][0];
        assert_eq!(dec_of(&mismatch["percent"]), dec!(1.00), "{d}");
        let reqs = traffic(d, 1);
        let book = p4o.cost(
            reqs.iter().map(|r| r.input).sum(),
            reqs.iter().map(|r| r.cached).sum(),
            0,
            reqs.iter().map(|r| r.output).sum(),
        );
        assert_eq!(dec_of(&mismatch["amount"]), charged[&(d, 1)] - book, "{d}");
        assert_eq!(
            dec_of(&l["cost_difference"]),
            charged[&(d, 1)] - recorded_cost[&(d, 1)],
            "{d}"
        );
        assert_eq!(l["token_difference"], 0);
        assert!(l["over"].as_bool().unwrap());
    }

    // 3. The missing day: both OpenAI models, recorded cost shown, both reports named.
    for (m, model) in [(0, "gpt-4o-mini"), (1, "gpt-4o")] {
        let l = line(missing_day, model);
        assert_eq!(
            causes(&l),
            vec!["no_provider_report", "no_provider_report"],
            "{l}"
        );
        assert_eq!(l["theirs"], Value::Null);
        assert_eq!(dec_of(&l["ours"]["cost"]), recorded_cost[&(missing_day, m)]);
        assert!(l["over"].as_bool().unwrap());
    }

    // Nothing else is over: every other line matches within the threshold, no cause.
    let over: Vec<(String, String)> = lines
        .iter()
        .filter(|l| l["over"].as_bool().unwrap())
        .map(|l| {
            (
                l["day"].as_str().unwrap().to_owned(),
                l["model"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(over.len(), 29 + 1 + 2, "{over:?}");
    for l in lines.iter().filter(|l| {
        l["provider"] == "anthropic"
            || (l["model"] == "gpt-4o-mini"
                && l["day"] != date(bypass_day).to_string()
                && l["day"] != date(missing_day).to_string())
    }) {
        assert!(causes(l).is_empty() && !l["over"].as_bool().unwrap(), "{l}");
    }
    let anthropic = report["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "anthropic")
        .unwrap();
    let a_recorded: Decimal = days.iter().map(|d| recorded_cost[&(*d, 2)]).sum();
    assert_eq!(dec_of(&anthropic["ours"]), a_recorded);
    assert_eq!(
        dec_of(&anthropic["theirs"]),
        a_recorded,
        "Anthropic's cents are exact"
    );
    let openai = report["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "openai")
        .unwrap();
    assert_eq!(openai["days_covered"], 29);
    let on = |m: usize, covered: bool| -> Decimal {
        days.iter()
            .filter(|d| (**d != missing_day) == covered)
            .map(|d| recorded_cost[&(*d, m)])
            .sum()
    };
    assert_eq!(dec_of(&openai["ours"]), on(0, true) + on(1, true));
    assert_eq!(
        dec_of(&openai["ours_uncovered"]),
        on(0, false) + on(1, false)
    );
    let openai_charged: Decimal = charged
        .iter()
        .filter(|((_, m), _)| *m < 2)
        .map(|(_, c)| *c)
        .sum();
    assert_eq!(dec_of(&openai["theirs"]), openai_charged);

    // The table says the same in words.
    let text = tokentally_output(
        &[
            "providers",
            "reconcile",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-30",
            "--no-alert",
        ],
        &vars,
        None,
    );
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("traffic not through the gateway: 200 request(s), 220000 tokens"),
        "{text}"
    );
    assert!(
        text.contains("price mismatch: the provider charged +1.00%"),
        "{text}"
    );
    assert!(
        text.contains("openai's usage report does not cover this day"),
        "{text}"
    );

    // One alert for OpenAI's differences in this range, raised once.
    let alerts = env
        .scalar(&format!(
            "SELECT count() FROM {}.alerts WHERE kind = 'provider_bill' AND entity = 'openai:2026-11-01..2026-11-30'",
            env.name
        ))
        .await;
    assert_eq!(alerts, 1);
    let again = tokentally_output(
        &[
            "providers",
            "reconcile",
            "--from",
            "2026-11-01",
            "--to",
            "2026-11-30",
        ],
        &vars,
        None,
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("raised before; not again"));

    // The missing day arrives: a re-import covers it, and its lines match.
    let start = Utc
        .with_ymd_and_hms(2026, 11, missing_day, 0, 0, 0)
        .unwrap()
        .timestamp();
    let mut usage = Vec::new();
    let mut costs = Vec::new();
    for (m, (_, model, dated)) in MODELS.iter().enumerate().take(2) {
        let p = rates(&env, model);
        let reqs = traffic(missing_day, m);
        let (input, cached, output) = (
            reqs.iter().map(|r| r.input).sum::<u64>(),
            reqs.iter().map(|r| r.cached).sum::<u64>(),
            reqs.iter().map(|r| r.output).sum::<u64>(),
        );
        usage.push(json!({"object": "organization.usage.completions.result", "input_tokens": input + cached,
            "input_cached_tokens": cached, "output_tokens": output, "num_model_requests": reqs.len(),
            "project_id": "proj_gw", "api_key_id": "key_gateway", "model": dated}));
        costs.push(json!({"object": "organization.costs.result",
            "amount": {"value": number(openai_amount(p.cost(input, cached, 0, output))), "currency": "usd"},
            "line_item": format!("{dated}, input"), "project_id": "proj_gw"}));
    }
    let day20 = dir.join("openai-day20.json");
    std::fs::write(
        &day20,
        json_text(&json!([
            page(vec![
                json!({"start_time": start, "end_time": start + 86_400, "results": usage})
            ]),
            page(vec![
                json!({"start_time": start, "end_time": start + 86_400, "results": costs})
            ]),
        ])),
    )
    .unwrap();
    tokentally(
        &["providers", "import", "--file", day20.to_str().unwrap()],
        &vars,
        None,
    );
    let out = tokentally_output(
        &[
            "providers",
            "reconcile",
            "--from",
            "2026-11-20",
            "--to",
            "2026-11-20",
            "--format",
            "json",
        ],
        &vars,
        None,
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let day = report["lines"].as_array().unwrap();
    assert_eq!(day.len(), 3);
    for l in day {
        assert!(causes(l).is_empty() && !l["over"].as_bool().unwrap(), "{l}");
    }
    assert_eq!(out.status.code(), Some(0));
    env.drop_database().await;
}

/// The loop end to end: clients call through the gateway with the official SDKs, ingest
/// stores the events, `providers import` fetches the simulator's usage and cost reports
/// through the providers' admin-API paths, and `providers reconcile` finds them equal —
/// except three requests a laptop sent straight to the provider with a key of its own,
/// named as traffic not through the gateway with the tokens the simulator answered them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_fetched_from_the_provider_match_gateway_traffic_but_the_bypass() {
    let env = TestEnv::new("billsim", 1).await;
    let laptop = "sk-laptop-direct-9f2";
    let sim = spawn_simulator(&env, &[laptop]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = spawn_gateway(&env, "a", env.gateway_vars(&sim, dir.path())).await;
    let _ingest = env.spawn_ingest();
    let (_, key) = crate::gateway::create_key(&env, "uni-oslo", "alice@uni-oslo.no", &[]);
    crate::gateway::until_accepted(&gw, &key).await;
    let today = Utc::now().date_naive();
    let yesterday = today.pred_opt().unwrap();

    let user = |text: &str| json!([{"role": "user", "content": text}]);
    let via = json!([
        {"sdk": "openai", "api": "chat", "model": "gpt-4o-mini", "messages": user("what is two plus two"),
         "headers": {"x-simulator": "words=7,cached=2"}},
        {"sdk": "openai", "api": "chat", "stream": true, "model": "gpt-4o-mini",
         "messages": user("stream me a short answer please"), "headers": {"x-simulator": "words=9"}},
        {"sdk": "openai", "api": "responses", "model": "gpt-5-mini", "input": "explain lifetimes briefly",
         "headers": {"x-simulator": "words=11,reasoning=6,cached=2"}},
        {"sdk": "openai", "api": "embeddings", "model": "text-embedding-3-small",
         "input": ["one two three", "four five"]},
    ]);
    let via_anthropic = json!([
        {"sdk": "anthropic", "api": "messages", "model": "claude-haiku-4-5", "max_tokens": 100,
         "messages": user("hello claude how are you"), "headers": {"x-simulator": "words=6,cached=3"}},
        {"sdk": "anthropic", "api": "messages", "stream": true, "model": "claude-haiku-4-5", "max_tokens": 100,
         "messages": user("stream hello"), "headers": {"x-simulator": "words=10"}},
    ]);
    let bypass = json!([
        {"sdk": "openai", "api": "chat", "model": "gpt-4o-mini", "messages": user("a quick one from my laptop")},
        {"sdk": "openai", "api": "chat", "model": "gpt-4o-mini", "messages": user("and another from the laptop"),
         "headers": {"x-simulator": "words=20"}},
        {"sdk": "openai", "api": "chat", "model": "gpt-4o-mini", "messages": user("third")},
    ]);
    for r in
        sdk_calls(&gw.base, &key, &via)
            .iter()
            .chain(&sdk_calls(&gw.base, &key, &via_anthropic))
    {
        assert_eq!(r["ok"], true, "{r}");
    }
    let direct = sdk_calls(&sim.base, laptop, &bypass);
    let mut bypass_tokens = 0;
    for r in &direct {
        assert_eq!(r["ok"], true, "{r}");
        bypass_tokens += r["response"]["usage"]["total_tokens"].as_u64().unwrap();
    }
    env.wait_accounted(6, std::time::Duration::from_secs(60))
        .await;

    let sha = |k: &str| {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(k.as_bytes())[..8])
    };
    let mut vars = env.cli_vars();
    vars.extend([
        (
            "TOKENTALLY_PROVIDER_BILLS_THRESHOLD_USD",
            "0.000001".to_owned(),
        ),
        (
            "TOKENTALLY_PROVIDER_BILLS_OPENAI_BASE_URL",
            sim.base.clone(),
        ),
        (
            "TOKENTALLY_PROVIDER_BILLS_OPENAI_ADMIN_KEY",
            "sk-admin-test-1".to_owned(),
        ),
        (
            "TOKENTALLY_PROVIDER_BILLS_OPENAI_GATEWAY_KEY_IDS",
            format!("key_{}", sha(PLATFORM_KEYS[0].1)),
        ),
        (
            "TOKENTALLY_PROVIDER_BILLS_ANTHROPIC_BASE_URL",
            sim.base.clone(),
        ),
        (
            "TOKENTALLY_PROVIDER_BILLS_ANTHROPIC_ADMIN_KEY",
            "sk-ant-admin-test-1".to_owned(),
        ),
        (
            "TOKENTALLY_PROVIDER_BILLS_ANTHROPIC_GATEWAY_KEY_IDS",
            format!("apikey_{}", sha(PLATFORM_KEYS[1].1)),
        ),
    ]);
    let (from, to) = (yesterday.to_string(), today.to_string());

    // Finance, in the browser: nothing imported yet; "Fetch" imports both providers'
    // reports over the admin API and the page names the laptop's requests.
    let s = crate::web::start_server_with(
        &env,
        &format!(
            "[provider_bills]\nthreshold_usd = \"0.000001\"\n\
             [provider_bills.openai]\nbase_url = \"{base}\"\nadmin_key = \"sk-admin-test-1\"\ngateway_key_ids = [\"key_{o}\"]\n\
             [provider_bills.anthropic]\nbase_url = \"{base}\"\nadmin_key = \"sk-ant-admin-test-1\"\ngateway_key_ids = [\"apikey_{a}\"]\n",
            base = sim.base,
            o = sha(PLATFORM_KEYS[0].1),
            a = sha(PLATFORM_KEYS[1].1)
        ),
    )
    .await;
    let (_driver, browser, _profile) = crate::web::headless_chromium(1280, 1000).await;
    let page = async {
        use fantoccini::Locator;
        browser.goto(&format!("{}/login", s.base)).await?;
        browser
            .find(Locator::Css("input[name=username]"))
            .await?
            .send_keys("fin")
            .await?;
        browser
            .find(Locator::Css("input[name=password]"))
            .await?
            .send_keys("fin-password")
            .await?;
        browser
            .find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;
        browser.wait().for_element(Locator::Css(".figure")).await?;
        browser
            .find(Locator::LinkText("Provider bills"))
            .await?
            .click()
            .await?;
        browser
            .wait()
            .for_element(Locator::Css("#fetch-reports"))
            .await?;
        browser
            .goto(&format!("{}/providers?from={from}&to={to}", s.base))
            .await?;
        let before = browser.find(Locator::Css("main")).await?.text().await?;
        assert!(
            before.contains("No provider report is imported for these days"),
            "{before}"
        );
        browser
            .find(Locator::Css("#fetch-reports"))
            .await?
            .click()
            .await?;
        let msg = crate::web::changed_text(&browser, "#providers-message", "").await;
        assert!(
            msg.contains("Imported openai usage") && msg.contains("anthropic cost"),
            "{msg}"
        );
        let over = browser
            .find(Locator::Css("#provider-lines tr.line.over"))
            .await?;
        assert_eq!(
            over.attr("data-model").await?.as_deref(),
            Some("gpt-4o-mini")
        );
        let text = browser
            .find(Locator::Css("#provider-lines tr.causes.over"))
            .await?
            .text()
            .await?;
        assert!(
            text.contains(&format!(
                "traffic not through the gateway: 3 request(s), {bypass_tokens} tokens"
            )),
            "{text}"
        );
        let rows = browser
            .find_all(Locator::Css("#provider-lines tbody tr.line"))
            .await?;
        assert_eq!(rows.len(), 1, "only the line with a difference is listed");
        let shots = crate::harness::repo().join("target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        std::fs::write(
            shots.join("providers-1280.png"),
            browser.screenshot().await?,
        )
        .unwrap();
        Ok::<(), fantoccini::error::CmdError>(())
    }
    .await;
    let _ = browser.close().await;
    page.unwrap();
    // Finance and admin only: an institution's token is refused, anonymous sent away.
    use crate::web::{get, Auth};
    let api = format!("{}/api/v1/providers?from={from}&to={to}", s.base);
    assert_eq!(
        get(&api, &Auth::Bearer(&s.tokens["fin"])).await.status(),
        200
    );
    assert_eq!(
        get(&api, &Auth::Bearer(&s.tokens["inst-a"])).await.status(),
        403
    );
    assert_eq!(get(&api, &Auth::Anonymous).await.status(), 401);

    // The same with the command: a re-import replaces the page's, the comparison agrees.
    let out = tokentally(
        &["providers", "import", "--from", &from, "--to", &to],
        &vars,
        None,
    );
    assert_eq!(
        out.matches("imported").count(),
        4,
        "two reports of two providers: {out}"
    );
    assert!(
        !out.contains("sk-admin") && !out.contains("sk-ant-admin"),
        "no admin key printed: {out}"
    );

    let run = tokentally_output(
        &[
            "providers",
            "reconcile",
            "--from",
            &from,
            "--to",
            &to,
            "--format",
            "json",
            "--no-alert",
        ],
        &vars,
        None,
    );
    let report: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        run.status.code(),
        Some(1),
        "the bypass is over the threshold: {report}"
    );
    let lines = report["lines"].as_array().unwrap();
    let models: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l["model"].as_str().unwrap()).collect();
    let bypassed = lines.iter().filter(|l| l["over"] == true).count();
    assert_eq!(
        bypassed, 1,
        "one line holds the laptop's requests: {report}"
    );
    assert_eq!(
        models,
        [
            "claude-haiku-4-5",
            "gpt-4o-mini",
            "gpt-5-mini",
            "text-embedding-3-small"
        ]
        .into_iter()
        .collect()
    );
    for l in lines {
        // Yesterday is covered by both reports and empty on both sides, unless the test
        // ran across midnight.
        let causes = l["causes"].as_array().unwrap();
        if l["model"] == "gpt-4o-mini" && l["token_difference"].as_i64().unwrap() != 0 {
            assert_eq!(causes.len(), 1, "{l}");
            assert_eq!(causes[0]["cause"], "outside_gateway", "{l}");
            assert_eq!(causes[0]["requests"], 3);
            assert_eq!(causes[0]["tokens"].as_u64().unwrap(), bypass_tokens);
            assert_eq!(l["token_difference"].as_u64().unwrap(), bypass_tokens);
            assert!(l["over"].as_bool().unwrap());
        } else {
            assert!(causes.is_empty(), "recorded and reported agree: {l}");
            assert_eq!(l["token_difference"], 0, "{l}");
            assert!(!l["over"].as_bool().unwrap(), "{l}");
        }
    }
    env.drop_database().await;
}
