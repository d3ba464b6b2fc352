//! The body of a multi-message send (spec §6.7, "Send several messages,
//! binary"): several MLS PrivateMessages of one channel and epoch in one
//! request, so that the homeserver stores them in one transaction with one
//! disk sync, at consecutive positions in the channel's log, in the order
//! of the body.
//!
//! The body is a sequence of messages, each a 4-byte big-endian length
//! `L` followed by `L` bytes of `MLSMessage`, with nothing before, between
//! or after them: 4 bytes above each message.
//!
//! ```
//! use kith_proto::batch::{decode_batch, encode_batch};
//!
//! let body = encode_batch([&b"first"[..], &b"second"[..]]);
//! assert_eq!(body.len(), 4 + 5 + 4 + 6);
//! assert_eq!(&body[..4], &[0, 0, 0, 5]);
//! let messages = decode_batch(&body, 64, 1024)?;
//! assert_eq!(messages, vec![&b"first"[..], &b"second"[..]]);
//! # Ok::<(), kith_proto::batch::BatchError>(())
//! ```

/// The media type of a multi-message send body.
pub const MESSAGE_BATCH: &str = "application/vnd.kith.message-batch";

/// The most messages one multi-message send may hold (v0 default of the
/// reference server's `max_batch_messages`, spec §6.9).
pub const MAX_BATCH_MESSAGES: usize = 64;

/// Bytes of framing above each message of a batch.
pub const FRAME_OVERHEAD: usize = 4;

/// Why a batch body is refused. `index` counts messages from 0.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The body holds no message at all.
    #[error("the batch holds no message")]
    Empty,
    /// More messages than the limit.
    #[error("the batch holds more than {limit} messages")]
    TooMany {
        /// The most messages a batch may hold.
        limit: usize,
    },
    /// A message of length 0.
    #[error("message {index} of the batch is empty")]
    EmptyMessage {
        /// Which message.
        index: usize,
    },
    /// A message over the size limit.
    #[error("message {index} of the batch is {len} bytes; the limit is {limit}")]
    MessageTooLarge {
        /// Which message.
        index: usize,
        /// Its length as framed.
        len: usize,
        /// The most bytes a message may have.
        limit: usize,
    },
    /// The body ends inside a message's length or bytes.
    #[error("the batch ends inside message {index}")]
    Truncated {
        /// Which message.
        index: usize,
    },
}

impl BatchError {
    /// Whether the refusal is about size (HTTP 413) rather than shape (400).
    pub fn is_too_large(&self) -> bool {
        matches!(self, Self::TooMany { .. } | Self::MessageTooLarge { .. })
    }

    /// The message the refusal is about, if it is about one.
    pub fn index(&self) -> Option<usize> {
        match self {
            Self::EmptyMessage { index }
            | Self::MessageTooLarge { index, .. }
            | Self::Truncated { index } => Some(*index),
            Self::Empty | Self::TooMany { .. } => None,
        }
    }
}

/// The body carrying `messages`, in order.
///
/// # Panics
///
/// If a message is 4 GiB or longer (no MLS message a client makes is).
pub fn encode_batch<'a>(messages: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    for message in messages {
        #[allow(clippy::expect_used)]
        let len = u32::try_from(message.len()).expect("a message under 4 GiB");
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(message);
    }
    body
}

/// The messages of a batch body, in order, each 1 to `max_message_bytes`
/// bytes, at most `max_messages` of them. Refuses the whole body at the
/// first fault; nothing in it is interpreted beyond its framing.
pub fn decode_batch(
    body: &[u8],
    max_messages: usize,
    max_message_bytes: usize,
) -> Result<Vec<&[u8]>, BatchError> {
    if body.is_empty() {
        return Err(BatchError::Empty);
    }
    let mut messages = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let index = messages.len();
        if index == max_messages {
            return Err(BatchError::TooMany {
                limit: max_messages,
            });
        }
        let (len, after) = rest
            .split_first_chunk::<FRAME_OVERHEAD>()
            .ok_or(BatchError::Truncated { index })?;
        // On a 16-bit target a length over `usize` is over any limit too.
        let len = usize::try_from(u32::from_be_bytes(*len)).unwrap_or(usize::MAX);
        if len == 0 {
            return Err(BatchError::EmptyMessage { index });
        }
        if len > max_message_bytes {
            return Err(BatchError::MessageTooLarge {
                index,
                len,
                limit: max_message_bytes,
            });
        }
        let (message, after) = after
            .split_at_checked(len)
            .ok_or(BatchError::Truncated { index })?;
        messages.push(message);
        rest = after;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn round_trip_keeps_order() {
        let parts: Vec<Vec<u8>> = (1..=5u8).map(|n| vec![n; usize::from(n) * 3]).collect();
        let body = encode_batch(parts.iter().map(Vec::as_slice));
        let decoded = decode_batch(&body, 5, 15).unwrap();
        assert_eq!(decoded, parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    #[test]
    fn refusals_name_the_message() {
        let two = encode_batch([&b"ab"[..], &b"cde"[..]]);
        assert_eq!(decode_batch(&[], 4, 8), Err(BatchError::Empty));
        assert_eq!(
            decode_batch(&two, 1, 8),
            Err(BatchError::TooMany { limit: 1 })
        );
        assert_eq!(
            decode_batch(&two, 4, 2),
            Err(BatchError::MessageTooLarge {
                index: 1,
                len: 3,
                limit: 2
            })
        );
        for cut in [1, 3, 7, two.len() - 1] {
            let index = usize::from(cut > 6);
            assert_eq!(
                decode_batch(&two[..cut], 4, 8),
                Err(BatchError::Truncated { index }),
                "cut at {cut}"
            );
        }
        let mut zero = two.clone();
        zero.extend([0, 0, 0, 0]);
        assert_eq!(
            decode_batch(&zero, 4, 8),
            Err(BatchError::EmptyMessage { index: 2 })
        );
        let huge = [0xff, 0xff, 0xff, 0xff, 1];
        assert!(decode_batch(&huge, 4, 8).unwrap_err().is_too_large());
    }
}
