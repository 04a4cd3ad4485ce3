//! Contract v1: bytes from Kafka → a valid `UsageEvent`, or a `Rejection` with a reason.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde_json::{Map, Value};

use super::normalize::{self, UsageError};
use crate::domain::{canonical_provider, EventId, InstitutionId, TokenCounts, UsageEvent};

/// Why a message was rejected. The variants are the bounded label values of the
/// `rejected` metric and the `reason` column of `rejected_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    InvalidJson,
    MissingField,
    InvalidField,
    UnsupportedSchemaVersion,
    BadTokenCount,
    FutureTimestamp,
    /// The Kafka key is not the event's `institution_id`. The contract keys every event by
    /// its institution so that all copies of an event land on one partition, where one
    /// consumer at a time deduplicates them; a copy under another key could be counted
    /// twice by two instances, so it is refused instead.
    KeyMismatch,
}

impl RejectReason {
    pub const ALL: [RejectReason; 7] = [
        RejectReason::InvalidJson,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::UnsupportedSchemaVersion,
        RejectReason::BadTokenCount,
        RejectReason::FutureTimestamp,
        RejectReason::KeyMismatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::UnsupportedSchemaVersion => "unsupported_schema_version",
            RejectReason::BadTokenCount => "bad_token_count",
            RejectReason::FutureTimestamp => "future_timestamp",
            RejectReason::KeyMismatch => "key_mismatch",
        }
    }
}

/// A message that can't become an event: the reason code plus a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

/// What a rejected message was about, read best effort from its payload so that
/// reconcile can count rejections by institution and time of use: the payload's
/// `institution_id` (else the Kafka key) and `occurred_at` (unix seconds), where each can
/// be read. Never fails.
pub fn rejected_about(payload: &[u8], key: &[u8]) -> (String, u32) {
    #[derive(serde::Deserialize)]
    struct About {
        #[serde(default)]
        institution_id: Option<serde_json::Value>,
        #[serde(default)]
        occurred_at: Option<serde_json::Value>,
    }
    let about: Option<About> = serde_json::from_slice(payload).ok();
    let (inst, at) = match about {
        Some(a) => (
            a.institution_id
                .and_then(|v| v.as_str().map(str::to_owned))
                .filter(|s| !s.is_empty() && s.len() <= 256),
            a.occurred_at
                .and_then(|v| v.as_str().map(str::to_owned))
                .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                .map(|t| t.timestamp())
                .filter(|t| (0..=i64::from(u32::MAX)).contains(t)),
        ),
        None => (None, None),
    };
    let inst = inst.unwrap_or_else(|| {
        std::str::from_utf8(key)
            .ok()
            .filter(|k| k.len() <= 256)
            .unwrap_or("")
            .to_owned()
    });
    (inst, at.unwrap_or(0) as u32)
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// What decoding needs to know besides the bytes.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    /// The time "now" is measured against (wall clock in production).
    pub now: DateTime<Utc>,
    /// How far in the future `occurred_at` may be (gateway clock skew).
    pub max_future_skew: Duration,
}

/// Largest instant a ClickHouse `DateTime` (UInt32 seconds) can hold.
const MAX_STORABLE_SECS: i64 = u32::MAX as i64;

/// Longest provider name (the price book's providers are short words).
pub const MAX_PROVIDER_LEN: usize = 64;
/// Most tags one event may carry: every tag becomes a row of the tag rollup.
pub const MAX_TAGS: usize = 32;
/// Longest tag name; values may be as long as an id (`MAX_ID_LEN`).
pub const MAX_TAG_KEY_LEN: usize = 64;

/// A short, printable rendering of untrusted text for a rejection detail.
pub fn excerpt(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// A short text field: at most `max` bytes, no control characters (NUL included).
fn short_text(field: &str, s: &str, max: usize) -> Result<(), Rejection> {
    if s.len() > max {
        return Err(invalid(
            field,
            format!("is {} bytes long (at most {max})", s.len()),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(field, "contains a control character"));
    }
    Ok(())
}

pub fn decode(payload: &[u8], opts: &DecodeOptions) -> Result<UsageEvent, Rejection> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| Rejection::new(RejectReason::InvalidJson, format!("not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(Rejection::new(
            RejectReason::InvalidJson,
            "the event must be a JSON object",
        ));
    };

    match obj.get("schema_version") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => {
            return Err(Rejection::new(
                RejectReason::UnsupportedSchemaVersion,
                format!("schema_version {v} is not supported (this build reads 1)"),
            ))
        }
    }

    let event_id = required_str(&obj, "event_id")?;
    let event_id = EventId::parse(event_id).map_err(|e| invalid("event_id", e))?;
    let institution_id = required_str(&obj, "institution_id")?;
    let institution_id =
        InstitutionId::parse(institution_id).map_err(|e| invalid("institution_id", e))?;
    let provider = canonical_provider(required_str(&obj, "provider")?);
    if provider.is_empty() {
        return Err(invalid("provider", "is empty"));
    }
    short_text("provider", &provider, MAX_PROVIDER_LEN)?;
    let model = required_str(&obj, "model")?.trim().to_owned();
    if model.is_empty() {
        return Err(invalid("model", "is empty"));
    }
    short_text("model", &model, crate::domain::MAX_ID_LEN)?;

    let occurred_raw = required_str(&obj, "occurred_at")?;
    let occurred_at = DateTime::parse_from_rfc3339(occurred_raw)
        .map_err(|e| {
            invalid(
                "occurred_at",
                format!("`{occurred_raw}` is not RFC 3339: {e}"),
            )
        })?
        .with_timezone(&Utc);
    if occurred_at.timestamp() < 0 || occurred_at.timestamp() > MAX_STORABLE_SECS {
        return Err(invalid(
            "occurred_at",
            format!("`{occurred_raw}` is out of range"),
        ));
    }
    if occurred_at > opts.now + opts.max_future_skew {
        return Err(Rejection::new(
            RejectReason::FutureTimestamp,
            format!(
                "occurred_at {occurred_raw} is in the future (now {})",
                opts.now.to_rfc3339()
            ),
        ));
    }

    let usage = usage(&obj, &provider)?;

    Ok(UsageEvent {
        event_id,
        occurred_at,
        institution_id,
        user_id: optional_str(&obj, "user_id")?,
        api_key_id: optional_str(&obj, "api_key_id")?,
        provider,
        model,
        endpoint: optional_str(&obj, "endpoint")?,
        service_tier: optional_str(&obj, "service_tier")?,
        status: optional_str(&obj, "status")?,
        latency_ms: latency(&obj)?,
        usage,
        tags: tags(&obj)?,
        usage_estimated: flag(&obj, "usage_estimated")?,
        billing: billing(&obj)?,
    })
}

fn flag(obj: &Map<String, Value>, field: &str) -> Result<bool, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(invalid(
            field,
            format!("must be true or false, got {other}"),
        )),
    }
}

fn billing(obj: &Map<String, Value>) -> Result<crate::domain::Billing, Rejection> {
    let raw = optional_str(obj, "billing")?;
    crate::domain::Billing::parse(&raw).ok_or_else(|| {
        invalid(
            "billing",
            format!("`{}` is not `platform` or `byok`", excerpt(&raw)),
        )
    })
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Rejection {
    Rejection::new(RejectReason::InvalidField, format!("`{field}` {e}"))
}

fn required_str<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a str, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(Rejection::new(
            RejectReason::MissingField,
            format!("required field `{field}` is missing"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(invalid(field, format!("must be a string, got {other}"))),
    }
}

fn optional_str(obj: &Map<String, Value>, field: &str) -> Result<String, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => {
            short_text(field, s, crate::domain::MAX_ID_LEN)?;
            Ok(s.clone())
        }
        Some(other) => Err(invalid(field, format!("must be a string, got {other}"))),
    }
}

fn latency(obj: &Map<String, Value>) -> Result<u32, Rejection> {
    match obj.get("latency_ms") {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid("latency_ms", "must be a non-negative integer")),
    }
}

fn tags(obj: &Map<String, Value>) -> Result<BTreeMap<String, String>, Rejection> {
    match obj.get("tags") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) if m.len() > MAX_TAGS => Err(invalid(
            "tags",
            format!("has {} entries (at most {MAX_TAGS})", m.len()),
        )),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| {
                if k.is_empty() {
                    return Err(invalid("tags", "has an empty name"));
                }
                short_text("tags", k, MAX_TAG_KEY_LEN)
                    .map_err(|e| invalid("tags", format!("name `{}`: {}", excerpt(k), e.detail)))?;
                let value = match v {
                    Value::String(s) => s.clone(),
                    // Numbers and booleans are kept as their JSON text.
                    Value::Number(_) | Value::Bool(_) => v.to_string(),
                    _ => {
                        return Err(invalid(
                            "tags",
                            format!("value of `{}` must be a string", excerpt(k)),
                        ))
                    }
                };
                short_text("tags", &value, crate::domain::MAX_ID_LEN).map_err(|e| {
                    invalid("tags", format!("value of `{}`: {}", excerpt(k), e.detail))
                })?;
                Ok((k.clone(), value))
            })
            .collect(),
        Some(_) => Err(invalid("tags", "must be an object of strings")),
    }
}

fn usage(obj: &Map<String, Value>, provider: &str) -> Result<TokenCounts, Rejection> {
    let result = match (obj.get("usage"), obj.get("provider_usage")) {
        (Some(u), _) if !u.is_null() => normalize::canonical(u),
        (_, Some(p)) if !p.is_null() => normalize::provider_usage(provider, p),
        _ => {
            return Err(Rejection::new(
                RejectReason::MissingField,
                "required field `usage` (or `provider_usage`) is missing",
            ))
        }
    };
    result.map_err(|e: UsageError| {
        let reason = if e.is_bad_count() {
            RejectReason::BadTokenCount
        } else {
            RejectReason::InvalidField
        };
        Rejection::new(reason, format!("usage: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn opts() -> DecodeOptions {
        DecodeOptions {
            now: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
            max_future_skew: Duration::minutes(5),
        }
    }

    fn sample() -> Value {
        json!({
          "schema_version": 1,
          "event_id": "0193a4c2-7b1e-7c3a-9f00-5d2b8e1a4c77",
          "occurred_at": "2026-10-14T09:21:07.412Z",
          "institution_id": "uni-oslo",
          "user_id": "alice@uni-oslo.no",
          "api_key_id": "pk_7Hq2",
          "provider": "openai",
          "model": "gpt-4o-mini-2024-07-18",
          "endpoint": "chat.completions",
          "service_tier": "default",
          "status": "ok",
          "latency_ms": 840,
          "usage": { "input_tokens": 1000, "cache_read_tokens": 200, "cache_write_tokens": 0,
                     "output_tokens": 350, "reasoning_tokens": 100 },
          "tags": { "project": "thesis-bot" }
        })
    }

    fn dec(v: &Value) -> Result<UsageEvent, Rejection> {
        decode(v.to_string().as_bytes(), &opts())
    }

    #[test]
    fn decodes_the_contract_example() {
        let e = dec(&sample()).unwrap();
        assert_eq!(e.institution_id.as_str(), "uni-oslo");
        assert_eq!(
            e.usage,
            TokenCounts {
                input: 1000,
                cache_read: 200,
                cache_write: 0,
                output: 350,
                reasoning: 100
            }
        );
        assert_eq!(e.occurred_at.timestamp_millis() % 1000, 412);
        assert_eq!(
            e.tags.get("project").map(String::as_str),
            Some("thesis-bot")
        );
        assert_eq!(e.latency_ms, 840);
        assert!(!e.usage_estimated);
        assert_eq!(e.billing, crate::domain::Billing::Platform);
    }

    #[test]
    fn gateway_fields_estimated_usage_and_billing() {
        let mut v = sample();
        v["usage_estimated"] = json!(true);
        v["billing"] = json!("byok");
        let e = dec(&v).unwrap();
        assert!(e.usage_estimated);
        assert_eq!(e.billing, crate::domain::Billing::Byok);
        v["billing"] = json!("platform");
        assert_eq!(dec(&v).unwrap().billing, crate::domain::Billing::Platform);
        v["billing"] = json!("free");
        assert_eq!(dec(&v).unwrap_err().reason, RejectReason::InvalidField);
        v["billing"] = json!("byok");
        v["usage_estimated"] = json!("yes");
        assert_eq!(dec(&v).unwrap_err().reason, RejectReason::InvalidField);
    }

    #[test]
    fn optional_fields_may_be_absent() {
        let v = json!({"event_id": "e1", "occurred_at": "2026-10-14T09:21:07Z", "institution_id": "i",
                       "provider": "Gemini", "model": "gemini-2.5-pro",
                       "provider_usage": {"promptTokenCount": 10, "candidatesTokenCount": 2}});
        let e = dec(&v).unwrap();
        assert_eq!(e.provider, "google");
        assert_eq!(e.user_id, "");
        assert_eq!(e.usage.input, 10);
    }

    #[test]
    fn a_rejection_is_attributed_to_the_payloads_institution_and_time() {
        let p = br#"{"institution_id":"uni-a","occurred_at":"2026-10-31T23:30:00Z","model":1}"#;
        assert_eq!(rejected_about(p, b"other"), ("uni-a".into(), 1_793_489_400));
        // Unreadable payloads fall back to the key, and to no time.
        assert_eq!(rejected_about(b"not json", b"uni-b"), ("uni-b".into(), 0));
        assert_eq!(
            rejected_about(br#"{"occurred_at":"yesterday"}"#, b""),
            (String::new(), 0)
        );
    }

    #[test]
    fn rejections_carry_reasons() {
        let mut cases: Vec<(Vec<u8>, RejectReason)> = vec![
            (b"{not json".to_vec(), RejectReason::InvalidJson),
            (b"[1,2]".to_vec(), RejectReason::InvalidJson),
            (vec![0xff, 0xfe], RejectReason::InvalidJson),
        ];
        let mut with = |f: &dyn Fn(&mut Map<String, Value>), r: RejectReason| {
            let mut v = sample();
            f(v.as_object_mut().unwrap());
            cases.push((v.to_string().into_bytes(), r));
        };
        for field in [
            "event_id",
            "occurred_at",
            "institution_id",
            "provider",
            "model",
            "usage",
        ] {
            with(
                &|o| {
                    o.remove(field);
                },
                RejectReason::MissingField,
            );
        }
        with(
            &|o| {
                o.insert("schema_version".into(), json!(2));
            },
            RejectReason::UnsupportedSchemaVersion,
        );
        with(
            &|o| {
                o.insert("usage".into(), json!({"input_tokens": -3}));
            },
            RejectReason::BadTokenCount,
        );
        with(
            &|o| {
                o.insert(
                    "usage".into(),
                    json!({"output_tokens": 99999999999999999999u128 as f64}),
                );
            },
            RejectReason::BadTokenCount,
        );
        with(
            &|o| {
                o.insert("occurred_at".into(), json!("2027-01-01T00:00:00Z"));
            },
            RejectReason::FutureTimestamp,
        );
        with(
            &|o| {
                o.insert("occurred_at".into(), json!("yesterday"));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("institution_id".into(), json!(""));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("event_id".into(), json!(42));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("tags".into(), json!({"a": {"b": 1}}));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("latency_ms".into(), json!(-1));
            },
            RejectReason::InvalidField,
        );
        // Bounds: long or binary names, and too many tags.
        with(
            &|o| {
                o.insert("model".into(), json!("m".repeat(10_000)));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("provider".into(), json!("open\u{0}ai"));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("model".into(), json!("gpt\u{0}"));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                let tags: Map<String, Value> =
                    (0..20_000).map(|i| (format!("t{i}"), json!("v"))).collect();
                o.insert("tags".into(), Value::Object(tags));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("tags".into(), json!({"k": "v".repeat(300)}));
            },
            RejectReason::InvalidField,
        );
        with(
            &|o| {
                o.insert("user_id".into(), json!("alice\nbob"));
            },
            RejectReason::InvalidField,
        );
        for (bytes, want) in cases {
            let got = decode(&bytes, &opts()).expect_err(&String::from_utf8_lossy(&bytes));
            assert_eq!(
                got.reason,
                want,
                "{}: {}",
                String::from_utf8_lossy(&bytes),
                got.detail
            );
            assert!(!got.detail.is_empty());
        }
    }

    #[test]
    fn bounded_fields_at_their_limits_are_accepted() {
        let mut v = sample();
        v["model"] = json!("m".repeat(crate::domain::MAX_ID_LEN));
        v["provider"] = json!("p".repeat(MAX_PROVIDER_LEN));
        let tags: Map<String, Value> = (0..MAX_TAGS)
            .map(|i| {
                (
                    format!("{i:0>64}"),
                    json!("v".repeat(crate::domain::MAX_ID_LEN)),
                )
            })
            .collect();
        v["tags"] = Value::Object(tags);
        let e = dec(&v).unwrap();
        assert_eq!(e.tags.len(), MAX_TAGS);
        let shown = excerpt(&"a\u{0}".repeat(40));
        assert!(
            shown.ends_with('…') && !shown.chars().any(char::is_control),
            "{shown}"
        );
    }

    #[test]
    fn small_clock_skew_is_accepted() {
        let mut v = sample();
        v["occurred_at"] = json!("2026-11-01T00:04:00Z");
        assert!(dec(&v).is_ok());
    }
}
