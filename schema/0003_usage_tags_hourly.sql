-- Spend per tag: hour x institution x tag name x tag value, for the institution page
-- (the rollups above have no tags; reading raw events for them was the slowest query).
CREATE TABLE IF NOT EXISTS usage_tags_hourly
(
    hour DateTime,
    institution_id String,
    tag_key String,
    tag_value String,
    events Int64,
    cost Decimal(38, 18)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (institution_id, hour, tag_key, tag_value);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_tags_hourly_mv TO usage_tags_hourly AS
SELECT
    toStartOfHour(occurred_at) AS hour,
    institution_id,
    tag_key,
    tag_value,
    toInt64(sign) AS events,
    cost * sign AS cost
FROM usage_events
ARRAY JOIN tag_keys AS tag_key, tag_values AS tag_value;

-- Backfill (run migrate with ingest stopped, as `tokentally run` does).
INSERT INTO usage_tags_hourly
SELECT toStartOfHour(occurred_at) AS hour, institution_id, tag_key, tag_value,
       sum(toInt64(sign)) AS events, sum(cost * sign) AS cost
FROM usage_events
ARRAY JOIN tag_keys AS tag_key, tag_values AS tag_value
GROUP BY hour, institution_id, tag_key, tag_value;
