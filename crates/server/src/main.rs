//! `kithd`: the Kith homeserver.
//!
//! Settings come from, in order of precedence: command-line flags, `KITH_*`
//! environment variables, the TOML file given by `--config`/`KITH_CONFIG`,
//! and the defaults (data in `./kith-data`, listening on `127.0.0.1:8448`,
//! named `localhost:<listen port>`, registration closed). Logs go to stderr,
//! filtered by `KITH_LOG` (e.g. `KITH_LOG=debug`; default `info`).

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kith_server::config::{DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_PORT, parse_resolve};
use kith_server::{Config, FileConfig, Registration};
use tracing_subscriber::EnvFilter;

/// The Kith homeserver.
#[derive(Debug, Parser)]
#[command(name = "kithd", version)]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "KITH_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the database and the server's signing key live [default: ./kith-data].
    #[arg(long, env = "KITH_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8448].
    #[arg(long, env = "KITH_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// The server's name in handles (`name@server`) and sponsorships
    /// [default: localhost:<listen port>].
    #[arg(long, env = "KITH_SERVER_NAME", value_name = "NAME")]
    server_name: Option<String>,
    /// Let anyone register (also KITH_OPEN_REGISTRATION=true).
    #[arg(long)]
    open_registration: bool,
    /// Let whoever presents this token register.
    #[arg(
        long,
        env = "KITH_REGISTRATION_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    registration_token: Option<String>,
    /// Pin a server name to a base URL, e.g. `b.test=http://127.0.0.1:8002`
    /// (repeatable; KITH_RESOLVE takes a comma-separated list). Only a URL
    /// given here can be plain http://.
    #[arg(
        long,
        env = "KITH_RESOLVE",
        value_name = "NAME=URL",
        value_delimiter = ','
    )]
    resolve: Vec<String>,
    /// Refuse to federate with this server (repeatable; KITH_BLOCK takes a
    /// comma-separated list).
    #[arg(long, env = "KITH_BLOCK", value_name = "NAME", value_delimiter = ',')]
    block: Vec<String>,
    /// An operator command on the data directory instead of serving.
    #[command(subcommand)]
    command: Option<Command>,
}

/// Operator commands (run them with the server stopped).
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// A user's devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Local names.
    #[command(subcommand)]
    Name(NameCommand),
}

#[derive(Debug, clap::Subcommand)]
enum NameCommand {
    /// Frees a name whose devices were all removed, so that its user can
    /// register a new device under it (as a new account: the registration
    /// mode applies, and whoever registers it first holds it).
    Release {
        /// The local name.
        name: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum DeviceCommand {
    /// Lists the devices registered under a local name.
    List {
        /// The local name (the part of the handle before `@`).
        name: String,
    },
    /// Removes a device from a local name (a lost or stolen device, when
    /// the user has no other device to remove it from): it can no longer
    /// log in, its sessions, key packages and inbox are deleted, and the
    /// user's other devices remove it from their channels.
    Remove {
        /// The local name.
        name: String,
        /// The device id (64 hex digits).
        device: String,
    },
}

/// Runs an operator command on the data directory `settings` names.
fn operate(command: Command, data_dir: &std::path::Path) -> Result<()> {
    let parse_name = |name: &str| -> Result<kith_proto::LocalName> {
        name.parse()
            .map_err(|e| anyhow::anyhow!("local name {name:?}: {e}"))
    };
    match command {
        Command::Name(NameCommand::Release { name }) => {
            let name = parse_name(&name)?;
            if !kith_server::admin::release_name(data_dir, &name)? {
                bail!(
                    "{name} is not released: a device is still registered under it, or it was never taken"
                );
            }
            println!("released {name}: the next device to register under it holds it");
        }
        Command::Device(DeviceCommand::List { name }) => {
            let name = parse_name(&name)?;
            let devices = kith_server::admin::list_devices(data_dir, &name)?;
            if devices.is_empty() {
                println!("no device is registered under {name}");
            }
            for d in devices {
                println!(
                    "{}  {}  registered at {} ms",
                    d.device, d.display_name, d.registered_at
                );
            }
        }
        Command::Device(DeviceCommand::Remove { name, device }) => {
            let name = parse_name(&name)?;
            let device: kith_proto::DeviceId = device
                .parse()
                .map_err(|e| anyhow::anyhow!("device id {device:?}: {e}"))?;
            let told = kith_server::admin::remove_device(data_dir, &name, &device)?;
            println!(
                "removed {device} from {name}; {told} remaining device(s) will remove it from their channels"
            );
            if told == 0 {
                println!(
                    "{name} has no device left; the name stays reserved until `kithd name release {name}`"
                );
            }
        }
    }
    Ok(())
}

fn env_flag(name: &str) -> Result<Option<bool>> {
    match std::env::var(name) {
        Ok(v) => match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "0" | "false" | "no" | "off" | "" => Ok(Some(false)),
            _ => bail!("{name}={v:?}: expected true or false"),
        },
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("{name}: {e}"),
    }
}

/// Merges flags and environment (already merged by clap) over the file over
/// the defaults.
fn settings(args: Args) -> Result<(String, Config)> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let server_name = match args.server_name.or(file.server_name) {
        Some(name) => name,
        None => {
            let port = listen
                .parse::<SocketAddr>()
                .map_or(DEFAULT_PORT, |a| a.port());
            format!("localhost:{port}")
        }
    };
    let server_name = server_name
        .parse()
        .map_err(|e| anyhow::anyhow!("server name {server_name:?}: {e}"))?;
    let open = if args.open_registration {
        true
    } else {
        env_flag("KITH_OPEN_REGISTRATION")?
            .or(file.open_registration)
            .unwrap_or(false)
    };
    let token = args
        .registration_token
        .or(file.registration_token)
        .filter(|t| !t.is_empty());
    let registration = match (open, token) {
        (true, _) => Registration::Open,
        (false, Some(token)) => Registration::Token(token),
        (false, None) => Registration::Closed,
    };
    let mut config = Config::new(server_name, data_dir);
    config.registration = registration;
    if let Some(backend) = file.backend {
        config.backend = backend;
    }
    if let Some(limits) = file.limits {
        config.limits = limits;
    }
    if let Some(federation) = file.federation {
        config.federation = federation;
    }
    // The file's entries first, so the command line wins for a name in both.
    for (name, url) in file.resolve.unwrap_or_default() {
        let (name, url) = parse_resolve(&format!("{name}={url}"))
            .map_err(|e| anyhow::anyhow!("[resolve] in the config file: {e}"))?;
        config.resolve.insert(name, url);
    }
    for entry in args.resolve.iter().filter(|e| !e.trim().is_empty()) {
        let (name, url) = parse_resolve(entry).map_err(|e| anyhow::anyhow!("--resolve {e}"))?;
        config.resolve.insert(name, url);
    }
    let blocked = file.blocked_servers.unwrap_or_default();
    for name in blocked.iter().chain(&args.block) {
        if name.trim().is_empty() {
            continue;
        }
        let server = name
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("blocked server {name:?}: {e}"))?;
        config.blocked_servers.insert(server);
    }
    Ok((listen, config))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops kithd");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// How many malloc arenas glibc may keep, unless the environment says
/// otherwise. glibc's default (8 per core) lets each busy thread keep its own
/// arena of freed memory: about 800 bytes per channel after creating 10,000
/// channels (docs/performance.md). Two arenas are enough for a server whose
/// state lives in SQLite and whose runtime has one worker per core.
const MALLOC_ARENA_MAX: &str = "2";

/// glibc reads `MALLOC_ARENA_MAX` only when the process starts, so `kithd`
/// sets it by executing itself again (same PID, arguments and environment
/// plus the variable) before any thread exists. A value already in the
/// environment, any value, is kept; if the re-execution fails the server
/// runs with glibc's default.
#[cfg(target_os = "linux")]
fn limit_malloc_arenas() {
    use std::os::unix::process::CommandExt;

    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("MALLOC_ARENA_MAX", MALLOC_ARENA_MAX)
        .exec();
    eprintln!("kithd: not limiting malloc arenas (re-executing failed: {error})");
}

#[cfg(not(target_os = "linux"))]
fn limit_malloc_arenas() {}

fn main() -> Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve())
}

async fn serve() -> Result<()> {
    let filter = EnvFilter::try_from_env("KITH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut args = Args::parse();
    let command = args.command.take();
    let (listen, config) = settings(args)?;
    if let Some(command) = command {
        return operate(command, &config.data_dir);
    }
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    kith_server::run(listener, config, shutdown_signal())
        .await
        .context("kithd failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> (String, Config) {
        settings(
            Args::try_parse_from(std::iter::once("kithd").chain(args.iter().copied())).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn defaults() {
        let (listen, config) = parse(&[]);
        assert_eq!(listen, "127.0.0.1:8448");
        assert_eq!(config.server_name.as_str(), "localhost:8448");
        assert_eq!(config.data_dir, PathBuf::from("./kith-data"));
        assert_eq!(config.registration, Registration::Closed);
    }

    #[test]
    fn server_name_follows_the_listen_port() {
        let (_, config) = parse(&["--listen", "127.0.0.1:9000"]);
        assert_eq!(config.server_name.as_str(), "localhost:9000");
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kithd.toml");
        std::fs::write(
            &file,
            "server_name = \"Chat.Example.org\"\nlisten = \"127.0.0.1:7000\"\n\
             data_dir = \"/from/file\"\nregistration_token = \"t\"\n\
             [limits]\nmax_body_bytes = 2048\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let (listen, config) = parse(&["--config", path, "--data-dir", "/from/flag"]);
        assert_eq!(listen, "127.0.0.1:7000");
        assert_eq!(config.server_name.as_str(), "chat.example.org");
        assert_eq!(config.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(config.registration, Registration::Token("t".into()));
        assert_eq!(config.limits.max_body_bytes, 2048);
        assert_eq!(config.limits.max_envelope_bytes, 256 * 1024);
        let (_, config) = parse(&["--config", path, "--open-registration"]);
        assert_eq!(config.registration, Registration::Open);
    }

    #[test]
    fn resolve_and_block_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kithd.toml");
        std::fs::write(
            &file,
            "blocked_servers = [\"spam.test\"]\n[resolve]\n\"b.test\" = \"http://127.0.0.1:1\"\n\
             \"c.test\" = \"https://c.example:8448/\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let (_, config) = parse(&[
            "--config",
            path,
            "--resolve",
            "b.test=http://127.0.0.1:2",
            "--block",
            "evil.test",
        ]);
        let b: kith_proto::ServerName = "b.test".parse().unwrap();
        let c: kith_proto::ServerName = "c.test".parse().unwrap();
        assert_eq!(config.resolve[&b], "http://127.0.0.1:2");
        assert_eq!(config.resolve[&c], "https://c.example:8448");
        assert_eq!(config.blocked_servers.len(), 2);
        let bad = Args::try_parse_from(["kithd", "--resolve", "b.test=ftp://x"]).unwrap();
        assert!(settings(bad).is_err());
        let bad = Args::try_parse_from(["kithd", "--resolve", "b.test"]).unwrap();
        assert!(settings(bad).is_err());
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kithd.toml");
        std::fs::write(&file, "sever_name = \"typo.example\"\n").unwrap();
        let args = Args::try_parse_from(["kithd", "--config", file.to_str().unwrap()]).unwrap();
        assert!(settings(args).is_err());
    }
}
