//! The terminal client without a terminal: `App::update` driven by events,
//! and `render` drawn into ratatui's `TestBackend`, compared line by line
//! with the expected screen.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use kith_chat::{
    ChatMessage, Delete, Edit, Entry, MessageRef, Moderators, Reaction, ReactionOp, ReadMarker,
    RichText, Text, fold,
};
use kith_proto::{ChannelId, DeviceId};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use super::app::{Action, App, ChannelSnapshot, Event};
use super::ui::render;

const ALICE: &str = "alice@a.test";
const BOB: &str = "bob@a.test";
/// 2026-11-26 12:00 UTC.
const NOON: u64 = 1_795_694_400_000;

fn id(n: u8) -> MessageRef {
    MessageRef::from_bytes([n; 32])
}

fn dev(who: &str) -> DeviceId {
    DeviceId::from_bytes(if who == ALICE { [0xa1; 32] } else { [0xb0; 32] })
}

fn entry(n: u8, who: &str, minute: u64, message: ChatMessage) -> Entry<String> {
    Entry::new(
        id(n),
        who.to_owned(),
        dev(who),
        NOON + minute * 60_000,
        message,
    )
}

fn text(s: &str) -> ChatMessage {
    ChatMessage::Text(Text::new(RichText::plain(s).unwrap()))
}

fn channel(n: u8, name: &str, entries: &[Entry<String>]) -> ChannelSnapshot {
    ChannelSnapshot {
        id: ChannelId::from_bytes([n; 16]),
        name: name.to_owned(),
        content_type: kith_chat::CONTENT_TYPE.to_owned(),
        chat: true,
        active: true,
        members: vec![ALICE.to_owned(), BOB.to_owned()],
        timeline: fold(entries, &Moderators::new([ALICE.to_owned()])),
    }
}

/// A conversation with every kind the timeline shows.
fn general_entries() -> Vec<Entry<String>> {
    let mut reply = Text::new(RichText::plain("sure, after lunch").unwrap());
    reply.reply_to = Some(id(1));
    let mention = Text::new(
        RichText::new(
            kith_chat::TextFormat::Plain,
            "@alice@a.test look",
            vec![ALICE.parse().unwrap()],
        )
        .unwrap(),
    );
    vec![
        entry(1, ALICE, 0, text("ship it today?")),
        entry(2, BOB, 1, ChatMessage::Text(reply)),
        entry(3, BOB, 2, text("typo hre")),
        entry(
            4,
            BOB,
            3,
            ChatMessage::Edit(Edit {
                target: id(3),
                replacement: RichText::plain("typo here").unwrap(),
            }),
        ),
        entry(
            5,
            ALICE,
            4,
            ChatMessage::Reaction(Reaction {
                target: id(3),
                key: "+1".parse().unwrap(),
                op: ReactionOp::Add,
            }),
        ),
        entry(6, BOB, 5, text("oops, wrong channel")),
        entry(7, ALICE, 6, ChatMessage::Delete(Delete { target: id(6) })),
        entry(
            8,
            ALICE,
            7,
            ChatMessage::Emote(Text::new(RichText::plain("waves").unwrap())),
        ),
        entry(
            9,
            ALICE,
            8,
            ChatMessage::ReadMarker(ReadMarker { up_to: id(8) }),
        ),
        entry(10, BOB, 9, ChatMessage::Text(mention)),
    ]
}

fn screen(app: &App, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| render(f, app)).unwrap();
    let buffer = terminal.backend().buffer();
    (0..height)
        .map(|y| (0..width).map(|x| buffer[(x, y)].symbol()).collect())
        .collect()
}

fn assert_screen(app: &App, width: u16, expected: &[&str]) {
    let got = screen(app, width, u16::try_from(expected.len()).unwrap());
    let got: Vec<&str> = got.iter().map(|l| l.trim_end()).collect();
    let expected: Vec<&str> = expected.iter().map(|l| l.trim_end()).collect();
    assert_eq!(
        got,
        expected,
        "screen:\n{}\nexpected:\n{}",
        got.join("\n"),
        expected.join("\n")
    );
}

fn key(code: KeyCode) -> Event {
    Event::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ctrl(c: char) -> Event {
    Event::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

fn type_line(app: &mut App, line: &str) -> Vec<Action> {
    let mut actions = Vec::new();
    for c in line.chars() {
        actions.extend(app.update(key(KeyCode::Char(c))));
    }
    actions.extend(app.update(key(KeyCode::Enter)));
    actions
}

/// Alice's app with #general (shown) and #random.
fn alice() -> App {
    let mut app = App::new(ALICE);
    app.now = NOON + 10 * 60_000;
    let actions = app.update(Event::Synced(vec![
        channel(1, "general", &general_entries()),
        channel(2, "random", &[entry(20, BOB, 0, text("lunch?"))]),
    ]));
    // #general is shown: its unread mention gets a read marker; no bell for
    // history.
    assert_eq!(
        actions,
        vec![Action::Send {
            channel: ChannelId::from_bytes([1; 16]),
            message: ChatMessage::ReadMarker(ReadMarker { up_to: id(10) }),
        }]
    );
    app
}

#[test]
fn the_screen_shows_channels_timeline_typing_and_input() {
    let mut app = alice();
    app.update(Event::Typing {
        channel: ChannelId::from_bytes([1; 16]),
        who: BOB.to_owned(),
        active: true,
        at: app.now,
    });
    for c in "hi @b".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    assert_screen(
        &app,
        80,
        &[
            "┌Channels──────────────┐┌ #general · encrypted · 2 can read: alice, bob ───────┐",
            "│>#general e2e:2       ││12:00 010101 <alice> ship it today?                   │",
            "│ #random 1 e2e:2      ││              ↳ <alice> ship it today?                │",
            "│                      ││12:01 020202 <bob> sure, after lunch                  │",
            "│                      ││12:02 030303 <bob> typo here (edited)                 │",
            "│                      ││             [+1 1]                                   │",
            "│                      ││12:05 060606 <bob> [deleted by alice]                 │",
            "│                      ││12:07 080808 * alice waves                            │",
            "│                      ││12:09 0a0a0a <bob> @alice@a.test look                 │",
            "└──────────────────────┘└──────────────────────────────────────────────────────┘",
            "alice@a.test · connected │ bob typing…",
            "[#general] hi @b",
        ],
    );
}

#[test]
fn a_failed_sync_shows_in_the_status_line_until_one_works() {
    let mut app = alice();
    app.update(Event::SyncFailed(
        "cannot reach the homeserver at http://127.0.0.1:9".into(),
    ));
    let lines = screen(&app, 100, 6);
    assert_eq!(
        lines[4].trim_end(),
        "alice@a.test · homeserver unreachable, retrying: cannot reach the homeserver at http://127.0.0.1:9"
    );
    // Typing and sending still work while it is down: the actions queue.
    assert!(matches!(
        type_line(&mut app, "still here").last(),
        Some(Action::Send { .. })
    ));
    app.update(Event::Synced(vec![channel(
        1,
        "general",
        &general_entries(),
    )]));
    assert_eq!(
        screen(&app, 100, 6)[4].trim_end(),
        "alice@a.test · connected"
    );
}

#[test]
fn a_mention_elsewhere_rings_the_bell_and_counts() {
    let mut app = alice();
    let mut random = vec![entry(20, BOB, 0, text("lunch?"))];
    random.push(entry(
        21,
        BOB,
        11,
        ChatMessage::Text(Text::new(
            RichText::new(
                kith_chat::TextFormat::Plain,
                "@alice@a.test you in?",
                vec![ALICE.parse().unwrap()],
            )
            .unwrap(),
        )),
    ));
    let actions = app.update(Event::Synced(vec![
        channel(1, "general", &general_entries()),
        channel(2, "random", &random),
    ]));
    assert_eq!(actions, vec![Action::Bell]);
    let random = &app.channels[1];
    assert_eq!((random.unread, random.mentions), (2, 1));
    assert_eq!(
        screen(&app, 60, 6)[2].chars().take(24).collect::<String>(),
        "│ #random 2 @1 e2e:2   │"
    );
    // Switching there marks it read.
    let actions = app.update(ctrl('n'));
    assert_eq!(
        actions,
        vec![Action::Send {
            channel: ChannelId::from_bytes([2; 16]),
            message: ChatMessage::ReadMarker(ReadMarker { up_to: id(21) }),
        }]
    );
    assert_eq!(app.channels[1].unread, 0);
}

#[test]
fn a_read_marker_from_another_of_my_devices_clears_the_count() {
    let mut app = alice();
    assert_eq!(app.channels[1].unread, 1);
    // Alice's phone (another device, same user) read #random: this
    // device's count follows, and it sends no marker of its own.
    let phone = DeviceId::from_bytes([0xa2; 32]);
    let random = vec![
        entry(20, BOB, 0, text("lunch?")),
        Entry::new(
            id(22),
            ALICE.to_owned(),
            phone,
            NOON + 11 * 60_000,
            ChatMessage::ReadMarker(ReadMarker { up_to: id(20) }),
        ),
    ];
    let actions = app.update(Event::Synced(vec![
        channel(1, "general", &general_entries()),
        channel(2, "random", &random),
    ]));
    assert_eq!(actions, vec![]);
    assert_eq!((app.channels[1].unread, app.channels[1].mentions), (0, 0));
}

fn sent(actions: &[Action]) -> Vec<ChatMessage> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { message, .. } if !matches!(message, ChatMessage::Typing(_)) => {
                Some(message.clone())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn typing_a_message_sends_typing_then_the_text_with_mentions() {
    let mut app = alice();
    let actions = type_line(&mut app, "hi @bob@a.test");
    assert!(matches!(
        &actions[0],
        Action::Send { message: ChatMessage::Typing(t), .. } if t.active
    ));
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(
                a,
                Action::Send {
                    message: ChatMessage::Typing(_),
                    ..
                }
            ))
            .count(),
        1,
        "typing is sent once, not per key"
    );
    let messages = sent(&actions);
    let [ChatMessage::Text(t)] = messages.as_slice() else {
        panic!("{actions:?}")
    };
    assert_eq!(t.content.text(), "hi @bob@a.test");
    assert_eq!(t.content.mentions()[0].to_string(), BOB);
    assert!(app.input.is_empty());
}

#[test]
fn slash_commands() {
    let mut app = alice();
    let general = ChannelId::from_bytes([1; 16]);
    let one = |actions: Vec<Action>| {
        let mut s = sent(&actions);
        assert_eq!(s.len(), 1, "{actions:?}");
        s.remove(0)
    };
    assert!(
        matches!(one(type_line(&mut app, "/me waves back")), ChatMessage::Emote(t) if t.content.text() == "waves back")
    );
    assert!(matches!(
        one(type_line(&mut app, "/reply 020202 yes")),
        ChatMessage::Text(t) if t.reply_to == Some(id(2)) && t.content.text() == "yes"
    ));
    assert!(matches!(
        one(type_line(&mut app, "/edit 010101 ship it now?")),
        ChatMessage::Edit(e) if e.target == id(1) && e.replacement.text() == "ship it now?"
    ));
    assert!(matches!(
        one(type_line(&mut app, "/delete 030303")),
        ChatMessage::Delete(d) if d.target == id(3)
    ));
    // Alice already reacted +1 to 030303: /react again takes it back.
    assert!(matches!(
        one(type_line(&mut app, "/react 030303 +1")),
        ChatMessage::Reaction(r) if r.op == ReactionOp::Remove
    ));
    assert!(matches!(
        one(type_line(&mut app, "/react 010101 +1")),
        ChatMessage::Reaction(r) if r.op == ReactionOp::Add && r.target == id(1)
    ));
    assert_eq!(
        type_line(&mut app, "/create ops"),
        vec![Action::Create { name: "ops".into() }]
    );
    assert_eq!(
        type_line(&mut app, "/invite carol@a.test"),
        vec![Action::Invite {
            channel: general,
            handle: "carol@a.test".into()
        }]
    );
    assert_eq!(
        type_line(&mut app, "/remove bob@a.test"),
        vec![Action::Remove {
            channel: general,
            handle: "bob@a.test".into()
        }]
    );
    // Removing another device of this user (lost or stolen), as `kith
    // device remove` does; a bad id only gets the usage.
    let phone = DeviceId::from_bytes([9; 32]);
    assert_eq!(
        type_line(&mut app, &format!("/device remove {phone}")),
        vec![Action::RemoveDevice { device: phone }]
    );
    for bad in [
        "/device remove 1234",
        "/device remove",
        "/device",
        "/device list",
    ] {
        assert!(type_line(&mut app, bad).is_empty(), "{bad}");
        assert!(
            app.notice
                .as_deref()
                .unwrap()
                .contains("usage: /device remove"),
            "{bad}: {:?}",
            app.notice
        );
    }
    // Prefixes are checked: too short, unknown.
    assert!(sent(&type_line(&mut app, "/delete 0101")).is_empty());
    assert!(
        app.notice
            .as_deref()
            .unwrap()
            .contains("at least 6 hex digits")
    );
    assert!(sent(&type_line(&mut app, "/delete ffffff")).is_empty());
    assert!(app.notice.as_deref().unwrap().contains("no message ffffff"));
    assert_eq!(
        type_line(&mut app, "/leave"),
        vec![Action::Leave { channel: general }]
    );
    assert_eq!(
        type_line(&mut app, "/part"),
        vec![Action::Leave { channel: general }]
    );
    assert!(type_line(&mut app, "/frobnicate").is_empty());
    assert!(app.notice.as_deref().unwrap().contains("unknown command"));
    assert_eq!(type_line(&mut app, "/quit"), vec![Action::Quit]);
    assert!(app.quit);
}

#[test]
fn tab_completes_nicks() {
    let mut app = alice();
    app.update(key(KeyCode::Char('b')));
    app.update(key(KeyCode::Tab));
    assert_eq!(app.input, "bob@a.test: ");
    for c in "see @a".chars() {
        app.update(key(KeyCode::Char(c)));
    }
    app.update(key(KeyCode::Tab));
    // Alice does not complete to herself.
    assert_eq!(app.input, "bob@a.test: see @a");
    assert!(app.notice.as_deref().unwrap().contains("no member"));
}

#[test]
fn typing_lapses_and_stops() {
    let mut app = alice();
    let general = ChannelId::from_bytes([1; 16]);
    let at = app.now;
    app.update(Event::Typing {
        channel: general,
        who: BOB.into(),
        active: true,
        at,
    });
    assert_eq!(app.typing_in(general), vec![BOB]);
    app.update(Event::Tick(at + super::app::TYPING_LAPSE_MS + 1));
    assert!(app.typing_in(general).is_empty());
    app.update(Event::Typing {
        channel: general,
        who: BOB.into(),
        active: true,
        at: app.now,
    });
    app.update(Event::Typing {
        channel: general,
        who: BOB.into(),
        active: false,
        at: app.now,
    });
    assert!(app.typing_in(general).is_empty());
    // A message from the typist ends the typing at once.
    app.update(Event::Typing {
        channel: general,
        who: BOB.into(),
        active: true,
        at: app.now,
    });
    let mut entries = general_entries();
    entries.push(entry(30, BOB, 10, text("done typing")));
    app.update(Event::Synced(vec![channel(1, "general", &entries)]));
    assert!(app.typing_in(general).is_empty());
}

#[test]
fn channels_that_are_not_chat_send_bytes_and_refuse_chat_commands() {
    let mut app = App::new(ALICE);
    let mut raw = channel(3, "bytes", &[entry(40, BOB, 0, text("ignored"))]);
    raw.chat = false;
    raw.content_type = "application/octet-stream".into();
    app.update(Event::Synced(vec![raw]));
    assert_eq!(
        type_line(&mut app, "plain bytes"),
        vec![Action::SendRaw {
            channel: ChannelId::from_bytes([3; 16]),
            bytes: b"plain bytes".to_vec(),
        }]
    );
    assert!(type_line(&mut app, "/me waves").is_empty());
    assert_eq!(app.notice.as_deref(), Some("#bytes is not a chat channel"));
    let top = screen(&app, 120, 5)[0].clone();
    assert!(
        top.contains("#bytes (application/octet-stream) · encrypted · 2 can read: alice, bob"),
        "{top}"
    );
}

#[test]
fn leave_marks_the_channel_left_and_stops_sending() {
    let mut app = alice();
    let general = ChannelId::from_bytes([1; 16]);
    assert_eq!(
        type_line(&mut app, "/leave"),
        vec![Action::Leave { channel: general }]
    );
    // What the loop does with the action: the client's answer, then the
    // store as it is now (the channel marked left, its history kept).
    let outcome = kith_client::LeaveOutcome {
        requested: true,
        admins: 1,
    };
    let notice = crate::chat::leave_notice("general", &outcome);
    app.update(Event::Done(Ok(notice)));
    let mut left = channel(1, "general", &general_entries());
    left.active = false;
    let actions = app.update(Event::Refreshed(vec![
        left.clone(),
        channel(2, "random", &[entry(20, BOB, 0, text("lunch?"))]),
    ]));
    assert!(actions.is_empty(), "{actions:?}");
    assert_screen(
        &app,
        120,
        &[
            "┌Channels──────────────┐┌ #general · you are no longer a member ───────────────────────────────────────────────────────┐",
            "│>#general left        ││12:00 010101 <alice> ship it today?                                                           │",
            "│ #random 1 e2e:2      ││              ↳ <alice> ship it today?                                                        │",
            "│                      ││12:01 020202 <bob> sure, after lunch                                                          │",
            "│                      ││12:02 030303 <bob> typo here (edited)                                                         │",
            "│                      ││             [+1 1]                                                                           │",
            "│                      ││12:05 060606 <bob> [deleted by alice]                                                         │",
            "│                      ││12:07 080808 * alice waves                                                                    │",
            "│                      ││12:09 0a0a0a <bob> @alice@a.test look                                                         │",
            "└──────────────────────┘└──────────────────────────────────────────────────────────────────────────────────────────────┘",
            "alice@a.test · connected │ left #general: asked its admins to remove this device (1 admin device(s) will when they next",
            "[#general]",
        ],
    );
    // Nothing more goes out to a left channel: no typing, no text, no
    // chat command, no second leave request.
    assert!(type_line(&mut app, "anyone there?").is_empty());
    assert_eq!(
        app.notice.as_deref(),
        Some("you are no longer a member of #general")
    );
    assert!(type_line(&mut app, "/me waves").is_empty());
    assert!(type_line(&mut app, "/leave").is_empty());
    assert_eq!(
        app.notice.as_deref(),
        Some("you are no longer a member of #general")
    );
    // New messages in the left channel are neither marked read nor rung.
    let mut later = general_entries();
    later.push(entry(11, BOB, 10, text("@alice@a.test bye?")));
    left.timeline = fold(&later, &Moderators::new([ALICE.to_owned()]));
    let actions = app.update(Event::Synced(vec![
        left,
        channel(2, "random", &[entry(20, BOB, 0, text("lunch?"))]),
    ]));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Send { .. })),
        "{actions:?}"
    );
}
