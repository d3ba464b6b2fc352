//! Scenarios measured on a `kithd` process of its own, spawned from the
//! built binary: its footprint (resident memory read from
//! `/proc/PID/status`, idle, with many idle channels, with many connected
//! event streams) and its fan-out rate (deliveries it makes per second to
//! the event streams of a channel's members, with no client decryption
//! in the way). The benchmark's own process (clients, readers) is not in
//! these figures.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kith_client::Client;
use kith_mls::{ChannelExtension, ChannelSettings, ContentType, Device, MlsStore, Policy};
use kith_proto::ChannelId;
use kith_proto::events::{EventFrame, OCTET_STREAM, decode_frames};

/// Requests in flight at once when creating channels or posting messages.
const IN_FLIGHT: usize = 16;
/// Messages scenario 3b's sender encrypts per ratchet write.
const ENCRYPT_ROUND: usize = 256;
/// WebSocket handshakes in flight at once.
const CONNECTING: usize = 64;

/// The `kithd` binary next to this one (both are built into the same
/// target directory), unless `--kithd` names another.
pub(crate) fn default_kithd() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.with_file_name("kithd"))
}

/// A running `kithd`, killed (by its PID, through the child handle) when
/// dropped.
pub(crate) struct Kithd {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub(crate) url: String,
    clock_ticks: f64,
}

/// Resident memory of a process, KiB (from `/proc/PID/status`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Rss {
    /// `VmRSS`: all resident pages.
    pub(crate) total: u64,
    /// `RssAnon`: heap, stacks and other anonymous pages.
    pub(crate) anon: u64,
}

impl Kithd {
    /// Starts `bin` on a free loopback port with its data in `dir`, open
    /// registration and the inbox deposit rate lifted (one owner invites
    /// every member of the fan-out channel), and waits until it listens.
    pub(crate) fn spawn(bin: &Path, dir: &Path) -> Result<Self> {
        if !bin.exists() {
            bail!(
                "{} not found: build it first (`cargo build --release -p kith-server --bin kithd`, \
                 or without --release for a debug bench), or pass --kithd PATH",
                bin.display()
            );
        }
        std::fs::create_dir_all(dir)?;
        let config = dir.join("kithd.toml");
        std::fs::write(
            &config,
            "[limits]\ninbox_deposits_per_minute = 1000000\ninbox_deposit_burst = 1000000\ncommits_per_minute = 0\nfederation_submissions_per_minute = 0\n",
        )?;
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--server-name", "bench.test"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--config")
            .arg(&config)
            .env("KITH_LOG", "info")
            .env("KITH_OPEN_REGISTRATION", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("kithd's stderr")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // Reads the log to its end, so kithd never blocks on a full pipe;
        // only the listening line is of interest.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && line.contains("kithd listening") {
                    sent = tx.send(line).is_ok();
                }
            }
        });
        let mut this = Self {
            child,
            url: String::new(),
            clock_ticks: clock_ticks(),
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("kithd did not say it was listening within 30 s")?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .context("no addr= in kithd's listening line")?;
        this.url = format!("http://{addr}");
        Ok(this)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now.
    pub(crate) fn rss(&self) -> Result<Rss> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        };
        Ok(Rss {
            total: field("VmRSS:").context("no VmRSS")?,
            anon: field("RssAnon:").unwrap_or(0),
        })
    }

    /// CPU time it has used so far (user + system), seconds.
    pub(crate) fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the command name (which may hold spaces) start at
        // the state; utime and stime are the 14th and 15th fields.
        let rest = stat.rsplit_once(')').context("malformed stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            Ok(fields.get(i).context("short stat")?.parse::<u64>()? as f64)
        };
        Ok((ticks(11)? + ticks(12)?) / self.clock_ticks)
    }

    /// Its `kith_event_streams` gauge (streams it holds open).
    pub(crate) async fn event_streams(&self) -> Option<u64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("kith_event_streams_connected "))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Kithd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK`; 100,
/// Linux's value on every common architecture, if that fails).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The soft limit on open files of this process (`/proc/self/limits`).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Lets the process settle (and the allocator return what it can) before
/// a reading.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// What scenario 5 measured.
pub(crate) struct Footprint {
    /// Started, nothing registered.
    pub(crate) idle: Rss,
    /// With one registered device.
    pub(crate) one_device: Rss,
    /// Idle channels made, of those wanted.
    pub(crate) channels: usize,
    pub(crate) channels_wanted: usize,
    pub(crate) channels_time: Duration,
    /// With those channels.
    pub(crate) with_channels: Rss,
    /// Event streams open (as the server's gauge counts them), of those
    /// wanted.
    pub(crate) streams: usize,
    pub(crate) streams_wanted: usize,
    pub(crate) streams_gauge: Option<u64>,
    /// With those streams too.
    pub(crate) with_streams: Rss,
}

impl Footprint {
    /// Resident bytes per idle channel.
    pub(crate) fn per_channel(&self) -> f64 {
        self.with_channels
            .total
            .saturating_sub(self.one_device.total) as f64
            * 1024.0
            / self.channels.max(1) as f64
    }

    /// Resident bytes per connected event stream.
    pub(crate) fn per_stream(&self) -> f64 {
        self.with_streams
            .total
            .saturating_sub(self.with_channels.total) as f64
            * 1024.0
            / self.streams.max(1) as f64
    }
}

/// Scenario 5: a fresh `kithd`, idle; then one device creates `channels`
/// idle channels (each a real MLS group of one, created as `kith-client`
/// does, posted with up to 16 requests in flight); then `streams`
/// WebSocket event streams are opened to it and held. Each phase stops at
/// `budget`.
pub(crate) async fn footprint(
    bin: &Path,
    dir: &Path,
    channels: usize,
    streams: usize,
    budget: Duration,
) -> Result<Footprint> {
    let kithd = Kithd::spawn(bin, &dir.join("kithd"))?;
    settle().await;
    let idle = kithd.rss()?;
    let owner = Client::register(&dir.join("owner"), &kithd.url, "owner", None)
        .await
        .context("registering the owner")?;
    settle().await;
    let one_device = kithd.rss()?;

    // Channels: MLS groups made here (one core), posted concurrently.
    let mls = Device::new(owner.secret_key(), MlsStore::in_memory()?);
    let settings = ChannelSettings::new(ChannelExtension::new(
        ContentType::octet_stream(),
        "idle".parse()?,
        Policy::new([owner.device_id()])?,
    ));
    let api = owner.api().clone();
    let start = Instant::now();
    let mut made = 0;
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    while (next < channels && start.elapsed() < budget) || !pending.is_empty() {
        if next < channels && pending.len() < IN_FLIGHT && start.elapsed() < budget {
            let id = ChannelId::random();
            let (info, tree) = {
                let group = mls.create_channel(id, &settings)?;
                (group.group_info()?, group.ratchet_tree()?)
            };
            let api = api.clone();
            pending.push(async move { api.create_channel(&id.to_string(), &info, &tree).await });
            next += 1;
            continue;
        }
        if let Some(result) = pending.next().await {
            result.context("creating an idle channel")?;
            made += 1;
        }
    }
    let channels_time = start.elapsed();
    drop(mls);
    settle().await;
    let with_channels = kithd.rss()?;

    // Streams: one device's WebSockets, each held by a task that reads
    // (and so answers pings) until aborted. Each costs a descriptor here
    // and one in kithd.
    let limit = open_files_limit().unwrap_or(1024);
    let streams_wanted = streams;
    let streams = streams.min(limit.saturating_sub(256));
    let token = owner.api().token().context("the owner has no session")?;
    let ws_url = format!(
        "{}/v0/events/ws?token={token}",
        kithd.url.replacen("http://", "ws://", 1)
    );
    let start = Instant::now();
    let mut holders = Vec::new();
    let mut connecting = FuturesUnordered::new();
    let mut next = 0;
    while (next < streams && start.elapsed() < budget) || !connecting.is_empty() {
        if next < streams && connecting.len() < CONNECTING && start.elapsed() < budget {
            let url = ws_url.clone();
            connecting.push(async move { tokio_tungstenite::connect_async(url).await });
            next += 1;
            continue;
        }
        if let Some(result) = connecting.next().await {
            let (mut socket, _) = result.context("opening an event stream")?;
            holders.push(tokio::spawn(async move {
                while let Some(Ok(_)) = socket.next().await {}
            }));
        }
    }
    settle().await;
    let with_streams = kithd.rss()?;
    let streams_gauge = kithd.event_streams().await;
    for h in &holders {
        h.abort();
    }
    drop(kithd);
    Ok(Footprint {
        idle,
        one_device,
        channels: made,
        channels_wanted: channels,
        channels_time,
        with_channels,
        streams: holders.len(),
        streams_wanted,
        streams_gauge,
        with_streams,
    })
}

/// What scenario 3b measured.
pub(crate) struct Fanout {
    /// Receiving member devices (besides the sender).
    pub(crate) receivers: usize,
    pub(crate) receivers_wanted: usize,
    /// Messages posted (each delivered to every receiver).
    pub(crate) messages: usize,
    /// Deliveries counted on the receivers' event streams.
    pub(crate) delivered: usize,
    /// From the first post to the last delivery (or the wait bound).
    pub(crate) elapsed: Duration,
    /// kithd's CPU time over that span.
    pub(crate) server_cpu: f64,
    /// Bytes above the MLS message per `message` event, as a receiver
    /// fetched them from this server in binary (`GET /v0/events`).
    pub(crate) wire_overhead: Option<f64>,
    /// How many of those frames were compact.
    pub(crate) wire_compact: usize,
    pub(crate) wire_frames: usize,
}

impl Fanout {
    pub(crate) fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub(crate) fn per_cpu_second(&self) -> f64 {
        self.delivered as f64 / self.server_cpu.max(1e-9)
    }
}

/// Scenario 3b: a fresh `kithd`; a sender invites `receivers` member
/// devices into one channel (until `budget`); each receiver holds a
/// WebSocket event stream whose `message` frames a reader counts (no
/// parsing, no decryption); the sender pre-encrypts up to `messages` 1 KiB
/// messages (in rounds of [`ENCRYPT_ROUND`], one ratchet write each, for
/// at most `4 × time`), then posts them in binary, one per request, with
/// 16 in flight, for at most `time`. The figure is deliveries (message
/// events received, summed over receivers) per second from the first post
/// until every receiver has every message posted (or `3 × time` passes).
/// Why so: encrypting one by one (a ratchet write each) for `time` made
/// about one second's worth of posts, and the figure moved by ±25%
/// between runs; the posting phase is now a few seconds long.
pub(crate) async fn fanout(
    bin: &Path,
    dir: &Path,
    receivers: usize,
    messages: usize,
    time: Duration,
    budget: Duration,
    payload: &[u8],
) -> Result<Fanout> {
    let kithd = Kithd::spawn(bin, &dir.join("kithd"))?;
    let mut sender = Client::register(&dir.join("sender"), &kithd.url, "sender", None).await?;
    let channel = sender
        .create_channel("fanout", "application/octet-stream")
        .await?;
    let start = Instant::now();
    let mut members = Vec::new();
    while members.len() < receivers && start.elapsed() < budget {
        let name = format!("r{}", members.len());
        let member = Client::register(&dir.join(&name), &kithd.url, &name, None).await?;
        sender.invite(channel, member.handle()).await?;
        members.push(member);
    }

    // The receivers' streams, counting `message` events.
    let delivered = Arc::new(AtomicUsize::new(0));
    let ws_base = kithd.url.replacen("http://", "ws://", 1);
    let mut readers = Vec::new();
    for member in &members {
        let token = member.api().token().context("a member has no session")?;
        let (mut socket, _) =
            tokio_tungstenite::connect_async(format!("{ws_base}/v0/events/ws?token={token}"))
                .await
                .context("opening a member's event stream")?;
        let delivered = Arc::clone(&delivered);
        readers.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = socket.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(text) = frame
                    && text.as_str().contains(r#""kind":"message""#)
                {
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Replays of earlier events are over before the first post.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = delivered.load(Ordering::Relaxed);

    let mut encrypted = Vec::new();
    let made = Instant::now();
    while encrypted.len() < messages && made.elapsed() < time * 4 {
        let round = vec![payload; ENCRYPT_ROUND.min(messages - encrypted.len())];
        let (epoch, batch) = sender.encrypt_unsent_many(channel, &round)?;
        encrypted.extend(batch.into_iter().map(|m| (epoch, m)));
    }
    let api = sender.api().clone();
    let text = channel.to_string();
    let cpu_before = kithd.cpu_seconds()?;
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    let mut queue = encrypted.iter();
    let mut posted = 0;
    loop {
        while pending.len() < IN_FLIGHT && start.elapsed() < time {
            let Some((epoch, message)) = queue.next() else {
                break;
            };
            posted += 1;
            let (api, text) = (api.clone(), text.clone());
            pending.push(async move { api.send_message_binary(&text, *epoch, message).await });
        }
        match pending.next().await {
            Some(result) => {
                result.context("posting a message")?;
            }
            None => break,
        }
    }
    let want = posted * members.len();
    while delivered.load(Ordering::Relaxed) - before < want && start.elapsed() < time * 3 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    let server_cpu = kithd.cpu_seconds()? - cpu_before;
    let got = delivered.load(Ordering::Relaxed) - before;
    for r in &readers {
        r.abort();
    }

    // The same events as one receiver fetches them in binary (not acked,
    // so still stored): what each delivery costs on the wire.
    let (mut overhead, mut compact, mut frames) = (0usize, 0, 0);
    if let Some(member) = members.first() {
        let token = member.api().token().context("a member has no session")?;
        let mut after = 0;
        loop {
            let body = reqwest::Client::new()
                .get(format!("{}/v0/events?after={after}&limit=500", kithd.url))
                .bearer_auth(token)
                .header(reqwest::header::ACCEPT, OCTET_STREAM)
                .send()
                .await?
                .bytes()
                .await?;
            let list = decode_frames(&body)?;
            let Some(last) = list.last().map(EventFrame::cursor) else {
                break;
            };
            let mut size = 0;
            for f in &list {
                let (this, at) = match f {
                    EventFrame::Compact { event, .. } => (event.message().len(), true),
                    EventFrame::Message { event, .. } => (event.message.len(), false),
                    EventFrame::Json { .. } => continue,
                };
                let mut one = Vec::new();
                kith_proto::events::encode_frame(f, &mut one);
                size += one.len() - this;
                frames += 1;
                compact += usize::from(at);
            }
            overhead += size;
            after = last;
        }
    }
    drop(kithd);
    Ok(Fanout {
        receivers: members.len(),
        receivers_wanted: receivers,
        messages: posted,
        delivered: got,
        elapsed,
        server_cpu,
        wire_overhead: (frames > 0).then(|| overhead as f64 / frames as f64),
        wire_compact: compact,
        wire_frames: frames,
    })
}
