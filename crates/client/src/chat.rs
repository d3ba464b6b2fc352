//! The chat layer: channels whose content type is
//! `application/vnd.kith.chat.v1` carry one [`ChatMessage`] per channel
//! message. This module sends them, folds what the store holds into a
//! [`Timeline`] (users named by handle, the channel's admins as
//! moderators), and keeps typing notifications out of the store.
//!
//! Read markers are ordinary chat messages in the channel, so every device
//! of the user that is a member sees them and the fold picks the furthest.

use kith_chat::{ChatMessage, Entry, MessageRef, Moderators, ReadMarker, Timeline, Typing, fold};
use kith_proto::{ChannelId, DeviceId, DeviceRecordIn};

use crate::store::{ChannelRow, MessageRow};
use crate::{Client, ClientError};

pub use kith_chat::CONTENT_TYPE;

/// How many stored messages a timeline is folded from at most (edits,
/// deletes and reactions count as messages).
pub const TIMELINE_WINDOW: usize = 10_000;

/// The shortest message-id prefix accepted where a message is named.
pub const MIN_ID_PREFIX: usize = 6;

/// A folded chat timeline whose users are handles (`name@server`).
pub type ChatTimeline = Timeline<String>;

/// Someone started or stopped typing (never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypingEvent {
    /// The channel.
    pub channel: ChannelId,
    /// Who, by handle.
    pub sender: String,
    /// Their device.
    pub device: DeviceId,
    /// Typing or stopped.
    pub active: bool,
    /// When the homeserver received it (ms).
    pub received_at: u64,
}

/// Whether a channel carries chat messages.
pub fn is_chat(row: &ChannelRow) -> bool {
    row.content_type == CONTENT_TYPE
}

/// Whether a stored payload is ephemeral chat content (typing), which is
/// shown while fresh and never stored.
pub fn is_ephemeral(body: &[u8]) -> Option<Typing> {
    match ChatMessage::decode(body) {
        Ok(ChatMessage::Typing(t)) => Some(t),
        _ => None,
    }
}

/// A stored message as a fold entry: its id, sender handle, device, the
/// homeserver's receive time and the payload (kept even when it does not
/// decode).
pub fn entry(row: &MessageRow) -> Result<Entry<String>, ClientError> {
    let id: MessageRef = row
        .id
        .parse()
        .map_err(|e| ClientError::Store(format!("stored message id {:?}: {e}", row.id)))?;
    Ok(Entry::decode(
        id,
        row.sender.clone(),
        row.sender_device,
        row.received_at,
        &row.body,
    ))
}

/// Finds the one message whose hex id starts with `prefix` (at least
/// [`MIN_ID_PREFIX`] digits, or the whole id).
pub fn find_message<'a>(
    ids: impl IntoIterator<Item = &'a MessageRef>,
    prefix: &str,
) -> Result<MessageRef, ClientError> {
    let prefix = prefix.trim().to_ascii_lowercase();
    if prefix.len() < MIN_ID_PREFIX || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ClientError::Invalid(format!(
            "message id {prefix:?}: give at least {MIN_ID_PREFIX} hex digits"
        )));
    }
    let mut found: Vec<MessageRef> = ids
        .into_iter()
        .filter(|id| id.to_string().starts_with(&prefix))
        .copied()
        .collect();
    found.sort();
    found.dedup();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(ClientError::Invalid(format!(
            "no message {prefix} in this channel"
        ))),
        _ => Err(ClientError::Invalid(format!(
            "{} messages start with {prefix}: give more digits",
            found.len()
        ))),
    }
}

impl Client {
    /// Sends a chat message to a channel. Typing notifications are sent but
    /// not stored; everything else is stored like any sent message.
    /// Returns the message id.
    pub async fn send_chat(
        &mut self,
        id: ChannelId,
        message: &ChatMessage,
    ) -> Result<MessageRef, ClientError> {
        let row = self.resolve_channel(&id.to_string())?;
        if !is_chat(&row) {
            return Err(ClientError::Invalid(format!(
                "channel {} carries {}, not chat messages",
                row.name, row.content_type
            )));
        }
        let keep = !message.is_ephemeral();
        let sent = self.send_payload(id, &message.encode(), keep).await?;
        sent.parse()
            .map_err(|e| ClientError::Protocol(format!("message id {sent:?}: {e}")))
    }

    /// Tells the channel this user has read up to `up_to`. Every device of
    /// the user that is a member folds it into the same marker.
    pub async fn mark_read(
        &mut self,
        id: ChannelId,
        up_to: MessageRef,
    ) -> Result<MessageRef, ClientError> {
        self.send_chat(id, &ChatMessage::ReadMarker(ReadMarker { up_to }))
            .await
    }

    /// The device ids of the channel's admins, from its MLS channel
    /// extension (the creator lists itself at epoch 0).
    pub fn channel_admins(&self, id: ChannelId) -> Result<Vec<DeviceId>, ClientError> {
        let extension = self
            .mls
            .channel(id)?
            .extension()
            .map_err(|e| ClientError::Protocol(format!("channel extension: {e}")))?;
        Ok(extension.policy.admins().to_vec())
    }

    /// The handle shown for `device`, without network: this device's own
    /// handle, a cached verified record, else a message it sent; `None`
    /// when nothing local names it.
    pub fn known_handle(&self, channel: ChannelId, device: &DeviceId) -> Option<String> {
        if *device == self.device_id() {
            return Some(self.handle().to_owned());
        }
        let now = crate::now_ms();
        let cached = self
            .store
            .record(device)
            .ok()
            .flatten()
            .and_then(|bytes| DeviceRecordIn::decode(&bytes).ok())
            .and_then(|r| r.verify(now).ok())
            .filter(|r| r.device_id() == *device)
            .and_then(|r| r.handles().next().map(|h| h.to_string()));
        cached.or_else(|| {
            self.store
                .messages(&channel, TIMELINE_WINDOW)
                .ok()?
                .into_iter()
                .find(|m| m.sender_device == *device)
                .map(|m| m.sender)
        })
    }

    /// The channel's members by handle (sorted, each once); a device no
    /// local record names shows as its id.
    pub fn member_handles(&self, id: ChannelId) -> Result<Vec<String>, ClientError> {
        let mut handles: Vec<String> = self
            .members(id)?
            .iter()
            .map(|d| self.known_handle(id, d).unwrap_or_else(|| d.to_string()))
            .collect();
        handles.sort();
        handles.dedup();
        Ok(handles)
    }

    /// The users who may delete others' messages: the handles of the
    /// channel's admin devices.
    pub fn moderators(&self, id: ChannelId) -> Result<Moderators<String>, ClientError> {
        let admins = self.channel_admins(id)?;
        Ok(Moderators::new(
            admins.iter().filter_map(|d| self.known_handle(id, d)),
        ))
    }

    /// The channel's timeline, folded from the stored messages: edits,
    /// deletes (by the sender or an admin), reactions and read markers
    /// applied. Users are handles.
    pub fn timeline(&self, id: ChannelId) -> Result<ChatTimeline, ClientError> {
        let rows = self.store.messages(&id, TIMELINE_WINDOW)?;
        let entries = rows.iter().map(entry).collect::<Result<Vec<_>, _>>()?;
        let moderators = self.moderators(id).unwrap_or_else(|_| Moderators::none());
        Ok(fold(&entries, &moderators))
    }

    /// The id of the stored message of `channel` whose hex id starts with
    /// `prefix` (see [`find_message`]).
    pub fn resolve_message(&self, id: ChannelId, prefix: &str) -> Result<MessageRef, ClientError> {
        let rows = self.store.messages(&id, TIMELINE_WINDOW)?;
        let ids = rows
            .iter()
            .filter_map(|r| r.id.parse::<MessageRef>().ok())
            .collect::<Vec<_>>();
        find_message(&ids, prefix)
    }
}
