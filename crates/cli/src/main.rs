//! `kith`: the scriptable Kith command line and its terminal UI (`kith
//! tui`). Every command that prints data takes `--json`; errors go to
//! stderr with a non-zero exit code.

#![forbid(unsafe_code)]

mod chat;
mod tui;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kith_client::chat::is_chat;
use kith_client::{Client, default_home};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "kith",
    version,
    about = "Kith: federated, end-to-end-encrypted chat"
)]
struct Cli {
    /// The device's home directory (default: $KITH_HOME, then a per-user data directory).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this device and register it on a homeserver; prints the handle.
    Register {
        /// The homeserver's URL, e.g. http://127.0.0.1:8448.
        #[arg(long)]
        server: String,
        /// The local name to ask for.
        #[arg(long)]
        name: String,
        /// A registration token, if the server requires one.
        #[arg(long)]
        token: Option<String>,
    },
    /// Show this device's handle, device id and homeserver.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a one-off direct message to every device of a user (through their inboxes).
    Dm {
        /// The recipient, name@server.
        handle: String,
        /// The text.
        text: String,
    },
    /// Fetch and process the inbox and events once (joins channels, decrypts messages).
    Sync {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Try work kept for later (membership and leave requests, removals
        /// of removed devices, adds of linked devices) now, whatever its
        /// back-off (for when a server that was down is back).
        #[arg(long)]
        recheck: bool,
    },
    /// Channels: create, invite, remove, leave, list.
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// This user's devices: link a new one, list them.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Send a message to a channel: chat text in chat channels (mentions are
    /// `@name@server` words), else TEXT's bytes or the bytes of --file.
    Send {
        /// Channel id or name.
        channel: String,
        /// The text to send.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Send this file's bytes instead (channels that are not chat).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The text is Markdown (chat channels).
        #[arg(long)]
        markdown: bool,
        /// Post in the thread of this message (id or a unique prefix of 6+ hex digits).
        #[arg(long)]
        thread: Option<String>,
    },
    /// Reply to a message in a chat channel.
    Reply {
        /// Channel id or name.
        channel: String,
        /// The message replied to: its id or a unique prefix (6+ hex digits).
        msg_id: String,
        /// The text.
        text: String,
    },
    /// Edit one of your messages in a chat channel (the newest edit wins).
    Edit {
        /// Channel id or name.
        channel: String,
        /// The message to edit: its id or a unique prefix (6+ hex digits).
        msg_id: String,
        /// The new text.
        text: String,
    },
    /// Delete a message in a chat channel (yours, or anyone's if you are an admin).
    Delete {
        /// Channel id or name.
        channel: String,
        /// The message to delete: its id or a unique prefix (6+ hex digits).
        msg_id: String,
    },
    /// React to a message in a chat channel, or take a reaction back.
    React {
        /// Channel id or name.
        channel: String,
        /// The message: its id or a unique prefix (6+ hex digits).
        msg_id: String,
        /// The emoji (or short text).
        emoji: String,
        /// Take the reaction back.
        #[arg(long)]
        remove: bool,
    },
    /// Send an action (IRC's /me) to a chat channel.
    Me {
        /// Channel id or name.
        channel: String,
        /// What you do.
        text: String,
    },
    /// The full-screen terminal client.
    Tui,
    /// Sync, then print a channel's latest messages (chat channels: the
    /// folded timeline, edits, deletes and reactions applied).
    Read {
        /// Channel id or name.
        channel: String,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// How many messages (timeline items in chat channels).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Print a channel's messages as they arrive, until interrupted.
    Tail {
        /// Channel id or name.
        channel: String,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Let another device join this user: run `kith register NAME` on it
    /// (it prints its device id when the name is taken), then this with
    /// that id, then register it again. This device adds it to the
    /// channels it administers on its next sync.
    Link {
        /// The other device's id (64 hex digits).
        device: String,
    },
    /// Remove another device of this user (lost or stolen) from its name
    /// and from this device's channels: it can no longer log in, is no
    /// longer invited with the user, and the user's other devices and the
    /// channels' admins remove it from the rest on their next sync.
    Remove {
        /// The device's id (64 hex digits; `kith device list` shows them).
        device: String,
    },
    /// This device and its user's other devices; with `--user`, the
    /// devices another user's server lists for a handle.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// A handle (`name@server`) whose devices to list instead.
        #[arg(long, value_name = "HANDLE")]
        user: Option<String>,
    },
}

#[derive(Subcommand)]
enum ChannelCommand {
    /// Create a channel; prints its id.
    Create {
        /// The channel's name.
        name: String,
        /// The content type of its messages (default: Kith chat).
        #[arg(long = "type", default_value = kith_chat::CONTENT_TYPE)]
        content_type: String,
    },
    /// Add every device of a user to a channel.
    Invite {
        /// Channel id or name.
        channel: String,
        /// The user, name@server.
        handle: String,
    },
    /// Remove every device of a user from a channel.
    Remove {
        /// Channel id or name.
        channel: String,
        /// The user, name@server.
        handle: String,
    },
    /// Leave a channel: ask its admins to remove this device (spec §9.5).
    /// The channel is marked left at once; its history is kept.
    Leave {
        /// Channel id or name.
        channel: String,
    },
    /// List the channels this device knows.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KITH_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("kith: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = cli.home.unwrap_or_else(default_home);
    match cli.command {
        Command::Register {
            server,
            name,
            token,
        } => {
            let client = Client::register(&home, &server, &name, token.as_deref())
                .await
                .with_context(|| format!("registering {name} on {server}"))?;
            println!("{}", client.handle());
        }
        Command::Whoami { json } => {
            let client = Client::open(&home)?;
            if json {
                let out = json!({
                    "handle": client.handle(),
                    "device": client.device_id().to_string(),
                    "server": client.server_name(),
                    "server_url": client.server_url(),
                });
                println!("{out}");
            } else {
                println!("{}", client.handle());
                println!("device {}", client.device_id());
                println!("server {} ({})", client.server_name(), client.server_url());
            }
        }
        Command::Device { command } => device(&home, command).await?,
        Command::Dm { handle, text } => {
            let mut client = Client::open(&home)?;
            let n = client.send_direct(&handle, text.as_bytes()).await?;
            eprintln!("delivered to {n} device(s) of {handle}");
        }
        Command::Sync { json, recheck } => {
            let mut client = Client::open(&home)?;
            if recheck {
                client.recheck_kept_requests()?;
            }
            let report = client.sync().await?;
            for m in &report.direct {
                let text = String::from_utf8_lossy(&m.body);
                if json {
                    println!(
                        "{}",
                        json!({ "direct": { "sender": m.sender, "sent_at": m.sent_at, "text": text } })
                    );
                } else {
                    println!("<{}> (direct) {}", m.sender, text);
                }
            }
            let joined: Vec<String> = report.joined.iter().map(|c| c.to_string()).collect();
            let removed: Vec<Value> = report
                .removed_on_request
                .iter()
                .map(|(c, d)| json!({ "channel": c.to_string(), "device": d.to_string() }))
                .collect();
            let linked: Vec<Value> = report
                .linked_added
                .iter()
                .map(|(c, d)| json!({ "channel": c.to_string(), "device": d.to_string() }))
                .collect();
            let removed_devices: Vec<Value> = report
                .removed_devices
                .iter()
                .map(|(c, d)| json!({ "channel": c.to_string(), "device": d.to_string() }))
                .collect();
            let removal_requested: Vec<Value> = report
                .removal_requested
                .iter()
                .map(|(c, d)| json!({ "channel": c.to_string(), "device": d.to_string() }))
                .collect();
            let kept: Vec<Value> = report
                .kept
                .iter()
                .map(|k| {
                    json!({ "kind": k.work.kind(), "channel": k.work.channel().map(|c| c.to_string()),
                            "device": k.work.device().to_string(), "retry_at": k.retry_at,
                            "reason": k.reason })
                })
                .collect();
            if json {
                println!(
                    "{}",
                    json!({ "joined": joined, "messages": report.messages, "commits": report.commits,
                            "removed_on_request": removed, "linked_added": linked,
                            "removed_devices": removed_devices,
                            "removal_requested": removal_requested, "kept": kept })
                );
            } else {
                for c in &joined {
                    println!("joined channel {c}");
                }
                for (c, d) in &report.removed_on_request {
                    println!("removed device {d} from channel {c}: it asked to leave");
                }
                for (c, d) in &report.linked_added {
                    println!("added this user's device {d} to channel {c}");
                }
                for (c, d) in &report.removed_devices {
                    println!("removed device {d} from channel {c}: its user removed it");
                }
                for (c, d) in &report.removal_requested {
                    println!(
                        "asked the admins of channel {c} to remove this user's removed device {d}"
                    );
                }
                for k in &report.kept {
                    let channel = k
                        .work
                        .channel()
                        .map_or("every channel".to_owned(), |c| format!("channel {c}"));
                    eprintln!(
                        "kept a {} ({channel}, device {}) for a later sync: {}",
                        k.work.name(),
                        k.work.device(),
                        k.reason
                    );
                }
                eprintln!(
                    "{} new message(s), {} commit(s)",
                    report.messages, report.commits
                );
            }
        }
        Command::Channel { command } => channel(&home, command).await?,
        Command::Send {
            channel,
            text,
            file,
            markdown,
            thread,
        } => {
            let mut client = Client::open(&home)?;
            let row = client.resolve_channel(&channel)?;
            if is_chat(&row) {
                let Some(text) = text else {
                    anyhow::bail!(
                        "{} is a chat channel: attachments need the file repository, which is not built yet",
                        row.name
                    );
                };
                let thread = match thread {
                    Some(prefix) => Some(client.resolve_message(row.id, &prefix)?),
                    None => None,
                };
                let message = chat::text(&text, markdown, None, thread)?;
                let id = client.send_chat(row.id, &message).await?;
                eprintln!("sent {id}");
                return Ok(());
            }
            let body = match (text, file) {
                (Some(text), _) => text.into_bytes(),
                (None, Some(path)) => {
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, None) => anyhow::bail!("give TEXT or --file PATH"),
            };
            let id = client.send(row.id, &body).await?;
            eprintln!("sent {id}");
        }
        Command::Reply {
            channel,
            msg_id,
            text,
        } => {
            chat_command(&home, &channel, Some(&msg_id), |target| {
                chat::text(&text, false, target, None)
            })
            .await?;
        }
        Command::Edit {
            channel,
            msg_id,
            text,
        } => {
            chat_command(&home, &channel, Some(&msg_id), |target| {
                chat::edit(target.context("no target")?, &text)
            })
            .await?;
        }
        Command::Delete { channel, msg_id } => {
            chat_command(&home, &channel, Some(&msg_id), |target| {
                Ok(chat::delete(target.context("no target")?))
            })
            .await?;
        }
        Command::React {
            channel,
            msg_id,
            emoji,
            remove,
        } => {
            chat_command(&home, &channel, Some(&msg_id), |target| {
                chat::react(target.context("no target")?, &emoji, remove)
            })
            .await?;
        }
        Command::Me { channel, text } => {
            chat_command(&home, &channel, None, |_| chat::emote(&text)).await?;
        }
        Command::Tui => {
            let client = Client::open(&home)?;
            tui::run(client).await?;
        }
        Command::Read {
            channel,
            json,
            limit,
        } => {
            let mut client = Client::open(&home)?;
            client.sync().await?;
            let row = client.resolve_channel(&channel)?;
            if is_chat(&row) {
                let timeline = client.timeline(row.id)?;
                let skip = timeline.items.len().saturating_sub(limit);
                for item in timeline.items.iter().skip(skip) {
                    print_item(item, json);
                }
            } else {
                for m in client.messages(row.id, limit)? {
                    print_message(&m, json);
                }
            }
        }
        Command::Tail { channel, json } => {
            let mut client = Client::open(&home)?;
            let row = client.resolve_channel(&channel)?;
            let chat = is_chat(&row);
            // Chat channels print timeline items (edits, deletes and
            // reactions to items already printed show in `read`).
            let ids = |client: &Client| -> anyhow::Result<Vec<String>> {
                Ok(if chat {
                    client
                        .timeline(row.id)?
                        .items
                        .iter()
                        .map(|i| i.id.to_string())
                        .collect()
                } else {
                    client
                        .messages(row.id, 1000)?
                        .into_iter()
                        .map(|m| m.id)
                        .collect()
                })
            };
            let mut seen: std::collections::HashSet<String> = ids(&client)?.into_iter().collect();
            loop {
                match client.sync().await {
                    Ok(_) if chat => {
                        for item in client.timeline(row.id)?.items {
                            if seen.insert(item.id.to_string()) {
                                print_item(&item, json);
                            }
                        }
                    }
                    Ok(_) => {
                        for m in client.messages(row.id, 1000)? {
                            if seen.insert(m.id.clone()) {
                                print_message(&m, json);
                            }
                        }
                    }
                    // The homeserver may be restarting: keep trying.
                    Err(e) => eprintln!("kith: {e}"),
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                }
            }
        }
    }
    Ok(())
}

/// Syncs, resolves the channel (which must be a chat channel) and the
/// message named by `msg_id`, then sends what `make` builds.
async fn chat_command(
    home: &std::path::Path,
    channel: &str,
    msg_id: Option<&str>,
    make: impl FnOnce(Option<kith_chat::MessageRef>) -> anyhow::Result<kith_chat::ChatMessage>,
) -> anyhow::Result<()> {
    let mut client = Client::open(home)?;
    client.sync().await?;
    let row = client.resolve_channel(channel)?;
    if !is_chat(&row) {
        anyhow::bail!(
            "{} carries {}, not chat messages (`kith channel create` makes chat channels)",
            row.name,
            row.content_type
        );
    }
    let target = match msg_id {
        Some(prefix) => Some(client.resolve_message(row.id, prefix)?),
        None => None,
    };
    let id = client.send_chat(row.id, &make(target)?).await?;
    eprintln!("sent {id}");
    Ok(())
}

async fn device(home: &std::path::Path, command: DeviceCommand) -> anyhow::Result<()> {
    let mut client = Client::open(home)?;
    match command {
        DeviceCommand::Link { device } => {
            let id: kith_proto::DeviceId = device
                .parse()
                .map_err(|e| anyhow::anyhow!("device id {device:?}: {e}"))?;
            if client.link_device(id).await? {
                eprintln!(
                    "linked {id}; now register it again: kith register --server {} --name {}\n\
                     this device adds it to the channels it administers on its next sync",
                    client.server_url(),
                    client.handle().split('@').next().unwrap_or_default(),
                );
            } else {
                eprintln!("{id} was already linked");
            }
        }
        DeviceCommand::Remove { device } => {
            let id: kith_proto::DeviceId = device
                .parse()
                .map_err(|e| anyhow::anyhow!("device id {device:?}: {e}"))?;
            let removal = client.remove_device(id).await?;
            eprintln!("{}", crate::chat::removal_notice(&id, &removal));
            for c in &removal.removed_from {
                println!("removed it from channel {c}");
            }
            for c in &removal.requested {
                println!("asked the admins of channel {c} to remove it");
            }
        }
        DeviceCommand::List {
            json,
            user: Some(handle),
        } => {
            let records = client.user_devices(&handle).await?;
            for r in &records {
                let name = r.display_name().to_owned();
                print_device(json, r.device_id(), Some(&name), "listed", "");
            }
        }
        DeviceCommand::List { json, user: None } => {
            let me = client.device_id();
            let linked = client.linked_devices().await?;
            let linked_ids: Vec<kith_proto::DeviceId> =
                linked.iter().map(|r| r.device_id()).collect();
            let pending: Vec<kith_proto::DeviceId> = client
                .record()?
                .links()
                .filter(|d| !linked_ids.contains(d))
                .collect();
            // Every device the directory lists under this user's handle
            // shares its power (§5.7), also one linked only by another of
            // its devices (say, by a stolen phone): show those too, so the
            // user can remove what they do not recognise.
            let handle = client.handle().to_owned();
            let unlinked: Vec<kith_proto::DeviceRecord> = client
                .user_devices(&handle)
                .await?
                .into_iter()
                .filter(|r| r.device_id() != me && !linked_ids.contains(&r.device_id()))
                .collect();
            let name = client.record()?.display_name().to_owned();
            print_device(json, me, Some(&name), "this", " (this device)");
            for r in &linked {
                let name = r.display_name().to_owned();
                print_device(json, r.device_id(), Some(&name), "linked", "");
            }
            for d in pending {
                print_device(
                    json,
                    d,
                    None,
                    "pending",
                    " (linked from here, not registered or not linking back yet)",
                );
            }
            for r in &unlinked {
                let name = r.display_name().to_owned();
                let note = format!(
                    " (registered as {handle} but not linked from this device: \
                     if you do not know it, `kith device remove` it)"
                );
                print_device(json, r.device_id(), Some(&name), "unlinked", &note);
            }
        }
    }
    Ok(())
}

/// One line of `kith device list`. With `--json`, both forms (this user's
/// devices, or `--user`'s) print one object per device: `device` (hex),
/// `name` (its record's display name; null for a device linked from here
/// that has no record yet) and `state` (`this`, `linked`, `pending`,
/// `unlinked`, or `listed` for `--user`).
fn print_device(
    json: bool,
    device: kith_proto::DeviceId,
    name: Option<&str>,
    state: &str,
    note: &str,
) {
    if json {
        println!(
            "{}",
            json!({ "device": device.to_string(), "name": name, "state": state })
        );
    } else {
        match name {
            Some(name) if !name.is_empty() => println!("{device}  {name}{note}"),
            _ => println!("{device}{note}"),
        }
    }
}

async fn channel(home: &std::path::Path, command: ChannelCommand) -> anyhow::Result<()> {
    let mut client = Client::open(home)?;
    match command {
        ChannelCommand::Create { name, content_type } => {
            let id = client.create_channel(&name, &content_type).await?;
            println!("{id}");
        }
        ChannelCommand::Invite { channel, handle } => {
            client.sync().await?;
            let row = client.resolve_channel(&channel)?;
            let n = client.invite(row.id, &handle).await?;
            eprintln!("added {n} device(s) of {handle}");
        }
        ChannelCommand::Remove { channel, handle } => {
            client.sync().await?;
            let row = client.resolve_channel(&channel)?;
            let n = client.remove(row.id, &handle).await?;
            eprintln!("removed {n} device(s) of {handle}");
        }
        ChannelCommand::Leave { channel } => {
            let row = client.resolve_channel(&channel)?;
            let outcome = client.leave(row.id).await?;
            eprintln!("{}", chat::leave_notice(&row.name, &outcome));
        }
        ChannelCommand::List { json } => {
            for c in client.channels()? {
                let (epoch, members) = match client.channel_state(c.id) {
                    Ok((epoch, _)) => (
                        Some(epoch),
                        client.members(c.id).map(|m| m.len()).unwrap_or(0),
                    ),
                    Err(_) => (None, 0),
                };
                if json {
                    println!(
                        "{}",
                        json!({ "id": c.id.to_string(), "name": c.name, "content_type": c.content_type,
                                "active": c.active, "epoch": epoch, "members": members })
                    );
                } else {
                    let state = if c.active { "" } else { " (left)" };
                    println!(
                        "{}  {}  {}  {} member(s){}",
                        c.id, c.name, c.content_type, members, state
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_item(item: &kith_chat::Item<String>, json: bool) {
    if json {
        println!("{}", chat::item_json(item));
    } else {
        println!("{}", chat::item_line(item));
    }
}

fn print_message(m: &kith_client::MessageRow, json: bool) {
    let text = String::from_utf8_lossy(&m.body);
    if json {
        println!(
            "{}",
            json!({ "id": m.id, "seq": m.seq, "sender": m.sender, "sender_device": m.sender_device.to_string(),
                    "time": m.received_at, "epoch": m.epoch, "text": text })
        );
    } else {
        println!("<{}> {}", m.sender, text);
    }
}
