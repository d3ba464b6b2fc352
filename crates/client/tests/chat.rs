//! Every chat message kind between two users, through the SDK against a
//! real homeserver on loopback: what each side's folded timeline shows.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use kith_chat::{
    Attachment, AttachmentFields, Body, ChatMessage, Delete, Edit, MessageRef, Reaction,
    ReactionOp, RichText, Text, TextFormat, Typing, Unknown,
};
use kith_client::{ChatTimeline, Client, ClientError};
use kith_proto::ChannelId;
use kith_testkit::TestServer;

async fn user(dir: &Path, server: &TestServer, name: &str) -> Client {
    Client::register(&dir.join(name), server.url(), name, None)
        .await
        .unwrap()
}

fn text(s: &str) -> ChatMessage {
    ChatMessage::Text(Text::new(RichText::plain(s).unwrap()))
}

fn item(t: &ChatTimeline, id: MessageRef) -> &kith_chat::Item<String> {
    t.items
        .iter()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("{id} is not in the timeline"))
}

fn shown(t: &ChatTimeline, id: MessageRef) -> String {
    match &item(t, id).body {
        Body::Text(r) | Body::Emote(r) | Body::Notice(r) => r.text().to_owned(),
        other => format!("{other:?}"),
    }
}

/// A timeline without times (a sender stores its own message at its own
/// clock, others at the homeserver's), sorted by id.
fn summary(t: &ChatTimeline) -> Vec<String> {
    let mut out: Vec<String> = t
        .items
        .iter()
        .map(|i| {
            format!(
                "{} {} {:?} {} {:?} {:?} {:?}",
                i.id, i.sender, i.body, i.edits, i.reply_to, i.thread, i.reactions
            )
        })
        .collect();
    out.sort();
    out
}

/// Alice (the channel's creator and admin) and Bob in one chat channel.
async fn setup(dir: &Path, server: &TestServer) -> (Client, Client, ChannelId) {
    let mut alice = user(dir, server, "alice").await;
    let mut bob = user(dir, server, "bob").await;
    let channel = alice
        .create_channel("general", kith_chat::CONTENT_TYPE)
        .await
        .unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    assert_eq!(bob.sync().await.unwrap().joined, vec![channel]);
    (alice, bob, channel)
}

#[tokio::test]
async fn every_message_kind_between_two_users() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, channel) = setup(dir.path(), &server).await;
    assert_eq!(
        alice.channel_admins(channel).unwrap(),
        vec![alice.device_id()]
    );

    // Text: plain, Markdown with a mention.
    let hello = alice.send_chat(channel, &text("hello bob")).await.unwrap();
    let md = RichText::new(
        TextFormat::Markdown,
        "**look**, @bob@a.test",
        vec!["bob@a.test".parse().unwrap()],
    )
    .unwrap();
    let look = alice
        .send_chat(channel, &ChatMessage::Text(Text::new(md)))
        .await
        .unwrap();
    // A reply and a thread.
    let mut reply = Text::new(RichText::plain("hi alice").unwrap());
    reply.reply_to = Some(hello);
    let reply = bob
        .send_chat(channel, &ChatMessage::Text(reply))
        .await
        .unwrap();
    let mut in_thread = Text::new(RichText::plain("about that look").unwrap());
    in_thread.thread = Some(look);
    let in_thread = bob
        .send_chat(channel, &ChatMessage::Text(in_thread))
        .await
        .unwrap();
    // An edit by the sender, and one by someone else (ignored).
    let typo = bob.send_chat(channel, &text("teh plan")).await.unwrap();
    let edit = |target, s: &str| {
        ChatMessage::Edit(Edit {
            target,
            replacement: RichText::plain(s).unwrap(),
        })
    };
    bob.send_chat(channel, &edit(typo, "the plan"))
        .await
        .unwrap();
    alice
        .send_chat(channel, &edit(typo, "alice was here"))
        .await
        .unwrap();
    // Deletes: by the sender, and by the admin (Alice) of Bob's message;
    // Bob, not an admin, cannot delete Alice's.
    let oops = alice.send_chat(channel, &text("oops")).await.unwrap();
    alice
        .send_chat(channel, &ChatMessage::Delete(Delete { target: oops }))
        .await
        .unwrap();
    let spam = bob.send_chat(channel, &text("spam")).await.unwrap();
    alice
        .send_chat(channel, &ChatMessage::Delete(Delete { target: spam }))
        .await
        .unwrap();
    bob.send_chat(channel, &ChatMessage::Delete(Delete { target: hello }))
        .await
        .unwrap();
    // Reactions: added by both, one taken back.
    let react = |target, key: &str, op| {
        ChatMessage::Reaction(Reaction {
            target,
            key: key.parse().unwrap(),
            op,
        })
    };
    alice
        .send_chat(channel, &react(reply, "👍", ReactionOp::Add))
        .await
        .unwrap();
    bob.send_chat(channel, &react(reply, "👍", ReactionOp::Add))
        .await
        .unwrap();
    bob.send_chat(channel, &react(reply, "🎉", ReactionOp::Add))
        .await
        .unwrap();
    bob.send_chat(channel, &react(reply, "🎉", ReactionOp::Remove))
        .await
        .unwrap();
    // An attachment reference (the file repository comes later), an emote,
    // a notice, and a kind from the future.
    let attachment = Attachment::new(AttachmentFields {
        file: b"kith-file:0123abcd".to_vec(),
        key: vec![7; 32],
        sha256: [9; 32],
        size: 1234,
        name: "plan.pdf".into(),
        media_type: "application/pdf".into(),
        thumbnail: None,
        caption: Some(RichText::plain("the plan").unwrap()),
    })
    .unwrap();
    let file = alice
        .send_chat(channel, &ChatMessage::Attachment(attachment))
        .await
        .unwrap();
    alice
        .send_chat(channel, &edit(file, "the plan, v2"))
        .await
        .unwrap();
    let wave = bob
        .send_chat(
            channel,
            &ChatMessage::Emote(Text::new(RichText::plain("waves").unwrap())),
        )
        .await
        .unwrap();
    let notice = alice
        .send_chat(
            channel,
            &ChatMessage::Notice(Text::new(RichText::plain("build passed").unwrap())),
        )
        .await
        .unwrap();
    let future = bob
        .send_chat(
            channel,
            &ChatMessage::Unknown(Unknown::new(77, b"from the future".to_vec()).unwrap()),
        )
        .await
        .unwrap();
    // Typing is delivered but never stored.
    alice
        .send_chat(channel, &ChatMessage::Typing(Typing { active: true }))
        .await
        .unwrap();

    let alice_report = alice.sync().await.unwrap();
    let bob_report = bob.sync().await.unwrap();
    assert!(alice_report.typing.is_empty());
    assert_eq!(bob_report.typing.len(), 1);
    assert_eq!(
        (
            bob_report.typing[0].sender.as_str(),
            bob_report.typing[0].active
        ),
        ("alice@a.test", true)
    );
    for client in [&alice, &bob] {
        let stored = client.messages(channel, 1000).unwrap();
        assert!(
            stored
                .iter()
                .all(|m| !matches!(ChatMessage::decode(&m.body), Ok(ChatMessage::Typing(_)))),
            "a typing notification was stored"
        );
    }

    let a = alice.timeline(channel).unwrap();
    let b = bob.timeline(channel).unwrap();
    assert_eq!(
        summary(&a),
        summary(&b),
        "both users fold the same timeline"
    );
    assert!(a.pending.is_empty());

    assert_eq!(shown(&b, hello), "hello bob", "Bob cannot delete Alice's");
    let look_item = item(&b, look);
    let Body::Text(look_text) = &look_item.body else {
        panic!()
    };
    assert_eq!(look_text.format(), TextFormat::Markdown);
    assert_eq!(look_text.mentions()[0].to_string(), "bob@a.test");
    assert_eq!(item(&a, reply).reply_to, Some(hello));
    assert_eq!(item(&a, in_thread).thread, Some(look));
    assert_eq!(shown(&a, typo), "the plan");
    assert_eq!(item(&a, typo).edits, 1, "Alice's edit of Bob's is ignored");
    assert!(matches!(&item(&b, oops).body, Body::Deleted { by } if by == "alice@a.test"));
    assert!(matches!(&item(&b, spam).body, Body::Deleted { by } if by == "alice@a.test"));
    let reactions: Vec<(String, Vec<String>)> = item(&b, reply)
        .reactions
        .iter()
        .map(|g| (g.key.to_string(), g.users.clone()))
        .collect();
    assert_eq!(
        reactions,
        vec![(
            "👍".to_owned(),
            vec!["alice@a.test".to_owned(), "bob@a.test".to_owned()]
        )]
    );
    let Body::Attachment(att) = &item(&b, file).body else {
        panic!()
    };
    assert_eq!(
        (att.fields().name.as_str(), att.fields().size),
        ("plan.pdf", 1234)
    );
    assert_eq!(
        att.fields().caption.as_ref().unwrap().text(),
        "the plan, v2"
    );
    assert!(matches!(item(&a, wave).body, Body::Emote(_)));
    assert!(matches!(item(&b, notice).body, Body::Notice(_)));
    assert!(matches!(
        item(&a, future).body,
        Body::Unsupported { kind: 77 }
    ));
    // Items: hello, look, reply, thread, typo, oops, spam, file, wave,
    // notice, future; edits, deletes and reactions are not items.
    assert_eq!(a.items.len(), 11);

    // Message ids resolve from unique prefixes.
    let prefix = &hello.to_string()[..8];
    assert_eq!(alice.resolve_message(channel, prefix).unwrap(), hello);
    assert!(matches!(
        alice.resolve_message(channel, "abc"),
        Err(ClientError::Invalid(_))
    ));
    server.stop().await;
}

/// Read markers are chat messages in the channel, so they persist and
/// every device of the user that is a member folds the same marker. The
/// SDK cannot link a second device yet, so this shows it across two opens
/// of one device (and that the other user sees it too).
#[tokio::test]
async fn read_markers_persist_and_fold_per_user() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, channel) = setup(dir.path(), &server).await;
    let first = bob.send_chat(channel, &text("one")).await.unwrap();
    let second = bob.send_chat(channel, &text("two")).await.unwrap();
    alice.sync().await.unwrap();
    alice.mark_read(channel, second).await.unwrap();
    // A stale marker (sent later, pointing earlier) does not move it back.
    alice.mark_read(channel, first).await.unwrap();
    drop(alice);

    let alice = Client::open(&dir.path().join("alice")).unwrap();
    let t = alice.timeline(channel).unwrap();
    assert_eq!(t.read_markers.get("alice@a.test"), Some(&second));
    assert_eq!(t.items.len(), 2, "read markers are not items");
    bob.sync().await.unwrap();
    let t = bob.timeline(channel).unwrap();
    assert_eq!(t.read_markers.get("alice@a.test"), Some(&second));
    server.stop().await;
}

#[tokio::test]
async fn chat_calls_refuse_channels_that_are_not_chat() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let raw = alice
        .create_channel("bytes", "application/octet-stream")
        .await
        .unwrap();
    let err = alice.send_chat(raw, &text("hi")).await.unwrap_err();
    assert!(err.to_string().contains("not chat messages"), "{err}");
    server.stop().await;
}
