//! The homeserver's configuration, as [`crate::run`] takes it. The `kithd`
//! binary builds it from flags, `KITH_*` environment variables and a TOML
//! file (in that order of precedence); the TOML file has the same shape as
//! [`FileConfig`].

use std::path::PathBuf;

use kith_proto::ServerName;
use serde::Deserialize;

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
}

impl Config {
    /// A configuration with default limits, SQLite in `data_dir`, and
    /// registration closed.
    pub fn new(server_name: ServerName, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            server_name,
            data_dir: data_dir.into(),
            backend: Backend::Sqlite,
            registration: Registration::Closed,
            limits: Limits::default(),
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
/// [limits]
/// max_body_bytes = 1048576
/// inbox_deposits_per_minute = 60
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
}
