//! The Kith channel extension, carried in every channel's MLS group context.
//!
//! ```text
//! struct {
//!     uint16 version;              // 0
//!     opaque content_type<V>;      // ASCII "type/subtype", lowercase, <= 128 bytes
//!     opaque name<V>;              // UTF-8, <= 64 bytes, no control characters
//!     optional<ChannelId> space;   // the space the channel belongs to
//!     ChannelPolicy policy;
//! } KithChannel;
//!
//! struct {
//!     DeviceId admins<V>;          // sorted ascending, no duplicates, <= 32
//! } ChannelPolicy;
//! ```
//!
//! It is a group-context extension of type [`KITH_CHANNEL_EXTENSION_TYPE`]
//! (private-use range), and the group's `required_capabilities` lists that
//! type, so every member's leaf must announce support for it.

use kith_proto::codec::{DecodeError, WireObject, decode, encode};
use kith_proto::{ChannelId, DeviceId};
use openmls::prelude::{
    CredentialType, Extension, ExtensionType, Extensions, GroupContext,
    RequiredCapabilitiesExtension, UnknownExtension,
};
use tls_codec::{TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

/// The MLS extension type of [`ChannelExtension`] (private-use range).
pub const KITH_CHANNEL_EXTENSION_TYPE: u16 = 0xF4B0;

/// Longest content type, in bytes.
pub const CONTENT_TYPE_MAX_LEN: usize = 128;
/// Longest channel name, in bytes of UTF-8.
pub const CHANNEL_NAME_MAX_LEN: usize = 64;
/// Most admins a policy may list.
pub const MAX_ADMINS: usize = 32;

/// Why a channel extension (or one of its fields) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExtensionError {
    /// The bytes do not decode as a `KithChannel`.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The content type is not lowercase ASCII `type/subtype` of at most 128
    /// bytes.
    #[error("content type {0:?} is not a lowercase ASCII type/subtype of at most 128 bytes")]
    ContentType(String),
    /// The name is longer than 64 bytes.
    #[error("channel name is {0} bytes, the limit is 64")]
    NameTooLong(usize),
    /// The name is not UTF-8 or contains a control character.
    #[error("channel name is not UTF-8 text without control characters")]
    NameText,
    /// The admin list is too long, unsorted or has duplicates.
    #[error("admin list must be sorted, unique and at most 32 long")]
    Admins,
    /// The group context has no Kith channel extension.
    #[error("the group context has no Kith channel extension")]
    Missing,
    /// The group context does not require support for the Kith channel
    /// extension.
    #[error("the group's required capabilities do not list the Kith channel extension")]
    NotRequired,
}

/// A MIME-like content type, e.g. `application/vnd.kith.chat.v1`: lowercase
/// ASCII `type/subtype`, each part 1 to 127 characters of `a-z 0-9` and
/// ``! # $ & - ^ _ . +`` starting with a letter or digit (RFC 6838
/// restricted names), no parameters, at most 128 bytes in all.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContentType(String);

impl ContentType {
    /// Opaque bytes: `application/octet-stream`.
    pub fn octet_stream() -> Self {
        Self("application/octet-stream".into())
    }

    /// The Kith chat protocol: `application/vnd.kith.chat.v1`.
    pub fn kith_chat_v1() -> Self {
        Self("application/vnd.kith.chat.v1".into())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_mime_part(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && part.len() <= 127
        && chars.all(|c| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, '!' | '#' | '$' | '&' | '-' | '^' | '_' | '.' | '+')
        })
}

impl std::str::FromStr for ContentType {
    type Err = ExtensionError;

    fn from_str(s: &str) -> Result<Self, ExtensionError> {
        let valid = s.len() <= CONTENT_TYPE_MAX_LEN
            && s.split_once('/')
                .is_some_and(|(t, sub)| valid_mime_part(t) && valid_mime_part(sub));
        if !valid {
            return Err(ExtensionError::ContentType(s.chars().take(160).collect()));
        }
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Display for ContentType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A channel's display name: UTF-8, at most 64 bytes, no control
/// characters. May be empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ChannelName(String);

impl ChannelName {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ChannelName {
    type Err = ExtensionError;

    fn from_str(s: &str) -> Result<Self, ExtensionError> {
        if s.len() > CHANNEL_NAME_MAX_LEN {
            return Err(ExtensionError::NameTooLong(s.len()));
        }
        if s.chars().any(char::is_control) {
            return Err(ExtensionError::NameText);
        }
        Ok(Self(s.to_owned()))
    }
}

impl std::fmt::Display for ChannelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who may do what in a channel (v0).
///
/// The rule, checked for every proposal a commit carries (inline proposals
/// count as sent by the committer):
///
/// - **Add**: only an admin may propose it.
/// - **Remove** of another member: only an admin; any member may propose its
///   own removal (Remove of its own leaf, or SelfRemove).
/// - **Update** and a commit's update path: any member, for its own leaf;
///   the new leaf must stay bound to the same DeviceId.
/// - **GroupContextExtensions**: only an admin, and the result must still
///   hold a valid Kith channel extension that the group requires.
/// - Everything else (PreSharedKey, ReInit, ExternalInit, custom proposals,
///   external senders and external commits) is refused in v0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Policy {
    admins: Vec<DeviceId>,
}

impl Policy {
    /// A policy whose admins are `admins` (sorted and deduplicated here).
    pub fn new(admins: impl IntoIterator<Item = DeviceId>) -> Result<Self, ExtensionError> {
        let mut admins: Vec<DeviceId> = admins.into_iter().collect();
        admins.sort();
        admins.dedup();
        if admins.len() > MAX_ADMINS {
            return Err(ExtensionError::Admins);
        }
        Ok(Self { admins })
    }

    /// The admins, sorted.
    pub fn admins(&self) -> &[DeviceId] {
        &self.admins
    }

    /// Whether `device` is an admin.
    pub fn is_admin(&self, device: &DeviceId) -> bool {
        self.admins.binary_search(device).is_ok()
    }
}

/// The decoded and validated Kith channel extension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelExtension {
    /// What the channel's application payloads are.
    pub content_type: ContentType,
    /// The channel's display name.
    pub name: ChannelName,
    /// The space the channel belongs to, if any.
    pub space: Option<ChannelId>,
    /// Who may add and remove members.
    pub policy: Policy,
}

#[derive(Debug, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct PolicyWire {
    admins: Vec<DeviceId>,
}

#[derive(Debug, TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct KithChannelWire {
    version: u16,
    content_type: VLBytes,
    name: VLBytes,
    space: Option<ChannelId>,
    policy: PolicyWire,
}

impl WireObject for KithChannelWire {
    const KIND: &'static str = "KithChannel";
    const MAX_LEN: usize = 2048;
}

impl ChannelExtension {
    /// A channel with no space and the given admins.
    pub fn new(content_type: ContentType, name: ChannelName, policy: Policy) -> Self {
        Self {
            content_type,
            name,
            space: None,
            policy,
        }
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        encode(&KithChannelWire {
            version: kith_proto::PROTOCOL_VERSION,
            content_type: VLBytes::new(self.content_type.0.as_bytes().to_vec()),
            name: VLBytes::new(self.name.0.as_bytes().to_vec()),
            space: self.space,
            policy: PolicyWire {
                admins: self.policy.admins.clone(),
            },
        })
    }

    /// Decodes and validates an encoding; only the canonical one is accepted.
    pub fn decode(bytes: &[u8]) -> Result<Self, ExtensionError> {
        let wire: KithChannelWire = decode(bytes)?;
        let content_type = std::str::from_utf8(wire.content_type.as_slice())
            .map_err(|_| ExtensionError::ContentType("<not UTF-8>".into()))?
            .parse()?;
        let name = std::str::from_utf8(wire.name.as_slice())
            .map_err(|_| ExtensionError::NameText)?
            .parse()?;
        let admins = wire.policy.admins;
        let canonical = admins.len() <= MAX_ADMINS && admins.is_sorted_by(|a, b| a < b);
        if !canonical {
            return Err(ExtensionError::Admins);
        }
        Ok(Self {
            content_type,
            name,
            space: wire.space,
            policy: Policy { admins },
        })
    }

    /// The group-context extensions of a channel: this extension and a
    /// `required_capabilities` that lists it (and basic credentials).
    pub fn to_group_context_extensions(&self) -> Extensions<GroupContext> {
        let required = RequiredCapabilitiesExtension::new(
            &[ExtensionType::Unknown(KITH_CHANNEL_EXTENSION_TYPE)],
            &[],
            &[CredentialType::Basic],
        );
        let list = vec![
            Extension::RequiredCapabilities(required),
            Extension::Unknown(KITH_CHANNEL_EXTENSION_TYPE, UnknownExtension(self.encode())),
        ];
        // Two distinct extension types, both valid in a group context.
        Extensions::from_vec(list).unwrap_or_default()
    }

    /// Reads and validates the Kith channel extension of a group context,
    /// checking that the group requires it.
    pub fn from_group_context_extensions(
        extensions: &Extensions<GroupContext>,
    ) -> Result<Self, ExtensionError> {
        let raw = extensions
            .unknown(KITH_CHANNEL_EXTENSION_TYPE)
            .ok_or(ExtensionError::Missing)?;
        let required = extensions.required_capabilities().is_some_and(|r| {
            r.extension_types()
                .contains(&ExtensionType::Unknown(KITH_CHANNEL_EXTENSION_TYPE))
        });
        if !required {
            return Err(ExtensionError::NotRequired);
        }
        Self::decode(&raw.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        for ok in [
            "application/octet-stream",
            "application/vnd.kith.chat.v1",
            "text/plain",
            "image/svg+xml",
        ] {
            assert!(ok.parse::<ContentType>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "text",
            "text/",
            "/plain",
            "Text/Plain",
            "text/plain; charset=utf-8",
            "a/b/c",
            "tëxt/plain",
            &format!("a/{}", "b".repeat(127)),
        ] {
            assert!(bad.parse::<ContentType>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn round_trip_and_exact_bytes() {
        let admin = DeviceId::from_bytes([7; 32]);
        let mut ext = ChannelExtension::new(
            "text/plain".parse().unwrap_or_else(|e| panic!("{e}")),
            "hi".parse().unwrap_or_else(|e| panic!("{e}")),
            Policy::new([admin]).unwrap_or_else(|e| panic!("{e}")),
        );
        ext.space = Some(ChannelId::from_bytes([1; 16]));
        let bytes = ext.encode();
        let mut expected = vec![0, 0, 10];
        expected.extend_from_slice(b"text/plain");
        expected.extend_from_slice(&[2, b'h', b'i', 1]);
        expected.extend_from_slice(&[1; 16]);
        expected.push(32);
        expected.extend_from_slice(&[7; 32]);
        assert_eq!(bytes, expected);
        assert_eq!(ChannelExtension::decode(&bytes), Ok(ext));
    }

    #[test]
    fn rejects_non_canonical_admins() {
        let a = DeviceId::from_bytes([1; 32]);
        let b = DeviceId::from_bytes([2; 32]);
        let ext = ChannelExtension::new(
            ContentType::octet_stream(),
            ChannelName::default(),
            Policy { admins: vec![b, a] },
        );
        assert_eq!(
            ChannelExtension::decode(&ext.encode()),
            Err(ExtensionError::Admins)
        );
    }
}
