//! The server side: the public state of a channel, as a homeserver of its
//! ordering group tracks it (OpenMLS `PublicGroup`).
//!
//! A server sees handshakes in the clear (they are PublicMessages), so it
//! can check every commit before the ordering group accepts it:
//! [`PublicChannel::validate_commit`] checks the epoch, the signature and
//! membership (through OpenMLS), the channel policy, and that every new leaf
//! is bound to its DeviceId. [`PublicChannel::apply`] then merges it.

use kith_proto::{ChannelId, DeviceId};
use openmls::ciphersuite::hash_ref::ProposalRef;
use openmls::messages::group_info::VerifiableGroupInfo;
use openmls::prelude::{
    ContentType, GroupId, LeafNodeIndex, MlsMessageBodyIn, MlsMessageIn, ProcessedMessageContent,
    ProposalStore, ProtocolMessage, PublicGroup, RatchetTreeIn, Sender, StagedCommit,
    Verifiable as _,
};
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::StorageProvider as _;
use tls_codec::Deserialize as _;

use crate::DeviceError;
use crate::check::{CommitInfo, PolicyError, check_commit, check_proposal};
use crate::device::{GroupIdExt, MAX_MESSAGE_LEN, serialize};
use crate::extension::{ChannelExtension, ExtensionError};
use crate::identity::{BindingError, credential_device_id, leaf_device_id};
use crate::storage::MlsStore;

/// Why a server refused a channel, commit or proposal.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The bytes are not the MLS object expected.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was expected.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Handshakes must be PublicMessages; this is not one.
    #[error("handshake messages must be PublicMessages")]
    NotPublic,
    /// A commit was expected and this is something else.
    #[error("not a commit")]
    NotACommit,
    /// A proposal was expected and this is something else.
    #[error("not a proposal")]
    NotAProposal,
    /// The message belongs to another channel.
    #[error("message is for another channel")]
    WrongChannel,
    /// The commit is not for the channel's current epoch: another commit won
    /// that epoch, or the sender is behind.
    #[error("wrong epoch: current = {current}, commit is for {got}")]
    WrongEpoch {
        /// The channel's current epoch.
        current: u64,
        /// The epoch the commit was made for.
        got: u64,
    },
    /// A GroupInfo does not describe the channel's current epoch (or its
    /// signature does not verify).
    #[error("the GroupInfo does not match the channel's current state: {0}")]
    GroupInfoMismatch(String),
    /// A channel with this id is already tracked.
    #[error("channel {0} already exists")]
    ChannelExists(ChannelId),
    /// A leaf is not bound to its DeviceId.
    #[error(transparent)]
    Binding(#[from] BindingError),
    /// The commit or proposal breaks the channel policy.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The channel extension is missing or invalid.
    #[error(transparent)]
    Extension(#[from] ExtensionError),
    /// OpenMLS refused the message or state (bad signature, bad tree,
    /// storage failure...).
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
) -> impl FnOnce(E) -> ServerError {
    move |e| ServerError::Mls {
        operation,
        source: Box::new(e),
    }
}

impl From<DeviceError> for ServerError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::Malformed { what, reason } => ServerError::Malformed { what, reason },
            DeviceError::Binding(e) => ServerError::Binding(e),
            DeviceError::Policy(e) => ServerError::Policy(e),
            DeviceError::Extension(e) => ServerError::Extension(e),
            other => ServerError::Mls {
                operation: "encoding",
                source: Box::new(other),
            },
        }
    }
}

fn parse_handshake(bytes: &[u8]) -> Result<ProtocolMessage, ServerError> {
    if bytes.len() > MAX_MESSAGE_LEN {
        return Err(ServerError::Malformed {
            what: "MLS message",
            reason: format!("{} bytes, the limit is {MAX_MESSAGE_LEN}", bytes.len()),
        });
    }
    let message =
        MlsMessageIn::tls_deserialize_exact(bytes).map_err(|e| ServerError::Malformed {
            what: "MLS message",
            reason: e.to_string(),
        })?;
    match message.extract() {
        MlsMessageBodyIn::PublicMessage(m) => Ok(m.into()),
        MlsMessageBodyIn::PrivateMessage(_) => Err(ServerError::NotPublic),
        _ => Err(ServerError::Malformed {
            what: "MLS message",
            reason: "not a PublicMessage".into(),
        }),
    }
}

/// A commit that passed [`PublicChannel::validate_commit`], ready to
/// [`PublicChannel::apply`].
#[derive(Debug)]
pub struct ValidatedCommit {
    staged: Box<StagedCommit>,
    info: CommitInfo,
}

impl ValidatedCommit {
    /// What the commit does: the epoch it applies to, its hash, its sender,
    /// the devices it adds and removes.
    pub fn info(&self) -> &CommitInfo {
        &self.info
    }
}

/// The public state of one channel, kept in an [`MlsStore`].
#[derive(Debug)]
pub struct PublicChannel<'s> {
    store: &'s MlsStore,
    group: PublicGroup,
    id: ChannelId,
    extension: ChannelExtension,
}

impl<'s> PublicChannel<'s> {
    /// Starts tracking a channel from a GroupInfo (an MLSMessage, as
    /// [`crate::Channel::group_info`] makes) and the matching ratchet tree.
    ///
    /// Checks the GroupInfo's signature against the tree, the tree itself,
    /// the channel extension and that every leaf is bound to its DeviceId.
    pub fn create(
        store: &'s MlsStore,
        group_info: &[u8],
        ratchet_tree: &[u8],
    ) -> Result<Self, ServerError> {
        if group_info.len() > MAX_MESSAGE_LEN || ratchet_tree.len() > MAX_MESSAGE_LEN {
            return Err(ServerError::Malformed {
                what: "channel creation",
                reason: "over the size limit".into(),
            });
        }
        let MlsMessageBodyIn::GroupInfo(info) = MlsMessageIn::tls_deserialize_exact(group_info)
            .map_err(|e| ServerError::Malformed {
                what: "GroupInfo",
                reason: e.to_string(),
            })?
            .extract()
        else {
            return Err(ServerError::Malformed {
                what: "GroupInfo",
                reason: "not a GroupInfo".into(),
            });
        };
        let tree = RatchetTreeIn::tls_deserialize_exact(ratchet_tree).map_err(|e| {
            ServerError::Malformed {
                what: "ratchet tree",
                reason: e.to_string(),
            }
        })?;
        let id = ChannelId::try_from_group_id(info.group_id())?;
        if Self::load(store, id)?.is_some() {
            return Err(ServerError::ChannelExists(id));
        }
        let (group, _) = PublicGroup::from_external(
            store.crypto(),
            store.storage(),
            tree,
            info,
            ProposalStore::new(),
        )
        .map_err(mls("creating the public channel"))?;
        let checked = (|| {
            let extension = ChannelExtension::from_group_context_extensions(
                group.group_context().extensions(),
            )?;
            for member in group.members() {
                crate::identity::bound_device_id(&member.credential, &member.signature_key)?;
            }
            Ok::<_, ServerError>(extension)
        })();
        match checked {
            Ok(extension) => Ok(Self {
                store,
                group,
                id,
                extension,
            }),
            Err(e) => {
                PublicGroup::delete(store.storage(), group.group_id())
                    .map_err(mls("discarding a refused channel"))?;
                Err(e)
            }
        }
    }

    /// Loads a tracked channel, if the store has it.
    pub fn load(store: &'s MlsStore, id: ChannelId) -> Result<Option<Self>, ServerError> {
        let Some(group) = PublicGroup::load(store.storage(), &GroupId::from_slice(id.as_bytes()))
            .map_err(mls("loading the public channel"))?
        else {
            return Ok(None);
        };
        let extension =
            ChannelExtension::from_group_context_extensions(group.group_context().extensions())?;
        Ok(Some(Self {
            store,
            group,
            id,
            extension,
        }))
    }

    /// Stops tracking a channel: its state is deleted from the store (in
    /// one transaction when called inside [`MlsStore::batch`]). For a
    /// server whose MLS state got ahead of its own record of the channel,
    /// before it re-creates the state from that record with
    /// [`PublicChannel::create`].
    pub fn forget(store: &MlsStore, id: ChannelId) -> Result<(), ServerError> {
        let group_id = GroupId::from_slice(id.as_bytes());
        PublicGroup::delete(store.storage(), &group_id).map_err(mls("forgetting the channel"))?;
        store
            .storage()
            .clear_proposal_queue::<GroupId, ProposalRef>(&group_id)
            .map_err(mls("forgetting the channel's proposals"))
    }

    /// The channel id.
    pub fn id(&self) -> ChannelId {
        self.id
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.group.group_context().epoch().as_u64()
    }

    /// The channel extension of the current epoch.
    pub fn extension(&self) -> &ChannelExtension {
        &self.extension
    }

    /// The members' DeviceIds, in leaf order.
    pub fn members(&self) -> Vec<DeviceId> {
        self.group
            .members()
            .filter_map(|m| credential_device_id(&m.credential).ok())
            .collect()
    }

    /// The ratchet tree of the current epoch (RFC 9420 `RatchetTree`), as
    /// joiners need it.
    pub fn ratchet_tree(&self) -> Result<Vec<u8>, ServerError> {
        Ok(serialize(
            &self.group.export_ratchet_tree(),
            "ratchet tree",
        )?)
    }

    /// Checks that a GroupInfo (an MLSMessage, as [`crate::CommitOutput`]
    /// carries) describes the current epoch: signed by the member it names,
    /// over the current group context, tree and confirmation tag. A server
    /// checks the GroupInfo that came with a commit after applying it, before
    /// serving it to joiners. (A `PublicGroup` cannot sign, so servers
    /// store the GroupInfos members make.)
    pub fn check_group_info(&self, group_info: &[u8]) -> Result<(), ServerError> {
        if group_info.len() > MAX_MESSAGE_LEN {
            return Err(ServerError::Malformed {
                what: "GroupInfo",
                reason: "over the size limit".into(),
            });
        }
        let MlsMessageBodyIn::GroupInfo(info) = MlsMessageIn::tls_deserialize_exact(group_info)
            .map_err(|e| ServerError::Malformed {
                what: "GroupInfo",
                reason: e.to_string(),
            })?
            .extract()
        else {
            return Err(ServerError::Malformed {
                what: "GroupInfo",
                reason: "not a GroupInfo".into(),
            });
        };
        if info.group_id() != self.group.group_id() {
            return Err(ServerError::WrongChannel);
        }
        // The check OpenMLS makes when it builds a group from a GroupInfo
        // (`PublicGroup::from_external`: the signature under the key of the
        // leaf it names, the tree hash in its context, MLS 1.0), against
        // what this server computed itself: its tree is already valid and
        // its group context already holds that tree's hash, so comparing
        // the whole context and the confirmation tag, and verifying the one
        // signature, is the same guarantee without rebuilding the tree
        // (which verified every leaf again: O(members), most of a large
        // add's server time).
        //
        // `signer` is the last field of the signed `GroupInfoTBS` (RFC 9420
        // §12.4.3); OpenMLS keeps its getter crate-private, so it is read
        // from the encoding, and the equality below checks that reading.
        let signer = info
            .unsigned_payload()
            .ok()
            .and_then(|tbs| {
                let last: [u8; 4] = tbs.get(tbs.len().checked_sub(4)?..)?.try_into().ok()?;
                Some(LeafNodeIndex::new(u32::from_be_bytes(last)))
            })
            .ok_or_else(|| ServerError::GroupInfoMismatch("unreadable signer".into()))?;
        if info.group_context() != self.group.group_context() {
            return Err(ServerError::GroupInfoMismatch(
                "different group context".into(),
            ));
        }
        let expected = VerifiableGroupInfo::new(
            self.group.group_context().clone(),
            info.extensions().clone(),
            self.group.confirmation_tag().clone(),
            signer,
            info.signature().clone(),
        );
        if expected != info {
            return Err(ServerError::GroupInfoMismatch(
                "different confirmation tag".into(),
            ));
        }
        let key = self
            .group
            .leaf(signer)
            .ok_or_else(|| {
                ServerError::GroupInfoMismatch(format!("no member at the signer's leaf {signer}"))
            })?
            .signature_key()
            .clone()
            .into_signature_public_key_enriched(
                self.group
                    .group_context()
                    .ciphersuite()
                    .signature_algorithm(),
            );
        info.verify_no_out(self.store.crypto(), &key)
            .map_err(|_| ServerError::GroupInfoMismatch("bad signature".into()))
    }

    /// Parses a handshake and checks that it is for this channel, of the
    /// expected kind (else `wrong_kind`), and for the current epoch.
    fn current_handshake(
        &self,
        bytes: &[u8],
        kind: ContentType,
        wrong_kind: ServerError,
    ) -> Result<ProtocolMessage, ServerError> {
        let message = parse_handshake(bytes)?;
        if message.group_id().as_slice() != self.id.as_bytes() {
            return Err(ServerError::WrongChannel);
        }
        if message.content_type() != kind {
            return Err(wrong_kind);
        }
        let got = message.epoch().as_u64();
        if got != self.epoch() {
            return Err(ServerError::WrongEpoch {
                current: self.epoch(),
                got,
            });
        }
        Ok(message)
    }

    /// Checks a commit (an MLSMessage) against the current state: it must be
    /// a PublicMessage for this channel and this epoch, verify under a
    /// member's key, follow the channel policy, and bind every new leaf to
    /// its DeviceId. Nothing is changed; [`Self::apply`] merges it.
    pub fn validate_commit(&self, commit: &[u8]) -> Result<ValidatedCommit, ServerError> {
        let message =
            self.current_handshake(commit, ContentType::Commit, ServerError::NotACommit)?;
        let processed = self
            .group
            .process_message(self.store.crypto(), message)
            .map_err(mls("validating a commit"))?;
        let sender = processed.sender().clone();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            return Err(ServerError::NotACommit);
        };
        let info = check_commit(&self.group, &self.extension, &sender, &staged, commit)?;
        Ok(ValidatedCommit { staged, info })
    }

    /// Merges a validated commit; the channel moves to the next epoch.
    ///
    /// Refuses a commit validated for another epoch (say, the loser of a
    /// race that was validated before the winner was applied).
    pub fn apply(&mut self, commit: ValidatedCommit) -> Result<CommitInfo, ServerError> {
        if commit.info.epoch != self.epoch() {
            return Err(ServerError::WrongEpoch {
                current: self.epoch(),
                got: commit.info.epoch,
            });
        }
        let extension = ChannelExtension::from_group_context_extensions(
            commit.staged.group_context().extensions(),
        )?;
        let store = self.store;
        store
            .batch(|| self.group.merge_commit(store.storage(), *commit.staged))
            .map_err(mls("applying a commit"))?;
        self.extension = extension;
        Ok(commit.info)
    }

    /// Checks a standalone proposal (an MLSMessage) against the policy and
    /// stores it, so that commits may include it by reference. Returns the
    /// proposing device.
    pub fn add_proposal(&mut self, proposal: &[u8]) -> Result<DeviceId, ServerError> {
        let message =
            self.current_handshake(proposal, ContentType::Proposal, ServerError::NotAProposal)?;
        let processed = self
            .group
            .process_message(self.store.crypto(), message)
            .map_err(mls("validating a proposal"))?;
        let sender = processed.sender().clone();
        let ProcessedMessageContent::ProposalMessage(queued) = processed.into_content() else {
            return Err(ServerError::NotAProposal);
        };
        check_proposal(
            &self.group,
            &self.extension,
            &sender,
            queued.proposal(),
            &mut Vec::new(),
            &mut Vec::new(),
        )?;
        let Sender::Member(index) = sender else {
            return Err(PolicyError::NotAMember.into());
        };
        let from = self
            .group
            .leaf(index)
            .map(leaf_device_id)
            .transpose()?
            .ok_or(PolicyError::UnknownLeaf(index.u32()))?;
        self.group
            .add_proposal(self.store.storage(), *queued)
            .map_err(mls("storing a proposal"))?;
        Ok(from)
    }
}
