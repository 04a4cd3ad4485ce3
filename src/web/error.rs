//! The one HTTP error type: opaque 500s with the cause logged.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("authentication required")]
    /// `next`: the page asked for (path and query), where signing in leads back to.
    Unauthenticated { api: bool, next: String },
    #[error("forbidden")]
    Forbidden,
    /// 403 with the reason, said to the person.
    #[error("{0}")]
    Refused(String),
    /// 303 to a page of this site (a member asking for the overview goes to "My usage").
    #[error("see {0}")]
    Redirect(String),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    /// The request is well formed but the data's state refuses it (already invoiced,
    /// period not ended, unpriced usage, a ledger to restore).
    #[error("{0}")]
    Conflict(String),
    #[error("too many attempts, try again in a minute")]
    TooManyRequests,
    #[error(
        "this view needs more work than a page may take; narrow the date range or the filters"
    )]
    TooLarge,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<crate::store::StoreError> for AppError {
    fn from(e: crate::store::StoreError) -> Self {
        if e.cut_by_limits() {
            // A query cut off by the dashboard's limits is the caller's to narrow.
            tracing::warn!(error = %crate::format::log_safe(&e.to_string(), 300), "dashboard query cut off by its limits");
            AppError::TooLarge
        } else {
            AppError::Internal(e.into())
        }
    }
}

impl From<crate::billing::BillingError> for AppError {
    fn from(e: crate::billing::BillingError) -> Self {
        match e {
            e if e.is_refusal() => AppError::Conflict(e.to_string()),
            crate::billing::BillingError::Store(s) => s.into(),
            e => AppError::Internal(e.into()),
        }
    }
}

impl From<crate::billing::ledger::LedgerError> for AppError {
    fn from(e: crate::billing::ledger::LedgerError) -> Self {
        crate::billing::BillingError::from(e).into()
    }
}

impl From<askama::Error> for AppError {
    fn from(e: askama::Error) -> Self {
        AppError::Internal(e.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::Unauthenticated { api: false, next } => {
                let to = if next.is_empty() || next == "/" {
                    "/login".to_owned()
                } else {
                    let q: String = form_urlencoded::Serializer::new(String::new())
                        .append_pair("next", next)
                        .finish();
                    format!("/login?{q}")
                };
                return Redirect::to(&to).into_response();
            }
            AppError::Unauthenticated { api: true, .. } => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    axum::Json(serde_json::json!({"error": "authentication required"})),
                )
                    .into_response()
            }
            AppError::Redirect(to) => return Redirect::to(to).into_response(),
            AppError::Forbidden | AppError::Refused(_) => StatusCode::FORBIDDEN,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            AppError::TooLarge => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Internal(e) => {
                tracing::error!(error = %format!("{e:#}"), "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let message = match &self {
            AppError::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        };
        (status, axum::Json(serde_json::json!({"error": message}))).into_response()
    }
}
