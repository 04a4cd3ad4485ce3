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
payment_instructions = "Transfer to IBAN DE89 3704 0044 0532 0130 00 (BIC COBADEFFXXX)\nQuote {number} as the reference"

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
    // Issue 33 (polish): how to pay, under the total, with this invoice's number; the
    // hashes on a page of their own after the invoice (they took 1.5 of its pages).
    let pay = text.find("How to pay").unwrap_or_else(|| panic!("{text}"));
    assert!(pay > text.find("Total (USD)").unwrap(), "{text}");
    assert!(
        text.contains(&format!("Quote {number_a} as the reference")),
        "{text}"
    );
    let pages: Vec<&str> = text.split('\u{c}').collect();
    assert!(
        pages[0].contains("Total (USD)") && !pages[0].contains("Document SHA-256"),
        "{text}"
    );
    assert!(
        pages[1..]
            .iter()
            .any(|p| p.contains("Appendix: evidence for verification")
                && p.contains("Document SHA-256")),
        "{text}"
    );
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
    let want_sep = expected(&sep_events, "-12.5");
    // The billing rule (README): an adjustment bills what the period's stored events come
    // to now, per line, minus what earlier documents billed; lines that move no money
    // are left off.
    let aug_now: Vec<&Ev> = aug
        .iter()
        .chain(&late)
        .filter(|e| e.inst == "uni-a" && in_period(e, berlin, 2026, 8))
        .collect();
    let billed_aug = doc_lines(&doc_a, false);
    let want_adj: BTreeMap<Key, (i64, Decimal)> = expected(&aug_now, "-12.5")
        .into_iter()
        .filter_map(|(k, (q, a))| {
            let (bq, ba) = billed_aug.get(&k).copied().unwrap_or((0, Decimal::ZERO));
            (a != ba).then(|| (k, (q - bq, a - ba)))
        })
        .collect();
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
    // The billing rollup that drafts and invoices read sums exactly what the raw events
    // do, after re-rating, late events and a row written around ingest, for the months
    // of a zone an hour off UTC and of UTC.
    use tokentally::store::billing::Source;
    let berlin_aug = (
        berlin
            .with_ymd_and_hms(2026, 8, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
        berlin
            .with_ymd_and_hms(2026, 9, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
    );
    let utc_aug = (
        Utc.with_ymd_and_hms(2026, 8, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
        Utc.with_ymd_and_hms(2026, 9, 1, 0, 0, 0)
            .unwrap()
            .timestamp(),
    );
    for inst in ["uni-a", "uni-b", "uni-c"] {
        for (start, end) in [berlin_aug, utc_aug, (0, 4_000_000_500)] {
            assert_eq!(Source::for_range(start, end), Source::Rollup);
            let store = &env.store;
            let rollup = store
                .price_groups_from(Source::Rollup, inst, start, end)
                .await
                .unwrap();
            assert!(!rollup.is_empty(), "{inst} has priced usage in August");
            assert_eq!(
                rollup,
                store
                    .price_groups_from(Source::Events, inst, start, end)
                    .await
                    .unwrap(),
                "{inst} {start}..{end}"
            );
            assert_eq!(
                store
                    .unpriced_usage_from(Source::Rollup, inst, start, end)
                    .await
                    .unwrap(),
                store
                    .unpriced_usage_from(Source::Events, inst, start, end)
                    .await
                    .unwrap(),
                "{inst} {start}..{end}"
            );
        }
    }

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
    // "Explain this line": the lines with their evidence, each line's events as CSV, the
    // usage as issued, and the verification, for the institution's own invoice only.
    let mine = &numbers["uni-c"];
    let lines: Value = get(
        format!("/api/v1/institutions/uni-c/invoices/{mine}/lines"),
        Some(alice.clone()),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let first = &lines["lines"][0];
    assert_eq!(first["events"], 1, "{lines:#}");
    let explain = get(
        first["explain"].as_str().unwrap().to_owned(),
        Some(alice.clone()),
    )
    .await
    .unwrap();
    assert_eq!(explain.status(), 200);
    let csv = explain.text().await.unwrap();
    assert!(
        csv.lines()
            .any(|l| l.contains(",uni-c-7,") && l.ends_with(",as issued")),
        "{csv}"
    );
    let verified: Value = get(
        format!("/api/v1/institutions/uni-c/invoices/{mine}/verify"),
        Some(alice.clone()),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(verified["ok"], true, "{verified:#}");
    // The same as pages an accountant can read (issue 33, item 3: they were raw JSON).
    for (what, says) in [
        (
            "verify",
            format!("Verified: {mine} is the document the ledger holds"),
        ),
        ("lines", format!("Lines of {mine}")),
    ] {
        let res = get(
            format!("/institutions/uni-c/invoices/{mine}/{what}"),
            Some(alice.clone()),
        )
        .await
        .unwrap();
        assert!(res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let html = res.text().await.unwrap();
        assert!(
            html.contains(&says) && html.contains("<header>"),
            "{what}: {html}"
        );
        if what == "lines" {
            assert!(
                html.contains(&format!(
                    "/institutions/uni-c/invoices/{mine}/lines/1\">events (CSV)"
                )),
                "{html}"
            );
        }
    }
    let as_issued = get(
        format!("/institutions/uni-c/invoices/{mine}/usage-csv-as-issued"),
        Some(alice.clone()),
    )
    .await
    .unwrap();
    assert_eq!(as_issued.status(), 200);
    assert!(as_issued.text().await.unwrap().contains(",input,77777,"));
    // Another institution's invoice: forbidden by path, and not found under its own path.
    let other = &numbers["uni-b"];
    for path in [
        format!("/institutions/uni-b/invoices/{other}/lines/1"),
        format!("/institutions/uni-b/invoices/{other}/verify"),
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
            format!("/institutions/uni-c/invoices/{other}/lines/1"),
            Some(alice.clone())
        )
        .await
        .unwrap()
        .status(),
        404
    );
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

fn ev(
    id: &str,
    inst: &'static str,
    when: DateTime<Utc>,
    model: &'static str,
    t: (u64, u64, u64, u64),
) -> Ev {
    Ev {
        id: id.into(),
        inst,
        at: when,
        model,
        input: t.0,
        cache_read: t.1,
        output: t.2,
        reasoning: t.3,
    }
}

/// Sum of one CSV column.
fn csv_sum(csv: &str, column: &str) -> Decimal {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == column).unwrap();
    lines
        .map(|l| l.split(',').nth(col).unwrap())
        .filter(|c| !c.is_empty())
        .map(|c| c.parse::<Decimal>().unwrap())
        .sum()
}

/// Issue 14: what a finance office found on real invoices, each checked the way they
/// read them, and invoices anyone can verify (tampering named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_explain_themselves_and_can_be_verified() {
    let mut env = TestEnv::new("invoice_evidence", 1).await;
    let prices = price_dir();
    env.prices = prices.path().to_owned();
    let cli = Cli::new(&env, prices.path());
    let aug = |d, h| at(2026, 8, d, h, 0);
    let first = [
        // uni-c (UTC, list prices): acme-chat before and after the price change of 08-16.
        ev(
            "c1",
            "uni-c",
            aug(5, 12),
            "acme-chat",
            (1_804_169, 0, 2_000, 0),
        ),
        ev(
            "c2",
            "uni-c",
            aug(20, 12),
            "acme-chat",
            (500_000, 10_000, 1_000, 0),
        ),
        ev("c3", "uni-c", aug(7, 12), "acme-long", (250_000, 0, 100, 0)),
        ev(
            "c4",
            "uni-c",
            aug(9, 12),
            "acme-reason",
            (1_000, 0, 500, 100),
        ),
        // uni-a (Europe/Berlin, 12.5% discount).
        ev(
            "a1",
            "uni-a",
            aug(5, 12),
            "acme-chat",
            (1_804_169, 0, 3_000, 0),
        ),
        ev(
            "a2",
            "uni-a",
            aug(6, 12),
            "acme-reason",
            (7_777, 0, 900, 300),
        ),
        // uni-b: one event of a model without a price.
        ev("b1", "uni-b", aug(3, 12), "acme-chat", (10_000, 0, 100, 0)),
        ev(
            "b2",
            "uni-b",
            aug(4, 12),
            "mystery-model",
            (5_000, 0, 50, 0),
        ),
    ];
    let messages: Vec<_> = first.iter().map(Ev::payload).collect();
    env.produce(&messages).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(messages.len() as i64, Duration::from_secs(120))
        .await;
    let doc = |inst: &str, period: &str, verb: &str| {
        cli.json(&[
            "invoice",
            verb,
            "--institution",
            inst,
            "--period",
            period,
            "--format",
            "json",
        ])
    };

    // 5. A mid-month price change: two input lines, each naming the days its price applied.
    let c_draft = doc("uni-c", "2026-08", "draft");
    let inputs: Vec<&Value> = c_draft["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["model"] == "acme-chat" && l["class"] == "input")
        .collect();
    assert_eq!(inputs.len(), 2, "{c_draft:#}");
    assert_eq!(
        inputs[0]["applies"],
        json!({"from": "2026-08-16", "until": "2026-08-31"})
    );
    assert_eq!(
        inputs[1]["applies"],
        json!({"from": "2026-08-01", "until": "2026-08-15"})
    );
    let table = cli.ok(&[
        "invoice",
        "draft",
        "--institution",
        "uni-c",
        "--period",
        "2026-08",
    ]);
    assert!(
        table.contains("acme-chat input (price of 2026-08-01 – 2026-08-15)"),
        "{table}"
    );
    assert!(
        table.contains("acme-chat input (price of 2026-08-16 – 2026-08-31)"),
        "{table}"
    );
    // 8. Unit prices say per what; an empty draft's money has two decimals.
    assert!(
        table.contains("/1M tokens") && table.contains("/request"),
        "{table}"
    );
    let empty = doc("uni-c", "2026-06", "draft");
    assert_eq!(
        (empty["total"].as_str(), empty["subtotal"].as_str()),
        (Some("0.00"), Some("0.00"))
    );

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
    cli.ok(&[
        "invoice",
        "issue",
        "--institution",
        "uni-b",
        "--period",
        "2026-08",
        "--allow-unpriced",
    ]);
    let a = doc("uni-a", "2026-08", "show");
    let c = doc("uni-c", "2026-08", "show");

    // 1. Contract lines multiply out: quantity × the unit price shown = the amount
    // (before rounding), the unit price being the list price with the discount.
    let mult: Decimal = "0.875".parse().unwrap();
    for l in a["lines"].as_array().unwrap() {
        let unit = dec(&l["contract_unit_price"]);
        assert_eq!(unit, dec(&l["unit_price"]) * mult, "{l}");
        let per = if l["class"] == "requests" {
            Decimal::ONE
        } else {
            Decimal::new(1, 6)
        };
        let shown = (Decimal::from(l["quantity"].as_i64().unwrap()) * unit * per)
            .round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero);
        assert_eq!(shown, dec(&l["amount"]), "{l}");
    }
    let a_number = a["number"].as_str().unwrap().to_owned();
    let a_table = cli.ok(&["invoice", "show", "--number", &a_number]);
    assert!(a_table.contains("contract discount of 12.5%"), "{a_table}");
    // 1,804,169 tokens × $0.9625/1M = $1.7365 → $1.74 (list price $1.10 × 0.875).
    assert!(
        a_table.lines().any(|l| l.contains("1804169")
            && l.contains("$0.9625/1M tokens")
            && l.contains("$1.74")),
        "{a_table}"
    );

    // Every issued document is hash-chained and carries a manifest per line.
    let c_number = c["number"].as_str().unwrap().to_owned();
    assert_eq!(c["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        c["manifest"].as_array().unwrap().len(),
        c["lines"].as_array().unwrap().len()
    );
    let list_docs = |n: &str| cli.json(&["invoice", "show", "--number", n, "--format", "json"]);
    assert_eq!(
        list_docs(&c_number)["previous_sha256"],
        a["sha256"],
        "uni-c was issued right after uni-a"
    );

    // 6. The PDF: wrapped, not cut; the font subset (< 100 KB); the text extractable.
    let dir = tempfile::tempdir().unwrap();
    let pdf_path = dir.path().join("c.pdf");
    let pdf = cli.bytes(&["invoice", "show", "--number", &c_number, "--format", "pdf"]);
    assert!(pdf.len() < 100 * 1024, "PDF is {} bytes", pdf.len());
    std::fs::write(&pdf_path, &pdf).unwrap();
    let text = tool("pdftotext", &["-layout", pdf_path.to_str().unwrap(), "-"]);
    assert!(!text.contains('…'), "{text}");
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("(prompts > 200000 tokens)"), "{text}");
    assert!(flat.contains("price of 2026-08-16 – 2026-08-31"), "{text}");
    assert!(flat.contains(c["sha256"].as_str().unwrap()), "{text}");
    assert!(tool("pdffonts", &[pdf_path.to_str().unwrap()])
        .lines()
        .skip(2)
        .all(|l| l.contains(" yes ")));

    // Verification of the untouched invoice: every line matches.
    let c_file = dir.path().join("c.json");
    std::fs::write(
        &c_file,
        cli.bytes(&["invoice", "show", "--number", &c_number, "--format", "json"]),
    )
    .unwrap();
    let verified = cli.ok(&["invoice", "verify", c_file.to_str().unwrap()]);
    assert!(
        verified.trim_end().ends_with("verified") && !verified.contains("DIFFERS"),
        "{verified}"
    );

    // Late arrivals for August, after it was invoiced.
    let late = [
        // 12,000 cache-read tokens at $0.45/1M come to $0.0054 → $0.01, where the invoice
        // billed 10,000 → $0.0045 → $0.00: the adjustment is $0.01 (rounding the late
        // 2,000 alone would give $0.00 and lose the cent).
        ev("l1", "uni-c", aug(22, 12), "acme-chat", (0, 2_000, 0, 0)),
        // One more output token: $0.0036036 → still $0.00: no $0.00 adjustment line.
        ev("l2", "uni-c", aug(23, 12), "acme-chat", (0, 0, 1, 0)),
        // 3. A late event without a price.
        ev(
            "l3",
            "uni-c",
            aug(24, 12),
            "mystery-model",
            (4_000, 0, 40, 0),
        ),
        ev(
            "s1",
            "uni-c",
            at(2026, 9, 3, 12, 0),
            "acme-chat",
            (100_000, 0, 0, 0),
        ),
    ];
    let mut more: Vec<_> = late.iter().map(Ev::payload).collect();
    // 4. A rejected message about uni-c's August (negative tokens) with an empty key, and
    // one that names no institution at all.
    let bad = json!({
        "event_id": "r1", "occurred_at": "2026-08-31T23:30:00Z", "institution_id": "uni-c",
        "user_id": "u", "api_key_id": "k", "provider": "openai", "model": "acme-chat",
        "usage": {"input_tokens": -5, "output_tokens": 1}
    });
    more.push((String::new(), serde_json::to_vec(&bad).unwrap()));
    more.push((String::new(), b"not json at all".to_vec()));
    env.produce(&more).await;
    let total = messages.len() + more.len();
    env.wait_accounted(total as i64, Duration::from_secs(60))
        .await;

    // 7. The usage behind the issued invoice, frozen, still adds up to it; the live one
    // includes the late events and is named so.
    let frozen_usage = String::from_utf8(cli.bytes(&[
        "invoice",
        "show",
        "--number",
        &c_number,
        "--format",
        "usage-csv-as-issued",
    ]))
    .unwrap();
    let live_usage = String::from_utf8(cli.bytes(&[
        "invoice",
        "show",
        "--number",
        &c_number,
        "--format",
        "usage-csv",
    ]))
    .unwrap();
    let exact_lines: Decimal = c["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| dec(&l["exact"]))
        .sum();
    assert_eq!(csv_sum(&frozen_usage, "exact_amount"), exact_lines);
    assert_ne!(csv_sum(&live_usage, "exact_amount"), exact_lines);
    assert!(live_usage.contains("mystery-model") && !frozen_usage.contains("mystery-model"));

    // 2, 3, 4. Reconcile flags the cent, the late unpriced event, and counts what its
    // columns say.
    let reconcile = |period: &str| {
        let out = tokentally_output(
            &["reconcile", "--period", period, "--format", "json"],
            &cli.vars,
            None,
        );
        (
            out.status.code(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        )
    };
    let row = |r: &Value, inst: &str| {
        r["institutions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["institution"] == inst)
            .unwrap()
            .clone()
    };
    let (code, r) = reconcile("2026-08");
    assert_eq!(code, Some(1), "{r:#}");
    let rc = row(&r, "uni-c");
    assert_eq!(
        dec(&rc["difference"]),
        "0.01".parse::<Decimal>().unwrap(),
        "{rc:#}"
    );
    let status = rc["status"].as_str().unwrap();
    assert!(
        status.contains("MISMATCH") && status.contains("UNPRICED: 1"),
        "{status}"
    );
    // c1-c4 and the late l1, l2: six priced events; l3 unpriced; r1 rejected (its payload
    // names uni-c and August 31st, though it was received in another month, without a key).
    assert_eq!(
        (
            rc["priced_events"].as_i64(),
            rc["unpriced_events"].as_i64(),
            rc["unpriced_listed"].as_i64()
        ),
        (Some(6), Some(1), Some(0))
    );
    assert_eq!(rc["rejected_events"], 1, "{rc:#}");
    assert!(
        row(&r, "uni-b")["status"]
            .as_str()
            .unwrap()
            .starts_with("ok (1 unpriced"),
        "{r:#}"
    );
    let this_month = Utc::now().format("%Y-%m").to_string();
    let (_, now_r) = reconcile(&this_month);
    assert!(
        now_r["rejected_unattributed"].as_u64().unwrap() >= 1,
        "{now_r:#}"
    );

    // The invoice still verifies (late events are not its fault), and says they came.
    let v: Value = serde_json::from_str(&cli.ok(&[
        "invoice",
        "verify",
        c_file.to_str().unwrap(),
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert!(
        v["lines"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["arrived_later"].as_u64() > Some(0)),
        "{v:#}"
    );

    // September: its usage, the $0.01 adjustment explained, no $0.00 adjustment, and the
    // late unpriced event listed with the adjustments.
    let sep = doc("uni-c", "2026-09", "issue");
    let adj: Vec<&Value> = sep["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["adjustment"] == true)
        .collect();
    assert_eq!(adj.len(), 1, "{sep:#}");
    assert_eq!(
        (adj[0]["class"].as_str(), dec(&adj[0]["amount"])),
        (Some("cache_read"), "0.01".parse().unwrap())
    );
    assert_eq!(
        (dec(&adj[0]["now_amount"]), dec(&adj[0]["billed_before"])),
        ("0.01".parse().unwrap(), Decimal::ZERO)
    );
    assert_eq!(
        sep["unpriced_earlier"],
        json!([{"period": "2026-08", "events": 1, "tokens": 4040, "models": ["mystery-model"]}])
    );
    let sep_table = cli.ok(&[
        "invoice",
        "show",
        "--number",
        sep["number"].as_str().unwrap(),
    ]);
    assert!(
        sep_table.contains("UNPRICED (adjustment, 2026-08): 1 events"),
        "{sep_table}"
    );
    // Now every cent of August is billed and the late unpriced event listed: reconcile ok.
    let (code, r) = reconcile("2026-08");
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(dec(&row(&r, "uni-c")["difference"]), Decimal::ZERO);

    // 6. A credit note does not repeat the invoice's "Not billed" note.
    let b_number = doc("uni-b", "2026-08", "show")["number"]
        .as_str()
        .unwrap()
        .to_owned();
    let credit = cli.json(&[
        "invoice", "void", "--number", &b_number, "--reason", "test", "--format", "json",
    ]);
    assert_eq!(credit["unpriced"]["events"], 0);
    let cn_path = dir.path().join("cn.pdf");
    std::fs::write(
        &cn_path,
        cli.bytes(&[
            "invoice",
            "show",
            "--number",
            credit["number"].as_str().unwrap(),
            "--format",
            "pdf",
        ]),
    )
    .unwrap();
    let cn_text = tool("pdftotext", &[cn_path.to_str().unwrap(), "-"]);
    assert!(
        cn_text.contains("CREDIT NOTE") && !cn_text.contains("Not billed"),
        "{cn_text}"
    );

    // Tampering, named. One stored event altered: the line it is on, and the event.
    env.exec(
        "ALTER TABLE usage_events UPDATE output_tokens = output_tokens + 7 WHERE event_id = 'c1'",
    )
    .await
    .unwrap();
    let mut done = false;
    for _ in 0..100 {
        if env.scalar("SELECT toInt64(count()) FROM usage_events WHERE event_id = 'c1' AND output_tokens = 2007").await == 1 {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(done, "mutation did not finish");
    let out = tokentally_output(
        &["invoice", "verify", c_file.to_str().unwrap()],
        &cli.vars,
        None,
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    // c1 is on two lines (its input and its output): both, and only they, differ.
    let differs: Vec<&str> = report.lines().filter(|l| l.contains("DIFFERS")).collect();
    assert_eq!(differs.len(), 2, "{report}");
    assert!(
        differs[0].contains("acme-chat input (price of 2026-08-01 – 2026-08-15)"),
        "{report}"
    );
    assert!(
        differs[1].contains("acme-chat output (price of 2026-08-01 – 2026-08-15)"),
        "{report}"
    );
    assert!(
        report.contains("event c1 changed since the document was issued"),
        "{report}"
    );
    let line_no = c["lines"]
        .as_array()
        .unwrap()
        .iter()
        .position(|l| {
            l["model"] == "acme-chat"
                && l["class"] == "output"
                && l["applies"]["from"] == "2026-08-01"
        })
        .unwrap()
        + 1;
    let explained = cli.ok(&[
        "invoice",
        "explain",
        "--number",
        &c_number,
        "--line",
        &line_no.to_string(),
    ]);
    assert!(
        explained
            .lines()
            .any(|l| l.contains(",c1,") && l.ends_with(",changed since issue")),
        "{explained}"
    );

    // One byte of the stored copy altered: verify of that number names the document and
    // the line.
    let amount = a["lines"][0]["amount"].as_str().unwrap().to_owned();
    let mut tampered = amount.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '9' { '8' } else { '9' });
    env.exec(&format!(
        "ALTER TABLE invoices UPDATE document = replaceOne(document, '\"amount\": \"{amount}\"', '\"amount\": \"{tampered}\"') WHERE number = '{a_number}'"
    ))
    .await
    .unwrap();
    let mut report = String::new();
    for _ in 0..100 {
        let out = tokentally_output(&["invoice", "verify", &a_number], &cli.vars, None);
        report = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.code() == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(report.contains("document: ALTERED"), "{report}");
    assert!(
        report.contains("line 1 (") && report.contains("differs from the ledger's copy"),
        "{report}"
    );

    assert!(terminate(&mut ingest).success());
    env.drop_database().await;
}

/// Issue 35, item 4: issuing holds nothing per event — it reads the month's stored events
/// twice (the sums the lines come from, then the evidence: ids and leaves stored as they
/// come, Merkle roots folded as they go). Events stored between the two reads must never
/// leave a document whose evidence describes other events than its lines: a trickle of
/// late events runs while issuing, and the issued invoice then verifies line by line
/// (the late ones are "arrived later", for the next invoice), and its lines with the
/// later events account for every event stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stored_while_issuing_never_split_a_document_from_its_evidence() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let env = TestEnv::new("issue_race", 1).await;
    let cli = Cli::new(&env, &env.prices);
    let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
    // gpt-4o-mini at the shipped book's $0.15 / $0.60 per 1M tokens.
    let row = move |id: String, i: i64| {
        let (input, output) = (1_000 + i as u64 % 977, 100 + i as u64 % 31);
        EventRow {
            input_tokens: input,
            output_tokens: output,
            cost: ((Decimal::from(input) * Decimal::new(15, 2)
                + Decimal::from(output) * Decimal::new(60, 2))
                / Decimal::from(1_000_000))
            .normalize(),
            price_id: "openai:gpt-4o-mini:2024-01-01".into(),
            price_model: "gpt-4o-mini".into(),
            ..event_row(
                id,
                "uni-r",
                start + chrono::Duration::seconds(i * 97 % 2_600_000),
                "gpt-4o-mini",
            )
        }
    };
    let first: Vec<EventRow> = (0..20_000).map(|i| row(format!("e{i:06}"), i)).collect();
    env.store.insert_events(&first).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let trickle = tokio::spawn({
        let (store, stop) = (env.store.clone(), stop.clone());
        async move {
            let mut late = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = late.len() as i64;
                let r = row(format!("late{n:04}"), 20_000 + n);
                store.insert_events(std::slice::from_ref(&r)).await.unwrap();
                late.push(r);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            late
        }
    });
    let vars = cli.vars.clone();
    let issue = || {
        let vars = vars.clone();
        tokio::task::spawn_blocking(move || {
            tokentally_output(
                &[
                    "invoice",
                    "issue",
                    "--institution",
                    "uni-r",
                    "--period",
                    "2026-10",
                    "--format",
                    "json",
                ],
                &vars,
                None,
            )
        })
    };
    let mut out = issue().await.unwrap();
    // Refused only when the events kept changing on every read; then once more, calm.
    let refused = String::from_utf8_lossy(&out.stderr).contains("kept changing");
    stop.store(true, Ordering::Relaxed);
    let late = trickle.await.unwrap();
    assert!(
        late.len() >= 3,
        "the trickle ran while issuing ({} events)",
        late.len()
    );
    if refused {
        out = issue().await.unwrap();
    }
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let number = doc["number"].as_str().unwrap().to_owned();

    let v = cli.json(&["invoice", "verify", &number, "--format", "json"]);
    assert_eq!(v["ok"], true, "{v:#}");
    let lines = v["lines"].as_array().unwrap();
    assert!(lines.iter().all(|l| l["ok"] == true), "{v:#}");
    // Every event is on the document or arrived after it, none on both: per token class,
    // the document's quantity and the later events' add up to every event's tokens.
    let on_doc: u64 = doc["manifest"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["events"].as_u64().unwrap())
        .max()
        .unwrap();
    let later: u64 = lines
        .iter()
        .map(|l| l["arrived_later"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(on_doc + later, (first.len() + late.len()) as u64, "{v:#}");
    let quantity = |class: &str| -> u64 {
        doc["lines"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["class"] == class)
            .map(|l| l["quantity"].as_u64().unwrap())
            .sum()
    };
    let billed_input: u64 = quantity("input");
    let all_input: u64 = first.iter().chain(&late).map(|r| r.input_tokens).sum();
    let doc_events = on_doc as usize;
    assert!(doc_events >= first.len(), "{doc_events}");
    // The events on the document are the first `doc_events` stored (ids sort in order of
    // storing within each name: e… first, then late…).
    let expected_input: u64 = first
        .iter()
        .chain(late.iter().take(doc_events - first.len()))
        .map(|r| r.input_tokens)
        .sum();
    assert_eq!(billed_input, expected_input, "all stored: {all_input}");
}
