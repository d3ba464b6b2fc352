//! The SDK sits out short rate limits (spec §10.8): a request refused with
//! 429 `rate_limited` changed nothing, so it is made again after the wait
//! the server names; a long wait is the caller's to handle.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_client::{Client, ClientError};
use kith_testkit::{Cluster, Config, Registration, TestServer};

async fn server(dir: &std::path::Path, burst: u32, per_minute: u32) -> TestServer {
    let mut config = Config::new("limits.test".parse().unwrap(), dir);
    config.registration = Registration::Open;
    config.limits.commit_burst = burst;
    config.limits.commits_per_minute = per_minute;
    TestServer::start_with(config).await
}

/// With a burst of 2 and a token a second, four commits in a row meet 429
/// on the third; each is retried after its wait, and all four land.
#[tokio::test]
async fn commits_past_the_burst_wait_out_a_short_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("server"), 2, 60).await;
    let mut alice = Client::register(&dir.path().join("alice"), server.url(), "alice", None)
        .await
        .unwrap();
    let channel = alice.create_channel("busy", "text/plain").await.unwrap();
    let start = alice.channel_state(channel).unwrap().0;
    for _ in 0..4 {
        alice.self_update(channel).await.unwrap();
    }
    assert_eq!(alice.channel_state(channel).unwrap().0, start + 4);
    server.stop().await;
}

/// A limit that refills once a minute is not sat out: the commit past the
/// burst fails with the server's 429, and the device's state stays where
/// the server's is.
#[tokio::test]
async fn a_long_limit_is_returned_to_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(&dir.path().join("server"), 1, 1).await;
    let mut alice = Client::register(&dir.path().join("alice"), server.url(), "alice", None)
        .await
        .unwrap();
    let channel = alice.create_channel("slow", "text/plain").await.unwrap();
    alice.self_update(channel).await.unwrap();
    let epoch = alice.channel_state(channel).unwrap().0;
    match alice.self_update(channel).await {
        Err(ClientError::Server { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (429, "rate_limited"));
        }
        other => panic!("expected 429 rate_limited, got {other:?}"),
    }
    assert_eq!(alice.channel_state(channel).unwrap().0, epoch);
    // Messages are not commits: the channel still works.
    alice.send(channel, b"still here").await.unwrap();
    server.stop().await;
}

/// A channel's leader limits the commits each other server forwards to it
/// (spec §10.8). Past the limit, the forwarding server answers its client
/// 429 with the leader's wait, as the leader answered it (before, it kept
/// retrying for its 20 s and then answered 503), and nothing is ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_limit_on_forwarded_commits_reaches_the_client_as_429() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], |c| {
        c.limits.federation_submissions_per_minute = 2;
    })
    .await;
    let mut alice = Client::register(
        &dir.path().join("alice"),
        cluster.server("a.test").url(),
        "alice",
        None,
    )
    .await
    .unwrap();
    let mut bob = Client::register(
        &dir.path().join("bob"),
        cluster.server("b.test").url(),
        "bob",
        None,
    )
    .await
    .unwrap();
    // Alice's server made the channel and leads its ordering group; Bob's
    // server forwards his commits to it.
    let channel = alice.create_channel("shared", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
    for _ in 0..300 {
        let _ = bob.sync().await;
        if bob.channel_state(channel).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    bob.self_update(channel).await.unwrap();
    bob.self_update(channel).await.unwrap();
    let epoch = bob.channel_state(channel).unwrap().0;
    match bob.self_update(channel).await {
        Err(ClientError::Server { status, code, .. }) => {
            assert_eq!((status, code.as_str()), (429, "rate_limited"));
        }
        other => panic!("expected 429 rate_limited, got {other:?}"),
    }
    assert_eq!(bob.channel_state(channel).unwrap().0, epoch);
    // Alice's own commits are not forwarded, so not limited.
    alice.sync().await.unwrap();
    alice.self_update(channel).await.unwrap();
    cluster.stop().await;
}
