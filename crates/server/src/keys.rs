//! The server's Ed25519 signing key, kept in the data directory, and the
//! `ServerKeys` list published from it.

use std::io::Write;
use std::path::{Path, PathBuf};

use kith_proto::{SecretKey, ServerKey, ServerKeys, ServerName};
use serde::{Deserialize, Serialize};

use crate::error::ServerError;

/// The key file's name inside the data directory.
pub const KEY_FILE: &str = "server-key.toml";

/// How long a generated key is published as valid: ten years. Rotation
/// (publishing a successor and ending this key's validity) is future work.
const KEY_VALIDITY_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    /// The 32-byte Ed25519 seed, hex.
    seed: String,
    /// When the key was made (ms since the Unix epoch): the start of its
    /// published validity.
    created_at: u64,
}

/// The server's signing key and when it was made.
pub(crate) struct SigningKey {
    pub(crate) key: SecretKey,
    pub(crate) created_at: u64,
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE)
}

/// Loads the key from `data_dir`, or makes one and writes it (mode 0600).
pub(crate) fn load_or_generate(data_dir: &Path, now: u64) -> Result<SigningKey, ServerError> {
    let path = key_path(data_dir);
    let io = |e: std::io::Error| ServerError::Io(path.clone(), e);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bad = |why: String| ServerError::KeyFile(path.clone(), why);
            let file: KeyFile = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let mut seed = [0u8; 32];
            hex::decode_to_slice(file.seed.trim(), &mut seed)
                .map_err(|_| bad("seed is not 64 hex digits".into()))?;
            Ok(SigningKey {
                key: SecretKey::from_seed(seed),
                created_at: file.created_at,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate();
            let file = KeyFile {
                seed: hex::encode(key.to_seed()),
                created_at: now,
            };
            let text = toml::to_string(&file)
                .map_err(|e| ServerError::KeyFile(path.clone(), e.to_string()))?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(&path).map_err(io)?;
            f.write_all(
                format!("# The Kith server's signing key. Keep it secret.\n{text}").as_bytes(),
            )
            .map_err(io)?;
            f.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), "generated a new server signing key");
            Ok(SigningKey {
                key,
                created_at: now,
            })
        }
        Err(e) => Err(io(e)),
    }
}

/// The key list this server publishes: its one key, valid from its
/// creation. The list is dated at the key's creation too, so it is the same
/// bytes across restarts (until rotation publishes a newer list).
pub(crate) fn publish(key: &SigningKey, server: &ServerName) -> Result<ServerKeys, ServerError> {
    ServerKeys::publish(
        &key.key,
        server.clone(),
        key.created_at,
        vec![ServerKey {
            key: key.key.public(),
            valid_from: key.created_at,
            valid_until: key.created_at.saturating_add(KEY_VALIDITY_MS),
        }],
    )
    .map_err(|e| ServerError::ServerKeys(e.to_string()))
}
