//! The ordering state machine: which commit wins each epoch of a channel.
//!
//! Pure and deterministic: [`ChannelOrder::apply`] reads nothing but its
//! own state, the entry and the validator, so every server that applies the
//! same log reaches the same state and the same outcomes. Raft (module
//! `raft`, feature `raft`) only decides the order of the log.

use kith_proto::{ChannelId, DeviceId, ServerName};
use serde::{Deserialize, Serialize};

use crate::hash::CommitHash;

/// Who submitted an entry: the device and the homeserver it came through.
/// Recorded with the entry; the apply rule does not look at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitter {
    /// The homeserver that forwarded the submission.
    #[serde(with = "crate::serde_ids::server")]
    pub server: ServerName,
    /// The committing device.
    #[serde(with = "crate::serde_ids::device")]
    pub device: DeviceId,
}

/// A handshake submitted for ordering: a commit with everything that must
/// be stored with it (together or not at all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// The channel (MLS group id).
    #[serde(with = "crate::serde_ids::channel")]
    pub channel: ChannelId,
    /// The epoch the commit applies to (the one it ends).
    pub epoch: u64,
    /// The commit, an encoded MLS message (PublicMessage).
    #[serde(with = "crate::serde_ids::bytes")]
    pub commit: Vec<u8>,
    /// The Welcome, when the commit adds members.
    #[serde(with = "crate::serde_ids::opt_bytes")]
    pub welcome: Option<Vec<u8>>,
    /// The GroupInfo of the new epoch.
    #[serde(with = "crate::serde_ids::bytes")]
    pub group_info: Vec<u8>,
    /// The ratchet tree of the new epoch, when the submitter sends it.
    #[serde(with = "crate::serde_ids::opt_bytes")]
    pub ratchet_tree: Option<Vec<u8>>,
    /// Who submitted it.
    pub submitter: Submitter,
    /// The device records (encoded `DeviceRecord`s) of the devices the
    /// commit adds, so that every server of the channel learns which
    /// servers sponsor its members from the log itself. Absent from the
    /// JSON when empty.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        with = "crate::serde_ids::list_bytes"
    )]
    pub records: Vec<Vec<u8>>,
}

impl Submission {
    /// The commit's hash, [`CommitHash::of`] the commit bytes.
    pub fn commit_hash(&self) -> CommitHash {
        CommitHash::of(&self.commit)
    }
}

/// Checks a commit against the channel's state: the server plugs in
/// OpenMLS `PublicGroup` validation and the channel policy, so this crate
/// does not depend on MLS.
///
/// The machine calls `validate` only for a submission for the current
/// epoch that is not a resubmission of the winner, and **accepts every
/// submission the validator accepts**: a validator that keeps its own group
/// state must advance it (merge the commit) before returning `Ok`.
/// It must be deterministic: the same state and submission give the same
/// answer on every server (no clock, no network, no local configuration).
pub trait CommitValidator {
    /// `Ok` accepts the commit; `Err(reason)` rejects it with `reason`.
    fn validate(&mut self, submission: &Submission) -> Result<(), String>;

    /// Whether the last `Err` from [`validate`](Self::validate) was not a
    /// verdict on the commit but a failure of the validator's own machinery
    /// (its storage was unavailable, say), which another server would not
    /// have had. Then the Raft state machine does not record a rejection,
    /// which would make this server's state differ from the others': it
    /// stops the node with a storage error, and the entry is applied again
    /// when the node restarts from its log. Taking the failure clears it.
    fn take_failure(&mut self) -> Option<String> {
        None
    }

    /// Resets the validator's own state to match `order`, when a Raft
    /// snapshot replaces the log up to `order.current_epoch()` (the latest
    /// accepted submission carries the GroupInfo and ratchet tree to rebuild
    /// a `PublicGroup` from). The default refuses, which stops the Raft node
    /// rather than validate against stale state; Kith's Raft config never
    /// builds snapshots on its own, so this is only reached if one is
    /// triggered by hand.
    fn restore(&mut self, order: &ChannelOrder) -> Result<(), String> {
        Err(format!(
            "this validator cannot restore its state to epoch {} from a snapshot",
            order.current_epoch()
        ))
    }
}

impl<F: FnMut(&Submission) -> Result<(), String>> CommitValidator for F {
    fn validate(&mut self, submission: &Submission) -> Result<(), String> {
        self(submission)
    }
}

/// A validator that accepts every commit, for tests and for channels whose
/// commits are checked elsewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl CommitValidator for AcceptAll {
    fn validate(&mut self, _: &Submission) -> Result<(), String> {
        Ok(())
    }

    fn restore(&mut self, _: &ChannelOrder) -> Result<(), String> {
        Ok(())
    }
}

/// The commit that won an epoch, as told to a losing submitter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Winner {
    /// The epoch it won (the one the loser submitted for).
    pub epoch: u64,
    /// Its hash.
    pub commit_hash: CommitHash,
    /// The winning commit, so the loser can process it and retry.
    #[serde(with = "crate::serde_ids::bytes")]
    pub commit: Vec<u8>,
}

/// What applying a submission did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The commit won `epoch`; the channel is now at `epoch + 1`. Also the
    /// answer to a resubmission of the winner (same hash), which changes
    /// nothing.
    Accepted {
        /// The epoch the commit applies to.
        epoch: u64,
        /// Its hash.
        commit_hash: CommitHash,
    },
    /// The submission is not for the current epoch; nothing changed.
    WrongEpoch {
        /// The channel's current epoch.
        current: u64,
        /// The commit that won the submitted epoch, if it is known (the
        /// epoch is past and within this log).
        winner: Option<Winner>,
    },
    /// The validator (or the channel check) refused it; nothing changed.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// An accepted commit in the channel's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedCommit {
    /// The commit's hash.
    pub commit_hash: CommitHash,
    /// The submission, stored whole.
    pub submission: Submission,
}

/// One channel's ordering state: its current epoch and the commits
/// accepted since the log began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelOrder {
    #[serde(with = "crate::serde_ids::channel")]
    channel: ChannelId,
    first_epoch: u64,
    current_epoch: u64,
    /// `accepted[i]` won epoch `first_epoch + i`.
    accepted: Vec<AcceptedCommit>,
}

impl ChannelOrder {
    /// The state of a log for `channel` that starts at `first_epoch` (0 for
    /// a new MLS group). Every server of the group must start from the same
    /// value.
    pub fn new(channel: ChannelId, first_epoch: u64) -> Self {
        Self {
            channel,
            first_epoch,
            current_epoch: first_epoch,
            accepted: Vec::new(),
        }
    }

    /// The channel.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The epoch the next accepted commit will apply to.
    pub fn current_epoch(&self) -> u64 {
        self.current_epoch
    }

    /// The epoch this log started at.
    pub fn first_epoch(&self) -> u64 {
        self.first_epoch
    }

    /// The commit that won `epoch`, if it is in this log.
    pub fn accepted(&self, epoch: u64) -> Option<&AcceptedCommit> {
        let index = epoch.checked_sub(self.first_epoch)?;
        self.accepted.get(usize::try_from(index).ok()?)
    }

    /// Every accepted commit, oldest first.
    pub fn accepted_commits(&self) -> &[AcceptedCommit] {
        &self.accepted
    }

    /// Applies one ordered submission. In order:
    ///
    /// 1. a submission for another channel is `Rejected`;
    /// 2. a commit with the same hash as the winner of its epoch is
    ///    `Accepted` again (idempotent; the validator is not asked);
    /// 3. a submission for any epoch but the current one is `WrongEpoch`,
    ///    carrying the winner of that epoch if there is one;
    /// 4. the validator decides: `Ok` → `Accepted` and the epoch advances,
    ///    `Err` → `Rejected`.
    pub fn apply<V>(&mut self, submission: Submission, validator: &mut V) -> Outcome
    where
        V: CommitValidator + ?Sized,
    {
        if submission.channel != self.channel {
            return Outcome::Rejected {
                reason: format!(
                    "submission is for channel {}, this log orders {}",
                    submission.channel, self.channel
                ),
            };
        }
        let commit_hash = submission.commit_hash();
        if let Some(winner) = self.accepted(submission.epoch)
            && winner.commit_hash == commit_hash
        {
            return Outcome::Accepted {
                epoch: submission.epoch,
                commit_hash,
            };
        }
        if submission.epoch != self.current_epoch {
            return Outcome::WrongEpoch {
                current: self.current_epoch,
                winner: self.accepted(submission.epoch).map(|w| Winner {
                    epoch: submission.epoch,
                    commit_hash: w.commit_hash,
                    commit: w.submission.commit.clone(),
                }),
            };
        }
        let Some(next_epoch) = self.current_epoch.checked_add(1) else {
            return Outcome::Rejected {
                reason: "the channel has used up its epochs".into(),
            };
        };
        if let Err(reason) = validator.validate(&submission) {
            return Outcome::Rejected { reason };
        }
        let epoch = self.current_epoch;
        self.current_epoch = next_epoch;
        self.accepted.push(AcceptedCommit {
            commit_hash,
            submission,
        });
        Outcome::Accepted { epoch, commit_hash }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission(epoch: u64, commit: &[u8]) -> Submission {
        Submission {
            channel: ChannelId::from_bytes([1; 16]),
            epoch,
            commit: commit.to_vec(),
            welcome: None,
            group_info: vec![],
            ratchet_tree: None,
            submitter: Submitter {
                server: "a.test".parse().unwrap_or_else(|e| panic!("{e}")),
                device: DeviceId::from_bytes([2; 32]),
            },
            records: Vec::new(),
        }
    }

    #[test]
    fn first_accepted_wins() {
        let mut order = ChannelOrder::new(ChannelId::from_bytes([1; 16]), 0);
        let a = submission(0, b"a");
        let b = submission(0, b"b");
        let won = order.apply(a.clone(), &mut AcceptAll);
        assert_eq!(
            won,
            Outcome::Accepted {
                epoch: 0,
                commit_hash: a.commit_hash()
            }
        );
        assert_eq!(order.apply(a.clone(), &mut AcceptAll), won);
        assert_eq!(
            order.apply(b, &mut AcceptAll),
            Outcome::WrongEpoch {
                current: 1,
                winner: Some(Winner {
                    epoch: 0,
                    commit_hash: a.commit_hash(),
                    commit: b"a".to_vec()
                })
            }
        );
        assert_eq!(
            order.apply(submission(5, b"c"), &mut AcceptAll),
            Outcome::WrongEpoch {
                current: 1,
                winner: None
            }
        );
        assert_eq!(order.current_epoch(), 1);
    }

    #[test]
    fn rejection_changes_nothing() {
        let mut order = ChannelOrder::new(ChannelId::from_bytes([1; 16]), 4);
        let mut refuse = |_: &Submission| Err::<(), _>("policy".to_string());
        let before = order.clone();
        assert_eq!(
            order.apply(submission(4, b"a"), &mut refuse),
            Outcome::Rejected {
                reason: "policy".into()
            }
        );
        let mut other = submission(4, b"a");
        other.channel = ChannelId::from_bytes([9; 16]);
        assert!(matches!(
            order.apply(other, &mut AcceptAll),
            Outcome::Rejected { .. }
        ));
        assert_eq!(order, before);
    }
}
