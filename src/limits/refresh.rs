//! Limits at the gateway, around `budget`: the worst case of a request (what it reserves)
//! and the loop that keeps every instance's limits, stored usage, price book and the
//! other instances' holds fresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::budget::{Amounts, Ask, Budgets, LimitSet};
use super::wire::body::Prepared;
use super::wire::{Api, Provider};
use crate::config::GatewayConfig;
use crate::domain::Limit;
use crate::ingest::watch::BookWatcher;
use crate::price::PriceBook;
use crate::shutdown::Shutdown;
use crate::store::Store;

/// Service tiers a request may be served in; the worst case takes the dearest.
const TIERS: [&str; 4] = ["", "priority", "flex", "batch"];

/// The stated bounds of a worst case (`[gateway]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub overhead_tokens: u64,
    pub image_tokens: u64,
    pub default_output_tokens: u64,
}

impl Bounds {
    pub fn from_config(g: &GatewayConfig) -> Self {
        Self {
            overhead_tokens: g.reserve_overhead_tokens,
            image_tokens: g.reserve_image_tokens,
            default_output_tokens: g.reserve_default_output_tokens,
        }
    }
}

/// The most a request can use, before it is sent:
/// - prompt: one token per byte of the body (every tokenizer the providers use makes a
///   token of at least one byte of text, and the body holds the text plus JSON), plus
///   the providers' own preambles (`overhead_tokens`), plus `image_tokens` for every
///   mention of an image (an image by URL costs tokens its bytes do not show);
/// - output: the request's cap (`max_tokens`, `max_completion_tokens`,
///   `max_output_tokens`, `maxOutputTokens`) times the answers asked for, else the
///   model's maximum output from the price book, else `default_output_tokens`;
/// - USD: that many tokens at the dearest rates of every entry the model could be priced
///   by today (all service tiers, the long-context tier the prompt could reach).
#[allow(clippy::too_many_arguments)]
pub fn worst_case(
    book: &PriceBook,
    bounds: &Bounds,
    provider: Provider,
    api: Api,
    model: &str,
    body: &[u8],
    prepared: &Prepared,
    now: DateTime<Utc>,
) -> Ask {
    let images = count(body, b"image") + count(body, b"Image");
    let prompt = body.len() as u64 + bounds.overhead_tokens + bounds.image_tokens * images;
    let date = now.date_naive();
    let entries: Vec<_> = TIERS
        .iter()
        .filter_map(|t| book.lookup(provider.event_name(), model, t, date))
        .collect();
    let output = if matches!(api, Api::Embeddings) {
        0
    } else {
        prepared
            .max_output_tokens
            .or_else(|| entries.iter().filter_map(|e| e.max_output_tokens).max())
            .unwrap_or(bounds.default_output_tokens)
            .saturating_mul(prepared.choices)
    };
    let usd = entries
        .iter()
        .map(|e| crate::price::worst_case(e, prompt, output))
        .max()
        .ok_or_else(|| {
            format!(
                "the model {} has no price",
                crate::format::log_safe(model, 100)
            )
        });
    Ask {
        usd,
        tokens: prompt.saturating_add(output),
    }
}

fn count(hay: &[u8], needle: &[u8]) -> u64 {
    hay.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

/// The limits last read, and the table's fingerprint (row count, highest version) then:
/// the limits are read again only when it changes.
#[derive(Default)]
pub struct LimitsCache {
    fingerprint: Option<(u64, u64)>,
}

/// One refresh: limits (when they changed), their stored usage, the other instances'
/// holds; then this instance's holds reported.
pub async fn refresh(
    budgets: &Budgets,
    store: &Store,
    configured: &[Limit],
    instance: &str,
    cache: &mut LimitsCache,
    now: DateTime<Utc>,
) -> anyhow::Result<()> {
    let fingerprint = store.limits_fingerprint().await?;
    let set = if cache.fingerprint == Some(fingerprint) {
        budgets.limit_set()
    } else {
        LimitSet::new(crate::limits::current(store, configured).await?)
    };
    let limits_empty = set.is_empty();
    let reads = budgets.plan_set(&set, now);
    let mut results = Vec::with_capacity(reads.len());
    for r in reads {
        // The empty id never matches: it keeps the list's type known to ClickHouse.
        let mut pending = r.pending.clone();
        pending.push(String::new());
        let rows = store
            .limit_usage(
                &r.institution,
                r.start.timestamp(),
                r.end.timestamp(),
                pending,
            )
            .await?;
        results.push((r, rows));
    }
    let mut others: HashMap<(String, i64), Amounts> = HashMap::new();
    let mut live = std::collections::HashSet::from([instance.to_owned()]);
    if !limits_empty {
        // Reports older than ten seconds are of instances that are gone.
        for h in store.live_holds(now.timestamp() - 10).await? {
            live.insert(h.instance.clone());
            if h.instance == instance || h.limit_id.is_empty() {
                continue;
            }
            let a = others
                .entry((h.limit_id.clone(), i64::from(h.period_start)))
                .or_default();
            a.add(&h.reserved());
            a.add(&h.pending());
        }
    }
    budgets.apply_set(set, &results, &others, live.len(), now);
    cache.fingerprint = Some(fingerprint);
    let mut holds = budgets.holds(instance, now);
    if !limits_empty {
        // A row of its own tells the others this instance is live (it takes a share).
        holds.push(crate::store::limits::HoldRow::heartbeat(
            instance,
            u32::try_from(now.timestamp()).unwrap_or(0),
        ));
    }
    store.write_holds(&holds).await?;
    Ok(())
}

/// Refreshes every `every` until `shutdown`; reloads the price book when its files change.
#[allow(clippy::too_many_arguments)]
pub async fn keep_fresh(
    budgets: Arc<Budgets>,
    store: Store,
    configured: Vec<Limit>,
    instance: String,
    mut book: BookWatcher,
    current_book: Arc<std::sync::RwLock<Arc<PriceBook>>>,
    metrics: Arc<super::metrics::Metrics>,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let mut failing = false;
    let mut cache = LimitsCache::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        book.maybe_reload();
        if let Ok(mut b) = current_book.write() {
            if b.version() != book.current().version() {
                *b = book.current();
            }
        }
        match refresh(
            &budgets,
            &store,
            &configured,
            &instance,
            &mut cache,
            Utc::now(),
        )
        .await
        {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("limits and usage read again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot refresh limits and usage; deciding on the last known state");
            }
            Err(_) => {}
        }
        metrics.limits.set(budgets.limit_count() as i64);
        metrics.reservations_open.set(budgets.open().0 as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use rust_decimal_macros::dec;

    const BOOK: &str = r#"
[[price]]
provider = "openai"
model = "gpt-4o"
match = "gpt-4o"
effective_from = "2024-01-01"
max_output_tokens = 16384
input_per_mtok = "2.5"
cache_read_per_mtok = "1.25"
output_per_mtok = "10"

[[price]]
provider = "openai"
model = "gpt-4o"
match = "gpt-4o"
effective_from = "2024-01-01"
service_tier = "priority"
input_per_mtok = "4.25"
output_per_mtok = "17"
"#;

    fn prepared(body: &[u8]) -> Prepared {
        super::super::wire::body::prepare(Api::ChatCompletions, body, "u").unwrap()
    }

    #[test]
    fn the_worst_case_takes_the_dearest_tier_and_the_cap() {
        let book = PriceBook::from_sources(&[("b.toml".into(), BOOK.into())]).unwrap();
        let bounds = Bounds {
            overhead_tokens: 500,
            image_tokens: 3000,
            default_output_tokens: 1000,
        };
        let now = "2026-12-03T12:00:00Z".parse().unwrap();
        let body = br#"{"model":"gpt-4o","max_tokens":100,"n":2,"messages":[{"role":"user","content":"hi"}]}"#;
        let ask = worst_case(
            &book,
            &bounds,
            Provider::OpenAi,
            Api::ChatCompletions,
            "gpt-4o",
            body,
            &prepared(body),
            now,
        );
        let prompt = body.len() as u64 + 500;
        assert_eq!(ask.tokens, prompt + 200);
        // Priority rates: 4.25 and 17 per million.
        let expected = (Decimal::from(prompt) * dec!(4.25) + dec!(200) * dec!(17)) / dec!(1000000);
        assert_eq!(ask.usd, Ok(expected.normalize()));
        // No cap: the book's maximum output.
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#;
        let ask = worst_case(
            &book,
            &bounds,
            Provider::OpenAi,
            Api::ChatCompletions,
            "gpt-4o",
            body,
            &prepared(body),
            now,
        );
        assert_eq!(ask.tokens, body.len() as u64 + 500 + 2 * 3000 + 16384);
        // A model without a price.
        let ask = worst_case(
            &book,
            &bounds,
            Provider::OpenAi,
            Api::ChatCompletions,
            "gpt-9",
            body,
            &prepared(body),
            now,
        );
        assert!(ask.usd.unwrap_err().contains("gpt-9"));
        assert_eq!(ask.tokens, body.len() as u64 + 500 + 2 * 3000 + 1000);
    }
}
