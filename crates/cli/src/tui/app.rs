//! The terminal client's state and its update function: no I/O. The loop in
//! `super` feeds [`Event`]s in and carries out the [`Action`]s that come
//! back; `super::ui::render` draws an [`App`].

use std::collections::{BTreeMap, BTreeSet};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kith_chat::{Body, ChatMessage, Item, MessageRef, Timeline};
use kith_proto::{ChannelId, DeviceId};

use crate::chat;

/// How long a typing notification shows without a refresh (ms).
pub(crate) const TYPING_LAPSE_MS: u64 = 30_000;
/// How often "I am typing" is sent at most while typing (ms).
pub(crate) const TYPING_RESEND_MS: u64 = 10_000;

/// What the loop knows about one channel after a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChannelSnapshot {
    /// The channel.
    pub id: ChannelId,
    /// Its name.
    pub name: String,
    /// Its content type.
    pub content_type: String,
    /// Whether it carries chat messages.
    pub chat: bool,
    /// Whether this device is still a member.
    pub active: bool,
    /// Who can read it: the handles of its members.
    pub members: Vec<String>,
    /// The folded timeline (raw channels: one plain item per message).
    pub timeline: Timeline<String>,
}

/// One channel as shown.
#[derive(Debug, Clone)]
pub(crate) struct ChannelView {
    /// The latest snapshot.
    pub snap: ChannelSnapshot,
    /// Messages by others after this user's read marker.
    pub unread: usize,
    /// Of those, how many mention this user.
    pub mentions: usize,
    seen: BTreeSet<MessageRef>,
}

/// Whether the homeserver answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Connection {
    /// No sync has finished yet.
    Connecting,
    /// The last sync worked.
    Connected,
    /// The last sync failed; the loop retries.
    Failed(String),
}

/// What happens to the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A key was pressed.
    Key(KeyEvent),
    /// A sync (or a local refresh) finished: the channels as stored now.
    Synced(Vec<ChannelSnapshot>),
    /// The local store changed (a message sent, a channel made): the
    /// channels as stored now; says nothing about the homeserver.
    Refreshed(Vec<ChannelSnapshot>),
    /// A sync failed (the homeserver may be restarting).
    SyncFailed(String),
    /// Someone typed, or stopped, at `at` (ms).
    Typing {
        /// The channel.
        channel: ChannelId,
        /// Who.
        who: String,
        /// Started or stopped.
        active: bool,
        /// When.
        at: u64,
    },
    /// The clock moved on (ms).
    Tick(u64),
    /// An action finished: what to tell the user.
    Done(Result<String, String>),
}

/// What the loop must do.
// A few actions live for one loop turn; boxing the message would only make
// matching on them clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send a chat message to a chat channel.
    Send {
        /// The channel.
        channel: ChannelId,
        /// The message.
        message: ChatMessage,
    },
    /// Send bytes to a channel that is not chat.
    SendRaw {
        /// The channel.
        channel: ChannelId,
        /// The payload.
        bytes: Vec<u8>,
    },
    /// Create a chat channel.
    Create {
        /// Its name.
        name: String,
    },
    /// Add every device of a user.
    Invite {
        /// The channel.
        channel: ChannelId,
        /// The user.
        handle: String,
    },
    /// Remove every device of a user.
    Remove {
        /// The channel.
        channel: ChannelId,
        /// The user.
        handle: String,
    },
    /// Remove another device of this user (lost or stolen) from the user
    /// and from this device's channels, as `kith device remove` does.
    RemoveDevice {
        /// The device.
        device: DeviceId,
    },
    /// Leave a channel: send a leave request and mark it left.
    Leave {
        /// The channel.
        channel: ChannelId,
    },
    /// Ring the terminal bell.
    Bell,
    /// Leave the program.
    Quit,
}

/// The whole state of the terminal client.
#[derive(Debug, Clone)]
pub(crate) struct App {
    /// This user's handle.
    pub me: String,
    /// Channels, in the order the store lists them (by name).
    pub channels: Vec<ChannelView>,
    /// The index of the channel shown.
    pub selected: usize,
    /// The input line.
    pub input: String,
    /// The homeserver's state.
    pub connection: Connection,
    /// The last notice for the user (command results, errors).
    pub notice: Option<String>,
    /// Who is typing where, until when (ms).
    pub typing: BTreeMap<ChannelId, BTreeMap<String, u64>>,
    /// Lines scrolled back from the bottom of the timeline.
    pub scroll: usize,
    /// The clock (ms), from the last event that carried it.
    pub now: u64,
    /// Set once the user quits.
    pub quit: bool,
    typing_sent: Option<(ChannelId, u64)>,
    marked: BTreeMap<ChannelId, MessageRef>,
}

/// The help shown by `/help`.
pub(crate) const HELP: &str = "/create NAME · /invite HANDLE · /remove HANDLE · /me TEXT · /reply ID TEXT · \
/edit ID TEXT · /delete ID · /react ID EMOJI · /leave · /device remove ID · /quit · Tab completes nicks · \
Ctrl-N/Ctrl-P switch channel · PgUp/PgDn scroll";

impl App {
    /// A fresh app for the user `me`.
    pub(crate) fn new(me: impl Into<String>) -> Self {
        Self {
            me: me.into(),
            channels: Vec::new(),
            selected: 0,
            input: String::new(),
            connection: Connection::Connecting,
            notice: None,
            typing: BTreeMap::new(),
            scroll: 0,
            now: 0,
            quit: false,
            typing_sent: None,
            marked: BTreeMap::new(),
        }
    }

    /// The channel shown, if any.
    pub(crate) fn current(&self) -> Option<&ChannelView> {
        self.channels.get(self.selected)
    }

    /// Who is typing in `channel` now, sorted.
    pub(crate) fn typing_in(&self, channel: ChannelId) -> Vec<&str> {
        self.typing
            .get(&channel)
            .map(|m| {
                m.iter()
                    .filter(|(_, until)| **until > self.now)
                    .map(|(who, _)| who.as_str())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Applies one event; returns what the loop must do.
    pub(crate) fn update(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Key(key) => self.key(key),
            Event::Synced(snapshots) => {
                self.connection = Connection::Connected;
                self.apply(snapshots)
            }
            Event::Refreshed(snapshots) => self.apply(snapshots),
            Event::SyncFailed(error) => {
                self.connection = Connection::Failed(error);
                vec![]
            }
            Event::Typing {
                channel,
                who,
                active,
                at,
            } => {
                self.now = self.now.max(at);
                let who_typing = self.typing.entry(channel).or_default();
                if active && who != self.me {
                    who_typing.insert(who, at.saturating_add(TYPING_LAPSE_MS));
                } else {
                    who_typing.remove(&who);
                }
                vec![]
            }
            Event::Tick(now) => {
                self.now = now;
                for who in self.typing.values_mut() {
                    who.retain(|_, until| *until > now);
                }
                vec![]
            }
            Event::Done(Ok(text)) => {
                self.notice = (!text.is_empty()).then_some(text);
                vec![]
            }
            Event::Done(Err(e)) => {
                self.notice = Some(format!("error: {e}"));
                vec![]
            }
        }
    }

    fn apply(&mut self, snapshots: Vec<ChannelSnapshot>) -> Vec<Action> {
        let shown = self.current().map(|c| c.snap.id);
        let mut old: BTreeMap<ChannelId, ChannelView> =
            self.channels.drain(..).map(|c| (c.snap.id, c)).collect();
        let mut actions = Vec::new();
        for snap in snapshots {
            let previous = old.remove(&snap.id);
            let first = previous.is_none();
            let mut seen = previous.map(|p| p.seen).unwrap_or_default();
            for item in &snap.timeline.items {
                if !seen.insert(item.id) || first {
                    continue;
                }
                // A message ends its sender's typing.
                if let Some(typing) = self.typing.get_mut(&snap.id) {
                    typing.remove(&item.sender);
                }
                if item.sender != self.me && mentions_me(item, &self.me) {
                    actions.push(Action::Bell);
                }
            }
            self.channels.push(ChannelView {
                snap,
                unread: 0,
                mentions: 0,
                seen,
            });
        }
        actions.dedup();
        self.selected = shown
            .and_then(|id| self.channels.iter().position(|c| c.snap.id == id))
            .unwrap_or(0);
        self.count_unread();
        actions.extend(self.mark_read());
        actions
    }

    fn count_unread(&mut self) {
        let me = self.me.clone();
        for c in &mut self.channels {
            if !c.snap.active {
                // Left: it can no longer be marked read, so nothing counts.
                (c.unread, c.mentions) = (0, 0);
                continue;
            }
            let items = &c.snap.timeline.items;
            let start = c
                .snap
                .timeline
                .read_markers
                .get(&me)
                .and_then(|m| items.iter().position(|i| i.id == *m))
                .map(|p| p + 1)
                .unwrap_or(0);
            let unread: Vec<&Item<String>> = items
                .iter()
                .skip(start)
                .filter(|i| i.sender != me && !matches!(i.body, Body::Deleted { .. }))
                .collect();
            c.unread = unread.len();
            c.mentions = unread.iter().filter(|i| mentions_me(i, &me)).count();
        }
    }

    /// Marks the shown chat channel read up to its last item when something
    /// by others is unread.
    fn mark_read(&mut self) -> Vec<Action> {
        let Some(c) = self.channels.get_mut(self.selected) else {
            return vec![];
        };
        if !c.snap.chat || !c.snap.active || c.unread == 0 {
            return vec![];
        }
        let Some(last) = c.snap.timeline.items.last().map(|i| i.id) else {
            return vec![];
        };
        c.unread = 0;
        c.mentions = 0;
        if self.marked.get(&c.snap.id) == Some(&last) {
            return vec![];
        }
        self.marked.insert(c.snap.id, last);
        vec![Action::Send {
            channel: c.snap.id,
            message: ChatMessage::ReadMarker(kith_chat::ReadMarker { up_to: last }),
        }]
    }

    fn select(&mut self, index: usize) -> Vec<Action> {
        if self.channels.is_empty() {
            return vec![];
        }
        self.selected = index % self.channels.len();
        self.scroll = 0;
        self.mark_read()
    }

    fn key(&mut self, key: KeyEvent) -> Vec<Action> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        let n = self.channels.len().max(1);
        match key.code {
            KeyCode::Char('c') if ctrl => {
                self.quit = true;
                vec![Action::Quit]
            }
            KeyCode::Char('n') if ctrl => self.select(self.selected + 1),
            KeyCode::Char('p') if ctrl => self.select(self.selected + n - 1),
            KeyCode::Down if alt => self.select(self.selected + 1),
            KeyCode::Up if alt => self.select(self.selected + n - 1),
            KeyCode::PageUp => {
                self.scroll = self.scroll.saturating_add(10);
                vec![]
            }
            KeyCode::PageDown => {
                self.scroll = self.scroll.saturating_sub(10);
                vec![]
            }
            KeyCode::Esc => {
                self.input.clear();
                self.notice = None;
                vec![]
            }
            KeyCode::Backspace => {
                self.input.pop();
                vec![]
            }
            KeyCode::Tab => {
                self.complete();
                vec![]
            }
            KeyCode::Enter => {
                let line = std::mem::take(&mut self.input);
                self.scroll = 0;
                let actions = self.submit(line.trim_end());
                self.typing_sent = None;
                actions
            }
            KeyCode::Char(c) if !ctrl => {
                self.input.push(c);
                self.typing_started()
            }
            _ => vec![],
        }
    }

    /// Sends "typing" when a message (not a command) is being typed, at
    /// most once per [`TYPING_RESEND_MS`].
    fn typing_started(&mut self) -> Vec<Action> {
        let Some(c) = self.current() else {
            return vec![];
        };
        if !c.snap.chat || !c.snap.active || self.input.starts_with('/') {
            return vec![];
        }
        let channel = c.snap.id;
        if let Some((ch, at)) = self.typing_sent
            && ch == channel
            && self.now < at.saturating_add(TYPING_RESEND_MS)
        {
            return vec![];
        }
        self.typing_sent = Some((channel, self.now));
        vec![Action::Send {
            channel,
            message: ChatMessage::Typing(kith_chat::Typing { active: true }),
        }]
    }

    /// Completes the nick being typed (the last word, `@` optional) from
    /// the channel's members.
    fn complete(&mut self) {
        let Some(c) = self.current() else { return };
        let start = self.input.rfind(' ').map(|i| i + 1).unwrap_or(0);
        let word = self.input.get(start..).unwrap_or_default().to_owned();
        let at = word.starts_with('@');
        let stem = word.trim_start_matches('@').to_lowercase();
        if stem.is_empty() {
            return;
        }
        let matches: Vec<&String> = c
            .snap
            .members
            .iter()
            .filter(|h| **h != self.me && h.to_lowercase().starts_with(&stem))
            .collect();
        match matches.as_slice() {
            [] => self.notice = Some(format!("no member starts with {stem}")),
            [one] => {
                let one = (*one).clone();
                self.input.truncate(start);
                if at {
                    self.input.push('@');
                }
                self.input.push_str(&one);
                self.input
                    .push_str(if start == 0 && !at { ": " } else { " " });
            }
            many => {
                let names: Vec<&str> = many.iter().map(|h| h.as_str()).collect();
                self.notice = Some(format!("matches: {}", names.join(", ")));
            }
        }
    }

    fn submit(&mut self, line: &str) -> Vec<Action> {
        if line.is_empty() {
            return vec![];
        }
        let Some(command) = line.strip_prefix('/').filter(|c| !c.starts_with('/')) else {
            let text = line.strip_prefix('/').unwrap_or(line);
            return self.say(text);
        };
        let (name, rest) = command.split_once(' ').unwrap_or((command, ""));
        let rest = rest.trim();
        match name {
            "quit" | "exit" => {
                self.quit = true;
                vec![Action::Quit]
            }
            "help" => self.tell(HELP),
            "leave" | "part" => {
                let Some(c) = self.current() else {
                    return self.tell("no channel to leave");
                };
                if !c.snap.active {
                    let text = format!("you are no longer a member of #{}", c.snap.name);
                    return self.tell(&text);
                }
                vec![Action::Leave { channel: c.snap.id }]
            }
            "create" if !rest.is_empty() => vec![Action::Create {
                name: rest.to_owned(),
            }],
            "invite" | "remove" if !rest.is_empty() => {
                let Some(channel) = self.current().map(|c| c.snap.id) else {
                    return self.tell("no channel: /create one first");
                };
                let handle = rest.to_owned();
                if name == "invite" {
                    vec![Action::Invite { channel, handle }]
                } else {
                    vec![Action::Remove { channel, handle }]
                }
            }
            "device" => {
                let usage = "usage: /device remove DEVICE_ID (64 hex digits, `kith device list` shows them)";
                let Some(("remove", id)) = rest.split_once(' ') else {
                    return self.tell(usage);
                };
                match id.trim().parse::<DeviceId>() {
                    Ok(device) => vec![Action::RemoveDevice { device }],
                    Err(_) => self.tell(usage),
                }
            }
            "me" if !rest.is_empty() => self.chat(|_| chat::emote(rest)),
            "reply" | "edit" => {
                let Some((id, text)) = rest.split_once(' ') else {
                    return self.tell(&format!("usage: /{name} ID TEXT"));
                };
                let target = match self.find(id) {
                    Ok(t) => t,
                    Err(e) => return self.tell(&e),
                };
                if name == "reply" {
                    self.chat(|_| chat::text(text.trim(), false, Some(target), None))
                } else {
                    self.chat(|_| chat::edit(target, text.trim()))
                }
            }
            "delete" if !rest.is_empty() => match self.find(rest) {
                Ok(target) => self.chat(|_| Ok(chat::delete(target))),
                Err(e) => self.tell(&e),
            },
            "react" => {
                let Some((id, key)) = rest.split_once(' ') else {
                    return self.tell("usage: /react ID EMOJI (again to take it back)");
                };
                let key = key.trim();
                let target = match self.find(id) {
                    Ok(t) => t,
                    Err(e) => return self.tell(&e),
                };
                let mine = self.current().is_some_and(|c| {
                    c.snap.timeline.items.iter().any(|i| {
                        i.id == target
                            && i.reactions
                                .iter()
                                .any(|g| g.key.as_str() == key && g.users.contains(&self.me))
                    })
                });
                self.chat(|_| chat::react(target, key, mine))
            }
            _ => self.tell(&format!(
                "unknown command or missing argument: /{name} (see /help)"
            )),
        }
    }

    fn tell(&mut self, text: &str) -> Vec<Action> {
        self.notice = Some(text.to_owned());
        vec![]
    }

    fn say(&mut self, text: &str) -> Vec<Action> {
        let Some(c) = self.current() else {
            return self.tell("no channel: /create one first");
        };
        if !c.snap.active {
            let text = format!("you are no longer a member of #{}", c.snap.name);
            return self.tell(&text);
        }
        if c.snap.chat {
            self.chat(|_| chat::text(text, false, None, None))
        } else {
            vec![Action::SendRaw {
                channel: c.snap.id,
                bytes: text.as_bytes().to_vec(),
            }]
        }
    }

    fn chat(&mut self, make: impl FnOnce(()) -> anyhow::Result<ChatMessage>) -> Vec<Action> {
        let Some(c) = self.current() else {
            return self.tell("no channel: /create one first");
        };
        if !c.snap.chat {
            let text = format!("#{} is not a chat channel", c.snap.name);
            return self.tell(&text);
        }
        if !c.snap.active {
            let text = format!("you are no longer a member of #{}", c.snap.name);
            return self.tell(&text);
        }
        let channel = c.snap.id;
        match make(()) {
            Ok(message) => vec![Action::Send { channel, message }],
            Err(e) => self.tell(&format!("error: {e}")),
        }
    }

    fn find(&self, prefix: &str) -> Result<MessageRef, String> {
        let c = self.current().ok_or("no channel")?;
        let ids: Vec<MessageRef> = c.snap.timeline.items.iter().map(|i| i.id).collect();
        kith_client::chat::find_message(&ids, prefix).map_err(|e| e.to_string())
    }
}

/// Whether an item (not a notice) mentions `me`.
pub(crate) fn mentions_me(item: &Item<String>, me: &str) -> bool {
    match &item.body {
        Body::Text(t) | Body::Emote(t) => t.mentions().iter().any(|h| h.to_string() == me),
        _ => false,
    }
}
