//! The dashboard and JSON API (axum + askama): the state every handler shares and the
//! router. Handlers live one module per page group; `app` starts the server and the
//! background tasks beside it.

mod alerts;
pub mod auth;
pub mod chart;
mod close;
pub mod error;
mod invoices;
mod keys;
mod limits;
mod login;
mod openapi;
pub mod page;
mod pages;
pub mod query;
pub mod sso;
pub mod views;

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::config::Config;
use crate::store::Store;
use auth::Auth;
use error::AppError;

pub struct AppState {
    pub cfg: Config,
    /// Reads for pages and exports (the web user, with time and row limits).
    pub store: Store,
    /// Writes: issuing invoices, acknowledging alerts, the upkeep and evaluator tasks.
    pub writer: Store,
    /// The price book, reloaded when its files change.
    pub book: crate::price::watch::SharedBook,
    pub auth: Auth,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The invoice ledger as drafts see it (kept, refreshed incrementally).
    pub ledger: crate::billing::ledger::LedgerCache,
    /// Drafts per person per minute.
    pub drafts: auth::WindowCounter,
    /// The config's `[[limits]]`, checked.
    pub limits: Vec<crate::limits::Limit>,
    /// Groups and members, kept current.
    pub roster: Arc<crate::people::directory::Roster>,
    /// The institutions' sign-in providers (`[[sso]]`), if any.
    pub sso: Option<Arc<sso::Sso>>,
    /// Where browsers reach the dashboard (`web.public_url`, else the address it listens
    /// on): the providers send people back here.
    pub base_url: std::sync::OnceLock<String>,
}

impl AppState {
    pub fn base_url(&self) -> String {
        self.base_url
            .get()
            .cloned()
            .unwrap_or_else(|| format!("http://{}", self.cfg.web.listen))
    }
}

/// The routes. Pages and their `/api/v1` twins share handlers.
pub fn router(state: Arc<AppState>) -> Router {
    let mut r = Router::new()
        .route(
            "/login",
            get(login::login_form)
                .post(login::login)
                // A login form is a few hundred bytes; refuse megabytes before parsing.
                .layer(axum::extract::DefaultBodyLimit::max(8 * 1024)),
        )
        .route("/logout", post(login::logout))
        .route("/sso/{provider}/login", get(sso::login))
        .route("/sso/{provider}/callback", get(sso::callback))
        .route("/api/v1/openapi.json", get(openapi::openapi))
        // The one script (sorting tables): a constant, no data; served from here because
        // the content security policy allows scripts from this origin only.
        .route(
            "/assets/sort.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    include_str!("../../assets/web/sort.js"),
                )
            }),
        );
    for prefix in ["", "/api/v1"] {
        r = r
            .route(&format!("{prefix}/"), get(pages::overview::overview))
            .route(
                &format!("{prefix}/overview"),
                get(pages::overview::overview),
            )
            .route(
                &format!("{prefix}/institutions"),
                get(pages::institutions::list),
            )
            .route(
                &format!("{prefix}/institutions/{{institution}}"),
                get(pages::institutions::one),
            )
            .route(&format!("{prefix}/models"), get(pages::models::models))
            .route(&format!("{prefix}/alerts"), get(alerts::list))
            .route(
                &format!("{prefix}/alerts/{{id}}/ack"),
                post(alerts::acknowledge),
            )
            .route(&format!("{prefix}/close"), get(close::show))
            .route(&format!("{prefix}/close/issue"), post(close::issue))
            .route(&format!("{prefix}/invoices"), get(invoices::list))
            .route(&format!("{prefix}/invoices/draft"), get(invoices::draft))
            .route(&format!("{prefix}/invoices/issue"), post(invoices::issue))
            .route(
                &format!("{prefix}/institutions/{{institution}}/invoices/{{number}}/{{format}}"),
                get(invoices::download),
            )
            .route(
                &format!(
                    "{prefix}/institutions/{{institution}}/invoices/{{number}}/lines/{{line}}"
                ),
                get(invoices::explain),
            )
            .route(&format!("{prefix}/keys"), get(keys::list))
            .route(&format!("{prefix}/limits"), get(limits::list))
            .route(&format!("{prefix}/limits/set"), post(limits::set))
            .route(&format!("{prefix}/limits/remove"), post(limits::remove))
            .route(&format!("{prefix}/keys/create"), post(keys::create))
            .route(
                &format!("{prefix}/keys/{{key_id}}/revoke"),
                post(keys::revoke),
            )
            .route(
                &format!("{prefix}/pipeline"),
                get(pages::pipeline::pipeline),
            )
            .route(
                &format!("{prefix}/pipeline/rejected/{{partition}}/{{offset}}"),
                get(pages::pipeline::rejected),
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
