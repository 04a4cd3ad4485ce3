//! The comparison: per UTC day, provider and model (the price book's canonical name, so a
//! provider's dated snapshot names meet the aliases clients send), the provider's tokens
//! and charge against what tokentally recorded, with the causes that can be known.
//!
//! For each line:
//!
//! - **tokens**: the provider's count minus ours;
//! - **at book prices**: both token counts priced with the book's base rates (the same
//!   arithmetic on both sides, so the difference is the tokens' worth, not a rounding of
//!   long-context tiers, which apply per request and cannot be applied to a day's sum);
//! - **provider's cost**: what the provider charged minus what tokentally stored.
//!
//! Causes: the provider has no report for the day; usage on keys or projects that are
//! not the gateway's (traffic outside the gateway, when `gateway_key_ids` /
//! `gateway_projects` say which are); usage on the gateway's keys with no event here
//! (requests the gateway missed) or the other way round; the provider's charge against
//! the book's price of the provider's own tokens (a price mismatch, in percent); usage
//! the gateway estimated; events without a price.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::Serialize;

use super::{Export, Report, Tokens};
use crate::format::{money_on_page as money, unsigned_zero};

/// An amount as shown: no trailing zeros, never -0.
fn clean(d: Decimal) -> Decimal {
    unsigned_zero(d.normalize())
}
use crate::price::PriceBook;

/// What tokentally recorded for one day, provider and model (summed over institutions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    pub day: NaiveDate,
    pub provider: String,
    pub model: String,
    /// The book's canonical model (empty: unpriced).
    pub price_model: String,
    /// Requests that reached the provider.
    pub requests: u64,
    pub tokens: Tokens,
    pub cost: Decimal,
    pub estimated: u64,
    pub estimated_cost: Decimal,
    pub unpriced: u64,
}

/// Which of a provider's keys and projects are the gateway's.
#[derive(Debug, Clone, Default)]
pub struct Ownership {
    pub key_ids: Vec<String>,
    pub projects: Vec<String>,
}

impl Ownership {
    fn known(&self) -> bool {
        !self.key_ids.is_empty() || !self.projects.is_empty()
    }

    fn is_gateways(&self, key: &str, project: &str) -> bool {
        !self.known()
            || self.key_ids.iter().any(|k| k == key)
            || self.projects.iter().any(|p| p == project)
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// A line whose cost differs by more than this (USD) is reported and alerted.
    pub threshold: Decimal,
    /// The provider's charge may differ from the book's price by this much (percent)
    /// before it is named a price mismatch.
    pub price_tolerance_percent: Decimal,
    /// Per provider.
    pub ownership: BTreeMap<String, Ownership>,
}

/// One side's figures on a line.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Side {
    pub requests: u64,
    pub input_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
}

impl Side {
    fn new(requests: u64, t: &Tokens, cost: Decimal) -> Self {
        Self {
            requests,
            input_tokens: t.input,
            cache_read_tokens: t.cache_read,
            cache_write_tokens: t.cache_write,
            output_tokens: t.output,
            cost: clean(cost),
        }
    }

    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.cache_read_tokens + self.cache_write_tokens + self.output_tokens
    }
}

/// A cause a line's difference can be put down to.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum Cause {
    /// The provider's report of this kind does not cover the day (not imported, or
    /// missing from the export).
    NoProviderReport { report: String },
    /// Usage on keys or projects that are not the gateway's.
    OutsideGateway {
        requests: u64,
        tokens: u64,
        #[serde(with = "rust_decimal::serde::str")]
        book_cost: Decimal,
        keys: Vec<String>,
    },
    /// Usage the provider counted on the gateway's keys (all keys, when which are the
    /// gateway's is not configured) beyond what the gateway recorded.
    NotRecorded {
        requests: u64,
        tokens: u64,
        #[serde(with = "rust_decimal::serde::str")]
        book_cost: Decimal,
    },
    /// The gateway recorded more than the provider counted.
    RecordedMore {
        requests: u64,
        tokens: u64,
        #[serde(with = "rust_decimal::serde::str")]
        book_cost: Decimal,
    },
    /// The provider's charge differs from the book's price of the provider's tokens.
    PriceMismatch {
        #[serde(with = "rust_decimal::serde::str")]
        percent: Decimal,
        #[serde(with = "rust_decimal::serde::str")]
        amount: Decimal,
    },
    /// Requests whose usage the gateway counted itself (no usage from the provider).
    Estimated {
        requests: u64,
        #[serde(with = "rust_decimal::serde::str")]
        cost: Decimal,
    },
    /// Recorded requests without a price: their cost is missing from ours.
    Unpriced { requests: u64 },
}

impl Cause {
    /// One sentence for people.
    pub fn describe(&self, provider: &str) -> String {
        match self {
            Cause::NoProviderReport { report } => {
                format!("{provider}'s {report} report does not cover this day (not imported, or missing from the export)")
            }
            Cause::OutsideGateway { requests, tokens, book_cost, keys } => format!(
                "traffic not through the gateway: {}{tokens} tokens ({} at book prices) on {}",
                requests_text(*requests),
                money(*book_cost),
                keys.join(", ")
            ),
            Cause::NotRecorded { requests, tokens, book_cost } => format!(
                "the provider counted {}{tokens} tokens ({} at book prices) the gateway has no events for",
                requests_text(*requests),
                money(*book_cost)
            ),
            Cause::RecordedMore { requests, tokens, book_cost } => format!(
                "the gateway recorded {}{tokens} tokens ({} at book prices) more than the provider counted",
                requests_text(*requests),
                money(*book_cost)
            ),
            Cause::PriceMismatch { percent, amount } => format!(
                "price mismatch: the provider charged {}{:.2}% against the book's price of its tokens ({})",
                if percent.is_sign_positive() { "+" } else { "" },
                percent,
                crate::format::signed(*amount, money)
            ),
            Cause::Estimated { requests, cost } => format!(
                "{requests} request(s) with usage estimated by the gateway ({})",
                money(*cost)
            ),
            Cause::Unpriced { requests } => {
                format!("{requests} recorded request(s) without a price (not in our cost)")
            }
        }
    }
}

fn requests_text(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("{n} request(s), ")
    }
}

/// One day, provider and model.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub day: NaiveDate,
    pub provider: String,
    pub model: String,
    pub ours: Side,
    /// `None`: the provider's usage report does not cover the day.
    pub theirs: Option<Side>,
    /// Tokens: the provider's minus ours.
    pub token_difference: i64,
    /// Both counts at the book's base rates: the provider's minus ours.
    #[serde(with = "rust_decimal::serde::str")]
    pub book_difference: Decimal,
    /// What the provider charged minus what tokentally stored (`None` without a cost
    /// report for the day).
    #[serde(with = "rust_decimal::serde::str_option")]
    pub cost_difference: Option<Decimal>,
    pub causes: Vec<Cause>,
    /// Over the threshold (or not covered by the provider's reports).
    pub over: bool,
}

/// Totals of one provider over the range.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ProviderTotal {
    pub provider: String,
    /// Recorded on the days the provider's cost report covers.
    #[serde(with = "rust_decimal::serde::str")]
    pub ours: Decimal,
    /// What the provider charged on those days.
    #[serde(with = "rust_decimal::serde::str")]
    pub theirs: Decimal,
    /// Recorded on days the cost report does not cover (not compared).
    #[serde(with = "rust_decimal::serde::str")]
    pub ours_uncovered: Decimal,
    pub days_covered: usize,
    pub days: usize,
    pub lines_over: usize,
}

/// A provider with recorded traffic in the range and no report for it.
#[derive(Debug, Clone, Serialize)]
pub struct NotCompared {
    pub provider: String,
    pub requests: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub cost: Decimal,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reconciliation {
    pub from: NaiveDate,
    pub to: NaiveDate,
    #[serde(with = "rust_decimal::serde::str")]
    pub threshold: Decimal,
    pub providers: Vec<ProviderTotal>,
    /// Providers with recorded traffic but no report imported for the range.
    pub not_compared: Vec<NotCompared>,
    pub lines: Vec<Line>,
}

impl Reconciliation {
    pub fn over(&self) -> impl Iterator<Item = &Line> {
        self.lines.iter().filter(|l| l.over)
    }
}

#[derive(Default)]
struct Theirs {
    requests: u64,
    tokens: Tokens,
    outside_requests: u64,
    outside: Tokens,
    outside_keys: BTreeSet<String>,
}

#[derive(Default)]
struct Ours {
    requests: u64,
    tokens: Tokens,
    cost: Decimal,
    estimated: u64,
    estimated_cost: Decimal,
    unpriced: u64,
}

/// The book's canonical name of a model (its own name when the book has none).
fn canonical(book: &PriceBook, provider: &str, model: &str, day: NaiveDate) -> String {
    book.lookup(provider, model, "", day)
        .map_or_else(|| model.to_owned(), |e| e.model.clone())
}

/// `t` (of `requests` requests) at `entry`'s base rates; zero without an entry.
fn worth(entry: Option<&crate::price::PriceEntry>, requests: u64, t: &Tokens) -> Decimal {
    entry.map_or(Decimal::ZERO, |e| {
        crate::price::cost(
            &e.rates,
            &t.counts(),
            e.per_request * Decimal::from(requests),
        )
    })
}

/// Compares `recorded` with the providers' `exports` (the latest import of each
/// provider, report and day) over `from..=to`.
pub fn reconcile(
    from: NaiveDate,
    to: NaiveDate,
    recorded: &[Recorded],
    exports: &[Export],
    book: &PriceBook,
    s: &Settings,
) -> Reconciliation {
    type Key = (String, NaiveDate, String);
    let in_range = |d: NaiveDate| d >= from && d <= to;
    let none = Ownership::default();
    // Which days each provider's reports cover.
    let mut covered: BTreeMap<(String, Report), BTreeSet<NaiveDate>> = BTreeMap::new();
    let mut theirs: BTreeMap<Key, Theirs> = BTreeMap::new();
    let mut charged: BTreeMap<Key, Decimal> = BTreeMap::new();
    for e in exports {
        covered
            .entry((e.provider.clone(), e.report))
            .or_default()
            .extend(e.days.iter().copied().filter(|d| in_range(*d)));
        let own = s.ownership.get(&e.provider).unwrap_or(&none);
        for r in e.rows.iter().filter(|r| in_range(r.day)) {
            let key = (
                e.provider.clone(),
                r.day,
                canonical(book, &e.provider, &r.model, r.day),
            );
            match e.report {
                Report::Usage => {
                    let t = theirs.entry(key).or_default();
                    t.requests += r.requests;
                    t.tokens.add(&r.tokens);
                    if !own.is_gateways(&r.api_key_id, &r.project_id) {
                        t.outside_requests += r.requests;
                        t.outside.add(&r.tokens);
                        t.outside_keys.insert(
                            [r.api_key_id.as_str(), r.project_id.as_str()]
                                .into_iter()
                                .filter(|s| !s.is_empty())
                                .collect::<Vec<_>>()
                                .join(" / "),
                        );
                    }
                }
                Report::Cost => *charged.entry(key).or_default() += r.cost,
            }
        }
    }
    let mut ours: BTreeMap<Key, Ours> = BTreeMap::new();
    for r in recorded.iter().filter(|r| in_range(r.day)) {
        let model = if r.price_model.is_empty() {
            r.model.clone()
        } else {
            r.price_model.clone()
        };
        let o = ours.entry((r.provider.clone(), r.day, model)).or_default();
        o.requests += r.requests;
        o.tokens.add(&r.tokens);
        o.cost += r.cost;
        o.estimated += r.estimated;
        o.estimated_cost += r.estimated_cost;
        o.unpriced += r.unpriced;
    }
    let compared: BTreeSet<String> = covered.keys().map(|(p, _)| p.clone()).collect();
    let mut not_compared: BTreeMap<String, (Decimal, u64)> = BTreeMap::new();
    for ((p, _, _), o) in &ours {
        if !compared.contains(p) {
            let n = not_compared.entry(p.clone()).or_default();
            n.0 += o.cost;
            n.1 += o.requests;
        }
    }
    let keys: BTreeSet<Key> = ours
        .keys()
        .chain(theirs.keys())
        .chain(charged.keys())
        .filter(|(p, _, _)| compared.contains(p))
        .cloned()
        .collect();
    let empty_days = BTreeSet::new();
    let mut lines = Vec::new();
    for key in keys {
        let (provider, day, model) = key.clone();
        let usage_days = covered
            .get(&(provider.clone(), Report::Usage))
            .unwrap_or(&empty_days);
        let cost_days = covered
            .get(&(provider.clone(), Report::Cost))
            .unwrap_or(&empty_days);
        let o = ours.remove(&key).unwrap_or_default();
        let t = theirs.remove(&key);
        let charge = charged.remove(&key);
        let mut causes = Vec::new();
        let mut over = false;
        let has_usage = usage_days.contains(&day);
        let has_cost = cost_days.contains(&day);
        for (has, report) in [(has_usage, Report::Usage), (has_cost, Report::Cost)] {
            if !has {
                causes.push(Cause::NoProviderReport {
                    report: report.as_str().into(),
                });
                over |= o.requests > 0 || o.tokens.total() > 0;
            }
        }
        // One look-up per line: the book's entry prices every amount below.
        let entry = book.lookup(&provider, &model, "", day);
        let book_ours = worth(entry, o.requests, &o.tokens);
        let t = has_usage.then(|| t.unwrap_or_default());
        let (mut theirs_side, mut token_difference, mut book_difference) = (None, 0, Decimal::ZERO);
        if let Some(t) = &t {
            let book_theirs = worth(entry, t.requests, &t.tokens);
            theirs_side = Some(Side::new(t.requests, &t.tokens, charge.unwrap_or_default()));
            token_difference = t.tokens.total() as i64 - o.tokens.total() as i64;
            book_difference = clean(book_theirs - book_ours);
            if t.outside.total() > 0 {
                causes.push(Cause::OutsideGateway {
                    requests: t.outside_requests,
                    tokens: t.outside.total(),
                    book_cost: clean(worth(entry, t.outside_requests, &t.outside)),
                    keys: t.outside_keys.iter().cloned().collect(),
                });
            }
            let own_tokens = t.tokens.minus(&t.outside);
            let own_requests = t.requests - t.outside_requests;
            let missed = own_tokens.minus(&o.tokens);
            if missed.total() > 0 {
                let requests = own_requests.saturating_sub(o.requests);
                causes.push(Cause::NotRecorded {
                    requests,
                    tokens: missed.total(),
                    book_cost: clean(worth(entry, requests, &missed)),
                });
            }
            let more = o.tokens.minus(&own_tokens);
            if more.total() > 0 {
                // Anthropic counts no requests: only tokens can be compared there.
                let requests = if own_requests > 0 {
                    o.requests.saturating_sub(own_requests)
                } else {
                    0
                };
                causes.push(Cause::RecordedMore {
                    requests,
                    tokens: more.total(),
                    book_cost: clean(worth(entry, requests, &more)),
                });
            }
            if let Some(charge) = charge.filter(|_| !book_theirs.is_zero()) {
                let percent =
                    ((charge - book_theirs) / book_theirs * Decimal::ONE_HUNDRED).round_dp(2);
                if percent.abs() > s.price_tolerance_percent {
                    causes.push(Cause::PriceMismatch {
                        percent: clean(percent),
                        amount: clean(charge - book_theirs),
                    });
                }
            }
        }
        if o.estimated > 0 {
            causes.push(Cause::Estimated {
                requests: o.estimated,
                cost: clean(o.estimated_cost),
            });
        }
        if o.unpriced > 0 {
            causes.push(Cause::Unpriced {
                requests: o.unpriced,
            });
        }
        let cost_difference = (has_cost).then(|| clean(charge.unwrap_or_default() - o.cost));
        if let Some(d) = cost_difference {
            over |= d.abs() > s.threshold;
        }
        over |= book_difference.abs() > s.threshold;
        lines.push(Line {
            day,
            provider,
            model,
            ours: Side::new(o.requests, &o.tokens, o.cost),
            theirs: theirs_side,
            token_difference,
            book_difference,
            cost_difference,
            causes,
            over,
        });
    }
    let mut providers: Vec<ProviderTotal> = compared
        .iter()
        .map(|p| {
            let of = |r| covered.get(&(p.clone(), r)).cloned().unwrap_or_default();
            let of_p = || lines.iter().filter(|l| &l.provider == p);
            ProviderTotal {
                provider: p.clone(),
                ours: of_p()
                    .filter(|l| l.cost_difference.is_some())
                    .map(|l| l.ours.cost)
                    .sum(),
                theirs: of_p()
                    .filter_map(|l| l.cost_difference.map(|d| d + l.ours.cost))
                    .sum(),
                ours_uncovered: of_p()
                    .filter(|l| l.cost_difference.is_none())
                    .map(|l| l.ours.cost)
                    .sum(),
                days_covered: of(Report::Usage).intersection(&of(Report::Cost)).count(),
                days: (to - from).num_days().max(0) as usize + 1,
                lines_over: lines.iter().filter(|l| &l.provider == p && l.over).count(),
            }
        })
        .collect();
    for p in &mut providers {
        p.ours = clean(p.ours);
        p.theirs = clean(p.theirs);
        p.ours_uncovered = clean(p.ours_uncovered);
    }
    Reconciliation {
        from,
        to,
        threshold: s.threshold,
        providers,
        not_compared: not_compared
            .into_iter()
            .map(|(provider, (c, requests))| NotCompared {
                provider,
                requests,
                cost: clean(c),
            })
            .collect(),
        lines,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bills::BillRow;
    use rust_decimal_macros::dec;

    /// A one-model book: $1 per million input tokens, $2 per million output.
    fn book() -> PriceBook {
        PriceBook::from_sources(&[(
            "test.toml".into(),
            r#"
[[price]]
id = "m-1"
provider = "openai"
model = "m"
match = ["m", "m-2026-01-01"]
effective_from = "2026-01-01"
currency = "USD"
input_per_mtok = "1"
cache_read_per_mtok = "0.5"
output_per_mtok = "2"
"#
            .into(),
        )])
        .expect("book")
    }

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn ours(d: &str, requests: u64, input: u64, output: u64) -> Recorded {
        // 1M input = $1, 1M output = $2
        Recorded {
            day: day(d),
            provider: "openai".into(),
            model: "m".into(),
            price_model: "m".into(),
            requests,
            tokens: Tokens {
                input,
                output,
                ..Default::default()
            },
            cost: Decimal::from(input) / dec!(1000000)
                + Decimal::from(output) * dec!(2) / dec!(1000000),
            ..Default::default()
        }
    }

    fn usage(days: &[&str], rows: Vec<BillRow>) -> Export {
        let mut e = Export::new("openai", Report::Usage);
        e.days = days.iter().map(|d| day(d)).collect();
        e.rows = rows;
        e
    }

    fn cost(days: &[&str], rows: Vec<(&str, Decimal)>) -> Export {
        let mut e = Export::new("openai", Report::Cost);
        e.days = days.iter().map(|d| day(d)).collect();
        e.rows = rows
            .into_iter()
            .map(|(d, c)| BillRow {
                day: day(d),
                model: "m-2026-01-01".into(),
                item: "input".into(),
                cost: c,
                ..Default::default()
            })
            .collect();
        e
    }

    fn row(d: &str, key: &str, requests: u64, input: u64, output: u64) -> BillRow {
        BillRow {
            day: day(d),
            model: "m-2026-01-01".into(),
            api_key_id: key.into(),
            requests,
            tokens: Tokens {
                input,
                output,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn settings(keys: &[&str]) -> Settings {
        Settings {
            threshold: dec!(0.01),
            price_tolerance_percent: dec!(0.1),
            ownership: [(
                "openai".to_owned(),
                Ownership {
                    key_ids: keys.iter().map(|k| k.to_string()).collect(),
                    projects: vec![],
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn matching_reports_have_no_difference() {
        let rec = [ours("2026-03-01", 10, 1_000_000, 500_000)];
        let ex = [
            usage(
                &["2026-03-01"],
                vec![row("2026-03-01", "key_gw", 10, 1_000_000, 500_000)],
            ),
            cost(&["2026-03-01"], vec![("2026-03-01", dec!(2))]),
        ];
        let r = reconcile(
            day("2026-03-01"),
            day("2026-03-01"),
            &rec,
            &ex,
            &book(),
            &settings(&["key_gw"]),
        );
        assert_eq!(
            r.lines.len(),
            1,
            "the dated snapshot name meets the alias: {:?}",
            r.lines
        );
        let l = &r.lines[0];
        assert!(l.causes.is_empty() && !l.over, "{l:?}");
        assert_eq!(
            (l.token_difference, l.cost_difference),
            (0, Some(Decimal::ZERO))
        );
        assert!(
            !l.cost_difference.unwrap().to_string().starts_with('-'),
            "never -0"
        );
    }

    #[test]
    fn traffic_outside_the_gateway_a_price_mismatch_and_a_missing_day_are_named() {
        let rec = [
            ours("2026-03-01", 10, 1_000_000, 500_000),
            ours("2026-03-02", 5, 2_000_000, 0),
        ];
        let ex = [
            usage(
                &["2026-03-01"],
                vec![
                    row("2026-03-01", "key_gw", 10, 1_000_000, 500_000),
                    row("2026-03-01", "key_laptop", 200, 200_000, 0),
                ],
            ),
            // $2.00 for the gateway's tokens and $0.20 for the laptop's, 1 % above the book.
            cost(&["2026-03-01"], vec![("2026-03-01", dec!(2.222))]),
        ];
        let r = reconcile(
            day("2026-03-01"),
            day("2026-03-02"),
            &rec,
            &ex,
            &book(),
            &settings(&["key_gw"]),
        );
        let first = &r.lines[0];
        assert!(first.over);
        assert_eq!(first.token_difference, 200_000);
        assert_eq!(first.book_difference, dec!(0.2));
        assert_eq!(first.cost_difference, Some(dec!(0.222)));
        assert_eq!(
            first.causes,
            vec![
                Cause::OutsideGateway {
                    requests: 200,
                    tokens: 200_000,
                    book_cost: dec!(0.2),
                    keys: vec!["key_laptop".into()]
                },
                Cause::PriceMismatch {
                    percent: dec!(1.00),
                    amount: dec!(0.022)
                },
            ]
        );
        let second = &r.lines[1];
        assert!(second.over && second.theirs.is_none() && second.cost_difference.is_none());
        assert_eq!(
            second.causes,
            vec![
                Cause::NoProviderReport {
                    report: "usage".into()
                },
                Cause::NoProviderReport {
                    report: "cost".into()
                }
            ]
        );
        assert_eq!(r.providers[0].days_covered, 1);
    }

    #[test]
    fn without_ownership_extra_provider_usage_is_not_recorded_and_gateway_extras_are_recorded_more()
    {
        let mut rec = vec![ours("2026-03-01", 10, 1_000_000, 0)];
        rec[0].estimated = 2;
        rec[0].estimated_cost = dec!(0.1);
        let ex = [
            usage(
                &["2026-03-01"],
                vec![row("2026-03-01", "key_a", 8, 900_000, 0)],
            ),
            cost(&["2026-03-01"], vec![("2026-03-01", dec!(0.9))]),
        ];
        let r = reconcile(
            day("2026-03-01"),
            day("2026-03-01"),
            &rec,
            &ex,
            &book(),
            &settings(&[]),
        );
        let l = &r.lines[0];
        assert_eq!(l.cost_difference, Some(dec!(-0.1)));
        assert_eq!(
            l.causes,
            vec![
                Cause::RecordedMore {
                    requests: 2,
                    tokens: 100_000,
                    book_cost: dec!(0.1)
                },
                Cause::Estimated {
                    requests: 2,
                    cost: dec!(0.1)
                },
            ]
        );
        let ex2 = [usage(
            &["2026-03-01"],
            vec![row("2026-03-01", "key_a", 12, 1_100_000, 0)],
        )];
        let r = reconcile(
            day("2026-03-01"),
            day("2026-03-01"),
            &[ours("2026-03-01", 10, 1_000_000, 0)],
            &ex2,
            &book(),
            &settings(&[]),
        );
        assert_eq!(
            r.lines[0].causes[1],
            Cause::NotRecorded {
                requests: 2,
                tokens: 100_000,
                book_cost: dec!(0.1)
            }
        );
    }

    #[test]
    fn a_provider_without_reports_is_listed_as_not_compared() {
        let mut g = ours("2026-03-01", 3, 10, 10);
        g.provider = "gemini".into();
        let r = reconcile(
            day("2026-03-01"),
            day("2026-03-01"),
            &[g],
            &[],
            &book(),
            &settings(&[]),
        );
        assert!(r.lines.is_empty());
        assert_eq!(r.not_compared[0].provider, "gemini");
        assert_eq!(r.not_compared[0].requests, 3);
    }
}
