//! Benchmark (not a test): how long an event takes from being published to being visible
//! in `report spend`, with a running `tokentally ingest` (started by `scripts/bench
//! freshness`) at its default settings.
//!
//! Publishes RATE messages per second for SECONDS seconds to the configured topic
//! (TOKENTALLY_* environment, as for ingest): `emit`'s traffic with today's timestamps,
//! and every 100 ms a probe event of the institution `fresh-probe` instead. All probes
//! share one key, so one partition holds them in order and the pipeline stores them in
//! that order: the k-th probe is visible once `report spend` (grouped by institution, the
//! command's own function) counts k events of `fresh-probe`. A poller asks every 50 ms;
//! the latency of a probe is the first answer that counts it minus the instant it was
//! handed to the producer. Prints p50/p90/p99/max over the probes.
//!
//!   cargo run --release --example freshness [-- RATE SECONDS]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokentally::config::Config;
use tokentally::emit::{EmitArgs, Generator};
use tokentally::report::{spend, GroupBy};
use tokentally::store::Store;

const PROBE_INSTITUTION: &str = "fresh-probe";
const PROBE_EVERY: Duration = Duration::from_millis(100);
const POLL_EVERY: Duration = Duration::from_millis(50);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rate = args.first().copied().unwrap_or(2000).max(10);
    let seconds = args.get(1).copied().unwrap_or(300).max(1);
    let cfg = Config::load(None)?;
    let topic = cfg.kafka.topic.clone();
    tokentally::kafka::ensure_topic(&cfg.kafka, &topic, 4, &[]).await?;
    let producer: FutureProducer = tokentally::kafka::client_config(&cfg.kafka)
        .set("linger.ms", "5")
        .create()?;
    let today = Utc::now().date_naive();
    let mut traffic = Generator::new(
        &EmitArgs {
            count: rate * seconds,
            rate,
            from: Some(today),
            to: Some(today),
            seed: 16,
            institutions: 8,
            duplicates: 0.0,
            malformed: 0.0,
            unknown_models: 0.0,
            partitions: 4,
        },
        Utc::now(),
    )?;

    // The poller: when each probe count was first seen.
    let store = Store::new(&cfg.clickhouse);
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (seen, stop) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_EVERY);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tick.tick().await;
                let Ok(rows) = spend(&store, today, today, GroupBy::Institution).await else {
                    continue;
                };
                let at = Instant::now();
                let visible = rows
                    .iter()
                    .find(|r| r.key == PROBE_INSTITUTION)
                    .map_or(0, |r| r.events.max(0) as usize);
                let mut seen = seen.lock().unwrap();
                while seen.len() < visible {
                    seen.push(at);
                }
            }
        })
    };

    let run = Utc::now().timestamp_millis();
    let started = Instant::now();
    let mut published = 0u64;
    let mut probes: Vec<Instant> = Vec::new();
    let mut next_probe = started;
    let end = started + Duration::from_secs(seconds);
    let mut last_report = started;
    while Instant::now() < end {
        let due = started + Duration::from_secs_f64(published as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let now = Instant::now();
        let (key, payload) = if now >= next_probe {
            next_probe += PROBE_EVERY;
            let mut v: serde_json::Value = serde_json::from_slice(&traffic.next_message().payload)?;
            v["institution_id"] = PROBE_INSTITUTION.into();
            v["event_id"] = format!("probe-{run}-{}", probes.len()).into();
            v["user_id"] = "probe@fresh-probe.example".into();
            v["api_key_id"] = "probe-key".into();
            v["occurred_at"] = Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                .into();
            probes.push(now);
            (PROBE_INSTITUTION.to_owned(), v.to_string().into_bytes())
        } else {
            let g = traffic.next_message();
            (g.key, g.payload)
        };
        loop {
            match producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload)) {
                Ok(_) => break,
                Err((e, _)) => {
                    eprintln!("producer queue full ({e}); waiting");
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        published += 1;
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let visible = seen.lock().unwrap().len();
            eprintln!(
                "freshness: {:>4.0} s, {published} published, probes {visible}/{} visible",
                started.elapsed().as_secs_f64(),
                probes.len()
            );
        }
    }
    let produce_secs = started.elapsed().as_secs_f64();
    producer.flush(Duration::from_secs(30))?;

    let wait_until = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < probes.len() && Instant::now() < wait_until {
        tokio::time::sleep(POLL_EVERY).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    poller.await?;
    let seen = seen.lock().unwrap().clone();
    let mut latencies: Vec<f64> = probes
        .iter()
        .zip(&seen)
        .map(|(sent, at)| at.saturating_duration_since(*sent).as_secs_f64())
        .collect();
    let missing = probes.len() - latencies.len();
    if latencies.is_empty() {
        anyhow::bail!("no probe became visible within 60 s");
    }
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| {
        latencies[((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1]
    };
    println!(
        "freshness published={published} seconds={produce_secs:.1} rate={:.0} probes={} missing={missing} p50={:.3} p90={:.3} p99={:.3} max={:.3}",
        published as f64 / produce_secs,
        probes.len(),
        q(0.50),
        q(0.90),
        q(0.99),
        q(1.0)
    );
    if missing > 0 {
        anyhow::bail!("{missing} probes never became visible within 60 s");
    }
    Ok(())
}
