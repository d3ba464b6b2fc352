//! The Kith chat protocol, content type `application/vnd.kith.chat.v1`: the
//! messages an application sends through a Kith channel (text, emotes,
//! notices, edits, deletes, reactions, attachments, typing, read markers)
//! and the pure function that folds a set of them into the timeline a
//! client shows. No I/O, no clock, no async.
//!
//! [`ChatMessage::decode`] takes untrusted bytes and never panics; a kind it
//! does not know decodes as [`ChatMessage::Unknown`] and re-encodes byte for
//! byte. [`fold`] gives the same [`Timeline`] whatever the order in which
//! entries arrived and however often each did.
//!
//! ```
//! use kith_chat::{Body, ChatMessage, Edit, Entry, MessageRef, Moderators, RichText, Text, fold};
//! use kith_proto::DeviceId;
//!
//! let hello = ChatMessage::Text(Text::new(RichText::plain("hello")?));
//! let bytes = hello.encode(); // the whole channel payload
//! assert_eq!(ChatMessage::decode(&bytes)?, hello);
//!
//! let phone = DeviceId::from_bytes([7; 32]);
//! let (first, second) = (MessageRef::from_bytes([1; 32]), MessageRef::from_bytes([2; 32]));
//! let replacement = RichText::plain("hello, world")?;
//! let fix = ChatMessage::Edit(Edit { target: first, replacement });
//!
//! // The edit arrived first; the result is the same.
//! let entries = [
//!     Entry::new(second, "alice", phone, 2, fix),
//!     Entry::decode(first, "alice", phone, 1, &bytes),
//! ];
//! let timeline = fold(&entries, &Moderators::none());
//! let item = &timeline.items[0];
//! assert!(matches!(&item.body, Body::Text(t) if t.text() == "hello, world"));
//! assert!(item.edited());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod fold;
pub mod message;

pub use fold::{Body, Entry, Item, ModerationPolicy, Moderators, ReactionGroup, Timeline, fold};
pub use message::{
    Attachment, AttachmentFields, CONTENT_TYPE, ChatMessage, ContentError, Delete, Edit,
    MessageRef, Reaction, ReactionKey, ReactionOp, ReadMarker, RichText, Text, TextFormat,
    Thumbnail, Typing, Unknown, kind,
};
