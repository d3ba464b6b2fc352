//! Durability: the real `kithd` is killed with SIGKILL at random moments
//! while a client sends; after each restart every message the server
//! acknowledged is still there, and the databases pass SQLite's integrity
//! check.
//!
//! The kill times come from a seeded generator: `KITH_DURABILITY_SEED=N`
//! reproduces a run, `KITH_DURABILITY_ROUNDS=N` makes it longer (default 3).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kith_client::Client;

/// How many messages one round tries to send at most.
const MESSAGES_PER_ROUND: usize = 400;

fn kithd_bin() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_kith")).with_file_name("kithd");
    assert!(
        path.exists(),
        "{} is missing: run the workspace tests",
        path.display()
    );
    path
}

fn start(data: &Path, port: u16) -> Child {
    let mut child = Command::new(kithd_bin())
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--server-name", &format!("localhost:{port}")])
        .arg("--open-registration")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("kithd did not start on port {port}");
}

/// xorshift64*: small, seeded, good enough to pick kill times.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn integrity_ok(path: &Path) {
    if !path.exists() {
        return;
    }
    let conn = rusqlite::Connection::open(path).unwrap();
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        result,
        "ok",
        "{} failed its integrity check",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    let seed = env_u64("KITH_DURABILITY_SEED", 0x5eed_1234_abcd_0001);
    let rounds = env_u64("KITH_DURABILITY_ROUNDS", 3);
    eprintln!("durability: seed {seed:#x}, {rounds} rounds (KITH_DURABILITY_SEED to reproduce)");
    let mut rng = Rng(seed.max(1));

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let server = Arc::new(Mutex::new(start(&data, port)));

    let mut alice = Client::register(&dir.path().join("alice"), &url, "alice", None)
        .await
        .unwrap();
    let mut bob = Client::register(&dir.path().join("bob"), &url, "bob", None)
        .await
        .unwrap();
    let channel = alice.create_channel("durable", "text/plain").await.unwrap();
    alice
        .invite(channel, &format!("bob@localhost:{port}"))
        .await
        .unwrap();
    bob.sync().await.unwrap();

    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    for round in 0..rounds {
        // Kill the server outright after a random delay, while Alice sends.
        let delay = Duration::from_millis(100 + rng.next() % 900);
        let victim = Arc::clone(&server);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut child = victim.lock().unwrap();
            child.kill().unwrap();
            child.wait().unwrap();
        });
        for i in 0..MESSAGES_PER_ROUND {
            let text = format!("round {round} message {i}");
            match alice.send(channel, text.as_bytes()).await {
                Ok(_) => {
                    acknowledged.insert(text);
                }
                // The server is gone: what was acknowledged must survive.
                Err(_) => break,
            }
        }
        killer.join().unwrap();
        eprintln!(
            "round {round}: killed after {delay:?}; {} acknowledged so far",
            acknowledged.len()
        );
        for db in ["kith.db", "mls.db", "raft.db"] {
            integrity_ok(&data.join(db));
        }
        *server.lock().unwrap() = start(&data, port);
    }

    // Bob, who was offline all along, catches up and sees everything that
    // was acknowledged; so does a commit made afterwards.
    bob.sync().await.unwrap();
    let seen: BTreeSet<String> = bob
        .messages(channel, usize::MAX >> 1)
        .unwrap()
        .into_iter()
        .map(|m| String::from_utf8(m.body).unwrap())
        .collect();
    let missing: Vec<&String> = acknowledged.difference(&seen).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but lost (seed {seed:#x}): {missing:?}"
    );
    assert!(
        !acknowledged.is_empty(),
        "no message was acknowledged at all"
    );
    alice.self_update(channel).await.unwrap();
    bob.sync().await.unwrap();
    assert_eq!(
        alice.channel_state(channel).unwrap(),
        bob.channel_state(channel).unwrap()
    );

    let mut child = server.lock().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}
