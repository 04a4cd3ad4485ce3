//! The sign-in page (the institutions' providers and the password form) and where
//! signing in leads: shared by the password login (`login`) and single sign-on (`sso`).

use askama::Template;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};

use super::auth::{random_hex, set_cookie, LOGIN_CSRF_COOKIE};
use super::error::AppError;
use super::AppState;

/// A local path to go to after signing in (`/me` if none, or if it is not one of ours).
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.len() < 2000 =>
        {
            n.to_owned()
        }
        _ => "/".to_owned(),
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginTemplate<'a> {
    csrf: &'a str,
    error: &'a str,
    /// Where to go after signing in (a local path).
    next: &'a str,
    /// (sign-in link, label) of every provider.
    providers: Vec<(String, String)>,
}

/// The sign-in page: the institutions' providers, and the password form (administrators,
/// break-glass). `next` is where signing in leads.
pub(crate) fn login_page(
    state: &AppState,
    status: StatusCode,
    error: &str,
    next: &str,
) -> Result<Response, AppError> {
    // Double-submit token: the form field must equal the cookie (SameSite=Strict).
    let csrf = random_hex(16);
    let next = safe_next(Some(next));
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("next", &next)
        .finish();
    let providers = state
        .sso
        .as_ref()
        .map(|s| s.buttons())
        .unwrap_or_default()
        .into_iter()
        .map(|(id, label)| (format!("/sso/{id}/login?{q}"), label))
        .collect();
    let page = LoginTemplate {
        csrf: &csrf,
        error,
        next: &next,
        providers,
    }
    .render()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        assert_eq!(safe_next(Some("/me")), "/me");
        assert_eq!(safe_next(Some("/alerts?id=3")), "/alerts?id=3");
        assert_eq!(safe_next(Some("//evil.example/x")), "/");
        assert_eq!(safe_next(Some("https://evil.example")), "/");
        assert_eq!(safe_next(Some("/\\evil")), "/");
        assert_eq!(safe_next(None), "/");
    }
}
