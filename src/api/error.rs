//! The one place errors become HTTP answers in TorchServe's JSON shape
//! (`{"code": 404, "type": "ModelNotFoundException", "message": ...}`).
//!
//! [`ApiError`] and the exception list ([`ErrorKind`]) live in `crate::error`, shared with the
//! backends that answer single requests in the same shape; each layer's typed error becomes an
//! `ApiError` here (`From`), so a handler returns `Result<_, ApiError>` and `?` does the rest, as
//! axum's own rejections do.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

pub use crate::error::{ApiError, ErrorKind};
use crate::model::registry::RegistryError;

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl From<crate::worker::PoolError> for ApiError {
    fn from(e: crate::worker::PoolError) -> ApiError {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "application/json")],
            self.json(),
        )
            .into_response()
    }
}
