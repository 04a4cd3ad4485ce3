-- Issue 35, item 1: the providers' own usage and cost reports, as imported.
--
-- `provider_bill_imports`: one row per provider, report (`usage` or `cost`) and UTC day an
-- import covered. The latest import of a (provider, report, day) is the one compared
-- (`imported_ms` orders them); an export re-imported replaces what an earlier import said
-- of those days, and a day missing from every import is reported as not covered.
CREATE TABLE IF NOT EXISTS provider_bill_imports
(
    import_id String,
    provider String,
    report String,
    day Date,
    imported_ms UInt64,
    source String,
    actor String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (provider, report, day, imported_ms);

-- `provider_bill_rows`: the reports' rows as the provider groups them (model as the
-- provider names it, line item or token type, API key, project or workspace).
CREATE TABLE IF NOT EXISTS provider_bill_rows
(
    import_id String,
    provider String,
    report String,
    day Date,
    model String,
    item String,
    api_key_id String,
    project_id String,
    requests UInt64,
    input_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    output_tokens UInt64,
    cost Decimal(38, 18)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (provider, report, day, import_id);
