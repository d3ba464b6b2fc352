//! The `application/vnd.kith.chat.v1` content type: one [`ChatMessage`] is
//! the whole payload of a channel message (Kith adds no framing).
//!
//! ```text
//! struct {
//!     uint16 version;      // 0
//!     uint16 kind;         // ChatKind; unknown kinds are kept as Unknown
//!     opaque body<V>;      // the kind's body, below
//! } ChatMessage;           // at most 64 KiB
//! ```
//!
//! Bodies use the TLS presentation language as MLS does (RFC 9420 §2.1):
//! big-endian integers, `optional<T>` as a `uint8` 0/1 then `T`, vectors
//! with a minimal variable-length prefix. Each body must fill its `body`
//! exactly. See `docs/spec.md` §17 for every layout.

use std::fmt;
use std::str::FromStr;

use kith_proto::codec::{WireObject, decode};
use kith_proto::{DecodeError, Handle, IdError, PROTOCOL_VERSION};
use tls_codec::{DeserializeBytes, TlsDeserializeBytes, TlsSerializeBytes, TlsSize, VLBytes};

/// The channel content type this crate implements.
pub const CONTENT_TYPE: &str = "application/vnd.kith.chat.v1";
/// Largest encoded [`ChatMessage`], envelope included.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// Largest message text, in UTF-8 bytes.
pub const MAX_TEXT_LEN: usize = 16 * 1024;
/// Most mentions in one text.
pub const MAX_MENTIONS: usize = 64;
/// Largest reaction key, in UTF-8 bytes.
pub const MAX_REACTION_KEY_LEN: usize = 64;
/// Largest inline thumbnail, in bytes.
pub const MAX_THUMBNAIL_LEN: usize = 8 * 1024;
/// Largest file reference (a `FileId` or a URL-like locator), in bytes.
pub const MAX_FILE_REF_LEN: usize = 1024;
/// Largest file key, in bytes.
pub const MAX_FILE_KEY_LEN: usize = 64;
/// Largest file name, in UTF-8 bytes.
pub const MAX_FILE_NAME_LEN: usize = 255;
/// Largest media type (`type/subtype`), in bytes.
pub const MAX_MEDIA_TYPE_LEN: usize = 127;
/// Largest body of an unknown kind: whatever fits in [`MAX_MESSAGE_LEN`]
/// after the version, the kind and a 4-byte length.
pub const MAX_UNKNOWN_BODY_LEN: usize = MAX_MESSAGE_LEN - 8;

/// The wire numbers of the kinds this implementation knows.
pub mod kind {
    /// [`ChatMessage::Text`](super::ChatMessage::Text).
    pub const TEXT: u16 = 1;
    /// [`ChatMessage::Edit`](super::ChatMessage::Edit).
    pub const EDIT: u16 = 2;
    /// [`ChatMessage::Delete`](super::ChatMessage::Delete).
    pub const DELETE: u16 = 3;
    /// [`ChatMessage::Reaction`](super::ChatMessage::Reaction).
    pub const REACTION: u16 = 4;
    /// [`ChatMessage::Attachment`](super::ChatMessage::Attachment).
    pub const ATTACHMENT: u16 = 5;
    /// [`ChatMessage::Emote`](super::ChatMessage::Emote).
    pub const EMOTE: u16 = 6;
    /// [`ChatMessage::Notice`](super::ChatMessage::Notice).
    pub const NOTICE: u16 = 7;
    /// [`ChatMessage::Typing`](super::ChatMessage::Typing).
    pub const TYPING: u16 = 8;
    /// [`ChatMessage::ReadMarker`](super::ChatMessage::ReadMarker).
    pub const READ_MARKER: u16 = 9;
    /// Reserved for the file re-upload request (design §10), not yet
    /// implemented: it decodes as an unknown kind.
    pub const REUPLOAD_REQUEST: u16 = 10;

    /// Whether `kind` is one this implementation decodes.
    pub fn is_known(kind: u16) -> bool {
        (TEXT..=READ_MARKER).contains(&kind)
    }
}

/// Why a chat message or one of its parts could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    /// A field is longer than its limit.
    #[error("{field} is {len} bytes, the limit is {limit}")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Its limit.
        limit: usize,
    },
    /// A field that must not be empty is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// More mentions than [`MAX_MENTIONS`].
    #[error("{0} mentions, the limit is {MAX_MENTIONS}")]
    TooManyMentions(usize),
    /// A media type that is not printable ASCII `type/subtype`.
    #[error("media type {0:?} is not printable ASCII type/subtype")]
    BadMediaType(String),
    /// [`Unknown`] cannot carry a kind this implementation knows: it would
    /// not decode back to itself.
    #[error("kind {0} is known and cannot be carried as an unknown kind")]
    KnownKind(u16),
}

fn check_len(field: &'static str, len: usize, limit: usize) -> Result<(), ContentError> {
    if len > limit {
        return Err(ContentError::TooLong { field, len, limit });
    }
    Ok(())
}

fn check_media_type(field: &'static str, media_type: &str) -> Result<(), ContentError> {
    check_len(field, media_type.len(), MAX_MEDIA_TYPE_LEN)?;
    let printable = media_type.bytes().all(|b| b.is_ascii_graphic());
    match media_type.split_once('/') {
        Some((ty, sub)) if printable && !ty.is_empty() && !sub.is_empty() => Ok(()),
        _ => Err(ContentError::BadMediaType(media_type.to_owned())),
    }
}

/// A chat message's id: the 32-byte `MessageId` the homeserver assigns to
/// the carrying MLS (or unencrypted) message. Opaque here. Text form: 64
/// lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageRef([u8; 32]);

impl MessageRef {
    /// The id of the carrier message whose encoding is `message`
    /// ([`kith_proto::sign::message_id`]).
    pub fn of(message: &[u8]) -> Self {
        Self(kith_proto::sign::message_id(message))
    }

    /// An id from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for MessageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageRef({self})")
    }
}

impl FromStr for MessageRef {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| IdError::BadHex(64))?;
        Ok(Self(bytes))
    }
}

/// How a text is to be rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TextFormat {
    /// Shown as is.
    Plain,
    /// CommonMark; raw HTML in it is not rendered.
    Markdown,
}

impl TextFormat {
    fn to_u8(self) -> u8 {
        match self {
            TextFormat::Plain => 0,
            TextFormat::Markdown => 1,
        }
    }

    fn from_u8(n: u8) -> Option<Self> {
        match n {
            0 => Some(TextFormat::Plain),
            1 => Some(TextFormat::Markdown),
            _ => None,
        }
    }
}

/// Formatted text with the users it mentions: the content of a text, emote
/// or notice, the replacement in an edit, and an attachment's caption.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RichText {
    format: TextFormat,
    text: String,
    mentions: Vec<Handle>,
}

impl RichText {
    /// Text in `format` mentioning `mentions` (at most [`MAX_MENTIONS`]);
    /// the text is at most [`MAX_TEXT_LEN`] bytes.
    pub fn new(
        format: TextFormat,
        text: impl Into<String>,
        mentions: Vec<Handle>,
    ) -> Result<Self, ContentError> {
        let text = text.into();
        check_len("text", text.len(), MAX_TEXT_LEN)?;
        if mentions.len() > MAX_MENTIONS {
            return Err(ContentError::TooManyMentions(mentions.len()));
        }
        Ok(Self {
            format,
            text,
            mentions,
        })
    }

    /// Plain text without mentions.
    pub fn plain(text: impl Into<String>) -> Result<Self, ContentError> {
        Self::new(TextFormat::Plain, text, vec![])
    }

    /// Markdown without mentions.
    pub fn markdown(text: impl Into<String>) -> Result<Self, ContentError> {
        Self::new(TextFormat::Markdown, text, vec![])
    }

    /// How to render the text.
    pub fn format(&self) -> TextFormat {
        self.format
    }

    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The users mentioned, in the sender's order.
    pub fn mentions(&self) -> &[Handle] {
        &self.mentions
    }
}

/// A text, emote or notice: the content and where it sits in a
/// conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Text {
    /// What it says.
    pub content: RichText,
    /// The message this one replies to.
    pub reply_to: Option<MessageRef>,
    /// The root message of the thread this one belongs to.
    pub thread: Option<MessageRef>,
}

impl Text {
    /// A message that is neither a reply nor in a thread.
    pub fn new(content: RichText) -> Self {
        Self {
            content,
            reply_to: None,
            thread: None,
        }
    }
}

/// Replaces the content of an earlier text, emote or notice, or the caption
/// of an attachment, by the same user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Edit {
    /// The message edited (never an edit: edits always name the original).
    pub target: MessageRef,
    /// The new content.
    pub replacement: RichText,
}

/// Hides an earlier message, leaving a tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Delete {
    /// The message deleted.
    pub target: MessageRef,
}

/// A reaction key: an emoji or a short text, 1 to
/// [`MAX_REACTION_KEY_LEN`] bytes of UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReactionKey(String);

impl ReactionKey {
    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ReactionKey {
    type Err = ContentError;

    fn from_str(s: &str) -> Result<Self, ContentError> {
        if s.is_empty() {
            return Err(ContentError::Empty("reaction key"));
        }
        check_len("reaction key", s.len(), MAX_REACTION_KEY_LEN)?;
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for ReactionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a reaction is put on or taken off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReactionOp {
    /// The user reacts with the key.
    Add,
    /// The user takes the reaction back.
    Remove,
}

/// A user's reaction to a message, or its removal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reaction {
    /// The message reacted to.
    pub target: MessageRef,
    /// The emoji or text.
    pub key: ReactionKey,
    /// Put on or taken off.
    pub op: ReactionOp,
}

/// A small preview shown before the file is fetched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Thumbnail {
    /// Its media type, e.g. `image/webp`.
    pub media_type: String,
    /// The image, at most [`MAX_THUMBNAIL_LEN`] bytes.
    pub data: Vec<u8>,
}

/// What an attachment says about its file; checked by [`Attachment::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AttachmentFields {
    /// Where the ciphertext is: a `FileId` in the channel's file repository
    /// or a URL-like locator; 1 to [`MAX_FILE_REF_LEN`] bytes, opaque here.
    pub file: Vec<u8>,
    /// The single-use key the file is encrypted with (at most
    /// [`MAX_FILE_KEY_LEN`] bytes; empty for a file stored in clear).
    pub key: Vec<u8>,
    /// SHA-256 of the plaintext.
    pub sha256: [u8; 32],
    /// Size of the plaintext in bytes.
    pub size: u64,
    /// The file's name, at most [`MAX_FILE_NAME_LEN`] bytes of UTF-8.
    pub name: String,
    /// Its media type, e.g. `image/png`.
    pub media_type: String,
    /// An optional inline preview.
    pub thumbnail: Option<Thumbnail>,
    /// An optional caption; an edit replaces it.
    pub caption: Option<RichText>,
}

/// A reference to an uploaded file, with what is needed to fetch, decrypt
/// and check it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attachment(AttachmentFields);

impl Attachment {
    /// Checks every field against its limit.
    pub fn new(fields: AttachmentFields) -> Result<Self, ContentError> {
        if fields.file.is_empty() {
            return Err(ContentError::Empty("file reference"));
        }
        check_len("file reference", fields.file.len(), MAX_FILE_REF_LEN)?;
        check_len("file key", fields.key.len(), MAX_FILE_KEY_LEN)?;
        check_len("file name", fields.name.len(), MAX_FILE_NAME_LEN)?;
        check_media_type("media type", &fields.media_type)?;
        if let Some(thumbnail) = &fields.thumbnail {
            check_media_type("thumbnail media type", &thumbnail.media_type)?;
            check_len("thumbnail", thumbnail.data.len(), MAX_THUMBNAIL_LEN)?;
        }
        Ok(Self(fields))
    }

    /// The fields.
    pub fn fields(&self) -> &AttachmentFields {
        &self.0
    }

    /// The same attachment with another caption (what an edit does).
    pub fn with_caption(&self, caption: Option<RichText>) -> Self {
        Self(AttachmentFields {
            caption,
            ..self.0.clone()
        })
    }
}

/// "Is typing" on or off. Ephemeral: never stored, never in a timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Typing {
    /// Whether the sender is typing.
    pub active: bool,
}

/// The sender has read everything up to and including a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReadMarker {
    /// The last message read.
    pub up_to: MessageRef,
}

/// A kind this implementation does not know, kept byte for byte so it can be
/// shown as unsupported, stored, and passed on unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unknown {
    kind: u16,
    body: Vec<u8>,
}

impl Unknown {
    /// A message of unknown `kind` with `body` (at most
    /// [`MAX_UNKNOWN_BODY_LEN`] bytes).
    pub fn new(kind: u16, body: Vec<u8>) -> Result<Self, ContentError> {
        if kind::is_known(kind) {
            return Err(ContentError::KnownKind(kind));
        }
        check_len("unknown body", body.len(), MAX_UNKNOWN_BODY_LEN)?;
        Ok(Self { kind, body })
    }

    /// The kind's wire number.
    pub fn kind(&self) -> u16 {
        self.kind
    }

    /// The body, as received.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// One chat message: the whole payload of a channel message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChatMessage {
    /// A message (kind 1).
    Text(Text),
    /// An action, IRC's `/me` (kind 6).
    Emote(Text),
    /// A message from a bot or service; clients do not alert on it, and bots
    /// do not answer it (kind 7).
    Notice(Text),
    /// A new version of an earlier message (kind 2).
    Edit(Edit),
    /// A deletion (kind 3).
    Delete(Delete),
    /// A reaction added or removed (kind 4).
    Reaction(Reaction),
    /// A file (kind 5).
    Attachment(Attachment),
    /// Typing notification; ephemeral (kind 8).
    Typing(Typing),
    /// Read marker (kind 9).
    ReadMarker(ReadMarker),
    /// A kind this implementation does not know.
    Unknown(Unknown),
}

impl ChatMessage {
    /// The kind's wire number.
    pub fn kind(&self) -> u16 {
        match self {
            ChatMessage::Text(_) => kind::TEXT,
            ChatMessage::Edit(_) => kind::EDIT,
            ChatMessage::Delete(_) => kind::DELETE,
            ChatMessage::Reaction(_) => kind::REACTION,
            ChatMessage::Attachment(_) => kind::ATTACHMENT,
            ChatMessage::Emote(_) => kind::EMOTE,
            ChatMessage::Notice(_) => kind::NOTICE,
            ChatMessage::Typing(_) => kind::TYPING,
            ChatMessage::ReadMarker(_) => kind::READ_MARKER,
            ChatMessage::Unknown(u) => u.kind,
        }
    }

    /// Whether the message is ephemeral: shown while fresh, never stored and
    /// never part of a timeline (typing notifications).
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, ChatMessage::Typing(_))
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        use kith_proto::codec::encode as enc;
        let body = match self {
            ChatMessage::Text(t) | ChatMessage::Emote(t) | ChatMessage::Notice(t) => {
                enc(&TextWire::from(t))
            }
            ChatMessage::Edit(e) => enc(&EditWire {
                target: e.target.0,
                replacement: RichTextWire::from(&e.replacement),
            }),
            ChatMessage::Delete(d) => enc(&DeleteWire { target: d.target.0 }),
            ChatMessage::Reaction(r) => enc(&ReactionWire {
                target: r.target.0,
                key: vl(r.key.0.as_bytes()),
                op: match r.op {
                    ReactionOp::Add => 0,
                    ReactionOp::Remove => 1,
                },
            }),
            ChatMessage::Attachment(a) => enc(&AttachmentWire::from(&a.0)),
            ChatMessage::Typing(t) => enc(&TypingWire {
                active: u8::from(t.active),
            }),
            ChatMessage::ReadMarker(m) => enc(&ReadMarkerWire { up_to: m.up_to.0 }),
            ChatMessage::Unknown(u) => u.body.clone(),
        };
        enc(&Envelope {
            version: PROTOCOL_VERSION,
            kind: self.kind(),
            body: VLBytes::new(body),
        })
    }

    /// Decodes untrusted bytes. Checks, in order: the size limit, the
    /// version, the envelope, then the body of a known kind (structure,
    /// limits, UTF-8). An unknown kind is not an error: it decodes as
    /// [`ChatMessage::Unknown`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope: Envelope = decode(bytes)?;
        let body = envelope.body.as_slice();
        Ok(match envelope.kind {
            kind::TEXT => ChatMessage::Text(parse::<TextWire>("Text", body)?.into_text("Text")?),
            kind::EMOTE => {
                ChatMessage::Emote(parse::<TextWire>("Emote", body)?.into_text("Emote")?)
            }
            kind::NOTICE => {
                ChatMessage::Notice(parse::<TextWire>("Notice", body)?.into_text("Notice")?)
            }
            kind::EDIT => {
                let wire: EditWire = parse("Edit", body)?;
                ChatMessage::Edit(Edit {
                    target: MessageRef(wire.target),
                    replacement: wire.replacement.into_rich_text("Edit")?,
                })
            }
            kind::DELETE => {
                let wire: DeleteWire = parse("Delete", body)?;
                ChatMessage::Delete(Delete {
                    target: MessageRef(wire.target),
                })
            }
            kind::REACTION => {
                let wire: ReactionWire = parse("Reaction", body)?;
                let key = utf8("Reaction", "reaction key", wire.key)?
                    .parse()
                    .map_err(|e| malformed("Reaction", e))?;
                let op = match wire.op {
                    0 => ReactionOp::Add,
                    1 => ReactionOp::Remove,
                    n => return Err(malformed("Reaction", format!("unknown reaction op {n}"))),
                };
                ChatMessage::Reaction(Reaction {
                    target: MessageRef(wire.target),
                    key,
                    op,
                })
            }
            kind::ATTACHMENT => ChatMessage::Attachment(
                parse::<AttachmentWire>("Attachment", body)?.into_attachment()?,
            ),
            kind::TYPING => {
                let wire: TypingWire = parse("Typing", body)?;
                let active = match wire.active {
                    0 => false,
                    1 => true,
                    n => {
                        return Err(malformed(
                            "Typing",
                            format!("typing state {n} is not 0 or 1"),
                        ));
                    }
                };
                ChatMessage::Typing(Typing { active })
            }
            kind::READ_MARKER => {
                let wire: ReadMarkerWire = parse("ReadMarker", body)?;
                ChatMessage::ReadMarker(ReadMarker {
                    up_to: MessageRef(wire.up_to),
                })
            }
            other => ChatMessage::Unknown(Unknown {
                kind: other,
                body: envelope.body.as_slice().to_vec(),
            }),
        })
    }
}

// ---- wire structures ----------------------------------------------------

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct Envelope {
    version: u16,
    kind: u16,
    body: VLBytes,
}

impl WireObject for Envelope {
    const KIND: &'static str = "ChatMessage";
    const MAX_LEN: usize = MAX_MESSAGE_LEN;
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct RichTextWire {
    format: u8,
    text: VLBytes,
    mentions: Vec<VLBytes>,
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct TextWire {
    content: RichTextWire,
    reply_to: Option<[u8; 32]>,
    thread: Option<[u8; 32]>,
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct EditWire {
    target: [u8; 32],
    replacement: RichTextWire,
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct DeleteWire {
    target: [u8; 32],
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct ReactionWire {
    target: [u8; 32],
    key: VLBytes,
    op: u8,
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct ThumbnailWire {
    media_type: VLBytes,
    data: VLBytes,
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct AttachmentWire {
    file: VLBytes,
    key: VLBytes,
    sha256: [u8; 32],
    size: u64,
    name: VLBytes,
    media_type: VLBytes,
    thumbnail: Option<ThumbnailWire>,
    caption: Option<RichTextWire>,
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct TypingWire {
    active: u8,
}

#[derive(TlsSize, TlsSerializeBytes, TlsDeserializeBytes)]
struct ReadMarkerWire {
    up_to: [u8; 32],
}

fn vl(bytes: &[u8]) -> VLBytes {
    VLBytes::new(bytes.to_vec())
}

fn malformed(kind: &'static str, reason: impl fmt::Display) -> DecodeError {
    DecodeError::Malformed {
        kind,
        reason: reason.to_string(),
    }
}

/// Decodes a body that must fill `bytes` exactly.
fn parse<T: DeserializeBytes>(kind: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, rest) = T::tls_deserialize_bytes(bytes).map_err(|e| {
        malformed(
            kind,
            match e {
                tls_codec::Error::EndOfStream => "body ended early".to_owned(),
                tls_codec::Error::DecodingError(s) => s,
                tls_codec::Error::InvalidVectorLength => "invalid vector length".to_owned(),
                other => other.to_string(),
            },
        )
    })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            kind,
            count: rest.len(),
        });
    }
    Ok(value)
}

fn utf8(kind: &'static str, field: &str, bytes: VLBytes) -> Result<String, DecodeError> {
    String::from_utf8(bytes.as_slice().to_vec())
        .map_err(|_| malformed(kind, format!("{field} is not UTF-8")))
}

impl From<&RichText> for RichTextWire {
    fn from(t: &RichText) -> Self {
        Self {
            format: t.format.to_u8(),
            text: vl(t.text.as_bytes()),
            mentions: t
                .mentions
                .iter()
                .map(|h| vl(h.to_string().as_bytes()))
                .collect(),
        }
    }
}

impl RichTextWire {
    fn into_rich_text(self, kind: &'static str) -> Result<RichText, DecodeError> {
        let format = TextFormat::from_u8(self.format)
            .ok_or_else(|| malformed(kind, format!("unknown text format {}", self.format)))?;
        let text = utf8(kind, "text", self.text)?;
        if self.mentions.len() > MAX_MENTIONS {
            return Err(malformed(
                kind,
                ContentError::TooManyMentions(self.mentions.len()),
            ));
        }
        let mut mentions = Vec::with_capacity(self.mentions.len());
        for raw in self.mentions {
            let s = utf8(kind, "mention", raw)?;
            let handle: Handle = s
                .parse()
                .map_err(|e| malformed(kind, format!("mention {s:?}: {e}")))?;
            // Only the canonical (lowercase) form, so the encoding is unique.
            if handle.to_string() != s {
                return Err(malformed(kind, format!("mention {s:?} is not canonical")));
            }
            mentions.push(handle);
        }
        RichText::new(format, text, mentions).map_err(|e| malformed(kind, e))
    }
}

impl From<&Text> for TextWire {
    fn from(t: &Text) -> Self {
        Self {
            content: RichTextWire::from(&t.content),
            reply_to: t.reply_to.map(|r| r.0),
            thread: t.thread.map(|r| r.0),
        }
    }
}

impl TextWire {
    fn into_text(self, kind: &'static str) -> Result<Text, DecodeError> {
        Ok(Text {
            content: self.content.into_rich_text(kind)?,
            reply_to: self.reply_to.map(MessageRef),
            thread: self.thread.map(MessageRef),
        })
    }
}

impl From<&AttachmentFields> for AttachmentWire {
    fn from(a: &AttachmentFields) -> Self {
        Self {
            file: vl(&a.file),
            key: vl(&a.key),
            sha256: a.sha256,
            size: a.size,
            name: vl(a.name.as_bytes()),
            media_type: vl(a.media_type.as_bytes()),
            thumbnail: a.thumbnail.as_ref().map(|t| ThumbnailWire {
                media_type: vl(t.media_type.as_bytes()),
                data: vl(&t.data),
            }),
            caption: a.caption.as_ref().map(RichTextWire::from),
        }
    }
}

impl AttachmentWire {
    fn into_attachment(self) -> Result<Attachment, DecodeError> {
        const KIND: &str = "Attachment";
        let thumbnail = match self.thumbnail {
            Some(t) => Some(Thumbnail {
                media_type: utf8(KIND, "thumbnail media type", t.media_type)?,
                data: t.data.as_slice().to_vec(),
            }),
            None => None,
        };
        let caption = match self.caption {
            Some(c) => Some(c.into_rich_text(KIND)?),
            None => None,
        };
        Attachment::new(AttachmentFields {
            file: self.file.as_slice().to_vec(),
            key: self.key.as_slice().to_vec(),
            sha256: self.sha256,
            size: self.size,
            name: utf8(KIND, "file name", self.name)?,
            media_type: utf8(KIND, "media type", self.media_type)?,
            thumbnail,
            caption,
        })
        .map_err(|e| malformed(KIND, e))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn roundtrip(m: ChatMessage) -> Vec<u8> {
        let bytes = m.encode();
        assert_eq!(ChatMessage::decode(&bytes).unwrap(), m);
        bytes
    }

    #[test]
    fn plain_text_layout() {
        let bytes = roundtrip(ChatMessage::Text(Text::new(RichText::plain("hi").unwrap())));
        // version 0, kind 1, body length 7: format 0, "hi", no mentions,
        // no reply, no thread.
        assert_eq!(bytes, [0, 0, 0, 1, 7, 0, 2, b'h', b'i', 0, 0, 0]);
    }

    #[test]
    fn unknown_kind_is_kept_byte_for_byte() {
        let bytes = [0, 0, 0x12, 0x34, 3, 1, 2, 3];
        let m = ChatMessage::decode(&bytes).unwrap();
        assert_eq!(
            m,
            ChatMessage::Unknown(Unknown::new(0x1234, vec![1, 2, 3]).unwrap())
        );
        assert_eq!(m.encode(), bytes);
        assert_eq!(
            Unknown::new(kind::TEXT, vec![]),
            Err(ContentError::KnownKind(1))
        );
    }

    #[test]
    fn limits_are_checked_both_ways() {
        let long = "x".repeat(MAX_TEXT_LEN + 1);
        assert!(matches!(
            RichText::plain(long.clone()),
            Err(ContentError::TooLong { field: "text", .. })
        ));
        // Hand-build an over-long text to check the decoder's own limit.
        let wire = TextWire {
            content: RichTextWire {
                format: 0,
                text: vl(long.as_bytes()),
                mentions: vec![],
            },
            reply_to: None,
            thread: None,
        };
        let bytes = kith_proto::codec::encode(&Envelope {
            version: 0,
            kind: kind::TEXT,
            body: VLBytes::new(kith_proto::codec::encode(&wire)),
        });
        assert!(matches!(
            ChatMessage::decode(&bytes),
            Err(DecodeError::Malformed { kind: "Text", .. })
        ));
        assert!("".parse::<ReactionKey>().is_err());
        assert!("x".repeat(65).parse::<ReactionKey>().is_err());
        assert!("👍".parse::<ReactionKey>().is_ok());
    }

    #[test]
    fn bad_bodies_name_the_failure() {
        // Reaction with op 2.
        let mut bytes = ChatMessage::Reaction(Reaction {
            target: MessageRef([1; 32]),
            key: "+1".parse().unwrap(),
            op: ReactionOp::Remove,
        })
        .encode();
        *bytes.last_mut().unwrap() = 2;
        let err = ChatMessage::decode(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Reaction is malformed: unknown reaction op 2"
        );
        // A body with a byte too many.
        let bytes = [0, 0, 0, 8, 2, 1, 0];
        assert_eq!(
            ChatMessage::decode(&bytes),
            Err(DecodeError::TrailingBytes {
                kind: "Typing",
                count: 1
            })
        );
        // Non-canonical mention.
        let wire = RichTextWire {
            format: 0,
            text: vl(b"hi"),
            mentions: vec![vl(b"Alice@example.org")],
        };
        let bytes = kith_proto::codec::encode(&Envelope {
            version: 0,
            kind: kind::TEXT,
            body: VLBytes::new(kith_proto::codec::encode(&TextWire {
                content: wire,
                reply_to: None,
                thread: None,
            })),
        });
        assert!(
            ChatMessage::decode(&bytes)
                .unwrap_err()
                .to_string()
                .contains("not canonical")
        );
        // Version 1 is not ours.
        assert_eq!(
            ChatMessage::decode(&[0, 1, 0, 1, 0]),
            Err(DecodeError::UnknownVersion {
                kind: "ChatMessage",
                version: 1
            })
        );
    }

    #[test]
    fn non_minimal_lengths_are_rejected() {
        // Body length 1 written in two bytes (0x40 0x01).
        assert!(ChatMessage::decode(&[0, 0, 0, 8, 0x40, 0x01, 1]).is_err());
        assert!(ChatMessage::decode(&[0, 0, 0, 8, 0x01, 1]).is_ok());
    }

    #[test]
    fn the_largest_messages_fit_the_limit() {
        // 32-byte name, 255-byte server: the longest handle.
        let server = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ]
        .join(".");
        let handle: Handle = format!("{}@{server}", "n".repeat(32)).parse().unwrap();
        let text = RichText::new(
            TextFormat::Markdown,
            "€".repeat(MAX_TEXT_LEN / 3) + "x",
            vec![handle; MAX_MENTIONS],
        )
        .unwrap();
        let attachment = Attachment::new(AttachmentFields {
            file: vec![1; MAX_FILE_REF_LEN],
            key: vec![2; MAX_FILE_KEY_LEN],
            sha256: [3; 32],
            size: u64::MAX,
            name: "n".repeat(MAX_FILE_NAME_LEN),
            media_type: format!("a/{}", "b".repeat(MAX_MEDIA_TYPE_LEN - 2)),
            thumbnail: Some(Thumbnail {
                media_type: format!("a/{}", "b".repeat(MAX_MEDIA_TYPE_LEN - 2)),
                data: vec![4; MAX_THUMBNAIL_LEN],
            }),
            caption: Some(text.clone()),
        })
        .unwrap();
        let mut full = Text::new(text.clone());
        full.reply_to = Some(MessageRef([5; 32]));
        full.thread = Some(MessageRef([6; 32]));
        for m in [
            ChatMessage::Attachment(attachment),
            ChatMessage::Text(full),
            ChatMessage::Edit(Edit {
                target: MessageRef([7; 32]),
                replacement: text,
            }),
            ChatMessage::Unknown(Unknown::new(999, vec![8; MAX_UNKNOWN_BODY_LEN]).unwrap()),
        ] {
            let bytes = roundtrip(m);
            assert!(bytes.len() <= MAX_MESSAGE_LEN, "{} bytes", bytes.len());
        }
    }

    #[test]
    fn message_ref_text_form() {
        let r = MessageRef::of(b"an MLS message");
        assert_eq!(r.to_string().parse::<MessageRef>().unwrap(), r);
        assert_eq!(r.to_string().len(), 64);
        assert_eq!("abc".parse::<MessageRef>(), Err(IdError::BadHex(64)));
    }
}
