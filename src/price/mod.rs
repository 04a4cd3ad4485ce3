//! Pricing: a pure function from (event, price book) to an exact cost.

pub mod book;
pub mod litellm;
pub mod watch;

use rust_decimal::Decimal;

pub use book::{BookError, PriceBook, PriceEntry, Rates, Tier};

use crate::domain::{TokenCounts, UsageEvent};

/// 10^-6: rates are per million tokens. Multiplying by it is exact in `Decimal`.
fn per_token() -> Decimal {
    Decimal::new(1, 6)
}

/// The outcome of pricing one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pricing {
    Priced(Priced),
    /// No entry matches: stored and flagged, never $0.
    Unpriced,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub price_id: String,
    /// Canonical model name of the entry (shown on invoices).
    pub price_model: String,
    /// The long-context threshold whose rates applied; 0 for the base rates.
    pub tier_threshold: u64,
    /// Exact cost in USD (at most 18 decimal places).
    pub cost: Decimal,
}

/// The rates that apply to a request of this size: the highest tier it exceeds, else base.
pub fn applicable_rates<'a>(entry: &'a PriceEntry, usage: &TokenCounts) -> (u64, &'a Rates) {
    let prompt = usage.prompt_total();
    entry
        .tiers
        .iter()
        .rev()
        .find(|t| prompt > t.above_input_tokens)
        .map_or((0, &entry.rates), |t| (t.above_input_tokens, &t.rates))
}

/// Exact cost of `usage` at `rates`, plus a per-request fee.
pub fn cost(rates: &Rates, usage: &TokenCounts, per_request: Decimal) -> Decimal {
    let (plain_output, reasoning_rate) = match rates.reasoning_per_mtok {
        Some(r) => (usage.output - usage.reasoning.min(usage.output), Some(r)),
        None => (usage.output, None),
    };
    let mut units = Decimal::from(usage.input) * rates.input_per_mtok
        + Decimal::from(usage.cache_read) * rates.cache_read_per_mtok
        + Decimal::from(usage.cache_write) * rates.cache_write_per_mtok
        + Decimal::from(plain_output) * rates.output_per_mtok;
    if let Some(r) = reasoning_rate {
        units += Decimal::from(usage.reasoning.min(usage.output)) * r;
    }
    (units * per_token() + per_request).normalize()
}

/// Prices one event with the book.
pub fn price(event: &UsageEvent, book: &PriceBook) -> Pricing {
    price_usage(
        book,
        &event.provider,
        &event.model,
        &event.service_tier,
        event.occurred_at.date_naive(),
        &event.usage,
        event.was_served(),
    )
}

/// Prices `usage` of `model` on `date`; the per-request fee only for a served request.
/// The one pricing path: ingest prices stored events with it, the gateway its budgets.
pub fn price_usage(
    book: &PriceBook,
    provider: &str,
    model: &str,
    service_tier: &str,
    date: chrono::NaiveDate,
    usage: &TokenCounts,
    served: bool,
) -> Pricing {
    match book.lookup(provider, model, service_tier, date) {
        None => Pricing::Unpriced,
        Some(entry) => {
            let (tier_threshold, rates) = applicable_rates(entry, usage);
            Pricing::Priced(Priced {
                price_id: entry.id.clone(),
                price_model: entry.model.clone(),
                tier_threshold,
                cost: cost(
                    rates,
                    usage,
                    if served {
                        entry.per_request
                    } else {
                        Decimal::ZERO
                    },
                ),
            })
        }
    }
}

/// The most a request of `prompt` prompt tokens and at most `output` output tokens can
/// cost under `entry`: every prompt token at the dearest input rate (plain, cached-read
/// or cache-write) and every output token at the dearest output rate (plain or
/// reasoning), in the tier `prompt` falls into, plus the per-request fee.
pub fn worst_case(entry: &PriceEntry, prompt: u64, output: u64) -> Decimal {
    // Every tier a request of at most `prompt` tokens could fall into (the base rates
    // and each tier below it): the dearest rate among them.
    let candidates = std::iter::once(&entry.rates).chain(
        entry
            .tiers
            .iter()
            .filter(|t| prompt > t.above_input_tokens)
            .map(|t| &t.rates),
    );
    let (mut input_rate, mut output_rate) = (Decimal::ZERO, Decimal::ZERO);
    for r in candidates {
        input_rate = input_rate
            .max(r.input_per_mtok)
            .max(r.cache_read_per_mtok)
            .max(r.cache_write_per_mtok);
        output_rate = output_rate
            .max(r.output_per_mtok)
            .max(r.reasoning_per_mtok.unwrap_or(Decimal::ZERO));
    }
    ((Decimal::from(prompt) * input_rate + Decimal::from(output) * output_rate) * per_token()
        + entry.per_request)
        .normalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EventId, InstitutionId};
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    const BOOK: &str = r#"
[[price]]
provider = "openai"
model = "gpt-4o-mini"
match = ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"]
effective_from = "2024-07-18"
input_per_mtok = "0.15"
cache_read_per_mtok = "0.075"
output_per_mtok = "0.60"

[[price]]
provider = "openai"
model = "gpt-4o-mini"
id = "gpt-4o-mini-2026"
match = ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"]
effective_from = "2026-01-01"
input_per_mtok = "0.10"
output_per_mtok = "0.50"

[[price]]
provider = "openai"
model = "gpt-4o-mini"
match = ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"]
effective_from = "2024-07-18"
service_tier = "batch"
input_per_mtok = "0.075"
output_per_mtok = "0.30"

[[price]]
provider = "openai"
model = "o3"
match_regex = "o3(-\\d{4}-\\d{2}-\\d{2})?"
effective_from = "2025-04-16"
input_per_mtok = "2"
output_per_mtok = "8"
reasoning_per_mtok = "10"
per_request = "0.001"

[[price]]
provider = "google"
model = "gemini-2.5-pro"
match = "gemini-2.5-pro"
effective_from = "2025-06-17"
input_per_mtok = "1.25"
cache_read_per_mtok = "0.125"
output_per_mtok = "10"
[[price.tier]]
above_input_tokens = 200000
input_per_mtok = "2.50"
cache_read_per_mtok = "0.25"
output_per_mtok = "15"
"#;

    fn book() -> PriceBook {
        PriceBook::from_sources(&[("test.toml".into(), BOOK.into())]).unwrap()
    }

    fn event(
        provider: &str,
        model: &str,
        tier: &str,
        day: (i32, u32, u32),
        usage: TokenCounts,
    ) -> UsageEvent {
        UsageEvent {
            event_id: EventId::parse("e").unwrap(),
            occurred_at: Utc.with_ymd_and_hms(day.0, day.1, day.2, 12, 0, 0).unwrap(),
            institution_id: InstitutionId::parse("i").unwrap(),
            user_id: String::new(),
            api_key_id: String::new(),
            provider: provider.into(),
            model: model.into(),
            endpoint: String::new(),
            service_tier: tier.into(),
            status: crate::domain::Status::parse(""),
            latency_ms: 0,
            usage,
            tags: Default::default(),
            usage_estimated: false,
            billing: Default::default(),
        }
    }

    fn priced(p: Pricing) -> Priced {
        match p {
            Pricing::Priced(p) => p,
            Pricing::Unpriced => panic!("unpriced"),
        }
    }

    #[test]
    fn contract_example_is_priced_exactly() {
        // 1000 × 0.15 + 200 × 0.075 + 350 × 0.60 = 150 + 15 + 210 = 375 per Mtok units.
        let p = priced(price(
            &event(
                "openai",
                "gpt-4o-mini-2024-07-18",
                "default",
                (2025, 10, 14),
                TokenCounts::new(1000, 200, 0, 350, 100),
            ),
            &book(),
        ));
        assert_eq!(p.cost, dec!(0.000375));
        assert_eq!(p.price_id, "openai:gpt-4o-mini:2024-07-18");
        assert_eq!(p.price_model, "gpt-4o-mini");
    }

    #[test]
    fn effective_dating_picks_newest_entry_not_after_the_event() {
        let b = book();
        let u = TokenCounts::new(1_000_000, 0, 0, 0, 0);
        assert_eq!(
            priced(price(
                &event("openai", "gpt-4o-mini", "", (2025, 12, 31), u),
                &b
            ))
            .cost,
            dec!(0.15)
        );
        assert_eq!(
            priced(price(
                &event("openai", "gpt-4o-mini", "", (2026, 1, 1), u),
                &b
            ))
            .cost,
            dec!(0.10)
        );
        assert_eq!(
            price(&event("openai", "gpt-4o-mini", "", (2024, 7, 17), u), &b),
            Pricing::Unpriced
        );
    }

    #[test]
    fn service_tier_entry_or_fallback() {
        let b = book();
        let u = TokenCounts::new(1_000_000, 0, 0, 1_000_000, 0);
        assert_eq!(
            priced(price(
                &event("openai", "gpt-4o-mini", "batch", (2025, 1, 1), u),
                &b
            ))
            .cost,
            dec!(0.375)
        );
        // "flex" has no entry of its own: the tier-less entry applies.
        assert_eq!(
            priced(price(
                &event("openai", "gpt-4o-mini", "flex", (2025, 1, 1), u),
                &b
            ))
            .cost,
            dec!(0.75)
        );
    }

    #[test]
    fn regex_reasoning_and_per_request() {
        let p = priced(price(
            &event(
                "openai",
                "o3-2025-04-16",
                "",
                (2025, 5, 1),
                TokenCounts::new(1000, 0, 0, 500, 300),
            ),
            &book(),
        ));
        // 1000×2 + 200×8 + 300×10 = 6600 → 0.0066, + 0.001 per request.
        assert_eq!(p.cost, dec!(0.0076));
        // A request the gateway refused reached no provider: no fee.
        for status in ["rejected_rate_limit", "blocked_moderation"] {
            let mut refused = event("openai", "o3", "", (2025, 5, 1), TokenCounts::default());
            refused.status = status.into();
            assert_eq!(priced(price(&refused, &book())).cost, dec!(0), "{status}");
        }
        let mut failed = event("openai", "o3", "", (2025, 5, 1), TokenCounts::default());
        failed.status = "upstream_error".into();
        assert_eq!(priced(price(&failed, &book())).cost, dec!(0.001));
        assert_eq!(
            price(
                &event(
                    "openai",
                    "o3-mini",
                    "",
                    (2025, 5, 1),
                    TokenCounts::new(1, 0, 0, 1, 0)
                ),
                &book()
            ),
            Pricing::Unpriced
        );
    }

    #[test]
    fn long_context_tier_applies_to_the_whole_request() {
        let b = book();
        let at = |u| {
            priced(price(
                &event("google", "gemini-2.5-pro", "", (2025, 7, 1), u),
                &b,
            ))
        };
        // Exactly at the threshold: base rates.
        let base = at(TokenCounts::new(190_000, 10_000, 0, 1000, 0));
        assert_eq!(base.tier_threshold, 0);
        assert_eq!(
            base.cost,
            dec!(0.25) - dec!(0.0125) + dec!(0.00125) + dec!(0.01)
        );
        // One token more: every class at the tier's rates.
        let long = at(TokenCounts::new(190_001, 10_000, 0, 1000, 0));
        assert_eq!(long.tier_threshold, 200_000);
        assert_eq!(long.cost, dec!(0.4750025) + dec!(0.0025) + dec!(0.015));
    }

    #[test]
    fn unknown_provider_or_model_is_unpriced() {
        assert_eq!(
            price(
                &event(
                    "anthropic",
                    "gpt-4o-mini",
                    "",
                    (2025, 1, 1),
                    TokenCounts::new(1, 0, 0, 1, 0)
                ),
                &book()
            ),
            Pricing::Unpriced
        );
        assert_eq!(
            price(
                &event(
                    "openai",
                    "gpt-5-nano",
                    "",
                    (2025, 1, 1),
                    TokenCounts::new(1, 0, 0, 1, 0)
                ),
                &book()
            ),
            Pricing::Unpriced
        );
    }

    #[test]
    fn check_reports_problems_with_file_and_entry() {
        let bad = r#"
[[price]]
provider = "openai"
model = "a"
match = ["a"]
effective_from = "2025-01-01"
input_per_mtok = 0.15
output_per_mtok = "1.2.3"

[[price]]
provider = "openai"
model = "b"
match_regex = "b("
effective_from = "2025-13-01"
input_per_mtok = "-1"
output_per_mtok = "0.0000000000001"

[[price]]
provider = "openai"
model = "c"
match = ["x"]
effective_from = "2025-01-01"
input_per_mtok = "1"
output_per_mtok = "1"

[[price]]
provider = "openai"
model = "d"
match = ["x"]
effective_from = "2025-01-01"
input_per_mtok = "1"
output_per_mtok = "1"
"#;
        let err = PriceBook::from_sources(&[("prices/bad.toml".into(), bad.into())]).unwrap_err();
        let text = err.to_string();
        for needle in [
            "prices/bad.toml: price #1 (model `a`): `input_per_mtok` = 0.15 is a float",
            "`output_per_mtok` = \"1.2.3\" is not a decimal number",
            "price #2 (model `b`): `match_regex` \"b(\" is not a valid regex",
            "`effective_from` = \"2025-13-01\" is not a YYYY-MM-DD date",
            "`input_per_mtok` = \"-1\" is negative",
            "more than 12 decimal places",
            "price #4 (model `d`): overlaps prices/bad.toml: price #3 (model `c`): both match `openai/x`",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn default_book_is_valid_and_covers_mainstream_models() {
        let b = PriceBook::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/prices"
        )))
        .unwrap();
        assert!(b.entries().len() >= 20);
        for p in ["openai", "anthropic", "google"] {
            assert!(
                b.entries().iter().filter(|e| e.provider == p).count() >= 5,
                "{p}"
            );
        }
    }

    fn arb_usage() -> impl Strategy<Value = TokenCounts> {
        (
            0u64..5_000_000,
            0u64..5_000_000,
            0u64..5_000_000,
            0u64..5_000_000,
            0u64..5_000_000,
        )
            .prop_map(|(i, cr, cw, o, r)| TokenCounts::new(i, cr, cw, o, r.min(o)))
    }

    fn arb_rates() -> impl Strategy<Value = Rates> {
        let rate = (0i64..100_000_000, 0u32..=12).prop_map(|(m, s)| Decimal::new(m, s));
        (
            rate.clone(),
            rate.clone(),
            rate.clone(),
            rate.clone(),
            proptest::option::of(rate),
        )
            .prop_map(|(i, cr, cw, o, r)| Rates {
                input_per_mtok: i,
                cache_read_per_mtok: cr,
                cache_write_per_mtok: cw,
                output_per_mtok: o,
                reasoning_per_mtok: r,
            })
    }

    fn only(u: &TokenCounts, class: usize) -> TokenCounts {
        let mut t = TokenCounts::default();
        match class {
            0 => t.input = u.input,
            1 => t.cache_read = u.cache_read,
            2 => t.cache_write = u.cache_write,
            _ => {
                t.output = u.output;
                t.reasoning = u.reasoning;
            }
        }
        t
    }

    proptest! {
        #[test]
        fn cost_is_additive_over_token_classes(u in arb_usage(), r in arb_rates()) {
            let whole = cost(&r, &u, Decimal::ZERO);
            let parts: Decimal = (0..4).map(|c| cost(&r, &only(&u, c), Decimal::ZERO)).sum();
            prop_assert_eq!(whole, parts);
        }

        #[test]
        fn cost_is_monotone_and_never_negative(u in arb_usage(), r in arb_rates(), extra in 0u64..1_000_000, class in 0usize..4) {
            let mut more = u;
            match class { 0 => more.input += extra, 1 => more.cache_read += extra, 2 => more.cache_write += extra, _ => more.output += extra }
            let c = cost(&r, &u, Decimal::ZERO);
            prop_assert!(c >= Decimal::ZERO);
            prop_assert!(cost(&r, &more, Decimal::ZERO) >= c);
        }

        #[test]
        fn cost_is_exact_to_the_token(u in arb_usage(), r in arb_rates()) {
            // Exact: cost × 10^6 is the integer-and-rate sum, with nothing rounded away,
            // and it has at most 18 decimals so it fits Decimal(38, 18).
            let c = cost(&r, &u, Decimal::ZERO);
            prop_assert!(c.scale() <= 18);
            let reasoning = if r.reasoning_per_mtok.is_some() { u.reasoning } else { 0 };
            let units = Decimal::from(u.input) * r.input_per_mtok
                + Decimal::from(u.cache_read) * r.cache_read_per_mtok
                + Decimal::from(u.cache_write) * r.cache_write_per_mtok
                + Decimal::from(u.output - reasoning) * r.output_per_mtok
                + Decimal::from(reasoning) * r.reasoning_per_mtok.unwrap_or_default();
            prop_assert_eq!(c * Decimal::from(1_000_000), units);
        }

        #[test]
        fn one_token_costs_its_rate_over_a_million(r in arb_rates()) {
            let c = cost(&r, &TokenCounts::new(1, 0, 0, 0, 0), Decimal::ZERO);
            prop_assert_eq!(c, (r.input_per_mtok / Decimal::from(1_000_000)).normalize());
        }
    }
}
