//! Typed settings: a TOML file (`--config` / `TOKENTALLY_CONFIG`) with environment
//! overrides. Every field has a default, so no file at all is a valid configuration.

pub mod env;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub clickhouse: ClickHouseConfig,
    pub ingest: IngestConfig,
    pub prices: PricesConfig,
    pub web: WebConfig,
    pub billing: BillingConfig,
    pub alerts: AlertsConfig,
    pub gateway: GatewayConfig,
    /// The providers' own usage and cost reports and their comparison with what was
    /// recorded (`tokentally providers`).
    pub provider_bills: ProviderBillsConfig,
    /// Billing details and budgets per institution (`[[institutions]]`).
    pub institutions: Vec<InstitutionConfig>,
    /// Spend, request and token limits the gateway enforces (`[[limits]]`, read by
    /// `limits::configured`); limits set with `tokentally limits set` take precedence
    /// over one with the same id here.
    pub limits: Vec<toml::Value>,
    /// Groups inside institutions and their policies (`[[groups]]`, read by
    /// `people::groups::configured`).
    pub groups: Vec<toml::Value>,
    /// OpenID Connect providers people sign in with (`[[sso]]`, read by
    /// `people::sso::configured`).
    pub sso: Vec<toml::Value>,
}

impl Config {
    /// The institution's settings, if it is configured.
    pub fn institution(&self, id: &str) -> Option<&InstitutionConfig> {
        self.institutions.iter().find(|i| i.id == id)
    }

    /// The institution's time zone (UTC if unconfigured; validated at load).
    pub fn institution_tz(&self, id: &str) -> chrono_tz::Tz {
        self.institution(id)
            .and_then(|i| i.time_zone.parse().ok())
            .unwrap_or(chrono_tz::UTC)
    }
}

/// The gateway (`[gateway]`): where it listens, the providers it forwards to, the
/// spool that holds events while Kafka is away, and its limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: String,
    /// Where clients reach the gateway (`https://llm.example.org`): the base URL "My
    /// usage" puts in its SDK snippets. Empty: `http://` and `listen`. Env:
    /// `TOKENTALLY_GATEWAY_PUBLIC_URL`.
    pub public_url: String,
    /// 32 bytes as 64 hex characters: encrypts institutions' own provider keys and keys
    /// the pseudonymous end-user ids. Env: `TOKENTALLY_GATEWAY_MASTER_KEY`. If empty,
    /// read from `master_key_file` (which must be readable by its owner only), and
    /// created there on first use. Never logged.
    pub master_key: Secret,
    pub master_key_file: PathBuf,
    /// Where events wait for Kafka (append-only segment files).
    pub spool_dir: PathBuf,
    /// Most bytes the spool may hold; beyond it the gateway answers 503 rather than
    /// serve a request it could not bill.
    pub spool_max_bytes: u64,
    /// The spool is written before a response ends and fsynced every this many ms (0:
    /// fsync before every response ends). A killed process loses nothing written; a
    /// machine that loses power loses at most this window.
    pub spool_fsync_ms: u64,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    pub connect_timeout_secs: u64,
    /// Longest silence from a provider mid-response before the request is failed.
    pub idle_timeout_secs: u64,
    /// After a client goes away mid-stream, how long the provider's stream is still read
    /// for its usage.
    pub drain_secs: u64,
    /// How often the keys are re-read from ClickHouse (revocations apply within this
    /// plus one query).
    pub keys_refresh_ms: u64,
    /// How often limits and the usage they count are re-read from ClickHouse, and this
    /// instance's reservations reported to the others (a changed limit applies within
    /// this plus one query; see the README on several instances).
    pub limits_refresh_ms: u64,
    /// Stated bounds for the worst case reserved before a request: tokens the provider
    /// may add to a prompt (tool and system preambles), and per image in the request.
    pub reserve_overhead_tokens: u64,
    pub reserve_image_tokens: u64,
    /// Output reserved when neither the request nor the price book caps it.
    pub reserve_default_output_tokens: u64,
    /// Prometheus metrics of the gateway (`/metrics`; empty: off).
    pub metrics_listen: String,
    /// The store several gateway instances decide their limits through
    /// (`[gateway.shared_limits]`; off unless `redis_url` is set).
    pub shared_limits: SharedLimitsConfig,
    /// Watch each key's spend rate from what this instance settles and page a key over
    /// its threshold at once (issue 36's fast path; `gateway::spend_watch`).
    pub spend_watch: bool,
    pub openai: UpstreamConfig,
    pub anthropic: UpstreamConfig,
    pub gemini: UpstreamConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8090".into(),
            public_url: String::new(),
            master_key: Secret::default(),
            master_key_file: PathBuf::from("gateway-master.key"),
            spool_dir: PathBuf::from("spool"),
            spool_max_bytes: 1 << 30,
            spool_fsync_ms: 20,
            max_body_bytes: 20 * 1024 * 1024,
            connect_timeout_secs: 10,
            idle_timeout_secs: 300,
            drain_secs: 120,
            keys_refresh_ms: 2000,
            limits_refresh_ms: 1000,
            reserve_overhead_tokens: 512,
            reserve_image_tokens: 3000,
            reserve_default_output_tokens: 100_000,
            metrics_listen: "127.0.0.1:9465".into(),
            spend_watch: true,
            shared_limits: SharedLimitsConfig::default(),
            openai: UpstreamConfig::new("https://api.openai.com"),
            anthropic: UpstreamConfig::new("https://api.anthropic.com"),
            gemini: UpstreamConfig::new("https://generativelanguage.googleapis.com"),
        }
    }
}

/// The shared limit store (`[gateway.shared_limits]`): with several gateway instances,
/// reservations, settlements and rpm/tpm windows go through one Redis or Valkey primary,
/// so limits are exact across instances. Without it (one instance needs none), each
/// instance admits its share of a limit's headroom (see the README).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedLimitsConfig {
    /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS); empty: no shared
    /// store. Env: `TOKENTALLY_GATEWAY_SHARED_LIMITS_REDIS_URL`. Never logged (it may
    /// carry a password).
    pub redis_url: Secret,
    /// Prefix of every key; empty: `tokentally:` and the ClickHouse database's name (so
    /// deployments that share a server do not share counters).
    pub namespace: String,
    /// Longest wait for the store on a request; past it the instance decides by shares
    /// (logged, `gateway_limits_mode` metric, an alert) until the store answers again.
    pub timeout_ms: u64,
    /// An open reservation (or priced event not yet stored) that its instance stopped
    /// renewing (it crashed) is dropped after this long.
    pub reservation_ttl_secs: u64,
    pub pending_ttl_secs: u64,
}

impl Default for SharedLimitsConfig {
    fn default() -> Self {
        Self {
            redis_url: Secret::default(),
            namespace: String::new(),
            timeout_ms: 250,
            reservation_ttl_secs: 30,
            pending_ttl_secs: 900,
        }
    }
}

/// One provider the gateway forwards to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Scheme, host and port (paths such as `/v1/...` are the client's).
    pub base_url: String,
    /// The platform's key for this provider. Env: `TOKENTALLY_GATEWAY_<PROVIDER>_API_KEY`.
    pub api_key: Secret,
    /// Or a file holding it (first line).
    pub api_key_file: PathBuf,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self::new("")
    }
}

impl UpstreamConfig {
    fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: Secret::default(),
            api_key_file: PathBuf::new(),
        }
    }

    /// The key: `api_key`, else the first line of `api_key_file`, else none.
    pub fn key(&self) -> Result<Option<Secret>, ConfigError> {
        key_or_file(&self.api_key, &self.api_key_file)
    }
}

pub use crate::secret::Secret;

/// `key`, else the first line of `file` (empty path: none), else none.
fn key_or_file(key: &Secret, file: &Path) -> Result<Option<Secret>, ConfigError> {
    if !key.is_empty() {
        return Ok(Some(key.clone()));
    }
    if file.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.to_owned(),
        source,
    })?;
    let first = text.lines().next().unwrap_or("").trim().to_owned();
    Ok((!first.is_empty()).then(|| Secret::new(first)))
}

/// The providers' reports (`[provider_bills]`): where `tokentally providers import`
/// fetches them, which of the providers' keys are the gateway's, and when a difference
/// is reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderBillsConfig {
    /// A day, provider and model whose cost (the provider's charge, or both sides' tokens
    /// at the book's prices) differs by more than this many USD is reported, alerted
    /// (`provider_bill` alert), and makes `providers reconcile` exit 1.
    pub threshold_usd: rust_decimal::Decimal,
    /// The provider's charge may differ from the book's price of the provider's tokens
    /// by this many percent before it is named a price mismatch.
    pub price_tolerance_percent: rust_decimal::Decimal,
    pub openai: BillSourceConfig,
    pub anthropic: BillSourceConfig,
}

impl Default for ProviderBillsConfig {
    fn default() -> Self {
        Self {
            threshold_usd: rust_decimal::Decimal::ONE,
            price_tolerance_percent: rust_decimal::Decimal::new(1, 1),
            openai: BillSourceConfig::new("https://api.openai.com"),
            anthropic: BillSourceConfig::new("https://api.anthropic.com"),
        }
    }
}

/// One provider's reports (`[provider_bills.openai]`, `[provider_bills.anthropic]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillSourceConfig {
    /// Scheme, host and port of the provider's admin API (empty: the provider's own).
    pub base_url: String,
    /// The organisation's admin key (OpenAI `sk-admin-…`, Anthropic `sk-ant-admin…`):
    /// reads usage and cost, never logged. Env:
    /// `TOKENTALLY_PROVIDER_BILLS_<PROVIDER>_ADMIN_KEY`.
    pub admin_key: Secret,
    /// Or a file holding it (first line).
    pub admin_key_file: PathBuf,
    /// The provider's ids of the keys the gateway forwards with (OpenAI `key_…`,
    /// Anthropic `apikey_…`). Usage on other keys is reported as traffic not through the
    /// gateway. Empty (and no `gateway_projects`): every key is the gateway's.
    pub gateway_key_ids: Vec<String>,
    /// Or the projects (OpenAI) / workspaces (Anthropic) the gateway's keys belong to.
    pub gateway_projects: Vec<String>,
}

impl ProviderBillsConfig {
    /// Each provider's reports, by the provider name usage events use.
    pub fn sources(&self) -> [(&'static str, &BillSourceConfig); 2] {
        [("openai", &self.openai), ("anthropic", &self.anthropic)]
    }
}

impl Default for BillSourceConfig {
    fn default() -> Self {
        Self::new("")
    }
}

impl BillSourceConfig {
    fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.into(),
            admin_key: Secret::default(),
            admin_key_file: PathBuf::new(),
            gateway_key_ids: Vec::new(),
            gateway_projects: Vec::new(),
        }
    }

    /// The admin key: `admin_key`, else the first line of `admin_key_file`, else none.
    pub fn key(&self) -> Result<Option<Secret>, ConfigError> {
        key_or_file(&self.admin_key, &self.admin_key_file)
    }
}

/// Alert detectors, delivery and routing (`[alerts]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Run the evaluator inside `serve`/`run` (enable it on one instance only).
    pub enabled: bool,
    /// Seconds between evaluations.
    pub interval_secs: u64,
    /// After an incident resolves, the same alert stays quiet this long.
    pub cooldown_secs: i64,
    /// Base URL of the dashboard, for links in messages.
    pub dashboard_url: String,
    /// Spend spikes per institution and per API key.
    pub spike: SpikeConfig,
    /// Percentages of `monthly_budget_usd` that alert, each once per month.
    pub budget_thresholds: Vec<u32>,
    /// Rejected messages per hour above which ops are alerted.
    pub rejected_per_hour: u64,
    /// Consumer lag (messages, all partitions) above which ops are alerted.
    pub max_consumer_lag: i64,
    pub webhook: WebhookConfig,
    pub email: EmailConfig,
    /// Who gets what; with no routes every alert goes to the webhook and `email.to`.
    pub routes: Vec<RouteConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_secs: 60,
            cooldown_secs: 3600,
            dashboard_url: "http://127.0.0.1:8080".into(),
            spike: SpikeConfig::default(),
            budget_thresholds: vec![50, 80, 100],
            rejected_per_hour: 100,
            max_consumer_lag: 100_000,
            webhook: WebhookConfig::default(),
            email: EmailConfig::default(),
            routes: Vec::new(),
        }
    }
}

/// See `alerts::spike` for how these combine.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpikeConfig {
    /// Length of the window compared, in hours.
    pub window_hours: u32,
    /// How many earlier weeks form the same-hour-of-week baseline.
    pub baseline_weeks: u32,
    /// Never alert below this spend in the window (USD).
    #[serde(with = "rust_decimal::serde::str")]
    pub min_spend_usd: rust_decimal::Decimal,
    /// Fire above this multiple of the baseline (the median of earlier weeks)…
    #[serde(with = "rust_decimal::serde::str")]
    pub factor: rust_decimal::Decimal,
    /// …and above the median + this many robust standard deviations (1.4826 × the
    /// median absolute deviation).
    #[serde(with = "rust_decimal::serde::str")]
    pub deviations: rust_decimal::Decimal,
    /// Recovered at or below this multiple of the baseline (or the baseline plus a
    /// fifth of `min_spend_usd`, whichever is higher).
    #[serde(with = "rust_decimal::serde::str")]
    pub resolve_factor: rust_decimal::Decimal,
    /// An open spike incident resolves once it has stayed recovered this long (Grafana's "keep
    /// firing for"): a dip of an hour does not end it.
    pub recover_hours: u32,
    /// A spike of the same entity within this long after its incident resolved reopens
    /// that incident (same id, announced as firing again) instead of starting a new one:
    /// one incident per episode, e.g. a level change across a quiet night.
    pub renotify_hours: u32,
    /// An entity with no history yet (its first day) is compared with its peers (the
    /// institution's other keys) and never fires below this (USD in the window): a new
    /// project key with ordinary use stays quiet, a new leaked key does not.
    #[serde(with = "rust_decimal::serde::str")]
    pub new_entity_min_usd: rust_decimal::Decimal,
}

impl Default for SpikeConfig {
    fn default() -> Self {
        Self {
            window_hours: 1,
            baseline_weeks: 4,
            min_spend_usd: rust_decimal::Decimal::from(5),
            factor: rust_decimal::Decimal::from(3),
            deviations: rust_decimal::Decimal::from(4),
            resolve_factor: rust_decimal::Decimal::new(15, 1),
            recover_hours: 2,
            renotify_hours: 18,
            new_entity_min_usd: rust_decimal::Decimal::from(20),
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Slack-compatible incoming webhook URL (empty: no webhook).
    pub url: String,
    /// HMAC-SHA256 key for the `X-Tokentally-Signature` header. Env:
    /// `TOKENTALLY_ALERTS_WEBHOOK_SECRET`. Never logged.
    pub secret: Secret,
    /// Attempts per message (exponential backoff between them).
    pub max_attempts: u32,
    /// First retry delay in milliseconds (doubles each time, capped at 5 minutes).
    pub retry_initial_ms: u64,
    pub timeout_secs: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            secret: Secret::default(),
            max_attempts: 10,
            retry_initial_ms: 1000,
            timeout_secs: 10,
        }
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL is a secret (Slack puts the token in its path): show the host only.
        let host = self
            .url
            .split("://")
            .nth(1)
            .and_then(|r| r.split(['/', '?']).next())
            .unwrap_or("");
        f.debug_struct("WebhookConfig")
            .field("url_host", &host)
            .field("secret", &self.secret)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// SMTP server (empty: no e-mail).
    pub smtp_host: String,
    pub smtp_port: u16,
    /// `none` (plain, e.g. a local relay), `starttls` or `tls` (implicit TLS).
    pub security: String,
    pub username: String,
    /// Env: `TOKENTALLY_ALERTS_SMTP_PASSWORD`. Never logged.
    pub password: Secret,
    pub from: String,
    /// Default recipients.
    pub to: Vec<String>,
    pub max_attempts: u32,
    pub retry_initial_ms: u64,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            smtp_host: String::new(),
            smtp_port: 587,
            security: "starttls".into(),
            username: String::new(),
            password: Secret::default(),
            from: "tokentally <alerts@localhost>".into(),
            to: Vec::new(),
            max_attempts: 10,
            retry_initial_ms: 1000,
        }
    }
}

/// One routing rule: alerts matching it go to its destinations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `info`, `warning` or `critical`: this and above.
    #[serde(default)]
    pub min_severity: crate::domain::Severity,
    /// Only these institutions (empty: all, and pipeline alerts).
    #[serde(default)]
    pub institutions: Vec<String>,
    /// Send to the webhook.
    #[serde(default)]
    pub webhook: bool,
    /// Send e-mail to these addresses.
    #[serde(default)]
    pub email: Vec<String>,
}

/// Invoicing: who issues, how documents are numbered, and where the ledger lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// Kafka topic (one partition, never expiring) that orders every issued document;
    /// invoice numbers are positions in it. Env: `TOKENTALLY_BILLING_LEDGER_TOPIC`.
    pub ledger_topic: String,
    /// Invoice numbers read `PREFIX-YYYY-NNNNNN`; the sequence never resets.
    pub number_prefix: String,
    /// Days between the issue date and the due date.
    pub payment_terms_days: u32,
    /// `serve` issues last month's invoices on this day of the month (1-28; 0 = never).
    pub auto_issue_day: u32,
    /// Issue automatically even when a period has unpriced usage (it is listed, not billed).
    pub auto_issue_allow_unpriced: bool,
    /// The issuer printed on every invoice.
    pub issuer: PartyConfig,
    /// The issuer's time zone: the year in an invoice number is the calendar year there
    /// when the document is issued (IANA name, default UTC).
    pub time_zone: String,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            ledger_topic: "tokentally.invoices".into(),
            number_prefix: "TT".into(),
            payment_terms_days: 30,
            auto_issue_day: 0,
            auto_issue_allow_unpriced: false,
            issuer: PartyConfig {
                name: "tokentally".into(),
                ..Default::default()
            },
            time_zone: "UTC".into(),
        }
    }
}

/// Name, postal address and contact details as printed on an invoice.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PartyConfig {
    pub name: String,
    /// Address lines, top to bottom.
    pub address: Vec<String>,
    pub email: String,
    /// VAT or other tax identifier.
    pub tax_id: String,
    /// The issuer's only: how to pay (bank, IBAN, what to quote), printed under an
    /// invoice's total and kept in the document as issued. `{number}` is replaced by the
    /// invoice number.
    pub payment_instructions: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Where browsers reach the dashboard (`https://spend.example.org`): sign-in
    /// providers send people back to `{public_url}/sso/{provider}/callback`, which must
    /// be registered with them. Empty: `http://` and the address it listens on. Env:
    /// `TOKENTALLY_WEB_PUBLIC_URL`.
    pub public_url: String,
    /// Dashboard listen address. Env: `TOKENTALLY_WEB_LISTEN`.
    pub listen: String,
    /// Users and API tokens (argon2 / SHA-256 hashes), written by `tokentally users add`
    /// and `tokentally tokens add`. Env: `TOKENTALLY_USERS_FILE`.
    pub users_file: PathBuf,
    /// Mark the session cookie `Secure` (set when served over TLS, e.g. behind a proxy).
    pub secure_cookies: bool,
    /// Sessions expire after this many hours.
    pub session_hours: i64,
    /// Failed logins allowed per minute for one user name from one client address (an
    /// address alone may fail five times as often); failures from elsewhere only slow a
    /// user's logins down, they never lock the user out.
    pub login_attempts_per_minute: u32,
    /// Reverse proxies (IP addresses) whose `X-Forwarded-For` names the client. Without
    /// it, every client behind a proxy would share the proxy's address.
    pub trusted_proxies: Vec<String>,
    /// Longest date range a dashboard page or export accepts, in days.
    pub max_range_days: i64,
    /// Every dashboard query is cut off after this many seconds (`max_execution_time`).
    pub query_timeout_secs: u64,
    /// …and may read at most this many rows (`max_rows_to_read`; 0: no limit).
    pub max_rows_to_read: u64,
    /// ClickHouse user for the dashboard's reads (empty: `clickhouse.user`). Give it a
    /// read-only profile (`readonly = 2`); writes (invoices, alerts) keep the main user.
    /// Env: `TOKENTALLY_WEB_CLICKHOUSE_USER` / `_PASSWORD` (never logged).
    pub clickhouse_user: String,
    pub clickhouse_password: Secret,
    /// Invoice drafts one person may request per minute (each computes an invoice).
    pub drafts_per_minute: u32,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            public_url: String::new(),
            listen: "127.0.0.1:8080".into(),
            users_file: PathBuf::from("users.toml"),
            secure_cookies: false,
            session_hours: 12,
            login_attempts_per_minute: 5,
            trusted_proxies: Vec::new(),
            max_range_days: 400,
            query_timeout_secs: 20,
            max_rows_to_read: 0,
            clickhouse_user: String::new(),
            clickhouse_password: Secret::default(),
            drafts_per_minute: 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstitutionConfig {
    pub id: String,
    /// Display name (defaults to the id).
    #[serde(default)]
    pub name: String,
    /// Monthly budget in USD (decimal string), for burn-down and budget alerts.
    #[serde(default, with = "rust_decimal::serde::str_option")]
    pub monthly_budget_usd: Option<rust_decimal::Decimal>,
    /// IANA time zone whose calendar months are this institution's billing periods.
    #[serde(default = "utc")]
    pub time_zone: String,
    /// Contract markup (positive) or discount (negative) in percent, applied per invoice
    /// line, e.g. "-12.5" for a 12.5% discount.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub contract_percent: rust_decimal::Decimal,
    /// Billing address, contact and tax id printed on its invoices (name: `name`).
    #[serde(default)]
    pub billing: PartyConfig,
    /// The customer's purchase-order or reference number, printed on invoices.
    #[serde(default)]
    pub reference: String,
    /// Check every gateway request's input with the provider's moderation endpoint
    /// first; flagged input is refused (400) and recorded as `blocked_moderation`.
    #[serde(default)]
    pub moderation: bool,
    /// Platform fee per request served with the institution's own provider key (bring
    /// your own key); that usage itself is not charged.
    #[serde(default, with = "rust_decimal::serde::str")]
    pub byok_fee_per_request_usd: rust_decimal::Decimal,
    /// What a key spike does besides paging ops: `alert` (only that), or `suspend_key`
    /// (the key is paused on every gateway until the alert is acknowledged).
    #[serde(default)]
    pub on_spike: OnSpike,
}

/// The spend-spike brake (issue 36).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnSpike {
    #[default]
    Alert,
    SuspendKey,
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Longest pause between two polls before librdkafka considers the consumer stuck and
    /// leaves the group (`max.poll.interval.ms`). Ingest polls continuously (also while a
    /// write is retried), so this only matters for a wedged process; some brokers (tansu)
    /// also use it as the time after which a crashed member is dropped, which is why it
    /// is short. Env: `TOKENTALLY_KAFKA_MAX_POLL_INTERVAL_MS`.
    pub max_poll_interval_ms: u64,
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
            max_poll_interval_ms: 20_000,
            properties: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseConfig {
    /// HTTP endpoint. Env: `TOKENTALLY_CLICKHOUSE_URL`.
    pub url: String,
    /// Database holding tokentally's tables. Env: `TOKENTALLY_CLICKHOUSE_DATABASE`.
    pub database: String,
    /// Env: `TOKENTALLY_CLICKHOUSE_USER`.
    pub user: String,
    /// Never printed. Env: `TOKENTALLY_CLICKHOUSE_PASSWORD`.
    pub password: Secret,
    /// A cluster of the servers' `remote_servers` (empty: one server): `migrate` then
    /// creates the database and every table on each of its replicas (`ON CLUSTER`), as
    /// `Replicated*` tables replicated through ZooKeeper. Env:
    /// `TOKENTALLY_CLICKHOUSE_CLUSTER`.
    pub cluster: String,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            database: "tokentally".into(),
            user: "default".into(),
            password: Secret::default(),
            cluster: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A batch is written when it holds this many messages… (Every batch writes a part
    /// to the events table and to each rollup: 10,000 rather than 5,000 cut ClickHouse's
    /// CPU per 300k events by a third; docs/benchmarks.md.)
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
    /// A batch is also written once its messages hold this many bytes, so large
    /// messages cannot make a batch (and the process) grow without bound.
    /// Env: `TOKENTALLY_INGEST_BATCH_MAX_BYTES`.
    pub batch_max_bytes: usize,
    /// The group has uncommitted messages and this instance has not committed for this
    /// long: it reports itself stalled (metric, log, pipeline alert) and, if it holds no
    /// partitions, rejoins the group. Env: `TOKENTALLY_INGEST_STALL_SECS`.
    pub stall_secs: u64,
    /// Stored batches' offsets are committed to Kafka asynchronously, at most this often
    /// (milliseconds; 0: after every batch). A commit costs the broker a write; committing
    /// less often only means a crash replays a little more, which the idempotent writes
    /// absorb. Env: `TOKENTALLY_INGEST_COMMIT_INTERVAL_MS`.
    pub commit_interval_ms: u64,
    /// Off (0) by default. While a backlog is being read — at least this many messages
    /// are buffered or still unread in the partitions this instance reads, by the high
    /// watermarks of its last fetches — batches grow to this many messages (and
    /// `batch_max_bytes` grows in proportion). Every batch is a part in the events table
    /// and in each rollup, so larger batches cost ClickHouse less CPU per event: with
    /// 40,000, catching up on 300k events cost it 2.8–3.0 CPU s instead of 4.3–5.5.
    /// Near the end of a backlog and for live traffic, batches stay at
    /// `batch_max_messages`. The price is memory: a batch being written is held about
    /// three times over (message, decoded event, row), and the buffer then reads ahead
    /// one backlog batch; with 40,000, ingest's peak RSS was 190–233 MiB instead of
    /// 85–93 (docs/benchmarks.md). Env: `TOKENTALLY_INGEST_BACKLOG_BATCH_MAX_MESSAGES`.
    pub backlog_batch_max_messages: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            batch_max_messages: 10_000,
            batch_max_wait_ms: 1000,
            max_future_skew_secs: 300,
            dedupe_window_secs: 3600,
            metrics_listen: "127.0.0.1:9464".into(),
            max_backoff_ms: 10_000,
            batch_max_bytes: 8 * 1024 * 1024,
            stall_secs: 60,
            commit_interval_ms: 1000,
            backlog_batch_max_messages: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    #[error("config is invalid: {0}")]
    Invalid(String),
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
}

impl Config {
    /// Reads the file (if any), then applies `TOKENTALLY_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => Some(
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?,
            ),
            None => None,
        };
        let config = Self::from_sources(
            text.as_deref(),
            path.unwrap_or(Path::new("(environment)")),
            |name| std::env::var(name).ok(),
        )?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration of a file's `text` (none: defaults) with the variables `env`
    /// has laid over it (`config::env`: a function, so tests need not touch the process
    /// environment). Not validated.
    pub fn from_sources(
        text: Option<&str>,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let parse_error = |source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        };
        let mut table: toml::Table = match text {
            Some(t) => toml::from_str(t).map_err(parse_error)?,
            None => toml::Table::new(),
        };
        env::overlay(&mut table, env)?;
        toml::Value::Table(table).try_into().map_err(parse_error)
    }

    /// Checks what serde cannot: time zones, ids, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (value, setting) in [
            (self.ingest.batch_max_messages, "ingest.batch_max_messages"),
            (self.ingest.batch_max_bytes, "ingest.batch_max_bytes"),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{setting} (env TOKENTALLY_{}) must be a positive integer",
                    setting.replace('.', "_").to_uppercase()
                )));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for i in &self.institutions {
            if !seen.insert(i.id.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "institution `{}` is configured twice",
                    i.id
                )));
            }
            if i.time_zone.parse::<chrono_tz::Tz>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "institution `{}`: unknown time zone {:?} (use an IANA name such as \"Europe/Berlin\")",
                    i.id, i.time_zone
                )));
            }
            if i.contract_percent <= rust_decimal::Decimal::from(-100) {
                return Err(ConfigError::Invalid(format!(
                    "institution `{}`: contract_percent must be above -100",
                    i.id
                )));
            }
        }
        if self.billing.time_zone.parse::<chrono_tz::Tz>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "billing.time_zone: unknown time zone {:?} (use an IANA name such as \"Europe/Berlin\")",
                self.billing.time_zone
            )));
        }
        if !["none", "starttls", "tls"].contains(&self.alerts.email.security.as_str()) {
            return Err(ConfigError::Invalid(
                "alerts.email.security must be none, starttls or tls".into(),
            ));
        }
        for p in &self.web.trusted_proxies {
            if p.parse::<std::net::IpAddr>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "web.trusted_proxies: {p:?} is not an IP address"
                )));
            }
        }
        if self.web.max_range_days < 1 {
            return Err(ConfigError::Invalid(
                "web.max_range_days must be at least 1".into(),
            ));
        }
        for (name, u) in [
            ("openai", &self.gateway.openai),
            ("anthropic", &self.gateway.anthropic),
            ("gemini", &self.gateway.gemini),
        ] {
            if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "gateway.{name}.base_url {:?} must start with http:// or https://",
                    u.base_url
                )));
            }
        }
        if self.gateway.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "gateway.max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.billing.auto_issue_day > 28 {
            return Err(ConfigError::Invalid(
                "billing.auto_issue_day must be 0 (off) or 1-28".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(Some(text), Path::new("t.toml"), |n| {
            env.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn env_overrides_file_values() {
        let c = from(
            "[kafka]\nbrokers = \"file:9092\"\ntopic = \"t\"\n[clickhouse]\npassword = \"from-file\"\n",
            &[("TOKENTALLY_KAFKA_BROKERS", "env:9092"), ("TOKENTALLY_PRICES", "/p")],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "env:9092");
        assert_eq!(c.kafka.topic, "t");
        assert_eq!(c.kafka.group, "tokentally");
        assert_eq!(c.prices.path, PathBuf::from("/p"));
        assert_eq!(
            c.clickhouse.password.expose(),
            "from-file",
            "a secret in the file stays"
        );
        let c = from(
            "[prices]\npath = \"/f\"\n",
            &[
                ("TOKENTALLY_PRICES", "/alias"),
                ("TOKENTALLY_PRICES_PATH", "/own"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.prices.path,
            PathBuf::from("/own"),
            "a setting's own name wins over its alias"
        );
    }

    #[test]
    fn unknown_fields_and_bad_env_are_errors() {
        assert!(from("[kafka]\nbroker = \"x\"\n", &[]).is_err());
        let c = from("", &[("TOKENTALLY_INGEST_BATCH_MAX_MESSAGES", "0")]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("TOKENTALLY_INGEST_BATCH_MAX_MESSAGES"),
            "{err}"
        );
        let err = from("", &[("TOKENTALLY_INGEST_BATCH_MAX_BYTES", "lots")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TOKENTALLY_INGEST_BATCH_MAX_BYTES"), "{err}");
    }

    #[test]
    fn password_is_never_printed() {
        let mut c = Config::default();
        c.clickhouse.password = Secret::new("hunter2");
        c.alerts.webhook.secret = Secret::new("hunter3");
        c.alerts.email.password = Secret::new("hunter4");
        c.alerts.webhook.url = "https://hooks.slack.com/services/T0/B0/hunter5".into();
        c.web.clickhouse_password = Secret::new("hunter6");
        let shown = format!("{c:?}");
        for s in ["hunter2", "hunter3", "hunter4", "hunter5", "hunter6"] {
            assert!(!shown.contains(s), "{s} in {shown}");
        }
        assert!(shown.contains("hooks.slack.com"));
    }
}
