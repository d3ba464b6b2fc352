//! Device identity records: a device's self-signed, versioned description of
//! itself, and the rule for replacing one record by a newer one.

use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use crate::MAX_CLOCK_SKEW_MS;
use crate::codec::{DecodeError, PROTOCOL_VERSION, WireObject, decode, encode, vl_bytes};
use crate::ids::{DeviceId, Handle, ServerName};
use crate::sign::{Label, SecretKey, SignatureError, SignaturePublicKey};
use crate::sponsorship::{Sponsorship, SponsorshipError, SponsorshipIn};

/// HPKE KEM id of DHKEM(X25519, HKDF-SHA256) (RFC 9180 §7.1).
pub const KEM_X25519_SHA256: u16 = 0x0020;
/// Longest display name, in UTF-8 bytes.
pub const DISPLAY_NAME_MAX_LEN: usize = 64;
/// Most links one record may hold.
pub const MAX_LINKS: usize = 32;
/// Most sponsorships one record may hold.
pub const MAX_SPONSORSHIPS: usize = 8;

/// The device's static inbox key, to which others seal (HPKE) what they
/// deposit in its inbox.
///
/// ```text
/// struct { uint16 kem; opaque key<V>; } HpkePublicKey;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct InboxKey {
    kem: u16,
    key: VLBytes,
}

impl InboxKey {
    /// An X25519 inbox key.
    pub fn x25519(key: [u8; 32]) -> Self {
        Self {
            kem: KEM_X25519_SHA256,
            key: vl_bytes(&key),
        }
    }

    /// The HPKE KEM id.
    pub fn kem(&self) -> u16 {
        self.kem
    }

    /// The raw public key.
    pub fn key_bytes(&self) -> &[u8] {
        self.key.as_slice()
    }

    fn validate(&self) -> Result<(), RecordError> {
        if self.kem != KEM_X25519_SHA256 {
            return Err(RecordError::InboxKey(format!(
                "unsupported KEM {:#06x}",
                self.kem
            )));
        }
        if self.key.as_slice().len() != 32 {
            return Err(RecordError::InboxKey(format!(
                "{} bytes, X25519 keys are 32",
                self.key.as_slice().len()
            )));
        }
        Ok(())
    }
}

/// A link to another device of the same user. Two records that link each
/// other are one user.
///
/// ```text
/// struct { opaque device[32]; } DeviceLink;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct DeviceLink {
    device: DeviceId,
}

/// The signed part of a device record.
///
/// ```text
/// struct {
///     uint16 version;                   // 0
///     SignaturePublicKey identity_key;  // the device identity (DI)
///     uint64 sequence;                  // grows with every new version
///     HpkePublicKey inbox_key;
///     opaque display_name<V>;           // UTF-8, <= 64 bytes, no controls
///     DeviceLink links<V>;              // <= 32, distinct, not itself
///     Sponsorship sponsorships<V>;      // <= 8, one per server
///     uint64 created_at;                // first version's time
///     uint64 updated_at;                // this version's time
/// } DeviceRecordTbs;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct DeviceRecordTbs {
    version: u16,
    identity_key: SignaturePublicKey,
    sequence: u64,
    inbox_key: InboxKey,
    display_name: VLBytes,
    links: Vec<DeviceLink>,
    sponsorships: Vec<SponsorshipIn>,
    created_at: u64,
    updated_at: u64,
}

/// A device record as decoded, not yet verified:
/// `struct { DeviceRecordTbs tbs; opaque signature<V>; } DeviceRecord;`
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct DeviceRecordIn {
    tbs: DeviceRecordTbs,
    signature: VLBytes,
}

impl WireObject for DeviceRecordIn {
    const KIND: &'static str = "DeviceRecord";
    const MAX_LEN: usize = 16 * 1024;
}

/// The editable content of a record, for building a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecordFields {
    /// The version number; a replacement must be higher.
    pub sequence: u64,
    /// The inbox key.
    pub inbox_key: InboxKey,
    /// What other people see as the device's name.
    pub display_name: String,
    /// The user's other devices.
    pub links: Vec<DeviceId>,
    /// Homeserver sponsorships.
    pub sponsorships: Vec<Sponsorship>,
    /// When the device's first record was made.
    pub created_at: u64,
    /// When this version was made.
    pub updated_at: u64,
}

/// A verified device record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    wire: DeviceRecordIn,
    id: DeviceId,
    sponsorships: Vec<Sponsorship>,
}

/// Why a record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The bytes did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The identity key is unusable.
    #[error("identity key: {0}")]
    IdentityKey(SignatureError),
    /// The record's own signature does not verify.
    #[error("device record: {0}")]
    Signature(SignatureError),
    /// The inbox key is unusable.
    #[error("inbox key: {0}")]
    InboxKey(String),
    /// The display name is not acceptable.
    #[error("display name: {0}")]
    DisplayName(String),
    /// More links than [`MAX_LINKS`].
    #[error("{0} links, the limit is {MAX_LINKS}")]
    TooManyLinks(usize),
    /// A device linked twice, or the device linking itself.
    #[error("link to {0} is duplicated or points at the device itself")]
    BadLink(DeviceId),
    /// More sponsorships than [`MAX_SPONSORSHIPS`].
    #[error("{0} sponsorships, the limit is {MAX_SPONSORSHIPS}")]
    TooManySponsorships(usize),
    /// Two sponsorships from one server.
    #[error("two sponsorships from {0}")]
    DuplicateSponsor(ServerName),
    /// A sponsorship failed verification (forged, expired, for another
    /// device...).
    #[error("sponsorship by {server}: {error}")]
    Sponsorship {
        /// The server named in the sponsorship.
        server: ServerName,
        /// What failed.
        error: SponsorshipError,
    },
    /// `created_at` is after `updated_at`.
    #[error("created_at {created_at} is after updated_at {updated_at}")]
    Timestamps {
        /// Creation time.
        created_at: u64,
        /// Update time.
        updated_at: u64,
    },
    /// Updated further in the future than clock skew explains.
    #[error("record is from the future (updated_at {updated_at}, now {now})")]
    FromFuture {
        /// Update time.
        updated_at: u64,
        /// The verifier's clock.
        now: u64,
    },
}

/// How an offered record relates to the one already held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordUpdate {
    /// The offered record is newer: replace.
    Newer,
    /// The same record again: nothing to do.
    Unchanged,
}

/// Why an offered record cannot replace the one held.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordUpdateError {
    /// The records belong to different devices.
    #[error("record is for device {offered}, not {current}")]
    DifferentDevice {
        /// The device held.
        current: DeviceId,
        /// The device offered.
        offered: DeviceId,
    },
    /// The offered record is older than the one held (a rollback or replay).
    #[error("sequence went backwards: holding {current}, offered {offered}")]
    SequenceWentBackwards {
        /// Sequence held.
        current: u64,
        /// Sequence offered.
        offered: u64,
    },
    /// Two different records with one sequence number: the device (or whoever
    /// holds its key) equivocated.
    #[error("equivocation: two different records with sequence {sequence}")]
    Equivocation {
        /// The shared sequence number.
        sequence: u64,
    },
}

impl DeviceRecordIn {
    /// Decodes a record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }

    /// [`verify`](Self::verify) at the record's own `updated_at`: every
    /// signature and rule, with sponsorships checked as of when the record
    /// was made. Deterministic (no clock), for checks every server must
    /// answer alike, such as a channel's commit validator.
    pub fn verify_as_of_update(self) -> Result<DeviceRecord, RecordError> {
        let at = self.tbs.updated_at;
        self.verify(at)
    }

    /// Checks everything a record promises, at time `now` (ms since the Unix
    /// epoch): the identity key, the signature, the field limits, and every
    /// sponsorship (each must be for this device, unexpired, and signed by
    /// the key it names).
    pub fn verify(self, now: u64) -> Result<DeviceRecord, RecordError> {
        let tbs = &self.tbs;
        tbs.identity_key
            .validate()
            .map_err(RecordError::IdentityKey)?;
        tbs.identity_key
            .verify(Label::DeviceRecord, &encode(tbs), self.signature.as_slice())
            .map_err(RecordError::Signature)?;
        let id = DeviceId::of(&tbs.identity_key);
        tbs.inbox_key.validate()?;
        check_display_name(tbs.display_name.as_slice())?;
        if tbs.links.len() > MAX_LINKS {
            return Err(RecordError::TooManyLinks(tbs.links.len()));
        }
        for (i, link) in tbs.links.iter().enumerate() {
            if link.device == id
                || tbs
                    .links
                    .iter()
                    .skip(i + 1)
                    .any(|l| l.device == link.device)
            {
                return Err(RecordError::BadLink(link.device));
            }
        }
        if tbs.created_at > tbs.updated_at {
            return Err(RecordError::Timestamps {
                created_at: tbs.created_at,
                updated_at: tbs.updated_at,
            });
        }
        if tbs.updated_at > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(RecordError::FromFuture {
                updated_at: tbs.updated_at,
                now,
            });
        }
        if tbs.sponsorships.len() > MAX_SPONSORSHIPS {
            return Err(RecordError::TooManySponsorships(tbs.sponsorships.len()));
        }
        let mut sponsorships: Vec<Sponsorship> = Vec::with_capacity(tbs.sponsorships.len());
        for wire in &tbs.sponsorships {
            let verified =
                wire.clone()
                    .verify(&id, now)
                    .map_err(|error| RecordError::Sponsorship {
                        server: wire.claimed_server().clone(),
                        error,
                    })?;
            if sponsorships.iter().any(|s| s.server() == verified.server()) {
                return Err(RecordError::DuplicateSponsor(verified.server().clone()));
            }
            sponsorships.push(verified);
        }
        Ok(DeviceRecord {
            wire: self,
            id,
            sponsorships,
        })
    }
}

fn check_display_name(bytes: &[u8]) -> Result<(), RecordError> {
    if bytes.len() > DISPLAY_NAME_MAX_LEN {
        return Err(RecordError::DisplayName(format!(
            "{} bytes, the limit is {DISPLAY_NAME_MAX_LEN}",
            bytes.len()
        )));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| RecordError::DisplayName("not UTF-8".into()))?;
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(RecordError::DisplayName(format!("control character {c:?}")));
    }
    Ok(())
}

impl DeviceRecord {
    /// Signs a record with the device's identity `key` and verifies it at
    /// `now`, so only records that others will accept can be made.
    pub fn sign(
        key: &SecretKey,
        fields: DeviceRecordFields,
        now: u64,
    ) -> Result<Self, RecordError> {
        let tbs = DeviceRecordTbs {
            version: PROTOCOL_VERSION,
            identity_key: key.public(),
            sequence: fields.sequence,
            inbox_key: fields.inbox_key,
            display_name: vl_bytes(fields.display_name.as_bytes()),
            links: fields
                .links
                .into_iter()
                .map(|device| DeviceLink { device })
                .collect(),
            sponsorships: fields
                .sponsorships
                .iter()
                .map(|s| s.as_wire().clone())
                .collect(),
            created_at: fields.created_at,
            updated_at: fields.updated_at,
        };
        let signature = vl_bytes(&key.sign(Label::DeviceRecord, &encode(&tbs)));
        DeviceRecordIn { tbs, signature }.verify(now)
    }

    /// The editable fields, to change and sign as the next version.
    pub fn fields(&self) -> DeviceRecordFields {
        let tbs = &self.wire.tbs;
        DeviceRecordFields {
            sequence: tbs.sequence,
            inbox_key: tbs.inbox_key.clone(),
            display_name: self.display_name().to_owned(),
            links: self.links().collect(),
            sponsorships: self.sponsorships.clone(),
            created_at: tbs.created_at,
            updated_at: tbs.updated_at,
        }
    }

    /// Decides whether `self`, offered now, replaces `current`: a higher
    /// sequence wins; the same sequence must mean the same record.
    pub fn supersedes(&self, current: &DeviceRecord) -> Result<RecordUpdate, RecordUpdateError> {
        if self.id != current.id {
            return Err(RecordUpdateError::DifferentDevice {
                current: current.id,
                offered: self.id,
            });
        }
        let (offered, held) = (self.sequence(), current.sequence());
        if offered < held {
            Err(RecordUpdateError::SequenceWentBackwards {
                current: held,
                offered,
            })
        } else if offered > held {
            Ok(RecordUpdate::Newer)
        } else if self.wire == current.wire {
            Ok(RecordUpdate::Unchanged)
        } else {
            Err(RecordUpdateError::Equivocation { sequence: offered })
        }
    }

    /// The device id.
    pub fn device_id(&self) -> DeviceId {
        self.id
    }

    /// The identity key.
    pub fn identity_key(&self) -> &SignaturePublicKey {
        &self.wire.tbs.identity_key
    }

    /// The version number.
    pub fn sequence(&self) -> u64 {
        self.wire.tbs.sequence
    }

    /// The inbox key.
    pub fn inbox_key(&self) -> &InboxKey {
        &self.wire.tbs.inbox_key
    }

    /// The display name.
    pub fn display_name(&self) -> &str {
        // Checked to be UTF-8 by `verify`.
        std::str::from_utf8(self.wire.tbs.display_name.as_slice()).unwrap_or_default()
    }

    /// The devices this record links to.
    pub fn links(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.wire.tbs.links.iter().map(|l| l.device)
    }

    /// Whether this record links to `device`.
    pub fn links_to(&self, device: &DeviceId) -> bool {
        self.links().any(|d| d == *device)
    }

    /// The verified sponsorships.
    pub fn sponsorships(&self) -> &[Sponsorship] {
        &self.sponsorships
    }

    /// The handles the device's sponsorships give it.
    pub fn handles(&self) -> impl Iterator<Item = Handle> + '_ {
        self.sponsorships.iter().map(Sponsorship::handle)
    }

    /// When the device's first record was made.
    pub fn created_at(&self) -> u64 {
        self.wire.tbs.created_at
    }

    /// When this version was made.
    pub fn updated_at(&self) -> u64 {
        self.wire.tbs.updated_at
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.wire)
    }
}

/// Records already verified, so that checking the same record again (every
/// member's, each time a channel's voter set is computed) costs a lookup
/// instead of two signature verifications.
///
/// A hit must be the same bytes, and is taken only while what
/// [`DeviceRecordIn::verify`] checks against the clock still holds: time
/// has not gone back before the first verification (so nothing "from the
/// future" then can be now) and every sponsorship is still unexpired.
/// Otherwise the record is verified again. The cache holds at most
/// `capacity` records and starts over when full.
#[derive(Debug)]
pub struct VerifiedRecords {
    entries: std::collections::HashMap<Vec<u8>, (DeviceRecord, u64)>,
    capacity: usize,
}

impl VerifiedRecords {
    /// An empty cache of at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: std::collections::HashMap::new(),
            capacity,
        }
    }

    /// [`DeviceRecordIn::decode`] and [`DeviceRecordIn::verify`] at `now`,
    /// or the record verified before from the same bytes. `None` if the
    /// bytes do not decode or verify.
    pub fn verify(&mut self, bytes: &[u8], now: u64) -> Option<DeviceRecord> {
        if let Some((record, verified_at)) = self.entries.get(bytes)
            && now >= *verified_at
            && record.sponsorships().iter().all(|s| now < s.expires_at())
        {
            return Some(record.clone());
        }
        let record = DeviceRecordIn::decode(bytes).ok()?.verify(now).ok()?;
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
        self.entries.insert(bytes.to_vec(), (record.clone(), now));
        Some(record)
    }
}
