//! What ingest watches besides messages: its own progress (reported to ClickHouse as a
//! heartbeat; a consumer that stops committing while the topic has lag is *stalled*: a
//! metric, a log line, the pipeline alert, and a rejoin when it holds nothing). The price
//! book on disk is watched by `price::watch`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::Config;
use crate::store::pipeline::InstanceRow;
use crate::store::Store;

/// How often an instance reports.
const BEAT_EVERY: Duration = Duration::from_secs(5);
/// How often the group's committed offsets are read for the stall check.
const LAG_CHECK: Duration = Duration::from_secs(5);
/// A consumer without partitions rejoins once the group has made no progress this long.
pub const REJOIN_AFTER: Duration = Duration::from_secs(15);

/// The group's committed offsets and lag (each summed over the partitions), read every
/// `LAG_CHECK` by a task of its own with one long-lived client: reading them on the
/// consumer loop held it up for the round trips, and a new client per read made the
/// broker look the group up again every time. Stops when the receiver is dropped.
fn watch_group(cfg: &Config) -> tokio::sync::watch::Receiver<Option<(i64, i64)>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (client, topic, group) = (
        crate::kafka::client_config(&cfg.kafka),
        cfg.kafka.topic.clone(),
        cfg.kafka.group.clone(),
    );
    tokio::spawn(async move {
        let mut reader: Option<Arc<crate::kafka::LagReader>> = None;
        while !tx.is_closed() {
            if reader.is_none() {
                match crate::kafka::LagReader::new(client.clone(), &group) {
                    Ok(r) => reader = Some(Arc::new(r)),
                    Err(e) => warn!(error = %e, "stall check: cannot create a Kafka client"),
                }
            }
            if let Some(r) = reader.clone() {
                let topic = topic.clone();
                match tokio::task::spawn_blocking(move || r.read(&topic)).await {
                    Ok(Ok(parts)) => {
                        let committed = parts.iter().map(|p| p.committed).sum();
                        let lag = parts.iter().map(|p| p.lag).sum();
                        let _ = tx.send(Some((committed, lag)));
                    }
                    Ok(Err(e)) => warn!(error = %e, "stall check: cannot read the group's offsets"),
                    Err(e) => warn!(error = %e, "stall check failed"),
                }
            }
            tokio::time::sleep(LAG_CHECK).await;
        }
    });
    rx
}

/// This instance's reports and its view of whether the group is stuck.
pub struct Heartbeat {
    store: Store,
    row: InstanceRow,
    beaten: Option<Instant>,
    group: tokio::sync::watch::Receiver<Option<(i64, i64)>>,
    /// The group's committed offsets (summed) at the last check, and since when.
    group_committed: Option<i64>,
    group_changed_at: Instant,
    group_lag: i64,
    rejoined: Option<Instant>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn now() -> u32 {
    chrono::Utc::now().timestamp().max(0) as u32
}

impl Heartbeat {
    pub fn new(cfg: &Config, store: Store) -> Self {
        let started = now();
        Self {
            store,
            row: InstanceRow {
                instance_id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
                host: hostname(),
                pid: std::process::id(),
                kafka_topic: cfg.kafka.topic.clone(),
                kafka_group: cfg.kafka.group.clone(),
                started_at: started,
                at: started,
                partitions: Vec::new(),
                last_commit_at: 0,
                lag: 0,
                price_book_version: String::new(),
                state: "running".into(),
                detail: String::new(),
            },
            beaten: None,
            group: watch_group(cfg),
            group_committed: None,
            group_changed_at: Instant::now(),
            group_lag: 0,
            rejoined: None,
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.row.instance_id
    }

    pub fn committed(&mut self) {
        self.row.last_commit_at = now();
    }

    /// Takes the group's latest committed offsets and notes when they last moved: the
    /// group makes progress if any instance commits.
    pub fn observe_group(&mut self) {
        let Some((committed, lag)) = *self.group.borrow_and_update() else {
            return;
        };
        self.group_lag = lag;
        if self.group_committed != Some(committed) {
            self.group_committed = Some(committed);
            self.group_changed_at = Instant::now();
        }
    }

    /// How long the group has had uncommitted messages without any instance committing.
    pub fn group_stuck_for(&self) -> Duration {
        if self.group_lag > 0 {
            self.group_changed_at.elapsed()
        } else {
            Duration::ZERO
        }
    }

    /// A consumer that holds no partitions while nobody in the group makes progress
    /// rejoins (at most every `REJOIN_AFTER`): a new member forces a rebalance, in which
    /// a broker drops members that stopped heartbeating (a crashed instance). A consumer
    /// that holds partitions and cannot write waits for the store instead.
    pub fn should_rejoin(&mut self, after: Duration) -> bool {
        if !self.row.partitions.is_empty()
            || self.group_stuck_for() < after
            || self.rejoined.is_some_and(|t| t.elapsed() < after)
        {
            return false;
        }
        self.rejoined = Some(Instant::now());
        true
    }

    pub async fn beat(
        &mut self,
        partitions: Vec<i32>,
        lag: i64,
        price_book_version: String,
        stalled: bool,
        writing: bool,
    ) {
        let state = if stalled { "stalled" } else { "running" };
        let changed = state != self.row.state;
        if changed && stalled {
            warn!(
                partitions = ?partitions,
                lag,
                last_commit_at = self.row.last_commit_at,
                writing,
                "ingest stalled: the group has uncommitted messages and this instance has not committed for a while"
            );
        } else if changed {
            info!("ingest progressing again");
        }
        self.row.partitions = partitions;
        self.row.lag = lag;
        self.row.price_book_version = price_book_version;
        self.row.state = state.into();
        self.row.detail = match (stalled, writing, self.row.partitions.is_empty()) {
            (false, _, _) => String::new(),
            (true, true, _) => "a batch write is being retried (is ClickHouse reachable?)".into(),
            (true, false, true) => "holds no partitions while the group is behind".into(),
            (true, false, false) => "holds partitions but receives no messages".into(),
        };
        if !changed && self.beaten.is_some_and(|t| t.elapsed() < BEAT_EVERY) {
            return;
        }
        self.beaten = Some(Instant::now());
        self.row.at = now();
        if let Err(e) = self.store.record_instance(&self.row).await {
            tracing::debug!(error = %e, "heartbeat not recorded");
        }
    }

    pub async fn stopped(&mut self) {
        self.row.state = "stopped".into();
        self.row.at = now();
        let _ = self.store.record_instance(&self.row).await;
    }
}
