//! Drawing an [`App`]: the channel list on the left, the shown channel's
//! timeline on the right, a status line and the input line.

use kith_chat::{Body, Item, MessageRef};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use super::app::{App, ChannelView, Connection};

/// Width of the channel list.
pub(crate) const LIST_WIDTH: u16 = 24;

/// `hh:mm` (UTC) of a time in ms.
pub(crate) fn clock(ms: u64) -> String {
    let minutes = (ms / 60_000) % (24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// How a handle is shown: its local name when it is on this user's server.
pub(crate) fn nick<'a>(handle: &'a str, me: &str) -> &'a str {
    let server = |h: &str| h.split_once('@').map(|(_, s)| s.to_owned());
    match (handle.split_once('@'), server(me)) {
        (Some((name, s)), Some(mine)) if s == mine => name,
        _ => handle,
    }
}

fn short(id: &MessageRef) -> String {
    id.to_string().chars().take(6).collect()
}

/// Draws the whole screen.
pub(crate) fn render(frame: &mut Frame<'_>, app: &App) {
    let [main, status, input] = Layout::vertical([
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let [list, timeline] =
        Layout::horizontal([Constraint::Length(LIST_WIDTH), Constraint::Min(10)]).areas(main);
    render_list(frame, app, list);
    render_timeline(frame, app, timeline);
    render_status(frame, app, status);
    render_input(frame, app, input);
}

/// The security-domain marker: `e2e:N` (encrypted, N devices' users can
/// read it), or `left` once this device is no longer a member.
fn domain(c: &ChannelView) -> String {
    if c.snap.active {
        format!("e2e:{}", c.snap.members.len())
    } else {
        "left".to_owned()
    }
}

fn render_list(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let lines: Vec<Line<'_>> = app
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let selected = i == app.selected;
            let mut counts = String::new();
            if c.unread > 0 {
                counts.push_str(&format!(" {}", c.unread));
            }
            if c.mentions > 0 {
                counts.push_str(&format!(" @{}", c.mentions));
            }
            let marker = if selected { ">" } else { " " };
            let style = if selected {
                Style::default().add_modifier(Modifier::BOLD)
            } else if c.mentions > 0 {
                Style::default().add_modifier(Modifier::UNDERLINED)
            } else {
                Style::default()
            };
            Line::from(vec![
                Span::styled(format!("{marker}#{}", c.snap.name), style),
                Span::raw(counts),
                Span::styled(
                    format!(" {}", domain(c)),
                    Style::default().add_modifier(Modifier::DIM),
                ),
            ])
        })
        .collect();
    let block = Block::default().borders(Borders::ALL).title("Channels");
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

/// The title of the shown channel: its name and who can read it.
pub(crate) fn channel_title(c: &ChannelView, me: &str) -> String {
    let kind = if c.snap.chat {
        String::new()
    } else {
        format!(" ({})", c.snap.content_type)
    };
    if !c.snap.active {
        return format!(" #{}{kind} · you are no longer a member ", c.snap.name);
    }
    let names: Vec<&str> = c.snap.members.iter().map(|m| nick(m, me)).collect();
    format!(
        " #{}{kind} · encrypted · {} can read: {} ",
        c.snap.name,
        names.len(),
        names.join(", ")
    )
}

fn render_timeline(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let Some(c) = app.current() else {
        let block = Block::default()
            .borders(Borders::ALL)
            .title(" no channels ");
        let hint = Paragraph::new("/create NAME makes a channel; others invite you with /invite")
            .block(block);
        frame.render_widget(hint, area);
        return;
    };
    let mut lines: Vec<Line<'_>> = Vec::new();
    for item in &c.snap.timeline.items {
        lines.extend(item_lines(item, &c.snap.timeline.items, &app.me));
    }
    let height = usize::from(area.height.saturating_sub(2));
    let end = lines.len().saturating_sub(app.scroll.min(lines.len()));
    let start = end.saturating_sub(height);
    let shown: Vec<Line<'_>> = lines
        .get(start..end)
        .map(<[Line<'_>]>::to_vec)
        .unwrap_or_default();
    let block = Block::default()
        .borders(Borders::ALL)
        .title(channel_title(c, &app.me));
    frame.render_widget(Paragraph::new(shown).block(block), area);
}

/// The lines of one timeline item: a reply's quote, the message, its
/// reactions.
pub(crate) fn item_lines(
    item: &Item<String>,
    all: &[Item<String>],
    me: &str,
) -> Vec<Line<'static>> {
    let dim = Style::default().add_modifier(Modifier::DIM);
    let mut out = Vec::new();
    if let Some(target) = item.reply_to {
        let quoted = all.iter().find(|i| i.id == target);
        let text = match quoted {
            Some(q) => format!(
                "{}  ↳ <{}> {}",
                " ".repeat(12),
                nick(&q.sender, me),
                crate::chat::display_text(&q.body).unwrap_or_else(|| "…".into())
            ),
            None => format!("{}  ↳ {}", " ".repeat(12), short(&target)),
        };
        out.push(Line::styled(text, dim));
    }
    let who = nick(&item.sender, me).to_owned();
    let mut spans = vec![Span::styled(
        format!("{} {} ", clock(item.time), short(&item.id)),
        dim,
    )];
    if let Some(thread) = item.thread {
        spans.push(Span::styled(format!("[thread {}] ", short(&thread)), dim));
    }
    let body = match &item.body {
        Body::Text(t) => format!("<{who}> {}", t.text()),
        Body::Emote(t) => format!("* {who} {}", t.text()),
        Body::Notice(t) => format!("-{who}- {}", t.text()),
        Body::Attachment(a) => {
            let f = a.fields();
            let caption = f
                .caption
                .as_ref()
                .map(|c| format!(" {}", c.text()))
                .unwrap_or_default();
            format!("<{who}> [file {} {} B]{caption}", f.name, f.size)
        }
        Body::Unsupported { kind } => format!("<{who}> [unsupported message kind {kind}]"),
        Body::Undecodable(_) => format!("<{who}> [unsupported message]"),
        Body::Deleted { by } => format!("<{who}> [deleted by {}]", nick(by, me)),
    };
    let style = if matches!(item.body, Body::Deleted { .. }) {
        dim
    } else if super::app::mentions_me(item, me) {
        Style::default().add_modifier(Modifier::BOLD)
    } else {
        Style::default()
    };
    spans.push(Span::styled(body, style));
    if item.edited() {
        spans.push(Span::styled(" (edited)", dim));
    }
    out.push(Line::from(spans));
    if !item.reactions.is_empty() {
        let groups: Vec<String> = item
            .reactions
            .iter()
            .map(|g| format!("[{} {}]", g.key, g.users.len()))
            .collect();
        out.push(Line::styled(
            format!("{}{}", " ".repeat(13), groups.join(" ")),
            dim,
        ));
    }
    out
}

fn render_status(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let mut parts = vec![match &app.connection {
        Connection::Connecting => format!("{} · connecting…", app.me),
        Connection::Connected => format!("{} · connected", app.me),
        Connection::Failed(e) => format!("{} · homeserver unreachable, retrying: {e}", app.me),
    }];
    if let Some(c) = app.current() {
        let typing = app.typing_in(c.snap.id);
        if !typing.is_empty() {
            let names: Vec<&str> = typing.iter().map(|t| nick(t, &app.me)).collect();
            parts.push(format!("{} typing…", names.join(", ")));
        }
    }
    if let Some(notice) = &app.notice {
        parts.push(notice.clone());
    }
    let style = Style::default().add_modifier(Modifier::REVERSED);
    frame.render_widget(Paragraph::new(parts.join(" │ ")).style(style), area);
}

fn render_input(frame: &mut Frame<'_>, app: &App, area: Rect) {
    let prompt = app
        .current()
        .map(|c| format!("[#{}] ", c.snap.name))
        .unwrap_or_else(|| "[kith] ".to_owned());
    let width = prompt.chars().count() + app.input.chars().count();
    frame.render_widget(Paragraph::new(format!("{prompt}{}", app.input)), area);
    let x = area
        .x
        .saturating_add(u16::try_from(width).unwrap_or(u16::MAX))
        .min(area.right().saturating_sub(1));
    frame.set_cursor_position((x, area.y));
}
