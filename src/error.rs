//! TorchServe's error answer, `{"code": 404, "type": "ModelNotFoundException", "message": ...}`,
//! defined once for every layer that produces one.
//!
//! TorchServe names the Java exception class in `type` and picks the status from the class
//! (`HttpRequestHandler` catches them by class). [`ErrorKind`] is that list: each exception name
//! and the status TorchServe sends it with, written once. Layers keep their own typed errors
//! (`RegistryError`, `PoolError`, ...), each saying which kind it is; [`ApiError`] is the answer
//! they all become, rendered by one function ([`ApiError::json`]) for HTTP, gRPC and per-request
//! worker replies alike.
//!
//! This lives outside `api` because backends and the worker pool answer single requests of a
//! batch in the same shape (a bad ONNX input, a Python handler's error) without depending on the
//! HTTP layer.

/// A TorchServe exception type, with the status TorchServe answers it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    /// A failed token check (TorchServe's `InvalidKeyException`, a 400).
    InvalidKey,
    /// A model that cannot be set up, e.g. its pip dependencies failed (TorchServe's
    /// `ModelException`, a 400).
    Model,
    /// oxserve's own metrics token (`metrics_auth_token`); TorchServe has none.
    Unauthorized,
    /// A path no route serves.
    ResourceNotFound,
    ModelNotFound,
    ModelVersionNotFound,
    MethodNotAllowed,
    RequestTimeout,
    /// A version registered twice.
    Conflict,
    RequestEntityTooLarge,
    UriTooLong,
    RequestHeaderFieldsTooLarge,
    /// An archive that could not be downloaded (TorchServe's `DownloadArchiveException`, a 400).
    DownloadArchive,
    /// Workflows (TorchServe's workflow package): an unknown workflow (404), an archive already in
    /// the store (500), an invalid archive or spec (400), nodes that failed to register (500).
    WorkflowNotFound,
    FileAlreadyExists,
    InvalidWorkflow,
    Workflow,
    InternalServer,
    ServiceUnavailable,
}

impl ErrorKind {
    /// Every kind, for tests and docs.
    pub const ALL: [ErrorKind; 20] = [
        ErrorKind::BadRequest,
        ErrorKind::InvalidKey,
        ErrorKind::Model,
        ErrorKind::Unauthorized,
        ErrorKind::ResourceNotFound,
        ErrorKind::ModelNotFound,
        ErrorKind::ModelVersionNotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::RequestTimeout,
        ErrorKind::Conflict,
        ErrorKind::RequestEntityTooLarge,
        ErrorKind::UriTooLong,
        ErrorKind::RequestHeaderFieldsTooLarge,
        ErrorKind::DownloadArchive,
        ErrorKind::WorkflowNotFound,
        ErrorKind::FileAlreadyExists,
        ErrorKind::InvalidWorkflow,
        ErrorKind::Workflow,
        ErrorKind::InternalServer,
        ErrorKind::ServiceUnavailable,
    ];

    /// TorchServe's exception class name, the JSON `type`.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "BadRequestException",
            ErrorKind::InvalidKey => "InvalidKeyException",
            ErrorKind::Model => "ModelException",
            ErrorKind::Unauthorized => "UnauthorizedException",
            ErrorKind::ResourceNotFound => "ResourceNotFoundException",
            ErrorKind::ModelNotFound => "ModelNotFoundException",
            ErrorKind::ModelVersionNotFound => "ModelVersionNotFoundException",
            ErrorKind::MethodNotAllowed => "MethodNotAllowedException",
            ErrorKind::RequestTimeout => "RequestTimeoutException",
            ErrorKind::Conflict => "ConflictStatusException",
            ErrorKind::RequestEntityTooLarge => "RequestEntityTooLargeException",
            ErrorKind::UriTooLong => "UriTooLongException",
            ErrorKind::RequestHeaderFieldsTooLarge => "RequestHeaderFieldsTooLargeException",
            ErrorKind::DownloadArchive => "DownloadArchiveException",
            ErrorKind::WorkflowNotFound => "WorkflowNotFoundException",
            ErrorKind::FileAlreadyExists => "FileAlreadyExistsException",
            ErrorKind::InvalidWorkflow => "InvalidWorkflowException",
            ErrorKind::Workflow => "WorkflowException",
            ErrorKind::InternalServer => "InternalServerException",
            ErrorKind::ServiceUnavailable => "ServiceUnavailableException",
        }
    }

    /// The status TorchServe answers this exception with.
    pub const fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest
            | ErrorKind::InvalidKey
            | ErrorKind::Model
            | ErrorKind::DownloadArchive
            | ErrorKind::InvalidWorkflow => 400,
            ErrorKind::WorkflowNotFound => 404,
            ErrorKind::FileAlreadyExists | ErrorKind::Workflow => 500,
            ErrorKind::Unauthorized => 401,
            ErrorKind::ResourceNotFound | ErrorKind::ModelNotFound => 404,
            ErrorKind::ModelVersionNotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::Conflict => 409,
            ErrorKind::RequestEntityTooLarge => 413,
            ErrorKind::UriTooLong => 414,
            ErrorKind::RequestHeaderFieldsTooLarge => 431,
            ErrorKind::InternalServer => 500,
            ErrorKind::ServiceUnavailable => 503,
        }
    }

    /// The kind for a status the HTTP layer produces itself (a router's 405, a refused header):
    /// the generic exception of that status, `InternalServerException` for any other.
    pub fn for_status(status: u16) -> ErrorKind {
        match status {
            400 => ErrorKind::BadRequest,
            401 => ErrorKind::Unauthorized,
            404 => ErrorKind::ResourceNotFound,
            405 => ErrorKind::MethodNotAllowed,
            408 => ErrorKind::RequestTimeout,
            409 => ErrorKind::Conflict,
            413 => ErrorKind::RequestEntityTooLarge,
            414 => ErrorKind::UriTooLong,
            431 => ErrorKind::RequestHeaderFieldsTooLarge,
            503 => ErrorKind::ServiceUnavailable,
            _ => ErrorKind::InternalServer,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An error answer: status, TorchServe exception type, message. (Every HTTP answer >= 400 also
/// closes the connection: see `api::http::handle`.)
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    /// An error with its kind's status.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            status: kind.status(),
            kind,
            message: message.into(),
        }
    }

    /// An error whose status is not its kind's: a Python handler's own code, or TorchServe's
    /// 507 for a body over max_request_size.
    pub fn with_status(status: u16, kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::BadRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::InternalServer, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::ResourceNotFound, message)
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            ErrorKind::MethodNotAllowed,
            "Requested method is not allowed, please refer to API document.",
        )
    }

    /// The JSON body, pretty-printed as TorchServe writes it, newline-terminated: the one place
    /// the error shape is written.
    pub fn json(&self) -> String {
        let body = serde_json::json!({
            "code": self.status,
            "type": self.kind.name(),
            "message": self.message,
        });
        format!("{body:#}\n")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_torchserve_name_and_status() {
        // TorchServe's HttpRequestHandler: the exception's class decides the status.
        let expected = [
            ("BadRequestException", 400),
            ("InvalidKeyException", 400),
            ("ModelException", 400),
            ("UnauthorizedException", 401),
            ("ResourceNotFoundException", 404),
            ("ModelNotFoundException", 404),
            ("ModelVersionNotFoundException", 404),
            ("MethodNotAllowedException", 405),
            ("RequestTimeoutException", 408),
            ("ConflictStatusException", 409),
            ("RequestEntityTooLargeException", 413),
            ("UriTooLongException", 414),
            ("RequestHeaderFieldsTooLargeException", 431),
            ("DownloadArchiveException", 400),
            ("WorkflowNotFoundException", 404),
            ("FileAlreadyExistsException", 500),
            ("InvalidWorkflowException", 400),
            ("WorkflowException", 500),
            ("InternalServerException", 500),
            ("ServiceUnavailableException", 503),
        ];
        let got: Vec<(&str, u16)> = ErrorKind::ALL
            .iter()
            .map(|k| (k.name(), k.status()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn statuses_map_back_to_generic_kinds() {
        for status in [400, 401, 404, 405, 408, 409, 413, 414, 431, 500, 503] {
            assert_eq!(ErrorKind::for_status(status).status(), status, "{status}");
        }
        assert_eq!(ErrorKind::for_status(404), ErrorKind::ResourceNotFound);
        assert_eq!(ErrorKind::for_status(418), ErrorKind::InternalServer);
    }

    #[test]
    fn the_body_is_torchserve_shape() {
        let e = ApiError::with_status(507, ErrorKind::RequestEntityTooLarge, "too \"big\"");
        let v: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": 507, "type": "RequestEntityTooLargeException", "message": "too \"big\""})
        );
        assert!(e.json().ends_with("}\n"));
    }
}
