-- Issue 31: people who sign in with their institution's account, and the groups (trust
-- levels) they belong to.
--
-- 1. `groups`: a group's policy as set on the dashboard (one row per state; the highest
--    `version` is current; `removed = 1` ends it). Groups in the config's `[[groups]]`
--    apply unless a row with the same (institution, group) replaces them.
--    `member_limits` is JSON: [{"metric": "requests", "period": "day", "amount": "15"}].
CREATE TABLE IF NOT EXISTS groups
(
    institution_id String,
    group_id String,
    version UInt64,
    name String,
    models Array(String),
    member_limits String,
    budget_usd String,
    budget_period String,
    keys_per_member UInt32,
    max_key_days UInt32,
    default_rpm UInt32,
    default_tpm UInt64,
    max_idle_days UInt32,
    removed UInt8,
    updated_at UInt32,
    updated_by String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (institution_id, group_id);

-- 2. `members`: one row per state of a person (every sign-in writes one, with the group
--    its claims give unless an administrator set the group: `group_source = 'admin'`).
--    `role` is member or institution_admin; `suspended = 1` refuses every key of theirs
--    on every gateway. Gateways read the latest state of each person with the keys.
CREATE TABLE IF NOT EXISTS members
(
    institution_id String,
    person_id String,
    version UInt64,
    name String,
    email String,
    group_id String,
    role String,
    group_source String,
    suspended UInt8,
    last_sign_in UInt32,
    created_at UInt32,
    updated_at UInt32,
    updated_by String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (institution_id, person_id);
