-- Issued invoices and credit notes, copied from the invoice ledger (a Kafka topic that
-- assigns the numbers). One row per sequence number; writers may repeat a row (they
-- write identical content), so readers take one row per `seq`. `document` (JSON), `csv`
-- and `pdf` are the frozen renderings that downloads return byte for byte.
CREATE TABLE IF NOT EXISTS invoices
(
    seq UInt64,
    number String,
    kind String,
    institution_id String,
    period String,
    issued_at DateTime,
    total Decimal(38, 2),
    references_number String,
    document String,
    csv String,
    pdf String
)
ENGINE = ReplacingMergeTree
ORDER BY seq;
