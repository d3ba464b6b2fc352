//! Where OpenMLS keeps its state: a SQLite database through
//! `openmls_sqlite_storage`, paired with the RustCrypto provider.
//!
//! One [`MlsStore`] holds any number of groups (a client's channels, or the
//! public group state a homeserver tracks). The store is the only part of
//! this crate that can touch a file, and only when opened with
//! [`MlsStore::open`]; callers that own their database pass a connection to
//! [`MlsStore::from_connection`].

use std::path::Path;

use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, Connection, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite could not open the database.
    #[error("cannot open the MLS store: {0}")]
    Open(#[from] rusqlite::Error),
    /// The schema migrations failed.
    #[error("cannot prepare the MLS store's tables: {0}")]
    Migrate(String),
}

/// Serialises OpenMLS's stored values as JSON.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// The OpenMLS provider Kith uses: RustCrypto for cryptography and
/// randomness, SQLite for state.
pub struct MlsStore {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, Connection>,
}

impl MlsStore {
    /// Opens (or creates) the database file at `path`.
    ///
    /// The file is in WAL mode with `synchronous = FULL`: each of OpenMLS's
    /// writes is durable when it returns (a sender's ratchet must never step
    /// back after a crash), at one fsync per write instead of the rollback
    /// journal's several.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let connection = Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        Self::from_connection(connection)
    }

    /// A fresh database in memory, lost on drop (for tests and servers that
    /// keep state elsewhere).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::from_connection(Connection::open_in_memory()?)
    }

    /// Uses an open SQLite connection, creating OpenMLS's tables if needed.
    pub fn from_connection(connection: Connection) -> Result<Self, StoreError> {
        let mut storage = SqliteStorageProvider::new(connection);
        storage
            .run_migrations()
            .map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(Self {
            crypto: RustCrypto::default(),
            storage,
        })
    }
}

impl OpenMlsProvider for MlsStore {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, Connection>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

impl std::fmt::Debug for MlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlsStore").finish_non_exhaustive()
    }
}
