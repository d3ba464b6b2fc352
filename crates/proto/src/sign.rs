//! Signatures with domain separation (MLS's `SignWithLabel`, RFC 9420 §5.1.2).
//!
//! A Kith signature is Ed25519 over the encoding of
//!
//! ```text
//! struct {
//!     opaque label<V>;    // "kith-v0 " + Label
//!     opaque content<V>;  // the encoded to-be-signed struct
//! } SignContent;
//! ```
//!
//! Every signed object type has its own [`Label`], so a signature made for
//! one kind of object never verifies as another. The `kith-v0 ` prefix also
//! keeps Kith signatures apart from MLS's own (`MLS 1.0 `), even when a
//! device uses one key for both.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use crate::codec::{encode, vl_bytes};

/// The prefix of every Kith signature label (and of labelled hashes).
pub const LABEL_PREFIX: &str = "kith-v0 ";

/// The signature scheme ids of MLS (RFC 9420 §17.1); Kith v0 uses only
/// Ed25519.
pub const SCHEME_ED25519: u16 = 0x0807;

/// Length of an Ed25519 signature.
pub const ED25519_SIGNATURE_LEN: usize = 64;

/// What a signature or labelled hash is for. The label string is part of
/// what is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// A device identity record, signed by the device's identity key.
    DeviceRecord,
    /// A homeserver's sponsorship of a device, signed by the server key.
    Sponsorship,
    /// A homeserver's published key list, signed by one of its keys.
    ServerKeys,
    /// The hash that derives a device id from an identity key.
    DeviceId,
    /// A device's answer to a homeserver's login challenge.
    LoginChallenge,
    /// The signed inner message of an inbox envelope.
    InboxMessage,
    /// A homeserver's vote for the commit that won an epoch.
    Vote,
    /// A signed federation request between homeservers.
    FederationRequest,
    /// The HPKE `info` of an inbox envelope (not a signature).
    InboxEnvelope,
    /// The hash that names a channel message or commit (not a signature).
    MessageId,
}

impl Label {
    /// The label's text, without the `kith-v0 ` prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::DeviceRecord => "DeviceRecord",
            Label::Sponsorship => "Sponsorship",
            Label::ServerKeys => "ServerKeys",
            Label::DeviceId => "DeviceId",
            Label::LoginChallenge => "LoginChallenge",
            Label::InboxMessage => "InboxMessage",
            Label::Vote => "Vote",
            Label::FederationRequest => "FederationRequest",
            Label::InboxEnvelope => "InboxEnvelope",
            Label::MessageId => "MessageId",
        }
    }
}

#[derive(TlsSize, TlsSerializeBytes)]
struct SignContent {
    label: VLBytes,
    content: VLBytes,
}

/// The encoding of `SignContent` for `label` and `content`: the exact bytes
/// an Ed25519 signature covers.
pub fn labelled_content(label: Label, content: &[u8]) -> Vec<u8> {
    let full_label = format!("{LABEL_PREFIX}{}", label.as_str());
    encode(&SignContent {
        label: vl_bytes(full_label.as_bytes()),
        content: vl_bytes(content),
    })
}

/// The id of a channel message or commit: SHA-256 over the `SignContent`
/// encoding of label `kith-v0 MessageId` and the encoded MLS message.
/// Commits are named by it in votes and certificates; messages are
/// deduplicated by it.
pub fn message_id(message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(labelled_content(Label::MessageId, message)).into()
}

/// A public signature key as it appears on the wire:
///
/// ```text
/// struct { uint16 scheme; opaque key<V>; } SignaturePublicKey;
/// ```
///
/// Decoding accepts any scheme so that records stay readable; verifying
/// with a key whose scheme is not Ed25519 fails with
/// [`SignatureError::UnsupportedScheme`].
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    TlsSize,
    TlsSerializeBytes,
    TlsDeserializeBytes,
)]
pub struct SignaturePublicKey {
    scheme: u16,
    key: VLBytes,
}

impl SignaturePublicKey {
    /// An Ed25519 public key.
    pub fn ed25519(key: [u8; 32]) -> Self {
        Self {
            scheme: SCHEME_ED25519,
            key: vl_bytes(&key),
        }
    }

    /// The signature scheme id.
    pub fn scheme(&self) -> u16 {
        self.scheme
    }

    /// The raw public key bytes.
    pub fn key_bytes(&self) -> &[u8] {
        self.key.as_slice()
    }

    /// Checks `signature` over `content` under `label`.
    ///
    /// Uses Ed25519's strict verification, which also rejects small-order
    /// keys and non-canonical signatures, so a signature has one valid form.
    pub fn verify(
        &self,
        label: Label,
        content: &[u8],
        signature: &[u8],
    ) -> Result<(), SignatureError> {
        let key = self.ed25519_key()?;
        let bytes: [u8; ED25519_SIGNATURE_LEN] = signature
            .try_into()
            .map_err(|_| SignatureError::SignatureLength(signature.len()))?;
        let signature = ed25519_dalek::Signature::from_bytes(&bytes);
        key.verify_strict(&labelled_content(label, content), &signature)
            .map_err(|_| SignatureError::Invalid { label })
    }

    /// Checks that the key is a usable Ed25519 key.
    pub fn validate(&self) -> Result<(), SignatureError> {
        let key = self.ed25519_key()?;
        if key.is_weak() {
            return Err(SignatureError::InvalidKey);
        }
        Ok(())
    }

    fn ed25519_key(&self) -> Result<VerifyingKey, SignatureError> {
        if self.scheme != SCHEME_ED25519 {
            return Err(SignatureError::UnsupportedScheme(self.scheme));
        }
        let bytes: [u8; 32] = self
            .key
            .as_slice()
            .try_into()
            .map_err(|_| SignatureError::KeyLength(self.key.as_slice().len()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| SignatureError::InvalidKey)
    }
}

/// Why a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The key names a signature scheme Kith v0 does not support.
    #[error("unsupported signature scheme {0:#06x} (Kith v0 supports Ed25519, 0x0807)")]
    UnsupportedScheme(u16),
    /// The key has the wrong length for its scheme.
    #[error("public key is {0} bytes, Ed25519 keys are 32")]
    KeyLength(usize),
    /// The key bytes are not a valid (or are a weak) Ed25519 point.
    #[error("public key is not a valid Ed25519 key")]
    InvalidKey,
    /// The signature has the wrong length.
    #[error("signature is {0} bytes, Ed25519 signatures are 64")]
    SignatureLength(usize),
    /// The signature does not match the content under this label.
    #[error("bad signature on {}", .label.as_str())]
    Invalid {
        /// The label the signature was checked under.
        label: Label,
    },
}

/// An Ed25519 signing key: a device's identity key or a homeserver's key.
///
/// The secret is zeroised on drop.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut rand_core::OsRng))
    }

    /// The key with this 32-byte Ed25519 seed (RFC 8032 private key).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// The 32-byte seed, for storing the key.
    pub fn to_seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> SignaturePublicKey {
        SignaturePublicKey::ed25519(self.0.verifying_key().to_bytes())
    }

    /// Signs `content` under `label`.
    pub fn sign(&self, label: Label, content: &[u8]) -> Vec<u8> {
        self.0
            .sign(&labelled_content(label, content))
            .to_bytes()
            .to_vec()
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SecretKey").field(&self.public()).finish()
    }
}
