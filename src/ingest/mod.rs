//! Kafka → ClickHouse: the consumer loop, the batch pipeline (decoding by `contract`),
//! dead letters.

pub mod consumer;
pub mod metrics;
pub mod pipeline;
pub mod watch;

pub use consumer::run;
