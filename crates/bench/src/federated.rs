//! Scenario 4 across homeservers: certified-commit latency in a channel
//! whose members are on three servers (so three voters, Raft among them
//! over signed federation requests, and a majority certificate), and
//! commit throughput with many such channels committing at once.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kith_client::Client;
use kith_proto::ChannelId;
use kith_testkit::Cluster;

/// Threads the committing owners of the many-channel run are spread over.
const CLIENT_THREADS: usize = 4;

/// What the three-server scenario measured.
pub(crate) struct Ordering3 {
    /// Latencies of sequential certified commits in one channel.
    pub(crate) latency: Vec<Duration>,
    /// How long the sequential commits took in all.
    pub(crate) latency_elapsed: Duration,
    /// Channels committing at once.
    pub(crate) channels: usize,
    /// Commits certified across them.
    pub(crate) parallel_commits: usize,
    /// How long that took.
    pub(crate) parallel_elapsed: Duration,
}

async fn register(dir: &Path, cluster: &Cluster, server: &str, name: &str) -> Result<Client> {
    Client::register(&dir.join(name), cluster.server(server).url(), name, None)
        .await
        .with_context(|| format!("registering {name} on {server}"))
}

/// A channel of `owner` (on a.test) with Bob (b.test) and Carol (c.test)
/// added: its ordering group is all three servers.
async fn three_server_channel(owner: &mut Client, name: &str) -> Result<ChannelId> {
    let id = owner
        .create_channel(name, "application/octet-stream")
        .await?;
    owner.invite(id, "bob@b.test").await?;
    owner.invite(id, "carol@c.test").await?;
    Ok(id)
}

/// Runs the scenario: `commits` sequential commits (bounded by `time`),
/// then `channels` owners committing in parallel for `time`.
pub(crate) async fn ordering(
    dir: &Path,
    commits: usize,
    channels: usize,
    time: Duration,
) -> Result<Ordering3> {
    let cluster = Cluster::start(
        dir,
        &["a.test", "b.test", "c.test"],
        crate::lift_commit_limits,
    )
    .await;
    let _bob = register(dir, &cluster, "b.test", "bob").await?;
    let _carol = register(dir, &cluster, "c.test", "carol").await?;

    let mut alice = register(dir, &cluster, "a.test", "alice").await?;
    let channel = three_server_channel(&mut alice, "latency").await?;
    let mut latency = Vec::new();
    let start = Instant::now();
    while latency.len() < commits && start.elapsed() < time {
        let t = Instant::now();
        alice.self_update(channel).await?;
        latency.push(t.elapsed());
    }
    let latency_elapsed = start.elapsed();

    let mut owners = Vec::new();
    for i in 0..channels {
        let mut owner = register(dir, &cluster, "a.test", &format!("owner{i}")).await?;
        let id = three_server_channel(&mut owner, &format!("parallel{i}")).await?;
        owners.push((owner, id));
    }
    // Every owner commits in a loop. A client's futures are not `Send`
    // (its stores are not `Sync`), so the owners are split over
    // `CLIENT_THREADS` threads, each running its share concurrently on a
    // runtime of its own: the clients' MLS work and storage use every core
    // instead of one task's, and the figure is bound by the servers.
    let start = Instant::now();
    let per_thread = owners.len().div_ceil(CLIENT_THREADS).max(1);
    let mut threads = Vec::new();
    while !owners.is_empty() {
        let share: Vec<(Client, ChannelId)> =
            owners.drain(..per_thread.min(owners.len())).collect();
        threads.push(std::thread::spawn(move || -> Result<usize> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let loops = share.into_iter().map(|(mut owner, id)| async move {
                let mut done = 0usize;
                while start.elapsed() < time {
                    if owner.self_update(id).await.is_ok() {
                        done += 1;
                    }
                }
                done
            });
            Ok(runtime
                .block_on(futures_util::future::join_all(loops))
                .into_iter()
                .sum())
        }));
    }
    let mut parallel_commits = 0usize;
    for thread in threads {
        let joined = tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("waiting for a client thread")?;
        parallel_commits += joined.map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    let parallel_elapsed = start.elapsed();
    cluster.stop().await;
    Ok(Ordering3 {
        latency,
        latency_elapsed,
        channels,
        parallel_commits,
        parallel_elapsed,
    })
}
