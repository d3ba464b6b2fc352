//! The Kith homeserver: registration and login of devices, the directory of
//! the device records it sponsors, key packages, device inboxes and the
//! per-device event stream, and channels (MLS groups whose commits it
//! orders and certifies, and whose messages it stores and fans out), over an
//! HTTP + WebSocket client API (`/v0`).
//! The `kithd` binary wraps [`run`].
//!
//! The server starts from a function taking a bound listener, a [`Config`]
//! and a shutdown future, so tests run several servers in one process on
//! port 0:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let mut config = kith_server::Config::new("localhost:8448".parse()?, dir.path());
//! config.registration = kith_server::Registration::Open;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(kith_server::run(listener, config, async {
//!     let _ = stopped.await;
//! }));
//! // ... talk to it over HTTP ...
//! let _ = stop.send(());
//! server.await??; // returns once in-flight requests have finished
//! # Ok(())
//! # }
//! ```
//!
//! Layout: [`config`] (what `run` takes), [`store`] (the storage trait and
//! its SQLite and in-memory backends), `api` (the HTTP endpoints),
//! `channels` (MLS states, orderers and the commit validator), `state`
//! (what handlers share, including the event log's `append_event`),
//! `federation` (signed requests between servers, name resolution, remote
//! identity, the outbox, blocking).

#![forbid(unsafe_code)]

pub mod admin;
mod api;
mod backfill;
mod channels;
pub mod config;
mod error;
pub mod faults;
mod federation;
mod freshness;
mod keys;
mod metrics;
mod ordering;
mod quiesce;
mod state;
pub mod store;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

pub use config::{Backend, Config, FederationSettings, FileConfig, Limits, Registration};
pub use error::{ApiError, ServerError};
pub use faults::LinkFaults;
pub use keys::KEY_FILE;
pub use store::{MemoryStore, SqliteStore, Store, StoreError};

/// The SQLite database's file name inside the data directory.
pub const DB_FILE: &str = "kith.db";

/// The lock file in the data directory: a running server (SQLite backend)
/// holds an exclusive lock on it, and the operator commands (`kithd device
/// ...`, `kithd name release`) refuse to run while it is held.
pub const LOCK_FILE: &str = "kithd.lock";

/// Takes the exclusive lock on the data directory's [`LOCK_FILE`], held
/// until the returned file is dropped. `Ok(None)` if another process (or
/// server in this one) holds it.
pub(crate) fn lock_data_dir(data_dir: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join(LOCK_FILE))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The MLS store of the channels' public states, inside the data directory
/// (SQLite backend only).
pub const MLS_DB_FILE: &str = "mls.db";

/// The channels' Raft logs, inside the data directory (SQLite backend only).
pub const RAFT_DB_FILE: &str = "raft.db";

/// How long `run` waits, after the listener closes, for event streams to
/// end before it returns anyway.
const STREAM_DRAIN: Duration = Duration::from_secs(10);

/// Runs a homeserver on `listener` until `shutdown` completes.
///
/// On first start it creates the data directory and the server's signing
/// key. When `shutdown` completes the server stops accepting connections,
/// lets in-flight requests finish (so every acknowledged write is
/// committed), closes open event streams, and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|e| ServerError::Io(data_dir.clone(), e))?;
    let now = state::now_ms();
    let key = keys::load_or_generate(&data_dir, now)?;
    let server_keys = keys::publish(&key, &config.server_name)?;
    // Held until `run` returns, so the operator commands, which write the
    // same database with their own view of the event logs, wait for a stop.
    let _lock = match config.backend {
        Backend::Sqlite => Some(
            lock_data_dir(&data_dir)
                .map_err(|e| ServerError::Io(data_dir.join(LOCK_FILE), e))?
                .ok_or_else(|| {
                    ServerError::Io(
                        data_dir.join(LOCK_FILE),
                        std::io::Error::other("another kithd is running on this data directory"),
                    )
                })?,
        ),
        Backend::Memory => None,
    };
    let store: Arc<dyn Store> = match config.backend {
        Backend::Sqlite => {
            let path = data_dir.join(DB_FILE);
            Arc::new(
                tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .map_err(|e| {
                        ServerError::Store(StoreError::Corrupt(format!(
                            "opening the database: {e}"
                        )))
                    })??,
            )
        }
        Backend::Memory => Arc::new(MemoryStore::new()),
    };
    let channels = {
        let server = config.server_name.clone();
        let store = Arc::clone(&store);
        let dir = match config.backend {
            Backend::Sqlite => Some(data_dir.clone()),
            Backend::Memory => None,
        };
        let order_config = config.order_config();
        tokio::task::spawn_blocking(move || {
            channels::Channels::open(server, store, dir.as_deref(), order_config)
        })
        .await
        .map_err(|e| ServerError::Channels(format!("opening channel storage: {e}")))?
        .map_err(|e| ServerError::Channels(e.to_string()))?
    };
    let channels = Arc::new(channels);
    let metrics = metrics::Metrics::new();
    metrics
        .registered_devices
        .set(i64::try_from(store.device_count()?).unwrap_or(i64::MAX));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (tasks_tx, mut tasks_rx) = mpsc::channel::<()>(1);
    let limits = &config.limits;
    let inbox_limiter =
        state::RateLimiter::new(limits.inbox_deposits_per_minute, limits.inbox_deposit_burst);
    let commit_limiter = state::RateLimiter::new(limits.commits_per_minute, limits.commit_burst);
    let local_addr = listener.local_addr().map_err(ServerError::Serve)?;
    tracing::info!(
        addr = %local_addr,
        server_name = %config.server_name,
        registration = config.registration.mode(),
        data_dir = %data_dir.display(),
        "kithd listening"
    );
    let client = federation::Client::new(
        config.server_name.clone(),
        key.key.clone(),
        federation::Resolver::new(config.resolve.clone()),
        config.blocked_servers.clone(),
        &config.federation,
        config.faults.clone(),
    )
    .map_err(ServerError::Federation)?;
    let federation = Arc::new(federation::Federation {
        client,
        keys: federation::KeyCache::default(),
        replay: federation::ReplayCache::new(now),
        outbox_wake: tokio::sync::Notify::new(),
        deposit_limiter: state::RateLimiter::new(
            config.limits.federation_deposits_per_minute,
            config.limits.federation_deposits_per_minute,
        ),
        submit_limiter: state::RateLimiter::new(
            config.limits.federation_submissions_per_minute,
            config.limits.federation_submissions_per_minute,
        ),
        raft_requests: metrics.raft_requests_sent.clone(),
    });
    channels.set_federation(Arc::clone(&federation));
    let accepted = channels.take_accepted();
    let hub = Arc::new(state::EventHub::default());
    let writer =
        writer::MessageWriter::new(Arc::clone(&store), Arc::clone(&hub), |channel, row| {
            serde_json::Value::Object(api::channels::message_json(*channel, row)).to_string()
        });
    let state = Arc::new(state::AppState {
        config,
        store,
        writer,
        key: key.key,
        server_keys: server_keys.encode(),
        metrics,
        hub,
        inbox_limiter,
        commit_limiter,
        channels: Arc::clone(&channels),
        shutdown: stop_rx,
        tasks: tasks_tx,
        federation,
    });
    let outbox = tokio::spawn(federation::outbox::run(Arc::clone(&state)));
    if let Some(accepted) = accepted {
        tokio::spawn(ordering::run_certifier(Arc::clone(&state), accepted));
    }
    if state.config.federation.raft_idle_ms > 0 {
        tokio::spawn(quiesce::run(Arc::clone(&state)));
    }
    let app = api::router(Arc::clone(&state));
    drop(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            let _ = stop_tx.send(true);
        })
        .await
        .map_err(ServerError::Serve)?;
    if tokio::time::timeout(STREAM_DRAIN, outbox).await.is_err() {
        tracing::warn!("the outbox task did not stop in time");
    }
    // Event streams run detached from the HTTP connections; wait for them to
    // see the shutdown signal and end, so the store is released.
    if tokio::time::timeout(STREAM_DRAIN, tasks_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("event streams did not close in time");
    }
    channels.shutdown().await;
    tracing::info!("kithd stopped");
    Ok(())
}
