-- 1. Hours are UTC hours, whatever the server's time zone.
-- The views of 0001-0004 bucket with `toStartOfHour(occurred_at)`, which uses the
-- server's zone: on a server in a half-hour zone (+05:30, +09:30) every "hour" started
-- at :30 UTC and day totals shifted by half an hour. The views are recreated with the
-- zone pinned. Run `migrate` with ingest stopped (as for every migration): an insert
-- between a DROP and its CREATE would miss that rollup. Rows written before this
-- migration keep their buckets (identical on a UTC server, the usual case).
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
    toInt64(sign) AS events,
    toInt64(sign) * toInt64(1 - priced) AS unpriced_events,
    toInt64(input_tokens) * sign AS input_tokens,
    toInt64(cache_read_tokens) * sign AS cache_read_tokens,
    toInt64(cache_write_tokens) * sign AS cache_write_tokens,
    toInt64(output_tokens) * sign AS output_tokens,
    toInt64(reasoning_tokens) * sign AS reasoning_tokens,
    cost * sign AS cost
FROM usage_events;

DROP TABLE IF EXISTS usage_hourly_model_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_model_mv TO usage_hourly_model AS
SELECT
    toStartOfHour(occurred_at, 'UTC') AS hour,
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

DROP TABLE IF EXISTS usage_tags_hourly_mv;
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_tags_hourly_mv TO usage_tags_hourly AS
SELECT
    toStartOfHour(occurred_at, 'UTC') AS hour,
    institution_id,
    tag_key,
    tag_value,
    toInt64(sign) AS events,
    cost * sign AS cost
FROM usage_events
ARRAY JOIN tag_keys AS tag_key, tag_values AS tag_value;

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
    toInt64(sign) AS events,
    toInt64(sign) * toInt64(1 - priced) AS unpriced_events,
    toInt64(input_tokens) * sign AS input_tokens,
    toInt64(cache_read_tokens) * sign AS cache_read_tokens,
    toInt64(cache_write_tokens) * sign AS cache_write_tokens,
    toInt64(output_tokens) * sign AS output_tokens,
    toInt64(reasoning_tokens) * sign AS reasoning_tokens,
    cost * sign AS cost
FROM usage_events;

-- 2. Every ingest instance says every few seconds what it does: which partitions it
-- holds, when it last committed, which price book it prices with, whether it thinks it
-- is stalled. `/pipeline` lists the instances; the alert evaluator raises "ingest
-- stalled" from it. One row per instance after merges (the latest `at` wins).
CREATE TABLE IF NOT EXISTS ingest_instances
(
    instance_id String,
    host String,
    pid UInt32,
    kafka_topic String,
    kafka_group String,
    started_at DateTime,
    at DateTime,
    partitions Array(Int32),
    last_commit_at DateTime,
    lag Int64,
    price_book_version String,
    state String,
    detail String
)
ENGINE = ReplacingMergeTree(at)
ORDER BY (kafka_topic, kafka_group, instance_id);

-- 3. Leases for jobs that must not run twice at once (`reprice`). A holder appends a
-- `claim`, then `active` rows to renew it, and `released` when done; per holder the
-- latest row counts. An unexpired `active` holder keeps the lease; otherwise the
-- earliest unexpired claim (first `at`, then holder) wins. Times are milliseconds.
CREATE TABLE IF NOT EXISTS leases
(
    name String,
    holder String,
    at UInt64,
    state String,
    expires_at UInt64
)
ENGINE = MergeTree
ORDER BY (name, at, holder);
