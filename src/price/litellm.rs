//! `prices import-litellm`: LiteLLM's `model_prices_and_context_window.json` → price-book TOML.
//!
//! LiteLLM writes USD-per-token prices as JSON floats (`7.5e-08`). Reading them as
//! a binary float turns $0.075/Mtok into 0.07499999…, so every number is read from its text.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use chrono::NaiveDate;
use regex::Regex;
use rust_decimal::Decimal;
use serde_json::value::RawValue;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not a LiteLLM price file: {0}")]
    Json(#[from] serde_json::Error),
    #[error("model `{model}`: `{field}` = {text} is not a number")]
    Number {
        model: String,
        field: String,
        text: String,
    },
}

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// LiteLLM provider names to import, mapped to our provider names.
    pub providers: Vec<(String, String)>,
    /// LiteLLM `mode`s to import (chat models by default).
    pub modes: Vec<String>,
    pub effective_from: NaiveDate,
}

impl ImportOptions {
    pub fn mainstream(effective_from: NaiveDate) -> Self {
        let providers = [
            ("openai", "openai"),
            ("anthropic", "anthropic"),
            ("gemini", "google"),
            ("vertex_ai-language-models", "google"),
        ];
        Self {
            providers: providers
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            modes: vec!["chat".into(), "responses".into()],
            effective_from,
        }
    }
}

/// The rate fields of one LiteLLM model, for one service tier and context tier, in $/Mtok.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ImportedRates {
    input: Option<Decimal>,
    cache_read: Option<Decimal>,
    cache_write: Option<Decimal>,
    output: Option<Decimal>,
    reasoning: Option<Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Imported {
    provider: String,
    model: String,
    matches: Vec<String>,
    service_tier: Option<String>,
    rates: ImportedRates,
    tiers: Vec<(u64, ImportedRates)>,
    max_output_tokens: Option<u64>,
}

fn per_mtok(model: &str, field: &str, raw: &RawValue) -> Result<Option<Decimal>, ImportError> {
    let text = raw.get().trim();
    if text == "null" {
        return Ok(None);
    }
    let bad = || ImportError::Number {
        model: model.into(),
        field: field.into(),
        text: text.into(),
    };
    let d = if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).map_err(|_| bad())?
    } else {
        text.parse::<Decimal>().map_err(|_| bad())?
    };
    Ok(Some((d * Decimal::from(1_000_000)).normalize()))
}

/// Reads the rate fields for a service-tier suffix (`""`, `_batches`, …) and a context
/// suffix (`""`, `_above_200k_tokens`, …).
fn rates(
    model: &str,
    fields: &HashMap<String, Box<RawValue>>,
    ctx: &str,
    tier: &str,
) -> Result<ImportedRates, ImportError> {
    let get = |name: String| -> Result<Option<Decimal>, ImportError> {
        match fields.get(&name) {
            Some(raw) => per_mtok(model, &name, raw),
            None => Ok(None),
        }
    };
    Ok(ImportedRates {
        input: get(format!("input_cost_per_token{ctx}{tier}"))?,
        cache_read: get(format!("cache_read_input_token_cost{ctx}{tier}"))?,
        cache_write: get(format!("cache_creation_input_token_cost{ctx}{tier}"))?,
        output: get(format!("output_cost_per_token{ctx}{tier}"))?,
        reasoning: if ctx.is_empty() && tier.is_empty() {
            get("output_cost_per_reasoning_token".into())?
        } else {
            None
        },
    })
}

/// Converts a LiteLLM price file to price-book TOML.
pub fn import(json: &str, opts: &ImportOptions) -> Result<(String, usize), ImportError> {
    let all: BTreeMap<String, Box<RawValue>> = serde_json::from_str(json)?;
    let prefix = Regex::new(r"^[A-Za-z0-9_.-]+/").expect("static regex");
    let context_tiers = [
        ("_above_200k_tokens", 200_000u64),
        ("_above_272k_tokens", 272_000),
    ];
    let service_tiers = [
        ("", None),
        ("_batches", Some("batch")),
        ("_flex", Some("flex")),
        ("_priority", Some("priority")),
    ];

    let mut out: Vec<Imported> = Vec::new();
    // Provider preference order: the first listed provider wins a model name.
    for (litellm_provider, provider) in &opts.providers {
        for (key, raw) in &all {
            let Ok(fields) = serde_json::from_str::<HashMap<String, Box<RawValue>>>(raw.get())
            else {
                continue; // `sample_spec` and other non-model entries
            };
            let field_str = |f: &str| {
                fields
                    .get(f)
                    .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
            };
            if field_str("litellm_provider").as_deref() != Some(litellm_provider.as_str()) {
                continue;
            }
            if !field_str("mode").is_some_and(|m| opts.modes.contains(&m)) {
                continue;
            }
            let model = prefix.replace(key, "").to_string();
            for (suffix, service_tier) in service_tiers {
                let base = rates(&model, &fields, "", suffix)?;
                let (Some(_), Some(_)) = (base.input, base.output) else {
                    continue;
                };
                if out
                    .iter()
                    .any(|e| e.model == model && e.service_tier.as_deref() == service_tier)
                {
                    continue;
                }
                let mut tiers = Vec::new();
                for (ctx, threshold) in context_tiers {
                    let t = rates(&model, &fields, ctx, suffix)?;
                    if t.input.is_some() || t.output.is_some() {
                        tiers.push((threshold, t));
                    }
                }
                out.push(Imported {
                    provider: provider.clone(),
                    model: model.clone(),
                    matches: vec![model.clone()],
                    service_tier: service_tier.map(str::to_owned),
                    rates: base,
                    tiers,
                    max_output_tokens: fields
                        .get("max_output_tokens")
                        .and_then(|v| serde_json::from_str::<u64>(v.get()).ok()),
                });
            }
        }
    }

    // Dated snapshots (`-2024-07-18`, `-20250514`, `-001`) with the same prices as their
    // alias become extra `match` ids of the alias's entry.
    let dated = Regex::new(r"^(.+?)-(\d{4}-\d{2}-\d{2}|\d{8}|\d{3})$").expect("static regex");
    let mut merged: Vec<Imported> = Vec::new();
    let mut snapshots = Vec::new();
    for e in out {
        match dated.captures(&e.model).map(|c| c[1].to_owned()) {
            Some(base) => snapshots.push((base, e)),
            None => merged.push(e),
        }
    }
    for (base, e) in snapshots {
        let target = merged.iter_mut().find(|m| {
            m.model == base
                && m.provider == e.provider
                && m.service_tier == e.service_tier
                && m.rates == e.rates
                && m.tiers == e.tiers
        });
        match target {
            Some(t) => t.matches.push(e.model),
            None => merged.push(e),
        }
    }
    merged.sort_by(|a, b| {
        (&a.provider, &a.model, &a.service_tier).cmp(&(&b.provider, &b.model, &b.service_tier))
    });
    Ok((render(&merged, opts.effective_from), merged.len()))
}

fn render(entries: &[Imported], effective_from: NaiveDate) -> String {
    let mut s = String::new();
    let rate_lines = |s: &mut String, r: &ImportedRates| {
        for (name, v) in [
            ("input_per_mtok", r.input),
            ("cache_read_per_mtok", r.cache_read),
            ("cache_write_per_mtok", r.cache_write),
            ("output_per_mtok", r.output),
            ("reasoning_per_mtok", r.reasoning),
        ] {
            if let Some(v) = v {
                let _ = writeln!(s, "{name} = \"{v}\"");
            }
        }
    };
    for e in entries {
        let _ = writeln!(s, "[[price]]");
        let _ = writeln!(s, "provider = \"{}\"", e.provider);
        let _ = writeln!(s, "model = \"{}\"", e.model);
        let matches: Vec<String> = e.matches.iter().map(|m| format!("\"{m}\"")).collect();
        let _ = writeln!(s, "match = [{}]", matches.join(", "));
        let _ = writeln!(s, "effective_from = \"{effective_from}\"");
        let _ = writeln!(s, "currency = \"USD\"");
        if let Some(t) = &e.service_tier {
            let _ = writeln!(s, "service_tier = \"{t}\"");
        }
        if let Some(n) = e.max_output_tokens {
            let _ = writeln!(s, "max_output_tokens = {n}");
        }
        rate_lines(&mut s, &e.rates);
        for (threshold, t) in &e.tiers {
            let _ = writeln!(s, "[[price.tier]]");
            let _ = writeln!(s, "above_input_tokens = {threshold}");
            rate_lines(&mut s, t);
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::price::PriceBook;

    const SAMPLE: &str = r#"{
      "sample_spec": {"max_tokens": "LEGACY", "input_cost_per_token": 0.0},
      "gpt-4o-mini": {"litellm_provider": "openai", "mode": "chat",
        "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
        "cache_read_input_token_cost": 7.5e-08,
        "input_cost_per_token_batches": 7.5e-08, "output_cost_per_token_batches": 3e-07},
      "gpt-4o-mini-2024-07-18": {"litellm_provider": "openai", "mode": "chat",
        "input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07,
        "cache_read_input_token_cost": 7.5e-08,
        "input_cost_per_token_batches": 7.5e-08, "output_cost_per_token_batches": 3e-07},
      "gemini/gemini-2.5-pro": {"litellm_provider": "gemini", "mode": "chat",
        "input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
        "input_cost_per_token_above_200k_tokens": 2.5e-06, "output_cost_per_token_above_200k_tokens": 1.5e-05},
      "text-embedding-3-small": {"litellm_provider": "openai", "mode": "embedding",
        "input_cost_per_token": 2e-08, "output_cost_per_token": 0.0},
      "grok-4": {"litellm_provider": "xai", "mode": "chat",
        "input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}
    }"#;

    #[test]
    fn imports_exact_decimals_tiers_and_snapshots() {
        let opts = ImportOptions::mainstream(NaiveDate::from_ymd_opt(2026, 7, 24).unwrap());
        let (toml, n) = import(SAMPLE, &opts).unwrap();
        assert_eq!(n, 3, "{toml}");
        assert!(toml.contains("cache_read_per_mtok = \"0.075\""), "{toml}");
        assert!(
            toml.contains("match = [\"gpt-4o-mini\", \"gpt-4o-mini-2024-07-18\"]"),
            "{toml}"
        );
        assert!(toml.contains("service_tier = \"batch\""), "{toml}");
        assert!(toml.contains("above_input_tokens = 200000"), "{toml}");
        assert!(
            !toml.contains("grok") && !toml.contains("embedding"),
            "{toml}"
        );
        // The output is a valid price book.
        let book = PriceBook::from_sources(&[("imported.toml".into(), toml)]).unwrap();
        let e = book
            .lookup("google", "gemini-2.5-pro", "", opts.effective_from)
            .unwrap();
        assert_eq!(e.tiers[0].rates.output_per_mtok, Decimal::from(15));
    }

    #[test]
    fn imports_the_litellm_snapshot() {
        // A trimmed copy of the snapshot ships with the repository (tests/data/README.md).
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/litellm-model-prices-2026-07-24.json"
        );
        let json = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let opts = ImportOptions::mainstream(NaiveDate::from_ymd_opt(2026, 7, 24).unwrap());
        let (toml, n) = import(&json, &opts).unwrap();
        assert!(n >= 50, "only {n} entries");
        PriceBook::from_sources(&[("imported.toml".into(), toml)]).unwrap();
    }

    #[test]
    fn the_default_price_book_is_the_snapshot_import_plus_two_documented_edits() {
        let root = env!("CARGO_MANIFEST_DIR");
        let json = std::fs::read_to_string(format!(
            "{root}/tests/data/litellm-model-prices-2026-07-24.json"
        ))
        .unwrap();
        let opts = ImportOptions::mainstream(NaiveDate::from_ymd_opt(2024, 1, 1).unwrap());
        let (toml, _) = import(&json, &opts).unwrap();
        let imported = PriceBook::from_sources(&[("imported.toml".into(), toml)]).unwrap();
        let shipped = PriceBook::load(std::path::Path::new(&format!(
            "{root}/prices/litellm-2026-07-24.toml"
        )))
        .unwrap();
        // The header of prices/litellm-2026-07-24.toml names these two hand edits.
        let edited = ["o3", "gpt-4o-mini-search-preview"];
        let key = |e: &crate::price::PriceEntry| {
            (e.provider.clone(), e.model.clone(), e.service_tier.clone())
        };
        let shipped_by_key: std::collections::HashMap<_, _> =
            shipped.entries().iter().map(|e| (key(e), e)).collect();
        assert_eq!(imported.entries().len(), shipped.entries().len());
        for e in imported.entries() {
            let s = shipped_by_key
                .get(&key(e))
                .unwrap_or_else(|| panic!("{} is missing from the shipped book", e.model));
            if edited.contains(&e.model.as_str()) {
                continue;
            }
            assert_eq!(
                (
                    &e.rates,
                    &e.tiers,
                    e.per_request,
                    e.effective_from,
                    e.max_output_tokens
                ),
                (
                    &s.rates,
                    &s.tiers,
                    s.per_request,
                    s.effective_from,
                    s.max_output_tokens
                ),
                "{}",
                e.model
            );
            assert_eq!(e.match_exact, s.match_exact, "{}", e.model);
        }
    }
}
