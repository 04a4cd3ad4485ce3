//! Kafka → ClickHouse: the consumer loop, the batch pipeline (decoding by `contract`),
//! dead letters. Assembled and started by `app::ingest`.

pub mod consumer;
pub mod metrics;
pub mod pipeline;
pub mod watch;
