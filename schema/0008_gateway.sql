-- The gateway (issue 12).
--
-- 1. Events say whether their usage was counted by us rather than reported by the
--    provider (a stream abandoned before the provider's usage arrived), and whether the
--    institution paid the provider itself (bring your own key). Both default to the old
--    meaning, so rows written before this migration read as before. 18.16 has no
--    `ADD COLUMN IF NOT EXISTS`; the migration runner skips an ADD COLUMN whose column
--    exists (a migration cut off halfway can be run again).
ALTER TABLE usage_events ADD COLUMN usage_estimated UInt8 DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN billing String DEFAULT '';

-- 2. Proxy keys and ingest tokens. One row per state of a key; the row with the highest
--    `version` is the key's current state (every gateway instance reads them with
--    `LIMIT 1 BY key_id`; the engine only drops superseded rows in the background).
--    Only a SHA-256 of the secret is stored: keys are 256 random bits, so a fast hash
--    is enough, and a leaked table lets nobody call a model.
CREATE TABLE IF NOT EXISTS proxy_keys
(
    key_id String,
    version UInt64,
    kind String,
    secret_hash String,
    institution_id String,
    user_id String,
    name String,
    models Array(String),
    expires_at UInt32,
    rpm UInt32,
    tpm UInt64,
    revoked UInt8,
    created_at UInt32,
    created_by String,
    updated_at UInt32,
    updated_by String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY key_id;

-- 3. Who did what to which key (and to which upstream key), for admins.
CREATE TABLE IF NOT EXISTS key_events
(
    at DateTime,
    at_ms UInt16,
    actor String,
    action String,
    key_id String,
    institution_id String,
    detail String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (at, key_id);

-- 4. Institutions' own provider keys (bring your own key), AES-256-GCM encrypted with
--    the gateway's master key; the plaintext never reaches ClickHouse. `fingerprint`
--    is an HMAC of the key under the master key: it tells two keys apart without
--    revealing either.
CREATE TABLE IF NOT EXISTS upstream_keys
(
    institution_id String,
    provider String,
    version UInt64,
    nonce String,
    ciphertext String,
    fingerprint String,
    removed UInt8,
    set_at UInt32,
    set_by String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (institution_id, provider);
