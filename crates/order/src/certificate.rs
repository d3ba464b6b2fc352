//! Ordering certificates: a commit plus votes from a majority of the
//! channel's voters. Clients merge a commit only with one.

use std::collections::{BTreeMap, BTreeSet};

use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use kith_proto::codec::{DecodeError, PROTOCOL_VERSION, WireObject, decode, encode};
use kith_proto::{ChannelId, ServerName, SignatureError, SignaturePublicKey};

use crate::hash::CommitHash;
use crate::vote::{Vote, VoteError, VoteTbs, verify_signature};
use crate::voters::majority;

/// The servers whose votes count for a channel at one epoch, with the keys
/// the channel accepts for each (taken from the group state, never from a
/// server's own say-so).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VoterSet(BTreeMap<ServerName, BTreeSet<SignaturePublicKey>>);

impl VoterSet {
    /// The voter set of `(server, accepted keys)` pairs. A server named
    /// twice is one voter with the union of the keys.
    pub fn new(voters: impl IntoIterator<Item = (ServerName, Vec<SignaturePublicKey>)>) -> Self {
        let mut map: BTreeMap<ServerName, BTreeSet<SignaturePublicKey>> = BTreeMap::new();
        for (server, keys) in voters {
            map.entry(server).or_default().extend(keys);
        }
        Self(map)
    }

    /// How many voters there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no voters (no certificate can verify).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The number of votes a certificate needs: a strict majority.
    pub fn quorum(&self) -> usize {
        majority(self.0.len())
    }

    /// Whether `server` is a voter.
    pub fn contains(&self, server: &ServerName) -> bool {
        self.0.contains_key(server)
    }

    /// Whether `key` is accepted for `server`.
    pub fn accepts(&self, server: &ServerName, key: &SignaturePublicKey) -> bool {
        self.0.get(server).is_some_and(|keys| keys.contains(key))
    }

    /// The voters, in ascending order of name.
    pub fn servers(&self) -> impl Iterator<Item = &ServerName> {
        self.0.keys()
    }
}

/// One vote inside a certificate; channel, epoch and hash are the
/// certificate's.
///
/// ```text
/// struct {
///     ServerName server;
///     SignaturePublicKey server_key;
///     opaque signature<V>;            // over VoteTbs rebuilt from the certificate
/// } VoteSig;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct VoteSig {
    server: ServerName,
    server_key: SignaturePublicKey,
    signature: VLBytes,
}

impl VoteSig {
    /// The vote without the fields a certificate holds itself.
    pub fn of(vote: &Vote) -> Self {
        Self {
            server: vote.server().clone(),
            server_key: vote.server_key().clone(),
            signature: VLBytes::new(vote.signature().to_vec()),
        }
    }

    /// The voting server.
    pub fn server(&self) -> &ServerName {
        &self.server
    }

    /// The key that signed.
    pub fn server_key(&self) -> &SignaturePublicKey {
        &self.server_key
    }
}

/// A certificate as decoded, not yet verified.
///
/// ```text
/// struct {
///     uint16 version;            // 0
///     opaque channel[16];
///     uint64 epoch;              // the epoch the commit applies to
///     opaque commit_hash[32];
///     VoteSig votes<V>;          // strictly ascending by server name
/// } OrderingCertificate;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct OrderingCertificateIn {
    version: u16,
    channel: ChannelId,
    epoch: u64,
    commit_hash: CommitHash,
    votes: Vec<VoteSig>,
}

impl WireObject for OrderingCertificateIn {
    const KIND: &'static str = "OrderingCertificate";
    const MAX_LEN: usize = 8192;
}

/// A certificate checked against a voter set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderingCertificate(OrderingCertificateIn);

/// Why a certificate was rejected (or could not be assembled).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    /// The bytes did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The certificate is for another channel than the one checked.
    #[error("certificate is for channel {found}, not {expected}")]
    WrongChannel {
        /// The channel being checked.
        expected: ChannelId,
        /// The channel the certificate names.
        found: ChannelId,
    },
    /// The certificate is for another epoch than the one checked.
    #[error("certificate is for epoch {found}, not {expected}")]
    WrongEpoch {
        /// The epoch being checked.
        expected: u64,
        /// The epoch the certificate names.
        found: u64,
    },
    /// The certificate (or a vote being assembled into one) names another
    /// commit than the one checked.
    #[error("certificate is for commit {found}, not {expected}")]
    MismatchedHash {
        /// The hash of the commit being checked.
        expected: CommitHash,
        /// The hash the certificate or vote names.
        found: CommitHash,
    },
    /// A vote being assembled is for another channel or epoch.
    #[error("vote by {server} is for channel {channel} epoch {epoch}")]
    MismatchedVote {
        /// The voter.
        server: ServerName,
        /// The vote's channel.
        channel: ChannelId,
        /// The vote's epoch.
        epoch: u64,
    },
    /// A vote comes from a server that is not a voter.
    #[error("vote from {0}, which is not a voter")]
    NotAVoter(ServerName),
    /// Two votes come from the same server.
    #[error("two votes from {0}")]
    DuplicateVoter(ServerName),
    /// The votes are not in ascending order of server name.
    #[error("votes are not sorted by server name (at {0})")]
    NotSorted(ServerName),
    /// A vote is signed with a key the channel does not accept for its
    /// server.
    #[error("vote from {0} is signed with a key the channel does not accept for it")]
    KeyNotAccepted(ServerName),
    /// A vote's signature does not verify.
    #[error("bad signature on the vote from {server}: {source}")]
    BadSignature {
        /// The voter.
        server: ServerName,
        /// What was wrong.
        source: SignatureError,
    },
    /// Fewer votes than a strict majority of the voters.
    #[error("{have} votes, a majority of {voters} voters needs {need}")]
    TooFewVotes {
        /// Valid votes present.
        have: usize,
        /// Votes needed.
        need: usize,
        /// Size of the voter set.
        voters: usize,
    },
}

impl OrderingCertificateIn {
    /// Decodes a certificate.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }

    /// The votes it carries (not yet verified).
    pub fn votes(&self) -> &[VoteSig] {
        &self.votes
    }

    /// The same claim with other votes, unchecked: what a lying server
    /// could send. For tests and tools; honest servers use
    /// [`OrderingCertificate::assemble`].
    pub fn with_votes(&self, votes: Vec<VoteSig>) -> Self {
        Self {
            votes,
            ..self.clone()
        }
    }

    /// The encoded certificate.
    pub fn encode(&self) -> Vec<u8> {
        kith_proto::codec::encode(self)
    }

    /// The channel it claims to be for (not yet verified).
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The epoch it claims to be for (not yet verified).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The commit it claims to certify (not yet verified).
    pub fn commit_hash(&self) -> CommitHash {
        self.commit_hash
    }

    /// Checks that this certifies `commit` (the encoded MLS message) as the
    /// winner of `epoch` in `channel`, then [`verify`](Self::verify)s it.
    pub fn verify_for(
        self,
        channel: ChannelId,
        epoch: u64,
        commit: &[u8],
        voters: &VoterSet,
    ) -> Result<OrderingCertificate, CertificateError> {
        if self.channel != channel {
            return Err(CertificateError::WrongChannel {
                expected: channel,
                found: self.channel,
            });
        }
        if self.epoch != epoch {
            return Err(CertificateError::WrongEpoch {
                expected: epoch,
                found: self.epoch,
            });
        }
        let expected = CommitHash::of(commit);
        if self.commit_hash != expected {
            return Err(CertificateError::MismatchedHash {
                expected,
                found: self.commit_hash,
            });
        }
        self.verify(voters)
    }

    /// Checks every vote against `voters` — from a voter, each voter once,
    /// in ascending order of name, signed with a key accepted for that
    /// voter, over the `VoteTbs` rebuilt from the certificate — and that
    /// the votes come from a strict majority of the voters. Any bad vote
    /// rejects the whole certificate.
    pub fn verify(self, voters: &VoterSet) -> Result<OrderingCertificate, CertificateError> {
        self.check(voters, Signatures::Verify)
    }

    /// [`verify`](Self::verify), with the signature checks skipped when the
    /// votes were [`Vote`]s, whose signatures were checked already.
    fn check(
        self,
        voters: &VoterSet,
        signatures: Signatures,
    ) -> Result<OrderingCertificate, CertificateError> {
        let mut previous: Option<&ServerName> = None;
        for vote in &self.votes {
            let server = &vote.server;
            if !voters.contains(server) {
                return Err(CertificateError::NotAVoter(server.clone()));
            }
            if let Some(previous) = previous {
                if previous == server {
                    return Err(CertificateError::DuplicateVoter(server.clone()));
                }
                if previous.as_str().as_bytes() > server.as_str().as_bytes() {
                    return Err(CertificateError::NotSorted(server.clone()));
                }
            }
            previous = Some(server);
            if !voters.accepts(server, &vote.server_key) {
                return Err(CertificateError::KeyNotAccepted(server.clone()));
            }
            if signatures == Signatures::CheckedAlready {
                continue;
            }
            let tbs = VoteTbs::new(
                self.channel,
                self.epoch,
                self.commit_hash,
                server.clone(),
                vote.server_key.clone(),
            );
            verify_signature(&tbs, vote.signature.as_slice()).map_err(|e| match e {
                VoteError::Signature { server, source } => {
                    CertificateError::BadSignature { server, source }
                }
                VoteError::Decode(d) => CertificateError::Decode(d),
            })?;
        }
        let need = voters.quorum();
        if self.votes.len() < need {
            return Err(CertificateError::TooFewVotes {
                have: self.votes.len(),
                need,
                voters: voters.len(),
            });
        }
        Ok(OrderingCertificate(self))
    }
}

/// Whether [`OrderingCertificateIn::check`] verifies the votes' signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signatures {
    /// Verify each one.
    Verify,
    /// They come from [`Vote`]s, which exist only with a checked signature
    /// (`VoteIn::verify`) or fresh from [`Vote::sign`].
    CheckedAlready,
}

impl OrderingCertificate {
    /// Builds the certificate for `commit_hash` winning `epoch` of
    /// `channel` from `votes` (in any order), and verifies it against
    /// `voters`, so an invalid certificate is never emitted. The votes'
    /// signatures are not checked again: a [`Vote`] has a valid one.
    pub fn assemble(
        channel: ChannelId,
        epoch: u64,
        commit_hash: CommitHash,
        votes: impl IntoIterator<Item = Vote>,
        voters: &VoterSet,
    ) -> Result<Self, CertificateError> {
        let mut sigs = Vec::new();
        for vote in votes {
            if vote.channel() != channel || vote.epoch() != epoch {
                return Err(CertificateError::MismatchedVote {
                    server: vote.server().clone(),
                    channel: vote.channel(),
                    epoch: vote.epoch(),
                });
            }
            if vote.commit_hash() != commit_hash {
                return Err(CertificateError::MismatchedHash {
                    expected: commit_hash,
                    found: vote.commit_hash(),
                });
            }
            sigs.push(VoteSig {
                server: vote.server().clone(),
                server_key: vote.server_key().clone(),
                signature: VLBytes::new(vote.signature().to_vec()),
            });
        }
        sigs.sort_by(|a, b| {
            a.server
                .as_str()
                .as_bytes()
                .cmp(b.server.as_str().as_bytes())
        });
        OrderingCertificateIn {
            version: PROTOCOL_VERSION,
            channel,
            epoch,
            commit_hash,
            votes: sigs,
        }
        .check(voters, Signatures::CheckedAlready)
    }

    /// The channel.
    pub fn channel(&self) -> ChannelId {
        self.0.channel
    }

    /// The epoch the certified commit applies to.
    pub fn epoch(&self) -> u64 {
        self.0.epoch
    }

    /// The certified commit.
    pub fn commit_hash(&self) -> CommitHash {
        self.0.commit_hash
    }

    /// The votes, ascending by server name.
    pub fn votes(&self) -> &[VoteSig] {
        &self.0.votes
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.0)
    }

    /// The unverified form.
    pub fn as_wire(&self) -> &OrderingCertificateIn {
        &self.0
    }
}

/// Gathers the votes for one commit as they arrive, until they make a
/// certificate.
#[derive(Debug, Clone)]
pub struct VoteCollector {
    channel: ChannelId,
    epoch: u64,
    commit_hash: CommitHash,
    voters: VoterSet,
    votes: BTreeMap<ServerName, Vote>,
}

impl VoteCollector {
    /// A collector for `commit_hash` winning `epoch` of `channel`, checked
    /// against `voters`.
    pub fn new(channel: ChannelId, epoch: u64, commit_hash: CommitHash, voters: VoterSet) -> Self {
        Self {
            channel,
            epoch,
            commit_hash,
            voters,
            votes: BTreeMap::new(),
        }
    }

    /// Adds a (signature-checked) vote and returns the certificate once
    /// the votes reach a majority, and again for each later vote. A vote for
    /// something else, from a non-voter or under a key not accepted for its
    /// server is refused with the reason; a second vote from a voter is
    /// ignored.
    pub fn add(&mut self, vote: Vote) -> Result<Option<OrderingCertificate>, CertificateError> {
        if vote.channel() != self.channel || vote.epoch() != self.epoch {
            return Err(CertificateError::MismatchedVote {
                server: vote.server().clone(),
                channel: vote.channel(),
                epoch: vote.epoch(),
            });
        }
        if vote.commit_hash() != self.commit_hash {
            return Err(CertificateError::MismatchedHash {
                expected: self.commit_hash,
                found: vote.commit_hash(),
            });
        }
        if !self.voters.contains(vote.server()) {
            return Err(CertificateError::NotAVoter(vote.server().clone()));
        }
        if !self.voters.accepts(vote.server(), vote.server_key()) {
            return Err(CertificateError::KeyNotAccepted(vote.server().clone()));
        }
        self.votes.entry(vote.server().clone()).or_insert(vote);
        if self.votes.len() < self.voters.quorum() {
            return Ok(None);
        }
        OrderingCertificate::assemble(
            self.channel,
            self.epoch,
            self.commit_hash,
            self.votes.values().cloned(),
            &self.voters,
        )
        .map(Some)
    }

    /// How many distinct voters have voted.
    pub fn count(&self) -> usize {
        self.votes.len()
    }
}
