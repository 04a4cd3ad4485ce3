//! Turns a provider's own usage object into canonical, disjoint token classes.
//!
//! Providers disagree on what "input" includes: OpenAI and Gemini count cached
//! tokens inside the prompt total, Anthropic reports them beside it. Gateways that
//! pass those numbers on verbatim double-count cache reads; this module is where
//! that is undone, once, per provider shape.

use serde_json::{Map, Value};

use crate::domain::TokenCounts;

/// Largest token count we accept in one class of one event. Far above any real
/// request, small enough that sums over billions of events never overflow.
pub const MAX_TOKENS: u64 = 1_000_000_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error("`{0}` must be a non-negative integer")]
    NotACount(String),
    #[error("`{0}` is negative")]
    Negative(String),
    #[error("`{0}` is larger than {MAX_TOKENS}")]
    Overflow(String),
    #[error("{0}")]
    Inconsistent(String),
    #[error("provider_usage for provider `{0}` has no recognised shape")]
    UnknownShape(String),
    #[error("usage must be a JSON object")]
    NotAnObject,
}

impl UsageError {
    /// Negative and overflowing counts get their own rejection reason.
    pub fn is_bad_count(&self) -> bool {
        matches!(self, UsageError::Negative(_) | UsageError::Overflow(_))
    }
}

/// Reads an optional count at `path` (dot-separated) from `obj`; absent or null is 0.
fn count(obj: &Map<String, Value>, path: &str) -> Result<u64, UsageError> {
    let mut parts = path.split('.');
    let mut cur = obj.get(parts.next().unwrap_or_default());
    for p in parts {
        cur = match cur {
            Some(Value::Object(o)) => o.get(p),
            Some(Value::Null) | None => None,
            Some(_) => return Err(UsageError::NotACount(path.to_owned())),
        };
    }
    match cur {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                if v > MAX_TOKENS {
                    Err(UsageError::Overflow(path.to_owned()))
                } else {
                    Ok(v)
                }
            } else if n.as_i64().is_some_and(|v| v < 0) || n.as_f64().is_some_and(|v| v < 0.0) {
                Err(UsageError::Negative(path.to_owned()))
            } else if n.is_f64() && n.as_f64().is_some_and(|v| v >= 1.8e19) {
                Err(UsageError::Overflow(path.to_owned()))
            } else {
                Err(UsageError::NotACount(path.to_owned()))
            }
        }
        Some(_) => Err(UsageError::NotACount(path.to_owned())),
    }
}

fn has(obj: &Map<String, Value>, key: &str) -> bool {
    obj.get(key).is_some_and(|v| !v.is_null())
}

fn subtract(total: u64, part: u64, total_name: &str, part_name: &str) -> Result<u64, UsageError> {
    total.checked_sub(part).ok_or_else(|| {
        UsageError::Inconsistent(format!(
            "`{part_name}` ({part}) exceeds `{total_name}` ({total})"
        ))
    })
}

fn checked(t: TokenCounts) -> Result<TokenCounts, UsageError> {
    if t.reasoning > t.output {
        return Err(UsageError::Inconsistent(format!(
            "reasoning tokens ({}) exceed output tokens ({})",
            t.reasoning, t.output
        )));
    }
    for (name, v) in [
        ("input", t.input),
        ("cache_read", t.cache_read),
        ("cache_write", t.cache_write),
        ("output", t.output),
    ] {
        if v > MAX_TOKENS {
            return Err(UsageError::Overflow(name.to_owned()));
        }
    }
    Ok(t)
}

/// Canonical `usage` as sent by a gateway that already speaks contract v1.
pub fn canonical(v: &Value) -> Result<TokenCounts, UsageError> {
    let o = v.as_object().ok_or(UsageError::NotAnObject)?;
    checked(TokenCounts {
        input: count(o, "input_tokens")?,
        cache_read: count(o, "cache_read_tokens")?,
        cache_write: count(o, "cache_write_tokens")?,
        output: count(o, "output_tokens")?,
        reasoning: count(o, "reasoning_tokens")?,
    })
}

/// A provider's usage object passed verbatim, normalized by `provider` (canonical name).
pub fn provider_usage(provider: &str, v: &Value) -> Result<TokenCounts, UsageError> {
    let o = v.as_object().ok_or(UsageError::NotAnObject)?;
    match provider {
        "openai" | "azure" | "azure_openai" if has(o, "prompt_tokens") => openai_chat(o),
        "openai" | "azure" | "azure_openai" if has(o, "input_tokens") => openai_responses(o),
        "anthropic" if has(o, "input_tokens") || has(o, "output_tokens") => anthropic(o),
        "google" if has(o, "promptTokenCount") || has(o, "candidatesTokenCount") => gemini(o),
        // Shapes are recognised by their fields too, so an OpenAI-compatible
        // provider (DeepSeek, xAI, a self-hosted vLLM) normalizes like OpenAI.
        _ if has(o, "prompt_tokens") => openai_chat(o),
        _ if has(o, "promptTokenCount") => gemini(o),
        _ if has(o, "cache_read_input_tokens") || has(o, "cache_creation_input_tokens") => {
            anthropic(o)
        }
        _ if has(o, "input_tokens") && has(o, "input_tokens_details") => openai_responses(o),
        _ => Err(UsageError::UnknownShape(provider.to_owned())),
    }
}

/// OpenAI chat completions: `prompt_tokens` includes cached tokens,
/// `completion_tokens` includes reasoning tokens.
fn openai_chat(o: &Map<String, Value>) -> Result<TokenCounts, UsageError> {
    openai(
        o,
        ["prompt_tokens", "prompt_tokens_details.cached_tokens"],
        [
            "completion_tokens",
            "completion_tokens_details.reasoning_tokens",
        ],
    )
}

/// OpenAI responses API: `input_tokens` includes cached tokens,
/// `output_tokens` includes reasoning tokens.
fn openai_responses(o: &Map<String, Value>) -> Result<TokenCounts, UsageError> {
    openai(
        o,
        ["input_tokens", "input_tokens_details.cached_tokens"],
        ["output_tokens", "output_tokens_details.reasoning_tokens"],
    )
}

/// Both OpenAI shapes: [prompt total, cached part], [output total, reasoning part].
fn openai(
    o: &Map<String, Value>,
    prompt: [&str; 2],
    output: [&str; 2],
) -> Result<TokenCounts, UsageError> {
    let (total, cached) = (count(o, prompt[0])?, count(o, prompt[1])?);
    checked(TokenCounts {
        input: subtract(total, cached, prompt[0], prompt[1])?,
        cache_read: cached,
        cache_write: 0,
        output: count(o, output[0])?,
        reasoning: count(o, output[1])?,
    })
}

/// Anthropic messages: `input_tokens` already excludes cache reads and writes.
fn anthropic(o: &Map<String, Value>) -> Result<TokenCounts, UsageError> {
    checked(TokenCounts {
        input: count(o, "input_tokens")?,
        cache_read: count(o, "cache_read_input_tokens")?,
        cache_write: count(o, "cache_creation_input_tokens")?,
        output: count(o, "output_tokens")?,
        reasoning: 0,
    })
}

/// Gemini: `promptTokenCount` includes `cachedContentTokenCount`; tool-use prompt
/// tokens are billed as input; `candidatesTokenCount` excludes `thoughtsTokenCount`,
/// which is billed as output.
fn gemini(o: &Map<String, Value>) -> Result<TokenCounts, UsageError> {
    let prompt = count(o, "promptTokenCount")?;
    let cached = count(o, "cachedContentTokenCount")?;
    let tool_prompt = count(o, "toolUsePromptTokenCount")?;
    let candidates = count(o, "candidatesTokenCount")?;
    let thoughts = count(o, "thoughtsTokenCount")?;
    checked(TokenCounts {
        input: subtract(
            prompt,
            cached,
            "promptTokenCount",
            "cachedContentTokenCount",
        )? + tool_prompt,
        cache_read: cached,
        cache_write: 0,
        output: candidates + thoughts,
        reasoning: thoughts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn provider_shapes_table() {
        // (provider, provider_usage, expected canonical counts)
        let cases = [
            (
                "openai",
                json!({"prompt_tokens": 1200, "completion_tokens": 450,
                       "prompt_tokens_details": {"cached_tokens": 200},
                       "completion_tokens_details": {"reasoning_tokens": 100}}),
                TokenCounts::new(1000, 200, 0, 450, 100),
            ),
            (
                "openai",
                json!({"prompt_tokens": 10, "completion_tokens": 5}),
                TokenCounts::new(10, 0, 0, 5, 0),
            ),
            (
                "openai",
                json!({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": null}),
                TokenCounts::new(10, 0, 0, 5, 0),
            ),
            (
                "openai",
                json!({"input_tokens": 5000, "output_tokens": 900,
                       "input_tokens_details": {"cached_tokens": 4096},
                       "output_tokens_details": {"reasoning_tokens": 600}, "total_tokens": 5900}),
                TokenCounts::new(904, 4096, 0, 900, 600),
            ),
            (
                "anthropic",
                json!({"input_tokens": 30, "cache_read_input_tokens": 7000,
                       "cache_creation_input_tokens": 1500, "output_tokens": 250}),
                TokenCounts::new(30, 7000, 1500, 250, 0),
            ),
            (
                "anthropic",
                json!({"input_tokens": 12, "output_tokens": 3}),
                TokenCounts::new(12, 0, 0, 3, 0),
            ),
            (
                "google",
                json!({"promptTokenCount": 3000, "cachedContentTokenCount": 2048,
                       "candidatesTokenCount": 400, "thoughtsTokenCount": 150, "totalTokenCount": 3550}),
                TokenCounts::new(952, 2048, 0, 550, 150),
            ),
            (
                "google",
                json!({"promptTokenCount": 100, "candidatesTokenCount": 20, "toolUsePromptTokenCount": 7}),
                TokenCounts::new(107, 0, 0, 20, 0),
            ),
            // An OpenAI-compatible provider is recognised by its shape.
            (
                "deepseek",
                json!({"prompt_tokens": 50, "completion_tokens": 9,
                       "prompt_tokens_details": {"cached_tokens": 40}}),
                TokenCounts::new(10, 40, 0, 9, 0),
            ),
        ];
        for (provider, usage, want) in cases {
            assert_eq!(
                provider_usage(provider, &usage),
                Ok(want),
                "{provider} {usage}"
            );
        }
    }

    #[test]
    fn provider_shapes_reject_inconsistent_and_bad_counts() {
        let bad = [
            (
                "openai",
                json!({"prompt_tokens": 10, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 11}}),
            ),
            (
                "openai",
                json!({"prompt_tokens": 10, "completion_tokens": 1, "completion_tokens_details": {"reasoning_tokens": 2}}),
            ),
            (
                "openai",
                json!({"prompt_tokens": -1, "completion_tokens": 1}),
            ),
            (
                "anthropic",
                json!({"input_tokens": 1.5, "output_tokens": 1}),
            ),
            (
                "anthropic",
                json!({"input_tokens": "12", "output_tokens": 1}),
            ),
            (
                "google",
                json!({"promptTokenCount": 1, "cachedContentTokenCount": 2}),
            ),
            ("google", json!({"promptTokenCount": 1e30})),
            ("openai", json!({"foo": 1})),
            ("openai", json!([1, 2])),
        ];
        for (provider, usage) in bad {
            assert!(
                provider_usage(provider, &usage).is_err(),
                "{provider} {usage} should fail"
            );
        }
        assert!(provider_usage("openai", &json!({"prompt_tokens": -1}))
            .unwrap_err()
            .is_bad_count());
        assert!(provider_usage("google", &json!({"promptTokenCount": 1e30}))
            .unwrap_err()
            .is_bad_count());
        assert!(
            provider_usage("openai", &json!({"prompt_tokens": 18446744073709551615u64}))
                .unwrap_err()
                .is_bad_count()
        );
    }

    #[test]
    fn canonical_usage() {
        let u = json!({"input_tokens": 1000, "cache_read_tokens": 200, "cache_write_tokens": 0,
                       "output_tokens": 350, "reasoning_tokens": 100});
        assert_eq!(canonical(&u), Ok(TokenCounts::new(1000, 200, 0, 350, 100)));
        assert!(canonical(&json!({"output_tokens": 1, "reasoning_tokens": 2})).is_err());
        assert!(canonical(&json!({"input_tokens": -5}))
            .unwrap_err()
            .is_bad_count());
        assert!(canonical(&json!("x")).is_err());
    }
}
