//! Inbox envelopes: what anyone may deposit in a device's inbox, sealed with
//! HPKE (RFC 9180, base mode) to the device's static inbox key, around an
//! inner message signed by the sender's device identity key.
//!
//! The homeserver only ever sees the sealed envelope. The inner message
//! names its recipient, so an envelope opened by one device cannot be
//! re-sealed to another and pass as addressed to it.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use crate::codec::{DecodeError, PROTOCOL_VERSION, WireObject, decode, encode, vl_bytes};
use crate::ids::DeviceId;
use crate::record::{InboxKey, KEM_X25519_SHA256};
use crate::sign::{Label, SecretKey, SignatureError, SignaturePublicKey, labelled_content};

/// HPKE KDF id of HKDF-SHA256.
pub const KDF_HKDF_SHA256: u16 = 0x0001;
/// HPKE AEAD id of ChaCha20Poly1305.
pub const AEAD_CHACHA20POLY1305: u16 = 0x0003;
/// Largest inner message body.
pub const MAX_BODY_LEN: usize = 900 * 1024;

/// What an inbox message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxKind {
    /// An invitation to a channel: an MLS Welcome and what is needed to use it.
    Welcome,
    /// A one-off direct message.
    Direct,
    /// A notice from a homeserver.
    Notice,
    /// A kind this implementation does not know; kept, not dropped.
    Unknown(u16),
}

impl InboxKind {
    /// The kind's wire number.
    pub fn to_u16(self) -> u16 {
        match self {
            InboxKind::Welcome => 1,
            InboxKind::Direct => 2,
            InboxKind::Notice => 3,
            InboxKind::Unknown(n) => n,
        }
    }

    /// The kind with wire number `n`.
    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => InboxKind::Welcome,
            2 => InboxKind::Direct,
            3 => InboxKind::Notice,
            n => InboxKind::Unknown(n),
        }
    }
}

/// The signed inner message.
///
/// ```text
/// struct {
///     uint16 version;                  // 0
///     SignaturePublicKey sender_key;   // the sender's identity key
///     opaque recipient[32];            // DeviceId
///     uint64 sent_at;
///     uint16 kind;                     // 1 welcome, 2 direct, 3 notice
///     opaque body<V>;
/// } InboxMessageTbs;
/// struct { InboxMessageTbs tbs; opaque signature<V>; } InboxMessage;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct InboxMessageTbs {
    version: u16,
    sender_key: SignaturePublicKey,
    recipient: DeviceId,
    sent_at: u64,
    kind: u16,
    body: VLBytes,
}

#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct InboxMessageWire {
    tbs: InboxMessageTbs,
    signature: VLBytes,
}

impl WireObject for InboxMessageWire {
    const KIND: &'static str = "InboxMessage";
    const MAX_LEN: usize = MAX_BODY_LEN + 1024;
}

/// The sealed envelope deposited in an inbox.
///
/// ```text
/// struct {
///     uint16 version;        // 0
///     uint16 kem;            // 0x0020
///     uint16 kdf;            // 0x0001
///     uint16 aead;           // 0x0003
///     opaque enc<V>;         // HPKE encapsulated key
///     opaque ciphertext<V>;  // HPKE ciphertext of an InboxMessage
/// } InboxEnvelope;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct InboxEnvelope {
    version: u16,
    kem: u16,
    kdf: u16,
    aead: u16,
    enc: VLBytes,
    ciphertext: VLBytes,
}

impl WireObject for InboxEnvelope {
    const KIND: &'static str = "InboxEnvelope";
    const MAX_LEN: usize = MAX_BODY_LEN + 2048;
}

/// An opened, verified inbox message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxMessage {
    /// The sender's device.
    pub sender: DeviceId,
    /// The sender's identity key (its device id is [`InboxMessage::sender`]).
    pub sender_key: SignaturePublicKey,
    /// When the sender says it sent the message.
    pub sent_at: u64,
    /// What the body is.
    pub kind: InboxKind,
    /// The body.
    pub body: Vec<u8>,
}

/// Why an envelope could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InboxError {
    /// The envelope or inner message did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The envelope names HPKE algorithms other than Kith v0's.
    #[error("unsupported HPKE suite kem={kem:#06x} kdf={kdf:#06x} aead={aead:#06x}")]
    UnsupportedSuite {
        /// KEM id.
        kem: u16,
        /// KDF id.
        kdf: u16,
        /// AEAD id.
        aead: u16,
    },
    /// The recipient's inbox key is not a usable X25519 key.
    #[error("the recipient's inbox key is unusable")]
    BadRecipientKey,
    /// The body is larger than [`MAX_BODY_LEN`].
    #[error("body is {0} bytes, the limit is {MAX_BODY_LEN}")]
    BodyTooLarge(usize),
    /// Decryption failed: not sealed to this device's key, or altered.
    #[error("the envelope does not open with this device's inbox key")]
    OpenFailed,
    /// The inner message is addressed to another device.
    #[error("the message is addressed to device {0}")]
    WrongRecipient(DeviceId),
    /// The sender's signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

fn hpke_info(recipient: &DeviceId) -> Vec<u8> {
    labelled_content(Label::InboxEnvelope, recipient.as_bytes())
}

/// A device's inbox secret key (X25519).
#[derive(Clone)]
pub struct InboxSecretKey([u8; 32]);

impl InboxSecretKey {
    /// A new random key.
    pub fn generate() -> Self {
        let (secret, _) = X25519HkdfSha256::gen_keypair();
        Self(secret.to_bytes().into())
    }

    /// The key from its stored bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The bytes, for storing the key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The public half, as published in the device record.
    pub fn public(&self) -> InboxKey {
        let public = self
            .secret()
            .map(|s| <X25519HkdfSha256 as Kem>::sk_to_pk(&s).to_bytes().into())
            .unwrap_or([0; 32]);
        InboxKey::x25519(public)
    }

    fn secret(&self) -> Option<<X25519HkdfSha256 as Kem>::PrivateKey> {
        <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(&self.0).ok()
    }

    /// Opens an envelope addressed to `me` and verifies the sender's
    /// signature.
    pub fn open(&self, me: &DeviceId, envelope: &[u8]) -> Result<InboxMessage, InboxError> {
        let env: InboxEnvelope = decode(envelope)?;
        if (env.kem, env.kdf, env.aead)
            != (KEM_X25519_SHA256, KDF_HKDF_SHA256, AEAD_CHACHA20POLY1305)
        {
            return Err(InboxError::UnsupportedSuite {
                kem: env.kem,
                kdf: env.kdf,
                aead: env.aead,
            });
        }
        let secret = self.secret().ok_or(InboxError::OpenFailed)?;
        let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(env.enc.as_slice())
            .map_err(|_| InboxError::OpenFailed)?;
        let plaintext = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &secret,
            &enc,
            &hpke_info(me),
            env.ciphertext.as_slice(),
            &[],
        )
        .map_err(|_| InboxError::OpenFailed)?;
        let wire: InboxMessageWire = decode(&plaintext)?;
        let tbs = &wire.tbs;
        if tbs.recipient != *me {
            return Err(InboxError::WrongRecipient(tbs.recipient));
        }
        tbs.sender_key
            .verify(Label::InboxMessage, &encode(tbs), wire.signature.as_slice())?;
        Ok(InboxMessage {
            sender: DeviceId::of(&tbs.sender_key),
            sender_key: tbs.sender_key.clone(),
            sent_at: tbs.sent_at,
            kind: InboxKind::from_u16(tbs.kind),
            body: tbs.body.as_slice().to_vec(),
        })
    }
}

impl std::fmt::Debug for InboxSecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InboxSecretKey(..)")
    }
}

/// Signs a message with the sender's identity key and seals it to the
/// recipient's inbox key. Returns the encoded [`InboxEnvelope`].
pub fn seal(
    sender: &SecretKey,
    recipient: DeviceId,
    recipient_key: &InboxKey,
    kind: InboxKind,
    body: &[u8],
    sent_at: u64,
) -> Result<Vec<u8>, InboxError> {
    if body.len() > MAX_BODY_LEN {
        return Err(InboxError::BodyTooLarge(body.len()));
    }
    if recipient_key.kem() != KEM_X25519_SHA256 {
        return Err(InboxError::BadRecipientKey);
    }
    let public = <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(recipient_key.key_bytes())
        .map_err(|_| InboxError::BadRecipientKey)?;
    let tbs = InboxMessageTbs {
        version: PROTOCOL_VERSION,
        sender_key: sender.public(),
        recipient,
        sent_at,
        kind: kind.to_u16(),
        body: vl_bytes(body),
    };
    let signature = vl_bytes(&sender.sign(Label::InboxMessage, &encode(&tbs)));
    let plaintext = encode(&InboxMessageWire { tbs, signature });
    let (enc, ciphertext) =
        hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeS::Base,
            &public,
            &hpke_info(&recipient),
            &plaintext,
            &[],
        )
        .map_err(|_| InboxError::BadRecipientKey)?;
    Ok(encode(&InboxEnvelope {
        version: PROTOCOL_VERSION,
        kem: KEM_X25519_SHA256,
        kdf: KDF_HKDF_SHA256,
        aead: AEAD_CHACHA20POLY1305,
        enc: vl_bytes(&enc.to_bytes()),
        ciphertext: vl_bytes(&ciphertext),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let alice = SecretKey::from_seed([1; 32]);
        let bob = SecretKey::from_seed([2; 32]);
        let bob_id = DeviceId::of(&bob.public());
        let bob_inbox = InboxSecretKey::generate();
        let env = seal(
            &alice,
            bob_id,
            &bob_inbox.public(),
            InboxKind::Direct,
            b"hi bob",
            5,
        )
        .unwrap();
        let msg = bob_inbox.open(&bob_id, &env).unwrap();
        assert_eq!(msg.body, b"hi bob");
        assert_eq!(msg.sender, DeviceId::of(&alice.public()));
        assert_eq!(msg.kind, InboxKind::Direct);

        // Another device's key cannot open it.
        let carol = InboxSecretKey::generate();
        assert_eq!(carol.open(&bob_id, &env), Err(InboxError::OpenFailed));
        // Opening as another device id fails (the id is in the HPKE info).
        let other = DeviceId::from_bytes([9; 32]);
        assert_eq!(bob_inbox.open(&other, &env), Err(InboxError::OpenFailed));
        // Any altered byte fails.
        let mut altered = env.clone();
        let n = altered.len();
        altered[n - 1] ^= 1;
        assert_eq!(
            bob_inbox.open(&bob_id, &altered),
            Err(InboxError::OpenFailed)
        );
        // Garbage is a decode error, not a panic.
        assert!(matches!(
            bob_inbox.open(&bob_id, &[0, 0, 1]),
            Err(InboxError::Decode(_))
        ));
    }
}
