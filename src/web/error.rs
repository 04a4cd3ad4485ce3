//! The one HTTP error type: opaque 500s with the cause logged.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("authentication required")]
    Unauthenticated { api: bool },
    #[error("forbidden")]
    Forbidden,
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
        match &e {
            crate::store::StoreError::ClickHouse(ch) => {
                ch_error(ch).unwrap_or(AppError::Internal(e.into()))
            }
            _ => AppError::Internal(e.into()),
        }
    }
}

impl From<clickhouse::error::Error> for AppError {
    fn from(e: clickhouse::error::Error) -> Self {
        ch_error(&e).unwrap_or(AppError::Internal(e.into()))
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

/// A query cut off by the dashboard's limits is the caller's to narrow, not a server fault.
fn ch_error(e: &clickhouse::error::Error) -> Option<AppError> {
    let clickhouse::error::Error::BadResponse(msg) = e else {
        return None;
    };
    // 159 timeout exceeded, 158 too many rows to read, 307 too many bytes, 241 memory limit.
    let cut = ["Code: 159", "Code: 158", "Code: 307", "Code: 241"]
        .iter()
        .any(|c| msg.contains(c));
    if cut {
        tracing::warn!(error = %crate::format::log_safe(msg, 300), "dashboard query cut off by its limits");
        Some(AppError::TooLarge)
    } else {
        None
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
            AppError::Unauthenticated { api: false } => {
                return Redirect::to("/login").into_response()
            }
            AppError::Unauthenticated { api: true } => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    axum::Json(serde_json::json!({"error": "authentication required"})),
                )
                    .into_response()
            }
            AppError::Forbidden => StatusCode::FORBIDDEN,
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
