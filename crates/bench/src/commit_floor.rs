//! The commit floor: what one certified commit among three homeservers
//! costs in cryptography alone, with no network, no disk and no Raft.
//!
//! Per commit, in one thread: the committer creates a `self_update`
//! commit (with its GroupInfo); each of the three servers validates it on
//! its own public copy of the group, applies it and checks the GroupInfo
//! (the validator of spec §10.4); two voters sign a vote (a majority of
//! three, §10.3); the collecting server checks the vote it received; the
//! two other servers and the client each verify the certificate (two
//! signatures each); the committer merges. Every MLS state is kept in an
//! in-memory store (OpenMLS's SQLite storage provider on `:memory:`, as
//! the encrypt+decrypt floor uses). Federation request signatures are
//! left out: they authenticate the plumbing, not the commit, and a
//! transport could do that once per connection.
//!
//! The figure is CPU time per commit (the thread's own, from
//! `/proc/thread-self/schedstat` where there is one, else wall time), so
//! the machine's other load inflates it less than a rate would; from it,
//! the commits per second this machine's cores could do if they did
//! nothing else. A second run on as many threads as there are cores
//! measures that rate directly.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kith_mls::{
    CIPHERSUITE_V0, Channel, ChannelExtension, ChannelSettings, ContentType, Device, MlsStore,
    Policy, PublicChannel,
};
use kith_order::{CommitHash, OrderingCertificate, OrderingCertificateIn, Vote, VoteIn, VoterSet};
use kith_proto::{ChannelId, SecretKey, ServerName};

/// Ed25519 signatures per commit counted by the floor (besides those
/// inside OpenMLS: the commit's and the GroupInfo's, signed by the
/// committer and verified by each server).
pub(crate) const VOTE_SIGNATURES: usize = 2;
/// Ed25519 verifications per commit counted by the floor: the collector
/// checks one vote; two servers and the client check two each.
pub(crate) const VOTE_VERIFICATIONS: usize = 7;

/// What the floor measured.
pub(crate) struct CommitFloor {
    /// Commits done on one thread.
    pub(crate) commits: usize,
    /// That thread's CPU time per commit.
    pub(crate) cpu_per_commit: Duration,
    /// Whether `cpu_per_commit` is CPU time (else wall time).
    pub(crate) cpu_measured: bool,
    /// Wall time per commit on that thread.
    pub(crate) wall_per_commit: Duration,
    /// The CPU time per commit split into the commit's creation and merge
    /// (the committer), the three servers' validation and apply, and the
    /// votes and certificate checks, in the proportions of each part's
    /// wall time on that thread.
    pub(crate) parts: Parts,
    /// The cores (`available_parallelism`).
    pub(crate) cores: usize,
    /// Commits done on `cores` threads at once, and how long that took.
    pub(crate) parallel_commits: usize,
    pub(crate) parallel_elapsed: Duration,
}

impl CommitFloor {
    /// Commits per second the cores could do, from the CPU per commit.
    pub(crate) fn projected_rate(&self) -> f64 {
        self.cores as f64 / self.cpu_per_commit.as_secs_f64().max(1e-9)
    }

    /// Commits per second measured on `cores` threads.
    pub(crate) fn parallel_rate(&self) -> f64 {
        self.parallel_commits as f64 / self.parallel_elapsed.as_secs_f64().max(1e-9)
    }
}

/// Wall time spent in each part of the commits of one thread.
#[derive(Default, Clone, Copy)]
pub(crate) struct Parts {
    pub(crate) committer: Duration,
    pub(crate) servers: Duration,
    pub(crate) votes: Duration,
}

/// This thread's CPU time so far, if the kernel tells it.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// A three-member channel (committer, two others) with a public copy of
/// it on each of three servers, and the servers' signing keys.
struct Setup {
    publics: Vec<PublicChannel<'static>>,
    channel: Channel<'static>,
    id: ChannelId,
    servers: [(ServerName, SecretKey); 3],
    voters: VoterSet,
}

impl Setup {
    fn new() -> Result<Self> {
        // Leaked: a few small in-memory stores per run, so the channel and
        // the public copies can borrow them for the run's length.
        let committer: &'static Device = Box::leak(Box::new(Device::new(
            &SecretKey::generate(),
            MlsStore::in_memory()?,
        )));
        let settings = ChannelSettings::new(ChannelExtension::new(
            ContentType::octet_stream(),
            "commit-floor".parse()?,
            Policy::new([committer.device_id()])?,
        ));
        let id = ChannelId::random();
        let mut channel = committer.create_channel(id, &settings)?;
        let mut packages = Vec::new();
        for _ in 0..2 {
            let device = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
            packages.extend(device.key_packages(1, CIPHERSUITE_V0)?);
        }
        channel.add(&packages)?;
        channel.merge_pending()?;
        let (info, tree) = (channel.group_info()?, channel.ratchet_tree()?);
        let mut publics = Vec::new();
        for _ in 0..3 {
            let store: &'static MlsStore = Box::leak(Box::new(MlsStore::in_memory()?));
            publics.push(PublicChannel::create(store, &info, &tree)?);
        }
        let server = |name: &str| -> Result<(ServerName, SecretKey)> {
            Ok((name.parse()?, SecretKey::generate()))
        };
        let servers = [server("a.test")?, server("b.test")?, server("c.test")?];
        let voters = VoterSet::new(
            servers
                .iter()
                .map(|(name, key)| (name.clone(), vec![key.public()])),
        );
        Ok(Self {
            publics,
            channel,
            id,
            servers,
            voters,
        })
    }

    /// One certified commit, as the floor counts it.
    fn commit(&mut self, parts: &mut Parts) -> Result<()> {
        let t = Instant::now();
        let epoch = self.channel.epoch();
        let out = self.channel.self_update()?;
        let t1 = Instant::now();
        parts.committer += t1 - t;
        for public in &mut self.publics {
            let validated = public.validate_commit(&out.commit)?;
            public.apply(validated)?;
            public.check_group_info(&out.group_info)?;
        }
        let t2 = Instant::now();
        parts.servers += t2 - t1;
        let hash = CommitHash::of(&out.commit);
        let sign = |(name, key): &(ServerName, SecretKey)| {
            Vote::sign(key, name.clone(), self.id, epoch, hash)
        };
        let [collector, voter, _] = &self.servers;
        let own = sign(collector);
        // The other voter's vote crosses the wire: decoded and checked.
        let theirs = VoteIn::decode(&sign(voter).encode())?.verify()?;
        let certificate =
            OrderingCertificate::assemble(self.id, epoch, hash, [own, theirs], &self.voters)?
                .encode();
        // The two other servers and the client each check it.
        for _ in 0..3 {
            OrderingCertificateIn::decode(&certificate)?.verify_for(
                self.id,
                epoch,
                &out.commit,
                &self.voters,
            )?;
        }
        let t3 = Instant::now();
        parts.votes += t3 - t2;
        self.channel.merge_pending()?;
        parts.committer += t3.elapsed();
        Ok(())
    }
}

/// Commits up to `count` times (bounded by `time`) in one fresh channel;
/// returns the commits, the wall time, the thread's CPU time (if known)
/// and the parts.
fn run(count: usize, time: Duration) -> Result<(usize, Duration, Option<Duration>, Parts)> {
    let mut setup = Setup::new()?;
    let mut parts = Parts::default();
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut done = 0;
    while done < count && start.elapsed() < time {
        setup.commit(&mut parts)?;
        done += 1;
    }
    let wall = start.elapsed();
    let cpu = cpu0.zip(thread_cpu()).map(|(a, b)| b.saturating_sub(a));
    Ok((done, wall, cpu, parts))
}

/// Runs the floor: up to `count` commits on one thread, then on as many
/// threads as there are cores, each bounded by `time`.
pub(crate) fn commit_floor(count: usize, time: Duration) -> Result<CommitFloor> {
    let (commits, wall, cpu, parts) = run(count, time)?;
    let n = commits.max(1) as u32;
    let cpu_per_commit = cpu.unwrap_or(wall) / n;
    let measured = parts.committer + parts.servers + parts.votes;
    let share = |part: Duration| {
        cpu_per_commit.mul_f64(part.as_secs_f64() / measured.as_secs_f64().max(1e-12))
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let start = Instant::now();
    let threads: Vec<_> = (0..cores)
        .map(|_| std::thread::spawn(move || run(count, time).map(|(done, ..)| done)))
        .collect();
    let mut parallel_commits = 0;
    for thread in threads {
        parallel_commits += thread
            .join()
            .map_err(|_| anyhow::anyhow!("a commit floor thread panicked"))?
            .context("commit floor thread")?;
    }
    let parallel_elapsed = start.elapsed();
    Ok(CommitFloor {
        commits,
        cpu_per_commit,
        cpu_measured: cpu.is_some(),
        wall_per_commit: wall / n,
        parts: Parts {
            committer: share(parts.committer),
            servers: share(parts.servers),
            votes: share(parts.votes),
        },
        cores,
        parallel_commits,
        parallel_elapsed,
    })
}
