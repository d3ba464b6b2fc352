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

use std::path::Path;

use kith_chat::{Body, ChatMessage, Edit, MessageRef, RichText, Text};
use kith_client::{Client, ClientError};
use kith_proto::{ChannelId, DeviceId};
use kith_testkit::{Registration, TestServer};

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

    // The phone joins alice; the laptop (the channel's admin) adds it to
    // its channels on its next sync, once.
    let mut phone = second_device(&dir.path().join("phone"), &server, &mut laptop).await;
    let report = laptop.sync().await.unwrap();
    assert_eq!(report.linked_added, vec![(general, phone.device_id())]);
    assert!(laptop.sync().await.unwrap().linked_added.is_empty());
    assert_eq!(phone.sync().await.unwrap().joined, vec![general]);
    bob.sync().await.unwrap();
    assert_eq!(bob.members(general).unwrap().len(), 3);

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
    let side = bob.create_channel("side", CHAT).await.unwrap();
    assert_eq!(bob.invite(side, "alice@a.test").await.unwrap(), 2);
    assert_eq!(laptop.sync().await.unwrap().joined, vec![side]);
    assert_eq!(phone.sync().await.unwrap().joined, vec![side]);

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
}
