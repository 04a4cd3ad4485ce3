//! Request bodies: read the few fields the gateway needs and change the few it must,
//! leaving everything else byte for byte as the client sent it (top-level fields keep
//! their order and their exact text).

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

use super::Api;

/// A JSON object whose members stay in order and unparsed.
#[derive(Debug, Default)]
pub struct RawObject(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                    out.push((k, v));
                }
                Ok(RawObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl Serialize for RawObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl RawObject {
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes)
            .map_err(|e| format!("the request body is not a JSON object: {e}"))
    }

    pub fn get(&self, key: &str) -> Option<&RawValue> {
        // The last duplicate wins, as in most JSON parsers (and the providers').
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    pub fn get_value(&self, key: &str) -> Option<Value> {
        self.get(key)
            .and_then(|v| serde_json::from_str(v.get()).ok())
    }

    /// Sets `key` (replacing every earlier occurrence in place, or appending).
    pub fn set(&mut self, key: &str, value: &Value) {
        let raw = RawValue::from_string(value.to_string()).expect("a Value is valid JSON");
        let mut first = true;
        self.0.retain_mut(|(k, v)| {
            if k != key {
                return true;
            }
            if first {
                first = false;
                *v = raw.clone();
                true
            } else {
                false
            }
        });
        if first {
            self.0.push((key.to_owned(), raw));
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializing raw JSON cannot fail")
    }
}

/// What the gateway read from, and did to, a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The requested model (`None` for Gemini, whose model is in the path).
    pub model: Option<String>,
    pub stream: bool,
    /// The client asked for the usage chunk of an OpenAI chat stream itself.
    pub client_wants_usage: bool,
    /// The output cap the client set, if any.
    pub max_output_tokens: Option<u64>,
    /// Answers asked for (`n`, Gemini's `candidateCount`); each may write the cap.
    pub choices: u64,
    /// The body to send upstream.
    pub body: Vec<u8>,
    /// Whether `body` differs from what the client sent.
    pub rewritten: bool,
}

/// Reads and rewrites a request body for `api`: the end-user field gets `end_user`, and
/// an OpenAI chat stream asks for usage.
pub fn prepare(api: Api, bytes: &[u8], end_user: &str) -> Result<Prepared, String> {
    let mut obj = RawObject::parse(bytes)?;
    let model = match api {
        Api::Gemini { .. } => None,
        _ => match obj.get_value("model") {
            Some(Value::String(m)) if !m.trim().is_empty() => Some(m),
            Some(_) => return Err("`model` must be a non-empty string".into()),
            None => return Err("`model` is required".into()),
        },
    };
    let stream = match api {
        Api::Gemini { stream } => stream,
        _ => matches!(obj.get_value("stream"), Some(Value::Bool(true))),
    };
    let max_output_tokens = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| obj.get_value(k).and_then(|v| v.as_u64()))
        .or_else(|| {
            obj.get_value("generationConfig")
                .and_then(|g| g.get("maxOutputTokens").and_then(Value::as_u64))
        });
    let choices = obj
        .get_value("n")
        .and_then(|v| v.as_u64())
        .or_else(|| {
            obj.get_value("generationConfig")
                .and_then(|g| g.get("candidateCount").and_then(Value::as_u64))
        })
        .unwrap_or(1)
        .max(1);
    let mut client_wants_usage = false;
    let mut rewritten = false;
    match api {
        Api::ChatCompletions => {
            obj.set("user", &Value::String(end_user.into()));
            obj.set("safety_identifier", &Value::String(end_user.into()));
            rewritten = true;
            if stream {
                let mut opts = match obj.get_value("stream_options") {
                    Some(Value::Object(o)) => o,
                    _ => serde_json::Map::new(),
                };
                client_wants_usage = opts.get("include_usage") == Some(&Value::Bool(true));
                if !client_wants_usage {
                    opts.insert("include_usage".into(), Value::Bool(true));
                    obj.set("stream_options", &Value::Object(opts));
                }
            }
        }
        Api::Responses => {
            obj.set("safety_identifier", &Value::String(end_user.into()));
            obj.set("user", &Value::String(end_user.into()));
            rewritten = true;
        }
        Api::Embeddings => {
            obj.set("user", &Value::String(end_user.into()));
            rewritten = true;
        }
        Api::Messages => {
            let mut meta = match obj.get_value("metadata") {
                Some(Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            };
            meta.insert("user_id".into(), Value::String(end_user.into()));
            obj.set("metadata", &Value::Object(meta));
            rewritten = true;
        }
        // Gemini's API has no end-user field.
        Api::Gemini { .. } => {}
    }
    Ok(Prepared {
        model,
        stream,
        client_wants_usage,
        max_output_tokens,
        choices,
        body: if rewritten {
            obj.to_bytes()
        } else {
            bytes.to_vec()
        },
        rewritten,
    })
}

/// The text a request sends to the model (for estimating its tokens when the provider
/// reports none): every string inside the fields that carry input, except data URLs.
pub fn input_text(api: Api, bytes: &[u8]) -> (String, usize) {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return (String::new(), 0);
    };
    let fields: &[&str] = match api {
        Api::ChatCompletions => &["messages"],
        Api::Responses => &["input", "instructions"],
        Api::Embeddings => &["input"],
        Api::Messages => &["system", "messages"],
        Api::Gemini { .. } => &["contents", "systemInstruction"],
    };
    let mut text = String::new();
    let mut parts = 0;
    for f in fields {
        if let Some(v) = v.get(f) {
            if let Value::Array(a) = v {
                parts += a.len();
            } else {
                parts += 1;
            }
            collect_strings(v, &mut text);
        }
    }
    (text, parts)
}

fn collect_strings(v: &Value, out: &mut String) {
    match v {
        Value::String(s) if !s.starts_with("data:") => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o
            .iter()
            // Roles, types and ids are framing, not input.
            .filter(|(k, _)| {
                !matches!(
                    k.as_str(),
                    "role" | "type" | "id" | "tool_call_id" | "mime_type" | "mimeType"
                )
            })
            .for_each(|(_, x)| collect_strings(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn untouched_fields_keep_their_order_and_text() {
        let body = br#"{"z":1.50,"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"a":{"b":  2}}"#;
        let p = prepare(Api::ChatCompletions, body, "tt_x").unwrap();
        let s = String::from_utf8(p.body).unwrap();
        assert!(s.starts_with(r#"{"z":1.50,"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"a":{"b":  2}"#), "{s}");
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["user"], "tt_x");
        assert_eq!(v["safety_identifier"], "tt_x");
        assert_eq!(p.model.as_deref(), Some("gpt-4o-mini"));
        assert!(!p.stream);
    }

    #[test]
    fn a_chat_stream_asks_for_usage_and_remembers_who_asked() {
        let p = prepare(Api::ChatCompletions, br#"{"model":"m","stream":true}"#, "u").unwrap();
        assert!(p.stream && !p.client_wants_usage);
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        let p = prepare(
            Api::ChatCompletions,
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
            "u",
        )
        .unwrap();
        assert!(p.client_wants_usage);
    }

    #[test]
    fn the_end_user_replaces_what_the_client_set() {
        let p = prepare(
            Api::Messages,
            br#"{"model":"claude","max_tokens":10,"metadata":{"user_id":"someone","x":1}}"#,
            "tt_me",
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["metadata"], json!({"user_id": "tt_me", "x": 1}));
        assert_eq!(p.max_output_tokens, Some(10));
        // Duplicate keys collapse to one, ours.
        let p = prepare(
            Api::Embeddings,
            br#"{"model":"e","user":"a","input":"x","user":"b"}"#,
            "tt",
        )
        .unwrap();
        let s = String::from_utf8(p.body).unwrap();
        assert_eq!(s.matches("\"user\"").count(), 1, "{s}");
        assert!(s.contains(r#""user":"tt""#));
    }

    #[test]
    fn gemini_bodies_pass_unchanged() {
        let body = br#"{"contents":[{"parts":[{"text":"hello"}]}],"generationConfig":{"maxOutputTokens":5}}"#;
        let p = prepare(Api::Gemini { stream: true }, body, "u").unwrap();
        assert_eq!(p.body, body.to_vec());
        assert!(p.stream && !p.rewritten);
        assert_eq!(p.max_output_tokens, Some(5));
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        assert!(prepare(Api::ChatCompletions, b"[1]", "u").is_err());
        assert!(prepare(Api::ChatCompletions, b"{}", "u")
            .unwrap_err()
            .contains("model"));
        assert!(prepare(Api::ChatCompletions, br#"{"model":3}"#, "u").is_err());
        assert!(prepare(Api::ChatCompletions, b"{", "u").is_err());
    }

    #[test]
    fn input_text_skips_framing_and_data_urls() {
        let (t, parts) = input_text(
            Api::ChatCompletions,
            br#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
        );
        assert_eq!(t, "be brief\nhello\n");
        assert_eq!(parts, 2);
    }
}
