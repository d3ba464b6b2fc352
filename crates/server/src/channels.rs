//! Channels on this homeserver: the server's MLS view of each channel
//! (`PublicChannel` in one `MlsStore`), the commit validator the ordering
//! state machine calls, and each channel's orderer (a single-node openraft
//! group from `kith-order`), started lazily and stopped on shutdown.
//!
//! The server [`Store`] is the truth about accepted commits. The validator
//! writes each accepted commit with the state of the epoch it starts in one
//! store transaction *before* it advances the MLS state, so:
//!
//! - on restart the Raft log replays through the validator, which answers
//!   from the store for every epoch it already holds (without touching MLS);
//! - a crash between the store write and the MLS write leaves the MLS state
//!   behind the store, and [`catch_up`] re-applies the stored commits before
//!   the next validation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kith_mls::{MlsStore, PublicChannel};
use kith_order::raft::{MemLogStore, Router, SqliteLogStore};
use kith_order::{ChannelOrder, ChannelOrderer, CommitValidator, OrderConfig, Submission};
use kith_proto::{ChannelId, ServerName};

use crate::store::{CommitRow, EpochState, NewCommit, Store};

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

/// Where channels' Raft logs live.
enum RaftLogs {
    /// One SQLite database (`raft.db`) shared by every channel's log.
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    /// In memory, for the memory backend.
    Memory,
}

/// One channel's slot: its lock (held across ordering a commit and
/// appending its events, and across storing a message and its events) and
/// its orderer once started.
#[derive(Default)]
pub(crate) struct Slot {
    orderer: Option<ChannelOrderer<Validator>>,
}

/// Every channel's slot, the MLS store and the Raft logs.
pub(crate) struct Channels {
    server: ServerName,
    store: Arc<dyn Store>,
    pub(crate) mls: SharedMls,
    logs: RaftLogs,
    router: Router,
    slots: Mutex<HashMap<ChannelId, Arc<tokio::sync::Mutex<Slot>>>>,
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
}

impl Channels {
    /// Channels kept in `mls.db` and `raft.db` under `data_dir` (`None`:
    /// in memory).
    pub(crate) fn open(
        server: ServerName,
        store: Arc<dyn Store>,
        data_dir: Option<&std::path::Path>,
    ) -> Result<Self, ChannelsError> {
        let (mls, logs) = match data_dir {
            Some(dir) => {
                let mls = MlsStore::open(dir.join(crate::MLS_DB_FILE))?;
                let conn = rusqlite::Connection::open(dir.join(crate::RAFT_DB_FILE))?;
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "FULL")?;
                (mls, RaftLogs::Sqlite(Arc::new(Mutex::new(conn))))
            }
            None => (MlsStore::in_memory()?, RaftLogs::Memory),
        };
        Ok(Self {
            server,
            store,
            mls: Arc::new(Mutex::new(mls)),
            logs,
            router: Router::new(),
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The channel's slot, locked. Callers hold it while they order a
    /// commit or store a message, and while they append the events.
    pub(crate) async fn lock(&self, channel: ChannelId) -> tokio::sync::OwnedMutexGuard<Slot> {
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(slots.entry(channel).or_default())
        };
        slot.lock_owned().await
    }

    /// The channel's orderer, started (and its log replayed) if it was not
    /// running. Returns whether it was started now.
    pub(crate) async fn orderer<'a>(
        &self,
        slot: &'a mut Slot,
        channel: ChannelId,
    ) -> Result<(&'a ChannelOrderer<Validator>, bool), String> {
        let started = slot.orderer.is_none();
        if started {
            let validator = Validator {
                channel,
                store: Arc::clone(&self.store),
                mls: Arc::clone(&self.mls),
            };
            let order = ChannelOrder::new(channel, 0);
            let config = OrderConfig::default();
            let network = self.router.network(channel);
            let orderer = match &self.logs {
                RaftLogs::Sqlite(db) => {
                    let log = SqliteLogStore::with_connection(Arc::clone(db), channel)
                        .map_err(|e| e.to_string())?;
                    ChannelOrderer::start_single_with(
                        &config,
                        self.server.clone(),
                        order,
                        validator,
                        log,
                        network,
                    )
                    .await
                }
                RaftLogs::Memory => {
                    ChannelOrderer::start_single_with(
                        &config,
                        self.server.clone(),
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
            if let Some(last) = orderer.last_log_index() {
                orderer
                    .wait_applied(last, REPLAY_WAIT)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tracing::debug!(%channel, "orderer started");
            slot.orderer = Some(orderer);
        }
        match slot.orderer.as_ref() {
            Some(orderer) => Ok((orderer, started)),
            None => Err("the orderer did not start".into()),
        }
    }

    /// Stops every running orderer (their logs keep what was written).
    pub(crate) async fn shutdown(&self) {
        let slots: Vec<_> = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        for slot in slots {
            let mut slot = slot.lock().await;
            if let Some(orderer) = slot.orderer.take()
                && let Err(e) = orderer.shutdown().await
            {
                tracing::warn!(error = %e, "stopping an orderer");
            }
        }
    }
}

/// Brings the channel's `PublicChannel` up to the store's epoch: creates it
/// from the stored epoch-0 state if the MLS store lacks it, then re-applies
/// stored commits it has not merged.
pub(crate) fn catch_up<'s>(
    mls: &'s MlsStore,
    store: &dyn Store,
    channel: ChannelId,
) -> Result<PublicChannel<'s>, String> {
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
    if public.epoch() > row.epoch {
        return Err(format!(
            "the MLS state (epoch {}) is ahead of the store (epoch {})",
            public.epoch(),
            row.epoch
        ));
    }
    Ok(public)
}

/// The commit validator of one channel's ordering state machine.
pub(crate) struct Validator {
    channel: ChannelId,
    store: Arc<dyn Store>,
    mls: SharedMls,
}

impl CommitValidator for Validator {
    fn validate(&mut self, submission: &Submission) -> Result<(), String> {
        let result = self.check_and_store(submission);
        if let Err(reason) = &result {
            tracing::debug!(channel = %self.channel, epoch = submission.epoch, %reason, "commit refused");
        }
        result
    }
}

impl Validator {
    fn check_and_store(&self, submission: &Submission) -> Result<(), String> {
        let channel = self.channel;
        let epoch = submission.epoch;
        let hash = submission.commit_hash();
        // Replaying the log after a restart: the store already decided.
        if let Some(stored) = self
            .store
            .commit(&channel, epoch)
            .map_err(|e| e.to_string())?
        {
            return if stored.commit_hash == *hash.as_bytes() {
                Ok(())
            } else {
                Err(format!("another commit won epoch {epoch}"))
            };
        }
        let current = self
            .store
            .epoch_state(&channel, epoch)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("wrong epoch: the channel has no state for epoch {epoch}"))?;
        let mls = lock_mls(&self.mls);
        let mut public = catch_up(&mls, self.store.as_ref(), channel)?;
        if public.epoch() != epoch {
            return Err(format!("wrong epoch: current = {}", public.epoch()));
        }
        let validated = public
            .validate_commit(&submission.commit)
            .map_err(|e| e.to_string())?;
        if validated.info().sender != submission.submitter.device {
            return Err(format!(
                "the commit is by {}, not by the submitting device {}",
                validated.info().sender,
                submission.submitter.device
            ));
        }
        // The new epoch's state, computed on a scratch copy built from the
        // stored state of this epoch, so that a GroupInfo that does not
        // match leaves the real state untouched.
        let next = next_epoch(&current, submission)?;
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
            .map_err(|e| e.to_string())?;
        // The store now holds the commit; if merging fails here, the next
        // catch-up re-applies it.
        if let Err(e) = public.apply(validated) {
            tracing::error!(%channel, epoch, error = %e, "merging an accepted commit failed");
        }
        Ok(())
    }
}

/// The state a commit leads to.
struct NextEpoch {
    state: EpochState,
    name: String,
    content_type: String,
}

fn next_epoch(current: &EpochState, submission: &Submission) -> Result<NextEpoch, String> {
    let scratch = MlsStore::in_memory().map_err(|e| e.to_string())?;
    let mut public = PublicChannel::create(&scratch, &current.group_info, &current.ratchet_tree)
        .map_err(|e| format!("rebuilding epoch {}: {e}", current.epoch))?;
    let validated = public
        .validate_commit(&submission.commit)
        .map_err(|e| e.to_string())?;
    public.apply(validated).map_err(|e| e.to_string())?;
    public
        .check_group_info(&submission.group_info)
        .map_err(|e| e.to_string())?;
    let extension = public.extension();
    Ok(NextEpoch {
        state: EpochState {
            epoch: public.epoch(),
            ratchet_tree: public.ratchet_tree().map_err(|e| e.to_string())?,
            group_info: submission.group_info.clone(),
            members: public.members(),
        },
        name: extension.name.as_str().to_owned(),
        content_type: extension.content_type.as_str().to_owned(),
    })
}
