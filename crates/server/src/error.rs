//! Errors: [`ServerError`] for starting and running the server, [`ApiError`]
//! for answers to clients.

use std::path::PathBuf;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, #[source] std::io::Error),
    /// The signing key file exists but cannot be read as one.
    #[error("server key file {path}: {why}", path = .0.display(), why = .1)]
    KeyFile(PathBuf, String),
    /// The server's key list could not be signed.
    #[error("publishing server keys: {0}")]
    ServerKeys(String),
    /// The storage backend failed to open.
    #[error("opening storage: {0}")]
    Store(#[from] StoreError),
    /// The channels' MLS store or Raft log could not be opened.
    #[error("{0}")]
    Channels(String),
    /// The federation client could not be built.
    #[error("{0}")]
    Federation(String),
    /// The HTTP server failed.
    #[error("serving HTTP: {0}")]
    Serve(#[source] std::io::Error),
}

/// An error answer: an HTTP status and a JSON body
/// `{"error": code, "message": text}`, plus extra fields for some codes.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable machine-readable code (`bad_request`, `name_taken`...).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// For `rate_limited`: when to retry.
    pub retry_after_ms: Option<u64>,
    /// For `wrong_epoch`: the channel's current epoch.
    pub current_epoch: Option<u64>,
    /// For `wrong_epoch`: the commit that won the submitted epoch, when
    /// there is one (`{epoch, commit, commit_hash, certificate}`).
    pub winner: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_ms: None,
            current_epoch: None,
            winner: None,
        }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 400 `invalid_signature`: a signature or self-validating object failed.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_signature", message)
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409 with a specific code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 413 `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    /// 409 `wrong_epoch`, naming the channel's current epoch.
    pub fn wrong_epoch(current: u64, message: impl Into<String>) -> Self {
        let mut e = Self::conflict("wrong_epoch", message);
        e.current_epoch = Some(current);
        e
    }

    /// 403 `not_member`.
    pub fn not_member(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "not_member", message)
    }

    /// 400 `rejected`: a commit the channel's rules refuse.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "rejected", message)
    }

    /// 429 `rate_limited`: a rate limit was hit; nothing was done, and
    /// the caller may retry after `wait`.
    pub fn rate_limited(message: impl Into<String>, wait: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        e.retry_after_ms = Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        e
    }

    /// 503 `ordering_unavailable`: the channel's ordering group cannot
    /// order now (no leader reachable: a majority of its servers may be
    /// down); nothing was accepted, the client may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ordering_unavailable",
            message,
        )
    }

    /// 500 `internal`: nothing was accepted.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(_) => Self::conflict("name_taken", e.to_string()),
            StoreError::DeviceHasOtherName(_) => Self::conflict("conflict", e.to_string()),
            StoreError::DeviceRemoved(_) => Self::forbidden(e.to_string()),
            StoreError::RemoverGone(_) => Self::unauthorized(e.to_string()),
            StoreError::UnknownDevice(_) | StoreError::UnknownChannel(_) => {
                Self::not_found(e.to_string())
            }
            StoreError::ChannelExists(_) => Self::conflict("channel_exists", e.to_string()),
            StoreError::EpochConflict { current, .. } => Self::wrong_epoch(current, e.to_string()),
            StoreError::TooManyKeyPackages { .. } => Self::conflict("conflict", e.to_string()),
            StoreError::InboxFull { .. } => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "inbox_full", e.to_string())
            }
            StoreError::Sqlite(_) | StoreError::Corrupt(_) | StoreError::Poisoned => {
                tracing::error!(error = %e, "storage failure");
                Self::internal("storage failure; nothing was accepted")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.code, "message": self.message });
        if let (Some(ms), Some(obj)) = (self.retry_after_ms, body.as_object_mut()) {
            obj.insert("retry_after_ms".into(), ms.into());
        }
        if let (Some(epoch), Some(obj)) = (self.current_epoch, body.as_object_mut()) {
            obj.insert("current_epoch".into(), epoch.into());
        }
        if let (Some(winner), Some(obj)) = (self.winner, body.as_object_mut()) {
            obj.insert("winner".into(), winner);
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
