//! Invoices end to end, through the real binary, broker and ClickHouse: exact lines and
//! totals computed independently by the test (price change mid-month, long-context tier,
//! reasoning and per-request fees, markup and discount, half-cent edges, a time zone),
//! frozen bytes after late events, adjustments on the next invoice, the PDF read back
//! with poppler, reconcile catching injected discrepancies, and gap-free numbering under
//! concurrent issuers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Value};
use tokentally::store::rows::EventRow;

use crate::harness::{event_row, repo, terminate, tokentally, tokentally_output, TestEnv};

const BOOK: &str = r#"
[[price]]
provider = "openai"
model = "acme-chat"
id = "acme-chat-1"
match = ["acme-chat"]
effective_from = "2026-01-01"
input_per_mtok = "1.10"
cache_read_per_mtok = "0.55"
output_per_mtok = "4.40"

[[price]]
provider = "openai"
model = "acme-chat"
id = "acme-chat-2"
match = ["acme-chat"]
effective_from = "2026-08-16"
input_per_mtok = "0.90"
cache_read_per_mtok = "0.45"
output_per_mtok = "3.60"

[[price]]
provider = "google"
model = "acme-long"
id = "acme-long-1"
match = ["acme-long"]
effective_from = "2026-01-01"
input_per_mtok = "1.25"
output_per_mtok = "10"
[[price.tier]]
above_input_tokens = 200000
input_per_mtok = "2.50"
output_per_mtok = "15"

[[price]]
provider = "openai"
model = "acme-reason"
id = "acme-reason-1"
match = ["acme-reason"]
effective_from = "2026-01-01"
input_per_mtok = "2"
output_per_mtok = "8"
reasoning_per_mtok = "10"
per_request = "0.001"
"#;

const CONFIG: &str = r#"
[billing.issuer]
name = "Example Gateway GmbH"
address = ["Hauptstraße 1", "10115 Berlin"]
email = "billing@example.org"
tax_id = "DE123456789"

[[institutions]]
id = "uni-a"
name = "University A"
time_zone = "Europe/Berlin"
contract_percent = "-12.5"
reference = "PO-2026-17"
billing = { address = ["Campus 1", "0313 Oslo"], email = "ap@uni-a.example" }

[[institutions]]
id = "uni-b"
name = "University B"
contract_percent = "15"

[[institutions]]
id = "uni-c"
name = "College C"
"#;

/// One usage event as the test knows it.
#[derive(Clone)]
struct Ev {
    id: String,
    inst: &'static str,
    at: DateTime<Utc>,
    model: &'static str,
    input: u64,
    cache_read: u64,
    output: u64,
    reasoning: u64,
}

impl Ev {
    fn payload(&self) -> (String, Vec<u8>) {
        let provider = if self.model == "acme-long" {
            "google"
        } else {
            "openai"
        };
        let v = json!({
            "event_id": self.id,
            "occurred_at": self.at.to_rfc3339(),
            "institution_id": self.inst,
            "user_id": format!("u{}@{}", self.id.len() % 3, self.inst),
            "api_key_id": format!("pk_{}", self.id.len() % 2),
            "provider": provider,
            "model": self.model,
            "usage": {
                "input_tokens": self.input,
                "cache_read_tokens": self.cache_read,
                "cache_write_tokens": 0,
                "output_tokens": self.output,
                "reasoning_tokens": self.reasoning,
            }
        });
        (self.inst.to_owned(), serde_json::to_vec(&v).unwrap())
    }

    /// (model, class, unit price, quantity) at the test's own reading of the price book.
    fn parts(&self) -> Vec<(&'static str, &'static str, Decimal, i64)> {
        let d = |s: &str| s.parse::<Decimal>().unwrap();
        let q = |n: u64| n as i64;
        match self.model {
            "acme-chat" => {
                let new = self.at.date_naive() >= NaiveDate::from_ymd_opt(2026, 8, 16).unwrap();
                let (i, c, o) = if new {
                    ("0.90", "0.45", "3.60")
                } else {
                    ("1.10", "0.55", "4.40")
                };
                vec![
                    ("acme-chat", "input", d(i), q(self.input)),
                    ("acme-chat", "cache_read", d(c), q(self.cache_read)),
                    ("acme-chat", "output", d(o), q(self.output)),
                ]
            }
            "acme-long" => {
                let long = self.input + self.cache_read > 200_000;
                let (i, o) = if long { ("2.50", "15") } else { ("1.25", "10") };
                vec![
                    ("acme-long", "input", d(i), q(self.input)),
                    ("acme-long", "output", d(o), q(self.output)),
                ]
            }
            "acme-reason" => vec![
                ("acme-reason", "input", d("2"), q(self.input)),
                (
                    "acme-reason",
                    "output",
                    d("8"),
                    q(self.output - self.reasoning),
                ),
                ("acme-reason", "reasoning", d("10"), q(self.reasoning)),
                ("acme-reason", "requests", d("0.001"), 1),
            ],
            _ => vec![],
        }
    }
}

type Key = (String, String, Decimal);

/// Expected lines: quantity and amount per (model, class, unit price).
fn expected(events: &[&Ev], contract_percent: &str) -> BTreeMap<Key, (i64, Decimal)> {
    let mult = Decimal::ONE + contract_percent.parse::<Decimal>().unwrap() / Decimal::from(100);
    let mut q: BTreeMap<Key, i64> = BTreeMap::new();
    for e in events {
        for (m, c, u, n) in e.parts() {
            if n != 0 {
                *q.entry((m.into(), c.into(), u)).or_default() += n;
            }
        }
    }
    q.into_iter()
        .filter(|(_, n)| *n != 0)
        .map(|(k, n)| {
            let per = if k.1 == "requests" {
                Decimal::ONE
            } else {
                Decimal::new(1, 6)
            };
            let amount = (Decimal::from(n) * k.2 * per * mult)
                .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
            (k, (n, amount))
        })
        .collect()
}

fn dec(v: &Value) -> Decimal {
    v.as_str().unwrap().parse().unwrap()
}

/// Lines of a JSON document, optionally only those of one usage period.
fn doc_lines(doc: &Value, adjustment: bool) -> BTreeMap<Key, (i64, Decimal)> {
    doc["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["adjustment"].as_bool().unwrap() == adjustment)
        .map(|l| {
            (
                (
                    l["model"].as_str().unwrap().to_owned(),
                    l["class"].as_str().unwrap().to_owned(),
                    dec(&l["unit_price"]),
                ),
                (l["quantity"].as_i64().unwrap(), dec(&l["amount"])),
            )
        })
        .collect()
}

fn sum_amounts(lines: &BTreeMap<Key, (i64, Decimal)>) -> Decimal {
    lines.values().map(|(_, a)| *a).sum()
}

fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

/// Deterministic pseudo-random numbers (the test's own, so expectations are fixed).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn august_events() -> Vec<Ev> {
    let mut r = Lcg(7);
    let mut out = Vec::new();
    let models = ["acme-chat", "acme-long", "acme-reason"];
    for i in 0..240 {
        let inst = ["uni-a", "uni-b"][i % 2];
        let model = models[(i / 2) % 3];
        let day = 1 + r.next(31) as u32;
        let input = if model == "acme-long" && i % 7 == 0 {
            200_001 + r.next(100_000)
        } else {
            100 + r.next(40_000)
        };
        let output = 10 + r.next(5_000);
        out.push(Ev {
            id: format!("aug-{i}"),
            inst,
            at: at(2026, 8, day, r.next(24) as u32, r.next(60) as u32),
            model,
            input,
            cache_read: if model == "acme-chat" {
                r.next(3_000)
            } else {
                0
            },
            output,
            reasoning: if model == "acme-reason" {
                r.next(output)
            } else {
                0
            },
        });
    }
    // Time zone edges for uni-a (Europe/Berlin, UTC+2 in summer): July 31st 22:30 UTC
    // is August 1st in Berlin (billed in August, at the July price); August 31st 22:30
    // UTC is September 1st there (billed in September).
    out.push(Ev {
        id: "edge-in".into(),
        inst: "uni-a",
        at: at(2026, 7, 31, 22, 30),
        model: "acme-chat",
        input: 12_345,
        cache_read: 0,
        output: 678,
        reasoning: 0,
    });
    out.push(Ev {
        id: "edge-out".into(),
        inst: "uni-a",
        at: at(2026, 8, 31, 22, 30),
        model: "acme-chat",
        input: 22_222,
        cache_read: 0,
        output: 333,
        reasoning: 0,
    });
    // uni-c: six lines whose exact amounts end in half a cent (0.055 or 0.045), each
    // split over two events; rounding per line gives 0.33, rounding the sum would give 0.30.
    for (n, (day, input, cache_read, output)) in [
        (3, 25_000, 50_000, 6_250),
        (5, 25_000, 50_000, 6_250),
        (20, 25_000, 50_000, 6_250),
        (25, 25_000, 50_000, 6_250),
    ]
    .into_iter()
    .enumerate()
    {
        out.push(Ev {
            id: format!("half-{n}"),
            inst: "uni-c",
            at: at(2026, 8, day, 12, 0),
            model: "acme-chat",
            input,
            cache_read,
            output,
            reasoning: 0,
        });
    }
    out
}

fn in_period(e: &Ev, tz: chrono_tz::Tz, y: i32, m: u32) -> bool {
    let local = e.at.with_timezone(&tz);
    use chrono::Datelike;
    local.year() == y && local.month() == m
}

struct Cli {
    vars: Vec<(&'static str, String)>,
    _dir: tempfile::TempDir,
}

impl Cli {
    fn new(env: &TestEnv, prices: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, CONFIG).unwrap();
        let mut vars = env.cli_vars();
        vars.retain(|(k, _)| *k != "TOKENTALLY_PRICES");
        vars.extend([
            ("TOKENTALLY_CONFIG", config.display().to_string()),
            ("TOKENTALLY_PRICES", prices.display().to_string()),
            ("TOKENTALLY_LOG", "warn".into()),
        ]);
        Self { vars, _dir: dir }
    }

    fn ok(&self, args: &[&str]) -> String {
        tokentally(args, &self.vars, None)
    }

    fn bytes(&self, args: &[&str]) -> Vec<u8> {
        let out = tokentally_output(args, &self.vars, None);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

fn price_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("book.toml"), BOOK).unwrap();
    dir
}

fn frozen(cli: &Cli, inst: &str, period: &str) -> [Vec<u8>; 3] {
    ["json", "csv", "pdf"].map(|f| {
        cli.bytes(&[
            "invoice",
            "show",
            "--institution",
            inst,
            "--period",
            period,
            "--format",
            f,
        ])
    })
}

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{cmd} (poppler-utils; scripts/services install-test-tools): {e}")
        });
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_are_exact_frozen_adjusted_and_reconciled() {
    let mut env = TestEnv::new("invoices", 1).await;
    let prices = price_dir();
    env.prices = prices.path().to_owned();
    let cli = Cli::new(&env, prices.path());
    let berlin = chrono_tz::Europe::Berlin;

    let aug = august_events();
    let mut unknown = aug[1].clone();
    unknown.id = "mystery-1".into();
    unknown.model = "mystery-model";
    let mut messages: Vec<_> = aug.iter().map(Ev::payload).collect();
    messages.push(unknown.payload());
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(messages.len() as i64, Duration::from_secs(120))
        .await;

    // Drafts equal the test's own lines and totals.
    let contracts = [("uni-a", "-12.5"), ("uni-b", "15"), ("uni-c", "0")];
    for (inst, pct) in contracts {
        let tz = if inst == "uni-a" {
            berlin
        } else {
            chrono_tz::UTC
        };
        let evs: Vec<&Ev> = aug
            .iter()
            .filter(|e| e.inst == inst && in_period(e, tz, 2026, 8))
            .collect();
        let want = expected(&evs, pct);
        let draft = cli.json(&[
            "invoice",
            "draft",
            "--institution",
            inst,
            "--period",
            "2026-08",
            "--format",
            "json",
        ]);
        assert_eq!(doc_lines(&draft, false), want, "{inst} lines");
        assert_eq!(dec(&draft["total"]), sum_amounts(&want), "{inst} total");
        assert_eq!(draft["number"], "DRAFT");
    }
    // The time-zone edges: in for uni-a's August, out of it.
    let a_events = aug
        .iter()
        .filter(|e| e.inst == "uni-a" && in_period(e, berlin, 2026, 8))
        .count();
    assert!(aug
        .iter()
        .any(|e| e.id == "edge-in" && in_period(e, berlin, 2026, 8)));
    assert!(a_events > 100);
    // Half-cent edges: six lines of 0.06/0.05, total 0.33 (not 0.30).
    let c = cli.json(&[
        "invoice",
        "draft",
        "--institution",
        "uni-c",
        "--period",
        "2026-08",
        "--format",
        "json",
    ]);
    assert_eq!(dec(&c["total"]), "0.33".parse::<Decimal>().unwrap());
    assert_eq!(c["lines"].as_array().unwrap().len(), 6);

    // Unpriced usage blocks issuing unless explicitly allowed, and is never billed as $0.
    let b = cli.json(&[
        "invoice",
        "draft",
        "--institution",
        "uni-b",
        "--period",
        "2026-08",
        "--format",
        "json",
    ]);
    assert_eq!(b["unpriced"]["events"], 1);
    assert_eq!(b["unpriced"]["models"], json!(["mystery-model"]));
    let refused = tokentally_output(
        &[
            "invoice",
            "issue",
            "--institution",
            "uni-b",
            "--period",
            "2026-08",
        ],
        &cli.vars,
        None,
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unpriced"));
    cli.ok(&[
        "invoice",
        "issue",
        "--institution",
        "uni-b",
        "--period",
        "2026-08",
        "--allow-unpriced",
    ]);
    // A period that has not ended cannot be issued.
    let now = Utc::now().format("%Y-%m").to_string();
    assert!(!tokentally_output(
        &[
            "invoice",
            "issue",
            "--institution",
            "uni-c",
            "--period",
            &now
        ],
        &cli.vars,
        None
    )
    .status
    .success());

    for inst in ["uni-a", "uni-c"] {
        cli.ok(&[
            "invoice",
            "issue",
            "--institution",
            inst,
            "--period",
            "2026-08",
        ]);
    }
    let before_a = frozen(&cli, "uni-a", "2026-08");
    let doc_a: Value = serde_json::from_slice(&before_a[0]).unwrap();
    let number_a = doc_a["number"].as_str().unwrap().to_owned();
    assert!(number_a.starts_with("TT-2026-00000"), "{number_a}");
    let total_a = dec(&doc_a["total"]);

    // CSV lines sum to the JSON total; the PDF shows the same total, number and period,
    // embeds its font, and page 1 renders to PNG for review.
    let csv = String::from_utf8(before_a[1].clone()).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let amount_col = header.iter().position(|h| *h == "amount").unwrap();
    let csv_total: Decimal = csv
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .nth(amount_col)
                .unwrap()
                .parse::<Decimal>()
                .unwrap()
        })
        .sum();
    assert_eq!(csv_total, total_a);
    let out_dir = repo().join("target").join("invoices");
    std::fs::create_dir_all(&out_dir).unwrap();
    let pdf_path = out_dir.join(format!("{number_a}.pdf"));
    std::fs::write(&pdf_path, &before_a[2]).unwrap();
    let text = tool("pdftotext", &["-layout", pdf_path.to_str().unwrap(), "-"]);
    let shown = format!("${}", total_a);
    assert!(
        text.contains(&number_a) && text.contains("2026-08 (Europe/Berlin)"),
        "{text}"
    );
    let total_line = text
        .lines()
        .find(|l| l.contains("Total (USD)"))
        .unwrap_or_else(|| panic!("no total in {text}"));
    assert_eq!(
        total_line
            .split_whitespace()
            .last()
            .unwrap()
            .replace(',', ""),
        shown,
        "{total_line}"
    );
    assert!(text.contains("Example Gateway GmbH") && text.contains("PO-2026-17"));
    let fonts = tool("pdffonts", &[pdf_path.to_str().unwrap()]);
    assert!(
        fonts.lines().skip(2).all(|l| l.contains(" yes ")),
        "fonts not embedded: {fonts}"
    );
    tool(
        "pdftoppm",
        &[
            "-png",
            "-r",
            "80",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            pdf_path.to_str().unwrap(),
            out_dir.join(&number_a).to_str().unwrap(),
        ],
    );
    assert!(out_dir.join(format!("{number_a}.png")).exists());

    // Reconcile: issued periods agree with their events.
    let rec = tokentally_output(
        &["reconcile", "--period", "2026-08", "--format", "json"],
        &cli.vars,
        None,
    );
    let r: Value = serde_json::from_slice(&rec.stdout).unwrap();
    assert!(rec.status.success(), "{r:#}");
    let row = |r: &Value, inst: &str| {
        r["institutions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["institution"] == inst)
            .unwrap()
            .clone()
    };
    assert_eq!(dec(&row(&r, "uni-a")["invoice_total"]), total_a);
    assert_eq!(row(&r, "uni-b")["unpriced_events"], 1);
    assert_eq!(row(&r, "uni-c")["status"], "ok");
    let p0 = &r["partitions"][0];
    assert_eq!(p0["consumed"], messages.len());
    assert_eq!(p0["stored"], messages.len());

    // Late events for uni-a's August arrive after it was issued.
    let late: Vec<Ev> = (0..9)
        .map(|i| Ev {
            id: format!("late-{i}"),
            inst: "uni-a",
            at: at(2026, 8, 10 + i, 9, 0),
            model: ["acme-chat", "acme-long", "acme-reason"][i as usize % 3],
            input: 10_000 + 1_111 * u64::from(i),
            cache_read: 0,
            output: 2_000,
            reasoning: if i % 3 == 2 { 500 } else { 0 },
        })
        .collect();
    let sept: Vec<Ev> = (0..6)
        .map(|i| Ev {
            id: format!("sep-{i}"),
            inst: "uni-a",
            at: at(2026, 9, 3 + i, 9, 0),
            model: "acme-chat",
            input: 30_000,
            cache_read: 1_000,
            output: 4_000,
            reasoning: 0,
        })
        .collect();
    let more: Vec<_> = late.iter().chain(&sept).map(Ev::payload).collect();
    env.produce(&more).await;
    let total_messages = messages.len() + more.len();
    env.wait_accounted(total_messages as i64, Duration::from_secs(60))
        .await;

    // The issued invoice is byte-for-byte unchanged.
    assert!(
        frozen(&cli, "uni-a", "2026-08") == before_a,
        "issued invoice changed"
    );
    // Reconcile now reports August's unbilled late usage.
    let rec = tokentally_output(&["reconcile", "--period", "2026-08"], &cli.vars, None);
    assert_eq!(rec.status.code(), Some(1));
    let table = String::from_utf8_lossy(&rec.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("uni-a") && l.contains("MISMATCH")),
        "{table}"
    );

    // September's invoice: September's usage plus adjustment lines for August.
    let sep_events: Vec<&Ev> = aug
        .iter()
        .chain(&sept)
        .filter(|e| e.inst == "uni-a" && in_period(e, berlin, 2026, 9))
        .collect();
    let late_refs: Vec<&Ev> = late.iter().collect();
    let want_sep = expected(&sep_events, "-12.5");
    let want_adj = expected(&late_refs, "-12.5");
    let issued = cli.json(&[
        "invoice",
        "issue",
        "--institution",
        "uni-a",
        "--period",
        "2026-09",
        "--format",
        "json",
    ]);
    assert_eq!(doc_lines(&issued, false), want_sep);
    assert_eq!(doc_lines(&issued, true), want_adj);
    assert!(issued["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["adjustment"] == true)
        .all(|l| l["period"] == "2026-08"));
    assert_eq!(dec(&issued["subtotal"]), sum_amounts(&want_sep));
    assert_eq!(dec(&issued["adjustments"]), sum_amounts(&want_adj));
    assert_eq!(
        dec(&issued["total"]),
        sum_amounts(&want_sep) + sum_amounts(&want_adj)
    );
    let rec = tokentally_output(&["reconcile", "--period", "2026-08"], &cli.vars, None);
    assert!(
        rec.status.success(),
        "{}",
        String::from_utf8_lossy(&rec.stdout)
    );

    // Injected discrepancies: a row written around the pipeline, and a consumed message
    // whose row disappears.
    let rogue = EventRow {
        input_tokens: 1_000_000,
        cost: "1.1".parse().unwrap(),
        price_id: "acme-chat-1".into(),
        kafka_topic: "elsewhere".into(),
        ..event_row("rogue", "uni-c", at(2026, 8, 12, 12, 0), "acme-chat")
    };
    env.store.insert_events(&[rogue]).await.unwrap();
    let rec = tokentally_output(&["reconcile", "--period", "2026-08"], &cli.vars, None);
    assert_eq!(rec.status.code(), Some(1));
    let table = String::from_utf8_lossy(&rec.stdout).into_owned();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("uni-c") && l.contains("MISMATCH")),
        "{table}"
    );
    env.exec("ALTER TABLE usage_events DELETE WHERE event_id = 'aug-0'")
        .await
        .unwrap();
    let mut gone = false;
    for _ in 0..100 {
        if env
            .scalar("SELECT toInt64(count()) FROM usage_events WHERE event_id = 'aug-0'")
            .await
            == 0
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gone, "mutation did not finish");
    let rec = tokentally_output(
        &["reconcile", "--period", "2026-08", "--format", "json"],
        &cli.vars,
        None,
    );
    assert_eq!(rec.status.code(), Some(1));
    let r: Value = serde_json::from_slice(&rec.stdout).unwrap();
    assert_eq!(r["partitions"][0]["consumed"], total_messages);
    assert_eq!(r["partitions"][0]["stored"], total_messages - 1);
    assert!(r["partitions"][0]["status"]
        .as_str()
        .unwrap()
        .contains("MISMATCH"));

    assert!(terminate(&mut ingest).success());
    env.drop_database().await;
}

fn chat_row(id: String, inst: &str, at: DateTime<Utc>, input: u64) -> EventRow {
    // acme-chat before the August price change: 1.10 per million input tokens.
    let cost = Decimal::from(input) * "1.10".parse::<Decimal>().unwrap() / Decimal::from(1_000_000);
    EventRow {
        user_id: "u".into(),
        api_key_id: "k".into(),
        input_tokens: input,
        cost: cost.normalize(),
        price_id: "acme-chat-1".into(),
        ..event_row(id, inst, at, "acme-chat")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoice_numbers_are_gap_free_under_concurrent_issuers() {
    let env = TestEnv::new("invoice_numbers", 1).await;
    let prices = price_dir();
    let cli = Cli::new(&env, prices.path());
    let months = [3u32, 4, 5, 6, 7];
    let mut rows = Vec::new();
    for (i, m) in months.iter().enumerate() {
        for inst in ["uni-c", "uni-b"] {
            rows.push(chat_row(
                format!("{inst}-{m}"),
                inst,
                at(2026, *m, 10, 12, 0),
                10_000 * (i as u64 + 1),
            ));
        }
    }
    env.store.insert_events(&rows).await.unwrap();

    // Twelve issuers at once: every month of both institutions, plus two more attempts
    // at uni-c's July.
    let mut jobs: Vec<(String, u32)> = Vec::new();
    for m in months {
        jobs.push(("uni-c".into(), m));
        jobs.push(("uni-b".into(), m));
    }
    jobs.push(("uni-c".into(), 7));
    jobs.push(("uni-c".into(), 7));
    let children: Vec<_> = jobs
        .iter()
        .map(|(inst, m)| {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_tokentally"));
            c.args([
                "invoice",
                "issue",
                "--institution",
                inst,
                "--period",
                &format!("2026-{m:02}"),
                "--format",
                "json",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
            for (k, v) in &cli.vars {
                c.env(k, v);
            }
            // Short-lived issuers that exit by themselves; their output is read below.
            c.spawn().unwrap()
        })
        .collect();
    let mut numbers = Vec::new();
    let mut refused = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            let d: Value = serde_json::from_slice(&out.stdout).unwrap();
            numbers.push(d["seq"].as_u64().unwrap());
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("already invoiced"), "{err}");
            refused += 1;
        }
    }
    numbers.sort();
    assert_eq!(numbers, (1..=10).collect::<Vec<u64>>());
    assert_eq!(refused, 2);

    // Voiding takes the next number for the credit note; the period can be issued again.
    let list = cli.ok(&["invoice", "list", "--institution", "uni-c"]);
    let july = list
        .lines()
        .find(|l| l.contains(" 2026-07 "))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let credit = cli.json(&[
        "invoice", "void", "--number", &july, "--reason", "test", "--format", "json",
    ]);
    assert_eq!(credit["seq"], 11);
    assert_eq!(credit["kind"], "credit_note");
    assert_eq!(credit["references"], july.as_str());
    let original = cli.json(&["invoice", "show", "--number", &july, "--format", "json"]);
    assert_eq!(dec(&credit["total"]), -dec(&original["total"]));
    let again = cli.json(&[
        "invoice",
        "issue",
        "--institution",
        "uni-c",
        "--period",
        "2026-07",
        "--format",
        "json",
    ]);
    assert_eq!(again["seq"], 12);
    assert_eq!(dec(&again["total"]), dec(&original["total"]));
    let list = cli.ok(&["invoice", "list"]);
    assert!(list.contains(&format!("voided by {}", credit["number"].as_str().unwrap())));
    // ClickHouse holds each of the twelve documents once.
    assert_eq!(
        env.scalar("SELECT toInt64(uniqExact(seq)) FROM invoices")
            .await,
        12
    );
    assert_eq!(
        env.scalar("SELECT toInt64(max(seq)) FROM invoices").await,
        12
    );
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portal_serves_each_institution_only_its_own_frozen_invoices() {
    use crate::web::client;
    let env = TestEnv::new("invoice_portal", 1).await;
    let prices = price_dir();
    let mut cli = Cli::new(&env, prices.path());
    let rows: Vec<EventRow> = ["uni-b", "uni-c"]
        .iter()
        .flat_map(|inst| {
            [6u32, 7].map(|m| chat_row(format!("{inst}-{m}"), inst, at(2026, m, 9, 8, 0), 77_777))
        })
        .collect();
    env.store.insert_events(&rows).await.unwrap();
    // Usage of uni-c last month, which `serve` invoices by itself (auto_issue_day = 1).
    let today = Utc::now().date_naive();
    let this_month = NaiveDate::from_ymd_opt(
        chrono::Datelike::year(&today),
        chrono::Datelike::month(&today),
        1,
    )
    .unwrap();
    let last_month = (this_month - chrono::Duration::days(1))
        .format("%Y-%m")
        .to_string();
    let mid_last_month = (this_month - chrono::Duration::days(15))
        .and_hms_opt(12, 0, 0)
        .unwrap()
        .and_utc();
    env.store
        .insert_events(&[chat_row("auto".into(), "uni-c", mid_last_month, 500_000)])
        .await
        .unwrap();
    let config = cli._dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("[billing]\nauto_issue_day = 1\n{text}")).unwrap();
    let mut numbers = BTreeMap::new();
    for inst in ["uni-b", "uni-c"] {
        let d = cli.json(&[
            "invoice",
            "issue",
            "--institution",
            inst,
            "--period",
            "2026-07",
            "--format",
            "json",
        ]);
        numbers.insert(inst, d["number"].as_str().unwrap().to_owned());
    }
    let users = cli._dir.path().join("users.toml");
    cli.vars
        .push(("TOKENTALLY_USERS_FILE", users.display().to_string()));
    let alice = cli.ok(&[
        "tokens",
        "add",
        "c-api",
        "--role",
        "institution",
        "--institution",
        "uni-c",
    ]);
    let fin = cli.ok(&["tokens", "add", "fin-api", "--role", "finance"]);
    // serve with this test's config, price book and users file.
    let extra: Vec<(&'static str, String)> = cli
        .vars
        .iter()
        .filter(|(k, _)| {
            [
                "TOKENTALLY_CONFIG",
                "TOKENTALLY_PRICES",
                "TOKENTALLY_USERS_FILE",
                "TOKENTALLY_LOG",
            ]
            .contains(k)
        })
        .cloned()
        .collect();
    let mut server = crate::harness::spawn_serve(&env, "", &extra).await;
    let base = server.base.clone();
    let http = client();
    let get = |path: String, token: Option<String>| {
        let mut r = http.get(format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    // Anonymous: nothing.
    assert_eq!(
        get("/api/v1/invoices".into(), None).await.unwrap().status(),
        401
    );
    // serve issued last month's invoice for uni-c on its own: 500k tokens at $1.10/M.
    let started = std::time::Instant::now();
    let auto = loop {
        let list: Value = get("/api/v1/invoices".into(), Some(fin.clone()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(i) = list["invoices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["period"] == last_month.as_str())
        {
            break i.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "serve did not issue {last_month}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(auto["institution"], "uni-c");
    assert_eq!(auto["total"], "0.55");
    // uni-c's token lists only uni-c's invoice and downloads its frozen bytes.
    let list: Value = get("/api/v1/invoices".into(), Some(alice.clone()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = list["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["institution"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec!["uni-c", "uni-c"]);
    for format in ["pdf", "csv", "json"] {
        let res = get(
            format!("/institutions/uni-c/invoices/{}/{format}", numbers["uni-c"]),
            Some(alice.clone()),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200, "{format}");
        let body = res.bytes().await.unwrap();
        let cli_bytes = cli.bytes(&[
            "invoice",
            "show",
            "--number",
            &numbers["uni-c"],
            "--format",
            format,
        ]);
        assert!(
            body.as_ref() == cli_bytes.as_slice(),
            "{format} differs from the CLI's"
        );
    }
    let usage = get(
        format!(
            "/institutions/uni-c/invoices/{}/usage-csv",
            numbers["uni-c"]
        ),
        Some(alice.clone()),
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(usage.starts_with("day,user_id,api_key_id,model"), "{usage}");
    assert!(
        usage.lines().any(|l| l.contains(",input,77777,")),
        "{usage}"
    );
    // Another institution's invoice: forbidden by path, and not found under its own path.
    let other = &numbers["uni-b"];
    for path in [
        format!("/institutions/uni-b/invoices/{other}/pdf"),
        "/api/v1/invoices?institution=uni-b".to_string(),
        "/invoices/draft?institution=uni-b&period=2026-07&format=json".to_string(),
    ] {
        assert_eq!(
            get(path.clone(), Some(alice.clone()))
                .await
                .unwrap()
                .status(),
            403,
            "{path}"
        );
    }
    assert_eq!(
        get(
            format!("/institutions/uni-c/invoices/{other}/pdf"),
            Some(alice.clone())
        )
        .await
        .unwrap()
        .status(),
        404
    );
    // Institutions cannot issue; finance can, and sees everything.
    let issue = |token: String, inst: &str| {
        http.post(format!("{base}/api/v1/invoices/issue"))
            .bearer_auth(token)
            .form(&[("institution", inst), ("period", "2026-06")])
            .send()
    };
    assert_eq!(issue(alice.clone(), "uni-c").await.unwrap().status(), 403);
    let issued: Value = issue(fin.clone(), "uni-b")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(issued["number"].as_str().unwrap().starts_with("TT-"));
    let list: Value = get("/api/v1/invoices".into(), Some(fin.clone()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["invoices"].as_array().unwrap().len(), 4);
    // The draft of an open period for uni-c, as uni-c.
    let draft: Value = get(
        "/invoices/draft?period=2026-06&format=json".into(),
        Some(alice.clone()),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(draft["customer"]["id"], "uni-c");
    assert_eq!(draft["number"], "DRAFT");
    assert!(terminate(&mut server.proc).success());
    env.drop_database().await;
}
