//! Benchmark baseline: a bare rdkafka consumer that reads a topic to its end and does
//! nothing with the messages. `scripts/bench` compares the full pipeline against it.
//!
//! usage: bare_consumer BROKERS TOPIC GROUP EXPECTED_MESSAGES

use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, brokers, topic, group, expected] = &args[..] else {
        eprintln!("usage: bare_consumer BROKERS TOPIC GROUP EXPECTED_MESSAGES");
        std::process::exit(2);
    };
    let expected: u64 = expected.parse().expect("EXPECTED_MESSAGES is a number");
    // The same client builder as ingest (brokers plus any `kafka.properties`).
    let kafka = tokentally::config::KafkaConfig {
        brokers: brokers.clone(),
        ..Default::default()
    };
    let mut config = tokentally::kafka::client_config(&kafka);
    // Fetching as ingest does (`fetch.wait.max.ms`, `fetch.max.bytes`, the queue cap).
    tokentally::kafka::fetch_settings(&mut config, &kafka);
    let consumer: StreamConsumer = config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut n = 0u64;
    let mut bytes = 0usize;
    let process_start = Instant::now();
    let mut start = None;
    while n < expected {
        match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
            Ok(Ok(m)) => {
                start.get_or_insert_with(Instant::now);
                bytes += m.payload().map_or(0, <[u8]>::len);
                n += 1;
            }
            Ok(Err(e)) => eprintln!("kafka error: {e}"),
            Err(_) => panic!("no message for 60 s after {n}"),
        }
    }
    let secs = start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let total = process_start.elapsed().as_secs_f64();
    println!("bare_consumer messages={n} bytes={bytes} seconds_from_first_message={secs:.3} seconds_from_start={total:.3}");
}
