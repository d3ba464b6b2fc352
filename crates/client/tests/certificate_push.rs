//! Certificates pushed between the servers of a channel (spec §10.8): the
//! server that collected a commit's votes hands the certificate to the
//! others, which store it only if it verifies against their own voter set
//! and certifies the commit their own log accepted; a server that never
//! gets the push (its sender crashed) collects the votes itself. Real
//! `kithd` servers on loopback with federation faults injected.
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

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{server_key, signed_post, sync_until};
use kith_client::Client;
use kith_order::{CommitHash, OrderingCertificate, OrderingCertificateIn, Vote, VoterSet};
use kith_proto::{ChannelId, SecretKey, ServerName};
use kith_testkit::{Cluster, LinkFaults};
use serde_json::json;

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

async fn start(dir: &Path, faults: &Arc<LinkFaults>) -> Cluster {
    let faults = Arc::clone(faults);
    Cluster::start(dir, &["a.test", "b.test", "c.test"], move |c| {
        tweak(c, &faults)
    })
    .await
}

async fn user(dir: &Path, cluster: &Cluster, server: &str, user: &str) -> Client {
    Client::register(&dir.join(user), cluster.server(server).url(), user, None)
        .await
        .unwrap()
}

fn epoch(client: &Client, channel: ChannelId) -> u64 {
    client.channel_state(channel).unwrap().0
}

/// Alice on a.test, Bob on b.test, Carol on c.test, in one channel at
/// epoch 2; every server a voter.
async fn three_server_channel(dir: &Path, cluster: &Cluster) -> (Client, Client, ChannelId) {
    let mut alice = user(dir, cluster, "a.test", "alice").await;
    let mut bob = user(dir, cluster, "b.test", "bob").await;
    let mut carol = user(dir, cluster, "c.test", "carol").await;
    let channel = alice.create_channel("general", "text/plain").await.unwrap();
    assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
    sync_until(&mut bob, "bob joins", |c| c.channel_state(channel).is_ok()).await;
    assert_eq!(alice.invite(channel, "carol@c.test").await.unwrap(), 1);
    sync_until(&mut carol, "carol joins", |c| {
        c.channel_state(channel).is_ok()
    })
    .await;
    (alice, carol, channel)
}

/// The certified commits a server counts (`kith_commits_accepted`).
async fn certified(base: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("kith_commits_accepted") && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().last())
        .map(|v| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no commit counter in:\n{text}"))
}

/// Waits (at most ~20 s, no client request to the server) until a server
/// counts `want` certified commits.
async fn until_certified(base: &str, want: f64, what: &str) {
    for _ in 0..200 {
        if certified(base).await >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: the server never certified the commit");
}

/// The commit of `epoch` as `client`'s server lists it: its certificate and
/// hash.
async fn certified_commit(
    client: &Client,
    channel: ChannelId,
    epoch: u64,
) -> (Vec<u8>, CommitHash) {
    let commits = client
        .api()
        .commits(&channel.to_string(), epoch)
        .await
        .unwrap();
    let commit = commits.iter().find(|c| c.epoch == epoch).unwrap();
    let mut hash = [0u8; 32];
    hex::decode_to_slice(&commit.commit_hash, &mut hash).unwrap();
    (
        URL_SAFE_NO_PAD.decode(&commit.certificate).unwrap(),
        CommitHash::from_bytes(hash),
    )
}

fn push_body(certificate: &[u8]) -> Vec<u8> {
    json!({ "certificate": URL_SAFE_NO_PAD.encode(certificate) })
        .to_string()
        .into_bytes()
}

/// A certificate for `hash` winning `epoch`, with a vote by each of
/// `voters` signed by its key.
fn certificate(
    channel: ChannelId,
    epoch: u64,
    hash: CommitHash,
    voters: &[(&str, &SecretKey)],
) -> Vec<u8> {
    let set = VoterSet::new(
        voters
            .iter()
            .map(|(server, key)| (name(server), vec![key.public()])),
    );
    let votes = voters
        .iter()
        .map(|(server, key)| Vote::sign(key, name(server), channel, epoch, hash));
    OrderingCertificate::assemble(channel, epoch, hash, votes, &set)
        .unwrap()
        .encode()
}

/// c.test never gets pushed certificates and cannot ask anyone for votes,
/// so its log's latest commit stays uncertified there; pushes that are
/// short of a majority, forged, for another commit or for an epoch its log
/// has not reached are refused and change nothing; the genuine
/// certificate is stored, and Carol merges the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pushed_certificate_is_stored_only_if_it_verifies_and_matches_the_log() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let cluster = start(dir.path(), &faults).await;
    let (mut alice, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;
    let c_url = cluster.server("c.test").url().to_owned();
    sync_until(&mut carol, "carol at epoch 2", |c| epoch(c, channel) == 2).await;

    let keys: Vec<(&str, SecretKey)> = ["a.test", "b.test", "c.test"]
        .iter()
        .map(|s| (*s, server_key(&dir.path().join(s))))
        .collect();
    let (a_key, b_key) = (&keys[0].1, &keys[1].1);
    let path = format!("/v0/federation/channels/{channel}/certificate");
    let push = |body: Vec<u8>| {
        let (path, c_url) = (path.clone(), c_url.clone());
        async move { signed_post(b_key, "b.test", "c.test", &c_url, &path, &body).await }
    };
    // A genuine certificate c.test has already: verified, and not stored
    // again. (This also lets c.test learn b.test's key while it can.)
    until_certified(&c_url, 2.0, "c.test, the invites").await;
    let (known, _) = certified_commit(&alice, channel, 1).await;
    let (status, answer) = push(push_body(&known)).await;
    assert_eq!(
        (status, &answer["stored"]),
        (200, &json!(false)),
        "{answer}"
    );

    // c.test hears the log (Raft's appends come from the leader and are
    // answered) but cannot collect votes, and gets no certificate pushed.
    for other in ["a.test", "b.test"] {
        faults.hold_certificates(&name(other), &name("c.test"));
        faults.cut(&name("c.test"), &name(other));
    }
    let before = certified(&c_url).await;
    alice.self_update(channel).await.unwrap();
    let (real_certificate, hash) = certified_commit(&alice, channel, 2).await;

    // Not a certificate.
    let (status, answer) = push(push_body(b"not a certificate")).await;
    assert_eq!(status, 400, "{answer}");
    // One vote of three: short of a majority.
    let one = OrderingCertificateIn::decode(&real_certificate).unwrap();
    let one = one.with_votes(one.votes()[..1].to_vec()).encode();
    let (status, answer) = push(push_body(&one)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"], "invalid_certificate", "{answer}");
    // A majority, but a.test's vote signed by a key it does not have.
    let stranger = SecretKey::from_seed([7; 32]);
    let forged = certificate(
        channel,
        2,
        hash,
        &[("a.test", &stranger), ("b.test", b_key)],
    );
    let (status, answer) = push(push_body(&forged)).await;
    assert_eq!(status, 400, "{answer}");
    // Genuine votes for a commit c.test's log did not accept.
    let other = certificate(
        channel,
        2,
        CommitHash::from_bytes([9; 32]),
        &[("a.test", a_key), ("b.test", b_key)],
    );
    let (status, answer) = push(push_body(&other)).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"], "another_commit", "{answer}");
    // For another channel.
    let elsewhere = certificate(
        ChannelId::from_bytes([1; 16]),
        2,
        hash,
        &[("a.test", a_key), ("b.test", b_key)],
    );
    let (status, answer) = push(push_body(&elsewhere)).await;
    assert_eq!(status, 400, "{answer}");
    // Nothing was stored: c.test has not certified the commit.
    assert_eq!(certified(&c_url).await, before);

    // The genuine certificate is taken once, then known.
    let (status, answer) = push(push_body(&real_certificate)).await;
    assert_eq!((status, &answer["stored"]), (200, &json!(true)), "{answer}");
    let (status, answer) = push(push_body(&real_certificate)).await;
    assert_eq!(
        (status, &answer["stored"]),
        (200, &json!(false)),
        "{answer}"
    );
    assert_eq!(certified(&c_url).await, before + 1.0);
    sync_until(&mut carol, "carol merges the commit", |c| {
        epoch(c, channel) == 3
    })
    .await;

    // An epoch c.test's log has not reached: refused after a wait.
    let ahead = certificate(channel, 50, hash, &[("a.test", a_key), ("b.test", b_key)]);
    let (status, answer) = push(push_body(&ahead)).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(certified(&c_url).await, before + 1.0);
    cluster.stop().await;
}

/// Without faults the committer's server pushes the certificate: the two
/// other servers certify the commit although neither can ask anyone for
/// a vote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_that_cannot_collect_votes_get_the_certificate_pushed() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let cluster = start(dir.path(), &faults).await;
    let (mut alice, _carol, channel) = three_server_channel(dir.path(), &cluster).await;
    let (b_url, c_url) = (
        cluster.server("b.test").url().to_owned(),
        cluster.server("c.test").url().to_owned(),
    );
    // Both invites certified everywhere before the links go down.
    until_certified(&b_url, 2.0, "b.test, the invites").await;
    until_certified(&c_url, 2.0, "c.test, the invites").await;
    let (b_before, c_before) = (certified(&b_url).await, certified(&c_url).await);
    for (from, to) in [
        ("b.test", "a.test"),
        ("b.test", "c.test"),
        ("c.test", "a.test"),
        ("c.test", "b.test"),
    ] {
        faults.cut(&name(from), &name(to));
    }
    alice.self_update(channel).await.unwrap();
    until_certified(&b_url, b_before + 1.0, "b.test").await;
    until_certified(&c_url, c_before + 1.0, "c.test").await;
    cluster.stop().await;
}

/// The committer's server certifies and crashes before its push reaches
/// c.test: c.test collects the votes itself (from b.test) and certifies,
/// with no request from a client to make it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_missing_the_push_certifies_by_itself_after_the_committers_server_crashes() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let mut cluster = start(dir.path(), &faults).await;
    let (mut alice, mut carol, channel) = three_server_channel(dir.path(), &cluster).await;
    let c_url = cluster.server("c.test").url().to_owned();
    sync_until(&mut carol, "carol at epoch 2", |c| epoch(c, channel) == 2).await;
    let before = certified(&c_url).await;
    faults.hold_certificates(&name("a.test"), &name("c.test"));
    faults.hold_certificates(&name("b.test"), &name("c.test"));
    alice.self_update(channel).await.unwrap();
    cluster.take("a.test").stop().await;
    until_certified(&c_url, before + 1.0, "c.test").await;
    sync_until(&mut carol, "carol merges the commit", |c| {
        epoch(c, channel) == 3
    })
    .await;
    cluster.stop().await;
}
