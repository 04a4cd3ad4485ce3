//! Router tests without servers: the whole router, driven with `oneshot`, for what is
//! decided before a handler reads anything — authentication, who may see what, CSRF,
//! and how refusals look. The store points at an address where nothing listens, so a
//! request that got past its checks would fail loudly (500), never pass quietly.

mod keys;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use tower::ServiceExt as _;

use super::auth::{Principal, Role};
use super::{router, AppState};
use crate::config::Config;
use crate::people::{UserEntry, UsersFile};

/// The routes a browser or a script reads (with `/api/v1` twins).
const PAGES: [&str; 14] = [
    "/",
    "/overview",
    "/institutions",
    "/institutions/uni-a",
    "/models",
    "/alerts",
    "/close",
    "/invoices",
    "/invoices/draft?institution=uni-a",
    "/keys",
    "/limits",
    "/people?institution=uni-a",
    "/pipeline",
    "/pipeline/rejected/0/1",
];

fn state() -> Arc<AppState> {
    state_with(
        Config::default(),
        vec![UserEntry {
            name: "admin".into(),
            role: Role::Admin,
            institution: None,
            password_hash: "$argon2id$unused".into(),
        }],
    )
}

fn state_with(mut cfg: Config, users: Vec<UserEntry>) -> Arc<AppState> {
    // Nothing listens here: a handler that reads would answer 500.
    cfg.clickhouse.url = "http://127.0.0.1:9".into();
    cfg.kafka.brokers = "127.0.0.1:9".into();
    let users = UsersFile {
        users,
        tokens: vec![],
    };
    let book = crate::price::book::PriceBook::load(std::path::Path::new("prices")).unwrap();
    let book = crate::price::watch::SharedBook::new(Arc::new(book));
    crate::app::state(&cfg, users, book).unwrap()
}

fn session(
    state: &AppState,
    role: Role,
    institution: Option<&str>,
    person: Option<&str>,
) -> (String, String) {
    let (id, csrf) = state.auth.create_session(Principal {
        name: person.unwrap_or("someone").into(),
        role,
        institution: institution.map(str::to_owned),
        person: person.map(str::to_owned),
    });
    (format!("tt_session={id}"), csrf)
}

async fn get(app: &Router, path: &str, cookie: Option<&str>) -> Response {
    let mut req = Request::get(path).header(header::ACCEPT, "text/html");
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    app.clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

async fn text(res: Response) -> String {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn without_a_session_pages_lead_to_sign_in_and_the_api_answers_401() {
    let app = router(state());
    for page in PAGES {
        let res = get(&app, page, None).await;
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{page}");
        let to = res.headers()[header::LOCATION].to_str().unwrap();
        assert!(to.starts_with("/login"), "{page} → {to}");
        if page != "/" {
            assert!(to.contains("next="), "{page} → {to}: signing in leads back");
        }
        let res = get(&app, &format!("/api/v1{page}"), None).await;
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "/api/v1{page}");
    }
    for own in ["/me", "/api/v1/me", "/api/v1/me/keys", "/api/v1/me/limits"] {
        let res = get(&app, own, None).await;
        assert!(
            matches!(res.status().as_u16(), 303 | 401),
            "{own}: {}",
            res.status()
        );
    }
}

#[tokio::test]
async fn a_member_reaches_no_institution_wide_page() {
    let state = state();
    let (cookie, _) = session(&state, Role::Member, Some("uni-a"), Some("kari"));
    let app = router(state);
    for page in PAGES {
        for path in [page.to_owned(), format!("/api/v1{page}")] {
            let res = get(&app, &path, Some(&cookie)).await;
            match res.status().as_u16() {
                303 => assert_eq!(res.headers()[header::LOCATION], "/me", "{path}"),
                403 => {}
                other => panic!("{path}: {other}"),
            }
        }
    }
    // Forms too, with the session's own CSRF token.
    for path in [
        "/keys/create",
        "/limits/set",
        "/invoices/issue",
        "/institutions/uni-a/people/ola/suspend",
        "/institutions/uni-a/groups/students/policy",
    ] {
        let req = Request::post(path)
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("csrf=x&institution=uni-a"))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
    }
}

#[tokio::test]
async fn an_institution_user_naming_another_institution_is_refused_on_every_route() {
    let state = state();
    let (cookie, _) = session(&state, Role::InstitutionAdmin, Some("uni-a"), None);
    let app = router(state);
    for path in [
        "/institutions/uni-b",
        "/?institution=uni-b",
        "/models?institution=uni-b",
        "/keys?institution=uni-b",
        "/limits?institution=uni-b",
        "/people?institution=uni-b",
        "/invoices?institution=uni-b",
        "/api/v1/institutions/uni-b/invoices/INV-1/pdf",
        "/api/v1/institutions/uni-b",
    ] {
        let res = get(&app, path, Some(&cookie)).await;
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{path}");
    }
}

#[tokio::test]
async fn a_refused_page_is_a_page_and_a_refused_api_call_is_json() {
    let state = state();
    let (cookie, _) = session(&state, Role::Institution, Some("uni-a"), None);
    let app = router(state);
    let res = get(&app, "/pipeline", Some(&cookie)).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert!(res.headers()[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = text(res).await;
    assert!(
        html.contains("<h1>Not allowed</h1>") && html.contains("not for your role"),
        "{html}"
    );
    let res = get(&app, "/api/v1/pipeline", Some(&cookie)).await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(text(res).await, r#"{"error":"forbidden"}"#);
    // "My usage" says who it is for.
    let html = text(get(&app, "/me", Some(&cookie)).await).await;
    assert!(html.contains("sign in with their institution"), "{html}");
}

#[tokio::test]
async fn forms_without_the_sessions_csrf_token_are_refused() {
    let state = state();
    let (cookie, csrf) = session(&state, Role::Admin, None, None);
    let app = router(state);
    for body in [
        "institution=uni-a&user=u".to_owned(),
        format!("csrf={csrf}x&institution=uni-a&user=u"),
    ] {
        let req = Request::post("/keys/create")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body.clone()))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "{body}");
    }
}

/// One password attempt for `fin` from `from` (as a trusted proxy in front says) with the
/// sign-in form's own CSRF cookie and token; the answer's status.
async fn sign_in_attempt(app: &Router, from: &str, password: &str) -> u16 {
    let form = get(app, "/login", None).await;
    let cookie = form.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let html = text(form).await;
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the sign-in form has a CSRF token")
        .to_owned();
    let mut req = Request::post("/login")
        .header(header::COOKIE, cookie)
        .header("x-forwarded-for", from)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!(
            "username=fin&password={password}&csrf={csrf}"
        )))
        .unwrap();
    // What `into_make_service_with_connect_info` adds: the proxy's own address.
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
            [127, 0, 0, 1],
            40_000,
        ))));
    app.clone().oneshot(req).await.unwrap().status().as_u16()
}

/// Password guesses from many addresses do not lock the user out; the address that
/// hammers waits; the real user, at their own address, still gets in.
#[tokio::test]
async fn failures_from_other_addresses_do_not_lock_a_user_out() {
    let mut cfg = Config::default();
    cfg.web.trusted_proxies = vec!["127.0.0.1".into()];
    let state = state_with(
        cfg,
        vec![UserEntry {
            name: "fin".into(),
            role: Role::Finance,
            institution: None,
            password_hash: crate::people::hash_password("fin-password").unwrap(),
        }],
    );
    let app = router(state);
    for i in 1..=10 {
        let from = format!("203.0.113.{i}");
        assert_eq!(sign_in_attempt(&app, &from, "guess").await, 401, "{from}");
    }
    let mut hammer = Vec::new();
    for _ in 0..8 {
        hammer.push(sign_in_attempt(&app, "198.51.100.7", "guess").await);
    }
    assert!(
        hammer.ends_with(&[429, 429, 429]),
        "the hammering address waits: {hammer:?}"
    );
    assert_eq!(
        sign_in_attempt(&app, "192.0.2.44", "fin-password").await,
        303
    );
}

/// Issue 33, item 1: the institution picker on an institution's page submits the page's
/// own path with another institution; the page goes there (other parameters kept, empty
/// ones dropped), "All institutions" goes to the overview, and the API still refuses.
#[tokio::test]
async fn picking_another_institution_on_an_institutions_page_goes_to_its_page() {
    let state = state();
    let (cookie, _) = session(&state, Role::Admin, None, None);
    let app = router(state);
    for (path, to) in [
        (
            "/institutions/uni-a?from=2026-10-01&to=2026-10-31&institution=uni-b",
            "/institutions/uni-b?from=2026-10-01&to=2026-10-31",
        ),
        // Empty parameters (a filter bar sends every field) are dropped first.
        (
            "/institutions/uni-a?from=2026-10-01&model=&institution=uni-b&user=",
            "/institutions/uni-a?from=2026-10-01&institution=uni-b",
        ),
        ("/models?from=&to=2026-10-31&key=", "/models?to=2026-10-31"),
        ("/overview?institution=", "/overview"),
        (
            "/institutions/uni-a?institution=&from=2026-10-01",
            "/?from=2026-10-01",
        ),
        (
            "/institutions/uni-a?institution=uni%20c",
            "/institutions/uni%20c",
        ),
    ] {
        let res = get(&app, path, Some(&cookie)).await;
        assert_eq!(res.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(res.headers()[header::LOCATION], to, "{path}");
    }
    let res = get(
        &app,
        "/api/v1/institutions/uni-a?institution=uni-b",
        Some(&cookie),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    // Named twice: ambiguous, refused, never guessed.
    let res = get(
        &app,
        "/institutions/uni-a?institution=uni-b&institution=uni-c",
        Some(&cookie),
    )
    .await;
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_actions_result_is_shown_once_by_its_page_to_its_session() {
    use crate::web::auth::Flash;
    let state = state();
    let (mine, _) = session(&state, Role::Admin, None, None);
    let (other, _) = session(&state, Role::Admin, None, None);
    let id = |cookie: &str| cookie.trim_start_matches("tt_session=").to_owned();
    state.auth.put_flash(
        &id(&mine),
        Flash::done("/people?institution=uni-a", "first"),
    );
    // A later action replaces a result not yet shown.
    state.auth.put_flash(
        &id(&mine),
        Flash::done("/people?institution=uni-a", "second"),
    );
    assert!(
        state.auth.take_flash(&id(&other), "/people").is_none(),
        "another session"
    );
    assert!(
        state.auth.take_flash(&id(&mine), "/keys").is_none(),
        "another page"
    );
    let shown = state
        .auth
        .take_flash(&id(&mine), "/people")
        .expect("its page");
    assert_eq!(shown.message, "second");
    assert!(
        state.auth.take_flash(&id(&mine), "/people").is_none(),
        "shown once"
    );
    // Through the router: the page shows it, an API call of the same path does not take it.
    state
        .auth
        .put_flash(&id(&mine), Flash::done("/invoices", "Issued TT-1"));
    let app = router(state.clone());
    let _ = get(&app, "/api/v1/invoices", Some(&mine)).await;
    assert!(
        state.auth.take_flash(&id(&mine), "/invoices").is_some(),
        "left for the page"
    );
}
