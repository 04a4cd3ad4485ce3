-- Limits and budgets enforced by the gateway (issue 13).
--
-- 1. One row per state of a limit; the row with the highest `version` is current
--    (`LIMIT 1 BY limit_id`), `removed = 1` ends it. Every gateway instance reads the
--    table every second. `amount` is a decimal string: USD exactly as given, or a whole
--    number of requests or tokens. `period` (not `window`, a keyword in current
--    releases) is day, week or month in the institution's time zone.
CREATE TABLE IF NOT EXISTS limits
(
    limit_id String,
    version UInt64,
    institution_id String,
    scope String,
    subject String,
    metric String,
    period String,
    amount String,
    mode String,
    removed UInt8,
    updated_at UInt32,
    updated_by String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY limit_id;

-- 2. What each gateway instance holds for a limit beyond what ClickHouse has stored:
--    open reservations and priced requests not yet stored, reported every few seconds
--    for the dashboard (`reported_at` tells a live instance from a gone one), and how
--    many requests the limit refused on that instance this period (cumulative: the
--    latest report of each instance counts). Amounts are decimal strings (USD) and counts.
CREATE TABLE IF NOT EXISTS limit_holds
(
    instance String,
    limit_id String,
    period_start DateTime,
    reserved_usd String,
    reserved_requests UInt64,
    reserved_tokens UInt64,
    open_reservations UInt64,
    pending_usd String,
    pending_requests UInt64,
    pending_tokens UInt64,
    refused UInt64,
    reported_at DateTime
)
ENGINE = ReplacingMergeTree(reported_at)
ORDER BY (instance, limit_id);
