//! Folding a timeline: a pure function from the *set* of received chat
//! messages (and the channel's moderators) to what a client shows. Arrival
//! order never matters and duplicates change nothing, so a client may fold
//! again whenever anything arrives, late or twice.
//!
//! Every tie is broken by the total order `(time, id)`: `time` is the
//! entry's display key (the sender's clock, or whatever the client orders
//! by) and `id` its unique [`MessageRef`].

use std::collections::{BTreeMap, BTreeSet};

use kith_proto::{DecodeError, DeviceId};

use crate::message::{
    Attachment, ChatMessage, MessageRef, ReactionKey, ReactionOp, RichText, Text,
};

/// One received chat message with what the delivery layer knows about it.
///
/// `U` names a *user*: every device of one user must map to the same `U`
/// (e.g. the handle of a group of mutually linked devices, see
/// [`kith_proto::group_users`]), since edits and deletes are allowed per
/// user, not per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<U> {
    /// The carrier's message id.
    pub id: MessageRef,
    /// The sending user.
    pub sender: U,
    /// The sending device.
    pub device: DeviceId,
    /// Display order key (milliseconds, or any monotone key).
    pub time: u64,
    /// The decoded payload, or why it did not decode (such entries stay in
    /// the timeline as unsupported).
    pub content: Result<ChatMessage, DecodeError>,
}

impl<U> Entry<U> {
    /// An entry for a decoded message.
    pub fn new(
        id: MessageRef,
        sender: U,
        device: DeviceId,
        time: u64,
        message: ChatMessage,
    ) -> Self {
        Self {
            id,
            sender,
            device,
            time,
            content: Ok(message),
        }
    }

    /// An entry for a received payload, decoded here; a payload that does
    /// not decode is kept, not dropped.
    pub fn decode(id: MessageRef, sender: U, device: DeviceId, time: u64, payload: &[u8]) -> Self {
        Self {
            id,
            sender,
            device,
            time,
            content: ChatMessage::decode(payload),
        }
    }

    fn order(&self) -> (u64, MessageRef) {
        (self.time, self.id)
    }
}

/// Who may delete other users' messages.
pub trait ModerationPolicy<U> {
    /// Whether `user` may delete messages sent by others.
    fn may_delete_others(&self, user: &U) -> bool;
}

/// The simplest policy: a fixed set of moderators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moderators<U: Ord>(BTreeSet<U>);

impl<U: Ord> Moderators<U> {
    /// The given users are moderators.
    pub fn new(users: impl IntoIterator<Item = U>) -> Self {
        Self(users.into_iter().collect())
    }

    /// Nobody moderates: users may delete only their own messages.
    pub fn none() -> Self {
        Self(BTreeSet::new())
    }
}

impl<U: Ord> ModerationPolicy<U> for Moderators<U> {
    fn may_delete_others(&self, user: &U) -> bool {
        self.0.contains(user)
    }
}

/// What a timeline item shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<U> {
    /// A message, after its newest edit.
    Text(RichText),
    /// An action (`/me`), after its newest edit.
    Emote(RichText),
    /// A bot or service notice, after its newest edit.
    Notice(RichText),
    /// A file, with the caption of its newest edit.
    Attachment(Attachment),
    /// A kind this implementation does not know; shown as unsupported.
    Unsupported {
        /// Its wire number.
        kind: u16,
    },
    /// A payload that did not decode (e.g. a newer version); shown as
    /// unsupported.
    Undecodable(DecodeError),
    /// A tombstone: the content is hidden.
    Deleted {
        /// Who deleted it: the sender, or a moderator.
        by: U,
    },
}

/// The users who reacted to an item with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionGroup<U> {
    /// The emoji or text.
    pub key: ReactionKey,
    /// Who reacted, sorted, never empty.
    pub users: Vec<U>,
}

/// One message as shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<U> {
    /// Its id.
    pub id: MessageRef,
    /// Its sender.
    pub sender: U,
    /// The sending device.
    pub device: DeviceId,
    /// Its display order key.
    pub time: u64,
    /// What it shows.
    pub body: Body<U>,
    /// How many edits by the sender apply (0 for a tombstone).
    pub edits: usize,
    /// The time of the edit shown, if any.
    pub edited_at: Option<u64>,
    /// The message replied to (hidden on a tombstone).
    pub reply_to: Option<MessageRef>,
    /// The thread root (kept on a tombstone so threads stay whole).
    pub thread: Option<MessageRef>,
    /// Reactions, sorted by key (none on a tombstone).
    pub reactions: Vec<ReactionGroup<U>>,
}

impl<U> Item<U> {
    /// Whether an edit applies.
    pub fn edited(&self) -> bool {
        self.edits > 0
    }
}

/// A folded timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline<U> {
    /// Messages in `(time, id)` order.
    pub items: Vec<Item<U>>,
    /// For each user, the message it has read up to.
    pub read_markers: BTreeMap<U, MessageRef>,
    /// Edits, deletes and reactions whose target has not arrived, sorted by
    /// id; they apply as soon as it does.
    pub pending: Vec<MessageRef>,
}

/// Reactions to one target: who sent each, its key and what it does.
type ReactionOps<'a, U> = Vec<(&'a Entry<U>, &'a ReactionKey, ReactionOp)>;

/// Folds a set of entries into a timeline. See the module docs and
/// `docs/spec.md` §17 for the rules.
pub fn fold<U, P>(entries: &[Entry<U>], policy: &P) -> Timeline<U>
where
    U: Ord + Clone,
    P: ModerationPolicy<U> + ?Sized,
{
    let entries = dedupe(entries);

    let mut items = Vec::new();
    let mut edits: BTreeMap<MessageRef, Vec<(&Entry<U>, &RichText)>> = BTreeMap::new();
    let mut deletes: BTreeMap<MessageRef, Vec<&Entry<U>>> = BTreeMap::new();
    let mut reactions: BTreeMap<MessageRef, ReactionOps<'_, U>> = BTreeMap::new();
    let mut markers: BTreeMap<&U, Vec<(&Entry<U>, MessageRef)>> = BTreeMap::new();
    let mut pending = Vec::new();

    for entry in entries.values() {
        let target = match &entry.content {
            Ok(ChatMessage::Edit(e)) => {
                edits
                    .entry(e.target)
                    .or_default()
                    .push((entry, &e.replacement));
                e.target
            }
            Ok(ChatMessage::Delete(d)) => {
                deletes.entry(d.target).or_default().push(entry);
                d.target
            }
            Ok(ChatMessage::Reaction(r)) => {
                reactions
                    .entry(r.target)
                    .or_default()
                    .push((entry, &r.key, r.op));
                r.target
            }
            Ok(ChatMessage::ReadMarker(m)) => {
                markers
                    .entry(&entry.sender)
                    .or_default()
                    .push((entry, m.up_to));
                continue;
            }
            Ok(ChatMessage::Typing(_)) => continue,
            Ok(_) | Err(_) => {
                items.push(*entry);
                continue;
            }
        };
        if !entries.contains_key(&target) {
            pending.push(entry.id);
        }
    }

    items.sort_by_key(|e| e.order());
    let items = items
        .into_iter()
        .map(|entry| {
            let id = entry.id;
            item(
                entry,
                policy,
                deletes.get(&id).map(Vec::as_slice).unwrap_or_default(),
                edits.get(&id).map(Vec::as_slice).unwrap_or_default(),
                reactions.get(&id).map(Vec::as_slice).unwrap_or_default(),
            )
        })
        .collect();

    let read_markers = markers
        .into_iter()
        .filter_map(|(user, marks)| {
            // The furthest marker whose target is known wins, so a stale
            // device cannot move a user's marker backwards; until any is
            // known, the newest marker sent stands.
            let furthest = marks
                .iter()
                .filter_map(|(_, up_to)| entries.get(up_to).map(|t| (t.order(), *up_to)))
                .max()
                .map(|(_, up_to)| up_to);
            let newest = || marks.iter().max_by_key(|(m, _)| m.order()).map(|(_, u)| *u);
            furthest.or_else(newest).map(|up_to| (user.clone(), up_to))
        })
        .collect();

    Timeline {
        items,
        read_markers,
        pending,
    }
}

/// One entry per id. Ids name carrier messages, so two entries with one id
/// are the same message; should they differ anyway (a buggy or lying
/// source), the least by a fixed order over every field is kept, so the
/// choice does not depend on arrival order.
fn dedupe<U: Ord>(entries: &[Entry<U>]) -> BTreeMap<MessageRef, &Entry<U>> {
    let mut by_id: BTreeMap<MessageRef, &Entry<U>> = BTreeMap::new();
    for entry in entries {
        match by_id.get(&entry.id) {
            Some(kept) if canonical_key(kept) <= canonical_key(entry) => {}
            _ => {
                by_id.insert(entry.id, entry);
            }
        }
    }
    by_id
}

fn canonical_key<U: Ord>(e: &Entry<U>) -> (u64, &DeviceId, &U, (bool, Vec<u8>)) {
    let content = match &e.content {
        Ok(m) => (false, m.encode()),
        Err(err) => (true, err.to_string().into_bytes()),
    };
    (e.time, &e.device, &e.sender, content)
}

fn item<U, P>(
    entry: &Entry<U>,
    policy: &P,
    deletes: &[&Entry<U>],
    edits: &[(&Entry<U>, &RichText)],
    reactions: &[(&Entry<U>, &ReactionKey, ReactionOp)],
) -> Item<U>
where
    U: Ord + Clone,
    P: ModerationPolicy<U> + ?Sized,
{
    let (reply_to, thread) = match &entry.content {
        Ok(
            ChatMessage::Text(Text {
                reply_to, thread, ..
            })
            | ChatMessage::Emote(Text {
                reply_to, thread, ..
            })
            | ChatMessage::Notice(Text {
                reply_to, thread, ..
            }),
        ) => (*reply_to, *thread),
        _ => (None, None),
    };

    // The earliest valid delete names the deleter.
    let deleted_by = deletes
        .iter()
        .filter(|d| d.sender == entry.sender || policy.may_delete_others(&d.sender))
        .min_by_key(|d| d.order());
    if let Some(d) = deleted_by {
        return Item {
            id: entry.id,
            sender: entry.sender.clone(),
            device: entry.device,
            time: entry.time,
            body: Body::Deleted {
                by: d.sender.clone(),
            },
            edits: 0,
            edited_at: None,
            reply_to: None,
            thread,
            reactions: vec![],
        };
    }

    let editable = matches!(
        entry.content,
        Ok(ChatMessage::Text(_)
            | ChatMessage::Emote(_)
            | ChatMessage::Notice(_)
            | ChatMessage::Attachment(_))
    );
    let valid_edits: Vec<_> = edits
        .iter()
        .filter(|(e, _)| editable && e.sender == entry.sender)
        .collect();
    let newest = valid_edits.iter().max_by_key(|(e, _)| e.order());

    let body = match (&entry.content, newest) {
        (Ok(ChatMessage::Text(_)), Some((_, r))) => Body::Text((*r).clone()),
        (Ok(ChatMessage::Emote(_)), Some((_, r))) => Body::Emote((*r).clone()),
        (Ok(ChatMessage::Notice(_)), Some((_, r))) => Body::Notice((*r).clone()),
        (Ok(ChatMessage::Attachment(a)), Some((_, r))) => {
            Body::Attachment(a.with_caption(Some((*r).clone())))
        }
        (Ok(ChatMessage::Text(t)), _) => Body::Text(t.content.clone()),
        (Ok(ChatMessage::Emote(t)), _) => Body::Emote(t.content.clone()),
        (Ok(ChatMessage::Notice(t)), _) => Body::Notice(t.content.clone()),
        (Ok(ChatMessage::Attachment(a)), _) => Body::Attachment(a.clone()),
        (Ok(other), _) => Body::Unsupported { kind: other.kind() },
        (Err(e), _) => Body::Undecodable(e.clone()),
    };

    // For each (user, key) the newest reaction decides.
    let mut latest: BTreeMap<(&U, &ReactionKey), (&Entry<U>, ReactionOp)> = BTreeMap::new();
    for (r, key, op) in reactions {
        let slot = latest.entry((&r.sender, *key)).or_insert((*r, *op));
        if r.order() > slot.0.order() {
            *slot = (*r, *op);
        }
    }
    let mut groups: BTreeMap<&ReactionKey, Vec<U>> = BTreeMap::new();
    for ((user, key), (_, op)) in latest {
        if op == ReactionOp::Add {
            // `latest` iterates users in order, so each list comes sorted.
            groups.entry(key).or_default().push(user.clone());
        }
    }

    Item {
        id: entry.id,
        sender: entry.sender.clone(),
        device: entry.device,
        time: entry.time,
        body,
        edits: valid_edits.len(),
        edited_at: newest.map(|(e, _)| e.time),
        reply_to,
        thread,
        reactions: groups
            .into_iter()
            .map(|(key, users)| ReactionGroup {
                key: key.clone(),
                users,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;
    use crate::message::{Delete, Edit, Reaction, ReadMarker, Typing, Unknown};

    fn id(n: u8) -> MessageRef {
        MessageRef::from_bytes([n; 32])
    }

    fn dev(n: u8) -> DeviceId {
        DeviceId::from_bytes([n; 32])
    }

    fn entry(n: u8, user: &'static str, time: u64, m: ChatMessage) -> Entry<&'static str> {
        Entry::new(id(n), user, dev(n), time, m)
    }

    fn text(s: &str) -> ChatMessage {
        ChatMessage::Text(Text::new(RichText::plain(s).unwrap()))
    }

    fn edit(target: u8, s: &str) -> ChatMessage {
        ChatMessage::Edit(Edit {
            target: id(target),
            replacement: RichText::plain(s).unwrap(),
        })
    }

    fn react(target: u8, key: &str, op: ReactionOp) -> ChatMessage {
        ChatMessage::Reaction(Reaction {
            target: id(target),
            key: key.parse().unwrap(),
            op,
        })
    }

    fn delete(target: u8) -> ChatMessage {
        ChatMessage::Delete(Delete { target: id(target) })
    }

    fn body_text<U>(item: &Item<U>) -> &str {
        match &item.body {
            Body::Text(t) | Body::Emote(t) | Body::Notice(t) => t.text(),
            _ => "<not text>",
        }
    }

    fn none() -> Moderators<&'static str> {
        Moderators::none()
    }

    #[test]
    fn items_sort_by_time_then_id() {
        let t = fold(
            &[
                entry(3, "a", 5, text("c")),
                entry(2, "a", 5, text("b")),
                entry(1, "a", 9, text("d")),
            ],
            &none(),
        );
        let ids: Vec<_> = t.items.iter().map(|i| i.id).collect();
        assert_eq!(ids, [id(2), id(3), id(1)]);
    }

    #[test]
    fn newest_edit_by_the_sender_wins() {
        let t = fold(
            &[
                entry(1, "alice", 1, text("v0")),
                entry(3, "alice", 3, edit(1, "v2")),
                entry(2, "alice", 2, edit(1, "v1")),
                entry(4, "bob", 9, edit(1, "vandal")),
            ],
            &none(),
        );
        let item = &t.items[0];
        assert_eq!(body_text(item), "v2");
        assert_eq!(item.edits, 2);
        assert_eq!(item.edited_at, Some(3));
        assert!(item.edited());
    }

    #[test]
    fn edits_tie_on_time_by_id() {
        let t = fold(
            &[
                entry(1, "alice", 1, text("v0")),
                entry(7, "alice", 3, edit(1, "seven")),
                entry(8, "alice", 3, edit(1, "eight")),
            ],
            &none(),
        );
        assert_eq!(body_text(&t.items[0]), "eight");
    }

    #[test]
    fn an_edit_may_come_from_another_device_of_the_same_user() {
        let mut e = entry(2, "alice", 2, edit(1, "from phone"));
        e.device = dev(99);
        let t = fold(&[entry(1, "alice", 1, text("v0")), e], &none());
        assert_eq!(body_text(&t.items[0]), "from phone");
    }

    #[test]
    fn an_edit_replaces_an_attachment_caption() {
        let a = Attachment::new(crate::AttachmentFields {
            file: b"file".to_vec(),
            key: vec![1; 32],
            sha256: [2; 32],
            size: 10,
            name: "a.txt".into(),
            media_type: "text/plain".into(),
            thumbnail: None,
            caption: None,
        })
        .unwrap();
        let t = fold(
            &[
                entry(1, "alice", 1, ChatMessage::Attachment(a)),
                entry(2, "alice", 2, edit(1, "the caption")),
            ],
            &none(),
        );
        let Body::Attachment(a) = &t.items[0].body else {
            panic!("not an attachment")
        };
        assert_eq!(a.fields().caption.as_ref().unwrap().text(), "the caption");
    }

    #[test]
    fn edits_and_reactions_of_non_items_are_ignored() {
        let t = fold(
            &[
                entry(1, "alice", 1, react(9, "x", ReactionOp::Add)),
                entry(2, "alice", 2, edit(1, "edit a reaction")),
            ],
            &none(),
        );
        assert!(t.items.is_empty());
        // The reaction waits for message 9; the edit's target is here.
        assert_eq!(t.pending, [id(1)]);
    }

    #[test]
    fn deletes_by_sender_or_moderator_only() {
        let entries = [
            entry(1, "alice", 1, text("one")),
            entry(2, "alice", 2, text("two")),
            entry(3, "alice", 3, text("three")),
            entry(4, "alice", 4, delete(1)),
            entry(5, "mod", 5, delete(2)),
            entry(6, "bob", 6, delete(3)),
        ];
        let t = fold(&entries, &Moderators::new(["mod"]));
        assert_eq!(t.items[0].body, Body::Deleted { by: "alice" });
        assert_eq!(t.items[1].body, Body::Deleted { by: "mod" });
        assert_eq!(body_text(&t.items[2]), "three");
        let t = fold(&entries, &none());
        assert_eq!(body_text(&t.items[1]), "two");
    }

    #[test]
    fn a_tombstone_hides_edits_reactions_and_reply() {
        let mut reply = Text::new(RichText::plain("re").unwrap());
        reply.reply_to = Some(id(9));
        reply.thread = Some(id(8));
        let t = fold(
            &[
                entry(1, "alice", 1, ChatMessage::Text(reply)),
                entry(2, "alice", 2, edit(1, "edited")),
                entry(3, "bob", 3, react(1, "👍", ReactionOp::Add)),
                entry(4, "alice", 4, delete(1)),
            ],
            &none(),
        );
        let item = &t.items[0];
        assert_eq!(item.body, Body::Deleted { by: "alice" });
        assert_eq!(item.edits, 0);
        assert!(item.reactions.is_empty());
        assert_eq!(item.reply_to, None);
        assert_eq!(item.thread, Some(id(8)));
    }

    #[test]
    fn pending_operations_apply_when_the_target_arrives() {
        let ops = [
            entry(2, "alice", 2, edit(1, "late")),
            entry(3, "bob", 3, react(1, "+1", ReactionOp::Add)),
        ];
        let t = fold(&ops, &none());
        assert!(t.items.is_empty());
        assert_eq!(t.pending, [id(2), id(3)]);
        let mut all = ops.to_vec();
        all.push(entry(1, "alice", 1, text("early")));
        let t = fold(&all, &none());
        assert!(t.pending.is_empty());
        assert_eq!(body_text(&t.items[0]), "late");
        assert_eq!(t.items[0].reactions[0].users, ["bob"]);
    }

    #[test]
    fn latest_reaction_per_user_and_key_decides() {
        let t = fold(
            &[
                entry(1, "alice", 1, text("hi")),
                entry(2, "bob", 2, react(1, "+1", ReactionOp::Add)),
                entry(3, "bob", 4, react(1, "+1", ReactionOp::Remove)),
                entry(4, "carol", 3, react(1, "+1", ReactionOp::Remove)),
                entry(5, "carol", 5, react(1, "+1", ReactionOp::Add)),
                entry(6, "alice", 6, react(1, "+1", ReactionOp::Add)),
                entry(7, "alice", 7, react(1, "❤", ReactionOp::Add)),
            ],
            &none(),
        );
        let r = &t.items[0].reactions;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].key.as_str(), "+1");
        assert_eq!(r[0].users, ["alice", "carol"]);
        assert_eq!(r[1].key.as_str(), "❤");
    }

    #[test]
    fn typing_never_appears_and_read_markers_only_go_forward() {
        let t = fold(
            &[
                entry(1, "alice", 1, text("one")),
                entry(2, "alice", 2, text("two")),
                entry(3, "bob", 3, ChatMessage::Typing(Typing { active: true })),
                entry(
                    4,
                    "bob",
                    4,
                    ChatMessage::ReadMarker(ReadMarker { up_to: id(2) }),
                ),
                // A stale device sends an older marker later.
                entry(
                    5,
                    "bob",
                    5,
                    ChatMessage::ReadMarker(ReadMarker { up_to: id(1) }),
                ),
                // Carol's target has not arrived: her newest marker stands.
                entry(
                    6,
                    "carol",
                    6,
                    ChatMessage::ReadMarker(ReadMarker { up_to: id(40) }),
                ),
                entry(
                    7,
                    "carol",
                    7,
                    ChatMessage::ReadMarker(ReadMarker { up_to: id(41) }),
                ),
            ],
            &none(),
        );
        assert_eq!(t.items.len(), 2);
        assert_eq!(t.read_markers["bob"], id(2));
        assert_eq!(t.read_markers["carol"], id(41));
    }

    #[test]
    fn unknown_and_undecodable_are_kept() {
        let unknown = ChatMessage::Unknown(Unknown::new(300, vec![1, 2]).unwrap());
        let t = fold(
            &[
                entry(1, "alice", 1, unknown),
                Entry::decode(id(2), "alice", dev(2), 2, &[0, 9, 0, 1, 0]),
                entry(3, "bob", 3, react(1, "?", ReactionOp::Add)),
            ],
            &none(),
        );
        assert_eq!(t.items[0].body, Body::Unsupported { kind: 300 });
        assert_eq!(t.items[0].reactions.len(), 1);
        assert!(matches!(
            t.items[1].body,
            Body::Undecodable(DecodeError::UnknownVersion { version: 9, .. })
        ));
    }

    #[test]
    fn conflicting_duplicates_resolve_the_same_way_in_any_order() {
        let a = entry(1, "alice", 1, text("a"));
        let b = entry(1, "alice", 1, text("b"));
        let ab = fold(&[a.clone(), b.clone()], &none());
        let ba = fold(&[b, a], &none());
        assert_eq!(ab, ba);
        assert_eq!(ab.items.len(), 1);
    }
}
