//! Benchmark (not a test): how long the gateway takes to decide one request against its
//! limits, in process — the worst case from the shipped price book plus the reservation
//! under the lock, then the settlement — with 10,000 keys each under a USD limit, a user
//! request quota and their institution's budget. Prints p50/p99/max of the decision.
//!
//!   cargo run --release --example bench_admission [-- KEYS REQUESTS]

use std::collections::HashMap;
use std::time::Instant;

use chrono::Utc;
use rust_decimal::Decimal;
use tokentally::domain::{Limit, LimitMode, LimitPeriod, LimitScope, Metric};
use tokentally::gateway::admission::{worst_case, Bounds};
use tokentally::gateway::budget::{Admission, Amounts, Budgets, Who};
use tokentally::gateway::wire::{body, Api, Provider};
use tokentally::price::PriceBook;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let keys = args.first().copied().unwrap_or(10_000);
    let requests = args.get(1).copied().unwrap_or(200_000);
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
    let zones: HashMap<String, chrono_tz::Tz> = (0..institutions)
        .map(|i| (format!("inst-{i}"), chrono_tz::Europe::Oslo))
        .collect();
    let budgets = Budgets::new(zones);
    let now = Utc::now();
    let reads: Vec<_> = budgets
        .plan(&limits, now)
        .into_iter()
        .map(|r| (r, vec![]))
        .collect();
    budgets.apply(limits, &reads, &HashMap::new(), 1, now);
    let raw = br#"{"model":"gpt-4o-mini","max_tokens":500,"messages":[{"role":"user","content":"how long is a piece of string, and why does it matter to anyone at all?"}]}"#;
    let prepared = body::prepare(Api::ChatCompletions, raw, "pseudonym").unwrap();
    let mut times = Vec::with_capacity(requests);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for i in 0..requests {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let k = (state % keys as u64) as usize;
        let (inst, user, key) = (
            format!("inst-{}", k % institutions),
            format!("user-{k}"),
            format!("key-{k}"),
        );
        let who = Who {
            institution: &inst,
            user: &user,
            key: &key,
        };
        let t = Instant::now();
        let decided = if budgets.applies(&who) {
            let ask = worst_case(
                &book,
                &bounds,
                Provider::OpenAi,
                Api::ChatCompletions,
                "gpt-4o-mini",
                raw,
                &prepared,
                now,
            );
            budgets.admit(&who, &ask, now)
        } else {
            Admission::Free
        };
        times.push(t.elapsed());
        if let Admission::Admitted(r) = decided {
            r.settle(
                &format!("e{i}"),
                Amounts {
                    usd: Decimal::new(3, 5),
                    requests: 1,
                    tokens: 300,
                },
            );
        } else {
            panic!("refused");
        }
    }
    times.sort();
    let q = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!(
        "admission with {keys} keys ({} limits), {requests} decisions: p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
        budgets.limit_count(),
        q(0.5),
        q(0.99),
        q(0.999),
        times[times.len() - 1]
    );
}
