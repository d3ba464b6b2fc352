//! The pipelined [`kith_client::Sender`]: one multi-message send in
//! flight while the next batch is encrypted. Whatever happens mid-stream
//! (a commit that moves the channel to a new epoch, a batch the server
//! refuses, a server restart), every payload the sender was told is
//! acknowledged reaches the other member exactly once, in the order sent,
//! and the ones it was told are not can be sent again.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;

use kith_client::{Client, ClientError, SendError};
use kith_proto::ChannelId;
use kith_testkit::TestServer;

async fn user(dir: &Path, server: &TestServer, name: &str) -> Client {
    Client::register(&dir.join(name), server.url(), name, None)
        .await
        .unwrap()
}

/// Alice's channel with Bob in it, both at its current epoch.
async fn pair(dir: &Path, server: &TestServer) -> (Client, Client, ChannelId) {
    let mut alice = user(dir, server, "alice").await;
    let mut bob = user(dir, server, "bob").await;
    let channel = alice.create_channel("pipe", "text/plain").await.unwrap();
    alice.invite(channel, "bob@a.test").await.unwrap();
    bob.sync().await.unwrap();
    (alice, bob, channel)
}

/// The bodies `client` stored for `channel`, in the channel's order.
fn bodies(client: &Client, channel: ChannelId) -> Vec<String> {
    client
        .messages(channel, 10_000)
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8(m.body).unwrap())
        .collect()
}

/// `count` distinct payloads named `prefix`0, `prefix`1, ….
fn round(prefix: &str, count: usize) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| format!("{prefix}{i}").into_bytes())
        .collect()
}

fn refs(payloads: &[Vec<u8>]) -> Vec<&[u8]> {
    payloads.iter().map(Vec::as_slice).collect()
}

fn texts(payloads: &[Vec<u8>]) -> Vec<String> {
    payloads
        .iter()
        .map(|p| String::from_utf8(p.clone()).unwrap())
        .collect()
}

/// How many POSTs the server answered 409 (here: `wrong_epoch`), from its
/// `kith_http_requests_total` metric.
async fn refused_posts(server: &TestServer) -> u64 {
    let text = reqwest::get(format!("{}/metrics", server.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("kith_http_requests_total{method=\"POST\",status=\"409\"}"))
        .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

/// Syncs `client` until a sync brings nothing new (bounded).
async fn sync_all(client: &mut Client) {
    for _ in 0..20 {
        if client.sync().await.unwrap().messages == 0 {
            return;
        }
    }
    panic!("still receiving after 20 syncs");
}

#[tokio::test]
async fn a_sender_delivers_every_batch_once_in_order_across_a_commit_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, channel) = pair(dir.path(), &server).await;
    let start = alice.channel_state(channel).unwrap().0;

    // Rounds of uneven sizes; one call of more than a request's worth.
    let rounds: Vec<Vec<Vec<u8>>> = vec![
        round("a", 5),
        round("b", 64),
        round("c", 1),
        round("d", 130),
        round("e", 7),
    ];
    let mut acked = Vec::new();
    let mut pipe = alice.sender(channel);
    for (i, r) in rounds.iter().enumerate() {
        acked.extend(pipe.send(&refs(r)).await.unwrap());
        if i == 2 {
            // Bob commits while Alice has a batch in flight (encrypted at
            // the old epoch) and is about to encrypt the next at it too.
            bob.self_update(channel).await.unwrap();
        }
    }
    acked.extend(pipe.finish().await.unwrap());
    let sent: Vec<String> = rounds.iter().flat_map(|r| texts(r)).collect();
    assert_eq!(acked.len(), sent.len());
    let mut unique = acked.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), acked.len(), "a message id acknowledged twice");

    // The channel moved on, and Alice followed it: the server refused one
    // batch of hers at the old epoch (the one in flight, or the one posted
    // right after Bob's commit), and she caught up before posting it again
    // (no second request at the old epoch).
    assert_eq!(alice.channel_state(channel).unwrap().0, start + 1);
    assert_eq!(refused_posts(&server).await, 1);
    sync_all(&mut bob).await;
    assert_eq!(bodies(&bob, channel), sent);
    // Alice's own copies, in the server's order too.
    assert_eq!(bodies(&alice, channel), sent);
    assert_eq!(
        alice.channel_state(channel).unwrap(),
        bob.channel_state(channel).unwrap()
    );
    server.stop().await;
}

#[tokio::test]
async fn a_refused_batch_mid_stream_is_reported_and_the_rest_still_arrives_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, channel) = pair(dir.path(), &server).await;

    let first = round("first", 4);
    // Above the server's limit for one message (256 KiB by default): the
    // request carrying it is refused whole.
    let too_large = vec![b'x'; 300 * 1024];
    let mut second = round("second", 3);
    second.insert(1, too_large.clone());
    let third = round("third", 4);

    let mut pipe = alice.sender(channel);
    assert!(pipe.send(&refs(&first)).await.unwrap().is_empty());
    // The first batch is acknowledged as the second goes out.
    assert_eq!(pipe.send(&refs(&second)).await.unwrap().len(), 4);
    let SendError {
        error,
        unacknowledged,
    } = pipe.send(&refs(&third)).await.unwrap_err();
    assert!(
        matches!(error, ClientError::Server { status, .. } if (400..500).contains(&status)),
        "{error}"
    );
    // The refused batch and the one behind it, never posted.
    let mut expected = second.clone();
    expected.extend(third.iter().cloned());
    assert_eq!(unacknowledged, expected);

    // The caller drops what cannot go and sends the rest again, on the
    // same sender.
    let again: Vec<Vec<u8>> = unacknowledged
        .into_iter()
        .filter(|p| *p != too_large)
        .collect();
    pipe.send(&refs(&again)).await.unwrap();
    assert_eq!(pipe.finish().await.unwrap().len(), again.len());

    let mut sent = texts(&first);
    sent.extend(texts(&again));
    sync_all(&mut bob).await;
    // The ratchet steps of the refused batch and of the one encrypted
    // behind it were skipped over.
    assert_eq!(bodies(&bob, channel), sent);
    assert_eq!(bodies(&alice, channel), sent);
    server.stop().await;
}

/// A `Sender` dropped without `finish`: the batch it left in flight is
/// settled by the client's next use. One the server accepted has its
/// copies stored here, before a new sender posts anything; one the server
/// refused is reported by the next sync as not acknowledged, for the
/// caller to send again.
#[tokio::test]
async fn a_dropped_senders_last_batch_is_settled_on_the_next_use() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, channel) = pair(dir.path(), &server).await;

    let first = round("first", 3);
    let mut pipe = alice.sender(channel);
    assert!(pipe.send(&refs(&first)).await.unwrap().is_empty());
    drop(pipe);
    let second = round("second", 2);
    let mut pipe = alice.sender(channel);
    assert_eq!(
        pipe.send(&refs(&second)).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(pipe.finish().await.unwrap().len(), second.len());
    let mut sent = texts(&first);
    sent.extend(texts(&second));
    assert_eq!(bodies(&alice, channel), sent);

    // Above the server's limit for one message: refused, after the drop.
    let too_large = vec![b'x'; 300 * 1024];
    let mut pipe = alice.sender(channel);
    assert!(pipe.send(&[&too_large]).await.unwrap().is_empty());
    drop(pipe);
    let report = alice.sync().await.unwrap();
    assert_eq!(report.unacknowledged, vec![(channel, too_large)]);
    assert!(alice.sync().await.unwrap().unacknowledged.is_empty());

    sync_all(&mut bob).await;
    assert_eq!(bodies(&bob, channel), sent);
    assert_eq!(bodies(&alice, channel), sent);
    server.stop().await;
}

#[tokio::test]
async fn a_server_restart_mid_stream_loses_nothing_acknowledged_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("server"), "a.test").await;
    let (mut alice, mut bob, channel) = pair(dir.path(), &server).await;

    let rounds: Vec<Vec<Vec<u8>>> = (0..3).map(|i| round(&format!("r{i}-"), 20)).collect();
    let mut acked: Vec<String> = Vec::new();
    let mut pipe = alice.sender(channel);
    for r in &rounds {
        pipe.send(&refs(r))
            .await
            .unwrap()
            .into_iter()
            .for_each(|id| acked.push(id));
    }
    // The last round is in flight (or about to be) as the server stops:
    // it is either answered before the server goes, or refused.
    let stopped = server.stop_keeping().await;
    let after = round("after-", 20);
    let mut unacknowledged = Vec::new();
    match pipe.send(&refs(&after)).await {
        Ok(ids) => acked.extend(ids),
        Err(e) => unacknowledged.extend(e.unacknowledged),
    }
    match pipe.finish().await {
        Ok(ids) => acked.extend(ids),
        Err(e) => unacknowledged.extend(e.unacknowledged),
    }
    assert!(
        unacknowledged.ends_with(&after),
        "the round sent while the server was down was acknowledged"
    );

    let server = stopped.start().await;
    let mut pipe = alice.sender(channel);
    pipe.send(&refs(&unacknowledged)).await.unwrap();
    pipe.finish().await.unwrap();

    let mut sent: Vec<String> = rounds.iter().flat_map(|r| texts(r)).collect();
    sent.extend(texts(&after));
    sync_all(&mut bob).await;
    assert_eq!(bodies(&bob, channel), sent);
    assert_eq!(bodies(&alice, channel), sent);
    server.stop().await;
}
