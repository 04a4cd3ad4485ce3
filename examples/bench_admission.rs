//! Benchmark (not a test): how long the gateway takes to decide one request against its
//! limits — the worst case from the shipped price book plus the reservation, then the
//! settlement — with 10,000 keys each under a USD limit, a user request quota and their
//! institution's budget. Prints p50/p99/max of the decision.
//!
//!   cargo run --release --example bench_admission [-- KEYS REQUESTS]
//!       in process (one instance, no shared store), as fast as it goes;
//!   cargo run --release --example bench_admission -- KEYS REQUESTS redis://127.0.0.1:6379 RATE
//!       through the shared store (one Redis round trip per decision), paced at RATE
//!       decisions per second (default 1,000).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use rust_decimal::Decimal;
use tokentally::limits::budget::{Budgets, Who};
use tokentally::limits::estimate::{worst_case, Bounds, Request};
use tokentally::limits::gate::{Decision, Gate, Subject};
use tokentally::limits::shared::{Settings, SharedStore};
use tokentally::limits::{Amounts, Limit, LimitMode, LimitPeriod, LimitScope, Metric};
use tokentally::price::PriceBook;

fn limits(keys: usize, institutions: usize) -> Vec<Limit> {
    let mut limits = Vec::new();
    for k in 0..keys {
        let inst = format!("inst-{}", k % institutions);
        limits.push(Limit {
            institution_id: inst.clone(),
            scope: LimitScope::Key,
            subject: format!("key-{k}"),
            metric: Metric::Usd,
            period: LimitPeriod::Month,
            amount: Decimal::from(1_000_000),
            mode: LimitMode::Block,
        });
        limits.push(Limit {
            institution_id: inst,
            scope: LimitScope::User,
            subject: format!("user-{k}"),
            metric: Metric::Requests,
            period: LimitPeriod::Day,
            amount: Decimal::from(1_000_000),
            mode: LimitMode::Block,
        });
    }
    for i in 0..institutions {
        limits.push(Limit {
            institution_id: format!("inst-{i}"),
            scope: LimitScope::Institution,
            subject: String::new(),
            metric: Metric::Usd,
            period: LimitPeriod::Month,
            amount: Decimal::from(1_000_000_000u64),
            mode: LimitMode::Block,
        });
    }
    limits
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let keys: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let requests: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let redis = args.get(2).cloned();
    let rate: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let book = PriceBook::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/prices"
    )))
    .unwrap();
    let bounds = Bounds {
        overhead_tokens: 512,
        image_tokens: 3000,
        default_output_tokens: 100_000,
    };
    let institutions = 50;
    let limits = limits(keys, institutions);
    let zones: HashMap<String, chrono_tz::Tz> = (0..institutions)
        .map(|i| (format!("inst-{i}"), chrono_tz::Europe::Oslo))
        .collect();
    let budgets = Budgets::new(zones, "bench");
    let now = Utc::now();
    let reads: Vec<_> = budgets
        .plan(&limits, now)
        .into_iter()
        .map(|r| (r, vec![]))
        .collect();
    budgets.apply(limits, &reads, &HashMap::new(), now);
    let shared = redis.as_ref().map(|url| {
        SharedStore::new(Settings {
            url: url.clone(),
            namespace: format!("tokentally-bench:{}", uuid::Uuid::new_v4().simple()),
            timeout: Duration::from_millis(250),
            reservation_ttl: Duration::from_secs(30),
            pending_ttl: Duration::from_secs(900),
            leader_ttl: Duration::from_secs(3),
        })
        .unwrap()
    });
    if let Some(s) = &shared {
        s.sync(&budgets, &HashMap::new(), now)
            .await
            .expect("the shared store answers");
    }
    let gate = Gate::new(budgets.clone(), shared.clone());
    let raw = br#"{"model":"gpt-4o-mini","max_tokens":500,"messages":[{"role":"user","content":"how long is a piece of string, and why does it matter to anyone at all?"}]}"#;
    let mut times = Vec::with_capacity(requests);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let pace = shared
        .as_ref()
        .map(|_| Duration::from_secs_f64(1.0 / rate as f64));
    let started = Instant::now();
    for i in 0..requests {
        if let Some(p) = pace {
            let due = started + p * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let k = (state % keys as u64) as usize;
        let (inst, user, key) = (
            format!("inst-{}", k % institutions),
            format!("user-{k}"),
            format!("key-{k}"),
        );
        let subject = Subject {
            who: Who {
                institution: &inst,
                user: &user,
                key: &key,
            },
            rpm: 0,
            tpm: 0,
        };
        let now = Utc::now();
        let t = Instant::now();
        let decided = gate
            .admit(
                &subject,
                || {
                    worst_case(
                        &book,
                        &bounds,
                        &Request {
                            provider: "openai",
                            model: "gpt-4o-mini",
                            body: raw,
                            max_output_tokens: Some(500),
                            choices: 1,
                            writes_output: true,
                        },
                        now,
                    )
                },
                now,
            )
            .await;
        times.push(t.elapsed());
        match decided {
            Decision::Admitted {
                reservation: Some(r),
                ..
            } => r.settle(
                &format!("e{i}"),
                Amounts {
                    usd: Decimal::new(3, 5),
                    requests: 1,
                    tokens: 300,
                },
            ),
            other => panic!("not admitted: {other:?}"),
        }
    }
    if shared.as_ref().is_some_and(|s| !s.is_up()) {
        panic!("the shared store stopped answering: these are fallback decisions");
    }
    times.sort();
    let q = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "admission {} with {keys} keys ({} limits), {requests} decisions{}: p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
        if shared.is_some() { "through the shared store" } else { "in process" },
        budgets.limit_count(),
        pace.map(|_| format!(" at {rate}/s")).unwrap_or_default(),
        q(0.5),
        q(0.99),
        q(0.999),
        times[times.len() - 1]
    );
}
