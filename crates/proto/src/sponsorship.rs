//! Sponsorship: a homeserver's signed statement that it recognises a device
//! under a local name, which gives the device the handle `name@server`.

use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

use crate::MAX_CLOCK_SKEW_MS;
use crate::codec::{DecodeError, PROTOCOL_VERSION, WireObject, decode, encode, vl_bytes};
use crate::ids::{DeviceId, Handle, LocalName, ServerName};
use crate::server_keys::ServerKeys;
use crate::sign::{Label, SecretKey, SignatureError, SignaturePublicKey};

/// The signed part of a sponsorship.
///
/// ```text
/// struct {
///     uint16 version;                 // 0
///     ServerName server;              // opaque<V>, canonical text
///     LocalName local_name;           // opaque<V>, canonical text
///     opaque device[32];              // DeviceId
///     SignaturePublicKey server_key;  // the key that signs this
///     uint64 issued_at;               // ms since the Unix epoch
///     uint64 expires_at;
/// } SponsorshipTbs;
/// ```
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct SponsorshipTbs {
    version: u16,
    server: ServerName,
    local_name: LocalName,
    device: DeviceId,
    server_key: SignaturePublicKey,
    issued_at: u64,
    expires_at: u64,
}

/// A sponsorship as decoded, not yet verified:
/// `struct { SponsorshipTbs tbs; opaque signature<V>; } Sponsorship;`
#[derive(Debug, Clone, PartialEq, Eq, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
pub struct SponsorshipIn {
    tbs: SponsorshipTbs,
    signature: VLBytes,
}

impl WireObject for SponsorshipIn {
    const KIND: &'static str = "Sponsorship";
    const MAX_LEN: usize = 1024;
}

/// A sponsorship whose signature and validity period have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sponsorship(SponsorshipIn);

/// Why a sponsorship was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SponsorshipError {
    /// The bytes did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The sponsorship names a different device than the record carrying it.
    #[error("sponsorship is for device {found}, not {expected}")]
    WrongDevice {
        /// The device the record belongs to.
        expected: DeviceId,
        /// The device the sponsorship names.
        found: DeviceId,
    },
    /// `expires_at` is not after `issued_at`.
    #[error("sponsorship expires ({expires_at}) before it is issued ({issued_at})")]
    BadValidity {
        /// Issue time.
        issued_at: u64,
        /// Expiry time.
        expires_at: u64,
    },
    /// Issued further in the future than clock skew explains.
    #[error("sponsorship is issued in the future ({issued_at}, now {now})")]
    NotYetValid {
        /// Issue time.
        issued_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The sponsorship has expired.
    #[error("sponsorship expired at {expires_at} (now {now})")]
    Expired {
        /// Expiry time.
        expires_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The server key or signature is invalid.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The key list is for another server.
    #[error("key list is for {found}, the sponsorship is by {expected}")]
    KeysForOtherServer {
        /// The sponsoring server.
        expected: ServerName,
        /// The server of the key list.
        found: ServerName,
    },
    /// The server's key list does not contain the signing key, or not as
    /// valid when the sponsorship was issued.
    #[error("{server} did not publish the signing key as valid at {issued_at}")]
    KeyNotPublished {
        /// The sponsoring server.
        server: ServerName,
        /// Issue time.
        issued_at: u64,
    },
}

impl SponsorshipIn {
    /// Decodes a sponsorship.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode(bytes)
    }

    /// The server the sponsorship claims to come from (not yet verified).
    pub fn claimed_server(&self) -> &ServerName {
        &self.tbs.server
    }

    /// Checks that this sponsorship is for `device`, is within its validity
    /// period at `now` (ms since the Unix epoch), and is signed by the key it
    /// carries. Whether that key is really the server's is a separate check
    /// against the server's published keys: [`Sponsorship::check_server_keys`].
    pub fn verify(self, device: &DeviceId, now: u64) -> Result<Sponsorship, SponsorshipError> {
        let tbs = &self.tbs;
        if tbs.device != *device {
            return Err(SponsorshipError::WrongDevice {
                expected: *device,
                found: tbs.device,
            });
        }
        if tbs.expires_at <= tbs.issued_at {
            return Err(SponsorshipError::BadValidity {
                issued_at: tbs.issued_at,
                expires_at: tbs.expires_at,
            });
        }
        if tbs.issued_at > now.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(SponsorshipError::NotYetValid {
                issued_at: tbs.issued_at,
                now,
            });
        }
        if now >= tbs.expires_at {
            return Err(SponsorshipError::Expired {
                expires_at: tbs.expires_at,
                now,
            });
        }
        tbs.server_key
            .verify(Label::Sponsorship, &encode(tbs), self.signature.as_slice())?;
        Ok(Sponsorship(self))
    }
}

impl Sponsorship {
    /// Issues a sponsorship of `device` as `local_name@server`, signed with
    /// the server's `key`.
    pub fn issue(
        key: &SecretKey,
        server: ServerName,
        local_name: LocalName,
        device: DeviceId,
        issued_at: u64,
        expires_at: u64,
    ) -> Self {
        let tbs = SponsorshipTbs {
            version: PROTOCOL_VERSION,
            server,
            local_name,
            device,
            server_key: key.public(),
            issued_at,
            expires_at,
        };
        let signature = vl_bytes(&key.sign(Label::Sponsorship, &encode(&tbs)));
        Self(SponsorshipIn { tbs, signature })
    }

    /// The handle this sponsorship gives the device.
    pub fn handle(&self) -> Handle {
        Handle::new(self.0.tbs.local_name.clone(), self.0.tbs.server.clone())
    }

    /// The sponsoring server.
    pub fn server(&self) -> &ServerName {
        &self.0.tbs.server
    }

    /// The sponsored device.
    pub fn device(&self) -> &DeviceId {
        &self.0.tbs.device
    }

    /// The server key that signed this sponsorship.
    pub fn server_key(&self) -> &SignaturePublicKey {
        &self.0.tbs.server_key
    }

    /// When it was issued (ms since the Unix epoch).
    pub fn issued_at(&self) -> u64 {
        self.0.tbs.issued_at
    }

    /// When it expires (ms since the Unix epoch).
    pub fn expires_at(&self) -> u64 {
        self.0.tbs.expires_at
    }

    /// Checks that the server published the signing key as valid at the
    /// time the sponsorship was issued.
    pub fn check_server_keys(&self, keys: &ServerKeys) -> Result<(), SponsorshipError> {
        let tbs = &self.0.tbs;
        if keys.server() != &tbs.server {
            return Err(SponsorshipError::KeysForOtherServer {
                expected: tbs.server.clone(),
                found: keys.server().clone(),
            });
        }
        if !keys.is_valid_at(&tbs.server_key, tbs.issued_at) {
            return Err(SponsorshipError::KeyNotPublished {
                server: tbs.server.clone(),
                issued_at: tbs.issued_at,
            });
        }
        Ok(())
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(&self.0)
    }

    /// The unverified form, e.g. to embed in a record.
    pub fn as_wire(&self) -> &SponsorshipIn {
        &self.0
    }
}
