-- Issue 35, item 4: the usage export frozen with an issued invoice, in parts of about
-- 1 MB, written as the issuer renders it (rows grouped by day, user, group, key and
-- model as ClickHouse sorts the month's events), so that issuing holds no more than one
-- part however large the month. A month of a large institution's export is over 100 MB
-- (1M events over 1,500 users: 119 MB); `invoice_snapshots.usage_csv` held it in one
-- string, built in memory. New snapshots leave that column empty and store their parts
-- here; older snapshots keep theirs (readers use the parts where there are any).
CREATE TABLE IF NOT EXISTS invoice_snapshot_usage
(
    snapshot String,
    part UInt32,
    text String
)
ENGINE = MergeTree
ORDER BY (snapshot, part);
