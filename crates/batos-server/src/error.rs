//! The crate's one error enum, and how each variant becomes a vLLM-style HTTP answer.
//!
//! Every failure a client can see leaves as vLLM's nested envelope
//! `{"error": {"message", "type", "param", "code"}}` with the HTTP status equal to
//! `code` (see `docs/server.md`).

use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use batos_engine::EngineError;
use serde::Serialize;

/// Everything `batos-server` can fail with: configuration and startup errors (the
/// server never starts) and per-request errors (one request is refused with the
/// matching HTTP status).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid server config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Its value, as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Opening the living image, its model or its adapter repository failed.
    #[error("living image {path}: {what}: {reason}")]
    Image {
        /// The image directory.
        path: PathBuf,
        /// What was being opened.
        what: &'static str,
        /// The underlying error.
        reason: String,
    },
    /// The engine could not be built.
    #[error("engine: {0}")]
    EngineStart(#[source] EngineError),
    /// Binding or serving the listening socket failed.
    #[error("{op} {addr}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No `Authorization: Bearer` header, or the wrong key.
    #[error("Unauthorized: missing or invalid API key")]
    Unauthorized,
    /// The body is not a JSON object of the expected shape (or not JSON at all).
    #[error("{message}")]
    BadRequest {
        /// What is wrong, for the client.
        message: String,
        /// The offending request field, when one is to blame.
        param: Option<&'static str>,
    },
    /// The body exceeds the configured limit.
    #[error("request body too large: the limit is {limit} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The request names a model that is neither the base model nor a served adapter.
    #[error("The model `{name}` does not exist.")]
    ModelNotFound {
        /// The name asked for.
        name: String,
    },
    /// An adapter management request is malformed or conflicts with the current state
    /// (vLLM's `InvalidUserInput`: empty names, duplicate loads, paths outside the
    /// allowed directory).
    #[error("{message}")]
    InvalidUserInput {
        /// What is wrong, for the client.
        message: String,
    },
    /// An adapter management request names something that does not exist: an adapter
    /// that is not loaded, a path with no adapter, a name not in the image.
    #[error("{message}")]
    NotFound {
        /// What was not found, for the client.
        message: String,
    },
    /// The adapter failed its audit (bad rank, unsupported module, wrong base model):
    /// the client sent an adapter this server cannot serve.
    #[error("Loading lora {name} failed: {reason}")]
    AdapterRejected {
        /// The adapter name.
        name: String,
        /// The audit's findings.
        reason: String,
    },
    /// The engine refused a request or failed while serving it.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// The engine ended a request without finishing it (a step failed, or a
    /// cancelling shutdown).
    #[error("request {id} ended early: {reason}")]
    Aborted {
        /// The response id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The engine refused to drop an adapter that is no longer served.
    #[error("Failed to remove lora adapter '{name}' from the engine: {reason}")]
    UnloadFailed {
        /// The adapter name.
        name: String,
        /// The engine's error.
        reason: String,
    },
    /// A blocking task (tokenisation, adapter I/O, metrics) panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Result alias of this crate.
pub type Result<T, E = ServerError> = std::result::Result<T, E>;

impl ServerError {
    /// A 400 with `message` blaming `param`.
    pub(crate) fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ServerError::BadRequest {
            message: message.into(),
            param,
        }
    }

    /// The HTTP status and vLLM error type this error is reported with.
    pub fn status_and_type(&self) -> (StatusCode, &'static str) {
        use ServerError as E;
        match self {
            E::Unauthorized => (StatusCode::UNAUTHORIZED, "AuthenticationError"),
            E::BadRequest { .. } | E::AdapterRejected { .. } => {
                (StatusCode::BAD_REQUEST, "BadRequestError")
            }
            E::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "BadRequestError"),
            E::InvalidUserInput { .. } => (StatusCode::BAD_REQUEST, "InvalidUserInput"),
            E::ModelNotFound { .. } | E::NotFound { .. } => {
                (StatusCode::NOT_FOUND, "NotFoundError")
            }
            E::Engine(e) => engine_status(e),
            E::InvalidConfig { .. }
            | E::ConfigFile { .. }
            | E::Image { .. }
            | E::EngineStart(_)
            | E::Io { .. }
            | E::Aborted { .. }
            | E::UnloadFailed { .. }
            | E::Task(_) => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ServerError::BadRequest { param, .. } => *param,
            ServerError::ModelNotFound { .. } => Some("model"),
            ServerError::Engine(EngineError::InvalidRequest { field, .. }) => Some(field),
            _ => None,
        }
    }

    /// The JSON body vLLM sends for this error.
    pub fn envelope(&self) -> serde_json::Value {
        let (status, kind) = self.status_and_type();
        serde_json::json!({
            "error": ErrorBody {
                message: self.to_string(),
                kind,
                param: self.param(),
                code: status.as_u16(),
            }
        })
    }
}

/// How engine errors map to HTTP: bad input is the client's (400), an unknown adapter
/// is a missing model (404), a stopped engine is unavailable (503), the rest is ours.
fn engine_status(e: &EngineError) -> (StatusCode, &'static str) {
    match e {
        EngineError::InvalidRequest { .. } | EngineError::AdapterExists { .. } => {
            (StatusCode::BAD_REQUEST, "BadRequestError")
        }
        EngineError::UnknownAdapter { .. } | EngineError::AdaptersUnsupported { .. } => {
            (StatusCode::NOT_FOUND, "NotFoundError")
        }
        EngineError::ShutDown => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError"),
    }
}

/// vLLM's error object.
#[derive(Serialize)]
pub(crate) struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: u16,
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_type();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), "{self}");
        } else {
            tracing::debug!(status = status.as_u16(), "{self}");
        }
        (status, axum::Json(self.envelope())).into_response()
    }
}
