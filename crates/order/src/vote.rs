//! Votes: a homeserver's signed statement that a commit won an epoch.

use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use kith_proto::codec::{DecodeError, PROTOCOL_VERSION, WireObject, decode, encode};
use kith_proto::{ChannelId, Label, SecretKey, ServerName, SignatureError, SignaturePublicKey};

use crate::hash::CommitHash;

/// The signed part of a vote.
///
/// ```text
/// struct {
///     uint16 version;                 // 0
///     opaque channel[16];             // ChannelId
///     uint64 epoch;                   // the epoch the commit applies to (the one it ends)
///     opaque commit_hash[32];         // CommitHash (MessageId of the commit)
///     ServerName server;              // the voting homeserver
///     SignaturePublicKey server_key;  // the key that signs this
/// } VoteTbs;                          // signed with label "Vote"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct VoteTbs {
    version: u16,
    channel: ChannelId,
    epoch: u64,
    commit_hash: CommitHash,
    server: ServerName,
    server_key: SignaturePublicKey,
}

impl VoteTbs {
    pub(crate) fn new(
        channel: ChannelId,
        epoch: u64,
        commit_hash: CommitHash,
        server: ServerName,
        server_key: SignaturePublicKey,
    ) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            channel,
            epoch,
            commit_hash,
            server,
            server_key,
        }
    }
}

/// A vote as decoded, not yet verified:
/// `struct { VoteTbs tbs; opaque signature<V>; } Vote;`
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct VoteIn {
    tbs: VoteTbs,
    signature: VLBytes,
}

impl WireObject for VoteIn {
    const KIND: &'static str = "Vote";
    const MAX_LEN: usize = 1024;
}

/// A vote whose signature has been checked against the key it carries.
///
/// Whether that key is one the channel accepts for `server` is the
/// certificate's check ([`crate::VoterSet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote(VoteIn);

/// Why a vote was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoteError {
    /// The bytes did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The key is unusable or the signature does not verify.
    #[error("vote by {server}: {source}")]
    Signature {
        /// The server the vote claims to come from.
        server: ServerName,
        /// What was wrong with the signature.
        source: SignatureError,
    },
}

impl VoteIn {
    /// Decodes a vote.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }

    /// Checks the signature under the key the vote carries.
    pub fn verify(self) -> Result<Vote, VoteError> {
        verify_signature(&self.tbs, self.signature.as_slice())?;
        Ok(Vote(self))
    }
}

pub(crate) fn verify_signature(tbs: &VoteTbs, signature: &[u8]) -> Result<(), VoteError> {
    tbs.server_key
        .verify(Label::Vote, &encode(tbs), signature)
        .map_err(|source| VoteError::Signature {
            server: tbs.server.clone(),
            source,
        })
}

impl Vote {
    /// `server`'s vote, signed with `key`, that `commit_hash` won `epoch`
    /// of `channel`.
    pub fn sign(
        key: &SecretKey,
        server: ServerName,
        channel: ChannelId,
        epoch: u64,
        commit_hash: CommitHash,
    ) -> Self {
        let tbs = VoteTbs::new(channel, epoch, commit_hash, server, key.public());
        let signature = VLBytes::new(key.sign(Label::Vote, &encode(&tbs)));
        Self(VoteIn { tbs, signature })
    }

    /// The channel.
    pub fn channel(&self) -> ChannelId {
        self.0.tbs.channel
    }

    /// The epoch the commit applies to.
    pub fn epoch(&self) -> u64 {
        self.0.tbs.epoch
    }

    /// The commit voted for.
    pub fn commit_hash(&self) -> CommitHash {
        self.0.tbs.commit_hash
    }

    /// The voting server.
    pub fn server(&self) -> &ServerName {
        &self.0.tbs.server
    }

    /// The key that signed the vote.
    pub fn server_key(&self) -> &SignaturePublicKey {
        &self.0.tbs.server_key
    }

    /// The signature bytes.
    pub fn signature(&self) -> &[u8] {
        self.0.signature.as_slice()
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.0)
    }

    /// The unverified form.
    pub fn as_wire(&self) -> &VoteIn {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> ServerName {
        "a.example".parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn round_trip_and_tamper() {
        let key = SecretKey::from_seed([1; 32]);
        let channel = ChannelId::from_bytes([7; 16]);
        let vote = Vote::sign(&key, server(), channel, 3, CommitHash::of(b"c"));
        let bytes = vote.encode();
        let back = VoteIn::decode(&bytes).map(VoteIn::verify);
        assert_eq!(back, Ok(Ok(vote.clone())));

        // Flip a bit in the epoch (bytes 18..26): the signature breaks.
        let mut bad = bytes.clone();
        bad[25] ^= 1;
        let err = VoteIn::decode(&bad).map(VoteIn::verify);
        assert!(
            matches!(err, Ok(Err(VoteError::Signature { .. }))),
            "{err:?}"
        );

        let mut versioned = bytes;
        versioned[1] = 1;
        assert!(matches!(
            VoteIn::decode(&versioned),
            Err(DecodeError::UnknownVersion { version: 1, .. })
        ));
    }
}
