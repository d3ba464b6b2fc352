//! The binary form of the event stream (spec §6.8, "Binary events"): the
//! frames a homeserver sends instead of JSON when the client asks for
//! `application/octet-stream`. A `message` event carries the MLS message as
//! raw bytes; every other kind travels as its JSON text, unchanged.
//!
//! A message whose MLS header (a PrivateMessage's `group_id` and `epoch`)
//! names the event's channel and epoch travels as a `compact_message`
//! frame: cursor, seq, received_at and the message, 20–23 bytes above it
//! (the receiver reads the channel and epoch from the header, and learns
//! the sender from MLS when it decrypts). Any other message travels as a
//! `message` frame with every field explicit.
//!
//! ```
//! use kith_proto::events::{EventFrame, MessageEvent, decode_frames, encode_frame};
//! use kith_proto::{ChannelId, DeviceId};
//!
//! // An MLS PrivateMessage's header: mls10, private message, a 16-byte
//! // group id (the channel), epoch 2; then its other fields.
//! let channel = ChannelId::from_bytes([1; 16]);
//! let mut message = vec![0, 1, 0, 2, 16];
//! message.extend(channel.as_bytes());
//! message.extend(2u64.to_be_bytes());
//! message.extend(b"content type, aad, sender data, ciphertext");
//! let event = MessageEvent {
//!     channel,
//!     seq: 3,
//!     epoch: 2,
//!     received_at: 1_790_000_000_000,
//!     sender: DeviceId::from_bytes([2; 32]),
//!     message: message.clone(),
//! };
//! let frame = EventFrame::message(7, event);
//! assert!(matches!(frame, EventFrame::Compact { .. }));
//! let mut body = Vec::new();
//! encode_frame(&frame, &mut body);
//! // cursor 8, kind 1, seq 1, received_at 8, length 2 (71 bytes): 20
//! // bytes above the message.
//! assert_eq!(body.len(), 20 + message.len());
//! assert_eq!(decode_frames(&body)?, vec![frame]);
//! # Ok::<(), kith_proto::DecodeError>(())
//! ```

use crate::codec::DecodeError;
use crate::{ChannelId, DeviceId};

/// The media type of a binary event list and of a binary message body.
pub const OCTET_STREAM: &str = "application/octet-stream";

const KIND_JSON: u8 = 0;
const KIND_MESSAGE: u8 = 1;
const KIND_COMPACT: u8 = 2;
const NAME: &str = "EventFrame";

/// The largest value of a QUIC variable-length integer (RFC 9000 §16).
const VARINT_MAX: u64 = (1 << 62) - 1;

/// MLS `ProtocolVersion` mls10 and `WireFormat` mls_private_message
/// (RFC 9420 §6).
const MLS10: u16 = 1;
const MLS_PRIVATE_MESSAGE: u16 = 2;

/// The channel and epoch an MLSMessage names in its clear header, if it is
/// a PrivateMessage of MLS 1.0 whose `group_id` is 16 bytes (a Kith
/// channel id): `uint16 version; uint16 wire_format; opaque group_id<V>;
/// uint64 epoch` (RFC 9420 §6 and §6.3.1). Only the header is read: it
/// says nothing about whether the rest is valid, which only decryption
/// tells.
pub fn private_message_header(message: &[u8]) -> Option<(ChannelId, u64)> {
    let mut reader = Reader { rest: message };
    let version = u16::from_be_bytes(reader.array().ok()?);
    let wire_format = u16::from_be_bytes(reader.array().ok()?);
    if version != MLS10 || wire_format != MLS_PRIVATE_MESSAGE {
        return None;
    }
    let group_id: [u8; 16] = reader.vector().ok()?.try_into().ok()?;
    let epoch = reader.u64().ok()?;
    Some((ChannelId::from_bytes(group_id), epoch))
}

/// A `message` event's fields (spec §6.8), with the MLS message as bytes.
/// The MessageId is not sent: the receiver computes it from `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageEvent {
    /// The channel.
    pub channel: ChannelId,
    /// The message's position in the channel.
    pub seq: u64,
    /// The epoch the sender named.
    pub epoch: u64,
    /// When the server accepted it (ms since the Unix epoch).
    pub received_at: u64,
    /// The sending device, as the server authenticated it.
    pub sender: DeviceId,
    /// The MLSMessage (a PrivateMessage), opaque to the server.
    pub message: Vec<u8>,
}

/// A `message` event whose channel and epoch are those its MLS message's
/// header names (spec §6.8, `compact_message`). Built only through
/// [`CompactMessage::new`], which reads them from the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactMessage {
    channel: ChannelId,
    epoch: u64,
    /// The message's position in the channel.
    pub seq: u64,
    /// When the server accepted it (ms since the Unix epoch).
    pub received_at: u64,
    message: Vec<u8>,
}

impl CompactMessage {
    /// The compact form of a message, if its MLS header names a channel
    /// and an epoch (see [`private_message_header`]) and `seq` fits a
    /// variable-length integer.
    pub fn new(seq: u64, received_at: u64, message: Vec<u8>) -> Option<Self> {
        let (channel, epoch) = private_message_header(&message)?;
        (seq <= VARINT_MAX).then_some(Self {
            channel,
            epoch,
            seq,
            received_at,
            message,
        })
    }

    /// The channel, from the MLS header.
    pub fn channel(&self) -> ChannelId {
        self.channel
    }

    /// The epoch, from the MLS header.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The MLSMessage.
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// The MLSMessage, taken out.
    pub fn into_message(self) -> Vec<u8> {
        self.message
    }
}

/// One event of a binary event list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFrame {
    /// Any event but `message`: its JSON object text, exactly as the JSON
    /// form of the stream has it (with `cursor` and `kind`).
    Json {
        /// The event's cursor.
        cursor: u64,
        /// The JSON object, as UTF-8 text.
        json: String,
    },
    /// A `message` event with every field explicit.
    Message {
        /// The event's cursor.
        cursor: u64,
        /// Its fields.
        event: MessageEvent,
    },
    /// A `message` event whose channel and epoch are in its MLS header
    /// and whose sender is left to MLS.
    Compact {
        /// The event's cursor.
        cursor: u64,
        /// Its fields.
        event: CompactMessage,
    },
}

impl EventFrame {
    /// The event's cursor.
    pub fn cursor(&self) -> u64 {
        match self {
            Self::Json { cursor, .. }
            | Self::Message { cursor, .. }
            | Self::Compact { cursor, .. } => *cursor,
        }
    }

    /// The frame a server sends for a `message` event (spec §6.8):
    /// `compact_message` when the MLS header names the event's channel and
    /// epoch, else `message`. The sender is dropped in the compact form: a
    /// receiver takes it from MLS, which authenticates it.
    pub fn message(cursor: u64, event: MessageEvent) -> Self {
        if private_message_header(&event.message) == Some((event.channel, event.epoch))
            && let Some(compact) =
                CompactMessage::new(event.seq, event.received_at, event.message.clone())
        {
            return Self::Compact {
                cursor,
                event: compact,
            };
        }
        Self::Message { cursor, event }
    }
}

/// Appends the QUIC variable-length integer of `value` (shortest form;
/// `value` is at most [`VARINT_MAX`]).
fn put_varint(value: u64, out: &mut Vec<u8>) {
    match value {
        0..=63 => out.push(value as u8),
        64..=16_383 => out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes()),
        16_384..=0x3fff_ffff => {
            out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes())
        }
        _ => out.extend_from_slice(&((value & VARINT_MAX) | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}

/// Appends the QUIC variable-length integer of `len` (shortest form, at
/// most 4 bytes: spec §2.1).
fn put_length(len: usize, out: &mut Vec<u8>) {
    match len {
        0..=63 => out.push(len as u8),
        64..=16_383 => out.extend_from_slice(&((len as u16) | 0x4000).to_be_bytes()),
        _ => out.extend_from_slice(&((len as u32 & 0x3fff_ffff) | 0x8000_0000).to_be_bytes()),
    }
}

/// Appends one frame's encoding to `out`.
///
/// Lengths are below 2^30 for every frame a server makes (its bodies are
/// limited to a few MiB); a longer one is cut to its low 30 bits, which a
/// decoder then rejects, so it can never be misread.
pub fn encode_frame(frame: &EventFrame, out: &mut Vec<u8>) {
    match frame {
        EventFrame::Json { cursor, json } => {
            out.extend_from_slice(&cursor.to_be_bytes());
            out.push(KIND_JSON);
            put_length(json.len(), out);
            out.extend_from_slice(json.as_bytes());
        }
        EventFrame::Message { cursor, event } => {
            out.extend_from_slice(&cursor.to_be_bytes());
            out.push(KIND_MESSAGE);
            out.extend_from_slice(event.channel.as_bytes());
            out.extend_from_slice(&event.seq.to_be_bytes());
            out.extend_from_slice(&event.epoch.to_be_bytes());
            out.extend_from_slice(&event.received_at.to_be_bytes());
            out.extend_from_slice(event.sender.as_bytes());
            put_length(event.message.len(), out);
            out.extend_from_slice(&event.message);
        }
        EventFrame::Compact { cursor, event } => {
            out.extend_from_slice(&cursor.to_be_bytes());
            out.push(KIND_COMPACT);
            put_varint(event.seq, out);
            out.extend_from_slice(&event.received_at.to_be_bytes());
            put_length(event.message.len(), out);
            out.extend_from_slice(&event.message);
        }
    }
}

fn malformed(reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        kind: NAME,
        reason: reason.into(),
    }
}

/// Reads fields off the front of an untrusted byte string.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(malformed("input ended early"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    /// A QUIC variable-length integer of any of its four sizes, in its
    /// shortest form.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let first = self.u8()?;
        let (size, min) = match first >> 6 {
            0 => (1, 0),
            1 => (2, 64),
            2 => (4, 16_384),
            _ => (8, 1 << 30),
        };
        let mut value = u64::from(first & 0x3f);
        for &byte in self.take(size - 1)? {
            value = value << 8 | u64::from(byte);
        }
        if value < min {
            return Err(malformed("a variable-length integer that is not minimal"));
        }
        Ok(value)
    }

    /// An `opaque<V>`: a minimal QUIC length prefix, then the bytes.
    fn vector(&mut self) -> Result<&'a [u8], DecodeError> {
        let first = self.u8()?;
        let (len, min) = match first >> 6 {
            0 => (usize::from(first), 0),
            1 => (
                usize::from(u16::from_be_bytes([first & 0x3f, self.u8()?])),
                64,
            ),
            2 => {
                let rest: [u8; 3] = self.array()?;
                let value = u32::from_be_bytes([first & 0x3f, rest[0], rest[1], rest[2]]);
                (value as usize, 16_384)
            }
            _ => return Err(malformed("an 8-byte length prefix")),
        };
        if len < min {
            return Err(malformed("a length prefix that is not minimal"));
        }
        self.take(len)
    }
}

/// Decodes a whole binary event list: frames back to back, nothing after
/// the last one.
pub fn decode_frames(bytes: &[u8]) -> Result<Vec<EventFrame>, DecodeError> {
    let mut reader = Reader { rest: bytes };
    let mut frames = Vec::new();
    // Each frame takes at least 10 bytes, so this ends.
    while !reader.rest.is_empty() {
        let cursor = reader.u64()?;
        let frame = match reader.u8()? {
            KIND_JSON => {
                let text = reader.vector()?;
                let json = std::str::from_utf8(text)
                    .map_err(|_| malformed("a JSON event that is not UTF-8"))?
                    .to_owned();
                EventFrame::Json { cursor, json }
            }
            KIND_MESSAGE => {
                let channel = ChannelId::from_bytes(reader.array()?);
                let seq = reader.u64()?;
                let epoch = reader.u64()?;
                let received_at = reader.u64()?;
                let sender = DeviceId::from_bytes(reader.array()?);
                let message = reader.vector()?.to_vec();
                EventFrame::Message {
                    cursor,
                    event: MessageEvent {
                        channel,
                        seq,
                        epoch,
                        received_at,
                        sender,
                        message,
                    },
                }
            }
            KIND_COMPACT => {
                let seq = reader.varint()?;
                let received_at = reader.u64()?;
                let message = reader.vector()?.to_vec();
                let event = CompactMessage::new(seq, received_at, message).ok_or_else(|| {
                    malformed("a compact message whose MLS header names no channel and epoch")
                })?;
                EventFrame::Compact { cursor, event }
            }
            other => return Err(malformed(format!("unknown frame kind {other}"))),
        };
        frames.push(frame);
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> EventFrame {
        EventFrame::Message {
            cursor: 1 << 40,
            event: MessageEvent {
                channel: ChannelId::from_bytes([0xab; 16]),
                seq: 9,
                epoch: 4,
                received_at: 1_790_000_000_000,
                sender: DeviceId::from_bytes([0xcd; 32]),
                message: vec![7; len],
            },
        }
    }

    #[test]
    fn round_trips_every_length_prefix_size() {
        for len in [0, 63, 64, 16_383, 16_384, 300_000] {
            let frames = vec![
                message(len),
                EventFrame::Json {
                    cursor: 12,
                    json: r#"{"cursor":12,"kind":"inbox"}"#.into(),
                },
            ];
            let mut body = Vec::new();
            for f in &frames {
                encode_frame(f, &mut body);
            }
            assert_eq!(decode_frames(&body), Ok(frames));
        }
    }

    #[test]
    fn message_frame_is_byte_exact() {
        let mut body = Vec::new();
        encode_frame(&message(2), &mut body);
        let mut expected = vec![0, 0, 1, 0, 0, 0, 0, 0, 1];
        expected.extend([0xab; 16]);
        expected.extend(9u64.to_be_bytes());
        expected.extend(4u64.to_be_bytes());
        expected.extend(1_790_000_000_000u64.to_be_bytes());
        expected.extend([0xcd; 32]);
        expected.extend([2, 7, 7]);
        assert_eq!(body, expected);
    }

    #[test]
    fn rejects_truncation_unknown_kinds_and_long_prefixes() {
        let mut body = Vec::new();
        encode_frame(&message(100), &mut body);
        for cut in 1..body.len() {
            assert!(decode_frames(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut unknown = body.clone();
        unknown[8] = 3;
        assert!(decode_frames(&unknown).is_err());
        // 5 bytes of JSON with a 2-byte prefix: not minimal.
        let mut long = vec![0; 8];
        long.extend([0, 0x40, 5]);
        long.extend(b"{}{}{");
        assert!(decode_frames(&long).is_err());
        let mut eight = vec![0; 8];
        eight.extend([0, 0xc0, 0, 0, 0, 0, 0, 0, 1, b'x']);
        assert!(decode_frames(&eight).is_err());
    }

    /// An MLS PrivateMessage header for `channel` at `epoch`, then `rest`.
    fn private_message(channel: [u8; 16], epoch: u64, rest: &[u8]) -> Vec<u8> {
        let mut m = vec![0, 1, 0, 2, 16];
        m.extend(channel);
        m.extend(epoch.to_be_bytes());
        m.extend(rest);
        m
    }

    fn explicit(channel: [u8; 16], epoch: u64, seq: u64, message: Vec<u8>) -> MessageEvent {
        MessageEvent {
            channel: ChannelId::from_bytes(channel),
            seq,
            epoch,
            received_at: 1_790_000_000_000,
            sender: DeviceId::from_bytes([0xcd; 32]),
            message,
        }
    }

    #[test]
    fn compact_frame_is_byte_exact() {
        let message = private_message([0xab; 16], 4, &[9, 9]);
        let frame = EventFrame::message(1 << 40, explicit([0xab; 16], 4, 9, message.clone()));
        let EventFrame::Compact { event, .. } = &frame else {
            panic!("expected a compact frame, got {frame:?}");
        };
        assert_eq!(
            (event.channel(), event.epoch(), event.seq),
            (ChannelId::from_bytes([0xab; 16]), 4, 9)
        );
        let mut body = Vec::new();
        encode_frame(&frame, &mut body);
        let mut expected = vec![0, 0, 1, 0, 0, 0, 0, 0, 2, 9];
        expected.extend(1_790_000_000_000u64.to_be_bytes());
        expected.push(message.len() as u8);
        expected.extend(&message);
        assert_eq!(body, expected);
        assert_eq!(decode_frames(&body), Ok(vec![frame]));
    }

    #[test]
    fn compact_round_trips_every_seq_size() {
        for seq in [
            0,
            63,
            64,
            16_383,
            16_384,
            (1 << 30) - 1,
            1 << 30,
            VARINT_MAX,
        ] {
            let message = private_message([1; 16], 7, &[0; 1200]);
            let frame = EventFrame::message(5, explicit([1; 16], 7, seq, message));
            assert!(matches!(frame, EventFrame::Compact { .. }), "seq {seq}");
            let mut body = Vec::new();
            encode_frame(&frame, &mut body);
            assert_eq!(decode_frames(&body), Ok(vec![frame]), "seq {seq}");
        }
    }

    #[test]
    fn a_message_its_header_does_not_describe_travels_explicit() {
        let right = private_message([1; 16], 7, b"x");
        for event in [
            explicit([2; 16], 7, 1, right.clone()), // another channel
            explicit([1; 16], 8, 1, right.clone()), // another epoch
            explicit([1; 16], 7, 1 << 62, right),   // seq beyond a varint
            explicit([1; 16], 7, 1, b"not MLS".to_vec()),
            explicit([1; 16], 7, 1, {
                let mut public = private_message([1; 16], 7, b"x");
                public[3] = 1; // a PublicMessage
                public
            }),
        ] {
            let frame = EventFrame::message(3, event.clone());
            assert_eq!(frame, EventFrame::Message { cursor: 3, event });
        }
    }

    #[test]
    fn rejects_compact_frames_without_a_header_or_with_long_varints() {
        let good = {
            let mut body = Vec::new();
            let message = private_message([1; 16], 7, b"x");
            encode_frame(
                &EventFrame::message(3, explicit([1; 16], 7, 1, message)),
                &mut body,
            );
            body
        };
        for cut in 1..good.len() {
            assert!(decode_frames(&good[..cut]).is_err(), "cut at {cut}");
        }
        // The header's wire format says PublicMessage: not compact.
        let mut public = good.clone();
        public[9 + 1 + 8 + 1 + 3] = 1;
        assert!(decode_frames(&public).is_err());
        // seq 1 in a 2-byte varint: not minimal.
        let mut long = good[..9].to_vec();
        long.extend([0x40, 1]);
        long.extend(&good[10..]);
        assert!(decode_frames(&long).is_err());
    }
}
