//! `kith tui`: the full-screen terminal client. [`app`] holds the state and
//! its pure update function, [`ui`] draws it, and this module is the thin
//! loop between them and the terminal, the clock and the SDK: it syncs
//! every second (showing failures in the status line and retrying, so a
//! homeserver restart is ridden out), feeds keys in, and carries out the
//! actions that come back.

pub(crate) mod app;
pub(crate) mod ui;

#[cfg(test)]
mod tests;

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use crossterm::event::{self as term_event, Event as TermEvent, KeyEventKind};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use kith_chat::{Body, Item, MessageRef, RichText, Timeline};
use kith_client::chat::is_chat;
use kith_client::{Client, now_ms};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use tokio::sync::mpsc;

use app::{Action, App, ChannelSnapshot, Event};

/// How often the loop syncs with the homeserver.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// How long one sync may take before it counts as failed.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the terminal client until the user quits.
pub(crate) async fn run(mut client: Client) -> anyhow::Result<()> {
    enable_raw_mode().context("the terminal cannot enter raw mode (is this a terminal?)")?;
    let mut stdout = std::io::stdout();
    if let Err(e) = execute!(stdout, EnterAlternateScreen) {
        let _ = disable_raw_mode();
        return Err(e.into());
    }
    let result = match Terminal::new(CrosstermBackend::new(std::io::stdout())) {
        Ok(mut terminal) => {
            let r = event_loop(&mut terminal, &mut client).await;
            let _ = terminal.show_cursor();
            r
        }
        Err(e) => Err(e.into()),
    };
    let _ = disable_raw_mode();
    let _ = execute!(std::io::stdout(), LeaveAlternateScreen);
    result
}

/// Reads keys on a thread of its own (crossterm's reader blocks) until the
/// loop hangs up.
fn spawn_key_reader() -> mpsc::Receiver<crossterm::event::KeyEvent> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        while !tx.is_closed() {
            match term_event::poll(Duration::from_millis(100)) {
                Ok(true) => match term_event::read() {
                    Ok(TermEvent::Key(key)) if key.kind != KeyEventKind::Release => {
                        if tx.blocking_send(key).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                Ok(false) => {}
                Err(_) => return,
            }
        }
    });
    rx
}

async fn event_loop<B: ratatui::backend::Backend>(
    terminal: &mut Terminal<B>,
    client: &mut Client,
) -> anyhow::Result<()> {
    let mut app = App::new(client.handle());
    app.now = now_ms();
    // The local store first, so scrollback shows before the network answers.
    let actions = app.update(Event::Refreshed(snapshots(client)));
    perform(&mut app, client, actions).await;
    let mut keys = spawn_key_reader();
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !app.quit {
        terminal.draw(|frame| ui::render(frame, &app))?;
        let actions = tokio::select! {
            key = keys.recv() => match key {
                Some(key) => app.update(Event::Key(key)),
                None => break,
            },
            _ = tick.tick() => sync(&mut app, client).await,
        };
        perform(&mut app, client, actions).await;
    }
    Ok(())
}

/// One sync: events in, typing reported, channels refreshed; a failure
/// goes to the status line and the next tick retries.
async fn sync(app: &mut App, client: &mut Client) -> Vec<Action> {
    let mut actions = app.update(Event::Tick(now_ms()));
    match tokio::time::timeout(SYNC_TIMEOUT, client.sync()).await {
        Ok(Ok(report)) => {
            for t in report.typing {
                app.update(Event::Typing {
                    channel: t.channel,
                    who: t.sender,
                    active: t.active,
                    at: now_ms(),
                });
            }
            actions.extend(app.update(Event::Synced(snapshots(client))));
        }
        Ok(Err(e)) => {
            actions.extend(app.update(Event::SyncFailed(e.to_string())));
        }
        Err(_) => {
            actions.extend(app.update(Event::SyncFailed("timed out".into())));
        }
    }
    actions
}

/// Carries out actions (and what they lead to), each bounded by the
/// number of actions an update can return.
async fn perform(app: &mut App, client: &mut Client, actions: Vec<Action>) {
    let mut queue = std::collections::VecDeque::from(actions);
    let mut budget = 64;
    while let Some(action) = queue.pop_front() {
        budget -= 1;
        if budget == 0 {
            break;
        }
        let refresh = !matches!(action, Action::Bell | Action::Quit);
        let result = match action {
            Action::Quit => {
                app.quit = true;
                Ok(String::new())
            }
            Action::Bell => {
                let mut out = std::io::stdout();
                let _ = out.write_all(b"\x07").and_then(|()| out.flush());
                continue;
            }
            Action::Send { channel, message } => {
                let quiet = matches!(
                    message,
                    kith_chat::ChatMessage::Typing(_) | kith_chat::ChatMessage::ReadMarker(_)
                );
                match client.send_chat(channel, &message).await {
                    Ok(_) if quiet => continue,
                    Ok(_) => Ok(String::new()),
                    Err(e) => Err(e.to_string()),
                }
            }
            Action::SendRaw { channel, bytes } => client
                .send(channel, &bytes)
                .await
                .map(|_| String::new())
                .map_err(|e| e.to_string()),
            Action::Create { name } => client
                .create_channel(&name, kith_chat::CONTENT_TYPE)
                .await
                .map(|id| format!("created #{name} ({id})"))
                .map_err(|e| e.to_string()),
            Action::Invite { channel, handle } => client
                .invite(channel, &handle)
                .await
                .map(|n| format!("added {n} device(s) of {handle}"))
                .map_err(|e| e.to_string()),
            Action::Remove { channel, handle } => client
                .remove(channel, &handle)
                .await
                .map(|n| format!("removed {n} device(s) of {handle}"))
                .map_err(|e| e.to_string()),
            Action::RemoveDevice { device } => client
                .remove_device(device)
                .await
                .map(|removal| crate::chat::removal_notice(&device, &removal))
                .map_err(|e| e.to_string()),
            Action::Leave { channel } => {
                let name = client
                    .resolve_channel(&channel.to_string())
                    .map(|row| row.name)
                    .unwrap_or_else(|_| channel.to_string());
                client
                    .leave(channel)
                    .await
                    .map(|outcome| crate::chat::leave_notice(&name, &outcome))
                    .map_err(|e| e.to_string())
            }
        };
        queue.extend(app.update(Event::Done(result)));
        if refresh {
            queue.extend(app.update(Event::Refreshed(snapshots(client))));
        }
    }
}

/// The channels as the local store holds them now.
pub(crate) fn snapshots(client: &Client) -> Vec<ChannelSnapshot> {
    let Ok(rows) = client.channels() else {
        return vec![];
    };
    rows.into_iter()
        .map(|row| {
            let chat = is_chat(&row);
            let timeline = if chat {
                client.timeline(row.id).unwrap_or_else(|_| empty())
            } else {
                raw_timeline(client, row.id)
            };
            ChannelSnapshot {
                id: row.id,
                members: client.member_handles(row.id).unwrap_or_default(),
                name: row.name,
                content_type: row.content_type,
                chat,
                active: row.active,
                timeline,
            }
        })
        .collect()
}

fn empty() -> Timeline<String> {
    Timeline {
        items: vec![],
        read_markers: Default::default(),
        pending: vec![],
    }
}

/// A channel that is not chat, shown as one plain item per message.
fn raw_timeline(client: &Client, id: kith_proto::ChannelId) -> Timeline<String> {
    let rows = client.messages(id, 1000).unwrap_or_default();
    let items = rows
        .into_iter()
        .filter_map(|m| {
            let text: String = String::from_utf8_lossy(&m.body)
                .chars()
                .take(2000)
                .collect();
            Some(Item {
                id: m.id.parse::<MessageRef>().ok()?,
                sender: m.sender,
                device: m.sender_device,
                time: m.received_at,
                body: Body::Text(RichText::plain(text).ok()?),
                edits: 0,
                edited_at: None,
                reply_to: None,
                thread: None,
                reactions: vec![],
            })
        })
        .collect();
    Timeline { items, ..empty() }
}
