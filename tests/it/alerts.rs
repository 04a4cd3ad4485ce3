//! Alerts through the real binary and ClickHouse: a backtest over a synthetic month with
//! weekly seasonality and labelled spikes (precision and recall), and live delivery to a
//! local webhook receiver (signature checked, first attempts refused) and a real SMTP
//! server (aiosmtpd), one message per incident and one "resolved", across a restart.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, Duration as Span, DurationRound, TimeZone, Timelike, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use tokentally::store::rows::EventRow;

use crate::harness::{event_row, terminate, tokentally, TestEnv};
use crate::web::{client, free_port, wait_for_port};

fn spend_row(
    id: String,
    inst: &str,
    key: &str,
    at: DateTime<Utc>,
    cost: Decimal,
    sign: i8,
) -> EventRow {
    EventRow {
        user_id: format!("user-{key}"),
        api_key_id: key.into(),
        input_tokens: 1000,
        output_tokens: 100,
        cost,
        price_id: "x".into(),
        sign,
        ..event_row(id, inst, at, "gpt-4o-mini")
    }
}

/// The dashboard's alerts as `token` sees them (`GET /api/v1/alerts`).
async fn alerts_listed(base: &str, token: &str) -> Vec<Value> {
    let v: Value = client()
        .get(format!("{base}/api/v1/alerts"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["alerts"].as_array().unwrap().clone()
}

struct Lcg(u64);
impl Lcg {
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Spend shape of a working week: office hours on weekdays, quiet evenings, nights
/// and weekends.
fn season(t: DateTime<Utc>) -> f64 {
    let weekend = t.weekday().num_days_from_monday() >= 5;
    match (weekend, t.hour()) {
        (true, 10..=17) => 0.15,
        (true, _) => 0.05,
        (false, 8..=17) => 1.0,
        (false, 18..=22) => 0.35,
        (false, _) => 0.06,
    }
}

struct Spike {
    inst: &'static str,
    key: &'static str,
    start: DateTime<Utc>,
    hours: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backtest_fires_for_injected_spikes_not_for_weekly_seasonality() {
    let env = TestEnv::new("alerts_backtest", 1).await;
    // Five weeks of history, then the month under test (four weeks from a Monday).
    let month = Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap();
    assert_eq!(month.weekday(), chrono::Weekday::Mon);
    let history = month - Span::weeks(5);
    let end = month + Span::weeks(4);
    // Institutions: peak spend per office hour; one is tiny and must never page.
    let institutions = [
        ("big-uni", 60.0),
        ("mid-uni", 25.0),
        ("lab", 12.0),
        ("college", 30.0),
        ("tiny", 0.3),
    ];
    let keys = [("k1", 0.5), ("k2", 0.3), ("k3", 0.2)];
    let h = |d: i64, hour: i64| month + Span::days(d) + Span::hours(hour);
    // Labelled spikes: runaway scripts and leaked keys, on weekdays and weekends, by day
    // and by night, 2-3 hours each.
    let spikes = [
        Spike {
            inst: "big-uni",
            key: "k3",
            start: h(2, 3),
            hours: 2,
        },
        Spike {
            inst: "mid-uni",
            key: "k1",
            start: h(4, 11),
            hours: 3,
        },
        Spike {
            inst: "college",
            key: "k2",
            start: h(5, 22),
            hours: 2,
        },
        Spike {
            inst: "lab",
            key: "k1",
            start: h(6, 14),
            hours: 2,
        },
        Spike {
            inst: "big-uni",
            key: "k1",
            start: h(9, 9),
            hours: 2,
        },
        Spike {
            inst: "college",
            key: "k3",
            start: h(11, 2),
            hours: 3,
        },
        Spike {
            inst: "mid-uni",
            key: "k2",
            start: h(13, 19),
            hours: 2,
        },
        Spike {
            inst: "lab",
            key: "k2",
            start: h(15, 1),
            hours: 2,
        },
        Spike {
            inst: "big-uni",
            key: "k2",
            start: h(17, 15),
            hours: 2,
        },
        Spike {
            inst: "college",
            key: "k1",
            start: h(20, 12),
            hours: 3,
        },
        Spike {
            inst: "mid-uni",
            key: "k3",
            start: h(23, 4),
            hours: 2,
        },
        Spike {
            inst: "lab",
            key: "k3",
            start: h(26, 10),
            hours: 2,
        },
    ];
    let mut rng = Lcg(42);
    let mut rows = Vec::new();
    let mut t = history;
    let mut n = 0;
    while t < end {
        for (inst, peak) in institutions {
            for (key, share) in keys {
                let noise = 0.75 + 0.5 * rng.unit();
                let mut v = peak * share * season(t) * noise;
                if spikes.iter().any(|s| {
                    s.inst == inst
                        && s.key == key
                        && t >= s.start
                        && t < s.start + Span::hours(s.hours)
                }) {
                    // A spike: the key spends like ten busy office hours.
                    v = v.max(peak * share) * 10.0;
                }
                let cost = Decimal::from_f64_retain(v).unwrap().round_dp(6);
                rows.push(spend_row(
                    format!("e{n}"),
                    inst,
                    key,
                    t + Span::minutes(7),
                    cost,
                    1,
                ));
                n += 1;
            }
        }
        t += Span::hours(1);
    }
    for chunk in rows.chunks(20_000) {
        env.store.insert_events(chunk).await.unwrap();
    }
    // The live evaluator reads keys only in the hours its windows look at; its readings
    // equal those from every hour, every 5 hours of the month, with institutions in a
    // zone +05:30 and one -05:00 (DST) as well as UTC.
    {
        use tokentally::alerts::evaluator::{load_live_series, load_series, spend_readings};
        let mut cfg = env.cfg.clone();
        for (id, tz) in [("mid-uni", "Asia/Kolkata"), ("lab", "America/New_York")] {
            cfg.institutions
                .push(toml::from_str(&format!("id = \"{id}\"\ntime_zone = \"{tz}\"")).unwrap());
        }
        let tracker = tokentally::alerts::Tracker::default();
        let mut at = month + Span::hours(1);
        let mut compared = 0;
        while at < end {
            let from = at - Span::weeks(4) - Span::hours(1);
            let from = from.min(at - Span::days(32));
            let full = load_series(&env.store, from, at).await.unwrap();
            let live = load_live_series(&cfg, &env.store, from, at).await.unwrap();
            assert!(
                live.keys.values().map(|s| s.len()).sum::<usize>() * 4
                    < full.keys.values().map(|s| s.len()).sum::<usize>()
            );
            let a = spend_readings(&cfg, &full, at, &tracker);
            let b = spend_readings(&cfg, &live, at, &tracker);
            assert_eq!(a, b, "readings at {at}");
            compared += a.len();
            at += Span::hours(5);
        }
        assert!(compared > 1000, "{compared} readings compared");
    }
    let mut vars = env.cli_vars();
    vars.push(("TOKENTALLY_LOG", "warn".into()));
    let out = tokentally(
        &[
            "alerts",
            "backtest",
            "--from",
            "2026-06-01",
            "--to",
            "2026-06-28",
            "--format",
            "json",
        ],
        &vars,
        None,
    );
    let fired: Vec<Value> = serde_json::from_str(&out).unwrap();
    let spike_alerts: Vec<&Value> = fired
        .iter()
        .filter(|a| a["kind"] == "institution_spike" || a["kind"] == "key_spike")
        .collect();
    let at = |v: &Value| v.as_str().unwrap().parse::<DateTime<Utc>>().unwrap();
    // An alert is a true positive if it names the spiking institution or key and fires
    // while the spike runs (or within the hour after it).
    let matches = |a: &Value, s: &Spike| {
        let entity = a["entity"].as_str().unwrap();
        let who = entity == s.inst || entity == format!("{}/{}", s.inst, s.key);
        let t = at(&a["fired_at"]);
        who && t > s.start && t <= s.start + Span::hours(s.hours + 1)
    };
    let true_positives = spike_alerts
        .iter()
        .filter(|a| spikes.iter().any(|s| matches(a, s)))
        .count();
    let detected = spikes
        .iter()
        .filter(|s| spike_alerts.iter().any(|a| matches(a, s)))
        .count();
    let precision = true_positives as f64 / spike_alerts.len().max(1) as f64;
    let recall = detected as f64 / spikes.len() as f64;
    println!(
        "backtest: {} spike alerts, {true_positives} on injected spikes; {detected}/{} spikes detected; precision {precision:.3}, recall {recall:.3}",
        spike_alerts.len(),
        spikes.len()
    );
    for a in &spike_alerts {
        if !spikes.iter().any(|s| matches(a, s)) {
            println!("  false positive: {a}");
        }
    }
    assert!(precision >= 0.9, "precision {precision:.3}");
    assert!(recall >= 0.9, "recall {recall:.3}");
    // The tiny institution never pages, and every spike alert resolved once it was over.
    assert!(fired
        .iter()
        .all(|a| !a["entity"].as_str().unwrap().starts_with("tiny")));
    assert!(spike_alerts.iter().all(|a| !a["resolved_at"].is_null()));
    env.drop_database().await;
}

use crate::harness::Proc as KillOnDrop;

/// A webhook receiver that refuses the first `fail_first` requests and records the rest
/// after checking their signature.
#[derive(Default)]
struct Receiver {
    refused: usize,
    bodies: Vec<Value>,
    bad_signatures: usize,
}

async fn start_receiver(secret: &'static str, fail_first: usize) -> (u16, Arc<Mutex<Receiver>>) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let state = Arc::new(Mutex::new(Receiver::default()));
    let s = state.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            async move {
                let mut r = s.lock().unwrap();
                if r.refused < fail_first {
                    r.refused += 1;
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                use hmac::Mac;
                let ts = headers["x-tokentally-timestamp"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let sig = headers["x-tokentally-signature"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                let mut mac =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
                mac.update(format!("{ts}.").as_bytes());
                mac.update(&body);
                let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                if sig != want {
                    r.bad_signatures += 1;
                    return StatusCode::UNAUTHORIZED;
                }
                r.bodies.push(serde_json::from_slice(&body).unwrap());
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, state)
}

fn mails(dir: &Path) -> Vec<String> {
    let new = dir.join("new");
    let mut out: Vec<String> = std::fs::read_dir(&new)
        .map(|d| {
            d.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn states(r: &Receiver) -> BTreeSet<(String, String, String)> {
    r.bodies
        .iter()
        .map(|b| {
            (
                b["alert"]["kind"].as_str().unwrap().to_owned(),
                b["alert"]["entity"].as_str().unwrap().to_owned(),
                b["alert"]["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_are_signed_delivered_once_retried_and_resolved_across_restarts() {
    let env = TestEnv::new("alerts_live", 1).await;
    let now = Utc::now();
    let hour = now.duration_trunc(Span::hours(1)).unwrap();
    // Baseline: $1 in this hour and the next, on each of the last four weeks; then a
    // leaked key spends $60 this hour (and $6 next hour, in case the hour turns mid-test).
    let mut rows = Vec::new();
    for w in 1..=4 {
        for (i, h) in [hour, hour + Span::hours(1)].into_iter().enumerate() {
            rows.push(spend_row(
                format!("base-{w}-{i}"),
                "uni-x",
                "pk_leak",
                h - Span::weeks(w) + Span::minutes(5),
                Decimal::ONE,
                1,
            ));
        }
    }
    let spike_now = spend_row(
        "spike-0".into(),
        "uni-x",
        "pk_leak",
        hour + Span::minutes(1),
        Decimal::from(60),
        1,
    );
    let spike_next = spend_row(
        "spike-1".into(),
        "uni-x",
        "pk_leak",
        hour + Span::hours(1) + Span::minutes(1),
        Decimal::from(6),
        1,
    );
    rows.push(spike_now.clone());
    rows.push(spike_next.clone());
    // A model without a price shows up (unpriced, cost 0).
    let mut mystery = spend_row(
        "mystery-0".into(),
        "uni-x",
        "pk_other",
        hour + Span::minutes(2),
        Decimal::ZERO,
        1,
    );
    mystery.priced = 0;
    mystery.model = "mystery-model".into();
    rows.push(mystery.clone());
    env.store.insert_events(&rows).await.unwrap();
    // And a burst of rejected messages, above the configured 3 per hour.
    let rejected: Vec<tokentally::store::rows::RejectedRow> = (0..5)
        .map(|i| tokentally::store::rows::RejectedRow {
            received_at: now.timestamp() as u32,
            kafka_topic: "t".into(),
            kafka_partition: 0,
            kafka_offset: 1000 + i,
            kafka_key: b"uni-x".to_vec(),
            reason: "invalid_json".into(),
            detail: "test".into(),
            payload: b"{".to_vec(),
            institution_id: "uni-x".into(),
            occurred_at: 0,
        })
        .collect();
    env.store.insert_rejected(&rejected).await.unwrap();
    // Month-to-date (UTC) spend so far; the budget puts it at 85%: 50% and 80% fire.
    let month_start = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    let mtd: Decimal = rows
        .iter()
        // As the evaluator counts: whole hours up to and including the current one.
        .filter(|r| {
            i64::from(r.occurred_at) >= month_start.timestamp()
                && i64::from(r.occurred_at) < (hour + Span::hours(1)).timestamp()
        })
        .map(|r| r.cost)
        .sum();
    let budget = (mtd * Decimal::from(100) / Decimal::from(85)).round_dp(2);

    let secret = "s3cret-hook-key";
    let (hook_port, receiver) = start_receiver(secret, 2).await;
    let smtp_port = free_port();
    let mail_root = tempfile::tempdir().unwrap();
    // aiosmtpd's Mailbox creates the maildir (tmp/new/cur) if it does not exist yet.
    let maildir = mail_root.path().join("maildir");
    let _smtp = KillOnDrop(
        std::process::Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{smtp_port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
                maildir.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m aiosmtpd (scripts/services install-test-tools)"),
    );
    wait_for_port(smtp_port).await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[alerts]
interval_secs = 1
rejected_per_hour = 3
dashboard_url = "http://dashboard.example"
[alerts.spike]
# Resolve at the first recovered reading: the test cannot wait the default two hours.
recover_hours = 0
[alerts.webhook]
url = "http://127.0.0.1:{hook_port}/hook"
retry_initial_ms = 200
[alerts.email]
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
security = "none"
from = "tokentally <alerts@example.org>"
to = ["ops@example.org"]
retry_initial_ms = 200
[[institutions]]
id = "uni-x"
monthly_budget_usd = "{budget}"
"#
        ),
    )
    .unwrap();
    let extra = [
        ("TOKENTALLY_ALERTS_WEBHOOK_SECRET", secret.to_owned()),
        ("TOKENTALLY_LOG", "info".to_owned()),
    ];
    let text = std::fs::read_to_string(&config).unwrap();
    let serve_dir = tempfile::tempdir().unwrap();
    let vars = crate::harness::serve_vars(&env, &serve_dir, &text, &extra);
    let ops = tokentally(&["tokens", "add", "ops-api", "--role", "ops"], &vars, None);
    let mut server = crate::harness::spawn_serve_in(&env, serve_dir, &text, &extra).await;

    let firing: BTreeSet<(String, String, String)> = [
        ("institution_spike", "uni-x".to_owned()),
        ("key_spike", "uni-x/pk_leak".to_owned()),
        ("budget", format!("uni-x/{}/50", now.format("%Y-%m"))),
        ("budget", format!("uni-x/{}/80", now.format("%Y-%m"))),
        ("unpriced_model", "mystery-model".to_owned()),
        ("rejections", "rejected_events".to_owned()),
    ]
    .into_iter()
    .map(|(k, e)| (k.to_owned(), e, "firing".to_owned()))
    .collect();
    wait_until("six firing webhooks", Duration::from_secs(60), || {
        states(&receiver.lock().unwrap()) == firing
    })
    .await;
    wait_until("six e-mails", Duration::from_secs(30), || {
        mails(&maildir).len() == 6
    })
    .await;
    // Several evaluation rounds and a restart later: nothing is announced again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(terminate(&mut server.proc).success());
    // Restarted on the same users and config.
    let serve_dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    drop(server);
    let mut server = crate::harness::spawn_serve_in(&env, serve_dir, &text, &extra).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    {
        let r = receiver.lock().unwrap();
        assert_eq!(r.bodies.len(), 6, "{:#?}", r.bodies);
        assert_eq!(
            r.refused, 2,
            "the first two attempts were refused and retried"
        );
        assert_eq!(r.bad_signatures, 0);
        let text = r
            .bodies
            .iter()
            .find(|b| b["alert"]["kind"] == "key_spike")
            .unwrap();
        assert!(text["text"].as_str().unwrap().contains("[FIRING]"));
        assert!(text["attachments"][0]["fields"].as_array().unwrap().len() >= 5);
    }
    assert_eq!(mails(&maildir).len(), 6);
    let mail = mails(&maildir)
        .into_iter()
        .find(|m| m.contains("key spike"))
        .unwrap();
    assert!(
        mail.contains("To: ops@example.org") && mail.contains("http://dashboard.example/alerts"),
        "{mail}"
    );

    // The leaked key is revoked and the unpriced event re-rated away: its spend is
    // cancelled, both spikes and the unpriced model resolve, once each.
    let mut cancel = vec![spike_now, spike_next, mystery];
    for r in &mut cancel {
        r.sign = -1;
    }
    env.store.insert_events(&cancel).await.unwrap();
    let mut all = firing.clone();
    all.insert((
        "institution_spike".into(),
        "uni-x".into(),
        "resolved".into(),
    ));
    all.insert((
        "key_spike".into(),
        "uni-x/pk_leak".into(),
        "resolved".into(),
    ));
    all.insert((
        "unpriced_model".into(),
        "mystery-model".into(),
        "resolved".into(),
    ));
    wait_until("three resolved webhooks", Duration::from_secs(60), || {
        states(&receiver.lock().unwrap()) == all
    })
    .await;
    wait_until("nine e-mails", Duration::from_secs(30), || {
        mails(&maildir).len() == 9
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.lock().unwrap().bodies.len(), 9);

    // The dashboard lists them; ops acknowledge one.
    let base = server.base.clone();
    let http = client();
    let alerts = alerts_listed(&base, &ops).await;
    assert_eq!(alerts.len(), 6);
    assert_eq!(
        alerts.iter().filter(|a| a["state"] == "resolved").count(),
        3
    );
    let id = alerts[0]["alert_id"].as_str().unwrap();
    let res = http
        .post(format!("{base}/api/v1/alerts/{id}/ack"))
        .bearer_auth(&ops)
        .form(&[("csrf", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let acked = alerts_listed(&base, &ops)
        .await
        .into_iter()
        .find(|a| a["alert_id"] == id)
        .unwrap();
    assert_eq!(acked["acknowledged_by"], "ops-api");
    assert_eq!(
        http.get(format!("{base}/api/v1/alerts"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(terminate(&mut server.proc).success());
    env.drop_database().await;
}

/// Issue 15: the labelled set, loaded into ClickHouse as events, scored by the command
/// ops use (`alerts backtest --labels`) with the default detector settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_labelled_set_scores_within_the_goals_through_the_cli() {
    let env = TestEnv::new("alerts_labelled", 1).await;
    let set = tokentally::alerts::labelled::generate();
    let rows: Vec<EventRow> = set
        .rows
        .iter()
        .enumerate()
        .map(|(n, (t, inst, key, micros))| EventRow {
            api_key_id: key.clone(),
            cost: Decimal::new(*micros, 6),
            price_id: "p".into(),
            ..event_row(format!("l{n}"), inst, *t, "m")
        })
        .collect();
    for chunk in rows.chunks(20_000) {
        env.store.insert_events(chunk).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.json");
    std::fs::write(&labels, serde_json::to_vec_pretty(&set.labels).unwrap()).unwrap();
    let config = dir.path().join("config.toml");
    let institutions: String = set
        .institutions
        .iter()
        .map(|(id, tz)| format!("[[institutions]]\nid = \"{id}\"\ntime_zone = \"{tz}\"\n"))
        .collect();
    std::fs::write(&config, institutions).unwrap();
    let mut vars = env.cli_vars();
    vars.push(("TOKENTALLY_LOG", "warn".into()));
    vars.push(("TOKENTALLY_CONFIG", config.display().to_string()));
    let from = set.from.date_naive().to_string();
    let to = (set.to - Span::days(1)).date_naive().to_string();
    let args = [
        "alerts",
        "backtest",
        "--from",
        &from,
        "--to",
        &to,
        "--labels",
        labels.to_str().unwrap(),
    ];
    let table = tokentally(&args, &vars, None);
    println!("{table}");
    let mut json_args = args.to_vec();
    json_args.extend(["--format", "json"]);
    let s: Value = serde_json::from_str(&tokentally(&json_args, &vars, None)).unwrap();
    assert_eq!(s["labels"], 15, "{table}");
    assert!(s["precision"].as_f64().unwrap() >= 0.95, "{table}");
    assert!(s["recall"].as_f64().unwrap() >= 0.95, "{table}");
    assert!(s["median_delay_hours"].as_f64().unwrap() <= 1.0, "{table}");
    assert!(
        s["false_pages_per_institution_week"].as_f64().unwrap() <= 0.05,
        "{table}"
    );
    assert_eq!(s["resolved_within_6h"], s["detected"], "{table}");
    assert!(table.contains("precision") && table.contains("false pages per institution-week"));
    env.drop_database().await;
}

/// Issue 36: a leaked key is paged within minutes by its spend rate, before its hour
/// reaches the hourly detector's threshold. Four weeks of history around this time of
/// the week for two keys ($0.02 every 5 minutes); now one of them spends $3 in the last
/// 9 minutes (its hour stays under the hourly floor of $5), the other goes on as usual.
/// The live evaluator pages the leaked key's spike with the 5-minute window named,
/// within seconds, and never the calm key nor the institution (nor the key's user: one
/// leak, one page). A user whose jump is spread over four keys, each under a key's
/// floor, is paged as a user; a key spike a gateway raised meanwhile is adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_key_is_paged_within_minutes_by_its_spend_rate() {
    let env = TestEnv::new("alerts_rate", 1).await;
    let now = Utc::now().duration_trunc(Span::minutes(1)).unwrap();
    let mut rows = Vec::new();
    // pk_gw is another institution's (its leak alone stays under the institution floor).
    let inst_of = |key: &str| if key == "pk_gw" { "uni-v" } else { "uni-y" };
    for key in ["pk_fast", "pk_calm", "pk_gw"] {
        for w in 1..=4 {
            let then = now - Span::weeks(w);
            for i in -84..=84 {
                rows.push(spend_row(
                    format!("{key}-{w}-{i}"),
                    inst_of(key),
                    key,
                    then + Span::minutes(5 * i),
                    Decimal::new(2, 2),
                    1,
                ));
            }
        }
        // Today up to now, as usual.
        for i in -84..0 {
            rows.push(spend_row(
                format!("{key}-now-{i}"),
                inst_of(key),
                key,
                now + Span::minutes(5 * i),
                Decimal::new(2, 2),
                1,
            ));
        }
    }
    // The leak: $3 over the last 9 minutes (pk_gw's, as stored later).
    let mut gw_rows = Vec::new();
    for m in 1..=8 {
        for (key, to) in [("pk_fast", &mut rows), ("pk_gw", &mut gw_rows)] {
            to.push(spend_row(
                format!("leak-{key}-{m}"),
                inst_of(key),
                key,
                now - Span::minutes(9) + Span::minutes(m),
                Decimal::new(375, 3),
                1,
            ));
        }
    }
    // A user spreading a jump over four keys (each under a key's floors: $0.40 in 5
    // minutes against $0.42; together $2.56 in 8 minutes, $1.60 in the last 5, against a
    // usual $0.02 per 5 minutes): the user's page, no key's.
    let ola = |id: String, key: &str, at: DateTime<Utc>, cost: Decimal| EventRow {
        user_id: "ola".into(),
        ..spend_row(id, "uni-u", key, at, cost, 1)
    };
    for k in 1..=4 {
        let key = format!("pk_u{k}");
        for w in 1..=4 {
            for i in -84..=84 {
                rows.push(ola(
                    format!("{key}-{w}-{i}"),
                    &key,
                    now - Span::weeks(w) + Span::minutes(5 * i),
                    Decimal::new(5, 3),
                ));
            }
        }
        for m in 1..=8 {
            rows.push(ola(
                format!("{key}-leak-{m}"),
                &key,
                now - Span::minutes(9) + Span::minutes(m),
                Decimal::new(8, 2),
            ));
        }
    }
    env.store.insert_events(&rows).await.unwrap();

    let text = "[alerts]\ninterval_secs = 1\n[[institutions]]\nid = \"uni-y\"\n";
    let serve_dir = tempfile::tempdir().unwrap();
    let vars = crate::harness::serve_vars(&env, &serve_dir, text, &[]);
    let ops = tokentally(&["tokens", "add", "ops-api", "--role", "ops"], &vars, None);
    let mut server = crate::harness::spawn_serve_in(&env, serve_dir, text, &[]).await;
    let base = server.base.clone();
    let list = || alerts_listed(&base, &ops);
    let started = Instant::now();
    let alert = loop {
        if let Some(a) = list()
            .await
            .into_iter()
            .find(|a| a["kind"] == "key_spike" && a["entity"] == "uni-y/pk_fast")
        {
            break a;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no page for the leaked key: {:?}",
            list().await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let message = alert["message"].as_str().unwrap();
    assert!(
        message.starts_with("API key uni-y/pk_fast spent $")
            && message.contains("in the last 5 min")
            && message.ends_with("(spend rate)"),
        "{message}"
    );
    // A gateway pages a third key while the evaluator runs (as `gateway::spend_watch`
    // records it), then its leak reaches the store: the evaluator adopts that incident
    // and sends no second page.
    let gw_page = tokentally::alerts::Transition {
        alert_id: "gwpage0000000001".into(),
        resolved: false,
        reopened: false,
        at: Utc::now(),
        reading: tokentally::alerts::Reading {
            kind: tokentally::alerts::Kind::KeySpike,
            entity: "uni-v/pk_gw".into(),
            institution: "uni-v".into(),
            firing: true,
            severity: tokentally::alerts::Severity::Warning,
            observed: Decimal::new(3, 0),
            baseline: Decimal::new(6, 2),
            threshold: Decimal::new(125, 2),
            message: "API key uni-v/pk_gw spent $3.00 in the last 15 min; usual for this time of the week: $0.06 (spend rate, seen at the gateway)".into(),
        },
    };
    tokentally::alerts::evaluator::record(&env.store, &[gw_page])
        .await
        .unwrap();
    env.store.insert_events(&gw_rows).await.unwrap();
    // A few more rounds: the calm key and the institution stay quiet, the gateway's
    // incident is the only one of its key.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = list().await;
    assert!(
        all.iter().all(|a| a["entity"] == "uni-y/pk_fast"
            || a["alert_id"] == "gwpage0000000001"
            || a["entity"] == "uni-u/user:ola"),
        "only the leaked key and the user page, the gateway's page is adopted: {all:?}"
    );
    let user = all
        .iter()
        .find(|a| a["entity"] == "uni-u/user:ola")
        .unwrap_or_else(|| panic!("no page for the user: {all:?}"));
    assert_eq!(user["kind"], "user_spike");
    let message = user["message"].as_str().unwrap();
    assert!(
        message.starts_with("user ola of uni-u spent $")
            && message.contains("in the last 5 min")
            && message.ends_with("(spend rate)"),
        "{message}"
    );
    assert!(terminate(&mut server.proc).success());
    env.drop_database().await;
}

/// Issue 36, item 3: with `on_spike = "suspend_key"`, a key paged for its spend rate is
/// paused on the gateway (refused, saying why and how to get it back) and the pause is in
/// the key log; acknowledging the alert restores it on the gateway within a key refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiking_key_is_paused_until_its_alert_is_acknowledged() {
    let env = TestEnv::new("alerts_brake", 1).await;
    let sim = crate::harness::spawn_simulator(&env, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gw = crate::harness::spawn_gateway(&env, "a", env.gateway_vars(&sim, dir.path())).await;
    let _ingest = env.spawn_ingest();
    let (key_id, key) = crate::gateway::create_key(&env, "uni-z", "u1", &[]);
    crate::gateway::until_accepted(&gw, &key).await;

    // Four weeks of $0.02 every 5 minutes around this time of the week, then $3 in the
    // last 9 minutes (as in the test above), under the key's real id.
    let now = Utc::now().duration_trunc(Span::minutes(1)).unwrap();
    let mut rows = Vec::new();
    for w in 0..=4 {
        let then = now - Span::weeks(w);
        for i in -84..if w == 0 { 0 } else { 85 } {
            rows.push(spend_row(
                format!("h-{w}-{i}"),
                "uni-z",
                &key_id,
                then + Span::minutes(5 * i),
                Decimal::new(2, 2),
                1,
            ));
        }
    }
    for m in 1..=8 {
        rows.push(spend_row(
            format!("leak-{m}"),
            "uni-z",
            &key_id,
            now - Span::minutes(9) + Span::minutes(m),
            Decimal::new(375, 3),
            1,
        ));
    }
    env.store.insert_events(&rows).await.unwrap();

    let text = "[alerts]\ninterval_secs = 1\n[[institutions]]\nid = \"uni-z\"\non_spike = \"suspend_key\"\n";
    let serve_dir = tempfile::tempdir().unwrap();
    let vars = crate::harness::serve_vars(&env, &serve_dir, text, &[]);
    let ops = tokentally(&["tokens", "add", "ops-api", "--role", "ops"], &vars, None);
    // Tokens are read when serve starts.
    let admin = tokentally(
        &[
            "tokens",
            "add",
            "uni-z-admin",
            "--role",
            "institution_admin",
            "--institution",
            "uni-z",
        ],
        &vars,
        None,
    );
    let other = tokentally(
        &[
            "tokens",
            "add",
            "uni-q-admin",
            "--role",
            "institution_admin",
            "--institution",
            "uni-q",
        ],
        &vars,
        None,
    );
    let mut server = crate::harness::spawn_serve_in(&env, serve_dir, text, &[]).await;
    let http = client();
    let base = server.base.clone();
    let started = Instant::now();
    let alert_id = loop {
        let alerts = alerts_listed(&base, &ops).await;
        if let Some(a) = alerts
            .iter()
            .find(|a| a["kind"] == "key_spike" && a["entity"] == format!("uni-z/{key_id}").as_str())
        {
            break a["alert_id"].as_str().unwrap().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no page: {alerts:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // Refused on the gateway within a key refresh, in the client's format, saying why.
    let models = |key: String| {
        let http = http.clone();
        let base = gw.base.clone();
        async move {
            let res = http
                .get(format!("{base}/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    let paged = Instant::now();
    let refusal = loop {
        let (status, body) = models(key.clone()).await;
        if status == 401 {
            break body;
        }
        assert!(paged.elapsed() < Duration::from_secs(10), "still admitted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let refusal: Value = serde_json::from_str(&refusal).unwrap();
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("paused") && message.contains("acknowledges the spend alert"),
        "{refusal}"
    );
    // A request of the paused key is refused the same way and stored as an event of the
    // key (status rejected_paused, no cost), so the institution sees what was stopped.
    let res = http
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(&key)
        .json(&serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let stored = Instant::now();
    let sql = format!(
        "SELECT count() FROM usage_events WHERE api_key_id = '{key_id}' AND status = 'rejected_paused' AND model = 'gpt-4o-mini' AND cost = 0"
    );
    while env.scalar(&sql).await != 1 {
        assert!(
            stored.elapsed() < Duration::from_secs(30),
            "the refusal is not stored"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = |vars: &[(&'static str, String)]| -> Vec<(String, String, String)> {
        let v: Value = serde_json::from_str(&tokentally(
            &["keys", "log", "--institution", "uni-z", "--format", "json"],
            vars,
            None,
        ))
        .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["action"].as_str().unwrap().to_owned(),
                    e["actor"].as_str().unwrap().to_owned(),
                    e["detail"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert!(
        log(&vars).contains(&(
            "hold".into(),
            "alerts".into(),
            format!("spend spike, alert {alert_id}")
        )),
        "{:?}",
        log(&vars)
    );

    // The institution's administrator resumes it (Keys page, here its API twin): the
    // alert is acknowledged in their name and the key admitted again within a key
    // refresh (2 s) plus a request. Another institution's administrator cannot.
    let resume = |token: String| {
        let http = http.clone();
        let url = format!("{base}/api/v1/keys/{key_id}/resume");
        async move {
            http.post(url)
                .bearer_auth(token)
                .form(&[("csrf", "")])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(resume(other).await, 404);
    let resumed = Instant::now();
    assert_eq!(resume(admin.clone()).await, 200);
    let back = crate::gateway::until_accepted(&gw, &key).await;
    println!("resumed on the gateway after {:?}", resumed.elapsed());
    assert!(back < Duration::from_secs(3), "restored after {back:?}");
    assert!(log(&vars).iter().any(|(a, who, d)| a == "release"
        && who == "uni-z-admin"
        && d == &format!("alert {alert_id} acknowledged")));
    let acked = alerts_listed(&base, &ops)
        .await
        .into_iter()
        .find(|a| a["alert_id"] == alert_id.as_str())
        .unwrap();
    assert_eq!(acked["acknowledged_by"], "uni-z-admin");
    assert_eq!(resume(admin).await, 409, "no longer paused");
    assert!(terminate(&mut server.proc).success());
    env.drop_database().await;
}

/// Issue 36, item 2, through the official openai SDK: two gateways sharing a limit
/// store, no evaluator running. A key with four weeks of history at this time of the
/// week (one request's cost a minute) is driven at 20× that, its requests alternating
/// between the gateways (each settles half); a gateway pages it from the spend the two
/// settled (exchanged through the shared store), within 5 minutes of the start, once
/// (both see it cross; one raises), and the brake (`suspend_key`) pauses it: later
/// requests are refused (401, saying why) and stored as `rejected_paused` events, every
/// served request is stored once. The evaluator, started afterwards, adopts the incident instead
/// of paging again; acknowledging it restores the key on both gateways within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_driven_at_20x_through_the_sdk_is_paged_by_the_gateway_within_minutes() {
    let env = TestEnv::new("alerts_gw_rate", 1).await;
    let sim = crate::harness::spawn_simulator(&env, &[]).await;
    let redis = crate::harness::spawn_redis().await;
    let text = "[gateway]\nkeys_refresh_ms = 1000\n[alerts]\ninterval_secs = 1\n[alerts.spike]\nmin_spend_usd = \"0.4\"\n[[institutions]]\nid = \"uni-w\"\non_spike = \"suspend_key\"\n";
    let conf = tempfile::tempdir().unwrap();
    let conf_path = conf.path().join("config.toml");
    std::fs::write(&conf_path, text).unwrap();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut gws = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut vars = env.gateway_vars(&sim, dir.path());
        vars.push(("TOKENTALLY_CONFIG", conf_path.display().to_string()));
        vars.push(("TOKENTALLY_GATEWAY_SHARED_LIMITS_REDIS_URL", redis.url()));
        gws.push(crate::harness::spawn_gateway(&env, &format!("w{i}"), vars).await);
    }
    let _ingest = env.spawn_ingest();
    let (key_id, key) = crate::gateway::create_key(&env, "uni-w", "u1", &[]);
    for g in &gws {
        crate::gateway::until_accepted(g, &key).await;
    }
    let call = serde_json::json!({
        "sdk": "openai", "api": "chat", "model": "gpt-4o",
        "messages": [{"role": "user", "content": "summarise the minutes"}],
        "headers": {"x-simulator": "words=600"},
    });
    // One request's cost, as stored (one sent to each gateway): the unit of the key's
    // usual rate.
    for g in &gws {
        let first = crate::harness::sdk_calls(&g.base, &key, &serde_json::json!([call]));
        assert_eq!(first[0]["status"], 200, "{:?}", first[0]);
    }
    let cost_sql = format!(
        "SELECT toInt64(sum(cost * sign) * 1000000) FROM usage_events WHERE api_key_id = '{key_id}'"
    );
    let count_sql =
        format!("SELECT toInt64(sum(sign)) FROM usage_events WHERE api_key_id = '{key_id}'");
    let waited = Instant::now();
    let unit = loop {
        let micros = env.scalar(&cost_sql).await;
        if env.scalar(&count_sql).await == 2 {
            break Decimal::new(micros / 2, 6);
        }
        assert!(waited.elapsed() < Duration::from_secs(30), "not stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Its history: one such request a minute, an hour either side of this minute of the
    // week, in each of the four weeks before (the 15-minute baseline is 15 of them).
    let now = Utc::now().duration_trunc(Span::minutes(1)).unwrap();
    let mut rows = Vec::new();
    for w in 1..=4 {
        for i in -60..=60 {
            rows.push(spend_row(
                format!("usual-{w}-{i}"),
                "uni-w",
                &key_id,
                now - Span::weeks(w) + Span::minutes(i),
                unit,
                1,
            ));
        }
    }
    env.store.insert_events(&rows).await.unwrap();

    // 20× the usual rate: 20 requests a minute, every other one to each gateway, for
    // at most 5 minutes.
    let mut calls: Vec<Value> = Vec::new();
    for tick in 0..100 {
        let mut c = call.clone();
        c["base"] = gws[tick % 2].base.clone().into();
        c["at"] = (3 * tick).into();
        calls.push(c);
    }
    let base = gws[0].base.clone();
    let driver_key = key.clone();
    let results = tokio::task::spawn_blocking(move || {
        crate::harness::sdk_calls_with(
            &base,
            &driver_key,
            &Value::Array(calls),
            &[("SDK_STOP_AFTER_REFUSED", "4")],
        )
    })
    .await
    .unwrap();
    let started = results[0]["sent_at"].as_f64().unwrap();
    let fired_sql = format!(
        "SELECT toInt64(min(at)) FROM alerts WHERE kind = 'key_spike' AND entity = 'uni-w/{key_id}' AND state = 'firing'"
    );
    let fired = env.scalar(&fired_sql).await;
    assert!(fired > 0, "no page; {} requests sent", results.len());
    let delay = fired as f64 - started;
    println!(
        "paged {delay:.0} s after the start, after {} requests ({} served)",
        results.len(),
        results.iter().filter(|r| r["status"] == 200).count()
    );
    assert!(delay <= 300.0, "paged after {delay} s");
    let pages_sql = format!(
        "SELECT toInt64(uniqExact(alert_id)) FROM alerts WHERE kind = 'key_spike' AND entity = 'uni-w/{key_id}'"
    );
    assert_eq!(env.scalar(&pages_sql).await, 1, "one incident");
    let message_sql = format!(
        "SELECT toInt64(countIf(position(message, 'seen at the gateway') > 0)) FROM alerts WHERE entity = 'uni-w/{key_id}' AND state = 'firing'"
    );
    assert_eq!(env.scalar(&message_sql).await, 1);
    // Both gateways saw the key over its threshold; one raised the incident.
    let logs: Vec<String> = gws
        .iter()
        .map(|g| std::fs::read_to_string(&g.log).unwrap())
        .collect();
    let raised = logs
        .iter()
        .filter(|l| l.contains("spend rate over its threshold at the gateway entity="))
        .count();
    let deferred = logs
        .iter()
        .filter(|l| {
            l.contains("its incident is raised already")
                || l.contains("another gateway raises its incident")
        })
        .count();
    println!("gateways that raised: {raised}, that found it raised: {deferred}");
    assert_eq!(raised, 1, "one gateway raises");
    assert_eq!(deferred, 1, "the other crossed too and found it raised");

    // The brake: refused from within a key refresh of the page on, on both gateways.
    let refused: Vec<&Value> = results.iter().filter(|r| r["status"] == 401).collect();
    assert!(refused.len() >= 4, "never refused");
    for r in &results {
        if r["sent_at"].as_f64().unwrap() > fired as f64 + 2.0 {
            assert_eq!(r["status"], 401, "admitted after the page: {r}");
        }
    }
    let message = refused[0]["body"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("paused"), "{message}");
    // Every served request stored once, every refusal stored as a refusal.
    let served = results.iter().filter(|r| r["status"] == 200).count() as i64 + 2;
    let counts = |status: &str| {
        format!("SELECT toInt64(sum(sign)) FROM usage_events WHERE api_key_id = '{key_id}' AND status = '{status}' AND event_id NOT LIKE 'usual-%'")
    };
    let waited = Instant::now();
    loop {
        let (ok, paused) = (
            env.scalar(&counts("ok")).await,
            env.scalar(&counts("rejected_paused")).await,
        );
        if ok == served && paused == refused.len() as i64 {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "stored {ok} served of {served}, {paused} refusals of {}",
            refused.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The evaluator adopts the gateway's incident (no second page, though the stored
    // spend is far over its threshold); acknowledging restores the key on both gateways.
    let serve_dir = tempfile::tempdir().unwrap();
    let vars = crate::harness::serve_vars(&env, &serve_dir, text, &[]);
    let ops = tokentally(&["tokens", "add", "ops-api", "--role", "ops"], &vars, None);
    let mut server = crate::harness::spawn_serve_in(&env, serve_dir, text, &[]).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.scalar(&pages_sql).await, 1, "the evaluator paged again");
    let alert_id: String = env
        .ch()
        .query(&format!(
            "SELECT any(alert_id) FROM alerts WHERE entity = 'uni-w/{key_id}' AND state = 'firing'"
        ))
        .fetch_one()
        .await
        .unwrap();
    let acked = Instant::now();
    let status = client()
        .post(format!("{}/api/v1/alerts/{alert_id}/ack", server.base))
        .bearer_auth(&ops)
        .form(&[("csrf", "")])
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    for g in &gws {
        crate::gateway::until_accepted(g, &key).await;
    }
    let back = acked.elapsed();
    println!("restored on both gateways {back:?} after the acknowledgement");
    assert!(back < Duration::from_secs(2), "restored after {back:?}");
    assert!(terminate(&mut server.proc).success());
    env.drop_database().await;
}
