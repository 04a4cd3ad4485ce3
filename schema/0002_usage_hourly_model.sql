-- A coarser rollup for pages that need neither user, key nor tier: hour x institution x
-- model. The fine rollup has nearly one row per (user, key, model, hour), which at 10M
-- events is ~4M rows; this one is ~10x smaller.
CREATE TABLE IF NOT EXISTS usage_hourly_model
(
    hour DateTime,
    institution_id String,
    provider String,
    model String,
    price_model String,
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
ORDER BY (hour, institution_id, provider, model, price_model);

-- Fed from usage_events like usage_hourly, so it stays exact under dedupe and reprice.
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_model_mv TO usage_hourly_model AS
SELECT
    toStartOfHour(occurred_at) AS hour,
    institution_id,
    provider,
    model,
    price_model,
    toInt64(sign) AS events,
    toInt64(sign) * toInt64(1 - priced) AS unpriced_events,
    toInt64(input_tokens) * sign AS input_tokens,
    toInt64(cache_read_tokens) * sign AS cache_read_tokens,
    toInt64(cache_write_tokens) * sign AS cache_write_tokens,
    toInt64(output_tokens) * sign AS output_tokens,
    toInt64(reasoning_tokens) * sign AS reasoning_tokens,
    cost * sign AS cost
FROM usage_events;

-- Backfill what was stored before this migration (run migrate with ingest stopped, as
-- `tokentally run` does: rows arriving between the view and this insert would count twice).
INSERT INTO usage_hourly_model
SELECT hour, institution_id, provider, model, price_model,
       sum(events), sum(unpriced_events), sum(input_tokens), sum(cache_read_tokens),
       sum(cache_write_tokens), sum(output_tokens), sum(reasoning_tokens), sum(cost)
FROM usage_hourly
GROUP BY hour, institution_id, provider, model, price_model;
