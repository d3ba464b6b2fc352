//! The Raft state machine: applies ordered submissions through
//! [`ChannelOrder`](crate::ChannelOrder).

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{NodeId, TypeConfig};
use crate::machine::{ChannelOrder, CommitValidator, Outcome};

/// A channel's ordering state under Raft: the [`ChannelOrder`], the
/// validator, and what Raft needs to know (last applied entry, membership).
/// Clones share the same state.
pub struct OrderStateMachine<V> {
    inner: Arc<Mutex<Applied<V>>>,
}

impl<V> Clone for OrderStateMachine<V> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

struct Applied<V> {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    order: ChannelOrder,
    validator: V,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    snapshots_built: u64,
}

/// What a snapshot holds besides Raft's own metadata.
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    order: ChannelOrder,
}

impl<V: CommitValidator + Send + 'static> OrderStateMachine<V> {
    /// A state machine that starts from `order` and checks commits with
    /// `validator`.
    pub fn new(order: ChannelOrder, validator: V) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Applied {
                last_applied: None,
                membership: StoredMembership::default(),
                order,
                validator,
                snapshot: None,
                snapshots_built: 0,
            })),
        }
    }

    /// A copy of the ordering state as applied so far.
    pub async fn order(&self) -> ChannelOrder {
        self.inner.lock().await.order.clone()
    }

    /// The last applied Raft log id.
    pub async fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.inner.lock().await.last_applied
    }
}

impl<V: CommitValidator + Send + 'static> RaftSnapshotBuilder<TypeConfig> for OrderStateMachine<V> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut state = self.inner.lock().await;
        let body = SnapshotBody {
            order: state.order.clone(),
        };
        let data = serde_json::to_vec(&body).map_err(|e| StorageIOError::read_state_machine(&e))?;
        state.snapshots_built += 1;
        let snapshot_id = match state.last_applied {
            Some(last) => format!(
                "{}-{}-{}",
                last.leader_id, last.index, state.snapshots_built
            ),
            None => format!("--{}", state.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        state.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Applies `entries` in order (see [`RaftStateMachine::apply`]); fails
/// when the validator could not decide.
fn apply_entries<V: CommitValidator>(
    mut guard: tokio::sync::OwnedMutexGuard<Applied<V>>,
    entries: Vec<Entry<TypeConfig>>,
) -> Result<Vec<Option<Outcome>>, std::io::Error> {
    let state = &mut *guard;
    let mut outcomes = Vec::new();
    for entry in entries {
        let log_id = entry.log_id;
        match entry.payload {
            EntryPayload::Blank => outcomes.push(None),
            EntryPayload::Normal(submission) => {
                let outcome = state.order.apply(submission, &mut state.validator);
                if let Some(failure) = state.validator.take_failure() {
                    // Not a verdict: stop rather than record a rejection
                    // other servers would not make (see `take_failure`).
                    return Err(std::io::Error::other(failure));
                }
                outcomes.push(Some(outcome));
            }
            EntryPayload::Membership(membership) => {
                state.membership = StoredMembership::new(Some(log_id), membership);
                outcomes.push(None);
            }
        }
        state.last_applied = Some(log_id);
    }
    Ok(outcomes)
}

impl<V: CommitValidator + Send + 'static> RaftStateMachine<TypeConfig> for OrderStateMachine<V> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let state = self.inner.lock().await;
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Option<Outcome>>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        // The validator is synchronous and may wait for disk syncs (a
        // server's validator writes and syncs its store): run it on the
        // blocking pool, not on the runtime's worker threads, which the
        // other channels' Raft tasks and the servers' requests share.
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let guard = Arc::clone(&self.inner).lock_owned().await;
        tokio::task::spawn_blocking(move || apply_entries(guard, entries))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("applying entries: {e}"))))
            .map_err(|e| StorageIOError::write_state_machine(&e).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let mut state = self.inner.lock().await;
        if body.order.channel() != state.order.channel() {
            let e = std::io::Error::other(format!(
                "snapshot is for channel {}, this machine orders {}",
                body.order.channel(),
                state.order.channel()
            ));
            return Err(StorageIOError::read_snapshot(Some(meta.signature()), &e).into());
        }
        state.validator.restore(&body.order).map_err(|reason| {
            let e = std::io::Error::other(reason);
            StorageIOError::write_state_machine(&e)
        })?;
        state.order = body.order;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        state.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let state = self.inner.lock().await;
        Ok(state.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}
