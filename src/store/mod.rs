//! ClickHouse: connection, row types, migrations, idempotent writes and queries.

pub mod alerts;
pub mod billing;
pub mod bills;
pub mod invoices;
pub mod keys;
pub mod leases;
pub mod limits;
pub mod migrate;
pub mod people;
pub mod pipeline;
pub mod rows;
pub mod sql;
pub mod usage;
pub mod writer;

use crate::config::ClickHouseConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("{0}")]
    Migration(String),
    #[error("{0} earlier insert attempt(s) still run on the server after 5 minutes")]
    Unsettled(u64),
    /// A stored value that cannot be read as what it should be.
    #[error("stored data: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// A query the server cut off by its limits (time, rows, bytes, memory): the caller
    /// asked for too much, nothing is broken.
    pub fn cut_by_limits(&self) -> bool {
        let StoreError::ClickHouse(clickhouse::error::Error::BadResponse(msg)) = self else {
            return false;
        };
        // 159 timeout exceeded, 158 too many rows to read, 307 too many bytes, 241 memory.
        ["Code: 159", "Code: 158", "Code: 307", "Code: 241"]
            .iter()
            .any(|c| msg.contains(c))
    }

    /// Network trouble and server overload pass by themselves: retry as is. Anything else
    /// (a query the server refuses, a schema mismatch) will fail the same way again, so
    /// the caller must change something (ingest splits the batch) rather than retry blindly.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::ClickHouse(e) => match e {
                clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut => true,
                clickhouse::error::Error::BadResponse(msg) => {
                    // Too many parts / simultaneous queries / memory limit / timeouts /
                    // table is read-only for a moment / server shutting down.
                    [
                        "Code: 252",
                        "Code: 202",
                        "Code: 241",
                        "Code: 159",
                        "Code: 209",
                        "Code: 210",
                        "Code: 242",
                        "Code: 394",
                    ]
                    .iter()
                    .any(|c| msg.contains(c))
                        || !msg.contains("Code: ")
                }
                _ => false,
            },
            StoreError::Unsettled(_) => true,
            StoreError::Migration(_) | StoreError::Corrupt(_) => false,
        }
    }
}

/// A handle on tokentally's database.
#[derive(Clone)]
pub struct Store {
    client: clickhouse::Client,
    server: clickhouse::Client,
    database: String,
    /// Query ids of inserts whose outcome is unknown (see `writer`).
    pending_inserts: std::sync::Arc<std::sync::Mutex<Vec<(String, std::time::Instant)>>>,
}

impl Store {
    pub fn new(cfg: &ClickHouseConfig) -> Self {
        // Validation reads RowBinaryWithNamesAndTypes headers, which 18.16 can't send.
        let server = clickhouse::Client::default()
            .with_url(&cfg.url)
            .with_user(&cfg.user)
            .with_password(cfg.password.expose())
            .with_validation(false);
        let client = server.clone().with_database(&cfg.database);
        Self {
            client,
            server,
            database: cfg.database.clone(),
            pending_inserts: Default::default(),
        }
    }

    /// The dashboard's reader: the web user if one is configured (give it a read-only
    /// profile), every query cut off after `web.query_timeout_secs` and, if set, after
    /// `web.max_rows_to_read` rows.
    pub fn dashboard_reader(cfg: &crate::config::Config) -> Self {
        let mut ch = cfg.clickhouse.clone();
        if !cfg.web.clickhouse_user.is_empty() {
            ch.user = cfg.web.clickhouse_user.clone();
            ch.password = cfg.web.clickhouse_password.clone();
        }
        let mut store = Self::new(&ch);
        let mut limit = |name: &str, value: String| {
            store.client = store.client.clone().with_setting(name, value.clone());
            store.server = store.server.clone().with_setting(name, value);
        };
        limit(
            "max_execution_time",
            cfg.web.query_timeout_secs.max(1).to_string(),
        );
        if cfg.web.max_rows_to_read > 0 {
            limit("max_rows_to_read", cfg.web.max_rows_to_read.to_string());
        }
        store
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Runs a statement of the embedded schema (migrations): fixed text, no values.
    pub(crate) async fn execute(&self, sql: &str) -> Result<(), StoreError> {
        self.client.query(sql).execute().await.map_err(Into::into)
    }

    /// The value a setting has for this handle's queries (its limits, for instance).
    pub async fn effective_setting(&self, name: &str) -> Result<String, StoreError> {
        Ok(self
            .client
            .query("SELECT value FROM system.settings WHERE name = ?")
            .bind(name)
            .fetch_one()
            .await?)
    }

    /// Checks the server answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.server
            .query("SELECT 1")
            .execute()
            .await
            .map_err(Into::into)
    }
}
