//! Key packages: devices upload batches plus one last-resort package; others
//! claim one per device of a user. The server treats packages as opaque
//! bytes (checking them is kith-mls's job, once it exists).

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use kith_proto::{DeviceId, LocalName};

use super::identity::{parse_handle, sponsored_devices};
use super::{ApiJson, Authed, b64, unb64};
use crate::error::ApiError;
use crate::state::Shared;
use crate::store::Claimed;

/// Below this many ordinary packages, a claim tells the device to refill
/// (a `key_packages_low` event).
const LOW_WATER: usize = 10;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v0/keypackages", post(upload))
        .route("/v0/keypackages/count", get(count))
        .route("/v0/keypackages/claim", post(claim))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadRequest {
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    last_resort: Option<String>,
}

fn package(state: &Shared, field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let bytes = unb64(field, text)?;
    let limit = state.config.limits.max_key_package_bytes;
    if bytes.is_empty() {
        return Err(ApiError::bad_request(format!("`{field}` is empty")));
    }
    if bytes.len() > limit {
        return Err(ApiError::too_large(format!(
            "`{field}` is {} bytes; a key package may be at most {limit}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

async fn upload(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiJson(req): ApiJson<UploadRequest>,
) -> Result<Json<Value>, ApiError> {
    let max = state.config.limits.max_key_packages_per_upload;
    if req.packages.len() > max {
        return Err(ApiError::too_large(format!(
            "{} packages in one upload; the limit is {max}",
            req.packages.len()
        )));
    }
    let packages = req
        .packages
        .iter()
        .map(|p| package(&state, "packages", p))
        .collect::<Result<Vec<_>, _>>()?;
    let last_resort = req
        .last_resort
        .as_deref()
        .map(|p| package(&state, "last_resort", p))
        .transpose()?;
    let stored = packages.len() + usize::from(last_resort.is_some());
    let max_stored = state.config.limits.max_key_packages_stored;
    let available = state
        .db(move |s| s.add_key_packages(&device, &packages, last_resort.as_deref(), max_stored))
        .await?;
    Ok(Json(json!({ "stored": stored, "available": available })))
}

async fn count(
    State(state): State<Shared>,
    Authed(device): Authed,
) -> Result<Json<Value>, ApiError> {
    let (available, last_resort) = state.db(move |s| s.key_package_count(&device)).await?;
    Ok(Json(
        json!({ "available": available, "last_resort": last_resort }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimRequest {
    handle: String,
    /// Only these devices of the user (hex ids; local handles only).
    #[serde(default)]
    devices: Option<Vec<String>>,
}

async fn claim(
    State(state): State<Shared>,
    Authed(_claimer): Authed,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<Value>, ApiError> {
    let handle = parse_handle(&req.handle)?;
    let only = claim_devices(req.devices.as_deref())?;
    if handle.server() != &state.config.server_name {
        return crate::federation::remote::claim(&state, &handle, only.as_deref())
            .await
            .map(Json);
    }
    claim_local(&state, &req.handle, handle.name().clone(), only.as_deref())
        .await
        .map(Json)
}

/// Parses a claim's `devices` (spec §6.5): 1 to 33 device ids, if given.
pub(crate) fn claim_devices(list: Option<&[String]>) -> Result<Option<Vec<DeviceId>>, ApiError> {
    let Some(list) = list else {
        return Ok(None);
    };
    let most = kith_proto::record::MAX_LINKS + 1;
    if list.is_empty() || list.len() > most {
        return Err(ApiError::bad_request(format!(
            "`devices` lists 1 to {most} devices"
        )));
    }
    list.iter()
        .map(|d| {
            d.parse::<DeviceId>()
                .map_err(|e| ApiError::bad_request(format!("`devices`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Claims one package per device of the local user `name` (spec §6.5), or
/// per device of `only` among them, for a client here or another server.
pub(crate) async fn claim_local(
    state: &Shared,
    handle: &str,
    name: LocalName,
    only: Option<&[DeviceId]>,
) -> Result<Value, ApiError> {
    let mut devices = sponsored_devices(state, name).await?;
    if let Some(only) = only {
        devices.retain(|(d, _)| only.contains(d));
    }
    if devices.is_empty() {
        return Err(ApiError::not_found(format!(
            "{handle} has no device with a current sponsored record here"
        )));
    }
    let ids: Vec<_> = devices.into_iter().map(|(d, _)| d).collect();
    let claimed = state
        .db(move |s| {
            ids.into_iter()
                .map(|d| {
                    let claimed = s.claim_key_package(&d)?;
                    Ok((d, claimed, s.key_package_count(&d)?.0))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    let mut packages = Vec::new();
    let mut exhausted = Vec::new();
    for (device, outcome, remaining) in claimed {
        match outcome {
            Claimed::Package(p) => {
                packages.push(json!({
                    "device": device.to_string(), "package": b64(&p), "last_resort": false,
                }));
                if remaining < LOW_WATER {
                    let mut payload = serde_json::Map::new();
                    payload.insert("remaining".into(), remaining.into());
                    if let Err(e) = state
                        .append_event(device, "key_packages_low", payload)
                        .await
                    {
                        tracing::warn!(%device, error = %e.message, "could not queue key_packages_low");
                    }
                }
            }
            Claimed::LastResort(p) => packages.push(json!({
                "device": device.to_string(), "package": b64(&p), "last_resort": true,
            })),
            Claimed::Exhausted => exhausted.push(device.to_string()),
        }
    }
    Ok(json!({ "packages": packages, "exhausted": exhausted }))
}
