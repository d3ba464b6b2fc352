//! Remote identity for the client API: users, devices and key packages of
//! other servers, fetched over federation, verified and cached.
//!
//! A record fetched from server `S` is accepted only if it verifies (§5.5),
//! carries a sponsorship by `S` (for the asked handle, when a handle was
//! asked), and that sponsorship's key is one `S` publishes as valid at its
//! issue time (`Sponsorship::check_server_keys`). The cache then applies
//! the update rule (§5.6): a newer sequence replaces the cached record; an
//! older one or an equivocation is refused and the cached record served.

use kith_proto::{DeviceId, DeviceRecord, DeviceRecordIn, Handle, RecordUpdate, ServerName};
use serde::Deserialize;
use serde_json::{Value, json};

use super::blocked;
use crate::api::{b64, unb64};
use crate::error::ApiError;
use crate::state::{Shared, now_ms};
use crate::store::RemoteRecord;

/// Refuses a blocked server with 403 `blocked`.
pub(crate) fn not_blocked(state: &Shared, server: &ServerName) -> Result<(), ApiError> {
    if state.federation.client.is_blocked(server) {
        return Err(blocked(format!("{server} is blocked by this server")));
    }
    Ok(())
}

fn bad_remote(server: &ServerName, why: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_GATEWAY,
        "remote_unavailable",
        format!("{server} sent an invalid answer: {why}"),
    )
}

/// Verifies a record `server` sent and merges it into the cache. Returns
/// the record to serve (the cached one if the offered one loses the update
/// rule), or why it was refused.
async fn accept_record(
    state: &Shared,
    server: &ServerName,
    bytes: &[u8],
    handle: Option<&Handle>,
    device: Option<DeviceId>,
) -> Result<DeviceRecord, String> {
    let now = now_ms();
    let record = DeviceRecordIn::decode(bytes)
        .map_err(|e| e.to_string())?
        .verify(now)
        .map_err(|e| e.to_string())?;
    if let Some(device) = device
        && record.device_id() != device
    {
        return Err(format!("a record of {} for {device}", record.device_id()));
    }
    let sponsorship = record
        .sponsorships()
        .iter()
        .find(|s| s.server() == server && handle.is_none_or(|h| &s.handle() == h))
        .ok_or_else(|| format!("a record without {server}'s sponsorship"))?
        .clone();
    let fed = &state.federation;
    let keys = fed
        .keys
        .get(&fed.client, server, Some(sponsorship.server_key()), now)
        .await
        .map_err(|e| e.to_string())?;
    sponsorship
        .check_server_keys(&keys)
        .map_err(|e| e.to_string())?;
    let id = record.device_id();
    // This server is the authority on its own devices: a record another
    // server sends for one registered or removed here is not cached (it
    // would never be read, and must not stand in for a removal).
    let local = state
        .db(move |s| Ok(s.device(&id)?.is_some() || s.removed_device(&id)?.is_some()))
        .await
        .map_err(|e| e.message)?;
    if local {
        return Err(format!("a record of {id}, a device of this server"));
    }
    let held = state.db(move |s| s.remote_record(&id)).await;
    let held = match held {
        Ok(h) => h,
        Err(e) => return Err(e.message),
    };
    let held_record = held.as_ref().and_then(|h| {
        DeviceRecordIn::decode(&h.record)
            .ok()
            .and_then(|r| r.verify(h.fetched_at).ok())
    });
    if let Some(held_record) = held_record {
        match record.supersedes(&held_record) {
            Ok(RecordUpdate::Newer) => {}
            Ok(RecordUpdate::Unchanged) => return Ok(record),
            Err(e) => {
                tracing::warn!(%server, device = %id, error = %e, "refused a remote record; serving the cached one");
                return Ok(held_record);
            }
        }
    }
    let row = RemoteRecord {
        device: id,
        server: server.clone(),
        record: record.encode(),
        fetched_at: now,
    };
    state
        .db(move |s| s.put_remote_record(&row))
        .await
        .map_err(|e| e.message)?;
    Ok(record)
}

#[derive(Deserialize)]
struct RecordsAnswer {
    records: Vec<String>,
}

#[derive(Deserialize)]
struct RecordAnswer {
    record: String,
    /// Set when the device was removed from its server (§6.4).
    #[serde(default)]
    removed_at: Option<u64>,
}

/// The current records of `handle`, a user of another server, fetched from
/// it and verified. Records that fail verification are dropped (and
/// logged); 404 if none is left.
#[tracing::instrument(skip_all, fields(%handle))]
pub(crate) async fn user_records(
    state: &Shared,
    handle: &Handle,
) -> Result<Vec<DeviceRecord>, ApiError> {
    let server = handle.server();
    not_blocked(state, server)?;
    let path = format!("/v0/federation/users/{handle}");
    let answer = match state
        .federation
        .client
        .get(server, &path)
        .await
        .map_err(ApiError::from)
    {
        Ok(answer) => answer,
        // The server is down: the records cached from it still tell who
        // the user's devices are (deposits to them wait in the outbox).
        Err(e) if e.code == "remote_unavailable" => {
            let cached = cached_user_records(state, handle).await?;
            if cached.is_empty() {
                return Err(e);
            }
            tracing::info!(%handle, error = %e.message, "serving cached remote records");
            return Ok(cached);
        }
        Err(e) => return Err(e),
    };
    let answer: RecordsAnswer =
        serde_json::from_slice(&answer.body).map_err(|e| bad_remote(server, e))?;
    let mut records = Vec::new();
    for text in answer
        .records
        .iter()
        .take(state.config.limits.max_list_items)
    {
        let bytes = match unb64("records", text) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%server, error = %e.message, "dropped a remote record");
                continue;
            }
        };
        match accept_record(state, server, &bytes, Some(handle), None).await {
            Ok(record) => records.push(record),
            Err(why) => tracing::warn!(%server, %why, "dropped a remote record"),
        }
    }
    if records.is_empty() {
        return Err(ApiError::not_found(format!(
            "{handle} has no device with a valid record"
        )));
    }
    Ok(records)
}

/// The cached records of `handle`'s devices that still verify now, but
/// those the server said it removed (§12.2).
async fn cached_user_records(
    state: &Shared,
    handle: &Handle,
) -> Result<Vec<DeviceRecord>, ApiError> {
    let server = handle.server().clone();
    let rows = state
        .db(move |s| {
            let mut kept = Vec::new();
            for row in s.remote_records_from(&server)? {
                if s.remote_removed(&row.device)?.is_none() {
                    kept.push(row);
                }
            }
            Ok(kept)
        })
        .await?;
    let now = crate::state::now_ms();
    Ok(rows
        .iter()
        .filter_map(|row| DeviceRecordIn::decode(&row.record).ok()?.verify(now).ok())
        .filter(|record| record.handles().any(|h| &h == handle))
        .collect())
}

/// The record of `device`, not registered here: refreshed from the server
/// it was cached from (or `server`, if given); the cached record if that
/// server cannot be reached. With it, when that server removed the device
/// (§6.4): the time it did, as it said then or earlier (kept as a mark in
/// the cache, so that cached lookups leave the device out).
///
/// 404 only when the device's server says it has no such device, or when
/// nothing here names the device at all; a member of a channel here whose
/// record this server does not hold (and whose server it cannot name) is
/// 502 `remote_unavailable`: the device exists, this server could not ask.
pub(crate) async fn device_record(
    state: &Shared,
    device: DeviceId,
    server: Option<ServerName>,
) -> Result<(Vec<u8>, Option<u64>), ApiError> {
    let cached = state.db(move |s| s.remote_record(&device)).await?;
    let Some(server) = server.or_else(|| cached.as_ref().map(|c| c.server.clone())) else {
        let member = state
            .db(move |s| Ok(!s.channels_of(&device)?.is_empty()))
            .await?;
        if member {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "remote_unavailable",
                format!(
                    "device {device} is a member of a channel here, but this server holds no \
                     record of it and knows no server to ask (name its server with ?server=)"
                ),
            ));
        }
        return Err(ApiError::not_found(
            "no such device is registered or known here (name its server with ?server=)",
        ));
    };
    not_blocked(state, &server)?;
    let path = format!("/v0/federation/devices/{device}");
    let fetched = async {
        let answer = state.federation.client.get(&server, &path).await?;
        let answer: RecordAnswer =
            serde_json::from_slice(&answer.body).map_err(|e| bad_remote(&server, e))?;
        let bytes = unb64("record", &answer.record)?;
        let record = accept_record(state, &server, &bytes, None, Some(device))
            .await
            .map_err(|why| bad_remote(&server, why))?;
        if let Some(at) = answer.removed_at {
            state
                .db(move |s| s.mark_remote_removed(&device, at))
                .await?;
        }
        Ok::<_, ApiError>(record)
    }
    .await;
    let record = match (fetched, cached) {
        (Ok(record), _) => record.encode(),
        (Err(e), Some(cached)) if e.code == "remote_unavailable" => {
            tracing::info!(%device, error = %e.message, "serving a cached remote record");
            cached.record
        }
        (Err(e), _) => return Err(e),
    };
    let removed_at = state.db(move |s| s.remote_removed(&device)).await?;
    Ok((record, removed_at))
}

#[derive(Deserialize)]
struct ClaimAnswer {
    packages: Vec<ClaimedPackage>,
    #[serde(default)]
    exhausted: Vec<String>,
}

#[derive(Deserialize)]
struct ClaimedPackage {
    device: String,
    package: String,
    #[serde(default)]
    last_resort: bool,
}

/// Claims one key package per device of `handle`, a user of another server.
/// Only packages for devices whose records verify (and that server
/// sponsors under the handle) are passed on.
#[tracing::instrument(skip_all, fields(%handle))]
pub(crate) async fn claim(
    state: &Shared,
    handle: &Handle,
    only: Option<&[DeviceId]>,
) -> Result<Value, ApiError> {
    let server = handle.server();
    let records = user_records(state, handle).await?;
    let body = match only {
        Some(only) => {
            let devices: Vec<String> = only.iter().map(ToString::to_string).collect();
            json!({ "handle": handle.to_string(), "devices": devices })
        }
        None => json!({ "handle": handle.to_string() }),
    }
    .to_string()
    .into_bytes();
    let answer = state
        .federation
        .client
        .post(server, "/v0/federation/keypackages/claim", body)
        .await?;
    let answer: ClaimAnswer =
        serde_json::from_slice(&answer.body).map_err(|e| bad_remote(server, e))?;
    let max = state.config.limits.max_key_package_bytes;
    let listed = |d: &DeviceId| {
        records.iter().any(|r| &r.device_id() == d) && only.is_none_or(|o| o.contains(d))
    };
    let mut packages = Vec::new();
    for p in answer.packages {
        let Ok(device) = p.device.parse::<DeviceId>() else {
            continue;
        };
        let Ok(bytes) = unb64("package", &p.package) else {
            continue;
        };
        if listed(&device) && !bytes.is_empty() && bytes.len() <= max {
            packages.push(json!({
                "device": device.to_string(), "package": b64(&bytes), "last_resort": p.last_resort,
            }));
        }
    }
    let exhausted: Vec<String> = answer
        .exhausted
        .iter()
        .filter_map(|d| d.parse::<DeviceId>().ok())
        .filter(|d| listed(d))
        .map(|d| d.to_string())
        .collect();
    Ok(json!({ "packages": packages, "exhausted": exhausted }))
}

/// The inbox server of a remote device (the first sponsorship of its cached
/// record, spec §8), or `None` if the device is not known here.
pub(crate) async fn inbox_server(
    state: &Shared,
    device: DeviceId,
) -> Result<Option<ServerName>, ApiError> {
    let Some(cached) = state.db(move |s| s.remote_record(&device)).await? else {
        return Ok(None);
    };
    let server = DeviceRecordIn::decode(&cached.record)
        .ok()
        .and_then(|r| r.verify(cached.fetched_at).ok())
        .and_then(|r| r.sponsorships().first().map(|s| s.server().clone()));
    Ok(server)
}

/// Why `device` may not be added to a local channel, if it may not: it is
/// sponsored only by blocked servers (by its local or cached record). When
/// any server is blocked, a remote device this server has never fetched is
/// refused too, since its sponsors cannot be known (clients add remote
/// devices after claiming their key packages through their own server,
/// which caches the records).
pub(crate) fn refuse_added_device(
    store: &dyn crate::store::Store,
    blocked: &std::collections::BTreeSet<ServerName>,
    device: &DeviceId,
) -> Result<Option<String>, crate::store::StoreError> {
    if blocked.is_empty() || store.device(device)?.is_some() {
        return Ok(None);
    }
    let Some(cached) = store.remote_record(device)? else {
        return Ok(Some(format!(
            "device {device} is not known here; fetch its user through this server first"
        )));
    };
    let servers: Vec<ServerName> = DeviceRecordIn::decode(&cached.record)
        .ok()
        .and_then(|r| r.verify(cached.fetched_at).ok())
        .map(|r| {
            r.sponsorships()
                .iter()
                .map(|s| s.server().clone())
                .collect()
        })
        .unwrap_or_else(|| vec![cached.server.clone()]);
    if servers.iter().all(|s| blocked.contains(s)) {
        return Ok(Some(format!(
            "device {device} is sponsored only by servers this server blocks"
        )));
    }
    Ok(None)
}
