//! The Kith protocol core: identifiers, device identity records,
//! sponsorships, server keys, domain-separated signatures and the canonical
//! wire codec. No I/O: every function takes its input (and `now`, in
//! milliseconds since the Unix epoch) and returns its output.
//!
//! Bytes from outside decode into unverified `*In` types; only `verify`
//! yields the trusted type.
//!
//! ```
//! use kith_proto::{DeviceRecord, DeviceRecordFields, DeviceRecordIn, InboxKey, SecretKey, Sponsorship};
//!
//! let now = 1_790_000_000_000;
//! let server_key = SecretKey::generate();
//! let device_key = SecretKey::generate();
//! let device = kith_proto::DeviceId::of(&device_key.public());
//! let sponsorship = Sponsorship::issue(
//!     &server_key,
//!     "example.org".parse()?,
//!     "alice".parse()?,
//!     device,
//!     now,
//!     now + 365 * 24 * 3600 * 1000,
//! );
//! let record = DeviceRecord::sign(
//!     &device_key,
//!     DeviceRecordFields {
//!         sequence: 1,
//!         inbox_key: InboxKey::x25519([9; 32]),
//!         display_name: "Alice's laptop".into(),
//!         links: vec![],
//!         sponsorships: vec![sponsorship],
//!         created_at: now,
//!         updated_at: now,
//!     },
//!     now,
//! )?;
//!
//! // Anyone holding the bytes can check them.
//! let received = DeviceRecordIn::decode(&record.encode())?.verify(now)?;
//! assert_eq!(received.handles().next().map(|h| h.to_string()), Some("alice@example.org".into()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod batch;
pub mod codec;
pub mod events;
pub mod federation;
pub mod ids;
pub mod inbox;
pub mod login;
pub mod record;
pub mod server_keys;
pub mod sign;
pub mod sponsorship;
pub mod user;

pub use codec::{DecodeError, PROTOCOL_VERSION, WireObject};
pub use federation::{FederationRequest, FederationRequestIn};
pub use ids::{ChannelId, DeviceId, Handle, IdError, LocalName, ServerName};
pub use inbox::{InboxError, InboxKind, InboxMessage, InboxSecretKey};
pub use login::LoginChallenge;
pub use record::{
    DeviceLink, DeviceRecord, DeviceRecordFields, DeviceRecordIn, InboxKey, RecordError,
    RecordUpdate, RecordUpdateError, VerifiedRecords,
};
pub use server_keys::{ServerKey, ServerKeys, ServerKeysError, ServerKeysIn};
pub use sign::{Label, SecretKey, SignatureError, SignaturePublicKey};
pub use sponsorship::{Sponsorship, SponsorshipError, SponsorshipIn};
pub use user::{User, group_users, mutually_linked};

/// How far in the future a timestamp may lie before it is rejected: five
/// minutes, for clocks that disagree.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
