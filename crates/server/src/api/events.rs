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
use crate::state::Shared;
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
    let mut map = match serde_json::from_str::<Value>(&event.payload) {
        Ok(Value::Object(map)) => map,
        Ok(other) => {
            let mut map = serde_json::Map::new();
            map.insert("payload".into(), other);
            map
        }
        Err(_) => serde_json::Map::new(),
    };
    map.insert("cursor".into(), event.cursor.into());
    map.insert("kind".into(), event.kind.clone().into());
    Value::Object(map)
}

/// [`event_json`] as text, without parsing the payload into a tree and
/// writing it out again: `cursor` and `kind` go in front of the stored
/// object's fields. (Profiled in fan-out: the parse and re-encoding of a
/// message's ~1.7 KB payload, once per receiving device, was 3% of
/// kithd's CPU.) A payload that is not a JSON object, or that has a field
/// named like those two, takes the general path.
pub(crate) fn event_text(event: &Event) -> String {
    let payload = event.payload.trim();
    let rest = match payload.strip_prefix('{') {
        Some(rest)
            if !payload.contains(r#""cursor""#)
                && !payload.contains(r#""kind""#)
                && serde_json::from_str::<serde::de::IgnoredAny>(payload).is_ok() =>
        {
            rest.trim_start()
        }
        _ => return event_json(event).to_string(),
    };
    let kind = Value::from(event.kind.as_str()).to_string();
    let mut text = String::with_capacity(payload.len() + kind.len() + 32);
    text.push_str(r#"{"cursor":"#);
    text.push_str(&event.cursor.to_string());
    text.push_str(r#","kind":"#);
    text.push_str(&kind);
    if !rest.starts_with('}') {
        text.push(',');
    }
    text.push_str(rest);
    text
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
    let mut live = state.hub.subscribe(device);
    let mut shutdown = state.shutdown.clone();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let mut fetch = true;
    let reason = loop {
        if *shutdown.borrow() {
            break "server shutting down";
        }
        if fetch {
            live.borrow_and_update();
            match send_stored(&state, device, &mut socket, &mut sent).await {
                Ok(()) => {}
                Err(why) => break why,
            }
            fetch = false;
        }
        tokio::select! {
            changed = live.changed() => {
                if changed.is_err() { break "event hub closed" }
                fetch = true;
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
    if reason == "server shutting down" {
        let _ = socket
            .send(Message::Close(Some(CloseFrame {
                code: close_code::AWAY,
                reason: "server shutting down".into(),
            })))
            .await;
    }
    state.metrics.event_streams.dec();
    tracing::debug!(reason, "event stream closed");
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
