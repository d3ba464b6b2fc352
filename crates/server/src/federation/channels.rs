//! What the servers of a channel ask each other (spec §10.8, §11.3):
//!
//! - `GET /v0/federation/channels/{id}/genesis` → `{"group_info", "ratchet_tree",
//!   "records": [b64]}`: the channel's epoch-0 state and its creator's record, for
//!   a server that joins the channel's Raft group (only to servers in the
//!   answering server's Raft membership of the channel);
//! - `POST /v0/federation/channels/{id}/submit`, a `Submission` (the Raft log
//!   entry's JSON) → `{"outcome": "accepted", "epoch", "commit_hash"}`,
//!   `{"outcome": "wrong_epoch", "current"}`, `{"outcome": "rejected", "reason"}`
//!   or `{"outcome": "not_leader", "leader"?}`: a commit forwarded to the
//!   channel's Raft leader by the committer's homeserver (its `submitter.server`);
//! - `POST /v0/federation/channels/{id}/votes` `{"epoch", "commit_hash"}` →
//!   `{"vote": b64}`: this server's `Vote` for the commit its own log accepted
//!   for that epoch, once it has applied it (409 `another_commit` if its log
//!   accepted another, 503 `not_yet` if it has not got that far within a few
//!   seconds);
//! - `POST /v0/federation/channels/{id}/certificate` `{"certificate": b64}` →
//!   `{"stored": bool}`: a certificate pushed by the server that collected
//!   its votes; stored only if it certifies the commit this server's own log
//!   accepted for its epoch and verifies against this server's voter set
//!   (400 `invalid_certificate`, 409 `another_commit`, 503 `not_yet`);
//! - `POST /v0/federation/channels/{id}/messages` `{"messages": [{"epoch",
//!   "sender", "message"}]}` → `{"stored": n}`: application messages fanned
//!   out by the sender's homeserver, deduplicated by MessageId;
//! - `GET /v0/federation/channels/{id}/messages?after=S&min_epoch=E` →
//!   `{"epoch", "messages": [{"seq", "epoch", "sender", "message"}], "next",
//!   "more"}`: the messages this server accepted from its own devices after
//!   its sequence number `S`, for a peer that pulls what it may have missed
//!   before releasing a commit (`crate::backfill`).

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use kith_order::{CommitHash, Outcome, Submission, Vote};
use kith_proto::{ChannelId, DeviceId, DeviceRecordIn, ServerName};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Signed;
use crate::api::{ApiPath, b64, unb64};
use crate::channels::{cache_records, catch_up, lock_mls};
use crate::error::ApiError;
use crate::ordering::{Ordered, PushRefused, accept_pushed, deliver_remote_messages, order_local};
use crate::state::Shared;

/// How long a voter waits for its own log to reach the epoch it is asked
/// to vote for.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Most messages in one fan-out request.
pub(crate) const MAX_FANOUT_BATCH: usize = 100;

pub(crate) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v0/federation/channels/{id}/genesis", get(genesis))
        .route("/v0/federation/channels/{id}/submit", post(submit))
        .route("/v0/federation/channels/{id}/votes", post(vote))
        .route(
            "/v0/federation/channels/{id}/certificate",
            post(pushed_certificate),
        )
        .route(
            "/v0/federation/channels/{id}/messages",
            post(messages).get(pull_messages),
        )
        .route("/v0/federation/raft/{id}/{kind}", post(super::raft::rpc))
}

fn parse_channel(text: &str) -> Result<ChannelId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a channel id (32 hex digits)")))
}

fn json_body<T: serde::de::DeserializeOwned>(signed: &Signed) -> Result<T, ApiError> {
    serde_json::from_slice(&signed.body)
        .map_err(|e| ApiError::bad_request(format!("the body is not the expected JSON: {e}")))
}

/// 403 unless `origin` is in this server's Raft membership of `channel`.
async fn require_peer(
    state: &Shared,
    channel: ChannelId,
    origin: &ServerName,
) -> Result<(), ApiError> {
    if state.db(move |s| s.channel(&channel)).await?.is_none() {
        return Err(ApiError::not_found(format!("no channel {channel} here")));
    }
    let orderer = state
        .channels
        .orderer(channel, false)
        .await
        .map_err(|e| ApiError::internal(format!("the channel's orderer: {e}")))?;
    let (voters, learners) = orderer.membership();
    if voters.contains(origin) || learners.contains(origin) {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{origin} is not a server of channel {channel}"
        )))
    }
}

/// The encoded record of `device`: its own if registered here, else its
/// last one if it was removed from this server (it may still be a member of
/// channels, whose voters every server must compute alike, §6.4), else the
/// cached one. A local id is never answered from the remote cache: another
/// server's copy cannot override a local device or its removal.
pub(crate) fn record_bytes(
    store: &dyn crate::store::Store,
    device: &DeviceId,
) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
    if let Some(row) = store.device(device)? {
        return Ok(Some(row.record));
    }
    if let Some(removed) = store.removed_device(device)? {
        return Ok(Some(removed.row.record));
    }
    Ok(store.remote_record(device)?.map(|r| r.record))
}

/// Why a device a commit adds has no record to travel with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoRecord {
    /// Neither registered here nor cached.
    Unknown(DeviceId),
    /// Removed from this server (§6.4): it may never be added again, even
    /// with a key package claimed before its removal.
    Removed(DeviceId),
}

/// The records of the devices a commit adds, in order, or the first device
/// that cannot be added.
pub(crate) fn added_records(
    store: &dyn crate::store::Store,
    added: &[DeviceId],
) -> Result<Result<Vec<Vec<u8>>, NoRecord>, crate::store::StoreError> {
    let mut records = Vec::with_capacity(added.len());
    for d in added {
        if store.device(d)?.is_none() && store.removed_device(d)?.is_some() {
            return Ok(Err(NoRecord::Removed(*d)));
        }
        match record_bytes(store, d)? {
            Some(r) => records.push(r),
            None => return Ok(Err(NoRecord::Unknown(*d))),
        }
    }
    Ok(Ok(records))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::{DeviceRow, MemoryStore, RemoteRecord, Store};

    #[test]
    fn a_removed_device_is_answered_from_here_and_cannot_be_added() {
        let store = MemoryStore::new();
        let d = DeviceId::from_bytes([1; 32]);
        let row = DeviceRow {
            device: d,
            name: "alice".parse().unwrap(),
            identity_key: [1; 32],
            record: vec![1],
            record_at: 1,
            registered_at: 1,
        };
        store.register(&row).unwrap();
        store.remove_device(&d, None, 2, "{}").unwrap().unwrap();
        // A copy cached from another server does not override the removal.
        store
            .put_remote_record(&RemoteRecord {
                device: d,
                server: "b.test".parse().unwrap(),
                record: vec![2],
                fetched_at: 3,
            })
            .unwrap();
        assert_eq!(record_bytes(&store, &d).unwrap(), Some(vec![1]));
        assert_eq!(
            added_records(&store, &[d]).unwrap(),
            Err(NoRecord::Removed(d))
        );
        let unknown = DeviceId::from_bytes([9; 32]);
        assert_eq!(
            added_records(&store, &[unknown]).unwrap(),
            Err(NoRecord::Unknown(unknown))
        );
    }
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %id))]
async fn genesis(
    State(state): State<Shared>,
    ApiPath(id): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    require_peer(&state, channel, &signed.origin).await?;
    let first = state
        .db(move |s| s.epoch_state(&channel, 0))
        .await?
        .ok_or_else(|| ApiError::not_found("the channel's epoch 0 is not kept here"))?;
    let members = first.members.clone();
    let records = state
        .db(move |s| {
            let mut out = Vec::new();
            for m in &members {
                if let Some(r) = record_bytes(s, m)? {
                    out.push(b64(&r));
                }
            }
            Ok(out)
        })
        .await?;
    Ok(Json(json!({
        "group_info": b64(&first.group_info),
        "ratchet_tree": b64(&first.ratchet_tree),
        "records": records,
    })))
}

#[derive(Deserialize)]
struct GenesisAnswer {
    group_info: String,
    ratchet_tree: String,
    #[serde(default)]
    records: Vec<String>,
}

/// Makes `channel` known here from its genesis, fetched from `from` (a
/// member of its group that is adding this server): the epoch-0 state is
/// checked like a channel created by a client (§6.7), then the Raft log
/// replays every commit since through the validator.
pub(crate) async fn join(
    state: &Shared,
    channel: ChannelId,
    from: &ServerName,
) -> Result<(), ApiError> {
    let path = format!("/v0/federation/channels/{channel}/genesis");
    let answer = state.federation.client.get(from, &path).await?;
    let answer: GenesisAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
        ApiError::new(
            reqwest::StatusCode::BAD_GATEWAY,
            "remote_invalid",
            format!("{from} sent an invalid genesis: {e}"),
        )
    })?;
    let group_info = unb64("group_info", &answer.group_info)?;
    let ratchet_tree = unb64("ratchet_tree", &answer.ratchet_tree)?;
    let records = answer
        .records
        .iter()
        .map(|r| unb64("records", r))
        .collect::<Result<Vec<_>, _>>()?;
    let (row, first) = crate::api::channels::genesis(channel, group_info, ratchet_tree).await?;
    if first.members.len() != 1 {
        return Err(ApiError::bad_request(
            "the genesis is not epoch 0 of this channel with one member",
        ));
    }
    let creator = first.members.first().copied();
    let creator_ok = records.iter().any(|bytes| {
        DeviceRecordIn::decode(bytes)
            .ok()
            .and_then(|r| r.verify_as_of_update().ok())
            .is_some_and(|r| Some(r.device_id()) == creator)
    });
    if !creator_ok {
        return Err(ApiError::bad_request(
            "the genesis lacks its creator's record",
        ));
    }
    let store = state.store.clone();
    let channels = state.channels.clone();
    tokio::task::spawn_blocking(move || {
        if store.channel(&channel)?.is_none() {
            store.create_channel(&row, &first)?;
        }
        cache_records(store.as_ref(), &records);
        let mls = lock_mls(&channels.mls);
        catch_up(&mls, store.as_ref(), channel)
            .map(|_| ())
            .map_err(crate::store::StoreError::Corrupt)
    })
    .await
    .map_err(|_| ApiError::internal("storing the genesis failed"))??;
    tracing::info!(%channel, %from, "joined a channel's ordering group");
    Ok(())
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %id))]
async fn submit(
    State(state): State<Shared>,
    ApiPath(id): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let submission: Submission = json_body(&signed)?;
    if submission.channel != channel {
        return Err(ApiError::bad_request(
            "the submission is for another channel",
        ));
    }
    if submission.submitter.server != signed.origin {
        return Err(ApiError::forbidden(
            "a server may only forward its own devices' commits",
        ));
    }
    require_peer(&state, channel, &signed.origin).await?;
    // Checked after `require_peer`, so that only the channels an origin
    // shares with this server get a bucket.
    if let Err(wait) = state
        .federation
        .submit_limiter
        .check((signed.origin.clone(), channel))
    {
        return Err(ApiError::rate_limited(
            format!(
                "too many submissions from {} for channel {channel}; slow down",
                signed.origin
            ),
            wait,
        ));
    }
    // Blocking is this server's policy: as leader it does not let a commit
    // bring a blocked server's devices (and so that server) into the group.
    let blocked = &state.config.blocked_servers;
    for bytes in &submission.records {
        if let Some(record) = DeviceRecordIn::decode(bytes)
            .ok()
            .and_then(|r| r.verify_as_of_update().ok())
            && !record.sponsorships().is_empty()
            && record
                .sponsorships()
                .iter()
                .all(|s| blocked.contains(s.server()))
        {
            return Err(super::blocked(format!(
                "the commit adds {}, sponsored only by servers this server blocks",
                record.device_id()
            )));
        }
    }
    let answer = match order_local(&state, submission).await? {
        Ordered::Outcome(Outcome::Accepted { epoch, commit_hash }) => json!({
            "outcome": "accepted",
            "epoch": epoch,
            "commit_hash": commit_hash.to_string(),
        }),
        Ordered::Outcome(Outcome::WrongEpoch { current, .. }) => {
            json!({ "outcome": "wrong_epoch", "current": current })
        }
        Ordered::Outcome(Outcome::Rejected { reason }) => {
            json!({ "outcome": "rejected", "reason": reason })
        }
        Ordered::NotLeader(leader) => json!({
            "outcome": "not_leader",
            "leader": leader.map(|l| l.as_str().to_owned()),
        }),
    };
    Ok(Json(answer))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoteRequest {
    epoch: u64,
    commit_hash: String,
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %id))]
async fn vote(
    State(state): State<Shared>,
    ApiPath(id): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let req: VoteRequest = json_body(&signed)?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&req.commit_hash, &mut hash)
        .map_err(|_| ApiError::bad_request("`commit_hash` is not 64 hex digits"))?;
    // Only a server of the channel's group may ask (this also starts this
    // server's node, so its log can get there): a vote is about the group's
    // log, and waiting on a stranger's made-up epoch would cost a timer.
    require_peer(&state, channel, &signed.origin).await?;
    let epoch = req.epoch;
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    let stored = loop {
        if let Some(row) = state.db(move |s| s.commit(&channel, epoch)).await? {
            break row;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::new(
                reqwest::StatusCode::SERVICE_UNAVAILABLE,
                "not_yet",
                format!("this server's log has not accepted a commit for epoch {epoch} yet"),
            ));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        state.channels.wait_accepted(channel, epoch, left).await;
    };
    if stored.commit_hash != hash {
        return Err(ApiError::conflict(
            "another_commit",
            format!("this server's log accepted another commit for epoch {epoch}"),
        ));
    }
    let vote = Vote::sign(
        &state.key,
        state.config.server_name.clone(),
        channel,
        epoch,
        CommitHash::from_bytes(hash),
    );
    Ok(Json(json!({ "vote": b64(&vote.encode()) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushedCertificate {
    certificate: String,
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %id))]
async fn pushed_certificate(
    State(state): State<Shared>,
    ApiPath(id): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let req: PushedCertificate = json_body(&signed)?;
    let bytes = unb64("certificate", &req.certificate)?;
    // Only a server of the channel's group may push: checking a certificate
    // costs signature checks and waiting for the log costs a timer.
    require_peer(&state, channel, &signed.origin).await?;
    match accept_pushed(&state, channel, &bytes, APPLY_WAIT).await? {
        Ok(stored) => Ok(Json(json!({ "stored": stored }))),
        Err(refused @ PushRefused::NotYet(_)) => Err(ApiError::new(
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            "not_yet",
            refused.to_string(),
        )),
        Err(refused @ PushRefused::AnotherCommit(_)) => {
            Err(ApiError::conflict("another_commit", refused.to_string()))
        }
        Err(refused @ (PushRefused::Malformed(_) | PushRefused::Invalid(_))) => {
            tracing::warn!(%channel, origin = %signed.origin, "a pushed certificate refused: {refused}");
            Err(ApiError::new(
                reqwest::StatusCode::BAD_REQUEST,
                "invalid_certificate",
                refused.to_string(),
            ))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FanOut {
    messages: Vec<FannedMessage>,
}

/// One application message as fanned out between servers.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FannedMessage {
    pub(crate) epoch: u64,
    pub(crate) sender: String,
    pub(crate) message: String,
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %id))]
async fn messages(
    State(state): State<Shared>,
    ApiPath(id): ApiPath<String>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let req: FanOut = json_body(&signed)?;
    if req.messages.is_empty() || req.messages.len() > MAX_FANOUT_BATCH {
        return Err(ApiError::bad_request(format!(
            "a fan-out carries 1 to {MAX_FANOUT_BATCH} messages"
        )));
    }
    if state.db(move |s| s.channel(&channel)).await?.is_none() {
        // This server has not joined the channel's group yet: try later.
        return Err(ApiError::new(
            reqwest::StatusCode::SERVICE_UNAVAILABLE,
            "not_yet",
            format!("channel {channel} is not known here yet"),
        ));
    }
    let stored = deliver_remote_messages(&state, channel, &signed.origin, req.messages).await?;
    Ok(Json(json!({ "stored": stored })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PullQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    min_epoch: u64,
}

#[tracing::instrument(skip_all, fields(origin = %signed.origin, %id))]
async fn pull_messages(
    State(state): State<Shared>,
    ApiPath(id): ApiPath<String>,
    query: Result<Query<PullQuery>, QueryRejection>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(format!(
            "expected `?after=SEQ&min_epoch=E` (both optional): {}",
            e.body_text()
        ))
    })?;
    require_peer(&state, channel, &signed.origin).await?;
    Ok(Json(
        crate::backfill::own_messages(&state, channel, q.after, q.min_epoch).await?,
    ))
}
