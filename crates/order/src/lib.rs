//! Kith's per-channel ordering of MLS commits.
//!
//! MLS needs one total order of epoch changes. For each channel, the
//! homeservers that sponsor its members run a Raft group (openraft) whose
//! log holds submitted commits; a deterministic state machine decides which
//! commit wins each epoch (the first valid one for the current epoch), each
//! voter signs a [`Vote`] for the winner, and votes from a majority of the
//! voters form an [`OrderingCertificate`], without which clients do not
//! merge a commit.
//!
//! - [`vote`], [`certificate`], [`voters`] and [`machine`] are sans-IO;
//! - `raft` (feature `raft`, on by default) runs the machine under
//!   openraft: storage, an in-process network, and the `ChannelOrderer`
//!   handle. Clients that only check certificates turn it off.
//!
//! ```
//! use kith_order::{
//!     AcceptAll, ChannelOrder, CommitHash, OrderingCertificate, OrderingCertificateIn, Outcome,
//!     Submission, Submitter, Vote, VoterSet, majority, select_voters,
//! };
//! use kith_proto::{ChannelId, DeviceId, SecretKey, ServerName};
//! use std::collections::BTreeMap;
//!
//! let channel = ChannelId::from_bytes([7; 16]);
//! let a: ServerName = "a.example".parse()?;
//! let b: ServerName = "b.example".parse()?;
//!
//! // Both servers sponsor members, so both vote; two votes are a majority.
//! let voters = select_voters(&BTreeMap::from([(a.clone(), 3), (b.clone(), 1)]));
//! assert_eq!(voters, [a.clone(), b.clone()]);
//! assert_eq!(majority(voters.len()), 2);
//!
//! // The state machine accepts the first commit for epoch 0.
//! let mut order = ChannelOrder::new(channel, 0);
//! let submission = Submission {
//!     channel,
//!     epoch: 0,
//!     commit: b"an MLS commit".to_vec(),
//!     welcome: None,
//!     group_info: b"group info".to_vec(),
//!     ratchet_tree: None,
//!     submitter: Submitter { server: a.clone(), device: DeviceId::from_bytes([1; 32]) },
//!     records: vec![],
//! };
//! let Outcome::Accepted { epoch, commit_hash } = order.apply(submission, &mut AcceptAll) else {
//!     panic!("a valid commit for the current epoch wins");
//! };
//! assert_eq!(order.current_epoch(), 1);
//!
//! // Each voter signs; the votes form a certificate a client checks.
//! let (key_a, key_b) = (SecretKey::generate(), SecretKey::generate());
//! let votes = [
//!     Vote::sign(&key_a, a.clone(), channel, epoch, commit_hash),
//!     Vote::sign(&key_b, b.clone(), channel, epoch, commit_hash),
//! ];
//! let set = VoterSet::new([(a, vec![key_a.public()]), (b, vec![key_b.public()])]);
//! let cert = OrderingCertificate::assemble(channel, epoch, commit_hash, votes, &set)?;
//! let checked = OrderingCertificateIn::decode(&cert.encode())?
//!     .verify_for(channel, 0, b"an MLS commit", &set)?;
//! assert_eq!(checked.commit_hash(), CommitHash::of(b"an MLS commit"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod certificate;
pub mod hash;
pub mod machine;
#[cfg(feature = "raft")]
pub mod raft;
mod serde_ids;
pub mod vote;
pub mod voters;

pub use certificate::{
    CertificateError, OrderingCertificate, OrderingCertificateIn, VoteCollector, VoteSig, VoterSet,
};
pub use hash::CommitHash;
pub use machine::{
    AcceptAll, AcceptedCommit, ChannelOrder, CommitValidator, Outcome, Submission, Submitter,
    Winner,
};
#[cfg(feature = "raft")]
pub use raft::{ChannelOrderer, OrderConfig, OrderError, Settled};
pub use vote::{Vote, VoteError, VoteIn, VoteTbs};
pub use voters::{MAX_VOTERS, majority, next_voters, select_voters};
