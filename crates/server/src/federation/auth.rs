//! Checking an incoming federation request (spec §12.1): the [`Signed`]
//! extractor reads the body (bounded), checks the signature headers, and
//! yields the verified origin and body. Every failure is 401 with a code
//! naming it, except a blocked origin (403 `blocked`) and an oversized
//! body (413); nothing is recorded for a refused request, not even its
//! nonce.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};

use axum::http::StatusCode;
use kith_proto::{FederationRequestIn, MAX_CLOCK_SKEW_MS, ServerName};

use super::{ORIGIN_HEADER, REPLAY_WINDOW_MS, Replay, SIGNATURE_HEADER, blocked};
use crate::api::unb64;
use crate::error::ApiError;
use crate::state::{Shared, now_ms};

/// A request whose signature, destination, time, nonce and body checked.
pub(crate) struct Signed {
    /// The server that sent it.
    pub(crate) origin: ServerName,
    /// Its body.
    pub(crate) body: Bytes,
    /// When the origin signed it (ms since the Unix epoch, its clock).
    pub(crate) timestamp: u64,
}

fn refuse(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

impl FromRequest<Shared> for Signed {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, ApiError> {
        let fed = &state.federation;
        let (parts, body) = req.into_parts();
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let origin_text = header(ORIGIN_HEADER)
            .ok_or_else(|| refuse("bad_signature", "missing Kith-Origin header"))?;
        let origin: ServerName = origin_text.parse().map_err(|e| {
            refuse(
                "bad_signature",
                format!("Kith-Origin {origin_text:?} is not a server name: {e}"),
            )
        })?;
        if fed.client.is_blocked(&origin) {
            return Err(blocked(format!("{origin} is blocked by this server")));
        }
        let signature = header(SIGNATURE_HEADER)
            .ok_or_else(|| refuse("bad_signature", "missing Kith-Signature header"))?;
        let signed = unb64("Kith-Signature", &signature)
            .map_err(|e| refuse("bad_signature", e.message))
            .and_then(|bytes| {
                FederationRequestIn::decode(&bytes)
                    .map_err(|e| refuse("bad_signature", format!("Kith-Signature: {e}")))
            })?;
        let request = signed.request().clone();
        if request.origin() != &origin {
            return Err(refuse(
                "bad_signature",
                format!(
                    "Kith-Origin says {origin}, the signed request says {}",
                    request.origin()
                ),
            ));
        }
        if request.destination() != fed.client.me() {
            return Err(refuse(
                "wrong_destination",
                format!(
                    "the request is for {}, this is {}",
                    request.destination(),
                    fed.client.me()
                ),
            ));
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned());
        if request.method() != parts.method.as_str().as_bytes()
            || request.path_and_query() != path.as_bytes()
        {
            return Err(refuse(
                "bad_signature",
                "the signed method or path is not this request's",
            ));
        }
        let now = now_ms();
        let ts = request.timestamp();
        if ts.abs_diff(now) > REPLAY_WINDOW_MS.max(MAX_CLOCK_SKEW_MS)
            || ts < fed.replay.not_before()
        {
            return Err(refuse(
                "stale_request",
                format!("the request is timestamped {ts}, this server's clock says {now}"),
            ));
        }
        let limit = state.config.limits.max_body_bytes;
        let body = axum::body::to_bytes(body, limit)
            .await
            .map_err(|_| ApiError::too_large("the request body is over the size limit"))?;
        if !request.body_matches(&body) {
            return Err(refuse(
                "bad_signature",
                "the body is not the one that was signed",
            ));
        }
        signed
            .verify_signature()
            .map_err(|e| refuse("bad_signature", e.to_string()))?;
        let keys = fed
            .keys
            .get(&fed.client, &origin, Some(signed.key()), now)
            .await
            .map_err(|e| {
                tracing::info!(%origin, error = %e, "cannot get the origin's keys");
                refuse(
                    "unknown_origin",
                    format!("cannot get {origin}'s server keys: {e}"),
                )
            })?;
        if !keys.is_valid_at(signed.key(), ts) {
            return Err(refuse(
                "bad_signature",
                format!("the signing key is not one of {origin}'s keys"),
            ));
        }
        match fed.replay.check_and_insert(&origin, *request.nonce(), now) {
            Ok(()) => {}
            Err(Replay::Seen) => {
                return Err(refuse(
                    "replayed_request",
                    "this request was received before",
                ));
            }
            Err(Replay::Full) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many federation requests; retry later",
                ));
            }
        }
        Ok(Signed {
            origin,
            body,
            timestamp: ts,
        })
    }
}
