//! Where OpenMLS keeps its state: a SQLite database through
//! `openmls_sqlite_storage`, paired with the RustCrypto provider.
//!
//! One [`MlsStore`] holds any number of groups (a client's channels, or the
//! public group state a homeserver tracks). The store is the only part of
//! this crate that can touch a file, and only when opened with
//! [`MlsStore::open`]; callers that own their database pass a connection to
//! [`MlsStore::from_connection`].

use std::borrow::{Borrow, BorrowMut};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openmls::ciphersuite::hash_ref::ProposalRef;
use openmls::prelude::GroupId;
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, Connection, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::StorageProvider as _;

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

/// What a batch asks of the connection the next time OpenMLS's storage
/// provider uses it, and what happened.
#[derive(Debug, Default)]
struct Batch {
    /// A statement to run first (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`).
    next: Option<&'static str>,
    /// A transaction is open.
    open: bool,
    /// The first failure of such a statement.
    failed: Option<rusqlite::Error>,
}

fn lock(batch: &Mutex<Batch>) -> MutexGuard<'_, Batch> {
    batch
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The SQLite connection under OpenMLS's storage provider. The provider
/// owns it and gives no access to it, so [`MlsStore::batch`] opens and
/// closes its transaction through the one door it has: each time the
/// provider borrows the connection, a statement the batch queued runs
/// first.
#[derive(Debug)]
pub struct MlsConnection {
    connection: Connection,
    batch: Arc<Mutex<Batch>>,
}

impl Borrow<Connection> for MlsConnection {
    fn borrow(&self) -> &Connection {
        let mut batch = lock(&self.batch);
        if let Some(statement) = batch.next.take() {
            match self.connection.execute_batch(statement) {
                Ok(()) => batch.open = statement.starts_with("BEGIN"),
                Err(e) => {
                    // A failed COMMIT leaves the transaction open: drop it,
                    // so nothing half-written is committed later.
                    if batch.open {
                        let _ = self.connection.execute_batch("ROLLBACK");
                        batch.open = false;
                    }
                    batch.failed.get_or_insert(e);
                }
            }
        }
        &self.connection
    }
}

impl BorrowMut<Connection> for MlsConnection {
    fn borrow_mut(&mut self) -> &mut Connection {
        &mut self.connection
    }
}

/// Why a batch of OpenMLS writes failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError<E> {
    /// The operation itself failed; its writes were rolled back.
    #[error(transparent)]
    Operation(E),
    /// The operation succeeded but its writes could not be committed
    /// (nothing of it is stored).
    #[error("storing the MLS state failed: {0}")]
    Commit(rusqlite::Error),
}

/// The OpenMLS provider Kith uses: RustCrypto for cryptography and
/// randomness, SQLite for state.
pub struct MlsStore {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, MlsConnection>,
    batch: Arc<Mutex<Batch>>,
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
        let batch = Arc::new(Mutex::new(Batch::default()));
        let mut storage = SqliteStorageProvider::new(MlsConnection {
            connection,
            batch: Arc::clone(&batch),
        });
        storage
            .run_migrations()
            .map_err(|e| StoreError::Migrate(e.to_string()))?;
        Ok(Self {
            crypto: RustCrypto::default(),
            storage,
            batch,
        })
    }

    /// Runs `operation` with all its OpenMLS writes in one SQLite
    /// transaction: one disk sync for, say, merging a commit (a dozen
    /// writes) instead of one each, and all of them or none. On success the
    /// writes are durable when this returns; on failure they are rolled
    /// back. Nested batches join the outer one.
    pub fn batch<T, E>(
        &self,
        operation: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, BatchError<E>> {
        self.settle();
        {
            let mut batch = lock(&self.batch);
            if batch.open || batch.next.is_some() {
                drop(batch);
                return operation().map_err(BatchError::Operation);
            }
            batch.failed = None;
            batch.next = Some("BEGIN IMMEDIATE");
        }
        // If the operation panics, the transaction must not stay open (every
        // later write would join it and never be committed).
        let mut unwinding = Unwind {
            store: self,
            armed: true,
        };
        let result = operation();
        unwinding.armed = false;
        {
            let mut batch = lock(&self.batch);
            if !batch.open {
                // The operation never touched the store (or BEGIN failed and
                // its writes went through one by one, each durable).
                batch.next = None;
                return result.map_err(BatchError::Operation);
            }
            batch.next = Some(if result.is_ok() { "COMMIT" } else { "ROLLBACK" });
        }
        // Let the provider borrow the connection once, which runs the
        // queued statement; the read itself is of nothing.
        self.touch();
        let mut batch = lock(&self.batch);
        batch.open = false;
        batch.next = None;
        match (result, batch.failed.take()) {
            (Err(e), _) => Err(BatchError::Operation(e)),
            (Ok(_), Some(e)) => Err(BatchError::Commit(e)),
            (Ok(value), None) => Ok(value),
        }
    }
}

impl MlsStore {
    /// Opens a batch that stays open until [`MlsStore::commit`] (or
    /// [`MlsStore::rollback`]): every OpenMLS write in between, across
    /// awaits, joins one transaction. For callers that must make other
    /// writes durable *before* the MLS state moves on: a receiver commits
    /// the messages it decrypted to its own store, then the ratchet that
    /// decrypted them, so a crash between the two never loses a message.
    ///
    /// If a batch is open already, the new one joins it (its commit and
    /// rollback do nothing; the outer one decides). An [`OpenBatch`]
    /// dropped without either is rolled back: at once if it can be, else
    /// before the store's next use.
    pub fn begin(&self) -> Result<OpenBatch, rusqlite::Error> {
        self.settle();
        {
            let mut batch = lock(&self.batch);
            if batch.open || batch.next.is_some() {
                return Ok(OpenBatch {
                    state: Arc::clone(&self.batch),
                    joined: true,
                    finished: false,
                });
            }
            batch.failed = None;
            batch.next = Some("BEGIN IMMEDIATE");
        }
        // Begun now, not at the first write: a failure to begin is the
        // caller's to see, rather than writes going through one by one.
        self.touch();
        let mut batch = lock(&self.batch);
        batch.next = None;
        if let Some(e) = batch.failed.take() {
            batch.open = false;
            return Err(e);
        }
        Ok(OpenBatch {
            state: Arc::clone(&self.batch),
            joined: false,
            finished: false,
        })
    }

    /// Commits a batch from [`MlsStore::begin`]: its writes are durable
    /// when this returns `Ok`. On `Err` none of them is stored.
    pub fn commit(&self, mut open: OpenBatch) -> Result<(), rusqlite::Error> {
        open.finished = true;
        if open.joined {
            return Ok(());
        }
        {
            let mut batch = lock(&self.batch);
            if !batch.open {
                batch.next = None;
                return Ok(());
            }
            batch.next = Some("COMMIT");
        }
        self.touch();
        let mut batch = lock(&self.batch);
        batch.open = false;
        batch.next = None;
        match batch.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Drops every write of a batch from [`MlsStore::begin`].
    pub fn rollback(&self, mut open: OpenBatch) {
        open.finished = true;
        if open.joined {
            return;
        }
        let queued = {
            let mut batch = lock(&self.batch);
            batch.next = batch.open.then_some("ROLLBACK");
            batch.open
        };
        if queued {
            self.touch();
        }
        let mut batch = lock(&self.batch);
        batch.open = false;
        batch.next = None;
        batch.failed = None;
    }

    /// Runs a rollback that a dropped [`OpenBatch`] queued, so that a new
    /// batch starts afresh instead of joining a dead one.
    fn settle(&self) {
        let stale = lock(&self.batch).next == Some("ROLLBACK");
        if stale {
            self.touch();
            let mut batch = lock(&self.batch);
            batch.open = false;
            batch.next = None;
            batch.failed = None;
        }
    }

    /// Lets the provider borrow the connection once, which runs the
    /// statement a batch queued; the read itself is of nothing.
    fn touch(&self) {
        let _ = self
            .storage
            .queued_proposal_refs::<GroupId, ProposalRef>(&GroupId::from_slice(&[]));
    }
}

/// A batch opened by [`MlsStore::begin`], to be given back to
/// [`MlsStore::commit`] or [`MlsStore::rollback`].
#[must_use = "an open batch is rolled back unless committed"]
#[derive(Debug)]
pub struct OpenBatch {
    state: Arc<Mutex<Batch>>,
    /// It joined a batch that was already open: the outer one commits.
    joined: bool,
    finished: bool,
}

impl Drop for OpenBatch {
    fn drop(&mut self) {
        if self.finished || self.joined {
            return;
        }
        // Dropped without a verdict (an early return, a panic): its writes
        // must never be committed. Without the connection here, the
        // rollback runs first thing when the store is next used.
        let mut batch = lock(&self.state);
        batch.next = batch.open.then_some("ROLLBACK");
    }
}

/// Rolls a batch back if its operation unwinds.
struct Unwind<'s> {
    store: &'s MlsStore,
    armed: bool,
}

impl Drop for Unwind<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let open = {
            let mut batch = lock(&self.store.batch);
            batch.next = batch.open.then_some("ROLLBACK");
            batch.open
        };
        if open {
            self.store.touch();
        }
        let mut batch = lock(&self.store.batch);
        batch.open = false;
        batch.next = None;
    }
}

impl OpenMlsProvider for MlsStore {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, MlsConnection>;

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
