//! Typed settings: a TOML file (`--config` / `TOKENTALLY_CONFIG`) with environment
//! overrides. Every field has a default, so no file at all is a valid configuration.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub clickhouse: ClickHouseConfig,
    pub ingest: IngestConfig,
    pub prices: PricesConfig,
    pub web: WebConfig,
    /// Billing details and budgets per institution (`[[institutions]]`).
    pub institutions: Vec<InstitutionConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Dashboard listen address. Env: `TOKENTALLY_WEB_LISTEN`.
    pub listen: String,
    /// Users and API tokens (argon2 / SHA-256 hashes), written by `tokentally users add`
    /// and `tokentally tokens add`. Env: `TOKENTALLY_USERS_FILE`.
    pub users_file: PathBuf,
    /// Mark the session cookie `Secure` (set when served over TLS, e.g. behind a proxy).
    pub secure_cookies: bool,
    /// Sessions expire after this many hours.
    pub session_hours: i64,
    /// Failed logins allowed per user name and per client address per minute.
    pub login_attempts_per_minute: u32,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            users_file: PathBuf::from("users.toml"),
            secure_cookies: false,
            session_hours: 12,
            login_attempts_per_minute: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstitutionConfig {
    pub id: String,
    /// Display name (defaults to the id).
    #[serde(default)]
    pub name: String,
    /// Monthly budget in USD (decimal string), for burn-down and budget alerts.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub monthly_budget_usd: Option<rust_decimal::Decimal>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated. Env: `TOKENTALLY_KAFKA_BROKERS`.
    pub brokers: String,
    /// Topic the gateways publish usage events to. Env: `TOKENTALLY_KAFKA_TOPIC`.
    pub topic: String,
    /// Consumer group of the `ingest` instances. Env: `TOKENTALLY_KAFKA_GROUP`.
    pub group: String,
    /// Optional topic that receives a copy of every rejected message (empty: none).
    /// Env: `TOKENTALLY_KAFKA_DEAD_LETTER_TOPIC`.
    pub dead_letter_topic: String,
    /// Memory cap of the consumer's pre-fetch queue, in KiB (librdkafka
    /// `queued.max.messages.kbytes`).
    pub queued_max_kbytes: u32,
    /// How long the group waits for a silent consumer before its partitions move to
    /// another instance (librdkafka `session.timeout.ms`; brokers accept >= 6000 by default).
    /// Env: `TOKENTALLY_KAFKA_SESSION_TIMEOUT_MS`.
    pub session_timeout_ms: u64,
    /// Extra librdkafka properties (e.g. `security.protocol`, `sasl.*`).
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "llm.usage".into(),
            group: "tokentally".into(),
            dead_letter_topic: String::new(),
            queued_max_kbytes: 32 * 1024,
            session_timeout_ms: 10_000,
            properties: Default::default(),
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP endpoint. Env: `TOKENTALLY_CLICKHOUSE_URL`.
    pub url: String,
    /// Database holding tokentally's tables. Env: `TOKENTALLY_CLICKHOUSE_DATABASE`.
    pub database: String,
    /// Env: `TOKENTALLY_CLICKHOUSE_USER`.
    pub user: String,
    /// Never printed. Env: `TOKENTALLY_CLICKHOUSE_PASSWORD`.
    pub password: String,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            database: "tokentally".into(),
            user: "default".into(),
            password: String::new(),
        }
    }
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("database", &self.database)
            .field("user", &self.user)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A batch is written when it holds this many messages…
    pub batch_max_messages: usize,
    /// …or when its first message has waited this long.
    pub batch_max_wait_ms: u64,
    /// How far in the future `occurred_at` may lie before the event is rejected.
    pub max_future_skew_secs: i64,
    /// Republished copies of an event are found by `event_id` among stored events whose
    /// `occurred_at` is within this many seconds of the copy's (a republished event
    /// normally carries the same timestamp; the window tolerates gateways that re-stamp).
    pub dedupe_window_secs: i64,
    /// Prometheus metrics listen address (`/metrics`); empty disables.
    /// Env: `TOKENTALLY_METRICS_LISTEN`.
    pub metrics_listen: String,
    /// Longest wait between retries of a failed write, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch_max_messages: 5000,
            batch_max_wait_ms: 1000,
            max_future_skew_secs: 300,
            dedupe_window_secs: 3600,
            metrics_listen: "127.0.0.1:9464".into(),
            max_backoff_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricesConfig {
    /// Price book: one TOML file or a folder of them. Env: `TOKENTALLY_PRICES`.
    pub path: PathBuf,
}

impl Default for PricesConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("prices"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
}

impl Config {
    /// Reads the file (if any), then applies `TOKENTALLY_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: p.to_owned(),
                    source,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        Ok(config)
    }

    /// Applies overrides from `env` (a function so tests need not touch the process env).
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let strings: [(&str, &mut String); 10] = [
            ("TOKENTALLY_WEB_LISTEN", &mut self.web.listen),
            ("TOKENTALLY_KAFKA_BROKERS", &mut self.kafka.brokers),
            ("TOKENTALLY_KAFKA_TOPIC", &mut self.kafka.topic),
            ("TOKENTALLY_KAFKA_GROUP", &mut self.kafka.group),
            (
                "TOKENTALLY_KAFKA_DEAD_LETTER_TOPIC",
                &mut self.kafka.dead_letter_topic,
            ),
            ("TOKENTALLY_CLICKHOUSE_URL", &mut self.clickhouse.url),
            (
                "TOKENTALLY_CLICKHOUSE_DATABASE",
                &mut self.clickhouse.database,
            ),
            ("TOKENTALLY_CLICKHOUSE_USER", &mut self.clickhouse.user),
            (
                "TOKENTALLY_CLICKHOUSE_PASSWORD",
                &mut self.clickhouse.password,
            ),
            ("TOKENTALLY_METRICS_LISTEN", &mut self.ingest.metrics_listen),
        ];
        for (name, slot) in strings {
            if let Some(v) = env(name) {
                *slot = v;
            }
        }
        if let Some(v) = env("TOKENTALLY_USERS_FILE") {
            self.web.users_file = PathBuf::from(v);
        }
        if let Some(v) = env("TOKENTALLY_PRICES") {
            self.prices.path = PathBuf::from(v);
        }
        let numbers: [(&'static str, &mut u64); 2] = [
            (
                "TOKENTALLY_INGEST_BATCH_MAX_WAIT_MS",
                &mut self.ingest.batch_max_wait_ms,
            ),
            (
                "TOKENTALLY_KAFKA_SESSION_TIMEOUT_MS",
                &mut self.kafka.session_timeout_ms,
            ),
        ];
        for (name, slot) in numbers {
            if let Some(v) = env(name) {
                *slot = v
                    .parse()
                    .map_err(|e: std::num::ParseIntError| ConfigError::Env {
                        name,
                        value: v.clone(),
                        reason: e.to_string(),
                    })?;
            }
        }
        if let Some(v) = env("TOKENTALLY_INGEST_BATCH_MAX_MESSAGES") {
            self.ingest.batch_max_messages =
                v.parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| ConfigError::Env {
                        name: "TOKENTALLY_INGEST_BATCH_MAX_MESSAGES",
                        value: v.clone(),
                        reason: "must be a positive integer".into(),
                    })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_file_values() {
        let mut c: Config =
            toml::from_str("[kafka]\nbrokers = \"file:9092\"\ntopic = \"t\"\n").unwrap();
        c.apply_env(|n| match n {
            "TOKENTALLY_KAFKA_BROKERS" => Some("env:9092".into()),
            "TOKENTALLY_PRICES" => Some("/p".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.kafka.brokers, "env:9092");
        assert_eq!(c.kafka.topic, "t");
        assert_eq!(c.kafka.group, "tokentally");
        assert_eq!(c.prices.path, PathBuf::from("/p"));
    }

    #[test]
    fn unknown_fields_and_bad_env_are_errors() {
        assert!(toml::from_str::<Config>("[kafka]\nbroker = \"x\"\n").is_err());
        let mut c = Config::default();
        let err =
            c.apply_env(|n| (n == "TOKENTALLY_INGEST_BATCH_MAX_MESSAGES").then(|| "0".into()));
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("TOKENTALLY_INGEST_BATCH_MAX_MESSAGES"));
    }

    #[test]
    fn password_is_never_printed() {
        let mut c = Config::default();
        c.clickhouse.password = "hunter2".into();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
