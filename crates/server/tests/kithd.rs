//! The real `kithd` binary: starts on a free loopback port with a temporary
//! data directory, answers, and exits cleanly on SIGTERM.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the child if the test fails half-way, so no process is left behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test]
async fn kithd_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kithd"))
        .args(["--listen", "127.0.0.1:0", "--server-name", "kithd.test"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("KITH_LOG", "info")
        .env("KITH_OPEN_REGISTRATION", "true")
        .env_remove("KITH_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let pid = guard.0.id();

    // The log line "kithd listening addr=127.0.0.1:PORT ..." gives the port.
    let stderr = guard.0.stderr.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut addr = None;
    let mut seen = Vec::new();
    while addr.is_none() {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no listening line; stderr so far: {seen:#?}"));
        if line.contains("kithd listening") {
            addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .map(str::to_owned);
        }
        seen.push(line);
    }
    let addr = addr.unwrap();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .unwrap();
    let info: serde_json::Value = http
        .get(format!("http://{addr}/v0/server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["name"], "kithd.test");
    assert_eq!(info["version"], 0);
    assert_eq!(info["registration"], "open");
    assert!(dir.path().join("data").join(kith_server::DB_FILE).exists());
    assert!(dir.path().join("data").join(kith_server::KEY_FILE).exists());

    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut exit = None;
    for _ in 0..300 {
        if let Some(s) = guard.0.try_wait().unwrap() {
            exit = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exit = exit.expect("kithd exits within 30 s of SIGTERM");
    assert!(exit.success(), "kithd exited with {exit}");
    // It said goodbye in its log.
    let mut rest = Vec::new();
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(10)) {
        rest.push(line);
    }
    assert!(
        rest.iter().any(|l| l.contains("kithd stopped")),
        "{rest:#?}"
    );
}

/// Starts `kithd` with `args` and returns it once its log says it listens.
fn spawn_kithd(dir: &std::path::Path, args: &[&str]) -> (Guard, mpsc::Receiver<String>) {
    let child = Command::new(env!("CARGO_BIN_EXE_kithd"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env("KITH_LOG", "info")
        .env_remove("KITH_CONFIG")
        .env_remove("KITH_RESOLVE")
        .env_remove("KITH_BLOCK")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let stderr = guard.0.stderr.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("kithd {args:?} did not start"));
        if line.contains("kithd listening") {
            return (guard, lines_rx);
        }
    }
}

/// Two `kithd` processes that know each other through `--resolve`: a lookup
/// of a user of the other server travels as a signed request (checked
/// against the origin's published keys) and gets that server's answer.
#[tokio::test]
async fn two_kithd_processes_federate_through_resolve() {
    let dir = tempfile::tempdir().unwrap();
    // Free ports, released just before the servers take them.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let (pa, pb) = (ports[0], ports[1]);
    let (a_listen, b_listen) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let (a_map, b_map) = (
        format!("b.test=http://127.0.0.1:{pb}"),
        format!("a.test=http://127.0.0.1:{pa}"),
    );
    let (_a, _) = spawn_kithd(
        &dir.path().join("a"),
        &[
            "--server-name",
            "a.test",
            "--listen",
            &a_listen,
            "--resolve",
            &a_map,
        ],
    );
    let (_b, _) = spawn_kithd(
        &dir.path().join("b"),
        &[
            "--server-name",
            "b.test",
            "--listen",
            &b_listen,
            "--resolve",
            &b_map,
        ],
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .no_proxy()
        .build()
        .unwrap();
    let response = http
        .get(format!("http://{a_listen}/v0/users/nobody@b.test"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap();
    // b.test checked a.test's signature and answered: no such user (an
    // unreachable server or a refused signature would be 502).
    assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"], "not_found");
}

/// `kithd device list|remove` act on the data directory: the operator's
/// recovery path for a user with no device left to act from (§6.4).
#[test]
fn kithd_device_commands_list_and_remove() {
    use kith_server::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let kithd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kithd"))
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .env_remove("KITH_CONFIG")
            .env("KITH_LOG", "warn")
            .output()
            .unwrap()
    };
    // No database yet: a clear failure, nothing created.
    let none = kithd(&["device", "list", "alice"]);
    assert!(!none.status.success());
    assert!(!data.join(kith_server::DB_FILE).exists());

    std::fs::create_dir_all(&data).unwrap();
    let device = kith_proto::DeviceId::from_bytes([5; 32]);
    {
        let store = kith_server::SqliteStore::open(&data.join(kith_server::DB_FILE)).unwrap();
        store
            .register(&kith_server::store::DeviceRow {
                device,
                name: "alice".parse().unwrap(),
                identity_key: [5; 32],
                record: vec![1],
                record_at: 1,
                registered_at: 1,
            })
            .unwrap();
    }
    let listed = kithd(&["device", "list", "alice"]);
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&device.to_string()));
    let id = device.to_string();
    // While a server holds the data directory's lock, the commands refuse
    // and change nothing.
    {
        let lock = std::fs::File::create(data.join(kith_server::LOCK_FILE)).unwrap();
        lock.try_lock().unwrap();
        let refused = kithd(&["device", "remove", "alice", &id]);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("kithd is running"),
            "{}",
            String::from_utf8_lossy(&refused.stderr)
        );
        let listed = kithd(&["device", "list", "alice"]);
        assert!(!listed.status.success());
    }
    let listed = kithd(&["device", "list", "alice"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&id));
    let bad = kithd(&["device", "remove", "alice", "not-a-device"]);
    assert!(!bad.status.success());
    let removed = kithd(&["device", "remove", "alice", &id]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    let again = kithd(&["device", "remove", "alice", &id]);
    assert!(!again.status.success());
    let listed = kithd(&["device", "list", "alice"]);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&id));
    // Its last device gone, the name can be freed, once.
    assert!(String::from_utf8_lossy(&removed.stdout).contains("name release alice"));
    assert!(kithd(&["name", "release", "alice"]).status.success());
    assert!(!kithd(&["name", "release", "alice"]).status.success());
}
