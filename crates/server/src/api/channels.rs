//! Channels, commits and messages: creating a channel from its creator's
//! GroupInfo and tree, ordering commits through the channel's ordering group
//! and certifying them (`crate::ordering`), serving the tree and GroupInfo
//! of each epoch, and storing and fanning out application messages.
//!
//! A message of epoch *e* is stored only once the commit that started *e*
//! is certified here, so a commit's events come before those of any message
//! of the epoch it starts.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use kith_mls::{MlsStore, PublicChannel};
use kith_order::{Outcome, Submission, Submitter};
use kith_proto::{ChannelId, DeviceId};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use super::{ApiJson, ApiPath, Authed, b64, list_limit, unb64};
use crate::channels::{catch_up, lock_mls};
use crate::error::ApiError;
use crate::federation::channels::{NoRecord, added_records};
use crate::federation::remote::refuse_added_device;
use crate::ordering::{certify, fan_out, order};
use crate::state::{Shared, now_ms};
use crate::store::{ChannelRow, CommitRow, EpochState, MessageRow, NewMessage};

pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v0/channels", get(list_channels).post(create))
        .route("/v0/channels/{id}/commits", get(list_commits).post(commit))
        .route("/v0/channels/{id}/tree", get(tree))
        .route(
            "/v0/channels/{id}/messages",
            get(list_messages).post(super::binary::post_message),
        )
}

pub(super) fn parse_channel(text: &str) -> Result<ChannelId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a channel id (32 hex digits)")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

/// The channel, or 404.
pub(super) async fn channel_row(
    state: &Shared,
    channel: ChannelId,
) -> Result<ChannelRow, ApiError> {
    state
        .db(move |s| s.channel(&channel))
        .await?
        .ok_or_else(|| no_channel(channel))
}

/// As [`channel_row`], read as a check before a write of the caller's own
/// (it does not wait for others' writes to reach the disk, see
/// [`crate::store::unsynced`]); not for rows that are served.
pub(super) async fn channel_row_check(
    state: &Shared,
    channel: ChannelId,
) -> Result<ChannelRow, ApiError> {
    state
        .db_check(move |s| s.channel(&channel))
        .await?
        .ok_or_else(|| no_channel(channel))
}

fn no_channel(channel: ChannelId) -> ApiError {
    ApiError::not_found(format!("no channel {channel} here"))
}

/// The checks before a message of `epoch` by `device` is stored, read in
/// one trip to the store (each a check, see [`crate::store::unsynced`]):
/// the channel (404 if unknown), the sender's membership (403
/// `not_member`), and whether the commit that started `epoch` is certified
/// here (so that its `commit` events are delivered before the message;
/// [`start_epoch`] acts on it).
pub(super) async fn message_checks(
    state: &Shared,
    channel: ChannelId,
    device: DeviceId,
    epoch: u64,
) -> Result<(ChannelRow, bool), ApiError> {
    let (row, member, started) = state
        .db_check(move |s| {
            let row = s.channel(&channel)?;
            let member = row.is_some() && s.is_member(&channel, &device)?;
            let started = match epoch.checked_sub(1) {
                Some(previous) if row.is_some() => s
                    .commit(&channel, previous)?
                    .is_some_and(|c| c.certificate.is_some()),
                _ => true,
            };
            Ok((row, member, started))
        })
        .await?;
    let row = row.ok_or_else(|| no_channel(channel))?;
    if !member {
        return Err(ApiError::not_member(
            "this device is not a member of the channel",
        ));
    }
    Ok((row, started))
}

/// Before a message of `epoch` is stored: the commit that started the
/// epoch is certified here, so its `commit` events are delivered before
/// the message. [`message_checks`] read whether it is already (the usual
/// case; a certificate, once stored, stays); if not, certifies it now.
pub(super) async fn start_epoch(
    state: &Shared,
    channel: ChannelId,
    epoch: u64,
    started: bool,
) -> Result<(), ApiError> {
    match epoch.checked_sub(1) {
        Some(previous) if !started => certify(state, channel, previous).await.map(drop),
        _ => Ok(()),
    }
}

/// 403 `not_member` unless `device` is a current member. A check: what a
/// request then serves or stores is read or written with the usual wait
/// for the disk.
pub(super) async fn require_member(
    state: &Shared,
    channel: ChannelId,
    device: DeviceId,
) -> Result<(), ApiError> {
    if state
        .db_check(move |s| s.is_member(&channel, &device))
        .await?
    {
        Ok(())
    } else {
        Err(ApiError::not_member(
            "this device is not a member of the channel",
        ))
    }
}

fn channel_json(row: &ChannelRow) -> Value {
    json!({
        "channel": row.channel.to_string(),
        "name": row.name,
        "content_type": row.content_type,
        "epoch": row.epoch,
    })
}

// -- channels -----------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    channel: String,
    group_info: String,
    ratchet_tree: String,
}

/// Checks a channel's epoch-0 GroupInfo and tree (§6.7 steps 1–3) on a
/// scratch store, so a refused channel leaves nothing, and returns the
/// channel's row and its epoch-0 state. Used for channels clients create
/// and for channels a server joins from another server's genesis.
pub(crate) async fn genesis(
    channel: ChannelId,
    group_info: Vec<u8>,
    ratchet_tree: Vec<u8>,
) -> Result<(ChannelRow, EpochState), ApiError> {
    tokio::task::spawn_blocking(move || {
        let scratch = MlsStore::in_memory()
            .map_err(|e| ApiError::internal(format!("scratch MLS store: {e}")))?;
        let public = PublicChannel::create(&scratch, &group_info, &ratchet_tree)
            .map_err(|e| ApiError::bad_request(format!("cannot create the channel: {e}")))?;
        if public.id() != channel {
            return Err(ApiError::bad_request(format!(
                "the GroupInfo is for channel {}, not {channel}",
                public.id()
            )));
        }
        if public.epoch() != 0 {
            return Err(ApiError::bad_request(format!(
                "a new channel starts at epoch 0, this GroupInfo is for epoch {}",
                public.epoch()
            )));
        }
        let extension = public.extension();
        let row = ChannelRow {
            channel,
            name: extension.name.as_str().to_owned(),
            content_type: extension.content_type.as_str().to_owned(),
            epoch: 0,
            created_at: now_ms(),
        };
        let first = EpochState {
            epoch: 0,
            ratchet_tree: public
                .ratchet_tree()
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
            group_info,
            members: public.members(),
        };
        Ok((row, first))
    })
    .await
    .map_err(|_| ApiError::internal("channel check failed"))?
}

#[tracing::instrument(skip_all, fields(device = %device))]
async fn create(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiJson(req): ApiJson<CreateRequest>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&req.channel)?;
    let group_info = unb64("group_info", &req.group_info)?;
    let ratchet_tree = unb64("ratchet_tree", &req.ratchet_tree)?;
    let (row, first) = genesis(channel, group_info, ratchet_tree).await?;
    if first.members != [device] {
        return Err(ApiError::forbidden(
            "a new channel's only member must be the creating device",
        ));
    }
    let (r, f) = (row.clone(), first);
    state.db(move |s| s.create_channel(&r, &f)).await?;
    // The store holds the channel now; the MLS state and the orderer follow
    // (and are rebuilt from the store if this fails half-way).
    let channels = state.channels.clone();
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mls = lock_mls(&channels.mls);
        catch_up(&mls, store.as_ref(), channel).map(|_| ())
    })
    .await
    .map_err(|_| ApiError::internal("creating the MLS state failed"))?
    .map_err(|e| {
        tracing::error!(%channel, error = %e, "creating the MLS state");
        ApiError::internal("creating the channel's MLS state failed")
    })?;
    state.channels.orderer(channel, true).await.map_err(|e| {
        tracing::error!(%channel, error = %e, "starting the orderer");
        ApiError::internal("the channel's orderer did not start")
    })?;
    // Its log now says this server orders it alone; the node starts again
    // from it when the channel is first used.
    state.channels.park(channel).await;
    tracing::info!(%channel, "channel created");
    Ok(Json(json!({
        "channel": channel.to_string(),
        "epoch": 0,
        "name": row.name,
        "content_type": row.content_type,
    })))
}

#[tracing::instrument(skip_all, fields(device = %device))]
async fn list_channels(
    State(state): State<Shared>,
    Authed(device): Authed,
) -> Result<Json<Value>, ApiError> {
    let rows = state.db(move |s| s.channels_of(&device)).await?;
    let channels: Vec<Value> = rows.iter().map(channel_json).collect();
    Ok(Json(json!({ "channels": channels })))
}

// -- commits ------------------------------------------------------------------

/// Starts the channel's orderer if needed, and certifies the latest
/// accepted commit if its certificate (and events) were not stored — after
/// a crash, or a failure between accepting and certifying. Without that the
/// channel would stay at that epoch with nobody able to merge it.
/// `certify` does nothing for a commit already certified.
pub(super) async fn ready(state: &Shared, channel: ChannelId) -> Result<(), ApiError> {
    state.channels.orderer(channel, false).await.map_err(|e| {
        tracing::error!(%channel, error = %e, "starting the orderer");
        ApiError::internal("the channel's orderer did not start")
    })?;
    let row = channel_row(state, channel).await?;
    if let Some(last) = row.epoch.checked_sub(1) {
        certify(state, channel, last).await?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    epoch: u64,
    commit: String,
    #[serde(default)]
    welcome: Option<String>,
    group_info: String,
    #[serde(default)]
    ratchet_tree: Option<String>,
}

#[tracing::instrument(skip_all, fields(device = %device, channel = %id))]
async fn commit(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CommitRequest>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let commit = unb64("commit", &req.commit)?;
    let welcome = req
        .welcome
        .as_deref()
        .map(|w| unb64("welcome", w))
        .transpose()?;
    let group_info = unb64("group_info", &req.group_info)?;
    // The submitter's tree is only checked for being base64: servers serve
    // the tree they compute from the commit (spec §10.3), so it stays out
    // of the ordering log, where it would be the largest field (O(members))
    // and be written and replicated to every server for nothing.
    if let Some(tree) = req.ratchet_tree.as_deref() {
        unb64("ratchet_tree", tree)?;
    }
    // Every commit costs every server of the channel an MLS validation, a
    // Raft round and a certificate, and every member a merge (spec §10.8).
    if let Err(wait) = state.commit_limiter.check(device) {
        return Err(ApiError::rate_limited(
            format!("too many commits from device {device}; slow down"),
            wait,
        ));
    }
    let result = order_commit(
        &state,
        channel,
        device,
        Submission {
            channel,
            epoch: req.epoch,
            commit,
            welcome,
            group_info,
            ratchet_tree: None,
            submitter: Submitter {
                server: state.config.server_name.clone(),
                device,
            },
            records: Vec::new(),
        },
    )
    .await;
    if let Err(e) = &result
        && (e.code == "rejected" || e.code == "wrong_epoch" || e.code == "forbidden")
    {
        state.metrics.commits_rejected.inc();
    }
    let row = result?;
    Ok(Json(json!({
        "epoch": row.epoch,
        "commit_hash": hex::encode(row.commit_hash),
        "certificate": b64(row.certificate.as_deref().unwrap_or_default()),
    })))
}

async fn order_commit(
    state: &Shared,
    channel: ChannelId,
    device: DeviceId,
    mut submission: Submission,
) -> Result<CommitRow, ApiError> {
    let row = channel_row(state, channel).await?;
    require_member(state, channel, device).await?;
    ready(state, channel)
        .instrument(tracing::debug_span!("commit.ready"))
        .await?;
    // The resubmission of an accepted commit (a retry after a lost answer)
    // gets the same answer.
    let epoch = submission.epoch;
    let hash = *submission.commit_hash().as_bytes();
    if let Some(stored) = state.db(move |s| s.commit(&channel, epoch)).await?
        && stored.commit_hash == hash
    {
        return certify(state, channel, epoch).await;
    }
    let row = channel_row(state, channel).await.unwrap_or(row);
    if submission.epoch != row.epoch {
        // Looked up again: the commit may have been applied since the
        // check above (ordered from this server's log while its peers came
        // back), and its resubmission must not be told that it lost.
        if let Some(stored) = state.db(move |s| s.commit(&channel, epoch)).await?
            && stored.commit_hash == hash
        {
            return certify(state, channel, epoch).await;
        }
        let e = ApiError::wrong_epoch(
            row.epoch,
            format!(
                "wrong epoch: the channel is at epoch {}, the commit is for {}",
                row.epoch, submission.epoch
            ),
        );
        return Err(with_winner(state, channel, submission.epoch, e).await);
    }
    let added = match precheck(state, channel, device, epoch, submission.commit.clone())
        .instrument(tracing::debug_span!("commit.precheck"))
        .await
    {
        Err(e) if e.code == "wrong_epoch" => {
            return Err(with_winner(state, channel, epoch, e).await);
        }
        other => other?,
    };
    // Every server of the channel learns who sponsors the new members from
    // the log itself: the records travel with the commit.
    submission.records =
        state
            .db(move |s| added_records(s, &added))
            .await?
            .map_err(|no| match no {
                NoRecord::Unknown(d) => ApiError::bad_request(format!(
                    "device {d} is not known here; look its user up through this server first"
                )),
                NoRecord::Removed(d) => ApiError::forbidden(format!(
                    "device {d} was removed from this server and cannot be added to a channel"
                )),
            })?;
    let ordered = order(state, submission)
        .instrument(tracing::debug_span!("commit.order"))
        .await?;
    match ordered {
        Outcome::Accepted { epoch, .. } => {
            let row = certify(state, channel, epoch)
                .instrument(tracing::debug_span!("commit.certify"))
                .await?;
            tracing::info!(%channel, epoch, "commit accepted");
            Ok(row)
        }
        Outcome::WrongEpoch { current, .. } => {
            let e = ApiError::wrong_epoch(
                current,
                format!("wrong epoch: the channel is at epoch {current}"),
            );
            // The winner may still be on its way to this server's log.
            if let Some(winner_epoch) = current.checked_sub(1)
                && winner_epoch >= epoch
            {
                let _ = certify(state, channel, epoch).await;
            }
            Err(with_winner(state, channel, epoch, e).await)
        }
        Outcome::Rejected { reason } => Err(ApiError::rejected(reason)),
    }
}

/// Adds to a `wrong_epoch` answer the certified commit that won `epoch`,
/// so the loser can process it without another request. Best effort: the
/// answer stands without it.
async fn with_winner(state: &Shared, channel: ChannelId, epoch: u64, mut e: ApiError) -> ApiError {
    if let Ok(Some(stored)) = state.db(move |s| s.commit(&channel, epoch)).await
        && let Some(certificate) = stored.certificate.as_deref()
    {
        e.winner = Some(json!({
            "epoch": stored.epoch,
            "commit": b64(&stored.commit),
            "commit_hash": hex::encode(stored.commit_hash),
            "certificate": b64(certificate),
        }));
    }
    e
}

/// Checks the commit against the channel's current MLS state before it
/// goes into the log: 400 `rejected` if invalid, 403 `forbidden` if another
/// device made it. Returns the devices it adds.
async fn precheck(
    state: &Shared,
    channel: ChannelId,
    device: DeviceId,
    epoch: u64,
    commit: Vec<u8>,
) -> Result<Vec<DeviceId>, ApiError> {
    let channels = state.channels.clone();
    let store = state.store.clone();
    let blocked = state.config.blocked_servers.clone();
    tokio::task::spawn_blocking(move || {
        let mls = lock_mls(&channels.mls);
        let public = catch_up(&mls, store.as_ref(), channel).map_err(|e| {
            tracing::error!(%channel, error = %e, "catching up the MLS state");
            ApiError::internal("the channel's MLS state is unavailable")
        })?;
        // Another server's commit may have won the epoch since the caller
        // looked: that is a lost race, not an invalid commit.
        if public.epoch() != epoch {
            return Err(ApiError::wrong_epoch(
                public.epoch(),
                format!(
                    "wrong epoch: the channel is at epoch {}, the commit is for {epoch}",
                    public.epoch()
                ),
            ));
        }
        let validated = public
            .validate_commit(&commit)
            .map_err(|e| ApiError::rejected(e.to_string()))?;
        if validated.info().sender != device {
            return Err(ApiError::forbidden(
                "the commit was made by another device than the one submitting it",
            ));
        }
        // Blocking is local policy, checked here and never in the
        // deterministic validator.
        for added in &validated.info().added {
            if let Some(why) = refuse_added_device(store.as_ref(), &blocked, added)? {
                return Err(crate::federation::blocked(why));
            }
        }
        Ok(validated.info().added.clone())
    })
    .await
    .map_err(|_| ApiError::internal("checking the commit failed"))?
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitsQuery {
    from_epoch: Option<u64>,
    limit: Option<usize>,
}

#[tracing::instrument(skip_all, fields(device = %device, channel = %id))]
async fn list_commits(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiPath(id): ApiPath<String>,
    q: Result<Query<CommitsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let q = query(q)?;
    channel_row(&state, channel).await?;
    if !state.db(move |s| s.was_member(&channel, &device)).await? {
        return Err(ApiError::not_member(
            "this device never was a member of the channel",
        ));
    }
    // Orderers start on demand, and after a restart nothing else may start
    // this one: a server that was down while a commit was ordered would
    // then never hear of it, and its devices would stay an epoch behind.
    // A device asking what it missed runs the node, so it catches up.
    state.channels.orderer(channel, false).await.map_err(|e| {
        tracing::error!(%channel, error = %e, "starting the orderer");
        ApiError::internal("the channel's orderer did not start")
    })?;
    let from = q.from_epoch.unwrap_or(0);
    let limit = list_limit(&state, q.limit);
    let mut rows = state.db(move |s| s.commits(&channel, from, limit)).await?;
    if rows.iter().any(|r| r.certificate.is_none()) {
        // Accepted just before a crash, or certification still under way:
        // certify it now.
        if let Err(e) = ready(&state, channel).await {
            tracing::info!(%channel, "certifying for a listing: {}", e.message);
        }
        rows = state.db(move |s| s.commits(&channel, from, limit)).await?;
        rows.retain(|r| r.certificate.is_some());
    }
    let commits: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "epoch": r.epoch,
                "commit": b64(&r.commit),
                "commit_hash": hex::encode(r.commit_hash),
                "certificate": b64(r.certificate.as_deref().unwrap_or_default()),
                "welcome": r.welcome.as_deref().map(b64),
            })
        })
        .collect();
    Ok(Json(json!({ "commits": commits })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TreeQuery {
    epoch: Option<u64>,
}

#[tracing::instrument(skip_all, fields(device = %device, channel = %id))]
async fn tree(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiPath(id): ApiPath<String>,
    q: Result<Query<TreeQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let q = query(q)?;
    let not_yet = |what: String| ApiError::new(reqwest::StatusCode::NOT_FOUND, "not_yet", what);
    let row = match (channel_row(&state, channel).await, q.epoch) {
        (Ok(row), _) => row,
        // Invited through another server: this one learns the channel when
        // its ordering group adds it, which may take a moment.
        (Err(e), Some(_)) if e.code == "not_found" => {
            return Err(not_yet(format!(
                "channel {channel} has not reached this server yet; try again shortly"
            )));
        }
        (Err(e), _) => return Err(e),
    };
    let epoch = q.epoch.unwrap_or(row.epoch);
    if epoch > row.epoch {
        return Err(not_yet(format!(
            "this server has reached epoch {} of the channel, not {epoch} yet",
            row.epoch
        )));
    }
    let epoch_state = state
        .db(move |s| s.epoch_state(&channel, epoch))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("the channel has no epoch {epoch}")))?;
    if !epoch_state.members.contains(&device) {
        return Err(ApiError::not_member(format!(
            "this device is not a member of epoch {epoch}"
        )));
    }
    Ok(Json(json!({
        "epoch": epoch,
        "ratchet_tree": b64(&epoch_state.ratchet_tree),
        "group_info": b64(&epoch_state.group_info),
    })))
}

// -- messages -----------------------------------------------------------------

pub(crate) fn message_json(channel: ChannelId, m: &MessageRow) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("channel".into(), channel.to_string().into());
    map.insert("seq".into(), m.seq.into());
    map.insert("id".into(), hex::encode(m.id).into());
    map.insert("epoch".into(), m.epoch.into());
    map.insert("sender".into(), m.sender.to_string().into());
    map.insert("message".into(), b64(&m.message).into());
    map.insert("received_at".into(), m.received_at.into());
    map
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MessageRequest {
    epoch: u64,
    message: String,
}

#[tracing::instrument(skip_all, fields(device = %device, channel = %id))]
pub(super) async fn post_message(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<MessageRequest>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let message = unb64("message", &req.message)?;
    let limit = state.config.limits.max_message_bytes;
    if message.is_empty() {
        return Err(ApiError::bad_request("`message` is empty"));
    }
    if message.len() > limit {
        return Err(ApiError::too_large(format!(
            "the message is {} bytes; the limit is {limit}",
            message.len()
        )));
    }
    let (row, started) = message_checks(&state, channel, device, req.epoch).await?;
    // Across servers, only a log known to be up to date may acknowledge,
    // and only at its current epoch (§11.3): a message of an older epoch
    // could reach the other servers' devices after they left it behind.
    let alone = crate::freshness::require_fresh(&state, channel).await?;
    let row = if alone {
        row
    } else {
        channel_row_check(&state, channel).await?
    };
    if !alone && req.epoch != row.epoch {
        return Err(ApiError::wrong_epoch(
            row.epoch,
            format!(
                "the message is for epoch {}, the channel is at epoch {}; across servers \
                 messages are taken only at the current epoch",
                req.epoch, row.epoch
            ),
        ));
    }
    if req.epoch > row.epoch {
        return Err(ApiError::bad_request(format!(
            "the message is for epoch {}, the channel is at epoch {}",
            req.epoch, row.epoch
        )));
    }
    start_epoch(&state, channel, req.epoch, started).await?;
    let received_at = now_ms();
    let new = NewMessage {
        id: kith_proto::sign::message_id(&message),
        epoch: req.epoch,
        sender: device,
        message,
        received_at,
    };
    let (stored, _handed) = state.writer.store(channel, new).await?;
    // A repeated id returns the row stored the first time (and queues it
    // again for the other servers, which deduplicate: a retry after a lost
    // answer cannot leave it unsent).
    if stored.received_at == received_at {
        state.metrics.channel_messages.inc();
    }
    fan_out(&state, channel, &stored).await?;
    Ok(Json(
        json!({ "id": hex::encode(stored.id), "seq": stored.seq, "received_at": stored.received_at }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

#[tracing::instrument(skip_all, fields(device = %device, channel = %id))]
async fn list_messages(
    State(state): State<Shared>,
    Authed(device): Authed,
    ApiPath(id): ApiPath<String>,
    q: Result<Query<MessagesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let channel = parse_channel(&id)?;
    let q = query(q)?;
    channel_row(&state, channel).await?;
    require_member(&state, channel, device).await?;
    let after = q.after.unwrap_or(0);
    let limit = list_limit(&state, q.limit);
    let rows = state
        .db(move |s| s.messages(&channel, after, limit))
        .await?;
    let messages: Vec<Value> = rows
        .iter()
        .map(|m| {
            let mut map = message_json(channel, m);
            map.remove("channel");
            Value::Object(map)
        })
        .collect();
    Ok(Json(json!({ "messages": messages })))
}
