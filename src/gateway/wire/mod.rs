//! The providers' wire formats, as far as the gateway must know them: which API a path
//! is, where the model and the end-user field are, how errors look to each family's
//! SDKs, and (in `usage`) where each response carries its usage.

pub mod body;
pub mod sse;
pub mod usage;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The provider families the gateway speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    /// The name events and the price book use.
    pub fn event_name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "google",
        }
    }

    /// The name in config and on the command line.
    pub fn config_name(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(Provider::OpenAi),
            "anthropic" => Some(Provider::Anthropic),
            "gemini" | "google" => Some(Provider::Gemini),
            _ => None,
        }
    }

    pub const ALL: [Provider; 3] = [Provider::OpenAi, Provider::Anthropic, Provider::Gemini];
}

/// One API the gateway forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    ChatCompletions,
    Responses,
    Embeddings,
    Messages,
    /// `models/{model}:generateContent` (`stream: false`) or `:streamGenerateContent`.
    Gemini {
        stream: bool,
    },
}

impl Api {
    pub fn provider(self) -> Provider {
        match self {
            Api::ChatCompletions | Api::Responses | Api::Embeddings => Provider::OpenAi,
            Api::Messages => Provider::Anthropic,
            Api::Gemini { .. } => Provider::Gemini,
        }
    }

    /// The `endpoint` of its events.
    pub fn endpoint(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat.completions",
            Api::Responses => "responses",
            Api::Embeddings => "embeddings",
            Api::Messages => "messages",
            Api::Gemini { stream: false } => "generateContent",
            Api::Gemini { stream: true } => "streamGenerateContent",
        }
    }
}

/// The model and method of a Gemini path: `/v1beta/models/{model}:{method}`.
pub fn gemini_model(path: &str) -> Option<(&str, bool)> {
    let rest = path.rsplit_once("/models/")?.1;
    let (model, method) = rest.split_once(':')?;
    if model.is_empty() || model.contains('/') {
        return None;
    }
    match method {
        "generateContent" => Some((model, false)),
        "streamGenerateContent" => Some((model, true)),
        _ => None,
    }
}

/// What the gateway itself refuses or fails, rendered in the client's own error format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no key, unknown, revoked or expired.
    Unauthenticated(String),
    /// 403: the key may not use this model.
    ModelNotAllowed(String),
    /// 429: over the key's requests or tokens per minute.
    RateLimited { message: String, kind: &'static str },
    /// 429: a limit (budget or quota) in mode `block` would be passed.
    OverLimit(String),
    /// 400: the request is not what this API takes.
    BadRequest(String),
    /// 400: input flagged by moderation.
    Flagged,
    /// 413.
    TooLarge(usize),
    /// 503: events cannot be recorded (spool full) or the gateway is not ready.
    Unavailable(String),
    /// 502: the provider could not be reached or did not answer in time.
    Upstream(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Refusal::RateLimited { .. } | Refusal::OverLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            Refusal::BadRequest(_) | Refusal::Flagged => StatusCode::BAD_REQUEST,
            Refusal::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Unauthenticated(m)
            | Refusal::BadRequest(m)
            | Refusal::Unavailable(m)
            | Refusal::Upstream(m)
            | Refusal::OverLimit(m) => m.clone(),
            Refusal::ModelNotAllowed(model) => format!(
                "this API key may not use the model `{}`",
                crate::format::log_safe(model, 100)
            ),
            Refusal::RateLimited { message, .. } => message.clone(),
            Refusal::Flagged => {
                "the input was flagged by the moderation check and was not sent to the model".into()
            }
            Refusal::TooLarge(max) => format!("the request body is larger than {max} bytes"),
        }
    }

    /// OpenAI's `{"error": {message, type, param, code}}`.
    fn openai_body(&self) -> serde_json::Value {
        let (kind, code) = match self {
            Refusal::Unauthenticated(_) => ("invalid_request_error", "invalid_api_key"),
            Refusal::ModelNotAllowed(_) => ("invalid_request_error", "model_not_allowed"),
            Refusal::RateLimited { kind, .. } => (*kind, "rate_limit_exceeded"),
            Refusal::OverLimit(_) => ("insufficient_quota", "insufficient_quota"),
            Refusal::BadRequest(_) => ("invalid_request_error", "invalid_request"),
            Refusal::Flagged => ("invalid_request_error", "content_policy_violation"),
            Refusal::TooLarge(_) => ("invalid_request_error", "request_too_large"),
            Refusal::Unavailable(_) => ("server_error", "service_unavailable"),
            Refusal::Upstream(_) => ("server_error", "upstream_unavailable"),
        };
        json!({"error": {"message": self.message(), "type": kind, "param": null, "code": code}})
    }

    /// Anthropic's `{"type": "error", "error": {type, message}}`.
    fn anthropic_body(&self) -> serde_json::Value {
        let kind = match self {
            Refusal::Unauthenticated(_) => "authentication_error",
            Refusal::ModelNotAllowed(_) => "permission_error",
            Refusal::RateLimited { .. } | Refusal::OverLimit(_) => "rate_limit_error",
            Refusal::BadRequest(_) | Refusal::Flagged => "invalid_request_error",
            Refusal::TooLarge(_) => "request_too_large",
            Refusal::Unavailable(_) => "overloaded_error",
            Refusal::Upstream(_) => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": self.message()}})
    }

    /// Google's `{"error": {code, message, status}}`.
    fn gemini_body(&self) -> serde_json::Value {
        let status = match self {
            Refusal::Unauthenticated(_) => "UNAUTHENTICATED",
            Refusal::ModelNotAllowed(_) => "PERMISSION_DENIED",
            Refusal::RateLimited { .. } | Refusal::OverLimit(_) => "RESOURCE_EXHAUSTED",
            Refusal::BadRequest(_) | Refusal::Flagged | Refusal::TooLarge(_) => "INVALID_ARGUMENT",
            Refusal::Unavailable(_) | Refusal::Upstream(_) => "UNAVAILABLE",
        };
        json!({"error": {"code": self.status().as_u16(), "message": self.message(), "status": status}})
    }

    /// The refusal as `provider`'s SDKs expect it, with `headers` added.
    pub fn respond(&self, provider: Provider, headers: HeaderMap) -> Response {
        let body = match provider {
            Provider::OpenAi => self.openai_body(),
            Provider::Anthropic => self.anthropic_body(),
            Provider::Gemini => self.gemini_body(),
        };
        let mut res = (self.status(), axum::Json(body)).into_response();
        res.headers_mut().extend(headers);
        if matches!(self, Refusal::Unauthenticated(_)) && provider == Provider::OpenAi {
            res.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// Request headers never forwarded upstream: hop-by-hop headers (RFC 9110 §7.6.1), the
/// client's own credentials (replaced by the upstream key), our own headers, and what
/// the HTTP client sets itself.
pub fn is_request_header_dropped(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "accept-encoding"
            | "authorization"
            | "x-api-key"
            | "x-goog-api-key"
            | "api-key"
            | "cookie"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-real-ip"
    ) || name.starts_with("x-tokentally-")
}

/// Response headers never passed back: hop-by-hop ones, and the length and encoding of
/// a body the gateway may re-frame.
pub fn is_response_header_dropped(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "set-cookie"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemini_paths() {
        assert_eq!(
            gemini_model("/v1beta/models/gemini-2.5-flash:generateContent"),
            Some(("gemini-2.5-flash", false))
        );
        assert_eq!(
            gemini_model("/v1beta/models/gemini-2.5-pro:streamGenerateContent"),
            Some(("gemini-2.5-pro", true))
        );
        assert_eq!(gemini_model("/v1beta/models/x:countTokens"), None);
        assert_eq!(gemini_model("/v1beta/models/:generateContent"), None);
    }

    #[test]
    fn refusals_speak_each_sdks_format() {
        let r = Refusal::Unauthenticated("unknown API key".into());
        let body = |res: Response| async move {
            let b = axum::body::to_bytes(res.into_body(), 1 << 20)
                .await
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&b).unwrap()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let o = body(r.respond(Provider::OpenAi, HeaderMap::new())).await;
            assert_eq!(o["error"]["code"], "invalid_api_key");
            assert_eq!(o["error"]["type"], "invalid_request_error");
            let a = body(r.respond(Provider::Anthropic, HeaderMap::new())).await;
            assert_eq!(a["type"], "error");
            assert_eq!(a["error"]["type"], "authentication_error");
            let g = body(r.respond(Provider::Gemini, HeaderMap::new())).await;
            assert_eq!(g["error"]["status"], "UNAUTHENTICATED");
            assert_eq!(g["error"]["code"], 401);
        });
        assert_eq!(Refusal::Flagged.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            Refusal::ModelNotAllowed("m".into()).status(),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        for h in [
            "authorization",
            "x-api-key",
            "x-goog-api-key",
            "connection",
            "transfer-encoding",
            "x-tokentally-tags",
            "cookie",
        ] {
            assert!(is_request_header_dropped(h), "{h}");
        }
        for h in [
            "anthropic-version",
            "openai-beta",
            "content-type",
            "user-agent",
        ] {
            assert!(!is_request_header_dropped(h), "{h}");
        }
    }
}
