//! Kith channel crypto over OpenMLS (RFC 9420). No I/O: no sockets, no
//! clocks, no tasks; MLS state lives in an [`MlsStore`] (SQLite) that the
//! caller opens.
//!
//! - [`identity`]: a device's MLS signature key is its Kith identity key;
//!   its credential names its [`DeviceId`](kith_proto::DeviceId).
//! - [`extension`]: the Kith channel extension in every group context
//!   (content type, name, space, policy).
//! - [`device`]: the client side: key packages, channels, commits kept
//!   pending until certified, staged incoming commits, application data with
//!   zero framing.
//! - [`server`]: the homeserver side: the public group state, commit
//!   validation against epoch, signatures, policy and leaf binding.
//!
//! ```
//! use kith_mls::{ChannelExtension, ChannelSettings, ContentType, Device, Incoming, MlsStore, Policy, PublicChannel, CIPHERSUITE_V0};
//! use kith_proto::{ChannelId, SecretKey};
//!
//! let alice = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
//! let bob = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
//! let server_store = MlsStore::in_memory()?;
//!
//! let settings = ChannelSettings::new(ChannelExtension::new(
//!     ContentType::octet_stream(),
//!     "general".parse()?,
//!     Policy::new([alice.device_id()])?,
//! ));
//! let mut channel = alice.create_channel(ChannelId::random(), &settings)?;
//! let mut public = PublicChannel::create(&server_store, &channel.group_info()?, &channel.ratchet_tree()?)?;
//!
//! // Alice adds Bob; the server validates and orders the commit.
//! let bob_kp = bob.key_packages(1, CIPHERSUITE_V0)?;
//! let out = channel.add(&bob_kp)?;
//! let validated = public.validate_commit(&out.commit)?;
//! assert_eq!(validated.info().added, vec![bob.device_id()]);
//! public.apply(validated)?;
//! channel.merge_pending()?;
//!
//! let mut bobs = bob.join(&out.welcome.unwrap_or_default(), &out.ratchet_tree)?;
//! let message = channel.encrypt(b"hello")?;
//! match bobs.process(&message)? {
//!     Incoming::Application { sender, data, .. } => {
//!         assert_eq!((sender, data.as_slice()), (alice.device_id(), &b"hello"[..]));
//!     }
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod check;
pub mod device;
pub mod extension;
pub mod identity;
pub mod server;
pub mod storage;

pub use check::{CommitInfo, PolicyError, commit_hash};
pub use device::{
    ADD_DEVICE_REQUEST_AAD, CIPHERSUITE_V0, Channel, ChannelSettings, CommitOutput,
    DetachedChannel, Device, DeviceError, Incoming, LEAVE_REQUEST_AAD, MAX_PAST_EPOCHS,
    REMOVE_DEVICE_REQUEST_AAD, StagedChannelCommit,
};
pub use extension::{
    ChannelExtension, ChannelName, ContentType, ExtensionError, KITH_CHANNEL_EXTENSION_TYPE, Policy,
};
pub use identity::{BindingError, DeviceSigner};
pub use server::{PublicChannel, ServerError, ValidatedCommit};
pub use storage::{
    BINARY_MARKER, BatchError, CodecError, MlsStore, OpenBatch, StoreCodec, StoreError,
};

/// The OpenMLS types that appear in this crate's API.
pub use openmls::prelude::Ciphersuite;
