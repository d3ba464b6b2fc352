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

/// The first byte of every value [`StoreCodec`] writes. JSON text (what
/// stores written before it hold) never starts with a NUL byte, so the
/// two formats cannot be mistaken for each other.
pub const BINARY_MARKER: u8 = 0x00;

/// How OpenMLS's stored values and keys are encoded: MessagePack (named
/// fields, like JSON, so the same serde data model) behind
/// [`BINARY_MARKER`]; values stored as JSON by earlier versions still
/// read, and are rewritten in the binary format when OpenMLS next writes
/// them.
///
/// JSON wrote each byte string as an array of decimal numbers: a large
/// group's ratchet tree was several times its size and slow to parse, and
/// OpenMLS loads and stores the whole tree for every commit. MessagePack
/// writes an integer below 128 in one byte and one below 256 in two.
/// It is self-describing, as some of OpenMLS's stored types need (an
/// untagged enum in the group's join configuration, byte strings that
/// accept several forms).
#[derive(Debug, Default, Clone, Copy)]
pub struct StoreCodec;

/// Why a stored OpenMLS value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding a value failed.
    #[error("cannot encode an MLS state value: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// A value in the binary format does not decode.
    #[error("cannot decode an MLS state value: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// A value stored as JSON (by an earlier version) does not decode.
    #[error("cannot decode an MLS state value stored as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl Codec for StoreCodec {
    type Error = CodecError;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        let mut out = vec![BINARY_MARKER];
        value.serialize(&mut rmp_serde::Serializer::new(&mut out).with_struct_map())?;
        Ok(out)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        match slice.split_first() {
            Some((&BINARY_MARKER, binary)) => Ok(rmp_serde::from_slice(binary)?),
            _ => Ok(serde_json::from_slice(slice)?),
        }
    }
}

/// The columns of OpenMLS's tables that hold keys: values the codec
/// encodes and SQLite then compares byte for byte, so unlike stored
/// values they cannot stay in the old format and must all be rewritten at
/// once. The `vc_` tables belong to a draft extension Kith does not enable
/// (always empty here), listed so that enabling it later cannot strand rows.
const KEY_COLUMNS: &[(&str, &str)] = &[
    ("openmls_encryption_keys", "public_key"),
    ("openmls_epoch_keys_pairs", "group_id"),
    ("openmls_epoch_keys_pairs", "epoch_id"),
    ("openmls_group_data", "group_id"),
    ("openmls_key_packages", "key_package_ref"),
    ("openmls_own_leaf_nodes", "group_id"),
    ("openmls_proposals", "group_id"),
    ("openmls_proposals", "proposal_ref"),
    ("openmls_psks", "psk_id"),
    ("openmls_signature_keys", "public_key"),
    ("vc_emulation_group_secrets", "epoch_id"),
    ("vc_emulation_bindings", "group_id"),
    ("vc_operation_trees", "epoch_id"),
    ("vc_retained_key_package_material", "key_package_ref"),
    ("vc_retained_key_package_material", "epoch_id"),
    ("registered_vc_emulation_epochs", "group_id"),
];

/// Rewrites every key still stored as JSON in the binary format, in one
/// transaction; returns how many were rewritten. The JSON is transcoded
/// event by event (field order kept), which gives the same bytes as
/// encoding the typed key, because the binary format keeps JSON's data
/// model (named fields, variants by name, integers by value); a test checks
/// this for each key type Kith stores.
fn migrate_keys(connection: &mut Connection) -> Result<usize, StoreError> {
    let tx = connection.transaction()?;
    let mut rewritten = 0;
    for &(table, column) in KEY_COLUMNS {
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            [table],
            |row| row.get(0),
        )?;
        if !exists {
            continue;
        }
        let old: Vec<(i64, Vec<u8>)> = tx
            .prepare(&format!(
                "SELECT rowid, {column} FROM {table} WHERE substr({column}, 1, 1) <> x'00'"
            ))?
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (rowid, json) in old {
            let binary = json_to_binary(&json)
                .map_err(|e| StoreError::Migrate(format!("a key in {table}.{column}: {e}")))?;
            tx.execute(
                &format!("UPDATE {table} SET {column} = ?1 WHERE rowid = ?2"),
                rusqlite::params![binary, rowid],
            )?;
            rewritten += 1;
        }
    }
    tx.commit()?;
    Ok(rewritten)
}

/// The binary form of a value stored as JSON.
fn json_to_binary(json: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = vec![BINARY_MARKER];
    let mut from = serde_json::Deserializer::from_slice(json);
    serde_transcode::transcode(
        &mut from,
        &mut rmp_serde::Serializer::new(&mut out).with_struct_map(),
    )
    .map_err(|e| e.to_string())?;
    from.end().map_err(|e| e.to_string())?;
    Ok(out)
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
    /// The next transaction (from [`MlsStore::batch_unsynced`]) commits
    /// without waiting for a disk sync.
    unsynced: bool,
    /// The connection's sync level is lowered for such a transaction.
    relaxed: bool,
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
    /// The connection's own `PRAGMA synchronous` level (0 to 3), restored
    /// after a transaction that committed without a sync.
    own_level: i64,
}

/// `PRAGMA synchronous = NORMAL`: in WAL mode a commit is written to the
/// log but not synced; the database stays consistent, and an OS crash may
/// take back the last transactions (never a part of one, and never one
/// without those before it).
const NORMAL: i64 = 1;

impl MlsConnection {
    /// Sets the connection's sync level (SQLite refuses to change it
    /// inside a transaction, so this runs between them).
    fn set_level(&self, level: i64) -> Result<(), rusqlite::Error> {
        self.connection
            .pragma_update(None, "synchronous", level.to_string())
    }
}

impl Borrow<Connection> for MlsConnection {
    fn borrow(&self) -> &Connection {
        let mut batch = lock(&self.batch);
        if batch.relaxed && !batch.open && self.set_level(self.own_level).is_ok() {
            batch.relaxed = false;
        }
        if let Some(statement) = batch.next.take() {
            let begins = statement.starts_with("BEGIN");
            // A failure to lower the level leaves the sync on: slower, as
            // safe.
            if begins
                && std::mem::take(&mut batch.unsynced)
                && self.own_level > NORMAL
                && self.set_level(NORMAL).is_ok()
            {
                batch.relaxed = true;
            }
            match self.connection.execute_batch(statement) {
                Ok(()) => batch.open = begins,
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
            // The transaction is over (committed, rolled back or never
            // begun): the next ones are synced again. Should that fail,
            // the batch reports it, and it is tried again first thing on
            // the next use.
            if batch.relaxed && !batch.open {
                match self.set_level(self.own_level) {
                    Ok(()) => batch.relaxed = false,
                    Err(e) => {
                        batch.failed.get_or_insert(e);
                    }
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
    storage: SqliteStorageProvider<StoreCodec, MlsConnection>,
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

    /// Uses an open SQLite connection, creating OpenMLS's tables if needed
    /// and rewriting the keys of a store written as JSON (see
    /// [`StoreCodec`]).
    pub fn from_connection(mut connection: Connection) -> Result<Self, StoreError> {
        migrate_keys(&mut connection)?;
        let own_level = connection.pragma_query_value(None, "synchronous", |row| row.get(0))?;
        let batch = Arc::new(Mutex::new(Batch::default()));
        let mut storage = SqliteStorageProvider::new(MlsConnection {
            connection,
            batch: Arc::clone(&batch),
            own_level,
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
        self.run_batch(false, operation)
    }

    /// [`MlsStore::batch`], except that the commit does not wait for a
    /// disk sync (the store's own level applies again after it): the writes
    /// are still all or none, and in order with the store's other
    /// transactions, but an OS crash (not a process crash) may take back
    /// the last ones. Only for state that the caller can rebuild from
    /// records of its own (a homeserver's public channel states). Joining
    /// an open batch, the outer one decides. `Err(BatchError::Commit)` may
    /// also mean that the writes are stored but the store's sync level
    /// could not be restored (it is tried again on its next use).
    pub fn batch_unsynced<T, E>(
        &self,
        operation: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, BatchError<E>> {
        self.run_batch(true, operation)
    }

    fn run_batch<T, E>(
        &self,
        unsynced: bool,
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
            batch.unsynced = unsynced;
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
                batch.unsynced = false;
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
            batch.unsynced = false;
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
    type StorageProvider = SqliteStorageProvider<StoreCodec, MlsConnection>;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use openmls::ciphersuite::hash_ref::HashReference;
    use openmls::prelude::{GroupEpoch, MlsGroupJoinConfig};
    use openmls::schedule::psk::ResumptionPskUsage;
    use openmls::schedule::{ExternalPsk, PreSharedKeyId, Psk};
    use openmls::treesync::EncryptionKey;
    use serde::Serialize;

    use super::*;

    /// What the codec before [`StoreCodec`] (`JsonCodec`) wrote: exactly
    /// `serde_json::to_vec`.
    fn old_json(value: &impl Serialize) -> Vec<u8> {
        serde_json::to_vec(value).unwrap()
    }

    fn group_id() -> GroupId {
        GroupId::from_slice(&[7; 16])
    }

    fn join_config() -> MlsGroupJoinConfig {
        crate::device::join_config()
    }

    #[test]
    fn a_value_written_as_json_still_reads() {
        let config = join_config();
        let read: MlsGroupJoinConfig = StoreCodec::from_slice(&old_json(&config)).unwrap();
        assert_eq!(read, config);
        let psk = PreSharedKeyId::resumption(
            ResumptionPskUsage::Application,
            group_id(),
            GroupEpoch::from(3),
            vec![9; 32],
        );
        let read: PreSharedKeyId = StoreCodec::from_slice(&old_json(&psk)).unwrap();
        assert_eq!(read, psk);
    }

    #[test]
    fn new_values_carry_the_marker_and_round_trip() {
        let config = join_config();
        let binary = StoreCodec::to_vec(&config).unwrap();
        assert_eq!(binary.first(), Some(&BINARY_MARKER));
        assert_eq!(
            StoreCodec::from_slice::<MlsGroupJoinConfig>(&binary).unwrap(),
            config
        );
        // JSON text never starts with the marker, so the two cannot be confused.
        assert_ne!(old_json(&config).first(), Some(&BINARY_MARKER));
        assert_ne!(old_json(&group_id()).first(), Some(&BINARY_MARKER));
        assert_ne!(old_json(&7u64).first(), Some(&BINARY_MARKER));
        // Byte strings no longer cost up to four bytes a byte.
        let key = EncryptionKey::from(vec![200; 1000]);
        assert!(StoreCodec::to_vec(&key).unwrap().len() <= 2 * 1000 + 16);
        assert!(old_json(&key).len() >= 4 * 1000);
        assert_eq!(
            StoreCodec::from_slice::<EncryptionKey>(&StoreCodec::to_vec(&key).unwrap()).unwrap(),
            key
        );
    }

    #[test]
    fn damaged_values_are_errors() {
        for bad in [
            &[][..],
            &[BINARY_MARKER],
            &[BINARY_MARKER, 0xc1],
            b"{\"value\":",
            &[0xff],
        ] {
            assert!(StoreCodec::from_slice::<GroupId>(bad).is_err(), "{bad:?}");
        }
        // A binary value of another type.
        let epoch = StoreCodec::to_vec(&GroupEpoch::from(5)).unwrap();
        assert!(StoreCodec::from_slice::<GroupId>(&epoch).is_err());
    }

    /// A key stored as JSON and rewritten by [`migrate_keys`] must be the
    /// bytes OpenMLS's lookups now ask for: the typed key's encoding.
    #[test]
    fn transcoded_keys_equal_typed_keys() {
        fn check(key: &impl Serialize) {
            assert_eq!(
                json_to_binary(&old_json(key)).unwrap(),
                StoreCodec::to_vec(key).unwrap(),
                "{}",
                String::from_utf8_lossy(&old_json(key))
            );
        }
        check(&group_id());
        check(&GroupEpoch::from(0));
        check(&GroupEpoch::from(u64::MAX));
        // A hash reference (key packages, proposals) is not constructible
        // from bytes outside OpenMLS; the JSON form is its serde form.
        let reference: HashReference =
            serde_json::from_str(&format!("{{\"value\":{{\"vec\":{:?}}}}}", [0xabu8; 32])).unwrap();
        check(&reference);
        check(&EncryptionKey::from((0..=255).collect::<Vec<u8>>()));
        let resumption = PreSharedKeyId::resumption(
            ResumptionPskUsage::Reinit,
            group_id(),
            GroupEpoch::from(300),
            vec![1; 32],
        );
        check(&resumption);
        check(resumption.psk());
        let external = PreSharedKeyId::external(vec![5; 20], vec![6; 32]);
        check(&external);
        check(external.psk());
        check(&Psk::External(ExternalPsk::new(vec![])));
    }

    fn table_with_json_key(key: &[u8]) -> Connection {
        let connection = Connection::open_in_memory().unwrap();
        connection
            .execute_batch(
                "CREATE TABLE openmls_group_data (group_id BLOB NOT NULL, data_type TEXT NOT NULL, \
                 group_data BLOB NOT NULL, PRIMARY KEY (group_id, data_type))",
            )
            .unwrap();
        connection
            .execute(
                "INSERT INTO openmls_group_data VALUES (?1, 'tree', x'7b7d')",
                [key],
            )
            .unwrap();
        connection
    }

    fn stored_key(connection: &Connection) -> Vec<u8> {
        connection
            .query_row("SELECT group_id FROM openmls_group_data", [], |r| r.get(0))
            .unwrap()
    }

    /// The sync level of an [`MlsConnection`]'s connection, as `borrow`
    /// leaves it after running `statement` for a batch.
    fn level_after(connection: &MlsConnection, statement: &'static str, unsynced: bool) -> i64 {
        {
            let mut batch = lock(&connection.batch);
            batch.next = Some(statement);
            batch.unsynced = unsynced;
        }
        let conn: &Connection = connection.borrow();
        assert!(lock(&connection.batch).failed.is_none());
        conn.pragma_query_value(None, "synchronous", |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn an_unsynced_batch_commits_without_a_sync_and_the_next_one_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mls.db");
        let store = MlsStore::open(&path).unwrap();
        drop(store);
        let file = Connection::open(&path).unwrap();
        file.pragma_update(None, "synchronous", "FULL").unwrap();
        let connection = MlsConnection {
            connection: file,
            batch: Arc::new(Mutex::new(Batch::default())),
            own_level: 2,
        };
        // FULL is 2, NORMAL 1.
        assert_eq!(level_after(&connection, "BEGIN IMMEDIATE", true), 1);
        Borrow::<Connection>::borrow(&connection)
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert_eq!(level_after(&connection, "COMMIT", false), 2);
        assert!(!lock(&connection.batch).relaxed);
        assert_eq!(level_after(&connection, "BEGIN IMMEDIATE", false), 2);
        assert_eq!(level_after(&connection, "ROLLBACK", false), 2);
        // Rolled back, it is synced again too.
        assert_eq!(level_after(&connection, "BEGIN IMMEDIATE", true), 1);
        assert_eq!(level_after(&connection, "ROLLBACK", false), 2);
        let count: i64 = Borrow::<Connection>::borrow(&connection)
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 0);
    }

    #[test]
    fn keys_are_rewritten_once() {
        let mut connection = table_with_json_key(&old_json(&group_id()));
        assert_eq!(migrate_keys(&mut connection).unwrap(), 1);
        assert_eq!(
            stored_key(&connection),
            StoreCodec::to_vec(&group_id()).unwrap()
        );
        assert_eq!(migrate_keys(&mut connection).unwrap(), 0);
        assert_eq!(
            stored_key(&connection),
            StoreCodec::to_vec(&group_id()).unwrap()
        );
    }

    #[test]
    fn a_damaged_key_stops_the_migration_and_changes_nothing() {
        let mut connection = table_with_json_key(b"{\"value\":");
        connection
            .execute(
                "INSERT INTO openmls_group_data VALUES (?1, 'context', x'7b7d')",
                [old_json(&group_id())],
            )
            .unwrap();
        let err = migrate_keys(&mut connection).unwrap_err();
        assert!(
            err.to_string().contains("openmls_group_data.group_id"),
            "{err}"
        );
        let keys: Vec<Vec<u8>> = connection
            .prepare("SELECT group_id FROM openmls_group_data ORDER BY data_type")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(keys, vec![old_json(&group_id()), b"{\"value\":".to_vec()]);
    }
}
