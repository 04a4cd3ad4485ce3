-- Usage events, one row per state of an event. `sign` = +1 adds an event (or its
-- re-rated state), -1 cancels an earlier state (written by `reprice`). Every query
-- sums `x * sign`, so totals are exact before and after background merges collapse
-- the pairs. Ingest never writes an event_id twice (it checks the store first), which
-- keeps the rollup fed by the materialized view exact too.
CREATE TABLE IF NOT EXISTS usage_events
(
    event_id String,
    occurred_at DateTime,
    occurred_ms UInt16,
    institution_id String,
    user_id String,
    api_key_id String,
    provider String,
    model String,
    endpoint String,
    service_tier String,
    status String,
    latency_ms UInt32,
    tag_keys Array(String),
    tag_values Array(String),
    input_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    output_tokens UInt64,
    reasoning_tokens UInt64,
    priced UInt8,
    cost Decimal(38, 18),
    price_id String,
    price_model String,
    price_tier UInt64,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime,
    version UInt32,
    sign Int8
)
ENGINE = CollapsingMergeTree(sign)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (institution_id, toStartOfHour(occurred_at), event_id);

-- Hourly rollup: hour x institution x model x key (x user, tier). Pages read this.
CREATE TABLE IF NOT EXISTS usage_hourly
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
ORDER BY (hour, institution_id, provider, model, price_model, api_key_id, user_id, service_tier);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
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

-- Messages that could not become events: the raw payload, where it was, and why.
CREATE TABLE IF NOT EXISTS rejected_events
(
    received_at DateTime,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    kafka_key String,
    reason String,
    detail String,
    payload String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (kafka_topic, kafka_partition, kafka_offset);

-- Republished copies of events already stored (same event_id, another offset): kept so
-- that every consumed offset is accounted for.
CREATE TABLE IF NOT EXISTS duplicate_events
(
    received_at DateTime,
    event_id String,
    institution_id String,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    original_partition Int32,
    original_offset Int64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (kafka_topic, kafka_partition, kafka_offset);
