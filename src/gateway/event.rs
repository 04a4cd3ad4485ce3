//! The usage event of one gateway request (contract v1, docs/events.md): no prompt, no
//! completion, no secret — ids, counts, timings.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

pub use crate::contract::Status;
use crate::domain::{Billing, TokenCounts};

#[derive(Debug, Clone, Serialize)]
struct CanonicalUsage {
    input_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
}

impl From<TokenCounts> for CanonicalUsage {
    fn from(t: TokenCounts) -> Self {
        Self {
            input_tokens: t.input,
            cache_read_tokens: t.cache_read,
            cache_write_tokens: t.cache_write,
            output_tokens: t.output,
            reasoning_tokens: t.reasoning,
        }
    }
}

/// Usage as the event carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Usage {
    /// The provider's own usage object, verbatim.
    Provider(Value),
    /// Counted by the gateway (`usage_estimated`).
    Estimated(TokenCounts),
    /// Nothing was generated (refused, failed).
    None,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayEvent {
    schema_version: u8,
    pub event_id: String,
    occurred_at: String,
    pub institution_id: String,
    user_id: String,
    api_key_id: String,
    provider: &'static str,
    pub model: String,
    endpoint: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    service_tier: String,
    pub status: Status,
    latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<CanonicalUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_usage: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub usage_estimated: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    billing: &'static str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<String, String>,
    /// The provider's HTTP status (0: no answer). Not part of the contract's required
    /// fields; kept for operators.
    upstream_status: u16,
}

/// The parts of an event known when a request starts.
#[derive(Debug, Clone)]
pub struct Origin {
    pub request_id: String,
    pub occurred_at: DateTime<Utc>,
    pub institution_id: String,
    pub user_id: String,
    pub api_key_id: String,
    pub provider: &'static str,
    pub endpoint: &'static str,
    pub tags: BTreeMap<String, String>,
    pub billing: Billing,
}

impl GatewayEvent {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        origin: &Origin,
        model: &str,
        service_tier: Option<&str>,
        status: Status,
        latency_ms: u64,
        usage: Usage,
        upstream_status: u16,
    ) -> Self {
        let (canonical, provider_usage, estimated) = match usage {
            Usage::Provider(v) => (None, Some(v), false),
            Usage::Estimated(t) => (Some(t.into()), None, true),
            Usage::None => (Some(TokenCounts::default().into()), None, false),
        };
        Self {
            schema_version: 1,
            event_id: origin.request_id.clone(),
            occurred_at: origin
                .occurred_at
                .to_rfc3339_opts(SecondsFormat::Millis, true),
            institution_id: origin.institution_id.clone(),
            user_id: origin.user_id.clone(),
            api_key_id: origin.api_key_id.clone(),
            provider: origin.provider,
            model: model.to_owned(),
            endpoint: origin.endpoint,
            service_tier: service_tier.unwrap_or_default().to_owned(),
            status,
            latency_ms,
            usage: canonical,
            provider_usage,
            usage_estimated: estimated,
            billing: origin.billing.as_str(),
            tags: origin.tags.clone(),
            upstream_status,
        }
    }

    /// The token counts ingest will store for this event (the provider's usage read the
    /// way ingest reads it).
    pub fn token_counts(&self) -> TokenCounts {
        match (&self.usage, &self.provider_usage) {
            (Some(u), _) => TokenCounts::new(
                u.input_tokens,
                u.cache_read_tokens,
                u.cache_write_tokens,
                u.output_tokens,
                u.reasoning_tokens,
            ),
            (None, Some(v)) => {
                crate::contract::normalize::provider_usage(self.provider, v).unwrap_or_default()
            }
            (None, None) => TokenCounts::default(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::decode::{decode, DecodeOptions};

    fn origin() -> Origin {
        Origin {
            request_id: "0193a4c2-7b1e-7c3a-9f00-5d2b8e1a4c77".into(),
            occurred_at: Utc::now(),
            institution_id: "uni".into(),
            user_id: "alice".into(),
            api_key_id: "kabc".into(),
            provider: "openai",
            endpoint: "chat.completions",
            tags: [("course".to_string(), "inf100".to_string())].into(),
            billing: Billing::Byok,
        }
    }

    /// Every event the gateway writes is one ingest accepts, as it was meant.
    #[test]
    fn gateway_events_decode_as_contract_v1() {
        let opts = DecodeOptions {
            now: Utc::now(),
            max_future_skew: chrono::Duration::minutes(5),
        };
        let e = GatewayEvent::new(
            &origin(),
            "gpt-4o-mini-2024-07-18",
            Some("default"),
            Status::Ok,
            12,
            Usage::Provider(
                serde_json::json!({"prompt_tokens": 10, "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": 4}}),
            ),
            200,
        );
        let d = decode(&e.to_json(), &opts).unwrap();
        assert_eq!(d.usage, TokenCounts::new(6, 4, 0, 3, 0));
        assert_eq!(d.billing, Billing::Byok);
        assert_eq!(d.status, "ok");
        assert_eq!(d.tags.get("course").map(String::as_str), Some("inf100"));
        assert!(!d.usage_estimated);

        let e = GatewayEvent::new(
            &origin(),
            "gpt-4o-mini",
            None,
            Status::ClientCancelled,
            5,
            Usage::Estimated(TokenCounts::new(7, 0, 0, 2, 0)),
            200,
        );
        let d = decode(&e.to_json(), &opts).unwrap();
        assert!(d.usage_estimated);
        assert_eq!(d.usage, TokenCounts::new(7, 0, 0, 2, 0));
        assert_eq!(d.status, "client_cancelled");

        let e = GatewayEvent::new(
            &origin(),
            "gpt-4o-mini",
            None,
            Status::RejectedRateLimit,
            0,
            Usage::None,
            0,
        );
        let d = decode(&e.to_json(), &opts).unwrap();
        assert_eq!(d.usage, TokenCounts::default());
        assert!(!d.was_served());
    }
}
