//! Fault injection (issue 7): three homeservers, two users on each, two
//! channels spanning all three servers. A seeded schedule has random devices
//! commit (`self_update`) and send at the same time while servers are
//! stopped and restarted and federation links are cut and healed (through
//! the servers' `LinkFaults` hook: a cut link fails fast as unreachable, one
//! direction at a time). Then everything is healed and restarted, the
//! devices sync until they settle, and a checker verifies:
//!
//! - no two devices ever held different epoch authenticators for the same
//!   epoch of a channel (sampled after every step and every sync round: a
//!   device cannot merge two commits for one epoch, so this is the
//!   observable form of "no fork");
//! - all devices of a channel end at the same epoch and authenticator;
//! - every message whose send was acknowledged reached every device that
//!   was a member when it was sent;
//! - the channel still takes commits and messages from every server.
//!
//! The seed is printed first and in every failure; `KITH_FAULT_SEED=<seed>`
//! replays the same schedule (timing still varies). The short form runs in
//! the ordinary suite; the long form:
//!
//! ```text
//! KITH_FAULT_STEPS=400 KITH_FAULT_SECS=1200 KITH_FAULT_SEED=7 \
//!   cargo test -p kith-client --test faults -- --nocapture
//! ```
//!
//! `long_schedule_seed_11_loses_no_acknowledged_message` (ignored: it runs
//! for minutes) is the schedule that first lost acknowledged messages that
//! reached devices too many epochs late; `late_messages.rs` reproduces both
//! causes deterministically, and spec §11.3 describes the fix.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kith_client::{Client, ClientError};
use kith_proto::{ChannelId, DeviceId, ServerName};
use kith_testkit::{Cluster, LinkFaults, StoppedServer};

const SERVERS: [&str; 3] = ["a.test", "b.test", "c.test"];
/// Steps of the short form.
const DEFAULT_STEPS: usize = 20;
/// Wall-clock bound of the schedule in the short form, seconds.
const DEFAULT_SECS: u64 = 30;
const DEFAULT_SEED: u64 = 0x6b69_7468;
/// The longest the devices may take to settle once everything is healed.
const SETTLE_LIMIT: Duration = Duration::from_secs(300);

/// SplitMix64: small, seedable, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// Raft timers and retries short enough for elections and outbox retries to
/// happen within the test, and federation timeouts short enough that a
/// stopped server does not hold a request for long.
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

/// A message whose send was acknowledged.
struct Acked {
    channel: usize,
    text: String,
    sender: usize,
    /// The epoch it was sent in.
    epoch: u64,
    /// Devices (indices) that were members in the epoch it was sent in.
    members: BTreeSet<usize>,
}

/// What one device did in one step.
enum Op {
    Commit(usize),
    Send(usize, String),
}

struct World {
    seed: u64,
    faults: Arc<LinkFaults>,
    cluster: Cluster,
    down: BTreeMap<String, StoppedServer>,
    /// `None` while the device is busy in a spawned task.
    devices: Vec<Option<Client>>,
    names: Vec<String>,
    ids: BTreeMap<DeviceId, usize>,
    channels: Vec<ChannelId>,
    /// Device indices that are members of each channel.
    members: Vec<Vec<usize>>,
    acked: Vec<Acked>,
    /// The first authenticator seen at each (channel, epoch), and who had it.
    seen: BTreeMap<(usize, u64), (Vec<u8>, usize)>,
    /// Operation errors by kind, for the report.
    errors: BTreeMap<String, usize>,
    /// Errors that should never happen, whatever the faults.
    unexpected: Vec<String>,
}

impl World {
    fn dev(&self, i: usize) -> &Client {
        self.devices[i].as_ref().unwrap()
    }

    fn dev_mut(&mut self, i: usize) -> &mut Client {
        self.devices[i].as_mut().unwrap()
    }

    /// Records every device's (epoch, authenticator) per channel; panics if
    /// two devices ever held different authenticators for one epoch.
    fn sample(&mut self, when: &str) {
        for (c, members) in self.members.clone().iter().enumerate() {
            for &d in members {
                let Ok((epoch, auth)) = self.dev(d).channel_state(self.channels[c]) else {
                    continue;
                };
                match self.seen.get(&(c, epoch)) {
                    None => {
                        self.seen.insert((c, epoch), (auth, d));
                    }
                    Some((first, who)) => assert!(
                        *first == auth,
                        "seed {}: FORK at {when}: channel {c} epoch {epoch}: {} and {} hold different authenticators",
                        self.seed,
                        self.names[*who],
                        self.names[d]
                    ),
                }
            }
        }
    }

    fn note_error(&mut self, what: &str, who: usize, e: &ClientError) {
        let kind = match e {
            ClientError::Unreachable(..) => "unreachable".to_owned(),
            ClientError::Server { status, code, .. } => format!("{status} {code}"),
            ClientError::Protocol(m) if m.starts_with("gave up") => "gave up".to_owned(),
            other => {
                self.unexpected
                    .push(format!("{what} by {}: {other}", self.names[who]));
                "unexpected".to_owned()
            }
        };
        *self.errors.entry(format!("{what}: {kind}")).or_default() += 1;
    }

    fn up(&self) -> Vec<&'static str> {
        SERVERS
            .into_iter()
            .filter(|s| !self.down.contains_key(*s))
            .collect()
    }

    async fn stop(&mut self, name: &str) {
        eprintln!("  stop {name}");
        let stopped = self.cluster.take(name).stop_keeping().await;
        self.down.insert(name.to_owned(), stopped);
    }

    async fn start(&mut self, name: &str) {
        eprintln!("  start {name}");
        let stopped = self.down.remove(name).unwrap();
        self.cluster.put(stopped.start().await);
    }

    /// Runs `ops` at once, each device in its own task (local tasks: a
    /// client's futures are not `Send`; the servers run on the runtime's
    /// worker threads).
    async fn run_ops(&mut self, step: usize, ops: Vec<(usize, Op)>) {
        let local = tokio::task::LocalSet::new();
        let mut tasks = Vec::new();
        for (d, op) in ops {
            let mut client = self.devices[d].take().unwrap();
            let channel = match &op {
                Op::Commit(c) | Op::Send(c, _) => self.channels[*c],
            };
            tasks.push(local.spawn_local(async move {
                let result = match &op {
                    Op::Commit(_) => client.self_update(channel).await.map(|_| None),
                    Op::Send(_, text) => match client.send(channel, text.as_bytes()).await {
                        // The epoch it was encrypted for, and its members.
                        Ok(_) => client
                            .channel_state(channel)
                            .and_then(|(epoch, _)| Ok(Some((epoch, client.members(channel)?)))),
                        Err(e) => Err(e),
                    },
                };
                (d, op, client, result)
            }));
        }
        let finished = local
            .run_until(async move {
                let mut finished = Vec::new();
                for task in tasks {
                    finished.push(task.await.unwrap());
                }
                finished
            })
            .await;
        for (d, op, client, result) in finished {
            self.devices[d] = Some(client);
            match (op, result) {
                (Op::Send(c, text), Ok(Some((epoch, members)))) => {
                    let members = members
                        .iter()
                        .map(|m| {
                            *self.ids.get(m).unwrap_or_else(|| {
                                panic!("seed {}: step {step}: unknown member {m}", self.seed)
                            })
                        })
                        .collect();
                    self.acked.push(Acked {
                        channel: c,
                        text,
                        sender: d,
                        epoch,
                        members,
                    });
                }
                (Op::Commit(_), Ok(_)) => *self.errors.entry("commit: ok".into()).or_default() += 1,
                (Op::Send(..), Ok(None)) => unreachable!(),
                (Op::Commit(_), Err(e)) => self.note_error("commit", d, &e),
                (Op::Send(..), Err(e)) => self.note_error("send", d, &e),
            }
        }
    }

    /// One fault action: stop or start a server, cut or heal a link.
    async fn fault(&mut self, rng: &mut Rng, max_down: usize) {
        match rng.below(4) {
            0 if self.down.len() < max_down => {
                let up = self.up();
                let victim = up[rng.below(up.len())];
                self.stop(victim).await;
            }
            0 | 1 if !self.down.is_empty() => {
                let down: Vec<String> = self.down.keys().cloned().collect();
                let back = down[rng.below(down.len())].clone();
                self.start(&back).await;
            }
            2 => {
                let from = SERVERS[rng.below(3)];
                let to = SERVERS
                    [(SERVERS.iter().position(|s| *s == from).unwrap() + 1 + rng.below(2)) % 3];
                eprintln!("  cut {from} -> {to}");
                self.faults.cut(&name(from), &name(to));
            }
            _ => {
                let cut = self.faults.cut_links();
                if !cut.is_empty() {
                    let (from, to) = &cut[rng.below(cut.len())];
                    eprintln!("  heal {from} -> {to}");
                    self.faults.heal(from, to);
                }
            }
        }
    }

    /// Random operations from distinct random devices.
    fn pick_ops(&self, rng: &mut Rng, step: usize) -> Vec<(usize, Op)> {
        let count = 1 + rng.below(4);
        let mut chosen = BTreeSet::new();
        let mut ops = Vec::new();
        for n in 0..count {
            let d = rng.below(self.devices.len());
            if !chosen.insert(d) {
                continue;
            }
            let in_channels: Vec<usize> = (0..self.channels.len())
                .filter(|c| self.members[*c].contains(&d))
                .collect();
            let c = in_channels[rng.below(in_channels.len())];
            let op = if rng.chance(45) {
                Op::Commit(c)
            } else {
                Op::Send(c, format!("s{step}-{}-{n}", self.names[d]))
            };
            ops.push((d, op));
        }
        ops
    }

    /// What is still missing: (device, channel, text) for acknowledged
    /// messages, and channels whose devices disagree.
    fn missing(&self) -> (Vec<String>, Vec<String>) {
        let mut lost = Vec::new();
        let mut have: BTreeMap<(usize, usize), BTreeSet<String>> = BTreeMap::new();
        for (c, members) in self.members.iter().enumerate() {
            for &d in members {
                let texts = self
                    .dev(d)
                    .messages(self.channels[c], 100_000)
                    .unwrap()
                    .into_iter()
                    .map(|m| String::from_utf8_lossy(&m.body).into_owned())
                    .collect();
                have.insert((d, c), texts);
            }
        }
        for a in &self.acked {
            for &d in &a.members {
                if !have[&(d, a.channel)].contains(&a.text) {
                    let now = self
                        .dev(d)
                        .channel_state(self.channels[a.channel])
                        .unwrap()
                        .0;
                    lost.push(format!(
                        "{} lacks {:?} (channel {}, from {}, sent at epoch {}; the device is at {now})",
                        self.names[d], a.text, a.channel, self.names[a.sender], a.epoch
                    ));
                }
            }
        }
        let mut apart = Vec::new();
        for (c, members) in self.members.iter().enumerate() {
            let states: Vec<(String, u64, String)> = members
                .iter()
                .map(|&d| {
                    let (e, auth) = self.dev(d).channel_state(self.channels[c]).unwrap();
                    (
                        self.names[d].clone(),
                        e,
                        hex::encode(&auth[..4.min(auth.len())]),
                    )
                })
                .collect();
            if states
                .windows(2)
                .any(|w| (w[0].1, &w[0].2) != (w[1].1, &w[1].2))
            {
                apart.push(format!("channel {c}: {states:?}"));
            }
        }
        (lost, apart)
    }

    /// Syncs every device (and catches up every channel) until nothing is
    /// missing and every channel agrees, at most `rounds` rounds and
    /// [`SETTLE_LIMIT`].
    async fn settle(&mut self, what: &str, rounds: usize) {
        let started = Instant::now();
        let mut last = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for d in 0..self.devices.len() {
                let _ = self.dev_mut(d).sync().await;
                for c in 0..self.channels.len() {
                    if self.members[c].contains(&d) {
                        let channel = self.channels[c];
                        let _ = self.dev_mut(d).catch_up(channel).await;
                    }
                }
            }
            self.sample(&format!("{what}, round {round}"));
            last = self.missing();
            let settled = last.0.is_empty() && last.1.is_empty();
            if !settled && started.elapsed() > SETTLE_LIMIT {
                break;
            }
            if settled {
                eprintln!(
                    "{what}: settled after {} rounds, {:.1} s",
                    round + 1,
                    started.elapsed().as_secs_f64()
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (lost, apart) = last;
        panic!(
            "seed {}: {what}: not settled after {:.0} s.\n{} acknowledged deliveries missing, e.g. {:#?}\nchannels apart: {apart:#?}\nerrors: {:?}",
            self.seed,
            started.elapsed().as_secs_f64(),
            lost.len(),
            &lost[..lost.len().min(10)],
            self.errors
        );
    }
}

fn name(s: &str) -> ServerName {
    s.parse().unwrap()
}

/// Syncs `client` until it is in `channel`, at most ~30 s.
async fn join(client: &mut Client, channel: ChannelId, seed: u64) {
    for _ in 0..300 {
        let _ = client.sync().await;
        if client.channel_state(channel).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("seed {seed}: {} never joined {channel}", client.handle());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_faults_never_fork_lose_or_stall_a_channel() {
    let seed: u64 = env_or("KITH_FAULT_SEED", DEFAULT_SEED);
    let steps: usize = env_or("KITH_FAULT_STEPS", DEFAULT_STEPS);
    let secs: u64 = env_or("KITH_FAULT_SECS", DEFAULT_SECS);
    run(seed, steps, secs).await;
}

/// Regression, long form: acknowledged messages were lost when they reached
/// a device more than `kith_mls::MAX_PAST_EPOCHS` (5 when this was found)
/// epochs after the epoch they were sent in: a server whose log lagged
/// acknowledged messages at its stale epoch, and fan-out held back by the
/// outbox arrived after the receiving devices had merged later commits.
/// Seed 11 with 60 steps lost 5 to 10 deliveries with a 5-epoch window.
/// Servers now acknowledge only while their log is fresh and pull missed
/// messages before releasing commits (spec §11.3; deterministic tests in
/// `late_messages.rs`). Ignored because it runs for minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long form (minutes)"]
async fn long_schedule_seed_11_loses_no_acknowledged_message() {
    run(11, 60, 240).await;
}

async fn run(seed: u64, steps: usize, secs: u64) {
    eprintln!(
        "fault injection: seed {seed}, {steps} steps, {secs} s (KITH_FAULT_SEED={seed} to replay)"
    );
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(LinkFaults::new());
    let cluster = {
        let faults = Arc::clone(&faults);
        Cluster::start(dir.path(), &SERVERS, move |c| tweak(c, &faults)).await
    };

    // Two users per server: device i is on SERVERS[i / 2].
    let mut devices = Vec::new();
    let mut names = Vec::new();
    let mut ids = BTreeMap::new();
    for (i, server) in SERVERS.iter().enumerate() {
        for j in 0..2 {
            let user = format!("u{}{j}", &server[..1]);
            let client = Client::register(
                &dir.path().join(&user),
                cluster.server(server).url(),
                &user,
                None,
            )
            .await
            .unwrap();
            ids.insert(client.device_id(), 2 * i + j);
            names.push(format!("{user}@{server}"));
            devices.push(Some(client));
        }
    }
    let mut world = World {
        seed,
        faults: Arc::clone(&faults),
        cluster,
        down: BTreeMap::new(),
        devices,
        names,
        ids,
        channels: Vec::new(),
        members: Vec::new(),
        acked: Vec::new(),
        seen: BTreeMap::new(),
        errors: BTreeMap::new(),
        unexpected: Vec::new(),
    };
    // Channel 0: everyone, made by ua0@a.test. Channel 1: one user per
    // server, made by ub1@b.test.
    for (creator, invitees) in [(0usize, vec![1usize, 2, 3, 4, 5]), (3, vec![0, 5])] {
        let channel = world
            .dev_mut(creator)
            .create_channel("faults", "text/plain")
            .await
            .unwrap();
        for &i in &invitees {
            let handle = world.names[i].clone();
            assert_eq!(
                world
                    .dev_mut(creator)
                    .invite(channel, &handle)
                    .await
                    .unwrap(),
                1,
                "seed {seed}: inviting {handle}"
            );
            join(world.dev_mut(i), channel, seed).await;
        }
        let mut members = vec![creator];
        members.extend(invitees);
        members.sort();
        world.channels.push(channel);
        world.members.push(members);
    }
    world.settle("setup", 150).await;

    // The schedule: at most one server down, except for one step with two
    // down (commits then fail after the forwarding deadline, ~20 s), which
    // comes halfway (by steps or by time) and always runs, even past the
    // time bound.
    let start = Instant::now();
    let half = Duration::from_secs(secs) / 2;
    let mut two_down_at = None;
    let mut step = 0;
    loop {
        let phase_done = two_down_at.is_some_and(|at| step > at + 1);
        let out_of_budget = step >= steps || start.elapsed() > Duration::from_secs(secs);
        if out_of_budget && (phase_done || step >= steps.max(1) * 4) {
            break;
        }
        eprintln!(
            "step {step} at {:.1} s (down: {:?}, cut: {:?})",
            start.elapsed().as_secs_f64(),
            world.down.keys(),
            faults.cut_links()
        );
        if two_down_at.is_none() && (step >= steps / 2 || start.elapsed() > half) {
            two_down_at = Some(step);
            while world.down.len() < 2 {
                let up = world.up();
                let victim = up[rng.below(up.len())];
                world.stop(victim).await;
            }
        } else if two_down_at.is_some_and(|at| step == at + 1) {
            while world.down.len() > 1 {
                let down: Vec<String> = world.down.keys().cloned().collect();
                let back = down[rng.below(down.len())].clone();
                world.start(&back).await;
            }
        } else if two_down_at.is_none_or(|at| step > at + 1) {
            for _ in 0..rng.below(3) {
                world.fault(&mut rng, 1).await;
            }
        }
        let ops = world.pick_ops(&mut rng, step);
        world.run_ops(step, ops).await;
        // Sometimes let a few devices sync between steps.
        for d in 0..world.devices.len() {
            if rng.chance(30) {
                let _ = world.dev_mut(d).sync().await;
            }
        }
        world.sample(&format!("step {step}"));
        step += 1;
    }
    eprintln!(
        "schedule done: {step} steps in {:.1} s, {} messages acknowledged, outcomes {:?}",
        start.elapsed().as_secs_f64(),
        world.acked.len(),
        world.errors
    );

    // Heal everything, restart every server, and let the devices settle.
    faults.heal_all();
    for server in SERVERS {
        if world.down.contains_key(server) {
            world.start(server).await;
        } else {
            let running = world.cluster.take(server);
            world.cluster.put(running.restart().await);
        }
    }
    world.settle("after healing", 300).await;

    // Still live: a commit and a message from a device on every server.
    for d in [0, 2, 4] {
        let channel = world.channels[0];
        let text = format!("final from {}", world.names[d]);
        // A transient refusal right after the restarts is allowed (an
        // election may still be running); a lasting one is a failure.
        let mut committed = Err(None);
        for _ in 0..10 {
            match world.dev_mut(d).self_update(channel).await {
                Ok(_) => {
                    committed = Ok(());
                    break;
                }
                Err(
                    e @ (ClientError::Unreachable(..) | ClientError::Server { status: 500.., .. }),
                ) => {
                    committed = Err(Some(e));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("seed {seed}: final commit by {}: {e}", world.names[d]),
            }
        }
        if let Err(e) = committed {
            panic!(
                "seed {seed}: final commit by {} never went through: {e:?}",
                world.names[d]
            );
        }
        world
            .dev_mut(d)
            .send(channel, text.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: final send by {}: {e}", world.names[d]));
        let members = world.members[0].iter().copied().collect();
        let epoch = world.dev(d).channel_state(channel).unwrap().0;
        world.acked.push(Acked {
            channel: 0,
            text,
            sender: d,
            epoch,
            members,
        });
    }
    world.settle("after the final round", 150).await;
    assert!(
        world.unexpected.is_empty(),
        "seed {seed}: errors that no fault explains: {:#?}",
        world.unexpected
    );
    let epochs: Vec<u64> = world
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| world.dev(world.members[i][0]).channel_state(*c).unwrap().0)
        .collect();
    eprintln!(
        "seed {seed}: converged at epochs {epochs:?}; {} acknowledged messages delivered to every member; {} (channel, epoch) states checked",
        world.acked.len(),
        world.seen.len()
    );
    world.cluster.stop().await;
}
