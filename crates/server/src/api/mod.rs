//! The client HTTP API, version 0: routing, the JSON and auth extractors
//! every endpoint shares, and the endpoints by concern.
//!
//! Conventions: JSON bodies; binary fields are base64url without padding;
//! device ids are 64 hex digits; errors are `{"error", "message"}` with a
//! 4xx/5xx status ([`ApiError`]); `Authorization: Bearer <token>`.
//!
//! Modules: `identity` (registration, login, records), `keypackages`,
//! `inbox`, `events` (the event log and its WebSocket), `channels`
//! (channels, commits, trees and messages).

mod binary;
pub(crate) mod channels;
pub(crate) mod events;
pub(crate) mod identity;
pub(crate) mod inbox;
pub(crate) mod keypackages;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kith_proto::DeviceId;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::metrics::RequestLabels;
use crate::state::{Shared, now_ms};

/// The whole HTTP application.
pub(crate) fn router(state: Shared) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    Router::new()
        .route("/metrics", get(metrics))
        .merge(identity::routes())
        .merge(keypackages::routes())
        .merge(inbox::routes())
        .merge(events::routes())
        .merge(channels::routes())
        .merge(crate::federation::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts every answer and logs it.
async fn observe(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    let status = response.status();
    tracing::debug!(%method, %path, status = status.as_u16(), "request");
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            method: method.to_string(),
            status: status.as_u16().to_string(),
        })
        .inc();
    response
}

async fn metrics(State(state): State<Shared>) -> Result<Response, ApiError> {
    let (quiet, leading) = crate::quiesce::census(&state);
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    state.metrics.raft_groups_quiet.set(gauge(quiet));
    state.metrics.raft_groups_leading.set(gauge(leading));
    let text = state
        .metrics
        .encode()
        .map_err(|_| ApiError::internal("encoding metrics failed"))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// A JSON body whose rejections are [`ApiError`]s: 413 `too_large` over the
/// body limit, 400 `bad_request` for anything else.
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large("the request body is over the server's size limit")
    } else {
        ApiError::bad_request(rejection.body_text())
    }
}

/// A path parameter whose rejection is an [`ApiError`] like every other
/// answer (axum's own is plain text): 400 `bad_request`, for instance for
/// a percent-encoded parameter that is not UTF-8.
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) if rejection.status().is_server_error() => {
                tracing::error!(error = %rejection.body_text(), "path parameters");
                Err(ApiError::internal("the route's path parameters are wrong"))
            }
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// The device a request is authenticated as, from its bearer token.
pub(crate) struct Authed(pub(crate) DeviceId);

impl FromRequestParts<Shared> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let token = bearer(parts)?
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer token"))?;
        authenticate(state, &token).await.map(Authed)
    }
}

/// The bearer token in the `Authorization` header, if any.
pub(crate) fn bearer(parts: &Parts) -> Result<Option<String>, ApiError> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::unauthorized("Authorization header is not text"))?;
    let token = text
        .strip_prefix("Bearer ")
        .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
    Ok(Some(token.trim().to_owned()))
}

/// The hash under which a session token is stored.
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The device whose unexpired session `token` is.
pub(crate) async fn authenticate(state: &Shared, token: &str) -> Result<DeviceId, ApiError> {
    let hash = token_hash(token);
    // A check: a session not yet on disk belongs to a login whose answer
    // (the token) has not been sent, so nobody can present it yet.
    let session = state.db_check(move |s| s.session(&hash)).await?;
    match session {
        Some((device, expires_at)) if expires_at > now_ms() => Ok(device),
        Some(_) => Err(ApiError::unauthorized(
            "the session has expired; log in again",
        )),
        None => Err(ApiError::unauthorized("unknown token")),
    }
}

/// Base64url without padding.
pub(crate) fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes the base64url (no padding) field `field`.
pub(crate) fn unb64(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    URL_SAFE_NO_PAD.decode(text).map_err(|e| {
        ApiError::bad_request(format!("`{field}` is not base64url without padding: {e}"))
    })
}

/// Parses a device id in its text form.
pub(crate) fn parse_device(text: &str) -> Result<DeviceId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a device id (64 hex digits)")))
}

/// 32 bytes from the operating system's generator.
pub(crate) fn random_32() -> [u8; 32] {
    use rand_core::RngCore as _;
    let mut bytes = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// A list size from a `limit` parameter: default 100, at most the
/// configured maximum, at least 1.
pub(crate) fn list_limit(state: &Shared, limit: Option<usize>) -> usize {
    limit
        .unwrap_or(100)
        .clamp(1, state.config.limits.max_list_items.max(1))
}
