-- Day x institution x user x provider x model x price model, sorted by person first: what
-- one person spent, by model, over any whole-day range ("My usage", and an institution
-- page filtered to one user). Without it that question read the fine rollup
-- `usage_hourly_institution` (66M rows at 100M events) for every hour of the
-- institution's range: 33 ms of "My usage"'s 65 ms at the benchmark database. A person's
-- month is a few dozen rows here.
--
-- The backfill is its view's query over all stored events and first empties its table,
-- so a migration cut off after the INSERT can be run again. Run `migrate` with ingest
-- stopped (as for every migration): events arriving between the view's creation and its
-- backfill would count twice.

CREATE TABLE IF NOT EXISTS usage_daily_user_model
(
    day DateTime,
    institution_id String,
    user_id String,
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
PARTITION BY toYYYYMM(day)
ORDER BY (institution_id, user_id, day, provider, model, price_model);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_user_model_mv TO usage_daily_user_model AS
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
    institution_id,
    user_id,
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
GROUP BY day, institution_id, user_id, provider, model, price_model;

TRUNCATE TABLE usage_daily_user_model;
INSERT INTO usage_daily_user_model
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
    institution_id,
    user_id,
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
GROUP BY day, institution_id, user_id, provider, model, price_model;
