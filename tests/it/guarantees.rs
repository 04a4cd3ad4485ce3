//! The two core promises — every valid event counts exactly once, an invoice number is
//! never used twice — tested the way operators break them: several instances, lost
//! topics, crafted keys, wide batches, a server in a half-hour time zone, lost responses,
//! huge messages, concurrent jobs. Each test failed before the fix it names.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::harness::{
    delete_topic, list_price, peak_rss_kib, terminate, tokentally, tokentally_output, TestEnv,
};

/// A contract-v1 event with canonical usage.
fn event(id: &str, inst: &str, at: &str, model: &str, input: u64, output: u64) -> Vec<u8> {
    json!({
        "schema_version": 1, "event_id": id, "occurred_at": at, "institution_id": inst,
        "user_id": format!("u@{inst}"), "api_key_id": "pk_1", "provider": "openai",
        "model": model, "usage": {"input_tokens": input, "output_tokens": output}
    })
    .to_string()
    .into_bytes()
}

async fn i64_of(env: &TestEnv, sql: &str) -> i64 {
    env.scalar(sql).await
}

async fn rejected_by_reason(env: &TestEnv) -> BTreeMap<String, u64> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct R {
        reason: String,
        n: u64,
    }
    let rows: Vec<R> = env
        .ch()
        .query("SELECT reason, count() AS n FROM rejected_events GROUP BY reason")
        .fetch_all()
        .await
        .unwrap();
    rows.into_iter().map(|r| (r.reason, r.n)).collect()
}

/// Issue 29: producers that do not key by institution (no key, or a random one) lose
/// nothing and are billed: two instances, four partitions, 10,000 events without a key
/// and 10,000 under a wrong key, 3 % copies (under any key), one instance killed with -9
/// halfway and restarted. Every event is billed once, to its institution; none is
/// rejected; every message in the topic (with those ingest published again) has its
/// outcome stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unkeyed_and_wrongly_keyed_events_are_repaired_and_billed_once_through_a_kill_9() {
    let env = TestEnv::new("rekeyed", 4).await;
    let price = list_price(&env.prices, "gpt-4o-mini");
    let mut a = env.spawn_ingest();
    let _b = env.spawn_ingest();
    // Both members in the group before the traffic.
    tokio::time::sleep(Duration::from_secs(8)).await;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(29);
    let mut messages = Vec::new();
    let mut expected: BTreeMap<String, Decimal> = BTreeMap::new();
    for i in 0..20_000u64 {
        let inst = format!("inst-{}", i % 12);
        let at = format!("2026-11-{:02}T{:02}:{:02}:00Z", 1 + i % 28, i % 24, i % 60);
        let payload = event(
            &format!("ev-{i}"),
            &inst,
            &at,
            "gpt-4o-mini",
            1000 + i,
            100 + i % 50,
        );
        *expected.entry(inst.clone()).or_default() += price.cost(1000 + i, 0, 0, 100 + i % 50);
        let key = if i % 2 == 0 {
            String::new()
        } else {
            format!("random-{}", rng.gen::<u32>())
        };
        messages.push((key, payload));
    }
    // 3 % copies: under no key, a wrong key or the right one, spread over the traffic.
    for j in 0..600usize {
        let at = rng.gen_range(0..20_000 + j);
        let (_, payload) = messages[rng.gen_range(0..20_000)].clone();
        let inst: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let key = match j % 3 {
            0 => String::new(),
            1 => "somewhere-else".to_owned(),
            _ => inst["institution_id"].as_str().unwrap().to_owned(),
        };
        messages.insert(at, (key, payload));
    }
    // Published as live traffic in chunks (the local broker, tansu 0.6.0, stops
    // answering when a producer writes while a consumer group reads a backlog of
    // thousands: README); one instance is killed with -9 in the middle of a chunk.
    let mut accounted = 0;
    for (n, chunk) in messages.chunks(2_060).enumerate() {
        env.produce(chunk).await;
        if n == 5 {
            let before = i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await;
            let started = Instant::now();
            while i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await < before + 300 {
                assert!(
                    started.elapsed() < Duration::from_secs(120),
                    "nothing stored"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            crate::harness::kill9(&mut a);
            a = env.spawn_ingest();
        }
        accounted = env.wait_all_accounted(Duration::from_secs(180)).await;
    }

    let (raw, rollup) = env.costs().await;
    let expected: BTreeMap<String, Decimal> = expected
        .into_iter()
        .map(|(k, v)| (k, v.normalize()))
        .collect();
    assert_eq!(raw, expected, "cost per institution from usage_events");
    assert_eq!(
        rollup, expected,
        "cost per institution from usage_hourly_institution"
    );
    env.assert_rollups_match_events().await;
    let twice = i64_of(&env, "SELECT toInt64(count()) FROM (SELECT institution_id, event_id, sum(sign) AS s FROM usage_events GROUP BY institution_id, event_id HAVING s != 1)").await;
    assert_eq!(twice, 0, "events stored other than exactly once");
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await,
        20_000
    );
    let reasons = rejected_by_reason(&env).await;
    assert!(reasons.is_empty(), "nothing is rejected: {reasons:?}");
    let rekeyed = i64_of(&env, "SELECT toInt64(count()) FROM rekeyed_events").await;
    // Every message under a wrong or no key was published again exactly once per
    // position (a replay after the kill finds its position recorded).
    let wrong = messages
        .iter()
        .filter(|(k, p)| {
            let v: serde_json::Value = serde_json::from_slice(p).unwrap();
            v["institution_id"].as_str() != Some(k.as_str())
        })
        .count() as i64;
    assert_eq!(rekeyed, wrong);
    println!(
        "20,000 events, {} messages with copies, {wrong} under a wrong or no key: all billed once; \
         {accounted} messages in the topic accounted for (with ingest's own re-publications)",
        messages.len()
    );
    env.drop_database().await;
}

/// Issue 29: an event id bills once, whatever institution it names. A stored event's id
/// published again under another institution is rejected naming both; copies of 400 ids
/// published under two institutions at the same moment, on different partitions read by
/// two instances, end with exactly one billed copy each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_is_never_billed_to_two_institutions() {
    let env = TestEnv::new("identity", 4).await;
    let _a = env.spawn_ingest();
    let _b = env.spawn_ingest();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let at = "2026-11-20T10:00:00Z";
    // Alone: stored under uni-a first, then the same id under uni-b.
    env.produce(&[(
        "uni-a".into(),
        event("solo-1", "uni-a", at, "gpt-4o-mini", 10, 5),
    )])
    .await;
    env.wait_accounted(1, Duration::from_secs(60)).await;
    env.produce(&[(
        "uni-b".into(),
        event("solo-1", "uni-b", at, "gpt-4o-mini", 10, 5),
    )])
    .await;
    env.wait_accounted(2, Duration::from_secs(60)).await;
    #[derive(clickhouse::Row, serde::Deserialize, Debug)]
    struct Rej {
        reason: String,
        detail: String,
        institution_id: String,
    }
    let rej: Vec<Rej> = env
        .ch()
        .query("SELECT reason, detail, institution_id FROM rejected_events")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(rej.len(), 1, "{rej:?}");
    assert_eq!(
        (rej[0].reason.as_str(), rej[0].institution_id.as_str()),
        ("id_conflict", "uni-b")
    );
    assert!(
        rej[0].detail.contains("uni-a") && rej[0].detail.contains("uni-b"),
        "{}",
        rej[0].detail
    );

    // Racing: each id under two institutions at once (20 pairs, so that many pairs sit
    // on partitions of different instances).
    let mut messages = Vec::new();
    for i in 0..400 {
        let (x, y) = (format!("left-{}", i % 20), format!("right-{}", i % 20));
        let id = format!("race-{i}");
        messages.push((x.clone(), event(&id, &x, at, "gpt-4o-mini", 100, 10)));
        messages.push((y.clone(), event(&id, &y, at, "gpt-4o-mini", 100, 10)));
    }
    env.produce(&messages).await;
    // Copies stored at the same moment are billed to both until the later one is
    // cancelled: within seconds (the bound the README states).
    let started = Instant::now();
    let mut twice;
    loop {
        env.wait_all_accounted(Duration::from_secs(120)).await;
        twice = i64_of(
            &env,
            "SELECT toInt64(count()) FROM (SELECT event_id, sum(sign) AS s FROM usage_events \
             WHERE event_id LIKE 'race-%' GROUP BY event_id HAVING s != 1)",
        )
        .await;
        if twice == 0 || started.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let resolved = started.elapsed();
    assert_eq!(
        twice, 0,
        "race ids billed other than exactly once over all institutions"
    );
    assert_eq!(
        i64_of(
            &env,
            "SELECT toInt64(sum(sign)) FROM usage_events WHERE event_id LIKE 'race-%'"
        )
        .await,
        400
    );
    let cancelled = i64_of(
        &env,
        "SELECT toInt64(count()) FROM usage_events WHERE sign = -1",
    )
    .await;
    let conflicts = rejected_by_reason(&env)
        .await
        .get("id_conflict")
        .copied()
        .unwrap_or(0);
    // Every losing copy is rejected (before or after it was stored) exactly once.
    assert_eq!(conflicts, 401, "400 racing losers and the lone one");
    env.assert_rollups_match_events().await;
    println!(
        "identity: 400 racing pairs, one billed copy each {resolved:?} after publishing; \
         {cancelled} cancelled after a race, {} refused before being stored",
        400 - cancelled
    );
    env.drop_database().await;
}

/// Finding 4: a batch touching thousands of institutions made the look-up too big for
/// ClickHouse 18.16 ("AST is too big") and ingest retried it forever. 5,000 institutions
/// in one batch with a one-day dedupe window, then the same 5,000 republished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_5000_institutions_is_stored_and_its_copies_found() {
    let mut env = TestEnv::new("wide", 1).await;
    env.config_toml = "[ingest]\ndedupe_window_secs = 86400\nbatch_max_messages = 6000\nbatch_max_wait_ms = 3000\n".into();
    let messages: Vec<(String, Vec<u8>)> = (0..5000)
        .map(|i| {
            let inst = format!("institution-{i:05}");
            let p = event(
                &format!("w-{i}"),
                &inst,
                "2026-10-07T08:30:00Z",
                "gpt-4o-mini",
                10,
                1,
            );
            (inst, p)
        })
        .collect();
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(5000, Duration::from_secs(120)).await;
    env.produce(&messages).await;
    env.wait_accounted(10_000, Duration::from_secs(120)).await;
    assert!(terminate(&mut ingest).success());
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await,
        5000
    );
    assert_eq!(
        i64_of(&env, "SELECT toInt64(count()) FROM duplicate_events").await,
        5000
    );
    assert_eq!(
        i64_of(
            &env,
            "SELECT toInt64(uniqExact(institution_id)) FROM usage_hourly_institution"
        )
        .await,
        5000
    );
    env.drop_database().await;
}

/// A second ClickHouse server in a half-hour time zone, started by scripts/services and
/// stopped when the test ends.
struct ZonedClickHouse {
    vars: Vec<(&'static str, String)>,
    _dir: tempfile::TempDir,
}

impl ZonedClickHouse {
    fn start(tz: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let vars = vec![
            ("TT_CLICKHOUSE_HTTP_PORT", "8124".to_owned()),
            ("TT_CLICKHOUSE_TCP_PORT", "9011".to_owned()),
            ("TT_CLICKHOUSE_INTERSERVER_PORT", "9019".to_owned()),
            ("TT_CLICKHOUSE_TZ", tz.to_owned()),
            ("TT_DATA_DIR", dir.path().display().to_string()),
        ];
        let z = Self { vars, _dir: dir };
        z.services("start-clickhouse");
        z
    }

    fn services(&self, cmd: &str) {
        let status = std::process::Command::new(crate::harness::repo().join("scripts/services"))
            .arg(cmd)
            .envs(self.vars.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .unwrap();
        assert!(status.success(), "scripts/services {cmd}");
    }
}

impl Drop for ZonedClickHouse {
    fn drop(&mut self) {
        self.services("stop-clickhouse");
    }
}

/// Finding 4: the look-up compared hour buckets in the server's zone with hours computed
/// in UTC, so on a +05:30 server nothing matched and copies were stored again. On such a
/// server, copies are still found and the rollups bucket by UTC hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_in_a_half_hour_time_zone_still_deduplicates_and_buckets_by_utc_hour() {
    let zoned = ZonedClickHouse::start("Asia/Kolkata");
    let mut env = TestEnv::new_on("kolkata", 2, "http://127.0.0.1:8124").await;
    let tz: String = env
        .ch()
        .query("SELECT timezone()")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(tz, "Asia/Kolkata", "the second server runs in +05:30");
    // Two events in one UTC hour, either side of a local :00 (10:15 and 10:45 UTC are
    // 15:45 and 16:15 in Kolkata).
    let first = vec![
        (
            "uni-k".to_owned(),
            event(
                "k-1",
                "uni-k",
                "2026-10-05T10:15:00Z",
                "gpt-4o-mini",
                100,
                10,
            ),
        ),
        (
            "uni-k".to_owned(),
            event(
                "k-2",
                "uni-k",
                "2026-10-05T10:45:00Z",
                "gpt-4o-mini",
                100,
                10,
            ),
        ),
    ];
    env.batch_max_messages = Some(10);
    env.produce(&first).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(2, Duration::from_secs(60)).await;
    // Republished in a later batch: found in the store, not stored again.
    env.produce(&first).await;
    env.wait_accounted(4, Duration::from_secs(60)).await;
    assert!(terminate(&mut ingest).success());
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await,
        2
    );
    assert_eq!(
        i64_of(&env, "SELECT toInt64(count()) FROM duplicate_events").await,
        2
    );
    for table in ["usage_hourly_model", "usage_hourly_institution"] {
        let off = i64_of(
            &env,
            &format!("SELECT toInt64(countIf(toUnixTimestamp(hour) % 3600 != 0)) FROM {table}"),
        )
        .await;
        assert_eq!(off, 0, "{table} has hours that are not UTC hours");
        let rows = i64_of(
            &env,
            &format!("SELECT toInt64(count()) FROM (SELECT hour FROM {table} GROUP BY hour)"),
        )
        .await;
        assert_eq!(rows, 1, "{table}: both events belong to 10:00 UTC");
    }
    for table in [
        "usage_daily_model",
        "usage_daily_user",
        "usage_daily_key",
        "usage_daily_user_model",
    ] {
        let days = i64_of(
            &env,
            &format!(
                "SELECT toInt64(count()) FROM (SELECT day FROM {table} GROUP BY day \
                 HAVING toUnixTimestamp(day) % 86400 = 0)"
            ),
        )
        .await;
        assert_eq!(days, 1, "{table}: one UTC day, starting at 00:00 UTC");
    }
    env.drop_database().await;
    drop(zoned);
}

/// An HTTP proxy in front of ClickHouse that loses the response of the first insert into
/// `usage_events` while the server is still applying it — a proxy timeout during a slow
/// insert. It forwards the first part of the body (enough that ClickHouse starts the
/// query: it reads up to `max_query_size` = 256 KiB before executing), hangs up on the
/// client, and forwards the rest three seconds later, so the insert completes after the
/// client has already given up on it.
async fn lossy_proxy(upstream: String) -> (u16, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fired = Arc::new(AtomicBool::new(false));
    let flag = fired.clone();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let (upstream, flag) = (upstream.clone(), flag.clone());
            tokio::spawn(async move {
                let _ = proxy_connection(client, &upstream, &flag).await;
            });
        }
    });
    (port, fired)
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

async fn proxy_connection(
    client: tokio::net::TcpStream,
    upstream: &str,
    fired: &AtomicBool,
) -> std::io::Result<()> {
    let mut client = BufReader::new(client);
    loop {
        // Request head; framing headers are rewritten below.
        let mut head = Vec::new();
        let mut framing = String::new();
        loop {
            let mut line = Vec::new();
            if client.read_until(b'\n', &mut line).await? == 0 {
                return Ok(());
            }
            if line == b"\r\n" {
                break;
            }
            let lower = String::from_utf8_lossy(&line).to_ascii_lowercase();
            if lower.starts_with("content-length:") || lower.starts_with("transfer-encoding:") {
                framing.push_str(&lower);
            } else if !lower.starts_with("connection:") {
                head.extend_from_slice(&line);
            }
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        // The body, de-chunked.
        let mut body = Vec::new();
        if let Some(n) = framing
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            body.resize(n, 0);
            client.read_exact(&mut body).await?;
        } else if framing.contains("chunked") {
            loop {
                let mut size_line = Vec::new();
                client.read_until(b'\n', &mut size_line).await?;
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&size_line)
                        .trim()
                        .split(';')
                        .next()
                        .unwrap_or("0"),
                    16,
                )
                .unwrap_or(0);
                let mut data = vec![0; size + 2];
                client.read_exact(&mut data).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&data[..size]);
            }
        }
        let mut up = tokio::net::TcpStream::connect(upstream).await?;
        up.write_all(&head).await?;
        up.write_all(b"Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await?;
        let split = 300 * 1024;
        let lose = text.contains("insert")
            && text.contains("usage_events")
            && body.len() > split
            && !fired.swap(true, Ordering::SeqCst);
        if lose {
            up.write_all(&chunk(&body[..split])).await?;
            up.flush().await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            // The client sees its connection drop; the insert completes later.
            drop(client);
            tokio::time::sleep(Duration::from_secs(3)).await;
            up.write_all(&chunk(&body[split..])).await?;
            up.write_all(b"0\r\n\r\n").await?;
            let mut sink = Vec::new();
            up.read_to_end(&mut sink).await?;
            return Ok(());
        }
        if !body.is_empty() {
            up.write_all(&chunk(&body)).await?;
        }
        up.write_all(b"0\r\n\r\n").await?;
        let mut response = Vec::new();
        up.read_to_end(&mut response).await?;
        client.get_mut().write_all(&response).await?;
    }
}

/// Finding 4: an insert ClickHouse applied, whose response was lost and which was
/// retried while still applying, was stored twice (50 → 100 rows). The retry now waits
/// until the first attempt no longer runs on the server, then finds its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_whose_response_is_lost_is_not_stored_twice() {
    let mut env = TestEnv::new("lostresponse", 1).await;
    let upstream = env
        .cfg
        .clickhouse
        .url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let (port, fired) = lossy_proxy(upstream).await;
    env.cfg.clickhouse.url = format!("http://127.0.0.1:{port}");
    // Large, incompressible events, so that the insert of 50 is over 300 KiB.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let messages: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| {
            let mut v: serde_json::Value = serde_json::from_slice(&event(
                &format!("l-{i}"),
                "uni-l",
                "2026-10-09T12:00:00Z",
                "gpt-4o-mini",
                10,
                1,
            ))
            .unwrap();
            let tags: serde_json::Map<String, serde_json::Value> = (0..32)
                .map(|t| {
                    let value: String = (0..250)
                        .map(|_| rng.sample(rand::distributions::Alphanumeric) as char)
                        .collect();
                    (format!("t{t}"), json!(value))
                })
                .collect();
            v["tags"] = serde_json::Value::Object(tags);
            ("uni-l".to_owned(), v.to_string().into_bytes())
        })
        .collect();
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(50, Duration::from_secs(60)).await;
    // Let any late write land before counting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(terminate(&mut ingest).success());
    assert!(
        fired.load(Ordering::SeqCst),
        "the proxy lost an insert response"
    );
    assert_eq!(
        i64_of(&env, "SELECT toInt64(count()) FROM usage_events").await,
        50
    );
    assert_eq!(
        i64_of(
            &env,
            "SELECT toInt64(sum(events)) FROM usage_hourly_institution"
        )
        .await,
        50
    );
    let log = std::fs::read_to_string(env.log_path("ingest")).unwrap();
    assert!(
        log.contains("waiting for an earlier insert attempt"),
        "the retry did not wait: {log}"
    );
    env.drop_database().await;
}

/// Finding 4: batches were capped by count and time only; 2 MB messages with a 60 s batch
/// wait made ingest grow to 646 MiB. With the default byte cap its peak stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_batched_by_bytes_and_memory_stays_bounded() {
    let mut env = TestEnv::new("bigmsg", 2).await;
    // An operator's long batch wait: without a byte cap the whole backlog is one batch.
    env.config_toml = "[ingest]\nbatch_max_wait_ms = 60000\n".into();
    // 99 messages of 3 MiB: with the default 8 MiB cap every batch is full at 3 messages,
    // so none waits for the 60 s timer.
    let padding = "x".repeat(3 * 1024 * 1024);
    let messages: Vec<(String, Vec<u8>)> = (0..99)
        .map(|i| {
            let inst = format!("uni-{}", i % 3);
            let mut v: serde_json::Value = serde_json::from_slice(&event(
                &format!("big-{i}"),
                &inst,
                "2026-10-09T12:00:00Z",
                "gpt-4o-mini",
                10,
                1,
            ))
            .unwrap();
            // Unknown fields are allowed by the contract (and ignored).
            v["debug_blob"] = json!(padding);
            (inst, v.to_string().into_bytes())
        })
        .collect();
    env.produce_with(&messages, &[("message.max.bytes", "4000000")])
        .await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(99, Duration::from_secs(240)).await;
    let peak_mib = peak_rss_kib(ingest.id()) / 1024;
    assert!(terminate(&mut ingest).success());
    println!("ingest peak RSS with 99 messages of 3 MiB: {peak_mib} MiB");
    assert!(peak_mib <= 256, "peak RSS {peak_mib} MiB");
    env.drop_database().await;
}

/// The look-up reads whole hour buckets of the sorting key and keeps what lies within
/// `dedupe_window_secs` (default 3,600) of a copy's `occurred_at`: a copy re-stamped by
/// exactly the window is a duplicate, one re-stamped a second further is a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dedupe_window_is_exact_to_the_second() {
    let env = TestEnv::new("window", 1).await;
    let inst = "uni-w".to_string();
    let mut ingest = env.spawn_ingest();
    let steps = [
        ("2026-10-09T12:10:30Z", 1, 0),
        // 3,600 s earlier: within the window, a duplicate.
        ("2026-10-09T11:10:30Z", 1, 1),
        // 3,601 s later: outside it, a new event.
        ("2026-10-09T13:10:31Z", 2, 1),
    ];
    for (n, (at, events, duplicates)) in steps.into_iter().enumerate() {
        env.produce(&[(
            inst.clone(),
            event("same-id", &inst, at, "gpt-4o-mini", 10, 1),
        )])
        .await;
        env.wait_accounted(n as i64 + 1, Duration::from_secs(60))
            .await;
        assert_eq!(
            i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await,
            events,
            "after the copy at {at}"
        );
        assert_eq!(
            i64_of(&env, "SELECT toInt64(count()) FROM duplicate_events").await,
            duplicates,
            "after the copy at {at}"
        );
    }
    assert!(terminate(&mut ingest).success());
    env.drop_database().await;
}

/// Issue 16: the last, partial batch of a backlog used to wait out `batch_max_wait_ms`
/// although nothing more was coming. Now it is written once every partition has reported
/// its end — but a trickle after it still waits for the timer (no flood of small inserts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_a_backlog_is_written_at_once_and_a_trickle_waits_for_its_batch() {
    let mut env = TestEnv::new("backlogend", 4).await;
    // A batch timer far longer than the whole test takes up to the trickle.
    env.config_toml = "[ingest]\nbatch_max_messages = 100\nbatch_max_wait_ms = 60000\n".into();
    let messages: Vec<(String, Vec<u8>)> = (0..250)
        .map(|i| {
            let inst = format!("uni-{}", i % 5);
            let body = event(
                &format!("end-{i}"),
                &inst,
                "2026-10-09T12:00:00Z",
                "gpt-4o-mini",
                10,
                1,
            );
            (inst, body)
        })
        .collect();
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    let start = Instant::now();
    // 100 + 100 by count, the last 50 at the end of the backlog, not after 60 s.
    env.wait_accounted(250, Duration::from_secs(30)).await;
    println!(
        "250 messages in batches of 100 stored in {:?}",
        start.elapsed()
    );

    // One more message: the batch before it was not full, so it waits for its timer.
    let inst = "uni-0".to_string();
    env.produce(&[(
        inst.clone(),
        event(
            "end-trickle",
            &inst,
            "2026-10-09T12:00:00Z",
            "gpt-4o-mini",
            10,
            1,
        ),
    )])
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        env.accounted().await,
        250,
        "a single message after a partial batch was written at once"
    );
    // Shutting down writes the batch in hand.
    assert!(terminate(&mut ingest).success());
    assert_eq!(env.accounted().await, 251);
    env.drop_database().await;
}

/// Issue 16: with `backlog_batch_max_messages`, a backlog is written in large batches
/// (fewer parts for ClickHouse to write and merge), judged by the high watermarks
/// librdkafka caches, and its end in normal ones; every event is still stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_written_in_backlog_batches_and_counted_once() {
    let mut env = TestEnv::new("backlogbatch", 1).await;
    env.config_toml = "[ingest]\nbatch_max_messages = 100\nbatch_max_wait_ms = 60000\n\
                       backlog_batch_max_messages = 1000\n"
        .into();
    let messages: Vec<(String, Vec<u8>)> = (0..3000)
        .map(|i| {
            let inst = format!("uni-{}", i % 7);
            let at = format!("2026-10-{:02}T{:02}:00:00Z", 1 + i % 28, i % 24);
            (
                inst.clone(),
                event(&format!("bb-{i}"), &inst, &at, "gpt-4o-mini", 10, 1),
            )
        })
        .collect();
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(3000, Duration::from_secs(60)).await;
    assert!(terminate(&mut ingest).success());
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await,
        3000
    );
    assert_eq!(
        i64_of(
            &env,
            "SELECT toInt64(uniqExact(event_id)) FROM usage_events"
        )
        .await,
        3000
    );
    // 3,000 messages in batches of 100 are 30 batches; backlog batches of 1,000 make
    // three, plus normal ones if a batch was due while less than 1,000 were left.
    let log = std::fs::read_to_string(env.log_path("ingest")).unwrap();
    let batches: u64 = log
        .lines()
        .filter(|l| l.contains("ingest stopped"))
        .find_map(|l| l.split("batches=").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no batch count in the ingest log:\n{log}"));
    assert!(
        (3..=12).contains(&batches),
        "{batches} batches for 3,000 messages (30 without backlog batches)"
    );
    env.drop_database().await;
}

/// Issue 16: a crash in the middle of a backlog written in backlog batches — ingest
/// killed -9 while a large batch may be in flight, then restarted — still stores every
/// event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_backlog_batches_counts_every_event_once() {
    let mut env = TestEnv::new("backlogcrash", 2).await;
    env.config_toml =
        "[ingest]\nbatch_max_messages = 500\nbacklog_batch_max_messages = 5000\n".into();
    let messages: Vec<(String, Vec<u8>)> = (0..30_000)
        .map(|i| {
            let inst = format!("uni-{}", i % 5);
            let at = format!("2026-10-{:02}T{:02}:00:00Z", 1 + i % 28, i % 24);
            (
                inst.clone(),
                event(&format!("bc-{i}"), &inst, &at, "gpt-4o-mini", 10, 1),
            )
        })
        .collect();
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    let started = Instant::now();
    while env.accounted().await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing stored in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = env.accounted().await;
    assert!(
        before < 30_000,
        "ingest finished before the kill; the test needs more traffic"
    );
    crate::harness::kill9(&mut ingest);
    println!("kill -9 with {before}/30000 messages accounted for");
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(30_000, Duration::from_secs(120)).await;
    assert!(terminate(&mut ingest).success());
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await,
        30_000
    );
    assert_eq!(
        i64_of(
            &env,
            "SELECT toInt64(uniqExact(event_id)) FROM usage_events"
        )
        .await,
        30_000
    );
    env.drop_database().await;
}

/// Finding 1: the ledger topic disappeared and the next `issue` handed out a used
/// number. Now issuing is refused with an error that names what is missing,
/// `ledger verify` says so, `ledger restore` re-appends the documents from ClickHouse,
/// and numbering continues above the highest number ever used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ledger_is_refused_then_restored_and_numbering_continues() {
    let env = TestEnv::new("ledgerloss", 1).await;
    let vars = env.cli_vars();
    let ledger_topic = vars
        .iter()
        .find(|(k, _)| *k == "TOKENTALLY_BILLING_LEDGER_TOPIC")
        .unwrap()
        .1
        .clone();
    let issue = |inst: &str| {
        tokentally_output(
            &[
                "invoice",
                "issue",
                "--institution",
                inst,
                "--period",
                "2026-09",
                "--format",
                "json",
            ],
            &vars,
            None,
        )
    };
    let number = |out: &std::process::Output| -> String {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["number"].as_str().unwrap().to_owned()
    };
    let year = chrono::Utc::now().format("%Y").to_string();
    assert_eq!(number(&issue("uni-a")), format!("TT-{year}-000001"));
    assert_eq!(number(&issue("uni-b")), format!("TT-{year}-000002"));

    delete_topic(&env.cfg.kafka, &ledger_topic).await;
    let refused = issue("uni-c");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "issuing with a lost ledger must fail"
    );
    assert!(
        err.contains("lacks 2 document(s)") && err.contains("ledger restore"),
        "{err}"
    );
    // Nothing recreated an empty register meanwhile.
    assert!(tokentally::kafka::partitions(&env.cfg.kafka, &ledger_topic)
        .await
        .unwrap()
        .is_none());
    let verify = tokentally_output(&["ledger", "verify"], &vars, None);
    assert_eq!(verify.status.code(), Some(1));
    let report = String::from_utf8_lossy(&verify.stdout);
    assert!(
        report.contains("MISSING") && report.contains(&format!("TT-{year}-000002")),
        "{report}"
    );

    // Issue 29: the overview still renders spend, and says why "as billed" is missing.
    {
        let dir = tempfile::tempdir().unwrap();
        let serve_vars = crate::harness::serve_vars(&env, &dir, "", &[]);
        let token = tokentally(
            &["tokens", "add", "fin-api", "--role", "finance"],
            &serve_vars,
            None,
        );
        let serve = crate::harness::spawn_serve_in(&env, dir, "", &[]).await;
        let res = crate::web::client()
            .get(format!("{}/api/v1/overview?institution=uni-a", serve.base))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "the overview fails as a whole");
        let page: serde_json::Value = res.json().await.unwrap();
        let notes = page["notes"].to_string();
        assert!(
            notes.contains("As billed") && notes.contains("ledger"),
            "{page}"
        );
        assert!(
            page["figures"].to_string().contains("Spend this month"),
            "{page}"
        );
    }

    let restored = tokentally_output(&["ledger", "restore"], &vars, None);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert!(String::from_utf8_lossy(&restored.stderr).contains("restored 2 document(s)"));
    tokentally(&["ledger", "verify"], &vars, None);
    assert_eq!(number(&issue("uni-c")), format!("TT-{year}-000003"));
    // The restored register still refuses a second invoice for a period it holds.
    assert!(!issue("uni-a").status.success());
    let list = tokentally(&["invoice", "list"], &vars, None);
    for n in 1..=3 {
        assert!(list.contains(&format!("TT-{year}-00000{n}")), "{list}");
    }
    env.drop_database().await;
}

/// Finding 3: deleting a topic on the local broker deleted every topic, and librdkafka
/// crashed in every consumer. With the patched broker: deleting an unrelated topic leaves
/// ingest, serve and the other topics alone; deleting ingest's own topic does not crash it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_leaves_other_topics_and_running_processes_alive() {
    let env = TestEnv::new("deltopic", 2).await;
    let vars = env.cli_vars();
    let ledger_topic = vars
        .iter()
        .find(|(k, _)| *k == "TOKENTALLY_BILLING_LEDGER_TOPIC")
        .unwrap()
        .1
        .clone();
    let mut serve = crate::harness::spawn_serve(&env, "", &[]).await;
    let mut ingest = env.spawn_ingest();
    let batch = |from: usize| -> Vec<(String, Vec<u8>)> {
        (from..from + 100)
            .map(|i| {
                (
                    "uni-d".to_owned(),
                    event(
                        &format!("d-{i}"),
                        "uni-d",
                        "2026-10-09T12:00:00Z",
                        "gpt-4o-mini",
                        10,
                        1,
                    ),
                )
            })
            .collect()
    };
    env.produce(&batch(0)).await;
    env.wait_accounted(100, Duration::from_secs(60)).await;
    // serve's upkeep creates the (empty) ledger topic: nothing is issued yet.
    let started = Instant::now();
    while tokentally::kafka::partitions(&env.cfg.kafka, &ledger_topic)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve did not create the ledger topic"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let unrelated = format!("{}.unrelated", env.name);
    tokentally::kafka::ensure_topic(&env.cfg.kafka, &unrelated, 1, &[])
        .await
        .unwrap();
    delete_topic(&env.cfg.kafka, &unrelated).await;
    for topic in [&env.cfg.kafka.topic, &ledger_topic] {
        assert!(
            tokentally::kafka::partitions(&env.cfg.kafka, topic)
                .await
                .unwrap()
                .is_some(),
            "{topic} vanished with the unrelated topic"
        );
    }
    // The consumers crashed within a minute before the fix; ingest keeps working.
    tokio::time::sleep(Duration::from_secs(20)).await;
    env.produce(&batch(100)).await;
    env.wait_accounted(200, Duration::from_secs(60)).await;
    assert!(ingest.try_wait().unwrap().is_none(), "ingest died");
    assert!(serve.proc.try_wait().unwrap().is_none(), "serve died");

    // Even its own topic vanishing does not crash ingest (it waits for it to return).
    delete_topic(&env.cfg.kafka, &env.cfg.kafka.topic).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(
        ingest.try_wait().unwrap().is_none(),
        "ingest died when its topic was deleted"
    );
    assert!(terminate(&mut ingest).success());
    assert!(terminate(&mut serve.proc).success());
    env.drop_database().await;
}

/// Finding 4: two `reprice` runs at once both cancelled the same rows. The second is
/// refused while the first holds the lease; the totals are re-rated exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_reprice_runs_at_once_one_is_refused_and_totals_stay_exact() {
    let mut env = TestEnv::new("reprice2", 1).await;
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&env.prices).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    env.prices = dir.path().to_owned();
    let messages: Vec<(String, Vec<u8>)> = (0..2000)
        .map(|i| {
            (
                "uni-r".to_owned(),
                event(
                    &format!("r-{i}"),
                    "uni-r",
                    "2026-10-09T12:00:00Z",
                    "acme-llm-2",
                    1_000_000,
                    0,
                ),
            )
        })
        .collect();
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(2000, Duration::from_secs(60)).await;
    assert!(terminate(&mut ingest).success());
    std::fs::write(
        dir.path().join("acme.toml"),
        "[[price]]\nprovider = \"openai\"\nmodel = \"acme-llm-2\"\nmatch = [\"acme-llm-2\"]\n\
         effective_from = \"2026-01-01\"\ninput_per_mtok = \"2\"\noutput_per_mtok = \"8\"\n",
    )
    .unwrap();
    let mut vars = env.cli_vars();
    vars.push(("TOKENTALLY_PRICES", dir.path().display().to_string()));
    let run = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tokentally"));
        c.args(["reprice", "--since", "2026-10-01"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        for (k, v) in &vars {
            c.env(k, v);
        }
        c.spawn().unwrap()
    };
    let (a, b) = (run(), run());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let ok: Vec<_> = [&a, &b]
        .into_iter()
        .filter(|o| o.status.success())
        .collect();
    let refused: Vec<_> = [&a, &b]
        .into_iter()
        .filter(|o| !o.status.success())
        .collect();
    assert_eq!(ok.len(), 1, "exactly one run re-rates: {a:?} {b:?}");
    assert!(
        String::from_utf8_lossy(&refused[0].stderr).contains("running elsewhere"),
        "{}",
        String::from_utf8_lossy(&refused[0].stderr)
    );
    assert!(String::from_utf8_lossy(&ok[0].stdout).contains("2000 re-rated"));
    // 2000 × 1M input tokens × $2/M = $4000, in the raw table and every rollup.
    let (raw, rollup) = env.costs().await;
    assert_eq!(raw["uni-r"], Decimal::from(4000));
    assert_eq!(rollup["uni-r"], Decimal::from(4000));
    env.assert_rollups_match_events().await;
    // A migration that adds rollups, cut off after its backfill and run again from the
    // start, leaves them exact (each backfill empties its table first).
    for (name, sql) in tokentally::store::migrate::MIGRATIONS {
        if ["0012_daily_rollups.sql", "0013_billing_rollup.sql"].contains(name) {
            for stmt in tokentally::store::migrate::statements(sql) {
                env.exec(&stmt).await.unwrap();
            }
        }
    }
    env.assert_rollups_match_events().await;
    env.drop_database().await;
}

/// Finding 4: ingest priced with the book it started with until restarted. A price added
/// on disk applies to the next events without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_added_on_disk_applies_without_a_restart() {
    let mut env = TestEnv::new("reload", 1).await;
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(&env.prices).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    env.prices = dir.path().to_owned();
    let batch = |from: usize| -> Vec<(String, Vec<u8>)> {
        (from..from + 10)
            .map(|i| {
                (
                    "uni-p".to_owned(),
                    event(
                        &format!("p-{i}"),
                        "uni-p",
                        "2026-10-09T12:00:00Z",
                        "acme-llm-3",
                        1_000_000,
                        0,
                    ),
                )
            })
            .collect()
    };
    env.produce(&batch(0)).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(10, Duration::from_secs(60)).await;
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign * priced)) FROM usage_events").await,
        0
    );
    std::fs::write(
        dir.path().join("acme.toml"),
        "[[price]]\nprovider = \"openai\"\nmodel = \"acme-llm-3\"\nmatch = [\"acme-llm-3\"]\n\
         effective_from = \"2026-01-01\"\ninput_per_mtok = \"3\"\noutput_per_mtok = \"9\"\n",
    )
    .unwrap();
    // The book is compared with the files every 10 s.
    tokio::time::sleep(Duration::from_secs(12)).await;
    env.produce(&batch(10)).await;
    env.wait_accounted(20, Duration::from_secs(60)).await;
    assert!(terminate(&mut ingest).success());
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign * priced)) FROM usage_events").await,
        10
    );
    let (raw, _) = env.costs().await;
    assert_eq!(raw["uni-p"], Decimal::from(30));
    env.drop_database().await;
}

/// Finding 2: a stalled ingest was silent. With the table it writes to gone (a permanent
/// error), ingest halves its batch down to single messages and keeps retrying — nothing
/// is dropped — reports itself stalled, and `serve`'s evaluator raises "ingest stalled";
/// when the table is back, every message is stored and the alert resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_ingest_is_reported_alerted_and_recovers_without_losing_anything() {
    let mut env = TestEnv::new("stall", 1).await;
    env.config_toml = "[ingest]\nstall_secs = 10\nmax_backoff_ms = 2000\n".into();
    let messages: Vec<(String, Vec<u8>)> = (0..100)
        .map(|i| {
            (
                "uni-s".to_owned(),
                event(
                    &format!("s-{i}"),
                    "uni-s",
                    "2026-10-09T12:00:00Z",
                    "gpt-4o-mini",
                    10,
                    1,
                ),
            )
        })
        .collect();
    env.produce(&messages).await;
    env.exec("RENAME TABLE usage_events TO usage_events_parked")
        .await
        .unwrap();
    let mut ingest = env.spawn_ingest();

    let mut serve = crate::harness::spawn_serve(&env, "[alerts]\ninterval_secs = 2\n", &[]).await;
    let alert_state = |state: &'static str| {
        let ch = env.ch();
        async move {
            ch.query(
                "SELECT toUInt64(count()) FROM alerts WHERE kind = 'ingest_stalled' AND state = ?",
            )
            .bind(state)
            .fetch_one::<u64>()
            .await
            .unwrap_or(0)
        }
    };
    let started = Instant::now();
    while alert_state("firing").await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no ingest_stalled alert"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("ingest_stalled fired after {:?}", started.elapsed());
    let log = std::fs::read_to_string(env.log_path("ingest")).unwrap();
    assert!(
        log.contains("smaller parts"),
        "a refused batch is split: {log}"
    );
    assert!(log.contains("ingest stalled"), "{log}");

    env.exec("RENAME TABLE usage_events_parked TO usage_events")
        .await
        .unwrap();
    env.wait_accounted(100, Duration::from_secs(60)).await;
    let started = Instant::now();
    while alert_state("resolved").await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "ingest_stalled never resolved"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(terminate(&mut ingest).success());
    assert!(terminate(&mut serve.proc).success());
    assert_eq!(
        i64_of(&env, "SELECT toInt64(sum(sign)) FROM usage_events").await,
        100
    );
    assert_eq!(
        i64_of(
            &env,
            "SELECT toInt64(sum(events)) FROM usage_hourly_institution"
        )
        .await,
        100
    );
    env.drop_database().await;
}
