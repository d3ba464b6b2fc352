//! Bounding staleness at acceptance (spec §11.3, "Acceptance"): a server
//! acknowledges a message for a channel ordered by several servers only
//! while its log is known to be fresh, so it never acknowledges a message
//! at an epoch its ordering group left long ago (members keep only a
//! window of past epochs, and a message later than that is lost).
//!
//! Fresh means, within a lease of a few Raft heartbeats:
//!
//! - as leader: a quorum of the group acknowledged this node
//!   (openraft's `millis_since_quorum_ack`);
//! - as follower: an `append` from the leader succeeded here
//!   ([`Heard::appended`], noted by the federation Raft endpoint), and this
//!   node has applied everything the leader said was committed in it.
//!
//! Otherwise the request wakes the group (it may be quiesced, see
//! `crate::quiesce`: the leader sends a heartbeat at once) and waits a
//! little for the node to become fresh, then is refused with 503
//! `ordering_unavailable`, which the client retries. A follower that is
//! still stale two leases (at most half that wait) after asking its leader
//! turns its own timers on, so that an election replaces a leader that is
//! gone.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kith_proto::ChannelId;

use crate::error::ApiError;
use crate::state::Shared;

/// The longest a message waits for this server's log to become fresh.
const FRESH_WAIT: Duration = Duration::from_secs(5);
/// How often a waiting message looks again.
const FRESH_POLL: Duration = Duration::from_millis(50);
/// The lease is this many heartbeats (and at least [`MIN_LEASE`]).
const LEASE_HEARTBEATS: u32 = 3;
const MIN_LEASE: Duration = Duration::from_millis(500);

/// When each channel's node last took an `append` from its leader, and the
/// log index the leader said was committed then.
#[derive(Default)]
pub(crate) struct Heard {
    appends: Mutex<HashMap<ChannelId, (Instant, Option<u64>)>>,
}

impl Heard {
    /// Notes a successful `append` from the leader of `channel`'s group.
    pub(crate) fn appended(&self, channel: ChannelId, leader_commit: Option<u64>) {
        self.appends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(channel, (Instant::now(), leader_commit));
    }

    fn last(&self, channel: ChannelId) -> Option<(Instant, Option<u64>)> {
        self.appends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&channel)
            .copied()
    }
}

/// The lease for a heartbeat interval of `heartbeat_ms`.
pub(crate) fn lease(heartbeat_ms: u64) -> Duration {
    (Duration::from_millis(heartbeat_ms) * LEASE_HEARTBEATS).max(MIN_LEASE)
}

/// What one look at the node says (sans-IO: the caller gathers the facts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freshness {
    /// The channel has one server: there is nobody to lag behind.
    Alone,
    /// The log is known to be up to date within the lease.
    Fresh,
    /// Not known to be up to date.
    Stale,
}

/// The facts [`judge`] decides on.
pub(crate) struct NodeFacts {
    /// Voters and learners of the group, this server included.
    pub(crate) servers: usize,
    pub(crate) is_leader: bool,
    /// The node is quiesced (or just woke): openraft's metrics, and so
    /// `since_quorum_ack`, may be as old as the quiet spell.
    pub(crate) quiet: bool,
    /// On the leader: since a quorum last acknowledged it.
    pub(crate) since_quorum_ack: Option<Duration>,
    /// On a follower: since the last successful `append`, and the commit
    /// index the leader sent with it.
    pub(crate) since_append: Option<(Duration, Option<u64>)>,
    /// The last log index this node applied.
    pub(crate) applied: Option<u64>,
}

/// Whether a node with these facts may acknowledge a message now.
pub(crate) fn judge(facts: &NodeFacts, lease: Duration) -> Freshness {
    if facts.servers <= 1 {
        return Freshness::Alone;
    }
    let fresh = if facts.is_leader {
        !facts.quiet && facts.since_quorum_ack.is_some_and(|d| d <= lease)
    } else {
        facts
            .since_append
            .is_some_and(|(d, committed)| d <= lease && committed <= facts.applied)
    };
    if fresh {
        Freshness::Fresh
    } else {
        Freshness::Stale
    }
}

/// Whether this server may acknowledge messages of `channel` now.
pub(crate) async fn look(state: &Shared, channel: ChannelId) -> Result<Freshness, ApiError> {
    let orderer = state
        .channels
        .orderer(channel, false)
        .await
        .map_err(|e| ApiError::internal(format!("the channel's orderer: {e}")))?;
    let (voters, learners) = orderer.membership();
    let servers = voters.union(&learners).count();
    if servers <= 1 {
        return Ok(Freshness::Alone);
    }
    let is_leader = orderer.is_leader();
    // Read before the metrics: a node that stops being quiet after this
    // has published them anew.
    let quiet = orderer.is_quiet();
    let (since_quorum_ack, applied) = {
        let metrics = orderer.raft().metrics();
        let m = metrics.borrow();
        (
            m.millis_since_quorum_ack.map(Duration::from_millis),
            m.last_applied.map(|l| l.index),
        )
    };
    let facts = NodeFacts {
        servers,
        is_leader,
        quiet,
        since_quorum_ack,
        since_append: state
            .channels
            .heard
            .last(channel)
            .map(|(at, committed)| (at.elapsed(), committed)),
        applied,
    };
    Ok(judge(
        &facts,
        lease(state.config.federation.raft_heartbeat_ms),
    ))
}

/// Waits (briefly) until this server may acknowledge a message of
/// `channel`; returns whether the channel is ordered by this server alone.
/// 503 `ordering_unavailable` if its log is not known to be fresh in time.
pub(crate) async fn require_fresh(state: &Shared, channel: ChannelId) -> Result<bool, ApiError> {
    let start = tokio::time::Instant::now();
    let deadline = start + FRESH_WAIT;
    let lease = lease(state.config.federation.raft_heartbeat_ms);
    let mut woken = false;
    let mut ticking = false;
    loop {
        match look(state, channel).await? {
            Freshness::Alone => return Ok(true),
            Freshness::Fresh => {
                state.channels.activity.touch(channel);
                return Ok(false);
            }
            Freshness::Stale => {}
        }
        state.channels.activity.touch(channel);
        if !woken {
            crate::quiesce::wake(state, channel, lease).await;
            woken = true;
        } else if !ticking && start.elapsed() >= (lease * 2).min(FRESH_WAIT / 2) {
            crate::quiesce::ticks_on(state, channel);
            ticking = true;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::unavailable(
                "this server has not heard from the channel's ordering group recently, so it \
                 may be behind the channel's epoch; nothing was stored. Retry shortly",
            ));
        }
        tokio::time::sleep(FRESH_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> NodeFacts {
        NodeFacts {
            servers: 3,
            is_leader: false,
            quiet: false,
            since_quorum_ack: None,
            since_append: None,
            applied: Some(10),
        }
    }

    #[test]
    fn one_server_is_never_stale() {
        let f = NodeFacts {
            servers: 1,
            ..facts()
        };
        assert_eq!(judge(&f, lease(1000)), Freshness::Alone);
    }

    #[test]
    fn a_leader_is_fresh_only_within_the_lease_of_a_quorum_ack() {
        let lease = lease(1000);
        let mut f = NodeFacts {
            is_leader: true,
            ..facts()
        };
        assert_eq!(judge(&f, lease), Freshness::Stale);
        f.since_quorum_ack = Some(Duration::from_millis(200));
        assert_eq!(judge(&f, lease), Freshness::Fresh);
        f.since_quorum_ack = Some(lease + Duration::from_millis(1));
        assert_eq!(judge(&f, lease), Freshness::Stale);
    }

    #[test]
    fn a_quiet_leader_is_stale_whatever_its_last_metrics_said() {
        let f = NodeFacts {
            is_leader: true,
            quiet: true,
            since_quorum_ack: Some(Duration::from_millis(5)),
            ..facts()
        };
        assert_eq!(judge(&f, lease(1000)), Freshness::Stale);
    }

    #[test]
    fn a_follower_is_fresh_only_after_a_recent_append_it_has_applied() {
        let lease = lease(150);
        let mut f = facts();
        assert_eq!(judge(&f, lease), Freshness::Stale, "never heard");
        f.since_append = Some((Duration::from_millis(100), Some(10)));
        assert_eq!(judge(&f, lease), Freshness::Fresh);
        f.since_append = Some((Duration::from_millis(100), Some(11)));
        assert_eq!(judge(&f, lease), Freshness::Stale, "not applied yet");
        f.since_append = Some((lease + Duration::from_millis(1), Some(10)));
        assert_eq!(judge(&f, lease), Freshness::Stale, "lease expired");
    }
}
