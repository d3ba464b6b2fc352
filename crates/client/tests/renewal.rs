//! Sponsorships expire; devices renew theirs before they do, so a channel
//! keeps working past the lifetime of the sponsorships its members
//! registered with. A server issuing 12-second sponsorships stands in for
//! the default year.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kith_client::{Client, ClientError};
use kith_testkit::{Config, TestServer};

const LIFETIME_MS: u64 = 12_000;

/// Sleeps until the wall clock (which sponsorships use) reads `at` ms.
async fn sleep_until_ms(at: u64) {
    let now = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(at.saturating_sub(now))).await;
}

#[tokio::test]
async fn devices_renew_their_sponsorships_and_channels_outlive_the_first_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("a.test".parse().unwrap(), dir.path().join("server"));
    config.registration = kith_testkit::Registration::Open;
    config.limits.sponsorship_ms = LIFETIME_MS;
    let server = TestServer::start_with(config).await;
    let mut alice = Client::register(&dir.path().join("alice"), server.url(), "alice", None)
        .await
        .unwrap();
    // Not due yet: nothing happens.
    let first = alice.record().unwrap().sequence();
    assert!(!alice.renew_sponsorship(false).await.unwrap());
    assert_eq!(alice.record().unwrap().sequence(), first);
    let mut bob = Client::register(&dir.path().join("bob"), server.url(), "bob", None)
        .await
        .unwrap();
    let channel = alice
        .create_channel("long-lived", "text/plain")
        .await
        .unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    bob.sync().await.unwrap();

    // Once less than a third of the lifetime is left, a sync renews.
    let issued = alice.record().unwrap().sponsorships()[0].issued_at();
    sleep_until_ms(issued + LIFETIME_MS * 3 / 4).await;
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();
    let renewed = alice.record().unwrap();
    assert_eq!(renewed.sequence(), first + 1);
    let sponsorship = &renewed.sponsorships()[0];
    assert!(sponsorship.expires_at() > sponsorship.issued_at());
    // The server holds the new version.
    let held = bob.user_devices("alice@a.test").await.unwrap();
    assert_eq!(held[0].sequence(), first + 1);

    // Past the first sponsorships' expiry the channel still works: every
    // record verifies, so certificates verify and commits merge.
    sleep_until_ms(issued + LIFETIME_MS + 500).await;
    alice.self_update(channel).await.unwrap();
    alice.send(channel, b"still here").await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(
        bob.channel_state(channel).unwrap(),
        alice.channel_state(channel).unwrap()
    );
    assert_eq!(
        bob.messages(channel, 10).unwrap().last().unwrap().body,
        b"still here"
    );

    // Renewing on demand works any time.
    assert!(bob.renew_sponsorship(true).await.unwrap());
    server.stop().await;
}

/// A voter set is computed from the members' records valid now (spec
/// §10.2): a member's record the client remembers from an earlier commit's
/// voter set is not used once its sponsorship has expired, however recently
/// it was read. Bob never renews; Alice's commit is certified by the server
/// (which counts only members with valid records) but Alice, who can no
/// longer verify Bob's record, merges nothing.
#[tokio::test]
async fn a_remembered_member_record_is_not_used_once_its_sponsorship_expired() {
    const SHORT_MS: u64 = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new("a.test".parse().unwrap(), dir.path().join("server"));
    config.registration = kith_testkit::Registration::Open;
    config.limits.sponsorship_ms = SHORT_MS;
    let server = TestServer::start_with(config).await;
    let mut alice = Client::register(&dir.path().join("alice"), server.url(), "alice", None)
        .await
        .unwrap();
    let bob = Client::register(&dir.path().join("bob"), server.url(), "bob", None)
        .await
        .unwrap();
    let channel = alice
        .create_channel("short-lived", "text/plain")
        .await
        .unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    // Bob is a member now: this commit's voter set reads his record.
    alice.self_update(channel).await.unwrap();
    let (epoch, _) = alice.channel_state(channel).unwrap();

    // Alice renews half-way; Bob's sponsorship then runs out.
    let bobs = bob.record().unwrap().sponsorships()[0].clone();
    sleep_until_ms(bobs.issued_at() + SHORT_MS / 2).await;
    assert!(alice.renew_sponsorship(true).await.unwrap());
    sleep_until_ms(bobs.expires_at() + 300).await;

    let refused = alice.self_update(channel).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Protocol(m) if m.contains("record of member")),
        "{refused}"
    );
    assert_eq!(alice.channel_state(channel).unwrap().0, epoch);
    server.stop().await;
}
