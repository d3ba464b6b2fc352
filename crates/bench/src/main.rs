//! `kith-bench`: an end-to-end benchmark of Kith on one machine (issue 6).
//!
//! Starts real homeservers in-process on loopback (`kith-testkit`, SQLite in
//! a temporary directory) and real `kith-client` devices, runs each scenario
//! bounded in time (`--seconds`) and in count, and prints one table (or
//! `--json`). Every figure comes with its ratio to the floor (raw OpenMLS
//! encrypt + decrypt) measured in the same run: the machine is shared and
//! noisy, so only ratios compare across runs. No figure is asserted.

mod commit_floor;
mod federated;
mod large;
mod process;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use kith_client::Client;
use kith_mls::{
    CIPHERSUITE_V0, ChannelExtension, ChannelSettings, ContentType, Device, Incoming, MlsStore,
    Policy, PublicChannel,
};
use kith_proto::{ChannelId, SecretKey};
use kith_testkit::{Config, Registration, TestServer};
use serde_json::{Value, json};

/// The payload size of every application message.
const PAYLOAD: usize = 1024;

/// Messages per `Client::send_many` call (one request) in scenario 2b.
const BATCH: usize = 8;

/// Messages per `Client::send_many` call in scenario 2c: the largest batch
/// one request may carry (spec §6.9).
const LARGE_BATCH: usize = kith_client::channels::MAX_BATCH;

#[derive(Parser, Debug)]
#[command(
    name = "kith-bench",
    about = "End-to-end benchmark of Kith (one homeserver, loopback)"
)]
struct Args {
    /// Time bound of each scenario, in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Tiny counts and at most one second per scenario: checks that the
    /// benchmark runs, measures nothing meaningful.
    #[arg(long)]
    smoke: bool,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The `kithd` binary that scenarios 3b and 5 run as a process of its
    /// own [default: `kithd` next to this binary].
    #[arg(long, value_name = "PATH")]
    kithd: Option<std::path::PathBuf>,
    /// Run only these scenarios (after the floor, which their ratios
    /// use): `2` (1:1 delivery, 2, 2b and 2c, with the disk floor), `3b`
    /// and/or `5` (on a kithd process of their own, e.g. to profile that
    /// process), `4` (certified commits on one homeserver, on a channel of
    /// their own), `4b`, `5b`. Default: every scenario.
    #[arg(long, value_name = "SCENARIO", value_delimiter = ',', value_parser = ["2", "3b", "4", "4b", "5", "5b"])]
    only: Vec<String>,
}

/// Count bounds per scenario (each loop also stops at the time bound).
struct Limits {
    time: Duration,
    floor_msgs: usize,
    delivery_msgs: usize,
    fanout_members: usize,
    fanout_msgs: usize,
    commits: usize,
    idle_channels: usize,
    /// Event streams held open in scenario 5.
    idle_streams: usize,
    /// Receiving devices and messages in scenario 3b.
    server_fanout_receivers: usize,
    server_fanout_msgs: usize,
    disk_syncs: usize,
    /// Channels committing at once in the three-server scenario.
    parallel_channels: usize,
    /// Commits of the commit floor (per thread).
    floor_commits: usize,
    /// Members of the large channel in scenario 5b (reached only if
    /// building it fits in `large_budget`).
    large_members: usize,
    /// Timed adds in scenario 5b.
    large_adds: usize,
    /// Time budget for building the large channel end to end.
    large_budget: Duration,
}

impl Limits {
    fn new(args: &Args) -> Self {
        if args.smoke {
            Self {
                time: Duration::from_secs(args.seconds.clamp(1, 1)),
                floor_msgs: 200,
                delivery_msgs: 20,
                fanout_members: 3,
                fanout_msgs: 5,
                commits: 5,
                idle_channels: 100,
                idle_streams: 100,
                server_fanout_receivers: 3,
                server_fanout_msgs: 20,
                disk_syncs: 20,
                parallel_channels: 2,
                floor_commits: 5,
                large_members: 4,
                large_adds: 1,
                large_budget: Duration::from_secs(3),
            }
        } else {
            Self {
                time: Duration::from_secs(args.seconds.max(1)),
                floor_msgs: 2_000_000,
                delivery_msgs: 200_000,
                fanout_members: 10,
                fanout_msgs: 100_000,
                commits: 100_000,
                idle_channels: 10_000,
                idle_streams: 10_000,
                server_fanout_receivers: 100,
                server_fanout_msgs: 4_000,
                disk_syncs: 300,
                parallel_channels: 100,
                floor_commits: 100_000,
                large_members: 1000,
                large_adds: 5,
                large_budget: Duration::from_secs(args.seconds.max(1) * 24),
            }
        }
    }
}

/// One line of the result table.
struct Row {
    scenario: &'static str,
    figure: String,
    ratio: String,
    detail: Value,
}

/// The scenarios commit as fast as they can, far above the per-device and
/// per-origin commit rates (flood limits, not costs): lift them.
pub(crate) fn lift_commit_limits(config: &mut Config) {
    config.limits.commits_per_minute = 0;
    config.limits.federation_submissions_per_minute = 0;
}

fn payload() -> Vec<u8> {
    (0..PAYLOAD).map(|i| (i % 251) as u8).collect()
}

/// The `q` quantile (0..=1) of `samples`, sorted in place, in milliseconds.
fn quantile_ms(samples: &mut [Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let last = samples.len() - 1;
    let i = ((last as f64) * q).round() as usize;
    samples
        .get(i.min(last))
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(f64::NAN)
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Floor: raw OpenMLS encrypt + decrypt between two in-memory devices.
/// Returns (msgs/s, MLS message size of one 1 KiB payload, count).
fn floor(limits: &Limits) -> Result<Floor> {
    let alice = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
    let bob = Device::new(&SecretKey::generate(), MlsStore::in_memory()?);
    let server_store = MlsStore::in_memory()?;
    let settings = ChannelSettings::new(ChannelExtension::new(
        ContentType::octet_stream(),
        "floor".parse()?,
        Policy::new([alice.device_id()])?,
    ));
    let id = ChannelId::random();
    let mut channel = alice.create_channel(id, &settings)?;
    let mut public = PublicChannel::create(
        &server_store,
        &channel.group_info()?,
        &channel.ratchet_tree()?,
    )?;
    let out = channel.add(&bob.key_packages(1, CIPHERSUITE_V0)?)?;
    let validated = public.validate_commit(&out.commit)?;
    public.apply(validated)?;
    channel.merge_pending()?;
    let mut bobs = bob.join(&out.welcome.unwrap_or_default(), &out.ratchet_tree)?;

    let data = payload();
    let mut last = Vec::new();
    let mut count = 0;
    let start = Instant::now();
    while count < limits.floor_msgs && start.elapsed() < limits.time {
        let message = channel.encrypt(&data)?;
        last.clone_from(&message);
        match bobs.process(&message)? {
            Incoming::Application { data: got, .. } if got.len() == PAYLOAD => {}
            other => anyhow::bail!("floor: unexpected {other:?}"),
        }
        count += 1;
    }
    Ok(Floor {
        rate: rate(count, start.elapsed()),
        count,
        channel: id,
        epoch: channel.epoch(),
        message: last,
    })
}

/// What the floor measured, and the last MLS message it made.
struct Floor {
    rate: f64,
    count: usize,
    channel: ChannelId,
    epoch: u64,
    message: Vec<u8>,
}

/// Disk floor: the p50 of one 4 KiB append plus `fdatasync`, in the
/// directory the stores live in. Every durable write pays at least this;
/// the disk is shared and its latency swings through the day, so the
/// delivery figures are also given in units of it.
fn disk_floor(dir: &Path, limits: &Limits) -> Result<(f64, usize)> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(dir.join("fsync-probe"))?;
    let block = [7u8; 4096];
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < limits.disk_syncs && start.elapsed() < limits.time {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        samples.push(t.elapsed());
    }
    let count = samples.len();
    Ok((quantile_ms(&mut samples, 0.5), count))
}

async fn register(dir: &Path, server: &TestServer, name: &str) -> Result<Client> {
    Client::register(&dir.join(name), server.url(), name, None)
        .await
        .with_context(|| format!("registering {name}"))
}

/// A channel made by `owner` with every one of `members` invited and joined.
async fn channel_with(owner: &mut Client, members: &mut [Client], name: &str) -> Result<ChannelId> {
    let id = owner
        .create_channel(name, "application/octet-stream")
        .await?;
    for member in members.iter_mut() {
        let handle = member.handle().to_owned();
        owner.invite(id, &handle).await?;
        member.sync().await?;
    }
    // Earlier members process the later additions.
    for member in members.iter_mut() {
        member.sync().await?;
    }
    Ok(id)
}

/// How the sender of a delivery scenario sends.
#[derive(Clone, Copy)]
enum Sending {
    /// `Client::send`, one message per request, one after the other.
    One,
    /// `Client::send_many` with rounds of this many, one after the other.
    Rounds(usize),
    /// A `kith_client::Sender` with rounds of this many: the next round is
    /// encrypted while one is in flight.
    Pipelined(usize),
}

struct Delivery {
    sent: usize,
    received: usize,
    elapsed: Duration,
    send_latency: Vec<Duration>,
}

/// One sender sends 1 KiB messages for the time bound while `receivers`
/// sync concurrently, on a thread of their own (a device of its own, as
/// in life: their disk syncs are not queued behind the sender's); ends
/// when every receiver has every message or a grace period runs out.
async fn deliver(
    sender: &mut Client,
    receivers: &mut Vec<Client>,
    channel: ChannelId,
    max_msgs: usize,
    time: Duration,
    send: Sending,
) -> Result<Delivery> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let data = payload();
    // How many the sender sent, once it is done (`usize::MAX` until then).
    let done = Arc::new(AtomicUsize::new(usize::MAX));
    let start = Instant::now();
    let grace = time + Duration::from_secs(30);
    let mut readers = std::mem::take(receivers);
    let sent_flag = Arc::clone(&done);
    let receiving = std::thread::spawn(move || -> Result<(Vec<Client>, usize, Duration)> {
        // One worker besides this thread, as a receiving app's runtime
        // would have: `Client::sync` fetches the next page in a task of
        // its own while it decrypts and stores the current one.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let received = runtime.block_on(async {
            let mut received = 0usize;
            // Bounded in count too: one message per sync at worst, plus slack.
            let mut rounds = 0usize;
            loop {
                rounds += 1;
                let mut progressed = 0;
                for r in readers.iter_mut() {
                    progressed += r.sync().await?.messages;
                }
                received += progressed;
                let target = match sent_flag.load(Ordering::Acquire) {
                    usize::MAX => None,
                    sent => Some(sent * readers.len()),
                };
                if target.is_some_and(|t| received >= t)
                    || start.elapsed() > grace
                    || rounds > max_msgs.saturating_mul(2) + 1000
                {
                    break;
                }
                if progressed == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            anyhow::Ok(received)
        })?;
        Ok((readers, received, start.elapsed()))
    });
    let mut latency = Vec::new();
    let mut sent = 0;
    let mut failure = None;
    if let Sending::Pipelined(batch) = send {
        // One request in flight while the next round is encrypted
        // (`kith_client::Sender`); a round's latency runs from its
        // encryption to its acknowledgement.
        let mut rounds = std::collections::VecDeque::new();
        let mut acked =
            |count: usize, rounds: &mut std::collections::VecDeque<(Instant, usize)>| {
                let mut left = count;
                while left > 0
                    && let Some((t, n)) = rounds.pop_front()
                {
                    latency.extend(std::iter::repeat_n(t.elapsed(), n));
                    left = left.saturating_sub(n);
                }
            };
        let mut pipe = sender.sender(channel);
        while sent < max_msgs && start.elapsed() < time {
            let round = vec![&data[..]; batch.min(max_msgs - sent)];
            rounds.push_back((Instant::now(), round.len()));
            match pipe.send(&round).await {
                Ok(ids) => acked(ids.len(), &mut rounds),
                Err(e) => {
                    failure = Some(e.error);
                    break;
                }
            }
            sent += round.len();
        }
        match pipe.finish().await {
            Ok(ids) => acked(ids.len(), &mut rounds),
            Err(e) => {
                failure.get_or_insert(e.error);
            }
        }
        sent = latency.len();
    }
    while sent < max_msgs && start.elapsed() < time && !matches!(send, Sending::Pipelined(_)) {
        let t = Instant::now();
        let batch = match send {
            Sending::One => 1,
            Sending::Rounds(n) | Sending::Pipelined(n) => n,
        };
        if batch <= 1 {
            if let Err(e) = sender.send(channel, &data).await {
                failure = Some(e);
                break;
            }
            latency.push(t.elapsed());
            sent += 1;
        } else {
            // `batch` messages in one request, acked together; every
            // message's latency is the round's.
            let batch = vec![&data[..]; batch.min(max_msgs - sent)];
            if let Err(e) = sender.send_many(channel, &batch).await {
                failure = Some(e);
                break;
            }
            latency.extend(std::iter::repeat_n(t.elapsed(), batch.len()));
            sent += batch.len();
        }
    }
    done.store(sent, Ordering::Release);
    let joined = tokio::task::spawn_blocking(move || receiving.join())
        .await
        .context("waiting for the receivers' thread")?
        .map_err(|_| anyhow::anyhow!("the receivers' thread panicked"))?;
    let (readers, received, elapsed) = joined?;
    *receivers = readers;
    if let Some(e) = failure {
        return Err(e.into());
    }
    Ok(Delivery {
        sent: latency.len(),
        received,
        elapsed,
        send_latency: latency,
    })
}

/// Bytes above one real MLS message (the floor's last, of a 1 KiB
/// payload), computed from the encodings the client and server use (HTTP
/// headers not counted).
struct Wire {
    /// Binary send: the body is the message; the request target grows by
    /// the `?epoch=E` query.
    binary_send: usize,
    /// The JSON send body minus the message.
    json_send: usize,
    /// The binary frame the server sends for a `message` event, minus the
    /// message.
    binary_event: usize,
    /// Whether that frame is the compact one.
    compact: bool,
    /// The explicit `message` frame minus the message (sent when the MLS
    /// header does not name the event's channel and epoch).
    explicit_event: usize,
    /// A JSON `message` event (as `GET /v0/events` lists it) minus the
    /// message.
    json_event: usize,
}

fn wire(floor: &Floor) -> Wire {
    use kith_proto::events::{EventFrame, MessageEvent, encode_frame};
    let message = floor.message.clone();
    let mls_size = message.len();
    let json_send = json!({ "epoch": floor.epoch, "message": kith_client::api::b64(&message) })
        .to_string()
        .len();
    let channel = floor.channel;
    let sender = kith_proto::DeviceId::of(&SecretKey::generate().public());
    let (cursor, seq, epoch, received_at) =
        (123_456u64, 4_321u64, floor.epoch, 1_790_000_000_000u64);
    let json_event = json!({
        "cursor": cursor, "kind": "message", "channel": channel.to_string(), "seq": seq,
        "id": hex_of(&kith_proto::sign::message_id(&message)), "epoch": epoch,
        "sender": sender.to_string(), "message": kith_client::api::b64(&message),
        "received_at": received_at,
    })
    .to_string()
    .len();
    let event = MessageEvent {
        channel,
        seq,
        epoch,
        received_at,
        sender,
        message,
    };
    // The frame the server sends (compact when the MLS header names the
    // channel and epoch, as it does for every message a client sends), and
    // the explicit one it falls back to.
    let mut explicit = Vec::new();
    encode_frame(
        &EventFrame::Message {
            cursor,
            event: event.clone(),
        },
        &mut explicit,
    );
    let sent = EventFrame::message(cursor, event);
    let compact = matches!(sent, EventFrame::Compact { .. });
    let mut frame = Vec::new();
    encode_frame(&sent, &mut frame);
    Wire {
        binary_send: format!("?epoch={}", floor.epoch).len(),
        json_send: json_send.saturating_sub(mls_size),
        binary_event: frame.len().saturating_sub(mls_size),
        compact,
        explicit_event: explicit.len().saturating_sub(mls_size),
        json_event: json_event.saturating_sub(mls_size),
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[allow(clippy::too_many_lines)]
async fn run(limits: &Limits, kithd: &Path, only: &[String]) -> Result<Vec<Row>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    if !only.is_empty() {
        return run_only(limits, kithd, only, dir).await;
    }

    let mut config = Config::new("a.test".parse()?, dir.join("server"));
    config.registration = Registration::Open;
    lift_commit_limits(&mut config);
    let server = TestServer::start_with(config).await;

    // 1. Floor.
    let fl = floor(limits)?;
    let (floor_rate, mls_size, floor_count) = (fl.rate, fl.message.len(), fl.count);
    let floor_ms = 1000.0 / floor_rate.max(1e-9);
    let (sync_ms, syncs) = disk_floor(dir, limits)?;
    let row_1c = commit_floor_row(limits, floor_ms)?;

    // 2, 2b and 2c. 1:1 delivery.
    let (mut alice, one, deliveries) = one_to_one(dir, &server, limits).await?;
    let [row_2, row_2b, row_2c] = delivery_rows(deliveries, floor_rate, sync_ms);

    // 4. Certified commit latency (self_update on the 1:1 channel).
    let row_4 = commit_row(&mut alice, one, limits, floor_ms).await?;

    // 3. Fan-out to N member devices.
    let mut fan_sender = register(dir, &server, "fan").await?;
    let mut members = Vec::new();
    for i in 0..limits.fanout_members {
        members.push(register(dir, &server, &format!("member{i}")).await?);
    }
    let fan = channel_with(&mut fan_sender, &mut members, "fanout").await?;
    let f = deliver(
        &mut fan_sender,
        &mut members,
        fan,
        limits.fanout_msgs,
        limits.time,
        Sending::One,
    )
    .await?;
    let fan_rate = rate(f.received, f.elapsed);

    // 6. Wire: what carries one MLS message, above the message itself.
    let w = wire(&fl);

    // 3b and 5: on a kithd process of its own.
    let fo = server_fanout(kithd, dir, limits).await?;
    let fp = footprint(kithd, dir, limits).await?;

    server.stop().await;

    // 4b. Certified commits with three servers; 5b. adding a member to a
    // large channel.
    let row_4b = ordering3(dir, limits, floor_ms).await?;
    let row_5b = large_add(dir, limits, floor_ms).await?;

    let members_n = limits.fanout_members;
    Ok(vec![
        Row {
            scenario: "1. floor: OpenMLS encrypt+decrypt 1 KiB",
            figure: format!("{floor_rate:.0} msgs/s ({floor_ms:.3} ms/msg)"),
            ratio: "1.00".into(),
            detail: json!({ "msgs_per_s": floor_rate, "ms_per_msg": floor_ms, "count": floor_count, "mls_message_bytes": mls_size }),
        },
        Row {
            scenario: "1b. disk floor: 4 KiB write + fdatasync",
            figure: format!("p50 {sync_ms:.2} ms ({syncs} syncs)"),
            ratio: format!("{:.1} x floor msg", sync_ms / floor_ms),
            detail: json!({ "p50_ms": sync_ms, "count": syncs }),
        },
        row_1c,
        row_2,
        row_2b,
        row_2c,
        Row {
            scenario: "3. fan-out to member devices, end to end",
            figure: format!(
                "{fan_rate:.0} deliveries/s to {members_n} devices ({} sent, {} delivered)",
                f.sent, f.received
            ),
            ratio: format!("{:.4} of floor rate", fan_rate / floor_rate),
            detail: json!({ "members": members_n, "deliveries_per_s": fan_rate, "sent": f.sent, "delivered": f.received, "ratio_to_floor": fan_rate / floor_rate }),
        },
        fanout_row(&fo, floor_rate),
        row_4,
        row_4b,
        footprint_row(&fp),
        row_5b,
        Row {
            scenario: "6. wire: bytes above the MLS message (binary; JSON form)",
            figure: format!(
                "send: {} bytes (body 0 + `?epoch=1` {}; JSON body {}); delivery: {} bytes per event frame ({}; explicit frame {}, JSON event {}), for a {mls_size}-byte MLS message",
                w.binary_send,
                w.binary_send,
                w.json_send,
                w.binary_event,
                if w.compact { "compact" } else { "explicit" },
                w.explicit_event,
                w.json_event
            ),
            ratio: format!(
                "{:.3} (send), {:.3} (delivery) of MLS size",
                w.binary_send as f64 / mls_size.max(1) as f64,
                w.binary_event as f64 / mls_size.max(1) as f64
            ),
            detail: json!({
                "mls_message_bytes": mls_size,
                "binary_send_overhead_bytes": w.binary_send,
                "json_send_overhead_bytes": w.json_send,
                "binary_event_overhead_bytes": w.binary_event,
                "binary_event_compact": w.compact,
                "explicit_event_overhead_bytes": w.explicit_event,
                "json_event_overhead_bytes": w.json_event,
            }),
        },
    ])
}

/// Scenario 4: `committer` updates its own leaf in `channel` (on one
/// homeserver) as fast as it can, one certified commit after the other.
async fn commit_row(
    committer: &mut Client,
    channel: ChannelId,
    limits: &Limits,
    floor_ms: f64,
) -> Result<Row> {
    let mut latency = Vec::new();
    let start = Instant::now();
    while latency.len() < limits.commits && start.elapsed() < limits.time {
        let t = Instant::now();
        committer.self_update(channel).await?;
        latency.push(t.elapsed());
    }
    let commits = latency.len();
    let commit_rate = rate(commits, start.elapsed());
    let p50 = quantile_ms(&mut latency, 0.5);
    let p99 = quantile_ms(&mut latency, 0.99);
    Ok(Row {
        scenario: "4. certified commit (self_update), 1 server",
        figure: format!("p50 {p50:.2} ms, p99 {p99:.2} ms; {commit_rate:.0} commits/s ({commits})"),
        ratio: format!("p50 = {:.0} x floor msg", p50 / floor_ms),
        detail: json!({ "p50_ms": p50, "p99_ms": p99, "commits_per_s": commit_rate, "commits": commits, "p50_in_floor_msgs": p50 / floor_ms }),
    })
}

/// Scenarios 2, 2b and 2c on `server`: a sender and a receiver in one
/// channel, sequential sends, then [`BATCH`] per request, then
/// [`LARGE_BATCH`] per request. Returns the sender and the channel
/// (scenario 4 commits on it) with the three deliveries.
async fn one_to_one(
    dir: &Path,
    server: &TestServer,
    limits: &Limits,
) -> Result<(Client, ChannelId, [Delivery; 3])> {
    let mut alice = register(dir, server, "alice").await?;
    let bob = register(dir, server, "bob").await?;
    let mut receivers = vec![bob];
    let one = channel_with(&mut alice, &mut receivers, "direct").await?;
    let d = deliver(
        &mut alice,
        &mut receivers,
        one,
        limits.delivery_msgs,
        limits.time,
        Sending::One,
    )
    .await?;
    let p = deliver(
        &mut alice,
        &mut receivers,
        one,
        limits.delivery_msgs,
        limits.time,
        Sending::Rounds(BATCH),
    )
    .await?;
    let large = deliver(
        &mut alice,
        &mut receivers,
        one,
        limits.delivery_msgs,
        limits.time,
        Sending::Pipelined(LARGE_BATCH),
    )
    .await?;
    Ok((alice, one, [d, p, large]))
}

/// The rows of scenarios 2, 2b and 2c; `sync_ms` is the disk floor's p50.
fn delivery_rows(deliveries: [Delivery; 3], floor_rate: f64, sync_ms: f64) -> [Row; 3] {
    let [mut d, mut p, mut l] = deliveries;
    // A delivery rate as disk syncs' worth of time per message.
    let in_syncs = |rate: f64| 1000.0 / rate.max(1e-9) / sync_ms;
    let one_rate = rate(d.received, d.elapsed);
    let one_p50 = quantile_ms(&mut d.send_latency, 0.5);
    let one_p99 = quantile_ms(&mut d.send_latency, 0.99);
    let piped_rate = rate(p.received, p.elapsed);
    let piped_p50 = quantile_ms(&mut p.send_latency, 0.5);
    let piped_p99 = quantile_ms(&mut p.send_latency, 0.99);
    let large_rate = rate(l.received, l.elapsed);
    let large_p50 = quantile_ms(&mut l.send_latency, 0.5);
    let large_p99 = quantile_ms(&mut l.send_latency, 0.99);
    [
        Row {
            scenario: "2. 1:1 delivery, 1 server, durable ack",
            figure: format!(
                "{one_rate:.0} msgs/s; send p50 {one_p50:.2} ms, p99 {one_p99:.2} ms ({} sent, {} received)",
                d.sent, d.received
            ),
            ratio: format!(
                "{:.4} of floor rate; {:.1} disk syncs per msg",
                one_rate / floor_rate,
                in_syncs(one_rate)
            ),
            detail: json!({ "disk_syncs_per_msg": in_syncs(one_rate), "msgs_per_s": one_rate, "send_p50_ms": one_p50, "send_p99_ms": one_p99, "sent": d.sent, "received": d.received, "ratio_to_floor": one_rate / floor_rate }),
        },
        Row {
            scenario: "2b. 1:1 delivery, batches of 8 (one request each), durable acks",
            figure: format!(
                "{piped_rate:.0} msgs/s; send p50 {piped_p50:.2} ms, p99 {piped_p99:.2} ms per round of {BATCH} ({} sent, {} received)",
                p.sent, p.received
            ),
            ratio: format!(
                "{:.4} of floor rate; {:.1} disk syncs per msg",
                piped_rate / floor_rate,
                in_syncs(piped_rate)
            ),
            detail: json!({ "disk_syncs_per_msg": in_syncs(piped_rate), "batch": BATCH, "msgs_per_s": piped_rate, "round_p50_ms": piped_p50, "round_p99_ms": piped_p99, "sent": p.sent, "received": p.received, "ratio_to_floor": piped_rate / floor_rate }),
        },
        Row {
            scenario: "2c. 1:1 delivery, batches of 64 (one request each, pipelined: the next encrypted while one is in flight), durable acks",
            figure: format!(
                "{large_rate:.0} msgs/s; send p50 {large_p50:.2} ms, p99 {large_p99:.2} ms per round of {LARGE_BATCH} ({} sent, {} received)",
                l.sent, l.received
            ),
            ratio: format!(
                "{:.4} of floor rate; {:.2} disk syncs per msg",
                large_rate / floor_rate,
                in_syncs(large_rate)
            ),
            detail: json!({ "disk_syncs_per_msg": in_syncs(large_rate), "batch": LARGE_BATCH, "msgs_per_s": large_rate, "round_p50_ms": large_p50, "round_p99_ms": large_p99, "sent": l.sent, "received": l.received, "ratio_to_floor": large_rate / floor_rate }),
        },
    ]
}

/// The commit floor (see [`commit_floor`]): the cryptography of one
/// certified commit among three servers, the physical reference of 4b.
fn commit_floor_row(limits: &Limits, floor_ms: f64) -> Result<Row> {
    let f = commit_floor::commit_floor(limits.floor_commits, limits.time)?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let cpu_ms = ms(f.cpu_per_commit);
    Ok(Row {
        scenario: "1c. commit floor: raw OpenMLS, one certified commit among 3 servers",
        figure: format!(
            "{cpu_ms:.2} ms {} per commit (committer {:.2}, 3 servers {:.2}, votes + 3 certificate checks {:.2}; {} commits); {:.0} commits/s on {} cores from that; {:.0} commits/s measured on {} threads ({} commits)",
            if f.cpu_measured { "CPU" } else { "wall" },
            ms(f.parts.committer),
            ms(f.parts.servers),
            ms(f.parts.votes),
            f.commits,
            f.projected_rate(),
            f.cores,
            f.parallel_rate(),
            f.cores,
            f.parallel_commits,
        ),
        ratio: format!("{:.0} x floor msg", cpu_ms / floor_ms),
        detail: json!({
            "cpu_ms_per_commit": cpu_ms,
            "cpu_measured": f.cpu_measured,
            "wall_ms_per_commit": ms(f.wall_per_commit),
            "committer_ms": ms(f.parts.committer),
            "servers_ms": ms(f.parts.servers),
            "votes_ms": ms(f.parts.votes),
            "vote_signatures": commit_floor::VOTE_SIGNATURES,
            "vote_verifications": commit_floor::VOTE_VERIFICATIONS,
            "commits": f.commits,
            "cores": f.cores,
            "projected_commits_per_s": f.projected_rate(),
            "parallel_commits": f.parallel_commits,
            "parallel_commits_per_s": f.parallel_rate(),
            "in_floor_msgs": cpu_ms / floor_ms,
        }),
    })
}

/// Scenario 4b: certified commits with three servers, latency, then many
/// channels committing at once.
async fn ordering3(dir: &Path, limits: &Limits, floor_ms: f64) -> Result<Row> {
    let o = federated::ordering(
        &dir.join("three"),
        limits.commits,
        limits.parallel_channels,
        limits.time,
    )
    .await?;
    let mut latency3 = o.latency.clone();
    let commits3 = latency3.len();
    let rate3 = rate(commits3, o.latency_elapsed);
    let p50_3 = quantile_ms(&mut latency3, 0.5);
    let p99_3 = quantile_ms(&mut latency3, 0.99);
    let parallel_rate = rate(o.parallel_commits, o.parallel_elapsed);
    Ok(Row {
        scenario: "4b. certified commit (self_update), 3 servers",
        figure: format!(
            "p50 {p50_3:.2} ms, p99 {p99_3:.2} ms; {rate3:.0} commits/s ({commits3}); {parallel_rate:.0} commits/s over {} channels at once ({} commits)",
            o.channels, o.parallel_commits
        ),
        ratio: format!("p50 = {:.0} x floor msg", p50_3 / floor_ms),
        detail: json!({ "p50_ms": p50_3, "p99_ms": p99_3, "commits_per_s": rate3, "commits": commits3, "parallel_channels": o.channels, "parallel_commits": o.parallel_commits, "parallel_commits_per_s": parallel_rate, "p50_in_floor_msgs": p50_3 / floor_ms }),
    })
}

/// Scenario 5b: adding a member to a large channel, end to end and raw.
async fn large_add(dir: &Path, limits: &Limits, floor_ms: f64) -> Result<Row> {
    let l = large::large_add(
        &dir.join("large"),
        limits.large_members,
        limits.large_adds,
        limits.time,
        limits.large_budget,
    )
    .await?;
    let (mut e2e, mut raw) = (l.e2e.clone(), l.raw.add.clone());
    let add_p50 = quantile_ms(&mut e2e, 0.5);
    let raw_p50 = quantile_ms(&mut raw, 0.5);
    let validated_p50 = quantile_ms(&mut l.raw.validated.clone(), 0.5);
    let steady_p50 = quantile_ms(&mut l.raw.steady.clone(), 0.5);
    let steady_validated_p50 = quantile_ms(&mut l.raw.steady_validated.clone(), 0.5);
    let ms = |v: &[Duration]| {
        v.iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect::<Vec<_>>()
    };
    Ok(Row {
        scenario: "5b. add a member to an N-member channel",
        figure: format!(
            "N = {} (of {} wanted; built in {:.1} s): end to end p50 {add_p50:.2} ms ({} adds); raw OpenMLS add + merge p50 {raw_p50:.2} ms ({} adds); raw + one public validation p50 {validated_p50:.2} ms; with 16 past epochs kept: raw p50 {steady_p50:.2} ms, + validation {steady_validated_p50:.2} ms (end to end {:.2} x that)",
            l.members,
            l.wanted,
            l.build.as_secs_f64(),
            e2e.len(),
            raw.len(),
            add_p50 / steady_validated_p50
        ),
        ratio: format!("{:.2} x raw OpenMLS add", add_p50 / raw_p50),
        detail: json!({ "members": l.members, "members_wanted": l.wanted, "build_s": l.build.as_secs_f64(), "e2e_p50_ms": add_p50, "e2e_adds": e2e.len(), "e2e_ms": l.e2e.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(), "raw_p50_ms": raw_p50, "raw_adds": raw.len(), "raw_ms": ms(&l.raw.add), "raw_validated_p50_ms": validated_p50, "raw_validated_ms": ms(&l.raw.validated), "raw_steady_p50_ms": steady_p50, "raw_steady_ms": ms(&l.raw.steady), "raw_steady_validated_p50_ms": steady_validated_p50, "raw_steady_validated_ms": ms(&l.raw.steady_validated), "ratio_to_raw_steady_validated": add_p50 / steady_validated_p50, "ratio_to_raw": add_p50 / raw_p50, "p50_in_floor_msgs": add_p50 / floor_ms }),
    })
}

/// Scenario 3b on a kithd process of its own.
async fn server_fanout(kithd: &Path, dir: &Path, limits: &Limits) -> Result<process::Fanout> {
    process::fanout(
        kithd,
        &dir.join("fanout-kithd"),
        limits.server_fanout_receivers,
        limits.server_fanout_msgs,
        limits.time,
        limits.time * 24,
        &payload(),
    )
    .await
}

/// Scenario 5 on a kithd process of its own.
async fn footprint(kithd: &Path, dir: &Path, limits: &Limits) -> Result<process::Footprint> {
    process::footprint(
        kithd,
        &dir.join("footprint-kithd"),
        limits.idle_channels,
        limits.idle_streams,
        limits.time * 36,
    )
    .await
}

/// `--only`: the floor, then the chosen scenarios.
async fn run_only(limits: &Limits, kithd: &Path, only: &[String], dir: &Path) -> Result<Vec<Row>> {
    let floor_rate = floor(limits)?.rate;
    let mut rows = Vec::new();
    if only.iter().any(|s| s == "2") {
        let (sync_ms, syncs) = disk_floor(dir, limits)?;
        rows.push(Row {
            scenario: "1b. disk floor: 4 KiB write + fdatasync",
            figure: format!("p50 {sync_ms:.2} ms ({syncs} syncs)"),
            ratio: format!("{:.1} x floor msg", sync_ms * floor_rate / 1000.0),
            detail: json!({ "p50_ms": sync_ms, "count": syncs }),
        });
        let mut config = Config::new("a.test".parse()?, dir.join("server"));
        config.registration = Registration::Open;
        lift_commit_limits(&mut config);
        let server = TestServer::start_with(config).await;
        let (_, _, deliveries) = one_to_one(dir, &server, limits).await?;
        rows.extend(delivery_rows(deliveries, floor_rate, sync_ms));
        server.stop().await;
    }
    if only.iter().any(|s| s == "3b") {
        let fo = server_fanout(kithd, dir, limits).await?;
        rows.push(fanout_row(&fo, floor_rate));
    }
    let floor_ms = 1000.0 / floor_rate.max(1e-9);
    if only.iter().any(|s| s == "4") {
        // The full run commits on scenario 2's channel after its messages;
        // alone, on a fresh channel of the same two devices.
        let mut config = Config::new("a.test".parse()?, dir.join("server4"));
        config.registration = Registration::Open;
        lift_commit_limits(&mut config);
        let server = TestServer::start_with(config).await;
        let mut alice = register(dir, &server, "alice4").await?;
        let mut receivers = vec![register(dir, &server, "bob4").await?];
        let one = channel_with(&mut alice, &mut receivers, "direct4").await?;
        rows.push(commit_row(&mut alice, one, limits, floor_ms).await?);
        server.stop().await;
    }
    if only.iter().any(|s| s == "4b") {
        rows.push(commit_floor_row(limits, floor_ms)?);
        rows.push(ordering3(dir, limits, floor_ms).await?);
    }
    if only.iter().any(|s| s == "5") {
        let fp = footprint(kithd, dir, limits).await?;
        rows.push(footprint_row(&fp));
    }
    if only.iter().any(|s| s == "5b") {
        rows.push(large_add(dir, limits, floor_ms).await?);
    }
    Ok(rows)
}

/// The row of scenario 3b.
fn fanout_row(fo: &process::Fanout, floor_rate: f64) -> Row {
    Row {
        scenario: "3b. fan-out at the server (separate kithd, event streams, no decryption)",
        figure: format!(
            "{:.0} deliveries/s to {} receiving devices (of {}; {} msgs, {} of {} delivered in {:.2} s); {:.0} deliveries per kithd CPU-second ({:.2} s CPU); measured wire: {} bytes per message event ({} of {} frames compact)",
            fo.rate(),
            fo.receivers,
            fo.receivers_wanted,
            fo.messages,
            fo.delivered,
            fo.messages * fo.receivers,
            fo.elapsed.as_secs_f64(),
            fo.per_cpu_second(),
            fo.server_cpu,
            fo.wire_overhead
                .map_or_else(|| "?".to_owned(), |w| format!("{w:.1}")),
            fo.wire_compact,
            fo.wire_frames
        ),
        ratio: format!(
            "{:.3} of the 100,000/s target; {:.1} x floor msg rate",
            fo.rate() / 1e5,
            fo.rate() / floor_rate
        ),
        detail: json!({ "deliveries_per_s": fo.rate(), "receivers": fo.receivers, "receivers_wanted": fo.receivers_wanted, "messages": fo.messages, "delivered": fo.delivered, "elapsed_s": fo.elapsed.as_secs_f64(), "server_cpu_s": fo.server_cpu, "deliveries_per_server_cpu_s": fo.per_cpu_second(), "ratio_to_target": fo.rate() / 1e5, "wire_overhead_bytes": fo.wire_overhead, "wire_frames": fo.wire_frames, "wire_compact": fo.wire_compact }),
    }
}

/// The row of scenario 5.
fn footprint_row(fp: &process::Footprint) -> Row {
    Row {
        scenario: "5. footprint (separate kithd process, VmRSS)",
        figure: format!(
            "idle {:.1} MiB ({:.1} MiB with 1 device); {} idle channels (of {}, made in {:.0} s): {:.1} MiB, {:.0} B/channel; {} event streams (of {}; server counts {}): {:.1} MiB, {:.0} B/stream",
            mib(fp.idle.total),
            mib(fp.one_device.total),
            fp.channels,
            fp.channels_wanted,
            fp.channels_time.as_secs_f64(),
            mib(fp.with_channels.total),
            fp.per_channel(),
            fp.streams,
            fp.streams_wanted,
            fp.streams_gauge
                .map_or_else(|| "?".to_owned(), |g| g.to_string()),
            mib(fp.with_streams.total),
            fp.per_stream()
        ),
        ratio: format!(
            "of target: idle {:.2} (20 MB), channel {:.2} (2 KB), stream {:.2} (20 KB)",
            fp.idle.total as f64 * 1024.0 / 20e6,
            fp.per_channel() / 2e3,
            fp.per_stream() / 20e3
        ),
        detail: json!({ "idle_rss_kib": fp.idle.total, "idle_anon_kib": fp.idle.anon, "one_device_rss_kib": fp.one_device.total, "channels": fp.channels, "channels_wanted": fp.channels_wanted, "channels_s": fp.channels_time.as_secs_f64(), "channels_rss_kib": fp.with_channels.total, "channels_anon_kib": fp.with_channels.anon, "bytes_per_channel": fp.per_channel(), "streams": fp.streams, "streams_wanted": fp.streams_wanted, "streams_gauge": fp.streams_gauge, "streams_rss_kib": fp.with_streams.total, "streams_anon_kib": fp.with_streams.anon, "bytes_per_stream": fp.per_stream() }),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let limits = Limits::new(&args);
    // Span timings for profiling: `KITH_BENCH_TRACE=debug` prints every
    // span's busy and idle time on stderr when it closes.
    if let Ok(filter) = std::env::var("KITH_BENCH_TRACE") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let kithd = args
        .kithd
        .clone()
        .or_else(process::default_kithd)
        .context("cannot find the kithd binary: pass --kithd PATH")?;
    let rows = runtime.block_on(run(&limits, &kithd, &args.only))?;
    if args.json {
        let out: Vec<Value> = rows
            .iter()
            .map(|r| json!({ "scenario": r.scenario, "figure": r.figure, "ratio": r.ratio, "detail": r.detail }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "smoke": args.smoke, "seconds_per_scenario": limits.time.as_secs(), "scenarios": out })
            )?
        );
    } else {
        println!(
            "kith-bench ({}; {} s per scenario; payload {PAYLOAD} B)\n",
            if args.smoke { "smoke" } else { "normal" },
            limits.time.as_secs()
        );
        println!("| scenario | figure | ratio to floor |");
        println!("|---|---|---|");
        for r in &rows {
            println!("| {} | {} | {} |", r.scenario, r.figure, r.ratio);
        }
    }
    Ok(())
}
