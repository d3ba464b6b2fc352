//! The binary form of the event stream (spec §6.8, "Binary events"): the
//! frames a homeserver sends instead of JSON when the client asks for
//! `application/octet-stream`. A `message` event carries the MLS message as
//! raw bytes beside fixed-width fields; every other kind travels as its JSON
//! text, unchanged.
//!
//! ```
//! use kith_proto::events::{EventFrame, MessageEvent, decode_frames, encode_frame};
//! use kith_proto::{ChannelId, DeviceId};
//!
//! let frame = EventFrame::Message {
//!     cursor: 7,
//!     event: MessageEvent {
//!         channel: ChannelId::from_bytes([1; 16]),
//!         seq: 3,
//!         epoch: 2,
//!         received_at: 1_790_000_000_000,
//!         sender: DeviceId::from_bytes([2; 32]),
//!         message: b"an MLS message".to_vec(),
//!     },
//! };
//! let mut body = Vec::new();
//! encode_frame(&frame, &mut body);
//! assert_eq!(body.len(), 8 + 1 + 16 + 8 + 8 + 8 + 32 + 1 + 14);
//! assert_eq!(decode_frames(&body)?, vec![frame]);
//! # Ok::<(), kith_proto::DecodeError>(())
//! ```

use crate::codec::DecodeError;
use crate::{ChannelId, DeviceId};

/// The media type of a binary event list and of a binary message body.
pub const OCTET_STREAM: &str = "application/octet-stream";

const KIND_JSON: u8 = 0;
const KIND_MESSAGE: u8 = 1;
const NAME: &str = "EventFrame";

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
    /// A `message` event.
    Message {
        /// The event's cursor.
        cursor: u64,
        /// Its fields.
        event: MessageEvent,
    },
}

impl EventFrame {
    /// The event's cursor.
    pub fn cursor(&self) -> u64 {
        match self {
            Self::Json { cursor, .. } | Self::Message { cursor, .. } => *cursor,
        }
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
        unknown[8] = 2;
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
}
