//! Operator commands on a server's data directory (`kithd device ...`),
//! the recovery path when a user has no device left to act from (spec
//! §6.4, "Remove a device").
//!
//! They open the SQLite store directly, and only with the server stopped:
//! a running server holds the data directory's lock file
//! ([`crate::LOCK_FILE`]) and these commands refuse while it does
//! ([`AdminError::ServerRunning`]). A running server keeps state of its own
//! beside the store (the newest event of each log that its live streams
//! rely on, open streams, gauges), which a write from another process
//! would leave wrong.

use std::path::Path;

use kith_proto::{DeviceId, DeviceRecordIn, LocalName, ServerName};

use crate::store::{SqliteStore, Store, StoreError};

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The data directory has no database.
    #[error("no database at {0} (is this the server's data directory?)")]
    NoDatabase(String),
    /// A server is running on the data directory (it holds the lock).
    #[error("kithd is running on {0}; stop it first, then run this again")]
    ServerRunning(String),
    /// The lock file could not be opened.
    #[error("lock file {0}: {1}")]
    Lock(String, #[source] std::io::Error),
    /// No device with this id is registered under this name.
    #[error("no device {device} is registered under the name {name}")]
    NotFound {
        /// The name asked for.
        name: LocalName,
        /// The device asked for.
        device: DeviceId,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One device registered under a name, as `kithd device list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDevice {
    /// The device.
    pub device: DeviceId,
    /// The display name its current record gives.
    pub display_name: String,
    /// When it registered.
    pub registered_at: u64,
}

/// The store of a stopped server, with the data directory's lock, which
/// must be held as long as the store is used.
fn open(data_dir: &Path) -> Result<(SqliteStore, std::fs::File), AdminError> {
    let path = data_dir.join(crate::DB_FILE);
    if !path.exists() {
        return Err(AdminError::NoDatabase(path.display().to_string()));
    }
    let lock_path = || data_dir.join(crate::LOCK_FILE).display().to_string();
    let lock = crate::lock_data_dir(data_dir)
        .map_err(|e| AdminError::Lock(lock_path(), e))?
        .ok_or_else(|| AdminError::ServerRunning(data_dir.display().to_string()))?;
    Ok((SqliteStore::open(&path)?, lock))
}

/// The devices registered under `name` in the server at `data_dir`.
pub fn list_devices(data_dir: &Path, name: &LocalName) -> Result<Vec<ListedDevice>, AdminError> {
    let (store, _lock) = open(data_dir)?;
    Ok(store
        .devices_named(name)?
        .into_iter()
        .map(|row| ListedDevice {
            device: row.device,
            display_name: DeviceRecordIn::decode(&row.record)
                .ok()
                .and_then(|r| r.verify(row.record_at).ok())
                .map(|r| r.display_name().to_owned())
                .unwrap_or_default(),
            registered_at: row.registered_at,
        })
        .collect())
}

/// Removes `device` from `name` in the store, as `DELETE
/// /v0/devices/{device}` does, appending a `device_removed` event to each
/// remaining device of the name in the same transaction. Returns how many
/// devices were told.
pub fn remove_device_in(
    store: &dyn Store,
    name: &LocalName,
    device: &DeviceId,
    now: u64,
) -> Result<usize, AdminError> {
    let not_found = || AdminError::NotFound {
        name: name.clone(),
        device: *device,
    };
    let registered = store.device(device)?.filter(|row| &row.name == name);
    if registered.is_none() {
        return Err(not_found());
    }
    let payload = crate::state::device_removed_payload(device, None, now);
    let (_, told) = store
        .remove_device(device, None, now, &payload)?
        .ok_or_else(not_found)?;
    Ok(told.len())
}

/// Frees `name` at the server at `data_dir` once every device of it was
/// removed, so that the user can register a new device under it (the
/// registration mode applies: it is a new account). Returns `false` if a
/// device still holds the name or it was never taken.
pub fn release_name(data_dir: &Path, name: &LocalName) -> Result<bool, AdminError> {
    let (store, _lock) = open(data_dir)?;
    Ok(store.release_name(name)?)
}

/// Forgets every record the server at `data_dir` cached from `server`
/// (spec §12.2; removal marks are kept), as if it had never looked that
/// server's users up: its lookups fetch them again, and while `server` is
/// unreachable they answer 502 `remote_unavailable` instead of the cached
/// copies. Returns how many records it forgot.
pub fn forget_remote_records(data_dir: &Path, server: &ServerName) -> Result<usize, AdminError> {
    let (store, _lock) = open(data_dir)?;
    Ok(store.forget_remote_records(server)?)
}

/// [`remove_device_in`] on the server at `data_dir`.
pub fn remove_device(
    data_dir: &Path,
    name: &LocalName,
    device: &DeviceId,
) -> Result<usize, AdminError> {
    let (store, _lock) = open(data_dir)?;
    remove_device_in(&store, name, device, crate::state::now_ms())
}
