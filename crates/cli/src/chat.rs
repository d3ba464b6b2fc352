//! Chat helpers shared by the commands and the terminal UI: turning what a
//! user typed into chat messages, and folded items into text and JSON.

use kith_chat::{
    Body, ChatMessage, Delete, Edit, Item, MessageRef, Reaction, ReactionKey, ReactionOp, RichText,
    Text, TextFormat,
};
use kith_proto::Handle;
use serde_json::{Value, json};

/// The handles a text mentions: every word of the form `@name@server`
/// (trailing punctuation ignored), each once, in order.
pub(crate) fn mentions(text: &str) -> Vec<Handle> {
    let mut out: Vec<Handle> = Vec::new();
    for word in text.split_whitespace() {
        let Some(rest) = word.strip_prefix('@') else {
            continue;
        };
        let rest = rest.trim_end_matches(|c: char| ",.;:!?)".contains(c));
        if let Ok(handle) = rest.parse::<Handle>()
            && !out.contains(&handle)
        {
            out.push(handle);
        }
    }
    out.truncate(kith_chat::message::MAX_MENTIONS);
    out
}

/// Rich text from what a user typed: plain or Markdown, with its mentions.
pub(crate) fn rich_text(text: &str, markdown: bool) -> anyhow::Result<RichText> {
    let format = if markdown {
        TextFormat::Markdown
    } else {
        TextFormat::Plain
    };
    Ok(RichText::new(format, text, mentions(text))?)
}

/// A text message, optionally a reply or in a thread.
pub(crate) fn text(
    body: &str,
    markdown: bool,
    reply_to: Option<MessageRef>,
    thread: Option<MessageRef>,
) -> anyhow::Result<ChatMessage> {
    let mut t = Text::new(rich_text(body, markdown)?);
    t.reply_to = reply_to;
    t.thread = thread;
    Ok(ChatMessage::Text(t))
}

/// An emote (`/me`).
pub(crate) fn emote(body: &str) -> anyhow::Result<ChatMessage> {
    Ok(ChatMessage::Emote(Text::new(rich_text(body, false)?)))
}

/// An edit of `target`.
pub(crate) fn edit(target: MessageRef, body: &str) -> anyhow::Result<ChatMessage> {
    Ok(ChatMessage::Edit(Edit {
        target,
        replacement: rich_text(body, false)?,
    }))
}

/// A delete of `target`.
pub(crate) fn delete(target: MessageRef) -> ChatMessage {
    ChatMessage::Delete(Delete { target })
}

/// A reaction to `target`, put on or taken off.
pub(crate) fn react(target: MessageRef, key: &str, remove: bool) -> anyhow::Result<ChatMessage> {
    let key: ReactionKey = key.parse()?;
    let op = if remove {
        ReactionOp::Remove
    } else {
        ReactionOp::Add
    };
    Ok(ChatMessage::Reaction(Reaction { target, key, op }))
}

fn format_name(format: TextFormat) -> &'static str {
    match format {
        TextFormat::Plain => "plain",
        TextFormat::Markdown => "markdown",
    }
}

fn rich_json(t: &RichText) -> Value {
    json!({
        "text": t.text(),
        "format": format_name(t.format()),
        "mentions": t.mentions().iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// One folded item as a JSON object: id, sender, device, time, kind, what
/// it shows, edits, deletion, reply, thread and aggregated reactions.
pub(crate) fn item_json(item: &Item<String>) -> Value {
    let mut v = json!({
        "id": item.id.to_string(),
        "sender": item.sender,
        "sender_device": item.device.to_string(),
        "time": item.time,
        "edited": item.edited(),
        "edits": item.edits,
        "edited_at": item.edited_at,
        "deleted": matches!(item.body, Body::Deleted { .. }),
        "reply_to": item.reply_to.map(|r| r.to_string()),
        "thread": item.thread.map(|r| r.to_string()),
        "reactions": item.reactions.iter().map(|g| json!({
            "key": g.key.as_str(), "count": g.users.len(), "users": g.users,
        })).collect::<Vec<_>>(),
    });
    let extra = match &item.body {
        Body::Text(t) => json!({ "kind": "text", "content": rich_json(t) }),
        Body::Emote(t) => json!({ "kind": "emote", "content": rich_json(t) }),
        Body::Notice(t) => json!({ "kind": "notice", "content": rich_json(t) }),
        Body::Attachment(a) => {
            let f = a.fields();
            json!({ "kind": "attachment", "attachment": {
                "file": String::from_utf8_lossy(&f.file), "name": f.name,
                "media_type": f.media_type, "size": f.size, "sha256": hex::encode(f.sha256),
                "encrypted": !f.key.is_empty(),
                "caption": f.caption.as_ref().map(rich_json),
            }})
        }
        Body::Unsupported { kind } => json!({ "kind": "unsupported", "wire_kind": kind }),
        Body::Undecodable(e) => json!({ "kind": "undecodable", "error": e.to_string() }),
        Body::Deleted { by } => json!({ "kind": "deleted", "deleted_by": by }),
    };
    if let (Value::Object(map), Value::Object(more)) = (&mut v, extra) {
        map.extend(more);
        if let Some(text) = display_text(&item.body) {
            map.insert("text".into(), Value::String(text));
        }
    }
    v
}

/// The plain text an item shows (its content, an attachment's caption),
/// if any.
pub(crate) fn display_text(body: &Body<String>) -> Option<String> {
    match body {
        Body::Text(t) | Body::Emote(t) | Body::Notice(t) => Some(t.text().to_owned()),
        Body::Attachment(a) => Some(
            a.fields()
                .caption
                .as_ref()
                .map(|c| c.text().to_owned())
                .unwrap_or_default(),
        ),
        _ => None,
    }
}

/// One line for `kith read`: IRC style, with the edit, reply and
/// reactions noted.
pub(crate) fn item_line(item: &Item<String>) -> String {
    let short = |r: &MessageRef| r.to_string().chars().take(8).collect::<String>();
    let mut line = format!("{} ", short(&item.id));
    if let Some(t) = &item.thread {
        line.push_str(&format!("[thread {}] ", short(t)));
    }
    if let Some(r) = &item.reply_to {
        line.push_str(&format!("[re {}] ", short(r)));
    }
    let who = &item.sender;
    match &item.body {
        Body::Text(t) => line.push_str(&format!("<{who}> {}", t.text())),
        Body::Emote(t) => line.push_str(&format!("* {who} {}", t.text())),
        Body::Notice(t) => line.push_str(&format!("-{who}- {}", t.text())),
        Body::Attachment(a) => {
            let f = a.fields();
            line.push_str(&format!(
                "<{who}> [file {} {} {} bytes]",
                f.name, f.media_type, f.size
            ));
            if let Some(c) = &f.caption {
                line.push_str(&format!(" {}", c.text()));
            }
        }
        Body::Unsupported { kind } => {
            line.push_str(&format!("<{who}> [unsupported message kind {kind}]"))
        }
        Body::Undecodable(_) => line.push_str(&format!("<{who}> [unsupported message]")),
        Body::Deleted { by } => line.push_str(&format!("<{who}> [deleted by {by}]")),
    }
    if item.edited() {
        line.push_str(" (edited)");
    }
    for g in &item.reactions {
        line.push_str(&format!(" [{} {}]", g.key, g.users.len()));
    }
    line
}

/// What to tell the user after removing `device` from this user (`kith
/// device remove`, the TUI's `/device remove`).
pub(crate) fn removal_notice(
    device: &kith_proto::DeviceId,
    removal: &kith_client::DeviceRemoval,
) -> String {
    format!(
        "removed {device} from this user: it can no longer log in; removed it from {} \
         channel(s), asked the admins of {} more",
        removal.removed_from.len(),
        removal.requested.len()
    )
}

/// What to tell the user after leaving `#name`.
pub(crate) fn leave_notice(name: &str, outcome: &kith_client::LeaveOutcome) -> String {
    if !outcome.requested {
        format!("left #{name} (this device was no longer a member)")
    } else if outcome.admins == 0 {
        format!(
            "left #{name}: no other admin is a member, so nobody can remove this device; \
             it no longer reads or sends here"
        )
    } else {
        format!(
            "left #{name}: asked its admins to remove this device ({} admin device(s) will \
             when they next sync)",
            outcome.admins
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mentions_are_handles_once_in_order() {
        let m = mentions("hi @bob@a.test, and @carol@b.test! @bob@a.test @nobody");
        let m: Vec<String> = m.iter().map(ToString::to_string).collect();
        assert_eq!(m, vec!["bob@a.test", "carol@b.test"]);
    }
}
