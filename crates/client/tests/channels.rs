//! End-to-end encrypted channels on one homeserver, driven through the
//! client SDK against a real `kithd` running on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use kith_client::{Client, ClientError};
use kith_testkit::TestServer;

async fn user(dir: &Path, server: &TestServer, name: &str) -> Client {
    Client::register(&dir.join(name), server.url(), name, None)
        .await
        .unwrap()
}

fn texts(client: &Client, channel: kith_proto::ChannelId) -> Vec<(String, String)> {
    client
        .messages(channel, 100)
        .unwrap()
        .into_iter()
        .map(|m| (m.sender, String::from_utf8(m.body).unwrap()))
        .collect()
}

fn pair(sender: &str, text: &str) -> (String, String) {
    (sender.to_owned(), text.to_owned())
}

#[tokio::test]
async fn several_users_are_invited_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let mut carol = user(dir.path(), &server, "carol").await;
    let channel = alice.create_channel("general", "text/plain").await.unwrap();

    // A bad handle fails the whole call before anything is committed.
    assert!(matches!(
        alice
            .invite_many(channel, &["bob@a.test", "not a handle"])
            .await,
        Err(ClientError::Invalid(_))
    ));
    assert_eq!(alice.members(channel).unwrap().len(), 1);
    let (epoch, _) = alice.channel_state(channel).unwrap();

    assert_eq!(
        alice
            .invite_many(channel, &["bob@a.test", "carol@a.test"])
            .await
            .unwrap(),
        2
    );
    // One commit, one epoch for both.
    assert_eq!(alice.channel_state(channel).unwrap().0, epoch + 1);
    assert_eq!(alice.members(channel).unwrap().len(), 3);
    assert_eq!(bob.sync().await.unwrap().joined, vec![channel]);
    assert_eq!(carol.sync().await.unwrap().joined, vec![channel]);
    // Inviting members again adds nobody.
    assert_eq!(
        alice
            .invite_many(channel, &["bob@a.test", "carol@a.test"])
            .await
            .unwrap(),
        0
    );

    alice.send(channel, b"hello both").await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    let expected = vec![pair("alice@a.test", "hello both")];
    assert_eq!(texts(&bob, channel), expected);
    assert_eq!(texts(&carol, channel), expected);
    let auth = alice.channel_state(channel).unwrap();
    assert_eq!(bob.channel_state(channel).unwrap(), auth);
    assert_eq!(carol.channel_state(channel).unwrap(), auth);
}

#[tokio::test]
async fn three_users_talk_and_a_removed_one_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let mut carol = user(dir.path(), &server, "carol").await;

    let channel = alice.create_channel("general", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@a.test").await.unwrap(), 1);
    assert_eq!(alice.invite(channel, "carol@a.test").await.unwrap(), 1);
    assert_eq!(bob.sync().await.unwrap().joined, vec![channel]);
    assert_eq!(carol.sync().await.unwrap().joined, vec![channel]);
    // Bob joined at epoch 1 and must merge the commit that added Carol.
    let bob_row = bob.resolve_channel("general").unwrap();
    assert_eq!(
        (bob_row.id, bob_row.content_type.as_str()),
        (channel, "text/plain")
    );

    alice.send(channel, b"hello both").await.unwrap();
    bob.send(channel, b"hi alice").await.unwrap();
    carol.send(channel, b"hey").await.unwrap();
    for client in [&mut alice, &mut bob, &mut carol] {
        client.sync().await.unwrap();
    }
    let expected = vec![
        pair("alice@a.test", "hello both"),
        pair("bob@a.test", "hi alice"),
        pair("carol@a.test", "hey"),
    ];
    assert_eq!(texts(&alice, channel), expected);
    assert_eq!(texts(&bob, channel), expected);
    assert_eq!(texts(&carol, channel), expected);

    // Everyone agrees on the channel's history.
    let auth = alice.channel_state(channel).unwrap();
    assert_eq!(bob.channel_state(channel).unwrap(), auth);
    assert_eq!(carol.channel_state(channel).unwrap(), auth);

    // Carol is removed; what is said afterwards she cannot read, and she
    // can no longer send.
    assert_eq!(alice.remove(channel, "carol@a.test").await.unwrap(), 1);
    alice.send(channel, b"carol is gone").await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(
        texts(&bob, channel).last().unwrap(),
        &pair("alice@a.test", "carol is gone")
    );
    assert!(
        !texts(&carol, channel)
            .iter()
            .any(|(_, t)| t == "carol is gone")
    );
    assert!(!carol.resolve_channel("general").unwrap().active);
    let err = carol.send(channel, b"still here?").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Invalid(_) | ClientError::Server { status: 403, .. }
        ),
        "{err}"
    );
    assert_eq!(
        bob.channel_state(channel).unwrap(),
        alice.channel_state(channel).unwrap()
    );

    // The homeserver's files never hold a plaintext.
    server.stop().await;
    assert_no_plaintext(
        &dir.path().join("server"),
        &["hello both", "hi alice", "carol is gone"],
    );
}

fn assert_no_plaintext(dir: &Path, needles: &[&str]) {
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap();
        for needle in needles {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{} contains the plaintext {needle:?}",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn a_sender_behind_the_channel_is_told_and_sends_at_the_current_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let channel = alice.create_channel("general", "text/plain").await.unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(bob.channel_state(channel).unwrap().0, 1);

    // Alice moves the channel on; Bob does not know yet. His send goes out
    // at epoch 1 first, the server refuses it (wrong epoch), and he
    // catches up and sends at epoch 2.
    assert_eq!(alice.self_update(channel).await.unwrap(), 2);
    bob.send(channel, b"from behind").await.unwrap();
    assert_eq!(bob.channel_state(channel).unwrap().0, 2);
    let mine = bob.messages(channel, 10).unwrap();
    assert_eq!(
        mine.iter().map(|m| (m.epoch, m.seq)).collect::<Vec<_>>(),
        vec![(2, 1)]
    );

    // Alice reads it (it was stored once, at the current epoch), and a
    // sender that is current goes straight through.
    alice.sync().await.unwrap();
    alice.send(channel, b"welcome back").await.unwrap();
    bob.sync().await.unwrap();
    let expected = vec![
        pair("bob@a.test", "from behind"),
        pair("alice@a.test", "welcome back"),
    ];
    assert_eq!(texts(&alice, channel), expected);
    assert_eq!(texts(&bob, channel), expected);
    assert_eq!(
        alice.channel_state(channel).unwrap(),
        bob.channel_state(channel).unwrap()
    );
    server.stop().await;
}

#[tokio::test]
async fn concurrent_commits_one_wins_the_other_retries() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let channel = alice
        .create_channel("race", "application/octet-stream")
        .await
        .unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    bob.sync().await.unwrap();
    let (start, _) = bob.channel_state(channel).unwrap();

    // Alice's commit wins the epoch Bob is still at; Bob's commit for the
    // same epoch is refused, he merges Alice's and retries on the next.
    let alice_epoch = alice.self_update(channel).await.unwrap();
    assert_eq!(alice_epoch, start + 1);
    let bob_epoch = bob.self_update(channel).await.unwrap();
    assert_eq!(bob_epoch, start + 2);
    assert_eq!(bob.commit_conflicts(), 1);
    assert_eq!(alice.commit_conflicts(), 0);

    // Now both race for real, several times over.
    for _ in 0..3 {
        let (a, b) = tokio::join!(alice.self_update(channel), bob.self_update(channel));
        a.unwrap();
        b.unwrap();
    }
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();
    let (epoch, auth) = alice.channel_state(channel).unwrap();
    assert_eq!(epoch, start + 8);
    assert_eq!(bob.channel_state(channel).unwrap(), (epoch, auth));

    // Messages still flow both ways after the races.
    alice.send(channel, b"after the race").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(
        texts(&bob, channel).last().unwrap(),
        &pair("alice@a.test", "after the race")
    );
    server.stop().await;
}

#[tokio::test]
async fn restart_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let channel = alice.create_channel("durable", "text/plain").await.unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    bob.sync().await.unwrap();
    alice.send(channel, b"before restart").await.unwrap();
    // Same data directory, same address: clients resume from their cursors.
    let server = server.restart().await;
    bob.sync().await.unwrap();
    assert_eq!(
        texts(&bob, channel),
        vec![pair("alice@a.test", "before restart")]
    );
    alice.self_update(channel).await.unwrap();
    bob.send(channel, b"after restart").await.unwrap();
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(
        texts(&alice, channel),
        vec![
            pair("alice@a.test", "before restart"),
            pair("bob@a.test", "after restart")
        ]
    );
    assert_eq!(
        alice.channel_state(channel).unwrap(),
        bob.channel_state(channel).unwrap()
    );
    server.stop().await;
}

/// A receiver that was away fetches one page holding many messages from
/// several senders (some posted concurrently with `send_many`) and a commit
/// in the middle: the messages on both sides of the commit are decrypted
/// and stored page-wise, all of them, in the server's order, and what was
/// stored survives reopening the device's stores.
#[tokio::test]
async fn a_page_of_many_senders_with_a_commit_in_the_middle_all_arrives_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let mut carol = user(dir.path(), &server, "carol").await;
    let mut dave = user(dir.path(), &server, "dave").await;
    let channel = alice.create_channel("busy", "text/plain").await.unwrap();
    for handle in ["bob@a.test", "carol@a.test", "dave@a.test"] {
        alice.invite(channel, handle).await.unwrap();
    }
    for client in [&mut bob, &mut carol, &mut dave] {
        client.sync().await.unwrap();
    }
    for client in [&mut bob, &mut carol, &mut dave] {
        client.sync().await.unwrap();
    }
    let start = dave.channel_state(channel).unwrap().0;

    // Dave is away while the others talk and Carol commits.
    let early: Vec<&[u8]> = vec![b"a1", b"a2", b"a3", b"a4"];
    alice.send_many(channel, &early).await.unwrap();
    bob.send(channel, b"b1").await.unwrap();
    bob.send(channel, b"b2").await.unwrap();
    carol.send(channel, b"c1").await.unwrap();
    carol.self_update(channel).await.unwrap();
    // Behind the new epoch: each is told, catches up and sends at it.
    alice.send(channel, b"a5").await.unwrap();
    let late: Vec<&[u8]> = vec![b"b3", b"b4"];
    bob.send_many(channel, &late).await.unwrap();
    carol.send(channel, b"c2").await.unwrap();

    let report = dave.sync().await.unwrap();
    assert_eq!((report.messages, report.commits), (11, 1));
    assert_eq!(dave.channel_state(channel).unwrap().0, start + 1);
    for client in [&mut alice, &mut bob, &mut carol] {
        client.sync().await.unwrap();
    }
    let seen = texts(&dave, channel);
    assert_eq!(seen.len(), 11);
    // The server's order, as every member stores it.
    assert_eq!(texts(&alice, channel), seen);
    assert_eq!(texts(&bob, channel), seen);
    assert_eq!(texts(&carol, channel), seen);
    let mut bodies: Vec<&str> = seen.iter().map(|(_, b)| b.as_str()).collect();
    // Carol's commit splits the page: what was sent before it comes first.
    let (before, after) = bodies.split_at(7);
    assert!(before.iter().all(|b| !["a5", "b3", "b4", "c2"].contains(b)));
    assert!(after.iter().all(|b| ["a5", "b3", "b4", "c2"].contains(b)));
    bodies.sort_unstable();
    assert_eq!(
        bodies,
        [
            "a1", "a2", "a3", "a4", "a5", "b1", "b2", "b3", "b4", "c1", "c2"
        ]
    );
    let state = alice.channel_state(channel).unwrap();
    assert_eq!(dave.channel_state(channel).unwrap(), state);

    // Reopened from disk: the messages, the cursor and the ratchets were
    // all stored (nothing fetched again, the next message decrypts).
    drop(dave);
    let mut dave = Client::open(&dir.path().join("dave")).unwrap();
    assert_eq!(texts(&dave, channel), seen);
    alice.send(channel, b"again").await.unwrap();
    let report = dave.sync().await.unwrap();
    assert_eq!((report.messages, report.commits), (1, 0));
    assert_eq!(texts(&dave, channel).len(), 12);
    server.stop().await;
}
