-- Alert state changes, append-only: `firing` when an incident opens, `resolved` when it
-- clears, `acknowledged` when someone in ops takes it. An incident's state is its latest
-- firing/resolved row (by `seq`, milliseconds); the evaluator rebuilds its memory from
-- this table after a restart, so an incident is announced once however often it restarts.
CREATE TABLE IF NOT EXISTS alerts
(
    alert_id String,
    at DateTime,
    seq UInt64,
    state String,
    kind String,
    entity String,
    institution_id String,
    severity String,
    observed Decimal(38, 6),
    baseline Decimal(38, 6),
    threshold Decimal(38, 6),
    message String,
    actor String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (alert_id, seq);
