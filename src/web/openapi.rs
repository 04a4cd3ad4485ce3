//! `/api/v1/openapi.json`: the OpenAPI document of the JSON API.

use axum::response::IntoResponse;

use super::auth::Authed;

pub async fn openapi(_: Authed) -> impl IntoResponse {
    axum::Json(openapi_document())
}

/// The OpenAPI document of `/api/v1`.
pub fn openapi_document() -> serde_json::Value {
    let filter_params: Vec<serde_json::Value> = [
        ("from", "First day, YYYY-MM-DD (UTC; default: first of this month)"),
        ("to", "Last day, inclusive, YYYY-MM-DD (default: today)"),
        ("institution", "Institution id (institution users: only their own)"),
        ("model", "Model id"),
        ("key", "API key id"),
        ("user", "User id"),
        ("tag", "Tag as name=value"),
    ]
    .iter()
    .map(|(n, d)| serde_json::json!({"name": n, "in": "query", "required": false, "description": d, "schema": {"type": "string"}}))
    .collect();
    let page = serde_json::json!({"$ref": "#/components/schemas/Page"});
    let op = |summary: &str, extra: Vec<serde_json::Value>| {
        let mut params = filter_params.clone();
        params.extend(extra);
        serde_json::json!({"get": {"summary": summary, "parameters": params, "security": [{"bearer": []}],
            "responses": {"200": {"description": "Page data", "content": {"application/json": {"schema": page}}},
                          "401": {"description": "No or invalid token"}, "403": {"description": "Outside the token's scope"},
                          "404": {"description": "Unknown"}}}})
    };
    let path_param = |name: &str, ty: &str| serde_json::json!({"name": name, "in": "path", "required": true, "schema": {"type": ty}});
    serde_json::json!({
        "openapi": "3.0.3",
        "info": {"title": "tokentally API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Spend analytics over priced LLM usage. Money is a decimal string in USD, exact."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Page": {"type": "object", "properties": {
                "title": {"type": "string"},
                "filters": {"type": "object"},
                "figures": {"type": "object", "additionalProperties": true},
                "charts": {"type": "array", "items": {"type": "object"}},
                "tables": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "object"}}}}}}
        },
        "paths": {
            "/api/v1/overview": op("Spend overview: this month vs last, by day, top institutions and models", vec![]),
            "/api/v1/institutions": op("Spend per institution", vec![]),
            "/api/v1/institutions/{institution}": op("One institution: over time by model, users, keys, tags, budget", vec![path_param("institution", "string")]),
            "/api/v1/models": op("Spend and tokens by model and token class; price entries in effect", vec![]),
            "/api/v1/providers": {"get": {"summary": "The providers' usage and cost reports against recorded usage per UTC day, provider and model, with differences and causes (finance, admin)", "security": [{"bearer": []}],
                "parameters": [{"name": "from", "in": "query", "required": false, "schema": {"type": "string", "format": "date"}},
                               {"name": "to", "in": "query", "required": false, "schema": {"type": "string", "format": "date"}}],
                "responses": {"200": {"description": "{from, to, threshold, providers, not_compared, lines}"}, "400": {"description": "Invalid range"}, "403": {"description": "Not finance or admin"}}}},
            "/api/v1/pipeline": op("Pipeline health (admin, ops): lag, rejected events, unpriced models", vec![]),
            "/api/v1/pipeline/rejected/{partition}/{offset}": op("One rejected message with its raw payload (admin, ops)", vec![path_param("partition", "integer"), path_param("offset", "integer")]),
            "/api/v1/keys": {"get": {"summary": "Gateway proxy keys and ingest tokens of the scope (never a secret)", "security": [{"bearer": []}],
                "parameters": [{"name": "institution", "in": "query", "required": false, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "{\"keys\": [...]}"}, "401": {"description": "No or invalid token"}, "403": {"description": "Outside the token's scope"}}}},
            "/api/v1/keys/create": {"post": {"summary": "Create a proxy key (admin, finance, institution_admin for their institution); the secret is in the answer, once",
                "security": [{"bearer": []}],
                "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": {"type": "object", "required": ["user"],
                    "properties": {"institution": {"type": "string"}, "user": {"type": "string"}, "name": {"type": "string"},
                                   "models": {"type": "string", "description": "comma-separated ids or prefixes ending in *"},
                                   "expires": {"type": "string", "format": "date"}, "rpm": {"type": "integer"}, "tpm": {"type": "integer"}}}}}},
                "responses": {"200": {"description": "{key_id, key, institution}"}, "400": {"description": "Invalid field"}, "403": {"description": "Not allowed"}}}},
            "/api/v1/limits": {"get": {"summary": "Limits of the scope with this period's used, reserved and remaining amounts, and requests refused by limits in the last 31 days", "security": [{"bearer": []}],
                "parameters": [{"name": "institution", "in": "query", "required": false, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "{\"limits\": [...], \"refused\": [...]}"}, "401": {"description": "No or invalid token"}, "403": {"description": "Outside the token's scope"}}}},
            "/api/v1/limits/set": {"post": {"summary": "Set a limit (admin, finance; institution_admin for their users and keys)", "security": [{"bearer": []}],
                "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": {"type": "object", "required": ["scope", "metric", "amount", "period"],
                    "properties": {"institution": {"type": "string"}, "scope": {"type": "string", "enum": ["institution", "user", "key"]}, "subject": {"type": "string"},
                                   "metric": {"type": "string", "enum": ["usd", "requests", "tokens"]}, "amount": {"type": "string"},
                                   "period": {"type": "string", "enum": ["day", "week", "month"]}, "mode": {"type": "string", "enum": ["block", "alert"]}}}}}},
                "responses": {"200": {"description": "{limit_id}"}, "400": {"description": "Invalid field"}, "403": {"description": "Not allowed"}}}},
            "/api/v1/limits/remove": {"post": {"summary": "Remove a limit of the scope", "security": [{"bearer": []}],
                "requestBody": {"content": {"application/x-www-form-urlencoded": {"schema": {"type": "object", "required": ["limit_id"], "properties": {"limit_id": {"type": "string"}}}}}},
                "responses": {"200": {"description": "Removed"}, "404": {"description": "No such limit in the scope"}}}},
            "/api/v1/keys/{key_id}/revoke": {"post": {"summary": "Revoke a key; every gateway refuses it within seconds", "security": [{"bearer": []}],
                "parameters": [path_param("key_id", "string")],
                "responses": {"200": {"description": "Revoked"}, "404": {"description": "No such key in the scope"}, "409": {"description": "Already revoked"}}}},
            "/api/v1/keys/{key_id}/resume": {"post": {"summary": "Resume a key the spend-spike brake paused: its spend alert is acknowledged in the caller's name; every gateway admits it again within seconds", "security": [{"bearer": []}],
                "parameters": [path_param("key_id", "string")],
                "responses": {"200": {"description": "Resumed"}, "404": {"description": "No such key in the scope"}, "409": {"description": "Not paused"}}}},
        }
    })
}
