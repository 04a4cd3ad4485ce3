//! Reading the providers' reports: the JSON their admin APIs answer (one page, or an array
//! of pages as a file of several fetches), and CSV with the same fields as columns.
//!
//! Which provider and report a JSON page is, is read from the page itself (OpenAI buckets
//! have `start_time`, Anthropic's `starting_at`; a usage result has token fields, a cost
//! result `amount`). A page whose buckets are all empty says nothing about which report
//! it is: `hint` (the command's `--report`) decides then.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde_json::Value;

use super::{BillRow, Export, Report, Tokens};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not JSON or CSV: {0}")]
    Syntax(String),
    #[error("{0}")]
    Shape(String),
}

fn shape(msg: impl Into<String>) -> ParseError {
    ParseError::Shape(msg.into())
}

/// Every report in `text` (JSON or CSV), merged per provider and report. `provider` and
/// `report` are needed for CSV (one report per file) and for JSON pages without results.
pub fn parse(
    text: &str,
    provider: Option<&str>,
    report: Option<Report>,
) -> Result<Vec<Export>, ParseError> {
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    let exports = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: Value =
            serde_json::from_str(trimmed).map_err(|e| ParseError::Syntax(e.to_string()))?;
        let pages = match v {
            Value::Array(pages) => pages,
            page => vec![page],
        };
        let mut out = Vec::new();
        for (i, page) in pages.iter().enumerate() {
            out.push(page_export(page, report).map_err(|e| shape(format!("page {}: {e}", i + 1)))?);
        }
        out
    } else {
        let provider = provider.ok_or_else(|| {
            shape("a CSV report names neither its provider nor which report it is: give --provider and --report")
        })?;
        let report = report.ok_or_else(|| shape("a CSV report needs --report usage|cost"))?;
        vec![csv_export(trimmed, provider, report)?]
    };
    let mut merged: BTreeMap<(String, Report), Export> = BTreeMap::new();
    for e in exports {
        if let Some(p) = provider {
            if p != e.provider {
                return Err(shape(format!(
                    "the file is a report of {}, not of {p}",
                    e.provider
                )));
            }
        }
        match merged.get_mut(&(e.provider.clone(), e.report)) {
            Some(m) => m.extend(e),
            None => {
                merged.insert((e.provider.clone(), e.report), e);
            }
        }
    }
    Ok(merged.into_values().collect())
}

/// One page an admin API answered for `provider`'s `report` (already parsed).
pub fn parse_page(page: &Value, provider: &str, report: Report) -> Result<Export, ParseError> {
    let e = page_export(page, Some(report))?;
    if e.provider != provider || e.report != report {
        return Err(shape(format!(
            "asked for {provider}'s {report} report, got {}'s {} report",
            e.provider, e.report
        )));
    }
    Ok(e)
}

/// An exact decimal from a JSON number or string (OpenAI sends amounts as numbers; their
/// shortest decimal form is read, not a binary float).
fn decimal(v: &Value) -> Option<Decimal> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return None,
    };
    Decimal::from_str(&text)
        .or_else(|_| Decimal::from_scientific(&text))
        .ok()
}

fn count(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// The UTC day a bucket starts on.
fn bucket_day(bucket: &Value) -> Result<(bool, NaiveDate), ParseError> {
    if let Some(t) = bucket.get("start_time") {
        let secs = t
            .as_i64()
            .ok_or_else(|| shape("a bucket's start_time is not Unix seconds"))?;
        let at = DateTime::<Utc>::from_timestamp(secs, 0)
            .ok_or_else(|| shape("a bucket's start_time is out of range"))?;
        return Ok((true, at.date_naive()));
    }
    if let Some(t) = bucket.get("starting_at").and_then(Value::as_str) {
        let at = DateTime::parse_from_rfc3339(t)
            .map_err(|_| shape(format!("a bucket's starting_at is not RFC 3339: {t}")))?;
        return Ok((false, at.with_timezone(&Utc).date_naive()));
    }
    Err(shape(
        "a bucket has neither start_time (OpenAI) nor starting_at (Anthropic)",
    ))
}

/// Which report a result belongs to, if it tells.
fn result_report(r: &Value) -> Option<Report> {
    match r.get("object").and_then(Value::as_str) {
        Some(
            "organization.usage.completions.result"
            | "organization.usage.embeddings.result"
            | "organization.usage.moderations.result",
        ) => return Some(Report::Usage),
        Some("organization.costs.result") => return Some(Report::Cost),
        _ => {}
    }
    if r.get("amount").is_some() {
        Some(Report::Cost)
    } else if r.get("uncached_input_tokens").is_some() || r.get("input_tokens").is_some() {
        Some(Report::Usage)
    } else {
        None
    }
}

fn page_export(page: &Value, hint: Option<Report>) -> Result<Export, ParseError> {
    let buckets = page
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| shape("no `data` array of buckets"))?;
    let results = |b: &Value| {
        b.get("results")
            .or_else(|| b.get("result"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let told = buckets
        .iter()
        .flat_map(&results)
        .find_map(|r| result_report(&r));
    let report = told.or(hint).ok_or_else(|| {
        shape("every bucket is empty, so the page does not tell a usage report from a cost report: give --report usage|cost")
    })?;
    let mut openai = None;
    let mut out = Export::new("", report);
    for b in buckets {
        let (is_openai, day) = bucket_day(b)?;
        if *openai.get_or_insert(is_openai) != is_openai {
            return Err(shape("buckets of two providers in one page"));
        }
        out.days.insert(day);
        for r in results(b) {
            if result_report(&r).is_some_and(|k| k != report) {
                return Err(shape("usage and cost results in one page"));
            }
            out.rows.push(if is_openai {
                openai_row(&r, day, report)?
            } else {
                anthropic_row(&r, day, report)?
            });
        }
    }
    out.provider = match openai {
        Some(true) => "openai",
        Some(false) => "anthropic",
        None => return Err(shape("no buckets")),
    }
    .to_owned();
    Ok(out)
}

fn openai_row(r: &Value, day: NaiveDate, report: Report) -> Result<BillRow, ParseError> {
    let mut row = BillRow {
        day,
        project_id: text(&r["project_id"]),
        ..Default::default()
    };
    match report {
        Report::Usage => {
            let input = count(&r["input_tokens"]);
            let cached = count(&r["input_cached_tokens"]).min(input);
            row.model = text(&r["model"]);
            row.api_key_id = text(&r["api_key_id"]);
            row.requests = count(&r["num_model_requests"]);
            row.tokens = Tokens {
                input: input - cached,
                cache_read: cached,
                cache_write: 0,
                output: count(&r["output_tokens"]),
            };
        }
        Report::Cost => {
            let amount = &r["amount"];
            let currency = text(&amount["currency"]);
            if !currency.is_empty() && !currency.eq_ignore_ascii_case("usd") {
                return Err(shape(format!("a cost in {currency}: only USD is compared")));
            }
            row.cost = decimal(&amount["value"])
                .ok_or_else(|| shape("a cost result without a numeric amount.value"))?;
            // "gpt-4o-mini-2024-07-18, input": the model, then what the line charges.
            let line = text(&r["line_item"]);
            let (model, item) = line.split_once(", ").unwrap_or((line.as_str(), ""));
            row.model = model.trim().to_owned();
            row.item = item.trim().to_owned();
        }
    }
    Ok(row)
}

fn anthropic_row(r: &Value, day: NaiveDate, report: Report) -> Result<BillRow, ParseError> {
    let mut row = BillRow {
        day,
        model: text(&r["model"]),
        project_id: text(&r["workspace_id"]),
        ..Default::default()
    };
    match report {
        Report::Usage => {
            let creation = &r["cache_creation"];
            row.api_key_id = text(&r["api_key_id"]);
            row.tokens = Tokens {
                input: count(&r["uncached_input_tokens"]),
                cache_read: count(&r["cache_read_input_tokens"]),
                cache_write: count(&creation["ephemeral_5m_input_tokens"])
                    + count(&creation["ephemeral_1h_input_tokens"]),
                output: count(&r["output_tokens"]),
            };
        }
        Report::Cost => {
            let currency = text(&r["currency"]);
            if !currency.is_empty() && !currency.eq_ignore_ascii_case("usd") {
                return Err(shape(format!("a cost in {currency}: only USD is compared")));
            }
            // "123.45" is $1.2345: amounts are in cents.
            let cents = decimal(&r["amount"])
                .ok_or_else(|| shape("a cost result without a decimal amount"))?;
            row.cost = cents / Decimal::ONE_HUNDRED;
            row.item = [text(&r["token_type"]), text(&r["cost_type"])]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or_default();
        }
    }
    Ok(row)
}

/// A CSV report: a header row naming the API's fields (any of the names below, in any
/// order), one row per day and group. Days are `YYYY-MM-DD`, RFC 3339 times or Unix
/// seconds. Costs are in USD (`amount`, `cost`, `cost_usd`; Anthropic's `amount` in cents
/// as in its API, or `cost_usd` in dollars).
fn csv_export(text: &str, provider: &str, report: Report) -> Result<Export, ParseError> {
    let mut rd = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let headers: Vec<String> = rd
        .headers()
        .map_err(|e| ParseError::Syntax(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let col = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| headers.iter().position(|h| h == n))
    };
    let day_col = col(&["date", "day", "start_time", "starting_at", "bucket_start"])
        .ok_or_else(|| shape("the CSV has no date column (date, start_time or starting_at)"))?;
    let anthropic = provider == "anthropic";
    let cols = [
        col(&["model"]),
        col(&["api_key_id"]),
        col(&["project_id", "workspace_id"]),
        col(&["num_model_requests", "requests"]),
        col(&["input_tokens", "uncached_input_tokens"]),
        col(&["input_cached_tokens", "cache_read_input_tokens"]),
        col(&["cache_creation_input_tokens", "cache_write_tokens"]),
        col(&["output_tokens"]),
        col(&["line_item", "description", "token_type", "cost_type"]),
    ];
    let dollars = col(&["cost_usd", "cost"]);
    let cents = col(&["amount", "amount_value"]);
    if report == Report::Cost && dollars.is_none() && cents.is_none() {
        return Err(shape("a cost CSV needs an amount or cost_usd column"));
    }
    let mut out = Export::new(provider, report);
    for (n, rec) in rd.records().enumerate() {
        let rec = rec.map_err(|e| ParseError::Syntax(e.to_string()))?;
        let get = |c: Option<usize>| c.and_then(|c| rec.get(c)).unwrap_or("").trim().to_owned();
        let num = |c: Option<usize>| get(c).parse::<u64>().unwrap_or(0);
        let raw_day = get(Some(day_col));
        let day = csv_day(&raw_day)
            .ok_or_else(|| shape(format!("row {}: not a day: {raw_day:?}", n + 2)))?;
        out.days.insert(day);
        let [model, key, project, requests, input, cached, written, output, item] = cols;
        let mut row = BillRow {
            day,
            model: get(model),
            api_key_id: get(key),
            project_id: get(project),
            requests: num(requests),
            ..Default::default()
        };
        match report {
            Report::Usage => {
                let (input, cached) = (num(input), num(cached));
                row.tokens = Tokens {
                    // OpenAI's input_tokens include the cached ones; Anthropic's
                    // uncached_input_tokens do not.
                    input: if anthropic {
                        input
                    } else {
                        input.saturating_sub(cached)
                    },
                    cache_read: cached,
                    cache_write: num(written),
                    output: num(output),
                };
            }
            Report::Cost => {
                let line = get(item);
                let (m, what) = line.split_once(", ").unwrap_or((line.as_str(), ""));
                if row.model.is_empty() {
                    row.model = m.trim().to_owned();
                    row.item = what.trim().to_owned();
                } else {
                    row.item = line.clone();
                }
                let parsed = |c: Option<usize>| {
                    let s = get(c);
                    Decimal::from_str(&s)
                        .or_else(|_| Decimal::from_scientific(&s))
                        .ok()
                };
                row.cost = match (dollars, cents) {
                    (Some(d), _) => parsed(Some(d)),
                    (None, Some(c)) if anthropic => {
                        parsed(Some(c)).map(|v| v / Decimal::ONE_HUNDRED)
                    }
                    (None, c) => parsed(c),
                }
                .ok_or_else(|| shape(format!("row {}: the amount is not a number", n + 2)))?;
            }
        }
        out.rows.push(row);
    }
    Ok(out)
}

fn csv_day(s: &str) -> Option<NaiveDate> {
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Some(d);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc).date_naive());
    }
    if let Ok(secs) = s.parse::<i64>() {
        return DateTime::<Utc>::from_timestamp(secs, 0).map(|t| t.date_naive());
    }
    s.get(..10)
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use serde_json::json;

    fn day(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn openai_usage_page_is_split_into_uncached_and_cached_input() {
        let page = json!({"object": "page", "data": [
            {"object": "bucket", "start_time": 1730419200, "end_time": 1730505600, "results": [
                {"object": "organization.usage.completions.result", "input_tokens": 1000,
                 "input_cached_tokens": 200, "output_tokens": 50, "num_model_requests": 3,
                 "project_id": "proj_a", "api_key_id": "key_a", "model": "gpt-4o-mini-2024-07-18",
                 "user_id": null, "batch": null}]},
            {"object": "bucket", "start_time": 1730505600, "end_time": 1730592000, "results": []}
        ], "has_more": false, "next_page": null});
        let e = parse(&page.to_string(), None, None).unwrap();
        assert_eq!(e.len(), 1);
        let e = &e[0];
        assert_eq!((e.provider.as_str(), e.report), ("openai", Report::Usage));
        assert_eq!(
            e.days.iter().copied().collect::<Vec<_>>(),
            vec![day("2024-11-01"), day("2024-11-02")]
        );
        assert_eq!(e.rows.len(), 1);
        let r = &e.rows[0];
        assert_eq!(
            r.tokens,
            Tokens {
                input: 800,
                cache_read: 200,
                cache_write: 0,
                output: 50
            }
        );
        assert_eq!(
            (r.requests, r.api_key_id.as_str(), r.project_id.as_str()),
            (3, "key_a", "proj_a")
        );
    }

    #[test]
    fn openai_costs_are_exact_decimals_split_by_line_item() {
        let page = json!({"object": "page", "data": [{"object": "bucket", "start_time": 1730419200,
            "end_time": 1730505600, "results": [
                {"object": "organization.costs.result", "amount": {"value": 0.06, "currency": "usd"},
                 "line_item": "gpt-4o-2024-08-06, input", "project_id": "proj_abc"},
                {"object": "organization.costs.result", "amount": {"value": 1.234567890123, "currency": "usd"},
                 "line_item": "gpt-4o-2024-08-06, output", "project_id": "proj_abc"}]}]});
        let e = &parse(&page.to_string(), None, None).unwrap()[0];
        assert_eq!(e.report, Report::Cost);
        assert_eq!(e.rows[0].cost, dec!(0.06));
        assert_eq!(e.rows[1].cost, dec!(1.234567890123));
        assert_eq!(
            (e.rows[1].model.as_str(), e.rows[1].item.as_str()),
            ("gpt-4o-2024-08-06", "output")
        );
    }

    #[test]
    fn anthropic_reports_count_cache_writes_and_cents() {
        let usage = json!({"data": [{"starting_at": "2025-08-01T00:00:00Z", "ending_at": "2025-08-02T00:00:00Z",
            "results": [{"uncached_input_tokens": 1500, "cache_creation": {"ephemeral_1h_input_tokens": 1000,
              "ephemeral_5m_input_tokens": 500}, "cache_read_input_tokens": 200, "output_tokens": 500,
              "server_tool_use": {"web_search_requests": 0}, "api_key_id": "apikey_01", "workspace_id": "wrkspc_01",
              "model": "claude-sonnet-4-20250514", "service_tier": "standard", "context_window": "0-200k"}]}],
            "has_more": false, "next_page": null});
        let cost = json!({"data": [{"starting_at": "2025-08-01T00:00:00Z", "ending_at": "2025-08-02T00:00:00Z",
            "results": [{"currency": "USD", "amount": "123.45", "workspace_id": null, "description": "Claude Sonnet 4 Usage - Input Tokens",
              "cost_type": "tokens", "context_window": "0-200k", "model": "claude-sonnet-4-20250514",
              "service_tier": "standard", "token_type": "uncached_input_tokens"}]}],
            "has_more": false, "next_page": null});
        let both = Value::Array(vec![usage, cost]).to_string();
        let e = parse(&both, Some("anthropic"), None).unwrap();
        assert_eq!(e.len(), 2);
        let u = e.iter().find(|e| e.report == Report::Usage).unwrap();
        assert_eq!(
            u.rows[0].tokens,
            Tokens {
                input: 1500,
                cache_read: 200,
                cache_write: 1500,
                output: 500
            }
        );
        let c = e.iter().find(|e| e.report == Report::Cost).unwrap();
        assert_eq!(c.rows[0].cost, dec!(1.2345));
        assert_eq!(c.rows[0].item, "uncached_input_tokens");
        assert_eq!(
            parse(&both, Some("openai"), None).unwrap_err(),
            shape("the file is a report of anthropic, not of openai")
        );
    }

    #[test]
    fn an_empty_page_needs_to_be_told_which_report_it_is() {
        let page =
            json!({"data": [{"start_time": 1730419200, "end_time": 1730505600, "results": []}]});
        assert!(parse(&page.to_string(), None, None).is_err());
        let e = &parse(&page.to_string(), None, Some(Report::Cost)).unwrap()[0];
        assert_eq!((e.report, e.rows.len(), e.days.len()), (Report::Cost, 0, 1));
    }

    #[test]
    fn csv_reports_read_the_api_fields_as_columns() {
        let usage = "date,model,api_key_id,project_id,num_model_requests,input_tokens,input_cached_tokens,output_tokens\n\
                     2026-11-02,gpt-4o-mini,key_a,proj_a,2,100,40,10\n";
        let e = &parse(usage, Some("openai"), Some(Report::Usage)).unwrap()[0];
        assert_eq!(
            e.rows[0].tokens,
            Tokens {
                input: 60,
                cache_read: 40,
                cache_write: 0,
                output: 10
            }
        );
        let cost =
            "start_time,line_item,project_id,amount\n1730419200,\"gpt-4o, output\",proj_a,0.25\n";
        let e = &parse(cost, Some("openai"), Some(Report::Cost)).unwrap()[0];
        assert_eq!(
            (
                e.rows[0].model.as_str(),
                e.rows[0].item.as_str(),
                e.rows[0].cost
            ),
            ("gpt-4o", "output", dec!(0.25))
        );
        assert_eq!(e.rows[0].day, day("2024-11-01"));
        assert!(parse(cost, None, None).is_err());
    }
}
