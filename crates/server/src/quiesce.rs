//! Quiescing idle shared channels (spec §10.6 "Timers", §11.3): a channel
//! whose Raft group has peers costs a signed heartbeat per follower per
//! heartbeat interval while its timers run, so a group with no commit and
//! no message sent for `[federation] raft_idle_ms` stops them on every
//! node, and the next use wakes it.
//!
//! - **Quiescing** is the leader's decision ([`run`], one task per server):
//!   once every member holds its whole log ([`ChannelOrderer::settled`])
//!   and the channel was idle here, it stops its own timers (no more
//!   heartbeats, so none can turn a follower's timers back on), then asks
//!   each follower `POST /v0/federation/raft/{id}/quiet` `{"term",
//!   "index"}`. A follower stops its election timer only if the request
//!   comes from the leader it follows, in its term, and it holds and
//!   applied that whole log, and the channel was idle on its side too
//!   ([`follower_may_quiesce`]). If any follower says no (or does not
//!   answer), the leader wakes the group again.
//! - **Waking**: any Raft RPC from a peer turns a node's timers on (the
//!   endpoint calls `tick_if_shared`). A submission on the leader wakes it
//!   (heartbeats resume, one goes out at once). A message send that finds
//!   this server's log not fresh ([`wake`]): on the leader, the same; on a
//!   follower, `POST /v0/federation/raft/{id}/wake` to the leader, whose
//!   heartbeat then makes the follower fresh within a round trip. If the
//!   leader does not answer, or the follower stays stale, the follower
//!   turns its own timers on, so an election replaces a dead leader.
//!
//! Only timers stop: a quiet node answers RPCs and orders submissions, and
//! Raft's safety never depended on timers. The decisions are plain
//! functions ([`leader_may_quiesce`], [`follower_may_quiesce`]); this
//! module's tasks and handlers gather their facts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kith_order::Settled;
use kith_proto::{ChannelId, ServerName};
use serde::{Deserialize, Serialize};

use crate::channels::Orderer;
use crate::state::Shared;

/// The longest a leader waits for a follower's answer to `quiet`, and a
/// follower for the leader's answer to `wake` (a dead peer must not hold
/// a message back for the whole federation request timeout).
const ASK_WAIT: Duration = Duration::from_secs(2);
/// The shortest time between two sweeps.
const MIN_SWEEP: Duration = Duration::from_millis(50);

/// When each channel was last used on this server, and when it last asked
/// its leader to wake.
#[derive(Default)]
pub(crate) struct Activity(Mutex<HashMap<ChannelId, Seen>>);

#[derive(Clone)]
struct Seen {
    /// The last use: a send, a submission, a wake, new log entries.
    used: Instant,
    /// The last log index seen by the sweep, to notice new entries.
    index: Option<u64>,
    /// When this server last asked the leader to wake.
    asked: Option<Instant>,
    /// Who signed the `quiet` request this follower obeyed last, and when
    /// (by its clock).
    quiet_at: Option<(ServerName, u64)>,
}

impl Seen {
    fn new(used: Instant, index: Option<u64>) -> Self {
        Self {
            used,
            index,
            asked: None,
            quiet_at: None,
        }
    }
}

impl Activity {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelId, Seen>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Notes a use of `channel` now (a message sent, a submission).
    pub(crate) fn touch(&self, channel: ChannelId) {
        let now = Instant::now();
        self.map()
            .entry(channel)
            .and_modify(|s| s.used = now)
            .or_insert(Seen::new(now, None));
    }

    /// How long `channel` has been unused, counting a log that grew since
    /// the last look (`index`) as a use now.
    fn idle_for(&self, channel: ChannelId, index: Option<u64>, now: Instant) -> Duration {
        let mut map = self.map();
        let seen = map.entry(channel).or_insert(Seen::new(now, index));
        if seen.index != index {
            seen.index = index;
            seen.used = now;
        }
        now.saturating_duration_since(seen.used)
    }

    /// Whether `channel` was used within `within`.
    fn used_within(&self, channel: ChannelId, within: Duration) -> bool {
        self.map()
            .get(&channel)
            .is_some_and(|s| s.used.elapsed() < within)
    }

    /// Whether to ask the leader to wake now: not if this server asked
    /// within `gap` (the messages waiting meanwhile share that request).
    fn may_ask(&self, channel: ChannelId, gap: Duration) -> bool {
        let now = Instant::now();
        let mut map = self.map();
        let seen = map.entry(channel).or_insert(Seen::new(now, None));
        if seen
            .asked
            .is_some_and(|at| now.saturating_duration_since(at) < gap)
        {
            return false;
        }
        seen.asked = Some(now);
        true
    }

    /// Notes that this follower went quiet at a `quiet` request its
    /// leader signed at `signed_at`.
    fn went_quiet(&self, channel: ChannelId, leader: &ServerName, signed_at: u64) {
        self.map()
            .entry(channel)
            .or_insert(Seen::new(Instant::now(), None))
            .quiet_at = Some((leader.clone(), signed_at));
    }

    /// Whether an `append` that `origin` signed at `signed_at` was sent
    /// before the `quiet` request this follower obeyed, by the same
    /// server: a heartbeat overtaken by it, which must not turn the timers
    /// on again (the leader had stopped its own by then).
    pub(crate) fn sent_before_quiet(
        &self,
        channel: ChannelId,
        origin: &ServerName,
        signed_at: u64,
    ) -> bool {
        self.map()
            .get(&channel)
            .and_then(|s| s.quiet_at.as_ref())
            .is_some_and(|(leader, quiet_at)| leader == origin && signed_at < *quiet_at)
    }

    /// Forgets channels whose orderer no longer runs here.
    fn retain(&self, running: &std::collections::HashSet<ChannelId>) {
        self.map().retain(|channel, _| running.contains(channel));
    }
}

/// Whether a leader may quiesce its group: it is settled (every member
/// holds the whole log), not quiet already, and unused for `idle`.
pub(crate) fn leader_may_quiesce(
    settled: Option<Settled>,
    quiet: bool,
    idle_for: Duration,
    idle: Duration,
) -> Option<Settled> {
    settled.filter(|_| !quiet && idle_for >= idle)
}

/// What a follower knows when its leader asks it to quiesce.
#[derive(Clone, Copy)]
pub(crate) struct FollowerFacts {
    /// The request comes from the leader this node follows.
    pub(crate) from_leader: bool,
    /// This node's term and last log index.
    pub(crate) term: u64,
    pub(crate) index: Option<u64>,
    /// The last index this node applied.
    pub(crate) applied: Option<u64>,
    /// The channel was used here within the idle time.
    pub(crate) used_recently: bool,
}

/// Whether a follower stops its election timer when its leader asks
/// with `asked`; `Err` says why not.
pub(crate) fn follower_may_quiesce(
    facts: &FollowerFacts,
    asked: &QuietRequest,
) -> Result<(), &'static str> {
    if !facts.from_leader || facts.term != asked.term {
        return Err("the request is not from the leader this server follows, in its term");
    }
    if facts.index != asked.index || facts.applied != asked.index {
        return Err("this server does not hold and apply the leader's whole log yet");
    }
    if facts.used_recently {
        return Err("the channel is in use here");
    }
    Ok(())
}

/// `POST /v0/federation/raft/{id}/quiet`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QuietRequest {
    /// The leader's term.
    pub(crate) term: u64,
    /// The leader's last log index (which every member holds).
    pub(crate) index: Option<u64>,
}

/// The answer to `quiet`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct QuietAnswer {
    /// Whether this follower stopped its timers.
    pub(crate) quiet: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// The answer to `wake`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WakeAnswer {
    /// Whether the answering node leads and sent a heartbeat.
    pub(crate) woken: bool,
}

/// What the follower's node does with its leader's `quiet`.
pub(crate) fn answer_quiet(
    state: &Shared,
    orderer: &Orderer,
    from_leader: bool,
    asked: &QuietRequest,
    signed: (&ServerName, u64),
) -> QuietAnswer {
    let channel = orderer.channel();
    let (term, index) = orderer.term_and_index();
    let applied = orderer
        .raft()
        .metrics()
        .borrow()
        .last_applied
        .map(|l| l.index);
    let idle = Duration::from_millis(state.config.federation.raft_idle_ms);
    let facts = FollowerFacts {
        from_leader,
        term,
        index,
        applied,
        used_recently: idle.is_zero() || state.channels.activity.used_within(channel, idle),
    };
    match follower_may_quiesce(&facts, asked) {
        Ok(()) => {
            orderer.quiesce();
            state
                .channels
                .activity
                .went_quiet(channel, signed.0, signed.1);
            tracing::debug!(%channel, "quiet at the leader's request");
            QuietAnswer {
                quiet: true,
                reason: None,
            }
        }
        Err(why) => QuietAnswer {
            quiet: false,
            reason: Some(why.to_owned()),
        },
    }
}

/// What the leader's node does with a follower's `wake`.
pub(crate) async fn answer_wake(state: &Shared, orderer: &Orderer) -> WakeAnswer {
    if !orderer.is_leader() {
        return WakeAnswer { woken: false };
    }
    state.channels.activity.touch(orderer.channel());
    match orderer.wake().await {
        Ok(()) => WakeAnswer { woken: true },
        Err(e) => {
            tracing::warn!(channel = %orderer.channel(), error = %e, "waking the channel's group");
            WakeAnswer { woken: false }
        }
    }
}

/// Wakes `channel`'s group because this server needs a fresh log (a
/// message to acknowledge, spec §11.3): on the leader, heartbeats resume
/// at once; on a follower, the leader is asked to (at most once per
/// `gap`), and if it does not answer as leader, this node's own timers
/// go on so that an election can replace it.
pub(crate) async fn wake(state: &Shared, channel: ChannelId, gap: Duration) {
    let Some(orderer) = state.channels.running(channel) else {
        return;
    };
    if orderer.is_leader() {
        if let Err(e) = orderer.wake().await {
            tracing::warn!(%channel, error = %e, "waking the channel's group");
        }
        return;
    }
    if !state.channels.activity.may_ask(channel, gap) {
        return;
    }
    let me = &state.config.server_name;
    let woken = match orderer.leader_server() {
        Some(leader) if leader != *me => ask_wake(state, channel, &leader).await,
        _ => false,
    };
    if !woken {
        orderer.tick_if_shared();
    }
}

/// Turns this server's node of `channel` on again (after the leader failed
/// to answer), so that it calls an election if nobody leads.
pub(crate) fn ticks_on(state: &Shared, channel: ChannelId) {
    if let Some(orderer) = state.channels.running(channel) {
        orderer.tick_if_shared();
    }
}

async fn ask_wake(state: &Shared, channel: ChannelId, leader: &ServerName) -> bool {
    let path = format!("/v0/federation/raft/{channel}/wake");
    state.federation.count_raft_request("wake");
    let sent = tokio::time::timeout(
        ASK_WAIT,
        state.federation.client.post(leader, &path, b"{}".to_vec()),
    )
    .await;
    match sent {
        Ok(Ok(answer)) => serde_json::from_slice::<WakeAnswer>(&answer.body)
            .map(|a| a.woken)
            .unwrap_or(false),
        Ok(Err(e)) => {
            tracing::info!(%channel, %leader, error = %e, "the leader did not wake the channel");
            false
        }
        Err(_) => {
            tracing::info!(%channel, %leader, "the leader did not answer a wake in time");
            false
        }
    }
}

/// Quiesces, every half idle time, the groups this server leads that were
/// idle for `[federation] raft_idle_ms`, until shutdown.
pub(crate) async fn run(state: Shared) {
    let idle = Duration::from_millis(state.config.federation.raft_idle_ms);
    let period = (idle / 2).max(MIN_SWEEP);
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(period) => {}
        }
        sweep(&state, idle).await;
    }
}

async fn sweep(state: &Shared, idle: Duration) {
    let running = state.channels.all_running();
    let now = Instant::now();
    let channels = running.iter().map(|o| o.channel()).collect();
    state.channels.activity.retain(&channels);
    let mut quiescing = tokio::task::JoinSet::new();
    for orderer in running {
        let channel = orderer.channel();
        // Only a leader with peers and every member up to date has a
        // group to quiesce; its idle time counts from the first sweep
        // that finds it so.
        let Some(settled) = orderer.settled() else {
            continue;
        };
        let idle_for = state
            .channels
            .activity
            .idle_for(channel, settled.index, now);
        if let Some(settled) = leader_may_quiesce(Some(settled), orderer.is_quiet(), idle_for, idle)
        {
            let state = std::sync::Arc::clone(state);
            quiescing.spawn(async move { quiesce(&state, &orderer, settled).await });
        }
    }
    while quiescing.join_next().await.is_some() {}
}

/// Stops the leader's timers, then asks every follower to stop theirs;
/// wakes the group again unless all of them did.
async fn quiesce(state: &Shared, orderer: &Orderer, settled: Settled) {
    let channel = orderer.channel();
    let me = state.config.server_name.clone();
    let (voters, learners) = orderer.membership();
    let followers: Vec<_> = voters
        .union(&learners)
        .filter(|s| **s != me)
        .cloned()
        .collect();
    orderer.quiesce();
    let body = match serde_json::to_vec(&QuietRequest {
        term: settled.term,
        index: settled.index,
    }) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(%channel, error = %e, "encoding a quiet request");
            let _ = orderer.wake().await;
            return;
        }
    };
    let path = format!("/v0/federation/raft/{channel}/quiet");
    let mut asks = tokio::task::JoinSet::new();
    for follower in followers {
        let state = std::sync::Arc::clone(state);
        let (path, body) = (path.clone(), body.clone());
        asks.spawn(async move {
            state.federation.count_raft_request("quiet");
            let sent = tokio::time::timeout(
                ASK_WAIT,
                state.federation.client.post(&follower, &path, body),
            )
            .await;
            let answer = match sent {
                Ok(Ok(answer)) => serde_json::from_slice::<QuietAnswer>(&answer.body).ok(),
                _ => None,
            };
            if let Some(QuietAnswer {
                quiet: false,
                reason,
            }) = &answer
            {
                tracing::debug!(%channel, %follower, ?reason, "a follower stays awake");
            }
            answer.is_some_and(|a| a.quiet)
        });
    }
    let mut all_quiet = true;
    while let Some(joined) = asks.join_next().await {
        all_quiet &= joined.unwrap_or(false);
    }
    if all_quiet && orderer.is_quiet() && orderer.settled() == Some(settled) {
        state.metrics.raft_quiesced.inc();
        tracing::debug!(%channel, "quiesced");
        return;
    }
    // Somebody is busy or did not answer: the group runs on, and the next
    // attempt waits a whole idle time.
    state.channels.activity.touch(channel);
    if let Err(e) = orderer.wake().await {
        tracing::warn!(%channel, error = %e, "waking the channel's group");
    }
}

/// The number of running nodes that are quiet and that lead a shared
/// group, for `/metrics`.
pub(crate) fn census(state: &Shared) -> (usize, usize) {
    let running = state.channels.all_running();
    let quiet = running.iter().filter(|o| o.is_quiet()).count();
    let leading = running
        .iter()
        .filter(|o| {
            let (voters, learners) = o.membership();
            o.is_leader() && voters.union(&learners).count() > 1
        })
        .count();
    (quiet, leading)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled() -> Option<Settled> {
        Some(Settled {
            term: 3,
            index: Some(9),
        })
    }

    #[test]
    fn a_leader_quiesces_a_settled_group_only_after_the_idle_time() {
        let idle = Duration::from_secs(15);
        let long = Duration::from_secs(20);
        assert_eq!(leader_may_quiesce(settled(), false, long, idle), settled());
        assert_eq!(
            leader_may_quiesce(settled(), false, Duration::from_secs(3), idle),
            None
        );
        assert_eq!(
            leader_may_quiesce(settled(), true, long, idle),
            None,
            "already quiet"
        );
        assert_eq!(
            leader_may_quiesce(None, false, long, idle),
            None,
            "not settled"
        );
    }

    #[test]
    fn a_follower_quiesces_only_for_its_leader_with_the_whole_log_when_idle() {
        let asked = QuietRequest {
            term: 3,
            index: Some(9),
        };
        let idle = FollowerFacts {
            from_leader: true,
            term: 3,
            index: Some(9),
            applied: Some(9),
            used_recently: false,
        };
        assert_eq!(follower_may_quiesce(&idle, &asked), Ok(()));
        let refused = |facts: FollowerFacts| follower_may_quiesce(&facts, &asked).is_err();
        assert!(refused(FollowerFacts {
            from_leader: false,
            ..idle
        }));
        assert!(refused(FollowerFacts { term: 4, ..idle }), "another term");
        assert!(
            refused(FollowerFacts {
                index: Some(8),
                ..idle
            }),
            "behind"
        );
        assert!(
            refused(FollowerFacts {
                applied: Some(8),
                ..idle
            }),
            "not applied"
        );
        assert!(
            refused(FollowerFacts {
                used_recently: true,
                ..idle
            }),
            "busy"
        );
    }
}
