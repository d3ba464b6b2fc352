//! What every request handler shares: configuration, storage, keys, metrics,
//! the live event hub and rate limiters. Also the reusable internal API for
//! appending to a device's event log ([`AppState::append_event`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kith_proto::{DeviceId, SecretKey};
use tokio::sync::{mpsc, watch};

use crate::api::events::EventText;
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
    pub(crate) hub: Arc<EventHub>,
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
    /// Stores the channel messages clients post, several to a transaction.
    pub(crate) writer: crate::writer::MessageWriter,
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

    /// As [`AppState::db`], for reads that are only a check on the way to
    /// a write of the caller's own: they do not wait for other callers'
    /// writes to reach the disk (see [`crate::store::unsynced`]).
    pub(crate) async fn db_check<T, F>(&self, op: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        self.db(move |s| crate::store::unsynced(|| op(s))).await
    }

    /// Appends an event to `device`'s log, durably, and wakes its open
    /// streams. `payload` is a JSON object whose fields travel beside
    /// `cursor` and `kind`. This is the one way events enter a log (the
    /// inbox deposit appends its event in the same transaction as the item
    /// and then calls [`EventHub::hand_off`] itself).
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
        self.hub
            .hand_off(std::slice::from_ref(&(device, event.clone())));
        Ok(event)
    }
}

/// The payload of a `device_removed` event (spec §6.4): the removed
/// device, the device that removed it if one did (not the operator), and
/// when.
pub(crate) fn device_removed_payload(
    device: &DeviceId,
    by: Option<&DeviceId>,
    removed_at: u64,
) -> String {
    let mut payload = serde_json::Map::new();
    payload.insert("device".into(), device.to_string().into());
    if let Some(by) = by {
        payload.insert("by".into(), by.to_string().into());
    }
    payload.insert("removed_at".into(), removed_at.into());
    serde_json::Value::Object(payload).to_string()
}

/// The live event streams of every device with one open, and what is
/// handed to them. Every append wakes the device's streams (the newest
/// cursor, a `watch`); an append whose event is on disk and whose place in
/// the device's log is known ([`Event::prev`]) is also handed to each
/// stream's small queue, ready to send, so a stream that is caught up sends
/// it without reading the store. The store stays authoritative: a stream
/// reads it whenever an event was not queued for it (its queue was full,
/// or the event's place in the log is unknown), or what it was handed
/// leaves a gap that is not filled soon (see `api::events`). Devices
/// without an open stream have no entry.
#[derive(Default)]
pub(crate) struct EventHub {
    devices: Mutex<HashMap<DeviceId, Live>>,
}

/// A device with at least one open stream.
struct Live {
    /// The newest cursor appended (and on disk) since the first stream
    /// opened; every change wakes the streams.
    newest: watch::Sender<u64>,
    /// One queue per open stream.
    streams: Vec<Arc<Handed>>,
}

/// Events handed to one stream and not yet taken, oldest first.
#[derive(Default)]
pub(crate) struct Handed {
    queue: Mutex<HandedQueue>,
}

#[derive(Default)]
struct HandedQueue {
    events: VecDeque<HandOff>,
    /// The sum of the queued bodies' sizes (each counted whole, though
    /// shared with the other streams).
    bytes: usize,
    /// An event was appended that is not in the queue (it was full, or
    /// the event's place in the log is unknown): the stream must read the
    /// store.
    missed: bool,
}

impl Handed {
    /// At most this many events wait in one stream's queue ...
    pub(crate) const MAX_EVENTS: usize = 32;
    /// ... and at most this many bytes of their bodies; beyond either, an
    /// event is not queued and the stream reads it from the store.
    pub(crate) const MAX_BYTES: usize = 64 * 1024;

    fn lock(&self) -> std::sync::MutexGuard<'_, HandedQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `event`, or, when the queue is full, notes that the stream
    /// missed one.
    fn push(&self, event: HandOff) {
        let mut queue = self.lock();
        let size = event.body.len();
        if queue.events.len() >= Self::MAX_EVENTS || queue.bytes + size > Self::MAX_BYTES {
            queue.missed = true;
            return;
        }
        queue.bytes += size;
        queue.events.push_back(event);
    }

    /// Notes that the stream missed an event.
    fn miss(&self) {
        self.lock().missed = true;
    }

    /// Everything queued, emptying the queue (and freeing its buffer), and
    /// whether an event was missed since the last call.
    fn take(&self) -> (Vec<HandOff>, bool) {
        let mut queue = self.lock();
        queue.bytes = 0;
        let missed = std::mem::take(&mut queue.missed);
        (std::mem::take(&mut queue.events).into(), missed)
    }
}

/// One event handed to a stream: where it sits in the device's log, and
/// its text, shared by every device the same event went to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HandOff {
    /// The device's event before this one ([`Event::prev`]).
    pub(crate) prev: u64,
    pub(crate) cursor: u64,
    pub(crate) body: Arc<EventText>,
}

impl EventHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Live>> {
        self.devices
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands appended events to their devices' streams and wakes them.
    /// Call only once the events are on disk. Events without a `prev` only
    /// wake the streams, which read the store for them. Events that carry
    /// the same kind and payload (a message to its channel's members) share
    /// one prepared text.
    pub(crate) fn hand_off(&self, events: &[(DeviceId, Event)]) {
        let mut body: Option<Arc<EventText>> = None;
        let devices = self.lock();
        for (device, event) in events {
            let Some(live) = devices.get(device) else {
                continue;
            };
            if let Some(prev) = event.prev {
                let text = match &body {
                    Some(text) if text.is(&event.kind, &event.payload) => Arc::clone(text),
                    _ => {
                        let text = Arc::new(EventText::new(&event.kind, &event.payload));
                        body = Some(Arc::clone(&text));
                        text
                    }
                };
                for stream in &live.streams {
                    stream.push(HandOff {
                        prev,
                        cursor: event.cursor,
                        body: Arc::clone(&text),
                    });
                }
            } else {
                for stream in &live.streams {
                    stream.miss();
                }
            }
            // Always a wake-up: the queues changed even when the newest
            // cursor did not (an event handed after a later one).
            live.newest
                .send_modify(|newest| *newest = (*newest).max(event.cursor));
        }
    }

    /// Ends every open stream of `device` (it was removed, spec §6.4): its
    /// streams see the hub closed and close their sockets.
    pub(crate) fn close(&self, device: &DeviceId) {
        // Dropping the device's entry drops its `watch` sender, which
        // every stream's `changed()` then reports.
        self.lock().remove(device);
    }

    /// Opens a stream on `device`: its wake-ups and hand-offs, until the
    /// returned subscription is dropped.
    pub(crate) fn subscribe(&self, device: DeviceId) -> Subscription<'_> {
        let handed = Arc::new(Handed::default());
        let mut devices = self.lock();
        let live = devices.entry(device).or_insert_with(|| Live {
            newest: watch::channel(0).0,
            streams: Vec::new(),
        });
        live.streams.push(Arc::clone(&handed));
        Subscription {
            hub: self,
            device,
            newest: live.newest.subscribe(),
            handed,
        }
    }
}

/// One open stream's registration in the [`EventHub`].
pub(crate) struct Subscription<'a> {
    hub: &'a EventHub,
    device: DeviceId,
    /// The device's newest cursor; changes on every append.
    pub(crate) newest: watch::Receiver<u64>,
    handed: Arc<Handed>,
}

impl Subscription<'_> {
    /// The events handed to this stream since the last call, in the order
    /// they were handed (not always the log's: appends that share a disk
    /// sync are handed in any order), and whether one was missed (not
    /// queued: the stream must read the store).
    pub(crate) fn take(&self) -> (Vec<HandOff>, bool) {
        self.handed.take()
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut devices = self.hub.lock();
        if let Some(live) = devices.get_mut(&self.device) {
            live.streams.retain(|s| !Arc::ptr_eq(s, &self.handed));
            if live.streams.is_empty() {
                devices.remove(&self.device);
            }
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn appended(cursor: u64, prev: Option<u64>, payload: &str) -> Event {
        Event {
            cursor,
            kind: "message".into(),
            payload: payload.into(),
            created_at: 1,
            prev,
        }
    }

    fn device(n: u8) -> DeviceId {
        DeviceId::from_bytes([n; 32])
    }

    /// Every open stream of a recipient gets the event, sharing one text;
    /// devices without a stream get nothing and cost no entry; an event
    /// without `prev` only wakes.
    #[test]
    fn hand_off_reaches_every_open_stream_once() {
        let hub = EventHub::default();
        let one = hub.subscribe(device(1));
        let also_one = hub.subscribe(device(1));
        let mut two = hub.subscribe(device(2));
        let payload = r#"{"seq":1}"#;
        hub.hand_off(&[
            (device(1), appended(5, Some(2), payload)),
            (device(2), appended(6, Some(3), payload)),
            (device(3), appended(7, Some(4), payload)),
        ]);
        let (a, b, c) = (one.take().0, also_one.take().0, two.take().0);
        assert_eq!((a.len(), b.len(), c.len()), (1, 1, 1));
        assert_eq!((a[0].prev, a[0].cursor, c[0].cursor), (2, 5, 6));
        assert!(Arc::ptr_eq(&a[0].body, &c[0].body));
        assert_eq!(one.take(), (vec![], false));
        assert!(!hub.lock().contains_key(&device(3)));

        hub.hand_off(&[(device(2), appended(9, None, payload))]);
        assert_eq!(two.take(), (vec![], true));
        assert!(two.newest.has_changed().unwrap());
        assert_eq!(*two.newest.borrow_and_update(), 9);
        // The newest cursor never goes back (a later append handed first).
        hub.hand_off(&[(device(2), appended(8, Some(6), payload))]);
        assert_eq!(*two.newest.borrow_and_update(), 9);
        assert_eq!(two.take().0.len(), 1);

        drop((one, also_one));
        assert!(!hub.lock().contains_key(&device(1)));
        drop(two);
        assert!(hub.lock().is_empty());
    }

    /// A stream that does not take its events holds at most
    /// `MAX_EVENTS` of them, and at most `MAX_BYTES` of text; the newest
    /// cursor still tells it how far the log goes.
    #[test]
    fn a_queue_is_bounded() {
        let hub = EventHub::default();
        let mut stream = hub.subscribe(device(1));
        let total = Handed::MAX_EVENTS as u64 + 10;
        for cursor in 1..=total {
            hub.hand_off(&[(device(1), appended(cursor, Some(cursor - 1), "{}"))]);
        }
        let (queued, missed) = stream.take();
        assert!(missed);
        assert_eq!(queued.len(), Handed::MAX_EVENTS);
        assert_eq!(queued.last().unwrap().cursor, Handed::MAX_EVENTS as u64);
        assert_eq!(*stream.newest.borrow_and_update(), total);

        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(Handed::MAX_BYTES / 3));
        for cursor in 1..=4 {
            hub.hand_off(&[(device(1), appended(100 + cursor, Some(99 + cursor), &big))]);
        }
        let (queued, missed) = stream.take();
        assert_eq!((queued.len(), missed), (2, true));
        assert_eq!(stream.take(), (vec![], false));
    }
}
