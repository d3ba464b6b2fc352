//! The federation endpoints: what other servers may ask of this one. Every
//! request is signed by its origin ([`Signed`]); answers are JSON like the
//! client API's, and everything in them a caller must trust is a signed
//! object (records, key packages as the devices made them).
//!
//! - `GET /v0/federation/users/{handle}` → `{"records": [b64]}`
//! - `GET /v0/federation/devices/{device}` → `{"record": b64}`
//! - `POST /v0/federation/keypackages/claim` `{"handle"}` → as the client claim
//! - `POST /v0/federation/inbox/{device}` `{"deposit_id": hex16, "envelope": b64}`
//!   → `{"id": n, "duplicate": bool}`

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Signed;
use crate::api::identity::{local_name, sponsored_devices};
use crate::api::inbox::item_json;
use crate::api::keypackages::claim_local;
use crate::api::{ApiPath, b64, parse_device, unb64};
use crate::error::ApiError;
use crate::state::{Shared, now_ms};

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v0/federation/users/{handle}", get(user))
        .route("/v0/federation/devices/{device}", get(device))
        .route("/v0/federation/keypackages/claim", post(claim))
        .route("/v0/federation/inbox/{device}", post(deposit))
        .merge(super::channels::routes())
}

fn json_body<T: serde::de::DeserializeOwned>(signed: &Signed) -> Result<T, ApiError> {
    serde_json::from_slice(&signed.body)
        .map_err(|e| ApiError::bad_request(format!("the body is not the expected JSON: {e}")))
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %handle))]
async fn user(
    State(state): State<Shared>,
    ApiPath(handle): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let name = local_name(&state, &handle)?;
    let devices = sponsored_devices(&state, name).await?;
    if devices.is_empty() {
        return Err(ApiError::not_found(format!(
            "{handle} has no device with a current sponsored record here"
        )));
    }
    let records: Vec<String> = devices.iter().map(|(_, r)| b64(r)).collect();
    Ok(Json(json!({ "records": records })))
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %device))]
async fn device(
    State(state): State<Shared>,
    ApiPath(device): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let device = parse_device(&device)?;
    if let Some(row) = state.db(move |s| s.device(&device)).await? {
        return Ok(Json(json!({ "record": b64(&row.record) })));
    }
    // A removed device's last record, marked, as the client API serves it
    // (§6.4): channels it is still in compute their voters from it.
    let removed = state
        .db(move |s| s.removed_device(&device))
        .await?
        .ok_or_else(|| ApiError::not_found("no such device is registered here"))?;
    Ok(Json(json!({
        "record": b64(&removed.row.record),
        "removed_at": removed.removed_at,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimRequest {
    handle: String,
    #[serde(default)]
    devices: Option<Vec<String>>,
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin))]
async fn claim(State(state): State<Shared>, signed: Signed) -> Result<Json<Value>, ApiError> {
    let req: ClaimRequest = json_body(&signed)?;
    let name = local_name(&state, &req.handle)?;
    let only = crate::api::keypackages::claim_devices(req.devices.as_deref())?;
    claim_local(&state, &req.handle, name, only.as_deref())
        .await
        .map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DepositRequest {
    pub(crate) deposit_id: String,
    pub(crate) envelope: String,
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, recipient = %target))]
async fn deposit(
    State(state): State<Shared>,
    ApiPath(target): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let recipient = parse_device(&target)?;
    let req: DepositRequest = json_body(&signed)?;
    let mut deposit_id = [0u8; 16];
    hex::decode_to_slice(&req.deposit_id, &mut deposit_id)
        .map_err(|_| ApiError::bad_request("`deposit_id` must be 32 hex digits"))?;
    let envelope = unb64("envelope", &req.envelope)?;
    let limit = state.config.limits.max_envelope_bytes;
    if envelope.is_empty() || envelope.len() > limit {
        return Err(ApiError::too_large(format!(
            "the envelope is {} bytes; it must be 1 to {limit}",
            envelope.len()
        )));
    }
    if state.db(move |s| s.device(&recipient)).await?.is_none() {
        return Err(ApiError::not_found("no such device is registered here"));
    }
    if let Err(wait) = state
        .federation
        .deposit_limiter
        .check(signed.origin.clone())
    {
        let mut e = ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("too many inbox deposits from {}; slow down", signed.origin),
        );
        e.retry_after_ms = Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        return Err(e);
    }
    let max_items = state.config.limits.max_inbox_items;
    let received_at = now_ms();
    let origin = signed.origin.clone();
    let (id, event) = state
        .db(move |s| {
            s.deposit_remote_inbox(
                &origin,
                &deposit_id,
                &recipient,
                &envelope,
                received_at,
                max_items,
                &|item| Value::Object(item_json(item)).to_string(),
            )
        })
        .await?;
    let duplicate = event.is_none();
    if let Some(event) = event {
        state.metrics.inbox_deposits.inc();
        state.hub.hand_off(&[(recipient, event)]);
    }
    Ok(Json(json!({ "id": id, "duplicate": duplicate })))
}
