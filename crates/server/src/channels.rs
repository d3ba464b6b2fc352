//! Channels on this homeserver: the server's MLS view of each channel
//! (`PublicChannel` in one `MlsStore`), the commit validator the ordering
//! state machine calls, and each channel's orderer (its node of the
//! channel's openraft group from `kith-order`, talking to the other
//! servers' nodes over federation), started lazily and stopped on shutdown.
//!
//! The server [`Store`] is the truth about accepted commits, and the MLS
//! state is derived from it. The validator merges each accepted commit
//! into the MLS state (under the MLS mutex, without a disk sync), then
//! writes the commit with the state of the epoch it starts in one store
//! transaction (synced, without the mutex), so:
//!
//! - on restart the Raft log replays through the validator, which answers
//!   from the store for every epoch it already holds (without touching MLS);
//! - a crash can leave the MLS state behind the store (its write not yet
//!   on disk), and [`catch_up`] re-applies the stored commits before the
//!   next validation; or ahead of it (the store's write lost, or failed),
//!   and the validator rebuilds it from the store's record of its epoch
//!   before the log replays the rest.
//!
//! Every accepted commit is also announced on a queue that the certifier
//! task reads (`ordering::run_certifier`): each server of a channel
//! certifies the commits its log accepted (from a pushed certificate, or by
//! collecting the votes itself), so a server that was down certifies (and
//! delivers) what it missed when it
//! returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use kith_mls::storage::BatchError;
use kith_mls::{MlsStore, PublicChannel, ServerError, ValidatedCommit};
use kith_order::raft::{LogDb, MemLogStore, SqliteLogStore};
use kith_order::{ChannelOrder, ChannelOrderer, CommitValidator, OrderConfig, Submission};
use kith_proto::{ChannelId, DeviceId, DeviceRecordIn, ServerName, VerifiedRecords};
use tokio::sync::mpsc;

use crate::federation::Federation;
use crate::federation::raft::FederationNetwork;
use crate::store::{CommitRow, EpochState, NewCommit, RemoteRecord, Store};

/// Verified member records kept for voter sets (a few hundred bytes
/// each).
const VERIFIED_RECORDS: usize = 4096;

/// How long a restarted orderer may take to replay its log.
const REPLAY_WAIT: Duration = Duration::from_secs(30);

/// The MLS store of the server's public channel states, shared by handlers
/// and validators (a `PublicChannel` borrows it, so it is locked for the
/// length of one operation).
pub(crate) type SharedMls = Arc<Mutex<MlsStore>>;

/// Locks the MLS store, whatever a panicking holder left behind (every
/// operation on it is a SQLite transaction of its own).
pub(crate) fn lock_mls(mls: &Mutex<MlsStore>) -> MutexGuard<'_, MlsStore> {
    mls.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where channels' Raft logs live.
enum RaftLogs {
    /// One SQLite database (`raft.db`) shared by every channel's log, with
    /// group commit: concurrent appends of different channels share an
    /// fsync.
    Sqlite(Arc<LogDb>),
    /// In memory, for the memory backend.
    Memory,
}

/// A running orderer.
pub(crate) type Orderer = Arc<ChannelOrderer<Validator>>;

/// A commit this server's log accepted: (channel, epoch).
pub(crate) type Accepted = (ChannelId, u64);

type Gates = Mutex<HashMap<ChannelId, Arc<tokio::sync::Mutex<()>>>>;

fn gate(gates: &Gates, channel: ChannelId) -> Arc<tokio::sync::Mutex<()>> {
    Arc::clone(lock(gates).entry(channel).or_default())
}

/// Every channel's lock and orderer, the MLS store and the Raft logs.
pub(crate) struct Channels {
    server: ServerName,
    store: Arc<dyn Store>,
    pub(crate) mls: SharedMls,
    logs: RaftLogs,
    order_config: OrderConfig,
    federation: OnceLock<Arc<Federation>>,
    starting: Gates,
    /// Serialises membership changes per channel.
    membership: Gates,
    /// The epoch whose servers each channel's Raft membership last matched.
    membership_epochs: Mutex<HashMap<ChannelId, u64>>,
    /// The servers sponsoring each channel's members, by epoch (fan-out
    /// asks for them on every message).
    servers: Mutex<HashMap<ChannelId, (u64, std::collections::BTreeSet<ServerName>)>>,
    orderers: Mutex<HashMap<ChannelId, Orderer>>,
    accepted_tx: mpsc::UnboundedSender<Accepted>,
    accepted_rx: Mutex<Option<mpsc::UnboundedReceiver<Accepted>>>,
    /// The last epoch this server's log accepted a commit for, per channel,
    /// for requests waiting until their epoch is reached.
    applied: Arc<Applied>,
    /// When each channel's leader last reached this node (spec §11.3).
    pub(crate) heard: crate::freshness::Heard,
    /// When each shared channel was last used here, to quiesce idle ones
    /// (spec §10.6).
    pub(crate) activity: crate::quiesce::Activity,
    /// How far this server has pulled each peer's messages (spec §11.3).
    pub(crate) backfill: crate::backfill::Cursors,
    /// Members' records already verified, for voter sets.
    pub(crate) records: Mutex<VerifiedRecords>,
    /// Certifications under way (`crate::ordering`).
    pub(crate) flights: crate::ordering::Flights,
}

/// Why the channel machinery could not be opened or started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelsError {
    /// The MLS store could not be opened.
    #[error("MLS store: {0}")]
    Mls(#[from] kith_mls::StoreError),
    /// The Raft log database could not be opened.
    #[error("Raft log: {0}")]
    Raft(#[from] rusqlite::Error),
    /// The Raft log database could not be set up.
    #[error("{0}")]
    RaftLog(#[from] kith_order::raft::OpenError),
}

/// Page cache of `mls.db` and `raft.db`, in KiB (SQLite's default is
/// 2,000). They are read for commits and Raft traffic, not for messages;
/// a small cache keeps idle channels cheap (docs/performance.md).
const CHANNEL_DB_CACHE_KIB: i64 = 512;

/// Opens one of the channel databases in WAL mode with a small page cache.
///
/// `synchronous = FULL`: each commit is synced. `raft.db` switches itself to
/// its own group commit ([`LogDb`]). `mls.db` could go without the sync,
/// being derived from the server's store (written durably first, and
/// re-applied by [`catch_up`] to an MLS state left behind), but measured
/// without it the idle footprint grew by about 500 B per channel (channels
/// were made faster, and the heap kept the peak) while certified commits
/// gained under 5% (docs/performance.md, session 5): it keeps its sync.
fn open_db(path: &std::path::Path) -> Result<rusqlite::Connection, rusqlite::Error> {
    let conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "cache_size", -CHANNEL_DB_CACHE_KIB)?;
    Ok(conn)
}

impl Channels {
    /// Channels kept in `mls.db` and `raft.db` under `data_dir` (`None`:
    /// in memory).
    pub(crate) fn open(
        server: ServerName,
        store: Arc<dyn Store>,
        data_dir: Option<&std::path::Path>,
        order_config: OrderConfig,
    ) -> Result<Self, ChannelsError> {
        let (mls, logs) = match data_dir {
            Some(dir) => {
                let mls = open_db(&dir.join(crate::MLS_DB_FILE))
                    .map_err(kith_mls::StoreError::Open)
                    .and_then(MlsStore::from_connection)?;
                let path = dir.join(crate::RAFT_DB_FILE);
                let raft = LogDb::on_disk(open_db(&path)?, &path)?;
                (mls, RaftLogs::Sqlite(raft))
            }
            None => (MlsStore::in_memory()?, RaftLogs::Memory),
        };
        let (accepted_tx, accepted_rx) = mpsc::unbounded_channel();
        Ok(Self {
            server,
            store,
            mls: Arc::new(Mutex::new(mls)),
            logs,
            order_config,
            federation: OnceLock::new(),
            starting: Mutex::new(HashMap::new()),
            membership: Mutex::new(HashMap::new()),
            membership_epochs: Mutex::new(HashMap::new()),
            servers: Mutex::new(HashMap::new()),
            orderers: Mutex::new(HashMap::new()),
            accepted_tx,
            accepted_rx: Mutex::new(Some(accepted_rx)),
            applied: Arc::new(Applied::default()),
            heard: crate::freshness::Heard::default(),
            activity: crate::quiesce::Activity::default(),
            backfill: crate::backfill::Cursors::default(),
            records: Mutex::new(VerifiedRecords::new(VERIFIED_RECORDS)),
            flights: crate::ordering::Flights::default(),
        })
    }

    /// Gives the orderers their transport. Call once, before serving.
    pub(crate) fn set_federation(&self, federation: Arc<Federation>) {
        let _ = self.federation.set(federation);
    }

    /// Waits until this server's log has accepted a commit for `epoch` of
    /// `channel` (seen by this process), or `timeout`. Callers check the
    /// store before and after: a commit accepted before this process
    /// started is only there. Waking a waiter costs a map lookup, not a
    /// store read, so many requests can wait on busy channels.
    pub(crate) async fn wait_accepted(&self, channel: ChannelId, epoch: u64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first = true;
        loop {
            let woken = self.applied.notify.notified();
            tokio::pin!(woken);
            // Registered before the check, so an acceptance in between is
            // not missed.
            woken.as_mut().enable();
            if self.applied.reached(channel, epoch) {
                if first {
                    // Accepted, yet the caller did not find it in the store:
                    // do not let it spin.
                    tokio::time::sleep(Duration::from_millis(25).min(timeout)).await;
                }
                return;
            }
            first = false;
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return;
            }
        }
    }

    /// The queue of accepted commits, for the certifier task (once).
    pub(crate) fn take_accepted(&self) -> Option<mpsc::UnboundedReceiver<Accepted>> {
        lock(&self.accepted_rx).take()
    }

    /// The lock that serialises the channel's membership changes.
    pub(crate) fn membership_gate(&self, channel: ChannelId) -> Arc<tokio::sync::Mutex<()>> {
        gate(&self.membership, channel)
    }

    /// The epoch whose servers the channel's Raft membership last matched.
    pub(crate) fn membership_checked(&self, channel: ChannelId) -> Option<u64> {
        lock(&self.membership_epochs).get(&channel).copied()
    }

    /// The servers of the channel at `epoch`, if computed before.
    pub(crate) fn cached_servers(
        &self,
        channel: ChannelId,
        epoch: u64,
    ) -> Option<std::collections::BTreeSet<ServerName>> {
        lock(&self.servers)
            .get(&channel)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, s)| s.clone())
    }

    /// Remembers the servers of the channel at `epoch`.
    pub(crate) fn cache_servers(
        &self,
        channel: ChannelId,
        epoch: u64,
        servers: std::collections::BTreeSet<ServerName>,
    ) {
        lock(&self.servers).insert(channel, (epoch, servers));
    }

    /// Records that the Raft membership matches the servers of `epoch`.
    pub(crate) fn set_membership_checked(&self, channel: ChannelId, epoch: u64) {
        lock(&self.membership_epochs).insert(channel, epoch);
    }

    /// The channel's orderer if it is running.
    pub(crate) fn running(&self, channel: ChannelId) -> Option<Orderer> {
        lock(&self.orderers).get(&channel).cloned()
    }

    /// Every running orderer.
    pub(crate) fn all_running(&self) -> Vec<Orderer> {
        lock(&self.orderers).values().cloned().collect()
    }

    /// The channel's orderer, started (and its log replayed) if it was not
    /// running. `alone`: form a new group with this server as its only
    /// voter if the log is empty (the channel was just created here);
    /// otherwise a node with an empty log waits for a leader to add it.
    pub(crate) async fn orderer(&self, channel: ChannelId, alone: bool) -> Result<Orderer, String> {
        if let Some(orderer) = self.running(channel) {
            return Ok(orderer);
        }
        let start = gate(&self.starting, channel);
        let _starting = start.lock().await;
        if let Some(orderer) = self.running(channel) {
            return Ok(orderer);
        }
        let federation = self
            .federation
            .get()
            .ok_or("the federation transport is not set")?;
        let validator = Validator {
            channel,
            store: Arc::clone(&self.store),
            mls: Arc::clone(&self.mls),
            accepted: self.accepted_tx.clone(),
            applied: Arc::clone(&self.applied),
            failure: None,
        };
        let order = ChannelOrder::new(channel, 0);
        let config = &self.order_config;
        let network = FederationNetwork::new(Arc::clone(federation), channel);
        let server = self.server.clone();
        let orderer = match (&self.logs, alone) {
            (RaftLogs::Sqlite(db), alone) => {
                let log = SqliteLogStore::with_db(Arc::clone(db), channel);
                if alone {
                    ChannelOrderer::start_single_with(
                        config, server, order, validator, log, network,
                    )
                    .await
                } else {
                    ChannelOrderer::start_member(config, server, order, validator, log, network)
                        .await
                }
            }
            (RaftLogs::Memory, true) => {
                ChannelOrderer::start_single_with(
                    config,
                    server,
                    order,
                    validator,
                    MemLogStore::new(),
                    network,
                )
                .await
            }
            (RaftLogs::Memory, false) => {
                ChannelOrderer::start_member(
                    config,
                    server,
                    order,
                    validator,
                    MemLogStore::new(),
                    network,
                )
                .await
            }
        }
        .map_err(|e| e.to_string())?;
        // A restarted node replays its log; wait until it has, so the
        // store holds every commit the log accepted.
        if let Some(last) = orderer.last_log_index()
            && orderer.membership().0.len() <= 1
        {
            orderer
                .wait_applied(last, REPLAY_WAIT)
                .await
                .map_err(|e| e.to_string())?;
        }
        tracing::debug!(%channel, "orderer started");
        let orderer = Arc::new(orderer);
        lock(&self.orderers).insert(channel, Arc::clone(&orderer));
        Ok(orderer)
    }

    /// Stops the orderer of a channel whose group is this server alone,
    /// if nobody is using it, when its log is durable: it starts again
    /// from the log on next use (as after a restart; a lone node leads at
    /// once). Called when a channel is created, so that a channel nobody
    /// uses holds no Raft node (its tasks and buffers were most of an idle
    /// channel's resident memory).
    pub(crate) async fn park(&self, channel: ChannelId) {
        if matches!(self.logs, RaftLogs::Memory) {
            return;
        }
        let start = gate(&self.starting, channel);
        let _starting = start.lock().await;
        let parked = {
            let mut orderers = lock(&self.orderers);
            let idle_and_alone = orderers.get(&channel).is_some_and(|o| {
                let (voters, learners) = o.membership();
                Arc::strong_count(o) == 1 && voters.len() <= 1 && learners.is_empty()
            });
            if idle_and_alone {
                orderers.remove(&channel)
            } else {
                None
            }
        };
        if let Some(orderer) = parked
            && let Err(e) = orderer.shutdown().await
        {
            tracing::warn!(%channel, error = %e, "parking an orderer");
        }
        // The gate goes too (an entry per channel ever created otherwise
        // stayed resident), unless someone else holds it: they would start
        // the orderer through it. Removed last, while still held, so a new
        // gate can only be made once the parked node has stopped.
        let mut gates = lock(&self.starting);
        if gates
            .get(&channel)
            .is_some_and(|g| Arc::ptr_eq(g, &start) && Arc::strong_count(g) == 2)
        {
            gates.remove(&channel);
        }
    }

    /// Drops a channel's orderer whose Raft node stopped (say, its
    /// validator could not reach storage), so the next request starts it
    /// again from its log.
    pub(crate) async fn forget(&self, channel: ChannelId) {
        let orderer = lock(&self.orderers).remove(&channel);
        if let Some(orderer) = orderer {
            tracing::warn!(%channel, "restarting the channel's orderer on next use");
            let _ = orderer.shutdown().await;
        }
    }

    /// Stops every running orderer (their logs keep what was written).
    pub(crate) async fn shutdown(&self) {
        let orderers: Vec<Orderer> = lock(&self.orderers).drain().map(|(_, o)| o).collect();
        for orderer in orderers {
            if let Err(e) = orderer.shutdown().await {
                tracing::warn!(error = %e, "stopping an orderer");
            }
        }
    }
}

/// Brings the channel's `PublicChannel` up to the store's epoch: creates it
/// from the stored epoch-0 state if the MLS store lacks it, then re-applies
/// stored commits it has not merged.
///
/// An MLS state *ahead* of the store is returned as it is: in a running
/// server that is the channel's validator between its MLS write and its
/// store write (see [`Validator`]), and a caller comparing epochs sees a
/// channel that is moving on. Only the validator, the one writer of a
/// channel's MLS state, rebuilds such a state ([`catch_up_for_validation`]).
pub(crate) fn catch_up<'s>(
    mls: &'s MlsStore,
    store: &dyn Store,
    channel: ChannelId,
) -> Result<PublicChannel<'s>, String> {
    caught_up(mls, store, channel).map(|(public, _)| public)
}

/// [`catch_up`], and the store's epoch.
fn caught_up<'s>(
    mls: &'s MlsStore,
    store: &dyn Store,
    channel: ChannelId,
) -> Result<(PublicChannel<'s>, u64), String> {
    let row = store
        .channel(&channel)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("unknown channel {channel}"))?;
    let mut public = match PublicChannel::load(mls, channel).map_err(|e| e.to_string())? {
        Some(public) => public,
        None => {
            let first = store
                .epoch_state(&channel, 0)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("channel {channel} has no stored epoch 0"))?;
            PublicChannel::create(mls, &first.group_info, &first.ratchet_tree)
                .map_err(|e| format!("re-creating the channel's MLS state: {e}"))?
        }
    };
    while public.epoch() < row.epoch {
        let epoch = public.epoch();
        let commit = store
            .commit(&channel, epoch)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no stored commit for epoch {epoch}"))?;
        let validated = public
            .validate_commit(&commit.commit)
            .map_err(|e| format!("re-applying the commit of epoch {epoch}: {e}"))?;
        public
            .apply(validated)
            .map_err(|e| format!("re-applying the commit of epoch {epoch}: {e}"))?;
        tracing::info!(%channel, epoch, "MLS state caught up with the store");
    }
    Ok((public, row.epoch))
}

/// [`catch_up`] for the channel's validator, which runs alone for its
/// channel: an MLS state ahead of the store can then only be one whose
/// store write was lost (an OS crash came after the MLS write reached the
/// disk but before the store's write was synced, or that write failed),
/// and it is rebuilt
/// from the store's record of its epoch (the GroupInfo and tree the
/// server checked when it accepted the commit that led there). The Raft
/// log then replays the commits the store lacks through the validator.
fn catch_up_for_validation<'s>(
    mls: &'s MlsStore,
    store: &dyn Store,
    channel: ChannelId,
) -> Result<PublicChannel<'s>, String> {
    let (public, stored) = caught_up(mls, store, channel)?;
    if public.epoch() <= stored {
        return Ok(public);
    }
    let ahead = public.epoch();
    drop(public);
    let state = store
        .epoch_state(&channel, stored)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("channel {channel} has no stored epoch {stored}"))?;
    let public = mls
        .batch(|| {
            PublicChannel::forget(mls, channel)?;
            PublicChannel::create(mls, &state.group_info, &state.ratchet_tree)
        })
        .map_err(|e| format!("rebuilding the channel's MLS state at epoch {stored}: {e}"))?;
    tracing::warn!(%channel, ahead, stored, "MLS state was ahead of the store; rebuilt from the store");
    Ok(public)
}

/// The last epoch this server's log accepted a commit for, per channel
/// (since this process started), and a wake-up for every acceptance.
#[derive(Default)]
pub(crate) struct Applied {
    notify: tokio::sync::Notify,
    epochs: Mutex<HashMap<ChannelId, u64>>,
}

impl Applied {
    fn accepted(&self, channel: ChannelId, epoch: u64) {
        let mut epochs = lock(&self.epochs);
        let last = epochs.entry(channel).or_insert(epoch);
        *last = (*last).max(epoch);
        drop(epochs);
        self.notify.notify_waiters();
    }

    fn reached(&self, channel: ChannelId, epoch: u64) -> bool {
        lock(&self.epochs)
            .get(&channel)
            .is_some_and(|e| *e >= epoch)
    }
}

/// The commit validator of one channel's ordering state machine.
pub(crate) struct Validator {
    channel: ChannelId,
    store: Arc<dyn Store>,
    mls: SharedMls,
    accepted: mpsc::UnboundedSender<Accepted>,
    applied: Arc<Applied>,
    /// A failure of this server's machinery during the last validation.
    failure: Option<String>,
}

/// Why the validator did not accept a commit.
enum Refusal {
    /// A verdict on the commit, the same on every server.
    Reject(String),
    /// This server could not decide (storage, a state it cannot rebuild).
    Fail(String),
}

impl From<String> for Refusal {
    fn from(reason: String) -> Self {
        Refusal::Reject(reason)
    }
}

fn fail(e: impl std::fmt::Display) -> Refusal {
    Refusal::Fail(e.to_string())
}

impl CommitValidator for Validator {
    fn validate(&mut self, submission: &Submission) -> Result<(), String> {
        match self.check_and_store(submission) {
            Ok(()) => {
                // The certifier may be gone during shutdown; nothing is lost,
                // `ready` certifies on the next start.
                let _ = self.accepted.send((self.channel, submission.epoch));
                self.applied.accepted(self.channel, submission.epoch);
                Ok(())
            }
            Err(Refusal::Reject(reason)) => {
                tracing::debug!(channel = %self.channel, epoch = submission.epoch, %reason, "commit refused");
                Err(reason)
            }
            Err(Refusal::Fail(why)) => {
                tracing::error!(channel = %self.channel, epoch = submission.epoch, %why, "cannot validate a commit; stopping the channel's orderer");
                self.failure = Some(why.clone());
                Err(why)
            }
        }
    }

    fn take_failure(&mut self) -> Option<String> {
        self.failure.take()
    }
}

impl Validator {
    fn check_and_store(&self, submission: &Submission) -> Result<(), Refusal> {
        let channel = self.channel;
        let epoch = submission.epoch;
        let hash = submission.commit_hash();
        // Replaying the log after a restart: the store already decided.
        if let Some(stored) = self.store.commit(&channel, epoch).map_err(fail)? {
            return if stored.commit_hash == *hash.as_bytes() {
                Ok(())
            } else {
                Err(format!("another commit won epoch {epoch}").into())
            };
        }
        let validate = tracing::debug_span!("validator.validate").entered();
        // The MLS mutex is every channel's: it is held for the checks and
        // the merge (CPU), not for a disk sync. The merge commits without
        // one, and the store write (synced) follows without the mutex, so
        // other channels validate meanwhile. A crash can leave `mls.db`
        // ahead of the store or behind it; either is made good from the
        // store before the next validation (docs/architecture.md, "Syncs
        // of these two files").
        let next = {
            let mls = lock_mls(&self.mls);
            let mut public =
                catch_up_for_validation(&mls, self.store.as_ref(), channel).map_err(fail)?;
            if public.epoch() != epoch {
                return Err(fail(format!(
                    "the MLS state is at epoch {}, the log at {epoch}",
                    public.epoch()
                )));
            }
            let validated = public
                .validate_commit(&submission.commit)
                .map_err(|e| e.to_string())?;
            if validated.info().sender != submission.submitter.device {
                return Err(format!(
                    "the commit is by {}, not by the submitting device {}",
                    validated.info().sender,
                    submission.submitter.device
                )
                .into());
            }
            check_records(&validated.info().added, &submission.records)?;
            drop(validate);
            // Merged inside one MLS transaction: a GroupInfo that does not
            // match rolls the MLS state back untouched. (This used to
            // rebuild a scratch copy of the epoch from its stored tree and
            // validate the commit on it again, which verified every leaf:
            // 55 ms of 290 at 505 members.)
            let merged = mls.batch_unsynced(|| {
                tracing::debug_span!("validator.next_epoch")
                    .in_scope(|| next_epoch(&mut public, validated, submission))
            });
            match merged {
                Ok(next) => next,
                Err(BatchError::Operation(refusal)) => return Err(refusal),
                // Nothing was merged, or (the sync level not restored) it
                // was: this server cannot decide now; the next validation
                // starts from the store either way.
                Err(BatchError::Commit(e)) => {
                    return Err(fail(format!("storing the merged MLS state: {e}")));
                }
            }
        };
        let _store = tracing::debug_span!("validator.store").entered();
        self.store
            .store_commit(&NewCommit {
                channel,
                commit: CommitRow {
                    epoch,
                    commit: submission.commit.clone(),
                    commit_hash: *hash.as_bytes(),
                    welcome: submission.welcome.clone(),
                    certificate: None,
                },
                next: next.state,
                name: next.name,
                content_type: next.content_type,
            })
            .map_err(fail)?;
        cache_records(self.store.as_ref(), &submission.records);
        Ok(())
    }
}

/// The state a commit leads to.
struct NextEpoch {
    state: EpochState,
    name: String,
    content_type: String,
}

fn next_epoch(
    public: &mut PublicChannel<'_>,
    validated: ValidatedCommit,
    submission: &Submission,
) -> Result<NextEpoch, Refusal> {
    public.apply(validated).map_err(|e| match e {
        // OpenMLS's storage failed: not a verdict on the commit.
        ServerError::Mls { .. } => fail(e),
        verdict => Refusal::Reject(verdict.to_string()),
    })?;
    public
        .check_group_info(&submission.group_info)
        .map_err(|e| e.to_string())?;
    let extension = public.extension();
    Ok(NextEpoch {
        state: EpochState {
            epoch: public.epoch(),
            ratchet_tree: public.ratchet_tree().map_err(fail)?,
            group_info: submission.group_info.clone(),
            members: public.members(),
        },
        name: extension.name.as_str().to_owned(),
        content_type: extension.content_type.as_str().to_owned(),
    })
}

/// The deterministic check of a submission's `records`: exactly one record
/// for each added device, each verifying as of its own `updated_at`, and
/// nothing else.
fn check_records(added: &[DeviceId], records: &[Vec<u8>]) -> Result<(), String> {
    if records.len() != added.len() {
        return Err(format!(
            "the commit adds {} devices and carries {} records",
            added.len(),
            records.len()
        ));
    }
    for device in added {
        let found = records.iter().any(|bytes| {
            DeviceRecordIn::decode(bytes)
                .ok()
                .and_then(|r| r.verify_as_of_update().ok())
                .is_some_and(|r| r.device_id() == *device && !r.sponsorships().is_empty())
        });
        if !found {
            return Err(format!(
                "the submission lacks a valid, sponsored record of the added device {device}"
            ));
        }
    }
    Ok(())
}

/// Remembers the records of a channel's new members that are not
/// registered here, so that this server's clients can fetch them (to
/// compute voters and show names) and this server can find the servers
/// that sponsor the channel's members. A cache: failures are logged only.
pub(crate) fn cache_records(store: &dyn Store, records: &[Vec<u8>]) {
    for bytes in records {
        let Some(record) = DeviceRecordIn::decode(bytes)
            .ok()
            .and_then(|r| r.verify_as_of_update().ok())
        else {
            continue;
        };
        let device = record.device_id();
        if matches!(store.device(&device), Ok(Some(_))) {
            continue;
        }
        let newer = match store.remote_record(&device) {
            Ok(Some(cached)) => DeviceRecordIn::decode(&cached.record)
                .ok()
                .and_then(|c| c.verify_as_of_update().ok())
                .is_none_or(|c| record.sequence() > c.sequence()),
            Ok(None) => true,
            Err(_) => false,
        };
        let Some(server) = record.sponsorships().first().map(|s| s.server().clone()) else {
            continue;
        };
        if newer
            && let Err(e) = store.put_remote_record(&RemoteRecord {
                device,
                server,
                record: bytes.clone(),
                fetched_at: record.updated_at(),
            })
        {
            tracing::warn!(%device, error = %e, "caching a member's record");
        }
    }
}
