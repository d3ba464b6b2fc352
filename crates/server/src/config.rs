//! The homeserver's configuration, as [`crate::run`] takes it. The `kithd`
//! binary builds it from flags, `KITH_*` environment variables and a TOML
//! file (in that order of precedence); the TOML file has the same shape as
//! [`FileConfig`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use kith_proto::ServerName;
use serde::Deserialize;

use crate::faults::LinkFaults;

/// The port in the default listen address and server name.
pub const DEFAULT_PORT: u16 = 8448;
/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8448";
/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "./kith-data";

/// Where the server keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// SQLite in the data directory (`kith.db`): the default.
    #[default]
    Sqlite,
    /// In memory only: everything is lost when the server stops. The
    /// signing key is still kept in the data directory.
    Memory,
}

/// Who may register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// Anyone.
    Open,
    /// Whoever presents this token.
    Token(String),
    /// No one.
    Closed,
}

impl Registration {
    /// The mode's name in `GET /v0/server`: `open`, `token` or `closed`.
    pub fn mode(&self) -> &'static str {
        match self {
            Registration::Open => "open",
            Registration::Token(_) => "token",
            Registration::Closed => "closed",
        }
    }
}

/// Size and rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Largest key package, in bytes.
    pub max_key_package_bytes: usize,
    /// Most key packages in one upload.
    pub max_key_packages_per_upload: usize,
    /// Most ordinary key packages one device may keep.
    pub max_key_packages_stored: usize,
    /// Largest inbox envelope, in bytes.
    pub max_envelope_bytes: usize,
    /// Most items one inbox holds.
    pub max_inbox_items: usize,
    /// Inbox deposits one device may make per minute, sustained.
    pub inbox_deposits_per_minute: u32,
    /// Inbox deposits one device may make in a burst.
    pub inbox_deposit_burst: u32,
    /// Most items in one list response.
    pub max_list_items: usize,
    /// Largest channel message (an MLS PrivateMessage), in bytes.
    pub max_message_bytes: usize,
    /// Most messages in one multi-message send (spec §6.7); the request
    /// body limit applies to the whole batch.
    pub max_batch_messages: usize,
    /// Inbox deposits one origin server may make per minute (also its
    /// burst).
    pub federation_deposits_per_minute: u32,
    /// Commits (`POST /v0/channels/{id}/commits`) one device may submit per
    /// minute, sustained, over all its channels; 0 turns the limit off.
    pub commits_per_minute: u32,
    /// Commits one device may submit in a burst.
    pub commit_burst: u32,
    /// Submissions one origin server may forward to this server as a
    /// channel's Raft leader (`POST /v0/federation/channels/{id}/submit`)
    /// per minute and channel (also its burst); 0 turns the limit off.
    pub federation_submissions_per_minute: u32,
    /// How long the sponsorships this server issues are valid, ms (devices
    /// renew theirs when a third of this is left).
    pub sponsorship_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_key_package_bytes: 16 * 1024,
            max_key_packages_per_upload: 100,
            max_key_packages_stored: 200,
            max_envelope_bytes: 256 * 1024,
            max_inbox_items: 10_000,
            inbox_deposits_per_minute: 60,
            inbox_deposit_burst: 60,
            max_list_items: 500,
            max_message_bytes: 256 * 1024,
            max_batch_messages: kith_proto::batch::MAX_BATCH_MESSAGES,
            federation_deposits_per_minute: 600,
            commits_per_minute: 60,
            commit_burst: 30,
            federation_submissions_per_minute: 600,
            sponsorship_ms: 365 * 24 * 3600 * 1000,
        }
    }
}

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The server's name: what its sponsorships and handles say.
    pub server_name: ServerName,
    /// Where the signing key and the database live.
    pub data_dir: PathBuf,
    /// The storage backend.
    pub backend: Backend,
    /// Who may register.
    pub registration: Registration,
    /// Size and rate limits.
    pub limits: Limits,
    /// Where other servers are: names mapped to base URLs. Names not listed
    /// resolve to `https://{name}`. A `http://` URL here is the only way
    /// federation ever uses plain HTTP.
    pub resolve: BTreeMap<ServerName, String>,
    /// Servers this one refuses to federate with.
    pub blocked_servers: BTreeSet<ServerName>,
    /// Federation timeouts, body limits and outbox retries.
    pub federation: FederationSettings,
    /// Test hook: federation links cut on purpose (fault-injection tests).
    /// `None` (the default, and the only value `kithd` uses) cuts nothing.
    pub faults: Option<Arc<LinkFaults>>,
}

/// Federation timeouts, limits and the outbox's retry schedule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationSettings {
    /// Time for one whole outgoing request (connect, send, answer), ms.
    pub request_timeout_ms: u64,
    /// Time to connect to another server, ms.
    pub connect_timeout_ms: u64,
    /// Largest answer read from another server, bytes.
    pub max_response_bytes: usize,
    /// First retry delay of an outbox item, ms; it doubles per attempt.
    pub retry_base_ms: u64,
    /// Longest retry delay, ms.
    pub retry_max_ms: u64,
    /// Age after which an undelivered outbox item is dropped (and logged), ms.
    pub outbox_max_age_ms: u64,
    /// Raft heartbeat interval of channels shared with other servers, ms.
    pub raft_heartbeat_ms: u64,
    /// Shortest Raft election timeout, ms.
    pub raft_election_min_ms: u64,
    /// Longest Raft election timeout, ms.
    pub raft_election_max_ms: u64,
    /// A shared channel's Raft group with no commit and no message sent
    /// for this long stops its heartbeats and election timers until the
    /// next use (spec §10.6), ms; 0 keeps them running.
    pub raft_idle_ms: u64,
}

impl Default for FederationSettings {
    fn default() -> Self {
        Self {
            request_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            max_response_bytes: 1024 * 1024,
            retry_base_ms: 1_000,
            retry_max_ms: 300_000,
            outbox_max_age_ms: 7 * 24 * 3_600_000,
            raft_heartbeat_ms: 1_000,
            raft_election_min_ms: 3_000,
            raft_election_max_ms: 6_000,
            raft_idle_ms: 15_000,
        }
    }
}

/// Checks a resolve-map target: an `http://` or `https://` base URL without
/// path, query or fragment. Returns it without a trailing `/`.
pub fn check_base_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?}: a base URL starts with http:// or https://"))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "{url:?}: a base URL is scheme://host[:port], with no path, query or user"
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Parses one `NAME=URL` resolve entry (the `--resolve` and `KITH_RESOLVE`
/// form).
pub fn parse_resolve(entry: &str) -> Result<(ServerName, String), String> {
    let (name, url) = entry
        .split_once('=')
        .ok_or_else(|| format!("{entry:?}: expected NAME=URL"))?;
    let name: ServerName = name
        .trim()
        .parse()
        .map_err(|e| format!("{name:?} is not a server name: {e}"))?;
    Ok((name, check_base_url(url.trim())?))
}

impl Config {
    /// The Raft timers of channels' ordering groups.
    pub fn order_config(&self) -> kith_order::OrderConfig {
        kith_order::OrderConfig {
            heartbeat_ms: self.federation.raft_heartbeat_ms,
            election_timeout_min_ms: self.federation.raft_election_min_ms,
            election_timeout_max_ms: self.federation.raft_election_max_ms,
        }
    }

    /// A configuration with default limits, SQLite in `data_dir`, and
    /// registration closed.
    pub fn new(server_name: ServerName, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            server_name,
            data_dir: data_dir.into(),
            backend: Backend::Sqlite,
            registration: Registration::Closed,
            limits: Limits::default(),
            resolve: BTreeMap::new(),
            blocked_servers: BTreeSet::new(),
            federation: FederationSettings::default(),
            faults: None,
        }
    }
}

/// The TOML configuration file. Every field is optional.
///
/// ```toml
/// server_name = "chat.example.org"
/// listen = "0.0.0.0:8448"
/// data_dir = "/var/lib/kith"
/// backend = "sqlite"              # or "memory"
/// open_registration = false
/// registration_token = "s3cret"   # registration by token
///
/// blocked_servers = ["spam.example"]
///
/// [limits]
/// max_body_bytes = 1048576
/// inbox_deposits_per_minute = 60
/// commits_per_minute = 60         # per device; 0 = no limit
///
/// [resolve]                       # server name = base URL
/// "b.test" = "http://127.0.0.1:8002"
///
/// [federation]
/// request_timeout_ms = 10000
/// retry_max_ms = 300000
/// raft_heartbeat_ms = 1000        # channels shared with other servers
/// raft_election_min_ms = 3000
/// raft_election_max_ms = 6000
/// raft_idle_ms = 15000            # quiesce idle shared channels; 0 = never
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::server_name`].
    pub server_name: Option<String>,
    /// The address to listen on.
    pub listen: Option<String>,
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::backend`].
    pub backend: Option<Backend>,
    /// Registration open to anyone.
    pub open_registration: Option<bool>,
    /// Registration by this token.
    pub registration_token: Option<String>,
    /// See [`Limits`].
    pub limits: Option<Limits>,
    /// See [`Config::resolve`]: server name to base URL.
    pub resolve: Option<BTreeMap<String, String>>,
    /// See [`Config::blocked_servers`].
    pub blocked_servers: Option<Vec<String>>,
    /// See [`FederationSettings`].
    pub federation: Option<FederationSettings>,
}
