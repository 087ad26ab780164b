//! TorchServe's JSON error shape: `{"code": 404, "type": "ModelNotFoundException", "message": ...}`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::model::registry::RegistryError;

/// An error answer. (Every answer >= 400 also closes the connection: see `api::count_responses`.)
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequestException", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalServerException", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, "ResourceNotFoundException", message)
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowedException",
            "Requested method is not allowed, please refer to API document.",
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        let (status, kind) = e.status();
        ApiError::new(status, kind, e.to_string())
    }
}

impl From<crate::worker::PoolError> for ApiError {
    fn from(e: crate::worker::PoolError) -> ApiError {
        let (status, kind) = e.status();
        ApiError::new(status, kind, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            serde_json::json!({"code": self.status, "type": self.kind, "message": self.message});
        (
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json")],
            format!("{body:#}\n"),
        )
            .into_response()
    }
}
