//! What the binary-driving tests share: starting `kithd`, running `kith`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code,
    unreachable_pub
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub fn kith_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kith"))
}

/// `kithd` is built by the same `cargo test --workspace` run (kith-server's
/// own tests need it) and lands beside `kith`.
pub fn kithd_bin() -> PathBuf {
    let path = kith_bin().with_file_name("kithd");
    assert!(
        path.exists(),
        "{} is missing: run the workspace tests (cargo test --workspace)",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Kithd {
    pub child: Child,
    pub port: u16,
    pub data: PathBuf,
}

impl Kithd {
    pub fn start(data: &Path, port: u16) -> Self {
        let child = Command::new(kithd_bin())
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--server-name", &format!("localhost:{port}")])
            .arg("--open-registration")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            child,
            port,
            data: data.to_owned(),
        };
        server.wait_ready();
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn wait_ready(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("kithd did not start listening on port {}", self.port);
    }

    /// SIGKILL: no chance to flush anything not already durable.
    pub fn kill(mut self) -> (PathBuf, u16) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.data.clone(), self.port)
    }
}

impl Drop for Kithd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn kith(home: &Path, args: &[&str]) -> Output {
    Command::new(kith_bin())
        .arg("--home")
        .arg(home)
        .args(args)
        .output()
        .unwrap()
}

pub fn ok(home: &Path, args: &[&str]) -> String {
    let out = kith(home, args);
    assert!(
        out.status.success(),
        "kith {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
