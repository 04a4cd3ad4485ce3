//! `emit`: synthetic gateway traffic for demos, tests and benchmarks.
//!
//! Seeded, so the same arguments publish the same messages. Institutions differ in
//! size (Zipf-like), users in activity, models in popularity; token counts are
//! log-normal; traffic follows office hours and weekdays; usage objects come in the
//! canonical shape and in each provider's own shape.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};
use clap::Args;
use rand::distributions::{Distribution, WeightedIndex};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::LogNormal;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Value};

use crate::config::Config;

#[derive(Args, Debug, Clone)]
pub struct EmitArgs {
    /// Number of events to generate (duplicates and malformed messages come on top).
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Messages per second; 0 publishes as fast as the broker takes them.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// First day of event timestamps (UTC, YYYY-MM-DD; default: 30 days ago).
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last day of event timestamps, inclusive (default: today; never later than now).
    #[arg(long)]
    pub to: Option<NaiveDate>,
    /// Random seed: the same seed and arguments publish the same messages.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of institutions.
    #[arg(long, default_value_t = 8)]
    pub institutions: usize,
    /// Probability that a message republishes an earlier event (same event_id).
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Probability that a message is malformed (and must be rejected).
    #[arg(long, default_value_t = 0.0)]
    pub malformed: f64,
    /// Probability that an event uses a model the price book does not know.
    #[arg(long, default_value_t = 0.0)]
    pub unknown_models: f64,
    /// Partitions of the topic if emit has to create it.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
}

const INSTITUTIONS: [&str; 16] = [
    "uni-oslo",
    "eth-zurich",
    "tu-delft",
    "kth",
    "uni-helsinki",
    "acme-corp",
    "globex",
    "initech",
    "uni-bergen",
    "epfl",
    "dtu",
    "uni-vienna",
    "umbrella-labs",
    "hooli",
    "tu-munich",
    "uni-lund",
];

/// (provider, model, weight, reasoning model, long-context capable)
const MODELS: [(&str, &str, u32, bool, bool); 12] = [
    ("openai", "gpt-4o-mini", 25, false, false),
    ("openai", "gpt-4.1-mini", 10, false, false),
    ("openai", "gpt-4o-2024-08-06", 8, false, false),
    ("openai", "gpt-5-mini", 10, true, false),
    ("openai", "gpt-5", 5, true, false),
    ("openai", "o4-mini", 4, true, false),
    ("anthropic", "claude-sonnet-4-5-20250929", 12, false, true),
    ("anthropic", "claude-haiku-4-5", 8, false, false),
    ("anthropic", "claude-opus-4-1", 2, false, false),
    ("gemini", "gemini-2.5-flash", 10, true, false),
    ("gemini", "gemini-2.5-pro", 5, true, true),
    ("gemini", "gemini-2.0-flash", 4, false, false),
];

/// Relative traffic of an hour: office hours on weekdays are busiest.
fn seasonality(t: DateTime<Utc>) -> f64 {
    let hour = t.hour();
    let hour_w = if (8..18).contains(&hour) {
        1.0
    } else if (6..22).contains(&hour) {
        0.4
    } else {
        0.1
    };
    let day_w = if t.weekday().number_from_monday() >= 6 {
        0.3
    } else {
        1.0
    };
    hour_w * day_w
}

const UNKNOWN_MODELS: [(&str, &str); 2] = [
    ("mistral", "mistral-large-2411"),
    ("openai", "gpt-9-preview"),
];

/// One generated message and what it is.
#[derive(Debug, Clone)]
pub struct Generated {
    pub key: String,
    pub payload: Vec<u8>,
    pub kind: Kind,
    pub institution: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Event,
    Duplicate,
    Malformed,
}

struct Institution {
    id: String,
    users: Vec<(String, Vec<String>)>,
    user_weights: WeightedIndex<f64>,
}

/// A seeded generator of gateway messages.
pub struct Generator {
    rng: ChaCha8Rng,
    institutions: Vec<Institution>,
    inst_weights: WeightedIndex<f64>,
    model_weights: WeightedIndex<u32>,
    from: i64,
    span: i64,
    recent: Vec<(String, Vec<u8>)>,
    args: EmitArgs,
    seq: u64,
    /// Hour starts of the range and, per hour, the cumulative number of events due by
    /// its end: events come out in time order, as from a live gateway.
    schedule: Vec<(i64, u64)>,
    slot: usize,
}

impl Generator {
    pub fn new(args: &EmitArgs, now: DateTime<Utc>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            args.institutions >= 1 && args.institutions <= INSTITUTIONS.len(),
            "--institutions must be between 1 and {}",
            INSTITUTIONS.len()
        );
        for (name, p) in [
            ("--duplicates", args.duplicates),
            ("--malformed", args.malformed),
            ("--unknown-models", args.unknown_models),
        ] {
            anyhow::ensure!(
                (0.0..=1.0).contains(&p),
                "{name} must be a probability between 0 and 1"
            );
        }
        let to = args.to.unwrap_or(now.date_naive());
        let from = args.from.unwrap_or(to - chrono::Duration::days(29));
        anyhow::ensure!(from <= to, "--from must not be after --to");
        let start = from
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc()
            .timestamp();
        let end = (to
            .and_hms_opt(23, 59, 59)
            .expect("valid")
            .and_utc()
            .timestamp())
        .min(now.timestamp());
        anyhow::ensure!(end > start, "the time range must end before now");

        let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
        let institutions: Vec<Institution> = INSTITUTIONS[..args.institutions]
            .iter()
            .enumerate()
            .map(|(rank, id)| {
                let n_users = (120.0 / (rank as f64 + 1.0)).ceil() as usize + 3;
                let users: Vec<(String, Vec<String>)> = (0..n_users)
                    .map(|u| {
                        let keys = (0..rng.gen_range(1..=2))
                            .map(|_| format!("pk_{:06x}", rng.gen::<u32>() & 0xff_ffff))
                            .collect();
                        (format!("user{u:03}@{id}.example"), keys)
                    })
                    .collect();
                let user_weights = WeightedIndex::new((0..n_users).map(|u| 1.0 / (u as f64 + 1.0)))
                    .expect("weights");
                Institution {
                    id: (*id).to_owned(),
                    users,
                    user_weights,
                }
            })
            .collect();
        let mut hours = Vec::new();
        let mut h = start / 3600 * 3600;
        while h <= end {
            hours.push(h);
            h += 3600;
        }
        let weights: Vec<f64> = hours
            .iter()
            .map(|&h| seasonality(Utc.timestamp_opt(h, 0).unwrap()))
            .collect();
        let total_w: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let schedule = hours
            .iter()
            .zip(&weights)
            .map(|(&h, w)| {
                acc += w;
                (h, (args.count as f64 * acc / total_w).round() as u64)
            })
            .collect();
        let inst_weights =
            WeightedIndex::new((0..institutions.len()).map(|r| 1.0 / (r as f64 + 1.0).powf(1.1)))
                .expect("weights");
        Ok(Self {
            rng,
            institutions,
            inst_weights,
            model_weights: WeightedIndex::new(MODELS.iter().map(|m| m.2)).expect("weights"),
            from: start,
            span: end - start,
            recent: Vec::new(),
            args: args.clone(),
            seq: 0,
            schedule,
            slot: 0,
        })
    }

    /// The next event's timestamp: within the hour whose quota it falls in. Past the
    /// schedule (an open-ended generator), uniform over the range.
    fn timestamp(&mut self) -> DateTime<Utc> {
        let n = self.seq;
        while self.slot < self.schedule.len() && self.schedule[self.slot].1 <= n {
            self.slot += 1;
        }
        let ms = self.rng.gen_range(0..1000) * 1_000_000;
        let secs = match self.schedule.get(self.slot) {
            Some(&(hour, _)) => {
                (hour + self.rng.gen_range(0..3600)).clamp(self.from, self.from + self.span)
            }
            None => self.from + self.rng.gen_range(0..=self.span),
        };
        Utc.timestamp_opt(secs, ms).unwrap()
    }

    fn tokens(&mut self, median: f64, sigma: f64) -> u64 {
        let d = LogNormal::new(median.ln(), sigma).expect("valid log-normal");
        (d.sample(&mut self.rng).round() as u64).clamp(1, 900_000)
    }

    fn event(&mut self) -> (String, Value) {
        let inst = &self.institutions[self.inst_weights.sample(&mut self.rng)];
        let (user, keys) = &inst.users[inst.user_weights.sample(&mut self.rng)];
        let key = keys[self.rng.gen_range(0..keys.len())].clone();
        let (inst_id, user) = (inst.id.clone(), user.clone());
        let (mut provider, mut model, _, reasoning_model, long_ctx) =
            MODELS[self.model_weights.sample(&mut self.rng)];
        if self.rng.gen::<f64>() < self.args.unknown_models {
            (provider, model) = UNKNOWN_MODELS[self.rng.gen_range(0..UNKNOWN_MODELS.len())];
        }
        let mut prompt = self.tokens(1500.0, 1.2);
        if long_ctx && self.rng.gen::<f64>() < 0.02 {
            prompt = self.rng.gen_range(200_001..400_000);
        }
        let cached = if self.rng.gen::<f64>() < 0.35 {
            prompt * self.rng.gen_range(20..90) / 100
        } else {
            0
        };
        let cache_write = if provider == "anthropic" && self.rng.gen::<f64>() < 0.2 {
            self.tokens(2000.0, 0.8)
        } else {
            0
        };
        let output = self.tokens(350.0, 1.0);
        let reasoning = if reasoning_model {
            output * self.rng.gen_range(0..70) / 100
        } else {
            0
        };
        let input = prompt - cached;
        let tier = if provider == "openai" && self.rng.gen::<f64>() < 0.05 {
            "batch"
        } else {
            "default"
        };
        let occurred = self.timestamp();
        self.seq += 1;
        let event_id = uuid::Builder::from_random_bytes(self.rng.gen())
            .into_uuid()
            .to_string();
        let mut v = json!({
            "schema_version": 1,
            "event_id": event_id,
            "occurred_at": occurred.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "institution_id": inst_id,
            "user_id": user,
            "api_key_id": key,
            "provider": provider,
            "model": model,
            "endpoint": "chat.completions",
            "service_tier": tier,
            "status": "ok",
            "latency_ms": self.tokens(900.0, 0.6),
        });
        let obj = v.as_object_mut().expect("object");
        if self.rng.gen::<bool>() {
            obj.insert("usage".into(), json!({"input_tokens": input, "cache_read_tokens": cached,
                "cache_write_tokens": cache_write, "output_tokens": output, "reasoning_tokens": reasoning}));
        } else {
            let pu = match provider {
                "openai" if self.rng.gen::<f64>() < 0.7 => {
                    json!({"prompt_tokens": prompt, "completion_tokens": output,
                    "total_tokens": prompt + output,
                    "prompt_tokens_details": {"cached_tokens": cached},
                    "completion_tokens_details": {"reasoning_tokens": reasoning}})
                }
                "openai" => json!({"input_tokens": prompt, "output_tokens": output,
                    "input_tokens_details": {"cached_tokens": cached},
                    "output_tokens_details": {"reasoning_tokens": reasoning}}),
                "anthropic" => json!({"input_tokens": input, "cache_read_input_tokens": cached,
                    "cache_creation_input_tokens": cache_write, "output_tokens": output}),
                "gemini" => json!({"promptTokenCount": prompt, "cachedContentTokenCount": cached,
                    "candidatesTokenCount": output - reasoning, "thoughtsTokenCount": reasoning,
                    "totalTokenCount": prompt + output}),
                _ => json!({"prompt_tokens": prompt, "completion_tokens": output,
                    "prompt_tokens_details": {"cached_tokens": cached}}),
            };
            obj.insert("provider_usage".into(), pu);
        }
        if self.rng.gen::<f64>() < 0.3 {
            let projects = ["thesis-bot", "course-helper", "research", "admin-tools"];
            obj.insert(
                "tags".into(),
                json!({"project": projects[self.rng.gen_range(0..projects.len())]}),
            );
        }
        (inst_id, v)
    }

    fn malformed(&mut self) -> (String, Vec<u8>) {
        let (inst, mut v) = self.event();
        let kind = self.rng.gen_range(0..7);
        let obj = v.as_object_mut().expect("object");
        match kind {
            0 => {
                let s = v.to_string();
                return (inst, s.as_bytes()[..s.len() / 2].to_vec());
            }
            1 => {
                obj.remove("event_id");
            }
            2 => {
                obj.remove("institution_id");
            }
            3 => {
                obj.insert(
                    "usage".into(),
                    json!({"input_tokens": -12, "output_tokens": 5}),
                );
                obj.remove("provider_usage");
            }
            4 => {
                obj.insert("occurred_at".into(), json!("2099-01-01T00:00:00Z"));
            }
            5 => {
                obj.insert("schema_version".into(), json!(7));
            }
            _ => return (inst, b"\x00\xffnot json at all".to_vec()),
        }
        (inst, v.to_string().into_bytes())
    }

    /// The next message.
    pub fn next_message(&mut self) -> Generated {
        let r: f64 = self.rng.gen();
        if r < self.args.malformed {
            let (inst, payload) = self.malformed();
            return Generated {
                key: inst.clone(),
                payload,
                kind: Kind::Malformed,
                institution: inst,
            };
        }
        if r < self.args.malformed + self.args.duplicates && !self.recent.is_empty() {
            let (inst, payload) = self.recent[self.rng.gen_range(0..self.recent.len())].clone();
            return Generated {
                key: inst.clone(),
                payload,
                kind: Kind::Duplicate,
                institution: inst,
            };
        }
        let (inst, v) = self.event();
        let payload = v.to_string().into_bytes();
        if self.recent.len() < 1000 {
            self.recent.push((inst.clone(), payload.clone()));
        } else {
            let i = self.rng.gen_range(0..self.recent.len());
            self.recent[i] = (inst.clone(), payload.clone());
        }
        Generated {
            key: inst.clone(),
            payload,
            kind: Kind::Event,
            institution: inst,
        }
    }
}

#[derive(Default)]
struct Tally {
    events: u64,
    duplicates: u64,
    malformed: u64,
}

pub async fn run(cfg: &Config, args: &EmitArgs) -> anyhow::Result<()> {
    let topic = &cfg.kafka.topic;
    crate::kafka::ensure_topic(&cfg.kafka, topic, args.partitions, &[]).await?;
    let producer: FutureProducer = crate::kafka::client_config(&cfg.kafka)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "120000")
        .create()
        .context("creating Kafka producer")?;
    let mut gen = Generator::new(args, Utc::now())?;
    let total = args.count;
    let started = Instant::now();
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut sent = 0u64;
    let mut messages = 0u64;
    let mut last_progress = Instant::now();
    use futures::StreamExt;
    while sent < total {
        let g = gen.next_message();
        let t = tally.entry(g.institution.clone()).or_default();
        match g.kind {
            Kind::Event => {
                t.events += 1;
                sent += 1;
            }
            Kind::Duplicate => t.duplicates += 1,
            Kind::Malformed => t.malformed += 1,
        }
        messages += 1;
        loop {
            let record = FutureRecord::to(topic).key(&g.key).payload(&g.payload);
            match producer.send_result(record) {
                Ok(f) => {
                    in_flight.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if let Some(r) = in_flight.next().await {
                        check_delivery(r)?;
                    } else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err((e, _)) => return Err(e).context("publishing"),
            }
        }
        while in_flight.len() > 50_000 {
            if let Some(r) = in_flight.next().await {
                check_delivery(r)?;
            }
        }
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(messages as f64 / args.rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
        }
        if last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "emit: {sent}/{total} events, {messages} messages, {:.0} msg/s",
                messages as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    while let Some(r) = in_flight.next().await {
        check_delivery(r)?;
    }
    producer.flush(Duration::from_secs(30))?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{:<16} {:>10} {:>11} {:>10} {:>10}",
        "institution", "events", "duplicates", "malformed", "messages"
    );
    let (mut e, mut d, mut m) = (0, 0, 0);
    for (inst, t) in &tally {
        println!(
            "{inst:<16} {:>10} {:>11} {:>10} {:>10}",
            t.events,
            t.duplicates,
            t.malformed,
            t.events + t.duplicates + t.malformed
        );
        e += t.events;
        d += t.duplicates;
        m += t.malformed;
    }
    println!("{:<16} {e:>10} {d:>11} {m:>10} {:>10}", "total", e + d + m);
    println!(
        "published {} messages to {topic} in {secs:.1}s ({:.0} msg/s)",
        e + d + m,
        (e + d + m) as f64 / secs
    );
    Ok(())
}

fn check_delivery(
    r: Result<
        rdkafka::producer::future_producer::OwnedDeliveryResult,
        futures::channel::oneshot::Canceled,
    >,
) -> anyhow::Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e).context("message not delivered"),
        Err(_) => anyhow::bail!("producer dropped a delivery"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::decode::{decode, DecodeOptions};

    fn args() -> EmitArgs {
        EmitArgs {
            count: 0,
            rate: 0,
            from: NaiveDate::from_ymd_opt(2026, 10, 1),
            to: NaiveDate::from_ymd_opt(2026, 10, 31),
            seed: 7,
            institutions: 5,
            duplicates: 0.1,
            malformed: 0.05,
            unknown_models: 0.02,
            partitions: 1,
        }
    }

    #[test]
    fn generated_messages_decode_as_labelled_and_are_reproducible() {
        let now = Utc.with_ymd_and_hms(2026, 11, 20, 0, 0, 0).unwrap();
        let opts = DecodeOptions {
            now,
            max_future_skew: chrono::Duration::minutes(5),
        };
        let mut g = Generator::new(&args(), now).unwrap();
        let mut counts = [0; 3];
        let mut first = Vec::new();
        for _ in 0..5000 {
            let m = g.next_message();
            first.push(m.payload.clone());
            let ok = decode(&m.payload, &opts).is_ok();
            match m.kind {
                Kind::Event | Kind::Duplicate => {
                    assert!(ok, "{}", String::from_utf8_lossy(&m.payload))
                }
                Kind::Malformed => assert!(!ok, "{}", String::from_utf8_lossy(&m.payload)),
            }
            counts[m.kind as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 100), "{counts:?}");
        // Events come in time order (hour by hour), mostly in office hours.
        let mut g = Generator::new(
            &EmitArgs {
                count: 2000,
                duplicates: 0.0,
                malformed: 0.0,
                ..args()
            },
            now,
        )
        .unwrap();
        let hours: Vec<i64> = (0..2000)
            .map(|_| {
                let v: serde_json::Value =
                    serde_json::from_slice(&g.next_message().payload).unwrap();
                DateTime::parse_from_rfc3339(v["occurred_at"].as_str().unwrap())
                    .unwrap()
                    .timestamp()
                    / 3600
            })
            .collect();
        assert!(hours.windows(2).all(|w| w[0] <= w[1]), "time order");
        let office = hours
            .iter()
            .filter(|h| (8..18).contains(&(*h % 24)))
            .count();
        assert!(office > 1000, "{office} of 2000 in office hours");
        let mut again = Generator::new(&args(), now).unwrap();
        for p in first.iter().take(100) {
            assert_eq!(&again.next_message().payload, p);
        }
    }
}
