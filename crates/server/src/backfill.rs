//! Pulling the messages a server is missing before it moves its devices on
//! (spec §11.3, "Backfill").
//!
//! Fan-out goes through the durable outbox, which backs off when a peer
//! cannot be reached; meanwhile the peer may go on receiving commits from
//! the others and release them to its devices. A device keeps only
//! `kith_mls::MAX_PAST_EPOCHS` past epochs, so a message that arrives after
//! its devices merged that many later commits is lost. So before a server
//! releases the commit that ends epoch `F` (its `commit` events take local
//! devices to `F + 1`), it makes sure it holds every message its peers
//! accepted from their own devices in epochs up to `F + 1 - PULL_DEPTH`,
//! by asking each peer `GET /v0/federation/channels/{id}/messages?after=S`
//! for what it accepted after the peer sequence number `S` it has already
//! seen.
//!
//! The common path costs nothing: a peer's answer carries its current
//! epoch `E`, and since a server acknowledges messages only at its current
//! epoch (see `freshness`), everything it will accept later is of epoch
//! `E - 1` or later, so the pull covers epochs up to `E - 2`. The next pull
//! from that peer is due only some commits later, and it is started in the
//! background [`PULL_AHEAD`] commits before it is needed, so a commit
//! waits for a pull only when its server is catching up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kith_proto::{ChannelId, DeviceId, ServerName};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{b64, unb64};
use crate::error::ApiError;
use crate::ordering::{check_remote_size, store_remote_message};
use crate::state::Shared;

/// Before a commit moves devices to epoch `F + 1`, the messages of epochs up
/// to `F + 1 - PULL_DEPTH` must be here: half the epochs devices keep, so a
/// message reaches a device at most `PULL_DEPTH + PULL_AHEAD` epochs late.
pub(crate) const PULL_DEPTH: u64 = kith_mls::MAX_PAST_EPOCHS as u64 / 2;
/// A pull from a peer is started in the background this many epochs before
/// a commit would have to wait for it.
pub(crate) const PULL_AHEAD: u64 = 4;
/// The longest one pull from one peer may take (all its pages).
const PULL_WAIT: Duration = Duration::from_secs(3);
/// After a failed pull, how long a peer is not waited for.
const PEER_BACKOFF: Duration = Duration::from_secs(5);
/// Most rows a peer scans for one answer.
const SCAN_ROWS: usize = 1000;
/// Message bytes in one answer (within the federation answer limit once
/// in base64 and JSON).
const PAGE_BYTES: usize = 384 * 1024;

#[derive(Default, Clone)]
struct PeerCursor {
    /// The peer's sequence number up to which its messages were seen.
    after: u64,
    /// Every message of this peer's devices in epochs `<= through` is here.
    through: Option<u64>,
    /// Not waited for until then (the last pull failed).
    resting_until: Option<Instant>,
}

/// How far this server has pulled each peer's messages, per channel.
#[derive(Default)]
pub(crate) struct Cursors {
    peers: Mutex<HashMap<(ChannelId, ServerName), PeerCursor>>,
    gates: Mutex<HashMap<ChannelId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Cursors {
    fn get(&self, channel: ChannelId, peer: &ServerName) -> PeerCursor {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(channel, peer.clone()))
            .cloned()
            .unwrap_or_default()
    }

    fn set(&self, channel: ChannelId, peer: &ServerName, cursor: PeerCursor) {
        self.peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((channel, peer.clone()), cursor);
    }

    fn gate(&self, channel: ChannelId) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(
            self.gates
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .entry(channel)
                .or_default(),
        )
    }
}

/// Whether `cursor` covers epochs up to `need` (or the peer is resting).
fn covers(cursor: &PeerCursor, need: u64, now: Instant) -> bool {
    cursor.through.is_some_and(|t| t >= need) || cursor.resting_until.is_some_and(|r| now < r)
}

/// The epochs whose messages must be here before the commit ending epoch
/// `epoch` is released: up to the returned one (`None`: none yet).
pub(crate) fn needed_through(epoch: u64) -> Option<u64> {
    (epoch + 1).checked_sub(PULL_DEPTH)
}

/// Called before the commit ending `epoch` is released to local devices:
/// pulls what peers have that this server may be missing (see the module
/// docs). Never fails: a peer that cannot be reached in time is skipped
/// (and rests a while), and the commit goes on.
pub(crate) async fn before_release(state: &Shared, channel: ChannelId, epoch: u64) {
    // The channel's Raft group: in memory, and the servers that may hold
    // messages of its recent epochs.
    let Some(orderer) = state.channels.running(channel) else {
        return;
    };
    let (voters, learners) = orderer.membership();
    let me = &state.config.server_name;
    let peers: Vec<ServerName> = voters
        .union(&learners)
        .filter(|s| *s != me)
        .cloned()
        .collect();
    if peers.is_empty() {
        return;
    }
    let now = Instant::now();
    let cursors = &state.channels.backfill;
    let need = needed_through(epoch);
    let behind: Vec<ServerName> = match need {
        Some(need) => peers
            .iter()
            .filter(|p| !covers(&cursors.get(channel, p), need, now))
            .cloned()
            .collect(),
        None => Vec::new(),
    };
    if !behind.is_empty() {
        let gate = cursors.gate(channel);
        let _pulling = gate.lock().await;
        for peer in &behind {
            // Another pull may have covered it while this one waited.
            if need.is_some_and(|n| covers(&cursors.get(channel, peer), n, Instant::now())) {
                continue;
            }
            pull(state, channel, peer, epoch).await;
        }
        return;
    }
    // Start the next pulls early, so no commit has to wait for them.
    let ahead = needed_through(epoch + PULL_AHEAD);
    let soon: Vec<ServerName> = match ahead {
        Some(ahead) => peers
            .into_iter()
            .filter(|p| !covers(&cursors.get(channel, p), ahead, now))
            .collect(),
        None => Vec::new(),
    };
    if soon.is_empty() {
        return;
    }
    let gate = cursors.gate(channel);
    let Ok(pulling) = gate.try_lock_owned() else {
        return; // a pull is under way
    };
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let _pulling = pulling;
        for peer in &soon {
            pull(&state, channel, peer, epoch).await;
        }
    });
}

#[derive(Deserialize)]
struct PulledMessage {
    seq: u64,
    epoch: u64,
    sender: String,
    message: String,
}

#[derive(Deserialize)]
struct PullAnswer {
    epoch: u64,
    fresh: bool,
    messages: Vec<PulledMessage>,
    next: u64,
    more: bool,
}

/// Pulls `peer`'s messages after its cursor, storing those of epochs up to
/// `upto` (the epoch whose ending commit is being released), within
/// [`PULL_WAIT`]; updates the cursor.
async fn pull(state: &Shared, channel: ChannelId, peer: &ServerName, upto: u64) {
    let cursors = &state.channels.backfill;
    let mut cursor = cursors.get(channel, peer);
    let deadline = tokio::time::Instant::now() + PULL_WAIT;
    // Messages older than the window devices keep are useless to them.
    let min_epoch = (upto + 1).saturating_sub(kith_mls::MAX_PAST_EPOCHS as u64);
    let result = tokio::time::timeout_at(deadline, async {
        loop {
            let path = format!(
                "/v0/federation/channels/{channel}/messages?after={}&min_epoch={min_epoch}",
                cursor.after
            );
            let answer = state.federation.client.get(peer, &path).await?;
            let page: PullAnswer = serde_json::from_slice(&answer.body).map_err(|e| {
                ApiError::new(
                    reqwest::StatusCode::BAD_GATEWAY,
                    "remote_invalid",
                    format!("{peer} answered a message pull wrongly: {e}"),
                )
            })?;
            let mut stopped_at = None;
            for m in page.messages {
                if m.seq <= cursor.after {
                    continue;
                }
                if m.epoch > upto || !certified(state, channel, m.epoch).await? {
                    // Not deliverable here yet: later pulls (or the outbox)
                    // bring it. Later messages are of this epoch or later.
                    stopped_at = Some(m.epoch);
                    break;
                }
                let sender: DeviceId = match m.sender.parse() {
                    Ok(s) => s,
                    Err(_) => {
                        tracing::warn!(%peer, "a pulled message names no device; skipped");
                        cursor.after = m.seq;
                        continue;
                    }
                };
                let bytes = unb64("message", &m.message)?;
                check_remote_size(state, &bytes)?;
                match store_remote_message(state, channel, peer, m.epoch, sender, bytes).await {
                    Ok(_) => {}
                    Err(e) if e.status.is_client_error() => {
                        tracing::warn!(%peer, seq = m.seq, "a pulled message was refused: {}", e.message);
                    }
                    Err(e) => return Err(e),
                }
                cursor.after = m.seq;
            }
            if let Some(epoch) = stopped_at {
                let through = epoch.saturating_sub(1);
                cursor.through = Some(cursor.through.map_or(through, |t| t.max(through)));
                return Ok(());
            }
            cursor.after = cursor.after.max(page.next);
            if !page.more {
                // The peer acknowledges messages only at its current epoch;
                // one it checked just before a commit may still be stored
                // at the epoch before. A peer that is not fresh acknowledges
                // nothing until it has applied what its leader committed,
                // which includes the commit ending `upto`.
                let mut through = page.epoch.saturating_sub(2);
                if !page.fresh {
                    through = through.max(upto.saturating_sub(1));
                }
                cursor.through = Some(cursor.through.map_or(through, |t| t.max(through)));
                return Ok(());
            }
        }
    })
    .await;
    match result {
        Ok(Ok(())) => {
            tracing::debug!(%channel, %peer, upto, after = cursor.after, through = ?cursor.through, "pulled messages");
            cursor.resting_until = None;
        }
        Ok(Err(e)) => {
            tracing::info!(%channel, %peer, "pulling messages failed: {}", e.message);
            cursor.resting_until = Some(Instant::now() + PEER_BACKOFF);
        }
        Err(_) => {
            tracing::info!(%channel, %peer, "pulling messages took too long");
            cursor.resting_until = Some(Instant::now() + PEER_BACKOFF);
        }
    }
    cursors.set(channel, peer, cursor);
}

/// Whether the commit that started `epoch` is certified here.
async fn certified(state: &Shared, channel: ChannelId, epoch: u64) -> Result<bool, ApiError> {
    let Some(previous) = epoch.checked_sub(1) else {
        return Ok(true);
    };
    Ok(state
        .db(move |s| s.commit(&channel, previous))
        .await?
        .is_some_and(|row| row.certificate.is_some()))
}

/// The answer to a peer's pull: the messages this server accepted from its
/// own devices with sequence number above `after` and epoch at least
/// `min_epoch`, ascending, with whether this server may acknowledge
/// messages now (`fresh`) and its current epoch (both read first), the last
/// sequence number looked at (`next`), and whether there are more.
pub(crate) async fn own_messages(
    state: &Shared,
    channel: ChannelId,
    after: u64,
    min_epoch: u64,
) -> Result<Value, ApiError> {
    let fresh = crate::freshness::look(state, channel).await? != crate::freshness::Freshness::Stale;
    state
        .db(move |s| {
            let epoch = s.channel(&channel)?.map_or(0, |row| row.epoch);
            let mut next = after;
            let mut out = Vec::new();
            let mut bytes = 0;
            let mut scanned = 0;
            let mut locals: HashMap<DeviceId, bool> = HashMap::new();
            let more = 'scan: loop {
                let rows = s.messages(&channel, next, 200)?;
                if rows.is_empty() {
                    break false;
                }
                for row in rows {
                    if scanned >= SCAN_ROWS || bytes >= PAGE_BYTES {
                        break 'scan true;
                    }
                    scanned += 1;
                    next = row.seq;
                    let local = match locals.get(&row.sender) {
                        Some(l) => *l,
                        None => {
                            let l = s.device(&row.sender)?.is_some();
                            locals.insert(row.sender, l);
                            l
                        }
                    };
                    if !local || row.epoch < min_epoch {
                        continue;
                    }
                    bytes += row.message.len();
                    out.push(json!({
                        "seq": row.seq,
                        "epoch": row.epoch,
                        "sender": row.sender.to_string(),
                        "message": b64(&row.message),
                    }));
                }
            };
            Ok(json!({
                "epoch": epoch,
                "fresh": fresh,
                "messages": out,
                "next": next,
                "more": more,
            }))
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_are_needed_only_once_devices_could_leave_an_epoch_behind() {
        assert_eq!(needed_through(0), None);
        assert_eq!(needed_through(PULL_DEPTH - 2), None);
        assert_eq!(needed_through(PULL_DEPTH - 1), Some(0));
        assert_eq!(needed_through(20), Some(21 - PULL_DEPTH));
        // A message pulled just in time is at most this many epochs late,
        // within what devices keep.
        assert!(PULL_DEPTH + PULL_AHEAD < kith_mls::MAX_PAST_EPOCHS as u64);
    }

    #[test]
    fn a_resting_peer_or_a_far_enough_pull_covers() {
        let now = Instant::now();
        let mut c = PeerCursor::default();
        assert!(!covers(&c, 0, now));
        c.through = Some(5);
        assert!(covers(&c, 5, now));
        assert!(!covers(&c, 6, now));
        c.resting_until = Some(now + Duration::from_secs(1));
        assert!(covers(&c, 6, now));
    }
}
