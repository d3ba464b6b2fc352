//! Scenario 5b: adding one member to a large channel, end to end (one
//! homeserver, a real owner client: key package claim, the add commit,
//! server validation, Raft ordering, certificate, merge, the Welcome's
//! deposit) against raw OpenMLS doing the same add (commit + Welcome,
//! merge) in a group of the same size, with no network and no server.
//!
//! The end-to-end group is built by registering real users and inviting
//! them `INVITE_AT_ONCE` at a time (one certified commit each batch); that
//! is bounded by a time budget, and the raw group is then built at the size actually reached,
//! so the two figures always compare the same N.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kith_client::Client;
use kith_mls::{
    CIPHERSUITE_V0, Channel, ChannelExtension, ChannelSettings, ContentType, Device,
    MAX_PAST_EPOCHS, MlsStore, Policy, PublicChannel,
};
use kith_proto::{ChannelId, SecretKey};
use kith_testkit::{Config, Registration, TestServer};

/// Registrations run this many at a time (in one task, overlapping their
/// round trips and disk syncs).
const REGISTER_AT_ONCE: usize = 8;

/// Users added by one commit while the channel is built (not timed).
const INVITE_AT_ONCE: usize = 50;

/// What the scenario measured.
pub(crate) struct LargeAdd {
    /// Members in the channel before each timed add (the first one).
    pub(crate) members: usize,
    /// Members wanted (the limit); `members` is smaller if building the
    /// group ran out of its time budget.
    pub(crate) wanted: usize,
    /// How long building the end-to-end group took (registrations and
    /// invites).
    pub(crate) build: Duration,
    /// End-to-end `Client::invite` latencies, one new member each.
    pub(crate) e2e: Vec<Duration>,
    /// Raw OpenMLS at the same N.
    pub(crate) raw: Raw,
}

async fn register(dir: &Path, server: &TestServer, name: &str) -> Result<Client> {
    Client::register(&dir.join(name), server.url(), name, None)
        .await
        .with_context(|| format!("registering {name}"))
}

/// Registers `names` on `server`, `REGISTER_AT_ONCE` at a time; returns
/// their handles (the clients are dropped: they never need to act).
async fn register_handles(
    dir: &Path,
    server: &TestServer,
    names: &[String],
) -> Result<Vec<String>> {
    let mut handles = Vec::with_capacity(names.len());
    for chunk in names.chunks(REGISTER_AT_ONCE) {
        let clients =
            futures_util::future::join_all(chunk.iter().map(|name| register(dir, server, name)))
                .await;
        for client in clients {
            handles.push(client?.handle().to_owned());
        }
    }
    Ok(handles)
}

/// Runs the scenario: an end-to-end channel grown towards `wanted`
/// members (bounded by `budget`), then up to `adds` timed invites (bounded
/// by `time`); then the raw OpenMLS group at the size reached and the same
/// number of timed adds.
pub(crate) async fn large_add(
    dir: &Path,
    wanted: usize,
    adds: usize,
    time: Duration,
    budget: Duration,
) -> Result<LargeAdd> {
    // The owner deposits one Welcome per invite and commits one add after
    // another, far above the default per-device deposit and commit rates
    // (spam limits, not costs): lift them here.
    let mut config = Config::new("a.test".parse()?, dir.join("server"));
    config.registration = Registration::Open;
    config.limits.inbox_deposits_per_minute = 1_000_000;
    config.limits.inbox_deposit_burst = 1_000_000;
    crate::lift_commit_limits(&mut config);
    let server = TestServer::start_with(config).await;
    let mut owner = register(dir, &server, "owner").await?;
    let channel = owner
        .create_channel("large", "application/octet-stream")
        .await?;

    // Grow the channel: register a chunk of users, add them all in one
    // certified commit (the timed adds below are one user each).
    let build_start = Instant::now();
    let mut members = 1; // the owner
    let mut next = 0usize;
    while members < wanted && build_start.elapsed() < budget {
        let take = INVITE_AT_ONCE.min(wanted - members);
        let names: Vec<String> = (next..next + take).map(|i| format!("m{i}")).collect();
        next += take;
        let handles = register_handles(dir, &server, &names).await?;
        let handles: Vec<&str> = handles.iter().map(String::as_str).collect();
        members += owner.invite_many(channel, &handles).await?;
    }
    let build = build_start.elapsed();

    // The timed adds: a fresh user each, registered outside the timing.
    let names: Vec<String> = (0..adds).map(|i| format!("new{i}")).collect();
    let handles = register_handles(dir, &server, &names).await?;
    let mut e2e = Vec::new();
    let start = Instant::now();
    for handle in &handles {
        if start.elapsed() >= time {
            break;
        }
        let t = Instant::now();
        owner.invite(channel, handle).await?;
        e2e.push(t.elapsed());
    }
    server.stop().await;

    let raw = raw_add(members, e2e.len().max(1), time)?;
    Ok(LargeAdd {
        members,
        wanted,
        build,
        e2e,
        raw,
    })
}

/// The raw side of the scenario, each a list of latencies.
pub(crate) struct Raw {
    /// OpenMLS add (commit + Welcome) and merge: the target's reference.
    pub(crate) add: Vec<Duration>,
    /// The same adds plus the one public validation the protocol needs (a
    /// server's `validate_commit`, `apply` and GroupInfo check on an
    /// in-memory `PublicChannel`), without network, disk or certificates.
    pub(crate) validated: Vec<Duration>,
    /// Add and merge once the group keeps as many past epochs as every
    /// Kith channel does after 16 commits (`MAX_PAST_EPOCHS`, each with
    /// its members' list, which OpenMLS loads and stores with the group).
    pub(crate) steady: Vec<Duration>,
    /// `steady` plus the public validation.
    pub(crate) steady_validated: Vec<Duration>,
}

/// Raw OpenMLS: a group of `members` in-memory devices (the owner adds the
/// others in one commit, not timed), then up to `adds` timed adds of one
/// new device each: the add commit with its Welcome, and its merge. Each
/// add is also checked by a server's public view of the group, timed
/// apart. Then, after `MAX_PAST_EPOCHS` self-updates (not timed), the same
/// again.
fn raw_add(members: usize, adds: usize, time: Duration) -> Result<Raw> {
    let owner = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
    let settings = ChannelSettings::new(ChannelExtension::new(
        ContentType::octet_stream(),
        "large".parse()?,
        Policy::new([owner.device_id()])?,
    ));
    let mut channel = owner.create_channel(ChannelId::random(), &settings)?;
    let mut packages = Vec::with_capacity(members.saturating_sub(1));
    for _ in 1..members {
        let device = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
        packages.extend(device.key_packages(1, CIPHERSUITE_V0)?);
    }
    if !packages.is_empty() {
        channel.add(&packages)?;
        channel.merge_pending()?;
    }
    let server_store = MlsStore::in_memory()?;
    let mut server = PublicChannel::create(
        &server_store,
        &channel.group_info()?,
        &channel.ratchet_tree()?,
    )?;
    let (add, validated) = timed_adds(&mut channel, &mut server, adds, time)?;
    for _ in 0..MAX_PAST_EPOCHS {
        let out = channel.self_update()?;
        let commit = server.validate_commit(&out.commit)?;
        server.apply(commit)?;
        channel.merge_pending()?;
    }
    let (steady, steady_validated) = timed_adds(&mut channel, &mut server, adds, time)?;
    Ok(Raw {
        add,
        validated,
        steady,
        steady_validated,
    })
}

/// Up to `adds` timed adds of a new device (bounded by `time`): add and
/// merge, and add, public validation and merge.
fn timed_adds(
    channel: &mut Channel<'_>,
    server: &mut PublicChannel<'_>,
    adds: usize,
    time: Duration,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let newcomers = (0..adds)
        .map(|_| {
            let device = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
            Ok(device.key_packages(1, CIPHERSUITE_V0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let (mut raw, mut validated) = (Vec::new(), Vec::new());
    let start = Instant::now();
    for package in &newcomers {
        if start.elapsed() >= time {
            break;
        }
        let t = Instant::now();
        let out = channel.add(package)?;
        let added = t.elapsed();
        anyhow::ensure!(out.welcome.is_some(), "raw add: no Welcome");
        let t = Instant::now();
        let commit = server.validate_commit(&out.commit)?;
        server.apply(commit)?;
        server.check_group_info(&out.group_info)?;
        let checked = t.elapsed();
        let t = Instant::now();
        channel.merge_pending()?;
        let merged = t.elapsed();
        raw.push(added + merged);
        validated.push(added + checked + merged);
    }
    Ok((raw, validated))
}
