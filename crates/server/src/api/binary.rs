//! The binary message path (spec §6.7 "Send a message" in binary, §6.8
//! "Binary events"): an application message travels as its raw MLS bytes,
//! with no base64 and no JSON around it, so its wire size is the MLS
//! message's.
//!
//! - `POST /v0/channels/{id}/messages?epoch=E` with `Content-Type:
//!   application/octet-stream`: the body is the MLSMessage. `E` must be the
//!   channel's current epoch (else 409 `wrong_epoch`), so a sender learns
//!   from the answer that it is behind instead of sending at a stale epoch.
//!   Any other content type is the JSON form of `channels`.
//! - The same with `Content-Type: application/vnd.kith.message-batch`: the
//!   body is several such messages, each after its 4-byte length
//!   ([`kith_proto::batch`]), stored in one transaction, all or none.
//! - `GET /v0/events` with `Accept: application/octet-stream`: the events
//!   as [`kith_proto::events`] frames.

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, RequestExt as _};
use kith_proto::ChannelId;
use kith_proto::batch::{MESSAGE_BATCH, decode_batch};
use kith_proto::events::{
    EventFrame, MessageEvent, OCTET_STREAM, encode_frame, private_message_header,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::channels::{self, channel_row_check, parse_channel};
use super::events::event_text;
use super::{ApiJson, ApiPath, Authed, unb64};
use crate::error::ApiError;
use crate::ordering::{fan_out, fan_out_many};
use crate::state::{Shared, now_ms};
use crate::store::{Event, NewMessage};

/// Whether a header names `application/octet-stream` (parameters ignored).
pub(super) fn is_octet_stream(headers: &HeaderMap, name: header::HeaderName) -> bool {
    names_media_type(headers, name, OCTET_STREAM)
}

/// Whether a header names media type `media` (parameters ignored).
fn names_media_type(headers: &HeaderMap, name: header::HeaderName, media: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.split(';').next().map(str::trim) == Some(media))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochQuery {
    epoch: u64,
}

/// `POST /v0/channels/{id}/messages`: the binary form when the body is
/// `application/octet-stream`, several messages when it is a message
/// batch, else the JSON form.
pub(super) async fn post_message(
    State(state): State<Shared>,
    authed: Authed,
    path: ApiPath<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let batch = names_media_type(request.headers(), header::CONTENT_TYPE, MESSAGE_BATCH);
    if !batch && !is_octet_stream(request.headers(), header::CONTENT_TYPE) {
        let body = ApiJson::from_request(request, &state).await?;
        return channels::post_message(State(state), authed, path, body).await;
    }
    let Authed(device) = authed;
    let ApiPath(id) = path;
    let Query(EpochQuery { epoch }) = Query::try_from_uri(request.uri())
        .map_err(|e| ApiError::bad_request(format!("expected `?epoch=E`: {}", e.body_text())))?;
    let body: Bytes =
        request
            .extract()
            .await
            .map_err(|e: axum::extract::rejection::BytesRejection| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large("the request body is over the server's size limit")
                } else {
                    ApiError::bad_request(e.body_text())
                }
            })?;
    let channel = parse_channel(&id)?;
    if batch {
        return accept_batch(&state, device, channel, epoch, &body).await;
    }
    accept(&state, device, channel, epoch, body.to_vec()).await
}

/// The checks before a sender's message(s) at `epoch` may be stored: the
/// sender is a member ([`channels::message_checks`]); across servers, only a
/// log known to be up to date may acknowledge (§11.3), and its epoch is
/// then the group's, give or take a lease; and `epoch` is the channel's
/// (else 409 `wrong_epoch`, whose message starts with `what`). Returns
/// whether the commit that started `epoch` is certified here already (for
/// [`channels::start_epoch`]).
async fn fresh_at_epoch(
    state: &Shared,
    channel: ChannelId,
    device: kith_proto::DeviceId,
    epoch: u64,
    what: &str,
) -> Result<bool, ApiError> {
    let (row, started) = channels::message_checks(state, channel, device, epoch).await?;
    let alone = crate::freshness::require_fresh(state, channel).await?;
    let row = if alone {
        row
    } else {
        channel_row_check(state, channel).await?
    };
    if epoch != row.epoch {
        return Err(ApiError::wrong_epoch(
            row.epoch,
            format!(
                "{what} for epoch {epoch}, the channel is at epoch {}",
                row.epoch
            ),
        ));
    }
    Ok(started)
}

/// Checks and stores the messages of a batch body: each is checked as
/// [`accept`] checks one, and then all are stored in one transaction, at
/// consecutive positions in the body's order, with one disk sync; any fault
/// refuses the whole request (naming the message) and stores nothing.
/// Answers `{"messages": [{id, seq, received_at}]}` in the body's order.
#[tracing::instrument(skip_all, fields(device = %device, channel = %channel))]
async fn accept_batch(
    state: &Shared,
    device: kith_proto::DeviceId,
    channel: ChannelId,
    epoch: u64,
    body: &[u8],
) -> Result<Json<Value>, ApiError> {
    let limits = &state.config.limits;
    let messages = decode_batch(body, limits.max_batch_messages, limits.max_message_bytes)
        .map_err(|e| {
            if e.is_too_large() {
                ApiError::too_large(e.to_string())
            } else {
                ApiError::bad_request(e.to_string())
            }
        })?;
    // Across servers, the freshness rule of §11.3 holds for the whole
    // batch: it is checked once, and every message is stored after it, in
    // the one transaction, at the epoch it confirms.
    let started = fresh_at_epoch(state, channel, device, epoch, "the messages are").await?;
    for (index, message) in messages.iter().enumerate() {
        if private_message_header(message) != Some((channel, epoch)) {
            return Err(ApiError::bad_request(format!(
                "message {index} of the batch is not an MLS PrivateMessage of channel \
                 {channel} at epoch {epoch}"
            )));
        }
    }
    channels::start_epoch(state, channel, epoch, started).await?;
    let received_at = now_ms();
    let new: Vec<NewMessage> = messages
        .into_iter()
        .map(|message| NewMessage {
            id: kith_proto::sign::message_id(message),
            epoch,
            sender: device,
            message: message.to_vec(),
            received_at,
        })
        .collect();
    // As in `accept`: committed, then waited for on disk (one sync for the
    // whole batch, shared with concurrent writes) before anyone hears of
    // any of the messages.
    let (stored, events, token) = state
        .db(move |s| {
            s.store_messages_deferred(&channel, &new, &|m| {
                Value::Object(channels::message_json(channel, m)).to_string()
            })
        })
        .await?;
    state.db(move |s| s.wait_durable(token)).await?;
    state.hub.hand_off(&events);
    // New messages only (a repeat, also within the batch, is not counted).
    let fresh: std::collections::BTreeSet<u64> = stored
        .iter()
        .filter(|m| m.received_at == received_at)
        .map(|m| m.seq)
        .collect();
    state.metrics.channel_messages.inc_by(fresh.len() as u64);
    fan_out_many(state, channel, &stored).await?;
    let answers: Vec<Value> = stored
        .iter()
        .map(|m| json!({ "id": hex::encode(m.id), "seq": m.seq, "received_at": m.received_at }))
        .collect();
    Ok(Json(json!({ "messages": answers })))
}

/// Checks and stores one message sent in binary; answers as the JSON form.
#[tracing::instrument(skip_all, fields(device = %device, channel = %channel))]
async fn accept(
    state: &Shared,
    device: kith_proto::DeviceId,
    channel: ChannelId,
    epoch: u64,
    message: Vec<u8>,
) -> Result<Json<Value>, ApiError> {
    let limit = state.config.limits.max_message_bytes;
    if message.is_empty() {
        return Err(ApiError::bad_request("the message is empty"));
    }
    if message.len() > limit {
        return Err(ApiError::too_large(format!(
            "the message is {} bytes; the limit is {limit}",
            message.len()
        )));
    }
    let started = fresh_at_epoch(state, channel, device, epoch, "the message is").await?;
    // The receivers of the compact frame (§6.8) take the channel and epoch
    // from the MLS header: it must name this channel and epoch (a frame
    // for one that does not would carry them explicitly, but a sender has
    // no honest reason to send it).
    if private_message_header(&message) != Some((channel, epoch)) {
        return Err(ApiError::bad_request(format!(
            "the body is not an MLS PrivateMessage of channel {channel} at epoch {epoch}"
        )));
    }
    channels::start_epoch(state, channel, epoch, started).await?;
    let received_at = now_ms();
    let new = NewMessage {
        id: kith_proto::sign::message_id(&message),
        epoch,
        sender: device,
        message,
        received_at,
    };
    // Committed after the commit that started its epoch was certified here,
    // which fixes the message's place after every commit event of its
    // epoch; stored with the other messages posted meanwhile, in one
    // transaction and one disk sync (`writer`). Nobody hears of the message
    // before it is on disk: not the sender, not the members (reads wait for
    // it too).
    let (stored, _handed) = state.writer.store(channel, new).await?;
    if stored.received_at == received_at {
        state.metrics.channel_messages.inc();
    }
    // To the channel's other servers (a repeat is queued again; they
    // deduplicate).
    fan_out(state, channel, &stored).await?;
    Ok(Json(
        json!({ "id": hex::encode(stored.id), "seq": stored.seq, "received_at": stored.received_at }),
    ))
}

/// The binary frame of a stored event: a `message` event with its MLS
/// message as bytes (compact when its MLS header names its channel and
/// epoch), anything else as its JSON text.
fn frame(event: &Event) -> EventFrame {
    if event.kind == "message"
        && let Some(message) = message_event(&event.payload)
    {
        return EventFrame::message(event.cursor, message);
    }
    EventFrame::Json {
        cursor: event.cursor,
        json: event_text(event),
    }
}

/// A stored `message` payload (the JSON `channels` wrote) as its fields.
fn message_event(payload: &str) -> Option<MessageEvent> {
    let value: Value = serde_json::from_str(payload).ok()?;
    let text = |name: &str| value.get(name).and_then(Value::as_str);
    let number = |name: &str| value.get(name).and_then(Value::as_u64);
    Some(MessageEvent {
        channel: text("channel")?.parse().ok()?,
        seq: number("seq")?,
        epoch: number("epoch")?,
        received_at: number("received_at")?,
        sender: text("sender")?.parse().ok()?,
        message: unb64("message", text("message")?).ok()?,
    })
}

/// A list of events as one `application/octet-stream` body of frames.
pub(super) fn events_response(events: &[Event]) -> Response {
    let mut body = Vec::new();
    for event in events {
        encode_frame(&frame(event), &mut body);
    }
    ([(header::CONTENT_TYPE, OCTET_STREAM)], body).into_response()
}
