//! Consumer lag per partition: the group's committed offsets against partition ends.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;

#[derive(Debug, Clone)]
pub struct PartitionLag {
    pub partition: i32,
    /// First offset still in the log.
    pub low: i64,
    pub committed: i64,
    pub high: i64,
    pub lag: i64,
}

pub async fn consumer_lag(cfg: &Config) -> Result<Vec<PartitionLag>, String> {
    let cfg = cfg.clone();
    tokio::task::spawn_blocking(move || lag_blocking(&cfg))
        .await
        .map_err(|e| e.to_string())?
}

fn lag_blocking(cfg: &Config) -> Result<Vec<PartitionLag>, String> {
    let timeout = Duration::from_secs(10);
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", &cfg.kafka.group)
        .set("enable.auto.commit", "false");
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    let consumer: BaseConsumer = c.create().map_err(|e| e.to_string())?;
    let topic = &cfg.kafka.topic;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| e.to_string())?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .map_err(|e| e.to_string())?;
    partitions
        .iter()
        .map(|&p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(|e| e.to_string())?;
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
