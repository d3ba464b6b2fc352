//! What every request handler shares: configuration, storage, keys, metrics,
//! the live event hub and rate limiters. Also the reusable internal API for
//! appending to a device's event log ([`AppState::append_event`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kith_proto::{DeviceId, SecretKey};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{Event, Store, StoreError};

/// Milliseconds since the Unix epoch, from the system clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// State shared by all handlers.
pub(crate) struct AppState {
    pub(crate) config: Config,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) key: SecretKey,
    /// The encoded `ServerKeys` this server publishes.
    pub(crate) server_keys: Vec<u8>,
    pub(crate) metrics: Metrics,
    pub(crate) hub: EventHub,
    pub(crate) inbox_limiter: RateLimiter,
    /// Commits per submitting device (spec §10.8).
    pub(crate) commit_limiter: RateLimiter,
    /// Channels: their MLS states, orderers and locks.
    pub(crate) channels: Arc<crate::channels::Channels>,
    /// Turns `true` when the server starts shutting down; long-lived tasks
    /// (event streams) watch it and end.
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Held by every long-lived task; `run` waits until all clones are gone.
    pub(crate) tasks: mpsc::Sender<()>,
    /// The federation client, key and replay caches, and outbox wake-up.
    pub(crate) federation: Arc<crate::federation::Federation>,
}

pub(crate) type Shared = Arc<AppState>;

impl AppState {
    /// Runs a storage operation on the blocking pool and times it. The
    /// operation has committed when this returns `Ok`.
    pub(crate) async fn db<T, F>(&self, op: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = Arc::clone(&self.store);
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || op(store.as_ref()))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "storage task failed");
                ApiError::internal("storage task failed; nothing was accepted")
            })?;
        self.metrics
            .storage_seconds
            .observe(started.elapsed().as_secs_f64());
        result.map_err(ApiError::from)
    }

    /// Appends an event to `device`'s log, durably, and wakes its open
    /// streams. `payload` is a JSON object whose fields travel beside
    /// `cursor` and `kind`. This is the one way events enter a log (the
    /// inbox deposit appends its event in the same transaction as the item
    /// and then calls [`EventHub::notify`] itself).
    pub(crate) async fn append_event(
        &self,
        device: DeviceId,
        kind: &'static str,
        payload: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Event, ApiError> {
        let payload = serde_json::Value::Object(payload).to_string();
        let now = now_ms();
        let event = self
            .db(move |s| s.append_event(&device, kind, &payload, now))
            .await?;
        self.hub.notify(device, event.cursor);
        Ok(event)
    }
}

/// Wakes a device's open event streams when its log grows. The streams then
/// read the log itself, so a missed wake-up never loses an event.
#[derive(Default)]
pub(crate) struct EventHub {
    senders: Mutex<HashMap<DeviceId, watch::Sender<u64>>>,
}

impl EventHub {
    fn with_sender<T>(&self, device: DeviceId, f: impl FnOnce(&watch::Sender<u64>) -> T) -> T {
        let mut senders = self
            .senders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(senders.entry(device).or_insert_with(|| watch::channel(0).0))
    }

    /// Tells `device`'s streams that its log now reaches `cursor`.
    pub(crate) fn notify(&self, device: DeviceId, cursor: u64) {
        self.with_sender(device, |tx| {
            tx.send_replace(cursor);
        });
    }

    /// A receiver that changes whenever `device`'s log grows.
    pub(crate) fn subscribe(&self, device: DeviceId) -> watch::Receiver<u64> {
        self.with_sender(device, watch::Sender::subscribe)
    }
}

/// A token bucket per key (a device, or an origin server): `burst`
/// requests at once, refilled at `per_minute`. A rate of 0 turns the limit
/// off.
pub(crate) struct RateLimiter<K = DeviceId> {
    per_minute: u32,
    burst: u32,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: std::hash::Hash + Eq> RateLimiter<K> {
    pub(crate) fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `device`, or says how long until one is there.
    pub(crate) fn check(&self, device: K) -> Result<(), Duration> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let rate_per_sec = f64::from(self.per_minute) / 60.0;
        let burst = f64::from(self.burst);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(device).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate_per_sec).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate_per_sec))
        }
    }
}
