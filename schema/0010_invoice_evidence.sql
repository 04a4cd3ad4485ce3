-- Issue 14: invoices anyone can verify, reconcile columns that say what they count.
--
-- 1. What each issued invoice line was computed from: the ids of its stored events at
--    issue time and each event's leaf hash (SHA-256 of its id and billed fields; the
--    document carries the Merkle root over them), written by the issuer under a fresh snapshot id before it asks the
--    ledger for a number (a refused request leaves rows no document names; harmless).
CREATE TABLE IF NOT EXISTS invoice_line_events
(
    snapshot String,
    institution_id String,
    line UInt32,
    event_id String,
    leaf String
)
ENGINE = MergeTree
ORDER BY (snapshot, line, event_id);

-- 2. The frozen usage export behind each issued invoice (the same snapshot).
CREATE TABLE IF NOT EXISTS invoice_snapshots
(
    snapshot String,
    institution_id String,
    created_at DateTime,
    usage_csv String
)
ENGINE = ReplacingMergeTree
ORDER BY snapshot;

-- 3. Rejections by what they were about: the institution and time named in the payload,
--    where it could be read (empty / 0 when not: such rows are counted apart).
ALTER TABLE rejected_events ADD COLUMN institution_id String DEFAULT '';
ALTER TABLE rejected_events ADD COLUMN occurred_at DateTime DEFAULT toDateTime(0);
