//! Server info, registration, login, and the device directory.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use kith_proto::{
    DeviceId, DeviceRecord, DeviceRecordIn, Handle, LocalName, LoginChallenge, RecordUpdate,
    RecordUpdateError, ServerName, SignaturePublicKey, Sponsorship,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiJson, ApiPath, Authed, b64, parse_device, random_32, token_hash, unb64};
use crate::config::Registration;
use crate::error::ApiError;
use crate::federation::remote;
use crate::state::{Shared, now_ms};
use crate::store::{DeviceRow, Registered};

/// How long a sponsorship issued at registration is valid: one year.
/// How long a login challenge may be answered: five minutes.
const CHALLENGE_MS: u64 = 5 * 60 * 1000;
/// How many unanswered challenges one device may have.
const CHALLENGES_PER_DEVICE: usize = 16;
/// How long a session lasts: 30 days.
const SESSION_MS: u64 = 30 * 24 * 3600 * 1000;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v0/server", get(server_info))
        .route("/.well-known/kith/server-keys", get(server_keys))
        .route("/v0/register", post(register))
        .route("/v0/login/challenge", post(login_challenge))
        .route("/v0/login", post(login))
        .route("/v0/devices/self", put(put_record))
        .route("/v0/devices/self/sponsorship", post(renew_sponsorship))
        .route(
            "/v0/devices/{device}",
            get(get_device).delete(remove_device),
        )
        .route("/v0/users/{handle}", get(get_user))
}

async fn server_info(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "name": state.config.server_name.as_str(),
        "version": 0,
        "server_keys": b64(&state.server_keys),
        "registration": state.config.registration.mode(),
    }))
}

async fn server_keys(State(state): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        state.server_keys.clone(),
    )
}

/// Decodes and verifies a record from a base64 field.
fn verified_record(field: &str, text: &str, now: u64) -> Result<DeviceRecord, ApiError> {
    let bytes = unb64(field, text)?;
    let record = DeviceRecordIn::decode(&bytes)
        .map_err(|e| ApiError::bad_request(format!("`{field}`: {e}")))?;
    record
        .verify(now)
        .map_err(|e| ApiError::invalid(format!("`{field}`: {e}")))
}

fn raw_identity_key(record: &DeviceRecord) -> Result<[u8; 32], ApiError> {
    record
        .identity_key()
        .key_bytes()
        .try_into()
        .map_err(|_| ApiError::invalid("identity key is not an Ed25519 key"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    record: String,
    name: String,
    #[serde(default)]
    token: Option<String>,
}

#[tracing::instrument(skip_all, fields(name = %req.name))]
async fn register(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Json<Value>, ApiError> {
    let name: LocalName = req
        .name
        .parse()
        .map_err(|e| ApiError::bad_request(format!("`name`: {e}")))?;
    let now = now_ms();
    let record = verified_record("record", &req.record, now)?;
    let device = record.device_id();
    if state
        .db(move |s| s.removed_device(&device))
        .await?
        .is_some()
    {
        return Err(crate::store::StoreError::DeviceRemoved(device).into());
    }
    // A device that one of the name's devices links joins that user: it is
    // not a new account, so the registration mode does not apply (§6.3).
    let linked = sponsored_devices(&state, name.clone())
        .await?
        .iter()
        .filter_map(|(_, bytes)| DeviceRecordIn::decode(bytes).ok())
        .filter_map(|r| r.verify(now).ok())
        .any(|r| r.links_to(&device));
    if !linked {
        // Someone else's name: say so whatever the mode, so a device of
        // that user learns it must be linked first.
        let holders = state
            .db({
                let name = name.clone();
                move |s| s.devices_named(&name)
            })
            .await?;
        if holders.iter().any(|row| row.device != device) {
            return Err(crate::store::StoreError::NameTaken(name).into());
        }
        match &state.config.registration {
            Registration::Open => {}
            Registration::Closed => return Err(ApiError::forbidden("registration is closed")),
            Registration::Token(expected) => {
                // Compare hashes so the comparison's timing says nothing useful.
                let offered = req.token.as_deref().map(token_hash);
                if offered != Some(token_hash(expected)) {
                    return Err(ApiError::forbidden(
                        "registration needs a valid registration token",
                    ));
                }
            }
        }
    }
    let row = DeviceRow {
        device,
        name: name.clone(),
        identity_key: raw_identity_key(&record)?,
        record: record.encode(),
        record_at: now,
        registered_at: now,
    };
    let outcome = if linked {
        state.db(move |s| s.register_linked(&row)).await?
    } else {
        state.db(move |s| s.register(&row)).await?
    };
    if outcome == Registered::New {
        state.metrics.registered_devices.inc();
        tracing::info!(%device, "registered a device");
    }
    let sponsorship = Sponsorship::issue(
        &state.key,
        state.config.server_name.clone(),
        name,
        device,
        now,
        now.saturating_add(state.config.limits.sponsorship_ms),
    );
    Ok(Json(json!({
        "handle": sponsorship.handle().to_string(),
        "sponsorship": b64(&sponsorship.encode()),
    })))
}

/// `POST /v0/devices/self/sponsorship`: a fresh sponsorship of the logged-in
/// device under its name, for the device to put into a new version of its
/// record before the old sponsorship expires.
#[tracing::instrument(skip_all, fields(device = %device))]
async fn renew_sponsorship(
    State(state): State<Shared>,
    Authed(device): Authed,
) -> Result<Json<Value>, ApiError> {
    let row = state
        .db(move |s| s.device(&device))
        .await?
        .ok_or_else(|| ApiError::unauthorized("the device is not registered here"))?;
    let now = now_ms();
    let sponsorship = Sponsorship::issue(
        &state.key,
        state.config.server_name.clone(),
        row.name.clone(),
        device,
        now,
        now.saturating_add(state.config.limits.sponsorship_ms),
    );
    // Looked up again after issuing: if the device is still registered
    // under its name now, any removal comes after the issue, and a removed
    // device never receives a sponsorship issued after its removal.
    let still = state.db(move |s| s.device(&device)).await?;
    if still.is_none_or(|r| r.name != row.name) {
        return Err(ApiError::unauthorized("the device is not registered here"));
    }
    Ok(Json(json!({
        "handle": sponsorship.handle().to_string(),
        "sponsorship": b64(&sponsorship.encode()),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChallengeRequest {
    device: String,
}

async fn login_challenge(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<ChallengeRequest>,
) -> Result<Json<Value>, ApiError> {
    let device = parse_device(&req.device)?;
    if state.db(move |s| s.device(&device)).await?.is_none() {
        // Say why to a removed device's user: it will never log in again.
        if let Some(removed) = state.db(move |s| s.removed_device(&device)).await? {
            return Err(ApiError::not_found(format!(
                "this device was removed from {}@{}; register a new device",
                removed.row.name, state.config.server_name
            )));
        }
        return Err(ApiError::not_found("no such device is registered here"));
    }
    let challenge = random_32();
    let now = now_ms();
    let expires_at = now.saturating_add(CHALLENGE_MS);
    state
        .db(move |s| s.put_challenge(&device, &challenge, expires_at, now, CHALLENGES_PER_DEVICE))
        .await?;
    Ok(Json(json!({
        "challenge": b64(&challenge),
        "expires_at": expires_at,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    device: String,
    challenge: String,
    signature: String,
}

#[tracing::instrument(skip_all, fields(device = %req.device))]
async fn login(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Json<Value>, ApiError> {
    let device = parse_device(&req.device)?;
    let challenge: [u8; 32] = unb64("challenge", &req.challenge)?
        .try_into()
        .map_err(|_| ApiError::bad_request("`challenge` must be 32 bytes"))?;
    let signature = unb64("signature", &req.signature)?;
    // Taking the challenge uses it up, whether or not the answer is right.
    let expires_at = state
        .db(move |s| s.take_challenge(&device, &challenge))
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown or already used challenge"))?;
    let now = now_ms();
    if expires_at <= now {
        return Err(ApiError::unauthorized("the challenge has expired"));
    }
    let row = state
        .db(move |s| s.device(&device))
        .await?
        .ok_or_else(|| ApiError::unauthorized("no such device is registered here"))?;
    let key = SignaturePublicKey::ed25519(row.identity_key);
    LoginChallenge::new(
        state.config.server_name.clone(),
        device,
        challenge,
        expires_at,
    )
    .verify(&key, &signature)
    .map_err(|e| ApiError::unauthorized(format!("login answer: {e}")))?;
    let token = b64(&random_32());
    let hash = token_hash(&token);
    let session_expires = now.saturating_add(SESSION_MS);
    // The store refuses if the device was removed since it was looked up.
    let stored = state
        .db(
            move |s| match s.put_session(&hash, &device, session_expires) {
                Err(crate::store::StoreError::UnknownDevice(_)) => Ok(false),
                result => result.map(|()| true),
            },
        )
        .await?;
    if !stored {
        return Err(ApiError::unauthorized("no such device is registered here"));
    }
    tracing::info!("device logged in");
    Ok(Json(json!({
        "token": token,
        "handle": Handle::new(row.name, state.config.server_name.clone()).to_string(),
        "expires_at": session_expires,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordBody {
    record: String,
}

#[tracing::instrument(skip_all, fields(device = %device))]
async fn put_record(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiJson(req): ApiJson<RecordBody>,
) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let offered = verified_record("record", &req.record, now)?;
    if offered.device_id() != device {
        return Err(ApiError::forbidden(
            "the record is for another device than the one logged in",
        ));
    }
    let row = state
        .db(move |s| s.device(&device))
        .await?
        .ok_or_else(|| ApiError::unauthorized("the device is not registered here"))?;
    let ours = offered.sponsorships().iter().any(|s| {
        s.server() == &state.config.server_name
            && s.server_key() == &state.key.public()
            && s.handle().name() == &row.name
    });
    if !ours {
        return Err(ApiError::forbidden(format!(
            "the record must carry this server's sponsorship of {}@{}",
            row.name, state.config.server_name
        )));
    }
    // The held record verified when it was accepted, so it verifies at that
    // time again, even if its sponsorship has expired since.
    let held = DeviceRecordIn::decode(&row.record)
        .ok()
        .and_then(|r| r.verify(row.record_at).ok())
        .ok_or_else(|| ApiError::internal("the stored record does not verify"))?;
    let result = match offered.supersedes(&held) {
        Ok(RecordUpdate::Unchanged) => "unchanged",
        Ok(RecordUpdate::Newer) => {
            let (expected, new) = (row.record, offered.encode());
            let replaced = state
                .db(move |s| s.replace_record(&device, &expected, &new, now))
                .await?;
            if !replaced {
                return Err(ApiError::conflict(
                    "conflict",
                    "the record changed while this update was checked; retry",
                ));
            }
            tracing::info!(sequence = offered.sequence(), "record updated");
            tell_linked_devices(&state, &offered).await;
            "newer"
        }
        Err(e @ RecordUpdateError::SequenceWentBackwards { .. }) => {
            return Err(ApiError::conflict("sequence_went_backwards", e.to_string()));
        }
        Err(e @ RecordUpdateError::Equivocation { .. }) => {
            tracing::warn!(error = %e, "device equivocated");
            return Err(ApiError::conflict("equivocation", e.to_string()));
        }
        Err(e @ RecordUpdateError::DifferentDevice { .. }) => {
            return Err(ApiError::forbidden(e.to_string()));
        }
    };
    Ok(Json(json!({ "result": result })))
}

/// `DELETE /v0/devices/{device}` (spec §6.4): another device registered
/// under the same name removes `device` from it, for a lost or stolen
/// device. Atomically, the device is no longer registered (not listed for
/// the name, cannot log in), its sessions, key packages, inbox and events
/// are gone; then its open event streams close and every remaining device
/// of the name gets a `device_removed` event.
#[tracing::instrument(skip_all, fields(by = %caller))]
async fn remove_device(
    State(state): State<Shared>,
    Authed(caller): Authed,
    ApiPath(device): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let device = parse_device(&device)?;
    if device == caller {
        return Err(ApiError::bad_request(
            "a device cannot remove itself; remove it from another device of the user",
        ));
    }
    let me = state
        .db(move |s| s.device(&caller))
        .await?
        .ok_or_else(|| ApiError::unauthorized("the device is not registered here"))?;
    let target = state
        .db(move |s| s.device(&device))
        .await?
        .ok_or_else(|| ApiError::not_found("no such device is registered here"))?;
    if target.name != me.name {
        return Err(ApiError::forbidden(
            "only a device registered under the same name may remove a device",
        ));
    }
    let removed = removed_device_effects(&state, device, Some(caller)).await?;
    if !removed {
        // Removed by a concurrent request since it was looked up.
        return Err(ApiError::not_found("no such device is registered here"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Removes `device` in the store, which appends `device_removed` (with
/// `by` when a device removed it) to the remaining devices of its name in
/// the same transaction, then closes its event streams and hands the
/// events to the live streams. Returns whether the device was registered.
pub(crate) async fn removed_device_effects(
    state: &Shared,
    device: DeviceId,
    by: Option<DeviceId>,
) -> Result<bool, ApiError> {
    let now = now_ms();
    let payload = crate::state::device_removed_payload(&device, by.as_ref(), now);
    let Some((row, events)) = state
        .db(move |s| s.remove_device(&device, by.as_ref(), now, &payload))
        .await?
    else {
        return Ok(false);
    };
    state.hub.close(&device);
    state.hub.hand_off(&events);
    state.metrics.registered_devices.dec();
    tracing::info!(%device, name = %row.name, told = events.len(), "removed a device");
    Ok(true)
}

/// Appends a `record_update` event for each local device that is mutually
/// linked with `record`'s device (one user), so its other devices learn of
/// the new version. A failure here is logged: the record is already stored.
async fn tell_linked_devices(state: &Shared, record: &DeviceRecord) {
    let me = record.device_id();
    for linked in record.links() {
        let result = async {
            let Some(row) = state.db(move |s| s.device(&linked)).await? else {
                return Ok(());
            };
            let links_back = DeviceRecordIn::decode(&row.record)
                .ok()
                .and_then(|r| r.verify(row.record_at).ok())
                .is_some_and(|r| r.links_to(&me));
            if links_back {
                let mut payload = serde_json::Map::new();
                payload.insert("device".into(), me.to_string().into());
                payload.insert("record".into(), b64(&record.encode()).into());
                state.append_event(linked, "record_update", payload).await?;
            }
            Ok::<(), ApiError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(%linked, error = %e.message, "could not queue record_update");
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceQuery {
    server: Option<String>,
}

/// A device registered here, or else one of another server: the one it was
/// cached from, or `?server=NAME`.
async fn get_device(
    State(state): State<Shared>,
    ApiPath(device): ApiPath<String>,
    query: Result<Query<DeviceQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let device = parse_device(&device)?;
    if let Some(row) = state.db(move |s| s.device(&device)).await? {
        return Ok(Json(json!({ "record": b64(&row.record) })));
    }
    // A removed device's last record is still served (the channels it is
    // a member of until a commit removes it need it to compute their
    // voters), marked as removed.
    if let Some(removed) = state.db(move |s| s.removed_device(&device)).await? {
        return Ok(Json(json!({
            "record": b64(&removed.row.record),
            "removed_at": removed.removed_at,
        })));
    }
    let server = query
        .server
        .map(|s| {
            s.parse::<ServerName>()
                .map_err(|e| ApiError::bad_request(format!("`server` {s:?}: {e}")))
        })
        .transpose()?;
    if server.as_ref() == Some(&state.config.server_name) {
        return Err(ApiError::not_found("no such device is registered here"));
    }
    let (record, removed_at) = remote::device_record(&state, device, server).await?;
    Ok(Json(match removed_at {
        Some(at) => json!({ "record": b64(&record), "removed_at": at }),
        None => json!({ "record": b64(&record) }),
    }))
}

/// Parses a handle (400 `bad_request` if it is not one).
pub(crate) fn parse_handle(handle: &str) -> Result<Handle, ApiError> {
    handle
        .parse()
        .map_err(|e| ApiError::bad_request(format!("{handle:?} is not a handle: {e}")))
}

/// The local name a handle names on this server.
pub(crate) fn local_name(state: &Shared, handle: &str) -> Result<LocalName, ApiError> {
    let handle = parse_handle(handle)?;
    if handle.server() != &state.config.server_name {
        return Err(ApiError::not_found(format!(
            "{handle} is not a user of this server ({})",
            state.config.server_name
        )));
    }
    Ok(handle.name().clone())
}

/// The devices registered under `name` whose current record is valid now
/// and carries this server's sponsorship under that name.
pub(crate) async fn sponsored_devices(
    state: &Shared,
    name: LocalName,
) -> Result<Vec<(DeviceId, Vec<u8>)>, ApiError> {
    let rows = state
        .db({
            let name = name.clone();
            move |s| s.devices_named(&name)
        })
        .await?;
    let handle = Handle::new(name, state.config.server_name.clone());
    let now = now_ms();
    Ok(rows
        .into_iter()
        .filter(|row| {
            DeviceRecordIn::decode(&row.record)
                .ok()
                .and_then(|r| r.verify(now).ok())
                .is_some_and(|r| r.handles().any(|h| h == handle))
        })
        .map(|row| (row.device, row.record))
        .collect())
}

async fn get_user(
    State(state): State<Shared>,
    ApiPath(handle): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let parsed = parse_handle(&handle)?;
    if parsed.server() != &state.config.server_name {
        let records = remote::user_records(&state, &parsed).await?;
        let records: Vec<String> = records.iter().map(|r| b64(&r.encode())).collect();
        return Ok(Json(json!({ "records": records })));
    }
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
