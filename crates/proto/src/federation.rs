//! Signed federation requests: every server-to-server HTTP request carries
//! the origin server's signature over what it asks (origin, destination,
//! method, path and query, a digest of the body, a timestamp and a nonce),
//! so the destination can check who sent it, that it was meant for it, and
//! that it is neither stale nor a replay.
//!
//! ```
//! use kith_proto::{FederationRequest, FederationRequestIn, SecretKey};
//!
//! let key = SecretKey::generate();
//! let request = FederationRequest::new(
//!     "a.test".parse()?, "b.test".parse()?, "POST", "/v0/federation/inbox/00", b"{}",
//!     1_790_000_000_000, [7; 16],
//! );
//! let header = request.sign(&key).encode();
//! let received = FederationRequestIn::decode(&header)?;
//! received.verify_signature()?;
//! assert_eq!(received.request(), &request);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use sha2::{Digest, Sha256};
use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use crate::codec::{DecodeError, PROTOCOL_VERSION, WireObject, decode, encode, vl_bytes};
use crate::ids::ServerName;
use crate::sign::{Label, SecretKey, SignatureError, SignaturePublicKey};

/// What the origin signs for one request.
///
/// ```text
/// struct {
///     uint16 version;              // 0
///     ServerName origin;
///     ServerName destination;
///     opaque method<V>;            // uppercase ASCII, e.g. "POST"
///     opaque path_and_query<V>;    // exactly as sent, e.g. "/v0/federation/users/bob@b.test"
///     opaque body_sha256[32];      // SHA-256 of the body ("" if none)
///     uint64 timestamp;            // ms since the Unix epoch
///     opaque nonce[16];            // random, never reused
/// } FederationRequestTbs;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct FederationRequest {
    version: u16,
    origin: ServerName,
    destination: ServerName,
    method: VLBytes,
    path_and_query: VLBytes,
    body_sha256: [u8; 32],
    timestamp: u64,
    nonce: [u8; 16],
}

/// A signed request as it travels in the `Kith-Signature` header, not yet
/// verified:
///
/// ```text
/// struct {
///     FederationRequestTbs tbs;
///     SignaturePublicKey key;      // the origin's key that signed
///     opaque signature<V>;         // SignWithLabel(key, "FederationRequest", tbs)
/// } SignedFederationRequest;       // limit 4096 bytes
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct FederationRequestIn {
    tbs: FederationRequest,
    key: SignaturePublicKey,
    signature: VLBytes,
}

impl WireObject for FederationRequestIn {
    const KIND: &'static str = "SignedFederationRequest";
    const MAX_LEN: usize = 4096;
}

impl FederationRequest {
    /// The request `origin` makes of `destination`.
    pub fn new(
        origin: ServerName,
        destination: ServerName,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        timestamp: u64,
        nonce: [u8; 16],
    ) -> Self {
        Self {
            version: PROTOCOL_VERSION,
            origin,
            destination,
            method: vl_bytes(method.to_ascii_uppercase().as_bytes()),
            path_and_query: vl_bytes(path_and_query.as_bytes()),
            body_sha256: Sha256::digest(body).into(),
            timestamp,
            nonce,
        }
    }

    /// Signs the request with the origin's `key`.
    pub fn sign(&self, key: &SecretKey) -> FederationRequestIn {
        FederationRequestIn {
            tbs: self.clone(),
            key: key.public(),
            signature: vl_bytes(&key.sign(Label::FederationRequest, &encode(self))),
        }
    }

    /// The sending server.
    pub fn origin(&self) -> &ServerName {
        &self.origin
    }

    /// The server the request is for.
    pub fn destination(&self) -> &ServerName {
        &self.destination
    }

    /// The HTTP method, as signed.
    pub fn method(&self) -> &[u8] {
        self.method.as_slice()
    }

    /// The path and query, as signed.
    pub fn path_and_query(&self) -> &[u8] {
        self.path_and_query.as_slice()
    }

    /// Whether `body` is the body that was signed.
    pub fn body_matches(&self, body: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(body).into();
        digest == self.body_sha256
    }

    /// When the origin made the request (ms since the Unix epoch).
    pub fn timestamp(&self) -> u64 {
        self.timestamp
    }

    /// The request's nonce.
    pub fn nonce(&self) -> &[u8; 16] {
        &self.nonce
    }

    /// The encoded to-be-signed struct.
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

impl FederationRequestIn {
    /// Decodes a signed request (§2.2 rules, limit 4096 bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }

    /// The request as the origin claims to have made it.
    pub fn request(&self) -> &FederationRequest {
        &self.tbs
    }

    /// The key the origin claims to have signed with. Whether it is one of
    /// the origin's keys is the caller's check (against the origin's
    /// `ServerKeys`).
    pub fn key(&self) -> &SignaturePublicKey {
        &self.key
    }

    /// Checks the signature under the carried key.
    pub fn verify_signature(&self) -> Result<(), SignatureError> {
        self.key.verify(
            Label::FederationRequest,
            &encode(&self.tbs),
            self.signature.as_slice(),
        )
    }

    /// The canonical encoding (what `Kith-Signature` carries, in base64url).
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> FederationRequest {
        FederationRequest::new(
            "a.test".parse().unwrap(),
            "b.test:8448".parse().unwrap(),
            "get",
            "/v0/federation/users/bob@b.test",
            b"",
            1_790_000_000_000,
            [1; 16],
        )
    }

    #[test]
    fn sign_decode_verify() {
        let key = SecretKey::from_seed([3; 32]);
        let signed = request().sign(&key);
        let back = FederationRequestIn::decode(&signed.encode()).unwrap();
        assert_eq!(back, signed);
        back.verify_signature().unwrap();
        assert_eq!(back.request().method(), b"GET");
        assert!(back.request().body_matches(b""));
        assert!(!back.request().body_matches(b"x"));
    }

    #[test]
    fn changed_fields_do_not_verify() {
        let key = SecretKey::from_seed([3; 32]);
        let mut signed = request().sign(&key);
        signed.tbs.timestamp += 1;
        assert!(signed.verify_signature().is_err());
        let mut signed = request().sign(&key);
        signed.key = SecretKey::from_seed([4; 32]).public();
        assert!(signed.verify_signature().is_err());
    }

    #[test]
    fn layout_is_the_documented_one() {
        let bytes = request().encode();
        // version, then "a.test" as opaque<V>.
        assert_eq!(&bytes[..9], &[0, 0, 6, b'a', b'.', b't', b'e', b's', b't']);
        // nonce last, timestamp before it.
        assert_eq!(&bytes[bytes.len() - 16..], &[1; 16]);
        let ts = &bytes[bytes.len() - 24..bytes.len() - 16];
        assert_eq!(ts, &1_790_000_000_000u64.to_be_bytes());
    }
}
