//! Registration, login and direct messages through inboxes, against a real
//! homeserver on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_client::{Client, ClientError};
use kith_testkit::TestServer;

#[tokio::test]
async fn register_then_exchange_direct_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let mut alice = Client::register(&dir.path().join("alice"), server.url(), "Alice", None)
        .await
        .unwrap();
    let mut bob = Client::register(&dir.path().join("bob"), server.url(), "bob", None)
        .await
        .unwrap();
    assert_eq!(alice.handle(), "alice@a.test");
    assert_eq!(bob.handle(), "bob@a.test");

    // Bob sees Alice's verified record under her handle.
    let records = bob.user_devices("alice@a.test").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].device_id(), alice.device_id());

    assert_eq!(
        bob.send_direct("alice@a.test", b"hello alice")
            .await
            .unwrap(),
        1
    );
    let got = alice.sync_inbox().await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"hello alice");
    assert_eq!(got[0].sender, "bob@a.test");
    assert_eq!(got[0].sender_device, bob.device_id());
    // Handled items were acknowledged: a second sync finds nothing.
    assert!(alice.sync_inbox().await.unwrap().is_empty());

    // The device reopens from its home directory with the same identity.
    let reopened = Client::open(&dir.path().join("alice")).unwrap();
    assert_eq!(reopened.handle(), "alice@a.test");
    assert_eq!(reopened.device_id(), alice.device_id());
    server.stop().await;
}

#[tokio::test]
async fn registration_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    Client::register(&dir.path().join("alice"), server.url(), "alice", None)
        .await
        .unwrap();
    // The name is taken.
    let err = Client::register(&dir.path().join("mallory"), server.url(), "alice", None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::NameTaken { .. }), "{err}");
    // The home directory already holds a device.
    let err = Client::register(&dir.path().join("alice"), server.url(), "alice2", None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::AlreadyRegistered(_)), "{err}");
    // An invalid name never reaches the server.
    let err = Client::register(&dir.path().join("x"), server.url(), "no spaces", None)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Invalid(_)), "{err}");
    // Unregistered home.
    assert!(matches!(
        Client::open(&dir.path().join("nobody")),
        Err(ClientError::NotRegistered)
    ));
    // A direct message to nobody.
    let mut alice = Client::open(&dir.path().join("alice")).unwrap();
    let err = alice
        .send_direct("nobody@a.test", b"x")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ClientError::Server { status: 404, .. }),
        "{err}"
    );
    server.stop().await;
}
