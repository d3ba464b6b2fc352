//! Device inboxes: any registered device deposits sealed envelopes for a
//! local device; the owner lists and deletes them. Each deposit also lands
//! in the recipient's event log as an `inbox` event.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiJson, ApiPath, Authed, b64, list_limit, parse_device, unb64};
use crate::error::ApiError;
use crate::federation::{outbox, random_16, remote};
use crate::state::{Shared, now_ms};
use crate::store::InboxItem;

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v0/inbox", get(list))
        .route("/v0/inbox/{target}", post(deposit).delete(delete))
}

/// The JSON form of an item, in listings and in `inbox` events.
pub(crate) fn item_json(item: &InboxItem) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("id".into(), item.id.into());
    map.insert("envelope".into(), b64(&item.envelope).into());
    map.insert("received_at".into(), item.received_at.into());
    map
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DepositRequest {
    envelope: String,
}

#[tracing::instrument(skip_all, fields(sender = %sender, recipient = %target))]
async fn deposit(
    State(state): State<Shared>,
    Authed(sender): Authed,
    ApiPath(target): ApiPath<String>,
    ApiJson(req): ApiJson<DepositRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let recipient = parse_device(&target)?;
    let envelope = unb64("envelope", &req.envelope)?;
    let limit = state.config.limits.max_envelope_bytes;
    if envelope.is_empty() {
        return Err(ApiError::bad_request("`envelope` is empty"));
    }
    if envelope.len() > limit {
        return Err(ApiError::too_large(format!(
            "the envelope is {} bytes; the limit is {limit}",
            envelope.len()
        )));
    }
    let local = state.db(move |s| s.device(&recipient)).await?.is_some();
    let remote = if local {
        None
    } else {
        let server = remote::inbox_server(&state, recipient)
            .await?
            .ok_or_else(|| {
                ApiError::not_found(
                    "no such device is registered here or known from another server \
                 (fetch its user first)",
                )
            })?;
        if server == state.config.server_name {
            return Err(ApiError::not_found("no such device is registered here"));
        }
        remote::not_blocked(&state, &server)?;
        Some(server)
    };
    if let Err(wait) = state.inbox_limiter.check(sender) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many inbox deposits; slow down",
        );
        e.retry_after_ms = Some(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        return Err(e);
    }
    if let Some(server) = remote {
        // Another server's device: into the outbox, delivered (and
        // deduplicated by `deposit_id`) over federation.
        let body = json!({
            "deposit_id": hex::encode(random_16()),
            "envelope": b64(&envelope),
        })
        .to_string()
        .into_bytes();
        let path = format!("/v0/federation/inbox/{recipient}");
        let id = outbox::enqueue(&state, server.clone(), path, body).await?;
        tracing::info!(%server, outbox = id, "queued a remote inbox deposit");
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "queued": true, "server": server.as_str() })),
        ));
    }
    let max_items = state.config.limits.max_inbox_items;
    let received_at = now_ms();
    let (item, event) = state
        .db(move |s| {
            s.deposit_inbox(&recipient, &envelope, received_at, max_items, &|item| {
                Value::Object(item_json(item)).to_string()
            })
        })
        .await?;
    state.metrics.inbox_deposits.inc();
    state.hub.hand_off(&[(recipient, event)]);
    Ok((StatusCode::OK, Json(json!({ "id": item.id }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<Shared>,
    Authed(device): Authed,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let after = query.after.unwrap_or(0);
    let limit = list_limit(&state, query.limit);
    let items = state.db(move |s| s.inbox(&device, after, limit)).await?;
    let items: Vec<Value> = items.iter().map(|i| Value::Object(item_json(i))).collect();
    Ok(Json(json!({ "items": items })))
}

async fn delete(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiPath(target): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = target
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{target:?} is not an inbox item id")))?;
    // Deleting is idempotent: an item already gone is not an error, so a
    // client may retry after a lost answer.
    state.db(move |s| s.delete_inbox(&device, id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
