-- Daily rollups, institution first, one per dimension the dashboard groups by (issue 16).
-- Selections are whole UTC days, so every view except the hourly chart can read a daily
-- rollup: at 100M events the hourly fine rollup had 66M rows, and a 90-day view of the
-- largest institution summed 20M of them to rank its users (2 s); its daily user rollup
-- has about 1,500 rows a day. `day` is the start of the UTC day, like `hour` elsewhere.
--
-- Each backfill is its view's query over all stored events (exact whatever buckets older
-- hourly rows have) and first empties its table, so a migration cut off after an INSERT
-- can be run again. Run `migrate` with ingest stopped (as for every migration): events
-- arriving between a view's creation and its backfill would count twice.

-- Day x institution x provider x model x price model: totals, models and daily series
-- of any range (about 24x fewer rows than usage_hourly_model).
CREATE TABLE IF NOT EXISTS usage_daily_model
(
    day DateTime,
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
PARTITION BY toYYYYMM(day)
ORDER BY (institution_id, day, provider, model, price_model);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_model_mv TO usage_daily_model AS
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
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
GROUP BY day, institution_id, provider, model, price_model;

TRUNCATE TABLE usage_daily_model;
INSERT INTO usage_daily_model
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
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
GROUP BY day, institution_id, provider, model, price_model;

-- Day x institution x user: an institution's users over any range.
CREATE TABLE IF NOT EXISTS usage_daily_user
(
    day DateTime,
    institution_id String,
    user_id String,
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
ORDER BY (institution_id, day, user_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_user_mv TO usage_daily_user AS
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
    institution_id,
    user_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * toInt64(1 - priced)) AS unpriced_events,
    sum(toInt64(input_tokens) * sign) AS input_tokens,
    sum(toInt64(cache_read_tokens) * sign) AS cache_read_tokens,
    sum(toInt64(cache_write_tokens) * sign) AS cache_write_tokens,
    sum(toInt64(output_tokens) * sign) AS output_tokens,
    sum(toInt64(reasoning_tokens) * sign) AS reasoning_tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY day, institution_id, user_id;

TRUNCATE TABLE usage_daily_user;
INSERT INTO usage_daily_user
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
    institution_id,
    user_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * toInt64(1 - priced)) AS unpriced_events,
    sum(toInt64(input_tokens) * sign) AS input_tokens,
    sum(toInt64(cache_read_tokens) * sign) AS cache_read_tokens,
    sum(toInt64(cache_write_tokens) * sign) AS cache_write_tokens,
    sum(toInt64(output_tokens) * sign) AS output_tokens,
    sum(toInt64(reasoning_tokens) * sign) AS reasoning_tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY day, institution_id, user_id;

-- Day x institution x key: an institution's keys over any range.
CREATE TABLE IF NOT EXISTS usage_daily_key
(
    day DateTime,
    institution_id String,
    api_key_id String,
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
ORDER BY (institution_id, day, api_key_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_daily_key_mv TO usage_daily_key AS
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
    institution_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * toInt64(1 - priced)) AS unpriced_events,
    sum(toInt64(input_tokens) * sign) AS input_tokens,
    sum(toInt64(cache_read_tokens) * sign) AS cache_read_tokens,
    sum(toInt64(cache_write_tokens) * sign) AS cache_write_tokens,
    sum(toInt64(output_tokens) * sign) AS output_tokens,
    sum(toInt64(reasoning_tokens) * sign) AS reasoning_tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY day, institution_id, api_key_id;

TRUNCATE TABLE usage_daily_key;
INSERT INTO usage_daily_key
SELECT
    toStartOfDay(occurred_at, 'UTC') AS day,
    institution_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * toInt64(1 - priced)) AS unpriced_events,
    sum(toInt64(input_tokens) * sign) AS input_tokens,
    sum(toInt64(cache_read_tokens) * sign) AS cache_read_tokens,
    sum(toInt64(cache_write_tokens) * sign) AS cache_write_tokens,
    sum(toInt64(output_tokens) * sign) AS output_tokens,
    sum(toInt64(reasoning_tokens) * sign) AS reasoning_tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY day, institution_id, api_key_id;
