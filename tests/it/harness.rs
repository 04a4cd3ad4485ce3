//! Test harness: a fresh ClickHouse database and Kafka topic per test, the real
//! `tokentally` binary as a child process, and a price calculator that reads the
//! price book's TOML on its own (independent of `tokentally::price`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rust_decimal::Decimal;
use tokentally::config::Config;
use tokentally::store::Store;

pub fn clickhouse_url() -> String {
    std::env::var("TOKENTALLY_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

pub fn brokers() -> String {
    std::env::var("TOKENTALLY_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A child process that dies with the test: dropping it (a test that returns, or one that
/// panics and unwinds) kills it with SIGKILL if it still runs.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(c: &mut Command) -> Self {
        Proc(c.spawn().unwrap_or_else(|e| panic!("spawn {c:?}: {e}")))
    }
}

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One test's database, topic and consumer group.
pub struct TestEnv {
    pub name: String,
    pub cfg: Config,
    pub store: Store,
    pub prices: PathBuf,
    /// Batch size given to ingest (`None`: the default).
    pub batch_max_messages: Option<usize>,
    /// Dead-letter topic given to ingest (empty: none).
    pub dead_letter_topic: String,
    /// Extra TOML given to ingest as its config file (empty: none).
    pub config_toml: String,
}

impl TestEnv {
    pub async fn new(test: &str, partitions: i32) -> Self {
        Self::new_on(test, partitions, &clickhouse_url()).await
    }

    /// A fresh database on the ClickHouse server at `url` (and a fresh topic).
    pub async fn new_on(test: &str, partitions: i32, url: &str) -> Self {
        Self::new_with(test, partitions, url, None).await
    }

    /// A fresh database on the local two-replica cluster `tokentally`
    /// (`scripts/services start-cluster`), migrated on both replicas as replicated
    /// tables; this environment talks to replica r1 (`on` gives one for r2).
    pub async fn new_cluster(test: &str, partitions: i32) -> Self {
        services("start-cluster");
        Self::new_with(test, partitions, REPLICA_URLS[0], Some("tokentally")).await
    }

    /// The same database, topic and settings through another server (a replica).
    pub fn on(&self, url: &str) -> TestEnv {
        let mut cfg = self.cfg.clone();
        cfg.clickhouse.url = url.to_owned();
        TestEnv {
            name: self.name.clone(),
            store: Store::new(&cfg.clickhouse),
            cfg,
            prices: self.prices.clone(),
            batch_max_messages: self.batch_max_messages,
            dead_letter_topic: self.dead_letter_topic.clone(),
            config_toml: self.config_toml.clone(),
        }
    }

    async fn new_with(test: &str, partitions: i32, url: &str, cluster: Option<&str>) -> Self {
        let unique = format!(
            "{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 100_000_000
        );
        let name = format!("tt_{test}_{unique}");
        let mut cfg = Config::default();
        cfg.clickhouse.url = url.to_owned();
        cfg.clickhouse.database = name.clone();
        cfg.kafka.brokers = brokers();
        cfg.kafka.topic = format!("{name}.usage");
        cfg.kafka.group = format!("{name}.group");
        cfg.prices.path = repo().join("prices");
        cfg.clickhouse.cluster = cluster.unwrap_or_default().to_owned();
        let store = Store::new(&cfg.clickhouse);
        tokentally::store::migrate::migrate_on(&store, cluster)
            .await
            .expect("migrate a fresh database");
        tokentally::kafka::ensure_topic(&cfg.kafka, &cfg.kafka.topic, partitions, &[])
            .await
            .expect("create a fresh topic");
        let prices = cfg.prices.path.clone();
        Self {
            name,
            cfg,
            store,
            prices,
            batch_max_messages: None,
            dead_letter_topic: String::new(),
            config_toml: String::new(),
        }
    }

    /// Starts `tokentally ingest` as a child process with this test's settings and
    /// otherwise the default configuration (no shortened timeouts).
    pub fn spawn_ingest(&self) -> Proc {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tokentally"));
        if let Some(n) = self.batch_max_messages {
            c.env("TOKENTALLY_INGEST_BATCH_MAX_MESSAGES", n.to_string());
        }
        if !self.config_toml.is_empty() {
            let path = std::env::temp_dir().join(format!("{}.ingest.toml", self.name));
            std::fs::write(&path, &self.config_toml).unwrap();
            c.env("TOKENTALLY_CONFIG", path);
        }
        Proc::spawn(
            c.arg("ingest")
                .env("TOKENTALLY_KAFKA_BROKERS", &self.cfg.kafka.brokers)
                .env("TOKENTALLY_KAFKA_TOPIC", &self.cfg.kafka.topic)
                .env("TOKENTALLY_KAFKA_GROUP", &self.cfg.kafka.group)
                .env("TOKENTALLY_CLICKHOUSE_URL", &self.cfg.clickhouse.url)
                .env(
                    "TOKENTALLY_CLICKHOUSE_DATABASE",
                    &self.cfg.clickhouse.database,
                )
                .env("TOKENTALLY_PRICES", &self.prices)
                .env("TOKENTALLY_METRICS_LISTEN", "")
                .env(
                    "TOKENTALLY_KAFKA_DEAD_LETTER_TOPIC",
                    &self.dead_letter_topic,
                )
                .env("TOKENTALLY_LOG", "warn,tokentally=info")
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(self.log_path("ingest"))
                        .unwrap(),
                )),
        )
    }

    /// Where this test's child processes of `kind` write their log.
    pub fn log_path(&self, kind: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}.{kind}.log", self.name))
    }

    /// Environment for a `tokentally` command against this test's database, topic, group
    /// and invoice ledger.
    pub fn cli_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TOKENTALLY_CLICKHOUSE_URL", self.cfg.clickhouse.url.clone()),
            (
                "TOKENTALLY_CLICKHOUSE_DATABASE",
                self.cfg.clickhouse.database.clone(),
            ),
            ("TOKENTALLY_KAFKA_BROKERS", self.cfg.kafka.brokers.clone()),
            ("TOKENTALLY_KAFKA_TOPIC", self.cfg.kafka.topic.clone()),
            ("TOKENTALLY_KAFKA_GROUP", self.cfg.kafka.group.clone()),
            (
                "TOKENTALLY_BILLING_LEDGER_TOPIC",
                format!("{}.invoices", self.name),
            ),
            ("TOKENTALLY_PRICES", self.prices.display().to_string()),
        ]
    }

    pub async fn produce(&self, messages: &[(String, Vec<u8>)]) {
        self.produce_with(messages, &[]).await
    }

    /// Publishes with extra producer settings (e.g. a larger `message.max.bytes`).
    pub async fn produce_with(&self, messages: &[(String, Vec<u8>)], settings: &[(&str, &str)]) {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.cfg.kafka.brokers)
            .set("linger.ms", "10")
            .set("queue.buffering.max.messages", "1000000");
        for (k, v) in settings {
            config.set(*k, *v);
        }
        let producer: FutureProducer = config.create().unwrap();
        for chunk in messages.chunks(20_000) {
            let mut todo: Vec<&(String, Vec<u8>)> = chunk.iter().collect();
            // Right after a broker restart the topic may be unknown for a moment
            // (UnknownTopicOrPartition): such a message was not written, so send it again.
            for attempt in 0.. {
                // An empty key is sent as no key at all (a null key).
                let futures: Vec<_> = todo
                    .iter()
                    .map(|(k, p)| {
                        let record = FutureRecord::to(&self.cfg.kafka.topic).payload(p);
                        let record = if k.is_empty() { record } else { record.key(k) };
                        producer.send_result(record).expect("enqueue")
                    })
                    .collect();
                let mut failed = Vec::new();
                for (f, m) in futures.into_iter().zip(&todo) {
                    match f.await.expect("delivery future") {
                        Ok(_) => {}
                        Err((rdkafka::error::KafkaError::MessageProduction(code), _))
                            if attempt < 20
                                && code == rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition =>
                        {
                            failed.push(*m)
                        }
                        Err((e, _)) => panic!("message not delivered: {e}"),
                    }
                }
                if failed.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                todo = failed;
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
    }

    /// Reads `topic` from the start until `expected` messages arrived (or `timeout`).
    pub async fn consume_all(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> Vec<(Vec<u8>, Vec<(String, Vec<u8>)>)> {
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::{Headers, Message};
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.kafka.brokers)
            .set("group.id", format!("{}.reader", self.name))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        while out.len() < expected && start.elapsed() < timeout {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((m.payload().unwrap_or_default().to_vec(), headers));
            }
        }
        out
    }

    /// A ClickHouse client of its own on this test's database (the checks read the
    /// tables directly, independent of tokentally's store).
    pub fn ch(&self) -> clickhouse::Client {
        clickhouse::Client::default()
            .with_url(&self.cfg.clickhouse.url)
            .with_database(&self.cfg.clickhouse.database)
            .with_validation(false)
    }

    /// Runs a statement on this test's database.
    pub async fn exec(&self, sql: &str) -> Result<(), clickhouse::error::Error> {
        self.ch().query(sql).execute().await
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        self.ch()
            .query(sql)
            .fetch_one::<i64>()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Messages whose outcome is stored: events + rejections + duplicates + re-keyed.
    /// (A cancelled copy counts as its rejection: its event rows sum to zero.)
    pub async fn accounted(&self) -> i64 {
        self.scalar("SELECT toInt64(sum(sign)) FROM usage_events")
            .await
            + self
                .scalar("SELECT toInt64(count()) FROM rejected_events")
                .await
            + self
                .scalar("SELECT toInt64(count()) FROM duplicate_events")
                .await
            + self
                .scalar("SELECT toInt64(count()) FROM rekeyed_events")
                .await
    }

    /// Messages in this test's topic: the sum of its partitions' high watermarks
    /// (what the test published and what ingest published again), read with `client`.
    pub async fn topic_messages(
        &self,
        client: &std::sync::Arc<rdkafka::consumer::BaseConsumer>,
    ) -> i64 {
        use rdkafka::consumer::Consumer;
        let (consumer, topic) = (client.clone(), self.cfg.kafka.topic.clone());
        tokio::task::spawn_blocking(move || {
            let md = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(60))
                .unwrap();
            md.topics()[0]
                .partitions()
                .iter()
                .map(|p| {
                    consumer
                        .fetch_watermarks(&topic, p.id(), Duration::from_secs(60))
                        .unwrap()
                        .1
                })
                .sum()
        })
        .await
        .unwrap()
    }

    /// Waits until every message in the topic (those published again by ingest too) has
    /// its outcome stored, and stays so for two seconds.
    pub async fn wait_all_accounted(&self, timeout: Duration) -> i64 {
        let start = Instant::now();
        let mut settled_since: Option<Instant> = None;
        let client: std::sync::Arc<rdkafka::consumer::BaseConsumer> = std::sync::Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &self.cfg.kafka.brokers)
                .create()
                .unwrap(),
        );
        loop {
            let (n, total) = (self.accounted().await, self.topic_messages(&client).await);
            assert!(
                n <= total,
                "{n} messages accounted for, more than the {total} in the topic"
            );
            if n == total {
                let since = *settled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_secs(2) {
                    return n;
                }
            } else {
                settled_since = None;
            }
            assert!(
                start.elapsed() < timeout,
                "only {n} of {total} messages accounted for after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub async fn wait_accounted(&self, expected: i64, timeout: Duration) {
        let start = Instant::now();
        loop {
            let n = self.accounted().await;
            if n == expected {
                return;
            }
            assert!(
                n < expected,
                "{n} messages accounted for, more than the {expected} produced"
            );
            assert!(
                start.elapsed() < timeout,
                "only {n} of {expected} messages accounted for after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Per-institution exact cost from the raw events and from the hourly rollup.
    pub async fn costs(&self) -> (BTreeMap<String, Decimal>, BTreeMap<String, Decimal>) {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct R {
            institution_id: String,
            cost: String,
        }
        let mut out = Vec::new();
        for table in ["SELECT institution_id, toString(sum(cost * sign)) AS cost FROM usage_events GROUP BY institution_id",
                      "SELECT institution_id, toString(sum(cost)) AS cost FROM usage_hourly_institution GROUP BY institution_id"] {
            let rows: Vec<R> = self.ch().query(table).fetch_all().await.unwrap();
            out.push(rows.into_iter().map(|r| (r.institution_id, r.cost.parse::<Decimal>().unwrap().normalize())).collect());
        }
        let rollup = out.pop().unwrap();
        (out.pop().unwrap(), rollup)
    }

    /// Events and exact cost per institution: from raw events (`None`) or one rollup.
    pub async fn totals(&self, rollup: Option<&str>) -> BTreeMap<String, (i64, Decimal)> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct R {
            institution_id: String,
            events: i64,
            cost: String,
        }
        let query = match rollup {
            None => "SELECT institution_id, toInt64(sum(sign)) AS events, toString(sum(cost * sign)) AS cost FROM usage_events GROUP BY institution_id".to_owned(),
            Some(t) => format!("SELECT institution_id, toInt64(sum(events)) AS events, toString(sum(cost)) AS cost FROM {t} GROUP BY institution_id"),
        };
        let rows: Vec<R> = self.ch().query(&query).fetch_all().await.unwrap();
        rows.into_iter()
            .filter(|r| r.events != 0)
            .map(|r| {
                (
                    r.institution_id,
                    (r.events, r.cost.parse::<Decimal>().unwrap().normalize()),
                )
            })
            .collect()
    }

    /// Asserts that every rollup holds the raw events' events and cost per institution.
    pub async fn assert_rollups_match_events(&self) {
        let raw = self.totals(None).await;
        assert!(!raw.is_empty(), "no events stored");
        for table in ROLLUPS {
            assert_eq!(
                self.totals(Some(table)).await,
                raw,
                "{table} vs usage_events"
            );
        }
    }

    pub async fn drop_database(&self) {
        let _ = self
            .exec(&format!("DROP DATABASE IF EXISTS `{}`", self.name))
            .await;
    }
}

/// Every rollup that sums all events (schema/; the tag rollup sums tagged ones only).
pub const ROLLUPS: [&str; 8] = [
    "usage_hourly_model",
    "usage_hourly_institution",
    "usage_daily_model",
    "usage_daily_user",
    "usage_daily_key",
    "usage_daily_user_model",
    "usage_person_15m",
    "usage_billing_15m",
];

/// A stored event with neutral values (priced, no tokens, cost 0, sign +1), for tests
/// that write rows around the pipeline; set what matters with `..event_row(...)`.
pub fn event_row(
    id: impl Into<String>,
    inst: &str,
    at: chrono::DateTime<chrono::Utc>,
    model: &str,
) -> tokentally::store::rows::EventRow {
    tokentally::store::rows::EventRow {
        event_id: id.into(),
        occurred_at: at.timestamp() as u32,
        occurred_ms: 0,
        institution_id: inst.into(),
        user_id: String::new(),
        api_key_id: String::new(),
        provider: "openai".into(),
        model: model.into(),
        endpoint: String::new(),
        service_tier: String::new(),
        status: "ok".into(),
        latency_ms: 0,
        tag_keys: vec![],
        tag_values: vec![],
        input_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 0,
        reasoning_tokens: 0,
        priced: 1,
        cost: Decimal::ZERO,
        price_id: String::new(),
        price_model: model.into(),
        price_tier: 0,
        kafka_topic: "t".into(),
        kafka_partition: 0,
        kafka_offset: 0,
        ingested_at: at.timestamp() as u32,
        version: 0,
        sign: 1,
        usage_estimated: 0,
        billing: String::new(),
    }
}

/// Runs the `tokentally` binary to completion.
pub fn tokentally_output(
    args: &[&str],
    env: &[(&str, String)],
    stdin: Option<&str>,
) -> std::process::Output {
    use std::io::Write;
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokentally"));
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs the `tokentally` binary, asserts success, returns its trimmed standard output.
pub fn tokentally(args: &[&str], env: &[(&str, String)], stdin: Option<&str>) -> String {
    let out = tokentally_output(args, env, stdin);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Kills with SIGKILL: no shutdown handler runs.
pub fn kill9(child: &mut Child) {
    unsafe_kill(child.id(), 9);
    let _ = child.wait();
}

/// Asks for a graceful stop (SIGTERM) and waits for the exit status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    unsafe_kill(child.id(), 15);
    child.wait().unwrap()
}

fn unsafe_kill(pid: u32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success() || signal == 9);
}

/// Per-Mtok rates read straight from the price book's TOML (not through tokentally).
#[derive(Debug, Clone)]
pub struct ListPrice {
    pub input: Decimal,
    pub cache_read: Decimal,
    pub cache_write: Decimal,
    pub output: Decimal,
}

impl ListPrice {
    /// Cost of canonical token counts, computed the plain way.
    pub fn cost(&self, input: u64, cache_read: u64, cache_write: u64, output: u64) -> Decimal {
        (Decimal::from(input) * self.input
            + Decimal::from(cache_read) * self.cache_read
            + Decimal::from(cache_write) * self.cache_write
            + Decimal::from(output) * self.output)
            / Decimal::from(1_000_000)
    }
}

/// The tier-less entry that lists `model` in its `match`; the test only uses models
/// with exactly one such entry and no long-context tier, so there is no precedence to decide.
pub fn list_price(prices: &Path, model: &str) -> ListPrice {
    let mut found = Vec::new();
    for file in std::fs::read_dir(prices).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let doc: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for e in doc
            .get("price")
            .and_then(|p| p.as_array())
            .cloned()
            .unwrap_or_default()
        {
            let matches = e
                .get("match")
                .and_then(|m| m.as_array())
                .is_some_and(|m| m.iter().any(|v| v.as_str() == Some(model)));
            if matches && e.get("service_tier").is_none() {
                found.push(e);
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "test models need exactly one tier-less entry: {model}"
    );
    let e = &found[0];
    assert!(
        e.get("tier").is_none()
            && e.get("reasoning_per_mtok").is_none()
            && e.get("per_request").is_none()
    );
    let rate = |k: &str| {
        e.get(k)
            .and_then(|v| v.as_str())
            .map(|s| s.parse::<Decimal>().unwrap())
    };
    let input = rate("input_per_mtok").unwrap();
    ListPrice {
        input,
        cache_read: rate("cache_read_per_mtok").unwrap_or(input),
        cache_write: rate("cache_write_per_mtok").unwrap_or(input),
        output: rate("output_per_mtok").unwrap(),
    }
}

/// Deletes a topic as an operator would (Kafka's DeleteTopics request).
pub async fn delete_topic(cfg: &tokentally::config::KafkaConfig, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<_> = tokentally::kafka::client_config(cfg).create().unwrap();
    let res = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap();
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("deleting {t}: {e}"));
    }
    let started = Instant::now();
    while tokentally::kafka::partitions(cfg, topic)
        .await
        .unwrap()
        .is_some()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{topic} still exists"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Peak resident memory of a running process, in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A running `tokentally serve` for one test: its own users file and config, port 0
/// (read back from its log), killed when dropped — also when the test panics.
pub struct Serve {
    pub proc: Proc,
    pub base: String,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Starts `serve` for `env` with `config` (TOML) and extra environment, waits until it
/// answers, and returns it. Users and tokens can be added before with `serve_vars`.
pub async fn spawn_serve(env: &TestEnv, config: &str, extra: &[(&'static str, String)]) -> Serve {
    spawn_serve_in(env, tempfile::tempdir().unwrap(), config, extra).await
}

/// As `spawn_serve`, in a folder prepared with `serve_vars` (users added beforehand).
pub async fn spawn_serve_in(
    env: &TestEnv,
    dir: tempfile::TempDir,
    config: &str,
    extra: &[(&'static str, String)],
) -> Serve {
    let vars = serve_vars(env, &dir, config, extra);
    let log = env.log_path(&format!(
        "serve-{}",
        dir.path().file_name().unwrap().to_string_lossy()
    ));
    let (proc, port) = spawn_listening(&["serve"], &vars, &log, "dashboard listening").await;
    let started = Instant::now();
    let base = format!("http://127.0.0.1:{port}");
    let http = crate::web::client();
    while http.get(format!("{base}/login")).send().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve does not answer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Serve {
        proc,
        base,
        log,
        dir,
    }
}

/// The environment `spawn_serve` uses, so users and tokens can be created first: the
/// test's database, topic and ledger, a users file and config file in `dir`, port 0.
pub fn serve_vars(
    env: &TestEnv,
    dir: &tempfile::TempDir,
    config: &str,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let config_path = dir.path().join("config.toml");
    if !config_path.exists() {
        std::fs::write(&config_path, config).unwrap();
    }
    let mut vars = env.cli_vars();
    vars.extend([
        (
            "TOKENTALLY_USERS_FILE",
            dir.path().join("users.toml").display().to_string(),
        ),
        ("TOKENTALLY_CONFIG", config_path.display().to_string()),
        ("TOKENTALLY_WEB_LISTEN", "127.0.0.1:0".to_owned()),
    ]);
    vars.extend(extra.iter().cloned());
    // The harness reads the bound port from the "dashboard listening" line.
    let level = vars
        .iter()
        .rev()
        .find(|(k, _)| *k == "TOKENTALLY_LOG")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "info,rdkafka=warn".into());
    vars.push(("TOKENTALLY_LOG", format!("{level},tokentally::app=info")));
    vars
}

/// The port in a "… listening listen=HOST:PORT …" log line.
fn listening_port(log: &str, marker: &str) -> Option<u16> {
    log.lines().filter(|l| l.contains(marker)).find_map(|l| {
        let at = l.find("listen=")? + "listen=".len();
        let addr = l[at..].split_whitespace().next()?;
        addr.rsplit(':').next()?.parse().ok()
    })
}

/// Starts the `tokentally` binary with `args` and `vars` (stderr to `log`) and waits for
/// its `marker … listen=ADDR` line; returns the process (killed on drop) and the port.
pub async fn spawn_listening(
    args: &[&str],
    vars: &[(&'static str, String)],
    log: &Path,
    marker: &str,
) -> (Proc, u16) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tokentally"));
    c.args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in vars {
        c.env(k, v);
    }
    let mut proc = Proc::spawn(&mut c);
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(port) = listening_port(&text, marker) {
            return (proc, port);
        }
        if let Ok(Some(status)) = proc.try_wait() {
            panic!("{args:?} exited with {status}: {text}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{args:?} did not start: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The provider simulator (`tokentally simulate`) on a port of its own.
pub struct Simulator {
    /// Killed with the test.
    pub _proc: Proc,
    pub base: String,
}

/// The platform's provider keys the gateway tests configure (the simulator accepts only
/// these and the institutions' own keys the tests set).
pub const PLATFORM_KEYS: [(&str, &str); 3] = [
    ("OPENAI", "sk-platform-openai-0c5e1f"),
    ("ANTHROPIC", "sk-ant-platform-77d1a0"),
    ("GEMINI", "gem-platform-5b2e9c"),
];

pub async fn spawn_simulator(env: &TestEnv, extra_keys: &[&str]) -> Simulator {
    let keys: Vec<&str> = PLATFORM_KEYS
        .iter()
        .map(|(_, k)| *k)
        .chain(extra_keys.iter().copied())
        .collect();
    let (proc, port) = spawn_listening(
        &["simulate", "--listen", "127.0.0.1:0"],
        &[
            ("TOKENTALLY_SIMULATOR_KEYS", keys.join(",")),
            ("TOKENTALLY_PRICES", env.prices.display().to_string()),
            // One day per report page: every report fetched in the tests follows
            // `next_page`.
            ("TOKENTALLY_SIMULATOR_REPORT_PAGE_DAYS", "1".into()),
            ("TOKENTALLY_LOG", "info".into()),
        ],
        &env.log_path(&format!("simulator-{}", extra_keys.len())),
        "simulator listening",
    )
    .await;
    Simulator {
        _proc: proc,
        base: format!("http://127.0.0.1:{port}"),
    }
}

/// A master key for the gateways of one test (every instance needs the same).
pub const TEST_MASTER_KEY: &str =
    "5e1f0c0ffee0ddba11ab1e5eedcafe0badc0de0123456789abcdef0123456789";

/// A running gateway.
pub struct Gateway {
    pub proc: Proc,
    pub base: String,
    pub log: PathBuf,
    pub vars: Vec<(&'static str, String)>,
}

impl TestEnv {
    /// The environment of a gateway of this test: its topic and database, the simulator
    /// as every provider, the platform keys, a spool in `dir`, port 0.
    pub fn gateway_vars(&self, sim: &Simulator, dir: &Path) -> Vec<(&'static str, String)> {
        let mut vars = self.cli_vars();
        for (p, k) in PLATFORM_KEYS {
            let (key_var, base_var) = match p {
                "OPENAI" => (
                    "TOKENTALLY_GATEWAY_OPENAI_API_KEY",
                    "TOKENTALLY_GATEWAY_OPENAI_BASE_URL",
                ),
                "ANTHROPIC" => (
                    "TOKENTALLY_GATEWAY_ANTHROPIC_API_KEY",
                    "TOKENTALLY_GATEWAY_ANTHROPIC_BASE_URL",
                ),
                _ => (
                    "TOKENTALLY_GATEWAY_GEMINI_API_KEY",
                    "TOKENTALLY_GATEWAY_GEMINI_BASE_URL",
                ),
            };
            vars.push((key_var, k.to_owned()));
            vars.push((base_var, sim.base.clone()));
        }
        vars.extend([
            ("TOKENTALLY_GATEWAY_MASTER_KEY", TEST_MASTER_KEY.to_owned()),
            ("TOKENTALLY_GATEWAY_LISTEN", "127.0.0.1:0".to_owned()),
            ("TOKENTALLY_GATEWAY_METRICS_LISTEN", String::new()),
            (
                "TOKENTALLY_GATEWAY_SPOOL_DIR",
                dir.join("spool").display().to_string(),
            ),
            ("TOKENTALLY_LOG", "info,rdkafka=warn".to_owned()),
        ]);
        vars
    }
}

/// Starts a gateway with `vars` (from `gateway_vars`, plus overrides appended).
pub async fn spawn_gateway(
    env: &TestEnv,
    name: &str,
    vars: Vec<(&'static str, String)>,
) -> Gateway {
    let log = env.log_path(&format!("gateway-{name}"));
    let (proc, port) = spawn_listening(&["gateway"], &vars, &log, "gateway listening").await;
    let base = format!("http://127.0.0.1:{port}");
    Gateway {
        proc,
        base,
        log,
        vars,
    }
}

/// The Python with the official SDKs (`scripts/services install-test-tools` makes it).
pub fn python() -> PathBuf {
    std::env::var_os("TT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".data/venv/bin/python"))
}

/// Runs `tests/py/sdk.py` against `base` with `key` and the `calls`; returns its results.
pub fn sdk_calls(base: &str, key: &str, calls: &serde_json::Value) -> Vec<serde_json::Value> {
    sdk_calls_with(base, key, calls, &[])
}

/// `sdk_calls` with variables in sdk.py's environment (`SDK_STOP_AFTER_REFUSED`).
pub fn sdk_calls_with(
    base: &str,
    key: &str,
    calls: &serde_json::Value,
    vars: &[(&str, &str)],
) -> Vec<serde_json::Value> {
    use std::io::Write;
    let py = python();
    assert!(
        py.exists(),
        "{} is missing: run scripts/services install-test-tools",
        py.display()
    );
    let mut child = Command::new(&py)
        .arg(repo().join("tests/py/sdk.py"))
        .arg(base)
        .arg(key)
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(calls.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sdk.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "sdk.py output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `scripts/services` (the test suite's servers are started by it); `cmd` is split
/// at spaces (`kill-replica 2`).
pub fn services(cmd: &str) {
    let status = Command::new(repo().join("scripts/services"))
        .args(cmd.split_whitespace())
        .status()
        .expect("run scripts/services");
    assert!(status.success(), "scripts/services {cmd} failed");
}

/// The local cluster's replicas r1 and r2 (`scripts/services start-cluster`).
pub const REPLICA_URLS: [&str; 2] = ["http://127.0.0.1:8131", "http://127.0.0.1:8132"];

/// A Redis server of one test's own (the shared limit store), on a free port: the test
/// can kill it and start it again. Killed when dropped.
pub struct Redis {
    pub proc: Option<Proc>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, with empty state: nothing is persisted).
    pub async fn start(&mut self) {
        let mut c = Command::new("redis-server");
        c.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ])
        .arg(self.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        self.proc = Some(Proc::spawn(&mut c));
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not start (scripts/services installs it)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it with SIGKILL: the gateways lose the store mid-request.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            kill9(&mut p);
        }
    }
}

pub async fn spawn_redis() -> Redis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut r = Redis {
        proc: None,
        port,
        dir: tempfile::tempdir().unwrap(),
    };
    r.start().await;
    r
}
