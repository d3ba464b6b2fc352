//! A user with several devices (spec §5.7, §6.3): a device joins a user by
//! being linked from one of its devices and linking it back when it
//! registers under the same name; the linking device adds it to its
//! channels; read markers, edits and invites then follow the user, not the
//! device. Real homeservers on loopback, driven through the client SDK.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use kith_chat::{Body, ChatMessage, Edit, MessageRef, RichText, Text};
use kith_client::{Client, ClientError};
use kith_proto::{ChannelId, DeviceId};

use common::sync_until;
use kith_testkit::{Cluster, Registration, TestServer};

const CHAT: &str = kith_chat::CONTENT_TYPE;

async fn user(dir: &Path, server: &TestServer, name: &str) -> Client {
    Client::register(&dir.join(name), server.url(), name, None)
        .await
        .unwrap()
}

fn text(s: &str) -> ChatMessage {
    ChatMessage::Text(Text::new(RichText::plain(s).unwrap()))
}

/// Registers a second device of `name` in `home`: refused until `first`
/// links it, then registered. Returns it.
async fn second_device(home: &Path, server: &TestServer, first: &mut Client) -> Client {
    let name = first.handle().split('@').next().unwrap().to_owned();
    let device = match Client::register(home, server.url(), &name, None).await {
        Err(ClientError::NameTaken { device, .. }) => device,
        Err(e) => panic!("expected name_taken, got {e}"),
        Ok(_) => panic!("an unlinked device registered under a taken name"),
    };
    assert!(first.link_device(device).await.unwrap());
    let second = Client::register(home, server.url(), &name, None)
        .await
        .unwrap();
    assert_eq!(second.device_id(), device);
    second
}

fn marker(client: &Client, channel: ChannelId, user: &str) -> Option<MessageRef> {
    client
        .timeline(channel)
        .unwrap()
        .read_markers
        .get(user)
        .copied()
}

#[tokio::test]
async fn a_device_joins_a_user_only_when_one_of_its_devices_links_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut laptop = user(dir.path(), &server, "alice").await;

    // An unlinked device cannot take the name; its id stays the same
    // across attempts, so it can be linked in between.
    let phone_home = dir.path().join("phone");
    let first = Client::register(&phone_home, server.url(), "alice", None)
        .await
        .err()
        .unwrap();
    let ClientError::NameTaken {
        device: phone_id, ..
    } = first
    else {
        panic!("expected name_taken, got {first}");
    };
    assert!(
        first
            .to_string()
            .contains(&format!("kith device link {phone_id}")),
        "{first}"
    );
    let again = Client::register(&phone_home, server.url(), "alice", None)
        .await
        .err()
        .unwrap();
    assert!(matches!(again, ClientError::NameTaken { device, .. } if device == phone_id));

    assert!(matches!(
        laptop.link_device(laptop.device_id()).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(laptop.link_device(phone_id).await.unwrap());
    assert!(!laptop.link_device(phone_id).await.unwrap(), "idempotent");
    // Before the phone registers, the link is one-sided: not a user yet.
    assert!(laptop.linked_devices().await.unwrap().is_empty());

    let mut phone = Client::register(&phone_home, server.url(), "alice", None)
        .await
        .unwrap();
    assert_eq!(phone.device_id(), phone_id);
    assert_eq!(phone.handle(), "alice@a.test");

    // Both records are published, sponsored under alice, and mutually linked.
    let records = laptop.user_devices("alice@a.test").await.unwrap();
    let mut ids: Vec<DeviceId> = records.iter().map(|r| r.device_id()).collect();
    ids.sort();
    let mut want = vec![laptop.device_id(), phone_id];
    want.sort();
    assert_eq!(ids, want);
    for r in &records {
        let other = if r.device_id() == phone_id {
            laptop.device_id()
        } else {
            phone_id
        };
        assert!(
            r.links_to(&other),
            "{} does not link {other}",
            r.device_id()
        );
    }
    let ids_of =
        |v: Vec<kith_proto::DeviceRecord>| v.iter().map(|r| r.device_id()).collect::<Vec<_>>();
    assert_eq!(ids_of(laptop.linked_devices().await.unwrap()), [phone_id]);
    assert_eq!(
        ids_of(phone.linked_devices().await.unwrap()),
        [laptop.device_id()]
    );

    // Another device nobody linked is still refused.
    let stranger = Client::register(&dir.path().join("stranger"), server.url(), "alice", None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(stranger, ClientError::NameTaken { .. }),
        "{stranger}"
    );

    // With registration closed, new users are refused but a linked device
    // still joins its user: it is not a new account.
    let mut stopped = server.stop_keeping().await;
    stopped.config_mut().registration = Registration::Closed;
    let server = stopped.start().await;
    laptop.login().await.unwrap();
    let refused = Client::register(&dir.path().join("bob"), server.url(), "bob", None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&refused, ClientError::Server { status: 403, .. }),
        "{refused}"
    );
    let tablet = second_device(&dir.path().join("tablet"), &server, &mut laptop).await;
    assert_eq!(tablet.handle(), "alice@a.test");
    assert_eq!(laptop.user_devices("alice@a.test").await.unwrap().len(), 3);
}

#[tokio::test]
async fn read_markers_and_edits_follow_the_user_across_its_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut laptop = user(dir.path(), &server, "alice").await;
    let mut bob = user(dir.path(), &server, "bob").await;
    let general = laptop.create_channel("general", CHAT).await.unwrap();
    assert_eq!(laptop.invite(general, "bob@a.test").await.unwrap(), 1);
    bob.sync().await.unwrap();
    // In Bob's channel alice is not an admin.
    let side = bob.create_channel("side", CHAT).await.unwrap();
    assert_eq!(bob.invite(side, "alice@a.test").await.unwrap(), 1);
    assert_eq!(laptop.sync().await.unwrap().joined, vec![side]);

    // The phone joins alice. On its next sync the laptop adds it where it
    // is an admin (once), and asks the admins elsewhere, whose clients
    // check the link and add it.
    let mut phone = second_device(&dir.path().join("phone"), &server, &mut laptop).await;
    let report = laptop.sync().await.unwrap();
    assert_eq!(report.linked_added, vec![(general, phone.device_id())]);
    assert!(laptop.sync().await.unwrap().linked_added.is_empty());
    let report = bob.sync().await.unwrap();
    assert_eq!(report.linked_added, vec![(side, phone.device_id())]);
    let mut joined = phone.sync().await.unwrap().joined;
    joined.sort();
    let mut both = vec![general, side];
    both.sort();
    assert_eq!(joined, both);
    bob.sync().await.unwrap();
    assert_eq!(bob.members(general).unwrap().len(), 3);
    assert_eq!(bob.members(side).unwrap().len(), 3);

    // Bob writes; the laptop reads it; the phone learns that alice has.
    let one = bob.send_chat(general, &text("one")).await.unwrap();
    let two = bob.send_chat(general, &text("two")).await.unwrap();
    laptop.sync().await.unwrap();
    phone.sync().await.unwrap();
    assert_eq!(marker(&phone, general, "alice@a.test"), None);
    laptop.mark_read(general, two).await.unwrap();
    phone.sync().await.unwrap();
    assert_eq!(marker(&phone, general, "alice@a.test"), Some(two));
    assert_ne!(Some(one), marker(&phone, general, "alice@a.test"));

    // And the other way round.
    let three = bob.send_chat(general, &text("three")).await.unwrap();
    phone.sync().await.unwrap();
    phone.mark_read(general, three).await.unwrap();
    laptop.sync().await.unwrap();
    assert_eq!(marker(&laptop, general, "alice@a.test"), Some(three));
    bob.sync().await.unwrap();
    assert_eq!(marker(&bob, general, "alice@a.test"), Some(three));

    // The phone may edit what the laptop sent: both are alice.
    let typo = laptop.send_chat(general, &text("helo")).await.unwrap();
    phone.sync().await.unwrap();
    phone
        .send_chat(
            general,
            &ChatMessage::Edit(Edit {
                target: typo,
                replacement: RichText::plain("hello").unwrap(),
            }),
        )
        .await
        .unwrap();
    bob.sync().await.unwrap();
    let timeline = bob.timeline(general).unwrap();
    let item = timeline.items.iter().find(|i| i.id == typo).unwrap();
    assert_eq!(item.sender, "alice@a.test");
    assert!(item.edited());
    assert!(matches!(&item.body, Body::Text(t) if t.text() == "hello"));

    // An invite of alice now reaches both of her devices.
    let third = bob.create_channel("third", CHAT).await.unwrap();
    assert_eq!(bob.invite(third, "alice@a.test").await.unwrap(), 2);
    assert_eq!(laptop.sync().await.unwrap().joined, vec![third]);
    assert_eq!(phone.sync().await.unwrap().joined, vec![third]);

    // A linked device that leaves a channel is not added back.
    phone.leave(general).await.unwrap();
    let report = laptop.sync().await.unwrap();
    assert_eq!(
        report.removed_on_request,
        vec![(general, phone.device_id())]
    );
    assert!(laptop.sync().await.unwrap().linked_added.is_empty());
    assert!(
        !laptop
            .members(general)
            .unwrap()
            .contains(&phone.device_id())
    );

    // Nobody can have a device added that is not linked to them both ways:
    // Carol asks for Mallory's device, first unlinked, then linked from
    // Carol's side only. Bob's client checks and adds nothing.
    let mut carol = user(dir.path(), &server, "carol").await;
    let mallory = user(dir.path(), &server, "mallory").await;
    assert_eq!(bob.invite(side, "carol@a.test").await.unwrap(), 1);
    carol.sync().await.unwrap();
    carol
        .request_add_device(side, mallory.device_id())
        .await
        .unwrap();
    assert!(carol.link_device(mallory.device_id()).await.unwrap());
    carol
        .request_add_device(side, mallory.device_id())
        .await
        .unwrap();
    // Bob processes everything after the requests too.
    let after = carol.send_chat(side, &text("after")).await.unwrap();
    let report = bob.sync().await.unwrap();
    assert!(report.linked_added.is_empty(), "{:?}", report.linked_added);
    assert!(
        bob.timeline(side)
            .unwrap()
            .items
            .iter()
            .any(|i| i.id == after)
    );
    assert!(!bob.members(side).unwrap().contains(&mallory.device_id()));
    // The requests were dropped, not kept for ever.
    assert!(bob.sync().await.unwrap().linked_added.is_empty());
}

#[tokio::test]
async fn a_new_device_is_added_by_an_admin_on_another_server() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], |c| {
        c.federation.raft_heartbeat_ms = 150;
        c.federation.raft_election_min_ms = 600;
        c.federation.raft_election_max_ms = 1200;
        c.federation.retry_base_ms = 200;
        c.federation.retry_max_ms = 2_000;
    })
    .await;
    let a = cluster.server("a.test");
    let mut laptop = user(dir.path(), a, "alice").await;
    let mut bob = user(dir.path(), cluster.server("b.test"), "bob").await;
    let general = bob.create_channel("general", CHAT).await.unwrap();
    assert_eq!(bob.invite(general, "alice@a.test").await.unwrap(), 1);
    sync_until(&mut laptop, "laptop joins", |c| {
        c.channel_state(general).is_ok()
    })
    .await;

    // The phone joins alice on a.test; the laptop asks Bob (admin, on
    // b.test), whose client claims only the phone's key package through
    // federation and adds it.
    let mut phone = second_device(&dir.path().join("phone"), a, &mut laptop).await;
    laptop.sync().await.unwrap();
    let phone_id = phone.device_id();
    sync_until(&mut bob, "bob adds the phone", |c| {
        c.members(general).unwrap().contains(&phone_id)
    })
    .await;
    sync_until(&mut phone, "the phone joins", |c| {
        c.channel_state(general).is_ok()
    })
    .await;
    let hello = bob.send_chat(general, &text("hello phone")).await.unwrap();
    sync_until(&mut phone, "the phone reads", |c| {
        c.timeline(general)
            .unwrap()
            .items
            .iter()
            .any(|i| i.id == hello)
    })
    .await;
    cluster.stop().await;
}
