//! The commit hash: the name of a commit in votes, certificates and
//! outcomes.

use std::fmt;

/// A commit's hash: its message id ([`kith_proto::sign::message_id`]),
/// SHA-256 over the `SignContent` encoding of label `kith-v0 MessageId` and
/// the encoded commit (MLSMessage).
///
/// Using the MessageId (spec §9.6) rather than a bare
/// SHA-256 makes the hash in a certificate the same one that names the
/// commit everywhere else (fan-out dedupe, `winner`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitHash([u8; 32]);

impl CommitHash {
    /// The hash of `commit`, the encoded MLS message.
    pub fn of(commit: &[u8]) -> Self {
        Self(kith_proto::sign::message_id(commit))
    }

    /// A hash from its raw bytes (as received; not checked against a commit).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for CommitHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for CommitHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitHash({self})")
    }
}

impl tls_codec::Size for CommitHash {
    fn tls_serialized_len(&self) -> usize {
        32
    }
}

impl tls_codec::SerializeBytes for CommitHash {
    fn tls_serialize_bytes(&self) -> Result<Vec<u8>, tls_codec::Error> {
        Ok(self.0.to_vec())
    }
}

impl tls_codec::DeserializeBytes for CommitHash {
    fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(Self, &[u8]), tls_codec::Error> {
        let (raw, rest) = <[u8; 32]>::tls_deserialize_bytes(bytes)?;
        Ok((Self(raw), rest))
    }
}

impl serde::Serialize for CommitHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for CommitHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <[u8; 32]>::deserialize(d).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn hash_is_labelled() {
        // label "kith-v0 MessageId" is 17 bytes: one length byte, then the
        // empty value with its one length byte.
        let mut expected = vec![17u8];
        expected.extend_from_slice(b"kith-v0 MessageId");
        expected.push(0);
        let bare: [u8; 32] = Sha256::digest(&expected).into();
        assert_eq!(CommitHash::of(b"").as_bytes(), &bare);
        assert_ne!(CommitHash::of(b"a"), CommitHash::of(b"b"));
    }
}
