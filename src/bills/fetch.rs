//! Fetching the reports from the providers' admin APIs, every page, one day per bucket.

use std::time::Duration;

use chrono::{NaiveDate, TimeZone, Utc};
use serde_json::Value;

use super::parse::parse_page;
use super::{Export, Report};
use crate::config::BillSourceConfig;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "{provider}: no admin key (set [provider_bills.{provider}] admin_key or admin_key_file)"
    )]
    NoKey { provider: String },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("{provider} {report} report: {message}")]
    Http {
        provider: String,
        report: Report,
        message: String,
    },
    #[error("{provider} {report} report: {source}")]
    Parse {
        provider: String,
        report: Report,
        source: super::parse::ParseError,
    },
}

/// The provider's public admin API when `base_url` is empty.
fn base(provider: &str, cfg: &BillSourceConfig) -> String {
    let b = cfg.base_url.trim_end_matches('/');
    if !b.is_empty() {
        return b.to_owned();
    }
    match provider {
        "anthropic" => "https://api.anthropic.com".into(),
        _ => "https://api.openai.com".into(),
    }
}

/// The paths and queries of the first pages of `report` over `from..=to` (OpenAI's
/// usage comes from one endpoint per kind of request: completions and embeddings).
fn first_queries(
    provider: &str,
    report: Report,
    from: NaiveDate,
    to: NaiveDate,
) -> Vec<(String, Vec<(String, String)>)> {
    match (provider, report) {
        ("anthropic", _) | (_, Report::Cost) => vec![first_query(provider, report, from, to, "")],
        _ => ["completions", "embeddings"]
            .into_iter()
            .map(|kind| first_query(provider, report, from, to, kind))
            .collect(),
    }
}

fn first_query(
    provider: &str,
    report: Report,
    from: NaiveDate,
    to: NaiveDate,
    kind: &str,
) -> (String, Vec<(String, String)>) {
    let start = Utc.from_utc_datetime(&from.and_hms_opt(0, 0, 0).expect("midnight"));
    let end = Utc.from_utc_datetime(
        &(to + chrono::Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .expect("midnight"),
    );
    let days = ((to - from).num_days() + 1).clamp(1, 31).to_string();
    let q = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    match (provider, report) {
        ("anthropic", Report::Usage) => (
            "/v1/organizations/usage_report/messages".into(),
            q(&[
                (
                    "starting_at",
                    &start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
                (
                    "ending_at",
                    &end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
                ("bucket_width", "1d"),
                ("group_by[]", "model"),
                ("group_by[]", "api_key_id"),
                ("group_by[]", "workspace_id"),
                ("limit", &days),
            ]),
        ),
        ("anthropic", Report::Cost) => (
            "/v1/organizations/cost_report".into(),
            q(&[
                (
                    "starting_at",
                    &start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
                (
                    "ending_at",
                    &end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ),
                ("group_by[]", "description"),
                ("group_by[]", "workspace_id"),
            ]),
        ),
        (_, Report::Usage) => (
            format!("/v1/organization/usage/{kind}"),
            q(&[
                ("start_time", &start.timestamp().to_string()),
                ("end_time", &end.timestamp().to_string()),
                ("bucket_width", "1d"),
                ("group_by[]", "model"),
                ("group_by[]", "api_key_id"),
                ("group_by[]", "project_id"),
                ("limit", "31"),
            ]),
        ),
        (_, Report::Cost) => (
            "/v1/organization/costs".into(),
            q(&[
                ("start_time", &start.timestamp().to_string()),
                ("end_time", &end.timestamp().to_string()),
                ("bucket_width", "1d"),
                ("group_by[]", "line_item"),
                ("group_by[]", "project_id"),
                ("limit", "180"),
            ]),
        ),
    }
}

/// Both reports of `provider` over `from..=to`, every page followed.
pub async fn fetch(
    provider: &str,
    cfg: &BillSourceConfig,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Vec<Export>, FetchError> {
    let key = cfg.key()?.ok_or_else(|| FetchError::NoKey {
        provider: provider.to_owned(),
    })?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client");
    let mut out = Vec::new();
    for report in [Report::Usage, Report::Cost] {
        let err = |message: String| FetchError::Http {
            provider: provider.to_owned(),
            report,
            message,
        };
        let mut export = Export::new(provider, report);
        for (path, query) in first_queries(provider, report, from, to) {
            let url = format!("{}{path}", base(provider, cfg));
            let mut url = reqwest::Url::parse_with_params(&url, &query)
                .map_err(|e| err(format!("base URL: {e}")))?;
            let mut page: Option<String> = None;
            let first = url.clone();
            for _ in 0..1000 {
                if let Some(p) = &page {
                    url = first.clone();
                    url.query_pairs_mut().append_pair("page", p);
                }
                let mut req = http.get(url.clone());
                req = if provider == "anthropic" {
                    req.header("x-api-key", key.expose())
                        .header("anthropic-version", "2023-06-01")
                } else {
                    req.bearer_auth(key.expose())
                };
                let res = req
                    .send()
                    .await
                    .map_err(|e| err(e.without_url().to_string()))?;
                let status = res.status();
                let body = res
                    .text()
                    .await
                    .map_err(|e| err(e.without_url().to_string()))?;
                if !status.is_success() {
                    return Err(err(format!(
                        "HTTP {status}: {}",
                        crate::format::log_safe(&body, 300)
                    )));
                }
                let v: Value =
                    serde_json::from_str(&body).map_err(|e| err(format!("not JSON: {e}")))?;
                export.extend(parse_page(&v, provider, report).map_err(|source| {
                    FetchError::Parse {
                        provider: provider.to_owned(),
                        report,
                        source,
                    }
                })?);
                match (v["has_more"].as_bool(), v["next_page"].as_str()) {
                    (Some(true), Some(next)) => page = Some(next.to_owned()),
                    _ => break,
                }
            }
        }
        // Buckets the API returned outside the range (a provider's partial first day).
        export.days.retain(|d| *d >= from && *d <= to);
        export.rows.retain(|r| r.day >= from && r.day <= to);
        out.push(export);
    }
    Ok(out)
}
