//! Raft between the servers of a channel (spec §10.8): the
//! [`FederationNetwork`] that a channel's orderer sends its Raft RPCs
//! through, and the endpoint that feeds incoming ones to the local node.
//!
//! `POST /v0/federation/raft/{channel}/{append|vote|snapshot}` carries
//! openraft's request as JSON (its serde form) and answers
//! `{"Ok": response}` or `{"Err": raft_error}`; `quiet` and `wake` on the
//! same path quiesce and wake an idle group (`crate::quiesce`). A server takes a channel's
//! Raft RPCs only from the servers in its own view of the channel's Raft
//! membership; a server that does not know the channel yet joins it when
//! a member sends it the first `append` (it fetches the channel's genesis
//! from that server, see `federation::channels`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use kith_order::raft::{NodeId, TypeConfig};
use kith_proto::{ChannelId, ServerName};
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Federation, FederationError, Signed};
use crate::api::ApiPath;
use crate::error::ApiError;
use crate::state::Shared;

/// The path of a channel's Raft RPC of `kind`.
fn rpc_path(channel: ChannelId, kind: &str) -> String {
    format!("/v0/federation/raft/{channel}/{kind}")
}

/// The Raft transport of one channel's node: signed federation POSTs.
#[derive(Clone)]
pub(crate) struct FederationNetwork {
    federation: Arc<Federation>,
    channel: ChannelId,
}

impl FederationNetwork {
    pub(crate) fn new(federation: Arc<Federation>, channel: ChannelId) -> Self {
        Self {
            federation,
            channel,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for FederationNetwork {
    type Network = FederationConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        FederationConnection {
            federation: Arc::clone(&self.federation),
            channel: self.channel,
            target,
            server: ServerName::parse_canonical(&node.addr).ok(),
        }
    }
}

/// A connection to one peer of a channel's group.
pub(crate) struct FederationConnection {
    federation: Arc<Federation>,
    channel: ChannelId,
    target: NodeId,
    server: Option<ServerName>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl FederationConnection {
    async fn call<Req, Resp, E>(
        &self,
        kind: &'static str,
        request: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let Some(server) = &self.server else {
            return Err(RPCError::Unreachable(Unreachable::new(&Failed(format!(
                "node {} has no valid server name",
                self.target
            )))));
        };
        let body = serde_json::to_vec(request)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failed(e.to_string()))))?;
        let path = rpc_path(self.channel, kind);
        self.federation.count_raft_request(kind);
        let sent = tokio::time::timeout(
            option.hard_ttl(),
            self.federation.client.post(server, &path, body),
        )
        .await;
        let answer = match sent {
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::new(&Failed(format!(
                    "{server} did not answer a Raft {kind} in time"
                )))));
            }
            Ok(Err(e @ FederationError::Unreachable { .. })) => {
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Ok(Err(e)) => return Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(answer)) => answer,
        };
        let result: Result<Resp, RaftError<NodeId, E>> = serde_json::from_slice(&answer.body)
            .map_err(|e| {
                RPCError::Network(NetworkError::new(&Failed(format!(
                    "{server} answered a Raft {kind} with invalid JSON: {e}"
                ))))
            })?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for FederationConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        self.call("append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call("snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        self.call("vote", &rpc, &option).await
    }
}

/// How long a node that joins a channel may take to start.
const JOIN_WAIT: Duration = Duration::from_secs(20);

fn body<T: DeserializeOwned>(signed: &Signed) -> Result<T, ApiError> {
    serde_json::from_slice(&signed.body)
        .map_err(|e| ApiError::bad_request(format!("the body is not a valid Raft request: {e}")))
}

fn answer<T: Serialize>(value: T) -> Result<Json<Value>, ApiError> {
    serde_json::to_value(value)
        .map(Json)
        .map_err(|e| ApiError::internal(format!("encoding the Raft answer: {e}")))
}

/// `POST /v0/federation/raft/{channel}/{kind}`.
#[tracing::instrument(skip_all, fields(origin = %signed.origin, %id, %kind))]
pub(crate) async fn rpc(
    State(state): State<Shared>,
    ApiPath((id, kind)): ApiPath<(String, String)>,
    signed: Signed,
) -> Result<Json<Value>, ApiError> {
    let channel: ChannelId = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not a channel id")))?;
    if !matches!(
        kind.as_str(),
        "append" | "vote" | "snapshot" | "quiet" | "wake"
    ) {
        return Err(ApiError::not_found(format!("no Raft RPC {kind:?}")));
    }
    let known = state.db(move |s| s.channel(&channel)).await?.is_some();
    if !known {
        // One join at a time: openraft resends an append that timed out
        // while the first was still fetching the genesis.
        let gate = state.channels.membership_gate(channel);
        let _joining = gate.lock().await;
        let known = state.db(move |s| s.channel(&channel)).await?.is_some();
        if !known && kind != "append" {
            return Err(ApiError::not_found(format!("no channel {channel} here")));
        }
        if !known {
            tokio::time::timeout(
                JOIN_WAIT,
                super::channels::join(&state, channel, &signed.origin),
            )
            .await
            .map_err(|_| ApiError::unavailable("joining the channel took too long"))??;
        }
    }
    let orderer = state
        .channels
        .orderer(channel, false)
        .await
        .map_err(|e| ApiError::internal(format!("the channel's orderer: {e}")))?;
    let (voters, learners) = orderer.membership();
    let empty = voters.is_empty() && learners.is_empty();
    if !empty && !voters.contains(&signed.origin) && !learners.contains(&signed.origin) {
        return Err(ApiError::forbidden(format!(
            "{} is not in this server's Raft membership of channel {channel}",
            signed.origin
        )));
    }
    let raft = orderer.raft();
    let mut wakes = true;
    let result = match kind.as_str() {
        "append" => {
            let request: AppendEntriesRequest<TypeConfig> = body(&signed)?;
            let leader_commit = request.leader_commit.map(|l| l.index);
            let result = raft.append_entries(request).await;
            // The leader reached this node and its log matched: the
            // freshness lease for acknowledging messages (spec §11.3).
            if matches!(result, Ok(AppendEntriesResponse::Success)) {
                state.channels.heard.appended(channel, leader_commit);
            }
            // A heartbeat the leader sent before asking this node to be
            // quiet, arriving after it: the leader is quiet, so timers
            // turned on by it would end in an election.
            wakes = !(orderer.is_quiet()
                && state.channels.activity.sent_before_quiet(
                    channel,
                    &signed.origin,
                    signed.timestamp,
                ));
            answer(result)
        }
        "vote" => answer(raft.vote(body(&signed)?).await),
        // Quiescing (spec §10.6): not Raft RPCs, and they must not turn
        // the timers on as the RPCs below do.
        "quiet" => {
            let asked: crate::quiesce::QuietRequest = body(&signed)?;
            let from_leader = orderer.leader_server().as_ref() == Some(&signed.origin);
            return answer(crate::quiesce::answer_quiet(
                &state,
                &orderer,
                from_leader,
                &asked,
                (&signed.origin, signed.timestamp),
            ));
        }
        "wake" => return answer(crate::quiesce::answer_wake(&state, &orderer).await),
        _ => answer(raft.install_snapshot(body(&signed)?).await),
    };
    // A peer's RPC: the group is awake (a quiet node's leader speaks
    // again, or an election runs).
    if wakes {
        orderer.tick_if_shared();
    }
    result
}
