//! Channels whose members are on several homeservers (federation part 2):
//! the channel's ordering group is the set of servers that sponsor its
//! members, commits are ordered by Raft among them and certified by a
//! majority of their votes, and messages fan out between them. Real
//! `kithd` servers on loopback, driven through the client SDK.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{sync_until, sync_until_within};
use kith_client::{Client, ClientError, Kept};
use kith_proto::ChannelId;
use kith_testkit::Cluster;

/// Faster Raft timers than the defaults, so elections after a kill take
/// about a second instead of several.
fn quick(config: &mut kith_testkit::Config) {
    config.federation.raft_heartbeat_ms = 150;
    config.federation.raft_election_min_ms = 600;
    config.federation.raft_election_max_ms = 1200;
    config.federation.retry_base_ms = 200;
    config.federation.retry_max_ms = 2_000;
}

async fn user(dir: &Path, cluster: &Cluster, server: &str, name: &str) -> Client {
    Client::register(&dir.join(name), cluster.server(server).url(), name, None)
        .await
        .unwrap()
}

fn texts(client: &Client, channel: ChannelId) -> Vec<String> {
    let mut texts: Vec<String> = client
        .messages(channel, 1000)
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8(m.body).unwrap())
        .collect();
    texts.sort();
    texts
}

/// Sends, retrying while the server answers 503 (its log is not yet known
/// to be fresh after a restart), at most ~20 s.
async fn send_retrying(client: &mut Client, channel: ChannelId, text: &[u8]) {
    for _ in 0..100 {
        match client.send(channel, text).await {
            Ok(_) => return,
            Err(ClientError::Server { status: 503, .. }) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("sending: {e}"),
        }
    }
    panic!("the server never took the message");
}

async fn join(client: &mut Client, channel: ChannelId) {
    sync_until(client, "joining", |c| c.channel_state(channel).is_ok()).await;
}

fn has_all(client: &Client, channel: ChannelId, wanted: &[&str]) -> bool {
    let got = texts(client, channel);
    wanted.iter().all(|w| got.iter().any(|g| g == w))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_on_three_servers_share_a_channel() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], quick).await;
    let mut alice = user(dir.path(), &cluster, "a.test", "alice").await;
    let mut bob = user(dir.path(), &cluster, "b.test", "bob").await;
    let mut carol = user(dir.path(), &cluster, "c.test", "carol").await;

    let channel = alice.create_channel("general", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
    join(&mut bob, channel).await;
    assert_eq!(alice.invite(channel, "carol@c.test").await.unwrap(), 1);
    join(&mut carol, channel).await;
    // Bob, on b.test, updates his keys: his commit is forwarded to the
    // leader and certified by a majority of a, b and c.
    bob.self_update(channel).await.unwrap();
    for (client, name) in [(&mut alice, "alice"), (&mut carol, "carol")] {
        sync_until(client, name, |c| c.channel_state(channel).unwrap().0 == 3).await;
    }

    alice.send(channel, b"hello from a").await.unwrap();
    bob.send(channel, b"hello from b").await.unwrap();
    carol.send(channel, b"hello from c").await.unwrap();
    let all = ["hello from a", "hello from b", "hello from c"];
    for (client, name) in [
        (&mut alice, "alice"),
        (&mut bob, "bob"),
        (&mut carol, "carol"),
    ] {
        sync_until(client, name, |c| has_all(c, channel, &all)).await;
    }

    // Alice removes Carol; Carol cannot read what follows.
    assert_eq!(alice.remove(channel, "carol@c.test").await.unwrap(), 1);
    alice.send(channel, b"carol is gone").await.unwrap();
    sync_until(&mut bob, "bob after the removal", |c| {
        has_all(c, channel, &["carol is gone"])
    })
    .await;
    for _ in 0..5 {
        let _ = carol.sync().await;
    }
    assert!(!texts(&carol, channel).iter().any(|t| t == "carol is gone"));

    let (epoch_a, auth_a) = alice.channel_state(channel).unwrap();
    let (epoch_b, auth_b) = bob.channel_state(channel).unwrap();
    assert_eq!(epoch_a, epoch_b);
    assert_eq!(auth_a, auth_b, "alice and bob disagree on the group state");
    cluster.stop().await;
}

/// A multi-message send (spec §6.7) on a channel of two servers: more
/// messages than one request carries go as several batches; the sender
/// stores them in the order sent, and the member on the other server
/// receives every one of them, once. (That server's order is its arrival
/// order, §11.2: usually the same, but a fan-out that times out while the
/// other server is still storing it can be overtaken by the next one, as
/// seen once on a loaded machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_sent_on_one_server_arrives_whole_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], quick).await;
    let mut alice = user(dir.path(), &cluster, "a.test", "alice").await;
    let mut bob = user(dir.path(), &cluster, "b.test", "bob").await;
    let channel = alice.create_channel("batches", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
    join(&mut bob, channel).await;

    let count = kith_client::channels::MAX_BATCH + 6;
    let sent: Vec<String> = (0..count).map(|i| format!("batched {i:03}")).collect();
    let payloads: Vec<&[u8]> = sent.iter().map(String::as_bytes).collect();
    let mut ids = None;
    // b.test's log must be known fresh before a.test takes messages
    // (§11.3). Each refused try wastes up to 64 ratchet steps, and Bob
    // skips at most 1,000: a few tries only.
    for _ in 0..10 {
        match alice.send_many(channel, &payloads).await {
            Ok(got) => {
                ids = Some(got);
                break;
            }
            Err(ClientError::Server { status: 503, .. }) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("sending the batch: {e}"),
        }
    }
    let ids = ids.expect("the server never took the batch");
    assert_eq!(ids.len(), count);
    let in_order = |client: &Client| -> Vec<String> {
        client
            .messages(channel, 1000)
            .unwrap()
            .into_iter()
            .map(|m| String::from_utf8(m.body).unwrap())
            .collect()
    };
    assert_eq!(in_order(&alice), sent);
    // b.test stores each fanned-out message in a transaction of its own:
    // on a loaded machine, with the file's other clusters running, 70 of
    // them took longer than `sync_until`'s 300 syncs once.
    sync_until_within(&mut bob, "bob receives the batches", 1200, |c| {
        in_order(c).len() >= count
    })
    .await;
    let mut received = in_order(&bob);
    received.sort();
    assert_eq!(received, sent);
    let mut bob_ids: Vec<String> = bob
        .messages(channel, 1000)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    bob_ids.sort();
    let mut ids = ids;
    ids.sort();
    assert_eq!(bob_ids, ids);
    cluster.stop().await;
}

/// Alice on a.test creates a channel and adds Bob (b.test) and Carol
/// (c.test); returns once both joined.
async fn three_server_channel(
    dir: &Path,
    cluster: &Cluster,
) -> (Client, Client, Client, ChannelId) {
    let mut alice = user(dir, cluster, "a.test", "alice").await;
    let mut bob = user(dir, cluster, "b.test", "bob").await;
    let mut carol = user(dir, cluster, "c.test", "carol").await;
    let channel = alice.create_channel("general", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
    join(&mut bob, channel).await;
    assert_eq!(alice.invite(channel, "carol@c.test").await.unwrap(), 1);
    join(&mut carol, channel).await;
    sync_until(&mut bob, "bob sees carol's add", |c| {
        c.channel_state(channel).unwrap().0 == 2
    })
    .await;
    (alice, bob, carol, channel)
}

/// Syncs everyone until they are all at the same epoch, then checks they
/// agree on the group state.
async fn converge(clients: &mut [&mut Client], channel: ChannelId) {
    for _ in 0..300 {
        for client in clients.iter_mut() {
            let _ = client.sync().await;
            let _ = client.catch_up(channel).await;
        }
        let states: Vec<(u64, Vec<u8>)> = clients
            .iter()
            .map(|c| c.channel_state(channel).unwrap())
            .collect();
        if states.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let states: Vec<u64> = clients
        .iter()
        .map(|c| c.channel_state(channel).unwrap().0)
        .collect();
    panic!("the devices did not converge: epochs {states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicting_commits_from_three_servers_never_fork() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], quick).await;
    let (mut alice, mut bob, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;
    let start = alice.channel_state(channel).unwrap().0;
    const ROUNDS: u64 = 4;
    for round in 0..ROUNDS {
        // Each device commits for the same epoch at once; the ordering
        // group lets exactly one win, the others retry on the next epoch.
        let (a, b, c) = tokio::join!(
            alice.self_update(channel),
            bob.self_update(channel),
            carol.self_update(channel)
        );
        for (who, result) in [("alice", a), ("bob", b), ("carol", c)] {
            result.unwrap_or_else(|e| panic!("round {round}: {who}'s commit failed: {e}"));
        }
    }
    converge(&mut [&mut alice, &mut bob, &mut carol], channel).await;
    let (epoch, _) = alice.channel_state(channel).unwrap();
    // Every commit of every round was merged exactly once, by everyone.
    assert_eq!(epoch, start + 3 * ROUNDS);
    let conflicts = alice.commit_conflicts() + bob.commit_conflicts() + carol.commit_conflicts();
    assert!(conflicts > 0, "the test never made two commits race");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_server_down_the_others_go_on_two_down_commits_stall_then_all_converge() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], quick).await;
    let (mut alice, mut bob, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;

    // c.test goes down: a and b are a majority of the ordering group.
    let c = cluster.take("c.test").stop_keeping().await;
    alice.self_update(channel).await.unwrap();
    alice.send(channel, b"while c is down").await.unwrap();
    bob.send(channel, b"b here too").await.unwrap();
    sync_until(&mut bob, "bob during c's outage", |c| {
        has_all(c, channel, &["while c is down"])
    })
    .await;
    sync_until(&mut alice, "alice during c's outage", |c| {
        has_all(c, channel, &["b here too"])
    })
    .await;

    // b.test goes down too: no majority, commits stall with a clear error
    // and nothing is merged. Messages are refused too (503, retryable):
    // a server out of touch with a majority cannot know the channel's epoch,
    // and a message it acknowledged at a stale one could reach the others'
    // devices after they left that epoch behind (spec §11.3).
    let b = cluster.take("b.test").stop_keeping().await;
    let before = alice.channel_state(channel).unwrap();
    match alice.self_update(channel).await {
        Err(ClientError::Server {
            status: 503, code, ..
        }) => {
            assert_eq!(code, "ordering_unavailable");
        }
        other => panic!("a commit without a majority must fail clearly, got {other:?}"),
    }
    assert_eq!(alice.channel_state(channel).unwrap(), before);
    match alice.send(channel, b"refused while b and c are down").await {
        Err(ClientError::Server {
            status: 503, code, ..
        }) => assert_eq!(code, "ordering_unavailable"),
        other => panic!("a send without a majority must fail clearly, got {other:?}"),
    }

    // Both return: every device converges, and every message acknowledged
    // during the outages arrives.
    cluster.put(b.start().await);
    cluster.put(c.start().await);
    converge(&mut [&mut alice, &mut bob, &mut carol], channel).await;
    send_retrying(&mut alice, channel, b"after b and c are back").await;
    let all = ["while c is down", "b here too", "after b and c are back"];
    sync_until(&mut bob, "bob after the outage", |c| {
        has_all(c, channel, &all)
    })
    .await;
    sync_until(&mut carol, "carol after the outage", |c| {
        has_all(c, channel, &all)
    })
    .await;
    // And the channel works again for commits from every server.
    carol.self_update(channel).await.unwrap();
    converge(&mut [&mut alice, &mut bob, &mut carol], channel).await;
    cluster.stop().await;
}

/// Waits (bounded) until `client`'s homeserver stores more than `count`
/// messages of `channel`, without the client processing them.
async fn stored_beyond(client: &Client, channel: ChannelId, count: usize) {
    for _ in 0..300 {
        let stored = client
            .api()
            .channel_messages(&channel.to_string(), 0)
            .await
            .unwrap();
        if stored.len() > count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the message never reached the server");
}

/// Two of a channel's three servers down: the admin's commit of a leave
/// request gets 503 `ordering_unavailable` (no leader). Alice's sync
/// still succeeds: it stores what arrived, removes Dave from her channel
/// on a.test alone (he asked to leave too), and reports Bob's leave
/// request as kept, which the next sync does not try again before its
/// back-off. Once the servers are back, a later sync removes Bob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_the_ordering_group_cannot_make_is_kept_and_the_sync_goes_on() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], quick).await;
    let (mut alice, mut bob, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;
    let mut dave = user(dir.path(), &cluster, "a.test", "dave").await;
    let local = alice.create_channel("local", "text/plain").await.unwrap();
    assert_eq!(alice.invite(local, "dave@a.test").await.unwrap(), 1);
    join(&mut dave, local).await;
    let (bob_id, dave_id) = (bob.device_id(), dave.device_id());

    let count = alice
        .api()
        .channel_messages(&channel.to_string(), 0)
        .await
        .unwrap()
        .len();
    assert!(bob.leave(channel).await.unwrap().requested);
    stored_beyond(&alice, channel, count).await;
    dave.send(local, b"bye").await.unwrap();
    assert!(dave.leave(local).await.unwrap().requested);

    let b = cluster.take("b.test").stop_keeping().await;
    let c = cluster.take("c.test").stop_keeping().await;
    let report = alice.sync().await.unwrap();
    assert_eq!(report.removed_on_request, vec![(local, dave_id)]);
    assert!(has_all(&alice, local, &["bye"]));
    let kept: Vec<Kept> = report.kept.iter().map(|k| k.work).collect();
    assert_eq!(kept, vec![Kept::Leave(channel, bob_id)], "{report:?}");
    assert!(report.kept[0].reason.contains("ordering_unavailable"));
    assert!(alice.members(channel).unwrap().contains(&bob_id));
    // Not tried again before its back-off: no second wait for a leader.
    let report = alice.sync().await.unwrap();
    assert!(report.kept.is_empty(), "{report:?}");

    cluster.put(b.start().await);
    cluster.put(c.start().await);
    converge(&mut [&mut alice, &mut carol], channel).await;
    for _ in 0..20 {
        alice.recheck_kept_requests().unwrap();
        let _ = alice.sync().await;
        if !alice.members(channel).unwrap().contains(&bob_id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!alice.members(channel).unwrap().contains(&bob_id));
    converge(&mut [&mut alice, &mut carol], channel).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_servers_user_cannot_be_added() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], |config| {
        quick(config);
        if config.server_name.as_str() == "a.test" {
            config.blocked_servers.insert("c.test".parse().unwrap());
        }
    })
    .await;
    let mut alice = user(dir.path(), &cluster, "a.test", "alice").await;
    let mut bob = user(dir.path(), &cluster, "b.test", "bob").await;
    let _carol = user(dir.path(), &cluster, "c.test", "carol").await;
    let channel = alice.create_channel("no-c", "text/plain").await.unwrap();
    match alice.invite(channel, "carol@c.test").await {
        Err(ClientError::Server {
            status: 403, code, ..
        }) => assert_eq!(code, "blocked"),
        other => panic!("inviting a blocked server's user must fail, got {other:?}"),
    }
    assert_eq!(
        alice.channel_state(channel).unwrap().0,
        0,
        "nothing changed"
    );
    // Others are still welcome.
    assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
    join(&mut bob, channel).await;
    cluster.stop().await;
}

/// Regression (found by `faults.rs`, seed 1802073192): a server that was
/// down while a commit was ordered must learn of it even when every server
/// restarts afterwards and nothing else starts the channel's Raft nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_down_during_a_commit_catches_up_after_everyone_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), &["a.test", "b.test", "c.test"], quick).await;
    let (mut alice, mut bob, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;
    let c = cluster.take("c.test").stop_keeping().await;
    alice.self_update(channel).await.unwrap();
    sync_until(&mut bob, "bob sees alice's update", |b| {
        b.channel_state(channel).unwrap().0 == 3
    })
    .await;
    for name in ["a.test", "b.test"] {
        let server = cluster.take(name).restart().await;
        cluster.put(server);
    }
    cluster.put(c.start().await);
    converge(&mut [&mut alice, &mut bob, &mut carol], channel).await;
    assert_eq!(carol.channel_state(channel).unwrap().0, 3);
    cluster.stop().await;
}
