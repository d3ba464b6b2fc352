//! Decodes arbitrary bytes as everything a server takes from another server
//! for a channel's ordering (spec §10.8): the body of a Raft RPC (`append`,
//! `vote`, `snapshot`: openraft 0.9's requests in their serde JSON form, as
//! `federation::raft::rpc` decodes them), a forwarded `Submission` (the
//! body of `/submit`, also the log entry), and the `{"order": ...}` body of
//! a snapshot. Whatever decodes must survive encode∘decode unchanged.
//!
//! Every submission found then goes through the deterministic apply rule
//! (`ChannelOrder::apply`, spec §10.4), which needs no I/O, and its
//! promises are checked: the first valid commit for the current epoch wins,
//! a resubmission of the winner is accepted again and changes nothing, a
//! submission for another epoch or channel and a refused one change
//! nothing.
#![no_main]

use kith_order::raft::{NodeId, TypeConfig};
use kith_order::{AcceptAll, ChannelOrder, Outcome, Submission, Winner};
use kith_proto::ChannelId;
use libfuzzer_sys::fuzz_target;
use openraft::EntryPayload;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The snapshot body `OrderStateMachine::install_snapshot` decodes (its
/// type is private to `kith-order`; the JSON is this).
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    order: ChannelOrder,
}

/// Decodes `data` as a `T`; if it decodes, checks that encoding it and
/// decoding again gives the same JSON value.
fn decode<T: DeserializeOwned + Serialize>(data: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let first = serde_json::to_value(&value).expect("a decoded value encodes");
    let again: T = serde_json::from_value(first.clone()).expect("an encoded value decodes");
    let second: Value = serde_json::to_value(&again).expect("a decoded value encodes");
    assert_eq!(first, second, "encode∘decode changed the value");
    Some(value)
}

fn refuse(_: &Submission) -> Result<(), String> {
    Err("refused".into())
}

/// Runs `submission` through the apply rule from a few starting states and
/// checks what §10.4 promises.
fn apply(submission: &Submission) {
    let epoch = submission.epoch;
    let hash = submission.commit_hash();

    // A log at the submission's epoch: a validator that refuses changes
    // nothing; one that accepts makes it the winner (unless the epochs are
    // used up).
    let mut order = ChannelOrder::new(submission.channel, epoch);
    let before = order.clone();
    let refused = order.apply(submission.clone(), &mut refuse);
    assert_eq!(
        refused,
        Outcome::Rejected {
            reason: if epoch == u64::MAX {
                "the channel has used up its epochs".into()
            } else {
                "refused".into()
            }
        }
    );
    assert_eq!(order, before, "a rejection changed the state");
    let outcome = order.apply(submission.clone(), &mut AcceptAll);
    if epoch == u64::MAX {
        assert!(matches!(outcome, Outcome::Rejected { .. }));
        assert_eq!(order, before);
        return;
    }
    assert_eq!(
        outcome,
        Outcome::Accepted {
            epoch,
            commit_hash: hash
        }
    );
    assert_eq!(order.current_epoch(), epoch + 1);
    let won = order.clone();

    // The same commit again: accepted, nothing changes, the validator is
    // not asked.
    assert_eq!(order.apply(submission.clone(), &mut refuse), outcome);
    assert_eq!(order, won);

    // Another commit for the same epoch loses to the winner.
    let mut rival = submission.clone();
    rival.commit.push(0);
    assert_eq!(
        order.apply(rival, &mut AcceptAll),
        Outcome::WrongEpoch {
            current: epoch + 1,
            winner: Some(Winner {
                epoch,
                commit_hash: hash,
                commit: submission.commit.clone(),
            }),
        }
    );
    assert_eq!(order, won);

    // The same submission for another channel is refused.
    let mut bytes = *submission.channel.as_bytes();
    bytes[0] ^= 1;
    let mut elsewhere = ChannelOrder::new(ChannelId::from_bytes(bytes), epoch);
    let before = elsewhere.clone();
    assert!(matches!(
        elsewhere.apply(submission.clone(), &mut AcceptAll),
        Outcome::Rejected { .. }
    ));
    assert_eq!(elsewhere, before);
}

/// A channel state decoded from a snapshot is not checked for consistency
/// (its epochs and accepted list may disagree): the apply rule must still
/// not panic on it.
fn apply_to_snapshot(mut order: ChannelOrder) {
    let channel = order.channel();
    let current = order.current_epoch();
    for epoch in [
        order.first_epoch(),
        current,
        current.wrapping_sub(1),
        u64::MAX,
    ] {
        let _ = order.accepted(epoch);
    }
    let template = order
        .accepted_commits()
        .first()
        .map(|c| c.submission.clone());
    if let Some(mut submission) = template {
        submission.channel = channel;
        let _ = order.apply(submission.clone(), &mut AcceptAll);
        submission.epoch = order.current_epoch();
        let _ = order.apply(submission, &mut AcceptAll);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(append) = decode::<AppendEntriesRequest<TypeConfig>>(data) {
        for entry in &append.entries {
            if let EntryPayload::Normal(submission) = &entry.payload {
                apply(submission);
            }
        }
    }
    let _ = decode::<VoteRequest<NodeId>>(data);
    if let Some(snapshot) = decode::<InstallSnapshotRequest<TypeConfig>>(data)
        && let Some(body) = decode::<SnapshotBody>(&snapshot.data)
    {
        apply_to_snapshot(body.order);
    }
    if let Some(body) = decode::<SnapshotBody>(data) {
        apply_to_snapshot(body.order);
    }
    if let Some(submission) = decode::<Submission>(data) {
        apply(&submission);
    }
});
