//! Ordering and certifying commits among a channel's servers (spec §10.8)
//! and delivering application messages between them (§11.3).
//!
//! - [`order`]: a commit from a local device goes to the channel's Raft
//!   leader: this server's own node if it leads, else forwarded to the
//!   leader (`POST /v0/federation/channels/{id}/submit`), retried while an
//!   election runs, 503 `ordering_unavailable` when no leader answers.
//! - [`order_local`]: what the leader does with a submission: first make the
//!   Raft membership match the servers that sponsor the current members
//!   ([`ensure_membership`]), then append it.
//! - [`certify`]: a server certifies a commit its own log accepted by
//!   collecting the votes of the voters of the epoch the commit ends (its
//!   own, and `POST .../votes` to the others) until they make a
//!   certificate, then stores it, appends the `commit` events of its local
//!   members, and pushes the certificate to the channel's other servers
//!   (`POST .../certificate`), which store it once it verifies against
//!   their own voter set and matches their own log ([`accept_pushed`]).
//!   The client API runs it before answering, so the committer's server
//!   collects the votes; one collection runs per commit and server at a
//!   time ([`Flights`]). The certifier task, run for every commit the log
//!   accepts, first waits [`PUSH_WAIT`] for a pushed certificate and only
//!   then collects votes itself, so a server whose committer's server
//!   crashed still certifies.
//! - [`fan_out`] and [`deliver_remote_messages`]: messages go from the
//!   sender's server to the other servers of the channel through the
//!   durable outbox; a receiving server stores a message only after it has
//!   certified the commit that started the message's epoch.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kith_order::{
    CertificateError, CommitHash, OrderError, OrderingCertificate, OrderingCertificateIn, Outcome,
    Submission, Vote, VoteCollector, VoteIn, VoterSet,
};
use kith_proto::{
    ChannelId, DeviceId, DeviceRecordIn, ServerName, SignaturePublicKey, VerifiedRecords,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::api::{b64, unb64};
use crate::channels::{Accepted, Orderer};
use crate::error::ApiError;
use crate::federation::channels::{FannedMessage, MAX_FANOUT_BATCH, record_bytes};
use crate::state::{Shared, now_ms};
use crate::store::{CommitRow, MessageRow, NewMessage, Store, StoreError};

/// How long the leader waits for a submission to commit.
const SUBMIT_WAIT: Duration = Duration::from_secs(15);
/// How long a server keeps trying to reach a leader for a submission.
const FORWARD_DEADLINE: Duration = Duration::from_secs(20);
/// How long the leader waits for new servers to join the Raft group.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(15);
/// How long votes are collected.
const VOTE_WAIT: Duration = Duration::from_secs(10);
/// How long a server waits for its own log to accept a commit it is told
/// about (by the leader's answer, or a message of the next epoch).
const APPLY_WAIT: Duration = Duration::from_secs(10);
/// Attempts of the certifier for one commit (backing off from 0.5 s).
const CERTIFY_ATTEMPTS: u32 = 8;
/// How long the certifier task waits for the certificate of a commit its
/// log accepted to be stored by someone else (the client's request here,
/// or a push from the server that collected the votes) before it collects
/// the votes itself.
pub(crate) const PUSH_WAIT: Duration = Duration::from_secs(2);

/// The shortest wait for a vote before another voter is asked too.
const HEDGE_MIN: Duration = Duration::from_millis(20);
/// The longest wait for a vote before another voter is asked too.
const HEDGE_MAX: Duration = Duration::from_secs(1);
/// What a voter that failed to answer counts as, in [`VoteLatency`]: it is
/// asked after every voter that answered faster, until it answers again.
const FAILED_VOTER: Duration = Duration::from_secs(2);

/// The certifications under way on this server, per (channel, epoch): one
/// collection of votes at a time, and a wake-up for those waiting for a
/// certificate to be stored; and how fast each voter answered lately.
#[derive(Default)]
pub(crate) struct Flights(Mutex<HashMap<(ChannelId, u64), Arc<Flight>>>, VoteLatency);

/// A smoothed time each server took to answer a vote request (over all
/// channels), to ask the fastest voters first.
#[derive(Default)]
struct VoteLatency(Mutex<HashMap<ServerName, Duration>>);

impl VoteLatency {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ServerName, Duration>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `servers` in the order to ask them: fastest first, never-asked ones
    /// (to learn how fast they are) before all others.
    fn order(&self, mut servers: Vec<ServerName>) -> Vec<ServerName> {
        let map = self.map();
        servers.sort_by_key(|s| map.get(s).copied().unwrap_or_default());
        servers
    }

    /// How long to wait for `server`'s vote before asking another voter.
    fn hedge(&self, server: &ServerName) -> Duration {
        let expected = self.map().get(server).copied().unwrap_or_default();
        expected.saturating_mul(2).clamp(HEDGE_MIN, HEDGE_MAX)
    }

    /// `server` answered in `took`, or (`None`) did not answer.
    fn record(&self, server: &ServerName, took: Option<Duration>) {
        let mut map = self.map();
        let next = match (map.get(server).copied(), took) {
            (_, None) => FAILED_VOTER,
            (None, Some(took)) => took,
            (Some(before), Some(took)) if before >= FAILED_VOTER => took,
            (Some(before), Some(took)) => (before.saturating_mul(3) + took) / 4,
        };
        // Bounded by the servers this one shares channels with.
        map.insert(server.clone(), next);
    }
}

/// One commit's certification on this server.
#[derive(Default)]
pub(crate) struct Flight {
    /// Held while votes are collected, so that the client's request and
    /// the certifier task do not both ask every voter.
    collecting: tokio::sync::Mutex<()>,
    /// Woken when the commit's certificate is stored here.
    stored: tokio::sync::Notify,
}

impl Flights {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(ChannelId, u64), Arc<Flight>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn latency(&self) -> &VoteLatency {
        &self.1
    }

    fn join(&self, channel: ChannelId, epoch: u64) -> Arc<Flight> {
        Arc::clone(self.map().entry((channel, epoch)).or_default())
    }

    /// Drops `flight`, and its entry once nobody else holds it.
    fn leave(&self, channel: ChannelId, epoch: u64, flight: Arc<Flight>) {
        drop(flight);
        let mut map = self.map();
        if map
            .get(&(channel, epoch))
            .is_some_and(|f| Arc::strong_count(f) == 1)
        {
            map.remove(&(channel, epoch));
        }
    }

    fn stored(&self, channel: ChannelId, epoch: u64) {
        if let Some(flight) = self.map().get(&(channel, epoch)) {
            flight.stored.notify_waiters();
        }
    }
}

fn internal(what: &str) -> impl Fn(String) -> ApiError + '_ {
    move |e| {
        tracing::error!(error = %e, "{what}");
        ApiError::internal(format!("{what} failed"))
    }
}

/// What the local node made of a submission.
pub(crate) enum Ordered {
    /// It applied it.
    Outcome(Outcome),
    /// It is not the leader; the leader it knows, if any.
    NotLeader(Option<ServerName>),
}

/// Orders `submission` if this server's node leads the channel's group.
pub(crate) async fn order_local(
    state: &Shared,
    submission: Submission,
) -> Result<Ordered, ApiError> {
    let channel = submission.channel;
    let orderer = state
        .channels
        .orderer(channel, false)
        .await
        .map_err(internal("starting the channel's orderer"))?;
    if !orderer.is_leader() {
        return Ok(Ordered::NotLeader(orderer.leader_server()));
    }
    // A quiesced group's leader resumes its heartbeats (spec §10.6), or
    // its followers, woken by this entry, would call an election.
    state.channels.activity.touch(channel);
    if orderer.is_quiet()
        && let Err(e) = orderer.wake().await
    {
        tracing::warn!(%channel, error = %e, "waking the channel's group");
    }
    ensure_membership(state, &orderer, channel).await?;
    match tokio::time::timeout(SUBMIT_WAIT, orderer.submit(submission)).await {
        Err(_) => Err(ApiError::unavailable(
            "the channel's ordering group did not commit the submission in time (a majority \
             of its servers may be down); it may still be ordered later, and resubmitting \
             the same commit is safe",
        )),
        Ok(Err(OrderError::NotLeader { leader_server, .. })) => {
            Ok(Ordered::NotLeader(leader_server))
        }
        Ok(Err(e @ OrderError::Stopped(_))) => {
            state.channels.forget(channel).await;
            Err(ApiError::unavailable(format!(
                "the channel's orderer stopped ({e}); it restarts from its log on the next \
                 request, and resubmitting the same commit is safe"
            )))
        }
        Ok(Err(e)) => Err(internal("ordering the commit")(e.to_string())),
        Ok(Ok(outcome)) => Ok(Ordered::Outcome(outcome)),
    }
}

/// Orders `submission` through the channel's leader, wherever it is.
pub(crate) async fn order(state: &Shared, submission: Submission) -> Result<Outcome, ApiError> {
    let me = state.config.server_name.clone();
    let deadline = tokio::time::Instant::now() + FORWARD_DEADLINE;
    loop {
        let last_error = match order_local(state, submission.clone()).await? {
            Ordered::Outcome(outcome) => return Ok(outcome),
            Ordered::NotLeader(Some(leader)) if leader != me => {
                match forward(state, &leader, &submission).await {
                    Ok(Some(outcome)) => return Ok(outcome),
                    Ok(None) => format!("{leader} is no longer the leader"),
                    // The leader limits what this server forwards (§10.8):
                    // the client hears it, with the leader's wait, rather
                    // than retrying here until the deadline.
                    Err(e) if e.status == reqwest::StatusCode::TOO_MANY_REQUESTS => return Err(e),
                    Err(e) => {
                        tracing::info!(%leader, error = %e.message, "forwarding a commit to the leader");
                        e.message
                    }
                }
            }
            Ordered::NotLeader(_) => "an election is under way".to_owned(),
        };
        // No leader answered: if this node was quiesced, its timers go on,
        // so that an election can replace a leader that is gone.
        crate::quiesce::ticks_on(state, submission.channel);
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::unavailable(format!(
                "no leader of the channel's ordering group could order the commit ({last_error}); \
                 a majority of its servers may be down. Resubmitting the same commit is safe"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[derive(Deserialize)]
struct SubmitAnswer {
    outcome: String,
    epoch: Option<u64>,
    commit_hash: Option<String>,
    current: Option<u64>,
    reason: Option<String>,
}

/// Forwards a submission to `leader`; `None` if it says it does not lead.
async fn forward(
    state: &Shared,
    leader: &ServerName,
    submission: &Submission,
) -> Result<Option<Outcome>, ApiError> {
    let body = serde_json::to_vec(submission)
        .map_err(|e| ApiError::internal(format!("encoding the submission: {e}")))?;
    let path = format!("/v0/federation/channels/{}/submit", submission.channel);
    let answer = state.federation.client.post(leader, &path, body).await?;
    let invalid = |why: &str| {
        ApiError::new(
            reqwest::StatusCode::BAD_GATEWAY,
            "remote_invalid",
            format!("{leader} answered a forwarded commit wrongly: {why}"),
        )
    };
    let a: SubmitAnswer =
        serde_json::from_slice(&answer.body).map_err(|e| invalid(&e.to_string()))?;
    Ok(Some(match a.outcome.as_str() {
        "accepted" => {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(a.commit_hash.unwrap_or_default(), &mut hash)
                .map_err(|_| invalid("bad commit_hash"))?;
            Outcome::Accepted {
                epoch: a.epoch.ok_or_else(|| invalid("no epoch"))?,
                commit_hash: CommitHash::from_bytes(hash),
            }
        }
        "wrong_epoch" => Outcome::WrongEpoch {
            current: a.current.ok_or_else(|| invalid("no current epoch"))?,
            winner: None,
        },
        "rejected" => Outcome::Rejected {
            reason: a.reason.unwrap_or_default(),
        },
        "not_leader" => return Ok(None),
        other => return Err(invalid(&format!("unknown outcome {other:?}"))),
    }))
}

/// The sponsorships of `members` as (server, key) pairs, from the records
/// this server holds (its own devices' and cached remote ones), each
/// verified at `now`. Members without a valid record contribute nothing.
fn sponsors(
    store: &dyn Store,
    members: &[DeviceId],
    now: u64,
) -> Result<Vec<(ServerName, SignaturePublicKey)>, StoreError> {
    let mut out = Vec::new();
    for member in members {
        let Some(bytes) = record_bytes(store, member)? else {
            tracing::warn!(%member, "no record of a channel member");
            continue;
        };
        let record = DeviceRecordIn::decode(&bytes)
            .ok()
            .and_then(|r| r.verify(now).ok())
            .filter(|r| r.device_id() == *member);
        let Some(record) = record else {
            tracing::warn!(%member, "a channel member's record does not verify now");
            continue;
        };
        for s in record.sponsorships() {
            out.push((s.server().clone(), s.server_key().clone()));
        }
    }
    Ok(out)
}

/// [`sponsors`], with each record's verification remembered in `records`:
/// a channel's voter set is computed for every commit, from every member's
/// record, most of them unchanged since the last time (at 137 members this
/// was 38 ms of signature checks per commit, twice).
fn cached_sponsors(
    store: &dyn Store,
    records: &std::sync::Mutex<VerifiedRecords>,
    members: &[DeviceId],
    now: u64,
) -> Result<Vec<(ServerName, SignaturePublicKey)>, StoreError> {
    let mut out = Vec::new();
    for member in members {
        let Some(bytes) = record_bytes(store, member)? else {
            tracing::warn!(%member, "no record of a channel member");
            continue;
        };
        let record = records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .verify(&bytes, now)
            .filter(|r| r.device_id() == *member);
        let Some(record) = record else {
            tracing::warn!(%member, "a channel member's record does not verify now");
            continue;
        };
        for s in record.sponsorships() {
            out.push((s.server().clone(), s.server_key().clone()));
        }
    }
    Ok(out)
}

/// The voter set of `epoch` (the servers sponsoring its members, with
/// their accepted keys), as clients compute it (§10.2).
async fn voter_set(state: &Shared, channel: ChannelId, epoch: u64) -> Result<VoterSet, ApiError> {
    let now = now_ms();
    let channels = Arc::clone(&state.channels);
    state
        .db(move |s| {
            let members = s
                .epoch_state(&channel, epoch)?
                .map(|e| e.members)
                .unwrap_or_default();
            Ok(VoterSet::new(
                cached_sponsors(s, &channels.records, &members, now)?
                    .into_iter()
                    .map(|(server, key)| (server, vec![key])),
            ))
        })
        .await
}

/// The servers of the channel at its current epoch.
async fn current_servers(
    state: &Shared,
    channel: ChannelId,
) -> Result<(u64, BTreeSet<ServerName>), ApiError> {
    let now = now_ms();
    let Some(row) = state.db(move |s| s.channel(&channel)).await? else {
        return Ok((0, BTreeSet::new()));
    };
    let epoch = row.epoch;
    if let Some(servers) = state.channels.cached_servers(channel, epoch) {
        return Ok((epoch, servers));
    }
    let channels = Arc::clone(&state.channels);
    let servers: BTreeSet<ServerName> = state
        .db(move |s| {
            let members = s
                .epoch_state(&channel, epoch)?
                .map(|e| e.members)
                .unwrap_or_default();
            Ok(cached_sponsors(s, &channels.records, &members, now)?
                .into_iter()
                .map(|(server, _)| server)
                .collect())
        })
        .await?;
    state
        .channels
        .cache_servers(channel, epoch, servers.clone());
    Ok((epoch, servers))
}

/// On the leader: makes the Raft voters exactly the servers that sponsor
/// the members of the channel's current epoch (new servers first join as
/// learners and catch up), before the next commit is ordered.
pub(crate) async fn ensure_membership(
    state: &Shared,
    orderer: &Orderer,
    channel: ChannelId,
) -> Result<(), ApiError> {
    let gate = state.channels.membership_gate(channel);
    let _changing = gate.lock().await;
    let (epoch, servers) = current_servers(state, channel).await?;
    if state.channels.membership_checked(channel) == Some(epoch) {
        return Ok(());
    }
    if servers.is_empty() {
        return Err(ApiError::internal(
            "no server sponsoring the channel's members is known",
        ));
    }
    let (voters, learners) = orderer.membership();
    if voters != servers || !learners.is_empty() {
        tracing::info!(%channel, epoch, ?servers, "changing the ordering group");
        match tokio::time::timeout(
            MEMBERSHIP_WAIT,
            orderer.set_members(&servers, &BTreeSet::new()),
        )
        .await
        {
            Err(_) => {
                return Err(ApiError::unavailable(format!(
                    "the channel's ordering group is changing to {} and not all of them \
                     answered in time",
                    servers
                        .iter()
                        .map(ServerName::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            Ok(Err(e)) => {
                return Err(ApiError::unavailable(format!(
                    "changing the channel's ordering group: {e}"
                )));
            }
            Ok(Ok(())) => {}
        }
    }
    state.channels.set_membership_checked(channel, epoch);
    Ok(())
}

/// Waits until this server's log has accepted a commit for `epoch`.
async fn wait_for_commit(
    state: &Shared,
    channel: ChannelId,
    epoch: u64,
) -> Result<CommitRow, ApiError> {
    let deadline = tokio::time::Instant::now() + APPLY_WAIT;
    loop {
        if let Some(row) = state.db(move |s| s.commit(&channel, epoch)).await? {
            return Ok(row);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::unavailable(format!(
                "this server has not received the commit of epoch {epoch} from the channel's \
                 ordering group yet"
            )));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        state.channels.wait_accepted(channel, epoch, left).await;
    }
}

/// Asks `server` for its vote on `hash` winning `epoch`.
async fn request_vote(
    state: Shared,
    server: ServerName,
    channel: ChannelId,
    epoch: u64,
    hash: CommitHash,
) -> Result<Vote, String> {
    let body = json!({ "epoch": epoch, "commit_hash": hash.to_string() }).to_string();
    let path = format!("/v0/federation/channels/{channel}/votes");
    let answer = state
        .federation
        .client
        .post(&server, &path, body.into_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let value: Value = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
    let text = value
        .get("vote")
        .and_then(Value::as_str)
        .ok_or("no vote in the answer")?;
    let bytes = unb64("vote", text).map_err(|e| e.message)?;
    let vote = VoteIn::decode(&bytes)
        .map_err(|e| e.to_string())?
        .verify()
        .map_err(|e| e.to_string())?;
    if vote.server() != &server {
        return Err(format!("{server} sent a vote by {}", vote.server()));
    }
    Ok(vote)
}

/// Certifies the commit this server's log accepted for `epoch` (see the
/// module docs) and returns it with its certificate. Does nothing more for
/// a commit already certified here; waits for a collection already under
/// way here rather than starting a second one.
pub(crate) async fn certify(
    state: &Shared,
    channel: ChannelId,
    epoch: u64,
) -> Result<CommitRow, ApiError> {
    let row = wait_for_commit(state, channel, epoch)
        .instrument(tracing::debug_span!("certify.wait_commit"))
        .await?;
    if row.certificate.is_some() {
        return Ok(row);
    }
    let flights = &state.channels.flights;
    let flight = flights.join(channel, epoch);
    let result = async {
        let _collecting = flight.collecting.lock().await;
        // Whoever held the lock before may have stored the certificate, or
        // a push may have brought it.
        match state.db(move |s| s.commit(&channel, epoch)).await? {
            Some(row) if row.certificate.is_some() => Ok(row),
            Some(row) => collect(state, channel, row).await,
            None => Err(ApiError::internal("an accepted commit disappeared")),
        }
    }
    .await;
    flights.leave(channel, epoch, flight);
    result
}

/// Collects the votes for `row` (not certified yet), stores the
/// certificate and pushes it to the channel's other servers.
async fn collect(
    state: &Shared,
    channel: ChannelId,
    row: CommitRow,
) -> Result<CommitRow, ApiError> {
    let epoch = row.epoch;
    let voters = voter_set(state, channel, epoch)
        .instrument(tracing::debug_span!("certify.voter_set"))
        .await?;
    let hash = CommitHash::from_bytes(row.commit_hash);
    let me = state.config.server_name.clone();
    let mut collector = VoteCollector::new(channel, epoch, hash, voters.clone());
    let mut certificate = None;
    if voters.contains(&me) {
        let own = Vote::sign(&state.key, me.clone(), channel, epoch, hash);
        certificate = collector
            .add(own)
            .map_err(|e| ApiError::internal(format!("this server's own vote: {e}")))?;
    }
    if certificate.is_none() {
        let others: Vec<ServerName> = voters.servers().filter(|s| **s != me).cloned().collect();
        let ballot = Ballot {
            channel,
            epoch,
            hash,
            quorum: voters.quorum(),
        };
        certificate = ask_votes(state, &mut collector, ballot, others)
            .instrument(tracing::debug_span!("certify.votes"))
            .await;
    }
    let Some(certificate) = certificate else {
        return Err(ApiError::unavailable(format!(
            "only {} of the {} votes a certificate of epoch {epoch} needs arrived; a majority \
             of the channel's servers may be down",
            collector.count(),
            voters.quorum()
        )));
    };
    // Before this commit's events move local devices on, the messages of
    // epochs they are about to leave behind must be here (§11.3).
    crate::backfill::before_release(state, channel, epoch).await;
    let row = store_certificate(state, channel, row, &certificate)
        .instrument(tracing::debug_span!("certify.store"))
        .await?;
    push_certificate(state, channel, &voters, &certificate);
    Ok(row)
}

/// What a collection of votes is for.
#[derive(Clone, Copy)]
struct Ballot {
    channel: ChannelId,
    epoch: u64,
    hash: CommitHash,
    /// Votes a certificate needs.
    quorum: usize,
}

/// Asks `others` (voters of the collector's epoch) for their votes until
/// the collector makes a certificate, for up to [`VOTE_WAIT`]. Only as many
/// as a majority still needs are asked at once, the fastest lately first
/// ([`VoteLatency`]); one more is asked whenever an ask fails or its vote
/// is refused, and when the slowest awaited answer takes longer than its
/// hedge delay (twice the server's usual time, 20 ms to 1 s). Asking every
/// voter at once cost a signed request, a vote signature and its check per
/// voter beyond the majority, for nothing.
async fn ask_votes(
    state: &Shared,
    collector: &mut VoteCollector,
    ballot: Ballot,
    others: Vec<ServerName>,
) -> Option<OrderingCertificate> {
    let Ballot {
        channel,
        epoch,
        hash,
        quorum,
    } = ballot;
    let latency = state.channels.flights.latency();
    let mut queue = latency.order(others).into_iter();
    let mut asks = tokio::task::JoinSet::new();
    let ask = |asks: &mut tokio::task::JoinSet<_>, server: ServerName| {
        let state = Arc::clone(state);
        asks.spawn(async move {
            let started = tokio::time::Instant::now();
            let vote = request_vote(state, server.clone(), channel, epoch, hash).await;
            (server, started.elapsed(), vote)
        });
    };
    let needed = quorum.saturating_sub(collector.count());
    let mut hedge = HEDGE_MIN;
    for server in queue.by_ref().take(needed.max(1)) {
        hedge = latency.hedge(&server);
        ask(&mut asks, server);
    }
    let collected = tokio::time::timeout(VOTE_WAIT, async {
        loop {
            let joined = tokio::select! {
                joined = asks.join_next() => joined,
                () = tokio::time::sleep(hedge) => {
                    // Slower than usual: ask one more voter as well.
                    if let Some(server) = queue.next() {
                        hedge = latency.hedge(&server).max(hedge);
                        ask(&mut asks, server);
                    } else {
                        hedge = VOTE_WAIT;
                    }
                    continue;
                }
            };
            let answered = match joined? {
                Ok((server, took, Ok(vote))) => match collector.add(vote) {
                    Ok(Some(c)) => {
                        latency.record(&server, Some(took));
                        return Some(c);
                    }
                    Ok(None) => {
                        latency.record(&server, Some(took));
                        true
                    }
                    Err(e) => {
                        tracing::warn!(%channel, epoch, %server, "a refused vote: {e}");
                        latency.record(&server, None);
                        false
                    }
                },
                Ok((server, _, Err(e))) => {
                    tracing::info!(%channel, epoch, %server, "no vote: {e}");
                    latency.record(&server, None);
                    false
                }
                Err(_) => false,
            };
            // Whatever still lacks: one more voter now, unless the
            // answers awaited already suffice.
            let awaited = asks.len();
            let needed = quorum.saturating_sub(collector.count());
            if !answered || awaited < needed {
                for server in queue.by_ref().take(needed.saturating_sub(awaited).max(1)) {
                    ask(&mut asks, server);
                }
            }
        }
    })
    .await;
    asks.abort_all();
    collected.ok().flatten()
}

/// Sends `certificate` to every other voter of its epoch and every other
/// server of the channel's Raft group, in the background and once: a server
/// that does not take it (down, or its log not there yet) collects the
/// votes itself after [`PUSH_WAIT`].
fn push_certificate(
    state: &Shared,
    channel: ChannelId,
    voters: &VoterSet,
    certificate: &OrderingCertificate,
) {
    let me = &state.config.server_name;
    let mut servers: BTreeSet<ServerName> = voters.servers().cloned().collect();
    if let Some(orderer) = state.channels.running(channel) {
        let (raft_voters, learners) = orderer.membership();
        servers.extend(raft_voters);
        servers.extend(learners);
    }
    servers.remove(me);
    if servers.is_empty() {
        return;
    }
    let body = json!({ "certificate": b64(&certificate.encode()) })
        .to_string()
        .into_bytes();
    let path = format!("/v0/federation/channels/{channel}/certificate");
    let epoch = certificate.epoch();
    for server in servers {
        let state = Arc::clone(state);
        let (path, body) = (path.clone(), body.clone());
        tokio::spawn(async move {
            if let Err(e) = state.federation.client.post(&server, &path, body).await {
                tracing::debug!(%channel, epoch, %server, "a pushed certificate was not taken: {e}");
            }
        });
    }
}

/// Why a pushed certificate was not stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PushRefused {
    /// It does not decode, or is for another channel.
    #[error("not a certificate of this channel: {0}")]
    Malformed(String),
    /// This server's log has not accepted a commit for its epoch (yet).
    #[error("this server's log has not accepted a commit for epoch {0} yet")]
    NotYet(u64),
    /// This server's log accepted another commit for its epoch.
    #[error("this server's log accepted another commit for epoch {0}")]
    AnotherCommit(u64),
    /// It does not verify against this server's voter set of its epoch.
    #[error("the certificate does not verify here: {0}")]
    Invalid(CertificateError),
}

/// Stores a certificate pushed by another server of the channel, if it
/// certifies the commit this server's own log accepted for its epoch and
/// verifies against the voter set this server computes for that epoch
/// (spec §10.8). `Ok(false)`: this server had a certificate already.
/// Waits up to `wait` for the log to reach the epoch; refused, it changes
/// nothing.
pub(crate) async fn accept_pushed(
    state: &Shared,
    channel: ChannelId,
    bytes: &[u8],
    wait: Duration,
) -> Result<Result<bool, PushRefused>, ApiError> {
    let pushed = match OrderingCertificateIn::decode(bytes) {
        Ok(c) if c.channel() == channel => c,
        Ok(c) => {
            return Ok(Err(PushRefused::Malformed(format!(
                "it is for channel {}",
                c.channel()
            ))));
        }
        Err(e) => return Ok(Err(PushRefused::Malformed(e.to_string()))),
    };
    let epoch = pushed.epoch();
    let deadline = tokio::time::Instant::now() + wait;
    let row = loop {
        if let Some(row) = state.db(move |s| s.commit(&channel, epoch)).await? {
            break row;
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Err(PushRefused::NotYet(epoch)));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        state.channels.wait_accepted(channel, epoch, left).await;
    };
    if *pushed.commit_hash().as_bytes() != row.commit_hash {
        return Ok(Err(PushRefused::AnotherCommit(epoch)));
    }
    // Checked even when this server has a certificate already, so that a
    // bad push is always answered as one.
    let voters = voter_set(state, channel, epoch).await?;
    let certificate = match pushed.verify_for(channel, epoch, &row.commit, &voters) {
        Ok(c) => c,
        Err(e) => return Ok(Err(PushRefused::Invalid(e))),
    };
    if row.certificate.is_some() {
        return Ok(Ok(false));
    }
    crate::backfill::before_release(state, channel, epoch).await;
    store_certificate(state, channel, row, &certificate).await?;
    Ok(Ok(true))
}

/// Waits up to `wait` for the certificate of `epoch` to be stored here by
/// someone else; `true` if it was.
async fn wait_for_certificate(
    state: &Shared,
    channel: ChannelId,
    epoch: u64,
    wait: Duration,
) -> Result<bool, ApiError> {
    let flights = &state.channels.flights;
    let flight = flights.join(channel, epoch);
    let result = async {
        let stored = flight.stored.notified();
        tokio::pin!(stored);
        // Registered before the check, so a store in between is not missed.
        stored.as_mut().enable();
        let certified = state
            .db(move |s| s.commit(&channel, epoch))
            .await?
            .is_some_and(|row| row.certificate.is_some());
        if certified {
            return Ok(true);
        }
        Ok(tokio::time::timeout(wait, stored).await.is_ok())
    }
    .await;
    flights.leave(channel, epoch, flight);
    result
}

/// Stores a certificate and appends the `commit` events for the local
/// members of the epoch the commit ends (once).
async fn store_certificate(
    state: &Shared,
    channel: ChannelId,
    mut row: CommitRow,
    certificate: &OrderingCertificate,
) -> Result<CommitRow, ApiError> {
    let epoch = row.epoch;
    let certificate = certificate.encode();
    let payload = json!({
        "channel": channel.to_string(),
        "epoch": epoch,
        "commit": b64(&row.commit),
        "commit_hash": hex::encode(row.commit_hash),
        "certificate": b64(&certificate),
    })
    .to_string();
    let now = now_ms();
    let cert = certificate.clone();
    let events = state
        .db(move |s| s.certify_commit(&channel, epoch, &cert, &payload, now))
        .await?;
    state.channels.flights.stored(channel, epoch);
    if let Some(events) = events {
        state.metrics.commits_accepted.inc();
        state.hub.hand_off(&events);
        tracing::info!(%channel, epoch, "commit certified");
    }
    row.certificate = Some(certificate);
    Ok(row)
}

/// Certifies every commit this server's log accepts, in the background,
/// until the queue closes or the server shuts down; the leader then brings
/// the Raft membership up to date, so new servers join at once.
pub(crate) async fn run_certifier(state: Shared, mut accepted: mpsc::UnboundedReceiver<Accepted>) {
    let mut shutdown = state.shutdown.clone();
    loop {
        let next = tokio::select! {
            _ = shutdown.changed() => break,
            next = accepted.recv() => next,
        };
        let Some((channel, epoch)) = next else { break };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            // The committer's server collects the votes and pushes the
            // certificate; collecting them here too would double the work.
            match wait_for_certificate(&state, channel, epoch, PUSH_WAIT).await {
                Ok(true) => {}
                Ok(false) | Err(_) => certify_with_retries(&state, channel, epoch).await,
            }
            if let Some(orderer) = state.channels.running(channel)
                && orderer.is_leader()
                && let Err(e) = ensure_membership(&state, &orderer, channel).await
            {
                tracing::info!(%channel, "membership not updated yet: {}", e.message);
            }
        });
    }
}

/// [`certify`], retried with backoff.
async fn certify_with_retries(state: &Shared, channel: ChannelId, epoch: u64) {
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=CERTIFY_ATTEMPTS {
        if *state.shutdown.borrow() {
            return;
        }
        match certify(state, channel, epoch).await {
            Ok(_) => break,
            Err(e) if attempt == CERTIFY_ATTEMPTS => {
                tracing::warn!(%channel, epoch, "giving up certifying for now: {}", e.message);
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2);
            }
        }
    }
}

/// Queues `message` (stored here) for every other server of the channel.
pub(crate) async fn fan_out(
    state: &Shared,
    channel: ChannelId,
    message: &MessageRow,
) -> Result<(), ApiError> {
    let (_, servers) = current_servers(state, channel).await?;
    let me = &state.config.server_name;
    let body = json!({
        "messages": [{
            "epoch": message.epoch,
            "sender": message.sender.to_string(),
            "message": b64(&message.message),
        }]
    })
    .to_string()
    .into_bytes();
    let path = format!("/v0/federation/channels/{channel}/messages");
    for server in servers.into_iter().filter(|s| s != me) {
        crate::federation::outbox::enqueue(state, server, path.clone(), body.clone()).await?;
    }
    Ok(())
}

/// [`fan_out`] for the messages of one multi-message send (spec §6.7), in
/// order: to each other server in as few fan-outs as fit, each of at most
/// [`MAX_FANOUT_BATCH`] messages and about one largest message's bytes
/// (`max_message_bytes`), so no fan-out grows past what one message's
/// would be allowed.
pub(crate) async fn fan_out_many(
    state: &Shared,
    channel: ChannelId,
    messages: &[MessageRow],
) -> Result<(), ApiError> {
    let (_, servers) = current_servers(state, channel).await?;
    let me = &state.config.server_name;
    let servers: Vec<ServerName> = servers.into_iter().filter(|s| s != me).collect();
    if servers.is_empty() {
        return Ok(());
    }
    let budget = state.config.limits.max_message_bytes;
    let path = format!("/v0/federation/channels/{channel}/messages");
    let mut rest = messages;
    while !rest.is_empty() {
        // At least one message per fan-out, however large.
        let mut take = 1;
        let mut bytes = rest.first().map_or(0, |m| m.message.len());
        while let Some(next) = rest.get(take)
            && take < MAX_FANOUT_BATCH
            && bytes + next.message.len() <= budget
        {
            bytes += next.message.len();
            take += 1;
        }
        let (chunk, after) = rest.split_at(take);
        rest = after;
        let items: Vec<Value> = chunk
            .iter()
            .map(|m| {
                json!({
                    "epoch": m.epoch,
                    "sender": m.sender.to_string(),
                    "message": b64(&m.message),
                })
            })
            .collect();
        let body = json!({ "messages": items }).to_string().into_bytes();
        for server in &servers {
            crate::federation::outbox::enqueue(state, server.clone(), path.clone(), body.clone())
                .await?;
        }
    }
    Ok(())
}

/// Stores messages fanned out by `origin` and appends their events for the
/// local members; returns how many were new. Each message's epoch must
/// have been reached here (its starting commit certified first), its
/// sender must be a member of that epoch, and `origin` must sponsor it.
pub(crate) async fn deliver_remote_messages(
    state: &Shared,
    channel: ChannelId,
    origin: &ServerName,
    messages: Vec<FannedMessage>,
) -> Result<usize, ApiError> {
    debug_assert!(messages.len() <= MAX_FANOUT_BATCH);
    let mut stored = 0;
    for m in messages {
        let sender: DeviceId = m
            .sender
            .parse()
            .map_err(|_| ApiError::bad_request("`sender` is not a device id"))?;
        let message = unb64("message", &m.message)?;
        check_remote_size(state, &message)?;
        if let Some(previous) = m.epoch.checked_sub(1) {
            certify(state, channel, previous).await?;
        }
        if store_remote_message(state, channel, origin, m.epoch, sender, message).await? {
            stored += 1;
        }
    }
    Ok(stored)
}

/// 400 unless `message` is 1 byte to the configured limit.
pub(crate) fn check_remote_size(state: &Shared, message: &[u8]) -> Result<(), ApiError> {
    let limit = state.config.limits.max_message_bytes;
    if message.is_empty() || message.len() > limit {
        return Err(ApiError::bad_request(format!(
            "a message must be 1 to {limit} bytes"
        )));
    }
    Ok(())
}

/// Stores one message that `origin` accepted from its device `sender` in
/// `epoch` (whose starting commit the caller made sure is certified here)
/// and appends its events for the local members; `true` if it was new.
/// 403 unless the sender is a member of that epoch and `origin` sponsors it.
pub(crate) async fn store_remote_message(
    state: &Shared,
    channel: ChannelId,
    origin: &ServerName,
    epoch: u64,
    sender: DeviceId,
    message: Vec<u8>,
) -> Result<bool, ApiError> {
    let origin_c = origin.clone();
    let now = now_ms();
    let check = state
        .db(move |s| {
            let Some(epoch_state) = s.epoch_state(&channel, epoch)? else {
                return Ok(Some(format!("the channel has no epoch {epoch} here")));
            };
            if !epoch_state.members.contains(&sender) {
                return Ok(Some(format!("{sender} is not a member of epoch {epoch}")));
            }
            let sponsored = sponsors(s, &[sender], now)?
                .iter()
                .any(|(server, _)| *server == origin_c);
            if !sponsored {
                return Ok(Some(format!("{origin_c} does not sponsor {sender}")));
            }
            Ok(None)
        })
        .await?;
    if let Some(why) = check {
        return Err(ApiError::forbidden(why));
    }
    let received_at = now_ms();
    let new = NewMessage {
        id: kith_proto::sign::message_id(&message),
        epoch,
        sender,
        message,
        received_at,
    };
    let (row, events) = state
        .db(move |s| {
            s.store_message(&channel, &new, &|m| {
                Value::Object(crate::api::channels::message_json(channel, m)).to_string()
            })
        })
        .await?;
    state.hub.hand_off(&events);
    let new = row.received_at == received_at;
    if new {
        state.metrics.channel_messages.inc();
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServerName {
        s.parse().unwrap()
    }

    #[test]
    fn voters_are_asked_fastest_first_and_failed_ones_last() {
        let latency = VoteLatency::default();
        let (a, b, c) = (name("a.test"), name("b.test"), name("c.test"));
        latency.record(&a, Some(Duration::from_millis(8)));
        latency.record(&b, Some(Duration::from_millis(3)));
        // Never asked: first, to learn how fast it is.
        assert_eq!(
            latency.order(vec![a.clone(), b.clone(), c.clone()]),
            vec![c.clone(), b.clone(), a.clone()]
        );
        latency.record(&c, None);
        assert_eq!(
            latency.order(vec![a.clone(), b.clone(), c.clone()]),
            vec![b.clone(), a.clone(), c.clone()]
        );
        // A failed voter that answers again counts at its new speed.
        latency.record(&c, Some(Duration::from_millis(1)));
        assert_eq!(latency.order(vec![a, b, c.clone()])[0], c);
    }

    #[test]
    fn the_hedge_delay_follows_the_voter_within_bounds() {
        let latency = VoteLatency::default();
        let (fast, slow, failed) = (name("fast.test"), name("slow.test"), name("failed.test"));
        latency.record(&fast, Some(Duration::from_millis(1)));
        latency.record(&slow, Some(Duration::from_millis(100)));
        latency.record(&failed, None);
        assert_eq!(latency.hedge(&name("new.test")), HEDGE_MIN);
        assert_eq!(latency.hedge(&fast), HEDGE_MIN);
        assert_eq!(latency.hedge(&slow), Duration::from_millis(200));
        assert_eq!(latency.hedge(&failed), HEDGE_MAX);
        // Smoothed: one fast answer moves a slow voter a quarter of the way.
        latency.record(&slow, Some(Duration::from_millis(20)));
        assert_eq!(latency.hedge(&slow), Duration::from_millis(160));
    }
}
