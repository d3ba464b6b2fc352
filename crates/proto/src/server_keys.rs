//! A homeserver's published signing keys, each with a validity period.

use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use crate::MAX_CLOCK_SKEW_MS;
use crate::codec::{DecodeError, PROTOCOL_VERSION, WireObject, decode, encode, vl_bytes};
use crate::ids::ServerName;
use crate::sign::{Label, SecretKey, SignatureError, SignaturePublicKey};

/// Most keys one list may hold.
pub const MAX_SERVER_KEYS: usize = 16;

/// One key and when it may sign.
///
/// ```text
/// struct {
///     SignaturePublicKey key;
///     uint64 valid_from;    // ms since the Unix epoch, inclusive
///     uint64 valid_until;   // exclusive
/// } ServerKey;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct ServerKey {
    /// The public key.
    pub key: SignaturePublicKey,
    /// First moment the key is valid.
    pub valid_from: u64,
    /// First moment the key is no longer valid.
    pub valid_until: u64,
}

/// The signed part of a key list.
///
/// ```text
/// struct {
///     uint16 version;               // 0
///     ServerName server;
///     uint64 published_at;
///     ServerKey keys<V>;            // 1..16 entries, distinct keys
///     SignaturePublicKey signer;    // one of `keys`, valid at published_at
/// } ServerKeysTbs;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct ServerKeysTbs {
    version: u16,
    server: ServerName,
    published_at: u64,
    keys: Vec<ServerKey>,
    signer: SignaturePublicKey,
}

/// A key list as decoded, not yet verified:
/// `struct { ServerKeysTbs tbs; opaque signature<V>; } ServerKeys;`
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct ServerKeysIn {
    tbs: ServerKeysTbs,
    signature: VLBytes,
}

impl WireObject for ServerKeysIn {
    const KIND: &'static str = "ServerKeys";
    const MAX_LEN: usize = 4096;
}

/// A verified key list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeys(ServerKeysIn);

/// Why a key list was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerKeysError {
    /// The bytes did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The list is empty or longer than [`MAX_SERVER_KEYS`].
    #[error("a key list holds 1 to {MAX_SERVER_KEYS} keys, this one {0}")]
    KeyCount(usize),
    /// The same key is listed twice.
    #[error("a key is listed twice")]
    DuplicateKey,
    /// A key's `valid_until` is not after its `valid_from`.
    #[error("a key's validity period is empty")]
    EmptyValidity,
    /// A listed key is not a usable key.
    #[error("listed key: {0}")]
    BadKey(SignatureError),
    /// The signer is not in the list, or not valid at `published_at`.
    #[error("the signing key is not listed as valid at publication time")]
    SignerNotValid,
    /// Published further in the future than clock skew explains.
    #[error("key list is published in the future ({published_at}, now {now})")]
    FromFuture {
        /// Publication time.
        published_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

impl ServerKeysIn {
    /// Decodes a key list.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }

    /// Checks the list's structure and its signature.
    pub fn verify(self, now: u64) -> Result<ServerKeys, ServerKeysError> {
        let tbs = &self.tbs;
        if tbs.keys.is_empty() || tbs.keys.len() > MAX_SERVER_KEYS {
            return Err(ServerKeysError::KeyCount(tbs.keys.len()));
        }
        for (i, entry) in tbs.keys.iter().enumerate() {
            entry.key.validate().map_err(ServerKeysError::BadKey)?;
            if entry.valid_until <= entry.valid_from {
                return Err(ServerKeysError::EmptyValidity);
            }
            if tbs
                .keys
                .iter()
                .skip(i + 1)
                .any(|other| other.key == entry.key)
            {
                return Err(ServerKeysError::DuplicateKey);
            }
        }
        if tbs.published_at > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(ServerKeysError::FromFuture {
                published_at: tbs.published_at,
                now,
            });
        }
        if !valid_at(&tbs.keys, &tbs.signer, tbs.published_at) {
            return Err(ServerKeysError::SignerNotValid);
        }
        tbs.signer
            .verify(Label::ServerKeys, &encode(tbs), self.signature.as_slice())?;
        Ok(ServerKeys(self))
    }
}

fn valid_at(keys: &[ServerKey], key: &SignaturePublicKey, at: u64) -> bool {
    keys.iter()
        .any(|k| &k.key == key && k.valid_from <= at && at < k.valid_until)
}

impl ServerKeys {
    /// Publishes `keys` for `server`, signed by `signer` (which must be one
    /// of them, valid at `published_at`).
    pub fn publish(
        signer: &SecretKey,
        server: ServerName,
        published_at: u64,
        keys: Vec<ServerKey>,
    ) -> Result<Self, ServerKeysError> {
        let tbs = ServerKeysTbs {
            version: PROTOCOL_VERSION,
            server,
            published_at,
            keys,
            signer: signer.public(),
        };
        let signature = vl_bytes(&signer.sign(Label::ServerKeys, &encode(&tbs)));
        ServerKeysIn { tbs, signature }.verify(published_at)
    }

    /// The server these keys belong to.
    pub fn server(&self) -> &ServerName {
        &self.0.tbs.server
    }

    /// When the list was published.
    pub fn published_at(&self) -> u64 {
        self.0.tbs.published_at
    }

    /// The listed keys.
    pub fn keys(&self) -> &[ServerKey] {
        &self.0.tbs.keys
    }

    /// Whether `key` is listed as valid at time `at`.
    pub fn is_valid_at(&self, key: &SignaturePublicKey, at: u64) -> bool {
        valid_at(&self.0.tbs.keys, key, at)
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.0)
    }
}
