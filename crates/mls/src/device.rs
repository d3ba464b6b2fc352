//! The client side: a device's MLS state and its channels.
//!
//! A [`Device`] owns its identity signer and an [`MlsStore`]; every change
//! OpenMLS makes is written to the store before the call returns, so a
//! device reopened on the same database carries on where it stopped.
//!
//! Commits are never merged implicitly. A device that makes a commit gets a
//! [`CommitOutput`] and keeps the commit *pending* until the ordering group
//! certifies it ([`Channel::merge_pending`]) or another commit wins the epoch
//! ([`Channel::clear_pending`]). An incoming commit is *staged*
//! ([`Incoming::Commit`]) and merged only when the caller has checked its
//! certificate ([`Channel::merge_staged`]).

use kith_proto::{ChannelId, DeviceId, SecretKey};
use openmls::group::MlsGroupState;
use openmls::group::PURE_PLAINTEXT_WIRE_FORMAT_POLICY;
use openmls::prelude::{Capabilities, ExtensionType, LeafNodeParameters};
use openmls::prelude::{
    Ciphersuite, GroupId, KeyPackage, KeyPackageIn, LeafNodeIndex, MlsGroup, MlsGroupCreateConfig,
    MlsGroupJoinConfig, MlsMessageBodyIn, MlsMessageIn, MlsMessageOut, ProcessedMessageContent,
    ProtocolMessage, ProtocolVersion, RatchetTreeIn, Sender, SenderRatchetConfiguration,
    StagedCommit, StagedWelcome,
};
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::StorageProvider as _;
use tls_codec::Deserialize as _;

use crate::check::{CommitInfo, PolicyError, check_commit, check_proposal};
use crate::extension::{ChannelExtension, ExtensionError, KITH_CHANNEL_EXTENSION_TYPE};
use crate::identity::{BindingError, DeviceSigner, credential_device_id, leaf_device_id};
use crate::storage::MlsStore;

/// The v0 ciphersuite: `MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519`
/// (0x0001).
pub const CIPHERSUITE_V0: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;

/// How many past epochs' secrets a member keeps, to read messages that
/// arrive after the commit that ended their epoch. The same value is used
/// when creating and when joining. 16 matches the window of epochs a server
/// accepts messages for (spec §11.3): across servers a message can arrive
/// well after several commits (a server that was down, fan-out retried
/// late), and one older than this can no longer be read.
pub const MAX_PAST_EPOCHS: usize = 16;

/// Sender-ratchet tolerance: messages up to this many generations out of
/// order are still readable.
pub const OUT_OF_ORDER_TOLERANCE: u32 = 16;

/// Sender-ratchet limit: a message more than this many generations ahead is
/// refused.
pub const MAXIMUM_FORWARD_DISTANCE: u32 = 1000;

/// The largest MLS message this crate parses, in bytes.
pub const MAX_MESSAGE_LEN: usize = 4 * 1024 * 1024;

/// The MLS `authenticated_data` of a **leave request** (spec §9.5): an
/// application message with this AAD and an empty payload asks the
/// channel's admins to remove its sender. Ordinary application messages
/// have empty AAD, so applications never see a leave request.
pub const LEAVE_REQUEST_AAD: &[u8] = b"kith-leave-v0";

/// The MLS `authenticated_data` of an **add-device request** (spec §9.5):
/// an application message with this AAD whose payload is exactly one
/// 32-byte DeviceId asks the channel's admins to add that device, which
/// must be mutually linked with the sender (the same user, §5.7).
pub const ADD_DEVICE_REQUEST_AAD: &[u8] = b"kith-add-device-v0";

/// The MLS `authenticated_data` of a **remove-device request** (spec
/// §9.5): an application message with this AAD whose payload is exactly
/// one 32-byte DeviceId asks the channel's admins to remove that device,
/// which its user removed from its name (§6.4).
pub const REMOVE_DEVICE_REQUEST_AAD: &[u8] = b"kith-remove-device-v0";

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The bytes are not the MLS object expected.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was expected.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The message belongs to another channel.
    #[error("message is for another channel")]
    WrongChannel,
    /// No channel with this id is stored.
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// A channel with this id is already stored.
    #[error("channel {0} already exists")]
    ChannelExists(ChannelId),
    /// A staged commit is for another epoch than the channel's.
    #[error("commit is for epoch {got}, the channel is at {current}")]
    WrongEpoch {
        /// The channel's epoch.
        current: u64,
        /// The commit's epoch.
        got: u64,
    },
    /// OpenMLS did not produce what it should have (a bug, not bad input).
    #[error("internal error: {0}")]
    Internal(String),
    /// A device to remove is not a member.
    #[error("device {0} is not a member of the channel")]
    NotAMember(DeviceId),
    /// A key package or leaf is not bound to its DeviceId.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// The operation or the incoming commit breaks the channel policy.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The channel extension is missing or invalid.
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    /// OpenMLS refused the operation or the message (bad signature, wrong
    /// epoch, pending commit, storage failure...).
    #[error("{operation} failed: {source}")]
    Mls {
        /// What was being done.
        operation: &'static str,
        /// OpenMLS's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn mls<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> DeviceError {
    move |e| DeviceError::Mls {
        operation,
        source: Box::new(e),
    }
}

/// The result of a [`MlsStore::batch`] whose operation already maps its
/// errors to [`DeviceError`].
fn batched<T>(
    operation: &'static str,
    result: Result<T, crate::storage::BatchError<DeviceError>>,
) -> Result<T, DeviceError> {
    result.map_err(|e| match e {
        crate::storage::BatchError::Operation(e) => e,
        crate::storage::BatchError::Commit(e) => DeviceError::Mls {
            operation,
            source: Box::new(e),
        },
    })
}

fn malformed(what: &'static str) -> impl FnOnce(tls_codec::Error) -> DeviceError {
    move |e| DeviceError::Malformed {
        what,
        reason: e.to_string(),
    }
}

fn parse_message(bytes: &[u8], what: &'static str) -> Result<MlsMessageBodyIn, DeviceError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(DeviceError::Malformed {
            what,
            reason: format!("{} bytes, the limit is {MAX_MESSAGE_LEN}", bytes.len()),
        });
    }
    Ok(MlsMessageIn::tls_deserialize_exact(bytes)
        .map_err(malformed(what))?
        .extract())
}

pub(crate) fn serialize(
    value: &impl tls_codec::Serialize,
    what: &'static str,
) -> Result<Vec<u8>, DeviceError> {
    value
        .tls_serialize_detached()
        .map_err(|e| DeviceError::Internal(format!("cannot encode {what}: {e}")))
}

/// The capabilities every Kith leaf announces: the ciphersuite, basic
/// credentials, the Kith channel extension and `last_resort` (which OpenMLS
/// wants listed before it accepts a last-resort key package).
pub(crate) fn leaf_capabilities(ciphersuite: Ciphersuite) -> Capabilities {
    Capabilities::new(
        None,
        Some(&[ciphersuite]),
        Some(&[
            ExtensionType::Unknown(KITH_CHANNEL_EXTENSION_TYPE),
            ExtensionType::LastResort,
        ]),
        None,
        Some(&[openmls::prelude::CredentialType::Basic]),
    )
}

/// The join configuration of every Kith channel: handshakes only as
/// PublicMessage, both ways (OpenMLS's "pure plaintext" policy governs
/// handshakes only; application data is always a PrivateMessage), no
/// ratchet tree in Welcomes, [`MAX_PAST_EPOCHS`] past epochs kept.
pub fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .wire_format_policy(PURE_PLAINTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(false)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAXIMUM_FORWARD_DISTANCE,
        ))
        .build()
}

/// What a new channel is.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    /// The MLS ciphersuite, fixed for the channel's life
    /// ([`CIPHERSUITE_V0`] in v0).
    pub ciphersuite: Ciphersuite,
    /// The Kith channel extension. The creator is made an admin if the
    /// policy does not already list it.
    pub extension: ChannelExtension,
}

impl ChannelSettings {
    /// Settings with the v0 ciphersuite.
    pub fn new(extension: ChannelExtension) -> Self {
        Self {
            ciphersuite: CIPHERSUITE_V0,
            extension,
        }
    }
}

/// What a device sends after making a commit. The commit stays pending
/// until [`Channel::merge_pending`] or [`Channel::clear_pending`].
#[derive(Debug, Clone)]
pub struct CommitOutput {
    /// The commit, an MLSMessage (PublicMessage).
    pub commit: Vec<u8>,
    /// The Welcome (an MLSMessage) for added devices, if any were added.
    pub welcome: Option<Vec<u8>>,
    /// The GroupInfo of the new epoch (an MLSMessage), with `external_pub`
    /// and without the ratchet tree.
    pub group_info: Vec<u8>,
    /// The ratchet tree of the new epoch (RFC 9420 `RatchetTree`).
    pub ratchet_tree: Vec<u8>,
    /// What the commit does.
    pub info: CommitInfo,
}

/// An incoming commit, checked and staged but not merged. It lives in
/// memory only: after a restart, process the commit's bytes again.
#[derive(Debug)]
pub struct StagedChannelCommit {
    staged: Box<StagedCommit>,
    info: CommitInfo,
}

impl StagedChannelCommit {
    /// What the commit does.
    pub fn info(&self) -> &CommitInfo {
        &self.info
    }

    /// Whether merging the commit removes this device from the channel.
    pub fn removes_me(&self) -> bool {
        self.staged.self_removed()
    }
}

/// What an incoming message turned out to be.
#[derive(Debug)]
pub enum Incoming {
    /// Application data, exactly as the sender passed it to
    /// [`Channel::encrypt`].
    Application {
        /// The sending device.
        sender: DeviceId,
        /// The payload.
        data: Vec<u8>,
        /// The message's MLS `authenticated_data`, as the sender set it
        /// (authenticated by MLS): empty for ordinary messages,
        /// [`LEAVE_REQUEST_AAD`] for a leave request.
        aad: Vec<u8>,
    },
    /// A commit by another member, staged: merge it with
    /// [`Channel::merge_staged`] once its ordering certificate checks.
    Commit(StagedChannelCommit),
    /// This device's own pending commit, echoed back: merge it with
    /// [`Channel::merge_pending`] once its certificate checks.
    OwnCommit,
    /// This device's own application message, echoed back (it cannot
    /// decrypt what it sent; the caller kept the plaintext).
    OwnApplication,
    /// A proposal, checked against the policy and stored for a later
    /// commit.
    Proposal {
        /// The proposing device.
        sender: DeviceId,
    },
}

impl Incoming {
    /// The device asking to leave, if this is a leave request (spec §9.5):
    /// application data with an empty payload and `authenticated_data`
    /// exactly [`LEAVE_REQUEST_AAD`]. The device is always the MLS sender,
    /// so a member can only ever ask for its own removal.
    pub fn leave_request(&self) -> Option<DeviceId> {
        match self {
            Incoming::Application { sender, data, aad }
                if data.is_empty() && aad.as_slice() == LEAVE_REQUEST_AAD =>
            {
                Some(*sender)
            }
            _ => None,
        }
    }

    /// The sender and the device it asks to have added, if this is an
    /// add-device request (spec §9.5): application data of exactly 32 bytes
    /// (a DeviceId) with `authenticated_data` exactly
    /// [`ADD_DEVICE_REQUEST_AAD`]. Whether the two devices are one user is
    /// for the caller to check against their records.
    pub fn add_device_request(&self) -> Option<(DeviceId, DeviceId)> {
        match self {
            Incoming::Application { sender, data, aad }
                if aad.as_slice() == ADD_DEVICE_REQUEST_AAD =>
            {
                let bytes: [u8; 32] = data.as_slice().try_into().ok()?;
                Some((*sender, DeviceId::from_bytes(bytes)))
            }
            _ => None,
        }
    }

    /// The sender and the device it asks to have removed, if this is a
    /// remove-device request (spec §9.5): application data of exactly 32
    /// bytes (a DeviceId) with `authenticated_data` exactly
    /// [`REMOVE_DEVICE_REQUEST_AAD`]. Whether the sender may ask it (the
    /// device was removed from the sender's own name) is for the caller to
    /// check against the directory.
    pub fn remove_device_request(&self) -> Option<(DeviceId, DeviceId)> {
        match self {
            Incoming::Application { sender, data, aad }
                if aad.as_slice() == REMOVE_DEVICE_REQUEST_AAD =>
            {
                let bytes: [u8; 32] = data.as_slice().try_into().ok()?;
                Some((*sender, DeviceId::from_bytes(bytes)))
            }
            _ => None,
        }
    }
}

/// A device: its identity and its MLS state.
#[derive(Debug)]
pub struct Device {
    signer: DeviceSigner,
    store: MlsStore,
}

impl Device {
    /// The device with identity key `secret`, keeping its MLS state in
    /// `store`.
    pub fn new(secret: &SecretKey, store: MlsStore) -> Self {
        Self {
            signer: DeviceSigner::new(secret),
            store,
        }
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.signer.device_id()
    }

    /// The underlying store.
    pub fn store(&self) -> &MlsStore {
        &self.store
    }

    /// `count` fresh key packages (each an MLSMessage), for others to add
    /// this device while it is offline. Their private keys are stored.
    pub fn key_packages(
        &self,
        count: usize,
        ciphersuite: Ciphersuite,
    ) -> Result<Vec<Vec<u8>>, DeviceError> {
        (0..count)
            .map(|_| self.key_package(ciphersuite, false))
            .collect()
    }

    /// A last-resort key package (with the `last_resort` extension), handed
    /// out when the ordinary ones run out; it is not deleted when used.
    pub fn last_resort_key_package(
        &self,
        ciphersuite: Ciphersuite,
    ) -> Result<Vec<u8>, DeviceError> {
        self.key_package(ciphersuite, true)
    }

    fn key_package(
        &self,
        ciphersuite: Ciphersuite,
        last_resort: bool,
    ) -> Result<Vec<u8>, DeviceError> {
        let mut builder =
            KeyPackage::builder().leaf_node_capabilities(leaf_capabilities(ciphersuite));
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(
                ciphersuite,
                &self.store,
                &self.signer,
                self.signer.credential_with_key(),
            )
            .map_err(mls("building a key package"))?;
        serialize(
            &MlsMessageOut::from(bundle.key_package().clone()),
            "key package",
        )
    }

    /// Creates channel `id` at epoch 0 with this device as its only member.
    ///
    /// Send [`Channel::group_info`] and [`Channel::ratchet_tree`] to the
    /// homeserver so it can track the channel.
    pub fn create_channel(
        &self,
        id: ChannelId,
        settings: &ChannelSettings,
    ) -> Result<Channel<'_>, DeviceError> {
        let group_id = GroupId::from_slice(id.as_bytes());
        if MlsGroup::load(self.store.storage(), &group_id)
            .map_err(mls("loading a channel"))?
            .is_some()
        {
            return Err(DeviceError::ChannelExists(id));
        }
        let mut extension = settings.extension.clone();
        if !extension.policy.is_admin(&self.device_id()) {
            let admins = extension.policy.admins().iter().copied();
            extension.policy = crate::Policy::new(admins.chain([self.device_id()]))?;
        }
        let join = join_config();
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(settings.ciphersuite)
            .wire_format_policy(join.wire_format_policy())
            .use_ratchet_tree_extension(false)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .sender_ratchet_configuration(*join.sender_ratchet_configuration())
            .capabilities(leaf_capabilities(settings.ciphersuite))
            .with_group_context_extensions(extension.to_group_context_extensions())
            .build();
        let group = MlsGroup::new_with_group_id(
            &self.store,
            &self.signer,
            &config,
            group_id,
            self.signer.credential_with_key(),
        )
        .map_err(mls("creating a channel"))?;
        Channel::new(self, group)
    }

    /// Loads a channel this device is (or was) a member of.
    pub fn channel(&self, id: ChannelId) -> Result<Channel<'_>, DeviceError> {
        let group = MlsGroup::load(self.store.storage(), &GroupId::from_slice(id.as_bytes()))
            .map_err(mls("loading a channel"))?
            .ok_or(DeviceError::UnknownChannel(id))?;
        Channel::new(self, group)
    }

    /// Whether this device has a commit of its own pending in channel `id`
    /// ([`Channel::has_pending_commit`]), read from the store without
    /// loading the whole group: the group's ratchet tree is O(members) to
    /// decode, and callers ask this before every commit and send.
    pub fn has_pending_commit(&self, id: ChannelId) -> Result<bool, DeviceError> {
        let state: Option<MlsGroupState> = self
            .store
            .storage()
            .group_state(&GroupId::from_slice(id.as_bytes()))
            .map_err(mls("reading a channel's state"))?;
        match state {
            Some(MlsGroupState::PendingCommit(_)) => Ok(true),
            Some(MlsGroupState::Operational | MlsGroupState::Inactive) => Ok(false),
            None => Err(DeviceError::UnknownChannel(id)),
        }
    }

    /// The epoch of channel `id`, read from the store without loading the
    /// whole group (its ratchet tree and the members of every past epoch
    /// it keeps are O(members) to decode).
    pub fn epoch(&self, id: ChannelId) -> Result<u64, DeviceError> {
        let context: Option<openmls::prelude::GroupContext> = self
            .store
            .storage()
            .group_context(&GroupId::from_slice(id.as_bytes()))
            .map_err(mls("reading a channel's epoch"))?;
        context
            .map(|c| c.epoch().as_u64())
            .ok_or(DeviceError::UnknownChannel(id))
    }

    /// A channel set aside with [`Channel::detach`], taken up again without
    /// loading it from the store. Only valid if nothing changed the channel
    /// in between: the caller must not have loaded and changed the same
    /// channel meanwhile (a stale state would go on from an older epoch).
    pub fn attach(&self, detached: DetachedChannel) -> Channel<'_> {
        Channel {
            device: self,
            group: detached.group,
            id: detached.id,
        }
    }

    /// Joins a channel from a Welcome (an MLSMessage) and the ratchet tree
    /// of the epoch it welcomes to (as the homeserver serves it).
    ///
    /// Every leaf must be bound to its DeviceId, and the group must carry a
    /// valid Kith channel extension. A device that was removed from the
    /// channel and is added back replaces its old state; joining a channel
    /// the device is still active in fails.
    pub fn join(&self, welcome: &[u8], ratchet_tree: &[u8]) -> Result<Channel<'_>, DeviceError> {
        let MlsMessageBodyIn::Welcome(welcome) = parse_message(welcome, "Welcome")? else {
            return Err(DeviceError::Malformed {
                what: "Welcome",
                reason: "not a Welcome".into(),
            });
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree)
            .map_err(malformed("ratchet tree"))?;
        let builder = StagedWelcome::build_from_welcome(&self.store, &join_config(), welcome)
            .map_err(mls("joining a channel"))?;
        let group_id = builder
            .processed_welcome()
            .unverified_group_info()
            .group_id()
            .clone();
        let id = ChannelId::try_from_group_id(&group_id)?;
        // A device removed from a channel may be added back: its old,
        // inactive state is replaced. An active channel never is.
        let mut builder = builder.with_ratchet_tree(tree);
        match MlsGroup::load(self.store.storage(), &group_id).map_err(mls("loading a channel"))? {
            Some(old) if old.is_active() => return Err(DeviceError::ChannelExists(id)),
            Some(_) => builder = builder.replace_old_group(),
            None => {}
        }
        let staged = builder.build().map_err(mls("joining a channel"))?;
        ChannelExtension::from_group_context_extensions(staged.group_context().extensions())?;
        for member in staged.members() {
            crate::identity::bound_device_id(&member.credential, &member.signature_key)?;
        }
        let group = staged
            .into_group(&self.store)
            .map_err(mls("joining a channel"))?;
        Channel::new(self, group)
    }
}

pub(crate) trait GroupIdExt: Sized {
    fn try_from_group_id(id: &GroupId) -> Result<Self, DeviceError>;
}

impl GroupIdExt for ChannelId {
    fn try_from_group_id(id: &GroupId) -> Result<Self, DeviceError> {
        let bytes: [u8; 16] = id
            .as_slice()
            .try_into()
            .map_err(|_| DeviceError::Malformed {
                what: "group id",
                reason: format!("{} bytes, a ChannelId is 16", id.as_slice().len()),
            })?;
        Ok(ChannelId::from_bytes(bytes))
    }
}

/// A loaded channel set aside ([`Channel::detach`]) while its device is
/// busy elsewhere (for instance while a commit is being ordered), to be
/// taken up again with [`Device::attach`] instead of loading the whole
/// group from the store again. Everything it holds is in the store too.
#[derive(Debug)]
pub struct DetachedChannel {
    group: MlsGroup,
    id: ChannelId,
}

impl DetachedChannel {
    /// The channel id.
    pub fn id(&self) -> ChannelId {
        self.id
    }
}

/// One channel of a [`Device`]. Processing of one channel must be
/// serialised: hold one `Channel` per channel at a time.
#[derive(Debug)]
pub struct Channel<'d> {
    device: &'d Device,
    group: MlsGroup,
    id: ChannelId,
}

impl<'d> Channel<'d> {
    fn new(device: &'d Device, group: MlsGroup) -> Result<Self, DeviceError> {
        let id = ChannelId::try_from_group_id(group.group_id())?;
        Ok(Self { device, group, id })
    }

    fn store(&self) -> &'d MlsStore {
        &self.device.store
    }

    /// The channel id (= MLS group id).
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// Sets the loaded channel aside, releasing the device (see
    /// [`DetachedChannel`]).
    pub fn detach(self) -> DetachedChannel {
        DetachedChannel {
            group: self.group,
            id: self.id,
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.epoch().as_u64()
    }

    /// The epoch authenticator of the current epoch: equal for all members
    /// that agree on the group state.
    pub fn epoch_authenticator(&self) -> Vec<u8> {
        self.group.epoch_authenticator().as_slice().to_vec()
    }

    /// The channel extension of the current epoch.
    pub fn extension(&self) -> Result<ChannelExtension, ExtensionError> {
        ChannelExtension::from_group_context_extensions(self.group.extensions())
    }

    /// Whether this device is still a member (false once a commit removing
    /// it has been merged).
    pub fn is_active(&self) -> bool {
        self.group.is_active()
    }

    /// Whether a commit of this device is waiting to be merged or cleared.
    pub fn has_pending_commit(&self) -> bool {
        self.group.pending_commit().is_some()
    }

    /// The members' DeviceIds, in leaf order.
    pub fn members(&self) -> Vec<DeviceId> {
        self.group
            .members()
            .filter_map(|m| credential_device_id(&m.credential).ok())
            .collect()
    }

    /// The ratchet tree of the current epoch.
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, DeviceError> {
        serialize(&self.group.export_ratchet_tree(), "ratchet tree")
    }

    /// A GroupInfo (MLSMessage) for the current epoch, signed by this
    /// device, with `external_pub` and without the ratchet tree.
    pub fn group_info(&self) -> Result<Vec<u8>, DeviceError> {
        let info = self
            .group
            .export_group_info(self.store().crypto(), &self.device.signer, false)
            .map_err(mls("exporting the group info"))?;
        serialize(&info, "group info")
    }

    fn leaf_of(&self, device: &DeviceId) -> Option<LeafNodeIndex> {
        self.group
            .members()
            .find(|m| credential_device_id(&m.credential).ok().as_ref() == Some(device))
            .map(|m| m.index)
    }

    /// Adds devices from their key packages (MLSMessages). Every key package
    /// must verify and be bound to its DeviceId, and this device must be an
    /// admin. The commit stays pending.
    pub fn add(&mut self, key_packages: &[impl AsRef<[u8]>]) -> Result<CommitOutput, DeviceError> {
        let mut verified = Vec::with_capacity(key_packages.len());
        for bytes in key_packages {
            let MlsMessageBodyIn::KeyPackage(kp) = parse_message(bytes.as_ref(), "key package")?
            else {
                return Err(DeviceError::Malformed {
                    what: "key package",
                    reason: "not a KeyPackage".into(),
                });
            };
            let kp: KeyPackage =
                KeyPackageIn::validate(kp, self.store().crypto(), ProtocolVersion::Mls10)
                    .map_err(mls("validating a key package"))?;
            leaf_device_id(kp.leaf_node())?;
            verified.push(kp);
        }
        let extension = self.extension()?;
        if !extension.policy.is_admin(&self.device.device_id()) {
            return Err(PolicyError::NotAdmin {
                device: self.device.device_id(),
                action: "add members",
            }
            .into());
        }
        let store = self.store();
        let bundle = batched(
            "adding members",
            store.batch(|| {
                self.group
                    .commit_builder()
                    .consume_proposal_store(false)
                    .propose_adds(verified)
                    .load_psks(store.storage())
                    .map_err(mls("adding members"))?
                    .create_group_info(true)
                    .build(store.rand(), store.crypto(), &self.device.signer, |_| true)
                    .map_err(mls("adding members"))?
                    .stage_commit(store)
                    .map_err(mls("adding members"))
            }),
        )?;
        self.finish_commit(bundle)
    }

    /// Removes devices. Removing others needs an admin; a device can always
    /// propose its own removal with [`Channel::leave`] instead. The commit
    /// stays pending.
    pub fn remove(&mut self, devices: &[DeviceId]) -> Result<CommitOutput, DeviceError> {
        let leaves = devices
            .iter()
            .map(|d| self.leaf_of(d).ok_or(DeviceError::NotAMember(*d)))
            .collect::<Result<Vec<_>, _>>()?;
        let store = self.store();
        let bundle = batched(
            "removing members",
            store.batch(|| {
                self.group
                    .commit_builder()
                    .consume_proposal_store(false)
                    .propose_removals(leaves)
                    .load_psks(store.storage())
                    .map_err(mls("removing members"))?
                    .create_group_info(true)
                    .build(store.rand(), store.crypto(), &self.device.signer, |_| true)
                    .map_err(mls("removing members"))?
                    .stage_commit(store)
                    .map_err(mls("removing members"))
            }),
        )?;
        self.finish_commit(bundle)
    }

    /// Refreshes this device's leaf (new encryption keys, same identity).
    /// The commit stays pending.
    pub fn self_update(&mut self) -> Result<CommitOutput, DeviceError> {
        let store = self.store();
        let bundle = batched(
            "updating the own leaf",
            store.batch(|| {
                self.group
                    .commit_builder()
                    .consume_proposal_store(false)
                    .leaf_node_parameters(LeafNodeParameters::default())
                    .force_self_update(true)
                    .load_psks(store.storage())
                    .map_err(mls("updating the own leaf"))?
                    .create_group_info(true)
                    .build(store.rand(), store.crypto(), &self.device.signer, |_| true)
                    .map_err(mls("updating the own leaf"))?
                    .stage_commit(store)
                    .map_err(mls("updating the own leaf"))
            }),
        )?;
        self.finish_commit(bundle)
    }

    /// Commits every stored proposal (for instance members' requests to
    /// leave). The commit stays pending.
    pub fn commit_pending_proposals(&mut self) -> Result<CommitOutput, DeviceError> {
        let store = self.store();
        let bundle = batched(
            "committing proposals",
            store.batch(|| {
                self.group
                    .commit_builder()
                    .consume_proposal_store(true)
                    .load_psks(store.storage())
                    .map_err(mls("committing proposals"))?
                    .create_group_info(true)
                    .build(store.rand(), store.crypto(), &self.device.signer, |_| true)
                    .map_err(mls("committing proposals"))?
                    .stage_commit(store)
                    .map_err(mls("committing proposals"))
            }),
        )?;
        self.finish_commit(bundle)
    }

    /// A proposal (PublicMessage) to remove this device, for another member
    /// to commit.
    pub fn leave(&mut self) -> Result<Vec<u8>, DeviceError> {
        let message = self
            .group
            .leave_group(self.store(), &self.device.signer)
            .map_err(mls("leaving"))?;
        serialize(&message, "proposal")
    }

    fn finish_commit(
        &mut self,
        bundle: openmls::prelude::CommitMessageBundle,
    ) -> Result<CommitOutput, DeviceError> {
        let (commit, welcome, group_info) = bundle.into_messages();
        let commit = serialize(&commit, "commit")?;
        let welcome = welcome.map(|w| serialize(&w, "welcome")).transpose()?;
        let group_info =
            group_info.ok_or_else(|| DeviceError::Internal("OpenMLS made no GroupInfo".into()))?;
        let group_info = serialize(&group_info, "group info")?;
        let result = (|| {
            let pending = self
                .group
                .pending_commit()
                .ok_or_else(|| DeviceError::Internal("no pending commit after staging".into()))?;
            let tree = pending
                .export_ratchet_tree(self.store().crypto(), self.group.export_ratchet_tree())
                .map_err(mls("exporting the ratchet tree"))?
                .ok_or_else(|| {
                    DeviceError::Internal("pending commit has no ratchet tree".into())
                })?;
            let extension = self.extension()?;
            let info = check_commit(
                self.group.public_group(),
                &extension,
                &Sender::Member(self.group.own_leaf_index()),
                pending,
                &commit,
            )?;
            Ok(CommitOutput {
                commit,
                welcome,
                group_info,
                ratchet_tree: serialize(&tree, "ratchet tree")?,
                info,
            })
        })();
        if result.is_err() {
            // Never leave a commit pending that Kith would not send.
            self.clear_pending()?;
        }
        result
    }

    /// Merges this device's pending commit (after its ordering certificate
    /// checked). The channel moves to the next epoch.
    pub fn merge_pending(&mut self) -> Result<(), DeviceError> {
        let store = self.store();
        store
            .batch(|| self.group.merge_pending_commit(store))
            .map_err(mls("merging the pending commit"))
    }

    /// Drops this device's pending commit (another commit won the epoch).
    pub fn clear_pending(&mut self) -> Result<(), DeviceError> {
        self.group
            .clear_pending_commit(self.store().storage())
            .map_err(mls("clearing the pending commit"))
    }

    /// Encrypts application data as a PrivateMessage (an MLSMessage). The
    /// payload is exactly `data`: Kith adds no framing.
    pub fn encrypt(&mut self, data: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.encrypt_with_aad(data, &[])
    }

    /// Encrypts application data with MLS `authenticated_data` `aad`
    /// (sent in the clear, authenticated by the signature and the AEAD).
    /// Kith uses it only for control messages such as
    /// [`Channel::leave_request`].
    pub fn encrypt_with_aad(&mut self, data: &[u8], aad: &[u8]) -> Result<Vec<u8>, DeviceError> {
        self.group.set_aad(aad.to_vec());
        let message = self
            .group
            .create_message(self.store(), &self.device.signer, data);
        // OpenMLS clears the AAD only when it made a message: never let it
        // stick to the next one.
        self.group.set_aad(Vec::new());
        serialize(&message.map_err(mls("encrypting"))?, "application message")
    }

    /// A leave request (spec §9.5): an application message with an empty
    /// payload and `authenticated_data` [`LEAVE_REQUEST_AAD`], which asks
    /// the channel's admins to commit this device's removal (MLS forbids a
    /// member to commit its own).
    pub fn leave_request(&mut self) -> Result<Vec<u8>, DeviceError> {
        self.encrypt_with_aad(&[], LEAVE_REQUEST_AAD)
    }

    /// Processes an incoming MLSMessage of this channel.
    ///
    /// Commits are checked against the channel policy and the leaf binding
    /// rule and returned staged, not merged. Proposals are checked and
    /// stored. Handshakes must be PublicMessages.
    pub fn process(&mut self, message: &[u8]) -> Result<Incoming, DeviceError> {
        let protocol: ProtocolMessage = match parse_message(message, "MLS message")? {
            MlsMessageBodyIn::PublicMessage(m) => m.into(),
            MlsMessageBodyIn::PrivateMessage(m) => m.into(),
            _ => {
                return Err(DeviceError::Malformed {
                    what: "MLS message",
                    reason: "not a PublicMessage or PrivateMessage".into(),
                });
            }
        };
        if protocol.group_id().as_slice() != self.id.as_bytes() {
            return Err(DeviceError::WrongChannel);
        }
        let store = self.store();
        let processed = self
            .group
            .process_message(store, protocol)
            .map_err(mls("processing a message"))?;
        let sender = processed.sender().clone();
        let credential = processed.credential().clone();
        let aad = processed.aad().to_vec();
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => Ok(Incoming::Application {
                sender: credential_device_id(&credential)?,
                data: app.into_bytes(),
                aad,
            }),
            ProcessedMessageContent::StagedCommitMessage(staged) => {
                let extension = self.extension()?;
                let info = check_commit(
                    self.group.public_group(),
                    &extension,
                    &sender,
                    &staged,
                    message,
                )?;
                Ok(Incoming::Commit(StagedChannelCommit { staged, info }))
            }
            ProcessedMessageContent::ProposalMessage(queued) => {
                let extension = self.extension()?;
                let from = match &sender {
                    Sender::Member(i) => self
                        .group
                        .public_group()
                        .leaf(*i)
                        .map(leaf_device_id)
                        .transpose()?
                        .ok_or(PolicyError::UnknownLeaf(i.u32()))?,
                    _ => return Err(PolicyError::NotAMember.into()),
                };
                check_proposal(
                    self.group.public_group(),
                    &extension,
                    &sender,
                    queued.proposal(),
                    &mut Vec::new(),
                    &mut Vec::new(),
                )?;
                self.group
                    .store_pending_proposal(store.storage(), *queued)
                    .map_err(mls("storing a proposal"))?;
                Ok(Incoming::Proposal { sender: from })
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {
                Err(PolicyError::NotAMember.into())
            }
            ProcessedMessageContent::OwnPendingCommit => Ok(Incoming::OwnCommit),
            ProcessedMessageContent::OwnPrivateMessage => Ok(Incoming::OwnApplication),
            // Variants that only exist with OpenMLS draft features.
            #[allow(unreachable_patterns)]
            _ => Err(DeviceError::Malformed {
                what: "MLS message",
                reason: "unexpected content".into(),
            }),
        }
    }

    /// Merges a staged incoming commit (after its ordering certificate
    /// checked). A pending commit of this device for the same epoch is
    /// dropped.
    pub fn merge_staged(&mut self, commit: StagedChannelCommit) -> Result<(), DeviceError> {
        if commit.info.epoch != self.epoch() {
            return Err(DeviceError::WrongEpoch {
                current: self.epoch(),
                got: commit.info.epoch,
            });
        }
        let store = self.store();
        store
            .batch(|| self.group.merge_staged_commit(store, *commit.staged))
            .map_err(mls("merging a staged commit"))
    }
}
