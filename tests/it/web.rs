//! The dashboard over known data: figures in HTML, CSV and JSON equal the test's own
//! sums; institution users and tokens reach nothing of another institution; anonymous
//! requests are turned away; forms need their CSRF token; a real Chromium renders it.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::Value;
use tokentally::store::rows::EventRow;

use crate::harness::{terminate, tokentally, TestEnv};

const INSTITUTIONS: [&str; 3] = ["inst-a", "inst-b", "inst-c"];
const MODELS: [&str; 3] = ["gpt-4o-mini", "claude-haiku-4-5", "gemini-2.0-flash"];

fn row(i: usize, inst: &str, model: &str, day: u32, cost: Decimal, priced: bool) -> EventRow {
    let t = chrono::NaiveDate::from_ymd_opt(2026, 10, day)
        .unwrap()
        .and_hms_opt((i % 24) as u32, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp() as u32;
    EventRow {
        event_id: format!("e{i}"),
        occurred_at: t,
        occurred_ms: 0,
        institution_id: inst.into(),
        user_id: format!("user{}@{inst}", i % 3),
        api_key_id: format!("pk_{inst}_{}", i % 2),
        provider: "openai".into(),
        model: model.into(),
        endpoint: String::new(),
        service_tier: String::new(),
        status: "ok".into(),
        latency_ms: 1,
        tag_keys: vec!["project".into()],
        tag_values: vec![if i.is_multiple_of(2) {
            "alpha".into()
        } else {
            "beta".into()
        }],
        input_tokens: 100 + i as u64,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 10,
        reasoning_tokens: 0,
        priced: priced as u8,
        cost: if priced { cost } else { Decimal::ZERO },
        price_id: String::new(),
        price_model: model.into(),
        price_tier: 0,
        kafka_topic: "t".into(),
        kafka_partition: 0,
        kafka_offset: i as i64,
        ingested_at: t,
        version: 0,
        sign: 1,
        usage_estimated: 0,
        billing: String::new(),
    }
}

struct Known {
    total: Decimal,
    per_inst: BTreeMap<String, Decimal>,
    per_inst_model: BTreeMap<(String, String), Decimal>,
    events: i64,
    unpriced: i64,
}

async fn load_known(env: &TestEnv) -> Known {
    let mut rows = Vec::new();
    let mut k = Known {
        total: Decimal::ZERO,
        per_inst: BTreeMap::new(),
        per_inst_model: BTreeMap::new(),
        events: 0,
        unpriced: 0,
    };
    for i in 0..600usize {
        let inst = INSTITUTIONS[i % 3];
        let model = MODELS[(i / 3) % 3];
        // Costs with many decimals and half-cent edges, so rounding mistakes show.
        let cost = Decimal::new(1_234_567 + (i as i64) * 7_919, 9) + Decimal::new(5, 3);
        let priced = i % 37 != 0;
        let r = row(i, inst, model, 1 + (i % 28) as u32, cost, priced);
        let c = r.cost;
        k.total += c;
        *k.per_inst.entry(inst.into()).or_default() += c;
        *k.per_inst_model
            .entry((inst.into(), model.into()))
            .or_default() += c;
        k.events += 1;
        k.unpriced += i64::from(!priced);
        rows.push(r);
    }
    env.store.insert_events(&rows).await.unwrap();
    k.total = k.total.normalize();
    k.per_inst.values_mut().for_each(|v| *v = v.normalize());
    k.per_inst_model
        .values_mut()
        .for_each(|v| *v = v.normalize());
    k
}

pub(crate) struct Server {
    serve: crate::harness::Serve,
    pub(crate) tokens: BTreeMap<&'static str, String>,
}

impl std::ops::Deref for Server {
    type Target = crate::harness::Serve;
    fn deref(&self) -> &crate::harness::Serve {
        &self.serve
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_server(env: &TestEnv) -> Server {
    start_server_with(env, "").await
}

/// `serve` with users admin, fin, ops, alice (inst-a) and tokens fin, inst-a; `extra`
/// TOML is appended to the config.
pub(crate) async fn start_server_with(env: &TestEnv, extra: &str) -> Server {
    start_server_users(env, extra, &[]).await
}

/// As `start_server_with`, with more users: (name, role, institution); each user's
/// password is `<name>-password`.
async fn start_server_users(
    env: &TestEnv,
    extra: &str,
    more: &[(&str, &str, Option<&str>)],
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[[institutions]]\nid = \"inst-a\"\nname = \"Institution A\"\nmonthly_budget_usd = \"1000\"\n{extra}");
    let vars = crate::harness::serve_vars(env, &dir, &config, &[]);
    let users = dir.path().join("users.toml");
    for &(name, role, inst) in [
        ("admin", "admin", None),
        ("fin", "finance", None),
        ("ops", "ops", None),
        ("alice", "institution", Some("inst-a")),
    ]
    .iter()
    .chain(more)
    {
        let mut args = vec!["users", "add", name, "--role", role, "--password-stdin"];
        if let Some(i) = inst {
            args.extend(["--institution", i]);
        }
        tokentally(&args, &vars, Some(&format!("{name}-password\n")));
    }
    let mut tokens = BTreeMap::new();
    tokens.insert(
        "fin",
        tokentally(
            &["tokens", "add", "fin-api", "--role", "finance"],
            &vars,
            None,
        ),
    );
    tokens.insert(
        "inst-a",
        tokentally(
            &[
                "tokens",
                "add",
                "a-api",
                "--role",
                "institution",
                "--institution",
                "inst-a",
            ],
            &vars,
            None,
        ),
    );
    let text = std::fs::read_to_string(&users).unwrap();
    assert!(
        !text.contains("alice-password") && !text.contains(&tokens["fin"]),
        "users file holds only hashes"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&users).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the users file is readable by its owner only");
    let serve = crate::harness::spawn_serve_in(env, dir, &config, &[]).await;
    Server { serve, tokens }
}

/// chromedriver (killed when the test ends, failing or not) and a headless Chromium
/// session with a window of `width` × `height` and a fresh profile.
pub(crate) async fn headless_chromium(
    width: u32,
    height: u32,
) -> (crate::harness::Proc, fantoccini::Client, tempfile::TempDir) {
    let port = free_port();
    let driver = crate::harness::Proc(Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian package chromium-driver) must be installed: scripts/services installs it"));
    wait_for_port(port).await;
    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), serde_json::json!({
        "binary": "/usr/bin/chromium",
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 format!("--window-size={width},{height}"), format!("--user-data-dir={}", profile.path().display())]
    }));
    let browser =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("WebDriver session");
    (driver, browser, profile)
}

pub(crate) fn client() -> reqwest::Client {
    // reqwest is built with rustls but no default provider (as in the product's main).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The CSRF token a page's form carries.
pub(crate) fn csrf_of(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .expect("a form with a csrf field")
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

/// GET /login: the pre-session CSRF cookie (as a `name=value` pair) and the form's token.
async fn login_form(s: &Server) -> (String, String) {
    let form = client()
        .get(format!("{}/login", s.base))
        .send()
        .await
        .unwrap();
    let cookie = form.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    (cookie, csrf_of(&form.text().await.unwrap()))
}

/// Waits until something listens on the port (a child process starting up).
pub(crate) async fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on port {port} after 10 s");
}

/// Logs in through the form; returns (session cookie header value, csrf token of the session's pages).
async fn login(s: &Server, user: &str, password: &str) -> String {
    let c = client();
    let (cookie, csrf) = login_form(s).await;
    let res = c
        .post(format!("{}/login", s.base))
        .header("cookie", &cookie)
        .form(&[("username", user), ("password", password), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "login of {user}");
    let session = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("tt_session="))
        .expect("session cookie");
    assert!(session.contains("HttpOnly") && session.contains("SameSite=Strict"));
    session.split(';').next().unwrap().to_owned()
}

pub(crate) async fn get(url: &str, auth: &Auth<'_>) -> reqwest::Response {
    let mut r = client().get(url);
    match auth {
        Auth::Anonymous => {}
        Auth::Cookie(c) => r = r.header("cookie", *c),
        Auth::Bearer(t) => r = r.bearer_auth(t),
    }
    r.send().await.unwrap()
}

pub(crate) enum Auth<'a> {
    Anonymous,
    Cookie(&'a str),
    Bearer(&'a str),
}

pub(crate) fn dec(v: &Value) -> Decimal {
    v.as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {v}"))
        .parse::<Decimal>()
        .unwrap()
        .normalize()
}

const RANGE: &str = "from=2026-10-01&to=2026-10-31";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_figures_match_known_data_in_html_csv_and_json() {
    let env = TestEnv::new("web", 1).await;
    let k = load_known(&env).await;
    let mut s = start_server(&env).await;
    let fin = Auth::Bearer(&s.tokens["fin"]);

    // JSON: the overview's figures and tables.
    let j: Value = get(&format!("{}/api/v1/overview?{RANGE}", s.base), &fin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dec(&j["figures"]["Spend 2026-10-01 – 2026-10-31"]), k.total);
    assert_eq!(j["figures"]["Requests"], k.events);
    assert_eq!(j["figures"]["Unpriced requests"], k.unpriced);
    let insts: BTreeMap<String, Decimal> = j["tables"]["institutions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["institution_id"].as_str().unwrap().to_owned(),
                dec(&r["cost_usd"]),
            )
        })
        .collect();
    assert_eq!(insts, k.per_inst);
    let days: Decimal = j["tables"]["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| dec(&r["cost_usd"]))
        .sum();
    assert_eq!(days.normalize(), k.total);
    let chart_sum: Decimal = j["charts"][0]["series"][0]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(dec)
        .sum();
    assert_eq!(chart_sum.normalize(), k.total);

    // CSV of the same table.
    let csv = get(
        &format!("{}/?{RANGE}&format=csv&table=institutions", s.base),
        &fin,
    )
    .await
    .text()
    .await
    .unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let cost_col = header.iter().position(|h| *h == "cost_usd").unwrap();
    let from_csv: BTreeMap<String, Decimal> = lines
        .map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            (
                c[0].to_owned(),
                c[cost_col].parse::<Decimal>().unwrap().normalize(),
            )
        })
        .collect();
    assert_eq!(from_csv, k.per_inst);

    // HTML (logged in through the form): exact values in titles, rounded display.
    let cookie = login(&s, "fin", "fin-password").await;
    let html = get(&format!("{}/?{RANGE}", s.base), &Auth::Cookie(&cookie))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        html.contains(&format!(
            "title=\"{}\">{}",
            k.total,
            tokentally::format::money(k.total)
        )),
        "total in HTML"
    );
    for (inst, cost) in &k.per_inst {
        assert!(
            html.contains(&format!("title=\"{cost}\"")),
            "{inst} in HTML"
        );
    }
    assert_eq!(
        html.matches("class=\"pt\"").count(),
        31,
        "one chart point per day"
    );

    // Institution page: per-model sums, budget, tag filter.
    let a: Value = get(
        &format!("{}/api/v1/institutions/inst-a?{RANGE}", s.base),
        &fin,
    )
    .await
    .json()
    .await
    .unwrap();
    for m in MODELS {
        let row = a["tables"]["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["model"] == m)
            .unwrap();
        assert_eq!(
            dec(&row["cost_usd"]),
            k.per_inst_model[&("inst-a".to_owned(), m.to_owned())]
        );
    }
    assert_eq!(dec(&a["figures"]["Monthly budget"]), Decimal::from(1000));
    let tagged: Value = get(
        &format!(
            "{}/api/v1/institutions/inst-a?{RANGE}&tag=project=alpha",
            s.base
        ),
        &fin,
    )
    .await
    .json()
    .await
    .unwrap();
    let tags_total: Decimal = a["tables"]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| dec(&r["cost_usd"]))
        .sum();
    assert_eq!(
        tags_total.normalize(),
        k.per_inst["inst-a"],
        "every event has one project tag"
    );
    let alpha = a["tables"]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tag"] == "project=alpha")
        .unwrap();
    assert_eq!(
        dec(&tagged["figures"]["Spend 2026-10-01 – 2026-10-31"]),
        dec(&alpha["cost_usd"])
    );

    // Models page lists the price entry in effect for a priced model.
    let m: Value = get(&format!("{}/api/v1/models?{RANGE}", s.base), &fin)
        .await
        .json()
        .await
        .unwrap();
    let total_models: Decimal = m["tables"]["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| dec(&r["cost_usd"]))
        .sum();
    assert_eq!(total_models.normalize(), k.total);
    assert!(m["tables"]["prices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["model"] == "gpt-4o-mini"));

    // Pipeline health (ops): a stored rejection, its reason and raw payload; lag per partition.
    env.store
        .insert_rejected(&[tokentally::store::rows::RejectedRow {
            received_at: chrono::NaiveDate::from_ymd_opt(2026, 10, 15)
                .unwrap()
                .and_hms_opt(9, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp() as u32,
            kafka_topic: env.cfg.kafka.topic.clone(),
            kafka_partition: 0,
            kafka_offset: 7,
            kafka_key: b"inst-a".to_vec(),
            reason: "invalid_json".into(),
            detail: "not valid JSON".into(),
            payload: b"{broken <payload>".to_vec(),
            institution_id: "inst-a".into(),
            occurred_at: 0,
        }])
        .await
        .unwrap();
    let ops = login(&s, "ops", "ops-password").await;
    let p: Value = get(
        &format!("{}/api/v1/pipeline?{RANGE}", s.base),
        &Auth::Cookie(&ops),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(p["tables"]["rejected_reasons"][0]["reason"], "invalid_json");
    assert_eq!(p["tables"]["rejected_reasons"][0]["events"], 1);
    assert_eq!(
        p["tables"]["lag"].as_array().unwrap().len(),
        1,
        "one row per partition: {p}"
    );
    let unpriced: i64 = p["tables"]["unpriced_models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["events"].as_i64().unwrap())
        .sum();
    assert_eq!(unpriced, k.unpriced);
    let m: Value = get(
        &format!("{}/api/v1/pipeline/rejected/0/7", s.base),
        &Auth::Cookie(&ops),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(m["tables"]["message"][0]["payload"], "{broken <payload>");
    let html = get(
        &format!("{}/pipeline/rejected/0/7", s.base),
        &Auth::Cookie(&ops),
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        html.contains("{broken &lt;payload&gt;"),
        "payload shown, escaped"
    );

    // OpenAPI document.
    let doc: Value = get(&format!("{}/api/v1/openapi.json", s.base), &fin)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/api/v1/institutions/{institution}"].is_object());
    terminate(&mut s.serve.proc);
    env.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn institution_users_see_only_their_institution_and_anonymous_nothing() {
    let env = TestEnv::new("access", 1).await;
    let k = load_known(&env).await;
    let mut s = start_server(&env).await;
    let cookie = login(&s, "alice", "alice-password").await;
    let token = s.tokens["inst-a"].clone();
    let pages = [
        "/".to_owned(),
        "/overview".into(),
        "/institutions".into(),
        "/institutions/inst-a".into(),
        "/models".into(),
        "/pipeline".into(),
        "/pipeline/rejected/0/1".into(),
    ];
    // Anonymous: pages redirect to the login form, the API answers 401.
    for p in &pages {
        let r = get(&format!("{}{p}", s.base), &Auth::Anonymous).await;
        assert_eq!(r.status(), 303, "anonymous {p}");
        // To the sign-in page, which leads back to the page asked for.
        let back: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("next", p)
            .finish();
        let expected = if p == "/" {
            "/login".to_owned()
        } else {
            format!("/login?{back}")
        };
        assert_eq!(r.headers()["location"], expected.as_str());
        let r = get(&format!("{}/api/v1{p}", s.base), &Auth::Anonymous).await;
        assert_eq!(r.status(), 401, "anonymous API {p}");
        let r = get(
            &format!("{}/api/v1{p}", s.base),
            &Auth::Bearer("tt_not_a_token"),
        )
        .await;
        assert_eq!(r.status(), 401, "bad token {p}");
    }
    assert_eq!(
        get(&format!("{}/api/v1/openapi.json", s.base), &Auth::Anonymous)
            .await
            .status(),
        401
    );

    // Another institution, by path, query string or export, for session and token alike.
    let foreign = [
        format!("/institutions/inst-b?{RANGE}"),
        format!("/institutions/inst-b?{RANGE}&format=csv&table=models"),
        format!("/institutions/inst-a?{RANGE}&institution=inst-b"),
        format!("/?{RANGE}&institution=inst-b"),
        format!("/?{RANGE}&institution=inst-b&format=csv&table=days"),
        format!("/overview?{RANGE}&institution=inst-c"),
        format!("/institutions?{RANGE}&institution=inst-b"),
        format!("/models?{RANGE}&institution=inst-b"),
        format!("/models?{RANGE}&institution=inst-b&format=csv&table=models"),
        "/pipeline".into(),
        "/pipeline?format=csv&table=rejected_recent".into(),
        "/pipeline/rejected/0/1".into(),
    ];
    for p in &foreign {
        for (label, auth) in [
            ("session", Auth::Cookie(&cookie)),
            ("token", Auth::Bearer(&token)),
        ] {
            for prefix in ["", "/api/v1"] {
                let status = get(&format!("{}{prefix}{p}", s.base), &auth)
                    .await
                    .status()
                    .as_u16();
                assert!(
                    status == 403 || status == 404,
                    "{label} {prefix}{p} gave {status}"
                );
            }
        }
    }

    // Without naming an institution, an institution user sees exactly their own numbers.
    for p in ["overview", "institutions", "models"] {
        let j: Value = get(
            &format!("{}/api/v1/{p}?{RANGE}", s.base),
            &Auth::Bearer(&token),
        )
        .await
        .json()
        .await
        .unwrap();
        let text = j.to_string();
        assert!(
            !text.contains("inst-b") && !text.contains("inst-c"),
            "{p} leaks another institution"
        );
    }
    let j: Value = get(
        &format!("{}/api/v1/overview?{RANGE}", s.base),
        &Auth::Cookie(&cookie),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        dec(&j["figures"]["Spend 2026-10-01 – 2026-10-31"]),
        k.per_inst["inst-a"]
    );
    assert!(j["figures"].get("Rejected events today").is_none());
    let own = get(
        &format!(
            "{}/institutions/inst-a?{RANGE}&format=csv&table=models",
            s.base
        ),
        &Auth::Cookie(&cookie),
    )
    .await;
    assert_eq!(own.status(), 200);

    // Forms need their CSRF token.
    let c = client();
    let r = c
        .post(format!("{}/logout", s.base))
        .header("cookie", &cookie)
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "logout with a forged CSRF token");
    let r = c
        .post(format!("{}/logout", s.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(
        r.status() == 403 || r.status() == 415 || r.status() == 400 || r.status() == 422,
        "logout without a CSRF token: {}",
        r.status()
    );
    let r = c
        .post(format!("{}/login", s.base))
        .form(&[
            ("username", "alice"),
            ("password", "alice-password"),
            ("csrf", "x"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "login without the CSRF cookie");
    // A real logout ends the session.
    let html = get(&format!("{}/?{RANGE}", s.base), &Auth::Cookie(&cookie))
        .await
        .text()
        .await
        .unwrap();
    let csrf = csrf_of(&html);
    let r = c
        .post(format!("{}/logout", s.base))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        get(&format!("{}/", s.base), &Auth::Cookie(&cookie))
            .await
            .status(),
        303,
        "session ended"
    );

    // Ops see the pipeline.
    let ops = login(&s, "ops", "ops-password").await;
    assert_eq!(
        get(&format!("{}/pipeline?{RANGE}", s.base), &Auth::Cookie(&ops))
            .await
            .status(),
        200
    );

    // Guessing passwords is rate limited (5 attempts per minute per name and per address).
    let (login_cookie, csrf) = login_form(&s).await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = c
            .post(format!("{}/login", s.base))
            .header("cookie", &login_cookie)
            .form(&[
                ("username", "admin"),
                ("password", "guess"),
                ("csrf", csrf.as_str()),
            ])
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let r = c
        .post(format!("{}/login", s.base))
        .header("cookie", &login_cookie)
        .form(&[
            ("username", "admin"),
            ("password", "admin-password"),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        429,
        "even the right password waits once the quota is used"
    );
    terminate(&mut s.serve.proc);
    env.drop_database().await;
}

/// Debian's chromium and chromium-driver (installed by scripts/services).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_logs_in_and_sees_charts_with_data() {
    use fantoccini::Locator;
    let env = TestEnv::new("browser", 1).await;
    let known = load_known(&env).await;
    // An institution that spent less than a cent, part of it on a model without a price.
    env.store
        .insert_events(&[
            row(
                9_001,
                "inst-tiny",
                "gpt-4o-mini",
                15,
                Decimal::new(375, 6),
                true,
            ),
            row(
                9_002,
                "inst-tiny",
                "mystery-model",
                15,
                Decimal::ZERO,
                false,
            ),
        ])
        .await
        .unwrap();
    let mut s = start_server(&env).await;
    let (mut driver, browser, _profile) = headless_chromium(1280, 1600).await;
    let shots = crate::harness::repo().join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    let result: Result<(), fantoccini::error::CmdError> = async {
        browser.goto(&format!("{}/login", s.base)).await?;
        browser.find(Locator::Css("input[name=username]")).await?.send_keys("fin").await?;
        browser.find(Locator::Css("input[name=password]")).await?.send_keys("fin-password").await?;
        browser.find(Locator::Css("button[type=submit]")).await?.click().await?;
        // The overview's figures (the login page has an `h1` too).
        browser.wait().for_element(Locator::Css(".figure")).await?;
        assert_eq!(browser.current_url().await?.path(), "/", "logged in and sent to the overview");
        // Issue 33, item 8: every view says which days it shows (by default this month).
        let today = chrono::Utc::now().date_naive();
        let range = browser.find(Locator::Css("#range")).await?.text().await?;
        assert!(
            range.starts_with("Showing 1")
                && range.ends_with(&format!("{} (UTC days)", today.format("%B %Y"))),
            "{range}"
        );
        for (page, title) in [("institutions", "Institutions"), ("models", "Models")] {
            browser.goto(&format!("{}/{page}?{RANGE}", s.base)).await?;
            assert_eq!(browser.find(Locator::Css("h1")).await?.text().await?, title);
            assert_eq!(
                browser.find(Locator::Css("#range")).await?.text().await?,
                "Showing 1 – 31 October 2026 (UTC days)"
            );
        }
        browser.goto(&format!("{}/?{RANGE}", s.base)).await?;
        let points = browser.find_all(Locator::Css("svg.chart .pt")).await?;
        assert_eq!(points.len(), 31, "one point per day on the overview chart");
        let nonzero = browser
            .execute("return Array.from(document.querySelectorAll('svg.chart .pt')).filter(p => Number(p.dataset.value) > 0).length", vec![])
            .await?;
        assert!(nonzero.as_u64().unwrap() > 0, "the chart has data");
        std::fs::write(shots.join("overview.png"), browser.screenshot().await?).unwrap();
        browser.goto(&format!("{}/institutions/inst-a?{RANGE}", s.base)).await?;
        let points = browser.find_all(Locator::Css("svg.chart .pt")).await?;
        assert!(points.len() >= 31, "institution chart has points ({})", points.len());
        std::fs::write(shots.join("institution.png"), browser.screenshot().await?).unwrap();
        // Issue 33, item 5: one period per view — October selected, the budget card is
        // October's ($1,000 budget; it was this month's beside October's spend) ...
        let figures = |browser: fantoccini::Client| async move {
            let v = browser
                .execute(
                    "return Array.from(document.querySelectorAll('.figure')).map(f => [f.querySelector('.label').textContent, f.querySelector('.value').textContent])",
                    vec![],
                )
                .await?;
            Ok::<Vec<(String, String)>, fantoccini::error::CmdError>(serde_json::from_value(v).unwrap())
        };
        let october = known.per_inst["inst-a"];
        let cents = |d: Decimal| {
            format!("${:.2}", d.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero))
        };
        assert!(october < Decimal::ONE_THOUSAND, "no thousands separator to write");
        let want = [
            ("Budget used October 2026".to_owned(), format!("{}%", (october / Decimal::TEN).round_dp(1))),
            (
                "Budget remaining October 2026".to_owned(),
                cents(Decimal::ONE_THOUSAND - october),
            ),
            ("Spend October 2026".to_owned(), cents(october)),
        ];
        let shown = figures(browser.clone()).await?;
        for w in &want {
            assert!(shown.contains(w), "{w:?} in {shown:?}");
        }
        assert!(!shown.iter().any(|(l, _)| l.contains("this month") || l.starts_with("Projected")), "{shown:?}");
        let charts = browser
            .execute("return Array.from(document.querySelectorAll('h2, figcaption, .chart-title')).map(e => e.textContent)", vec![])
            .await?;
        assert!(charts.to_string().contains("Budget burn-down October 2026"), "{charts}");
        // ... and a view of one user has no budget card beside that user's spend.
        browser.goto(&format!("{}/institutions/inst-a?{RANGE}&user=user0@inst-a", s.base)).await?;
        let shown = figures(browser.clone()).await?;
        assert!(!shown.iter().any(|(l, _)| l.contains("budget") || l.contains("Budget")), "{shown:?}");
        assert!(browser.source().await?.contains("The monthly budget is the whole institution"));
        browser.goto(&format!("{}/institutions/inst-a?{RANGE}", s.base)).await?;
        // Polish: the users table says it is the top 20, and each user opens the page
        // narrowed to them; a column sorts from the keyboard.
        let first_user = browser
            .execute(
                "const h = Array.from(document.querySelectorAll('h2')).find(h => h.textContent.startsWith('Top 20 users by spend')); if (!h) return null; const a = h.closest('section').querySelector('tbody a'); const t = a.textContent; a.click(); return t;",
                vec![],
            )
            .await?;
        let user = first_user.as_str().expect("a linked user under 'Top 20 users by spend'").to_owned();
        browser.wait().for_element(Locator::XPath("//p[contains(., 'The monthly budget is the whole institution')]")).await?;
        let at = browser.current_url().await?;
        assert_eq!(at.path(), "/institutions/inst-a");
        assert!(at.query().unwrap_or_default().contains(&format!("user={}", user.replace('@', "%40"))), "{at}");
        let sorted = browser
            .execute(
                "const th = document.querySelector('table.sortable th.num'); th.focus(); th.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', bubbles: true})); return [document.activeElement === th, th.getAttribute('aria-sort')];",
                vec![],
            )
            .await?;
        assert_eq!(sorted, serde_json::json!([true, "ascending"]));
        browser.goto(&format!("{}/institutions/inst-a?{RANGE}", s.base)).await?;

        // Issue 33, items 1 and 2: the picker on an institution's page names it and lists
        // every institution with usage (none is in this config); picking another and
        // pressing Apply opens that one's page (it was a JSON error), "All institutions"
        // the overview; the dates stay.
        let options = |browser: fantoccini::Client, css: &'static str| async move {
            let v = browser
                .execute(
                    "return Array.from(document.querySelectorAll(arguments[0] + ' option')).map(o => o.value + (o.selected ? '*' : ''))",
                    vec![serde_json::json!(css)],
                )
                .await?;
            Ok::<Vec<String>, fantoccini::error::CmdError>(
                serde_json::from_value(v).unwrap(),
            )
        };
        assert_eq!(
            options(browser.clone(), "form.filters select[name=institution]").await?,
            ["", "inst-a*", "inst-b", "inst-c", "inst-tiny"]
        );
        browser
            .find(Locator::Css("form.filters select[name=institution]"))
            .await?
            .select_by_value("inst-b")
            .await?;
        browser.find(Locator::Css("form.filters button[type=submit]")).await?.click().await?;
        browser
            .wait()
            .for_element(Locator::XPath("//h1[text()='Institution inst-b']"))
            .await?;
        let at = browser.current_url().await?;
        assert_eq!((at.path(), at.query()), ("/institutions/inst-b", Some(RANGE)));
        assert_eq!(
            options(browser.clone(), "form.filters select[name=institution]").await?,
            ["", "inst-a", "inst-b*", "inst-c", "inst-tiny"]
        );
        std::fs::write(shots.join("institution-picked-1280.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(shots.join("institution-picked-390.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(1280, 1600).await?;
        browser
            .find(Locator::Css("form.filters select[name=institution]"))
            .await?
            .select_by_value("")
            .await?;
        browser.find(Locator::Css("form.filters button[type=submit]")).await?.click().await?;
        browser
            .wait()
            .for_element(Locator::XPath("//h1[text()='Overview']"))
            .await?;
        let at = browser.current_url().await?;
        assert_eq!((at.path(), at.query()), ("/", Some(RANGE)));
        // The invoice forms offer every institution too.
        browser.goto(&format!("{}/invoices", s.base)).await?;
        assert_eq!(
            options(browser.clone(), "form[action='/invoices/draft'] select[name=institution]").await?,
            ["inst-a*", "inst-b", "inst-c", "inst-tiny"]
        );
        // Item 6: less than a cent is "< $0.01", usage without a price "unpriced" (both
        // read "$0.00" before); the chart's scale and tooltips are in sub-cents too.
        browser.goto(&format!("{}/institutions/inst-tiny?{RANGE}", s.base)).await?;
        let cost_of = |model: &'static str| {
            let browser = browser.clone();
            async move {
                let v = browser
                    .execute(
                        "const row = Array.from(document.querySelectorAll('tbody tr')).find(r => r.cells[0].textContent.trim() === arguments[0]); return row ? row.cells[1].textContent.trim() : null",
                        vec![serde_json::json!(model)],
                    )
                    .await?;
                Ok::<_, fantoccini::error::CmdError>(v.as_str().map(str::to_owned))
            }
        };
        assert_eq!(cost_of("gpt-4o-mini").await?.as_deref(), Some("< $0.01"));
        assert_eq!(cost_of("mystery-model").await?.as_deref(), Some("unpriced"));
        let spend = browser.find(Locator::Css(".figure")).await?.text().await?;
        assert!(spend.contains("< $0.01"), "{spend}");
        let svg = browser.find(Locator::Css("svg.chart")).await?.html(false).await?;
        assert!(svg.contains(">$0.00038<") && !svg.contains(">$0.00<"), "{svg}");
        std::fs::write(shots.join("sub-cent-1280.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(shots.join("sub-cent-390.png"), browser.screenshot().await?).unwrap();
        // Polish: chart text stays readable on a phone (it was ~5 px), the legend is the
        // page's text under the chart (it covered peaks), and a month is labelled every
        // few days (only its first and last day were).
        let px = browser
            .execute("return document.querySelector('svg.chart text.x').getBoundingClientRect().height", vec![])
            .await?;
        assert!(px.as_f64().unwrap() >= 9.0, "chart text on a phone: {px} px");
        let (labels, legend) = (
            browser.execute("return document.querySelectorAll('svg.chart text.x').length", vec![]).await?,
            browser.execute("return Array.from(document.querySelectorAll('ul.legend li')).map(l => l.textContent)", vec![]).await?,
        );
        assert_eq!(labels, serde_json::json!(6), "31 days: every sixth, the last included");
        assert_eq!(legend, serde_json::json!(["gpt-4o-mini", "mystery-model"]));
        browser.set_window_size(1280, 1600).await?;
        // Item 11: a link followed while signed out (as from an alert e-mail) leads,
        // after signing in, to the page it named, not to the overview.
        browser.find(Locator::Css("form[action='/logout'] button")).await?.click().await?;
        browser.wait().for_element(Locator::Css("input[name=username]")).await?;
        browser.goto(&format!("{}/models?{RANGE}", s.base)).await?;
        browser.wait().for_element(Locator::Css("input[name=username]")).await?;
        browser.find(Locator::Css("input[name=username]")).await?.send_keys("fin").await?;
        browser.find(Locator::Css("input[name=password]")).await?.send_keys("fin-password").await?;
        browser.find(Locator::Css("button[type=submit]")).await?.click().await?;
        browser.wait().for_element(Locator::XPath("//h1[text()='Models']")).await?;
        let at = browser.current_url().await?;
        assert_eq!((at.path(), at.query()), ("/models", Some(RANGE)));
        // Item 3: a view refused for its dates says why in a page of the dashboard and
        // keeps what was asked, to correct and show.
        browser.goto(&format!("{}/models?from=2026-10-31&to=2026-10-01&model=gpt-4o-mini", s.base)).await?;
        let error = browser.find(Locator::Css("#error")).await?.text().await?;
        assert_eq!(error, "`from` is after `to`");
        let kept = browser
            .execute("return Array.from(document.querySelectorAll('#retry input')).map(i => i.name + '=' + i.value)", vec![])
            .await?;
        assert_eq!(kept, serde_json::json!(["from=2026-10-31", "to=2026-10-01", "model=gpt-4o-mini"]));
        std::fs::write(shots.join("view-error-1280.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(shots.join("view-error-390.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(1280, 1600).await?;
        browser
            .execute("document.querySelector('#retry input[name=from]').value = '2026-10-01'", vec![])
            .await?;
        browser.find(Locator::Css("#retry button[type=submit]")).await?.click().await?;
        browser.wait().for_element(Locator::XPath("//h1[text()='Models']")).await?;
        let at = browser.current_url().await?;
        assert_eq!(at.query(), Some("from=2026-10-01&to=2026-10-01&model=gpt-4o-mini"));
        Ok(())
    }
    .await;
    let _ = browser.close().await;
    let _ = driver.kill();
    let _ = driver.wait();
    result.unwrap();
    terminate(&mut s.serve.proc);
    env.drop_database().await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Issue 10, finding 1: 200 logins with a 1 MB user name grew the server by 205 MB and
/// its log by 210 MB. Now the form is refused by size before anything reads it, the
/// failed-login table is bounded, and logged names are escaped and truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_leaves_memory_and_log_bounded() {
    let env = TestEnv::new("loginflood", 1).await;
    let s = start_server(&env).await;
    let (cookie, csrf) = login_form(&s).await;
    let http = client();
    // Warm up, then measure.
    for _ in 0..3 {
        let _ = http.get(format!("{}/login", s.base)).send().await;
    }
    let rss_before = rss_kib(s.proc.id());
    let log_before = std::fs::metadata(&s.log).unwrap().len();
    let huge = "u".repeat(1024 * 1024);
    let mut refused = 0;
    let mut rss_half = 0;
    for i in 0..200 {
        if i == 100 {
            rss_half = rss_kib(s.proc.id());
        }
        let res = http
            .post(format!("{}/login", s.base))
            .header("cookie", &cookie)
            .form(&[
                ("username", huge.as_str()),
                ("password", "x"),
                ("csrf", &csrf),
            ])
            .send()
            .await;
        // Refused by size: a 413, or (when the server answers before the client has sent
        // the whole body) the connection closed under the upload.
        match res {
            Ok(r) => assert_eq!(r.status(), 413, "a 1 MB form is refused by size"),
            Err(e) => assert!(e.is_request(), "{e}"),
        }
        refused += 1;
    }
    assert_eq!(refused, 200);
    let rss_after_huge = rss_kib(s.proc.id());
    // The server closes a connection whose upload it refused; a pooled client may still
    // pick such a connection for its next request (IncompleteMessage). A fresh client
    // for the second phase keeps that race out of the counts below.
    let http = client();
    // Many distinct (short) names, and names that try to forge a log line.
    let mut statuses = BTreeMap::new();
    for i in 0..300 {
        let name = format!("user-{i}\n2026-01-01T00:00:00Z  INFO login user=admin");
        let res = http
            .post(format!("{}/login", s.base))
            .header("cookie", &cookie)
            .form(&[
                ("username", name.as_str()),
                ("password", "wrong"),
                ("csrf", &csrf),
            ])
            .send()
            .await
            .unwrap();
        *statuses.entry(res.status().as_u16()).or_insert(0) += 1;
    }
    // The address is limited after 25 failures; the rest never reach argon2.
    assert_eq!(statuses.get(&401), Some(&25), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&275), "{statuses:?}");
    let rss_after = rss_kib(s.proc.id());
    let log_after = std::fs::metadata(&s.log).unwrap().len();
    let log = std::fs::read_to_string(&s.log).unwrap();
    println!(
        "login flood: RSS {rss_before} → {rss_half} KiB after 100 × 1 MB names → {rss_after_huge} KiB after 200 → {rss_after} KiB after 300 failed logins; log {log_before} → {log_after} bytes"
    );
    // Bounded, not proportional to what was sent: the first hundred megabytes cost the
    // server's connection buffers and allocator arenas a few MiB at most (3–4.3 MiB
    // measured, depending on which threads served them), the second hundred nothing
    // more.
    assert!(
        rss_half < rss_before + 8 * 1024,
        "100 × 1 MB names grew RSS by {} KiB",
        rss_half - rss_before
    );
    assert!(
        rss_after_huge < rss_half + 2 * 1024,
        "100 more 1 MB names grew RSS by {} KiB",
        rss_after_huge.saturating_sub(rss_half)
    );
    // argon2 needs 19 MiB of working memory; the two login threads keep theirs (a fixed
    // cost paid on the first failed logins), nothing more.
    assert!(
        rss_after < rss_before + 48 * 1024,
        "RSS grew by {} KiB",
        rss_after - rss_before
    );
    // Another round of the same: no growth at all.
    for i in 0..100 {
        let _ = http
            .post(format!("{}/login", s.base))
            .header("cookie", &cookie)
            .form(&[
                ("username", format!("again-{i}").as_str()),
                ("password", "wrong"),
                ("csrf", &csrf),
            ])
            .send()
            .await;
    }
    let rss_again = rss_kib(s.proc.id());
    assert!(
        rss_again < rss_after + 4 * 1024,
        "RSS grew again: {rss_after} → {rss_again} KiB"
    );
    assert!(
        log_after - log_before < 200 * 1024,
        "log grew by {} bytes",
        log_after - log_before
    );
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a user name forged a log line"
    );
    assert!(
        log.contains("user-7\\n2026-01-01"),
        "names are logged escaped"
    );
    env.drop_database().await;
}

/// Issue 10, finding 3: a repeated `institution` was silently ignored, an absurd date
/// panicked the handler, and ranges and filters had no limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_absurd_parameters_are_refused_on_every_route() {
    let env = TestEnv::new("failclosed", 1).await;
    load_known(&env).await;
    let s = start_server_with(&env, "[web]\nmax_rows_to_read = 50\n").await;
    let fin = Auth::Bearer(&s.tokens["fin"]);
    let inst = Auth::Bearer(&s.tokens["inst-a"]);
    let routes = [
        "/",
        "/overview",
        "/institutions",
        "/institutions/inst-a",
        "/models",
        "/alerts",
        "/invoices",
        "/invoices/draft?period=2026-10",
        "/pipeline",
        "/keys",
        "/limits",
    ];
    for prefix in ["", "/api/v1"] {
        for route in routes {
            let sep = if route.contains('?') { '&' } else { '?' };
            let url = format!(
                "{}{prefix}{route}{sep}institution=inst-a&institution=inst-b",
                s.base
            );
            for who in [&fin, &inst] {
                let res = get(&url, who).await;
                assert_eq!(res.status(), 400, "{url}");
            }
        }
    }
    for bad in [
        "to=+262142-12-31",
        "from=2026-13-01",
        "to=99999-01-01",
        "from=2026-1-1",
        "to=1800-01-01",
    ] {
        let res = get(&format!("{}/api/v1/overview?{bad}", s.base), &fin).await;
        assert_eq!(res.status(), 400, "{bad}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("YYYY-MM-DD"),
            "{body}"
        );
    }
    let res = get(
        &format!(
            "{}/institutions/inst-a?from=2016-01-01&to=2026-01-01",
            s.base
        ),
        &fin,
    )
    .await;
    assert_eq!(res.status(), 400);
    assert!(res.text().await.unwrap().contains("at most 400 days"));
    // A tag filter reads raw events; with `max_rows_to_read = 50` it is cut off with a
    // clear answer instead of running on.
    let res = get(
        &format!(
            "{}/api/v1/institutions/inst-a?from=2026-10-01&to=2026-10-31&tag=project%3Dx",
            s.base
        ),
        &fin,
    )
    .await;
    assert_eq!(res.status(), 422);
    assert!(res.text().await.unwrap().contains("narrow the date range"));
    // Every dashboard query carries a time limit (`web.query_timeout_secs`, 20 s).
    let reader = tokentally::store::Store::dashboard_reader(&{
        let mut c = env.cfg.clone();
        c.web.query_timeout_secs = 7;
        c
    });
    let limit = reader
        .effective_setting("max_execution_time")
        .await
        .unwrap();
    assert_eq!(limit, "7");
    env.drop_database().await;
}

/// Issue 10, findings 4 and 5: a failing webhook logged its URL (a secret), and every
/// invoice draft opened a Kafka client and read the whole ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_failures_log_no_secret_and_drafts_are_cached_and_limited() {
    let env = TestEnv::new("hygiene", 1).await;
    let closed = free_port();
    let config = format!(
        "[alerts]\ninterval_secs = 1\nrejected_per_hour = 0\n[alerts.webhook]\nurl = \"http://127.0.0.1:{closed}/services/T000/B000/SECRETPATH\"\nmax_attempts = 2\nretry_initial_ms = 100\n[web]\ndrafts_per_minute = 5\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let extra = [(
        "TOKENTALLY_LOG",
        "info,tokentally::billing::ledger=debug".to_owned(),
    )];
    let vars = crate::harness::serve_vars(&env, &dir, &config, &extra);
    let token = tokentally(
        &[
            "tokens",
            "add",
            "a-api",
            "--role",
            "institution",
            "--institution",
            "inst-a",
        ],
        &vars,
        None,
    );
    let s = crate::harness::spawn_serve_in(&env, dir, &config, &extra).await;
    // A rejected message makes the rejections alert fire; its webhook cannot connect.
    #[derive(clickhouse::Row, serde::Serialize)]
    struct Rejected {
        received_at: u32,
        kafka_topic: String,
        kafka_partition: i32,
        kafka_offset: i64,
        kafka_key: String,
        reason: String,
        detail: String,
        payload: String,
    }
    let mut ins = env
        .ch()
        .insert::<Rejected>("rejected_events")
        .await
        .unwrap();
    ins.write(&Rejected {
        received_at: chrono::Utc::now().timestamp() as u32,
        kafka_topic: env.cfg.kafka.topic.clone(),
        kafka_partition: 0,
        kafka_offset: 0,
        kafka_key: String::new(),
        reason: "invalid_json".into(),
        detail: "test".into(),
        payload: "{".into(),
    })
    .await
    .unwrap();
    ins.end().await.unwrap();
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(&s.log).unwrap();
        if log.contains("webhook not delivered") {
            assert!(log.contains("host=127.0.0.1"), "the host is logged");
            assert!(
                !log.contains("SECRETPATH") && !log.contains("/services/"),
                "the URL path leaked"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no webhook attempt: {log}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Drafts in a loop: the fold is kept (one ledger reader for the whole run) and a
    // person gets `drafts_per_minute` of them.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let res = client()
            .get(format!(
                "{}/invoices/draft?period=2026-10&format=json",
                s.base
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(&statuses[..5], &[200; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let log = std::fs::read_to_string(&s.log).unwrap();
    let readers = log.matches("opening the invoice ledger reader").count();
    assert!(
        readers <= 2,
        "{readers} ledger readers opened (upkeep + drafts at most)"
    );
    env.drop_database().await;
}

/// Issue 12: the Keys page. An institution administrator (role `institution_admin`)
/// creates a key for one of their people in the browser (shown once), the gateway
/// accepts it, they revoke it in the browser and the gateway refuses it; their limits stay
/// their institution's. Who may touch which keys, and the key log, are router tests
/// (`src/web/tests/keys.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_page_institution_admin_creates_and_revokes_own_keys_only() {
    use fantoccini::Locator;
    let env = TestEnv::new("keyspage", 1).await;
    let mut s = start_server_users(
        &env,
        "",
        &[
            ("anna", "institution_admin", Some("inst-a")),
            ("bert", "institution_admin", Some("inst-b")),
        ],
    )
    .await;
    let sim = crate::harness::spawn_simulator(&env, &[]).await;
    let gdir = tempfile::tempdir().unwrap();
    let gw = crate::harness::spawn_gateway(&env, "a", env.gateway_vars(&sim, gdir.path())).await;
    // A key of inst-b, made with the CLI.
    let other: Value = serde_json::from_str(&tokentally(
        &[
            "keys",
            "create",
            "--institution",
            "inst-b",
            "--user",
            "zed",
            "--format",
            "json",
        ],
        &env.cli_vars(),
        None,
    ))
    .unwrap();
    let other_id = other["key_id"].as_str().unwrap().to_owned();

    let (mut driver, browser, _profile) = headless_chromium(1280, 1200).await;
    let http = client();
    let models = |key: String| {
        let http = http.clone();
        let base = gw.base.clone();
        async move {
            http.get(format!("{base}/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let result: Result<(String, String), fantoccini::error::CmdError> = async {
        browser.goto(&format!("{}/login", s.base)).await?;
        browser
            .find(Locator::Css("input[name=username]"))
            .await?
            .send_keys("anna")
            .await?;
        browser
            .find(Locator::Css("input[name=password]"))
            .await?
            .send_keys("anna-password")
            .await?;
        browser
            .find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;
        // The overview's figures (the login page has an `h1` too).
        browser.wait().for_element(Locator::Css(".figure")).await?;
        browser
            .find(Locator::LinkText("Keys"))
            .await?
            .click()
            .await?;
        browser
            .wait()
            .for_element(Locator::Css("form#create"))
            .await?;
        // Anna's form has no institution field: her keys are inst-a's.
        assert!(browser
            .find_all(Locator::Css("form#create input[name=institution]"))
            .await?
            .is_empty());
        // inst-b's key is not on her page.
        let page = browser.source().await?;
        assert!(
            !page.contains(&other_id),
            "another institution's key is listed"
        );
        browser
            .find(Locator::Css("form#create input[name=user]"))
            .await?
            .send_keys("student1@inst-a")
            .await?;
        browser
            .find(Locator::Css("form#create input[name=name]"))
            .await?
            .send_keys("thesis")
            .await?;
        browser
            .find(Locator::Css("form#create input[name=models]"))
            .await?
            .send_keys("gpt-4o-mini")
            .await?;
        browser
            .find(Locator::Css("form#create input[name=rpm]"))
            .await?
            .send_keys("10")
            .await?;
        browser
            .find(Locator::Css("form#create button[type=submit]"))
            .await?
            .click()
            .await?;
        let secret = browser
            .wait()
            .for_element(Locator::Css("#secret"))
            .await?
            .text()
            .await?;
        // Issue 33 (polish): the new key comes with a copy button and SDK snippets.
        let snippet = browser
            .find(Locator::Css("#snippet-openai"))
            .await?
            .text()
            .await?;
        assert!(
            snippet.contains(&format!("api_key=\"{secret}\"")) && snippet.contains("/v1\""),
            "{snippet}"
        );
        assert!(!browser
            .find_all(Locator::Css("button[data-copy=secret]"))
            .await?
            .is_empty());
        let message = browser.find(Locator::Css("#message")).await?.text().await?;
        let key_id = message.split_whitespace().nth(2).unwrap().to_owned();
        let row = browser
            .find(Locator::Css(&format!("tr[data-key='{key_id}']")))
            .await?
            .text()
            .await?;
        assert!(
            row.contains("inst-a")
                && row.contains("student1@inst-a")
                && row.contains("10 requests/min")
                && row.contains("active"),
            "{row}"
        );
        // Issue 33 (polish): the result is at the page's own address, not the POST's
        // (post/redirect/get): reloading shows the page again — the secret and the
        // message gone, no second key created.
        assert_eq!(browser.current_url().await?.path(), "/keys");
        browser.refresh().await?;
        browser.wait().for_element(Locator::Css("form#create")).await?;
        assert!(browser.find_all(Locator::Css("#secret")).await?.is_empty());
        assert!(browser.find_all(Locator::Css("#message")).await?.is_empty());
        assert_eq!(
            browser
                .find_all(Locator::Css(&format!("tr[data-key='{key_id}']")))
                .await?
                .len(),
            1
        );
        let thesis = browser
            .execute(
                "return Array.from(document.querySelectorAll('tr[data-key]')).filter(r => r.textContent.includes('thesis')).length",
                vec![],
            )
            .await?;
        assert_eq!(thesis, serde_json::json!(1), "one key named thesis after the reload");
        // Issue 33, item 3: a refused form says why inside the page and keeps what was
        // typed (it was a bare JSON page, the input lost).
        let form_value = |css: &'static str| {
            let browser = browser.clone();
            async move { browser.find(Locator::Css(css)).await?.prop("value").await }
        };
        browser
            .find(Locator::Css("form#create input[name=user]"))
            .await?
            .send_keys("student2@inst-a")
            .await?;
        browser
            .find(Locator::Css("form#create input[name=name]"))
            .await?
            .send_keys("lab")
            .await?;
        browser
            .find(Locator::Css("form#create input[name=rpm]"))
            .await?
            .send_keys("abc")
            .await?;
        browser
            .find(Locator::Css("form#create button[type=submit]"))
            .await?
            .click()
            .await?;
        let said = changed_text(&browser, "#message", &message).await;
        assert_eq!(said, "Not created: rpm must be a whole number, got `abc`.");
        assert_eq!(
            form_value("form#create input[name=user]").await?.as_deref(),
            Some("student2@inst-a")
        );
        assert_eq!(
            form_value("form#create input[name=name]").await?.as_deref(),
            Some("lab")
        );
        assert_eq!(
            form_value("form#create input[name=rpm]").await?.as_deref(),
            Some("abc")
        );
        browser.find(Locator::Css("header")).await?;
        let shots = crate::harness::repo().join("target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        std::fs::write(
            shots.join("form-error-1280.png"),
            browser.screenshot().await?,
        )
        .unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(
            shots.join("form-error-390.png"),
            browser.screenshot().await?,
        )
        .unwrap();
        browser.set_window_size(1280, 1200).await?;
        // The same on the Limits page: an amount of "twenty".
        browser.goto(&format!("{}/limits", s.base)).await?;
        browser
            .find(Locator::Css("form#set input[name=subject]"))
            .await?
            .send_keys("student2@inst-a")
            .await?;
        browser
            .find(Locator::Css("form#set input[name=amount]"))
            .await?
            .send_keys("twenty")
            .await?;
        browser
            .find(Locator::Css("form#set select[name=metric]"))
            .await?
            .select_by_value("requests")
            .await?;
        browser
            .find(Locator::Css("form#set button[type=submit]"))
            .await?
            .click()
            .await?;
        let said = changed_text(&browser, "#message", "").await;
        assert_eq!(said, "Not set: amount `twenty` is not a number.");
        assert_eq!(
            form_value("form#set input[name=subject]").await?.as_deref(),
            Some("student2@inst-a")
        );
        assert_eq!(
            form_value("form#set input[name=amount]").await?.as_deref(),
            Some("twenty")
        );
        assert_eq!(
            form_value("form#set select[name=metric]").await?.as_deref(),
            Some("requests")
        );
        // Corrected, it is set; a user never seen is pointed out (a typo is silent no more).
        let subject = browser
            .find(Locator::Css("form#set input[name=subject]"))
            .await?;
        subject.clear().await?;
        subject.send_keys("student1@inst-a").await?;
        let amount = browser
            .find(Locator::Css("form#set input[name=amount]"))
            .await?;
        amount.clear().await?;
        amount.send_keys("15").await?;
        browser
            .find(Locator::Css("form#set select[name=period]"))
            .await?
            .select_by_value("day")
            .await?;
        browser
            .find(Locator::Css("form#set button[type=submit]"))
            .await?
            .click()
            .await?;
        let said = changed_text(
            &browser,
            "#message",
            "Not set: amount `twenty` is not a number.",
        )
        .await;
        assert!(
            said.starts_with("Set ")
                && said.contains(
                    "Note: student1@inst-a has no usage and has never signed in at inst-a"
                ),
            "{said}"
        );
        Ok((key_id, secret))
    }
    .await;
    let (key_id, secret) = result.expect("creating a key in the browser");
    assert!(secret.starts_with(&format!("tt-{key_id}-")), "{secret}");
    // The gateway accepts it within its refresh interval.
    let started = Instant::now();
    while models(secret.clone()).await != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new key is not accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let form_post = |who: String, path: String, fields: Vec<(&'static str, String)>| {
        let http = http.clone();
        let base = s.base.clone();
        async move {
            let page = http
                .get(format!("{base}/keys"))
                .header("cookie", &who)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let mut fields = fields;
            if page.contains("name=\"csrf\"") {
                fields.push(("csrf", csrf_of(&page)));
            }
            http.post(format!("{base}{path}"))
                .header("cookie", &who)
                .form(&fields)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let anna = login(&s, "anna", "anna-password").await;
    let alice = login(&s, "alice", "alice-password").await;

    // Limits (issue 13): anna sets a quota for one of her users, but not her
    // institution's own budget nor anything of inst-b's; alice cannot set any; each sees
    // only inst-a's limits, finance sees all.
    let quota = vec![
        ("scope", "user".to_string()),
        ("subject", "student1@inst-a".into()),
        ("metric", "requests".into()),
        ("amount", "15".into()),
        ("period", "day".into()),
    ];
    // Set: the browser is sent to the Limits page, which says so (post/redirect/get).
    assert_eq!(
        form_post(anna.clone(), "/limits/set".into(), quota.clone()).await,
        303
    );
    let mut own = quota.clone();
    own[0].1 = "institution".into();
    assert_eq!(
        form_post(anna.clone(), "/limits/set".into(), own).await,
        403
    );
    let mut other = quota.clone();
    other.push(("institution", "inst-b".into()));
    assert_eq!(
        form_post(anna.clone(), "/limits/set".into(), other).await,
        403
    );
    assert_eq!(
        form_post(alice.clone(), "/limits/set".into(), quota.clone()).await,
        403
    );
    tokentally(
        &["limits", "set", "--institution", "inst-b", "--usd", "100"],
        &env.cli_vars(),
        None,
    );
    let page = get(&format!("{}/limits", s.base), &Auth::Cookie(&anna))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("inst-a:user:student1@inst-a:requests:day")
            && page.contains("15 requests per day"),
        "{page}"
    );
    assert!(!page.contains("inst-b"));
    let mine: Value = get(&format!("{}/api/v1/limits", s.base), &Auth::Cookie(&alice))
        .await
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = mine["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["limit_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["inst-a:user:student1@inst-a:requests:day"]);
    assert_eq!(
        get(
            &format!("{}/limits?institution=inst-b", s.base),
            &Auth::Cookie(&alice)
        )
        .await
        .status(),
        403
    );
    let all: Value = get(
        &format!("{}/api/v1/limits", s.base),
        &Auth::Bearer(&s.tokens["fin"]),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(all["limits"].as_array().unwrap().len(), 2, "{all}");

    // Anna revokes it in the browser: every gateway refuses it within seconds.
    let revoked: Result<String, fantoccini::error::CmdError> = async {
        browser.goto(&format!("{}/keys", s.base)).await?;
        // Issue 33 (polish): the nav marks the page shown.
        assert_eq!(
            browser
                .find(Locator::Css("header a[aria-current=page]"))
                .await?
                .text()
                .await?,
            "Keys"
        );
        // The action is in view at 1280 px (it was clipped at the right).
        let revoke = format!("tr[data-key='{key_id}'] button");
        let right = browser
            .execute(
                "return document.querySelector(arguments[0]).getBoundingClientRect().right <= document.documentElement.clientWidth",
                vec![serde_json::json!(revoke)],
            )
            .await?;
        assert_eq!(right, serde_json::json!(true), "Revoke in view at 1280 px");
        // Dismissed, nothing happens; accepted, the key is revoked.
        browser.find(Locator::Css(&revoke)).await?.click().await?;
        let asked = browser.get_alert_text().await?;
        assert!(
            asked.starts_with(&format!("Revoke key {key_id}?")),
            "{asked}"
        );
        browser.dismiss_alert().await?;
        assert_eq!(
            browser
                .find(Locator::Css(&format!("tr[data-key='{key_id}'] td.state")))
                .await?
                .text()
                .await?,
            "active"
        );
        browser.find(Locator::Css(&revoke)).await?.click().await?;
        browser.accept_alert().await?;
        browser.wait().for_element(Locator::Css("#message")).await?;
        browser
            .find(Locator::Css(&format!("tr[data-key='{key_id}'] td.state")))
            .await?
            .text()
            .await
    }
    .await;
    let _ = browser.close().await;
    let _ = driver.kill();
    let _ = driver.wait();
    assert_eq!(revoked.expect("revoking in the browser"), "revoked");
    let started = Instant::now();
    while models(secret.clone()).await != 401 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the revoked key still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Who may create, revoke and see which keys, and the key log: the router tests
    // (`src/web/tests/keys.rs`), against keys in memory.
    terminate(&mut s.serve.proc);
    env.drop_database().await;
}

/// A priced gpt-4o-mini event (repo price book: $0.15 in, $0.60 out per 1M tokens).
fn mini(
    id: &str,
    inst: &str,
    at: chrono::DateTime<chrono::Utc>,
    input: u64,
    output: u64,
) -> EventRow {
    let cost = (Decimal::from(input) * Decimal::new(15, 2)
        + Decimal::from(output) * Decimal::new(60, 2))
        / Decimal::from(1_000_000);
    EventRow {
        input_tokens: input,
        output_tokens: output,
        cost: cost.normalize(),
        price_id: "openai:gpt-4o-mini:2024-01-01".into(),
        price_model: "gpt-4o-mini".into(),
        api_key_id: format!("pk_{inst}"),
        ..crate::harness::event_row(id, inst, at, "gpt-4o-mini")
    }
}

/// Issue 17: the month-end close page shows each institution-month's status and issues
/// from it; an institution user's "as billed" figure is the invoice's total (contract, in
/// its time zone); the money column is in view at 1280 px. Screenshots at 1280 and 390 px.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_page_issues_and_as_billed_matches_the_invoice_in_the_browser() {
    use chrono::{Datelike, TimeZone, Utc};
    use fantoccini::Locator;
    let env = TestEnv::new("close", 1).await;
    // The last three UTC months, as the close page shows them.
    let now = Utc::now();
    let this = chrono::NaiveDate::from_ymd_opt(now.year(), now.month(), 1).unwrap();
    let prev = (this - chrono::Duration::days(1)).with_day(1).unwrap();
    let older = (prev - chrono::Duration::days(1)).with_day(1).unwrap();
    let mid = |d: chrono::NaiveDate| {
        Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap()) + chrono::Duration::days(10)
    };
    let ym = |d: chrono::NaiveDate| d.format("%Y-%m").to_string();
    // inst-a: the older month invoiced, then a late event (adjustments pending); last
    // month ended and clean; this month open. inst-b (Berlin, 12.5% discount): last month
    // ended and clean. inst-c: last month blocked by a model without a price.
    let mut rows = vec![
        mini("a-old", "inst-a", mid(older), 2_000_000, 100_000),
        mini("a-prev", "inst-a", mid(prev), 1_000_000, 50_000),
        mini("a-this", "inst-a", mid(this), 10_000, 1_000),
        mini("b-prev-1", "inst-b", mid(prev), 3_333_333, 444_444),
        mini(
            "b-prev-2",
            "inst-b",
            mid(prev) + chrono::Duration::hours(5),
            1_234_567,
            7_654,
        ),
        mini("c-prev", "inst-c", mid(prev), 500_000, 1_000),
    ];
    let mut unpriced = crate::harness::event_row("c-mystery", "inst-c", mid(prev), "mystery-model");
    unpriced.priced = 0;
    unpriced.input_tokens = 1_000;
    rows.push(unpriced);
    env.store.insert_events(&rows).await.unwrap();
    let extra = "[[institutions]]\nid = \"inst-b\"\nname = \"Institution B\"\ntime_zone = \"Europe/Berlin\"\ncontract_percent = \"-12.5\"\n";
    let mut s = start_server_users(&env, extra, &[("bob", "institution", Some("inst-b"))]).await;
    // The CLI with serve's configuration (its config file is in serve's directory).
    let vars =
        crate::harness::serve_vars(&env, &s.serve.dir, "", &[("TOKENTALLY_LOG", "warn".into())]);
    let cli = |args: &[&str]| tokentally(args, &vars, None);
    cli(&[
        "invoice",
        "issue",
        "--institution",
        "inst-a",
        "--period",
        &ym(older),
    ]);
    env.store
        .insert_events(&[mini(
            "a-old-late",
            "inst-a",
            mid(older) + chrono::Duration::days(1),
            400_000,
            0,
        )])
        .await
        .unwrap();
    // inst-b's last month as its invoice will bill it, computed here: each line's exact
    // amount × 0.875, rounded once.
    let line = |tokens: i64, per_m: Decimal| {
        (Decimal::from(tokens) * per_m / Decimal::from(1_000_000) * Decimal::new(875, 3))
            .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
    };
    let b_expected = line(3_333_333 + 1_234_567, Decimal::new(15, 2))
        + line(444_444 + 7_654, Decimal::new(60, 2));

    let (mut driver, browser, _profile) = headless_chromium(1280, 1000).await;
    let shots = crate::harness::repo().join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let base = s.base.clone();
    let login = |user: &'static str| {
        let browser = browser.clone();
        let base = base.clone();
        async move {
            browser.goto(&format!("{base}/login")).await?;
            browser
                .find(Locator::Css("input[name=username]"))
                .await?
                .send_keys(user)
                .await?;
            browser
                .find(Locator::Css("input[name=password]"))
                .await?
                .send_keys(&format!("{user}-password"))
                .await?;
            browser
                .find(Locator::Css("button[type=submit]"))
                .await?
                .click()
                .await?;
            // The overview's figures, not an `h1`: the login page has one too, and on a
            // busy machine the next step ran on the login page before it navigated away.
            browser.wait().for_element(Locator::Css(".figure")).await?;
            Ok::<(), fantoccini::error::CmdError>(())
        }
    };
    let cell =
        |inst: &str, period: &str| format!("td[data-institution='{inst}'][data-period='{period}']");
    let result: Result<(), fantoccini::error::CmdError> = async {
        // bob (inst-b) before anything is issued: last month as billed, from the draft.
        login("bob").await?;
        let figure = |label: &'static str| {
            let browser = browser.clone();
            async move {
                let v = browser
                    .execute(
                        "const f = Array.from(document.querySelectorAll('.figure')).find(f => f.querySelector('.label').textContent.startsWith(arguments[0])); return f ? [f.querySelector('.label').textContent, f.querySelector('.value span').title] : null;",
                        vec![serde_json::json!(label)],
                    )
                    .await?;
                Ok::<(String, Decimal), fantoccini::error::CmdError>((
                    v[0].as_str().unwrap_or_default().to_owned(),
                    v[1].as_str().unwrap_or("0").parse().unwrap(),
                ))
            }
        };
        let (label, draft_value) = figure("Last month as billed").await?;
        assert!(label.contains("Europe/Berlin") && label.contains("-12.5%") && label.contains("draft"), "{label}");
        assert_eq!(draft_value, b_expected, "{label}");
        browser.find(Locator::Css("form[action='/logout'] button")).await?.click().await?;
        // On the sign-in page before the next step (the page before has no such field).
        browser.wait().for_element(Locator::Css("input[name=username]")).await?;

        // Finance: the close page.
        login("fin").await?;
        browser.goto(&format!("{base}/close")).await?;
        let class = |sel: String| {
            let browser = browser.clone();
            async move { Ok::<String, fantoccini::error::CmdError>(browser.find(Locator::Css(&sel)).await?.attr("class").await?.unwrap_or_default()) }
        };
        assert_eq!(class(cell("inst-a", &ym(older))).await?, "status-pending");
        assert_eq!(class(cell("inst-a", &ym(prev))).await?, "status-ready");
        assert_eq!(class(cell("inst-a", &ym(this))).await?, "status-open");
        assert_eq!(class(cell("inst-b", &ym(prev))).await?, "status-ready");
        assert_eq!(class(cell("inst-c", &ym(prev))).await?, "status-blocked");
        let blocked = browser.find(Locator::Css(&cell("inst-c", &ym(prev)))).await?.text().await?;
        assert!(blocked.contains("mystery-model") && blocked.contains("reprice"), "{blocked}");
        let pending = browser.find(Locator::Css(&cell("inst-a", &ym(older)))).await?.text().await?;
        assert!(pending.contains("adjustments pending $0.06"), "{pending}");
        std::fs::write(shots.join("close-1280.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(shots.join("close-390.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(1280, 1000).await?;
        // Issue one (inst-b), then all that are ended and clean (inst-a's last month).
        browser.find(Locator::Css(&format!("{} button", cell("inst-b", &ym(prev))))).await?.click().await?;
        let msg = changed_text(&browser, "#close-message", "").await;
        assert!(msg.starts_with("Issued TT-") && msg.contains("inst-b"), "{msg}");
        assert_eq!(class(cell("inst-b", &ym(prev))).await?, "status-issued");
        let issued_b = msg.clone();
        browser.find(Locator::Css("#issue-all")).await?.click().await?;
        // The page before the click has a message too: wait for the new page's.
        let msg = changed_text(&browser, "#close-message", &msg).await;
        assert!(msg.contains("inst-a") && !msg.contains("inst-c"), "{msg}");
        assert_eq!(class(cell("inst-a", &ym(prev))).await?, "status-issued");
        assert_eq!(class(cell("inst-c", &ym(prev))).await?, "status-blocked");

        // Issue 33, item 4: no dead ends. The blocked month says what it has priced and
        // names no command (finance has no terminal); an issued month links its document,
        // not a draft; each Total is the sum of what its column shows (it added amounts
        // blocked cells hid); a blocked month can be issued without its unpriced usage.
        let blocked = browser.find(Locator::Css(&cell("inst-c", &ym(prev)))).await?.text().await?;
        assert!(blocked.contains(" priced;") && !blocked.contains("tokentally"), "{blocked}");
        let doc = browser.find(Locator::Css(&format!("{} a.invoice", cell("inst-b", &ym(prev))))).await?;
        let number = doc.text().await?;
        assert!(number.starts_with("TT-") && issued_b.contains(&number), "{number} / {issued_b}");
        assert_eq!(
            doc.attr("href").await?.as_deref(),
            Some(format!("/institutions/inst-b/invoices/{number}/pdf").as_str())
        );
        assert!(browser
            .find_all(Locator::Css(&format!("{} a[href*='/invoices/draft']", cell("inst-b", &ym(prev)))))
            .await?
            .is_empty());
        let columns = browser
            .execute(
                r#"const rows = Array.from(document.querySelectorAll('#close tbody tr'));
                   const foot = document.querySelectorAll('#close tfoot th');
                   const out = [];
                   for (let i = 1; i < foot.length; i++) {
                     let cents = 0;
                     for (const r of rows) {
                       const m = r.cells[i].textContent.match(/\$([\d,]+)\.(\d\d)/);
                       if (m) cents += parseInt(m[1].replace(/,/g, ''), 10) * 100 + parseInt(m[2], 10);
                     }
                     out.push([cents, foot[i].textContent.trim()]);
                   }
                   return out;"#,
                vec![],
            )
            .await?;
        let columns: Vec<(i64, String)> = serde_json::from_value(columns).unwrap();
        assert_eq!(columns.len(), 3);
        for (cents, total) in &columns {
            assert!(*cents < 100_000, "no thousands separator to write");
            assert_eq!(*total, format!("${}.{:02}", cents / 100, cents % 100), "{columns:?}");
        }
        std::fs::write(shots.join("close-after-1280.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(shots.join("close-after-390.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(1280, 1000).await?;
        browser
            .find(Locator::Css(&format!("{} button.issue-anyway", cell("inst-c", &ym(prev)))))
            .await?
            .click()
            .await?;
        let msg = changed_text(&browser, "#close-message", &msg).await;
        assert!(msg.starts_with("Issued TT-") && msg.contains("inst-c"), "{msg}");
        assert_eq!(class(cell("inst-c", &ym(prev))).await?, "status-issued");
        // The money column is next to the label and in view at 1280 px.
        browser
            .goto(&format!("{base}/models?from={older}&to={}", now.date_naive()))
            .await?;
        let rows = browser.find_all(Locator::Css("table.sortable tbody tr")).await?;
        assert!(!rows.is_empty(), "the models page has rows for these months");
        let visible = browser
            .execute(
                "const th = Array.from(document.querySelectorAll('th')).find(t => t.textContent.startsWith('Cost (USD)')); if (!th) return 'no cost column'; const r = th.getBoundingClientRect(); return r.right <= document.documentElement.clientWidth && th.cellIndex === 1;",
                vec![],
            )
            .await?;
        assert_eq!(visible, serde_json::json!(true));
        std::fs::write(shots.join("models-1280.png"), browser.screenshot().await?).unwrap();
        browser.find(Locator::Css("form[action='/logout'] button")).await?.click().await?;
        // On the sign-in page before the next step (the page before has no such field).
        browser.wait().for_element(Locator::Css("input[name=username]")).await?;

        // bob again: as billed is now the invoice, to the cent.
        login("bob").await?;
        let (label, value) = figure("Last month as billed").await?;
        assert!(label.contains("invoice TT-"), "{label}");
        assert_eq!(value, b_expected, "{label}");
        // Issue 33, item 10: the invoice number links to its document, and the
        // institution's own page (where finance lands) shows the same figure.
        let number = label
            .split("invoice ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .unwrap()
            .to_owned();
        let link = browser.find(Locator::Css(".figure .label a")).await?;
        assert_eq!(link.text().await?, number);
        assert_eq!(
            link.attr("href").await?.as_deref(),
            Some(format!("/institutions/inst-b/invoices/{number}/pdf").as_str())
        );
        browser.goto(&format!("{base}/institutions/inst-b")).await?;
        assert_eq!(figure("Last month as billed").await?, (label.clone(), value));
        // Polish: the invoices table names institutions (their id beside the name).
        browser.goto(&format!("{base}/invoices")).await?;
        let cells = browser
            .execute("return Array.from(document.querySelectorAll('tbody tr')).map(r => r.cells[2].textContent.trim())", vec![])
            .await?;
        assert!(cells.to_string().contains("Institution B (inst-b)"), "{cells}");
        std::fs::write(shots.join("institution-as-billed-1280.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(shots.join("institution-as-billed-390.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(1280, 1000).await?;
        Ok(())
    }
    .await;
    let _ = browser.close().await;
    let _ = driver.kill();
    let _ = driver.wait();
    result.unwrap();
    let invoice: serde_json::Value = serde_json::from_str(&tokentally(
        &[
            "invoice",
            "show",
            "--institution",
            "inst-b",
            "--period",
            &ym(prev),
            "--format",
            "json",
        ],
        &vars,
        None,
    ))
    .unwrap();
    assert_eq!(
        invoice["total"]
            .as_str()
            .unwrap()
            .parse::<Decimal>()
            .unwrap(),
        b_expected
    );
    // The close page is finance's: an institution's token is refused, finance's reads it.
    let http = client();
    let get = |token: &str| {
        http.get(format!("{}/api/v1/close", s.base))
            .bearer_auth(token.to_owned())
            .send()
    };
    assert_eq!(get(&s.tokens["inst-a"]).await.unwrap().status(), 403);
    let close: serde_json::Value = get(&s.tokens["fin"]).await.unwrap().json().await.unwrap();
    assert!(close["cells"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["status"] == "issued" && c["institution"] == "inst-c"));
    // Issued without its unpriced usage: the invoice lists it, unbilled.
    let c_invoice: serde_json::Value = serde_json::from_str(&tokentally(
        &[
            "invoice",
            "show",
            "--institution",
            "inst-c",
            "--period",
            &ym(prev),
            "--format",
            "json",
        ],
        &vars,
        None,
    ))
    .unwrap();
    assert!(
        c_invoice["unpriced"]["events"].as_i64().unwrap() > 0,
        "{c_invoice}"
    );
    assert!(
        c_invoice["unpriced"]["models"]
            .to_string()
            .contains("mystery-model"),
        "{c_invoice}"
    );
    // A draft PDF cannot pass for an invoice: "DRAFT" across every page and in its title.
    let draft = http
        .get(format!(
            "{}/invoices/draft?institution=inst-a&period={}&format=pdf",
            s.base,
            ym(this)
        ))
        .bearer_auth(s.tokens["fin"].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(draft.status(), 200);
    let dir = tempfile::tempdir().unwrap();
    let pdf = dir.path().join("draft.pdf");
    std::fs::write(&pdf, draft.bytes().await.unwrap()).unwrap();
    let out = Command::new("pdftotext")
        .args([pdf.to_str().unwrap(), "-"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("DRAFT INVOICE")
            && text.contains("not an invoice")
            && text.matches("DRAFT").count() >= 3,
        "{text}"
    );
    let post = http
        .post(format!("{}/api/v1/close/issue", s.base))
        .bearer_auth(s.tokens["inst-a"].clone())
        .form(&[("institution", "inst-c"), ("period", ym(prev).as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 403);
    terminate(&mut s.serve.proc);
    env.drop_database().await;
}

/// The text of the element `css` once it differs from `before`, looked up afresh on each
/// try (a click that submits a form replaces the page: an element found before it is
/// stale, and the old page may still show what is awaited).
pub(crate) async fn changed_text(browser: &fantoccini::Client, css: &str, before: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        if let Ok(e) = browser.find(fantoccini::Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if t != before {
                    return t;
                }
            }
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{css} still reads {before:?} after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Issue 33, item 9: the alerts table as ops read it at 1280 px and on a phone — the
/// plain-language message right after the state (it was the 9th column, off-screen),
/// figures as written ("2", not "2.000000"), firing rows marked, "Acknowledge" only on
/// open incidents (a resolved one offered it), times with their zone, and a fired time
/// that was never recorded said so (it showed 1970).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_page_puts_the_message_first_and_acknowledges_only_open_incidents() {
    use fantoccini::Locator;
    use tokentally::store::alerts::AlertRow;
    let env = TestEnv::new("alertspage", 1).await;
    let now = chrono::Utc::now().timestamp() as u32;
    let alert = |id: &str, at: u32, seq: u64, state: &str, message: &str| AlertRow {
        alert_id: id.into(),
        at,
        seq,
        state: state.into(),
        kind: "spend_spike".into(),
        entity: "inst-a".into(),
        institution_id: "inst-a".into(),
        severity: "warning".into(),
        observed: 2_000_000,
        baseline: 250_000,
        threshold: 1_000_000,
        message: message.into(),
        actor: String::new(),
    };
    env.store
        .record_alerts(&[
            alert(
                "a1",
                now - 3_600,
                1,
                "firing",
                "inst-a spent $2.00 this hour, usually $0.25",
            ),
            alert(
                "b2",
                now - 10_800,
                1,
                "firing",
                "inst-a spent $2.00 at night",
            ),
            alert("b2", now - 7_200, 2, "resolved", ""),
            alert("c3", now - 1_800, 1, "resolved", ""),
        ])
        .await
        .unwrap();
    // No evaluator: the incidents stay as written.
    let mut s = start_server_with(&env, "[alerts]\nenabled = false\n").await;
    let (mut driver, browser, _profile) = headless_chromium(1280, 1000).await;
    let shots = crate::harness::repo().join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let result: Result<(), fantoccini::error::CmdError> = async {
        browser.goto(&format!("{}/login?next=/alerts", s.base)).await?;
        browser.find(Locator::Css("input[name=username]")).await?.send_keys("ops").await?;
        browser.find(Locator::Css("input[name=password]")).await?.send_keys("ops-password").await?;
        browser.find(Locator::Css("button[type=submit]")).await?.click().await?;
        browser.wait().for_element(Locator::Css("tr[data-alert=a1]")).await?;
        let cells = |id: &'static str| {
            let browser = browser.clone();
            async move {
                let v = browser
                    .execute(
                        "const r = document.querySelector(`tr[data-alert='${arguments[0]}']`); return [r.className, Array.from(r.cells).map(c => c.textContent.trim())];",
                        vec![serde_json::json!(id)],
                    )
                    .await?;
                let (class, cells): (String, Vec<String>) = serde_json::from_value(v).unwrap();
                Ok::<_, fantoccini::error::CmdError>((class, cells))
            }
        };
        let headers = browser
            .execute("return Array.from(document.querySelectorAll('thead th')).map(t => t.textContent)", vec![])
            .await?;
        assert_eq!(headers[1], "Message");
        let (class, a) = cells("a1").await?;
        assert_eq!(class, "state-firing");
        assert_eq!(a[1], "inst-a spent $2.00 this hour, usually $0.25");
        assert_eq!((a[7].as_str(), a[8].as_str()), ("2", "0.25"));
        assert!(a[5].ends_with(" UTC") && a[6].ends_with(" UTC"), "{a:?}");
        assert_eq!(a[9], "Acknowledge");
        let (class, b) = cells("b2").await?;
        assert_eq!(class, "state-resolved");
        assert_eq!(b[9], "", "a resolved incident offers nothing to acknowledge");
        let (_, c) = cells("c3").await?;
        assert_eq!(c[5], "not recorded");
        // The message is in view at 1280 px.
        let right = browser
            .execute("return document.querySelector('tr[data-alert=a1] td.message').getBoundingClientRect().left < document.documentElement.clientWidth", vec![])
            .await?;
        assert_eq!(right, serde_json::json!(true));
        std::fs::write(shots.join("alerts-1280.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(390, 844).await?;
        std::fs::write(shots.join("alerts-390.png"), browser.screenshot().await?).unwrap();
        browser.set_window_size(1280, 1000).await?;
        // Acknowledging the open one: its row names who.
        browser.find(Locator::Css("tr[data-alert=a1] button")).await?.click().await?;
        browser.wait().for_element(Locator::XPath("//tr[@data-alert='a1']/td[10][text()='ops']")).await?;
        Ok(())
    }
    .await;
    let _ = browser.close().await;
    let _ = driver.kill();
    let _ = driver.wait();
    result.unwrap();
    terminate(&mut s.serve.proc);
    env.drop_database().await;
}
