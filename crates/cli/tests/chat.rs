//! The chat commands through the real `kithd` and `kith` binaries: send,
//! reply, edit, delete, react, emote, and the folded `read --json`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use common::{Kithd, free_port, kith, ok};
use serde_json::Value;

fn timeline(home: &Path, channel: &str) -> Vec<Value> {
    ok(home, &["read", channel, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The id `kith send` and friends print to stderr (`sent ID`).
fn sent_id(home: &Path, args: &[&str]) -> String {
    let out = kith(home, args);
    assert!(
        out.status.success(),
        "kith {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8(out.stderr).unwrap();
    err.trim().strip_prefix("sent ").unwrap().to_owned()
}

#[test]
fn chat_commands_and_the_folded_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let server = Kithd::start(&dir.path().join("data"), free_port());
    let host = format!("localhost:{}", server.port);
    let (a, b) = (format!("alice@{host}"), format!("bob@{host}"));
    ok(
        &alice,
        &["register", "--server", &server.url(), "--name", "alice"],
    );
    ok(
        &bob,
        &["register", "--server", &server.url(), "--name", "bob"],
    );
    ok(&alice, &["channel", "create", "general"]);
    let listed: Value =
        serde_json::from_str(ok(&alice, &["channel", "list", "--json"]).trim()).unwrap();
    assert_eq!(listed["content_type"], "application/vnd.kith.chat.v1");
    ok(&alice, &["channel", "invite", "general", &b]);
    ok(&bob, &["sync"]);

    let hello = sent_id(&alice, &["send", "general", &format!("hello @{b}")]);
    assert_eq!(hello.len(), 64);
    let reply = sent_id(&bob, &["reply", "general", &hello[..8], "hi alice"]);
    let typo = sent_id(&bob, &["send", "general", "teh plan", "--markdown"]);
    sent_id(&bob, &["edit", "general", &typo[..6], "the *plan*"]);
    let spam = sent_id(&bob, &["send", "general", "spam"]);
    sent_id(&alice, &["delete", "general", &spam]);
    sent_id(&alice, &["react", "general", &reply[..10], "👍"]);
    sent_id(&bob, &["react", "general", &reply[..10], "👍"]);
    sent_id(&bob, &["react", "general", &reply[..10], "🎉"]);
    sent_id(&bob, &["react", "general", &reply[..10], "🎉", "--remove"]);
    let wave = sent_id(&alice, &["me", "general", "waves"]);
    let thread = sent_id(
        &alice,
        &["send", "general", "in the thread", "--thread", &hello[..7]],
    );

    // Bad message ids are refused with a clear error.
    let out = kith(&alice, &["edit", "general", "abc", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 6 hex digits"));
    let out = kith(&alice, &["delete", "general", "ffffffff"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no message ffffffff"));

    for home in [&alice, &bob] {
        let items = timeline(home, "general");
        let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![&hello, &reply, &typo, &spam, &wave, &thread]);
        let [h, r, t, s, w, th] = items.as_slice() else {
            panic!()
        };
        assert_eq!(
            (h["kind"].as_str(), h["sender"].as_str(), h["text"].as_str()),
            (
                Some("text"),
                Some(a.as_str()),
                Some(format!("hello @{b}").as_str())
            )
        );
        assert_eq!(h["content"]["mentions"], serde_json::json!([b]));
        assert!(h["time"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(r["reply_to"], hello.as_str());
        assert_eq!(
            r["reactions"],
            serde_json::json!([{ "key": "👍", "count": 2, "users": [a, b] }])
        );
        assert_eq!(
            (
                t["text"].as_str(),
                t["edited"].as_bool(),
                t["content"]["format"].as_str()
            ),
            (Some("the *plan*"), Some(true), Some("plain"))
        );
        assert_eq!(
            (
                s["kind"].as_str(),
                s["deleted"].as_bool(),
                s["deleted_by"].as_str()
            ),
            (Some("deleted"), Some(true), Some(a.as_str()))
        );
        assert_eq!(
            (w["kind"].as_str(), w["text"].as_str()),
            (Some("emote"), Some("waves"))
        );
        assert_eq!(th["thread"], hello.as_str());
    }
    let plain = ok(&bob, &["read", "general"]);
    assert!(
        plain.contains(&format!("<{b}> the *plan* (edited)")),
        "{plain}"
    );
    assert!(plain.contains(&format!("* {a} waves")), "{plain}");
    assert!(
        plain.contains(&format!("<{b}> [deleted by {a}]")),
        "{plain}"
    );

    // `tail` prints new timeline items as they arrive.
    let mut tail = std::process::Command::new(common::kith_bin())
        .arg("--home")
        .arg(&bob)
        .args(["tail", "general", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // No wait needed: "live" is not in Bob's store until tail's own sync.
    ok(&alice, &["send", "general", "live"]);
    let line = rx.recv_timeout(std::time::Duration::from_secs(30));
    let _ = tail.kill();
    let _ = tail.wait();
    let item: Value = serde_json::from_str(&line.unwrap()).unwrap();
    assert_eq!(
        (item["kind"].as_str(), item["text"].as_str()),
        (Some("text"), Some("live"))
    );

    // Channels of another content type keep raw bytes and the old output.
    ok(
        &alice,
        &[
            "channel",
            "create",
            "raw",
            "--type",
            "application/octet-stream",
        ],
    );
    ok(&alice, &["send", "raw", "just bytes"]);
    let line: Value = serde_json::from_str(ok(&alice, &["read", "raw", "--json"]).trim()).unwrap();
    assert_eq!(
        (line["text"].as_str(), line.get("kind")),
        (Some("just bytes"), None)
    );
    let out = kith(&alice, &["react", "raw", &hello[..8], "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not chat messages"));
}

#[test]
fn kith_channel_leave_asks_the_admin_to_remove_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let server = Kithd::start(&dir.path().join("data"), free_port());
    let host = format!("localhost:{}", server.port);
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        ok(
            home,
            &["register", "--server", &server.url(), "--name", name],
        );
    }
    ok(&alice, &["channel", "create", "general"]);
    ok(
        &alice,
        &["channel", "invite", "general", &format!("bob@{host}")],
    );
    ok(&bob, &["sync"]);
    ok(&alice, &["send", "general", "before"]);
    let texts = |home: &Path| -> Vec<String> {
        timeline(home, "general")
            .iter()
            .map(|i| i["text"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(texts(&bob), ["before"]);

    // The only admin may not leave while Bob remains.
    let out = kith(&alice, &["channel", "leave", "general"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = kith(&bob, &["channel", "leave", "general"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("left #general: asked its admins"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value =
        serde_json::from_str(ok(&bob, &["channel", "list", "--json"]).trim()).unwrap();
    assert_eq!(listed["active"], false);
    assert!(ok(&bob, &["channel", "list"]).contains("(left)"));
    let out = kith(&bob, &["send", "general", "one more"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer a member"));

    // Alice's next sync removes Bob's device.
    let who: Value = serde_json::from_str(&ok(&bob, &["whoami", "--json"])).unwrap();
    let report: Value = serde_json::from_str(ok(&alice, &["sync", "--json"]).trim()).unwrap();
    assert_eq!(report["removed_on_request"][0]["device"], who["device"]);
    let listed: Value =
        serde_json::from_str(ok(&alice, &["channel", "list", "--json"]).trim()).unwrap();
    assert_eq!(listed["members"], 1);

    // Bob keeps his history and reads nothing new.
    ok(&alice, &["send", "general", "after"]);
    assert_eq!(texts(&alice), ["before", "after"]);
    assert_eq!(texts(&bob), ["before"]);
}
