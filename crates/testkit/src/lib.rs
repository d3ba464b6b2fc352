//! Runs real Kith homeservers in-process on loopback, each on its own port
//! and data directory, for tests and benchmarks.
//!
//! ```no_run
//! # async fn demo() {
//! let dir = std::env::temp_dir().join("kith-doc");
//! let server = kith_testkit::TestServer::start(&dir, "a.test").await;
//! println!("talk to {}", server.url());
//! server.stop().await;
//! # }
//! ```

#![forbid(unsafe_code)]
// A test harness: failing to set up a server is a test failure, so it panics.
#![allow(clippy::panic)]

use std::path::{Path, PathBuf};

use kith_server::{Config, Registration, ServerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A homeserver running inside this process.
pub struct TestServer {
    url: String,
    name: String,
    data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    /// Starts a server named `name` with open registration and its SQLite
    /// data in `data_dir`, on a free loopback port.
    ///
    /// # Panics
    ///
    /// If the server cannot bind or its name is invalid: this is test setup.
    pub async fn start(data_dir: &Path, name: &str) -> Self {
        let mut config = Config::new(
            name.parse().unwrap_or_else(|e| panic!("{name}: {e}")),
            data_dir,
        );
        config.registration = Registration::Open;
        Self::start_with(config).await
    }

    /// Starts a server with `config` on a free loopback port.
    pub async fn start_with(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding loopback: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let name = config.server_name.to_string();
        let data_dir = config.data_dir.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kith_server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Self {
            url: format!("http://{addr}"),
            name,
            data_dir,
            stop: Some(stop),
            task,
        }
    }

    /// The base URL clients use.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server gracefully and starts it again on the same address
    /// and data directory (with open registration), as an operator's
    /// restart would.
    pub async fn restart(self) -> Self {
        let (url, name, data_dir) = (self.url.clone(), self.name.clone(), self.data_dir.clone());
        self.stop().await;
        let addr = url.trim_start_matches("http://").to_owned();
        let mut listener = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        let listener =
            listener.unwrap_or_else(|| panic!("{addr} did not come free after the stop"));
        let mut config = Config::new(
            name.parse().unwrap_or_else(|e| panic!("{name}: {e}")),
            &data_dir,
        );
        config.registration = Registration::Open;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kith_server::run(listener, config, async {
            let _ = stopped.await;
        }));
        Self {
            url,
            name,
            data_dir,
            stop: Some(stop),
            task,
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("server {} failed: {e}", self.name),
            Err(e) => panic!("server {} task: {e}", self.name),
        }
    }
}
