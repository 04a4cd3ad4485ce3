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
mod me;
mod openapi;
pub mod page;
mod pages;
mod people;
mod providers;
pub mod query;
mod signin;
pub mod sso;
#[cfg(test)]
mod tests;
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
    /// Keys and the key log (ClickHouse; memory in router tests).
    pub keys: Arc<dyn crate::keys::KeyStore>,
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
    /// The gateway's base URL as clients use it (for the snippets shown with a new key).
    pub fn gateway_url(&self) -> String {
        let g = &self.cfg.gateway;
        if g.public_url.is_empty() {
            format!("http://{}", g.listen)
        } else {
            g.public_url.trim_end_matches('/').to_owned()
        }
    }

    /// (id, name) of every institution, for the institution pickers: those in the config
    /// and every one with usage (finance bills institutions the config never named), and
    /// `selected` if it is neither.
    pub async fn institution_choices(
        &self,
        selected: &str,
    ) -> Result<Vec<(String, String)>, AppError> {
        let mut ids: std::collections::BTreeSet<String> =
            self.cfg.institutions.iter().map(|i| i.id.clone()).collect();
        ids.extend(self.store.institutions_with_usage(None).await?);
        if !selected.is_empty() {
            ids.insert(selected.to_owned());
        }
        Ok(ids
            .into_iter()
            .map(|id| {
                let name = self.institution_name(&id);
                (id, name)
            })
            .collect())
    }

    /// An institution's name as configured, else its id.
    pub fn institution_name(&self, id: &str) -> String {
        self.cfg
            .institution(id)
            .map(|i| i.name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| id.to_owned())
    }

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
        .route("/me/keys/create", post(me::create))
        .route("/me/keys/{key_id}/revoke", post(me::revoke))
        .route("/me/keys/{key_id}/resume", post(me::resume))
        .route(
            "/assets/copy.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    include_str!("../../assets/web/copy.js"),
                )
            }),
        )
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
            .route(&format!("{prefix}/providers"), get(providers::show))
            .route(&format!("{prefix}/providers/fetch"), post(providers::fetch))
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
            .route(&format!("{prefix}/me"), get(me::show))
            .route(&format!("{prefix}/me/keys"), get(me::keys))
            .route(&format!("{prefix}/me/limits"), get(me::limits))
            .route(&format!("{prefix}/people"), get(people::list))
            .route(
                &format!("{prefix}/institutions/{{institution}}/people/{{person}}/suspend"),
                post(people::suspend),
            )
            .route(
                &format!("{prefix}/institutions/{{institution}}/people/{{person}}/group"),
                post(people::move_member),
            )
            .route(
                &format!("{prefix}/institutions/{{institution}}/groups"),
                post(people::add_group),
            )
            .route(
                &format!("{prefix}/institutions/{{institution}}/groups/{{group}}/policy"),
                post(people::set_policy),
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
                &format!("{prefix}/keys/{{key_id}}/resume"),
                post(keys::resume),
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
        .layer(axum::middleware::from_fn(html_errors))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// Fail closed on ambiguous URLs: a parameter given twice (`?institution=a&institution=b`)
/// is refused on every route rather than silently reduced to one of its values; pages
/// asked with empty parameters are sent to their address without them.
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
        // A filter bar submits every field, empty or not: a page asked with empty
        // parameters goes to the same address without them (what one would bookmark).
        // `institution=` on an institution's page means "All institutions" and stays.
        let path = req.uri().path();
        let page = req.method() == axum::http::Method::GET
            && !path.starts_with("/api/")
            && !path.starts_with("//");
        let keep = |k: &str, v: &str| {
            !v.is_empty() || (k == "institution" && path.starts_with("/institutions/"))
        };
        if page && form_urlencoded::parse(q.as_bytes()).any(|(k, v)| !keep(&k, &v)) {
            let kept: String = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form_urlencoded::parse(q.as_bytes()).filter(|(k, v)| keep(k, v)))
                .finish();
            let to = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{kept}")
            };
            return axum::response::Redirect::to(&to).into_response();
        }
    }
    next.run(req).await
}

#[derive(askama::Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
    /// A refused view's own address and what was typed into its URL, to correct and
    /// send again: (name, value, input type).
    retry: Option<Retry>,
}

/// A refused view's path and its parameters: (name, value, input type).
type Retry = (String, Vec<(String, String, &'static str)>);

/// What a refused `GET` page asked for, as a form to correct: each query parameter
/// (dates as date fields where they are dates), the path as its action.
fn retry_form(uri: &axum::http::Uri) -> Option<Retry> {
    let query = uri.query().filter(|q| !q.is_empty())?;
    // Only a path of this site ("//host/…" would send the form elsewhere).
    if !uri.path().starts_with('/') || uri.path().starts_with("//") {
        return None;
    }
    let fields = form_urlencoded::parse(query.as_bytes())
        .take(20)
        .map(|(k, v)| {
            let date = matches!(k.as_ref(), "from" | "to")
                && chrono::NaiveDate::parse_from_str(&v, "%Y-%m-%d").is_ok();
            (
                k.chars().take(40).collect(),
                v.chars().take(200).collect(),
                if date { "date" } else { "text" },
            )
        })
        .collect();
    Some((uri.path().to_owned(), fields))
}

/// A page (not `/api/…`) that fails says why on a page of the dashboard, not as JSON; a
/// refused view (400 on a `GET`) keeps what was typed into its URL in a form to correct.
async fn html_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let page = !req.uri().path().starts_with("/api/");
    // The address is kept (a cheap clone); the form is built only for a refusal.
    let asked = (req.method() == axum::http::Method::GET).then(|| req.uri().clone());
    let res = next.run(req).await;
    let status = res.status();
    let json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !page || !json || !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let message = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "the request failed".into()),
        Err(_) => "the request failed".into(),
    };
    let title = match status.as_u16() {
        400 => "This request cannot be answered",
        401 => "Sign-in needed",
        403 => "Not allowed",
        404 => "Not found",
        409 => "Not possible now",
        422 => "Too much to show",
        429 => "Too many attempts",
        _ => "Something went wrong",
    };
    let mut message = message;
    if status.as_u16() == 403 && message == "forbidden" {
        message = "You are signed in, but this page is not for your role or institution.".into();
    }
    let html = askama::Template::render(&ErrorPage {
        title,
        message: &message,
        retry: asked
            .filter(|_| status == axum::http::StatusCode::BAD_REQUEST)
            .and_then(|uri| retry_form(&uri)),
    })
    .unwrap_or_else(|_| crate::format::html(&message));
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Response::from_parts(parts, axum::body::Body::from(html))
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
