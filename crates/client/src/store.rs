//! The client's local store: one SQLite file in the home directory holding
//! the device's secret keys, its session, and what it has received.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::ClientError;

/// What the device is: its keys and where it is registered.
#[derive(Clone)]
pub struct Identity {
    /// Ed25519 seed of the device identity key.
    pub identity_seed: [u8; 32],
    /// X25519 inbox secret.
    pub inbox_secret: [u8; 32],
    /// The homeserver's base URL.
    pub server_url: String,
    /// The homeserver's name.
    pub server_name: String,
    /// `name@server`.
    pub handle: String,
    /// The current encoded device record.
    pub record: Vec<u8>,
    /// The session token, once logged in.
    pub token: Option<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("handle", &self.handle)
            .field("server_url", &self.server_url)
            .finish()
    }
}

/// The local SQLite store.
pub struct Store {
    conn: Connection,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS identity (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    identity_seed BLOB NOT NULL,
    inbox_secret BLOB NOT NULL,
    server_url TEXT NOT NULL,
    server_name TEXT NOT NULL,
    handle TEXT NOT NULL,
    record BLOB NOT NULL,
    token TEXT
);
CREATE TABLE IF NOT EXISTS direct_messages (
    sender TEXT NOT NULL,
    sender_device BLOB NOT NULL,
    sent_at INTEGER NOT NULL,
    body BLOB NOT NULL,
    received_at INTEGER NOT NULL
);
";

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, ClientError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        restrict_permissions(path);
        Ok(Self { conn })
    }

    /// The device's identity, if it has registered.
    pub fn identity(&self) -> Result<Option<Identity>, ClientError> {
        let row = self
            .conn
            .query_row(
                "SELECT identity_seed, inbox_secret, server_url, server_name, handle, record, token
                 FROM identity WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((seed, inbox, server_url, server_name, handle, record, token)) = row else {
            return Ok(None);
        };
        let corrupt = || ClientError::Store("the stored keys have the wrong length".into());
        Ok(Some(Identity {
            identity_seed: seed.try_into().map_err(|_| corrupt())?,
            inbox_secret: inbox.try_into().map_err(|_| corrupt())?,
            server_url,
            server_name,
            handle,
            record,
            token,
        }))
    }

    /// Saves the identity (replacing any).
    pub fn save_identity(&self, id: &Identity) -> Result<(), ClientError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO identity
             (id, identity_seed, inbox_secret, server_url, server_name, handle, record, token)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                &id.identity_seed[..],
                &id.inbox_secret[..],
                id.server_url,
                id.server_name,
                id.handle,
                id.record,
                id.token
            ],
        )?;
        Ok(())
    }

    /// Records a received direct message.
    pub fn save_direct(
        &self,
        sender: &str,
        sender_device: &[u8],
        sent_at: u64,
        body: &[u8],
        received_at: u64,
    ) -> Result<(), ClientError> {
        self.conn.execute(
            "INSERT INTO direct_messages (sender, sender_device, sent_at, body, received_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                sender,
                sender_device,
                sent_at as i64,
                body,
                received_at as i64
            ],
        )?;
        Ok(())
    }
}

#[cfg(unix)]
fn restrict_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The file holds secret keys: only the owner may read it.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_permissions(_: &Path) {}
