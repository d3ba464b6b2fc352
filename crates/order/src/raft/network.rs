//! Carrying Raft RPCs between the nodes of a channel's group.
//!
//! [`Router`] delivers them in-process, so tests (and a single homeserver)
//! can run whole groups in one process. Federation will provide another
//! [`RaftNetworkFactory`] that sends the same messages over signed HTTP;
//! nothing else changes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kith_proto::ChannelId;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};

use super::{NodeId, TypeConfig};

type Table = BTreeMap<(ChannelId, NodeId), Raft<TypeConfig>>;

/// The Raft nodes running in this process, by channel and node id. Clones
/// share the same table.
#[derive(Clone, Default)]
pub struct Router {
    nodes: Arc<Mutex<Table>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("nodes", &self.table().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `raft`, node `node` of `channel`'s group, reachable.
    pub fn register(&self, channel: ChannelId, node: NodeId, raft: Raft<TypeConfig>) {
        self.table().insert((channel, node), raft);
    }

    /// Makes node `node` of `channel`'s group unreachable, as if its server
    /// went down or the link was cut.
    pub fn unregister(&self, channel: ChannelId, node: NodeId) {
        self.table().remove(&(channel, node));
    }

    /// The network factory for node `from` of `channel`'s group.
    pub fn network(&self, channel: ChannelId) -> InProcessNetwork {
        InProcessNetwork {
            router: self.clone(),
            channel,
        }
    }

    fn get(&self, channel: ChannelId, node: NodeId) -> Option<Raft<TypeConfig>> {
        self.table().get(&(channel, node)).cloned()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panicking holder could break.
        self.nodes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The [`RaftNetworkFactory`] of one node, over a [`Router`].
#[derive(Debug, Clone)]
pub struct InProcessNetwork {
    router: Router,
    channel: ChannelId,
}

impl RaftNetworkFactory<TypeConfig> for InProcessNetwork {
    type Network = InProcessConnection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Self::Network {
        InProcessConnection {
            router: self.router.clone(),
            channel: self.channel,
            target,
        }
    }
}

/// A connection to one peer, over a [`Router`].
#[derive(Debug, Clone)]
pub struct InProcessConnection {
    router: Router,
    channel: ChannelId,
    target: NodeId,
}

#[derive(Debug, thiserror::Error)]
#[error("node {node} of channel {channel} is not reachable")]
struct NotReachable {
    channel: ChannelId,
    node: NodeId,
}

impl InProcessConnection {
    fn peer(&self) -> Result<Raft<TypeConfig>, Unreachable> {
        self.router.get(self.channel, self.target).ok_or_else(|| {
            Unreachable::new(&NotReachable {
                channel: self.channel,
                node: self.target,
            })
        })
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl RaftNetwork<TypeConfig> for InProcessConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let peer = self.peer()?;
        peer.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let peer = self.peer()?;
        peer.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let peer = self.peer()?;
        peer.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}
