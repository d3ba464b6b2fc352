//! Runs real Kith homeservers in-process on loopback, each on its own port
//! and data directory, for tests and benchmarks. A [`Cluster`] starts
//! several named servers that find each other through a resolve map
//! (`a.test` → `http://127.0.0.1:PORT`), as `kithd --resolve` would.
//!
//! ```no_run
//! # async fn demo() {
//! let dir = std::env::temp_dir().join("kith-doc");
//! let server = kith_testkit::TestServer::start(&dir, "a.test").await;
//! println!("talk to {}", server.url());
//! server.stop().await;
//!
//! let mut cluster = kith_testkit::Cluster::start(&dir, &["a.test", "b.test"], |_| {}).await;
//! let b = cluster.take("b.test").stop_keeping().await; // b.test is down
//! cluster.put(b.start().await);                         // and back
//! # }
//! ```

#![forbid(unsafe_code)]
// A test harness: failing to set up a server is a test failure, so it panics.
#![allow(clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kith_server::ServerError;
pub use kith_server::{Config, LinkFaults, Registration, admin};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A homeserver running inside this process.
pub struct TestServer {
    url: String,
    name: String,
    data_dir: PathBuf,
    config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServerError>>,
}

/// A server that was stopped and can start again on the same address, data
/// directory and configuration.
pub struct StoppedServer {
    url: String,
    config: Config,
}

async fn bind(addr: &str) -> TcpListener {
    // The old socket may take a moment to free after a stop.
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{addr} did not come free after the stop")
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
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("binding loopback: {e}"));
        Self::start_on(listener, config)
    }

    /// Starts a server with `config` on `listener`.
    pub fn start_on(listener: TcpListener, config: Config) -> Self {
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let name = config.server_name.to_string();
        let data_dir = config.data_dir.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(kith_server::run(listener, config.clone(), async {
            let _ = stopped.await;
        }));
        Self {
            url: format!("http://{addr}"),
            name,
            data_dir,
            config,
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

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops the server gracefully and starts it again on the same address
    /// and data directory, with the same configuration, as an operator's
    /// restart would.
    pub async fn restart(self) -> Self {
        self.stop_keeping().await.start().await
    }

    /// Stops the server gracefully, keeping what it needs to start again.
    pub async fn stop_keeping(self) -> StoppedServer {
        let (url, config) = (self.url.clone(), self.config.clone());
        self.stop().await;
        StoppedServer { url, config }
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

impl StoppedServer {
    /// Starts the server again on its old address.
    pub async fn start(self) -> TestServer {
        let listener = bind(self.url.trim_start_matches("http://")).await;
        TestServer::start_on(listener, self.config)
    }

    /// The server's name.
    pub fn name(&self) -> String {
        self.config.server_name.to_string()
    }

    /// Its configuration, to change before it starts again (e.g. to block
    /// a server).
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.config
    }
}

/// Several named servers that resolve each other's names to their loopback
/// addresses.
pub struct Cluster {
    servers: BTreeMap<String, TestServer>,
}

impl Cluster {
    /// Starts one server per name, each with open registration, SQLite data
    /// in `dir/<name>`, and a resolve map naming every server of the
    /// cluster; `tweak` adjusts each configuration (e.g. blocked servers or
    /// shorter retries) before it starts.
    pub async fn start(dir: &Path, names: &[&str], tweak: impl Fn(&mut Config)) -> Self {
        let mut listeners = Vec::new();
        let mut resolve = BTreeMap::new();
        for name in names {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("binding loopback: {e}"));
            let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
            let server_name: kith_proto::ServerName =
                name.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
            resolve.insert(server_name.clone(), format!("http://{addr}"));
            listeners.push((server_name, listener));
        }
        let mut servers = BTreeMap::new();
        for (name, listener) in listeners {
            let mut config = Config::new(name.clone(), dir.join(name.as_str()));
            config.registration = Registration::Open;
            config.resolve = resolve.clone();
            tweak(&mut config);
            servers.insert(name.to_string(), TestServer::start_on(listener, config));
        }
        Self { servers }
    }

    /// The server named `name`.
    ///
    /// # Panics
    ///
    /// If there is none (or it was taken).
    pub fn server(&self, name: &str) -> &TestServer {
        self.servers
            .get(name)
            .unwrap_or_else(|| panic!("no server {name} in the cluster"))
    }

    /// Takes the server out of the cluster (to stop or restart it).
    pub fn take(&mut self, name: &str) -> TestServer {
        self.servers
            .remove(name)
            .unwrap_or_else(|| panic!("no server {name} in the cluster"))
    }

    /// Puts a (restarted) server back.
    pub fn put(&mut self, server: TestServer) {
        self.servers.insert(server.name().to_owned(), server);
    }

    /// Stops every server.
    pub async fn stop(self) {
        for (_, server) in self.servers {
            server.stop().await;
        }
    }
}

/// Sends the servers' logs to the test output when `RUST_LOG` is set (for
/// example `RUST_LOG=kith_server=debug cargo test ... -- --nocapture`);
/// does nothing otherwise, or when a subscriber is already installed.
pub fn trace_from_env() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}
