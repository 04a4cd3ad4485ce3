//! `tokentally serve`: the dashboard and JSON API (axum + askama).

mod alerts;
pub mod auth;
pub mod chart;
pub mod error;
mod invoices;
pub mod page;
mod pages;
pub mod query;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use askama::Template;
use axum::extract::{ConnectInfo, Form, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::config::Config;
use crate::price::PriceBook;
use crate::shutdown::Shutdown;
use crate::store::Store;
use auth::{
    cookie, random_hex, set_cookie, Auth, Authed, UsersFile, LOGIN_CSRF_COOKIE, SESSION_COOKIE,
};
use error::AppError;

pub struct AppState {
    pub cfg: Config,
    /// Reads for pages and exports (the web user, with time and row limits).
    pub store: Store,
    /// Writes: issuing invoices, acknowledging alerts, the upkeep and evaluator tasks.
    pub writer: Store,
    pub book: PriceBook,
    pub auth: Auth,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The invoice ledger as drafts see it (kept, refreshed incrementally).
    pub ledger: crate::billing::ledger::LedgerCache,
    /// Drafts per person per minute.
    pub drafts: auth::WindowCounter,
}

/// The routes. Pages and their `/api/v1` twins share handlers.
pub fn router(state: Arc<AppState>) -> Router {
    let mut r = Router::new()
        .route(
            "/login",
            get(login_form)
                .post(login)
                // A login form is a few hundred bytes; refuse megabytes before parsing.
                .layer(axum::extract::DefaultBodyLimit::max(8 * 1024)),
        )
        .route("/logout", post(logout))
        .route("/api/v1/openapi.json", get(openapi));
    for prefix in ["", "/api/v1"] {
        r = r
            .route(&format!("{prefix}/"), get(pages::overview))
            .route(&format!("{prefix}/overview"), get(pages::overview))
            .route(&format!("{prefix}/institutions"), get(pages::institutions))
            .route(
                &format!("{prefix}/institutions/{{institution}}"),
                get(pages::institution),
            )
            .route(&format!("{prefix}/models"), get(pages::models))
            .route(&format!("{prefix}/alerts"), get(alerts::list))
            .route(
                &format!("{prefix}/alerts/{{id}}/ack"),
                post(alerts::acknowledge),
            )
            .route(&format!("{prefix}/invoices"), get(invoices::list))
            .route(&format!("{prefix}/invoices/draft"), get(invoices::draft))
            .route(&format!("{prefix}/invoices/issue"), post(invoices::issue))
            .route(
                &format!("{prefix}/institutions/{{institution}}/invoices/{{number}}/{{format}}"),
                get(invoices::download),
            )
            .route(&format!("{prefix}/pipeline"), get(pages::pipeline))
            .route(
                &format!("{prefix}/pipeline/rejected/{{partition}}/{{offset}}"),
                get(pages::rejected),
            );
    }
    r.fallback(|| async { AppError::NotFound })
        .layer(axum::middleware::from_fn(reject_repeated_parameters))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Fail closed on ambiguous URLs: a parameter given twice (`?institution=a&institution=b`)
/// is refused on every route rather than silently reduced to one of its values.
async fn reject_repeated_parameters(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(q) = req.uri().query() {
        let mut seen = std::collections::BTreeSet::new();
        for (k, _) in form_urlencoded::parse(q.as_bytes()) {
            if !seen.insert(k.clone()) {
                return AppError::BadRequest(format!(
                    "parameter `{}` is given more than once",
                    crate::format::log_safe(&k, 40)
                ))
                .into_response();
            }
        }
    }
    next.run(req).await
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("static"),
    );
    h.insert(header::X_FRAME_OPTIONS, "DENY".parse().expect("static"));
    h.insert(
        header::REFERRER_POLICY,
        "same-origin".parse().expect("static"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"
            .parse()
            .expect("static"),
    );
    h.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
    res
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginTemplate<'a> {
    csrf: &'a str,
    error: &'a str,
}

fn login_page(state: &AppState, status: StatusCode, error: &str) -> Result<Response, AppError> {
    // Double-submit token: the form field must equal the cookie (SameSite=Strict).
    let csrf = random_hex(16);
    let page = LoginTemplate { csrf: &csrf, error }.render()?;
    Ok((
        status,
        [(
            header::SET_COOKIE,
            set_cookie(
                LOGIN_CSRF_COOKIE,
                &csrf,
                state.auth.secure_cookies,
                Some(3600),
            ),
        )],
        Html(page),
    )
        .into_response())
}

async fn login_form(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    login_page(&state, StatusCode::OK, "")
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    csrf: String,
}

async fn login(
    State(state): State<Arc<AppState>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, AppError> {
    // Sizes first: nothing below (limiter, argon2, logs) ever sees an oversized field.
    if form.username.len() > auth::MAX_USER_NAME || form.password.len() > auth::MAX_PASSWORD {
        return login_page(
            &state,
            StatusCode::BAD_REQUEST,
            "User name or password too long.",
        );
    }
    if form.csrf.is_empty()
        || cookie(&headers, LOGIN_CSRF_COOKIE).as_deref() != Some(form.csrf.as_str())
    {
        return Err(AppError::Forbidden);
    }
    let client = auth::client_ip(addr.ip(), &headers, &state.trusted_proxies).to_string();
    let user = crate::format::log_safe(&form.username, 64);
    match state
        .auth
        .login(&form.username, &form.password, &client)
        .await
    {
        auth::LoginOutcome::RateLimited => {
            tracing::warn!(%user, %client, "login rate limited");
            login_page(
                &state,
                StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts from here; try again in a minute.",
            )
        }
        auth::LoginOutcome::Failed => {
            tracing::warn!(%user, %client, "login failed");
            login_page(
                &state,
                StatusCode::UNAUTHORIZED,
                "Wrong user name or password.",
            )
        }
        auth::LoginOutcome::Ok(principal) => {
            tracing::info!(user = %crate::format::log_safe(&principal.name, 64), %client, "login");
            let (id, _) = state.auth.create_session(principal);
            Ok((
                axum::response::AppendHeaders([
                    (
                        header::SET_COOKIE,
                        set_cookie(SESSION_COOKIE, &id, state.auth.secure_cookies, None),
                    ),
                    (
                        header::SET_COOKIE,
                        set_cookie(LOGIN_CSRF_COOKIE, "", state.auth.secure_cookies, Some(0)),
                    ),
                ]),
                Redirect::to("/"),
            )
                .into_response())
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(state): State<Arc<AppState>>,
    authed: Authed,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, AppError> {
    if authed.csrf.is_empty() || form.csrf != authed.csrf {
        return Err(AppError::Forbidden);
    }
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        state.auth.end_session(&id);
    }
    Ok((
        [(
            header::SET_COOKIE,
            set_cookie(SESSION_COOKIE, "", state.auth.secure_cookies, Some(0)),
        )],
        Redirect::to("/login"),
    )
        .into_response())
}

async fn openapi(_: Authed) -> impl IntoResponse {
    axum::Json(openapi_document())
}

/// The OpenAPI document of `/api/v1`.
pub fn openapi_document() -> serde_json::Value {
    let filter_params: Vec<serde_json::Value> = [
        ("from", "First day, YYYY-MM-DD (UTC; default: first of this month)"),
        ("to", "Last day, inclusive, YYYY-MM-DD (default: today)"),
        ("institution", "Institution id (institution users: only their own)"),
        ("model", "Model id"),
        ("key", "API key id"),
        ("user", "User id"),
        ("tag", "Tag as name=value"),
    ]
    .iter()
    .map(|(n, d)| serde_json::json!({"name": n, "in": "query", "required": false, "description": d, "schema": {"type": "string"}}))
    .collect();
    let page = serde_json::json!({"$ref": "#/components/schemas/Page"});
    let op = |summary: &str, extra: Vec<serde_json::Value>| {
        let mut params = filter_params.clone();
        params.extend(extra);
        serde_json::json!({"get": {"summary": summary, "parameters": params, "security": [{"bearer": []}],
            "responses": {"200": {"description": "Page data", "content": {"application/json": {"schema": page}}},
                          "401": {"description": "No or invalid token"}, "403": {"description": "Outside the token's scope"},
                          "404": {"description": "Unknown"}}}})
    };
    let path_param = |name: &str, ty: &str| serde_json::json!({"name": name, "in": "path", "required": true, "schema": {"type": ty}});
    serde_json::json!({
        "openapi": "3.0.3",
        "info": {"title": "tokentally API", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Spend analytics over priced LLM usage. Money is a decimal string in USD, exact."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Page": {"type": "object", "properties": {
                "title": {"type": "string"},
                "filters": {"type": "object"},
                "figures": {"type": "object", "additionalProperties": true},
                "charts": {"type": "array", "items": {"type": "object"}},
                "tables": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "object"}}}}}}
        },
        "paths": {
            "/api/v1/overview": op("Spend overview: this month vs last, by day, top institutions and models", vec![]),
            "/api/v1/institutions": op("Spend per institution", vec![]),
            "/api/v1/institutions/{institution}": op("One institution: over time by model, users, keys, tags, budget", vec![path_param("institution", "string")]),
            "/api/v1/models": op("Spend and tokens by model and token class; price entries in effect", vec![]),
            "/api/v1/pipeline": op("Pipeline health (admin, ops): lag, rejected events, unpriced models", vec![]),
            "/api/v1/pipeline/rejected/{partition}/{offset}": op("One rejected message with its raw payload (admin, ops)", vec![path_param("partition", "integer"), path_param("offset", "integer")]),
        }
    })
}

/// Serves the dashboard until `shutdown`.
pub async fn serve(cfg: &Config, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let users = UsersFile::load(&cfg.web.users_file)?;
    if users.users.is_empty() && users.tokens.is_empty() {
        tracing::warn!(file = %cfg.web.users_file.display(), "no users: add one with `tokentally users add NAME --role admin`");
    }
    let book = PriceBook::load(&cfg.prices.path)
        .with_context(|| format!("loading price book {}", cfg.prices.path.display()))?;
    let state = Arc::new(AppState {
        auth: Auth::new(
            users,
            cfg.web.session_hours,
            cfg.web.login_attempts_per_minute,
            cfg.web.secure_cookies,
        ),
        store: Store::dashboard_reader(cfg),
        writer: Store::new(&cfg.clickhouse),
        book,
        ledger: crate::billing::ledger::LedgerCache::new(crate::billing::ledger::LedgerLog::new(
            cfg,
        )),
        drafts: auth::WindowCounter::new(10_000),
        trusted_proxies: cfg
            .web
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
        cfg: cfg.clone(),
    });
    tokio::spawn(invoice_upkeep(state.clone(), shutdown.clone()));
    if cfg.alerts.enabled {
        tokio::spawn(crate::alerts::evaluator::run(
            cfg.clone(),
            state.writer.clone(),
            shutdown.clone(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(&cfg.web.listen)
        .await
        .with_context(|| format!("binding {}", cfg.web.listen))?;
    // The bound address (with port 0 the system picks one; tests read it from here).
    let bound = listener.local_addr()?;
    tracing::info!(listen = %bound, "dashboard listening");
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.wait().await })
    .await?;
    Ok(())
}

/// Every minute: copy documents from the invoice ledger that ClickHouse lacks (an
/// issuer may have stopped between appending and writing), and on the configured day
/// issue last month's invoices.
async fn invoice_upkeep(state: Arc<AppState>, mut shutdown: Shutdown) {
    let billing = crate::billing::service::Billing::new(&state.cfg, &state.writer, &state.book);
    loop {
        match billing.sync().await {
            // At start and every minute: a ledger that lacks issued documents is reported
            // (and never replaced by an empty one); issuing stays refused until restored.
            Err(e) => {
                tracing::error!("invoice ledger check failed (will retry in a minute): {e:#}")
            }
            Ok(ledger) if state.cfg.billing.auto_issue_day > 0 => {
                match billing.auto_issue(&ledger).await {
                    Ok(issued) if !issued.is_empty() => {
                        tracing::info!(count = issued.len(), "invoices issued automatically")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("automatic invoicing failed (will retry): {e:#}"),
                }
            }
            Ok(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = shutdown.wait() => return,
        }
    }
}
