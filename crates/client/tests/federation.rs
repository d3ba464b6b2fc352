//! The client across homeservers (federation part 1): users on two servers
//! find each other and exchange sealed direct messages, also while the
//! recipient's server is down for a while.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_client::Client;
use kith_testkit::Cluster;

#[tokio::test]
async fn direct_messages_cross_homeservers_and_survive_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), &["a.test", "b.test"], |_| {}).await;
    let a_url = cluster.server("a.test").url().to_owned();
    let b_url = cluster.server("b.test").url().to_owned();
    let mut alice = Client::register(&dir.path().join("alice"), &a_url, "alice", None)
        .await
        .unwrap();
    let mut bob = Client::register(&dir.path().join("bob"), &b_url, "bob", None)
        .await
        .unwrap();

    // Alice's homeserver fetches and verifies Bob's record from b.test.
    let records = alice.user_devices("bob@b.test").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].device_id(), bob.device_id());

    assert_eq!(
        alice
            .send_direct("bob@b.test", b"hello from a.test")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        bob.send_direct("alice@a.test", b"hello from b.test")
            .await
            .unwrap(),
        1
    );
    let mut got = Vec::new();
    for _ in 0..100 {
        got.extend(bob.sync_inbox().await.unwrap());
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        got.len(),
        1,
        "the deposit did not cross from a.test to b.test"
    );
    assert_eq!(
        (got[0].sender.as_str(), got[0].body.as_slice()),
        ("alice@a.test", &b"hello from a.test"[..])
    );
    let mut got = Vec::new();
    for _ in 0..100 {
        got.extend(alice.sync_inbox().await.unwrap());
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(got[0].body, b"hello from b.test");

    // b.test goes down: Alice's message waits in a.test's outbox and
    // arrives once b.test is back.
    let b = cluster.take("b.test");
    let b = b.stop_keeping().await;
    alice
        .send_direct("bob@b.test", b"while you were away")
        .await
        .unwrap();
    cluster.put(b.start().await);
    let mut got = Vec::new();
    for _ in 0..300 {
        got.extend(bob.sync_inbox().await.unwrap_or_default());
        if !got.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(got.len(), 1, "the queued deposit never arrived");
    assert_eq!(got[0].body, b"while you were away");
    cluster.stop().await;
}
