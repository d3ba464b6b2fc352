//! The Raft RPCs servers exchange (spec §10.8) are openraft 0.9's request
//! and response types in their serde JSON form. This pins that form, so an
//! openraft upgrade that changes the wire cannot slip through, and gives
//! the spec its examples.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_order::raft::{NodeId, TypeConfig};
use kith_order::{Submission, Submitter};
use kith_proto::{ChannelId, DeviceId};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use serde_json::{Value, json};

fn log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn wire<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

#[test]
fn raft_rpcs_are_openrafts_serde_json() {
    let vote = Vote::new_committed(3, 7);
    let submission = Submission {
        channel: ChannelId::from_bytes([0xc4; 16]),
        epoch: 5,
        commit: vec![1, 2],
        welcome: None,
        group_info: vec![3],
        ratchet_tree: None,
        submitter: Submitter {
            server: "a.test".parse().unwrap(),
            device: DeviceId::from_bytes([9; 32]),
        },
        records: vec![],
    };
    let append: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
        vote,
        prev_log_id: Some(log_id(3, 7, 41)),
        entries: vec![
            Entry {
                log_id: log_id(3, 7, 42),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(3, 7, 43),
                payload: EntryPayload::Normal(submission),
            },
        ],
        leader_commit: Some(log_id(3, 7, 41)),
    };
    let text = serde_json::to_string_pretty(&append).unwrap();
    println!("{text}");
    assert_eq!(
        wire(&append),
        json!({
            "vote": {"leader_id": {"term": 3, "node_id": 7}, "committed": true},
            "prev_log_id": {"leader_id": {"term": 3, "node_id": 7}, "index": 41},
            "entries": [
                {"log_id": {"leader_id": {"term": 3, "node_id": 7}, "index": 42}, "payload": "Blank"},
                {"log_id": {"leader_id": {"term": 3, "node_id": 7}, "index": 43}, "payload": {"Normal": {
                    "channel": [196,196,196,196,196,196,196,196,196,196,196,196,196,196,196,196],
                    "epoch": 5,
                    "commit": "0102",
                    "welcome": null,
                    "group_info": "03",
                    "ratchet_tree": null,
                    "submitter": {"server": "a.test", "device": [9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9,9]}
                }}}
            ],
            "leader_commit": {"leader_id": {"term": 3, "node_id": 7}, "index": 41}
        })
    );
    let ok: Result<AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>> =
        Ok(AppendEntriesResponse::Success);
    assert_eq!(wire(&ok), json!({"Ok": "Success"}));
    let conflict: Result<AppendEntriesResponse<NodeId>, openraft::error::RaftError<NodeId>> =
        Ok(AppendEntriesResponse::Conflict);
    assert_eq!(wire(&conflict), json!({"Ok": "Conflict"}));

    let request = VoteRequest {
        vote: Vote::new(4, 9),
        last_log_id: Some(log_id(3, 7, 43)),
    };
    assert_eq!(
        wire(&request),
        json!({
            "vote": {"leader_id": {"term": 4, "node_id": 9}, "committed": false},
            "last_log_id": {"leader_id": {"term": 3, "node_id": 7}, "index": 43}
        })
    );
    let answer: Result<VoteResponse<NodeId>, openraft::error::RaftError<NodeId>> =
        Ok(VoteResponse {
            vote: Vote::new(4, 9),
            vote_granted: true,
            last_log_id: Some(log_id(3, 7, 43)),
        });
    assert_eq!(
        wire(&answer),
        json!({"Ok": {
            "vote": {"leader_id": {"term": 4, "node_id": 9}, "committed": false},
            "vote_granted": true,
            "last_log_id": {"leader_id": {"term": 3, "node_id": 7}, "index": 43}
        }})
    );
}
