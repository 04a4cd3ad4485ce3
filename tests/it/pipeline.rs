use std::collections::BTreeSet;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

use crate::harness::{kill9, terminate, TestEnv};
use crate::workload::{build, Mix, UNKNOWN_MODEL};

pub(crate) async fn assert_exact(env: &TestEnv, w: &crate::workload::Workload) {
    let (raw, rollup) = env.costs().await;
    let expected: std::collections::BTreeMap<String, Decimal> = w.expected_cost.clone();
    assert_eq!(raw, expected, "per-institution cost from usage_events");
    assert_eq!(
        rollup, expected,
        "per-institution cost from usage_hourly_institution"
    );
    let events = env
        .scalar("SELECT toInt64(sum(sign)) FROM usage_events")
        .await;
    let priced = env
        .scalar("SELECT toInt64(sum(sign * priced)) FROM usage_events")
        .await;
    let rejected = env
        .scalar("SELECT toInt64(count()) FROM rejected_events")
        .await;
    let duplicates = env
        .scalar("SELECT toInt64(count()) FROM duplicate_events")
        .await;
    assert_eq!(events, w.events);
    assert_eq!(events - priced, w.unpriced, "unpriced events");
    assert_eq!(rejected, w.malformed.len() as i64);
    assert_eq!(duplicates, w.duplicates);
    // Every message is accounted for exactly once.
    assert_eq!(
        priced + (events - priced) + rejected + duplicates,
        w.messages.len() as i64
    );
    // No event is stored twice.
    let twice = env.scalar("SELECT toInt64(count()) FROM (SELECT event_id, sum(sign) AS s FROM usage_events GROUP BY event_id HAVING s != 1)").await;
    assert_eq!(twice, 0, "events whose stored count is not exactly 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_shapes_duplicates_and_malformed_are_exact() {
    let mut env = TestEnv::new("mixed", 3).await;
    env.dead_letter_topic = format!("{}.dlq", env.name);
    tokentally::kafka::ensure_topic(&env.cfg.kafka, &env.dead_letter_topic, 1, &[])
        .await
        .unwrap();
    let mix = Mix {
        events: 4000,
        duplicates: 0.08,
        malformed: 0.05,
        unknown_model: 0.03,
        institutions: 5,
    };
    let w = build(11, &mix, &env.prices);
    println!(
        "messages {} events {} duplicates {} malformed {} unpriced {}",
        w.messages.len(),
        w.events,
        w.duplicates,
        w.malformed.len(),
        w.unpriced
    );
    env.produce(&w.messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(w.messages.len() as i64, Duration::from_secs(120))
        .await;
    let status = terminate(&mut ingest);
    assert!(status.success(), "ingest exits 0 on SIGTERM, got {status}");
    assert_exact(&env, &w).await;

    // Every malformed message is stored with its raw payload and a reason.
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Rej {
        reason: String,
        detail: String,
        payload: Vec<u8>,
    }
    let rows: Vec<Rej> = env
        .ch()
        .query("SELECT reason, detail, payload FROM rejected_events")
        .fetch_all()
        .await
        .unwrap();
    assert!(rows
        .iter()
        .all(|r| !r.reason.is_empty() && !r.detail.is_empty()));
    let stored: BTreeSet<Vec<u8>> = rows.into_iter().map(|r| r.payload).collect();
    let sent: BTreeSet<Vec<u8>> = w.malformed.iter().cloned().collect();
    assert_eq!(stored, sent);
    // …and copied to the dead-letter topic with its reason.
    let dlq = env
        .consume_all(
            &env.dead_letter_topic,
            w.malformed.len(),
            Duration::from_secs(30),
        )
        .await;
    let dlq_payloads: BTreeSet<Vec<u8>> = dlq.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(
        dlq_payloads, sent,
        "dead-letter topic holds every rejected message"
    );
    assert!(dlq.iter().all(|(_, h)| h
        .iter()
        .any(|(k, v)| k == "tokentally-reason" && !v.is_empty())));
    // The unknown model is stored unpriced, not at $0 silently.
    let unpriced_models = env
        .scalar(&format!(
            "SELECT toInt64(countIf(model = '{UNKNOWN_MODEL}' AND priced = 0)) FROM usage_events"
        ))
        .await;
    assert_eq!(unpriced_models, w.unpriced);

    // Replaying the whole topic from the start (a new consumer group) adds nothing.
    let mut replay_env = TestEnv {
        name: env.name.clone(),
        cfg: env.cfg.clone(),
        store: env.store.clone(),
        prices: env.prices.clone(),
        batch_max_messages: Some(500),
        dead_letter_topic: String::new(),
        config_toml: String::new(),
    };
    replay_env.cfg.kafka.group = format!("{}.replay", env.cfg.kafka.group);
    let mut replay = replay_env.spawn_ingest();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(terminate(&mut replay).success());
    assert_exact(&env, &w).await;
    env.drop_database().await;
}

/// The operator's crash: ingest killed -9 five times in a row at random moments, with the
/// default configuration (no shortened session or poll timeouts). Every restart must
/// resume within 30 s and the totals stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_five_times_resumes_within_30s_and_counts_every_event_once() {
    let env = TestEnv::new("crash", 4).await;
    let mix = Mix {
        events: 150_000,
        duplicates: 0.02,
        malformed: 0.01,
        unknown_model: 0.01,
        institutions: 8,
    };
    let w = build(23, &mix, &env.prices);
    env.produce(&w.messages).await;
    let total = w.messages.len() as i64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(std::process::id() as u64);
    let mut resumes = Vec::new();
    let mut ingest = env.spawn_ingest();
    for kill in 1..=5 {
        // Time from (re)start to the first newly stored message.
        let at_start = env.accounted().await;
        let started = std::time::Instant::now();
        while env.accounted().await == at_start {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "after restart #{} ingest made no progress for 60 s",
                kill - 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        resumes.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..2000))).await;
        let before = env.accounted().await;
        assert!(
            before < total,
            "ingest finished before kill #{kill}; the test needs more traffic"
        );
        kill9(&mut ingest);
        println!("kill -9 #{kill} with {before}/{total} messages accounted for");
        ingest = env.spawn_ingest();
    }
    let at_start = env.accounted().await;
    let started = std::time::Instant::now();
    while env.accounted().await == at_start {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    resumes.push(started.elapsed());
    let worst = resumes.iter().skip(1).max().unwrap();
    println!("resumed after each restart in {resumes:?}; worst {worst:?}");
    assert!(
        *worst <= Duration::from_secs(30),
        "a restart took {worst:?} to resume (limit 30 s): {resumes:?}"
    );
    env.wait_accounted(total, Duration::from_secs(600)).await;
    assert!(terminate(&mut ingest).success());
    assert_exact(&env, &w).await;
    env.drop_database().await;
}

/// Stops one of the servers (`what`: clickhouse or kafka) while ingest runs, publishes
/// the second half of the traffic around the outage, starts it again, checks totals.
async fn outage(what: &str, seed: u64, batch: usize, publish_during_outage: bool) {
    let server = if what == "kafka" { "tansu" } else { what };
    let pidfile = crate::harness::repo().join(format!(".data/{server}/{server}.pid"));
    assert!(
        pidfile.exists(),
        "this test stops the {what} that scripts/services started ({} is missing)",
        pidfile.display()
    );
    let mut env = TestEnv::new(&format!("{what}down"), 2).await;
    env.batch_max_messages = Some(batch);
    let mix = Mix {
        events: 15_000,
        duplicates: 0.03,
        malformed: 0.02,
        unknown_model: 0.01,
        institutions: 4,
    };
    let w = build(seed, &mix, &env.prices);
    let (first, second) = w.messages.split_at(w.messages.len() / 2);
    env.produce(first).await;
    let mut ingest = env.spawn_ingest();
    let started = std::time::Instant::now();
    while env.accounted().await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "ingest made no progress"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::harness::services(&format!("stop-{what}"));
    if publish_during_outage {
        env.produce(second).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        ingest.try_wait().unwrap().is_none(),
        "ingest must keep running through a {what} outage"
    );
    crate::harness::services(&format!("start-{what}"));
    if !publish_during_outage {
        env.produce(second).await;
    }
    env.wait_accounted(w.messages.len() as i64, Duration::from_secs(240))
        .await;
    assert!(terminate(&mut ingest).success());
    assert_exact(&env, &w).await;
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_stopped_and_started_mid_stream_loses_nothing() {
    // The stream goes on while the store is down.
    outage("clickhouse", 37, 500, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_and_started_mid_stream_loses_nothing() {
    outage("kafka", 43, 300, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_unpriced_until_priced_and_repriced_once() {
    let mut env = TestEnv::new("reprice", 2).await;
    // A private copy of the price book that the test can extend.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&env.prices).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    env.prices = dir.path().to_owned();
    let mix = Mix {
        events: 3000,
        duplicates: 0.02,
        malformed: 0.0,
        unknown_model: 0.2,
        institutions: 3,
    };
    let w = build(41, &mix, &env.prices);
    env.produce(&w.messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(w.messages.len() as i64, Duration::from_secs(120))
        .await;
    assert!(terminate(&mut ingest).success());
    assert_exact(&env, &w).await;
    assert!(w.unpriced > 300);

    std::fs::write(
        dir.path().join("acme.toml"),
        format!("[[price]]\nprovider = \"openai\"\nmodel = \"{UNKNOWN_MODEL}\"\nmatch = [\"{UNKNOWN_MODEL}\"]\n\
                 effective_from = \"2026-01-01\"\ninput_per_mtok = \"1.5\"\ncache_read_per_mtok = \"0.375\"\n\
                 cache_write_per_mtok = \"1.875\"\noutput_per_mtok = \"6.25\"\n"),
    )
    .unwrap();
    let reprice = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokentally"))
            .args(["reprice", "--since", "2026-10-01"])
            .env("TOKENTALLY_CLICKHOUSE_URL", &env.cfg.clickhouse.url)
            .env(
                "TOKENTALLY_CLICKHOUSE_DATABASE",
                &env.cfg.clickhouse.database,
            )
            .env("TOKENTALLY_PRICES", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = reprice();
    assert!(
        first.contains(&format!(
            "{} re-rated ({} newly priced",
            w.unpriced, w.unpriced
        )),
        "{first}"
    );

    // Expected: the test's own sums of the unpriced events' tokens at the new rates.
    let mut expected = w.expected_cost.clone();
    let rates = [
        Decimal::new(15, 1),
        Decimal::new(375, 3),
        Decimal::new(1875, 3),
        Decimal::new(625, 2),
    ];
    for (inst, tokens) in &w.unpriced_tokens {
        let extra: Decimal = tokens
            .iter()
            .zip(rates)
            .map(|(t, r)| Decimal::from(*t) * r)
            .sum::<Decimal>()
            / Decimal::from(1_000_000);
        *expected.entry(inst.clone()).or_default() += extra;
    }
    for v in expected.values_mut() {
        *v = v.normalize();
    }
    let (raw, rollup) = env.costs().await;
    assert_eq!(raw, expected);
    assert_eq!(rollup, expected);
    assert_eq!(
        env.scalar("SELECT toInt64(sum(sign)) FROM usage_events")
            .await,
        w.events,
        "counted once"
    );
    assert_eq!(
        env.scalar("SELECT toInt64(sum(sign * (1 - priced))) FROM usage_events")
            .await,
        0
    );
    assert_eq!(
        env.scalar("SELECT toInt64(sum(events)) FROM usage_hourly_institution")
            .await,
        w.events
    );

    // A second run finds nothing to change.
    let again = reprice();
    assert!(again.contains(" 0 re-rated"), "{again}");
    let (raw2, _) = env.costs().await;
    assert_eq!(raw2, expected);
    env.drop_database().await;
}
