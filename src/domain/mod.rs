//! Core types. Past `contract::decode` every `UsageEvent` is valid: ids are non-empty,
//! token counts are canonical (disjoint classes) and the timestamp is in range.

mod period;
mod selection;
mod status;

pub use period::Period;
pub use selection::{Scope, Selection};
pub use status::Status;

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_newtype!(
    /// The idempotency key of one gateway request.
    EventId
);
id_newtype!(
    /// The billed organisation; also the Kafka message key.
    InstitutionId
);

/// Longest id we accept; longer values are almost certainly a gateway bug.
pub const MAX_ID_LEN: usize = 256;

/// Why a string can't be an id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("contains a control character")]
    ControlChar,
}

fn check_id(s: &str) -> Result<(), IdError> {
    if s.trim().is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if s.chars().any(char::is_control) {
        return Err(IdError::ControlChar);
    }
    Ok(())
}

impl EventId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check_id(s).map(|()| Self(s.to_owned()))
    }
}

impl InstitutionId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        check_id(s).map(|()| Self(s.to_owned()))
    }
}

/// Token counts in canonical, disjoint classes.
///
/// `input` excludes cache reads and writes; `output` includes reasoning;
/// `reasoning` is the part of `output` spent on reasoning (informational unless a
/// price has a separate reasoning rate). Invariant: `reasoning <= output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    pub input: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl TokenCounts {
    /// Counts in the order input, cache read, cache write, output, reasoning.
    pub const fn new(
        input: u64,
        cache_read: u64,
        cache_write: u64,
        output: u64,
        reasoning: u64,
    ) -> Self {
        Self {
            input,
            cache_read,
            cache_write,
            output,
            reasoning,
        }
    }

    /// All prompt-side tokens; long-context tiers are chosen by this.
    pub fn prompt_total(&self) -> u64 {
        self.input + self.cache_read + self.cache_write
    }
}

/// A validated usage event (contract v1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageEvent {
    pub event_id: EventId,
    pub occurred_at: DateTime<Utc>,
    pub institution_id: InstitutionId,
    pub user_id: String,
    pub api_key_id: String,
    /// Canonical provider name (`openai`, `anthropic`, `google`, or as sent, lower-cased).
    pub provider: String,
    pub model: String,
    pub endpoint: String,
    pub service_tier: String,
    pub status: Status,
    pub latency_ms: u32,
    pub usage: TokenCounts,
    pub tags: BTreeMap<String, String>,
    /// The usage was counted by the gateway (a tokenizer), not reported by the provider.
    pub usage_estimated: bool,
    /// Who paid the provider for this request.
    pub billing: Billing,
}

impl UsageEvent {
    /// Whether the request reached a provider. A request the gateway refused (rate
    /// limit, moderation, a model the key may not use) has status `rejected_…` or
    /// `blocked_…`, one whose provider could not be reached `upstream_unreachable`: it
    /// is recorded, with zero tokens, but never charged a per-request fee.
    pub fn was_served(&self) -> bool {
        self.status.was_served()
    }
}

/// Who paid the provider for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Billing {
    /// Through the platform's upstream key: charged on the invoice.
    #[default]
    Platform,
    /// Through the institution's own key ("bring your own key"): the provider bills the
    /// institution; invoices list this usage separately and charge at most a
    /// per-request platform fee.
    Byok,
}

impl Billing {
    /// The value of the event field and of the `billing` column (`''` for platform,
    /// which is also what rows written before the column existed hold).
    pub fn as_str(self) -> &'static str {
        match self {
            Billing::Platform => "",
            Billing::Byok => "byok",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "platform" => Some(Billing::Platform),
            "byok" => Some(Billing::Byok),
            _ => None,
        }
    }
}

/// Maps the provider names gateways use to the names the price book uses.
pub fn canonical_provider(raw: &str) -> String {
    let p = raw.trim().to_ascii_lowercase();
    match p.as_str() {
        "google" | "gemini" | "vertex_ai" | "vertexai" | "vertex" | "google_ai_studio" => {
            "google".to_owned()
        }
        "openai" | "open_ai" => "openai".to_owned(),
        "anthropic" | "claude" => "anthropic".to_owned(),
        _ => p,
    }
}

/// How urgent an alert is; routes choose destinations by it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_empty_long_and_control() {
        assert_eq!(EventId::parse(""), Err(IdError::Empty));
        assert_eq!(EventId::parse("  "), Err(IdError::Empty));
        assert_eq!(EventId::parse(&"x".repeat(300)), Err(IdError::TooLong));
        assert_eq!(InstitutionId::parse("a\nb"), Err(IdError::ControlChar));
        assert_eq!(
            InstitutionId::parse("uni-oslo").unwrap().as_str(),
            "uni-oslo"
        );
    }

    #[test]
    fn provider_aliases() {
        assert_eq!(canonical_provider("Gemini"), "google");
        assert_eq!(canonical_provider("vertex_ai"), "google");
        assert_eq!(canonical_provider("OpenAI"), "openai");
        assert_eq!(canonical_provider("mistral"), "mistral");
    }
}
