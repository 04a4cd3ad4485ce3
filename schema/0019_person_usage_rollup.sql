-- Per-person usage for limits, per UTC quarter hour: what one person's limits and their
-- keys' limits count ("My usage" at sign-in, `/api/v1/me/limits`), sorted by person
-- first so that a person's month is a few thousand rows. Limits count in the
-- institution's zone, and every zone's offset is a multiple of 15 minutes, so a limit's
-- day, week or month is a whole number of quarter hours (as for `usage_billing_15m`,
-- which gives the institution's own total). Before, "My usage" of a person under a
-- monthly limit summed the raw events of their whole institution's month (0.3–0.5 s at
-- 100M events).
--
-- `events` counts every event (as the other rollups do); `requests` served requests (the `requests` metric of limits); `tokens` prompt
-- plus output tokens, as the gateway counts them. Backfilled from all stored events
-- (emptied first, so a migration cut off after the INSERT can be run again; run
-- `migrate` with ingest stopped, as for every migration). The backfill runs in 16 slices
-- of the people (by a hash of the user id): in one statement its GROUP BY needed more
-- than the 9.3 GiB a query may use at 100M events (about 45 rows per 100 events here);
-- each slice needs a sixteenth.

CREATE TABLE IF NOT EXISTS usage_person_15m
(
    slot DateTime,
    institution_id String,
    user_id String,
    api_key_id String,
    events Int64,
    requests Int64,
    tokens Int64,
    cost Decimal(38, 18)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(slot)
ORDER BY (institution_id, user_id, slot, api_key_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_person_15m_mv TO usage_person_15m AS
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
GROUP BY slot, institution_id, user_id, api_key_id;

TRUNCATE TABLE usage_person_15m;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 0
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 1
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 2
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 3
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 4
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 5
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 6
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 7
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 8
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 9
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 10
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 11
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 12
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 13
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 14
GROUP BY slot, institution_id, user_id, api_key_id;

INSERT INTO usage_person_15m
SELECT
    toDateTime(intDiv(toUInt32(occurred_at), 900) * 900) AS slot,
    institution_id,
    user_id,
    api_key_id,
    sum(toInt64(sign)) AS events,
    sum(toInt64(sign) * (substring(status, 1, 9) != 'rejected_' AND substring(status, 1, 8) != 'blocked_'
        AND status != 'upstream_unreachable')) AS requests,
    sum(toInt64(sign) * toInt64(input_tokens + cache_read_tokens + cache_write_tokens + output_tokens)) AS tokens,
    sum(cost * sign) AS cost
FROM usage_events
WHERE cityHash64(user_id) % 16 = 15
GROUP BY slot, institution_id, user_id, api_key_id;
