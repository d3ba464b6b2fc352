//! The per-device event stream: over HTTP (`GET /v0/events`, polling) and
//! over a WebSocket (`GET /v0/events/ws`) that first replays stored events
//! after the cursor, then sends new ones as they are appended. Delivery is
//! at least once; clients ack cumulatively with `{"ack": cursor}`, and the
//! server keeps the acked cursor per device so a reconnect resumes there.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kith_proto::DeviceId;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiJson, Authed, authenticate, bearer, list_limit};
use crate::error::ApiError;
use crate::state::{HandOff, Handed, Shared, Subscription};
use crate::store::Event;

/// Events read from storage per batch on a WebSocket.
const WS_BATCH: usize = 100;
/// How often the server pings an idle WebSocket.
const PING_EVERY: Duration = Duration::from_secs(30);

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v0/events", get(list))
        .route("/v0/events/ack", post(ack))
        .route("/v0/events/ws", get(websocket))
}

/// `{"cursor", "kind", ...payload fields}`.
pub(crate) fn event_json(event: &Event) -> Value {
    json_of(event.cursor, &event.kind, &event.payload)
}

fn json_of(cursor: u64, kind: &str, payload: &str) -> Value {
    let mut map = match serde_json::from_str::<Value>(payload) {
        Ok(Value::Object(map)) => map,
        Ok(other) => {
            let mut map = serde_json::Map::new();
            map.insert("payload".into(), other);
            map
        }
        Err(_) => serde_json::Map::new(),
    };
    map.insert("cursor".into(), cursor.into());
    map.insert("kind".into(), kind.into());
    Value::Object(map)
}

/// [`event_json`] as text, without parsing the payload into a tree and
/// writing it out again: `cursor` and `kind` go in front of the stored
/// object's fields. (Profiled in fan-out: the parse and re-encoding of a
/// message's ~1.7 KB payload, once per receiving device, was 3% of
/// kithd's CPU.) A payload that is not a JSON object, or that has a field
/// named like those two, takes the general path.
pub(crate) fn event_text(event: &Event) -> String {
    match splice_at(&event.payload) {
        Some(at) => spliced(event.cursor, &event.kind, &event.payload, at),
        None => event_json(event).to_string(),
    }
}

/// Where the fields of a payload that can be spliced start (after its
/// `{`), or `None` if it must take the general path.
fn splice_at(payload: &str) -> Option<usize> {
    let trimmed = payload.trim();
    let fields = trimmed.strip_prefix('{')?.trim_start();
    if trimmed.contains(r#""cursor""#)
        || trimmed.contains(r#""kind""#)
        || serde_json::from_str::<serde::de::IgnoredAny>(trimmed).is_err()
    {
        return None;
    }
    let leading = payload.len() - payload.trim_start().len();
    Some(leading + trimmed.len() - fields.len())
}

/// `{"cursor":C,"kind":K,` and the payload's fields from `at` on.
fn spliced(cursor: u64, kind: &str, payload: &str, at: usize) -> String {
    let rest = payload.get(at..).unwrap_or("}").trim_end();
    let kind = Value::from(kind).to_string();
    let mut text = String::with_capacity(rest.len() + kind.len() + 40);
    text.push_str(r#"{"cursor":"#);
    text.push_str(&cursor.to_string());
    text.push_str(r#","kind":"#);
    text.push_str(&kind);
    if !rest.starts_with('}') {
        text.push(',');
    }
    text.push_str(rest);
    text
}

/// An event's text prepared once for the many devices it went to (a
/// message to a channel's members): [`event_text`] for any cursor, with
/// the payload checked once.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct EventText {
    kind: String,
    payload: String,
    splice: Option<usize>,
}

impl EventText {
    pub(crate) fn new(kind: &str, payload: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            payload: payload.to_owned(),
            splice: splice_at(payload),
        }
    }

    /// Whether this is the text of events with this kind and payload.
    pub(crate) fn is(&self, kind: &str, payload: &str) -> bool {
        self.kind == kind && self.payload == payload
    }

    /// The bytes this holds (for bounding queues of it).
    pub(crate) fn len(&self) -> usize {
        self.kind.len() + self.payload.len()
    }

    /// The event's JSON text at `cursor`: the same as [`event_text`].
    pub(crate) fn text(&self, cursor: u64) -> String {
        match self.splice {
            Some(at) => spliced(cursor, &self.kind, &self.payload, at),
            None => json_of(cursor, &self.kind, &self.payload).to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// Where a read starts: the given cursor, or else the device's acked one.
async fn start(state: &Shared, device: DeviceId, after: Option<u64>) -> Result<u64, ApiError> {
    match after {
        Some(after) => Ok(after),
        None => state.db(move |s| s.acked_cursor(&device)).await,
    }
}

/// `GET /v0/events`: JSON, or binary frames (§6.8) when the client
/// accepts `application/octet-stream`.
async fn list(
    State(state): State<Shared>,
    Authed(device): Authed,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let after = start(&state, device, query.after).await?;
    let limit = list_limit(&state, query.limit);
    let events = state.db(move |s| s.events(&device, after, limit)).await?;
    if super::binary::is_octet_stream(&headers, header::ACCEPT) {
        return Ok(super::binary::events_response(&events));
    }
    let next = events.last().map_or(after, |e| e.cursor);
    let events: Vec<Value> = events.iter().map(event_json).collect();
    Ok(Json(json!({ "events": events, "next": next })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckFrame {
    ack: u64,
}

async fn ack(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiJson(frame): ApiJson<AckFrame>,
) -> Result<Json<Value>, ApiError> {
    let acked = state.db(move |s| s.ack_events(&device, frame.ack)).await?;
    Ok(Json(json!({ "acked": acked })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WsQuery {
    after: Option<u64>,
    token: Option<String>,
}

/// The read buffer of an event-stream WebSocket, bytes.
const WS_READ_BUFFER: usize = 4 * 1024;

async fn websocket(
    State(state): State<Shared>,
    parts: Parts,
    query: Result<Query<WsQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let token = match bearer(&parts)? {
        Some(token) => token,
        None => query.token.ok_or_else(|| {
            ApiError::unauthorized("missing Authorization: Bearer token or ?token=")
        })?,
    };
    let device = authenticate(&state, &token).await?;
    let upgrade = upgrade.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let after = start(&state, device, query.after).await?;
    // tungstenite's default 128 KiB read buffer, allocated up front, made
    // each idle stream cost ~150 KB resident; a client only sends small
    // acks, so a 4 KiB one suffices (larger frames still fit: it grows).
    // Messages are written (and flushed) as they are sent.
    Ok(upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| stream(state, device, socket, after)))
}

/// Keeps one device's stream going until the client leaves or the server
/// shuts down.
#[tracing::instrument(skip_all, fields(device = %device))]
async fn stream(state: Shared, device: DeviceId, mut socket: WebSocket, mut sent: u64) {
    // Held for the stream's life: `run` waits for every clone to go.
    let _task = state.tasks.clone();
    state.metrics.event_streams.inc();
    tracing::debug!(after = sent, "event stream opened");
    // Tests hold the stream here (`LinkFaults::hold_streams`) to put a
    // removal between its authentication and its subscription.
    if let Some(faults) = &state.config.faults {
        faults.stream_gate().await;
    }
    let mut live = state.hub.subscribe(device);
    // A removal between the stream's authentication and the subscription
    // above ran `hub.close` before there was anything to close: look
    // again, now that any later removal closes this subscription.
    let removed = matches!(state.db(move |s| s.device(&device)).await, Ok(None));
    let mut shutdown = state.shutdown.clone();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    // The first pass replays the log from the store.
    let mut woken = Some(Source::Store);
    let mut held = Vec::new();
    // While a gap in what was handed waits to be filled: where it starts
    // and until when it may (a gap that moves on restarts the wait).
    let mut gap: Option<(u64, tokio::time::Instant)> = None;
    let reason = loop {
        if removed {
            break "device removed";
        }
        if *shutdown.borrow() {
            break "server shutting down";
        }
        if let Some(source) = woken.take() {
            match catch_up(
                &state,
                device,
                &mut live,
                &mut socket,
                &mut sent,
                &mut held,
                source,
            )
            .await
            {
                Ok(true) => {
                    if gap.is_none_or(|(at, _)| at != sent) {
                        gap = Some((sent, tokio::time::Instant::now() + GAP_GRACE));
                    }
                }
                Ok(false) => gap = None,
                Err(why) => break why,
            }
        }
        tokio::select! {
            changed = live.newest.changed() => {
                // The hub drops a device's streams only when the device
                // is removed (spec §6.4).
                if changed.is_err() { break "device removed" }
                woken = Some(Source::Handed);
            }
            () = tokio::time::sleep_until(gap.map_or_else(tokio::time::Instant::now, |g| g.1)),
                if gap.is_some() => {
                woken = Some(Source::Store);
            }
            message = socket.recv() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break "client closed",
                Some(Ok(Message::Text(text))) => {
                    let reply = match serde_json::from_str::<AckFrame>(text.as_str()) {
                        Ok(frame) => state
                            .db(move |s| s.ack_events(&device, frame.ack))
                            .await
                            .err(),
                        Err(e) => Some(ApiError::bad_request(format!(
                            "expected {{\"ack\": cursor}}: {e}"
                        ))),
                    };
                    if let Some(e) = reply {
                        let frame = json!({ "error": e.code, "message": e.message });
                        if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                            break "send failed";
                        }
                    }
                }
                Some(Ok(_)) => {} // pings are answered by the library; pongs and binary ignored
            },
            stopped = shutdown.changed() => {
                if stopped.is_err() { break "server shutting down" }
            }
            _ = ping.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break "send failed";
                }
            }
        }
    };
    drop(live);
    let close = match reason {
        "server shutting down" => Some(close_code::AWAY),
        "device removed" => Some(close_code::POLICY),
        _ => None,
    };
    if let Some(code) = close {
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
    state.metrics.event_streams.dec();
    tracing::debug!(reason, "event stream closed");
}

/// Where a pass of [`catch_up`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The events the hub handed over, as far as they follow on.
    Handed,
    /// The store, whatever was handed.
    Store,
}

/// What a stream does with the events handed to it (`held`: those it
/// kept from earlier passes and the newly queued ones), given the cursor
/// it has sent and the device's newest. The events are put in log order
/// (appends that share a disk sync are handed in any order); those it has
/// sent already are dropped; the run that follows on from `sent` (each
/// event's `prev` the one before) is to be sent; the rest, beyond a gap,
/// is kept for the next pass, when the events of the gap have most likely
/// been handed too.
pub(crate) fn plan(mut sent: u64, newest: u64, mut held: Vec<HandOff>) -> Plan {
    held.sort_unstable_by_key(|e| e.cursor);
    held.dedup_by_key(|e| e.cursor);
    let mut run = Vec::new();
    let mut rest = Vec::new();
    for event in held {
        if event.cursor <= sent {
            continue;
        }
        if rest.is_empty() && event.prev == sent {
            sent = event.cursor;
            run.push(event);
        } else {
            rest.push(event);
        }
    }
    Plan {
        run,
        behind: newest > sent,
        held: rest,
    }
}

/// See [`plan`].
#[derive(Debug)]
pub(crate) struct Plan {
    /// To send now, in order.
    pub(crate) run: Vec<HandOff>,
    /// Handed, but beyond a gap.
    pub(crate) held: Vec<HandOff>,
    /// Whether the log reaches beyond the run (a gap, or events not
    /// handed).
    pub(crate) behind: bool,
}

/// How long a stream with a gap in what it was handed waits for the gap
/// to be handed too before it reads the store. Only an append whose
/// request was dropped between its disk sync and its hand-off leaves a
/// gap that is never filled.
const GAP_GRACE: Duration = Duration::from_millis(20);

/// Sends what the device's log holds after `sent`, advancing it: the
/// handed events that follow on from it, or, if one was missed (or
/// `source` says so), everything from the store. Everything handed was on
/// disk before it was handed, and a store read comes after: nothing is
/// skipped, repeated or sent out of order. Returns whether the stream is
/// still behind (a gap in what it was handed; `held` keeps what lies
/// beyond it).
async fn catch_up(
    state: &Shared,
    device: DeviceId,
    live: &mut Subscription<'_>,
    socket: &mut WebSocket,
    sent: &mut u64,
    held: &mut Vec<HandOff>,
    source: Source,
) -> Result<bool, &'static str> {
    // Seen before taking the queue: a hand-off is queued before the newest
    // cursor moves, so whatever the newest names is in the queue or older.
    let newest = *live.newest.borrow_and_update();
    let (queued, missed) = live.take();
    if source == Source::Handed && !missed {
        held.extend(queued);
        let plan = plan(*sent, newest, std::mem::take(held));
        for event in plan.run {
            socket
                .send(Message::Text(event.body.text(event.cursor).into()))
                .await
                .map_err(|_| "send failed")?;
            *sent = event.cursor;
            state.metrics.event_stream_handed.inc();
        }
        if plan.held.len() <= Handed::MAX_EVENTS {
            *held = plan.held;
            return Ok(plan.behind);
        }
    }
    held.clear();
    state.metrics.event_stream_reads.inc();
    send_stored(state, device, socket, sent).await?;
    Ok(false)
}

/// Sends every stored event after `sent`, advancing it.
async fn send_stored(
    state: &Shared,
    device: DeviceId,
    socket: &mut WebSocket,
    sent: &mut u64,
) -> Result<(), &'static str> {
    loop {
        let after = *sent;
        let batch = state
            .db(move |s| s.events(&device, after, WS_BATCH))
            .await
            .map_err(|_| "storage failure")?;
        for event in &batch {
            let text = event_text(event);
            socket
                .send(Message::Text(text.into()))
                .await
                .map_err(|_| "send failed")?;
            *sent = event.cursor;
        }
        if batch.len() < WS_BATCH {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, payload: &str) -> Event {
        Event {
            cursor: 7,
            kind: kind.into(),
            payload: payload.into(),
            created_at: 1,
            prev: None,
        }
    }

    fn handed(prev: u64, cursor: u64) -> HandOff {
        HandOff {
            prev,
            cursor,
            body: std::sync::Arc::new(EventText::new("message", "{}")),
        }
    }

    fn cursors(run: &[HandOff]) -> Vec<u64> {
        run.iter().map(|h| h.cursor).collect()
    }

    fn run_of(sent: u64, newest: u64, handed: Vec<HandOff>) -> (Vec<u64>, Vec<u64>, bool) {
        let plan = plan(sent, newest, handed);
        (cursors(&plan.run), cursors(&plan.held), plan.behind)
    }

    /// Handed events that follow on are sent, in log order; beyond a gap
    /// they wait; those sent already are dropped; a newest cursor beyond
    /// the run is seen.
    #[test]
    fn plan_sends_what_follows_on_and_holds_the_rest() {
        // Caught up: everything handed follows on.
        let got = run_of(4, 9, vec![handed(4, 6), handed(6, 9)]);
        assert_eq!(got, (vec![6, 9], vec![], false));
        // Handed out of order (appends that shared a disk sync): sent in
        // the log's order.
        let got = run_of(4, 12, vec![handed(9, 12), handed(4, 6), handed(6, 9)]);
        assert_eq!(got, (vec![6, 9, 12], vec![], false));
        // An event missing in between: the run stops before it, the rest
        // waits, the stream is behind.
        let got = run_of(4, 12, vec![handed(4, 6), handed(7, 9), handed(9, 12)]);
        assert_eq!(got, (vec![6], vec![9, 12], true));
        // The first does not follow on from what was sent.
        let got = run_of(4, 9, vec![handed(5, 9)]);
        assert_eq!(got, (vec![], vec![9], true));
        // Already sent (read from the store meanwhile), or handed twice:
        // dropped, not repeated.
        let got = run_of(
            9,
            12,
            vec![handed(4, 6), handed(6, 9), handed(9, 12), handed(9, 12)],
        );
        assert_eq!(got, (vec![12], vec![], false));
        // Nothing handed, but the log grew.
        assert_eq!(run_of(4, 6, vec![]), (vec![], vec![], true));
        // Woken with nothing new.
        assert_eq!(run_of(6, 6, vec![]), (vec![], vec![], false));
        // A stream started past the log's end (an explicit `after`) skips
        // what lies before it, as a read would.
        assert_eq!(run_of(100, 9, vec![handed(4, 9)]), (vec![], vec![], false));
    }

    /// A prepared text is [`event_text`] at any cursor.
    #[test]
    fn prepared_text_is_event_text() {
        for payload in [
            r#"{"channel":"c","seq":3,"message":"AAE="}"#,
            " { \"a\" : 1 } ",
            "{}",
            r#"{"kind":"other"}"#,
            "[1]",
            "nope",
        ] {
            let prepared = EventText::new("message", payload);
            for cursor in [1, 7, u64::MAX] {
                let mut e = event("message", payload);
                e.cursor = cursor;
                assert_eq!(prepared.text(cursor), event_text(&e), "{payload:?}");
            }
        }
    }

    /// The spliced text is the same JSON as the general path's, for every
    /// kind of stored payload, including ones it must not splice.
    #[test]
    fn event_text_is_event_json() {
        for payload in [
            r#"{"channel":"c","seq":3,"message":"AAE="}"#,
            "{}",
            " { } ",
            r#"{"kind":"other","x":1}"#,
            r#"{"cursor":99}"#,
            r#"{"note":"a \"kind\" inside"}"#,
            "[1,2]",
            "not json",
            "{broken",
            "",
        ] {
            let e = event("message", payload);
            let text = event_text(&e);
            let parsed: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(parsed, event_json(&e), "payload {payload:?}: {text}");
        }
    }
}
