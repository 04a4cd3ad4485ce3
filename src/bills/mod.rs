//! The providers' own bills (issue 35): the usage and cost reports OpenAI and Anthropic
//! publish per day, read from their admin APIs (`fetch`) or from files (`parse`), stored
//! as imported (`store::bills`), and compared per day, provider and model with what
//! tokentally recorded for the same traffic (`reconcile`).
//!
//! What each report holds, in the providers' own terms:
//!
//! - OpenAI `GET /v1/organization/usage/completions`: per day bucket (`start_time`, Unix
//!   seconds) and group (`model`, `api_key_id`, `project_id`): `input_tokens` (cached
//!   ones included), `input_cached_tokens`, `output_tokens`, `num_model_requests`.
//! - OpenAI `GET /v1/organization/costs`: per day bucket and group (`line_item` such as
//!   `gpt-4o-mini-2024-07-18, input`, `project_id`): `amount.value` in `amount.currency`.
//! - Anthropic `GET /v1/organizations/usage_report/messages`: per bucket (`starting_at`,
//!   RFC 3339) and group (`model`, `api_key_id`, `workspace_id`): `uncached_input_tokens`,
//!   `cache_read_input_tokens`, `cache_creation` (5-minute and 1-hour writes),
//!   `output_tokens`. No request count.
//! - Anthropic `GET /v1/organizations/cost_report`: per bucket and group (`description`,
//!   with `model` and `token_type`; `workspace_id`): `amount` in cents as a decimal string.
//!
//! Google publishes no usage or cost API for the Gemini API (its costs reach Cloud
//! Billing's BigQuery export); Gemini traffic is listed as not compared.

pub mod fetch;
pub mod parse;
pub mod reconcile;

use std::collections::BTreeSet;
use std::fmt;

use chrono::NaiveDate;
use rust_decimal::Decimal;

/// Which of a provider's two reports a row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Report {
    /// Tokens (and, for OpenAI, requests) per day, model, key and project.
    Usage,
    /// The provider's charge per day and line item (model and token type).
    Cost,
}

impl Report {
    pub fn as_str(self) -> &'static str {
        match self {
            Report::Usage => "usage",
            Report::Cost => "cost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "usage" => Some(Report::Usage),
            "cost" => Some(Report::Cost),
            _ => None,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tokens in tokentally's split: `input` excludes cached reads and cache writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub output: u64,
}

impl Tokens {
    pub fn total(&self) -> u64 {
        self.input + self.cache_read + self.cache_write + self.output
    }

    pub fn add(&mut self, o: &Tokens) {
        self.input += o.input;
        self.cache_read += o.cache_read;
        self.cache_write += o.cache_write;
        self.output += o.output;
    }

    /// `self - o` per kind, floored at zero.
    pub fn minus(&self, o: &Tokens) -> Tokens {
        Tokens {
            input: self.input.saturating_sub(o.input),
            cache_read: self.cache_read.saturating_sub(o.cache_read),
            cache_write: self.cache_write.saturating_sub(o.cache_write),
            output: self.output.saturating_sub(o.output),
        }
    }

    pub fn counts(&self) -> crate::domain::TokenCounts {
        crate::domain::TokenCounts::new(
            self.input,
            self.cache_read,
            self.cache_write,
            self.output,
            0,
        )
    }
}

/// One row of a provider's report, as the provider groups it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillRow {
    pub day: NaiveDate,
    /// The model as the provider names it (`""` when the row is not per model).
    pub model: String,
    /// A cost row's line item or token type (`input`, `output_tokens`, `web_search`…).
    pub item: String,
    pub api_key_id: String,
    /// OpenAI project or Anthropic workspace.
    pub project_id: String,
    /// Requests (OpenAI usage only; 0 where the provider does not count them).
    pub requests: u64,
    pub tokens: Tokens,
    /// The provider's charge in USD (cost rows).
    pub cost: Decimal,
}

/// One report of one provider over whole UTC days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// `openai` or `anthropic` (the names usage events use).
    pub provider: String,
    pub report: Report,
    /// Every day the export covers: a day with no rows means nothing was used (or
    /// charged) that day; a day not listed is not covered.
    pub days: BTreeSet<NaiveDate>,
    pub rows: Vec<BillRow>,
}

impl Export {
    pub fn new(provider: &str, report: Report) -> Self {
        Self {
            provider: provider.to_owned(),
            report,
            days: BTreeSet::new(),
            rows: Vec::new(),
        }
    }

    /// Merges another page of the same report.
    pub fn extend(&mut self, o: Export) {
        self.days.extend(o.days);
        self.rows.extend(o.rows);
    }
}
