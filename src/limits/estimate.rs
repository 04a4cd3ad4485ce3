//! The worst case of one request, before it is forwarded: what admission reserves.
//! Pure: the request's bytes, its caps and the price book in, amounts out.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::price::PriceBook;

/// Service tiers a request may be served in; the worst case takes the dearest.
const TIERS: [&str; 4] = ["", "priority", "flex", "batch"];

/// The stated bounds of a worst case (`[gateway]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Tokens the provider may add to a prompt (tool and system preambles).
    pub overhead_tokens: u64,
    /// Tokens per mention of an image.
    pub image_tokens: u64,
    /// Output reserved when neither the request nor the price book caps it.
    pub default_output_tokens: u64,
}

/// What the worst case needs to know of a request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The provider as events and the price book name it (`openai`, `google`, ...).
    pub provider: &'a str,
    pub model: &'a str,
    /// The body as the client sent it.
    pub body: &'a [u8],
    /// The output cap the client set (`max_tokens`, `maxOutputTokens`, ...).
    pub max_output_tokens: Option<u64>,
    /// Answers asked for (`n`, `candidateCount`); each may write the cap.
    pub choices: u64,
    /// Whether the API writes output at all (embeddings do not).
    pub writes_output: bool,
}

/// The worst case of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// `Err`: the model has no price, so a USD limit cannot be held.
    pub usd: Result<Decimal, String>,
    pub tokens: u64,
}

/// The most a request can use, before it is sent:
/// - prompt: one token per byte of the body (every tokenizer the providers use makes a
///   token of at least one byte of text, and the body holds the text plus JSON), plus
///   the providers' own preambles (`overhead_tokens`), plus `image_tokens` for every
///   mention of an image (an image by URL costs tokens its bytes do not show);
/// - output: the request's cap (`max_tokens`, `max_completion_tokens`,
///   `max_output_tokens`, `maxOutputTokens`) times the answers asked for, else the
///   model's maximum output from the price book, else `default_output_tokens`;
/// - USD: that many tokens at the dearest rates of every entry the model could be priced
///   by today (all service tiers, the long-context tier the prompt could reach).
pub fn worst_case(book: &PriceBook, bounds: &Bounds, req: &Request<'_>, now: DateTime<Utc>) -> Ask {
    let images = count(req.body, b"image") + count(req.body, b"Image");
    let prompt = req.body.len() as u64 + bounds.overhead_tokens + bounds.image_tokens * images;
    let date = now.date_naive();
    let entries: Vec<_> = TIERS
        .iter()
        .filter_map(|t| book.lookup(req.provider, req.model, t, date))
        .collect();
    let output = if req.writes_output {
        req.max_output_tokens
            .or_else(|| entries.iter().filter_map(|e| e.max_output_tokens).max())
            .unwrap_or(bounds.default_output_tokens)
            .saturating_mul(req.choices.max(1))
    } else {
        0
    };
    let usd = entries
        .iter()
        .map(|e| crate::price::worst_case(e, prompt, output))
        .max()
        .ok_or_else(|| {
            format!(
                "the model {} has no price",
                crate::format::log_safe(req.model, 100)
            )
        });
    Ask {
        usd,
        tokens: prompt.saturating_add(output),
    }
}

fn count(hay: &[u8], needle: &[u8]) -> u64 {
    hay.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    const BOOK: &str = r#"
[[price]]
provider = "openai"
model = "gpt-4o"
match = "gpt-4o"
effective_from = "2024-01-01"
max_output_tokens = 16384
input_per_mtok = "2.5"
cache_read_per_mtok = "1.25"
output_per_mtok = "10"

[[price]]
provider = "openai"
model = "gpt-4o"
match = "gpt-4o"
effective_from = "2024-01-01"
service_tier = "priority"
input_per_mtok = "4.25"
output_per_mtok = "17"
"#;

    fn bounds() -> Bounds {
        Bounds {
            overhead_tokens: 500,
            image_tokens: 3000,
            default_output_tokens: 1000,
        }
    }

    fn request<'a>(model: &'a str, body: &'a [u8], cap: Option<u64>, choices: u64) -> Request<'a> {
        Request {
            provider: "openai",
            model,
            body,
            max_output_tokens: cap,
            choices,
            writes_output: true,
        }
    }

    #[test]
    fn the_worst_case_takes_the_dearest_tier_and_the_cap() {
        let book = PriceBook::from_sources(&[("b.toml".into(), BOOK.into())]).unwrap();
        let now = "2026-12-03T12:00:00Z".parse().unwrap();
        let body = br#"{"model":"gpt-4o","max_tokens":100,"n":2,"messages":[{"role":"user","content":"hi"}]}"#;
        let ask = worst_case(
            &book,
            &bounds(),
            &request("gpt-4o", body, Some(100), 2),
            now,
        );
        let prompt = body.len() as u64 + 500;
        assert_eq!(ask.tokens, prompt + 200);
        // Priority rates: 4.25 and 17 per million.
        let expected = (Decimal::from(prompt) * dec!(4.25) + dec!(200) * dec!(17)) / dec!(1000000);
        assert_eq!(ask.usd, Ok(expected.normalize()));
        // No cap: the book's maximum output.
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#;
        let ask = worst_case(&book, &bounds(), &request("gpt-4o", body, None, 1), now);
        assert_eq!(ask.tokens, body.len() as u64 + 500 + 2 * 3000 + 16384);
        // A model without a price.
        let ask = worst_case(&book, &bounds(), &request("gpt-9", body, None, 1), now);
        assert!(ask.usd.unwrap_err().contains("gpt-9"));
        assert_eq!(ask.tokens, body.len() as u64 + 500 + 2 * 3000 + 1000);
        // Embeddings write no output.
        let ask = worst_case(
            &book,
            &bounds(),
            &Request {
                writes_output: false,
                ..request("gpt-4o", body, Some(50), 1)
            },
            now,
        );
        assert_eq!(ask.tokens, body.len() as u64 + 500 + 2 * 3000);
    }
}
