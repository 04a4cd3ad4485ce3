//! Token counts for usage the provider never reported (a stream the client abandoned and
//! the provider cut short, a stream truncated on the way): counted with OpenAI's
//! tokenizers (`tiktoken-rs`). For OpenAI models they are the provider's own; for
//! Anthropic and Gemini models, whose tokenizers are not public, `o200k_base` is an
//! approximation. Events with counted usage are marked `usage_estimated`.

use tiktoken_rs::CoreBPE;

use super::wire::{body, Api};
use crate::domain::TokenCounts;

/// Tokens a chat format adds per message (role markers), as OpenAI documents for its
/// chat models; added per input part.
const PER_PART: u64 = 3;

fn tokenizer(model: &str) -> &'static CoreBPE {
    let legacy = [
        "gpt-4-",
        "gpt-3.5",
        "text-embedding-3",
        "text-embedding-ada",
    ];
    if model == "gpt-4" || legacy.iter().any(|p| model.starts_with(p)) {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    }
}

/// Tokens of `text` for `model`.
pub fn count(model: &str, text: &str) -> u64 {
    tokenizer(model).encode_with_special_tokens(text).len() as u64
}

/// The estimated usage of a request: its input counted from the request body, its output
/// from the text streamed back (`overflow` bytes beyond what was kept count 1 token per
/// 4 bytes).
pub fn usage(api: Api, model: &str, request: &[u8], output: &str, overflow: usize) -> TokenCounts {
    let (input_text, parts) = body::input_text(api, request);
    let input = count(model, &input_text) + PER_PART * parts as u64;
    let output = if matches!(api, Api::Embeddings) {
        0
    } else {
        count(model, output) + (overflow as u64).div_ceil(4)
    };
    TokenCounts::new(input, 0, 0, output, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_a_real_tokenizer() {
        // Known o200k_base counts (tiktoken): "hello world" is 2 tokens.
        assert_eq!(count("gpt-4o-mini", "hello world"), 2);
        assert_eq!(count("gpt-4o-mini", ""), 0);
        let u = usage(
            Api::ChatCompletions,
            "gpt-4o-mini",
            br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello world"}]}"#,
            "hello world",
            0,
        );
        // "hello world\n" (the joiner) + 3 per message.
        assert_eq!(u.input, count("gpt-4o-mini", "hello world\n") + 3);
        assert_eq!(u.output, 2);
        let e = usage(
            Api::Embeddings,
            "text-embedding-3-small",
            br#"{"input":"a b c"}"#,
            "",
            0,
        );
        assert_eq!(e.output, 0);
        assert!(e.input > 0);
    }
}
