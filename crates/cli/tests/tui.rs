//! One end-to-end run of the real `kith tui` in a detached tmux session
//! against a real `kithd`: Alice types a message and Bob reads it with the
//! CLI; Bob's answer shows on Alice's screen; the homeserver is killed and
//! restarted under the running TUI, which says so and carries on.
//!
//! tmux runs on a private socket in the test's temporary directory, and
//! only that server is killed at the end.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{Kithd, free_port, kith_bin, ok};

struct Tmux {
    /// The socket of this test's own tmux server, inside its temporary
    /// directory.
    socket: std::path::PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            // CI has no terminal; a detached session does not need one,
            // but keep tmux from guessing.
            .env("TERM", "xterm-256color")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn pane(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "kith"]).stdout)
            .into_owned()
    }

    /// Waits (bounded) until the pane shows `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let mut pane = String::new();
        for _ in 0..300 {
            pane = self.pane();
            if pane.contains(needle) {
                return pane;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the TUI never showed {needle:?}; the pane:\n{pane}");
    }

    fn type_line(&self, text: &str) {
        assert!(
            self.run(&["send-keys", "-t", "kith", "-l", text])
                .status
                .success()
        );
        assert!(
            self.run(&["send-keys", "-t", "kith", "Enter"])
                .status
                .success()
        );
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Waits (bounded) until Bob's `kith read` shows `text` from Alice.
fn bob_reads(bob: &Path, text: &str) {
    for _ in 0..60 {
        if ok(bob, &["read", "general", "--json"]).contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("bob never read {text:?}");
}

/// The id of the message in Bob's #general whose text contains `text`.
fn message_id(bob: &Path, text: &str) -> String {
    ok(bob, &["read", "general", "--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["text"].as_str().is_some_and(|t| t.contains(text)))
        .and_then(|v| v["id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no message {text:?}"))
}

#[test]
fn the_real_tui_sends_and_shows_messages_across_a_restart() {
    if !tmux_available() {
        eprintln!(
            "!!!!!!!! SKIPPING the kith tui end-to-end test: tmux is not installed \
             (.ci/run installs it) !!!!!!!!"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let server = Kithd::start(&dir.path().join("data"), free_port());
    let host = format!("localhost:{}", server.port);
    ok(
        &alice,
        &["register", "--server", &server.url(), "--name", "alice"],
    );
    ok(
        &bob,
        &["register", "--server", &server.url(), "--name", "bob"],
    );
    ok(&alice, &["channel", "create", "general"]);
    ok(
        &alice,
        &["channel", "invite", "general", &format!("bob@{host}")],
    );
    ok(&bob, &["sync"]);
    ok(&bob, &["send", "general", "welcome to the terminal"]);

    let tmux = Tmux {
        socket: dir.path().join("tmux.sock"),
    };
    let command = format!("{} --home {} tui", kith_bin().display(), alice.display());
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "kith",
        "-x",
        "100",
        "-y",
        "16",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");

    // Scrollback from the server, the channel's security domain, connected.
    tmux.wait_for("welcome to the terminal");
    tmux.wait_for("connected");
    tmux.wait_for("2 can read: alice, bob");

    tmux.type_line("hello from the tui");
    bob_reads(&bob, "hello from the tui");
    tmux.wait_for("<alice> hello from the tui");
    ok(&bob, &["send", "general", &format!("hi @alice@{host}")]);
    tmux.wait_for("<bob> hi @alice@");

    // Reactions, edits and replies show; a mention elsewhere is counted.
    let hello = message_id(&bob, "hello from the tui");
    let hi = message_id(&bob, "hi @alice@");
    ok(&bob, &["react", "general", &hello[..8], "👍"]);
    tmux.wait_for("👍 1]");
    ok(
        &bob,
        &[
            "edit",
            "general",
            &hi[..8],
            &format!("hi @alice@{host}, welcome"),
        ],
    );
    tmux.wait_for("welcome (edited)");
    tmux.type_line(&format!("/reply {} thanks bob", &hi[..6]));
    bob_reads(&bob, "thanks bob");
    tmux.wait_for("↳ <bob> hi @alice@");
    ok(&bob, &["channel", "create", "random"]);
    ok(
        &bob,
        &["channel", "invite", "random", &format!("alice@{host}")],
    );
    ok(&bob, &["send", "random", &format!("@alice@{host} lunch?")]);
    tmux.wait_for("#random 1 @1");

    // The homeserver dies under the running TUI, and comes back.
    let (data, port) = server.kill();
    tmux.wait_for("homeserver unreachable, retrying");
    let _server = Kithd::start(&data, port);
    tmux.wait_for("· connected");
    tmux.type_line("/me is still here");
    bob_reads(&bob, "is still here");
    let pane = tmux.wait_for("* alice is still here");
    eprintln!("the TUI's screen:\n{pane}");

    tmux.type_line("/quit");
    for _ in 0..100 {
        if !tmux.run(&["has-session", "-t", "kith"]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("/quit did not end the TUI:\n{}", tmux.pane());
}
