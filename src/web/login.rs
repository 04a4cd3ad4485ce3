//! `/login` and `/logout`: the form, its CSRF double submit, the limits on attempts.

use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::auth::{
    self, cookie, random_hex, set_cookie, Authed, CheckedForm, CsrfField, LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
};
use super::error::AppError;
use super::AppState;

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

pub async fn login_form(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    login_page(&state, StatusCode::OK, "")
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    csrf: String,
}

pub async fn login(
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
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

impl CsrfField for CsrfForm {
    fn csrf(&self) -> &str {
        &self.csrf
    }
}

pub async fn logout(
    State(state): State<Arc<AppState>>,
    authed: Authed,
    headers: HeaderMap,
    CheckedForm(_): CheckedForm<CsrfForm>,
) -> Result<Response, AppError> {
    if authed.csrf.is_empty() {
        // Bearer tokens have no session to end.
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
