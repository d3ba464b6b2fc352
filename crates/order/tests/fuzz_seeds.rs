//! The seed corpus of the `ordering_entry` fuzz target
//! (`fuzz/seeds/ordering_entry/`): what one server sends another for a
//! channel's ordering (spec §10.8), in the exact JSON the server decodes:
//! Raft `append` bodies (a blank, a submission and a membership entry, a
//! heartbeat), a `vote` body, a `snapshot` body, a forwarded `Submission`
//! and a snapshot's `{"order": ...}` state.
//!
//! The seeds are generated here from fixed values; run with
//! `KITH_WRITE_SEEDS=1` to rewrite them. Without it the test checks that
//! the committed files are exactly what this code generates, so they
//! cannot rot when the encoding changes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use kith_order::raft::{NodeId, TypeConfig, node_id};
use kith_order::{AcceptAll, ChannelOrder, Submission, Submitter};
use kith_proto::{ChannelId, DeviceId, ServerName};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, SnapshotMeta,
    StoredMembership, Vote,
};
use serde::Serialize;

/// What a snapshot's data holds (`raft::state_machine::SnapshotBody`).
#[derive(Serialize)]
struct SnapshotBody<'a> {
    order: &'a ChannelOrder,
}

fn dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fuzz/seeds/ordering_entry"
    ))
}

fn log_id(term: u64, node: NodeId, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, node), index)
}

fn server(name: &str) -> ServerName {
    name.parse().unwrap()
}

fn submission(epoch: u64, commit: &[u8]) -> Submission {
    Submission {
        channel: ChannelId::from_bytes([0xc4; 16]),
        epoch,
        commit: commit.to_vec(),
        welcome: Some(b"welcome".to_vec()),
        group_info: b"group info".to_vec(),
        ratchet_tree: Some(b"tree".to_vec()),
        submitter: Submitter {
            server: server("a.test"),
            device: DeviceId::from_bytes([9; 32]),
        },
        records: vec![b"record one".to_vec(), b"record two".to_vec()],
    }
}

fn membership() -> Membership<NodeId, BasicNode> {
    let nodes: BTreeMap<NodeId, BasicNode> = ["a.test", "b.test", "c.test"]
        .iter()
        .map(|n| (node_id(&server(n)), BasicNode::new(*n)))
        .collect();
    let voters: BTreeSet<NodeId> = nodes.keys().take(2).copied().collect();
    Membership::new(vec![voters], nodes)
}

fn bytes<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// Each seed: file name and its JSON bytes.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let a = node_id(&server("a.test"));
    let vote = Vote::new_committed(3, a);
    let append: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
        vote,
        prev_log_id: Some(log_id(3, a, 41)),
        entries: vec![
            Entry {
                log_id: log_id(3, a, 42),
                payload: EntryPayload::Blank,
            },
            Entry {
                log_id: log_id(3, a, 43),
                payload: EntryPayload::Normal(submission(5, b"commit")),
            },
            Entry {
                log_id: log_id(3, a, 44),
                payload: EntryPayload::Membership(membership()),
            },
        ],
        leader_commit: Some(log_id(3, a, 41)),
    };
    let heartbeat: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
        vote,
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let vote_request = VoteRequest {
        vote: Vote::new(4, a),
        last_log_id: Some(log_id(3, a, 43)),
    };
    let mut order = ChannelOrder::new(ChannelId::from_bytes([0xc4; 16]), 5);
    order.apply(submission(5, b"commit"), &mut AcceptAll);
    let order = serde_json::to_vec(&SnapshotBody { order: &order }).unwrap();
    let snapshot: InstallSnapshotRequest<TypeConfig> = InstallSnapshotRequest {
        vote,
        meta: SnapshotMeta {
            last_log_id: Some(log_id(3, a, 44)),
            last_membership: StoredMembership::new(Some(log_id(3, a, 44)), membership()),
            snapshot_id: "3-44-1".into(),
        },
        offset: 0,
        data: order.clone(),
        done: true,
    };
    let mut last_epoch = submission(u64::MAX, b"the last");
    last_epoch.welcome = None;
    last_epoch.ratchet_tree = None;
    last_epoch.records = vec![];
    vec![
        ("append", bytes(&append)),
        ("heartbeat", bytes(&heartbeat)),
        ("vote", bytes(&vote_request)),
        ("snapshot", bytes(&snapshot)),
        ("submission", bytes(&submission(0, b"first"))),
        ("submission_last_epoch", bytes(&last_epoch)),
        ("snapshot_order", order),
    ]
}

#[test]
fn ordering_entry_seeds_match_the_code() {
    let seeds = seeds();
    if std::env::var_os("KITH_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir().join(name), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        let stored = std::fs::read(dir().join(name))
            .unwrap_or_else(|e| panic!("fuzz/seeds/ordering_entry/{name}: {e}"));
        assert_eq!(
            &stored, bytes,
            "{name}: the encoding changed; rewrite the seeds with KITH_WRITE_SEEDS=1"
        );
    }
    // Each decodes as the server decodes that body.
    let read = |name: &str| std::fs::read(dir().join(name)).unwrap();
    let append: AppendEntriesRequest<TypeConfig> = serde_json::from_slice(&read("append")).unwrap();
    assert_eq!(append.entries.len(), 3);
    let _: AppendEntriesRequest<TypeConfig> = serde_json::from_slice(&read("heartbeat")).unwrap();
    let _: VoteRequest<NodeId> = serde_json::from_slice(&read("vote")).unwrap();
    let snapshot: InstallSnapshotRequest<TypeConfig> =
        serde_json::from_slice(&read("snapshot")).unwrap();
    assert_eq!(snapshot.data, read("snapshot_order"));
    let first: Submission = serde_json::from_slice(&read("submission")).unwrap();
    assert_eq!(first, submission(0, b"first"));
    let last: Submission = serde_json::from_slice(&read("submission_last_epoch")).unwrap();
    assert_eq!(last.epoch, u64::MAX);
}
