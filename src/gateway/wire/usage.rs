//! Where each API's responses carry their usage, and what a stream's text was (for an
//! estimate when the usage never comes). A `Tracker` watches one response go by: every
//! server-sent event of a stream, or the bytes of a plain body.

use serde_json::{Map, Value};

use super::sse;
use super::Api;

/// Most response text kept for an estimate; beyond it the rest is counted by bytes.
const MAX_TEXT: usize = 4 * 1024 * 1024;
/// Most of a plain (non-stream) body kept whole; beyond it only its tail is kept, where
/// every provider puts its usage.
const MAX_BODY: usize = 8 * 1024 * 1024;
const TAIL: usize = 256 * 1024;

/// What to do with one event of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Pass these bytes instead.
    Replace(Vec<u8>),
    /// The client did not ask for it (OpenAI's usage chunk, added by the gateway).
    Drop,
}

/// What a finished response told us.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Seen {
    /// The provider's usage object, verbatim (merged, for Anthropic's two parts).
    pub usage: Option<Value>,
    /// The model as the provider reported it.
    pub model: Option<String>,
    pub service_tier: Option<String>,
    /// The stream reached its end marker (or the plain body was complete JSON).
    pub complete: bool,
    /// Generated text, for an estimate.
    pub text: String,
    /// Text bytes beyond `MAX_TEXT` (counted, not kept).
    pub text_overflow: usize,
}

#[derive(Debug)]
pub struct Tracker {
    api: Api,
    /// Remove the usage chunk (and the `"usage":null` the request for it adds to every
    /// chunk) of an OpenAI chat stream: the client did not ask for them.
    strip_usage: bool,
    seen: Seen,
    body: Vec<u8>,
    body_overflowed: bool,
}

impl Tracker {
    pub fn new(api: Api, strip_usage: bool) -> Self {
        Self {
            api,
            strip_usage,
            seen: Seen::default(),
            body: Vec::new(),
            body_overflowed: false,
        }
    }

    fn push_text(&mut self, s: &str) {
        if self.seen.text.len() + s.len() <= MAX_TEXT {
            self.seen.text.push_str(s);
        } else {
            self.seen.text_overflow += s.len();
        }
    }

    /// One whole server-sent event.
    pub fn event(&mut self, event: &[u8]) -> Verdict {
        let (name, data) = sse::fields(event);
        if data == "[DONE]" {
            self.seen.complete = true;
            return Verdict::Forward;
        }
        let Ok(Value::Object(v)) = serde_json::from_str::<Value>(&data) else {
            return Verdict::Forward;
        };
        match self.api {
            Api::ChatCompletions => self.chat_chunk(&v, event),
            Api::Responses => {
                self.responses_event(name.as_deref(), &v);
                Verdict::Forward
            }
            Api::Messages => {
                self.messages_event(&v);
                Verdict::Forward
            }
            Api::Gemini { .. } => {
                self.gemini_chunk(&v);
                Verdict::Forward
            }
            Api::Embeddings => Verdict::Forward,
        }
    }

    fn chat_chunk(&mut self, v: &Map<String, Value>, event: &[u8]) -> Verdict {
        self.note_model(v, "model");
        if let Some(Value::String(t)) = v.get("service_tier") {
            self.seen.service_tier = Some(t.clone());
        }
        if let Some(Value::Array(choices)) = v.get("choices") {
            for c in choices {
                let delta = &c["delta"];
                for k in ["content", "reasoning_content", "refusal"] {
                    if let Some(s) = delta[k].as_str() {
                        self.push_text(s);
                    }
                }
                if let Some(calls) = delta["tool_calls"].as_array() {
                    for call in calls {
                        if let Some(s) = call["function"]["arguments"].as_str() {
                            self.push_text(s);
                        }
                        if let Some(s) = call["function"]["name"].as_str() {
                            self.push_text(s);
                        }
                    }
                }
            }
        }
        let usage = v.get("usage").filter(|u| !u.is_null());
        if let Some(u) = usage {
            self.seen.usage = Some(u.clone());
        }
        if !self.strip_usage {
            return Verdict::Forward;
        }
        let only_usage = usage.is_some()
            && v.get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| c.is_empty());
        if only_usage {
            return Verdict::Drop;
        }
        strip_null_usage(event).map_or(Verdict::Forward, Verdict::Replace)
    }

    fn responses_event(&mut self, name: Option<&str>, v: &Map<String, Value>) {
        let kind = name
            .map(str::to_owned)
            .or_else(|| v.get("type").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default();
        match kind.as_str() {
            "response.output_text.delta"
            | "response.reasoning_summary_text.delta"
            | "response.refusal.delta"
            | "response.function_call_arguments.delta" => {
                if let Some(s) = v.get("delta").and_then(Value::as_str) {
                    self.push_text(s);
                }
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(Value::Object(r)) = v.get("response") {
                    self.take_response_object(r);
                }
                self.seen.complete = true;
            }
            "response.created" | "response.in_progress" => {
                if let Some(Value::Object(r)) = v.get("response") {
                    self.note_model(r, "model");
                }
            }
            _ => {}
        }
    }

    fn take_response_object(&mut self, r: &Map<String, Value>) {
        self.note_model(r, "model");
        if let Some(Value::String(t)) = r.get("service_tier") {
            self.seen.service_tier = Some(t.clone());
        }
        if let Some(u) = r.get("usage").filter(|u| !u.is_null()) {
            self.seen.usage = Some(u.clone());
        }
    }

    fn messages_event(&mut self, v: &Map<String, Value>) {
        match v.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                if let Some(Value::Object(m)) = v.get("message") {
                    self.note_model(m, "model");
                    if let Some(u) = m.get("usage").filter(|u| u.is_object()) {
                        self.merge_usage(u);
                    }
                }
            }
            "content_block_delta" => {
                let d = &v["delta"];
                for k in ["text", "thinking", "partial_json"] {
                    if let Some(s) = d[k].as_str() {
                        self.push_text(s);
                    }
                }
            }
            "message_delta" => {
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    self.merge_usage(u);
                }
            }
            "message_stop" => self.seen.complete = true,
            _ => {}
        }
    }

    /// Anthropic sends input counts at the start and the output count (cumulative) at
    /// the end; later non-null values win.
    fn merge_usage(&mut self, u: &Value) {
        let mut merged = match self.seen.usage.take() {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        if let Some(o) = u.as_object() {
            for (k, v) in o {
                if !v.is_null() {
                    merged.insert(k.clone(), v.clone());
                }
            }
        }
        self.seen.usage = Some(Value::Object(merged));
    }

    fn gemini_chunk(&mut self, v: &Map<String, Value>) {
        self.note_model(v, "modelVersion");
        if let Some(Value::Array(cands)) = v.get("candidates") {
            for c in cands {
                // Gemini's `alt=sse` stream has no end marker: the chunk whose candidate
                // carries a finish reason (STOP, MAX_TOKENS, SAFETY, ...) is the last one.
                // A stream that breaks off after it is still caught by the relay.
                if c["finishReason"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty() && r != "FINISH_REASON_UNSPECIFIED")
                {
                    self.seen.complete = true;
                }
                if let Some(parts) = c["content"]["parts"].as_array() {
                    for p in parts {
                        if let Some(s) = p["text"].as_str() {
                            self.push_text(s);
                        }
                    }
                }
            }
        }
        if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
            self.seen.usage = Some(u.clone());
        }
    }

    fn note_model(&mut self, v: &Map<String, Value>, field: &str) {
        if let Some(Value::String(m)) = v.get(field) {
            if !m.is_empty() && self.seen.model.as_deref() != Some(m) {
                self.seen.model = Some(m.clone());
            }
        }
    }

    /// Bytes of a plain (non-stream) body.
    pub fn body(&mut self, chunk: &[u8]) {
        self.body.extend_from_slice(chunk);
        if self.body.len() > MAX_BODY {
            self.body_overflowed = true;
            let cut = self.body.len() - TAIL;
            self.body.drain(..cut);
        }
    }

    /// The end of the response.
    pub fn finish(mut self) -> Seen {
        if self.body.is_empty() {
            return self.seen;
        }
        let body = std::mem::take(&mut self.body);
        if self.body_overflowed {
            // Only the tail is left: find the usage object in it.
            let key: &[u8] = match self.api {
                Api::Gemini { .. } => b"\"usageMetadata\"",
                _ => b"\"usage\"",
            };
            if let Some(at) = find_last(&body, key) {
                let rest = &body[at + key.len()..];
                let rest = rest
                    .iter()
                    .position(|b| *b == b':')
                    .map_or(&rest[..0], |p| &rest[p + 1..]);
                if let Some(Ok(u)) = serde_json::Deserializer::from_slice(rest)
                    .into_iter::<Value>()
                    .next()
                {
                    if u.is_object() {
                        self.seen.usage = Some(u);
                        self.seen.complete = true;
                    }
                }
            }
            return self.seen;
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(o)) => {
                self.seen.complete = true;
                self.plain_object(&o);
            }
            // Gemini's stream without `alt=sse` is one JSON array of responses.
            Ok(Value::Array(items)) => {
                self.seen.complete = true;
                for item in items {
                    if let Value::Object(o) = item {
                        self.gemini_chunk(&o);
                    }
                }
            }
            _ => {}
        }
        self.seen
    }

    fn plain_object(&mut self, o: &Map<String, Value>) {
        match self.api {
            Api::Gemini { .. } => self.gemini_chunk(o),
            Api::Responses => self.take_response_object(o),
            _ => {
                self.note_model(o, "model");
                if let Some(Value::String(t)) = o.get("service_tier") {
                    self.seen.service_tier = Some(t.clone());
                }
                if let Some(u) = o.get("usage").filter(|u| u.is_object()) {
                    self.seen.usage = Some(u.clone());
                }
            }
        }
    }
}

fn find_last(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// The event without the `"usage":null` member the gateway's request for usage added.
fn strip_null_usage(event: &[u8]) -> Option<Vec<u8>> {
    for pat in [
        &b",\"usage\":null"[..],
        b"\"usage\":null,",
        b", \"usage\": null",
        b"\"usage\": null, ",
    ] {
        if let Some(at) = hay_find(event, pat) {
            let mut out = Vec::with_capacity(event.len());
            out.extend_from_slice(&event[..at]);
            out.extend_from_slice(&event[at + pat.len()..]);
            return Some(out);
        }
    }
    None
}

fn hay_find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sse(v: &Value) -> Vec<u8> {
        format!("data: {v}\n\n").into_bytes()
    }

    #[test]
    fn an_openai_stream_yields_usage_and_hides_what_the_client_did_not_ask_for() {
        let mut t = Tracker::new(Api::ChatCompletions, true);
        let chunk = format!(
            "data: {}\n\n",
            r#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"content":"Hel"}}],"usage":null}"#
        );
        match t.event(chunk.as_bytes()) {
            Verdict::Replace(b) => assert_eq!(
                String::from_utf8(b).unwrap(),
                "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n"
            ),
            v => panic!("{v:?}"),
        }
        let usage = json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11});
        assert_eq!(
            t.event(&sse(&json!({"id":"c","choices":[],"usage": usage}))),
            Verdict::Drop
        );
        assert_eq!(t.event(b"data: [DONE]\n\n"), Verdict::Forward);
        let seen = t.finish();
        assert_eq!(seen.usage, Some(usage));
        assert_eq!(seen.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert_eq!(seen.text, "Hel");
        assert!(seen.complete);
    }

    #[test]
    fn a_client_that_asked_for_usage_gets_it() {
        let mut t = Tracker::new(Api::ChatCompletions, false);
        let e = sse(&json!({"choices":[],"usage":{"prompt_tokens":1}}));
        assert_eq!(t.event(&e), Verdict::Forward);
        assert!(t.finish().usage.is_some());
    }

    #[test]
    fn anthropic_usage_is_merged_from_start_and_delta() {
        let mut t = Tracker::new(Api::Messages, false);
        t.event(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n");
        t.event(b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi there\"}}\n\n");
        t.event(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n");
        let before_stop = t.seen.complete;
        t.event(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        let seen = t.finish();
        assert!(!before_stop);
        assert_eq!(
            seen.usage,
            Some(json!({"input_tokens":20,"cache_read_input_tokens":5,"output_tokens":7}))
        );
        assert_eq!(seen.text, "Hi there");
        assert!(seen.complete);
    }

    #[test]
    fn plain_bodies_give_their_usage_even_when_huge() {
        let mut t = Tracker::new(Api::Embeddings, false);
        let big: Vec<f64> = vec![0.125; 2_000_000];
        let body = json!({"object":"list","data":[{"embedding": big}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}});
        let bytes = serde_json::to_vec(&body).unwrap();
        assert!(bytes.len() > MAX_BODY);
        for c in bytes.chunks(65536) {
            t.body(c);
        }
        assert!(t.body.len() <= MAX_BODY + 65536);
        let seen = t.finish();
        assert_eq!(
            seen.usage,
            Some(json!({"prompt_tokens":8,"total_tokens":8}))
        );
    }

    #[test]
    fn gemini_streams_with_and_without_sse() {
        // `alt=sse` (what the google-genai SDK always asks for): complete once a
        // candidate carries its finish reason; there is no `[DONE]`.
        let mut t = Tracker::new(Api::Gemini { stream: true }, false);
        t.event(&sse(&json!({"candidates":[{"content":{"parts":[{"text":"a"}]}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1},"modelVersion":"gemini-2.5-flash"})));
        assert!(
            !t.seen.complete,
            "a stream without its finish reason is not complete"
        );
        t.event(&sse(&json!({"candidates":[{"content":{"parts":[{"text":"b"}]},"finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2}})));
        let seen = t.finish();
        assert_eq!(
            seen.usage,
            Some(json!({"promptTokenCount":3,"candidatesTokenCount":2}))
        );
        assert_eq!(seen.text, "ab");
        assert!(seen.complete);
        // Cut off by the length cap: complete too (the provider ended it).
        let mut t = Tracker::new(Api::Gemini { stream: true }, false);
        t.event(&sse(&json!({"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"MAX_TOKENS"}]})));
        assert!(t.finish().complete);
        // A stream that ends before any finish reason is not.
        let mut t = Tracker::new(Api::Gemini { stream: true }, false);
        t.event(&sse(&json!({"candidates":[{"content":{"parts":[{"text":"a"}]},"finishReason":"FINISH_REASON_UNSPECIFIED"}]})));
        assert!(!t.finish().complete);
        let mut t = Tracker::new(Api::Gemini { stream: true }, false);
        t.body(br#"[{"candidates":[{"content":{"parts":[{"text":"x"}]}}]},"#);
        t.body(br#"{"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":1}}]"#);
        let seen = t.finish();
        assert_eq!(
            seen.usage,
            Some(json!({"promptTokenCount":4,"candidatesTokenCount":1}))
        );
        assert!(seen.complete);
    }

    #[test]
    fn responses_streams_report_usage_at_completion() {
        let mut t = Tracker::new(Api::Responses, false);
        t.event(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n");
        assert!(!t.seen.complete);
        t.event(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-5\",\"usage\":{\"input_tokens\":5,\"output_tokens\":2}}}\n\n");
        let seen = t.finish();
        assert_eq!(
            seen.usage,
            Some(json!({"input_tokens":5,"output_tokens":2}))
        );
        assert_eq!(seen.model.as_deref(), Some("gpt-5"));
        assert!(seen.complete);
    }

    #[test]
    fn a_truncated_stream_is_not_complete() {
        let mut t = Tracker::new(Api::ChatCompletions, true);
        t.event(&sse(&json!({"choices":[{"delta":{"content":"partial"}}]})));
        let seen = t.finish();
        assert!(!seen.complete);
        assert!(seen.usage.is_none());
        assert_eq!(seen.text, "partial");
    }
}
