//! Acknowledged messages must reach every device that was a member when
//! they were sent, even when the federation link from the sender's server
//! to another server is cut while more commits happen than members keep
//! past epochs for (issue 7, spec §11.3). Deterministic: the link is cut
//! before the message is sent and healed only after the receiving device
//! has merged every later commit.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kith_client::{Client, ClientError};
use kith_proto::{ChannelId, ServerName};
use kith_testkit::{Cluster, LinkFaults};

/// More commits than a device keeps past epochs for.
const COMMITS: u64 = kith_mls::MAX_PAST_EPOCHS as u64 + 4;

fn tweak(config: &mut kith_testkit::Config, faults: &Arc<LinkFaults>) {
    config.federation.raft_heartbeat_ms = 150;
    config.federation.raft_election_min_ms = 600;
    config.federation.raft_election_max_ms = 1200;
    config.federation.retry_base_ms = 200;
    config.federation.retry_max_ms = 1_000;
    config.federation.request_timeout_ms = 3_000;
    config.federation.connect_timeout_ms = 1_000;
    config.faults = Some(Arc::clone(faults));
}

fn name(s: &str) -> ServerName {
    s.parse().unwrap()
}

async fn user(dir: &Path, cluster: &Cluster, server: &str, user: &str) -> Client {
    Client::register(&dir.join(user), cluster.server(server).url(), user, None)
        .await
        .unwrap()
}

fn texts(client: &Client, channel: ChannelId) -> Vec<String> {
    client
        .messages(channel, 10_000)
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8(m.body).unwrap())
        .collect()
}

/// Syncs until `done` holds, at most ~60 s.
async fn sync_until(client: &mut Client, what: &str, done: impl Fn(&Client) -> bool) {
    common::sync_until_within(client, what, 600, done).await;
}

fn epoch(client: &Client, channel: ChannelId) -> u64 {
    client.channel_state(channel).unwrap().0
}

async fn three_server_channel(
    dir: &Path,
    cluster: &Cluster,
) -> (Client, Client, Client, ChannelId) {
    let mut alice = user(dir, cluster, "a.test", "alice").await;
    let mut bob = user(dir, cluster, "b.test", "bob").await;
    let mut carol = user(dir, cluster, "c.test", "carol").await;
    let channel = alice.create_channel("late", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
    sync_until(&mut bob, "bob joins", |c| c.channel_state(channel).is_ok()).await;
    assert_eq!(alice.invite(channel, "carol@c.test").await.unwrap(), 1);
    sync_until(&mut carol, "carol joins", |c| {
        c.channel_state(channel).is_ok()
    })
    .await;
    sync_until(&mut bob, "bob sees carol's add", |c| epoch(c, channel) == 2).await;
    (alice, bob, carol, channel)
}

/// Bob commits `COMMITS` times; Carol merges them all.
async fn many_commits(bob: &mut Client, carol: &mut Client, channel: ChannelId) -> u64 {
    for i in 0..COMMITS {
        bob.self_update(channel)
            .await
            .unwrap_or_else(|e| panic!("bob's commit {i} failed: {e}"));
    }
    let target = epoch(bob, channel);
    sync_until(carol, "carol merges bob's commits", |c| {
        epoch(c, channel) >= target
    })
    .await;
    target
}

/// Fan-out from the sender's server to Carol's is held back (the outbox
/// keeps failing, as over a cut link) while the message is sent and while
/// many commits are merged; Raft and votes still flow both ways, so Carol's
/// server learns every commit whichever server leads. (A plain cut of
/// a → c would stall c.test instead whenever a.test leads, and the test
/// could not choose the leader.) The message must reach Carol before her
/// device has moved too far past its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_held_up_by_a_cut_link_still_reaches_every_member() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let cluster = {
        let faults = Arc::clone(&faults);
        Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], move |c| {
            tweak(c, &faults)
        })
        .await
    };
    let (mut alice, mut bob, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;

    faults.hold_fanout(&name("a.test"), &name("c.test"));
    let sent_in = epoch(&alice, channel);
    alice
        .send(channel, b"sent while a -> c is cut")
        .await
        .expect("a.test is in contact with its ordering group, so it acknowledges");
    let reached = many_commits(&mut bob, &mut carol, channel).await;
    assert!(reached >= sent_in + COMMITS);
    faults.heal_all();

    sync_until(&mut carol, "carol gets the message", |c| {
        texts(c, channel)
            .iter()
            .any(|t| t == "sent while a -> c is cut")
    })
    .await;
    sync_until(&mut bob, "bob gets the message", |c| {
        texts(c, channel)
            .iter()
            .any(|t| t == "sent while a -> c is cut")
    })
    .await;
    cluster.stop().await;
}

/// A server cut off from every other server of the channel (both
/// directions) lags behind its ordering group while the others go on
/// committing. It must not acknowledge a message at the stale epoch it is
/// at: either it refuses with a retryable error, or the message it
/// acknowledged reaches every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_cut_off_from_its_ordering_group_does_not_acknowledge_stale_messages() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let cluster = {
        let faults = Arc::clone(&faults);
        Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], move |c| {
            tweak(c, &faults)
        })
        .await
    };
    let (mut alice, mut bob, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;

    for other in ["b.test", "c.test"] {
        faults.cut(&name("a.test"), &name(other));
        faults.cut(&name(other), &name("a.test"));
    }
    many_commits(&mut bob, &mut carol, channel).await;
    // Alice's device has not heard of the commits (a.test cannot have
    // either), so it sends at the epoch it is at.
    let stale = epoch(&alice, channel);
    let sent = alice.send(channel, b"sent from a stale server").await;
    faults.heal_all();
    match sent {
        Err(ClientError::Server {
            status: 503, code, ..
        }) if code == "ordering_unavailable" => {
            // Refused, as it should be: nothing was acknowledged.
            let after = epoch(&alice, channel);
            assert_eq!(after, stale, "the refusal changed nothing on the device");
        }
        Err(e) => panic!("a stale server's refusal must be 503 ordering_unavailable: {e}"),
        Ok(_) => {
            sync_until(&mut carol, "carol gets the acknowledged message", |c| {
                texts(c, channel)
                    .iter()
                    .any(|t| t == "sent from a stale server")
            })
            .await;
        }
    }
    // Once healed, a.test catches up and Alice can send again.
    sync_until(&mut alice, "alice catches up", |c| {
        epoch(c, channel) == epoch(&bob, channel)
    })
    .await;
    let mut sent = false;
    for _ in 0..50 {
        match alice.send(channel, b"after the heal").await {
            Ok(_) => {
                sent = true;
                break;
            }
            Err(ClientError::Server { status: 503, .. }) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("sending after the heal: {e}"),
        }
    }
    assert!(sent, "a.test never accepted a message after the heal");
    sync_until(
        &mut carol,
        "carol gets the message sent after the heal",
        |c| texts(c, channel).iter().any(|t| t == "after the heal"),
    )
    .await;
    cluster.stop().await;
}
