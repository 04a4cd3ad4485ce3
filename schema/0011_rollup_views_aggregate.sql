-- Rollup views aggregate each inserted block (GROUP BY) instead of copying every event
-- row into the four SummingMergeTree rollups: an ingest batch of 5,000 events wrote
-- 20,000 rollup rows and the merges that folded them, which made ClickHouse use more CPU
-- than the broker feeding it (issue 16). Sums are unchanged: each view adds
-- `x * sign` per group, exactly what the summing merges did later. Run `migrate` with
-- ingest stopped (as for every migration): an insert between a DROP and its CREATE would
-- miss that rollup.

DROP TABLE IF EXISTS usage_hourly_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    toStartOfHour(occurred_at, 'UTC') AS hour,
    institution_id,
    provider,
    model,
    price_model,
    api_key_id,
    user_id,
    service_tier,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * toInt64(1 - priced)) AS unpriced_events,
    sum(toInt64(input_tokens) * sign) AS input_tokens,
    sum(toInt64(cache_read_tokens) * sign) AS cache_read_tokens,
    sum(toInt64(cache_write_tokens) * sign) AS cache_write_tokens,
    sum(toInt64(output_tokens) * sign) AS output_tokens,
    sum(toInt64(reasoning_tokens) * sign) AS reasoning_tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY hour, institution_id, provider, model, price_model, api_key_id, user_id, service_tier;

DROP TABLE IF EXISTS usage_hourly_model_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_model_mv TO usage_hourly_model AS
SELECT
    toStartOfHour(occurred_at, 'UTC') AS hour,
    institution_id,
    provider,
    model,
    price_model,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * toInt64(1 - priced)) AS unpriced_events,
    sum(toInt64(input_tokens) * sign) AS input_tokens,
    sum(toInt64(cache_read_tokens) * sign) AS cache_read_tokens,
    sum(toInt64(cache_write_tokens) * sign) AS cache_write_tokens,
    sum(toInt64(output_tokens) * sign) AS output_tokens,
    sum(toInt64(reasoning_tokens) * sign) AS reasoning_tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY hour, institution_id, provider, model, price_model;

DROP TABLE IF EXISTS usage_tags_hourly_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_tags_hourly_mv TO usage_tags_hourly AS
SELECT
    toStartOfHour(occurred_at, 'UTC') AS hour,
    institution_id,
    tag_key,
    tag_value,
    sum(toInt64(sign)) AS events,
    sum(cost * sign) AS cost
FROM usage_events
ARRAY JOIN tag_keys AS tag_key, tag_values AS tag_value
GROUP BY hour, institution_id, tag_key, tag_value;

DROP TABLE IF EXISTS usage_hourly_institution_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_institution_mv TO usage_hourly_institution AS
SELECT
    toStartOfHour(occurred_at, 'UTC') AS hour,
    institution_id,
    provider,
    model,
    price_model,
    api_key_id,
    user_id,
    service_tier,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * toInt64(1 - priced)) AS unpriced_events,
    sum(toInt64(input_tokens) * sign) AS input_tokens,
    sum(toInt64(cache_read_tokens) * sign) AS cache_read_tokens,
    sum(toInt64(cache_write_tokens) * sign) AS cache_write_tokens,
    sum(toInt64(output_tokens) * sign) AS output_tokens,
    sum(toInt64(reasoning_tokens) * sign) AS reasoning_tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY hour, institution_id, provider, model, price_model, api_key_id, user_id, service_tier;
