//! Issue 31: people sign in with their institution's account — a real OpenID Connect
//! provider (`oidc-provider-mock` from PyPI) — and serve themselves within their group's
//! policy: "My usage", their own keys, their quota; administrators suspend and move them;
//! ID tokens that must be refused are refused; a member sees nothing of anyone else.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};

use crate::harness::{
    python, sdk_calls, spawn_gateway, spawn_serve_in, spawn_simulator, tokentally, Gateway, Proc,
    Serve, Simulator, TestEnv,
};
use crate::web::{client, csrf_of, dec, free_port, get, headless_chromium, wait_for_port, Auth};

/// The provider, on a port of its own (killed with the test).
struct Provider {
    _proc: Proc,
    base: String,
}

async fn spawn_provider() -> Provider {
    let port = free_port();
    let proc = Proc::spawn(
        Command::new(python())
            .args(["-m", "oidc_provider_mock", "--port", &port.to_string()])
            .args(["--require-nonce", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    wait_for_port(port).await;
    Provider {
        _proc: proc,
        base: format!("http://127.0.0.1:{port}"),
    }
}

impl Provider {
    /// The claims the provider gives `sub` from now on.
    async fn set_claims(&self, sub: &str, claims: Value) {
        let res = client()
            .put(format!("{}/users/{sub}", self.base))
            .json(&claims)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204, "setting {sub}'s claims");
    }
}

fn config(issuer: &str) -> String {
    format!(
        r#"
[[institutions]]
id = "uni"
name = "University"
time_zone = "Europe/Oslo"

[[institutions]]
id = "other"
name = "Other College"

[[groups]]
institution = "uni"
id = "students"
name = "Students"
models = ["gpt-4o-mini"]
member_limits = [{{ metric = "requests", period = "day", amount = "3" }}]
keys_per_member = 2
max_key_days = 30

[[groups]]
institution = "uni"
id = "staff"
name = "Staff"
member_limits = [{{ metric = "requests", period = "day", amount = "10" }}]
budget_usd = "100"

[[groups]]
institution = "uni"
id = "lab"
name = "A research project"
budget_usd = "0.10"

[[groups]]
institution = "other"
id = "students"
member_limits = [{{ metric = "requests", period = "day", amount = "3" }}]

[[sso]]
id = "uni"
label = "University Account"
issuer = "{issuer}"
client_id = "tokentally-dashboard"
client_secret = "not-checked-by-the-test-provider"

[[sso.rules]]
claim = "groups"
equals = "lab"
institution = "uni"
group = "lab"

[[sso.rules]]
claim = "groups"
equals = "staff"
institution = "uni"
group = "staff"

[[sso.rules]]
claim = "email"
ends_with = "@uni.example"
institution = "uni"
group = "students"

[[sso.rules]]
claim = "email"
ends_with = "@other.example"
institution = "other"
group = "students"
"#
    )
}

/// Everything a member meets: provider, dashboard, gateway (with the provider simulator
/// upstream), ingest; and an admin's API token.
struct World {
    env: TestEnv,
    provider: Provider,
    serve: Serve,
    gateway: Gateway,
    _sim: Simulator,
    _ingest: Proc,
    admin_token: String,
    _dir: tempfile::TempDir,
}

async fn world(name: &str) -> World {
    let env = TestEnv::new(name, 1).await;
    let provider = spawn_provider().await;
    let cfg = config(&provider.base);
    let dir = tempfile::tempdir().unwrap();
    let vars = crate::harness::serve_vars(&env, &dir, &cfg, &[]);
    tokentally(
        &[
            "users",
            "add",
            "admin",
            "--role",
            "admin",
            "--password-stdin",
        ],
        &vars,
        Some("admin-password\n"),
    );
    let admin_token = tokentally(
        &["tokens", "add", "admin-api", "--role", "admin"],
        &vars,
        None,
    );
    let config_path = dir.path().join("config.toml");
    let sim = spawn_simulator(&env, &[]).await;
    let gw_dir = tempfile::tempdir().unwrap();
    let mut gw_vars = env.gateway_vars(&sim, gw_dir.path());
    gw_vars.push(("TOKENTALLY_CONFIG", config_path.display().to_string()));
    let gateway = spawn_gateway(&env, "people", gw_vars).await;
    // The dashboard tells members where the gateway is (in its SDK snippets).
    let serve = spawn_serve_in(
        &env,
        dir,
        &cfg,
        &[("TOKENTALLY_GATEWAY_PUBLIC_URL", gateway.base.clone())],
    )
    .await;
    let ingest = env.spawn_ingest();
    World {
        env,
        provider,
        serve,
        gateway,
        _sim: sim,
        _ingest: ingest,
        admin_token,
        _dir: gw_dir,
    }
}

/// A signed-in person's session.
struct Session {
    cookie: String,
    csrf: String,
}

fn cookie_of(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")) && !v.contains("Max-Age=0"))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

/// Signs `sub` in without a browser: the dashboard's redirect to the provider, the
/// provider's form answered as `sub`, its redirect back with the code.
async fn sign_in(w: &World, sub: &str) -> Session {
    let c = client();
    let res = c
        .get(format!("{}/sso/uni/login", w.serve.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303, "off to the provider");
    let state = cookie_of(&res, "tt_sso_state").expect("state cookie");
    let authorize = res.headers()["location"].to_str().unwrap().to_owned();
    assert!(authorize.starts_with(&w.provider.base), "{authorize}");
    assert!(authorize.contains("code_challenge="), "PKCE: {authorize}");
    let res = c
        .post(&authorize)
        .form(&[("sub", sub)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 302, "the provider sends the code back");
    let back = res.headers()["location"].to_str().unwrap().to_owned();
    let res = c.get(&back).header("cookie", &state).send().await.unwrap();
    let session = cookie_of(&res, "tt_session");
    let status = res.status();
    let body = res.text().await.unwrap();
    assert_eq!(status, 200, "sign-in of {sub}: {body}");
    let cookie = session.expect("a session");
    let page = c
        .get(format!("{}/me", w.serve.base))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    Session {
        cookie,
        csrf: csrf_of(&page.text().await.unwrap()),
    }
}

async fn me(w: &World, s: &Session) -> Value {
    let res = client()
        .get(format!("{}/api/v1/me", w.serve.base))
        .header("cookie", &s.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

/// The JSON of a dashboard API path, read as `auth`.
async fn json_of(w: &World, path: &str, auth: &Auth<'_>) -> Value {
    get(&format!("{}{path}", w.serve.base), auth)
        .await
        .json()
        .await
        .unwrap()
}

/// Limit `id` of the Limits page's JSON.
fn limit_on_page<'a>(page: &'a Value, id: &str) -> &'a Value {
    page["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["limit_id"] == id)
        .unwrap_or_else(|| panic!("{id} is on the Limits page: {page}"))
}

/// Creates a key through "My usage"; returns (id, secret) from the page.
async fn create_key(w: &World, s: &Session, name: &str) -> (String, String) {
    let res = client()
        .post(format!("{}/me/keys/create", w.serve.base))
        .header("cookie", &s.cookie)
        .form(&[("csrf", s.csrf.as_str()), ("name", name), ("days", "")])
        .send()
        .await
        .unwrap();
    // Post/redirect/get: the result is on "My usage", shown once, not at the POST's URL.
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()["location"], "/me");
    let shown = |cookie: String| async move {
        client()
            .get(format!("{}/me", w.serve.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let html = shown(s.cookie.clone()).await;
    assert!(
        !shown(s.cookie.clone()).await.contains("id=\"secret\""),
        "shown once"
    );
    let secret = html
        .split("<pre id=\"secret\">")
        .nth(1)
        .unwrap_or_else(|| panic!("no key shown: {html}"))
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    let id = secret.split('-').nth(1).unwrap().to_owned();
    (id, secret)
}

/// One chat completion through the gateway; (status, body).
async fn chat(w: &World, key: &str, model: &str) -> (u16, Value) {
    let res = client()
        .post(format!("{}/v1/chat/completions", w.gateway.base))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

/// Waits until the gateway knows a new key (it reads keys every 2 s).
async fn until_known(w: &World, key: &str) -> Duration {
    let started = Instant::now();
    loop {
        let (status, body) = chat(w, key, "gpt-4o-mini").await;
        if status != 401 {
            assert_eq!(status, 200, "{body}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the key never worked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn limit_of<'a>(me: &'a Value, applies_to: &str, label: &str) -> Option<&'a Value> {
    me["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["applies_to"] == applies_to && l["label"].as_str().unwrap().contains(label))
}

/// The end-to-end task of a new student, in a real headless Chromium: sign in at the
/// provider → "My usage" → create a key (shown once, with SDK snippets) → the official
/// openai SDK uses it → the usage appears on the page → the daily quota is reached
/// (429 in OpenAI's format) → revoke → 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_student_signs_in_gets_a_key_uses_it_to_the_quota_and_revokes_it() {
    use fantoccini::Locator;
    let w = world("member_flow").await;
    w.provider
        .set_claims(
            "kari",
            json!({"email": "kari@uni.example", "name": "Kari Nordmann", "groups": ["students"]}),
        )
        .await;
    let (mut driver, browser, _profile) = headless_chromium(1280, 1400).await;
    let shots = crate::harness::repo().join("target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let gateway = w.gateway.base.clone();
    let result: Result<(Duration, String, String), fantoccini::error::CmdError> = async {
        let started = Instant::now();
        browser.goto(&format!("{}/", w.serve.base)).await?;
        // Not signed in: the sign-in page, with the institution's provider.
        browser
            .wait()
            .for_element(Locator::Css("a[href^='/sso/uni/login']"))
            .await?
            .click()
            .await?;
        // The provider's own page.
        let sub = browser
            .wait()
            .for_element(Locator::Css("input[name=sub]"))
            .await?;
        sub.send_keys("kari").await?;
        browser
            .find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;
        browser
            .wait()
            .for_element(Locator::Css("form#create"))
            .await?;
        assert_eq!(
            browser.current_url().await?.path(),
            "/me",
            "a member lands on My usage"
        );
        let h1 = browser.find(Locator::Css("h1")).await?.text().await?;
        assert!(
            h1.contains("My usage") && h1.contains("Kari Nordmann"),
            "{h1}"
        );
        std::fs::write(shots.join("me-empty.png"), browser.screenshot().await?).unwrap();
        browser
            .find(Locator::Css("form#create input[name=name]"))
            .await?
            .send_keys("laptop")
            .await?;
        browser
            .find(Locator::Css("form#create button"))
            .await?
            .click()
            .await?;
        let secret = browser
            .wait()
            .for_element(Locator::Css("pre#secret"))
            .await?
            .text()
            .await?;
        let snippet = browser
            .find(Locator::Css("pre#snippet-openai"))
            .await?
            .text()
            .await?;
        assert!(
            snippet.contains(&format!("base_url=\"{gateway}/v1\"")),
            "{snippet}"
        );
        assert!(snippet.contains(&secret), "the snippet is ready to paste");
        browser
            .find(Locator::Css("button[data-copy=secret]"))
            .await?;
        std::fs::write(
            shots.join("me-key-created.png"),
            browser.screenshot().await?,
        )
        .unwrap();
        // The official SDK, through the new key (the gateway knows it within its
        // 2-second key refresh).
        let call = json!([{"sdk": "openai", "api": "chat", "model": "gpt-4o-mini",
                            "messages": [{"role": "user", "content": "hello"}]}]);
        let first_ok = loop {
            let r = sdk_calls(&gateway, &secret, &call);
            if r[0]["ok"] == true {
                break started.elapsed();
            }
            assert_eq!(r[0]["status"], 401, "{}", r[0]);
            assert!(started.elapsed() < Duration::from_secs(60));
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let key_id = secret.split('-').nth(1).unwrap().to_owned();
        Ok((first_ok, secret, key_id))
    }
    .await;
    let (first_ok, secret, key_id) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = driver.kill();
            panic!("{e}");
        }
    };
    println!("a new person's first successful SDK call through their own key: {first_ok:?} after the first page");

    // A model outside the group's list is refused (403, OpenAI's format).
    let r = sdk_calls(
        &gateway,
        &secret,
        &json!([{"sdk": "openai", "api": "chat", "model": "gpt-4o",
                 "messages": [{"role": "user", "content": "hello"}]}]),
    );
    assert_eq!(
        (r[0]["ok"].clone(), r[0]["status"].clone()),
        (json!(false), json!(403)),
        "{}",
        r[0]
    );
    assert_eq!(r[0]["error_type"], "PermissionDeniedError");

    // Two more calls reach the group's 3 requests a day; the fourth is refused in
    // OpenAI's format, and says what the limit is.
    let call = json!([{"sdk": "openai", "api": "chat", "model": "gpt-4o-mini",
                        "messages": [{"role": "user", "content": "hello"}]}]);
    for _ in 0..2 {
        let r = sdk_calls(&gateway, &secret, &call);
        assert_eq!(r[0]["ok"], true, "{}", r[0]);
    }
    let r = sdk_calls(&gateway, &secret, &call);
    assert_eq!(r[0]["status"], 429, "{}", r[0]);
    assert_eq!(r[0]["error_type"], "RateLimitError");
    let body = r[0]["body"].to_string();
    assert!(
        body.contains("insufficient_quota") && body.contains("3 requests per day"),
        "{body}"
    );

    let outcome: Result<(), fantoccini::error::CmdError> = async {
        // The usage appears on "My usage" (stored by ingest), with the limit used up.
        let started = Instant::now();
        loop {
            browser.goto(&format!("{}/me", w.serve.base)).await?;
            // Five calls: three served, one refused for its model, one for the quota.
            let n = browser
                .find(Locator::Css("#requests"))
                .await?
                .text()
                .await?;
            if n == "5" {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "usage never appeared ({n})"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let remaining = browser
            .find(Locator::Css("#limit-table .remaining"))
            .await?
            .text()
            .await?;
        assert_eq!(remaining, "0");
        let used = browser
            .find(Locator::Css("#limit-table .used"))
            .await?
            .text()
            .await?;
        assert!(
            used.starts_with("3 "),
            "three served requests count: {used}"
        );
        let limits = browser
            .find(Locator::Css("#limit-table"))
            .await?
            .text()
            .await?;
        assert!(
            limits.contains("Europe/Oslo") || limits.contains("CET"),
            "renews in the institution's zone: {limits}"
        );
        std::fs::write(shots.join("me-quota-used.png"), browser.screenshot().await?).unwrap();
        // Issue 36: the spend-spike brake pauses the key (as the evaluator does when its
        // alert fires at an institution with `on_spike = "suspend_key"`); its owner sees
        // it paused and resumes it — the alert acknowledged in their name.
        let held = tokentally::keys::hold(&w.env.store, &key_id, "uni", "a1b2c3", "alerts")
            .await
            .unwrap();
        assert!(held.is_some(), "paused");
        browser.refresh().await?;
        let state = browser
            .find(Locator::Css(&format!("tr[data-key='{key_id}'] .state")))
            .await?
            .text()
            .await?;
        assert_eq!(state, "paused");
        browser
            .find(Locator::Css(&format!(
                "tr[data-key='{key_id}'] button.resume"
            )))
            .await?
            .click()
            .await?;
        let asked = browser.get_alert_text().await?;
        assert!(
            asked.contains(&key_id) && asked.contains("acknowledges"),
            "{asked}"
        );
        browser.accept_alert().await?;
        let msg = browser
            .wait()
            .for_element(Locator::Css("#message"))
            .await?
            .text()
            .await?;
        assert!(msg.contains("resumed"), "{msg}");
        assert_eq!(browser.current_url().await?.path(), "/me");
        let state = browser
            .find(Locator::Css(&format!("tr[data-key='{key_id}'] .state")))
            .await?
            .text()
            .await?;
        assert_eq!(state, "active");
        // Revoke from the page: it asks first, naming the key.
        browser
            .find(Locator::Css(&format!("tr[data-key='{key_id}'] button")))
            .await?
            .click()
            .await?;
        let asked = browser.get_alert_text().await?;
        assert!(
            asked.contains(&key_id) && asked.contains("cannot be undone"),
            "{asked}"
        );
        browser.accept_alert().await?;
        let msg = browser
            .wait()
            .for_element(Locator::Css("#message"))
            .await?
            .text()
            .await?;
        assert!(msg.contains("revoked"), "{msg}");
        let state = browser
            .find(Locator::Css(&format!("tr[data-key='{key_id}'] .state")))
            .await?
            .text()
            .await?;
        assert_eq!(state, "revoked");
        Ok(())
    }
    .await;
    let _ = browser.close().await;
    let _ = driver.kill();
    let _ = driver.wait();
    outcome.unwrap();
    let revoked_at = Instant::now();
    loop {
        let r = sdk_calls(&gateway, &secret, &call);
        if r[0]["status"] == 401 {
            assert_eq!(r[0]["error_type"], "AuthenticationError");
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(10),
            "still accepted: {}",
            r[0]
        );
    }
    println!("revoked key refused after {:?}", revoked_at.elapsed());
    // The key log says who did what.
    let log = w
        .env
        .scalar(&format!(
            "SELECT toInt64(count()) FROM key_events WHERE key_id = '{key_id}' AND actor = 'kari' \
             AND action IN ('create', 'revoke')"
        ))
        .await;
    assert_eq!(log, 2, "create and revoke by kari in the key log");
    let resumed = w
        .env
        .scalar(&format!(
            "SELECT toInt64(count()) FROM key_events WHERE key_id = '{key_id}' AND actor = 'kari' \
             AND action = 'release' AND detail = 'alert a1b2c3 acknowledged'"
        ))
        .await;
    assert_eq!(resumed, 1, "kari's resumption in the key log");
    w.env.drop_database().await;
}

/// Group policy, suspension, per-member overrides, claims that move a member, and the
/// isolation sweep: member A against member B of the same institution and C of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_suspension_overrides_claims_and_isolation() {
    let w = world("people_admin").await;
    let p = &w.provider;
    p.set_claims(
        "ola4711",
        json!({"email": "ola4711@uni.example", "name": "Ola", "groups": ["students"]}),
    )
    .await;
    p.set_claims(
        "kari2207",
        json!({"email": "kari2207@uni.example", "name": "Kari", "groups": ["students"]}),
    )
    .await;
    p.set_claims(
        "per0815",
        json!({"email": "per0815@other.example", "name": "Per", "groups": []}),
    )
    .await;
    let ola = sign_in(&w, "ola4711").await;
    let kari = sign_in(&w, "kari2207").await;
    let per = sign_in(&w, "per0815").await;

    // A new member inherits the group's defaults.
    let m = me(&w, &ola).await;
    assert_eq!(m["group"]["id"], "students");
    assert_eq!(m["institution"], "uni");
    assert!(limit_of(&m, "you", "3 requests per day").is_some(), "{m}");
    assert_eq!(me(&w, &per).await["institution"], "other");

    // Keys within the group's policy: two at once, at most 30 days.
    let (ola_key_id, ola_key) = create_key(&w, &ola, "one").await;
    let (_, ola_key2) = create_key(&w, &ola, "two").await;
    let res = client()
        .post(format!("{}/me/keys/create", w.serve.base))
        .header("cookie", &ola.cookie)
        .form(&[("csrf", ola.csrf.as_str()), ("name", "three"), ("days", "")])
        .send()
        .await
        .unwrap();
    let html = res.text().await.unwrap();
    assert!(
        html.contains("your group allows 2 key(s) at once"),
        "{html}"
    );
    assert!(!html.contains("id=\"secret\""));
    let keys = me(&w, &ola).await["keys"].clone();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k["expires_at"].is_string()),
        "30-day keys: {keys}"
    );
    let (kari_key_id, kari_key) = create_key(&w, &kari, "k").await;
    let (per_key_id, per_key) = create_key(&w, &per, "p").await;
    until_known(&w, &ola_key).await;
    until_known(&w, &kari_key).await;
    until_known(&w, &per_key).await;

    // A key as bearer gives its owner's own view to scripts, and nothing else.
    let res = client()
        .get(format!("{}/api/v1/me/limits", w.serve.base))
        .bearer_auth(&ola_key2)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.text().await.unwrap();
    assert!(
        body.contains("3 requests per day") && !body.contains("kari2207"),
        "{body}"
    );
    for path in [
        "/api/v1/overview",
        "/api/v1/keys",
        "/api/v1/people?institution=uni",
    ] {
        let res = client()
            .get(format!("{}{path}", w.serve.base))
            .bearer_auth(&ola_key2)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{path} with a proxy key");
    }

    // One member's own limit, set by an administrator, replaces their default only.
    let res = client()
        .post(format!("{}/api/v1/limits/set", w.serve.base))
        .bearer_auth(&w.admin_token)
        .form(&[
            ("institution", "uni"),
            ("scope", "user"),
            ("subject", "kari2207"),
            ("metric", "requests"),
            ("amount", "5"),
            ("period", "day"),
        ])
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
    let m = me(&w, &kari).await;
    assert!(limit_of(&m, "you", "5 requests per day").is_some(), "{m}");
    assert!(limit_of(&m, "you", "3 requests per day").is_none(), "{m}");
    let m = me(&w, &ola).await;
    assert!(
        limit_of(&m, "you", "3 requests per day").is_some(),
        "ola keeps the default: {m}"
    );
    let people = json_of(
        &w,
        "/api/v1/people?institution=uni",
        &Auth::Bearer(&w.admin_token),
    )
    .await;
    let students = people["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == "students")
        .unwrap();
    assert_eq!(
        students["policy"]["member_limits"][0]["amount"], "3",
        "the group's default is unchanged"
    );
    // ... and every gateway enforces it within a limits refresh: kari gets 5 a day,
    // ola 3 (each made one call already, in `until_known`).
    let mut served = BTreeMap::new();
    for (who, key, quota) in [("kari2207", &kari_key, 5), ("ola4711", &ola_key, 3)] {
        let started = Instant::now();
        let mut n = 1;
        while n < quota {
            match chat(&w, key, "gpt-4o-mini").await {
                (200, _) => n += 1,
                (429, _) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "{who}: {n} of {quota}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                (status, body) => panic!("{who}: {status} {body}"),
            }
        }
        for _ in 0..3 {
            let (status, body) = chat(&w, key, "gpt-4o-mini").await;
            assert_eq!(status, 429, "{who} past {quota}: {body}");
        }
        served.insert(who, n);
    }
    assert_eq!(served, BTreeMap::from([("kari2207", 5), ("ola4711", 3)]));

    // Suspension: every key of the member refused on the gateway within 2 s (+ a refresh).
    let res = client()
        .post(format!(
            "{}/api/v1/institutions/other/people/per0815/suspend",
            w.serve.base
        ))
        .bearer_auth(&w.admin_token)
        .form(&[("suspend", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let suspended_at = Instant::now();
    let refused_after = loop {
        let (status, body) = chat(&w, &per_key, "gpt-4o-mini").await;
        if status == 401 {
            assert!(body.to_string().contains("suspended"), "{body}");
            break suspended_at.elapsed();
        }
        assert!(
            suspended_at.elapsed() < Duration::from_secs(10),
            "per's key still works"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("suspension: every key refused after {refused_after:?}");
    assert!(
        refused_after < Duration::from_millis(4_500),
        "{refused_after:?}"
    );
    let m = me(&w, &per).await;
    assert_eq!(m["standing"], "suspended");

    // A claims change on the next sign-in moves the member (and their limits).
    p.set_claims(
        "ola4711",
        json!({"email": "ola4711@uni.example", "name": "Ola", "groups": ["staff"]}),
    )
    .await;
    let ola = sign_in(&w, "ola4711").await;
    let m = me(&w, &ola).await;
    assert_eq!(m["group"]["id"], "staff");
    assert!(limit_of(&m, "you", "10 requests per day").is_some(), "{m}");

    // Spend by group: the gateway tags each request of a member's key with their group
    // at that moment; the institution page and the usage CSV group by it. Ola's next
    // request is admitted once the gateway has read her move (staff: 10 a day); one more
    // after a second refresh certainly carries `group=staff`.
    let moved = Instant::now();
    loop {
        let (status, body) = chat(&w, &ola_key, "gpt-4o-mini").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(
            moved.elapsed() < Duration::from_secs(10),
            "ola's staff quota never applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, body) = chat(&w, &ola_key, "gpt-4o-mini").await;
    assert_eq!(status, 200, "{body}");
    let groups = loop {
        let page = json_of(
            &w,
            "/api/v1/institutions/uni",
            &Auth::Bearer(&w.admin_token),
        )
        .await;
        let groups = page["tables"]["groups"].as_array().unwrap().clone();
        if groups.iter().any(|g| g["group"] == "staff") {
            break groups;
        }
        assert!(
            moved.elapsed() < Duration::from_secs(60),
            "staff's spend never appeared: {page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Every request at uni in this test was made with a member's key: the groups' rows
    // account for all of them (counted here straight from the events table).
    let by_group: i64 = groups.iter().map(|g| g["events"].as_i64().unwrap()).sum();
    let all = w
        .env
        .scalar("SELECT toInt64(sum(sign)) FROM usage_events WHERE institution_id = 'uni'")
        .await;
    assert_eq!(by_group, all, "{groups:?}");
    let period = Utc::now()
        .with_timezone(&chrono_tz::Europe::Oslo)
        .format("%Y-%m")
        .to_string();
    let res = client()
        .get(format!(
            "{}/api/v1/invoices/draft?institution=uni&period={period}&format=usage-csv",
            w.serve.base
        ))
        .bearer_auth(&w.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let csv = res.text().await.unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let mut groups_of: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for l in lines {
        let cells: Vec<&str> = l.split(',').collect();
        groups_of
            .entry(cells[at("user_id")].to_owned())
            .or_default()
            .insert(cells[at("group")].to_owned());
    }
    assert_eq!(
        groups_of
            .get("ola4711")
            .map(|g| g.iter().map(String::as_str).collect::<Vec<_>>()),
        Some(vec!["staff", "students"]),
        "ola's rows before and after her move: {csv}"
    );
    assert_eq!(
        groups_of
            .get("kari2207")
            .map(|g| g.iter().map(String::as_str).collect::<Vec<_>>()),
        Some(vec!["students"]),
        "{csv}"
    );

    // Money on "My usage" and the People page reads as dollars once ("$0.01", not "$$0.01").
    for (path, auth) in [
        ("/me", Some(&ola.cookie)),
        ("/people?institution=uni", None),
    ] {
        let mut req = client().get(format!("{}{path}", w.serve.base));
        req = match auth {
            Some(cookie) => req.header("cookie", cookie),
            None => req.bearer_auth(&w.admin_token),
        };
        let html = req.send().await.unwrap().text().await.unwrap();
        assert!(html.contains("$0.0"), "{path} shows money: {html}");
        assert!(!html.contains("$$"), "{path}: {html}");
    }

    // "My usage" reads one person's limits from the per-person and billing rollups; the
    // Limits page reads everyone's raw events: they agree on every limit that applies to
    // ola — her own, her group's shared budget and an institution-wide one.
    let res = client()
        .post(format!("{}/api/v1/limits/set", w.serve.base))
        .bearer_auth(&w.admin_token)
        .form(&[
            ("institution", "uni"),
            ("scope", "institution"),
            ("subject", ""),
            ("metric", "requests"),
            ("amount", "1000"),
            ("period", "month"),
        ])
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.text().await.unwrap());
    // Both add what the gateways report as settled but not yet stored; an event stored
    // just before one of the two reads counts twice there until the gateway's next report
    // (≤ 1 s): read both until they agree.
    let agreed = Instant::now();
    let (mine, all) = loop {
        let mine = json_of(&w, "/api/v1/me/limits", &Auth::Cookie(&ola.cookie)).await;
        let all = json_of(
            &w,
            "/api/v1/limits?institution=uni",
            &Auth::Bearer(&w.admin_token),
        )
        .await;
        let differ: Vec<String> = mine["limits"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|l| {
                let full = limit_on_page(&all, l["id"].as_str().unwrap());
                (l["used"] != full["used"]).then(|| format!("{l} vs {full}"))
            })
            .collect();
        if differ.is_empty() {
            break (mine, all);
        }
        assert!(
            agreed.elapsed() < Duration::from_secs(15),
            "My usage and the Limits page disagree: {differ:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut scopes = std::collections::BTreeSet::new();
    for l in mine["limits"].as_array().unwrap() {
        scopes.insert(l["scope"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        scopes.into_iter().collect::<Vec<_>>(),
        ["group", "institution", "user"],
        "{mine}"
    );
    let used = |id: &str| dec(&limit_on_page(&all, id)["used"]);
    assert!(
        used("uni:requests:month") >= rust_decimal::Decimal::TEN,
        "{all}"
    );
    assert!(
        used("uni:group:staff:usd:month") > rust_decimal::Decimal::ZERO,
        "{all}"
    );
    // Issue 33, item 7: the Limits page gives a period's bounds in the institution's zone,
    // named — as the gateway's refusal says when a limit renews ("00:00 CET", not
    // "23:00 UTC") — and its money once ("$0.01", it printed "$$0.01").
    let html = client()
        .get(format!("{}/limits?institution=uni", w.serve.base))
        .bearer_auth(&w.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let oslo = chrono::Utc::now().with_timezone(&chrono_tz::Europe::Oslo);
    let zone = oslo.format("%Z").to_string();
    let month = oslo.format("%Y-%m-01").to_string();
    assert!(
        html.contains(&format!("{month} 00:00 {zone} – ")),
        "the month starts at midnight in Oslo: {html}"
    );
    assert!(!html.contains(" UTC – "), "{html}");
    assert!(html.contains("$0.") && !html.contains("$$"), "{html}");

    // The isolation sweep: as kari (uni, member), every page and API of the dashboard.
    let others = [
        "ola4711",
        "per0815",
        ola_key_id.as_str(),
        per_key_id.as_str(),
        "ola4711@uni.example",
        "per0815@other.example",
    ];
    let mut routes: Vec<String> = Vec::new();
    for prefix in ["", "/api/v1"] {
        for path in [
            "/",
            "/overview",
            "/institutions",
            "/institutions/uni",
            "/institutions/other",
            "/models",
            "/alerts",
            "/close",
            "/invoices",
            "/invoices/draft?institution=uni",
            "/keys",
            "/keys?institution=uni",
            "/limits",
            "/limits?institution=other",
            "/pipeline",
            "/people",
            "/people?institution=uni",
            "/people?institution=other",
            "/me",
            "/me/keys",
            "/me/limits",
            "/me?institution=other",
            "/me?person=ola4711",
        ] {
            routes.push(format!("{prefix}{path}"));
        }
    }
    let mut answered = 0;
    for route in &routes {
        let res = client()
            .get(format!("{}{route}", w.serve.base))
            .header("cookie", &kari.cookie)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let location = res
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned());
        let body = res.text().await.unwrap();
        let own = route.contains("/me");
        match status {
            200 => {
                assert!(own, "kari reads {route}: {body:.300}");
                answered += 1;
            }
            303 => assert!(
                location.as_deref().is_some_and(|l| l.starts_with("/me")),
                "{route} sends kari to {location:?}"
            ),
            403 | 404 => assert!(!own, "{route}: {status}"),
            other => panic!("{route}: {other} {body:.300}"),
        }
        for o in others {
            assert!(!body.contains(o), "{route} shows kari `{o}`");
        }
    }
    assert!(answered >= 8, "kari's own pages answered ({answered})");
    // Acting on another's key or person: not found / forbidden, and nothing changes.
    for (path, form) in [
        (
            format!("/me/keys/{ola_key_id}/revoke"),
            vec![("csrf", kari.csrf.as_str())],
        ),
        (
            format!("/me/keys/{per_key_id}/revoke"),
            vec![("csrf", kari.csrf.as_str())],
        ),
        (
            "/institutions/uni/people/ola4711/suspend".to_owned(),
            vec![("csrf", kari.csrf.as_str()), ("suspend", "1")],
        ),
        (
            "/institutions/uni/groups/students/policy".to_owned(),
            vec![
                ("csrf", kari.csrf.as_str()),
                ("member_limits", "1000 requests per day"),
            ],
        ),
        (
            "/api/v1/limits/set".to_owned(),
            vec![
                ("csrf", kari.csrf.as_str()),
                ("institution", "uni"),
                ("scope", "user"),
                ("subject", "kari2207"),
                ("metric", "requests"),
                ("amount", "1000"),
                ("period", "day"),
            ],
        ),
        (
            "/keys/create".to_owned(),
            vec![("csrf", kari.csrf.as_str()), ("user", "kari2207")],
        ),
    ] {
        let res = client()
            .post(format!("{}{path}", w.serve.base))
            .header("cookie", &kari.cookie)
            .form(&form)
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        assert!(status == 403 || status == 404, "{path}: {status}");
    }
    let (status, _) = chat(&w, &ola_key2, "gpt-4o-mini").await;
    assert_ne!(status, 401, "ola's key still works");
    assert_eq!(me(&w, &ola).await["standing"], "active");
    let _ = kari_key_id;

    // Signing out ends the dashboard's session and sends the browser on to the provider's
    // end-session endpoint with the ID token as hint, which ends the provider's too.
    let res = client()
        .post(format!("{}/logout", w.serve.base))
        .header("cookie", &kari.cookie)
        .form(&[("csrf", kari.csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    let to = res.headers()["location"].to_str().unwrap().to_owned();
    let hint = reqwest::Url::parse(&to)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "id_token_hint")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    assert!(
        to.starts_with(&format!("{}/oauth2/end_session?", w.provider.base))
            && hint.split('.').count() == 3,
        "{to}"
    );
    let res = client()
        .get(format!("{}/api/v1/me", w.serve.base))
        .header("cookie", &kari.cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "the session is gone");
    w.env.drop_database().await;
}

// ---- ID tokens that must be refused: a provider of our own that signs what we ask. ----

/// What the test provider's token endpoint answers next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forge {
    Valid,
    BadSignature,
    OtherAudience,
    OtherIssuer,
    Expired,
    /// The nonce of an earlier sign-in.
    ReplayedNonce,
    AlgNone,
    UnknownKey,
}

struct Forger {
    issuer: String,
    key: rsa::RsaPrivateKey,
    other: rsa::RsaPrivateKey,
    next: Mutex<(Forge, String)>,
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Forger {
    fn jwks(&self) -> Value {
        use rsa::traits::PublicKeyParts as _;
        let public = self.key.to_public_key();
        json!({"keys": [{"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256",
                         "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())}]})
    }

    fn id_token(&self, forge: Forge, nonce: &str) -> String {
        use rsa::signature::{SignatureEncoding as _, Signer as _};
        let now = chrono::Utc::now().timestamp();
        let mut claims = json!({
            "iss": self.issuer, "aud": "tokentally-dashboard", "sub": "mallory",
            "email": "mallory@uni.example", "name": "Mallory",
            "iat": now, "exp": now + 600, "nonce": nonce,
        });
        let (alg, kid) = match forge {
            Forge::AlgNone => ("none", "k1"),
            Forge::UnknownKey => ("RS256", "k2"),
            _ => ("RS256", "k1"),
        };
        match forge {
            Forge::OtherAudience => claims["aud"] = json!("someone-else"),
            Forge::OtherIssuer => claims["iss"] = json!("https://evil.example"),
            Forge::Expired => {
                claims["iat"] = json!(now - 7200);
                claims["exp"] = json!(now - 3600);
            }
            Forge::ReplayedNonce => claims["nonce"] = json!("a-nonce-of-an-earlier-sign-in"),
            _ => {}
        }
        let header = json!({"alg": alg, "kid": kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = match forge {
            Forge::AlgNone => String::new(),
            Forge::BadSignature | Forge::UnknownKey => {
                let k = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(self.other.clone());
                b64(&k.sign(input.as_bytes()).to_bytes())
            }
            _ => {
                let k = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(self.key.clone());
                b64(&k.sign(input.as_bytes()).to_bytes())
            }
        };
        format!("{input}.{signature}")
    }
}

async fn spawn_forger() -> Arc<Forger> {
    use axum::routing::{get, post};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut rng = rand::rngs::OsRng;
    let forger = Arc::new(Forger {
        issuer: base.clone(),
        key: rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap(),
        other: rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap(),
        next: Mutex::new((Forge::Valid, String::new())),
    });
    let discovery = json!({
        "issuer": base, "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"), "jwks_uri": format!("{base}/jwks"),
        "response_types_supported": ["code"], "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    });
    let (f1, f2) = (forger.clone(), forger.clone());
    let app = axum::Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || {
                let d = discovery.clone();
                async move { axum::Json(d) }
            }),
        )
        .route(
            "/jwks",
            get(move || {
                let f = f1.clone();
                async move { axum::Json(f.jwks()) }
            }),
        )
        .route(
            "/token",
            post(move || {
                let f = f2.clone();
                async move {
                    let (forge, nonce) = f.next.lock().unwrap().clone();
                    axum::Json(
                        json!({"access_token": "at", "token_type": "Bearer", "expires_in": 600,
                                  "id_token": f.id_token(forge, &nonce)}),
                    )
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    forger
}

/// Every ID token that must be refused is refused with a clear error and no session:
/// bad signature, other audience, other issuer, expired, replayed nonce, `alg: none`, a
/// key the JWKS does not hold; and a callback whose state is not this browser's. A
/// valid token signs in (so the refusals are not the harness failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_that_must_be_refused_are_refused() {
    let env = TestEnv::new("id_tokens", 1).await;
    let forger = spawn_forger().await;
    let cfg = format!(
        r#"
[[institutions]]
id = "uni"

[[sso]]
id = "forged"
label = "Test Provider"
issuer = "{}"
client_id = "tokentally-dashboard"
client_secret = "x"

[[sso.rules]]
claim = "email"
ends_with = "@uni.example"
institution = "uni"
group = "students"
"#,
        forger.issuer
    );
    let serve = crate::harness::spawn_serve(&env, &cfg, &[]).await;
    let c = client();
    // Starts a sign-in; (state cookie, state, nonce).
    let start = || async {
        let res = c
            .get(format!("{}/sso/forged/login", serve.base))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 303);
        let cookie = cookie_of(&res, "tt_sso_state").unwrap();
        let to = reqwest::Url::parse(res.headers()["location"].to_str().unwrap()).unwrap();
        let q: BTreeMap<String, String> = to.query_pairs().into_owned().collect();
        (cookie, q["state"].clone(), q["nonce"].clone())
    };
    let cases = [
        (Forge::BadSignature, "signature"),
        (Forge::OtherAudience, "audience"),
        (Forge::OtherIssuer, "issuer"),
        (Forge::Expired, "expired"),
        (Forge::ReplayedNonce, "nonce"),
        (Forge::AlgNone, "algorithm"),
        (Forge::UnknownKey, "key"),
    ];
    for (forge, says) in cases {
        let (cookie, state, nonce) = start().await;
        *forger.next.lock().unwrap() = (forge, nonce);
        let res = c
            .get(format!(
                "{}/sso/forged/callback?code=c&state={state}",
                serve.base
            ))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{forge:?}");
        assert!(
            cookie_of(&res, "tt_session").is_none(),
            "{forge:?}: no session"
        );
        let page = res.text().await.unwrap();
        let error = page
            .split("role=\"alert\">")
            .nth(1)
            .and_then(|s| s.split('<').next())
            .unwrap_or_default()
            .to_lowercase();
        assert!(
            error.contains("sign-in failed") && error.contains(says),
            "{forge:?}: the error says `{says}`: {error}"
        );
        println!("{forge:?}: {error}");
    }
    // A state that is not this browser's.
    let (cookie, _state, nonce) = start().await;
    let (_, other_state, _) = start().await;
    *forger.next.lock().unwrap() = (Forge::Valid, nonce);
    let res = c
        .get(format!(
            "{}/sso/forged/callback?code=c&state={other_state}",
            serve.base
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(cookie_of(&res, "tt_session").is_none());
    assert!(res.text().await.unwrap().contains("state mismatch"));
    // The control: a valid token signs in, once; the same callback again is refused.
    let (cookie, state, nonce) = start().await;
    *forger.next.lock().unwrap() = (Forge::Valid, nonce);
    let url = format!("{}/sso/forged/callback?code=c&state={state}", serve.base);
    let res = c.get(&url).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let res = c.get(&url).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(res.status(), 401, "a callback is used once");
    assert!(cookie_of(&res, "tt_session").is_none());
    env.drop_database().await;
}

/// A group's shared budget, through the gateway: two members spend it together to its end
/// — never over, the end not stranded (unused less than one request's worst case) —,
/// then each of them is refused with a message naming the group; a member of another
/// group is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_shared_budget_is_spent_by_its_members_together_to_its_end() {
    let w = world("people_group_budget").await;
    let p = &w.provider;
    for (sub, groups) in [
        ("ada", json!(["lab"])),
        ("bo", json!(["lab"])),
        ("cy", json!([])),
    ] {
        p.set_claims(
            sub,
            json!({"email": format!("{sub}@uni.example"), "name": sub, "groups": groups}),
        )
        .await;
    }
    let mut keys = BTreeMap::new();
    for sub in ["ada", "bo", "cy"] {
        let s = sign_in(&w, sub).await;
        let (_, key) = create_key(&w, &s, "k").await;
        until_known(&w, &key).await;
        keys.insert(sub, key);
    }
    // gpt-4o, answers of 1,000 tokens with max_tokens 1,000: about $0.01 a request, a
    // worst case of about $0.0113 (the output bound plus the prompt's reservation).
    let base = w.gateway.base.clone();
    let call = |key: String| {
        let base = base.clone();
        async move {
            let res = client()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .header("x-simulator", "words=1000")
                .json(&json!({"model": "gpt-4o", "max_tokens": 1000,
                          "messages": [{"role": "user", "content": "hello"}]}))
                .send()
                .await
                .unwrap();
            let status = res.status().as_u16();
            (status, res.text().await.unwrap())
        }
    };
    let mut admitted = BTreeMap::from([("ada", 0), ("bo", 0)]);
    let mut refusals = Vec::new();
    for round in 0..30 {
        let who = if round % 2 == 0 { "ada" } else { "bo" };
        let (status, body) = call(keys[who].clone()).await;
        match status {
            200 => *admitted.get_mut(who).unwrap() += 1,
            429 => refusals.push((who, body)),
            _ => panic!("{who}: {status} {body}"),
        }
    }
    assert!(
        admitted["ada"] > 0 && admitted["bo"] > 0,
        "both members spent the group's budget: {admitted:?}"
    );
    let (refused_ada, refused_bo) = (
        refusals.iter().filter(|(w, _)| *w == "ada").count(),
        refusals.iter().filter(|(w, _)| *w == "bo").count(),
    );
    assert!(refused_ada > 0 && refused_bo > 0, "{admitted:?}");
    let dollars_after = |text: &str, label: &str| -> rust_decimal::Decimal {
        text.split(label)
            .nth(1)
            .and_then(|r| r.strip_prefix('$'))
            .map(|r| {
                r.chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.')
                    .collect::<String>()
            })
            .and_then(|n| n.trim_end_matches('.').parse().ok())
            .unwrap_or_else(|| panic!("no `{label}$…` in {text}"))
    };
    for (who, body) in &refusals {
        assert!(body.contains("group lab"), "{who}: {body}");
        // A refusal never says more is left than the request needs.
        let left = dollars_after(body, "Left this period: ");
        let need = dollars_after(body, "needs up to ");
        assert!(left < need, "{who}: {body}");
    }
    // Another group's member is not limited by it.
    let (status, body) = chat(&w, &keys["cy"], "gpt-4o-mini").await;
    assert_eq!(status, 200, "{body}");
    // What the group spent, from the stored events; and what the Limits page says, which
    // adds what the gateways report as settled but not yet stored: for up to one gateway
    // refresh an event just stored is counted twice there, so the page is read until it
    // agrees (it must, within seconds).
    let limit = "uni:group:lab:usd:month";
    let started = Instant::now();
    let used = loop {
        let stored: i64 = w
            .env
            .scalar(
                "SELECT toInt64(sum(sign)) FROM usage_events WHERE institution_id = 'uni' \
                 AND model = 'gpt-4o' AND status = 'ok'",
            )
            .await;
        let raw: String = w
            .env
            .ch()
            .query(
                "SELECT toString(sum(cost * sign)) FROM usage_events \
                 WHERE institution_id = 'uni' AND user_id IN ('ada', 'bo')",
            )
            .fetch_one()
            .await
            .unwrap();
        let raw: rust_decimal::Decimal = raw.parse().unwrap();
        let all = json_of(
            &w,
            "/api/v1/limits?institution=uni",
            &Auth::Bearer(&w.admin_token),
        )
        .await;
        let l = limit_on_page(&all, limit).clone();
        let page = dec(&l["used"]);
        if stored == admitted.values().sum::<i64>() && l["reserved"] == "0" && page == raw {
            break raw;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{l} ({stored} stored, ${raw} spent)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let budget = rust_decimal::Decimal::new(10, 2);
    let worst_case = rust_decimal::Decimal::new(114, 4); // $0.0114, above the estimate
    println!(
        "group budget $0.10: {admitted:?} admitted, ${} used, {} refused",
        used.normalize(),
        refusals.len()
    );
    assert!(used <= budget, "over the group's budget: ${used}");
    assert!(
        budget - used < worst_case,
        "the end of the budget was stranded: ${used} of $0.10"
    );
    w.env.drop_database().await;
}
