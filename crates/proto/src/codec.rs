//! The canonical wire encoding shared by every signed or hashed Kith object.
//!
//! Kith encodes with the TLS presentation language exactly as MLS (RFC 9420
//! §2.1) does, through `tls_codec`: big-endian integers, fixed arrays, and
//! variable-length vectors with a minimal QUIC-style length prefix. An
//! encoding is therefore unique, and any MLS implementation's codec reads
//! Kith objects.
//!
//! Every top-level object starts with a `uint16 version`. [`decode`] checks,
//! in this order: the size limit, the version, the structure, and that no
//! bytes are left over. Each failure has its own [`DecodeError`] variant.

use tls_codec::{DeserializeBytes, SerializeBytes};

/// The protocol version this crate speaks. Every top-level object carries it
/// in its first two bytes.
pub const PROTOCOL_VERSION: u16 = 0;

/// A top-level object with its own version field and size limit.
pub trait WireObject: Sized + DeserializeBytes + SerializeBytes {
    /// The object's name in errors and in the spec, e.g. `"DeviceRecord"`.
    const KIND: &'static str;
    /// The largest encoding accepted, in bytes.
    const MAX_LEN: usize;
}

/// Why bytes did not decode into an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is longer than the object's limit; nothing was parsed.
    #[error("{kind} is {len} bytes, over the limit of {limit}")]
    Oversize {
        /// The object being decoded.
        kind: &'static str,
        /// Length of the input.
        len: usize,
        /// The object's limit.
        limit: usize,
    },
    /// The version field names a protocol version this implementation does
    /// not speak.
    #[error("{kind} has unknown version {version} (this implementation speaks {PROTOCOL_VERSION})")]
    UnknownVersion {
        /// The object being decoded.
        kind: &'static str,
        /// The version found.
        version: u16,
    },
    /// The input ended before the object did, or a field's encoding is
    /// invalid (non-minimal length, bad identifier, wrong key size...).
    #[error("{kind} is malformed: {reason}")]
    Malformed {
        /// The object being decoded.
        kind: &'static str,
        /// What the decoder found wrong.
        reason: String,
    },
    /// The object decoded but bytes follow it.
    #[error("{kind} is followed by {count} trailing bytes")]
    TrailingBytes {
        /// The object being decoded.
        kind: &'static str,
        /// How many bytes were left over.
        count: usize,
    },
}

/// Decodes one top-level object from exactly `bytes`.
pub fn decode<T: WireObject>(bytes: &[u8]) -> Result<T, DecodeError> {
    let kind = T::KIND;
    if bytes.len() > T::MAX_LEN {
        return Err(DecodeError::Oversize {
            kind,
            len: bytes.len(),
            limit: T::MAX_LEN,
        });
    }
    match bytes {
        [hi, lo, ..] => {
            let version = u16::from_be_bytes([*hi, *lo]);
            if version != PROTOCOL_VERSION {
                return Err(DecodeError::UnknownVersion { kind, version });
            }
        }
        _ => {
            return Err(DecodeError::Malformed {
                kind,
                reason: "shorter than its version".into(),
            });
        }
    }
    let (object, rest) = T::tls_deserialize_bytes(bytes).map_err(|e| DecodeError::Malformed {
        kind,
        reason: describe(&e),
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            kind,
            count: rest.len(),
        });
    }
    Ok(object)
}

/// Encodes an object or struct in the canonical encoding.
///
/// Encoding only fails for lengths beyond 2^62, which no Kith object can
/// reach: every constructor bounds its fields far below that.
pub fn encode<T: SerializeBytes>(value: &T) -> Vec<u8> {
    #[allow(clippy::expect_used)]
    value
        .tls_serialize_bytes()
        .expect("Kith objects are bounded far below the codec's limits")
}

fn describe(e: &tls_codec::Error) -> String {
    match e {
        tls_codec::Error::EndOfStream => "input ended early".into(),
        tls_codec::Error::DecodingError(s) => s.clone(),
        tls_codec::Error::InvalidVectorLength => "invalid vector length".into(),
        tls_codec::Error::TrailingData => "trailing data".into(),
        other => other.to_string(),
    }
}

/// Encodes a byte string as an MLS variable-length vector (`opaque x<V>`).
pub(crate) fn vl_bytes(bytes: &[u8]) -> tls_codec::VLBytes {
    tls_codec::VLBytes::new(bytes.to_vec())
}

/// Implements the TLS codec traits for a validated string newtype, encoded as
/// `opaque<V>` holding its canonical text. Decoding accepts only the
/// canonical form, so an identifier has exactly one encoding.
macro_rules! string_wire {
    ($ty:ty) => {
        impl tls_codec::Size for $ty {
            fn tls_serialized_len(&self) -> usize {
                $crate::codec::vl_bytes(self.as_str().as_bytes()).tls_serialized_len()
            }
        }
        impl tls_codec::SerializeBytes for $ty {
            fn tls_serialize_bytes(&self) -> Result<Vec<u8>, tls_codec::Error> {
                $crate::codec::vl_bytes(self.as_str().as_bytes()).tls_serialize_bytes()
            }
        }
        impl tls_codec::DeserializeBytes for $ty {
            fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(Self, &[u8]), tls_codec::Error> {
                let (raw, rest) = tls_codec::VLBytes::tls_deserialize_bytes(bytes)?;
                let text = std::str::from_utf8(raw.as_slice()).map_err(|_| {
                    tls_codec::Error::DecodingError(
                        concat!(stringify!($ty), " is not UTF-8").into(),
                    )
                })?;
                let value = <$ty>::parse_canonical(text).map_err(|e| {
                    tls_codec::Error::DecodingError(format!(concat!(stringify!($ty), ": {}"), e))
                })?;
                Ok((value, rest))
            }
        }
    };
}
pub(crate) use string_wire;

/// Implements the TLS codec traits for a fixed-size byte newtype
/// (`opaque x[N]` on the wire).
macro_rules! array_wire {
    ($ty:ty, $len:expr) => {
        impl tls_codec::Size for $ty {
            fn tls_serialized_len(&self) -> usize {
                $len
            }
        }
        impl tls_codec::SerializeBytes for $ty {
            fn tls_serialize_bytes(&self) -> Result<Vec<u8>, tls_codec::Error> {
                Ok(self.0.to_vec())
            }
        }
        impl tls_codec::DeserializeBytes for $ty {
            fn tls_deserialize_bytes(bytes: &[u8]) -> Result<(Self, &[u8]), tls_codec::Error> {
                let (raw, rest) = <[u8; $len]>::tls_deserialize_bytes(bytes)?;
                Ok((Self(raw), rest))
            }
        }
    };
}
pub(crate) use array_wire;
