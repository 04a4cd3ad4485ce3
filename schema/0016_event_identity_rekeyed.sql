-- Issue 29: an event id bills once whatever institution it names, and messages published
-- under a wrong or missing Kafka key are repaired instead of rejected.
--
-- 1. `event_identity`: every stored state of every event, by event id, fed from
--    `usage_events` (`sign` as there: `reprice` and a cancelled copy add -1 rows). Ingest
--    asks it, by id (the sorting key), which institution already holds an id before it
--    stores a copy naming another one, and again after a write for copies stored at the
--    same moment under another institution by another instance.
CREATE TABLE IF NOT EXISTS event_identity
(
    event_id String,
    institution_id String,
    occurred_at DateTime,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    ingested_at DateTime,
    sign Int8
)
ENGINE = CollapsingMergeTree(sign)
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (event_id, institution_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS event_identity_mv TO event_identity AS
SELECT event_id, institution_id, occurred_at, kafka_topic, kafka_partition, kafka_offset,
    ingested_at, sign
FROM usage_events;

-- Backfill from what is stored (run `migrate` with ingest stopped, as for the rollups).
-- The table is emptied first so that a migration cut off halfway can be run again.
TRUNCATE TABLE event_identity;
INSERT INTO event_identity
SELECT event_id, institution_id, occurred_at, kafka_topic, kafka_partition, kafka_offset,
    ingested_at, sign
FROM usage_events;

-- 2. `rekeyed_events`: messages whose Kafka key was not their institution (none, or a
--    random one): ingest published each once more with key = institution_id (where every
--    copy of that event lands and is deduplicated) and records the original's position
--    here, so that every consumed offset is accounted for and a replay does not publish
--    it again.
CREATE TABLE IF NOT EXISTS rekeyed_events
(
    received_at DateTime,
    event_id String,
    institution_id String,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    kafka_key String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (kafka_topic, kafka_partition, kafka_offset);
