//! The Kith rules every commit must pass, on clients and servers alike:
//! the channel [`Policy`](crate::Policy) and the binding of every new leaf
//! to its DeviceId.

use kith_proto::DeviceId;
use openmls::prelude::{LeafNodeIndex, Proposal, PublicGroup, Sender, StagedCommit};

use crate::extension::{ChannelExtension, ExtensionError};
use crate::identity::{BindingError, leaf_device_id};

/// Why a commit or proposal breaks Kith's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The sender is not a member of the group (an external sender, an
    /// external join or an external commit, none of which v0 allows).
    #[error("sender is not a member of the channel")]
    NotAMember,
    /// A proposal names a leaf that is empty.
    #[error("no member at leaf {0}")]
    UnknownLeaf(u32),
    /// A member tried something only an admin may do.
    #[error("device {device} is not an admin and may not {action}")]
    NotAdmin {
        /// Who tried.
        device: DeviceId,
        /// What it tried.
        action: &'static str,
    },
    /// A new or existing leaf's credential does not match its key.
    #[error("leaf credential does not match its key: {0}")]
    Binding(#[from] BindingError),
    /// A member's new leaf names a different device than its old one.
    #[error("device {old} tried to replace its leaf with one for device {new}")]
    IdentityChanged {
        /// The device of the old leaf.
        old: DeviceId,
        /// The device the new leaf names.
        new: DeviceId,
    },
    /// A proposal type Kith v0 does not allow.
    #[error("{0} proposals are not allowed in Kith v0")]
    Unsupported(&'static str),
    /// A GroupContextExtensions proposal would leave no valid channel
    /// extension.
    #[error("new group context is invalid: {0}")]
    Extension(#[from] ExtensionError),
}

/// What a commit does, once it has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// The epoch the commit applies to (the group moves to `epoch + 1`).
    pub epoch: u64,
    /// The commit's message id (`kith_proto::sign::message_id`).
    pub commit_hash: [u8; 32],
    /// The committer.
    pub sender: DeviceId,
    /// Devices the commit adds.
    pub added: Vec<DeviceId>,
    /// Devices the commit removes.
    pub removed: Vec<DeviceId>,
    /// Whether the commit changes the channel extension.
    pub changes_extension: bool,
}

/// The message id of an MLS message (`kith_proto::sign::message_id`): the
/// hash an ordering vote names.
pub fn commit_hash(message: &[u8]) -> [u8; 32] {
    kith_proto::sign::message_id(message)
}

fn member(group: &PublicGroup, index: LeafNodeIndex) -> Result<DeviceId, PolicyError> {
    let leaf = group
        .leaf(index)
        .ok_or(PolicyError::UnknownLeaf(index.u32()))?;
    Ok(leaf_device_id(leaf)?)
}

fn sender_device(group: &PublicGroup, sender: &Sender) -> Result<DeviceId, PolicyError> {
    match sender {
        Sender::Member(index) => member(group, *index),
        _ => Err(PolicyError::NotAMember),
    }
}

fn require_admin(
    extension: &ChannelExtension,
    device: DeviceId,
    action: &'static str,
) -> Result<(), PolicyError> {
    if extension.policy.is_admin(&device) {
        Ok(())
    } else {
        Err(PolicyError::NotAdmin { device, action })
    }
}

/// Checks one proposal from `sender` against the policy of `extension`,
/// recording what it adds and removes.
pub(crate) fn check_proposal(
    group: &PublicGroup,
    extension: &ChannelExtension,
    sender: &Sender,
    proposal: &Proposal,
    added: &mut Vec<DeviceId>,
    removed: &mut Vec<DeviceId>,
) -> Result<bool, PolicyError> {
    let from = sender_device(group, sender)?;
    match proposal {
        Proposal::Add(add) => {
            require_admin(extension, from, "add members")?;
            added.push(leaf_device_id(add.key_package().leaf_node())?);
        }
        Proposal::Remove(remove) => {
            let target = member(group, remove.removed())?;
            if target != from {
                require_admin(extension, from, "remove other members")?;
            }
            removed.push(target);
        }
        Proposal::SelfRemove => removed.push(from),
        Proposal::Update(update) => {
            let new = leaf_device_id(update.leaf_node())?;
            if new != from {
                return Err(PolicyError::IdentityChanged { old: from, new });
            }
        }
        Proposal::GroupContextExtensions(gce) => {
            require_admin(extension, from, "change the channel settings")?;
            ChannelExtension::from_group_context_extensions(gce.extensions())?;
            return Ok(true);
        }
        Proposal::PreSharedKey(_) => return Err(PolicyError::Unsupported("PreSharedKey")),
        Proposal::ReInit(_) => return Err(PolicyError::Unsupported("ReInit")),
        Proposal::ExternalInit(_) => return Err(PolicyError::Unsupported("ExternalInit")),
        Proposal::Custom(_) => return Err(PolicyError::Unsupported("custom")),
    }
    Ok(false)
}

/// Checks a staged commit of `group` (at the epoch before the commit)
/// against the channel's policy and the leaf binding rule.
pub(crate) fn check_commit(
    group: &PublicGroup,
    extension: &ChannelExtension,
    committer: &Sender,
    staged: &StagedCommit,
    commit_bytes: &[u8],
) -> Result<CommitInfo, PolicyError> {
    let sender = sender_device(group, committer)?;
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut changes_extension = false;
    for queued in staged.queued_proposals() {
        changes_extension |= check_proposal(
            group,
            extension,
            queued.sender(),
            queued.proposal(),
            &mut added,
            &mut removed,
        )?;
    }
    if let Some(leaf) = staged.update_path_leaf_node() {
        let new = leaf_device_id(leaf)?;
        if new != sender {
            return Err(PolicyError::IdentityChanged { old: sender, new });
        }
    }
    Ok(CommitInfo {
        epoch: group.group_context().epoch().as_u64(),
        commit_hash: commit_hash(commit_bytes),
        sender,
        added,
        removed,
        changes_extension,
    })
}
