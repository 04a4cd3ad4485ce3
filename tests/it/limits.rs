//! Issue 29: several gateways, one truth. Limits through the shared store (a Redis of
//! the test's own, killed and restarted), the share rule without it, per-minute limits
//! across instances, and the end of a small budget.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::json;

use crate::budgets::{set_limit, until_limited, wait_stored, wave, worst_rates, Outcome};
use crate::gateway::{create_key, dec, until_accepted};
use crate::harness::{
    repo, spawn_gateway, spawn_redis, spawn_simulator, Gateway, Simulator, TestEnv,
};

async fn gateways(
    env: &TestEnv,
    sim: &Simulator,
    redis: Option<&str>,
    n: usize,
    dirs: &[tempfile::TempDir],
) -> Vec<Gateway> {
    let mut out = Vec::new();
    for (i, dir) in dirs.iter().enumerate().take(n) {
        let mut vars = env.gateway_vars(sim, dir.path());
        if let Some(url) = redis {
            vars.push(("TOKENTALLY_GATEWAY_SHARED_LIMITS_REDIS_URL", url.to_owned()));
        }
        out.push(spawn_gateway(env, &format!("g{i}"), vars).await);
    }
    out
}

/// Every refusal says what is left and that it is less than the request needs — or,
/// when the share rule holds the rest for another instance, says that too.
fn check_refusal(o: &Outcome) {
    assert_eq!(o.body["error"]["code"], "insufficient_quota", "{o:?}");
    let left = o
        .remaining
        .expect("x-tokentally-budget-remaining on a refusal");
    assert!(
        left < o.reserved,
        "a refusal says ${left} may still be admitted, for a ${} request",
        o.reserved
    );
    let msg = o.body["error"]["message"].as_str().unwrap();
    let stated: Decimal = msg
        .split("Left this period: $")
        .nth(1)
        .and_then(|r| r.split([';', ',']).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no amount left in {msg}"));
    assert!(
        stated < o.reserved || msg.contains("this gateway instance may admit"),
        "{msg}: says ${stated} is left of a ${} need and not why that is not enough",
        o.reserved
    );
}

/// Waves of `per` concurrent streams on every gateway at once, until a wave admits
/// nothing (`patience` such waves in a row, a refresh apart); returns (requests sent,
/// admitted, largest reservation).
async fn spend(
    gws: &[Gateway],
    key: &str,
    per: usize,
    first: usize,
    patience: usize,
) -> (u64, usize, Decimal) {
    let (mut sent, mut admitted, mut max_reserved, mut idle) = (0u64, 0usize, Decimal::ZERO, 0);
    for w in 0..40 {
        let waves = gws.iter().enumerate().map(|(i, g)| {
            wave(
                &g.base,
                key,
                per,
                first + w * 1000 + i * per,
                1000,
                "words=600,slow=1",
            )
        });
        let outcomes: Vec<Outcome> = futures::future::join_all(waves)
            .await
            .into_iter()
            .flatten()
            .collect();
        sent += outcomes.len() as u64;
        let n = outcomes.iter().filter(|o| o.status == 200).count();
        for o in &outcomes {
            max_reserved = max_reserved.max(o.reserved);
            match o.status {
                200 => assert!(o.complete, "an admitted stream did not end: {o:?}"),
                429 => check_refusal(o),
                s => panic!("status {s}: {o:?}"),
            }
        }
        admitted += n;
        if n == 0 {
            idle += 1;
            if idle == patience {
                return (sent, admitted, max_reserved);
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
        } else {
            idle = 0;
        }
    }
    panic!("the budget was never used up");
}

fn served(stored: &BTreeMap<String, (u64, Decimal)>) -> Decimal {
    stored
        .iter()
        .filter(|(s, _)| *s == "ok")
        .map(|(_, (_, c))| *c)
        .sum()
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Mode {
    instance: String,
    mode: String,
}

/// Waits until `n` gateways' latest reports (their heartbeat rows) say `mode`.
async fn until_mode(env: &TestEnv, n: usize, mode: &str) -> Duration {
    let start = Instant::now();
    loop {
        let rows: Vec<Mode> = env
            .ch()
            .query(
                "SELECT instance, mode FROM limit_holds WHERE limit_id = '' \
                 ORDER BY instance, reported_at DESC LIMIT 1 BY instance",
            )
            .fetch_all()
            .await
            .unwrap();
        if rows.len() >= n
            && rows
                .iter()
                .all(|r| r.mode == mode && !r.instance.is_empty())
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not all {mode}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Three gateways on one $0.50 key budget through the shared store, 300 concurrent
/// streams per wave: never over, and the budget's end is spent (unused < one
/// reservation); no refusal says more is left than it needs. The store is then killed:
/// the gateways fall back to shares and still never pass a raised budget; it comes back
/// empty: they give it back what they hold and are exact again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_share_one_store_spend_a_budget_to_its_end_and_survive_its_loss() {
    let env = TestEnv::new("shared3", 2).await;
    let sim = spawn_simulator(&env, &[]).await;
    let mut redis = spawn_redis().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let gws = gateways(&env, &sim, Some(&redis.url()), 3, &dirs).await;
    let _ingest = env.spawn_ingest();
    let (key_id, key) = create_key(&env, "uni-a", "ola", &[]);
    let limit_id = set_limit(
        &env,
        &["--institution", "uni-a", "--key", &key_id, "--usd", "0.50"],
    );
    assert_eq!(limit_id, format!("uni-a:key:{key_id}:usd:month"));
    let mut sent = 0;
    for gw in &gws {
        until_accepted(gw, &key).await;
        sent += until_limited(gw, &key).await.1;
    }
    until_mode(&env, 3, "exact").await;

    // Exact: to the end of the budget, never over.
    let (n, admitted, max_reserved) = spend(&gws, &key, 100, 0, 1).await;
    sent += n;
    let spent = served(&wait_stored(&env, &key_id, sent).await);
    assert!(spent <= dec("0.50"), "served ${spent} of a $0.50 budget");
    assert!(
        dec("0.50") - spent < max_reserved,
        "${} of $0.50 unused, more than one reservation (${max_reserved})",
        dec("0.50") - spent
    );
    println!(
        "three gateways, shared store, $0.50: {admitted} admitted, served ${spent}, unused ${}",
        dec("0.50") - spent
    );

    // The store dies: shares, never over.
    set_limit(
        &env,
        &["--institution", "uni-a", "--key", &key_id, "--usd", "1.00"],
    );
    redis.kill();
    let fell_back = until_mode(&env, 3, "fallback").await;
    let (n, admitted, _) = spend(&gws, &key, 100, 100_000, 2).await;
    sent += n;
    let spent = served(&wait_stored(&env, &key_id, sent).await);
    assert!(
        spent <= dec("1.00"),
        "served ${spent} of a $1.00 budget without the store"
    );
    println!("store killed: fallback on all three after {fell_back:?}; {admitted} admitted, served ${spent} of $1.00");

    // It comes back empty: exact again.
    redis.start().await;
    let back = until_mode(&env, 3, "exact").await;
    set_limit(
        &env,
        &["--institution", "uni-a", "--key", &key_id, "--usd", "1.50"],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (n, admitted, max_reserved) = spend(&gws, &key, 100, 200_000, 1).await;
    sent += n;
    let spent = served(&wait_stored(&env, &key_id, sent).await);
    assert!(spent <= dec("1.50"), "served ${spent} of a $1.50 budget");
    assert!(
        dec("1.50") - spent < max_reserved,
        "${} of $1.50 unused after the store came back (one reservation: ${max_reserved})",
        dec("1.50") - spent
    );
    println!("store back: exact on all three after {back:?}; {admitted} admitted, served ${spent} of $1.50");
    env.drop_database().await;
}

/// Without a store, two gateways, one of them idle (live, but serving none of the key's
/// traffic): the busy one admits as if it were alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_an_idle_gateway_does_not_shrink_the_busy_ones_share() {
    let env = TestEnv::new("idle2", 2).await;
    let sim = spawn_simulator(&env, &[]).await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let gws = gateways(&env, &sim, None, 2, &dirs).await;
    let _ingest = env.spawn_ingest();
    let (key_id, key) = create_key(&env, "uni-a", "ida", &[]);
    set_limit(
        &env,
        &["--institution", "uni-a", "--key", &key_id, "--usd", "1.00"],
    );
    until_accepted(&gws[0], &key).await;
    until_accepted(&gws[1], &key).await;
    let (_, sent) = until_limited(&gws[0], &key).await;
    let before = served(&wait_stored(&env, &key_id, sent).await);
    // Both have reported for a few refreshes: the idle one is live.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outcomes = wave(&gws[0].base, &key, 100, 0, 1000, "words=600,slow=1").await;
    let admitted = outcomes.iter().filter(|o| o.status == 200).count();
    let r = outcomes[0].reserved;
    let alone = ((dec("1.00") - before) / r).floor();
    assert_eq!(
        Decimal::from(admitted as u64),
        alone,
        "admitted {admitted}; alone it would admit {alone}"
    );
    for o in outcomes.iter().filter(|o| o.status == 429) {
        check_refusal(o);
    }
    println!(
        "one busy gateway beside an idle one: {admitted} of 100 admitted at once (alone: {alone})"
    );
    env.drop_database().await;
}

/// `--rpm 60` across three gateways through the store: exactly 60 admitted in a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_requests_per_minute_across_three_gateways_are_exactly_sixty() {
    let env = TestEnv::new("rpm3", 2).await;
    let sim = spawn_simulator(&env, &[]).await;
    let redis = spawn_redis().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let gws = gateways(&env, &sim, Some(&redis.url()), 3, &dirs).await;
    let (_, key) = create_key(&env, "uni-a", "rita", &["--rpm", "60"]);
    for gw in &gws {
        until_accepted(gw, &key).await;
    }
    // The key's first minute starts now (the probes above were /v1/models, not counted).
    let http = crate::web::client();
    let started = Instant::now();
    let calls = (0..90).map(|i| {
        let (http, base, key) = (http.clone(), gws[i % 3].base.clone(), key.clone());
        async move {
            let r = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .header("x-simulator", "words=1")
                .json(&json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": format!("r{i}")}]}))
                .send()
                .await
                .unwrap();
            let remaining = r
                .headers()
                .get("x-ratelimit-remaining-requests")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (r.status().as_u16(), remaining)
        }
    });
    let results = futures::future::join_all(calls).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(50),
        "the 90 requests took {took:?}: not one minute"
    );
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let limited = results.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!((ok, limited), (60, 30), "{results:?}");
    // Every admitted request said how many are left; together they counted 59 down to 0.
    let mut left: Vec<u64> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, r)| r.expect("x-ratelimit-remaining-requests"))
        .collect();
    left.sort_unstable();
    assert_eq!(left, (0..60).collect::<Vec<u64>>());
    println!("rpm 60 over three gateways: {ok} admitted, {limited} refused in {took:?}");
    env.drop_database().await;
}

/// The dearest OpenAI model whose worst case without `max_tokens` fits `budget`, by the
/// README's rule read from the price book's TOML (prompt: body bytes + 512; output: the
/// model's `max_output_tokens`; both at the dearest rates of its entries): (model, USD).
fn dearest_fitting(budget: Decimal, body_len: impl Fn(&str) -> usize) -> (String, Decimal) {
    let mut max_out: BTreeMap<String, i64> = BTreeMap::new();
    let mut excluded = std::collections::BTreeSet::new();
    for file in std::fs::read_dir(repo().join("prices")).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let doc: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for e in doc
            .get("price")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
        {
            let models: Vec<String> = match e.get("match") {
                Some(toml::Value::String(s)) => vec![s.clone()],
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => vec![],
            };
            let odd = e.get("provider").and_then(|p| p.as_str()) != Some("openai")
                || e.get("tier").is_some()
                || e.get("per_request").is_some()
                || e.get("match_regex").is_some();
            for m in models {
                if odd {
                    excluded.insert(m);
                    continue;
                }
                if let Some(out) = e.get("max_output_tokens").and_then(|v| v.as_integer()) {
                    let o = max_out.entry(m).or_default();
                    *o = (*o).max(out);
                }
            }
        }
    }
    let mut best: Option<(String, Decimal)> = None;
    for (model, out) in max_out.into_iter().filter(|(m, _)| !excluded.contains(m)) {
        let (i, o) = worst_rates(&model);
        let prompt = body_len(&model) as u64 + 512;
        let wc =
            (Decimal::from(prompt) * i + Decimal::from(out as u64) * o) / Decimal::from(1_000_000);
        if wc <= budget && best.as_ref().is_none_or(|(_, b)| wc > *b) {
            best = Some((model, wc));
        }
    }
    best.expect("a model whose worst case fits")
}

/// A student with $5 a month and three gateways: the first request without `max_tokens`
/// to the dearest model whose worst case fits $5 is admitted — through the store, and
/// without one (the other two gateways idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_dollar_budget_admits_a_first_uncapped_request_to_the_dearest_model_that_fits() {
    let env = TestEnv::new("five", 2).await;
    let sim = spawn_simulator(&env, &[]).await;
    let redis = spawn_redis().await;
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let shared = gateways(&env, &sim, Some(&redis.url()), 3, &dirs[..3]).await;
    let alone = gateways(&env, &sim, None, 3, &dirs[3..]).await;
    let http = crate::web::client();
    for (name, gws) in [("shared store", &shared), ("no store", &alone)] {
        let (key_id, key) = create_key(&env, "uni-a", &format!("stud-{}", name.len()), &[]);
        set_limit(
            &env,
            &["--institution", "uni-a", "--key", &key_id, "--usd", "5"],
        );
        for gw in gws.iter() {
            until_accepted(gw, &key).await;
        }
        // The limit applies (a one-token probe carries the budget header).
        until_limited(&gws[1], &key).await;
        let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
        let (model, worst) = dearest_fitting(Decimal::from(5), |m| {
            serde_json::to_vec(&body(m)).unwrap().len()
        });
        let res = http
            .post(format!("{}/v1/chat/completions", gws[1].base))
            .bearer_auth(&key)
            .header("x-simulator", "words=3")
            .json(&body(&model))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        assert_eq!(
            status, 200,
            "{name}: {model} (worst case ${worst}) refused under $5: {text}"
        );
        println!("$5 budget, three gateways ({name}): first uncapped request to {model} (worst case ${worst}) admitted");
    }
    env.drop_database().await;
}
