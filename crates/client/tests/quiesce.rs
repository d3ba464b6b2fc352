//! Idle shared channels stop their Raft timers (issue 6, spec §10.6
//! "Timers", §11.3): real `kithd` servers on loopback, a channel shared by
//! three of them, and a short `raft_idle_ms`. The servers' `/metrics` say
//! when a group is quiet (`kith_raft_groups_quiet`), who leads it
//! (`kith_raft_groups_leading`) and how many Raft requests each sent
//! (`kith_raft_requests_sent_total`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::sync_until;
use kith_client::{Client, ClientError};
use kith_proto::ChannelId;
use kith_testkit::Cluster;

const SERVERS: [&str; 3] = ["a.test", "b.test", "c.test"];

/// Quick Raft timers, and groups quiesced after 400 ms without use.
fn quick_idle(config: &mut kith_testkit::Config) {
    config.federation.raft_heartbeat_ms = 150;
    config.federation.raft_election_min_ms = 600;
    config.federation.raft_election_max_ms = 1200;
    config.federation.raft_idle_ms = 400;
    config.federation.retry_base_ms = 200;
    config.federation.retry_max_ms = 2_000;
}

async fn user(dir: &Path, cluster: &Cluster, server: &str, name: &str) -> Client {
    Client::register(&dir.join(name), cluster.server(server).url(), name, None)
        .await
        .unwrap()
}

/// The sum of the samples of metric `name` on the server at `url`.
async fn metric(url: &str, name: &str) -> f64 {
    metric_where(url, name, "").await
}

/// [`metric`] over the series whose labels contain `label`.
async fn metric_where(url: &str, name: &str, label: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name) && series.contains(label))
        .map(|(_, value)| value.parse::<f64>().unwrap())
        .sum()
}

/// Raft requests each server sent so far.
async fn requests_sent(cluster: &Cluster, servers: &[&str]) -> Vec<f64> {
    let mut sent = Vec::new();
    for s in servers {
        sent.push(metric(cluster.server(s).url(), "kith_raft_requests_sent_total").await);
    }
    sent
}

/// Vote requests (elections) all `servers` sent so far.
async fn votes_sent(cluster: &Cluster, servers: &[&str]) -> f64 {
    let mut sent = 0.0;
    for s in servers {
        let url = cluster.server(s).url();
        sent += metric_where(url, "kith_raft_requests_sent_total", "kind=\"vote\"").await;
    }
    sent
}

/// Waits (at most ~30 s) until the channel's node is quiet on every one of
/// `servers`, and stays so with no Raft request sent for two heartbeat
/// intervals (the servers are read one after the other, and a group whose
/// quiescing failed wakes again). Returns the requests each had sent.
async fn wait_quiet(cluster: &Cluster, servers: &[&str]) -> Vec<f64> {
    let mut last: Option<Vec<f64>> = None;
    for _ in 0..100 {
        let mut quiet = true;
        for s in servers {
            quiet &= metric(cluster.server(s).url(), "kith_raft_groups_quiet").await >= 1.0;
        }
        let sent = requests_sent(cluster, servers).await;
        if quiet && last.as_ref() == Some(&sent) {
            return sent;
        }
        last = quiet.then_some(sent);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("the channel's group never went quiet on {servers:?}");
}

/// The server whose node leads the channel (the only shared group).
async fn leader(cluster: &Cluster, servers: &[&str]) -> String {
    for _ in 0..300 {
        for s in servers {
            if metric(cluster.server(s).url(), "kith_raft_groups_leading").await >= 1.0 {
                return (*s).to_owned();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no server leads the channel");
}

fn has(client: &Client, channel: ChannelId, text: &str) -> bool {
    client
        .messages(channel, 1000)
        .unwrap()
        .iter()
        .any(|m| m.body == text.as_bytes())
}

/// Alice (a.test) creates a channel and adds Bob (b.test) and Carol
/// (c.test); returns the clients by server once both joined.
async fn three_server_channel(dir: &Path, cluster: &Cluster) -> (Vec<Client>, ChannelId) {
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
    sync_until(&mut bob, "bob sees carol's add", |c| {
        c.channel_state(channel).unwrap().0 == 2
    })
    .await;
    (vec![alice, bob, carol], channel)
}

/// (a) An idle shared channel's group goes quiet on all its servers and
/// then sends no Raft request at all; (b) a message and a commit from the
/// leader's server and from a follower's each succeed at once (no 503,
/// no retry) and without an election, and the group goes quiet again
/// after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_shared_channel_goes_quiet_and_wakes_for_messages_and_commits() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &SERVERS, quick_idle).await;
    let (mut clients, channel) = three_server_channel(dir.path(), &cluster).await;

    let before = wait_quiet(&cluster, &SERVERS).await;
    // Twenty heartbeat intervals: a running group sends a heartbeat to each
    // follower in every one of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        requests_sent(&cluster, &SERVERS).await,
        before,
        "a quiet group sent Raft requests"
    );

    let leader = leader(&cluster, &SERVERS).await;
    let by_leader = SERVERS.iter().position(|s| *s == leader).unwrap();
    let by_follower = (by_leader + 1) % SERVERS.len();
    let mut epoch = clients[0].channel_state(channel).unwrap().0;
    for (who, at) in [(by_leader, "leader"), (by_follower, "follower")] {
        let client = &mut clients[who];
        let text = format!("sent through the {at}'s server after a quiet spell");
        sync_until(client, "the sender reaches the last epoch", |c| {
            c.channel_state(channel).unwrap().0 == epoch
        })
        .await;
        // Waking needs no election: the leader is asked and answers.
        wait_quiet(&cluster, &SERVERS).await;
        let votes = votes_sent(&cluster, &SERVERS).await;
        client.send(channel, text.as_bytes()).await.unwrap();
        assert_eq!(
            votes_sent(&cluster, &SERVERS).await,
            votes,
            "a send through the {at}'s server woke the group by an election"
        );
        wait_quiet(&cluster, &SERVERS).await;
        let votes = votes_sent(&cluster, &SERVERS).await;
        epoch = client.self_update(channel).await.unwrap();
        assert_eq!(
            votes_sent(&cluster, &SERVERS).await,
            votes,
            "a commit through the {at}'s server woke the group by an election"
        );
        wait_quiet(&cluster, &SERVERS).await;
        for (i, other) in clients.iter_mut().enumerate() {
            if i != who {
                sync_until(other, "the message arrives", |c| has(c, channel, &text)).await;
            }
        }
    }
    for client in &mut clients {
        sync_until(client, "everyone reaches the last epoch", |c| {
            c.channel_state(channel).unwrap().0 == epoch
        })
        .await;
    }
    cluster.stop().await;
}

/// (c) The leader's server stops while the group is quiet: a message on
/// a follower's server wakes the remaining majority, which elects a
/// leader, takes the message and orders a commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_groups_leader_dies_and_the_others_elect_on_wake() {
    kith_testkit::trace_from_env();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path(), &SERVERS, quick_idle).await;
    let (mut clients, channel) = three_server_channel(dir.path(), &cluster).await;
    // Every server certifies the commits so far (a message of the current
    // epoch is stored only then), while the leader is still up: the first
    // commits' voters are its server alone, then its and Bob's.
    clients[0].send(channel, b"before").await.unwrap();
    for client in &mut clients[1..] {
        sync_until(client, "the first message arrives", |c| {
            has(c, channel, "before")
        })
        .await;
    }
    wait_quiet(&cluster, &SERVERS).await;

    let leader = leader(&cluster, &SERVERS).await;
    let stopped = cluster.take(&leader).stop_keeping().await;
    let rest: Vec<&str> = SERVERS.iter().copied().filter(|s| *s != leader).collect();
    let survivor = SERVERS.iter().position(|s| *s == rest[0]).unwrap();
    let other = SERVERS.iter().position(|s| *s == rest[1]).unwrap();

    // The first send may find the new leader not yet elected (503,
    // retryable): the old one is gone, not quiet.
    let client = &mut clients[survivor];
    let mut sent = false;
    for _ in 0..20 {
        match client.send(channel, b"after the leader died").await {
            Ok(_) => {
                sent = true;
                break;
            }
            Err(ClientError::Server { status: 503, .. }) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("sending: {e}"),
        }
    }
    assert!(sent, "the remaining servers never took the message");
    let epoch = client.self_update(channel).await.unwrap();
    sync_until(&mut clients[other], "the other survivor follows", |c| {
        has(c, channel, "after the leader died") && c.channel_state(channel).unwrap().0 == epoch
    })
    .await;
    assert_eq!(
        leader_among(&cluster, &rest).await,
        1,
        "the survivors elected one leader"
    );
    drop(stopped);
    cluster.stop().await;
}

/// How many of `servers` lead the channel.
async fn leader_among(cluster: &Cluster, servers: &[&str]) -> usize {
    let mut leading = 0;
    for s in servers {
        if metric(cluster.server(s).url(), "kith_raft_groups_leading").await >= 1.0 {
            leading += 1;
        }
    }
    leading
}

/// CPU seconds (user + system) this process has used: both servers run
/// in it.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The measurement of docs/performance.md ("Idle shared channels, session
/// 7"): `KITH_IDLE_CHANNELS` channels (default 20) shared by two servers
/// with the default Raft timers, then 10 s idle, with quiescing
/// (`raft_idle_ms` = 2 s, measured once every group is quiet) and without
/// (`KITH_IDLE_OFF=1`). Prints the Raft requests sent and the CPU time of
/// the process (both servers) over the window.
///
/// ```text
/// cargo test -p kith-client --test quiesce -- --ignored --nocapture
/// KITH_IDLE_OFF=1 cargo test -p kith-client --test quiesce -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn measure_idle_shared_channels() {
    let channels: usize = std::env::var("KITH_IDLE_CHANNELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let off = std::env::var_os("KITH_IDLE_OFF").is_some();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), &["a.test", "b.test"], |c| {
        c.federation.raft_idle_ms = if off { 0 } else { 2_000 };
    })
    .await;
    let mut alice = user(dir.path(), &cluster, "a.test", "alice").await;
    let mut bob = user(dir.path(), &cluster, "b.test", "bob").await;
    for i in 0..channels {
        let channel = alice
            .create_channel(&format!("idle {i}"), "text/plain")
            .await
            .unwrap();
        assert_eq!(alice.invite(channel, "bob@b.test").await.unwrap(), 1);
        sync_until(&mut bob, "bob joins", |c| c.channel_state(channel).is_ok()).await;
    }
    let servers = ["a.test", "b.test"];
    if off {
        tokio::time::sleep(Duration::from_secs(3)).await;
    } else {
        for _ in 0..600 {
            let mut quiet = 0.0;
            for s in servers {
                quiet += metric(cluster.server(s).url(), "kith_raft_groups_quiet").await;
            }
            if quiet >= (2 * channels) as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let sent_before: f64 = requests_sent(&cluster, &servers).await.iter().sum();
    let cpu_before = cpu_seconds();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu = cpu_seconds() - cpu_before;
    let sent: f64 = requests_sent(&cluster, &servers).await.iter().sum::<f64>() - sent_before;
    println!(
        "MEASURE channels={channels} quiescing={} raft_requests_in_10s={sent} cpu_seconds_in_10s={cpu:.3}",
        !off
    );
    cluster.stop().await;
}
