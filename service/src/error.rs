//! The service's one error type, and how each kind answers over HTTP.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed or does not fit the model (400).
    #[error("{0}")]
    BadRequest(String),
    /// No token, or not the key's token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// No such model, key or job (404).
    #[error("{0}")]
    NotFound(String),
    /// A job's result asked for before it is done (409).
    #[error("{0}")]
    NotReady(String),
    /// The body is over the limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// Starting the service: a model or the data directory cannot be read.
    #[error("{0}")]
    Startup(String),
    /// The job queue's database refused or cannot be reached (503).
    #[error("job queue: {0}")]
    Queue(String),
    #[error("I/O: {0}")]
    Io(String),
    #[error("evaluation failed: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServiceError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServiceError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServiceError::NotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::NotReady(_) => StatusCode::CONFLICT,
            ServiceError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServiceError::Queue(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::Startup(_) | ServiceError::Io(_) | ServiceError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::info!(error = %self, status = status.as_u16(), "request refused");
        }
        (status, axum::Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}
