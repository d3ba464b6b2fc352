//! Drives the real `kithd` and `kith` binaries as a user would: two people
//! register, make a channel, talk, and keep talking after the homeserver is
//! killed with SIGKILL and restarted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;

use common::{Kithd, free_port, kith, ok};

fn read_texts(home: &Path, channel: &str) -> Vec<(String, String)> {
    ok(home, &["read", channel, "--json"])
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                v["sender"].as_str().unwrap().to_owned(),
                v["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// `kith device list --json`: one object per device, the same three keys
/// in both forms.
fn device_list(home: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["device", "list", "--json"];
    args.extend_from_slice(extra);
    ok(home, &args)
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            keys.sort();
            assert_eq!(keys, ["device", "name", "state"], "{v}");
            v
        })
        .collect()
}

/// The ids `kith device list --json` shows in `state`.
fn in_state(home: &Path, state: &str) -> Vec<String> {
    device_list(home, &[])
        .iter()
        .filter(|v| v["state"] == state)
        .map(|v| v["device"].as_str().unwrap().to_owned())
        .collect()
}

/// The id a device refused under a taken name is told to link.
fn refused_id(home: &Path, register: &[&str]) -> String {
    let refused = kith(home, register);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    stderr
        .split("kith device link ")
        .nth(1)
        .unwrap_or_else(|| panic!("no link hint in {stderr:?}"))
        .get(..64)
        .unwrap()
        .to_owned()
}

#[test]
fn two_people_talk_through_the_binaries_across_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (dir.path().join("alice"), dir.path().join("bob"));
    let server = Kithd::start(&dir.path().join("data"), free_port());
    let host = format!("localhost:{}", server.port);

    assert_eq!(
        ok(
            &alice,
            &["register", "--server", &server.url(), "--name", "alice"]
        )
        .trim(),
        format!("alice@{host}")
    );
    assert_eq!(
        ok(
            &bob,
            &["register", "--server", &server.url(), "--name", "bob"]
        )
        .trim(),
        format!("bob@{host}")
    );
    let who: serde_json::Value = serde_json::from_str(&ok(&alice, &["whoami", "--json"])).unwrap();
    assert_eq!(who["handle"], format!("alice@{host}"));
    assert_eq!(who["device"].as_str().unwrap().len(), 64);

    let channel = ok(&alice, &["channel", "create", "general"])
        .trim()
        .to_owned();
    assert_eq!(channel.len(), 32);
    ok(
        &alice,
        &["channel", "invite", "general", &format!("bob@{host}")],
    );
    assert!(ok(&bob, &["sync"]).contains(&format!("joined channel {channel}")));
    let listed: serde_json::Value =
        serde_json::from_str(ok(&bob, &["channel", "list", "--json"]).trim()).unwrap();
    assert_eq!(
        (listed["name"].as_str(), listed["members"].as_u64()),
        (Some("general"), Some(2))
    );

    ok(&alice, &["send", "general", "hello bob"]);
    ok(&bob, &["send", &channel, "hi alice"]);
    let expected = vec![
        (format!("alice@{host}"), "hello bob".to_owned()),
        (format!("bob@{host}"), "hi alice".to_owned()),
    ];
    assert_eq!(read_texts(&bob, "general"), expected);
    assert_eq!(read_texts(&alice, "general"), expected);

    // Kill the homeserver outright mid-conversation, then restart it.
    ok(&alice, &["send", "general", "just before the crash"]);
    let (data, port) = server.kill();
    let failed = kith(&bob, &["read", "general"]);
    assert!(
        !failed.status.success(),
        "reading with the server down must fail"
    );
    assert!(String::from_utf8_lossy(&failed.stderr).contains("cannot reach the homeserver"));
    let _server = Kithd::start(&data, port);
    ok(&bob, &["send", "general", "after the restart"]);
    let mut expected = expected;
    expected.push((format!("alice@{host}"), "just before the crash".to_owned()));
    expected.push((format!("bob@{host}"), "after the restart".to_owned()));
    assert_eq!(read_texts(&alice, "general"), expected);
    assert_eq!(read_texts(&bob, "general"), expected);

    // Mistakes get a clear error and a non-zero exit.
    let out = kith(&alice, &["send", "no-such-channel", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no channel"));
    let out = kith(&dir.path().join("nobody"), &["whoami"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not registered"));
}

#[test]
fn a_second_device_joins_its_user_through_the_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let (laptop, phone) = (dir.path().join("laptop"), dir.path().join("phone"));
    let server = Kithd::start(&dir.path().join("data"), free_port());
    let host = format!("localhost:{}", server.port);
    let register = ["register", "--server", &server.url(), "--name", "alice"];
    ok(&laptop, &register);
    ok(&laptop, &["channel", "create", "general"]);

    // The phone is refused, and told what to run on the laptop.
    let refused = kith(&phone, &register);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    let id = stderr
        .split("kith device link ")
        .nth(1)
        .unwrap_or_else(|| panic!("no link hint in {stderr:?}"))
        .get(..64)
        .unwrap()
        .to_owned();
    assert!(ok(&laptop, &["device", "link", &id]).is_empty());
    assert_eq!(ok(&phone, &register).trim(), format!("alice@{host}"));

    assert_eq!(in_state(&laptop, "linked"), vec![id.clone()]);
    assert!(in_state(&laptop, "pending").is_empty());
    assert_eq!(in_state(&laptop, "this").len(), 1);

    // The laptop adds the phone to its channel on its next sync.
    ok(&laptop, &["sync"]);
    assert!(ok(&phone, &["sync"]).contains("joined channel"));
    ok(&laptop, &["send", "general", "from the laptop"]);
    assert_eq!(
        read_texts(&phone, "general"),
        [(format!("alice@{host}"), "from the laptop".to_owned())]
    );

    // A device linked only by the phone (say, by whoever holds it) is
    // listed on the laptop as not linked from there, and can be removed.
    let tablet = dir.path().join("tablet");
    let refused = kith(&tablet, &register);
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    let tablet_id = stderr
        .split("kith device link ")
        .nth(1)
        .unwrap_or_else(|| panic!("no link hint in {stderr:?}"))
        .get(..64)
        .unwrap()
        .to_owned();
    ok(&phone, &["device", "link", &tablet_id]);
    assert_eq!(ok(&tablet, &register).trim(), format!("alice@{host}"));
    assert_eq!(in_state(&laptop, "linked"), vec![id.clone()]);
    assert_eq!(in_state(&laptop, "unlinked"), vec![tablet_id.clone()]);
    assert!(ok(&laptop, &["device", "list"]).contains("not linked from this device"));
    ok(&laptop, &["device", "remove", &tablet_id]);
    assert!(in_state(&laptop, "unlinked").is_empty());
    assert!(!kith(&tablet, &["sync"]).status.success());

    // The phone is lost: the laptop removes it from alice and the channel.
    assert!(ok(&laptop, &["device", "remove", &id]).contains("removed it from channel"));
    assert!(in_state(&laptop, "linked").is_empty());
    let handle = format!("alice@{host}");
    let listed = device_list(&laptop, &["--user", &handle]);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["state"], "listed");
    assert_eq!(listed[0]["device"], in_state(&laptop, "this")[0]);
    let of_alice = ok(&laptop, &["device", "list", "--user", &handle]);
    assert_eq!(of_alice.lines().count(), 1, "{of_alice}");
    assert!(!of_alice.contains(&id));
    assert!(!kith(&phone, &["sync"]).status.success());
    assert!(!kith(&laptop, &["device", "remove", &id]).status.success());
}

/// A device that learns of its user's removed device during `kith sync`
/// and is not an admin of a channel holding it asks the admins: `sync
/// --json` says so (`removal_requested`), and the admin's next `sync
/// --json` lists the removal (`removed_devices`).
#[test]
fn sync_json_reports_removal_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (laptop, phone, tablet, bob) = (
        dir.path().join("laptop"),
        dir.path().join("phone"),
        dir.path().join("tablet"),
        dir.path().join("bob"),
    );
    let server = Kithd::start(&dir.path().join("data"), free_port());
    let host = format!("localhost:{}", server.port);
    let register = ["register", "--server", &server.url(), "--name", "alice"];
    ok(&laptop, &register);
    for other in [&phone, &tablet] {
        let id = refused_id(other, &register);
        ok(&laptop, &["device", "link", &id]);
        ok(other, &register);
    }
    let phone_id = device_list(&phone, &[])
        .iter()
        .find(|v| v["state"] == "this")
        .unwrap()["device"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(
        &bob,
        &["register", "--server", &server.url(), "--name", "bob"],
    );
    let side = ok(&bob, &["channel", "create", "side"]).trim().to_owned();
    ok(
        &bob,
        &["channel", "invite", &side, &format!("alice@{host}")],
    );
    for home in [&laptop, &phone, &tablet] {
        assert!(ok(home, &["sync"]).contains("joined channel"));
    }

    // The laptop removes the phone; the tablet, told by its event stream,
    // asks Bob (the admin) to remove it from `side` too.
    ok(&laptop, &["device", "remove", &phone_id]);
    let report: serde_json::Value =
        serde_json::from_str(ok(&tablet, &["sync", "--json"]).trim()).unwrap();
    assert_eq!(
        report["removal_requested"],
        serde_json::json!([{ "channel": side, "device": phone_id }]),
        "{report}"
    );
    // `--recheck` (kept requests due at once) changes nothing for a request
    // that was never put off: Bob honours it as a plain sync would.
    let report: serde_json::Value =
        serde_json::from_str(ok(&bob, &["sync", "--json", "--recheck"]).trim()).unwrap();
    assert_eq!(
        report["removed_devices"],
        serde_json::json!([{ "channel": side, "device": phone_id }]),
        "{report}"
    );
    assert_eq!(report["removal_requested"], serde_json::json!([]));
    // Nothing waited for a server that is down.
    assert_eq!(report["kept"], serde_json::json!([]), "{report}");
}
