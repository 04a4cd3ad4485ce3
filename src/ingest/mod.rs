//! Kafka → ClickHouse: the consumer loop, decoding and validation, dead letters.

pub mod consumer;
pub mod decode;
pub mod metrics;
pub mod normalize;
pub mod pipeline;
pub mod watch;

pub use consumer::run;
