//! Validated identifiers. Each is built through `FromStr` (lenient about
//! case, for people typing) or decoded from the wire (strict: only the
//! canonical form), never passed around as a bare string.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::codec::{array_wire, encode, string_wire};
use crate::sign::{Label, SignaturePublicKey, labelled_content};

/// Longest server name, port included.
pub const SERVER_NAME_MAX_LEN: usize = 255;
/// Longest local name (the part of a handle before `@`).
pub const LOCAL_NAME_MAX_LEN: usize = 32;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("empty")]
    Empty,
    /// The string is longer than the identifier allows.
    #[error("{len} bytes long, the limit is {limit}")]
    TooLong {
        /// Length found.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A character outside the identifier's alphabet.
    #[error("character {0:?} is not allowed")]
    BadCharacter(char),
    /// A DNS label is empty, too long, or starts or ends with `-`.
    #[error("bad DNS label {0:?}")]
    BadLabel(String),
    /// The host looks numeric but is not a valid IPv4 address.
    #[error("{0:?} is neither a DNS name nor an IP address")]
    BadHost(String),
    /// The port is not a decimal number in 1..=65535 without leading zeros.
    #[error("bad port {0:?}")]
    BadPort(String),
    /// A handle without exactly one `@`.
    #[error("a handle is name@server")]
    NotAHandle,
    /// A local name must start with a letter or digit.
    #[error("must start with a letter or digit")]
    BadStart,
    /// Hex text of the wrong length or with non-hex characters.
    #[error("expected {0} hex digits")]
    BadHex(usize),
    /// The text is valid but not in canonical form (only the wire is this
    /// strict).
    #[error("{0:?} is not in canonical form")]
    NotCanonical(String),
}

/// A homeserver's name: a DNS name or an IP literal (IPv6 in brackets), with
/// an optional `:port`. Canonical form: lowercase DNS name, RFC 5952 IPv6,
/// dotted-quad IPv4, port without leading zeros.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(String);

impl ServerName {
    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host part (without port; IPv6 keeps its brackets).
    pub fn host(&self) -> &str {
        self.split().0
    }

    /// The explicit port, if any.
    pub fn port(&self) -> Option<u16> {
        self.split().1.and_then(|p| p.parse().ok())
    }

    fn split(&self) -> (&str, Option<&str>) {
        split_host_port(&self.0)
    }

    /// Parses only the canonical form.
    pub fn parse_canonical(s: &str) -> Result<Self, IdError> {
        let parsed: Self = s.parse()?;
        if parsed.0 != s {
            return Err(IdError::NotCanonical(s.to_owned()));
        }
        Ok(parsed)
    }
}

fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if s.starts_with('[') {
        match s.find(']') {
            Some(end) => {
                let (host, rest) = s.split_at(end + 1);
                (host, rest.strip_prefix(':'))
            }
            None => (s, None),
        }
    } else {
        match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    }
}

impl FromStr for ServerName {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > SERVER_NAME_MAX_LEN {
            return Err(IdError::TooLong {
                len: s.len(),
                limit: SERVER_NAME_MAX_LEN,
            });
        }
        let (host, port) = split_host_port(s);
        let host = canonical_host(host)?;
        let mut name = host;
        if let Some(port) = port {
            let valid = !port.is_empty()
                && port.len() <= 5
                && port.bytes().all(|b| b.is_ascii_digit())
                && !port.starts_with('0');
            match port.parse::<u32>() {
                Ok(p) if valid && (1..=65535).contains(&p) => {
                    name.push(':');
                    name.push_str(port);
                }
                _ => return Err(IdError::BadPort(port.to_owned())),
            }
        }
        Ok(Self(name))
    }
}

fn canonical_host(host: &str) -> Result<String, IdError> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| IdError::BadHost(host.to_owned()))?;
        let addr: Ipv6Addr = inner
            .parse()
            .map_err(|_| IdError::BadHost(host.to_owned()))?;
        return Ok(format!("[{addr}]"));
    }
    if host.is_empty() {
        return Err(IdError::Empty);
    }
    let lower = host.to_ascii_lowercase();
    let last_label = lower.rsplit('.').next().unwrap_or_default();
    if !last_label.is_empty() && last_label.bytes().all(|b| b.is_ascii_digit()) {
        // Looks numeric: it must be a real IPv4 address, not a DNS name.
        let addr: Ipv4Addr = lower
            .parse()
            .map_err(|_| IdError::BadHost(host.to_owned()))?;
        if addr.to_string() != lower {
            return Err(IdError::BadHost(host.to_owned()));
        }
        return Ok(lower);
    }
    if let Some(c) = lower
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(IdError::BadCharacter(c));
    }
    for label in lower.split('.') {
        if label.is_empty() || label.len() > 63 || label.starts_with('-') || label.ends_with('-') {
            return Err(IdError::BadLabel(label.to_owned()));
        }
    }
    Ok(lower)
}

/// The part of a handle before `@`: 1 to 32 of `a-z 0-9 . _ -`, starting with
/// a letter or digit. Canonical form is lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalName(String);

impl LocalName {
    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses only the canonical form.
    pub fn parse_canonical(s: &str) -> Result<Self, IdError> {
        let parsed: Self = s.parse()?;
        if parsed.0 != s {
            return Err(IdError::NotCanonical(s.to_owned()));
        }
        Ok(parsed)
    }
}

impl FromStr for LocalName {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > LOCAL_NAME_MAX_LEN {
            return Err(IdError::TooLong {
                len: s.len(),
                limit: LOCAL_NAME_MAX_LEN,
            });
        }
        let lower = s.to_ascii_lowercase();
        if let Some(c) = lower.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
        }) {
            return Err(IdError::BadCharacter(c));
        }
        if !lower.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(IdError::BadStart);
        }
        Ok(Self(lower))
    }
}

/// A user's address, `name@server`, as sponsored by that server.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle {
    name: LocalName,
    server: ServerName,
}

impl Handle {
    /// The handle `name@server`.
    pub fn new(name: LocalName, server: ServerName) -> Self {
        Self { name, server }
    }

    /// The local name.
    pub fn name(&self) -> &LocalName {
        &self.name
    }

    /// The sponsoring server.
    pub fn server(&self) -> &ServerName {
        &self.server
    }
}

impl FromStr for Handle {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let (name, server) = s.split_once('@').ok_or(IdError::NotAHandle)?;
        if server.contains('@') {
            return Err(IdError::NotAHandle);
        }
        Ok(Self {
            name: name.parse()?,
            server: server.parse()?,
        })
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name.0, self.server.0)
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for LocalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_wire!(ServerName);
string_wire!(LocalName);

/// A device's id: SHA-256 of the `DeviceId`-labelled encoding of its identity
/// key (see [`DeviceId::of`]). Text form: 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId([u8; 32]);

impl DeviceId {
    /// The id of the device whose identity key is `key`:
    /// `SHA-256(SignContent{"kith-v0 DeviceId", SignaturePublicKey})`.
    pub fn of(key: &SignaturePublicKey) -> Self {
        let digest = Sha256::digest(labelled_content(Label::DeviceId, &encode(key)));
        Self(digest.into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// An id from its raw bytes (as stored; not checked against any key).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// A channel's id, which is also its MLS group id: 16 random bytes chosen by
/// the creator. Text form: 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId([u8; 16]);

impl ChannelId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Self(bytes)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// An id from its raw bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

macro_rules! hex_id {
    ($ty:ident, $len:expr) => {
        impl FromStr for $ty {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                let mut bytes = [0u8; $len];
                hex::decode_to_slice(s, &mut bytes).map_err(|_| IdError::BadHex($len * 2))?;
                Ok(Self(bytes))
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($ty), "({})"), self)
            }
        }

        array_wire!($ty, $len);
    };
}

hex_id!(DeviceId, 32);
hex_id!(ChannelId, 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in [
            "example.org",
            "a.test:8448",
            "localhost",
            "127.0.0.1:80",
            "[::1]:8448",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(
                ServerName::parse_canonical(ok).map(|n| n.0),
                Ok(ok.to_owned()),
                "{ok}"
            );
        }
        assert_eq!(
            "Example.ORG".parse::<ServerName>().map(|n| n.0),
            Ok("example.org".into())
        );
        assert_eq!(
            "[0:0::1]".parse::<ServerName>().map(|n| n.0),
            Ok("[::1]".into())
        );
        assert!(matches!(
            ServerName::parse_canonical("Example.org"),
            Err(IdError::NotCanonical(_))
        ));
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "1.2.3",
            "256.1.1.1",
            "01.2.3.4",
            "a.b:0",
            "a.b:080",
            "a.b:65536",
            "a.b:",
            "[::1",
            "[zz::1]",
            "a b",
        ] {
            assert!(bad.parse::<ServerName>().is_err(), "{bad:?} accepted");
        }
        assert!(
            format!("{}.org", "a".repeat(252))
                .parse::<ServerName>()
                .is_err()
        );
        let n: ServerName = "[::1]:8448".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((n.host(), n.port()), ("[::1]", Some(8448)));
    }

    #[test]
    fn handles() {
        let h: Handle = "Alice@Example.org"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(h.to_string(), "alice@example.org");
        for bad in [
            "alice",
            "@example.org",
            "alice@",
            "a@b@c",
            ".alice@x.org",
            "al ice@x.org",
            &format!("{}@x.org", "a".repeat(33)),
        ] {
            assert!(bad.parse::<Handle>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn hex_ids_round_trip() {
        let c = ChannelId::random();
        assert_eq!(c.to_string().parse::<ChannelId>(), Ok(c));
        assert_eq!("zz".parse::<ChannelId>(), Err(IdError::BadHex(32)));
    }
}
