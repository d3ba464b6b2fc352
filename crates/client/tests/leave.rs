//! Leaving a channel (spec §9.5): the leaver sends a leave request (an
//! application message with an empty payload and AAD `kith-leave-v0`) and
//! marks the channel left; an admin's client commits its removal on its
//! next sync. Real homeservers on loopback, driven through the client SDK.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use kith_client::{Client, ClientError, LeaveOutcome};
use kith_mls::{ChannelExtension, ChannelSettings, ContentType, Device, MlsStore, Policy};
use kith_proto::ChannelId;
use kith_testkit::TestServer;

async fn user(dir: &Path, server: &TestServer, name: &str) -> Client {
    Client::register(&dir.join(name), server.url(), name, None)
        .await
        .unwrap()
}

fn texts(client: &Client, channel: ChannelId) -> Vec<String> {
    client
        .messages(channel, 100)
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8(m.body).unwrap())
        .collect()
}

/// Alice (the admin) with Bob and Carol in `general`, everyone synced.
async fn three(dir: &Path, server: &TestServer) -> (Client, Client, Client, ChannelId) {
    let mut alice = user(dir, server, "alice").await;
    let mut bob = user(dir, server, "bob").await;
    let mut carol = user(dir, server, "carol").await;
    let channel = alice.create_channel("general", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@a.test").await.unwrap(), 1);
    assert_eq!(alice.invite(channel, "carol@a.test").await.unwrap(), 1);
    assert_eq!(bob.sync().await.unwrap().joined, vec![channel]);
    assert_eq!(carol.sync().await.unwrap().joined, vec![channel]);
    (alice, bob, carol, channel)
}

#[tokio::test]
async fn a_member_leaves_and_the_admin_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, mut carol, channel) = three(dir.path(), &server).await;
    alice.send(channel, b"before").await.unwrap();
    bob.sync().await.unwrap();
    carol.sync().await.unwrap();
    assert_eq!(texts(&bob, channel), ["before"]);

    // Bob leaves: the request goes out, the channel is left at once, and
    // his history stays.
    assert_eq!(
        bob.leave(channel).await.unwrap(),
        LeaveOutcome {
            requested: true,
            admins: 1
        }
    );
    assert!(!bob.resolve_channel("general").unwrap().active);
    assert_eq!(texts(&bob, channel), ["before"]);
    let err = bob.send(channel, b"one more").await.unwrap_err();
    assert!(matches!(err, ClientError::Invalid(_)), "{err}");
    assert!(matches!(
        bob.leave(channel).await.unwrap_err(),
        ClientError::Invalid(_)
    ));
    // Until an admin acts, Bob is still an MLS member.
    assert!(alice.members(channel).unwrap().contains(&bob.device_id()));

    // Carol (not an admin) sees nothing: the request is not a message and
    // she does not act on it.
    let report = carol.sync().await.unwrap();
    assert_eq!((report.messages, report.commits), (0, 0));
    assert!(report.removed_on_request.is_empty());
    assert_eq!(texts(&carol, channel), ["before"]);

    // Alice's client removes Bob when it syncs; only Bob.
    let report = alice.sync().await.unwrap();
    assert_eq!(report.removed_on_request, vec![(channel, bob.device_id())]);
    assert_eq!(report.messages, 0);
    assert_eq!(texts(&alice, channel), ["before"]);
    let members = alice.members(channel).unwrap();
    assert_eq!(members, vec![alice.device_id(), carol.device_id()]);
    // A second sync has nothing left to do.
    assert!(alice.sync().await.unwrap().removed_on_request.is_empty());

    // What is said afterwards Bob cannot read; Carol follows the removal.
    alice.send(channel, b"after").await.unwrap();
    carol.sync().await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&carol, channel), ["before", "after"]);
    assert_eq!(texts(&bob, channel), ["before"]);
    assert_eq!(
        carol.channel_state(channel).unwrap(),
        alice.channel_state(channel).unwrap()
    );
    assert!(!bob.resolve_channel("general").unwrap().active);

    // Bob's client merged its removal: he can be invited back and reads
    // again from then on.
    assert_eq!(alice.invite(channel, "bob@a.test").await.unwrap(), 1);
    assert_eq!(bob.sync().await.unwrap().joined, vec![channel]);
    assert!(bob.resolve_channel("general").unwrap().active);
    alice.send(channel, b"welcome back").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, channel), ["before", "welcome back"]);
}

#[tokio::test]
async fn a_leave_request_only_ever_removes_its_own_sender() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, mut carol, channel) = three(dir.path(), &server).await;
    let mut mallory = user(dir.path(), &server, "mallory").await;
    mallory.sync().await.unwrap();
    let (epoch, _) = alice.channel_state(channel).unwrap();

    // Mallory is no member: she builds a group of her own under the
    // channel's id and makes a leave request in it. The homeserver refuses
    // it from her.
    let forged = {
        let device = Device::new(mallory.secret_key(), MlsStore::in_memory().unwrap());
        let settings = ChannelSettings::new(ChannelExtension::new(
            ContentType::octet_stream(),
            "general".parse().unwrap(),
            Policy::new([mallory.device_id()]).unwrap(),
        ));
        let mut group = device.create_channel(channel, &settings).unwrap();
        group.leave_request().unwrap()
    };
    let refused = mallory
        .api()
        .send_message(&channel.to_string(), epoch, &forged)
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            ClientError::Server {
                status: 400..=499,
                ..
            }
        ),
        "{refused}"
    );
    // Relayed anyway (as a hostile server could, here through Bob's
    // session), it does not decrypt: nobody is removed.
    bob.api()
        .send_message(&channel.to_string(), epoch, &forged)
        .await
        .unwrap();
    let report = alice.sync().await.unwrap();
    assert!(report.removed_on_request.is_empty());
    assert_eq!(alice.members(channel).unwrap().len(), 3);

    // Carol's request removes Carol, never anyone else.
    carol.leave(channel).await.unwrap();
    let report = alice.sync().await.unwrap();
    assert_eq!(
        report.removed_on_request,
        vec![(channel, carol.device_id())]
    );
    assert_eq!(
        alice.members(channel).unwrap(),
        vec![alice.device_id(), bob.device_id()]
    );
    // Bob follows and is still a member who reads.
    bob.sync().await.unwrap();
    alice.send(channel, b"just us").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, channel), ["just us"]);
    carol.sync().await.unwrap();
    assert!(texts(&carol, channel).is_empty());
}

#[tokio::test]
async fn the_only_admin_cannot_leave_while_others_remain() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let channel = alice.create_channel("general", "text/plain").await.unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    bob.sync().await.unwrap();

    // Nobody could commit Alice's removal: refused, nothing sent, and the
    // channel stays hers.
    let err = alice.leave(channel).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Invalid(m) if m.contains("only admin")),
        "{err}"
    );
    assert!(alice.resolve_channel("general").unwrap().active);
    let report = bob.sync().await.unwrap();
    assert_eq!((report.messages, report.commits), (0, 0));
    alice.send(channel, b"still mine").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(texts(&bob, channel), ["still mine"]);

    // Once she is alone, she may leave: the request goes out to nobody.
    assert_eq!(alice.remove(channel, "bob@a.test").await.unwrap(), 1);
    assert_eq!(
        alice.leave(channel).await.unwrap(),
        LeaveOutcome {
            requested: true,
            admins: 0
        }
    );
    assert!(!alice.resolve_channel("general").unwrap().active);
    assert_eq!(texts(&alice, channel), ["still mine"]);
}
