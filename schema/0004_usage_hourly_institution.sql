-- The fine rollup again, sorted institution first: one institution's users and keys are
-- read without reading every other institution's rows of the same hours.
CREATE TABLE IF NOT EXISTS usage_hourly_institution
(
    hour DateTime,
    institution_id String,
    provider String,
    model String,
    price_model String,
    api_key_id String,
    user_id String,
    service_tier String,
    events Int64,
    unpriced_events Int64,
    input_tokens Int64,
    cache_read_tokens Int64,
    cache_write_tokens Int64,
    output_tokens Int64,
    reasoning_tokens Int64,
    cost Decimal(38, 18)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (institution_id, hour, user_id, api_key_id, provider, model, price_model, service_tier);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_institution_mv TO usage_hourly_institution AS
SELECT
    toStartOfHour(occurred_at) AS hour,
    institution_id,
    provider,
    model,
    price_model,
    api_key_id,
    user_id,
    service_tier,
    toInt64(sign) AS events,
    toInt64(sign) * toInt64(1 - priced) AS unpriced_events,
    toInt64(input_tokens) * sign AS input_tokens,
    toInt64(cache_read_tokens) * sign AS cache_read_tokens,
    toInt64(cache_write_tokens) * sign AS cache_write_tokens,
    toInt64(output_tokens) * sign AS output_tokens,
    toInt64(reasoning_tokens) * sign AS reasoning_tokens,
    cost * sign AS cost
FROM usage_events;

-- Backfill (run migrate with ingest stopped, as `tokentally run` does).
INSERT INTO usage_hourly_institution
SELECT hour, institution_id, provider, model, price_model, api_key_id, user_id, service_tier,
       sum(events), sum(unpriced_events), sum(input_tokens), sum(cache_read_tokens),
       sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cost)
FROM usage_hourly
GROUP BY hour, institution_id, provider, model, price_model, api_key_id, user_id, service_tier;
