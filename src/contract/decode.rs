//! Contract v1: bytes from Kafka → a valid `UsageEvent`, or a `Rejection` with a reason.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::Value;

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
    /// The Kafka key is not the event's `institution_id`. Since issue 29 such a message
    /// is re-published with the right key (`rekeyed_events`) rather than rejected; the
    /// reason remains for rows stored before.
    KeyMismatch,
    /// The event id is already billed to another institution: an event id bills once,
    /// whatever institution a copy names.
    IdConflict,
}

impl RejectReason {
    pub const ALL: [RejectReason; 8] = [
        RejectReason::InvalidJson,
        RejectReason::MissingField,
        RejectReason::InvalidField,
        RejectReason::UnsupportedSchemaVersion,
        RejectReason::BadTokenCount,
        RejectReason::FutureTimestamp,
        RejectReason::KeyMismatch,
        RejectReason::IdConflict,
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
            RejectReason::IdConflict => "id_conflict",
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

/// The fields of contract v1, each kept as the raw JSON text of its value (borrowed from
/// the payload); unknown fields are skipped without being stored. Reading an event this
/// way instead of into a `serde_json::Value` saves a map with an owned key per field and
/// a copy of every string: decoding took 10.5 of ingest's 18 CPU seconds at a 2M
/// backlog, most of it in allocations. A field that appears twice counts with its last
/// value, as it did in a `Value`.
struct Fields<'a>([Option<Field<'a>>; FIELDS.len()]);

/// One field's value: a string (borrowed unless it has escapes), or anything else
/// (`null` included), parsed.
enum Field<'a> {
    Str(Cow<'a, str>),
    Other(Value),
}

const FIELDS: [&str; 17] = [
    "schema_version",
    "event_id",
    "occurred_at",
    "institution_id",
    "user_id",
    "api_key_id",
    "provider",
    "model",
    "endpoint",
    "service_tier",
    "status",
    "latency_ms",
    "usage",
    "provider_usage",
    "tags",
    "usage_estimated",
    "billing",
];

/// A field name's place in `FIELDS`; `None` for a field the contract does not know.
fn field_index(name: &str) -> Option<usize> {
    FIELDS.iter().position(|f| *f == name)
}

/// What the payload holds at the top level, before the values are read.
struct RawFields<'a>([Option<&'a RawValue>; FIELDS.len()]);

impl<'a> Fields<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, Rejection> {
        let not_json = |e: serde_json::Error| {
            Rejection::new(RejectReason::InvalidJson, format!("not valid JSON: {e}"))
        };
        let raw: RawFields<'a> = serde_json::from_slice(payload).map_err(|e| {
            if e.classify() == serde_json::error::Category::Data {
                // Valid JSON of another type: only the top level can be of a wrong type.
                Rejection::new(RejectReason::InvalidJson, "the event must be a JSON object")
            } else {
                not_json(e)
            }
        })?;
        let mut fields = Fields(Default::default());
        for (slot, r) in fields.0.iter_mut().zip(raw.0) {
            let Some(r) = r else { continue };
            let text = r.get();
            *slot = Some(if text.starts_with('"') {
                // Borrowed unless the string has escapes.
                Field::Str(match serde_json::from_str::<&'a str>(text) {
                    Ok(s) => Cow::Borrowed(s),
                    Err(_) => Cow::Owned(serde_json::from_str::<String>(text).map_err(not_json)?),
                })
            } else {
                Field::Other(serde_json::from_str(text).map_err(not_json)?)
            });
        }
        Ok(fields)
    }

    fn get(&self, field: &str) -> Option<&Field<'a>> {
        self.0[field_index(field).expect("a field of contract v1")].as_ref()
    }

    /// A field's value (`Value::String` for a string).
    fn value(&self, field: &str) -> Option<Cow<'_, Value>> {
        match self.get(field)? {
            Field::Str(s) => Some(Cow::Owned(Value::String(s.to_string()))),
            Field::Other(v) => Some(Cow::Borrowed(v)),
        }
    }

    /// A string field: `None` if absent or null; an error naming what it is instead.
    fn str(&self, field: &str) -> Result<Option<Cow<'a, str>>, Rejection> {
        match self.get(field) {
            Some(Field::Str(s)) => Ok(Some(s.clone())),
            None | Some(Field::Other(Value::Null)) => Ok(None),
            Some(Field::Other(other)) => {
                Err(invalid(field, format!("must be a string, got {other}")))
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A field name: its place in `FIELDS`, or `None` for a field the contract does
        /// not know.
        struct Name(Option<usize>);
        impl<'de> serde::Deserialize<'de> for Name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = Name;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E>(self, v: &str) -> Result<Name, E> {
                        Ok(Name(field_index(v)))
                    }
                }
                d.deserialize_str(V)
            }
        }
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Self::Value, M::Error> {
                let mut raw = [None; FIELDS.len()];
                while let Some(Name(i)) = map.next_key()? {
                    match i {
                        Some(i) => raw[i] = Some(map.next_value::<&'de RawValue>()?),
                        None => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(RawFields(raw))
            }
        }
        d.deserialize_map(V)
    }
}

pub fn decode(payload: &[u8], opts: &DecodeOptions) -> Result<UsageEvent, Rejection> {
    let obj = Fields::parse(payload)?;

    match obj.value("schema_version").as_deref() {
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
    let event_id = EventId::parse(&event_id).map_err(|e| invalid("event_id", e))?;
    let institution_id = required_str(&obj, "institution_id")?;
    let institution_id =
        InstitutionId::parse(&institution_id).map_err(|e| invalid("institution_id", e))?;
    let provider = canonical_provider(&required_str(&obj, "provider")?);
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
    let occurred_raw = occurred_raw.as_ref();
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
        status: crate::domain::Status::parse(&optional_str(&obj, "status")?),
        latency_ms: latency(&obj)?,
        usage,
        tags: tags(&obj)?,
        usage_estimated: flag(&obj, "usage_estimated")?,
        billing: billing(&obj)?,
    })
}

fn flag(obj: &Fields<'_>, field: &str) -> Result<bool, Rejection> {
    match obj.value(field).as_deref() {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(invalid(
            field,
            format!("must be true or false, got {other}"),
        )),
    }
}

fn billing(obj: &Fields<'_>) -> Result<crate::domain::Billing, Rejection> {
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

fn required_str<'a>(obj: &Fields<'a>, field: &str) -> Result<Cow<'a, str>, Rejection> {
    obj.str(field)?.ok_or_else(|| {
        Rejection::new(
            RejectReason::MissingField,
            format!("required field `{field}` is missing"),
        )
    })
}

fn optional_str(obj: &Fields<'_>, field: &str) -> Result<String, Rejection> {
    match obj.str(field)? {
        None => Ok(String::new()),
        Some(s) => {
            short_text(field, &s, crate::domain::MAX_ID_LEN)?;
            Ok(s.into_owned())
        }
    }
}

fn latency(obj: &Fields<'_>) -> Result<u32, Rejection> {
    match obj.value("latency_ms").as_deref() {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid("latency_ms", "must be a non-negative integer")),
    }
}

fn tags(obj: &Fields<'_>) -> Result<BTreeMap<String, String>, Rejection> {
    match obj.value("tags").as_deref() {
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

fn usage(obj: &Fields<'_>, provider: &str) -> Result<TokenCounts, Rejection> {
    let result = match (
        obj.value("usage").as_deref(),
        obj.value("provider_usage").as_deref(),
    ) {
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
    use serde_json::{json, Map};

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

    /// The payload as a gateway may write it: `sample()` with raw text spliced in.
    fn with_raw(extra: &str) -> Vec<u8> {
        let body = sample().to_string();
        format!("{{{extra},{}", &body[1..]).into_bytes()
    }

    #[test]
    fn a_repeated_field_counts_with_its_last_value_as_in_any_json_map() {
        // `sample()` writes its own event_id after the spliced one: that one counts.
        let e = decode(&with_raw(r#""event_id":"first""#), &opts()).unwrap();
        assert_eq!(e.event_id.as_str(), "0193a4c2-7b1e-7c3a-9f00-5d2b8e1a4c77");
        let body = sample().to_string();
        let last = format!("{},\"model\":\"gpt-4o\"}}", &body[..body.len() - 1]);
        assert_eq!(decode(last.as_bytes(), &opts()).unwrap().model, "gpt-4o");
    }

    #[test]
    fn escaped_names_and_values_read_as_their_text() {
        let mut v = sample();
        v.as_object_mut().unwrap().remove("user_id");
        let body = v.to_string();
        let raw = format!(
            "{{\"us\\u0065r_id\":\"al\\u00efce\\n\\\"x\\\"\",{}",
            &body[1..]
        );
        let e = decode(raw.as_bytes(), &opts());
        // A newline is a control character: refused, which proves the escape was read.
        let r = e.unwrap_err();
        assert_eq!(r.reason, RejectReason::InvalidField, "{}", r.detail);
        assert!(r.detail.contains("user_id"), "{}", r.detail);
        let raw = format!("{{\"us\\u0065r_id\":\"al\\u00efce\",{}", &body[1..]);
        assert_eq!(decode(raw.as_bytes(), &opts()).unwrap().user_id, "alïce");
    }

    #[test]
    fn broken_values_are_invalid_json_not_a_crash() {
        let mut v = sample();
        for f in ["user_id", "latency_ms", "tags"] {
            v.as_object_mut().unwrap().remove(f);
        }
        let body = v.to_string();
        for raw in [
            r#""user_id":"\ud800""#,
            r#""latency_ms":1e400"#,
            r#""tags":{"a":"\udfff"}"#,
        ] {
            let payload = format!("{{{raw},{}", &body[1..]);
            let r = decode(payload.as_bytes(), &opts()).unwrap_err();
            assert_eq!(r.reason, RejectReason::InvalidJson, "{raw}: {}", r.detail);
        }
        // A field the contract does not know is skipped, whatever it holds.
        assert!(decode(&with_raw(r#""debug":[1e400,{"x":null}]"#), &opts()).is_ok());
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_with_its_value() {
        let mut v = sample();
        v.as_object_mut().unwrap().remove("model");
        let body = v.to_string();
        let raw = format!("{{\"model\": {{ \"a\" : 1 }},{}", &body[1..]);
        let r = decode(raw.as_bytes(), &opts()).unwrap_err();
        assert_eq!(r.reason, RejectReason::InvalidField);
        assert_eq!(r.detail, r#"`model` must be a string, got {"a":1}"#);
    }
}
