//! The one door to Kafka: every client (ingest, emit, the invoice ledger, lag readings,
//! benchmarks) starts from `client_config`, so brokers, `kafka.properties` (SASL, TLS…)
//! and timeouts are set in one place. Topic creation and offset readings live here too.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;

/// How long one metadata, watermark or offset request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KafkaDoorError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("a Kafka call panicked or was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Brokers, the operator's extra properties, and nothing else: callers add what their
/// role needs (`group.id`, `acks`, …) on top.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// How ingest fetches; the benchmark's bare consumer fetches the same way, so that the
/// two are compared on equal terms. The operator's `kafka.properties` win.
///
/// - `fetch.wait.max.ms` 100 (librdkafka: 500): how long the broker may hold a fetch that
///   it cannot fill. The local broker (tansu) held every fetch that long while a partition
///   of the request had no new data, so a 300k backlog was read in 10.8k-message steps
///   every ~0.5 s: 13.6 s with 500, 9.6 s with 100. With any broker it is also how late
///   ingest learns that it has read everything (the end of a backlog, `EndOfBacklog`).
///   An idle consumer then sends 10 fetches a second instead of 2.
/// - `fetch.max.bytes` 16 MiB and `queued.max.messages.kbytes` (`kafka.queued_max_kbytes`,
///   the memory cap of the pre-fetch queue).
pub fn fetch_settings(c: &mut ClientConfig, cfg: &KafkaConfig) {
    let defaults = [
        ("fetch.wait.max.ms", "100".to_owned()),
        ("fetch.max.bytes", "16777216".to_owned()),
        (
            "queued.max.messages.kbytes",
            cfg.queued_max_kbytes.to_string(),
        ),
    ];
    for (key, value) in defaults {
        if !cfg.properties.contains_key(key) {
            c.set(key, value);
        }
    }
}

/// Creates `topic` if it does not exist (extra topic settings in `settings`).
/// Returns true if it was created now.
///
/// The topic is looked up first and created only if the broker does not know it: tansu
/// 0.6.0 leaves its storage transaction open when a create fails because the topic
/// exists, and every write of the broker (group heartbeats, produce) then waits —
/// measured: a consumer group stuck for minutes after `ingest` started on an existing
/// topic.
pub async fn ensure_topic(
    cfg: &KafkaConfig,
    topic: &str,
    partitions: i32,
    settings: &[(&str, &str)],
) -> Result<bool, KafkaDoorError> {
    if self::partitions(cfg, topic).await?.is_some() {
        return Ok(false);
    }
    let admin: AdminClient<_> = client_config(cfg).create()?;
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for (k, v) in settings {
        new = new.set(k, v);
    }
    let results = admin
        .create_topics(
            [&new],
            &AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT)),
        )
        .await?;
    let mut created = false;
    for r in results {
        match r {
            Ok(_) => {
                tracing::info!(topic, partitions, "topic created");
                created = true;
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(KafkaDoorError::CreateTopic { topic: t, code }),
        }
    }
    Ok(created)
}

/// The topic's partitions, or `None` if the broker does not know the topic.
pub async fn partitions(
    cfg: &KafkaConfig,
    topic: &str,
) -> Result<Option<Vec<i32>>, KafkaDoorError> {
    let client = client_config(cfg);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client.create()?;
        let md = consumer.fetch_metadata(Some(&topic), REQUEST_TIMEOUT)?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        Ok(match t {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                Some(t.partitions().iter().map(|p| p.id()).collect())
            }
            _ => None,
        })
    })
    .await?
}

/// One partition's offsets: the log's start and end, and what a group has committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// First offset still in the log.
    pub low: i64,
    /// Where the group resumes (the log start if it never committed).
    pub committed: i64,
    pub high: i64,
    pub lag: i64,
}

/// Committed offsets of `group` on `topic` against the partitions' ends.
pub async fn consumer_lag(
    cfg: &KafkaConfig,
    topic: &str,
    group: &str,
) -> Result<Vec<PartitionLag>, KafkaDoorError> {
    let client = client_config(cfg);
    let (topic, group) = (topic.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || lag_blocking(client, &topic, &group)).await?
}

fn lag_blocking(
    client: ClientConfig,
    topic: &str,
    group: &str,
) -> Result<Vec<PartitionLag>, KafkaDoorError> {
    LagReader::new(client, group)?.read(topic)
}

/// A client that reads a group's lag again and again (blocking calls: use it from a
/// blocking thread). One connection for every read, where `consumer_lag` opens a client
/// per call.
pub struct LagReader {
    consumer: BaseConsumer,
}

impl LagReader {
    pub fn new(mut client: ClientConfig, group: &str) -> Result<Self, KafkaDoorError> {
        Ok(Self {
            consumer: client
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .create()?,
        })
    }

    /// The group's committed offsets on `topic` against the partitions' ends.
    pub fn read(&self, topic: &str) -> Result<Vec<PartitionLag>, KafkaDoorError> {
        let consumer = &self.consumer;
        let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition(topic, *p);
        }
        let committed = consumer.committed_offsets(tpl, REQUEST_TIMEOUT)?;
        partitions
            .iter()
            .map(|&p| {
                let (low, high) = consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT)?;
                let committed = match committed.find_partition(topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => low,
                };
                Ok(PartitionLag {
                    partition: p,
                    low,
                    committed,
                    high,
                    lag: (high - committed).max(0),
                })
            })
            .collect()
    }
}

/// The end offset of every partition of `topic`.
pub async fn end_offsets(
    cfg: &KafkaConfig,
    topic: &str,
) -> Result<BTreeMap<i32, i64>, KafkaDoorError> {
    let client = client_config(cfg);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = client.create()?;
        let md = consumer.fetch_metadata(Some(&topic), REQUEST_TIMEOUT)?;
        let mut out = BTreeMap::new();
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                let (_, high) = consumer.fetch_watermarks(&topic, p.id(), REQUEST_TIMEOUT)?;
                out.insert(p.id(), high);
            }
        }
        Ok(out)
    })
    .await?
}

/// The high watermark of `partition` as librdkafka last saw it: a local read of what the
/// latest fetch response carried, no request to the broker (librdkafka's
/// `rd_kafka_get_watermark_offsets`; rust-rdkafka only wraps the querying variant, which
/// costs a round trip). `None` while unknown (nothing fetched yet).
pub fn cached_high_watermark<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &std::ffi::CStr,
    partition: i32,
) -> Option<i64> {
    let (mut low, mut high) = (-1_i64, -1_i64);
    // SAFETY: the client handle is alive for the borrow, `topic` is a NUL-terminated
    // string that outlives the call, and both out-pointers point to owned locals. The
    // call only reads librdkafka's cached partition state under its own lock.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_properties_reach_every_client() {
        let cfg = KafkaConfig {
            brokers: "k1:9092,k2:9092".into(),
            properties: [("security.protocol".to_owned(), "SASL_SSL".to_owned())].into(),
            ..KafkaConfig::default()
        };
        let c = client_config(&cfg);
        assert_eq!(c.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
    }
}
