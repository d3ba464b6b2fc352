//! The ordering state machine under Raft: one openraft group per channel.
//!
//! - [`MemLogStore`] and [`SqliteLogStore`] (durable) implement
//!   [`RaftLogStorage`].
//! - [`OrderStateMachine`] implements openraft's `RaftStateMachine` by
//!   applying each [`Submission`] through [`ChannelOrder::apply`]; the
//!   response to each entry is its [`Outcome`].
//! - [`Router`] carries RPCs between nodes in one process.
//! - [`ChannelOrderer`] is the handle a server holds per channel:
//!   [`submit`](ChannelOrderer::submit) goes through `Raft::client_write`.
//!
//! # Timers
//!
//! [`OrderConfig::default`] follows the spec's v0 timers: heartbeats every
//! 1 s, election timeouts drawn from 3–6 s. A group with one member (all
//! members on one homeserver) runs with openraft's tick disabled: it is
//! leader from initialization on, sends no heartbeats and never holds an
//! election, so an idle single-server channel costs one sleeping timer and
//! no work. A multi-server group costs a heartbeat per follower per second
//! while its timers run; a server quiesces an idle one with
//! [`quiesce`](ChannelOrderer::quiesce) on every node (the leader first, see
//! [`settled`](ChannelOrderer::settled)) and wakes it with
//! [`wake`](ChannelOrderer::wake). Quiescing only stops timers: Raft's
//! safety never depends on them, and any RPC from a peer turns them on
//! again. Snapshots are never built automatically
//! ([`SnapshotPolicy::Never`]), so the log is never purged and a node that
//! joins replays the whole log.
//!
//! ```
//! use kith_order::{AcceptAll, ChannelOrderer, OrderConfig, Outcome, Submission, Submitter};
//! use kith_proto::{ChannelId, DeviceId, ServerName};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! let server: ServerName = "solo.example".parse()?;
//! let channel = ChannelId::from_bytes([1; 16]);
//! let orderer =
//!     ChannelOrderer::start_single(&OrderConfig::default(), server.clone(), channel, 0, AcceptAll)
//!         .await?;
//! let outcome = orderer
//!     .submit(Submission {
//!         channel,
//!         epoch: 0,
//!         commit: b"commit".to_vec(),
//!         welcome: None,
//!         group_info: vec![],
//!         ratchet_tree: None,
//!         submitter: Submitter { server, device: DeviceId::from_bytes([2; 32]) },
//!         records: vec![],
//!     })
//!     .await?;
//! assert!(matches!(outcome, Outcome::Accepted { epoch: 0, .. }));
//! orderer.shutdown().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```

mod log_store;
mod network;
mod sqlite_store;
mod state_machine;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kith_proto::{ChannelId, ServerName};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, ChangeMembers, Config, Raft, RaftNetworkFactory, SnapshotPolicy};
use sha2::{Digest, Sha256};

pub use log_store::MemLogStore;
pub use network::{InProcessConnection, InProcessNetwork, Router};
pub use sqlite_store::{LogDb, OpenError, SqliteLogStore};
pub use state_machine::OrderStateMachine;

use crate::machine::{ChannelOrder, CommitValidator, Outcome, Submission};

/// How long a sole voter waits to see itself lead before calling an
/// election, and how many times. Only bounds a wait: there is no network.
const SOLE_LEADER_WAIT: Duration = Duration::from_secs(2);
const SOLE_LEADER_ATTEMPTS: usize = 5;

/// A node's id inside a channel's Raft group; see [`node_id`].
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft's types for a channel's ordering group. Log entries are
    /// [`Submission`]s, responses are their [`Outcome`]s (`None` for
    /// Raft's own blank and membership entries), and a node's
    /// [`BasicNode::addr`] is its server name.
    pub TypeConfig:
        D = Submission,
        R = Option<Outcome>,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft node id of `server`: the first 8 bytes (big-endian) of
/// SHA-256(`"kith-v0 RaftNodeId" || 0x00 || canonical name`). openraft
/// needs a small copyable id; every server derives the same one from the
/// name.
pub fn node_id(server: &ServerName) -> NodeId {
    let mut hasher = Sha256::new();
    hasher.update(b"kith-v0 RaftNodeId\0");
    hasher.update(server.as_str().as_bytes());
    let digest: [u8; 32] = hasher.finalize().into();
    let [a, b, c, d, e, f, g, h, ..] = digest;
    u64::from_be_bytes([a, b, c, d, e, f, g, h])
}

/// Raft timers of a channel's ordering group, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderConfig {
    /// How often a leader sends heartbeats.
    pub heartbeat_ms: u64,
    /// Shortest election timeout.
    pub election_timeout_min_ms: u64,
    /// Longest election timeout.
    pub election_timeout_max_ms: u64,
}

impl Default for OrderConfig {
    /// The spec's v0 timers: 1 s heartbeats, 3–6 s election timeouts.
    fn default() -> Self {
        Self {
            heartbeat_ms: 1000,
            election_timeout_min_ms: 3000,
            election_timeout_max_ms: 6000,
        }
    }
}

impl OrderConfig {
    fn raft_config(&self, channel: ChannelId, ticking: bool) -> Result<Arc<Config>, OrderError> {
        let config = Config {
            cluster_name: channel.to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::Never,
            enable_tick: ticking,
            ..Default::default()
        };
        let config = config
            .validate()
            .map_err(|e| OrderError::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }
}

/// Why a submission (or starting a group) failed. None of these mean the
/// submission was rejected: a rejection is an [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// This node is not the group's leader; send the submission to the
    /// leader (federation forwards it).
    #[error("not the Raft leader of this channel (leader: {})", leader_server.as_ref().map_or("unknown", ServerName::as_str))]
    NotLeader {
        /// The leader's node id, if known.
        leader: Option<NodeId>,
        /// The leader's server name, if known.
        leader_server: Option<ServerName>,
    },
    /// The Raft node has stopped (shut down, or a storage failure).
    #[error("the channel's Raft node has stopped: {0}")]
    Stopped(String),
    /// Raft refused the request for another reason.
    #[error("Raft refused the request: {0}")]
    Raft(String),
    /// The timers are inconsistent.
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    /// The group could not be initialized with these members.
    #[error("cannot initialize the channel's Raft group: {0}")]
    Initialize(String),
    /// The membership change was refused (e.g. no voters, or another
    /// change is in progress).
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Raft answered without an outcome (a bug: submissions always have
    /// one).
    #[error("Raft answered a submission without an outcome")]
    NoOutcome,
}

fn basic_node(server: &ServerName) -> BasicNode {
    BasicNode {
        addr: server.as_str().to_owned(),
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> OrderError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => OrderError::NotLeader {
            leader: f.leader_id,
            leader_server: f
                .leader_node
                .and_then(|n| ServerName::parse_canonical(&n.addr).ok()),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            OrderError::Membership(e.to_string())
        }
        RaftError::Fatal(e) => OrderError::Stopped(e.to_string()),
    }
}

/// A server's handle on one channel's ordering group.
pub struct ChannelOrderer<V> {
    server: ServerName,
    channel: ChannelId,
    node: NodeId,
    raft: Raft<TypeConfig>,
    state: OrderStateMachine<V>,
    /// Whether this node's timers run. Held while they are switched, so
    /// this and openraft's switch agree.
    timers: Mutex<Timers>,
}

/// The state of a node's timers.
enum Timers {
    Running,
    /// Stopped by [`ChannelOrderer::quiesce`].
    Quiet,
    /// Turned on again, and openraft has not published its metrics since:
    /// it publishes them when its core handles an event, and a quiet node
    /// handles none, so until then they are as old as the quiet spell
    /// (`millis_since_quorum_ack` above all). Running once the receiver,
    /// marked seen when the timers went on, sees a change.
    Waking(tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, BasicNode>>),
}

/// The state of a group whose leader may quiesce it: every member holds
/// and the leader applied the whole log ([`ChannelOrderer::settled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// The leader's term.
    pub term: u64,
    /// The index of the last log entry, held by every member.
    pub index: Option<u64>,
}

impl<V> std::fmt::Debug for ChannelOrderer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelOrderer")
            .field("server", &self.server)
            .field("channel", &self.channel)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl<V: CommitValidator + Send + 'static> ChannelOrderer<V> {
    /// Starts this server's Raft node for `order`'s channel, over the given
    /// log store and network. The node does nothing until the group is
    /// initialized (on one member, see [`initialize`](Self::initialize)) or
    /// a leader contacts it. `order` must be the state every member starts
    /// from.
    pub async fn start<LS, N>(
        config: &OrderConfig,
        server: ServerName,
        order: ChannelOrder,
        validator: V,
        log_store: LS,
        network: N,
    ) -> Result<Self, OrderError>
    where
        LS: RaftLogStorage<TypeConfig>,
        N: RaftNetworkFactory<TypeConfig>,
    {
        Self::start_with(config, true, server, order, validator, log_store, network).await
    }

    async fn start_with<LS, N>(
        config: &OrderConfig,
        ticking: bool,
        server: ServerName,
        order: ChannelOrder,
        validator: V,
        log_store: LS,
        network: N,
    ) -> Result<Self, OrderError>
    where
        LS: RaftLogStorage<TypeConfig>,
        N: RaftNetworkFactory<TypeConfig>,
    {
        let channel = order.channel();
        let node = node_id(&server);
        let state = OrderStateMachine::new(order, validator);
        let raft = Raft::new(
            node,
            config.raft_config(channel, ticking)?,
            network,
            log_store,
            state.clone(),
        )
        .await
        .map_err(|e| OrderError::Stopped(e.to_string()))?;
        Ok(Self {
            server,
            channel,
            node,
            raft,
            state,
            timers: Mutex::new(Timers::Running),
        })
    }

    /// Starts and initializes a group whose only member is `server`, with
    /// an in-memory log and no network: the one-homeserver channel. The
    /// node is leader at once and runs no timers.
    pub async fn start_single(
        config: &OrderConfig,
        server: ServerName,
        channel: ChannelId,
        first_epoch: u64,
        validator: V,
    ) -> Result<Self, OrderError> {
        Self::start_single_with(
            config,
            server,
            ChannelOrder::new(channel, first_epoch),
            validator,
            MemLogStore::new(),
            Router::new().network(channel),
        )
        .await
    }

    /// Like [`start_single`](Self::start_single) over a given log store
    /// and network (the network matters once the group grows, see
    /// [`set_members`](Self::set_members)). Restarting on a store that
    /// already holds the group's log resumes it: the log is replayed into
    /// the state machine and the node is leader again. Returns once the
    /// node leads.
    pub async fn start_single_with<LS, N>(
        config: &OrderConfig,
        server: ServerName,
        order: ChannelOrder,
        validator: V,
        log_store: LS,
        network: N,
    ) -> Result<Self, OrderError>
    where
        LS: RaftLogStorage<TypeConfig>,
        N: RaftNetworkFactory<TypeConfig>,
    {
        let orderer = Self::start_with(
            config,
            false,
            server.clone(),
            order,
            validator,
            log_store,
            network,
        )
        .await?;
        orderer.initialize([server]).await?;
        orderer.lead_alone().await?;
        Ok(orderer)
    }

    /// Starts this server's node of a group that may already have peers:
    /// after a restart, or on a server that joins as a learner. A node
    /// whose log says it is the only voter leads at once, without ticks,
    /// like [`start_single_with`](Self::start_single_with); a node of a
    /// group with peers runs its timers; a node with an empty log waits for
    /// a leader to add it.
    pub async fn start_member<LS, N>(
        config: &OrderConfig,
        server: ServerName,
        order: ChannelOrder,
        validator: V,
        log_store: LS,
        network: N,
    ) -> Result<Self, OrderError>
    where
        LS: RaftLogStorage<TypeConfig>,
        N: RaftNetworkFactory<TypeConfig>,
    {
        let orderer = Self::start_with(
            config,
            false,
            server.clone(),
            order,
            validator,
            log_store,
            network,
        )
        .await?;
        let nodes = orderer.membership_nodes();
        if nodes.len() == 1 && nodes.contains(&orderer.node) {
            orderer.lead_alone().await?;
        } else {
            orderer.tick_if_shared();
        }
        Ok(orderer)
    }

    /// Turns the Raft timers on once the group has a member besides this
    /// node (a group started alone runs without them). Cheap; call it
    /// whenever the membership may have changed.
    pub fn tick_if_shared(&self) {
        let shared = self.membership_nodes().iter().any(|n| *n != self.node);
        if shared {
            self.ticks_on();
        }
    }

    fn ticks_on(&self) {
        let mut timers = self.lock_timers();
        if matches!(*timers, Timers::Quiet) {
            let mut metrics = self.raft.metrics();
            metrics.borrow_and_update();
            *timers = Timers::Waking(metrics);
        }
        self.raft.runtime_config().tick(true);
    }

    fn lock_timers(&self) -> std::sync::MutexGuard<'_, Timers> {
        self.timers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops this node's Raft timers: as leader it sends no heartbeats, as
    /// follower it never calls an election, until [`wake`](Self::wake) or
    /// [`tick_if_shared`](Self::tick_if_shared) (which every RPC from a
    /// peer calls) turns them on again. Liveness only: a quiet node still
    /// answers RPCs and takes writes, and Raft's safety does not depend on
    /// timers. A group must be quiesced on every node, leader first, or a
    /// follower that still runs its timers calls an election.
    pub fn quiesce(&self) {
        let mut timers = self.lock_timers();
        self.raft.runtime_config().tick(false);
        *timers = Timers::Quiet;
    }

    /// Whether this node is quiet: its timers are stopped by
    /// [`quiesce`](Self::quiesce), or were turned on again so recently that
    /// openraft has not published metrics since (until then
    /// [`raft`](Self::raft)`().metrics()` describe the node as it was when
    /// it went quiet, and a leader's `millis_since_quorum_ack` must not be
    /// trusted).
    pub fn is_quiet(&self) -> bool {
        let mut timers = self.lock_timers();
        match &*timers {
            Timers::Running => false,
            Timers::Quiet => true,
            Timers::Waking(metrics) => {
                if metrics.has_changed().unwrap_or(true) {
                    *timers = Timers::Running;
                    false
                } else {
                    true
                }
            }
        }
    }

    /// Turns this node's timers on again (if the group has peers) and, on
    /// the leader, sends a heartbeat at once, so followers hear from it
    /// within a round trip rather than a heartbeat interval.
    pub async fn wake(&self) -> Result<(), OrderError> {
        self.tick_if_shared();
        if self.is_leader() {
            self.raft
                .trigger()
                .heartbeat()
                .await
                .map_err(|e| OrderError::Stopped(e.to_string()))?;
        }
        Ok(())
    }

    /// On the leader of a group with peers: its term and last log index if
    /// every member matched the whole log and the leader applied it, so
    /// that the group may be quiesced. `None` otherwise (a follower, a
    /// group alone, or replication under way).
    pub fn settled(&self) -> Option<Settled> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.node) {
            return None;
        }
        let last = metrics.last_log_index;
        let replication = metrics.replication.as_ref()?;
        let peers: Vec<NodeId> = metrics
            .membership_config
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.node)
            .collect();
        let everyone_holds_it = !peers.is_empty()
            && peers.iter().all(|peer| {
                replication
                    .get(peer)
                    .is_some_and(|matched| matched.map(|l| l.index) == last)
            });
        let applied = metrics.last_applied.map(|l| l.index) == last;
        (everyone_holds_it && applied).then_some(Settled {
            term: metrics.current_term,
            index: last,
        })
    }

    /// The term this node is in and the last index of its log.
    pub fn term_and_index(&self) -> (u64, Option<u64>) {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        (metrics.current_term, metrics.last_log_index)
    }

    /// The group's voters and learners as this node's log has them, by
    /// server name.
    pub fn membership(&self) -> (BTreeSet<ServerName>, BTreeSet<ServerName>) {
        let metrics = self.raft.metrics().borrow().clone();
        let config = &metrics.membership_config;
        let voters: BTreeSet<NodeId> = config.voter_ids().collect();
        let mut voter_names = BTreeSet::new();
        let mut learner_names = BTreeSet::new();
        for (id, node) in config.nodes() {
            let Ok(name) = ServerName::parse_canonical(&node.addr) else {
                continue;
            };
            if voters.contains(id) {
                voter_names.insert(name);
            } else {
                learner_names.insert(name);
            }
        }
        (voter_names, learner_names)
    }

    /// The current leader's server name, as this node knows it.
    pub fn leader_server(&self) -> Option<ServerName> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .and_then(|(_, node)| ServerName::parse_canonical(&node.addr).ok())
    }

    /// Waits until this sole voter leads. Without ticks nothing would
    /// retry a missed election (say, a crash between saving a vote and
    /// winning), so after each bounded wait it calls one itself.
    async fn lead_alone(&self) -> Result<(), OrderError> {
        for _ in 0..SOLE_LEADER_ATTEMPTS {
            let waited = self
                .raft
                .wait(Some(SOLE_LEADER_WAIT))
                .current_leader(self.node, "sole voter leads")
                .await;
            if waited.is_ok() {
                return Ok(());
            }
            self.raft
                .trigger()
                .elect()
                .await
                .map_err(|e| OrderError::Stopped(e.to_string()))?;
        }
        Err(OrderError::Raft(format!(
            "{} did not become leader of its own group",
            self.server
        )))
    }

    /// Forms the group with `members` as its voters. Call it on one member
    /// only, once; calling it on a group that already formed is not an
    /// error.
    pub async fn initialize(
        &self,
        members: impl IntoIterator<Item = ServerName>,
    ) -> Result<(), OrderError> {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|s| (node_id(&s), basic_node(&s)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(e)) => Err(OrderError::Initialize(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(OrderError::Stopped(e.to_string())),
        }
    }

    /// Orders `submission`: appends it to the channel's Raft log and waits
    /// until it is committed and applied here, then returns what applying it
    /// did. Only the leader accepts submissions ([`OrderError::NotLeader`]
    /// names it).
    #[tracing::instrument(skip_all, fields(channel = %self.channel, node = self.node, epoch = submission.epoch))]
    pub async fn submit(&self, submission: Submission) -> Result<Outcome, OrderError> {
        let response = self
            .raft
            .client_write(submission)
            .await
            .map_err(write_error)?;
        let outcome = response.data.ok_or(OrderError::NoOutcome)?;
        tracing::debug!(?outcome, log_index = response.log_id.index, "ordered");
        Ok(outcome)
    }

    /// Makes the group's members exactly `voters` (who vote, at most
    /// [`MAX_VOTERS`](crate::MAX_VOTERS), see [`select_voters`](crate::select_voters))
    /// and `learners` (the other servers of the ordering group, which follow
    /// the log). Call it on the leader after a commit changed the ordering
    /// group. New servers first join as learners and catch up, then the
    /// voter set changes by joint consensus, then servers in neither set are
    /// removed. A server in both sets is a voter.
    #[tracing::instrument(skip_all, fields(channel = %self.channel, node = self.node))]
    pub async fn set_members(
        &self,
        voters: &BTreeSet<ServerName>,
        learners: &BTreeSet<ServerName>,
    ) -> Result<(), OrderError> {
        if voters.is_empty() {
            return Err(OrderError::Membership(
                "a group needs at least one voter".into(),
            ));
        }
        if voters.len() + learners.len() > 1 {
            // A group started alone runs without ticks; with peers it
            // needs heartbeats and elections again.
            self.ticks_on();
        }
        let known: BTreeSet<NodeId> = self.membership_nodes();
        for server in voters.iter().chain(learners) {
            let id = node_id(server);
            if !known.contains(&id) {
                self.raft
                    .add_learner(id, basic_node(server), true)
                    .await
                    .map_err(write_error)?;
            }
        }
        let voter_ids: BTreeSet<NodeId> = voters.iter().map(node_id).collect();
        let current_voters: BTreeSet<NodeId> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .collect();
        if voter_ids != current_voters {
            self.raft
                .change_membership(voter_ids.clone(), false)
                .await
                .map_err(write_error)?;
        }
        let keep: BTreeSet<NodeId> = voter_ids
            .into_iter()
            .chain(learners.iter().map(node_id))
            .collect();
        let stale: BTreeSet<NodeId> = self.membership_nodes().difference(&keep).copied().collect();
        if !stale.is_empty() {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(stale), false)
                .await
                .map_err(write_error)?;
        }
        Ok(())
    }

    fn membership_nodes(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    /// A copy of the ordering state this node has applied.
    pub async fn order(&self) -> ChannelOrder {
        self.state.order().await
    }

    /// The current leader's node id, as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Whether this node believes it is the leader.
    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.node)
    }

    /// Waits up to `timeout` until this node has applied the log up to
    /// `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), OrderError> {
        self.raft
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied")
            .await
            .map(|_| ())
            .map_err(|e| OrderError::Raft(e.to_string()))
    }

    /// The index of the last entry in this node's log.
    pub fn last_log_index(&self) -> Option<u64> {
        self.raft.metrics().borrow().last_log_index
    }

    /// This server.
    pub fn server(&self) -> &ServerName {
        &self.server
    }

    /// This node's Raft id, [`node_id`] of the server name.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The channel.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The openraft handle, for the federation layer to feed incoming RPCs
    /// to (`append_entries`, `vote`, `install_snapshot`) and to change
    /// membership.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Stops the node. Its log store keeps what was written.
    pub async fn shutdown(&self) -> Result<(), OrderError> {
        self.raft
            .shutdown()
            .await
            .map_err(|e| OrderError::Stopped(e.to_string()))
    }
}
