//! `kith`: the scriptable Kith command line. Every command that prints
//! data takes `--json`; errors go to stderr with a non-zero exit code.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kith_client::{Client, default_home};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "kith",
    version,
    about = "Kith: federated, end-to-end-encrypted chat"
)]
struct Cli {
    /// The device's home directory (default: $KITH_HOME, then a per-user data directory).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this device and register it on a homeserver; prints the handle.
    Register {
        /// The homeserver's URL, e.g. http://127.0.0.1:8448.
        #[arg(long)]
        server: String,
        /// The local name to ask for.
        #[arg(long)]
        name: String,
        /// A registration token, if the server requires one.
        #[arg(long)]
        token: Option<String>,
    },
    /// Show this device's handle, device id and homeserver.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a one-off direct message to every device of a user (through their inboxes).
    Dm {
        /// The recipient, name@server.
        handle: String,
        /// The text.
        text: String,
    },
    /// Fetch and process the inbox once; prints direct messages received.
    Sync {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KITH_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("kith: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = cli.home.unwrap_or_else(default_home);
    match cli.command {
        Command::Register {
            server,
            name,
            token,
        } => {
            let client = Client::register(&home, &server, &name, token.as_deref())
                .await
                .with_context(|| format!("registering {name} on {server}"))?;
            println!("{}", client.handle());
        }
        Command::Whoami { json } => {
            let client = Client::open(&home)?;
            if json {
                let out = json!({
                    "handle": client.handle(),
                    "device": client.device_id().to_string(),
                    "server": client.server_name(),
                    "server_url": client.server_url(),
                });
                println!("{out}");
            } else {
                println!("{}", client.handle());
                println!("device {}", client.device_id());
                println!("server {} ({})", client.server_name(), client.server_url());
            }
        }
        Command::Dm { handle, text } => {
            let mut client = Client::open(&home)?;
            let n = client.send_direct(&handle, text.as_bytes()).await?;
            eprintln!("delivered to {n} device(s) of {handle}");
        }
        Command::Sync { json } => {
            let mut client = Client::open(&home)?;
            for m in client.sync_inbox().await? {
                let text = String::from_utf8_lossy(&m.body);
                if json {
                    println!(
                        "{}",
                        json!({ "sender": m.sender, "sent_at": m.sent_at, "text": text })
                    );
                } else {
                    println!("<{}> {}", m.sender, text);
                }
            }
        }
    }
    Ok(())
}
