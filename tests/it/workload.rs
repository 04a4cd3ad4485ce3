//! Test traffic whose expected outcome the test knows by construction: the canonical
//! token counts are chosen first, then rendered in a provider's own usage shape, and the
//! expected cost is computed from the price book's TOML by `harness::list_price`.

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::Decimal;
use serde_json::json;

use crate::harness::{list_price, ListPrice};

pub struct Workload {
    /// (key, payload) in publish order.
    pub messages: Vec<(String, Vec<u8>)>,
    pub expected_cost: BTreeMap<String, Decimal>,
    pub expected_events: BTreeMap<String, i64>,
    pub unpriced: i64,
    pub events: i64,
    pub duplicates: i64,
    pub malformed: Vec<Vec<u8>>,
    /// Canonical token sums (input, cache_read, cache_write, output) of unpriced events.
    pub unpriced_tokens: BTreeMap<String, [u64; 4]>,
}

pub struct Mix {
    pub events: usize,
    pub duplicates: f64,
    pub malformed: f64,
    pub unknown_model: f64,
    pub institutions: usize,
}

const MODELS: [(&str, &str); 4] = [
    ("openai", "gpt-4o-mini"),
    ("openai", "gpt-4.1-mini"),
    ("anthropic", "claude-haiku-4-5"),
    ("gemini", "gemini-2.0-flash"),
];
pub const UNKNOWN_MODEL: &str = "acme-llm-1";

pub fn build(seed: u64, mix: &Mix, prices: &Path) -> Workload {
    let rates: Vec<ListPrice> = MODELS.iter().map(|(_, m)| list_price(prices, m)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut w = Workload {
        messages: Vec::new(),
        expected_cost: BTreeMap::new(),
        expected_events: BTreeMap::new(),
        unpriced: 0,
        events: 0,
        duplicates: 0,
        malformed: Vec::new(),
        unpriced_tokens: BTreeMap::new(),
    };
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    while (w.events as usize) < mix.events {
        let r: f64 = rng.gen();
        if r < mix.duplicates && !sent.is_empty() {
            let m = sent[rng.gen_range(0..sent.len())].clone();
            w.messages.push(m);
            w.duplicates += 1;
            continue;
        }
        let inst = format!("inst-{}", rng.gen_range(0..mix.institutions));
        let day = rng.gen_range(1..=28);
        let occurred = format!(
            "2026-10-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rng.gen_range(0..24),
            rng.gen_range(0..60),
            rng.gen_range(0..60),
            rng.gen_range(0..1000)
        );
        let event_id = format!("{inst}-{seed}-{}", w.messages.len());
        let unknown = rng.gen::<f64>() < mix.unknown_model;
        let mi = rng.gen_range(0..MODELS.len());
        let (provider, model) = if unknown {
            ("openai", UNKNOWN_MODEL)
        } else {
            MODELS[mi]
        };
        // Canonical, disjoint counts first.
        let input: u64 = rng.gen_range(1..20_000);
        let cache_read: u64 = if rng.gen_bool(0.4) {
            rng.gen_range(1..50_000)
        } else {
            0
        };
        let cache_write: u64 = if provider == "anthropic" && rng.gen_bool(0.3) {
            rng.gen_range(1..10_000)
        } else {
            0
        };
        let output: u64 = rng.gen_range(1..4_000);
        let reasoning: u64 = if provider != "anthropic" && rng.gen_bool(0.3) {
            rng.gen_range(0..=output)
        } else {
            0
        };
        let shape = rng.gen_range(0..3);
        let mut v = json!({
            "schema_version": 1, "event_id": event_id, "occurred_at": occurred,
            "institution_id": inst, "user_id": format!("u{}@{inst}", rng.gen_range(0..20)),
            "api_key_id": format!("pk_{}", rng.gen_range(0..5)), "provider": provider, "model": model,
        });
        let o = v.as_object_mut().unwrap();
        match (provider, shape) {
            (_, 0) => {
                o.insert("usage".into(), json!({"input_tokens": input, "cache_read_tokens": cache_read,
                "cache_write_tokens": cache_write, "output_tokens": output, "reasoning_tokens": reasoning}));
            }
            ("openai", 1) => {
                o.insert(
                    "provider_usage".into(),
                    json!({"prompt_tokens": input + cache_read,
                "completion_tokens": output, "prompt_tokens_details": {"cached_tokens": cache_read},
                "completion_tokens_details": {"reasoning_tokens": reasoning}}),
                );
            }
            ("openai", _) => {
                o.insert(
                    "provider_usage".into(),
                    json!({"input_tokens": input + cache_read,
                "output_tokens": output, "input_tokens_details": {"cached_tokens": cache_read},
                "output_tokens_details": {"reasoning_tokens": reasoning}}),
                );
            }
            ("anthropic", _) => {
                o.insert("provider_usage".into(), json!({"input_tokens": input,
                "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_write, "output_tokens": output}));
            }
            (_, _) => {
                o.insert(
                    "provider_usage".into(),
                    json!({"promptTokenCount": input + cache_read,
                "cachedContentTokenCount": cache_read, "candidatesTokenCount": output - reasoning,
                "thoughtsTokenCount": reasoning}),
                );
            }
        }
        let payload = v.to_string().into_bytes();

        if rng.gen::<f64>() < mix.malformed {
            let bad = malformed(&mut rng, &v);
            w.malformed.push(bad.clone());
            w.messages.push((inst, bad));
            continue;
        }
        w.events += 1;
        *w.expected_events.entry(inst.clone()).or_default() += 1;
        let cost = if unknown {
            w.unpriced += 1;
            let t = w.unpriced_tokens.entry(inst.clone()).or_default();
            for (slot, n) in t.iter_mut().zip([input, cache_read, cache_write, output]) {
                *slot += n;
            }
            Decimal::ZERO
        } else {
            rates[mi].cost(input, cache_read, cache_write, output)
        };
        *w.expected_cost.entry(inst.clone()).or_default() += cost;
        sent.push((inst.clone(), payload.clone()));
        w.messages.push((inst, payload));
    }
    for c in w.expected_cost.values_mut() {
        *c = c.normalize();
    }
    w
}

fn malformed(rng: &mut ChaCha8Rng, good: &serde_json::Value) -> Vec<u8> {
    let mut v = good.clone();
    let o = v.as_object_mut().unwrap();
    match rng.gen_range(0..7) {
        0 => {
            let s = good.to_string();
            return s.as_bytes()[..s.len() / 3].to_vec();
        }
        1 => {
            o.remove("event_id");
        }
        2 => {
            o.remove("usage");
            o.remove("provider_usage");
        }
        3 => {
            o.remove("provider_usage");
            o.insert(
                "usage".into(),
                json!({"input_tokens": -1, "output_tokens": 1}),
            );
        }
        4 => {
            o.insert("occurred_at".into(), json!("2199-01-01T00:00:00Z"));
        }
        5 => {
            o.insert("schema_version".into(), json!(99));
        }
        _ => return b"\xff\xfe garbage".to_vec(),
    }
    // Unique per message so that payload sets compare one to one.
    o.insert("noise".into(), json!(rng.gen::<u64>()));
    v.to_string().into_bytes()
}
