//! Optional moderation (per institution, `[[institutions]] moderation = true`): a
//! request's input text is checked with OpenAI's moderation endpoint (free of charge,
//! with the platform's OpenAI key) before it goes to any provider. Flagged input is
//! refused; if the check itself fails the request is refused too (fail closed: the
//! institution asked for every request to be checked).

use std::time::Duration;

use super::wire::body::input_text;
use super::wire::{Api, Provider};
use super::Gateway;

/// Whether the input of this request is flagged.
pub async fn check(gw: &Gateway, api: Api, body: &[u8]) -> Result<bool, String> {
    let (text, _) = input_text(api, body);
    if text.trim().is_empty() {
        return Ok(false);
    }
    let key = gw
        .upstreams
        .platform_key(Provider::OpenAi)
        .ok_or("no OpenAI key is configured for moderation")?;
    let url = format!("{}/v1/moderations", gw.upstreams.base(Provider::OpenAi));
    let res = gw
        .client
        .post(url)
        .bearer_auth(key.expose())
        .json(&serde_json::json!({"model": "omni-moderation-latest", "input": text}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("moderation request: {}", super::describe(e)))?;
    if !res.status().is_success() {
        return Err(format!("moderation answered {}", res.status()));
    }
    let v: serde_json::Value = res
        .json()
        .await
        .map_err(|e| format!("moderation answer: {}", super::describe(e)))?;
    let results = v["results"]
        .as_array()
        .ok_or("moderation answer has no results")?;
    Ok(results.iter().any(|r| r["flagged"].as_bool() == Some(true)))
}
