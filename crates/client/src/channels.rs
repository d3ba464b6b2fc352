//! Channels: creating them, adding and removing members, sending, and
//! processing what arrives — commits only with a valid ordering certificate,
//! messages of a future epoch buffered until the device gets there.
//!
//! Everything that changes one channel's MLS state runs through `&mut
//! Client`, so processing of a channel is serialised.

use kith_mls::{
    ChannelExtension, ChannelName, ChannelSettings, CommitOutput, ContentType, Incoming, Policy,
};
use kith_order::{OrderingCertificateIn, VoterSet};
use kith_proto::events::{CompactMessage, EventFrame, MessageEvent};
use kith_proto::inbox::InboxKind;
use kith_proto::{ChannelId, DeviceId, DeviceRecord, DeviceRecordIn, Handle};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::api::{Accepted, CommitBundle, unb64};
use crate::requests::Honored;
use crate::store::{ChannelRow, FutureMessage, Kept, MessageRow, Requests};
use crate::voters::Gathered;
use crate::{Client, ClientError, now_ms};

/// How often a commit is retried when other commits keep winning its epoch.
pub const MAX_COMMIT_ATTEMPTS: usize = 8;

/// How often a message is encrypted again when the channel keeps moving to
/// a new epoch before it is accepted.
pub const MAX_SEND_ATTEMPTS: usize = 8;

/// A device that commits without reading its events (its own commits are
/// merged from the server's answer) reads them at least once every this
/// many of its own commits: messages queued for it must be decrypted before
/// it moves more than `kith_mls::MAX_PAST_EPOCHS` epochs past theirs (spec
/// §11.3).
pub const SYNC_EVERY_COMMITS: usize = kith_mls::MAX_PAST_EPOCHS / 2;

/// The most messages [`Client::send_many`] sends in one request (a
/// multi-message send, spec §6.7): the servers' default limit. The server
/// stores them in the request's order, so each member's receiving ratchet
/// meets them in the order they were encrypted, and the ratchet's
/// out-of-order tolerance (16, spec §9.7) does not bound the batch.
pub const MAX_BATCH: usize = kith_proto::batch::MAX_BATCH_MESSAGES;

/// The most payload bytes [`Client::send_many`] puts in one request: half
/// the servers' default request body limit (1 MiB, spec §6.9), leaving
/// room for each message's MLS overhead and framing. A larger payload goes
/// alone.
pub const BATCH_PAYLOAD_BYTES: usize = 512 * 1024;

/// How many processed events a device gathers before it acknowledges them
/// to its homeserver (spec §6.8). Its own cursor is stored with every page
/// it processes, so it never reads an event twice; an acknowledgement only
/// lets the server delete what was read, and is a durable server write: one
/// per fetched page cost the server a disk sync per page. Up to this many
/// events stay on the server until more arrive.
pub const ACK_EVERY_EVENTS: usize = 64;

/// What one sync did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Channels joined through Welcomes in the inbox.
    pub joined: Vec<ChannelId>,
    /// Channel messages decrypted and stored.
    pub messages: usize,
    /// Commits merged.
    pub commits: usize,
    /// Direct messages received.
    pub direct: Vec<crate::DirectMessage>,
    /// Typing notifications in chat channels: reported here, never stored.
    pub typing: Vec<crate::chat::TypingEvent>,
    /// Members this (admin) device removed because they asked to leave.
    pub removed_on_request: Vec<(ChannelId, DeviceId)>,
    /// This user's linked devices that this (admin) device added to channels.
    pub linked_added: Vec<(ChannelId, DeviceId)>,
    /// Devices removed from their user's name (spec §6.4) that this device
    /// removed from channels: its own user's, or (as an admin) on a
    /// remove-device request.
    pub removed_devices: Vec<(ChannelId, DeviceId)>,
    /// Removed devices of this user that this (non-admin) device asked a
    /// channel's admins to remove, by a remove-device request (§9.5).
    pub removal_requested: Vec<(ChannelId, DeviceId)>,
    /// Work this sync could not do because another server failed (a
    /// directory through it, or the channel's ordering group), kept and
    /// tried again after a back-off (§9.5).
    pub kept: Vec<crate::requests::KeptWork>,
    /// Payloads of the last batch of a [`crate::Sender`] dropped without
    /// [`crate::Sender::finish`] that the server did not acknowledge
    /// (refused, or of unknown fate when the homeserver could not be
    /// reached), each with its channel, in order: for the caller to send
    /// again. (One it accepted is stored like any sent message.)
    pub unacknowledged: Vec<(ChannelId, Vec<u8>)>,
}

/// What [`Client::leave`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaveOutcome {
    /// Whether a leave request went out (false when the device was no
    /// longer a member anyway).
    pub requested: bool,
    /// How many other admin devices are members and will commit this
    /// device's removal when their clients next sync. Zero means nobody
    /// can: the device stays an MLS member that no longer reads (§9.5).
    pub admins: usize,
}

/// The body of a Welcome deposited in an invitee's inbox.
fn welcome_body(channel: ChannelId, epoch: u64, welcome: &[u8]) -> Vec<u8> {
    json!({ "channel": channel.to_string(), "epoch": epoch, "welcome": crate::api::b64(welcome) })
        .to_string()
        .into_bytes()
}

pub(crate) fn protocol(e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(e.to_string())
}

fn field<'a>(event: &'a Value, name: &str) -> Result<&'a Value, ClientError> {
    event
        .get(name)
        .ok_or_else(|| protocol(format!("event without `{name}`")))
}

fn field_str<'a>(event: &'a Value, name: &str) -> Result<&'a str, ClientError> {
    field(event, name)?
        .as_str()
        .ok_or_else(|| protocol(format!("event field `{name}` is not text")))
}

fn field_u64(event: &Value, name: &str) -> Result<u64, ClientError> {
    field(event, name)?
        .as_u64()
        .ok_or_else(|| protocol(format!("event field `{name}` is not a number")))
}

/// A binary `message` event as the message it carries; its id is the
/// MessageId of the bytes (spec §9.6), which the binary form leaves out.
/// The server's word for the sender is not kept: the sender a message is
/// shown from is the one MLS authenticates when it is decrypted.
fn message_of(event: MessageEvent) -> (ChannelId, FutureMessage) {
    let message = FutureMessage {
        id: kith_proto::sign::message_id(&event.message),
        seq: event.seq,
        epoch: event.epoch,
        message: event.message,
        received_at: event.received_at,
    };
    (event.channel, message)
}

/// A compact `message` frame (spec §6.8) as the message it carries: its
/// channel and epoch are the ones its MLS header names (decryption checks
/// them again), its sender is left to MLS.
fn compact_message_of(event: CompactMessage) -> (ChannelId, FutureMessage) {
    let (channel, epoch, seq, received_at) =
        (event.channel(), event.epoch(), event.seq, event.received_at);
    let message = event.into_message();
    let message = FutureMessage {
        id: kith_proto::sign::message_id(&message),
        seq,
        epoch,
        message,
        received_at,
    };
    (channel, message)
}

/// Errors after which the same input may well succeed later (the server
/// or the disk was unavailable): the event must not be acknowledged.
pub(crate) fn is_retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable(..) | ClientError::Store(_) => true,
        ClientError::Server { status, code, .. } => {
            *status >= 500 || *status == 429 || *status == 401 || code == "not_yet"
        }
        _ => false,
    }
}

/// A failure the homeserver answered about other servers: 502
/// `remote_unavailable` or `remote_invalid` (spec §12.2: that server could
/// not be reached, or answered wrongly, and no cached answer stood in), or
/// 503 `ordering_unavailable` (§6.7, §10.8: the channel's ordering group
/// has no leader this server can reach, most of its servers being down).
/// This device reached its own homeserver, so a step that depends on the
/// other servers (checking a member's request, committing in that
/// channel) is put off, and the rest of a sync goes on; [`is_retryable`]
/// alone would fail every sync until those servers are back.
pub(crate) fn is_remote_failure(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Server { status, code, .. }
            if *status >= 500 && matches!(code.as_str(), "remote_unavailable" | "remote_invalid")
    ) || is_ordering_unavailable(e)
}

/// 503 `ordering_unavailable`: the channel's ordering group cannot order a
/// commit or accept a message now (§6.7).
pub(crate) fn is_ordering_unavailable(e: &ClientError) -> bool {
    matches!(e, ClientError::Server { status: 503, code, .. } if code == "ordering_unavailable")
}

/// The outcome of a [`kith_mls::MlsStore::batch`] of device operations.
fn mls_batch<T>(
    result: Result<T, kith_mls::BatchError<kith_mls::DeviceError>>,
) -> Result<T, ClientError> {
    match result {
        Ok(value) => Ok(value),
        Err(kith_mls::BatchError::Operation(e)) => Err(e.into()),
        Err(kith_mls::BatchError::Commit(e)) => {
            Err(ClientError::Store(format!("storing the MLS state: {e}")))
        }
    }
}

/// Whether a frame carries a channel message (which a page's runs batch).
fn is_message_frame(frame: &EventFrame) -> bool {
    matches!(
        frame,
        EventFrame::Message { .. } | EventFrame::Compact { .. }
    )
}

/// Marks the steps at the end of a sync as running until dropped.
struct TailRunning(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for TailRunning {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A page of events being fetched in a task of its own.
type PageFetch = tokio::task::JoinHandle<Result<Vec<EventFrame>, ClientError>>;

/// Open transactions on the MLS store and the client store, for one unit
/// of receiving (see [`Client::handle_messages`]).
struct Paired {
    mls: kith_mls::OpenBatch,
    store: crate::store::StoreTx,
}

/// `payloads` cut into the requests of a multi-message send, in order:
/// up to [`MAX_BATCH`] messages and [`BATCH_PAYLOAD_BYTES`] of payload
/// each (a larger payload goes alone).
pub(crate) fn batches<'p, 'd>(payloads: &'p [&'d [u8]]) -> Vec<&'p [&'d [u8]]> {
    let mut out = Vec::new();
    let mut rest = payloads;
    while !rest.is_empty() {
        let mut take = 1;
        let mut bytes = rest.first().map_or(0, |p| p.len());
        while let Some(next) = rest.get(take)
            && take < MAX_BATCH
            && bytes + next.len() <= BATCH_PAYLOAD_BYTES
        {
            bytes += next.len();
            take += 1;
        }
        let (batch, after) = rest.split_at(take);
        out.push(batch);
        rest = after;
    }
    out
}

pub(crate) fn is_wrong_epoch(e: &ClientError) -> bool {
    matches!(e, ClientError::Server { status: 409, code, .. } if code == "wrong_epoch")
}

impl Client {
    /// Creates a channel named `name` whose payloads are `content_type`,
    /// with this device as its only member and admin.
    pub async fn create_channel(
        &mut self,
        name: &str,
        content_type: &str,
    ) -> Result<ChannelId, ClientError> {
        let content: ContentType = content_type
            .parse()
            .map_err(|e| ClientError::Invalid(format!("content type: {e}")))?;
        let channel_name: ChannelName = name
            .parse()
            .map_err(|e| ClientError::Invalid(format!("channel name: {e}")))?;
        let policy =
            Policy::new([self.device_id()]).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let extension = ChannelExtension::new(content, channel_name, policy);
        let id = ChannelId::random();
        let (group_info, tree) = {
            let channel = self
                .mls
                .create_channel(id, &ChannelSettings::new(extension))?;
            (channel.group_info()?, channel.ratchet_tree()?)
        };
        let text = id.to_string();
        self.authed(|api| {
            let (c, g, t) = (text.clone(), group_info.clone(), tree.clone());
            async move { api.create_channel(&c, &g, &t).await }
        })
        .await?;
        self.store.save_channel(&ChannelRow {
            id,
            name: name.to_owned(),
            content_type: content_type.to_owned(),
            active: true,
        })?;
        Ok(id)
    }

    /// The channels this device knows.
    pub fn channels(&self) -> Result<Vec<ChannelRow>, ClientError> {
        self.store.channels()
    }

    /// Finds a channel by id or by name (names must be unambiguous).
    pub fn resolve_channel(&self, text: &str) -> Result<ChannelRow, ClientError> {
        if let Ok(id) = text.parse::<ChannelId>()
            && let Some(row) = self.store.channel(&id)?
        {
            return Ok(row);
        }
        let channels = self.store.channels()?;
        let named: Vec<&ChannelRow> = channels.iter().filter(|c| c.name == text).collect();
        match named.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(ClientError::Invalid(format!(
                "no channel {text:?} (see `kith channel list`)"
            ))),
            _ => Err(ClientError::Invalid(format!(
                "several channels are named {text:?}: use the channel id"
            ))),
        }
    }

    /// The current epoch of a channel and its epoch authenticator (equal
    /// on every member that agrees on the channel's history).
    pub fn channel_state(&self, id: ChannelId) -> Result<(u64, Vec<u8>), ClientError> {
        let channel = self.mls.channel(id)?;
        Ok((channel.epoch(), channel.epoch_authenticator()))
    }

    /// How many of this client's commits lost their epoch to another
    /// commit and were retried.
    pub fn commit_conflicts(&self) -> u64 {
        self.commit_conflicts
    }

    /// The channel's members.
    pub fn members(&self, id: ChannelId) -> Result<Vec<DeviceId>, ClientError> {
        Ok(self.mls.channel(id)?.members())
    }

    /// Adds every device of `handle` to the channel and sends each its
    /// Welcome. Returns how many devices were added.
    pub async fn invite(&mut self, id: ChannelId, handle: &str) -> Result<usize, ClientError> {
        let target: Handle = handle
            .parse()
            .map_err(|e| ClientError::Invalid(format!("handle {handle:?}: {e}")))?;
        let wanted = target.to_string();
        let claim = self
            .authed(|api| {
                let h = wanted.clone();
                async move { api.claim_key_packages(&h).await }
            })
            .instrument(tracing::debug_span!("client.claim"))
            .await?;
        // Only the user's own devices, as their self-signed records say,
        // may be added: the homeserver hands out key packages and must not
        // be able to slip in a device of its own.
        let records = self
            .user_devices(&target.to_string())
            .instrument(tracing::debug_span!("client.user_devices"))
            .await?;
        self.add_devices(id, &target.to_string(), &records, &claim)
            .await
    }

    /// Adds every device of each of `handles` in **one** commit and sends
    /// each its Welcome (one epoch for all of them instead of one each).
    /// Returns how many devices were added. Fails, adding nobody, if a
    /// handle is invalid or one of the users has no device with a key
    /// package.
    pub async fn invite_many(
        &mut self,
        id: ChannelId,
        handles: &[&str],
    ) -> Result<usize, ClientError> {
        let mut invitees = Vec::with_capacity(handles.len());
        for handle in handles {
            let target: Handle = handle
                .parse()
                .map_err(|e| ClientError::Invalid(format!("handle {handle:?}: {e}")))?;
            let who = target.to_string();
            let claim = self
                .authed(|api| {
                    let h = who.clone();
                    async move { api.claim_key_packages(&h).await }
                })
                .instrument(tracing::debug_span!("client.claim"))
                .await?;
            let records = self
                .user_devices(&who)
                .instrument(tracing::debug_span!("client.user_devices"))
                .await?;
            invitees.push((who, records, claim));
        }
        let invitees: Vec<Invitee<'_>> = invitees
            .iter()
            .map(|(who, records, claim)| Invitee {
                who,
                records,
                claim,
            })
            .collect();
        self.add_users(id, &invitees).await
    }

    /// Adds to the channel the devices of `records` (the verified records of
    /// `who`'s devices) that `claim` has key packages for and that are not
    /// members yet, then sends each its Welcome. Returns how many it reached.
    async fn add_devices(
        &mut self,
        id: ChannelId,
        who: &str,
        records: &[DeviceRecord],
        claim: &crate::api::Claim,
    ) -> Result<usize, ClientError> {
        self.add_users(
            id,
            &[Invitee {
                who,
                records,
                claim,
            }],
        )
        .await
    }

    /// [`Self::add_devices`] for several users at once, in one commit.
    async fn add_users(
        &mut self,
        id: ChannelId,
        invitees: &[Invitee<'_>],
    ) -> Result<usize, ClientError> {
        let theirs: Vec<DeviceId> = invitees
            .iter()
            .flat_map(|i| i.records.iter().map(DeviceRecord::device_id))
            .collect();
        let mut packages: Vec<(DeviceId, Vec<u8>)> = Vec::new();
        for Invitee {
            who,
            records,
            claim,
        } in invitees
        {
            let mut offered = false;
            for p in &claim.packages {
                let device: DeviceId = p.device.parse().map_err(protocol)?;
                if !records.iter().any(|r| r.device_id() == device) {
                    return Err(protocol(format!(
                        "the server offered a key package of {device}, which is not a device of {who}"
                    )));
                }
                packages.push((device, unb64("package", &p.package)?));
                offered = true;
            }
            if !offered {
                return Err(ClientError::Invalid(format!(
                    "{who} has no devices with key packages"
                )));
            }
        }
        let whom = invitees
            .iter()
            .map(|i| i.who)
            .collect::<Vec<_>>()
            .join(", ");
        let outcome = self
            .commit_with_retry(id, |channel| {
                let members = channel.members();
                let fresh: Vec<&Vec<u8>> = packages
                    .iter()
                    .filter(|(d, _)| !members.contains(d))
                    .map(|(_, p)| p)
                    .collect();
                if fresh.is_empty() {
                    return Ok(None);
                }
                let output = channel.add(&fresh)?;
                // The key packages' own credentials must name devices of
                // the invited users (a package swapped between two of them
                // adds the same devices).
                if let Some(stranger) = output.info.added.iter().find(|d| !theirs.contains(d)) {
                    let stranger = *stranger;
                    channel.clear_pending()?;
                    return Err(protocol(format!(
                        "a key package offered for {whom} belongs to device {stranger}"
                    )));
                }
                Ok(Some(output))
            })
            .await?;
        let Some((output, epoch)) = outcome else {
            return Ok(0);
        };
        // The next commit's voter set needs the added devices' records:
        // kept now (verified above, §10.2) rather than fetched one by one
        // then. Best effort: the commit is merged, and a record not kept is
        // fetched when needed.
        if let Err(e) = self.keep_records(
            invitees
                .iter()
                .flat_map(|i| i.records.iter())
                .filter(|r| output.info.added.contains(&r.device_id())),
        ) {
            tracing::info!(channel = %id, "keeping the added devices' records: {e}");
        }
        let Some(welcome) = output.welcome.as_deref() else {
            return Ok(0);
        };
        let body = welcome_body(id, epoch + 1, welcome);
        let mut sent = 0;
        for record in invitees
            .iter()
            .flat_map(|i| i.records.iter())
            .filter(|r| output.info.added.contains(&r.device_id()))
        {
            let envelope = kith_proto::inbox::seal(
                self.secret_key(),
                record.device_id(),
                record.inbox_key(),
                InboxKind::Welcome,
                &body,
                now_ms(),
            )
            .map_err(|e| ClientError::Invalid(e.to_string()))?;
            let device = record.device_id().to_string();
            self.authed(|api| {
                let (d, e) = (device.clone(), envelope.clone());
                async move { api.deposit(&d, &e).await }
            })
            .instrument(tracing::debug_span!("client.deposit"))
            .await?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Stores verified `records` of devices that have none stored yet (one
    /// stored already stays: it may be newer), in one transaction.
    fn keep_records<'r>(
        &self,
        records: impl Iterator<Item = &'r DeviceRecord>,
    ) -> Result<(), ClientError> {
        let tx = self.store.begin()?;
        let kept = records.into_iter().try_for_each(|record| {
            let device = record.device_id();
            if self.store.record(&device)?.is_none() {
                self.store.save_record(&device, &record.encode())?;
            }
            Ok::<_, ClientError>(())
        });
        match kept {
            Ok(()) => self.store.commit(tx),
            Err(e) => {
                self.store.rollback(tx);
                Err(e)
            }
        }
    }

    /// Removes every device of `handle` from the channel. Returns how many
    /// devices were removed.
    pub async fn remove(&mut self, id: ChannelId, handle: &str) -> Result<usize, ClientError> {
        let target: Handle = handle
            .parse()
            .map_err(|e| ClientError::Invalid(format!("handle {handle:?}: {e}")))?;
        self.catch_up(id).await?;
        let mut devices = Vec::new();
        for member in self.members(id)? {
            let record = self.member_record(&member).await?;
            if record.handles().any(|h| h == target) {
                devices.push(member);
            }
        }
        if devices.is_empty() {
            return Err(ClientError::Invalid(format!(
                "{target} is not a member of this channel"
            )));
        }
        let outcome = self
            .commit_with_retry(id, |channel| {
                let members = channel.members();
                let present: Vec<DeviceId> = devices
                    .iter()
                    .copied()
                    .filter(|d| members.contains(d))
                    .collect();
                if present.is_empty() {
                    return Ok(None);
                }
                Ok(Some(channel.remove(&present)?))
            })
            .await?;
        Ok(outcome.map(|(o, _)| o.info.removed.len()).unwrap_or(0))
    }

    /// Leaves a channel (spec §9.5): sends a leave request (an application
    /// message with an empty payload and AAD `kith-leave-v0`) and marks the
    /// channel left here, so this device stops sending and reading but
    /// keeps its history. The channel's admins commit the removal when
    /// their clients next sync; until then this device is still an MLS
    /// member. The only admin of a channel with other members is refused:
    /// nobody could remove it.
    pub async fn leave(&mut self, id: ChannelId) -> Result<LeaveOutcome, ClientError> {
        let mut row = self.resolve_channel(&id.to_string())?;
        if !row.active {
            return Err(ClientError::Invalid(format!(
                "this device has already left #{}",
                row.name
            )));
        }
        self.sync().await?;
        self.catch_up(id).await?;
        let me = self.device_id();
        let (active, members, admins) = {
            let channel = self.mls.channel(id)?;
            let extension = channel.extension().map_err(protocol)?;
            let members = channel.members();
            let admins = members
                .iter()
                .filter(|d| **d != me && extension.policy.is_admin(d))
                .count();
            (channel.is_active(), members, admins)
        };
        if active {
            let others = members.iter().filter(|d| **d != me).count();
            if admins == 0 && others > 0 && self.channel_admins(id)?.contains(&me) {
                return Err(ClientError::Invalid(format!(
                    "this device is the only admin of #{} and {others} other member(s) remain: \
                     nobody could commit its removal, so it cannot leave; remove the others \
                     first",
                    row.name
                )));
            }
            self.send_with_aad(id, &[], kith_mls::LEAVE_REQUEST_AAD, false)
                .await?;
        }
        row.active = false;
        self.store.save_channel(&row)?;
        Ok(LeaveOutcome {
            requested: active,
            admins: if active { admins } else { 0 },
        })
    }

    /// Brings this user's other devices (§5.7: mutually linked with this
    /// one) into every channel this device is in: where this device is an
    /// admin it adds them; elsewhere it sends an add-device request (§9.5)
    /// for the admins to act on. Each device once per channel: one that
    /// later leaves stays out. Cheap when nothing is missing: no request.
    async fn add_linked_devices(&mut self, report: &mut SyncReport) -> Result<(), ClientError> {
        let mut links: Vec<DeviceId> = self.record()?.links().collect();
        // A removed device (§6.4) is never added back, even while a link
        // to it is still in this device's record.
        let mut kept = Vec::with_capacity(links.len());
        for d in links {
            if !self.store.is_removed_device(&d)? {
                kept.push(d);
            }
        }
        links = kept;
        if links.is_empty() {
            return Ok(());
        }
        let me = self.device_id();
        let mut wanted = Vec::new();
        for row in self.channels()? {
            if !row.active {
                continue;
            }
            // The store first: a channel whose linked devices were all
            // handled costs no load of its MLS group on every sync.
            let mut pending = Vec::new();
            for d in &links {
                if !self.store.linked_added(&row.id, d)? {
                    pending.push(*d);
                }
            }
            if pending.is_empty() {
                continue;
            }
            let Ok(channel) = self.mls.channel(row.id) else {
                continue;
            };
            if !channel.is_active() {
                continue;
            }
            let members = channel.members();
            let admin = channel.extension().is_ok_and(|e| e.policy.is_admin(&me));
            drop(channel);
            let mut missing = Vec::new();
            for d in pending {
                if members.contains(&d) {
                    // Already in (invited with the user, say): handled.
                    self.store.save_linked_added(&row.id, &d)?;
                } else if self.is_due(&Kept::Linked(row.id, d))? {
                    missing.push(d);
                }
            }
            if !missing.is_empty() {
                wanted.push((row.id, admin, missing));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let linked = self.linked_devices().await?;
        let handle = self.handle().to_owned();
        for (id, admin, missing) in wanted {
            let records: Vec<DeviceRecord> = linked
                .iter()
                .filter(|r| missing.contains(&r.device_id()))
                .cloned()
                .collect();
            if records.is_empty() {
                continue;
            }
            if let Some(why) = self.stalled(id) {
                self.keep_linked(id, &records, &why, report)?;
                continue;
            }
            if !admin {
                for r in &records {
                    let device = r.device_id();
                    // Boxed: sending may sync, which comes back here.
                    match Box::pin(self.request_add_device(id, device)).await {
                        Ok(_) => self.store.save_linked_added(&id, &device)?,
                        Err(e) if is_remote_failure(&e) => {
                            self.note_failure(id, &e);
                            self.keep_linked(id, std::slice::from_ref(r), &e.to_string(), report)?;
                        }
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            let devices: Vec<String> = records.iter().map(|r| r.device_id().to_string()).collect();
            let claim = self
                .authed(|api| {
                    let (h, d) = (handle.clone(), devices.clone());
                    async move { api.claim_device_key_packages(&h, &d).await }
                })
                .await;
            let outcome = match claim {
                Ok(claim) => self.add_devices(id, &handle, &records, &claim).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(_) => {
                    for r in &records {
                        self.store.save_linked_added(&id, &r.device_id())?;
                        report.linked_added.push((id, r.device_id()));
                    }
                }
                Err(e) if is_remote_failure(&e) => {
                    self.note_failure(id, &e);
                    self.keep_linked(id, &records, &e.to_string(), report)?;
                }
                Err(e) if is_retryable(&e) => return Err(e),
                // Kept: tried again on the next sync (e.g. no key packages).
                Err(e) => tracing::warn!(channel = %id, "cannot add a linked device: {e}"),
            }
        }
        Ok(())
    }

    /// Keeps the adds of linked devices (`records`) to channel `id` that
    /// other servers' failure stopped for a later sync; one put off for
    /// too long is given up (the device stays out, as if handled).
    fn keep_linked(
        &mut self,
        id: ChannelId,
        records: &[DeviceRecord],
        why: &str,
        report: &mut SyncReport,
    ) -> Result<(), ClientError> {
        for r in records {
            let device = r.device_id();
            if !self.keep_for_later(Kept::Linked(id, device), why, report)? {
                self.store.save_linked_added(&id, &device)?;
            }
        }
        Ok(())
    }

    /// Asks the channel's admins to add `device`, which must be mutually
    /// linked with this device (one user, §5.7), by an add-device request
    /// (§9.5). Admins' clients check the link and add it on their next
    /// sync; sync sends these by itself for this user's new devices.
    pub async fn request_add_device(
        &mut self,
        id: ChannelId,
        device: DeviceId,
    ) -> Result<String, ClientError> {
        self.send_with_aad(
            id,
            device.as_bytes(),
            kith_mls::ADD_DEVICE_REQUEST_AAD,
            false,
        )
        .await
    }

    /// Checks an add-device request (§9.5) and acts on it: adds `device`
    /// when it and the request's `sender` are mutually linked in their
    /// current records (one user, §5.7) and it is not a member yet (nor
    /// one of this user's removed devices, nor marked removed by its
    /// server).
    pub(crate) async fn honor_add_request(
        &mut self,
        id: ChannelId,
        sender: DeviceId,
        device: DeviceId,
    ) -> Result<Honored, ClientError> {
        let Some(members) = self.admin_view(id, sender)? else {
            return Ok(Honored::Moot);
        };
        if members.contains(&device) || self.store.is_removed_device(&device)? {
            return Ok(Honored::Moot);
        }
        // Both records fresh from the sender's user's directory (its home
        // server, through ours): the link must hold now, both ways.
        let Some(handle) = self
            .member_record(&sender)
            .await?
            .handles()
            .next()
            .map(|h| h.to_string())
        else {
            return Err(protocol(format!("{sender} has no sponsored handle")));
        };
        let records = self.user_devices(&handle).await?;
        let find = |d: &DeviceId| records.iter().find(|r| r.device_id() == *d).cloned();
        let (Some(from), Some(target)) = (find(&sender), find(&device)) else {
            return Err(protocol(format!(
                "{sender} asked to add {device}, which is not a device of {handle}"
            )));
        };
        if !(from.links_to(&device) && target.links_to(&sender)) {
            return Err(protocol(format!(
                "{sender} asked to add {device}, but they are not linked to each other"
            )));
        }
        // A directory answered from a cache may still list a device that
        // its server has removed since; the device's own entry says so
        // (`removed_at`, §6.4, §12.2).
        if self.removed_on_server(&device.to_string()).await? {
            return Err(protocol(format!(
                "{sender} asked to add {device}, which its server has removed"
            )));
        }
        self.store.save_record(&device, &target.encode())?;
        let only = vec![device.to_string()];
        let claim = self
            .authed(|api| {
                let (h, d) = (handle.clone(), only.clone());
                async move { api.claim_device_key_packages(&h, &d).await }
            })
            .await?;
        Ok(
            if self.add_devices(id, &handle, &[target], &claim).await? > 0 {
                Honored::Done
            } else {
                Honored::Moot
            },
        )
    }

    /// Commits the removal of every member whose leave request this device
    /// recorded (it is an admin). A member already gone needs nothing. A
    /// removal that fails because other servers did (the channel's ordering
    /// group unavailable, say) is kept for a later sync, with the back-off
    /// and time limit of membership requests ([`Client::keep_for_later`]).
    async fn honor_leave_requests(&mut self, report: &mut SyncReport) -> Result<(), ClientError> {
        for (id, device) in self.store.leave_requests()? {
            let kept = Kept::Leave(id, device);
            if !self.is_due(&kept)? {
                continue;
            }
            let still_here = self
                .resolve_channel(&id.to_string())
                .is_ok_and(|row| row.active)
                && self.mls.channel(id).is_ok_and(|c| c.is_active());
            let me = self.device_id();
            let admin = still_here && self.channel_admins(id).is_ok_and(|a| a.contains(&me));
            if admin {
                let outcome = match self.stalled(id) {
                    Some(why) => Err(why),
                    None => match self
                        .commit_with_retry(id, |channel| {
                            if !channel.members().contains(&device) {
                                return Ok(None);
                            }
                            Ok(Some(channel.remove(&[device])?))
                        })
                        .await
                    {
                        Ok(outcome) => Ok(outcome),
                        // Kept, and the sync goes on: other servers failed.
                        Err(e) if is_remote_failure(&e) => {
                            self.note_failure(id, &e);
                            Err(e.to_string())
                        }
                        // Kept: the next sync tries again.
                        Err(e) if is_retryable(&e) => return Err(e),
                        Err(e) => {
                            tracing::warn!(channel = %id, %device, "cannot honor a leave request: {e}");
                            Ok(None)
                        }
                    },
                };
                match outcome {
                    Ok(Some(_)) => report.removed_on_request.push((id, device)),
                    Ok(None) => {}
                    Err(why) => {
                        if self.keep_for_later(kept, &why, report)? {
                            continue;
                        }
                    }
                }
            }
            self.store.drop_leave_request(&id, &device)?;
        }
        Ok(())
    }

    /// Updates this device's own leaf (fresh key material): the commit any
    /// member may make.
    pub async fn self_update(&mut self, id: ChannelId) -> Result<u64, ClientError> {
        let outcome = self
            .commit_with_retry(id, |channel| Ok(Some(channel.self_update()?)))
            .await?;
        Ok(outcome.map(|(_, epoch)| epoch + 1).unwrap_or(0))
    }

    /// Makes a commit with `intent` and orders it: on `wrong_epoch` the
    /// pending commit is dropped, the winner processed, and `intent` asked
    /// again on the new epoch. `intent` returning `None` means there is
    /// nothing left to do. Returns the merged commit and the epoch it
    /// applied to.
    pub(crate) async fn commit_with_retry<F>(
        &mut self,
        id: ChannelId,
        mut intent: F,
    ) -> Result<Option<(CommitOutput, u64)>, ClientError>
    where
        F: FnMut(&mut kith_mls::Channel<'_>) -> Result<Option<CommitOutput>, ClientError>,
    {
        if self.commits_since_sync >= SYNC_EVERY_COMMITS {
            // Best effort: a failed read leaves the events queued, and the
            // commit goes on. (Boxed: syncing may commit, e.g. removals.)
            if let Err(e) = Box::pin(self.sync()).await {
                tracing::info!(channel = %id, "reading events before a commit: {e}");
            }
        }
        // The first attempt is made at the epoch this device is at; only a
        // lost race makes it fetch what it missed (the protocol's retry).
        for attempt in 0..MAX_COMMIT_ATTEMPTS {
            // A commit left pending by an earlier call whose answer was lost
            // may have been accepted: catching up merges it if so (as this
            // device's own commit); only one the server never took is
            // dropped.
            let pending = self.mls.has_pending_commit(id)?;
            if attempt > 0 || pending {
                // Events first, as a send does: merging the missed commits
                // straight from the commit listing would move this device
                // past messages still queued in its stream (§11.3).
                Box::pin(self.sync()).await?;
                self.catch_up(id).await?;
            }
            if pending {
                self.settle_unsettled_commit(id).await?;
            }
            let create = tracing::debug_span!("client.create").entered();
            // The loaded group is set aside while the commit is ordered and
            // taken up again for the merge (or the clearing): loading it
            // decodes the whole tree and the members of every past epoch
            // kept, O(members), and nothing else touches this channel's
            // MLS state in between (`&mut self`).
            let (output, epoch, members, detached) = {
                let mut channel = self.mls.channel(id)?;
                if channel.has_pending_commit() {
                    channel.clear_pending()?;
                }
                let epoch = channel.epoch();
                let members = channel.members();
                match intent(&mut channel)? {
                    Some(output) => (output, epoch, members, channel.detach()),
                    None => return Ok(None),
                }
            };
            let bundle = CommitBundle {
                epoch,
                commit: output.commit.clone(),
                welcome: output.welcome.clone(),
                group_info: output.group_info.clone(),
                // Servers compute the new tree from the commit and serve
                // that one (spec §10.3): sending ours (O(members)) would
                // only cost bytes.
                ratchet_tree: None,
            };
            drop(create);
            let text = id.to_string();
            let submitted = self
                .authed(|api| {
                    let (c, b) = (text.clone(), bundle.clone());
                    async move { api.submit_commit(&c, &b).await }
                })
                .instrument(tracing::debug_span!("client.submit"))
                .await;
            match submitted {
                Ok(accepted) => {
                    let checked = self
                        .check_own_certificate(id, epoch, &members, &output.commit, &accepted)
                        .await;
                    // Not merged unless certified. A commit the server
                    // accepted but cannot certify, or that could not be
                    // checked yet, stays pending: the next catch-up merges
                    // it once a valid certificate comes with it.
                    checked?;
                    let merge = tracing::debug_span!("client.merge").entered();
                    let mut channel = self.mls.attach(detached);
                    channel.merge_pending()?;
                    drop(channel);
                    drop(merge);
                    self.commits_since_sync += 1;
                    self.flush_future(id, epoch + 1).await?;
                    return Ok(Some((output, epoch)));
                }
                Err(e) if is_wrong_epoch(&e) => {
                    tracing::info!(channel = %id, epoch, "another commit won the epoch; retrying");
                    self.commit_conflicts += 1;
                    self.mls.attach(detached).clear_pending()?;
                }
                // Refused (4xx): the commit was not accepted, drop it.
                Err(
                    e @ ClientError::Server {
                        status: 400..=499, ..
                    },
                ) => {
                    self.mls.attach(detached).clear_pending()?;
                    return Err(e);
                }
                // Unknown outcome (unreachable, 5xx): keep it pending, and
                // the commit as submitted; the next commit to the channel
                // resubmits it first and learns whether it won.
                Err(e) => {
                    self.store.keep_unsettled_commit(&id, &bundle)?;
                    return Err(e);
                }
            }
        }
        Err(ClientError::Protocol(format!(
            "gave up after {MAX_COMMIT_ATTEMPTS} attempts: other commits keep winning channel {id}"
        )))
    }

    /// Checks the certificate the server returned for this device's own
    /// commit to `id` at `epoch`, against the voter set of `members` (the
    /// epoch's members, spec §10.7).
    async fn check_own_certificate(
        &mut self,
        id: ChannelId,
        epoch: u64,
        members: &[DeviceId],
        commit: &[u8],
        accepted: &Accepted,
    ) -> Result<(), ClientError> {
        let voters = self
            .voter_set(members)
            .instrument(tracing::debug_span!("client.voter_set"))
            .await?;
        let cert = unb64("certificate", &accepted.certificate)?;
        OrderingCertificateIn::decode(&cert)
            .map_err(protocol)?
            .verify_for(id, epoch, commit, &voters)
            .map_err(|e| protocol(format!("the commit's ordering certificate is invalid: {e}")))?;
        Ok(())
    }

    /// Settles this device's commit to `id` whose outcome was unknown (an
    /// answer of 5xx, or none: it may still be ordered, spec §10.7) by
    /// resubmitting it as it was, which the server answers as it answered
    /// (or would have answered) the first time. It is never replaced by a
    /// new commit before that: once ordered, this device could process it
    /// only with its pending state, which a new commit overwrites. Merged
    /// if accepted and certified; dropped if another commit won its epoch
    /// or it was refused; an unknown outcome again is returned as the
    /// error, and it stays kept.
    async fn settle_unsettled_commit(&mut self, id: ChannelId) -> Result<(), ClientError> {
        let Some(bundle) = self.store.unsettled_commit(&id)? else {
            return Ok(());
        };
        let (epoch, members, pending) = {
            let channel = self.mls.channel(id)?;
            (
                channel.epoch(),
                channel.members(),
                channel.has_pending_commit(),
            )
        };
        if !pending || bundle.epoch != epoch {
            // Settled meanwhile: merged by a catch-up, or another won.
            return self.store.drop_unsettled_commit(&id);
        }
        let text = id.to_string();
        let submitted = self
            .authed(|api| {
                let (c, b) = (text.clone(), bundle.clone());
                async move { api.submit_commit(&c, &b).await }
            })
            .await;
        match submitted {
            Ok(accepted) => {
                self.check_own_certificate(id, epoch, &members, &bundle.commit, &accepted)
                    .await?;
                self.mls.channel(id)?.merge_pending()?;
                self.store.drop_unsettled_commit(&id)?;
                self.commits_since_sync += 1;
                self.flush_future(id, epoch + 1).await?;
            }
            Err(e) if is_wrong_epoch(&e) => {
                tracing::info!(channel = %id, epoch, "another commit won the epoch of an unsettled one: {e}");
                self.mls.channel(id)?.clear_pending()?;
                self.store.drop_unsettled_commit(&id)?;
            }
            Err(
                e @ ClientError::Server {
                    status: 400..=499, ..
                },
            ) => {
                tracing::info!(channel = %id, epoch, "an unsettled commit was refused: {e}");
                self.mls.channel(id)?.clear_pending()?;
                self.store.drop_unsettled_commit(&id)?;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Fetches and merges every accepted commit from this device's epoch on.
    pub async fn catch_up(&mut self, id: ChannelId) -> Result<usize, ClientError> {
        let mut merged = 0;
        loop {
            let epoch = self.mls.epoch(id)?;
            let text = id.to_string();
            let commits = self
                .authed(|api| {
                    let c = text.clone();
                    async move { api.commits(&c, epoch).await }
                })
                .await?;
            let mut progressed = false;
            for commit in commits {
                let current = self.mls.epoch(id)?;
                if commit.epoch != current {
                    continue;
                }
                let bytes = unb64("commit", &commit.commit)?;
                let certificate = unb64("certificate", &commit.certificate)?;
                self.apply_commit(id, commit.epoch, &bytes, &certificate)
                    .await?;
                merged += 1;
                progressed = true;
                if !self.mls.channel(id)?.is_active() {
                    return Ok(merged);
                }
            }
            if !progressed {
                return Ok(merged);
            }
        }
    }

    /// Verifies a commit's certificate against the voter set this device
    /// computes from the channel's members, then merges it.
    async fn apply_commit(
        &mut self,
        id: ChannelId,
        epoch: u64,
        commit: &[u8],
        certificate: &[u8],
    ) -> Result<(), ClientError> {
        // Loaded once (O(members)), set aside while the voters are found.
        let loaded = self.mls.channel(id)?;
        let members = loaded.members();
        let detached = loaded.detach();
        let voters = self.voter_set(&members).await?;
        OrderingCertificateIn::decode(certificate)
            .map_err(protocol)?
            .verify_for(id, epoch, commit, &voters)
            .map_err(|e| protocol(format!("refusing commit for epoch {epoch} of {id}: {e}")))?;
        let mut channel = self.mls.attach(detached);
        match channel.process(commit)? {
            Incoming::Commit(staged) => {
                let removed = staged.removes_me();
                channel.merge_staged(staged)?;
                if removed {
                    drop(channel);
                    if let Ok(mut row) = self.resolve_channel(&id.to_string()) {
                        row.active = false;
                        self.store.save_channel(&row)?;
                    }
                    return Ok(());
                }
            }
            Incoming::OwnCommit => channel.merge_pending()?,
            _ => {
                return Err(protocol(format!(
                    "epoch {epoch} of {id}: expected a commit"
                )));
            }
        }
        let now = channel.epoch();
        drop(channel);
        self.flush_future(id, now).await
    }

    /// The servers that order this channel's commits, with the keys each
    /// may vote with: taken from the sponsorships in the members' own
    /// records, which their identity keys (the keys in the MLS tree)
    /// signed, so a homeserver cannot substitute keys.
    ///
    /// What each member's record gives is remembered while the store holds
    /// that record and it stays valid ([`crate::voters`]), so this is the
    /// set the stored records give now, without reading 1,000 of them for
    /// every commit of a 1,000-member channel.
    async fn voter_set(&mut self, members: &[DeviceId]) -> Result<VoterSet, ClientError> {
        self.sponsors.forget(self.store.record_changes()?);
        let now = now_ms();
        let mut voters = Gathered::default();
        for member in members {
            if let Some(servers) = self.sponsors.get(member, now) {
                voters.add(servers);
                continue;
            }
            let record = self.member_record(member).await?;
            // Fetching it may have stored a newer record (of this member).
            self.sponsors.forget(self.store.record_changes()?);
            voters.add_record(&record);
            self.sponsors.remember(&record, now);
        }
        Ok(voters.voter_set())
    }

    /// A member's verified record: from the local cache if it still
    /// verifies, else from the homeserver.
    pub(crate) async fn member_record(
        &mut self,
        device: &DeviceId,
    ) -> Result<DeviceRecord, ClientError> {
        let now = now_ms();
        if let Some(bytes) = self.store.record(device)?
            && let Some(record) = self.records.verify(&bytes, now)
            && record.device_id() == *device
        {
            return Ok(record);
        }
        let text = device.to_string();
        let bytes = self
            .authed(|api| {
                let d = text.clone();
                async move { api.device_record(&d).await }
            })
            .await?;
        let record = DeviceRecordIn::decode(&bytes)
            .map_err(protocol)?
            .verify(now)
            .map_err(|e| protocol(format!("record of member {device}: {e}")))?;
        if record.device_id() != *device {
            return Err(protocol(format!(
                "the server answered for {device} with another device's record"
            )));
        }
        self.store.save_record(device, &bytes)?;
        Ok(record)
    }

    /// The handle to show for `device`.
    async fn display_sender(&mut self, device: &DeviceId) -> String {
        match self.member_record(device).await {
            Ok(record) => record
                .handles()
                .next()
                .map(|h| h.to_string())
                .unwrap_or_else(|| device.to_string()),
            Err(_) => device.to_string(),
        }
    }

    /// Encrypts `data` for the channel and sends it. Returns the message id.
    pub async fn send(&mut self, id: ChannelId, data: &[u8]) -> Result<String, ClientError> {
        self.send_payload(id, data, true).await
    }

    /// Sends `data`, storing it locally only if `keep` (ephemeral payloads
    /// such as typing notifications are never stored).
    pub(crate) async fn send_payload(
        &mut self,
        id: ChannelId,
        data: &[u8],
        keep: bool,
    ) -> Result<String, ClientError> {
        self.send_with_aad(id, data, &[], keep).await
    }

    /// Sends `data` with MLS `authenticated_data` `aad` (empty for every
    /// application payload; only control messages carry AAD).
    pub(crate) async fn send_with_aad(
        &mut self,
        id: ChannelId,
        data: &[u8],
        aad: &[u8],
        keep: bool,
    ) -> Result<String, ClientError> {
        if let Ok(row) = self.resolve_channel(&id.to_string())
            && !row.active
        {
            return Err(ClientError::Invalid(format!(
                "this device is no longer a member of #{}",
                row.name
            )));
        }
        // A dropped sender's batch still in flight is answered first: two
        // requests of this device must not race.
        self.settle_dropped_batch().await?;
        let text = id.to_string();
        let mut attempt = 0;
        let (message_id, seq, received_at, epoch) = loop {
            // The first attempt goes out at the epoch this device is at:
            // the binary path refuses any but the channel's current epoch
            // (409 `wrong_epoch`), so a device that is behind learns it from
            // the answer and never sends at a stale epoch. Only then (or with
            // a commit of its own pending) does it process what is queued,
            // in order, so that it moves through epochs one at a time and
            // can still read every message sent in the ones it passes.
            if attempt > 0 || self.mls.has_pending_commit(id)? {
                self.sync().await?;
                self.catch_up(id).await?;
            }
            attempt += 1;
            let (message, epoch) = {
                let mut channel = self.mls.channel(id)?;
                if !channel.is_active() {
                    return Err(ClientError::Invalid(format!(
                        "this device is no longer a member of {id}"
                    )));
                }
                (channel.encrypt_with_aad(data, aad)?, channel.epoch())
            };
            let sent = self
                .authed(|api| {
                    let (c, m) = (text.clone(), message.clone());
                    async move { api.send_message_binary(&c, epoch, &m).await }
                })
                .await;
            match sent {
                Ok((message_id, seq, received_at)) => break (message_id, seq, received_at, epoch),
                Err(e) if is_wrong_epoch(&e) && attempt < MAX_SEND_ATTEMPTS => {
                    tracing::debug!(channel = %id, epoch, "behind the channel's epoch; catching up");
                }
                Err(e) => return Err(e),
            }
        };
        if !keep {
            return Ok(message_id);
        }
        let me = self.device_id();
        let handle = self.handle().to_owned();
        self.store.save_message(
            &id,
            &MessageRow {
                id: message_id.clone(),
                seq,
                epoch,
                sender_device: me,
                sender: handle,
                body: data.to_vec(),
                // The server's time, as every other member stores it, so
                // all devices order the timeline alike.
                received_at,
            },
        )?;
        Ok(message_id)
    }

    /// Sends several payloads at once: encrypted in order at the current
    /// epoch (one ratchet write), and posted in one request (a
    /// multi-message send, spec §6.7) that the server stores in one
    /// transaction at consecutive positions, so every member receives them
    /// in the order of `payloads`; stored here in one transaction. More
    /// than [`MAX_BATCH`] payloads, or more than [`BATCH_PAYLOAD_BYTES`],
    /// go in several requests, one after the other. A request the server
    /// refuses with `wrong_epoch` is encrypted again at the new epoch (at
    /// most [`MAX_SEND_ATTEMPTS`] times), as [`Client::send`] does. Returns
    /// the message ids in the order of `payloads`. On an error, the
    /// requests accepted before it are still stored here; the server
    /// accepts each request whole or not at all. A refused request's
    /// messages are dropped, and with them up to [`MAX_BATCH`] steps of
    /// this device's sending ratchet: members skip at most 1,000 at once
    /// (spec §9.7), so a caller should not retry a failing `send_many`
    /// more than a few times at one epoch.
    pub async fn send_many(
        &mut self,
        id: ChannelId,
        payloads: &[&[u8]],
    ) -> Result<Vec<String>, ClientError> {
        let mut ids = Vec::with_capacity(payloads.len());
        for batch in batches(payloads) {
            let rows = self.send_batch(id, batch, false).await?;
            self.store.save_messages(&id, &rows)?;
            ids.extend(rows.into_iter().map(|r| r.id));
        }
        Ok(ids)
    }

    /// One request of [`Client::send_many`]: the rows to store for
    /// `payloads`, once the server has accepted them all. `behind`: the
    /// server has just refused this device's epoch (a pipelined batch,
    /// `wrong_epoch`), so it catches up before the first attempt instead
    /// of wasting a request and a batch of ratchet steps at the old epoch.
    pub(crate) async fn send_batch(
        &mut self,
        id: ChannelId,
        payloads: &[&[u8]],
        behind: bool,
    ) -> Result<Vec<MessageRow>, ClientError> {
        self.settle_dropped_batch().await?;
        let text = id.to_string();
        for attempt in 0..MAX_SEND_ATTEMPTS {
            // As in `send_payload`: catch up only when the server said this
            // device is behind, or with a commit of its own pending.
            if attempt > 0 || behind || self.mls.has_pending_commit(id)? {
                self.sync().await?;
                self.catch_up(id).await?;
            }
            let (epoch, messages) = self.encrypt_batch(id, payloads)?;
            let sent = self
                .authed(|api| {
                    let (c, m) = (text.clone(), messages.clone());
                    async move { api.send_messages_binary(&c, epoch, &m).await }
                })
                .await;
            match sent {
                Ok(answers) => return Ok(self.sent_rows(epoch, answers, payloads)),
                // Encrypted again on the next round, at the new epoch.
                Err(e) if is_wrong_epoch(&e) => {
                    tracing::debug!(channel = %id, epoch, "behind the channel's epoch; catching up");
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Protocol(format!(
            "gave up after {MAX_SEND_ATTEMPTS} attempts: channel {id} keeps moving to new epochs"
        )))
    }

    /// Encrypts `payloads` in order at this device's current epoch in
    /// channel `id`: `(epoch, MLS messages)`. The ratchet's steps for all
    /// of them are one transaction, durable before this returns, so before
    /// any of them can leave: a sender's ratchet must never step back after
    /// a crash (its keys would be used twice).
    pub(crate) fn encrypt_batch(
        &mut self,
        id: ChannelId,
        payloads: &[&[u8]],
    ) -> Result<(u64, Vec<Vec<u8>>), ClientError> {
        let mut channel = self.mls.channel(id)?;
        if !channel.is_active() {
            return Err(ClientError::Invalid(format!(
                "this device is no longer a member of {id}"
            )));
        }
        let epoch = channel.epoch();
        let messages = self.mls.store().batch(|| {
            payloads
                .iter()
                .map(|data| channel.encrypt(data))
                .collect::<Result<Vec<_>, _>>()
        });
        Ok((epoch, mls_batch(messages)?))
    }

    /// This device's own copies of `payloads`, sent at `epoch` and
    /// accepted as `answers` (id, seq, received_at; in the same order).
    pub(crate) fn sent_rows(
        &self,
        epoch: u64,
        answers: Vec<(String, u64, u64)>,
        payloads: &[&[u8]],
    ) -> Vec<MessageRow> {
        let (me, handle) = (self.device_id(), self.handle().to_owned());
        answers
            .into_iter()
            .zip(payloads)
            .map(|((message_id, seq, received_at), data)| MessageRow {
                id: message_id,
                seq,
                epoch,
                sender_device: me,
                sender: handle.clone(),
                body: data.to_vec(),
                received_at,
            })
            .collect()
    }

    /// Encrypts `data` for channel `id` at this device's current epoch
    /// without sending or storing it: returns `(epoch, MLS message)`, for
    /// tools that post it themselves (`kith-bench` measures the server
    /// apart from client-side encryption this way). Each call advances the
    /// sending ratchet, so a message made here and never sent leaves a gap
    /// the receivers skip over.
    pub fn encrypt_unsent(
        &mut self,
        id: ChannelId,
        data: &[u8],
    ) -> Result<(u64, Vec<u8>), ClientError> {
        let mut channel = self.mls.channel(id)?;
        if !channel.is_active() {
            return Err(ClientError::Invalid(format!(
                "this device is no longer a member of {id}"
            )));
        }
        Ok((channel.epoch(), channel.encrypt(data)?))
    }

    /// [`Client::encrypt_unsent`] for several payloads: encrypted in order
    /// at this device's current epoch, the sending ratchet's steps for all
    /// of them written once, durably, before this returns. Returns
    /// `(epoch, MLS messages)` in the order of `payloads`.
    pub fn encrypt_unsent_many(
        &mut self,
        id: ChannelId,
        payloads: &[&[u8]],
    ) -> Result<(u64, Vec<Vec<u8>>), ClientError> {
        self.encrypt_batch(id, payloads)
    }

    /// The last `limit` messages of a channel, from the local store.
    pub fn messages(&self, id: ChannelId, limit: usize) -> Result<Vec<MessageRow>, ClientError> {
        self.store.messages(&id, limit)
    }

    /// Processes the inbox (direct messages, Welcomes) and then every event
    /// the homeserver holds for this device, storing its cursor past what
    /// was handled, and acknowledging it to the homeserver once
    /// [`ACK_EVERY_EVENTS`] have gathered.
    pub async fn sync(&mut self) -> Result<SyncReport, ClientError> {
        let mut report = SyncReport::default();
        self.settle_dropped_batch().await?;
        self.commits_since_sync = 0;
        if let Err(e) = self.renew_sponsorship(false).await {
            tracing::warn!("renewing this device's sponsorship: {e}");
        }
        self.sync_inbox_into(&mut report).await?;
        // The page after the one being processed, fetched meanwhile: its
        // cursor and the request for it.
        let mut prefetched: Option<(u64, PageFetch)> = None;
        loop {
            let after = self.store.events_after()?;
            let frames = match prefetched.take() {
                // Fetched from where this page starts: the answer is this
                // page. Any failure of it (an expired session, say) is
                // left to an ordinary fetch.
                Some((from, fetch)) if from == after => match fetch
                    .instrument(tracing::debug_span!("sync.prefetched"))
                    .await
                {
                    Ok(Ok(frames)) => frames,
                    _ => self.events_page(after).await?,
                },
                _ => self.events_page(after).await?,
            };
            let Some(last) = frames.last().map(EventFrame::cursor) else {
                break;
            };
            // Fetch the next page while this one is decrypted and stored
            // (it is read from `last`, which is where this page leaves the
            // cursor once processed; it is dropped if that is not so).
            prefetched = Some((last, self.prefetch_events(last)));
            let page = frames.len();
            let mut done = after;
            let mut frames = frames.into_iter().peekable();
            while let Some(frame) = frames.next() {
                if is_message_frame(&frame) {
                    // A run of messages: decrypted and stored as one unit
                    // (one ratchet write, one store write with the cursor).
                    let mut run = vec![frame];
                    while let Some(next) = frames.next_if(is_message_frame) {
                        run.push(next);
                    }
                    let end = run.last().map_or(done, EventFrame::cursor);
                    let handled = self
                        .handle_messages(run, &mut report)
                        .instrument(tracing::debug_span!("sync.messages"))
                        .await;
                    if let Err(e) = handled {
                        // None of the run is kept; it is fetched again.
                        self.acknowledge(after, done).await?;
                        return Err(e);
                    }
                    done = end;
                    continue;
                }
                let cursor = frame.cursor();
                let result = match frame {
                    EventFrame::Json { json, .. } => match serde_json::from_str::<Value>(&json) {
                        // In order: a Welcome must be processed before the
                        // channel's later events.
                        Ok(event) if event.get("kind").and_then(Value::as_str) == Some("inbox") => {
                            self.sync_inbox_into(&mut report).await
                        }
                        Ok(event) => self.handle_event(&event, &mut report).await,
                        Err(e) => Err(protocol(format!("an event that is not JSON: {e}"))),
                    },
                    _ => Ok(()),
                };
                match result {
                    Ok(()) => {}
                    Err(e) if is_retryable(&e) => {
                        // Keep what was processed; the rest is fetched again
                        // next time (at least once, never lost).
                        self.acknowledge(after, done).await?;
                        return Err(e);
                    }
                    Err(e) => tracing::warn!("skipping an event that can never be processed: {e}"),
                }
                done = cursor;
            }
            self.unacked_events = self.unacked_events.saturating_add(page);
            if self.unacked_events >= ACK_EVERY_EVENTS {
                self.acknowledge(after, last).await?;
            } else {
                self.keep_cursor(after, last)?;
            }
        }
        // A sync started by one of the steps below (a commit or a send
        // catching up) only reads events: run again, the steps could come
        // back to the one that started it, with no end.
        if self
            .in_tail
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(report);
        }
        // Cleared however the steps end (an error, a panic, or the sync's
        // future dropped halfway).
        let _running = TailRunning(std::sync::Arc::clone(&self.in_tail));
        self.stalled.clear();
        self.sync_tail(&mut report).await?;
        // Reported by a sync that returns its report (a failed one leaves
        // them for the next).
        report.unacknowledged = self.take_unacknowledged();
        Ok(report)
    }

    /// The steps at the end of a sync, once its events are processed: an
    /// admin's requests to act on, this user's removed devices to remove
    /// and linked devices to add. A step that other servers' failure stops
    /// is kept for later ([`SyncReport::kept`]), and the others go on.
    async fn sync_tail(&mut self, report: &mut SyncReport) -> Result<(), ClientError> {
        self.honor_leave_requests(report).await?;
        self.honor_requests(Requests::Remove, report).await?;
        self.remove_removed_devices(report).await?;
        self.honor_requests(Requests::Add, report).await?;
        self.add_linked_devices(report).await
    }

    /// One page of events after `after`, in binary.
    async fn events_page(&mut self, after: u64) -> Result<Vec<EventFrame>, ClientError> {
        self.authed(|api| async move { api.events_binary(after).await })
            .await
    }

    /// Starts fetching the page of events after `after` in a task of its
    /// own (a read: nothing changes at the server if it is dropped).
    fn prefetch_events(&self, after: u64) -> PageFetch {
        let api = self.api.clone();
        tokio::spawn(async move { api.events_binary(after).await })
    }

    /// Records that every event up to `cursor` is processed, locally and at
    /// the homeserver; `from` is where this page of events started (the
    /// homeserver has heard of nothing past it from this call yet).
    async fn acknowledge(&mut self, from: u64, cursor: u64) -> Result<(), ClientError> {
        if cursor <= from {
            return Ok(());
        }
        self.keep_cursor(from, cursor)?;
        self.authed(|api| async move { api.ack_events(cursor).await })
            .await?;
        self.unacked_events = 0;
        Ok(())
    }

    /// Stores `cursor` as this device's event cursor, without telling the
    /// homeserver: the events up to it are processed.
    fn keep_cursor(&mut self, from: u64, cursor: u64) -> Result<(), ClientError> {
        // A run of messages stored its cursor already: no second write.
        if cursor > from && cursor > self.store.events_after()? {
            self.store.set_events_after(cursor)?;
        }
        Ok(())
    }

    /// A run of `message` frames from one page of events, as one unit:
    /// decrypted with every ratchet step in one MLS transaction, and the
    /// messages stored with the event cursor past the run in one client
    /// store transaction. The client store commits first, then the MLS
    /// state: a crash between the two leaves messages stored whose ratchet
    /// steps are not (harmless: they are never fetched again), never a
    /// ratchet moved past messages that are not stored (they would be
    /// lost). On an error that may pass, nothing of the run is kept.
    async fn handle_messages(
        &mut self,
        run: Vec<EventFrame>,
        report: &mut SyncReport,
    ) -> Result<(), ClientError> {
        let Some(last) = run.last().map(EventFrame::cursor) else {
            return Ok(());
        };
        let before = report.clone();
        let open = self.begin_paired()?;
        let mut result = Ok(());
        let mut messages = run
            .into_iter()
            .filter_map(|frame| match frame {
                EventFrame::Message { event, .. } => Some(message_of(event)),
                EventFrame::Compact { event, .. } => Some(compact_message_of(event)),
                EventFrame::Json { .. } => None,
            })
            .peekable();
        while let Some((id, first)) = messages.next() {
            // The messages that follow in the same channel and epoch go
            // with it: decrypted with the channel loaded once.
            let epoch = first.epoch;
            let mut same = vec![first];
            while let Some((_, m)) = messages.next_if(|(next, m)| *next == id && m.epoch == epoch) {
                same.push(m);
            }
            match self.handle_same_epoch(id, same, report).await {
                Ok(()) => {}
                Err(e) if is_retryable(&e) => {
                    result = Err(e);
                    break;
                }
                Err(e) => tracing::warn!("skipping an event that can never be processed: {e}"),
            }
        }
        let result = result.and_then(|()| self.store.set_events_after(last));
        match result {
            Ok(()) => self.commit_paired(open).inspect_err(|_| *report = before),
            Err(e) => {
                self.rollback_paired(open);
                *report = before;
                Err(e)
            }
        }
    }

    /// Opens a transaction on both stores, for a unit of receiving.
    fn begin_paired(&self) -> Result<Paired, ClientError> {
        let mls = self
            .mls
            .store()
            .begin()
            .map_err(|e| ClientError::Store(format!("beginning an MLS transaction: {e}")))?;
        match self.store.begin() {
            Ok(store) => Ok(Paired { mls, store }),
            Err(e) => {
                self.mls.store().rollback(mls);
                Err(e)
            }
        }
    }

    /// Commits the client store, then the MLS state (the order is what
    /// keeps a crash from losing messages: see [`Client::handle_messages`]).
    /// On an error the MLS state is as before; the client store is too,
    /// unless it was the MLS commit that failed.
    fn commit_paired(&self, open: Paired) -> Result<(), ClientError> {
        if let Err(e) = self.store.commit(open.store) {
            self.mls.store().rollback(open.mls);
            return Err(e);
        }
        self.mls
            .store()
            .commit(open.mls)
            .map_err(|e| ClientError::Store(format!("storing the MLS state: {e}")))
    }

    fn rollback_paired(&self, open: Paired) {
        self.store.rollback(open.store);
        self.mls.store().rollback(open.mls);
    }

    async fn handle_event(
        &mut self,
        event: &Value,
        report: &mut SyncReport,
    ) -> Result<(), ClientError> {
        let kind = field_str(event, "kind")?;
        if kind == "device_removed" {
            return self.device_removed_event(event).await;
        }
        if kind != "commit" && kind != "message" {
            return Ok(());
        }
        let id: ChannelId = field_str(event, "channel")?.parse().map_err(protocol)?;
        let epoch = field_u64(event, "epoch")?;
        if kind == "message" {
            let message = FutureMessage {
                id: {
                    let mut raw = [0u8; 32];
                    hex::decode_to_slice(field_str(event, "id")?, &mut raw).map_err(protocol)?;
                    raw
                },
                seq: field_u64(event, "seq")?,
                epoch,
                message: unb64("message", field_str(event, "message")?)?,
                received_at: field_u64(event, "received_at")?,
            };
            return self.handle_message((id, message), report).await;
        }
        let Ok(channel) = self.mls.channel(id) else {
            return Ok(());
        };
        let current = channel.epoch();
        let active = channel.is_active();
        drop(channel);
        if !active {
            return Ok(());
        }
        if epoch > current {
            report.commits += self.catch_up(id).await?;
        } else if epoch == current {
            let commit = unb64("commit", field_str(event, "commit")?)?;
            let certificate = unb64("certificate", field_str(event, "certificate")?)?;
            self.apply_commit(id, epoch, &commit, &certificate).await?;
            report.commits += 1;
        }
        Ok(())
    }

    /// A `message` event: decrypted and stored, or kept until this device
    /// reaches its epoch (or joins the channel).
    async fn handle_message(
        &mut self,
        (id, message): (ChannelId, FutureMessage),
        report: &mut SyncReport,
    ) -> Result<(), ClientError> {
        let epoch = message.epoch;
        let Ok(channel) = self.mls.channel(id) else {
            // A member's messages can arrive before its Welcome (it is a
            // member as soon as the commit is accepted): keep them for the
            // join.
            self.store.save_future(&id, &message)?;
            return Ok(());
        };
        let current = channel.epoch();
        let active = channel.is_active();
        drop(channel);
        if !active {
            return Ok(());
        }
        if epoch > current {
            // Buffer first, so a failed catch-up loses nothing; merging the
            // commits flushes the buffer.
            self.store.save_future(&id, &message)?;
            report.commits += self.catch_up(id).await?;
            return Ok(());
        }
        if self.decrypt_and_store(id, &message, report).await? {
            report.messages += 1;
        }
        Ok(())
    }

    /// Messages of one channel, all of one epoch, in order. At the epoch
    /// this device is at (the usual case), they are decrypted with the
    /// channel's MLS state loaded once (a load decodes the whole group from
    /// the store: it was most of a receiver's time per message), then
    /// stored one by one; otherwise each goes its own way
    /// ([`Client::handle_message`]: buffered for a later epoch, or left).
    async fn handle_same_epoch(
        &mut self,
        id: ChannelId,
        messages: Vec<FutureMessage>,
        report: &mut SyncReport,
    ) -> Result<(), ClientError> {
        let epoch = messages.first().map(|m| m.epoch);
        let current = match self.mls.channel(id) {
            Ok(channel) if channel.is_active() => Some(channel),
            _ => None,
        };
        let Some(mut channel) = current.filter(|c| Some(c.epoch()) == epoch) else {
            for m in messages {
                self.handle_message((id, m), report).await?;
            }
            return Ok(());
        };
        let row = self.store.channel(&id)?;
        if row.as_ref().is_some_and(|r| !r.active) {
            // Left (or removed): nothing more is read.
            return Ok(());
        }
        let processed: Vec<_> = messages
            .iter()
            .map(|m| channel.process(&m.message))
            .collect();
        drop(channel);
        for (m, processed) in messages.iter().zip(processed) {
            if self
                .store_processed(id, row.as_ref(), m, processed, report)
                .await?
            {
                report.messages += 1;
            }
        }
        Ok(())
    }

    /// Decrypts a message and stores it; `false` if it was not for us to
    /// read (our own, or undecryptable — logged).
    async fn decrypt_and_store(
        &mut self,
        id: ChannelId,
        m: &FutureMessage,
        report: &mut SyncReport,
    ) -> Result<bool, ClientError> {
        let row = self.store.channel(&id)?;
        if row.as_ref().is_some_and(|r| !r.active) {
            // Left (or removed): nothing more is read.
            return Ok(false);
        }
        let processed = self.mls.channel(id)?.process(&m.message);
        self.store_processed(id, row.as_ref(), m, processed, report)
            .await
    }

    /// What a decrypted message asks for: a request stored for admins, a
    /// typing notification reported, an application message stored.
    /// `false` if nothing was stored as a message (undecryptable ones are
    /// logged).
    async fn store_processed(
        &mut self,
        id: ChannelId,
        row: Option<&ChannelRow>,
        m: &FutureMessage,
        processed: Result<Incoming, kith_mls::DeviceError>,
        report: &mut SyncReport,
    ) -> Result<bool, ClientError> {
        if let Ok(incoming) = &processed
            && let Some((sender, device)) = incoming.add_device_request()
        {
            // Only admins act on it, after checking the link (§9.5).
            let me = self.device_id();
            if self.channel_admins(id).is_ok_and(|a| a.contains(&me)) {
                self.store
                    .save_request(Requests::Add, &id, &sender, &device)?;
            }
            return Ok(false);
        }
        if let Ok(incoming) = &processed
            && let Some((sender, device)) = incoming.remove_device_request()
        {
            // Only admins act on it, after checking the directory (§9.5).
            let me = self.device_id();
            if self.channel_admins(id).is_ok_and(|a| a.contains(&me)) {
                self.store
                    .save_request(Requests::Remove, &id, &sender, &device)?;
            }
            return Ok(false);
        }
        if let Ok(incoming) = &processed
            && let Some(leaver) = incoming.leave_request()
        {
            // Only admins act on it, and only ever for its MLS sender.
            let me = self.device_id();
            if self.channel_admins(id).is_ok_and(|a| a.contains(&me)) {
                self.store.save_leave_request(&id, &leaver)?;
            }
            return Ok(false);
        }
        match processed {
            Ok(Incoming::Application { aad, .. }) if !aad.is_empty() => {
                tracing::warn!(channel = %id, "dropping a message with unknown authenticated data");
                Ok(false)
            }
            Ok(Incoming::Application { sender, data, .. }) => {
                let name = self.display_sender(&sender).await;
                let chat = row.is_some_and(crate::chat::is_chat);
                if chat && let Some(typing) = crate::chat::is_ephemeral(&data) {
                    report.typing.push(crate::chat::TypingEvent {
                        channel: id,
                        sender: name,
                        device: sender,
                        active: typing.active,
                        received_at: m.received_at,
                    });
                    return Ok(false);
                }
                self.store.save_message(
                    &id,
                    &MessageRow {
                        id: hex::encode(m.id),
                        seq: m.seq,
                        epoch: m.epoch,
                        sender_device: sender,
                        sender: name,
                        body: data,
                        received_at: m.received_at,
                    },
                )?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) => {
                tracing::warn!(channel = %id, epoch = m.epoch, "cannot decrypt message: {e}");
                Ok(false)
            }
        }
    }

    /// Decrypts buffered messages whose epoch this device has reached.
    async fn flush_future(&mut self, id: ChannelId, epoch: u64) -> Result<(), ClientError> {
        // Typing that waited for its epoch is stale by now: dropped.
        let mut ignored = SyncReport::default();
        let future = self.store.future(&id, epoch)?;
        if future.is_empty() {
            return Ok(());
        }
        // As a run of fetched messages: stored with their ratchet steps
        // committed after them (see `handle_messages`).
        let open = self.begin_paired()?;
        for m in future {
            let handled = self.decrypt_and_store(id, &m, &mut ignored).await;
            if let Err(e) = handled.and_then(|_| self.store.drop_future(&id, &m.id)) {
                self.rollback_paired(open);
                return Err(e);
            }
        }
        self.commit_paired(open)
    }

    /// Joins a channel from a Welcome body found in the inbox.
    pub(crate) async fn join_from_welcome(
        &mut self,
        body: &[u8],
    ) -> Result<ChannelId, ClientError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| protocol(format!("welcome body: {e}")))?;
        let id: ChannelId = field_str(&value, "channel")?.parse().map_err(protocol)?;
        let epoch = field_u64(&value, "epoch")?;
        let welcome = unb64("welcome", field_str(&value, "welcome")?)?;
        let text = id.to_string();
        let (tree, _group_info) = self
            .authed(|api| {
                let c = text.clone();
                async move { api.tree(&c, epoch).await }
            })
            .await?;
        let extension = {
            let channel = self.mls.join(&welcome, &tree)?;
            // The Welcome's own group must be the one the inviter named;
            // otherwise the channel would be stored under a false id.
            if channel.id() != id || channel.epoch() != epoch {
                return Err(protocol(format!(
                    "the Welcome is for {} at epoch {}, not {id} at epoch {epoch}",
                    channel.id(),
                    channel.epoch()
                )));
            }
            channel.extension().map_err(protocol)?
        };
        self.store.save_channel(&ChannelRow {
            id,
            name: extension.name.to_string(),
            content_type: extension.content_type.to_string(),
            active: true,
        })?;
        self.flush_future(id, epoch).await?;
        Ok(id)
    }
}

/// A user being added: their handle (for errors), the verified records of
/// their devices and the key packages claimed for them.
struct Invitee<'a> {
    who: &'a str,
    records: &'a [DeviceRecord],
    claim: &'a crate::api::Claim,
}
