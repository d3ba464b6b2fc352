//! The commit hash: the name of a commit in votes, certificates and
//! outcomes.

use std::fmt;

use sha2::{Digest, Sha256};
use tls_codec::{TlsSerializeBytes, TlsSize, VLBytes};

use kith_proto::codec::encode;
use kith_proto::sign::LABEL_PREFIX;

/// A commit's hash: its MessageId, `RefHash("MessageId", commit)`, i.e.
/// SHA-256 over the encoding of
///
/// ```text
/// struct { opaque label<V>; opaque value<V>; } RefHashInput;
/// // label = "kith-v0 MessageId", value = the encoded commit (MLSMessage)
/// ```
///
/// Using the MessageId (spec §Common definitions) rather than a bare
/// SHA-256 makes the hash in a certificate the same one that names the
/// commit everywhere else (fan-out dedupe, `winner`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommitHash([u8; 32]);

#[derive(TlsSize, TlsSerializeBytes)]
struct RefHashInput {
    label: VLBytes,
    value: VLBytes,
}

impl CommitHash {
    /// The hash of `commit`, the encoded MLS message.
    pub fn of(commit: &[u8]) -> Self {
        let input = RefHashInput {
            label: VLBytes::new(format!("{LABEL_PREFIX}MessageId").into_bytes()),
            value: VLBytes::new(commit.to_vec()),
        };
        Self(Sha256::digest(encode(&input)).into())
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
