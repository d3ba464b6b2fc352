//! Property tests: every message survives encode then decode unchanged (and
//! its encoding is the only one), no input panics the decoder, and folding
//! depends only on the set of entries — not their order, not duplicates.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_chat::{
    Attachment, AttachmentFields, ChatMessage, Delete, Edit, Entry, MessageRef, Moderators,
    Reaction, ReactionOp, ReadMarker, RichText, Text, TextFormat, Thumbnail, Typing, Unknown, fold,
    kind,
};
use kith_proto::{DecodeError, DeviceId, Handle};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

fn handle() -> impl Strategy<Value = Handle> {
    (
        "[a-z0-9][a-z0-9._-]{0,10}",
        "[a-z][a-z0-9]{0,8}(\\.[a-z]{2,5}){0,2}",
    )
        .prop_map(|(name, server)| format!("{name}@{server}").parse().unwrap())
}

fn rich_text() -> impl Strategy<Value = RichText> {
    (any::<bool>(), "\\PC{0,40}", vec(handle(), 0..4)).prop_map(|(md, text, mentions)| {
        let format = if md {
            TextFormat::Markdown
        } else {
            TextFormat::Plain
        };
        RichText::new(format, text, mentions).unwrap()
    })
}

fn message_ref() -> impl Strategy<Value = MessageRef> {
    any::<[u8; 32]>().prop_map(MessageRef::from_bytes)
}

fn text() -> impl Strategy<Value = Text> {
    (
        rich_text(),
        proptest::option::of(message_ref()),
        proptest::option::of(message_ref()),
    )
        .prop_map(|(content, reply_to, thread)| Text {
            content,
            reply_to,
            thread,
        })
}

fn media_type() -> impl Strategy<Value = String> {
    "[a-z]{1,11}/[a-z0-9.+-]{1,20}"
}

fn attachment() -> impl Strategy<Value = Attachment> {
    (
        (
            vec(any::<u8>(), 1..64),
            vec(any::<u8>(), 0..=64),
            any::<[u8; 32]>(),
            any::<u64>(),
        ),
        ("\\PC{0,30}", media_type()),
        proptest::option::of((media_type(), vec(any::<u8>(), 0..200))),
        proptest::option::of(rich_text()),
    )
        .prop_map(
            |((file, key, sha256, size), (name, media_type), thumb, caption)| {
                Attachment::new(AttachmentFields {
                    file,
                    key,
                    sha256,
                    size,
                    name,
                    media_type,
                    thumbnail: thumb.map(|(media_type, data)| Thumbnail { media_type, data }),
                    caption,
                })
                .unwrap()
            },
        )
}

fn reaction_op() -> impl Strategy<Value = ReactionOp> {
    prop_oneof![Just(ReactionOp::Add), Just(ReactionOp::Remove)]
}

fn chat_message() -> impl Strategy<Value = ChatMessage> {
    prop_oneof![
        text().prop_map(ChatMessage::Text),
        text().prop_map(ChatMessage::Emote),
        text().prop_map(ChatMessage::Notice),
        (message_ref(), rich_text()).prop_map(|(target, replacement)| ChatMessage::Edit(Edit {
            target,
            replacement
        })),
        message_ref().prop_map(|target| ChatMessage::Delete(Delete { target })),
        (message_ref(), "\\PC{1,16}", reaction_op()).prop_map(|(target, key, op)| {
            ChatMessage::Reaction(Reaction {
                target,
                key: key.parse().unwrap(),
                op,
            })
        }),
        attachment().prop_map(ChatMessage::Attachment),
        any::<bool>().prop_map(|active| ChatMessage::Typing(Typing { active })),
        message_ref().prop_map(|up_to| ChatMessage::ReadMarker(ReadMarker { up_to })),
        (
            any::<u16>().prop_filter("unknown", |k| !kind::is_known(*k)),
            vec(any::<u8>(), 0..100)
        )
            .prop_map(|(k, body)| ChatMessage::Unknown(Unknown::new(k, body).unwrap())),
    ]
}

/// Decoding must never panic, and whatever decodes must re-encode to the
/// very same bytes (one encoding per message).
fn check_decoder(bytes: &[u8]) {
    if let Ok(m) = ChatMessage::decode(bytes) {
        assert_eq!(m.encode(), bytes, "{m:?} has a second encoding");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encode_then_decode_is_identity(m in chat_message()) {
        let bytes = m.encode();
        prop_assert!(bytes.len() <= kith_chat::message::MAX_MESSAGE_LEN);
        prop_assert_eq!(&ChatMessage::decode(&bytes).unwrap(), &m);
        prop_assert_eq!(bytes[..2].to_vec(), vec![0, 0]);
        prop_assert_eq!(u16::from_be_bytes([bytes[2], bytes[3]]), m.kind());
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..400)) {
        check_decoder(&bytes);
    }

    #[test]
    fn random_bodies_of_every_kind_never_panic(k in 0u16..12, body in vec(any::<u8>(), 0..300)) {
        let mut bytes = vec![0, 0];
        bytes.extend(k.to_be_bytes());
        bytes.extend(kith_proto::codec::encode(&tls_codec::VLBytes::new(body)));
        check_decoder(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(
        m in chat_message(),
        edits in vec((any::<Index>(), any::<u8>()), 1..4),
        cut in proptest::option::of(any::<Index>()),
    ) {
        let mut bytes = m.encode();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        check_decoder(&bytes);
    }
}

#[test]
fn oversize_input_is_rejected_before_parsing() {
    let bytes = vec![0u8; kith_chat::message::MAX_MESSAGE_LEN + 1];
    assert!(matches!(
        ChatMessage::decode(&bytes),
        Err(DecodeError::Oversize { .. })
    ));
}

// ---- folding ------------------------------------------------------------

const USERS: [&str; 4] = ["alice", "bob", "carol", "mod"];

/// What an entry does, with targets as small indices so that they often
/// name other entries (targets past the last entry never arrive).
#[derive(Debug, Clone)]
enum Op {
    Text(u8),
    Emote,
    Attachment,
    Unknown,
    Undecodable,
    Typing,
    Edit(u8, u8),
    Delete(u8),
    React(u8, bool, ReactionOp),
    Read(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let target = 0u8..12;
    prop_oneof![
        6 => (0u8..3).prop_map(Op::Text),
        1 => Just(Op::Emote),
        1 => Just(Op::Attachment),
        1 => Just(Op::Unknown),
        1 => Just(Op::Undecodable),
        1 => Just(Op::Typing),
        5 => (target.clone(), 0u8..4).prop_map(|(t, v)| Op::Edit(t, v)),
        2 => target.clone().prop_map(Op::Delete),
        4 => (target.clone(), any::<bool>(), reaction_op()).prop_map(|(t, k, o)| Op::React(t, k, o)),
        2 => target.prop_map(Op::Read),
    ]
}

fn id(n: u8) -> MessageRef {
    MessageRef::from_bytes([n; 32])
}

fn entry(index: usize, user: usize, time: u64, op: &Op) -> Entry<&'static str> {
    let plain = |s: String| RichText::plain(s).unwrap();
    let message = match op {
        Op::Text(n) => {
            let mut t = Text::new(plain(format!("text {n}")));
            t.reply_to = (*n == 1).then(|| id(0));
            t.thread = (*n == 2).then(|| id(1));
            ChatMessage::Text(t)
        }
        Op::Emote => ChatMessage::Emote(Text::new(plain("waves".into()))),
        Op::Attachment => ChatMessage::Attachment(
            Attachment::new(AttachmentFields {
                file: vec![index as u8],
                key: vec![7; 32],
                sha256: [1; 32],
                size: 3,
                name: "f".into(),
                media_type: "image/png".into(),
                thumbnail: None,
                caption: None,
            })
            .unwrap(),
        ),
        Op::Unknown => ChatMessage::Unknown(Unknown::new(77, vec![index as u8]).unwrap()),
        Op::Undecodable => {
            return Entry::decode(
                id(index as u8),
                USERS[user],
                DeviceId::from_bytes([user as u8; 32]),
                time,
                &[0, 1, 0, 1],
            );
        }
        Op::Typing => ChatMessage::Typing(Typing { active: true }),
        Op::Edit(t, v) => ChatMessage::Edit(Edit {
            target: id(*t),
            replacement: plain(format!("edit {v}")),
        }),
        Op::Delete(t) => ChatMessage::Delete(Delete { target: id(*t) }),
        Op::React(t, k, o) => ChatMessage::Reaction(Reaction {
            target: id(*t),
            key: (if *k { "+1" } else { "🎉" }).parse().unwrap(),
            op: *o,
        }),
        Op::Read(t) => ChatMessage::ReadMarker(ReadMarker { up_to: id(*t) }),
    };
    Entry::new(
        id(index as u8),
        USERS[user],
        DeviceId::from_bytes([user as u8; 32]),
        time,
        message,
    )
}

/// A set of up to 27 entries from four users, with clashing times.
fn entries() -> impl Strategy<Value = Vec<Entry<&'static str>>> {
    vec((0..USERS.len(), 0u64..6, op()), 0..28).prop_map(|ops| {
        ops.iter()
            .enumerate()
            .map(|(i, (user, time, op))| entry(i, *user, *time, op))
            .collect()
    })
}

fn moderators() -> Moderators<&'static str> {
    Moderators::new(["mod"])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn fold_is_order_independent(
        (entries, shuffled) in entries().prop_flat_map(|e| (Just(e.clone()), Just(e).prop_shuffle()))
    ) {
        prop_assert_eq!(fold(&entries, &moderators()), fold(&shuffled, &moderators()));
    }

    #[test]
    fn fold_is_idempotent(
        (entries, noisy) in entries().prop_flat_map(|e| {
            let dupes = vec(any::<Index>(), 0..12);
            (Just(e.clone()), (Just(e), dupes).prop_flat_map(|(e, dupes)| {
                let mut all = e.clone();
                if !e.is_empty() {
                    all.extend(dupes.iter().map(|i| e[i.index(e.len())].clone()));
                }
                Just(all).prop_shuffle()
            }))
        })
    ) {
        let once = fold(&entries, &moderators());
        prop_assert_eq!(&once, &fold(&noisy, &moderators()));
        // Folding the same input twice gives the same output (pure).
        prop_assert_eq!(&once, &fold(&entries, &moderators()));
    }

    /// Ids name carrier messages, so two different entries with one id
    /// mean a bug or a lie upstream; even then the result must not depend
    /// on which arrived first.
    #[test]
    fn conflicting_entries_with_one_id_resolve_the_same_in_any_order(
        (entries, shuffled) in (entries(), vec((any::<Index>(), 0..USERS.len(), 0u64..6, op()), 1..6))
            .prop_flat_map(|(mut e, forgeries)| {
                if !e.is_empty() {
                    for (victim, user, time, op) in forgeries {
                        let i = victim.index(e.len());
                        let mut forged = entry(i, user, time, &op);
                        forged.id = e[i].id;
                        e.push(forged);
                    }
                }
                (Just(e.clone()), Just(e).prop_shuffle())
            })
    ) {
        prop_assert_eq!(fold(&entries, &moderators()), fold(&shuffled, &moderators()));
    }

    #[test]
    fn fold_keeps_every_message_and_nothing_else(entries in entries()) {
        let timeline = fold(&entries, &moderators());
        let shown = entries
            .iter()
            .filter(|e| !matches!(
                e.content,
                Ok(ChatMessage::Edit(_)
                    | ChatMessage::Delete(_)
                    | ChatMessage::Reaction(_)
                    | ChatMessage::Typing(_)
                    | ChatMessage::ReadMarker(_))
            ))
            .count();
        prop_assert_eq!(timeline.items.len(), shown);
        for pair in timeline.items.windows(2) {
            prop_assert!((pair[0].time, pair[0].id) < (pair[1].time, pair[1].id));
        }
        for item in &timeline.items {
            if let kith_chat::Body::Deleted { .. } = item.body {
                prop_assert!(item.reactions.is_empty() && item.edits == 0);
            }
            for group in &item.reactions {
                prop_assert!(!group.users.is_empty());
                prop_assert!(group.users.windows(2).all(|w| w[0] < w[1]));
            }
        }
    }
}
