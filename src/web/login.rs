//! `/login` and `/logout`: the form, its CSRF double submit, the limits on attempts.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use serde::Deserialize;

use super::auth::{
    self, cookie, set_cookie, Authed, CheckedForm, CsrfField, LOGIN_CSRF_COOKIE, SESSION_COOKIE,
};
use super::error::AppError;
use super::signin::{login_page, safe_next};
use super::AppState;

#[derive(Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

pub async fn login_form(
    State(state): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<NextQuery>,
) -> Result<Response, AppError> {
    login_page(&state, StatusCode::OK, "", q.next.as_deref().unwrap_or("/"))
}

#[derive(Deserialize)]
pub struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    #[serde(default)]
    next: String,
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
            &form.next,
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
                &form.next,
            )
        }
        auth::LoginOutcome::Failed => {
            tracing::warn!(%user, %client, "login failed");
            login_page(
                &state,
                StatusCode::UNAUTHORIZED,
                "Wrong user name or password.",
                &form.next,
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
                Redirect::to(&safe_next(Some(&form.next))),
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
    let sso = cookie(&headers, SESSION_COOKIE).and_then(|id| state.auth.end_session(&id));
    // Signed in through a provider: signed out there too.
    let target = match &sso {
        Some(s) => super::sso::logout_target(&state, s).await,
        None => "/login".to_owned(),
    };
    Ok((
        [(
            header::SET_COOKIE,
            set_cookie(SESSION_COOKIE, "", state.auth.secure_cookies, Some(0)),
        )],
        Redirect::to(&target),
    )
        .into_response())
}
